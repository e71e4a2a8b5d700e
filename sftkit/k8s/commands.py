"""``sftkit k8s render`` and ``sftkit launch``: their options and what they run, for the ``sftkit`` command."""

from __future__ import annotations

import argparse

from sftkit.k8s.defaults import (
    CLEAN_POD_POLICY,
    DEFAULT_CPUS_PER_GPU,
    DEFAULT_MAX_RESTARTS,
    DEFAULT_SHM_SIZE,
    DEFAULT_TERMINATION_GRACE_PERIOD,
    DEFAULT_TTL_SECONDS_AFTER_FINISHED,
)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return int(text)


def _whole(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 0, got {text!r}")
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
    parser.add_argument("--runtime", metavar="NAME",
                        help="TrainJob: run under this ClusterTrainingRuntime (e.g. torch-distributed) instead of the "
                             "TrainingRuntime rendered with the job; restarts, lifetime, priority and pull policy are "
                             "then that runtime's")
    resources = parser.add_argument_group("resources of each pod (requests and limits alike)")
    resources.add_argument("--cpu", metavar="QUANTITY",
                           help=f"CPU cores, e.g. 48 or 47500m (default {DEFAULT_CPUS_PER_GPU} per GPU)")
    resources.add_argument("--memory", metavar="QUANTITY",
                           help="memory, e.g. 256Gi (default: --shm-size plus, for each GPU's process, the model's "
                                "weights and 4 GiB; see docs/kubernetes.md)")
    restarts = parser.add_argument_group("restarts (each resumes from the latest checkpoint)")
    restarts.add_argument("--max-restarts", type=_whole, metavar="N",
                          help=f"restarts after a failed pod (default {DEFAULT_MAX_RESTARTS}): a PyTorchJob's "
                               "runPolicy.backoffLimit, the rendered TrainingRuntime's JobSet failurePolicy.maxRestarts")
    restarts.add_argument("--ttl-seconds-after-finished", type=_whole, metavar="S",
                          help=f"delete the finished job's pods after S seconds (default "
                               f"{DEFAULT_TTL_SECONDS_AFTER_FINISHED}, a week; a PyTorchJob's pods still running at "
                               f"the end go at once: cleanPodPolicy {CLEAN_POD_POLICY})")
    restarts.add_argument("--termination-grace-period", type=_whole, default=DEFAULT_TERMINATION_GRACE_PERIOD,
                          metavar="S", help="seconds a pod has after SIGTERM (preemption, deletion) to save its "
                                            f"checkpoint before it is killed (default {DEFAULT_TERMINATION_GRACE_PERIOD})")
    scheduling = parser.add_argument_group("scheduling")
    scheduling.add_argument("--node-selector", action="append", default=[], metavar="KEY=VALUE",
                            help="run only on nodes with this label (repeatable), e.g. "
                                 "nvidia.com/gpu.product=NVIDIA-H100-80GB-HBM3")
    scheduling.add_argument("--toleration", action="append", default=[], metavar="KEY[=VALUE]:EFFECT",
                            help="tolerate a taint (repeatable), EFFECT NoSchedule, PreferNoSchedule or NoExecute, "
                                 "e.g. nvidia.com/gpu:NoSchedule or cloud.google.com/gke-spot=true:NoSchedule")
    scheduling.add_argument("--priority-class", metavar="NAME",
                            help="the pods' PriorityClass")
    scheduling.add_argument("--image-pull-policy", metavar="POLICY",
                            help="Always, IfNotPresent or Never (default: Kubernetes', Always for a :latest tag, else "
                                 "IfNotPresent)")
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
    from sftkit.k8s.validation import environment_variable, node_selector, toleration, volume_spec
    from sftkit.values import parse_overrides

    request = JobRequest(
        recipe=options.config, nodes=options.nodes, gpus_per_node=options.gpus_per_node, image=options.image,
        kind=options.kind, accelerate_config=options.accelerate_config, namespace=options.namespace,
        name=options.name, volumes=[volume_spec(value) for value in options.volume],
        hf_token_secret=options.hf_token_secret, environment=[environment_variable(value) for value in options.env],
        secret_environment=[secret_variable(value) for value in options.env_from_secret],
        shm_size=options.shm_size, runtime=options.runtime,
        allow_ephemeral_output=options.allow_ephemeral_output, overrides=parse_overrides(options.overrides),
        cpu=options.cpu, memory=options.memory, max_restarts=options.max_restarts,
        ttl_seconds_after_finished=options.ttl_seconds_after_finished,
        termination_grace_period=options.termination_grace_period,
        node_selector=[node_selector(value) for value in options.node_selector],
        tolerations=[toleration(value) for value in options.toleration], priority_class=options.priority_class,
        image_pull_policy=options.image_pull_policy,
    )
    render(request, options.output)


def run_launch(options: argparse.Namespace) -> None:
    from sftkit.k8s.launch import launch

    launch(options.config, options.accelerate_config, options.nproc_per_node, options.overrides)
