"""sftkit k8s render: a ConfigMap and a Kubeflow job that the API server and the operators' webhooks accept.

The rendered TrainJob and PyTorchJob are validated against the structural schema of the CRDs
(``spec.versions[].schema.openAPIV3Schema``), strictly: a field the schema does not define is an
error, as ``kubectl apply``'s strict field validation makes it. The rules the schema does not hold
(the CRDs' CEL rules and the operators' admission webhooks) are checked here as the operators
document them. Then the render's own promises: the recipe checked for the job's processes, the model
on a volume, names, images and quantities refused locally, the DeepSpeed JSON carried along, and the
caller's environment left as it was.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml
from helpers import ROOT, TINY_MODEL, write_recipe

from sftkit.cli import main
from sftkit.errors import SftkitError
from sftkit.k8s.validation import (
    dns_1035_label,
    dns_1123_subdomain,
    image_reference,
    positive_quantity,
    volume_spec,
)

TORCHRUN_RESERVED = {"PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT"}
IMAGE = "ghcr.io/acme/sftkit:0.1.0"


@pytest.fixture
def recipe(tmp_path) -> Path:
    return write_recipe(tmp_path / "my_run.yaml", model_name_or_path=TINY_MODEL,
                        dataset_name="embedded:infinity-instruct-sample", per_device_train_batch_size=4,
                        global_batch_size=192, max_steps=10, output_dir="/data/runs/my-run")


def render_all(recipe: Path, *options: str, nodes: int = 2, gpus: int = 8, volume: str | None = "sft-data:/data",
               output: Path | None = None) -> list[dict]:
    """Run sftkit k8s render; the documents it writes."""
    output = output or recipe.parent / "rendered.yaml"
    arguments = ["k8s", "render", "--config", str(recipe), "--nodes", str(nodes), "--gpus-per-node", str(gpus),
                 "--image", IMAGE, "-o", str(output), *(("--volume", volume) if volume else ()), *options]
    assert main(arguments) == 0
    return list(yaml.safe_load_all(output.read_text()))


def render(recipe: Path, *options: str, **settings) -> list[dict]:
    """The ConfigMap and the job (a TrainJob's TrainingRuntime, between them, is left out)."""
    documents = render_all(recipe, *options, **settings)
    return [documents[0], documents[-1]]


def refused(recipe: Path, capsys, *options: str, volume: str | None = "sft-data:/data", nodes: int = 2) -> str:
    """Render something wrong: exit status 2, one line on stderr, no traceback, nothing written."""
    output = recipe.parent / "refused.yaml"
    arguments = ["k8s", "render", "--config", str(recipe), "--nodes", str(nodes), "--gpus-per-node", "8",
                 "--image", IMAGE, "-o", str(output), *(("--volume", volume) if volume else ()), *options]
    assert main(arguments) == 2
    error = capsys.readouterr().err
    assert error.startswith("sftkit: error: ") and "Traceback" not in error
    assert not output.exists()
    return error


# ---------------------------------------------------------------- the CRDs' structural schema


def crd_schema(path: Path) -> dict:
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    version = next(version for version in crd["spec"]["versions"] if version["served"] and version["storage"])
    return strict(version["schema"]["openAPIV3Schema"])


@pytest.fixture(scope="module")
def crds() -> dict[str, dict]:
    """The TrainJob (v2.3.0) and PyTorchJob (v1.9.4) CRDs' schemas, where a copy of Kubeflow's manifests exists, and
    the TrainingRuntime's (v2.3.0), which the tests carry."""
    folder = ROOT.parent / "shared" / "k8s"
    if not folder.is_dir():
        pytest.skip("Kubeflow's CRD manifests are not available beside this checkout")
    return {"TrainJob": crd_schema(folder / "trainer.kubeflow.org_trainjobs.yaml"),
            "PyTorchJob": crd_schema(folder / "kubeflow.org_pytorchjobs.yaml"),
            "TrainingRuntime": runtime_schema()}


def runtime_schema() -> dict:
    return crd_schema(ROOT / "tests" / "data" / "k8s" / "trainer.kubeflow.org_trainingruntimes.yaml")


def strict(schema):
    """No field beyond those the schema defines, as kubectl's strict field validation has it."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    schema = {key: strict(value) for key, value in schema.items()}
    if ("properties" in schema and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        schema["additionalProperties"] = False
    return schema


def schema_errors(schemas: dict[str, dict], job: dict) -> list[str]:
    validator = jsonschema.Draft7Validator(schemas[job["kind"]])
    return [f"{'.'.join(map(str, error.absolute_path))}: {error.message}" for error in validator.iter_errors(job)]


VARIANTS = {
    "default": (),
    "deepspeed, secret, namespace": ("--accelerate-config", "configs/accelerate/deepspeed_zero3.yaml",
                                     "--hf-token-secret", "hf-token", "--namespace", "ml-team", "--shm-size", "32Gi",
                                     "--env", "NCCL_DEBUG=INFO", "--volume", "sft-cache:/cache",
                                     "--env-from-secret", "WANDB_API_KEY=llm-keys:wandb"),
    "resources, scheduling, grace period": ("--cpu", "47500m", "--memory", "300Gi", "--termination-grace-period", "600",
                                            "--node-selector", "nvidia.com/gpu.product=NVIDIA-H100-80GB-HBM3",
                                            "--node-selector", "pool=spot", "--toleration", "nvidia.com/gpu:NoSchedule",
                                            "--toleration", "cloud.google.com/gke-spot=true:NoExecute"),
}
# What a TrainJob's runtimePatches cannot set: the TrainingRuntime rendered with it holds them.
RESTARTS_AND_PRIORITY = ("--max-restarts", "5", "--ttl-seconds-after-finished", "3600", "--priority-class", "training-high",
                   "--image-pull-policy", "IfNotPresent")


@pytest.mark.parametrize("kind", ["trainjob", "pytorchjob"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_the_rendered_job_passes_the_crds_structural_schema(crds, recipe, kind, variant, monkeypatch):
    monkeypatch.chdir(ROOT)
    documents = render_all(recipe, "--kind", kind, *VARIANTS[variant])
    assert [document["kind"] for document in documents] == {
        "trainjob": ["ConfigMap", "TrainingRuntime", "TrainJob"], "pytorchjob": ["ConfigMap", "PyTorchJob"]}[kind]
    for document in documents[1:]:
        assert schema_errors(crds, document) == []


@pytest.mark.parametrize("kind", ["trainjob", "pytorchjob"])
def test_a_job_with_every_restart_and_scheduling_flag_passes_the_crds_structural_schema(crds, recipe, kind):
    documents = render_all(recipe, "--kind", kind, *RESTARTS_AND_PRIORITY, *VARIANTS["resources, scheduling, grace period"])
    for document in documents[1:]:
        assert schema_errors(crds, document) == []


def test_the_schema_check_finds_what_the_api_server_refuses(crds, recipe):
    """The check is not vacuous: a string numProcPerNode (rejected since Trainer v2.2), a field no version defines
    and a malformed quantity are all reported."""
    _, job = render(recipe)
    job["spec"]["trainer"]["numProcPerNode"] = "auto"
    job["spec"]["trainer"]["workingDir"] = "/workspace"
    job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]["template"][
        "spec"]["template"]["spec"]["volumes"][1]["emptyDir"]["sizeLimit"] = "16 GB"
    errors = schema_errors(crds, job)
    assert any("numProcPerNode: 'auto' is not of type 'integer'" in error for error in errors)
    assert any("'workingDir' was unexpected" in error for error in errors)
    assert any("sizeLimit: '16 GB' does not match" in error for error in errors)


# ---------------------------------------------------------------- the operators' own rules (CEL, webhooks)


def test_trainjob_follows_the_trainer_webhook_and_cel_rules(recipe):
    _, job = render(recipe, "--hf-token-secret", "hf-token", "--env", "NCCL_DEBUG=INFO", nodes=4, gpus=2)
    name, trainer = job["metadata"]["name"], job["spec"]["trainer"]
    # CEL on the TrainJob: metadata.name is an RFC 1035 label of at most 63 characters.
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 63
    # Torch plugin webhook: numProcPerNode an integer, no torchrun variable in the trainer's env.
    assert isinstance(trainer["numProcPerNode"], int) and trainer["numProcPerNode"] == 2
    assert not TORCHRUN_RESERVED & {variable["name"] for variable in trainer.get("env", [])}
    assert trainer["numNodes"] == 4
    # Runtime patches may not set the node container's env: only through the trainer.
    patch = job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert [replicated["name"] for replicated in patch] == ["node"]
    containers = patch[0]["template"]["spec"]["template"]["spec"]["containers"]
    assert containers == [{"name": "node", "volumeMounts": containers[0]["volumeMounts"]}]
    # The hosts the pods are given (JobSet: <job>-node-0-<index>) and node 0's address are DNS labels.
    assert all(len(f"{name}-node-0-{index}") <= 63 for index in range(4))


def test_pytorchjob_follows_the_training_operator_webhook_rules(recipe):
    _, job = render(recipe, "--kind", "pytorchjob", nodes=3)
    name, specs = job["metadata"]["name"], job["spec"]["pytorchReplicaSpecs"]
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(f"{name}-worker-1") <= 63
    assert set(specs) == {"Master", "Worker"}
    assert specs["Master"]["replicas"] == 1 and specs["Worker"]["replicas"] == 2
    assert job["spec"]["nprocPerNode"] == "8"  # a string in v1's schema
    for spec in specs.values():
        (container,) = spec["template"]["spec"]["containers"]
        assert container["name"] == "pytorch" and container["image"] == IMAGE
        assert {"name": "pytorchjob-port", "containerPort": 29500} in container["ports"]
    single_node = render(recipe, "--kind", "pytorchjob", nodes=1)[1]["spec"]["pytorchReplicaSpecs"]
    assert set(single_node) == {"Master"}


# ---------------------------------------------------------------- what every pod gets


def pod_of(job: dict) -> tuple[dict, dict]:
    """The pod spec and the training container, for either kind."""
    if job["kind"] == "TrainJob":
        spec = job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0][
            "template"]["spec"]["template"]["spec"]
        trainer = job["spec"]["trainer"]
        container = {**spec["containers"][0], "command": trainer["command"], "env": trainer.get("env", []),
                     "resources": trainer["resourcesPerNode"]}
        return spec, container
    spec = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    return spec, spec["containers"][0]


@pytest.mark.parametrize("kind", ["trainjob", "pytorchjob"])
def test_every_pod_gets_the_recipe_shared_memory_gpus_the_volume_and_the_token(recipe, kind):
    configmap, job = render(recipe, "--kind", kind, "--hf-token-secret", "hf-token", "--shm-size", "32Gi",
                            "--env", "HF_HOME=/data/hf-cache")
    spec, container = pod_of(job)
    volumes = {volume["name"]: volume for volume in spec["volumes"]}
    mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
    assert container["command"] == ["sftkit", "launch", "--config", "/etc/sftkit/recipe.yaml",
                                    "--accelerate-config", "/etc/sftkit/accelerate.yaml"]
    assert volumes[mounts["/etc/sftkit"]]["configMap"]["name"] == configmap["metadata"]["name"]
    assert volumes[mounts["/dev/shm"]]["emptyDir"] == {"medium": "Memory", "sizeLimit": "32Gi"}
    assert volumes[mounts["/data"]]["persistentVolumeClaim"] == {"claimName": "sft-data"}
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert container["resources"]["requests"] == container["resources"]["limits"]
    assert container["env"] == [{"name": "HF_HOME", "value": "/data/hf-cache"}, {"name": "HF_TOKEN", "valueFrom": {
        "secretKeyRef": {"key": "HF_TOKEN", "name": "hf-token"}}}]
    assert yaml.safe_load(configmap["data"]["recipe.yaml"]) == {**yaml.safe_load(recipe.read_text()),
                                                                 "resume_from_checkpoint": "auto"}
    accelerate = yaml.safe_load(configmap["data"]["accelerate.yaml"])
    assert (accelerate["distributed_type"], accelerate["num_machines"], accelerate["num_processes"]) == (
        "MULTI_GPU", 2, 16)

@pytest.mark.parametrize("kind", ["trainjob", "pytorchjob"])
def test_a_variable_from_a_secret_is_a_key_reference_and_the_line_that_creates_the_secret_is_printed(recipe, capsys,
                                                                                                   kind):
    _, job = render(recipe, "--kind", kind, "--namespace", "ml-team", "--env-from-secret", "WANDB_API_KEY=llm-keys",
                    "--env-from-secret", "OPENAI_KEY=llm-keys:openai", "--hf-token-secret", "hf-token")
    assert pod_of(job)[1]["env"] == [
        {"name": "WANDB_API_KEY", "valueFrom": {"secretKeyRef": {"key": "WANDB_API_KEY", "name": "llm-keys"}}},
        {"name": "OPENAI_KEY", "valueFrom": {"secretKeyRef": {"key": "openai", "name": "llm-keys"}}},
        {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"key": "HF_TOKEN", "name": "hf-token"}}}]
    notes = capsys.readouterr().err.splitlines()
    assert ("sftkit: warning: the pods read WANDB_API_KEY, OPENAI_KEY from the Secret llm-keys, which must exist before "
            "the job starts: kubectl create secret generic llm-keys --namespace ml-team "
            '--from-literal=WANDB_API_KEY="$WANDB_API_KEY" --from-literal=openai="$OPENAI_KEY"') in notes
    assert ("sftkit: warning: the pods read HF_TOKEN from the Secret hf-token, which must exist before the job starts: "
            'kubectl create secret generic hf-token --namespace ml-team --from-literal=HF_TOKEN="$HF_TOKEN"') in notes


@pytest.mark.parametrize(("variable", "why"), [
    ("HF_TOKEN=hf_DoNotRenderThis1", "its name says it is a secret"),
    ("MY_PRIVATE_KEY=pem-material-123", "its name says it is a secret"),
    ("OPENAI_KEY=sk-DoNotRender", "its name says it is a secret"),
    ("db_password=hunter2-hunter2", "its name says it is a secret"),
    ("DATABASE_URL=postgres://trainer:s3cret-pass@db:5432/runs", "its value is a URL with credentials"),
])
def test_a_secret_given_as_a_plain_variable_is_refused_and_the_secret_form_offered(recipe, capsys, variable, why):
    name, _, value = variable.partition("=")
    error = refused(recipe, capsys, "--env", variable)
    assert f"--env {name}: {why}" in error and f"pass --env-from-secret {name}=" in error
    assert f'kubectl create secret generic {name.lower().replace("_", "-")} --from-literal={name}="${name}"' in error
    assert value not in error and "s3cret-pass" not in error


@pytest.mark.slow
def test_standard_output_is_the_yaml_for_kubectl_and_notes_go_to_stderr(recipe):
    result = subprocess.run(
        [sys.executable, "-m", "sftkit", "k8s", "render", "--config", str(recipe), "--nodes", "2", "--gpus-per-node",
         "8", "--image", IMAGE, "--volume", "sft-data:/data"], capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    assert [document["kind"] for document in yaml.safe_load_all(result.stdout)] == ["ConfigMap", "TrainingRuntime",
                                                                                  "TrainJob"]
    assert "global_batch_size 192 = 4 per device x 16 process(es) x 3 accumulation step(s)" in result.stderr
    assert "output_dir /data/runs/my-run is on the volume claim sft-data" in result.stderr


def test_the_job_is_named_after_the_recipe_unless_named(recipe):
    configmap, job = render(recipe)
    assert job["metadata"]["name"] == "sft-my-run" and configmap["metadata"]["name"] == "sft-my-run-config"
    assert job["metadata"]["labels"]["app.kubernetes.io/instance"] == "sft-my-run"
    assert render(recipe, "--name", "qwen-sft-7")[1]["metadata"]["name"] == "qwen-sft-7"


# ---------------------------------------------------------------- resources, restarts and scheduling


def resources_of(job: dict) -> dict:
    return pod_of(job)[1]["resources"]


@pytest.mark.parametrize("kind", ["trainjob", "pytorchjob"])
def test_every_pod_requests_and_is_limited_to_its_gpus_cpu_and_memory(recipe, kind):
    _, job = render(recipe, "--kind", kind, "--cpu", "47500m", "--memory", "300Gi")
    amounts = {"cpu": "47500m", "memory": "300Gi", "nvidia.com/gpu": "8"}
    assert resources_of(job) == {"requests": amounts, "limits": amounts}  # Guaranteed: evicted last


@pytest.mark.parametrize("kind", ["trainjob", "pytorchjob"])
def test_default_resources_hold_shared_memory_and_each_processs_weights_and_say_so(recipe, capsys, kind):
    from transformers import AutoConfig

    from sftkit import embedded
    from sftkit.k8s.defaults import DEFAULT_CPUS_PER_GPU, PROCESS_MEMORY_GIB
    from sftkit.train.model import parameter_count

    _, job = render(recipe, "--kind", kind, "--shm-size", "32Gi", gpus=4)
    weights = parameter_count(AutoConfig.from_pretrained(embedded.resolve(TINY_MODEL))) * 4  # float32
    memory = -(-(32 * 2**30 + 4 * (weights + PROCESS_MEMORY_GIB * 2**30)) // 2**30)
    amounts = {"cpu": str(4 * DEFAULT_CPUS_PER_GPU), "memory": f"{memory}Gi", "nvidia.com/gpu": "4"}
    assert resources_of(job) == {"requests": amounts, "limits": amounts}
    assert (f"sftkit: each pod requests (and is limited to) 4 nvidia.com/gpu, {4 * DEFAULT_CPUS_PER_GPU} CPU "
            f"({DEFAULT_CPUS_PER_GPU} per GPU), memory {memory}Gi = /dev/shm 32Gi + 4 process(es) x (") in (
        capsys.readouterr().err)


def test_without_the_models_config_here_memory_falls_back_to_the_documented_default(tmp_path, capsys):
    from sftkit.k8s.defaults import FALLBACK_WEIGHTS_GIB, PROCESS_MEMORY_GIB

    path = write_recipe(tmp_path / "hub.yaml", model_name_or_path="acme-unlisted/not-in-any-cache",
                        dataset_name="embedded:x", output_dir="/data/out")
    _, job = render(path, gpus=2)
    memory = 16 + 2 * (FALLBACK_WEIGHTS_GIB + PROCESS_MEMORY_GIB)
    assert resources_of(job)["limits"]["memory"] == f"{memory}Gi"
    assert (f"a default of {FALLBACK_WEIGHTS_GIB} GiB of weights a process, as the weights of "
            "acme-unlisted/not-in-any-cache cannot be read on this machine") in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["trainjob", "pytorchjob"])
def test_scheduling_flags_and_the_grace_period_reach_the_pod_spec(recipe, kind):
    _, job = render(recipe, "--kind", kind, *VARIANTS["resources, scheduling, grace period"])
    spec, _ = pod_of(job)
    assert spec["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3", "pool": "spot"}
    assert spec["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
        {"key": "cloud.google.com/gke-spot", "operator": "Equal", "value": "true", "effect": "NoExecute"}]
    assert spec["terminationGracePeriodSeconds"] == 600


@pytest.mark.parametrize("kind", ["trainjob", "pytorchjob"])
def test_by_default_pods_have_300_seconds_to_checkpoint_and_the_recipe_resumes(recipe, capsys, kind):
    configmap, job = render(recipe, "--kind", kind)
    spec, _ = pod_of(job)
    assert spec["terminationGracePeriodSeconds"] == 300
    assert "nodeSelector" not in spec and "tolerations" not in spec and "priorityClassName" not in spec
    assert yaml.safe_load(configmap["data"]["recipe.yaml"])["resume_from_checkpoint"] == "auto"
    notes = capsys.readouterr().err
    assert "resume_from_checkpoint: auto written into the recipe" in notes
    assert "pods get 300 s after SIGTERM to save a checkpoint" in notes


def test_a_pytorchjob_restarts_failed_pods_and_cleans_up_after_itself(recipe):
    specs = render(recipe, "--kind", "pytorchjob", nodes=3)[1]["spec"]
    # Never would leave a preempted or crashed job dead; OnFailure restarts it, and it resumes.
    assert {spec["restartPolicy"] for spec in specs["pytorchReplicaSpecs"].values()} == {"OnFailure"}
    assert specs["runPolicy"] == {"backoffLimit": 3, "cleanPodPolicy": "Running", "ttlSecondsAfterFinished": 604800}


def test_a_trainjob_runs_under_a_runtime_of_its_own_that_restarts_every_pod_together(recipe, capsys):
    _, runtime, job = render_all(recipe, nodes=3)
    assert job["spec"]["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "TrainingRuntime",
                                         "name": runtime["metadata"]["name"]}
    jobset = runtime["spec"]["template"]["spec"]
    assert jobset["failurePolicy"] == {"maxRestarts": 3} and jobset["ttlSecondsAfterFinished"] == 604800
    (nodes,) = jobset["replicatedJobs"]
    # The trainer fills the replicated job it marks, and the torch plugin the container named node.
    assert nodes["name"] == "node"
    assert nodes["template"]["metadata"]["labels"] == {"trainer.kubeflow.org/trainjob-ancestor-step": "trainer"}
    assert runtime["spec"]["mlPolicy"] == {"numNodes": 3, "torch": {}}
    # A failed pod fails its Job at once, and the JobSet recreates every pod: the ranks restart together.
    assert nodes["template"]["spec"]["backoffLimit"] == 0
    pod = nodes["template"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and [container["name"] for container in pod["containers"]] == ["node"]
    assert (f"a failed pod restarts the whole JobSet, up to 3 times (failurePolicy.maxRestarts of the TrainingRuntime "
            f"{runtime['metadata']['name']})") in capsys.readouterr().err


def test_restart_and_priority_flags_reach_a_trainjobs_runtime(recipe):
    _, runtime, _ = render_all(recipe, *RESTARTS_AND_PRIORITY)
    jobset = runtime["spec"]["template"]["spec"]
    assert jobset["failurePolicy"] == {"maxRestarts": 5} and jobset["ttlSecondsAfterFinished"] == 3600
    pod = jobset["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    assert pod["priorityClassName"] == "training-high" and pod["containers"][0]["imagePullPolicy"] == "IfNotPresent"


def test_a_trainjob_under_a_cluster_runtime_renders_no_runtime_of_its_own(recipe):
    documents = render_all(recipe, "--runtime", "torch-distributed")
    assert [document["kind"] for document in documents] == ["ConfigMap", "TrainJob"]
    assert documents[1]["spec"]["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime",
                                                  "name": "torch-distributed"}


def test_the_runtime_schema_check_finds_what_the_api_server_refuses(recipe):
    _, runtime, _ = render_all(recipe)
    runtime["spec"]["template"]["spec"]["failurePolicy"]["maxRestart"] = 3
    runtime["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["backoffLimit"] = "none"
    errors = schema_errors({"TrainingRuntime": runtime_schema()}, runtime)
    assert any("'maxRestart' was unexpected" in error for error in errors)
    assert any("backoffLimit: 'none' is not of type 'integer'" in error for error in errors)


def test_restart_and_priority_flags_reach_a_pytorchjobs_run_policy_and_pods(recipe):
    job = render(recipe, "--kind", "pytorchjob", *RESTARTS_AND_PRIORITY)[1]
    spec, container = pod_of(job)
    assert job["spec"]["runPolicy"] == {"backoffLimit": 5, "cleanPodPolicy": "Running", "ttlSecondsAfterFinished": 3600}
    assert spec["priorityClassName"] == "training-high" and container["imagePullPolicy"] == "IfNotPresent"
    assert all(replica["template"]["spec"]["priorityClassName"] == "training-high"
               for replica in job["spec"]["pytorchReplicaSpecs"].values())


def test_a_recipe_that_chooses_its_checkpoint_keeps_it_with_a_warning(tmp_path, capsys):
    path = write_recipe(tmp_path / "pinned.yaml", model_name_or_path=TINY_MODEL, dataset_name="embedded:x",
                        output_dir="/data/out", resume_from_checkpoint="/data/out/checkpoint-200")
    configmap, _ = render(path)
    assert configmap["data"]["recipe.yaml"] == path.read_text()
    assert ("warning: resume_from_checkpoint: /data/out/checkpoint-200 in the recipe: a restarted pod does not go on "
            "from the latest checkpoint") in capsys.readouterr().err


@pytest.mark.parametrize(("flag", "value"), [("--max-restarts", "-1"), ("--termination-grace-period", "5m"),
                                             ("--ttl-seconds-after-finished", "a week")])
def test_a_count_of_seconds_or_restarts_must_be_a_whole_number(recipe, capsys, flag, value):
    with pytest.raises(SystemExit) as exit_status:
        main(["k8s", "render", "--config", str(recipe), "--nodes", "1", "--gpus-per-node", "1", "--image", IMAGE,
              "--kind", "pytorchjob", flag, value])
    assert exit_status.value.code == 2
    assert f"argument {flag}: expected a whole number of at least 0, got {value!r}" in capsys.readouterr().err


# ---------------------------------------------------------------- DeepSpeed's files travel with the job


def test_a_deepspeed_config_is_carried_in_the_configmap_and_launched_without_pdsh(recipe, monkeypatch):
    monkeypatch.chdir(ROOT)
    configmap, _ = render(recipe, "--accelerate-config", "configs/accelerate/deepspeed_zero2.yaml")
    accelerate = yaml.safe_load(configmap["data"]["accelerate.yaml"])
    assert accelerate["deepspeed_config"]["deepspeed_config_file"] == "/etc/sftkit/deepspeed.json"
    assert accelerate["deepspeed_config"]["deepspeed_multinode_launcher"] == "standard"
    assert (accelerate["num_machines"], accelerate["num_processes"], accelerate["machine_rank"]) == (2, 16, 0)
    assert "main_process_ip" not in accelerate
    assert json.loads(configmap["data"]["deepspeed.json"]) == json.loads(
        (ROOT / "configs" / "deepspeed" / "zero2.json").read_text())


def test_a_deepspeed_config_without_a_multinode_launcher_gets_the_standard_one(recipe, tmp_path, monkeypatch):
    """accelerate's default, pdsh, would log into the other pods over ssh; a pod has neither pdsh nor keys."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    Path("zero2.yaml").write_text(yaml.safe_dump({"distributed_type": "DEEPSPEED", "num_processes": 8,
                                                  "deepspeed_config": {"deepspeed_config_file": "ds.json"}}))
    configmap, _ = render(recipe, "--accelerate-config", "zero2.yaml")
    deepspeed = yaml.safe_load(configmap["data"]["accelerate.yaml"])["deepspeed_config"]
    assert deepspeed == {"deepspeed_config_file": "/etc/sftkit/deepspeed.json",
                         "deepspeed_multinode_launcher": "standard"}
    assert json.loads(configmap["data"]["deepspeed.json"]) == {"zero_optimization": {"stage": 2}}


def test_the_recipes_own_deepspeed_file_is_carried_too(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    path = write_recipe(tmp_path / "ds.yaml", model_name_or_path=TINY_MODEL, dataset_name="embedded:x",
                        output_dir="/data/out", deepspeed="configs/deepspeed/zero3.json")
    configmap, _ = render(path)
    assert yaml.safe_load(configmap["data"]["recipe.yaml"])["deepspeed"] == "/etc/sftkit/deepspeed.json"
    assert json.loads(configmap["data"]["deepspeed.json"])["zero_optimization"]["stage"] == 3


# ---------------------------------------------------------------- refusals, each naming what to change


def test_the_walkthrough_recipe_is_refused_because_its_model_would_vanish_with_the_pod(tmp_path, capsys):
    walkthrough = tmp_path / "walkthrough.yaml"
    walkthrough.write_text((ROOT / "configs" / "recipes" / "walkthrough.yaml").read_text())
    error = refused(walkthrough, capsys, volume=None, nodes=1)
    assert ("output_dir /tmp/my-first-sft-exp is on no mounted volume: the model would vanish with the pod. Mount a "
            "persistent volume claim where it should land (--volume CLAIM:/tmp/my-first-sft-exp)") in error
    assert "--allow-ephemeral-output" in error
    assert "is on no mounted volume" in refused(walkthrough, capsys, volume="sft-data:/data", nodes=1)
    assert "output_dir /tmp/my-first-sft-exp is on the volume claim sft-data" in (
        render(walkthrough, nodes=1, volume="sft-data:/tmp/my-first-sft-exp") and capsys.readouterr().err)
    render(walkthrough, "--allow-ephemeral-output", nodes=1, volume=None)
    assert "the model vanishes with the pod (--allow-ephemeral-output)" in capsys.readouterr().err


def test_a_relative_output_dir_is_refused(tmp_path, capsys):
    path = write_recipe(tmp_path / "r.yaml", model_name_or_path=TINY_MODEL, dataset_name="embedded:x",
                        output_dir="outputs/run")
    assert "output_dir outputs/run is relative, so inside the container" in refused(path, capsys)


def test_a_global_batch_that_does_not_divide_over_the_jobs_processes_is_refused(recipe, capsys):
    error = refused(recipe, capsys, nodes=4)  # 192 rows over 4 x 8 processes of 4 rows each
    assert "global_batch_size 192 is not a multiple of per_device_train_batch_size 4 x 32 process(es) = 128" in error


def test_an_accelerate_config_that_starts_one_process_is_refused(recipe, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    error = refused(recipe, capsys, "--accelerate-config", "configs/accelerate/single_gpu.yaml")
    assert "distributed_type: NO, which starts one process, but the job runs 16" in error


def test_two_deepspeed_configs_are_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    path = write_recipe(tmp_path / "ds.yaml", model_name_or_path=TINY_MODEL, dataset_name="embedded:x",
                        output_dir="/data/out", deepspeed="configs/deepspeed/zero3.json")
    error = refused(path, capsys, "--accelerate-config", "configs/accelerate/deepspeed_zero2.yaml")
    assert "name a DeepSpeed config; keep one of them" in error


@pytest.mark.parametrize(("options", "message"), [
    (("--name", "My_Run"), "--name 'My_Run' is not a valid name"),
    (("--name", "a" * 60), "the pods of this job are named like a{60}-node-0-1.*use at most 54 characters"),
    (("--kind", "pytorchjob", "--name", "a" * 60), "use at most 54 characters"),
    (("--image", "ghcr.io/acme/My Image:1"), "--image 'ghcr.io/acme/My Image:1' is not a container image reference"),
    (("--shm-size", "16 GB"), "--shm-size '16 GB' is not a Kubernetes quantity"),
    (("--shm-size", "0"), "--shm-size '0' is not a Kubernetes quantity"),
    (("--namespace", "ML"), "--namespace 'ML' is not a valid name"),
    (("--hf-token-secret", "hf_token"), "--hf-token-secret 'hf_token' is not a valid name"),
    (("--accelerate-config", "missing.yaml"), "--accelerate-config missing.yaml: no such file"),
    (("--env", "PET_MASTER_PORT=29600"), "the operator sets PET_MASTER_PORT in each pod"),
    (("--env", "MASTER_ADDR=10.0.0.1"), "the operator sets MASTER_ADDR in each pod"),
    (("--env", "NCCL_DEBUG"), "--env 'NCCL_DEBUG': write NAME=VALUE"),
    (("--volume", "sft-cache:/dev"), "/dev/shm is where the job mounts its own files"),
    (("--volume", "sft-cache:/etc/sftkit"), "/etc/sftkit is where the job mounts its own files"),
    (("--volume", "sft-cache:/data"), "two claims are mounted at the same path"),
    (("--env", "HF_TOKEN=hf_x", "--hf-token-secret", "hf-token"), "a variable is given twice"),
    (("--env-from-secret", "HF_TOKEN=hf-token", "--hf-token-secret", "hf-token"), "a variable is given twice"),
    (("--env-from-secret", "HF_TOKEN"), "--env-from-secret 'HF_TOKEN': write NAME=SECRET or NAME=SECRET:KEY"),
    (("--env-from-secret", "HF_TOKEN=Hf_Token"), "the Secret 'Hf_Token' is not a valid name"),
    (("--env-from-secret", "HF_TOKEN=hf-token:bad key"), "the key 'bad key' is not a Secret key"),
    (("--env-from-secret", "MASTER_ADDR=net"), "the operator sets MASTER_ADDR in each pod"),
    (("--cpu", "lots"), "--cpu 'lots' is not a Kubernetes quantity: .* e.g. 48 or 47500m"),
    (("--memory", "256 GB"), "--memory '256 GB' is not a Kubernetes quantity"),
    (("--memory", "8Gi"), "--memory 8Gi is not more than --shm-size 16Gi: the memory-backed /dev/shm counts"),
    (("--toleration", "nvidia.com/gpu:NoSchedul"),
     "--toleration 'nvidia.com/gpu:NoSchedul': the effect 'NoSchedul' is not one of NoSchedule, PreferNoSchedule"),
    (("--toleration", "nvidia.com/gpu"), "--toleration 'nvidia.com/gpu': write KEY\\[=VALUE\\]:EFFECT"),
    (("--toleration", "spot=yes please:NoSchedule"), "'yes please' is not a label value"),
    (("--node-selector", "gpu"), "--node-selector 'gpu': write KEY=VALUE"),
    (("--node-selector", "GPU Type=h100"), "--node-selector 'GPU Type=h100': 'GPU Type' is not a label key"),
    (("--node-selector", "pool=a", "--node-selector", "pool=b"), "--node-selector: a label is given twice"),
    (("--kind", "pytorchjob", "--priority-class", "High"), "--priority-class 'High' is not a valid name"),
    (("--kind", "pytorchjob", "--image-pull-policy", "always"),
     "--image-pull-policy 'always': choose Always, IfNotPresent, Never"),
    (("--runtime", "torch-distributed", "--max-restarts", "2"),
     "--max-restarts: a TrainJob under --runtime torch-distributed cannot set this .* Leave out --runtime"),
    (("--runtime", "torch-distributed", "--priority-class", "high", "--image-pull-policy", "Always"),
     "--priority-class, --image-pull-policy: a TrainJob under --runtime torch-distributed cannot set these"),
    (("--kind", "pytorchjob", "--runtime", "torch-distributed"), "a runtime is a TrainJob's; a PyTorchJob has none"),
])
def test_names_images_and_quantities_are_refused_locally(recipe, capsys, options, message):
    assert re.search(message, refused(recipe, capsys, *options))


@pytest.mark.parametrize(("value", "message"), [
    ("sft-data", "write CLAIM:MOUNT"),
    ("sft-data:data", "absolute directory"),
    ("Sft:/data", "the claim 'Sft' is not a valid name"),
])
def test_volumes_are_checked(value, message):
    with pytest.raises(SftkitError, match=message):
        volume_spec(value)


def test_the_validators_accept_what_kubernetes_accepts():
    assert dns_1035_label("sft-qwen2-5", "--name") == "sft-qwen2-5"
    assert dns_1123_subdomain("hf.token-1", "--hf-token-secret") == "hf.token-1"
    for image in ("sftkit", "localhost:5000/sftkit:dev", "ghcr.io/acme/team/sftkit:0.1.0-cuda13",
                  "nvcr.io/acme/sftkit@sha256:" + "a" * 64, "Registry.Example.com/acme/sftkit"):
        assert image_reference(image) == image
    for quantity in ("16Gi", "512Mi", "64G", "1.5Gi", "1e9"):
        assert positive_quantity(quantity, "--shm-size") == quantity


def test_rendering_leaves_the_environment_as_it_was(tmp_path):
    path = write_recipe(tmp_path / "env.yaml", model_name_or_path=TINY_MODEL, dataset_name="embedded:x",
                        output_dir="/data/out", env={"SFTKIT_RENDER_PROBE": "1"})
    import sftkit.k8s.render  # noqa: F401  (importing it loads torch._inductor, which sets TORCHINDUCTOR_CACHE_DIR)

    before = dict(os.environ)
    render(path)
    assert dict(os.environ) == before


def test_help_prints_the_usage_of_each_command(capsys):
    for command, usage in ((["k8s", "render", "--help"], "usage: sftkit k8s render"),
                           (["launch", "--help"], "usage: sftkit launch --config RECIPE.yaml")):
        with pytest.raises(SystemExit) as exit_status:
            main(command)
        assert exit_status.value.code == 0 and capsys.readouterr().out.startswith(usage)
    assert main(["k8s"]) == 0 and "render" in capsys.readouterr().out.split("commands:")[1]
    with pytest.raises(SystemExit) as exit_status:
        main(["--help"])
    listed = capsys.readouterr().out
    assert exit_status.value.code == 0 and "k8s " in listed and "launch " in listed
