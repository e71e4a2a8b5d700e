"""What every pod reads from the job's ConfigMap: the recipe, the accelerate config and a DeepSpeed JSON.

The pods see none of the workstation's files, so a path the recipe or the accelerate config gives
(``deepspeed_config_file: configs/deepspeed/zero2.json``) is carried in the ConfigMap and rewritten
to where the ConfigMap is mounted. The recipe is checked here as ``sftkit check`` checks it, with
the batch geometry of the job's processes, and its ``output_dir`` must live on a mounted volume.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from sftkit.errors import SftkitError
from sftkit.k8s.launch import SINGLE_PROCESS_TYPES, read_accelerate_config
from sftkit.k8s.validation import VolumeSpec
from sftkit.recipe import CheckedRecipe, Decisions, batch_geometry, read_recipe, read_recipe_file, setting
from sftkit.redaction import is_secret, redacted

MOUNT_DIR = "/etc/sftkit"
RECIPE_FILE = "recipe.yaml"
ACCELERATE_FILE = "accelerate.yaml"
DEEPSPEED_FILE = "deepspeed.json"
CONFIGMAP_MAX_BYTES = 1024 * 1024  # the API server refuses a larger ConfigMap


def mounted_path(name: str) -> str:
    return f"{MOUNT_DIR}/{name}"


@dataclass
class Bundle:
    """The ConfigMap's files, and what rendering tells the user about them."""

    files: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    values: dict[str, Any] = field(default_factory=dict)  # the checked recipe the pods train


def check_recipe(path: str, nodes: int, gpus_per_node: int,
                 overrides: dict[str, Any] | None = None) -> tuple[CheckedRecipe, list[str]]:
    """Read and check the recipe with the command line's keys on top (every key, value and combination), and derive
    its global batch for nodes x gpus_per_node processes. Only the pure part of loading runs: the workstation that
    renders the job is not the machine that trains, so its hardware, launcher and environment decide nothing here."""
    recipe = read_recipe(path, overrides)
    refuse_secrets(path, recipe)
    batch = batch_geometry(recipe.values, nodes * gpus_per_node, Decisions(recipe.path))
    described = batch.derivation() or (
        f"{batch.rows_per_step} rows per optimizer step on {batch.processes} process(es) (per_device_train_batch_size "
        "x gradient_accumulation_steps x processes); set global_batch_size to make the same steps on any number of "
        "GPUs")
    return recipe, [f"recipe {path}: checked for {nodes} node(s) x {gpus_per_node} GPU(s); {described}"]


def refuse_secrets(path: str, recipe: CheckedRecipe) -> None:
    """The ConfigMap is plain text for anyone who can read the job: a secret in the recipe (an env: variable whose
    name or value is one, hub_token, a URL with credentials) is refused, naming the Secret form that carries it."""
    variables = sorted(name for name, value in recipe.environment.items() if is_secret(name, value))
    keys = sorted(key for key, value in recipe.values.items() if redacted({key: value}) != {key: value})
    if not variables and not keys:
        return
    # hub_token reaches the Hub client as the pods' HF_TOKEN; a URL's credentials as a variable of the user's naming.
    names = variables + (["HF_TOKEN"] if "hub_token" in keys else []) or ["NAME"]
    raise SftkitError(
        f"recipe {path}: {', '.join([*(f'env: {name}' for name in variables), *keys])} would be stored in plain "
        "text in the job's ConfigMap, which anyone who can read the job can read: remove the secret from the recipe "
        "(and the command line), keep it in a Kubernetes Secret and give it to the pods as a variable with "
        f"{' '.join(f'--env-from-secret {name}=SECRET' for name in names)}"
    )


def check_output_dir(output_dir: str, volumes: list[VolumeSpec], allow_ephemeral: bool) -> str:
    """Where the model lands; an error when it would be written inside the container and vanish with the pod."""
    path = PurePosixPath(output_dir)
    for volume in volumes:
        if path.is_absolute() and path.is_relative_to(volume.mount):
            return f"output_dir {output_dir} is on the volume claim {volume.claim} (mounted at {volume.mount})"
    if allow_ephemeral:
        return (f"output_dir {output_dir} is inside the container: the model vanishes with the pod "
                "(--allow-ephemeral-output)")
    where = "is on no mounted volume" if path.is_absolute() else "is relative, so inside the container"
    mount = output_dir if path.is_absolute() else "/data"
    raise SftkitError(
        f"output_dir {output_dir} {where}: the model would vanish with the pod. Mount a persistent volume claim where "
        f"it should land (--volume CLAIM:{mount}) and set output_dir under it in the recipe"
        f"{'' if path.is_absolute() else ' (an absolute path)'}, or pass --allow-ephemeral-output to render it anyway"
    )


LOCAL_PATH_KEYS = ("model_name_or_path", "dataset_name", "resume_from_checkpoint")


def unreachable_paths(values: dict[str, Any], volumes: list[VolumeSpec]) -> list[str]:
    """Absolute paths the recipe reads that no volume provides: the image must contain them."""
    paths = [(key, values.get(key)) for key in LOCAL_PATH_KEYS]
    paths += [(f"datasets[{index}].path", entry.get("path")) for index, entry in enumerate(values.get("datasets", []))]
    return [f"{key} {value} is on no mounted volume: the image must contain it" for key, value in paths
            if isinstance(value, str) and value.startswith("/")
            and not any(PurePosixPath(value).is_relative_to(volume.mount) for volume in volumes)]


def _read_json(path: str, what: str) -> str:
    file = Path(path)
    if not file.is_file():
        raise SftkitError(f"{what} {path} does not exist (paths are relative to where you run sftkit k8s render)")
    text = file.read_text()
    try:
        json.loads(text)
    except json.JSONDecodeError as error:
        raise SftkitError(f"{what} {path} is not valid JSON: {error}") from None
    return text


RESUME = {"resume_from_checkpoint": "auto"}


def resume_on_restart(path: str, overrides: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """A restarted pod must go on from the latest checkpoint in output_dir, not start over: the recipe gets
    resume_from_checkpoint: auto (a fresh start when there is none) unless it chooses for itself."""
    chosen = {**read_recipe_file(path), **overrides}.get("resume_from_checkpoint", RESUME)
    if chosen is RESUME:
        note = ("resume_from_checkpoint: auto written into the recipe, so that a restarted pod goes on from the latest "
                "checkpoint in output_dir")
        return RESUME, [note]
    if chosen != "auto":
        why = ("the first run, with no checkpoint yet, fails" if chosen is True
               else "a restarted pod does not go on from the latest checkpoint")
        note = (f"warning: resume_from_checkpoint: {chosen} in the recipe: {why}; resume_from_checkpoint: auto goes on "
                "from the latest and starts fresh when there is none")
        return {}, [note]
    return {}, []


def recipe_file(path: str, recipe: CheckedRecipe, overrides: dict[str, Any], added: dict[str, Any],
                bundle: Bundle) -> None:
    """The recipe as written, with the command line's keys and render's own (added) written in (the pods train
    what was checked); a DeepSpeed JSON it names by path travels beside it."""
    deepspeed = recipe.values.get("deepspeed")
    if not isinstance(deepspeed, str) and not overrides and not added:
        bundle.files[RECIPE_FILE] = Path(path).read_text()
        return
    values = read_recipe_file(path)
    values.update({key: recipe.values[key] for key in {**overrides, **added}})
    changes = [f"{' '.join(f'--{key}' for key in overrides)} from the command line"] if overrides else []
    changes += [f"{key}: {value} for restarts" for key, value in added.items()]
    if isinstance(deepspeed, str):
        bundle.files[DEEPSPEED_FILE] = _read_json(deepspeed, f"recipe {path}: deepspeed")
        values["deepspeed"] = mounted_path(DEEPSPEED_FILE)
        changes.append(f"deepspeed: {deepspeed} carried in the ConfigMap as {DEEPSPEED_FILE}")
        bundle.notes.append(f"recipe deepspeed: {deepspeed} carried as {mounted_path(DEEPSPEED_FILE)}")
    header = f"# {path}, with {' and '.join(changes)}\n"
    bundle.files[RECIPE_FILE] = header + yaml.safe_dump(values, sort_keys=False)


def default_accelerate_config(nodes: int, gpus_per_node: int) -> dict[str, Any]:
    """configs/accelerate/multi_gpu.yaml for this job; the launcher fills in each node's rank and rendezvous."""
    return {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": "MULTI_GPU" if nodes * gpus_per_node > 1 else "NO",
        "num_machines": nodes,
        "num_processes": nodes * gpus_per_node,
        "machine_rank": 0,
        "gpu_ids": "all",
        "rdzv_backend": "static",
        "same_network": True,
        "use_cpu": False,
        "debug": False,
    }


def accelerate_file(config_path: str | None, nodes: int, gpus_per_node: int, recipe: CheckedRecipe, bundle: Bundle) -> None:
    """The user's accelerate config (or a DDP one) sized for the job, with DeepSpeed's files carried along."""
    processes = nodes * gpus_per_node
    if config_path is None:
        config, origin = default_accelerate_config(nodes, gpus_per_node), "sftkit's default, DDP over every GPU"
    else:
        file = Path(config_path)
        if not file.is_file():
            raise SftkitError(f"--accelerate-config {config_path}: no such file")
        config, origin = read_accelerate_config(file), config_path
    distributed_type = config.get("distributed_type", "NO")
    if processes > 1 and distributed_type in SINGLE_PROCESS_TYPES:
        raise SftkitError(
            f"--accelerate-config {config_path} says distributed_type: {distributed_type}, which starts one process, "
            f"but the job runs {processes}: use a multi-GPU, DeepSpeed or FSDP config (configs/accelerate/)"
        )
    # The launcher passes every pod's rank and rendezvous address; the file only sizes the job.
    config.update(num_machines=nodes, num_processes=processes, machine_rank=0)
    config.pop("main_process_ip", None)
    if distributed_type == "DEEPSPEED":
        deepspeed = dict(config.get("deepspeed_config") or {})
        # accelerate's default multi-node launcher is pdsh, which logs into the other machines over ssh.
        deepspeed["deepspeed_multinode_launcher"] = "standard"
        json_path = deepspeed.get("deepspeed_config_file")
        if json_path not in (None, "", "none"):
            if isinstance(recipe.values.get("deepspeed"), str):
                raise SftkitError(
                    f"both the recipe (deepspeed: {recipe.values['deepspeed']}) and --accelerate-config {config_path} "
                    f"(deepspeed_config_file: {json_path}) name a DeepSpeed config; keep one of them"
                )
            what = f"--accelerate-config {config_path}: deepspeed_config_file"
            bundle.files[DEEPSPEED_FILE] = _read_json(json_path, what)
            deepspeed["deepspeed_config_file"] = mounted_path(DEEPSPEED_FILE)
            bundle.notes.append(f"deepspeed_config_file {json_path} carried as {mounted_path(DEEPSPEED_FILE)}")
        config["deepspeed_config"] = deepspeed
    header = f"# accelerate config for {nodes} node(s) x {gpus_per_node} GPU(s), from {origin}\n"
    bundle.files[ACCELERATE_FILE] = header + yaml.safe_dump(config, sort_keys=False)
    bundle.notes.append(f"accelerate config: {distributed_type}, from {origin}")


def build_bundle(recipe_path: str, accelerate_config: str | None, nodes: int, gpus_per_node: int,
                 volumes: list[VolumeSpec], allow_ephemeral_output: bool,
                 overrides: dict[str, Any] | None = None) -> Bundle:
    """Check the recipe, with the command line's keys and resume_from_checkpoint: auto, for this job and gather the
    files its pods read."""
    overrides = overrides or {}
    added, resume_notes = resume_on_restart(recipe_path, overrides)
    recipe, notes = check_recipe(recipe_path, nodes, gpus_per_node, {**overrides, **added})
    bundle = Bundle(notes=notes + resume_notes, values=recipe.values)
    output_dir = setting(recipe.values, "output_dir") or "trainer_output"
    bundle.notes.append(check_output_dir(output_dir, volumes, allow_ephemeral_output))
    bundle.notes += unreachable_paths(recipe.values, volumes)
    recipe_file(recipe_path, recipe, overrides, added, bundle)
    accelerate_file(accelerate_config, nodes, gpus_per_node, recipe, bundle)
    size = sum(len(text.encode()) for text in bundle.files.values())
    if size > CONFIGMAP_MAX_BYTES:
        raise SftkitError(
            f"the recipe and configs take {size:,} bytes; a ConfigMap holds at most {CONFIGMAP_MAX_BYTES:,}")
    return bundle
