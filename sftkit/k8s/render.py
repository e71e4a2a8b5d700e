"""The manifests: a ConfigMap with the recipe and a Kubeflow job whose pods run ``sftkit launch``, as YAML.

The objects are plain mappings in the API's own field names; the tests hold every rendered document
to its CRD's structural schema (Kubeflow Trainer v2.3.0's TrainJob and TrainingRuntime, the training
operator v1.9.4's PyTorchJob), strictly, so that no field is misspelled or mistyped, and rendering
imports no client library (it answers at once). Every pod gets the ConfigMap at ``/etc/sftkit``,
a memory-backed ``/dev/shm`` (NCCL's shared-memory transport and data-loading workers need more than
the 64 MiB a container gets by default), its GPUs, and the persistent volumes that hold ``output_dir``.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from sftkit.errors import SftkitError
from sftkit.k8s.bundle import ACCELERATE_FILE, MOUNT_DIR, RECIPE_FILE, Bundle, build_bundle, mounted_path
from sftkit.k8s.defaults import (
    CLEAN_POD_POLICY,
    DEFAULT_MAX_RESTARTS,
    DEFAULT_SHM_SIZE,
    DEFAULT_TERMINATION_GRACE_PERIOD,
    DEFAULT_TTL_SECONDS_AFTER_FINISHED,
)
from sftkit.k8s.resources import PodResources, pod_resources
from sftkit.k8s.validation import (
    ENV_NAME,
    IMAGE_PULL_POLICIES,
    LABEL_MAX,
    RENDEZVOUS_VARIABLES,
    SUBDOMAIN_MAX,
    TORCHRUN_RESERVED,
    Toleration,
    VolumeSpec,
    dns_1035_label,
    dns_1123_label,
    dns_1123_subdomain,
    image_reference,
    positive_quantity,
)
from sftkit.redaction import has_credentials, is_secret

SHM_MOUNT = "/dev/shm"
GPU_RESOURCE = "nvidia.com/gpu"
MASTER_PORT = 29500  # what the torch-distributed runtime sets; the PyTorchJob is given the same
PATCH_MANAGER = "sftkit"
TRAINER_API = "trainer.kubeflow.org/v1alpha1"
TRAINJOB_NODE = "node"  # the replicated job and the container of the torch-distributed runtime
TRAINJOB_ANCESTOR = "trainer.kubeflow.org/trainjob-ancestor-step"  # marks the replicated job the trainer fills
PYTORCHJOB_PORT_NAME = "pytorchjob-port"
PYTORCHJOB_CONTAINER = "pytorch"
LAUNCH_COMMAND = ["sftkit", "launch", "--config", mounted_path(RECIPE_FILE),
                  "--accelerate-config", mounted_path(ACCELERATE_FILE)]


SECRET_KEY = re.compile(r"[-._a-zA-Z0-9]+")  # the keys of a Secret's data


@dataclass(frozen=True)
class SecretVariable:
    """A variable of every pod whose value the kubelet reads from a key of a Kubernetes Secret (secretKeyRef), so
    that it is written in no manifest."""

    name: str
    secret: str
    key: str


def secret_variable(value: str) -> SecretVariable:
    """--env-from-secret NAME=SECRET[:KEY]; the key is the variable's name unless given."""
    name, separator, reference = value.partition("=")
    secret, _, key = reference.partition(":")
    if not separator or not ENV_NAME.fullmatch(name) or not secret:
        raise SftkitError(f"--env-from-secret {value!r}: write NAME=SECRET or NAME=SECRET:KEY, e.g. --env-from-secret "
                          "HF_TOKEN=hf-token")
    if name in TORCHRUN_RESERVED or name in RENDEZVOUS_VARIABLES:
        raise SftkitError(f"--env-from-secret {name}: the operator sets {name} in each pod; leave it out")
    dns_1123_subdomain(secret, "--env-from-secret: the Secret")
    key = key or name
    if len(key) > SUBDOMAIN_MAX or not SECRET_KEY.fullmatch(key):
        raise SftkitError(f"--env-from-secret {value!r}: the key {key!r} is not a Secret key (letters, digits, '-', "
                          f"'_' and '.', at most {SUBDOMAIN_MAX} characters)")
    return SecretVariable(name, secret, key)


@dataclass
class JobRequest:
    """What ``sftkit k8s render`` was asked for, checked."""

    recipe: str
    nodes: int
    gpus_per_node: int
    image: str
    kind: str = "trainjob"
    accelerate_config: str | None = None
    namespace: str | None = None
    name: str | None = None
    volumes: list[VolumeSpec] = field(default_factory=list)
    hf_token_secret: str | None = None
    environment: list[tuple[str, str]] = field(default_factory=list)
    secret_environment: list[SecretVariable] = field(default_factory=list)
    shm_size: str = DEFAULT_SHM_SIZE
    runtime: str | None = None  # a ClusterTrainingRuntime for a TrainJob; None: the TrainingRuntime rendered with it
    allow_ephemeral_output: bool = False
    overrides: dict[str, Any] = field(default_factory=dict)  # recipe keys given on the command line
    cpu: str | None = None  # None: DEFAULT_CPUS_PER_GPU a GPU
    memory: str | None = None  # None: derived from the recipe's model and --shm-size
    # A PyTorchJob's, or the rendered TrainingRuntime's (never another runtime's). None: sftkit's defaults for the
    # first two, Kubernetes' for the others.
    max_restarts: int | None = None
    ttl_seconds_after_finished: int | None = None
    priority_class: str | None = None
    image_pull_policy: str | None = None
    termination_grace_period: int = DEFAULT_TERMINATION_GRACE_PERIOD
    node_selector: list[tuple[str, str]] = field(default_factory=list)
    tolerations: list[Toleration] = field(default_factory=list)


def pod_names(kind: str, name: str, nodes: int) -> list[str]:
    """Host names of the job's pods, which must be DNS labels of at most 63 characters."""
    if kind == "trainjob":  # JobSet: <jobset>-<replicated job>-<job index>-<pod index>
        return [f"{name}-{TRAINJOB_NODE}-0-{rank}" for rank in range(nodes)]
    return [f"{name}-master-0", *(f"{name}-worker-{index}" for index in range(nodes - 1))]


def _longest_name(kind: str, nodes: int) -> int:
    return LABEL_MAX - max(len(host) for host in pod_names(kind, "", nodes))


def job_name(request: JobRequest) -> str:
    """The given --name, checked, or one made from the recipe's file name."""
    longest = _longest_name(request.kind, request.nodes)
    if request.name is None:
        stem = re.sub(r"[^a-z0-9]+", "-", Path(request.recipe).stem.lower()).strip("-")
        return f"sft-{stem}"[:longest].rstrip("-")
    name = dns_1035_label(request.name, "--name")
    if len(name) > longest:
        raise SftkitError(
            f"--name {name!r} is {len(name)} characters; the pods of this job are named like "
            f"{pod_names(request.kind, name, request.nodes)[-1]}, a host name of at most {LABEL_MAX} characters: "
            f"use at most {longest} characters"
        )
    return name


def check_request(request: JobRequest) -> None:
    if request.nodes < 1 or request.gpus_per_node < 1:
        raise SftkitError("--nodes and --gpus-per-node must be at least 1")
    if request.kind not in ("trainjob", "pytorchjob"):
        raise SftkitError(f"--kind {request.kind!r}: choose trainjob (Kubeflow Trainer v2) or pytorchjob (v1)")
    image_reference(request.image)
    positive_quantity(request.shm_size, "--shm-size")
    if request.cpu is not None:
        positive_quantity(request.cpu, "--cpu", "48 or 47500m")
    if request.memory is not None:
        positive_quantity(request.memory, "--memory")
    for flag, number in (("--max-restarts", request.max_restarts), ("--termination-grace-period",
                         request.termination_grace_period),
                         ("--ttl-seconds-after-finished", request.ttl_seconds_after_finished)):
        if number is not None and number < 0:
            raise SftkitError(f"{flag} {number}: a number of at least 0")
    if request.kind == "trainjob" and request.runtime is not None:
        _refuse_runtime_settings(request)
    if request.priority_class is not None:
        dns_1123_subdomain(request.priority_class, "--priority-class")
    if request.image_pull_policy not in (None, *IMAGE_PULL_POLICIES):
        raise SftkitError(f"--image-pull-policy {request.image_pull_policy!r}: choose {', '.join(IMAGE_PULL_POLICIES)}")
    keys = [key for key, _ in request.node_selector]
    if len(set(keys)) != len(keys):
        raise SftkitError(f"--node-selector: a label is given twice ({', '.join(keys)}); a node has one value for each label")
    if request.runtime is not None:
        if request.kind != "trainjob":
            raise SftkitError(f"--runtime {request.runtime}: a runtime is a TrainJob's; a PyTorchJob has none")
        dns_1123_subdomain(request.runtime, "--runtime")
    if request.namespace is not None:
        dns_1123_label(request.namespace, "--namespace")
    if request.hf_token_secret is not None:
        dns_1123_subdomain(request.hf_token_secret, "--hf-token-secret")
    names = [name for name, _ in request.environment] + [variable.name for variable in secret_variables(request)]
    if len(set(names)) != len(names):
        raise SftkitError(f"--env, --env-from-secret: a variable is given twice ({', '.join(names)}; "
                          "--hf-token-secret sets HF_TOKEN)")
    for name, value in request.environment:
        if is_secret(name, value):
            why = "its value is a URL with credentials" if has_credentials(value) else "its name says it is a secret"
            secret = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "secret"
            raise SftkitError(
                f"--env {name}: {why}, and the job would carry it in plain text for anyone who can read the job: keep "
                f"it in a Kubernetes Secret (kubectl create secret generic {secret} --from-literal={name}=\"${name}\") "
                f"and pass --env-from-secret {name}={secret} instead"
            )
    mounts = [PurePosixPath(volume.mount) for volume in request.volumes]
    if len(set(mounts)) != len(mounts):
        raise SftkitError(f"--volume: two claims are mounted at the same path ({', '.join(map(str, mounts))})")
    for volume, mount in zip(request.volumes, mounts, strict=True):
        for taken in (MOUNT_DIR, SHM_MOUNT):
            if mount.is_relative_to(taken) or PurePosixPath(taken).is_relative_to(mount):
                raise SftkitError(f"--volume {volume.claim}:{volume.mount}: {taken} is where the job mounts its own "
                                  "files; mount the claim elsewhere")


def _refuse_runtime_settings(request: JobRequest) -> None:
    """A TrainJob under a runtime of the cluster's (Trainer v2.3) patches only its pods' node selector, tolerations,
    grace period and volumes; the JobSet's restarts and lifetime and the pods' priority and pull policy are that
    runtime's."""
    given = [flag for flag, value in (("--max-restarts", request.max_restarts),
                                      ("--ttl-seconds-after-finished", request.ttl_seconds_after_finished),
                                      ("--priority-class", request.priority_class),
                                      ("--image-pull-policy", request.image_pull_policy)) if value is not None]
    if given:
        raise SftkitError(
            f"{', '.join(given)}: a TrainJob under --runtime {request.runtime} cannot set "
            f"{'this' if len(given) == 1 else 'these'} (Kubeflow Trainer v2.3's runtimePatches reach only the pods' "
            "node selector, tolerations, grace period and volumes): they belong to that ClusterTrainingRuntime. Leave "
            "out --runtime, and the TrainingRuntime rendered with the job sets them"
        )


def secret_variables(request: JobRequest) -> list[SecretVariable]:
    """The variables the pods read from Secrets; --hf-token-secret NAME is --env-from-secret HF_TOKEN=NAME."""
    token = [SecretVariable("HF_TOKEN", request.hf_token_secret, "HF_TOKEN")] if request.hf_token_secret else []
    return [*request.secret_environment, *token]


def secret_notes(request: JobRequest) -> list[str]:
    """For each Secret the pods read, the kubectl line that creates it: a pod whose Secret is missing never starts."""
    by_secret: dict[str, list[SecretVariable]] = {}
    for variable in secret_variables(request):
        by_secret.setdefault(variable.secret, []).append(variable)
    namespace = f" --namespace {request.namespace}" if request.namespace else ""
    notes = []
    for secret, variables in by_secret.items():
        # Each value from the shell's variable of the same name: a value typed on a command line stays in its history.
        literals = {variable.key: f'--from-literal={variable.key}="${variable.name}"' for variable in variables}
        notes.append(f"warning: the pods read {', '.join(variable.name for variable in variables)} from the Secret "
                     f"{secret}, which must exist before the job starts: kubectl create secret generic "
                     f"{secret}{namespace} {' '.join(literals.values())}")
    return notes


# ---------------------------------------------------------------- what both kinds of pod get


def _or(value: int | None, default: int) -> int:
    return default if value is None else value


def restarts(request: JobRequest) -> int:
    return _or(request.max_restarts, DEFAULT_MAX_RESTARTS)


def resource_amounts(request: JobRequest, resources: PodResources) -> dict[str, str]:
    """Each pod's requests, and its limits: the same, so that it is Guaranteed, not evicted first."""
    return {"cpu": resources.cpu, "memory": resources.memory, GPU_RESOURCE: str(request.gpus_per_node)}


def toleration_fields(toleration: Toleration) -> dict[str, str]:
    """A taint's key with any value (Exists) or with the one given (Equal)."""
    value = {"operator": "Exists"} if toleration.value is None else {"operator": "Equal", "value": toleration.value}
    return {"key": toleration.key, **value, "effect": toleration.effect}


def restart_note(request: JobRequest) -> str:
    grace = f"pods get {request.termination_grace_period} s after SIGTERM to save a checkpoint"
    ttl = _or(request.ttl_seconds_after_finished, DEFAULT_TTL_SECONDS_AFTER_FINISHED)
    lifetime = f"the job's pods are deleted {ttl} s after it ends"
    if request.kind == "trainjob" and request.runtime is not None:
        return (f"restarts: those of the ClusterTrainingRuntime {request.runtime} (its JobSet "
                f"failurePolicy.maxRestarts); {grace}")
    if request.kind == "trainjob":
        return (f"restarts: a failed pod restarts the whole JobSet, up to {restarts(request)} times "
                f"(failurePolicy.maxRestarts of the TrainingRuntime {runtime_name(job_name(request))}), each resuming "
                f"from the latest checkpoint; {grace}; {lifetime}")
    return (f"restarts: OnFailure, up to {restarts(request)} (runPolicy.backoffLimit), each resuming from the latest "
            f"checkpoint; {grace}; {lifetime}")


# ---------------------------------------------------------------- what both kinds of pod mount and read


def _present(value: Any) -> Any:
    """The object without its unset (None) fields, as the API server stores it."""
    if isinstance(value, dict):
        return {key: _present(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [_present(item) for item in value]
    return value


def _volumes(request: JobRequest, configmap: str) -> list[dict[str, Any]]:
    return [
        {"name": "sftkit-config", "configMap": {"name": configmap}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": request.shm_size}},
        *({"name": f"volume-{index}", "persistentVolumeClaim": {"claimName": volume.claim}}
          for index, volume in enumerate(request.volumes)),
    ]


def _mounts(request: JobRequest) -> list[dict[str, Any]]:
    return [
        {"name": "sftkit-config", "mountPath": MOUNT_DIR, "readOnly": True},
        {"name": "dshm", "mountPath": SHM_MOUNT},
        *({"name": f"volume-{index}", "mountPath": volume.mount} for index, volume in enumerate(request.volumes)),
    ]


def _environment(request: JobRequest) -> list[dict[str, Any]] | None:
    """The pods' variables: plain values, and those read from Secrets (secretKeyRef)."""
    plain = [{"name": name, "value": value} for name, value in request.environment]
    secret = [{"name": variable.name, "valueFrom": {"secretKeyRef": {"name": variable.secret, "key": variable.key}}}
              for variable in secret_variables(request)]
    return plain + secret or None


def _scheduling(request: JobRequest) -> dict[str, Any]:
    return {"terminationGracePeriodSeconds": request.termination_grace_period,
            "nodeSelector": dict(request.node_selector) or None,
            "tolerations": [toleration_fields(toleration) for toleration in request.tolerations] or None}


# ---------------------------------------------------------------- Kubeflow Trainer v2: TrainJob


def runtime_name(job: str) -> str:
    """The TrainingRuntime rendered with the TrainJob ``job``."""
    return f"{job}-runtime"


def _training_runtime(request: JobRequest, name: str, labels: dict[str, str]) -> dict[str, Any]:
    """A TrainingRuntime of the job's own: the torch-distributed runtime's shape (one replicated job "node", torch
    ML policy), plus what a TrainJob's runtimePatches cannot set. A pod that fails fails its Job at once
    (restartPolicy Never, backoffLimit 0), and the JobSet then recreates every pod (failurePolicy.maxRestarts):
    all processes of a distributed run restart together, each resuming from the latest complete checkpoint."""
    container = {"name": TRAINJOB_NODE, "image": request.image, "imagePullPolicy": request.image_pull_policy}
    nodes = {
        "name": TRAINJOB_NODE, "replicas": 1,
        "template": {
            "metadata": {"labels": {TRAINJOB_ANCESTOR: "trainer"}},
            "spec": {"backoffLimit": 0, "template": {"spec": {
                "containers": [container], "restartPolicy": "Never", "priorityClassName": request.priority_class}}},
        },
    }
    return _present({
        "apiVersion": TRAINER_API, "kind": "TrainingRuntime",
        "metadata": {"name": runtime_name(name), "namespace": request.namespace,
                     "labels": {**labels, "trainer.kubeflow.org/framework": "torch"}},
        "spec": {
            "mlPolicy": {"numNodes": request.nodes, "torch": {}},
            "template": {"spec": {
                "replicatedJobs": [nodes], "failurePolicy": {"maxRestarts": restarts(request)},
                "ttlSecondsAfterFinished": _or(request.ttl_seconds_after_finished, DEFAULT_TTL_SECONDS_AFTER_FINISHED),
            }},
        },
    })


def _trainjob(request: JobRequest, name: str, labels: dict[str, str], configmap: str,
              resources: PodResources) -> dict[str, Any]:
    amounts = resource_amounts(request, resources)
    trainer = {
        "image": request.image, "command": LAUNCH_COMMAND, "env": _environment(request),
        "numNodes": request.nodes, "numProcPerNode": request.gpus_per_node,
        "resourcesPerNode": {"requests": amounts, "limits": amounts},
    }
    # Volumes, scheduling and the grace period (and the pods' labels) reach the runtime's pods only through a
    # runtime patch (Trainer v2.2+); the node container's env cannot: it is the trainer's.
    pod = {"metadata": {"labels": labels}, "spec": {
        "volumes": _volumes(request, configmap),
        "containers": [{"name": TRAINJOB_NODE, "volumeMounts": _mounts(request)}],
        **_scheduling(request)}}
    nodes = {"name": TRAINJOB_NODE, "template": {"spec": {"template": pod}}}
    runtime = {"name": request.runtime or runtime_name(name),
               "kind": "TrainingRuntime" if request.runtime is None else "ClusterTrainingRuntime",
               "apiGroup": "trainer.kubeflow.org"}
    return _present({
        "apiVersion": TRAINER_API, "kind": "TrainJob",
        "metadata": {"name": name, "namespace": request.namespace, "labels": labels},
        "spec": {
            "runtimeRef": runtime, "trainer": trainer,
            "runtimePatches": [{"manager": PATCH_MANAGER,
                                "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [nodes]}}}}],
        },
    })


# ---------------------------------------------------------------- training operator v1: PyTorchJob


def _pytorchjob(request: JobRequest, name: str, labels: dict[str, str], configmap: str,
                resources: PodResources) -> dict[str, Any]:
    amounts = resource_amounts(request, resources)
    container = {
        "name": PYTORCHJOB_CONTAINER,  # the operator finds its container by this name
        "image": request.image, "imagePullPolicy": request.image_pull_policy,
        "command": LAUNCH_COMMAND, "env": _environment(request),
        # MASTER_PORT comes from this port; the same as the v2 runtime's.
        "ports": [{"name": PYTORCHJOB_PORT_NAME, "containerPort": MASTER_PORT}],
        "resources": {"requests": amounts, "limits": amounts},
        "volumeMounts": _mounts(request),
    }
    pod = {"containers": [container], "volumes": _volumes(request, configmap), **_scheduling(request),
           "priorityClassName": request.priority_class}

    def replicas(count: int) -> dict[str, Any]:
        # A failed pod restarts (up to backoffLimit times); the others' collectives fail with it and they restart
        # too, so the world forms again and resumes from the latest checkpoint (resume_from_checkpoint: auto).
        return {"replicas": count, "restartPolicy": "OnFailure", "template": {"metadata": {"labels": labels},
                                                                             "spec": pod}}

    specs = {"Master": replicas(1)}
    if request.nodes > 1:
        specs["Worker"] = replicas(request.nodes - 1)
    return _present({
        "apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob",
        "metadata": {"name": name, "namespace": request.namespace, "labels": labels},
        "spec": {
            "nprocPerNode": str(request.gpus_per_node),  # a string in v1's schema
            "pytorchReplicaSpecs": specs,
            "runPolicy": {"backoffLimit": restarts(request), "cleanPodPolicy": CLEAN_POD_POLICY,
                          "ttlSecondsAfterFinished": _or(request.ttl_seconds_after_finished,
                                                         DEFAULT_TTL_SECONDS_AFTER_FINISHED)},
        },
    })


# ---------------------------------------------------------------- the documents


def _configmap(name: str, request: JobRequest, labels: dict[str, str], bundle: Bundle) -> dict[str, Any]:
    return _present({"apiVersion": "v1", "kind": "ConfigMap",
                     "metadata": {"name": name, "namespace": request.namespace, "labels": labels},
                     "data": bundle.files})


def render_documents(request: JobRequest) -> tuple[list[dict[str, Any]], list[str]]:
    """The ConfigMap and the job, as the API expects them, and notes for the user."""
    check_request(request)
    name = job_name(request)
    bundle = build_bundle(request.recipe, request.accelerate_config, request.nodes, request.gpus_per_node,
                          request.volumes, request.allow_ephemeral_output, request.overrides)
    labels = {"app.kubernetes.io/name": "sftkit", "app.kubernetes.io/instance": name}
    configmap = f"{name}-config"
    resources = pod_resources(bundle.values, request.gpus_per_node, request.shm_size, request.cpu, request.memory)
    build = _trainjob if request.kind == "trainjob" else _pytorchjob
    documents = [_configmap(configmap, request, labels, bundle), build(request, name, labels, configmap, resources)]
    kind = "TrainJob" if request.kind == "trainjob" else "PyTorchJob"
    summary = (f"{kind} {name}: {request.nodes} node(s) x {request.gpus_per_node} GPU(s), image {request.image}; "
               f"ConfigMap {configmap}")
    if request.kind == "trainjob" and request.runtime is None:
        documents.insert(1, _training_runtime(request, name, labels))
        summary += f"; TrainingRuntime {runtime_name(name)}"
    requested = f"each pod requests (and is limited to) {request.gpus_per_node} {GPU_RESOURCE}, {resources.note}"
    return documents, [*bundle.notes, summary, requested, restart_note(request), *secret_notes(request)]


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the files in the ConfigMap) as readable literal blocks."""


def _string(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_Dumper.add_representer(str, _string)


def to_yaml(documents: list[dict[str, Any]]) -> str:
    return yaml.dump_all(documents, Dumper=_Dumper, sort_keys=False, default_flow_style=False)


def render(request: JobRequest, output: str | None) -> None:
    documents, notes = render_documents(request)
    text = to_yaml(documents)
    if output is None:
        sys.stdout.write(text)
    else:
        Path(output).write_text(text)
        notes.append(f"written to {output}")
    for note in notes:
        print(f"sftkit: {note}", file=sys.stderr)
