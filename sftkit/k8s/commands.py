"""``sftkit k8s render`` and ``sftkit launch``: their options and what they run, for the ``sftkit`` command."""

from __future__ import annotations

import argparse

from sftkit.k8s.defaults import DEFAULT_RUNTIME, DEFAULT_SHM_SIZE


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return int(text)


RENDER = {
    "description": "Render a ConfigMap with the recipe and the accelerate config, and the Kubeflow job whose pods "
                   "run `sftkit launch`, as multi-document YAML: sftkit k8s render ... | kubectl apply -f -",
    "epilog": "The recipe is checked first, with the global batch of nodes x gpus-per-node processes. output_dir "
              "must lie on a --volume (or pass --allow-ephemeral-output). Other --key value options are recipe overrides, "
              "as for train and launch: they are checked with the recipe and written into the ConfigMap's copy of it. "
              "See docs/kubernetes.md.",
}
LAUNCH = {
    "usage": "sftkit launch --config RECIPE.yaml [--accelerate-config FILE] [--nproc-per-node N] [--key value ...]",
    "description": "Start this machine's share of a training job: map the scheduler's variables (Kubeflow PET_*, "
                   "torchrun-style NNODES/NODE_RANK/MASTER_ADDR/MASTER_PORT, SLURM's, or none: one machine) to "
                   "explicit accelerate launch flags, print the command, and run `accelerate launch -m sftkit`.",
    "epilog": "Other --key value options are recipe overrides, passed on to sftkit. See docs/kubernetes.md.",
}


def add_render_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, metavar="RECIPE.yaml", help="the recipe to train")
    parser.add_argument("--nodes", required=True, type=_positive, metavar="N", help="machines (pods)")
    parser.add_argument("--gpus-per-node", required=True, type=_positive, metavar="G",
                        help="GPUs of each pod, one training process each")
    parser.add_argument("--image", required=True, help="the training image (see the Dockerfile)")
    parser.add_argument("--kind", choices=("trainjob", "pytorchjob"), default="trainjob",
                        help="trainjob: Kubeflow Trainer v2 (default); pytorchjob: the v1 training operator")
    parser.add_argument("--accelerate-config", metavar="FILE",
                        help="an accelerate config (configs/accelerate/); default: DDP over every GPU")
    parser.add_argument("--namespace", metavar="NS", help="namespace of the job (default: kubectl's current one)")
    parser.add_argument("--name", help="name of the job (default: sft-<recipe file name>)")
    parser.add_argument("--volume", action="append", default=[], metavar="CLAIM:MOUNT",
                        help="mount a persistent volume claim in every pod (repeatable); output_dir must lie on one")
    parser.add_argument("--hf-token-secret", metavar="NAME",
                        help="a Secret whose HF_TOKEN key becomes the pods' HF_TOKEN (gated models and datasets); "
                             "the same as --env-from-secret HF_TOKEN=NAME")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="a variable in every pod's environment (repeatable), e.g. HF_HOME=/data/hf-cache or "
                             "NCCL_DEBUG=INFO; a secret (a name with KEY, SECRET, PASSWORD, TOKEN or CREDENTIAL, a URL "
                             "with credentials) is refused: use --env-from-secret")
    parser.add_argument("--env-from-secret", action="append", default=[], metavar="NAME=SECRET[:KEY]",
                        help="a variable of every pod read from a key of a Kubernetes Secret (repeatable; the key "
                             "defaults to NAME), written in no manifest, e.g. WANDB_API_KEY=wandb")
    parser.add_argument("--shm-size", default=DEFAULT_SHM_SIZE, metavar="QUANTITY",
                        help=f"size of the memory-backed /dev/shm of each pod (default {DEFAULT_SHM_SIZE})")
    parser.add_argument("--runtime", default=DEFAULT_RUNTIME, metavar="NAME",
                        help=f"the ClusterTrainingRuntime of a TrainJob (default {DEFAULT_RUNTIME})")
    parser.add_argument("--allow-ephemeral-output", action="store_true",
                        help="render even if output_dir is on no volume (the model vanishes with the pod)")
    parser.add_argument("-o", "--output", metavar="FILE", help="write the YAML to FILE instead of standard output")


def add_launch_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, metavar="RECIPE.yaml", help="the recipe to train")
    parser.add_argument("--accelerate-config", metavar="FILE",
                        help="an accelerate config; machines, processes and the rendezvous come from the variables")
    parser.add_argument("--nproc-per-node", type=_positive, metavar="N",
                        help="processes on this machine (default: the job's setting, else one per visible GPU)")


def run_render(options: argparse.Namespace) -> None:
    from sftkit.k8s.render import JobRequest, render, secret_variable
    from sftkit.k8s.validation import environment_variable, volume_spec
    from sftkit.values import parse_overrides

    request = JobRequest(
        recipe=options.config, nodes=options.nodes, gpus_per_node=options.gpus_per_node, image=options.image,
        kind=options.kind, accelerate_config=options.accelerate_config, namespace=options.namespace,
        name=options.name, volumes=[volume_spec(value) for value in options.volume],
        hf_token_secret=options.hf_token_secret, environment=[environment_variable(value) for value in options.env],
        secret_environment=[secret_variable(value) for value in options.env_from_secret],
        shm_size=options.shm_size, runtime=options.runtime,
        allow_ephemeral_output=options.allow_ephemeral_output, overrides=parse_overrides(options.overrides),
    )
    render(request, options.output)


def run_launch(options: argparse.Namespace) -> None:
    from sftkit.k8s.launch import launch

    launch(options.config, options.accelerate_config, options.nproc_per_node, options.overrides)
