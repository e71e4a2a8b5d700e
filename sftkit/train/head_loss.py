"""The training loss straight from the last hidden states: the 150k-wide logits are never built.

A causal LM's head projects every token onto the whole vocabulary (151,936 columns for Qwen2.5);
materialising those logits, their fp32 copy and their gradient costs more memory than the rest of a
small model's activations. TRL's own fused head already avoids that and also computes entropy and
top-1 accuracy for its logs (``lm_head_loss: trl``). The kernels here compute the loss alone:

- ``liger``: Liger's fused linear cross-entropy, gradients accumulated in fp32; CUDA only;
- ``cce``: Apple's cut-cross-entropy, exact (no gradient filtering); CUDA only;
- ``torch``: ``torch.nn.functional.linear_cross_entropy`` with its chunked path (torch 2.13 and later).

A kernel computes ``hidden @ W.T``, and a model's head may do more: scale its logits (Cohere's
``logit_scale``, Granite's ``logits_scaling``), cap them (Gemma 2's ``final_logit_softcapping``), add a
bias (Phi), or carry an adapter (PEFT). ``inspect_head`` finds out by probing the loaded model, and
``exact_path`` lets a kernel run only where it reproduces the model's own logits (the scale folded into
the hidden states, the bias and the cap passed where the kernel takes them). Elsewhere TRL's fused head
computes the loss where it reproduces them, and the model's own logits (``logits``) where nothing else does.

Only the positions whose next token is trained are projected: the collator lists them on the CPU
(``LABEL_POSITIONS``), so selecting them costs the GPU no synchronisation. The sum over them is
divided by the tokens of the whole optimizer step, exactly as TRL's loss is, so the optimisation is
the same whichever path computes it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import inspect
import types
from collections.abc import Callable, Collection, Iterator
from typing import Any

import torch
from torch.distributed.tensor import DTensor
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

from sftkit.data.tokenization import IGNORE

LABEL_POSITIONS = "sftkit_label_positions"  # flat indices of the positions whose next-token label is trained
KERNELS = ("liger", "cce", "torch")  # auto takes the first that runs here
LOGITS = "logits"  # the model's own forward builds the logits: exact for any head, at the memory cost of the logits

SumOfLosses = Callable[..., torch.Tensor]

# Largest plain logit of the probe's rows: the small ones fit the scale, the large ones show a cap.
PROBE_MAGNITUDES = (1.0, 10.0, 100.0, 1_000.0, 10_000.0)
PROBE_ROWS = 4 * len(PROBE_MAGNITUDES) + 1  # TRL's head scores every position but the last
# How far a probed logit may stray from a formula (relative to its row's largest): rounding in the head's dtype.
PROBE_TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
# The keyword a kernel takes each part of a head by, besides the hidden states, the weight and the targets.
FEATURE_PARAMETERS = {"bias": ("bias", "linear_bias"), "softcap": ("softcap",)}


@dataclasses.dataclass(frozen=True)
class Head:
    """How the model turns its last hidden states into logits: ``softcap(scale * (hidden @ W.T + bias))``.

    ``unlike``: why no such formula reproduces the model's head (an adapted head, logits the probe could not match),
    so that no kernel may compute its loss; None when one does. ``trl_differs``: why TRL's fused head does not
    reproduce the model's log-probabilities and their gradients; None when it does.
    """

    scale: float = 1.0
    softcap: float | None = None
    bias: bool = False
    unlike: str | None = None
    trl_differs: str | None = None

    def describe(self) -> str:
        """The formula, for the log."""
        logits = "hidden @ W.T" + (" + b" if self.bias else "")
        if self.scale != 1.0:
            logits = f"{self.scale:g} * ({logits})"
        return f"{self.softcap:g} * tanh({logits} / {self.softcap:g})" if self.softcap is not None else logits


def torch_chunked_available() -> bool:
    """torch's linear_cross_entropy with a chunked path (LinearCrossEntropyOptions: torch 2.13 and later)."""
    return hasattr(torch.nn.functional, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions")


def kernel_available(kernel: str, cuda: bool) -> str | None:
    """None when ``kernel`` can run here; else why not."""
    if kernel == "torch":
        return None if torch_chunked_available() else f"torch {torch.__version__} has no chunked linear_cross_entropy"
    package = {"cce": "cut_cross_entropy", "liger": "liger_kernel"}[kernel]
    if importlib.util.find_spec(package) is None:
        return f"the {package.replace('_', '-')} package is not installed"
    return None if cuda else "its kernels are Triton, CUDA only"


def _kernel_function(kernel: str) -> Callable[..., torch.Tensor]:
    if kernel == "torch":
        return torch.nn.functional.linear_cross_entropy
    if kernel == "cce":
        from cut_cross_entropy import linear_cross_entropy

        return linear_cross_entropy
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    return liger_fused_linear_cross_entropy


def kernel_features(kernel: str) -> frozenset[str]:
    """What of a head (``bias``, ``softcap``) the installed ``kernel`` takes, read from its signature: versions differ
    (cut-cross-entropy took no bias before 25.x; torch's kernel takes a bias but no cap)."""
    parameters = inspect.signature(_kernel_function(kernel)).parameters
    return frozenset(feature for feature, names in FEATURE_PARAMETERS.items()
                     if any(name in parameters for name in names))


def kernel_refusal(head: Head, features: Collection[str]) -> str | None:
    """Why a kernel taking ``features`` cannot reproduce ``head``; None if it can. A scale needs no feature: it is
    folded into the hidden states."""
    if head.unlike is not None:
        return head.unlike
    if head.softcap is not None and "softcap" not in features:
        return f"the model caps its logits (final_logit_softcapping {head.softcap:g}), which this kernel cannot"
    if head.bias and "bias" not in features:
        return "the model's lm_head adds a bias, which this kernel does not take"
    return None


def exact_path(asked: str, head: Head, features: Collection[str] = ()) -> tuple[str, str | None]:
    """The path that computes the model's own loss, and why it is not ``asked`` (None: it is).

    ``asked``: a kernel (taking ``features``), ``trl`` or ``logits``. A kernel or TRL's head that does not reproduce
    the head gives way to TRL's head where that does, else to the model's own logits.
    """
    if asked in KERNELS:
        why = kernel_refusal(head, features)
    elif asked == "trl":
        why = head.trl_differs
    else:
        return LOGITS, None
    if why is None:
        return asked, None
    return ("trl" if head.trl_differs is None else LOGITS), why


def inspect_head(model: torch.nn.Module) -> Head:
    """How ``model`` (a transformers causal LM, unwrapped from PEFT) turns its last hidden states into logits.

    Decided by probing, not by the model's name: the backbone's last hidden states are replaced with rows whose
    plain logits span 1 to 10,000 (so a cap shows), and the logits of the model's own forward are matched against
    ``scale * plain``, then against ``c * tanh(scale * plain / c)`` for the config's ``final_logit_softcapping`` c.
    The head's type comes first: an adapter reproduces the plain logits while it is fresh, but a kernel would never
    train it. TRL's fused head is run on the same probe, and for an adapted head, its gradients are compared too.
    """
    head = model.get_output_embeddings()
    if head is None:
        why = "the model has no output embeddings (get_output_embeddings)"
        return Head(unlike=why, trl_differs=why)
    structure = _not_plain_linear(head)
    bias = structure is None and head.bias is not None
    if (unprobed := _unprobeable(head)) is not None:
        return _unprobed(structure, bias, unprobed)
    probe = _Probe(head)
    ids = torch.arange(PROBE_ROWS, device=model.device)[None] % model.config.get_text_config().vocab_size
    # One sequence, as the padding-free collator lays it out: variable-length attention takes nothing else.
    bounds = torch.tensor([0, PROBE_ROWS], dtype=torch.int32, device=ids.device)
    layout = {"position_ids": torch.arange(PROBE_ROWS, device=ids.device)[None], "cu_seq_lens_q": bounds,
              "cu_seq_lens_k": bounds, "max_length_q": PROBE_ROWS, "max_length_k": PROBE_ROWS}
    was_training = model.training
    model.eval()  # no dropout: the probe is compared, not trained
    try:
        with probe.replacing(model.base_model), torch.set_grad_enabled(structure is not None):
            logits = model(input_ids=ids, use_cache=False, **layout).logits[0].float()
            if probe.hidden is None:  # the logits came from elsewhere than the backbone the kernels read
                return _unprobed(structure, bias, "the model's forward does not run its base_model")
            trl_differs = _trl_differs(model, ids, layout, logits, head, probe, gradients=structure is not None)
    except Exception as error:  # noqa: BLE001 - a forward the probe cannot run: decided as where none can
        return _unprobed(structure, bias, f"{type(error).__name__}: {_first_line(error)}")
    finally:
        model.train(was_training)
    if structure is not None:
        return Head(unlike=structure, trl_differs=trl_differs)
    plain = torch.nn.functional.linear(probe.hidden[0].float(), head.weight.detach().float(),
                                       None if head.bias is None else head.bias.detach().float())
    softcap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    tolerance = PROBE_TOLERANCE.get(head.weight.dtype, PROBE_TOLERANCE[torch.bfloat16])
    for cap in (None, softcap) if softcap else (None,):
        scale = _fitted_scale(logits.detach(), plain, cap, tolerance)
        if scale is not None:
            return Head(scale=scale, softcap=cap, bias=bias, trl_differs=trl_differs)
    return Head(bias=bias, unlike="its logits are no scaled (or capped) projection of the last hidden states",
                trl_differs=trl_differs)


def _not_plain_linear(head: torch.nn.Module) -> str | None:
    """Why ``head`` is not a ``torch.nn.Linear`` computing its own forward (a PEFT layer or wrapper, a quantized
    layer); None when it is. FSDP's subclasses keep Linear's forward."""
    if isinstance(head, torch.nn.Linear) and type(head).forward is torch.nn.Linear.forward:
        return None
    name = f"{type(head).__module__}.{type(head).__qualname__}"
    return f"its lm_head is a {name} (an adapted or wrapped head), not a plain torch.nn.Linear"


def _unprobed(structure: str | None, bias: bool, why: str) -> Head:
    """A head that could not be probed: no kernel computes its loss, and TRL's head only where it is a plain Linear
    (TRL reads its scale and cap from the config by name)."""
    differs = None if structure is None else f"{structure}, which could not be probed ({why})"
    return Head(bias=bias, unlike=structure or f"its logits could not be probed ({why})", trl_differs=differs)


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0]


def _unprobeable(head: torch.nn.Module) -> str | None:
    weight = getattr(head, "weight", None)
    if is_deepspeed_zero3_enabled():
        return "ZeRO-3 shards the head's weight until training starts"
    if isinstance(weight, torch.Tensor) and weight.is_meta:
        return "its weight is not loaded on this process"
    return None


class _Probe:
    """Replaces the backbone's last hidden states with seeded random rows whose plain logits reach PROBE_MAGNITUDES,
    made once in the backbone's own dtype and device (kept in ``hidden``)."""

    def __init__(self, head: torch.nn.Module) -> None:
        self.head = head
        self.hidden: torch.Tensor | None = None

    def _replace(self, module: torch.nn.Module, args: Any, output: Any) -> Any:
        if self.hidden is None:
            real = output.last_hidden_state
            generator = torch.Generator().manual_seed(0)
            direction = torch.randn(real.shape, generator=generator).to(real)
            magnitudes = torch.tensor(PROBE_MAGNITUDES).repeat(real.shape[1] // len(PROBE_MAGNITUDES) + 1)
            with torch.no_grad():
                largest = self.head(direction).float().abs().amax(-1, keepdim=True)
            wanted = magnitudes[: real.shape[1]].to(largest)[None, :, None]
            self.hidden = (direction.float() * wanted / largest).to(real.dtype)
        output.last_hidden_state = self.hidden
        return output

    @contextlib.contextmanager
    def replacing(self, backbone: torch.nn.Module) -> Iterator[None]:
        handle = backbone.register_forward_hook(self._replace)
        try:
            yield
        finally:
            handle.remove()


def _fitted_scale(logits: torch.Tensor, plain: torch.Tensor, softcap: float | None, tolerance: float) -> float | None:
    """The scale with which ``softcap(scale * plain)`` reproduces ``logits`` row by row, or None."""
    target, usable = logits, torch.ones_like(logits, dtype=torch.bool)
    if softcap is not None:  # fitted where the cap is far from flat, checked everywhere
        usable = logits.abs() < softcap / 2
        target = softcap * torch.atanh((logits / softcap).clamp(-0.5, 0.5))
    denominator = (plain * plain)[usable].sum()
    if denominator == 0:
        return None
    scale = float((target * plain)[usable].sum() / denominator)
    predicted = scale * plain if softcap is None else softcap * torch.tanh(scale * plain / softcap)
    bound = tolerance * logits.abs().amax(-1).clamp(min=1.0)
    return scale if bool(((predicted - logits).abs().amax(-1) <= bound).all()) else None


def _trl_forward(model: torch.nn.Module) -> Callable[..., Any]:
    """TRL's fused forward for ``model``, made as SFTTrainer makes it but not left on the model."""
    from trl.trainer.utils import add_fused_lm_head

    patched, forward = "forward" in vars(model), model.forward
    add_fused_lm_head(model)
    fused = model.forward
    if patched:
        model.forward = forward
    else:
        del model.forward
    return fused


def _trl_differs(model: torch.nn.Module, ids: torch.Tensor, layout: dict[str, Any], logits: torch.Tensor,
                 head: torch.nn.Module, probe: _Probe, gradients: bool) -> str | None:
    """Why TRL's fused head does not give the log-probabilities of ``logits`` (the model's own, on the probe), or
    with ``gradients``, not the same gradients for the head's trainable parameters; None when it does."""
    targets = torch.randint(0, logits.shape[-1], (ids.shape[1],), generator=torch.Generator().manual_seed(1))
    targets = targets.to(ids.device)
    own = torch.log_softmax(logits[:-1], -1).gather(-1, targets[1:, None])[:, 0]
    try:
        fused = _trl_forward(model)(input_ids=ids, labels=targets[None], fused_lm_head=True, **layout)
    except Exception as error:  # noqa: BLE001 - whatever TRL's head fails with, this head cannot train through it
        return f"TRL's fused head fails on it ({type(error).__name__}: {_first_line(error)})"
    fused = fused.log_probs[0].float()
    tolerance = PROBE_TOLERANCE.get(probe.hidden.dtype, PROBE_TOLERANCE[torch.bfloat16])
    bound = tolerance * logits[:-1].detach().abs().amax(-1).clamp(min=1.0)
    if not bool(((fused.detach() - own.detach()).abs() <= bound).all()):
        return "TRL's fused head computes other log-probabilities than the model's own logits"
    trained = [parameter for parameter in head.parameters() if parameter.requires_grad]
    if not gradients or not trained or not own.requires_grad:
        return None
    expected = torch.autograd.grad(own.sum(), trained, allow_unused=True)
    got = torch.autograd.grad(fused.sum(), trained, allow_unused=True) if fused.requires_grad else [None] * len(trained)
    for one, other in zip(expected, got, strict=True):
        if (one is None) != (other is None):
            return "TRL's fused head bypasses trainable weights of the lm_head (an adapter would never train)"
        if one is not None and not torch.allclose(other.float(), one.float(), rtol=tolerance,
                                                  atol=tolerance * float(one.float().abs().max().clamp(min=1e-12))):
            return "TRL's fused head gives the lm_head's trainable weights other gradients"
    return None


@functools.cache
def sum_of_losses(kernel: str) -> SumOfLosses:
    """``f(hidden (n, d), weight (vocab, d), targets (n,), [bias=, softcap=])`` -> the summed cross-entropy of the n
    tokens under ``softcap(hidden @ weight.T + bias)``; torch's kernel takes no softcap (kernel_features)."""
    if kernel == "torch":
        options = torch.nn.LinearCrossEntropyOptions()

        def summed(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
            # Per token, summed here in fp32: its own sum of bf16 inputs comes back rounded to bf16 (about 1% off).
            losses = torch.nn.functional.linear_cross_entropy(hidden, weight, targets, linear_bias=bias,
                                                              reduction="none", options=options)
            return losses.float().sum()

        return summed
    function = _kernel_function(kernel)
    # cce: exact gradients (no filtering); liger: gradients accumulated in fp32.
    settings = {"filter_eps": None} if kernel == "cce" else {"accum_dtype": torch.float32}

    def fused(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, **head: Any) -> torch.Tensor:
        return function(hidden, weight, targets, reduction="sum", **settings, **head)

    return fused


def add_head_loss(model: torch.nn.Module, head: Head) -> None:
    """Let ``model(..., sftkit_head_loss=PATH)`` return the summed loss of the listed positions, computed by a kernel
    of KERNELS (logits unbuilt) or, with ``logits``, from the logits of the model's own forward.

    ``head`` is what ``inspect_head`` found, and a kernel must reproduce it (``exact_path``). The loss runs inside
    the model's forward, so wrappers (DDP, DeepSpeed, FSDP, PEFT) see a normal call. Without the flag the forward
    is the one the model had (TRL's fused head included).
    """
    previous = model.forward

    @functools.wraps(type(model).forward)
    def forward(self: torch.nn.Module, *args: Any, sftkit_head_loss: str | None = None, **kwargs: Any) -> Any:
        if sftkit_head_loss is None:
            return previous(*args, **kwargs)
        labels, positions = kwargs.pop("labels"), kwargs.pop(LABEL_POSITIONS)
        kwargs["use_cache"] = False
        targets = labels[:, 1:].reshape(-1).index_select(0, positions)
        if sftkit_head_loss == LOGITS:  # as the model's own loss: its logits in fp32
            logits = previous(*args, **kwargs).logits[:, :-1]
            logits = logits.reshape(-1, logits.shape[-1]).index_select(0, positions)
            return torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")
        hidden = self.base_model(*args, **kwargs).last_hidden_state[:, :-1]
        output = self.get_output_embeddings()
        weight, bias = output.weight, output.bias if head.bias else None
        if isinstance(weight, DTensor):  # FSDP2 shards the head: gather it for the loss
            weight = weight.full_tensor()
            bias = bias.full_tensor() if isinstance(bias, DTensor) else bias
        hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)
        if head.scale != 1.0:  # scale * (h @ W.T + b) == (scale * h) @ W.T + scale * b
            hidden = hidden * head.scale
            bias = None if bias is None else bias * head.scale
        device = hidden.device.type
        if torch.is_autocast_enabled(device):  # the projection in the autocast dtype, as autocast runs the head
            dtype = torch.get_autocast_dtype(device)
            hidden, weight = hidden.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        with torch.autocast(device, enabled=False):  # the kernels accumulate in fp32 themselves
            # Only the parts the head has: a kernel handed a part it does not take fails instead of ignoring it.
            parts = {name: value for name, value in (("bias", bias), ("softcap", head.softcap)) if value is not None}
            return sum_of_losses(sftkit_head_loss)(hidden, weight, targets, **parts)

    model.forward = types.MethodType(forward, model)


def label_positions(labels: torch.Tensor) -> torch.Tensor:
    """Flat indices, over ``labels[:, 1:]``, of the positions whose next-token label is trained (on the CPU)."""
    return (labels[:, 1:].reshape(-1) != IGNORE).nonzero().squeeze(1)
