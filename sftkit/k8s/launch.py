"""``sftkit launch``: start this machine's share of a multi-node job with explicit ``accelerate launch`` flags.

A scheduler describes the job in its own variables, and accelerate reads none of them: inside a
Kubeflow pod a bare ``accelerate launch`` trains an independent world-size-1 job per pod that all
report success, and ``--multi_gpu`` alone joins through torch's ``PET_*`` defaults but ignores
``PET_MASTER_PORT``. So the variables are mapped here, by one pure function, onto every flag that
decides the world (machines, processes, this machine's rank, the rendezvous address and port), and
a launch whose variables say several nodes but lack one of these is refused, naming the variable.

Sources, first found wins: Kubeflow (``PET_*``; a v1 PyTorchJob also sets ``MASTER_ADDR``,
``MASTER_PORT``, ``RANK`` = the pod's node rank, ``WORLD_SIZE``), torchrun-style variables
(``NNODES``, ``NODE_RANK``/``GROUP_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``, ``NPROC_PER_NODE``),
SLURM (``SLURM_NNODES``, ``SLURM_NODEID``, the first host of ``SLURM_JOB_NODELIST``), else one machine.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import yaml

from sftkit.errors import SftkitError
from sftkit.redaction import redact

DEFAULT_MASTER_PORT = 29500  # torchrun's default
SLURM_PORT_BASE = 10000  # SLURM sets no port: one derived from the job id keeps two jobs on a node apart
SLURM_PORT_SPAN = 20000  # ports 10000-29999, below Linux's ephemeral range
KUBEFLOW_VARIABLES = ("PET_NNODES", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT", "PET_NPROC_PER_NODE")
TORCHRUN_VARIABLES = ("NNODES", "NODE_RANK", "GROUP_RANK")
SINGLE_PROCESS_TYPES = ("NO", "MULTI_CPU")  # accelerate starts one process with these, whatever the flags say


@dataclass(frozen=True)
class Rendezvous:
    """This machine's place in the job: everything accelerate needs to join the other machines."""

    scheduler: str
    nodes: int
    node_rank: int
    processes_per_node: int
    master_addr: str | None
    master_port: int | None
    processes_reason: str

    @property
    def processes(self) -> int:
        return self.nodes * self.processes_per_node

    def describe(self) -> str:
        where = f", rendezvous at {self.master_addr}:{self.master_port}" if self.nodes > 1 else ""
        return (f"{self.scheduler}: node {self.node_rank} of {self.nodes}, {self.processes_per_node} process(es) per "
                f"node ({self.processes_reason}), {self.processes} in all{where}")


def _whole(name: str, text: str, minimum: int, hint: str = "") -> int:
    if not text.strip().isdigit() or int(text) < minimum:
        raise SftkitError(f"{name}={text!r}: expected a whole number of at least {minimum}{hint}")
    return int(text)


def _whole_number(environ: Mapping[str, str], name: str, minimum: int, hint: str = "") -> int | None:
    return _whole(name, environ[name], minimum, hint) if name in environ else None


def _first_of(environ: Mapping[str, str], *names: str) -> tuple[str, str] | None:
    """The first of ``names`` that is set (and not empty), with its value."""
    for name in names:
        if environ.get(name):
            return name, environ[name]
    return None


def processes_per_node(setting: tuple[str, str] | None, visible_gpus: int, override: int | None) -> tuple[int, str]:
    """One process per GPU; a job's fixed count is honoured, and on a machine without GPUs runs as CPU processes."""
    if override is not None:
        return override, f"--nproc-per-node {override}"
    said = f"{setting[0]}={setting[1]}, " if setting else ""
    if setting is None or setting[1] in ("auto", "gpu"):
        if visible_gpus:
            return visible_gpus, f"{said}{visible_gpus} visible GPU(s)"
        return 1, f"{said}no GPU visible: a CPU process"
    name, value = setting
    if not value.isdigit() or int(value) < 1:
        raise SftkitError(f"{name}={value!r}: expected a whole number of processes per node, auto or gpu")
    count = int(value)
    if visible_gpus == 0:
        return count, f"{said}no GPU visible: CPU processes"
    if count > visible_gpus:
        raise SftkitError(
            f"{name}={count} asks for {count} processes on this node, but {visible_gpus} GPU(s) are visible: "
            f"give the pod {count} GPUs (nvidia.com/gpu) or lower {name}"
        )
    return count, f"{name}={count}"


def _joined(scheduler: str, *, nodes: int, nodes_name: str, rank: tuple[str, str] | None, rank_name: str,
            master: tuple[str, str] | None, master_name: str, port: int | None,
            processes: tuple[int, str]) -> Rendezvous:
    """Refuse what would train alone while the job waits for this node; otherwise the rendezvous."""
    if nodes > 1 and rank is None:
        raise SftkitError(
            f"{scheduler}: {nodes_name}={nodes} says {nodes} nodes, but {rank_name} is not set, so this node does not "
            f"know its rank and would train alone: set {rank_name} (0 on the master node, 1..{nodes - 1} on the others)"
        )
    if nodes > 1 and master is None:
        raise SftkitError(
            f"{scheduler}: {nodes_name}={nodes} says {nodes} nodes, but no master address is set, so the nodes cannot "
            f"meet and each would train alone: set {master_name} to the address of node 0"
        )
    node_rank = _whole(*rank, 0) if rank else 0
    if node_rank >= nodes:
        raise SftkitError(f"{rank[0]}={node_rank}, but {nodes_name}={nodes}: ranks go from 0 to {nodes - 1}")
    return Rendezvous(scheduler, nodes, node_rank, processes[0], master[1] if master else None, port, processes[1])


def _port(environ: Mapping[str, str], *names: str) -> int | None:
    for name in names:
        if environ.get(name):
            return _whole_number(environ, name, 1)
    return None


def _kubeflow(environ: Mapping[str, str], visible_gpus: int, override: int | None) -> Rendezvous:
    # Only the v1 operator sets WORLD_SIZE (and RANK, the pod's node rank) beside PET_*; the v2 runtime never does.
    scheduler = "Kubeflow PyTorchJob" if "WORLD_SIZE" in environ else "Kubeflow TrainJob"
    nodes = _whole_number(environ, "PET_NNODES", 1, " (elastic ranges such as 1:4 are not supported)")
    if nodes is None:
        raise SftkitError(f"{scheduler}: PET_* variables are set but PET_NNODES is not: set PET_NNODES to the number "
                          "of nodes")
    return _joined(
        scheduler, nodes=nodes, nodes_name="PET_NNODES",
        rank=_first_of(environ, "PET_NODE_RANK", "RANK"), rank_name="PET_NODE_RANK",
        master=_first_of(environ, "PET_MASTER_ADDR", "MASTER_ADDR"), master_name="PET_MASTER_ADDR (or MASTER_ADDR)",
        port=_port(environ, "PET_MASTER_PORT", "MASTER_PORT") or DEFAULT_MASTER_PORT,
        processes=processes_per_node(_first_of(environ, "PET_NPROC_PER_NODE"), visible_gpus, override),
    )


def _torchrun_style(environ: Mapping[str, str], visible_gpus: int, override: int | None) -> Rendezvous:
    scheduler = "torchrun-style variables"
    nodes = _whole_number(environ, "NNODES", 1)
    if nodes is None:
        raise SftkitError(f"{scheduler}: NODE_RANK or GROUP_RANK is set but NNODES is not: set NNODES to the number "
                          "of nodes")
    return _joined(
        scheduler, nodes=nodes, nodes_name="NNODES",
        rank=_first_of(environ, "NODE_RANK", "GROUP_RANK"), rank_name="NODE_RANK",
        master=_first_of(environ, "MASTER_ADDR"), master_name="MASTER_ADDR",
        port=_port(environ, "MASTER_PORT") or DEFAULT_MASTER_PORT,
        processes=processes_per_node(_first_of(environ, "NPROC_PER_NODE"), visible_gpus, override),
    )


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list (``node[01-04],gpu7`` -> ``node01``), in SLURM's own order."""
    try:
        import hostlist
    except ImportError:
        raise SftkitError("reading SLURM_JOB_NODELIST needs python-hostlist: pip install 'sftkit[k8s]'") from None
    try:
        hosts = hostlist.expand_hostlist(nodelist)
    except hostlist.BadHostlist as error:
        raise SftkitError(f"SLURM_JOB_NODELIST={nodelist!r} is not a SLURM host list: {error}") from None
    if not hosts:
        raise SftkitError(f"SLURM_JOB_NODELIST={nodelist!r} names no host")
    return hosts[0]


def _slurm(environ: Mapping[str, str], visible_gpus: int, override: int | None) -> Rendezvous:
    scheduler = "SLURM"
    nodes_name = "SLURM_NNODES" if "SLURM_NNODES" in environ else "SLURM_JOB_NUM_NODES"
    nodes = _whole_number(environ, nodes_name, 1)
    if nodes is None:
        raise SftkitError("SLURM: SLURM_JOB_ID is set but SLURM_NNODES is not: run sftkit launch inside the job "
                          "(sbatch, then srun)")
    tasks = _whole_number(environ, "SLURM_STEP_NUM_TASKS", 1)
    if tasks is not None and tasks != nodes:
        raise SftkitError(
            f"SLURM: this step runs {tasks} tasks on {nodes} node(s); sftkit launch starts every process of its node "
            "itself, so run it once per node: srun --ntasks-per-node=1 sftkit launch ..."
        )
    master = _first_of(environ, "MASTER_ADDR")
    listed = _first_of(environ, "SLURM_JOB_NODELIST", "SLURM_NODELIST")
    if master is None and listed is not None:
        master = (listed[0], first_slurm_host(listed[1]))
    derived_port = SLURM_PORT_BASE + _whole("SLURM_JOB_ID", environ["SLURM_JOB_ID"], 0) % SLURM_PORT_SPAN
    return _joined(
        scheduler, nodes=nodes, nodes_name=nodes_name,
        rank=_first_of(environ, "SLURM_NODEID"), rank_name="SLURM_NODEID",
        master=master, master_name="SLURM_JOB_NODELIST (or MASTER_ADDR)",
        port=_port(environ, "MASTER_PORT") or derived_port,
        processes=processes_per_node(_first_of(environ, "SLURM_GPUS_ON_NODE"), visible_gpus, override),
    )


def rendezvous_from_environment(environ: Mapping[str, str], visible_gpus: int,
                                override: int | None = None) -> Rendezvous:
    """Where this machine stands in the job, from its scheduler's variables. Pure: no I/O, no global state."""
    if any(name in environ for name in KUBEFLOW_VARIABLES):
        return _kubeflow(environ, visible_gpus, override)
    if any(name in environ for name in TORCHRUN_VARIABLES):
        return _torchrun_style(environ, visible_gpus, override)
    if "SLURM_JOB_ID" in environ:
        return _slurm(environ, visible_gpus, override)
    world = _whole_number(environ, "WORLD_SIZE", 1)
    if world is not None and world > 1:
        raise SftkitError(
            f"WORLD_SIZE={world} says several processes, but no variable says how many nodes there are and which one "
            "this is, so this machine would train alone: set PET_NNODES and PET_NODE_RANK (or NNODES and NODE_RANK) "
            "and a master address, or unset WORLD_SIZE to train on this machine only"
        )
    processes = processes_per_node(None, visible_gpus, override)
    return Rendezvous("one machine", 1, 0, processes[0], None, _port(environ, "MASTER_PORT"), processes[1])


def accelerate_arguments(rendezvous: Rendezvous, distributed_type: str | None) -> list[str]:
    """The ``accelerate launch`` flags that fix the world; ``distributed_type`` is the config file's (None: no file)."""
    if rendezvous.processes > 1 and distributed_type in SINGLE_PROCESS_TYPES:
        raise SftkitError(
            f"the accelerate config says distributed_type: {distributed_type}, which starts one process, but the job "
            f"runs {rendezvous.processes}: use a multi-GPU, DeepSpeed or FSDP config (configs/accelerate/)"
        )
    # Without a config, --multi_gpu starts torchrun; with one, the file's distributed_type decides (and adding
    # --multi_gpu would override a DeepSpeed or FSDP config).
    flags = ["--multi_gpu"] if distributed_type is None and rendezvous.processes > 1 else []
    flags += ["--num_machines", str(rendezvous.nodes), "--num_processes", str(rendezvous.processes),
              "--machine_rank", str(rendezvous.node_rank)]
    if rendezvous.nodes > 1:
        flags += ["--main_process_ip", rendezvous.master_addr]
    if rendezvous.master_port is not None:
        flags += ["--main_process_port", str(rendezvous.master_port)]
    if distributed_type == "DEEPSPEED":
        # accelerate's default multi-node launcher is pdsh, which needs ssh between the machines.
        flags += ["--deepspeed_multinode_launcher", "standard"]
    return flags


def launch_command(rendezvous: Rendezvous, accelerate_config: str | None, distributed_type: str | None,
                   sftkit_arguments: list[str]) -> list[str]:
    config = ["--config_file", accelerate_config] if accelerate_config else []
    # -q: a process that fails (or stops on a signal) has said why; the launcher's traceback would repeat it.
    return ["accelerate", "launch", *config, *accelerate_arguments(rendezvous, distributed_type),
            "-q", "-m", "sftkit", *sftkit_arguments]


def read_accelerate_config(file: Path) -> dict:
    try:
        config = yaml.safe_load(file.read_text())
    except yaml.YAMLError as error:
        raise SftkitError(f"--accelerate-config {file}: not valid YAML: {error}") from None
    if not isinstance(config, dict):
        raise SftkitError(f"--accelerate-config {file}: not an accelerate config (a YAML mapping)")
    return config


def read_distributed_type(accelerate_config: str | None) -> str | None:
    if accelerate_config is None:
        return None
    file = Path(accelerate_config)
    if not file.is_file():
        raise SftkitError(f"--accelerate-config {accelerate_config}: no such file")
    return str(read_accelerate_config(file).get("distributed_type", "NO"))


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count()


def hub_token_to_environment(recipe_overrides: list[str], environ: MutableMapping[str, str]) -> list[str]:
    """The recipe overrides without ``--hub_token``, whose value is moved to ``environ`` as HF_TOKEN, which sftkit and
    the Hub client read alike: the command is printed, and any user of the machine can read its arguments."""
    kept, index = [], 0
    while index < len(recipe_overrides):
        key, has_value, value = recipe_overrides[index].removeprefix("--").partition("=")
        if key.replace("-", "_") != "hub_token":
            kept.append(recipe_overrides[index])
        else:
            if not has_value and index + 1 < len(recipe_overrides) and not recipe_overrides[index + 1].startswith("--"):
                index += 1
                value = recipe_overrides[index]
            environ["HF_TOKEN"] = value
        index += 1
    return kept


def launch(recipe: str, accelerate_config: str | None, override: int | None, recipe_overrides: list[str]) -> NoReturn:
    """Map this machine's variables to accelerate's flags, print them and the command, and become the command."""
    if not Path(recipe).is_file():
        raise SftkitError(f"recipe {recipe}: no such file")
    rendezvous = rendezvous_from_environment(os.environ, visible_gpus(), override)
    command = launch_command(rendezvous, accelerate_config, read_distributed_type(accelerate_config),
                             ["--config", recipe, *hub_token_to_environment(recipe_overrides, os.environ)])
    print(f"sftkit: launch: {rendezvous.describe()}", file=sys.stderr)
    print(f"sftkit: launch: {redact(shlex.join(command))}", file=sys.stderr, flush=True)
    os.execvp(command[0], command)
