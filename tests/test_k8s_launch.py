"""sftkit launch: every scheduler's variables become explicit accelerate flags, and the pods form one world.

The mapping is a pure function, checked here for the variables Kubeflow Trainer's torch-distributed
runtime injects (PET_*), those of the v1 PyTorchJob (MASTER_ADDR/PORT, RANK = node rank, WORLD_SIZE
counting one process a pod, PET_*), torchrun-style variables, SLURM's and none; each launch that
would train alone while its variables say several nodes is refused, naming the missing variable.

Then the proof on loopback: a 2-node job is rendered, and its container command is run as two local
processes with the variables each pod would get (the operator's, read from the manifest, with the
master address replaced by 127.0.0.1 and a free port). They form one world of 2, train the single
process's per-step losses (relative 1e-5, as tests/test_distributed.py explains) and write one model
that loads (logits within 1e-4). And the rehearsal of a node lost mid-run: one "pod" is killed after a
checkpoint, both start again as the rendered runtime's failure policy says, and the job ends with the
losses of an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from helpers import ROOT, TINY_MODEL, write_recipe

from sftkit.cli import main
from sftkit.errors import SftkitError
from sftkit.k8s.bundle import MOUNT_DIR
from sftkit.k8s.launch import accelerate_arguments, launch_command, rendezvous_from_environment

pytestmark = pytest.mark.slow  # several processes, kills or whole training runs

LOSS_TOLERANCE = 1e-5
LOGIT_TOLERANCE = 1e-4
OPERATOR_PORT = 29500  # PET_MASTER_PORT of the torch-distributed runtime; the PyTorchJob's port is rendered the same


def flags(environ: dict[str, str], visible_gpus: int = 0, distributed_type: str | None = "MULTI_GPU",
          override: int | None = None) -> list[str]:
    return accelerate_arguments(rendezvous_from_environment(environ, visible_gpus, override), distributed_type)


# ---------------------------------------------------------------- the mapping, one scheduler at a time


def test_trainjob_variables_become_every_flag_that_fixes_the_world():
    pod = {"PET_NNODES": "2", "PET_NPROC_PER_NODE": "8", "PET_NODE_RANK": "1",
           "PET_MASTER_ADDR": "sft-node-0-0.sft", "PET_MASTER_PORT": "29500"}
    assert flags(pod, visible_gpus=8) == [
        "--num_machines", "2", "--num_processes", "16", "--machine_rank", "1",
        "--main_process_ip", "sft-node-0-0.sft", "--main_process_port", "29500",
    ]
    assert rendezvous_from_environment(pod, 8).scheduler == "Kubeflow TrainJob"


def test_pytorchjob_variables_count_processes_from_the_gpus_not_from_world_size():
    # v1 counts one process a pod in WORLD_SIZE when nprocPerNode is auto, and RANK is the pod's node rank.
    pod = {"MASTER_ADDR": "sft-master-0", "MASTER_PORT": "23456", "WORLD_SIZE": "2", "RANK": "1",
           "PET_NNODES": "2", "PET_NPROC_PER_NODE": "auto", "PET_NODE_RANK": "1", "PYTHONUNBUFFERED": "0"}
    rendezvous = rendezvous_from_environment(pod, visible_gpus=4)
    assert rendezvous.scheduler == "Kubeflow PyTorchJob"
    assert (rendezvous.processes_per_node, rendezvous.processes) == (4, 8)
    assert flags(pod, visible_gpus=4, distributed_type="DEEPSPEED") == [
        "--num_machines", "2", "--num_processes", "8", "--machine_rank", "1",
        "--main_process_ip", "sft-master-0", "--main_process_port", "23456",
        "--deepspeed_multinode_launcher", "standard",
    ]


def test_pet_variables_win_over_the_v1_ones_and_rank_falls_back_to_rank():
    pod = {"PET_NNODES": "3", "PET_MASTER_ADDR": "a", "PET_MASTER_PORT": "1234", "MASTER_ADDR": "b",
           "MASTER_PORT": "5678", "RANK": "2", "WORLD_SIZE": "3"}
    rendezvous = rendezvous_from_environment(pod, visible_gpus=1)
    assert (rendezvous.master_addr, rendezvous.master_port, rendezvous.node_rank) == ("a", 1234, 2)


def test_torchrun_style_variables():
    machine = {"NNODES": "4", "GROUP_RANK": "3", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29400",
               "NPROC_PER_NODE": "2"}
    assert flags(machine, visible_gpus=2, distributed_type=None) == [
        "--multi_gpu", "--num_machines", "4", "--num_processes", "8", "--machine_rank", "3",
        "--main_process_ip", "10.0.0.1", "--main_process_port", "29400",
    ]


def test_slurm_variables_take_the_first_host_of_the_node_list_and_a_port_from_the_job_id():
    node = {"SLURM_JOB_ID": "123456", "SLURM_NNODES": "2", "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "node[01-02]",
            "SLURM_STEP_NUM_TASKS": "2", "SLURM_GPUS_ON_NODE": "8"}
    assert flags(node, visible_gpus=8, distributed_type=None) == [
        "--multi_gpu", "--num_machines", "2", "--num_processes", "16", "--machine_rank", "1",
        "--main_process_ip", "node01", "--main_process_port", "13456",  # 10000 + 123456 % 20000
    ]
    # SLURM's own order, as scontrol show hostnames gives it, not a sorted one; MASTER_* set by hand win.
    assert rendezvous_from_environment({**node, "SLURM_JOB_NODELIST": "gpu[7,3],cpu1"}, 8).master_addr == "gpu7"
    chosen = rendezvous_from_environment({**node, "MASTER_ADDR": "10.1.1.1", "MASTER_PORT": "29999"}, 8)
    assert (chosen.master_addr, chosen.master_port) == ("10.1.1.1", 29999)


def test_no_variables_is_one_machine_with_a_process_per_visible_gpu():
    assert flags({}, visible_gpus=8, distributed_type=None) == [
        "--multi_gpu", "--num_machines", "1", "--num_processes", "8", "--machine_rank", "0"]
    assert flags({}, visible_gpus=0, distributed_type=None) == [
        "--num_machines", "1", "--num_processes", "1", "--machine_rank", "0"]


def test_without_gpus_the_jobs_process_count_runs_as_cpu_processes_and_says_so():
    rendezvous = rendezvous_from_environment({"PET_NNODES": "1", "PET_NPROC_PER_NODE": "2"}, visible_gpus=0)
    assert rendezvous.processes_per_node == 2
    assert "no GPU visible: CPU processes" in rendezvous.describe()


def test_nproc_per_node_flag_wins():
    assert rendezvous_from_environment({"PET_NNODES": "1", "PET_NPROC_PER_NODE": "8"}, 8, 2).processes == 2


def test_launch_command_is_accelerate_launch_of_sftkit_with_the_recipe_and_its_overrides():
    rendezvous = rendezvous_from_environment({}, visible_gpus=0)
    command = launch_command(rendezvous, "/etc/sftkit/accelerate.yaml", "MULTI_GPU",
                             ["--config", "/etc/sftkit/recipe.yaml", "--max_steps", "10"])
    assert command[:4] == ["accelerate", "launch", "--config_file", "/etc/sftkit/accelerate.yaml"]
    assert command[-6:] == ["-m", "sftkit", "--config", "/etc/sftkit/recipe.yaml", "--max_steps", "10"]


TWO_NODES = {"PET_NNODES": "2", "PET_NPROC_PER_NODE": "1", "PET_NODE_RANK": "1", "PET_MASTER_ADDR": "m",
             "PET_MASTER_PORT": "29500"}


@pytest.mark.parametrize(("environ", "distributed_type", "message"), [
    ({**TWO_NODES, "PET_MASTER_ADDR": ""}, "MULTI_GPU", "no master address is set.*set PET_MASTER_ADDR"),
    ({key: value for key, value in TWO_NODES.items() if key != "PET_NODE_RANK"}, "MULTI_GPU",
     "PET_NNODES=2 says 2 nodes, but PET_NODE_RANK is not set"),
    ({key: value for key, value in TWO_NODES.items() if key != "PET_NNODES"}, "MULTI_GPU", "set PET_NNODES"),
    ({**TWO_NODES, "PET_NNODES": "1:4"}, "MULTI_GPU", "elastic ranges"),
    ({**TWO_NODES, "PET_NODE_RANK": "2"}, "MULTI_GPU", "ranks go from 0 to 1"),
    ({**TWO_NODES, "PET_NPROC_PER_NODE": "cpu"}, "MULTI_GPU", "PET_NPROC_PER_NODE='cpu'"),
    (TWO_NODES, "NO", "distributed_type: NO, which starts one process"),
    ({"NNODES": "2", "NODE_RANK": "1"}, None, "set MASTER_ADDR"),
    ({"WORLD_SIZE": "4", "RANK": "1"}, None, "WORLD_SIZE=4 says several processes"),
    ({"SLURM_JOB_ID": "7", "SLURM_NNODES": "2", "SLURM_NODEID": "1"}, None, "set SLURM_JOB_NODELIST"),
    ({"SLURM_JOB_ID": "7", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "n[1-2]"}, None, "SLURM_NODEID is not set"),
    ({"SLURM_JOB_ID": "7", "SLURM_NNODES": "2", "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "n[1-2]",
      "SLURM_STEP_NUM_TASKS": "16"}, None, "once per node: srun --ntasks-per-node=1"),
])
def test_a_launch_that_would_train_alone_is_refused_naming_the_variable(environ, distributed_type, message):
    with pytest.raises(SftkitError, match=message):
        flags(environ, visible_gpus=0, distributed_type=distributed_type)


def test_more_processes_than_visible_gpus_is_refused():
    with pytest.raises(SftkitError, match="PET_NPROC_PER_NODE=8 asks for 8 processes.*4 GPU"):
        rendezvous_from_environment({**TWO_NODES, "PET_NPROC_PER_NODE": "8"}, visible_gpus=4)


# ---------------------------------------------------------------- the proof on loopback


@pytest.fixture(scope="module")
def recipe_values() -> dict:
    return {
        "model_name_or_path": TINY_MODEL, "dataset_name": "embedded:infinity-instruct-sample",
        "per_device_train_batch_size": 8, "global_batch_size": 16, "max_steps": 6, "logging_steps": 1,
        "learning_rate": 3.0e-3, "max_length": 256, "gradient_checkpointing": False, "eval_strategy": "no",
        "save_strategy": "no", "seed": 42, "report_to": "none",
    }


@pytest.fixture(scope="module")
def single(recipe_values, tmp_path_factory) -> Path:
    """The reference: one process, two accumulated micro-batches of 8."""
    output = tmp_path_factory.mktemp("single")
    recipe = write_recipe(output.parent / "single.yaml", **recipe_values, output_dir=str(output))
    result = subprocess.run(["accelerate", "launch", "--num_processes", "1", "-m", "sftkit", "--config", str(recipe)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return output


def losses(output: Path) -> list[float]:
    history = json.loads((output / "trainer_state.json").read_text())["log_history"]
    return [entry["loss"] for entry in history if "loss" in entry]


def logits(model_dir: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        return model(torch.arange(1, 40).unsqueeze(0)).logits


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def render_job(tmp_path: Path, recipe_values: dict, *options: str) -> tuple[Path, dict, dict]:
    """Render a 2-node job whose output_dir lies on a "volume" (a local folder); unpack its ConfigMap where the
    pods would see it (a local folder standing for /etc/sftkit). Returns the output_dir and the two documents."""
    volume, mounted = tmp_path / "volume", tmp_path / "etc-sftkit"
    mounted.mkdir()
    recipe = write_recipe(tmp_path / "recipe.yaml", **recipe_values, output_dir=str(volume / "model"))
    manifest = tmp_path / "job.yaml"
    status = main(["k8s", "render", "--config", str(recipe), "--nodes", "2", "--gpus-per-node", "1",
                   "--image", "registry.example.com/sftkit:test", "--volume", f"training-output:{volume}",
                   "--name", "sft-loopback", "-o", str(manifest), *options])
    assert status == 0
    configmap, *_, job = yaml.safe_load_all(manifest.read_text())  # a TrainJob's TrainingRuntime between them
    for name, text in configmap["data"].items():
        (mounted / name).write_text(text.replace(MOUNT_DIR, str(mounted)))
    return volume / "model", configmap, job


def run_pods(command: list[str], pods: list[dict[str, str]], mounted: Path, workdir: Path) -> list[str]:
    """Each pod's command as a local process with that pod's variables; returns their stderr."""
    command = [part.replace(MOUNT_DIR, str(mounted)) for part in command]
    workdir.mkdir()
    processes = [subprocess.Popen(command, cwd=workdir, env={**os.environ, **pod}, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for pod in pods]
    logs = [process.communicate(timeout=600)[1] for process in processes]
    assert [process.returncode for process in processes] == [0] * len(pods), "\n".join(log[-2500:] for log in logs)
    return logs


def assert_one_world_training_the_single_process_run(output: Path, single: Path, logs: list[str]) -> None:
    for rank, log in enumerate(logs):
        assert f"node {rank} of 2, 1 process(es) per node" in log
    record = yaml.safe_load((output / "sftkit_run.yaml").read_text())
    assert record["processes"] == 2 and record["recipe"]["gradient_accumulation_steps"] == 1
    assert len(losses(output)) == 6
    assert losses(output) == pytest.approx(losses(single), rel=LOSS_TOLERANCE)
    torch.testing.assert_close(logits(output), logits(single), atol=LOGIT_TOLERANCE, rtol=0)


def trainjob_pods(job: dict) -> list[dict[str, str]]:
    """What the torch-distributed runtime injects into each pod's node container, from the TrainJob."""
    trainer, name = job["spec"]["trainer"], job["metadata"]["name"]
    assert not [variable for variable in trainer.get("env", []) if variable["name"].startswith("PET_")]
    return [{"PET_NNODES": str(trainer["numNodes"]), "PET_NPROC_PER_NODE": str(trainer["numProcPerNode"]),
             "PET_NODE_RANK": str(rank), "PET_MASTER_ADDR": f"{name}-node-0-0.{name}",
             "PET_MASTER_PORT": str(OPERATOR_PORT)} for rank in range(trainer["numNodes"])]


def on_loopback(pods: list[dict[str, str]], address: str, port: str) -> list[dict[str, str]]:
    """Node 0's address (a cluster DNS name) becomes this machine, its port one that is free here."""
    free = str(free_port())
    return [{**pod, address: "127.0.0.1", port: free} for pod in pods]


def test_trainjob_pods_form_one_world_and_train_the_single_process_losses(recipe_values, single, tmp_path):
    output, _, job = render_job(tmp_path, recipe_values)
    assert job["spec"]["runtimeRef"]["name"] == "sft-loopback-runtime"
    pods = trainjob_pods(job)
    assert pods[1]["PET_MASTER_ADDR"] == "sft-loopback-node-0-0.sft-loopback"
    logs = run_pods(job["spec"]["trainer"]["command"], on_loopback(pods, "PET_MASTER_ADDR", "PET_MASTER_PORT"),
                    tmp_path / "etc-sftkit", tmp_path / "workdir")
    assert "--main_process_ip 127.0.0.1" in logs[1]
    assert_one_world_training_the_single_process_run(output, single, logs)


def start_pods(command: list[str], pods: list[dict[str, str]], mounted: Path, workdir: Path) -> list[subprocess.Popen]:
    command = [part.replace(MOUNT_DIR, str(mounted)) for part in command]
    workdir.mkdir(exist_ok=True)
    return [subprocess.Popen(command, cwd=workdir, env={**os.environ, **pod}, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True) for pod in pods]


def signal_pod(pod: subprocess.Popen, signum: int) -> None:
    """Signal every process of a "pod", as the kubelet does its container's: the launcher and the training processes
    (which torchrun starts in sessions of their own)."""
    processes = [psutil.Process(pod.pid)]
    processes += processes[0].children(recursive=True)
    for process in processes:
        try:
            process.send_signal(signum)
        except psutil.NoSuchProcess:
            continue


@pytest.fixture(scope="module")
def longer(recipe_values) -> dict:
    """A run long enough to be killed in the middle: 12 steps, a checkpoint every 2."""
    return {**recipe_values, "max_steps": 12}


@pytest.fixture(scope="module")
def uninterrupted(longer, tmp_path_factory) -> Path:
    """The longer run in one process, never interrupted."""
    output = tmp_path_factory.mktemp("uninterrupted")
    recipe = write_recipe(output.parent / "uninterrupted.yaml", **longer, output_dir=str(output))
    result = subprocess.run(["accelerate", "launch", "--num_processes", "1", "-m", "sftkit", "--config", str(recipe)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return output


def test_a_killed_pod_restarts_as_its_runtime_says_and_the_job_ends_with_the_uninterrupted_losses(
        longer, uninterrupted, tmp_path):
    """The rehearsal of a node lost mid-run: node 1 is killed (SIGKILL, no chance to save) after the first
    checkpoint; node 0 then fails too, and the JobSet does what the rendered TrainingRuntime says: every pod is
    recreated, with the same command and variables, and resumes from the latest checkpoint (resume_from_checkpoint:
    auto, written into the ConfigMap's recipe). The job ends with the per-step losses of an uninterrupted run."""
    output, configmap, job = render_job(tmp_path, {**longer, "save_strategy": "steps", "save_steps": 2})
    runtime = next(document for document in yaml.safe_load_all((tmp_path / "job.yaml").read_text())
                   if document["kind"] == "TrainingRuntime")
    assert job["spec"]["runtimeRef"]["name"] == runtime["metadata"]["name"]
    jobset = runtime["spec"]["template"]["spec"]
    allowed = jobset["failurePolicy"]["maxRestarts"]
    job_spec = jobset["replicatedJobs"][0]["template"]["spec"]
    # A failed pod fails its Job at once (no restart in place), and a failed Job restarts the whole JobSet.
    assert job_spec["backoffLimit"] == 0 and job_spec["template"]["spec"]["restartPolicy"] == "Never"
    assert yaml.safe_load(configmap["data"]["recipe.yaml"])["resume_from_checkpoint"] == "auto"
    mounted, command = tmp_path / "etc-sftkit", job["spec"]["trainer"]["command"]

    pods = start_pods(command, on_loopback(trainjob_pods(job), "PET_MASTER_ADDR", "PET_MASTER_PORT"), mounted,
                      tmp_path / "workdir")
    deadline = time.monotonic() + 600
    while not (output / "checkpoint-2").is_dir() and time.monotonic() < deadline and pods[1].poll() is None:
        time.sleep(0.02)
    signal_pod(pods[1], signal.SIGSTOP)  # the node is frozen at once, wherever it is, then lost
    assert (output / "checkpoint-2").is_dir(), "no checkpoint before the job ended"
    signal_pod(pods[1], signal.SIGKILL)
    codes = []
    for pod in pods:
        try:
            pod.communicate(timeout=120)
        except subprocess.TimeoutExpired:  # a survivor blocked on its lost peer is killed with its JobSet
            signal_pod(pod, signal.SIGKILL)
            pod.communicate()
        codes.append(pod.returncode)
    assert codes[1] == -signal.SIGKILL and codes != [0, 0]
    assert not (output / "model.safetensors").exists()  # the job did not finish

    assert allowed >= 1  # the JobSet is recreated: every pod starts again, a new pod on a new port here
    logs = run_pods(command, on_loopback(trainjob_pods(job), "PET_MASTER_ADDR", "PET_MASTER_PORT"), mounted,
                    tmp_path / "workdir-restarted")
    assert "resum" in logs[0] and "checkpoint-" in logs[0]
    assert len(losses(output)) == 12
    assert losses(output) == pytest.approx(losses(uninterrupted), rel=LOSS_TOLERANCE)
    torch.testing.assert_close(logits(output), logits(uninterrupted), atol=LOGIT_TOLERANCE, rtol=0)


def pytorchjob_pods(job: dict) -> list[dict[str, str]]:
    """What the v1 training operator sets in each pod's pytorch container: Master first, then the Workers."""
    spec, name = job["spec"], job["metadata"]["name"]
    nodes = sum(spec["pytorchReplicaSpecs"][role]["replicas"] for role in ("Master", "Worker"))
    nproc = spec["nprocPerNode"]
    container = spec["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    assert container["name"] == "pytorch"
    port = next(port["containerPort"] for port in container["ports"] if port["name"] == "pytorchjob-port")
    return [{"PYTHONUNBUFFERED": "0", "MASTER_ADDR": f"{name}-master-0", "MASTER_PORT": str(port),
             "WORLD_SIZE": str(nodes * int(nproc)), "RANK": str(rank), "PET_NPROC_PER_NODE": nproc,
             "PET_NODE_RANK": str(rank), "PET_NNODES": str(nodes)} for rank in range(nodes)]


def test_pytorchjob_pods_with_the_deepspeed_config_form_one_world_and_train_the_single_process_losses(
        recipe_values, single, tmp_path, monkeypatch):
    """The GPU cluster's own ZeRO-2 config, its JSON carried in the ConfigMap, over the standard launcher."""
    monkeypatch.chdir(ROOT)  # the accelerate config names its JSON relative to the repository root
    output, configmap, job = render_job(tmp_path, recipe_values, "--kind", "pytorchjob",
                                        "--accelerate-config", "configs/accelerate/deepspeed_zero2.yaml")
    assert "deepspeed.json" in configmap["data"]
    container = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    pods = pytorchjob_pods(job)
    assert (pods[1]["MASTER_ADDR"], pods[1]["MASTER_PORT"]) == ("sft-loopback-master-0", str(OPERATOR_PORT))
    logs = run_pods(container["command"], on_loopback(pods, "MASTER_ADDR", "MASTER_PORT"), tmp_path / "etc-sftkit",
                    tmp_path / "workdir")
    assert "--deepspeed_multinode_launcher standard" in logs[0]
    assert_one_world_training_the_single_process_run(output, single, logs)


def free_slurm_job_id() -> int:
    """A job id whose derived port (10000 + id % 20000) is free here, so that the launcher's own port is used."""
    for job_id in random.sample(range(20000), 200):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", 10000 + job_id))
            except OSError:
                continue
            return job_id
    pytest.skip("no free port between 10000 and 29999")


def test_slurm_nodes_form_one_world_and_train_the_single_process_losses(recipe_values, single, tmp_path):
    """One sftkit launch task per node, as the sbatch example in docs/kubernetes.md runs it."""
    output = tmp_path / "model"
    recipe = write_recipe(tmp_path / "recipe.yaml", **recipe_values, output_dir=str(output))
    job_id = free_slurm_job_id()
    # srun's variables for a 2-node step with --ntasks-per-node=1 --gpus-per-node=1; the node list expands to
    # 127.0.0.1 first, so that node 0 is this machine.
    nodes = [{"SLURM_JOB_ID": str(job_id), "SLURM_NNODES": "2", "SLURM_NODEID": str(rank), "SLURM_PROCID": str(rank),
              "SLURM_JOB_NODELIST": "127.0.0.[1-2]", "SLURM_STEP_NUM_TASKS": "2", "SLURM_GPUS_ON_NODE": "1"}
             for rank in range(2)]
    logs = run_pods(["sftkit", "launch", "--config", str(recipe)], nodes, tmp_path, tmp_path / "workdir")
    assert f"--main_process_ip 127.0.0.1 --main_process_port {10000 + job_id}" in logs[0]
    assert_one_world_training_the_single_process_run(output, single, logs)


def test_a_pod_without_its_master_address_refuses_to_train_alone(recipe_values, tmp_path):
    output, _, job = render_job(tmp_path, recipe_values)
    pod = on_loopback(trainjob_pods(job), "PET_MASTER_ADDR", "PET_MASTER_PORT")[1]
    del pod["PET_MASTER_ADDR"]
    command = [part.replace(MOUNT_DIR, str(tmp_path / "etc-sftkit")) for part in job["spec"]["trainer"]["command"]]
    result = subprocess.run(command, env={**os.environ, **pod}, capture_output=True, text=True, timeout=120,
                            check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "sftkit: error: Kubeflow TrainJob: PET_NNODES=2 says 2 nodes, but no master address is set, so the nodes "
        "cannot meet and each would train alone: set PET_MASTER_ADDR (or MASTER_ADDR) to the address of node 0")
    assert "Traceback" not in result.stderr
    assert not output.exists()
