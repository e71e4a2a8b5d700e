"""CPU and memory of every pod, requested and limited, so that a training pod is not the first one evicted.

Without requests a pod is BestEffort: the kubelet evicts it first under memory pressure, and its 16Gi
memory-backed /dev/shm is charged to a pod that asked for nothing. Requests equal to limits (GPUs,
CPU, memory) make it Guaranteed. Memory is /dev/shm plus, for each training process, the weights it
loads on the host before they move to its GPU and what torch, CUDA and data loading take.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sftkit import embedded
from sftkit.errors import SftkitError
from sftkit.k8s.defaults import DEFAULT_CPUS_PER_GPU, FALLBACK_WEIGHTS_GIB, PROCESS_MEMORY_GIB
from sftkit.k8s.validation import quantity_value

GIB = 2**30


@dataclass(frozen=True)
class PodResources:
    """What each pod requests (and is limited to), and how it was chosen."""

    cpu: str
    memory: str
    note: str


def _weights(values: dict[str, Any]) -> tuple[int | None, str]:
    """Bytes of the model's weights as one process loads them, counted from its safetensors files' headers on this
    machine (a local folder, or the Hugging Face cache); None where they are not here (render downloads nothing and
    imports no torch, so that it answers at once)."""
    name = values.get("model_name_or_path")
    try:
        parameters = sum(_tensor_elements(file) for file in _weight_files(str(name), values.get("model_revision")))
    except (OSError, ValueError) as error:
        return None, f"the weights of {name} cannot be read on this machine ({str(error)[:120]})"
    half = values.get("dtype") in ("bfloat16", "float16")
    return parameters * (2 if half else 4), (f"{name}: {parameters / 1e9:.2f}B parameters in "
                                             f"{values['dtype'] if half else 'float32'}")


def _weight_files(name: str, revision: str | None) -> list[Path]:
    """The model's safetensors files: in its folder, or in the Hugging Face cache for a Hub name."""
    folder = Path(embedded.resolve(name))
    if folder.is_dir():
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise OSError(f"no *.safetensors files in {folder}")
        return files
    from huggingface_hub import try_to_load_from_cache

    index = try_to_load_from_cache(name, "model.safetensors.index.json", revision=revision)
    if isinstance(index, str):
        shards = sorted(set(json.loads(Path(index).read_text())["weight_map"].values()))
        return [Path(index).parent / shard for shard in shards]
    single = try_to_load_from_cache(name, "model.safetensors", revision=revision)
    if isinstance(single, str):
        return [Path(single)]
    raise OSError("no safetensors weights in the Hugging Face cache")


def _tensor_elements(file: Path) -> int:
    """Elements of every tensor in a safetensors file, read from its header (8 bytes of length, then JSON)."""
    with file.open("rb") as stream:
        length = int.from_bytes(stream.read(8), "little")
        if not 0 < length <= 100 * 2**20:
            raise ValueError(f"{file} is not a safetensors file")
        header = json.loads(stream.read(length))
    return sum(math.prod(tensor["shape"]) for key, tensor in header.items() if key != "__metadata__")


def pod_resources(values: dict[str, Any], gpus_per_node: int, shm_size: str, cpu: str | None,
                  memory: str | None) -> PodResources:
    """--cpu and --memory, or the defaults derived from the recipe; memory must hold /dev/shm."""
    shm = quantity_value(shm_size)
    if memory is not None and quantity_value(memory) <= shm:
        raise SftkitError(f"--memory {memory} is not more than --shm-size {shm_size}: the memory-backed /dev/shm "
                          "counts against the pod's memory; raise --memory or lower --shm-size")
    cpu_note = "--cpu" if cpu else f"{DEFAULT_CPUS_PER_GPU} per GPU"
    cpu = cpu or str(DEFAULT_CPUS_PER_GPU * gpus_per_node)
    if memory is not None:
        return PodResources(cpu, memory, f"{cpu} CPU ({cpu_note}), memory {memory} (--memory)")
    weights, source = _weights(values)
    fallback = weights is None
    weights = FALLBACK_WEIGHTS_GIB * GIB if weights is None else weights
    total = math.ceil((shm + gpus_per_node * (weights + PROCESS_MEMORY_GIB * GIB)) / GIB)
    how = (f"a default of {FALLBACK_WEIGHTS_GIB} GiB of weights a process, as {source}" if fallback
           else f"{weights / GIB:.1f} GiB of weights a process ({source})")
    return PodResources(cpu, f"{total}Gi", (
        f"{cpu} CPU ({cpu_note}), memory {total}Gi = /dev/shm {shm_size} + {gpus_per_node} process(es) x ("
        f"{how} + {PROCESS_MEMORY_GIB} GiB for torch, CUDA and data loading); set --cpu and --memory to choose"))
