"""Recipes are strict: every key, type and combination is checked before anything loads."""

from __future__ import annotations

import os

import pytest
import yaml

from sftkit.cli import build_parser
from sftkit.errors import SftkitError
from sftkit.recipe import BatchGeometry, Decisions, batch_geometry
from sftkit.setup.resolve import load_recipe
from sftkit.values import parse_overrides

WALKTHROUGH = """\
model_name_or_path: Qwen/Qwen2.5-0.5B
dataset_name: BAAI/Infinity-Instruct
dataset_config: '0625'
do_train: true
per_device_train_batch_size: 4
output_dir: /tmp/my-first-sft-exp
max_steps: 10
logging_steps: 1
"""


@pytest.fixture
def walkthrough(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(WALKTHROUGH)
    return path


def recipe_with(tmp_path, text: str):
    path = tmp_path / "recipe.yaml"
    path.write_text(WALKTHROUGH + text)
    return path


def test_walkthrough_recipe_is_accepted_unchanged(walkthrough):
    recipe = load_recipe(str(walkthrough))
    assert recipe.script.dataset_config == "0625"
    assert recipe.training.do_train is True
    assert recipe.training.per_device_train_batch_size == 4
    assert recipe.training.max_steps == 10
    assert recipe.model.model_name_or_path == "Qwen/Qwen2.5-0.5B"
    assert recipe.sftkit.dataset_format == "auto"


def test_misspelled_key_names_key_file_and_closest(tmp_path):
    path = recipe_with(tmp_path, "per_device_train_batchsize: 8\n")
    with pytest.raises(SftkitError) as error:
        load_recipe(str(path))
    message = str(error.value)
    assert "per_device_train_batchsize" in message
    assert str(path) in message
    assert "did you mean per_device_train_batch_size?" in message


def test_wrong_type_names_key_and_expected_type(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(WALKTHROUGH.replace("max_steps: 10", "max_steps: ten"))
    with pytest.raises(SftkitError, match="max_steps must be integer, got 'ten'"):
        load_recipe(str(path))


def test_unquoted_config_name_is_a_type_error_with_a_hint(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(WALKTHROUGH.replace("'0625'", "0625"))
    with pytest.raises(SftkitError, match="dataset_config must be string or null.*quote it"):
        load_recipe(str(path))


def test_yaml_float_without_dot_is_accepted(tmp_path):
    recipe = load_recipe(str(recipe_with(tmp_path, "learning_rate: 2e-5\n")))
    assert recipe.training.learning_rate == pytest.approx(2e-5)


def test_both_config_spellings_and_overrides_win(walkthrough):
    for arguments in (["--config", str(walkthrough)], [f"--config={walkthrough}"]):
        options, rest = build_parser().parse_known_args(["train", *arguments, "--max_steps", "3", "--packing",
                                                         "--dataset_config=0625"])
        recipe = load_recipe(options.config, parse_overrides(rest))
        assert recipe.training.max_steps == 3
        assert recipe.training.packing is True
        assert recipe.script.dataset_config == "0625"  # text stays text on the command line


def test_command_line_typo_is_caught_too(walkthrough):
    overrides = parse_overrides(["--learning_rat", "1e-4"])
    with pytest.raises(SftkitError, match="did you mean learning_rate"):
        load_recipe(str(walkthrough), overrides)


def test_env_sets_environment_variables(tmp_path):
    load_recipe(str(recipe_with(tmp_path, "env:\n  SFTKIT_TEST_VARIABLE: 42\n")))
    assert os.environ["SFTKIT_TEST_VARIABLE"] == "42"


@pytest.mark.parametrize(
    "text, message",
    [
        ("lora_r: 8\n", "only take effect with use_peft"),
        ("global_batch_size: 8\ngradient_accumulation_steps: 2\n", "both set"),
        ("bf16: true\nfp16: true\n", "choose one"),
        ("packing_strategy: bfd\n", "packing is not enabled"),
        ("eval_packing: true\n", "attend to each other.*Add packing: true, or remove eval_packing"),
        ("test_split_size: 1.5\n", "test_split_size must be"),
        ("datasets:\n  - path: x.json\n", "use one of them"),
    ],
)
def test_keys_that_go_together(tmp_path, text, message):
    with pytest.raises(SftkitError, match=message):
        load_recipe(str(recipe_with(tmp_path, text)))


def test_mixture_entries_are_strict(tmp_path):
    path = tmp_path / "recipe.yaml"
    text = WALKTHROUGH.replace("dataset_name: BAAI/Infinity-Instruct\ndataset_config: '0625'\n", "")
    path.write_text(text + "datasets:\n  - path: data.json\n    spilt: train\n")
    with pytest.raises(SftkitError, match=r"datasets\[0\] has unknown key 'spilt'; did you mean split"):
        load_recipe(str(path))


def test_missing_optional_package_is_a_clear_error(tmp_path):
    pytest.importorskip("peft")
    assert load_recipe(str(recipe_with(tmp_path, "use_peft: true\nlora_r: 8\n"))).model.lora_r == 8
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        with pytest.raises(SftkitError, match="load_in_4bit: true needs the bitsandbytes package"):
            load_recipe(str(recipe_with(tmp_path, "load_in_4bit: true\n")))


def test_global_batch_size_derives_accumulation(tmp_path):
    recipe = load_recipe(str(recipe_with(tmp_path, "global_batch_size: 32\n")))
    assert recipe.training.gradient_accumulation_steps == 8
    assert recipe.values["gradient_accumulation_steps"] == 8
    assert recipe.batch == BatchGeometry(per_device=4, accumulation=8, processes=1, global_batch=32)
    assert any(note == "global_batch_size 32 = 4 per device x 1 process(es) x 8 accumulation step(s)"
               for note in recipe.notes)
    values, decisions = {"global_batch_size": 32, "per_device_train_batch_size": 4}, Decisions("r.yaml")
    assert batch_geometry(values, processes=2, decisions=decisions).accumulation == 4
    assert batch_geometry(values, processes=8, decisions=decisions).rows_per_step == 32


def test_indivisible_global_batch_proposes_valid_values():
    with pytest.raises(SftkitError) as error:
        batch_geometry({"global_batch_size": 30, "per_device_train_batch_size": 4}, 2, Decisions("r.yaml"))
    message = str(error.value)
    assert "global_batch_size: 24 or 32" in message
    assert "per_device_train_batch_size one of [1, 3, 5, 15]" in message


def test_precision_defaults_to_fp32_on_cpu_and_ignores_the_launcher(walkthrough, monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    recipe = load_recipe(str(walkthrough))
    assert (recipe.training.bf16, recipe.training.fp16) == (False, False)
    assert os.environ["ACCELERATE_MIXED_PRECISION"] == "no"
    assert any("launcher asked for mixed_precision=fp16" in note for note in recipe.notes)
    assert any(note.startswith("precision: fp32") for note in recipe.notes)


def test_bad_yaml_and_missing_file_name_the_file(tmp_path):
    with pytest.raises(SftkitError, match="no such file"):
        load_recipe(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_steps: [1,\n")
    with pytest.raises(SftkitError, match=f"recipe {bad}: not valid YAML"):
        load_recipe(str(bad))


def test_recipe_values_record_overrides_and_derived_values(walkthrough):
    overrides = parse_overrides(["--global_batch_size", "8"])
    recipe = load_recipe(str(walkthrough), overrides)
    assert yaml.safe_load(yaml.safe_dump(recipe.values))["gradient_accumulation_steps"] == 2


def test_explicit_precision_wins_or_is_rejected(tmp_path, monkeypatch):
    recipe = load_recipe(str(recipe_with(tmp_path, "bf16: true\n")))  # CPU autocast supports bf16
    assert recipe.training.bf16 is True and not any("launcher" in note for note in recipe.notes)
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(SftkitError, match="fp16: true needs a CUDA GPU"):
            load_recipe(str(recipe_with(tmp_path, "fp16: true\n")))


# Every TRL key a recipe may set, and where sftkit honours it. A key TRL adds in a new version fails this test until
# it is implemented or rejected with why (sftkit.recipe.REJECTED_KEYS).
HONOURED = {
    # ScriptArguments and DatasetMixtureConfig: the data sftkit loads
    "dataset_name", "dataset_config", "dataset_train_split", "dataset_test_split", "datasets", "test_split_size",
    "dataset_streaming", "streaming",
    # SFTConfig's own keys: sftkit prepares the rows with them, or TRL's trainer and collator use them
    "model_init_kwargs", "trust_remote_code", "router_aux_loss_coef", "chat_template_path", "dataset_num_proc",
    "eos_token", "max_length", "truncation_mode", "packing", "packing_strategy", "padding_free",
    "pad_to_multiple_of", "eval_packing", "completion_only_loss", "assistant_only_loss", "loss_type",
    "activation_offloading", "pad_token",
    # ModelConfig: how the model is loaded and adapted
    "model_name_or_path", "model_revision", "dtype", "attn_implementation", "use_peft", "lora_r", "lora_alpha",
    "lora_dropout", "lora_target_modules", "lora_target_parameters", "lora_modules_to_save", "lora_task_type",
    "use_rslora", "use_dora", "load_in_8bit", "load_in_4bit", "bnb_4bit_quant_type", "use_bnb_nested_quant",
    "bnb_4bit_quant_storage",
}


def test_a_value_of_the_wrong_shape_for_a_choice_is_a_clear_error(tmp_path):
    """Found by test_properties: a list where one of several names is expected once escaped as a TypeError."""
    with pytest.raises(SftkitError, match="lr_scheduler_type must be one of 'linear', "):
        load_recipe(str(recipe_with(tmp_path, "lr_scheduler_type: []\n")))


def test_every_trl_key_is_honoured_or_rejected_with_why():
    import dataclasses

    from transformers import TrainingArguments
    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, SFTConfig

    from sftkit.recipe import REJECTED_KEYS

    trainer_keys = {f.name for f in dataclasses.fields(TrainingArguments)}  # the Trainer honours its own
    trl_keys = {f.name for cls in (ScriptArguments, SFTConfig, ModelConfig, DatasetMixtureConfig)
                for f in dataclasses.fields(cls) if f.init} - trainer_keys
    assert trl_keys == HONOURED | (set(REJECTED_KEYS) - trainer_keys), "classify the new or removed keys"
    assert not HONOURED & set(REJECTED_KEYS)


@pytest.mark.parametrize("key, value, says", [
    ("dataset_text_field", "body", "dataset_format: text and dataset_options: {text_column: NAME}"),
    ("dataset_kwargs", "{skip_prepare_dataset: true}", "prepares the data itself"),
    ("ignore_bias_buffers", "true", "DPO"),
    ("shuffle_dataset", "true", "always trains in a seeded random order"),
    ("train_sampling_strategy", "group_by_length", "decides the training order itself"),
])
def test_keys_sftkit_does_not_honour_are_errors_that_say_why(tmp_path, key, value, says):
    with pytest.raises(SftkitError, match=f"{key}: .*{says}"):
        load_recipe(str(recipe_with(tmp_path, f"{key}: {value}\n")))


@pytest.mark.parametrize("text, says", [
    ("do_train: false\n", "always trains; run sftkit check"),
    ("do_predict: true\n", "does not run predictions"),
])
def test_run_switches_sftkit_does_not_follow_are_errors(tmp_path, text, says):
    with pytest.raises(SftkitError, match=says):
        load_recipe(str(recipe_with(tmp_path, text)))


def test_resume_true_is_the_latest_checkpoint_and_a_wrong_path_is_caught_before_any_data_work(tmp_path):
    output = tmp_path / "run"
    text = f"output_dir: {output}\nresume_from_checkpoint: true\n"
    with pytest.raises(SftkitError, match="holds no checkpoint-N folder to resume from; use auto"):
        load_recipe(str(recipe_with(tmp_path, text.replace("output_dir: /tmp/my-first-sft-exp\n", ""))))
    for step in (5, 10):
        (output / f"checkpoint-{step}").mkdir(parents=True)
        (output / f"checkpoint-{step}" / "trainer_state.json").write_text('{"global_step": 1, "max_steps": 1000}')
    recipe = load_recipe(str(tmp_path / "recipe.yaml"), {"output_dir": str(output), "resume_from_checkpoint": True})
    assert recipe.training.resume_from_checkpoint == str(output / "checkpoint-10")
    with pytest.raises(SftkitError, match="resume_from_checkpoint '/no/such/checkpoint' is not a checkpoint"):
        load_recipe(str(tmp_path / "recipe.yaml"), {"resume_from_checkpoint": "/no/such/checkpoint"})


def test_env_read_at_import_is_refused_when_it_comes_too_late(tmp_path):
    import huggingface_hub  # noqa: F401 - what the recipe's env: would come after

    with pytest.raises(SftkitError, match="env: HF_HUB_OFFLINE is read by huggingface_hub when it is imported"):
        load_recipe(str(recipe_with(tmp_path, "env:\n  HF_HUB_OFFLINE: 'maybe'\n")))


@pytest.mark.slow
def test_the_command_applies_env_before_the_libraries_read_it(tmp_path):
    """HF_HUB_OFFLINE set by the recipe reaches the Hub client: a Hub dataset fails at once as offline."""
    import subprocess
    import sys

    path = tmp_path / "recipe.yaml"
    path.write_text("model_name_or_path: embedded:tiny-qwen2\ndataset_name: nobody/no-such-dataset\n"
                    f"output_dir: {tmp_path / 'out'}\nenv:\n  HF_HUB_OFFLINE: '1'\n")
    env = {key: value for key, value in os.environ.items() if key != "HF_HUB_OFFLINE"}
    result = subprocess.run([sys.executable, "-m", "sftkit", "check", "--config", str(path)], capture_output=True,
                            text=True, timeout=300, check=False, env=env)
    assert result.returncode == 1
    assert "could not load it from the Hugging Face Hub" in result.stderr and "ffline" in result.stderr


def test_several_gpus_without_a_launcher_stop_with_the_command_to_use(tmp_path, monkeypatch):
    """Several GPUs cannot be had on this machine: the hardware probe is made to report four."""
    import sftkit.setup.resolve

    monkeypatch.setattr(sftkit.setup.resolve, "gpu_count", lambda: 4)
    monkeypatch.setattr(sftkit.setup.resolve, "has_accelerator", lambda: True)
    monkeypatch.setattr(sftkit.setup.resolve, "bf16_supported", lambda: False)
    with pytest.raises(SftkitError, match="(?s)4 GPUs and no launcher.*accelerate launch --multi_gpu --num_processes 4"):
        load_recipe(str(recipe_with(tmp_path, "")))
    monkeypatch.setenv("WORLD_SIZE", "4")
    load_recipe(str(recipe_with(tmp_path, "")))  # under a launcher: fine


def test_reading_a_recipe_touches_nothing(tmp_path, monkeypatch):
    """No environment variable set, no hardware probed, no file written: only resolving the recipe does that."""
    import sftkit.setup.resolve
    from sftkit.recipe import read_recipe

    def probed():
        raise AssertionError("reading a recipe probed the hardware")

    for probe in ("gpu_count", "gpu_memory", "has_accelerator", "bf16_supported"):
        monkeypatch.setattr(sftkit.setup.resolve, probe, probed)
    before, files = dict(os.environ), set(tmp_path.rglob("*"))
    path = recipe_with(tmp_path, "env:\n  SFTKIT_TEST_UNSET: 1\nglobal_batch_size: 8\nresume_from_checkpoint: true\n")
    files.add(path)
    checked = read_recipe(str(path), {"max_steps": 3})
    assert dict(os.environ) == before and set(tmp_path.rglob("*")) == files
    assert checked.environment == {"SFTKIT_TEST_UNSET": "1"} and checked.values["max_steps"] == 3
    assert "gradient_accumulation_steps" not in checked.values  # derived when resolved, for the launcher's processes


@pytest.mark.parametrize("text, says", [
    ("env:\n  HF_HOME: \"/data/hf\\0cache\"\n", "env: HF_HOME holds a NUL byte, which no environment variable can"),
    ("env:\n  A=B: 1\n", "env: 'A=B' is not a variable name"),
    ("env:\n  '': 1\n", "env: '' is not a variable name"),
    ("env:\n  HF_HOME:\n", "env: HF_HOME must be text or a number, got None"),
    ("env:\n  HF_HOME: [a, b]\n", "env: HF_HOME must be text or a number, got \\['a', 'b'\\]"),
])
def test_env_entries_the_environment_cannot_hold_are_refused_before_any_is_set(tmp_path, text, says):
    before = dict(os.environ)
    with pytest.raises(SftkitError, match=f"^recipe {tmp_path / 'recipe.yaml'}: {says}"):
        load_recipe(str(recipe_with(tmp_path, "env:\n  SFTKIT_TEST_FIRST: 1\n" + text.removeprefix("env:\n"))))
    assert dict(os.environ) == before


def test_a_recipe_that_is_not_utf8_names_the_byte_and_what_to_do(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_bytes(WALKTHROUGH.encode() + "output_dir: /tmp/café\n".encode("latin-1"))
    position = len(WALKTHROUGH.encode()) + len("output_dir: /tmp/caf")
    with pytest.raises(SftkitError, match=f"^recipe {path} is not UTF-8 text \\(byte 0xe9 at position {position}\\): "
                                          "save it as UTF-8$"):
        load_recipe(str(path))


def alias_bomb(levels: int = 9) -> str:
    """The billion laughs in a recipe's env: 9 lists of 9 aliases of the list before: 9**9 values, under 700 bytes."""
    lines = ["env:", "  L0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"  L{level}: &l{level} [{', '.join([f'*l{level - 1}'] * 9)}]" for level in range(1, levels)]
    return "\n".join(lines) + "\n"


def test_a_yaml_alias_bomb_is_refused_without_being_built(tmp_path):
    import time

    path = recipe_with(tmp_path, alias_bomb())
    assert path.stat().st_size - len(WALKTHROUGH) < 700
    started = time.monotonic()
    with pytest.raises(SftkitError, match=f"^recipe {path}: its YAML holds 490,329,0[0-9]{{2}} values once each alias "
                                          r"\(\*name\) is counted where it is used, more than the 100,000"):
        load_recipe(str(path))
    assert time.monotonic() - started < 5


def test_aliases_within_bounds_still_work(tmp_path):
    """Anchors, aliases and merge keys are YAML a recipe may use; only their expansion is bounded."""
    text = "dataset_options: &options {role_map: {bot: assistant}}\ndatasets_note: *options\n"
    with pytest.raises(SftkitError, match="unknown key 'datasets_note'"):  # read, expanded, then checked as usual
        load_recipe(str(recipe_with(tmp_path, text)))
    recipe = load_recipe(str(recipe_with(tmp_path, "env:\n  A: &value '1'\n  B: *value\n")))
    assert (os.environ["A"], os.environ["B"]) == ("1", "1") and recipe.values["max_steps"] == 10


@pytest.mark.parametrize("text, says", [
    ("env:\n  LOOP: &loop [1, *loop]\n", "the YAML value at line 10 holds an alias of itself"),
    ("lora_target_modules: " + "[" * 5000 + "]" * 5000 + "\n", "its YAML nests deeper than a recipe can"),
    ("# " + "x" * 256 * 1024 + "\n", "is larger than 262,144 bytes, too large for a recipe"),
], ids=["alias-of-itself", "nested", "large"])
def test_recipes_beyond_what_a_recipe_can_be_are_refused_in_one_line(tmp_path, text, says):
    with pytest.raises(SftkitError, match=says) as error:
        load_recipe(str(recipe_with(tmp_path, text)))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("arguments, says", [
    (["--max_step", "5"], "^command line: unknown key 'max_step'; did you mean max_steps\\?$"),
    (["--max_steps", "ten"], "^command line: max_steps must be integer, got ten$"),
    (["--shuffle_dataset"], "^command line: shuffle_dataset: sftkit always trains"),
    (["--lora_r", "8"], "^recipe {path} with --lora_r from the command line: lora_r only take effect with use_peft"),
])
def test_a_key_on_the_command_line_is_blamed_on_the_command_line(walkthrough, arguments, says):
    with pytest.raises(SftkitError, match=says.format(path=walkthrough)):
        load_recipe(str(walkthrough), parse_overrides(arguments))


def test_a_key_in_the_file_is_blamed_on_the_file_even_with_overrides(tmp_path):
    path = recipe_with(tmp_path, "max_step: 5\n")
    with pytest.raises(SftkitError, match=f"^recipe {path}: unknown key 'max_step'"):
        load_recipe(str(path), parse_overrides(["--seed", "3"]))


def recipe_commands(parser) -> dict[str, object]:
    """Every command (k8s render as 'k8s render') whose parser takes --config: each reads a recipe."""
    import argparse

    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, subparser in action.choices.items():
                if "--config" in subparser._option_string_actions:
                    found[name] = subparser
                found.update({f"{name} {inner}": command for inner, command in recipe_commands(subparser).items()})
    return found


def test_every_command_that_reads_a_recipe_takes_recipe_keys_on_the_command_line():
    parser = build_parser()
    commands = recipe_commands(parser)
    assert {"train", "check", "launch", "k8s render"} <= set(commands)
    required = {"k8s render": ["--nodes", "1", "--gpus-per-node", "1", "--image", "sftkit:1"]}
    for command in commands:
        options, rest = parser.parse_known_args([*command.split(), "--config", "r.yaml", *required.get(command, []),
                                                 "--max_steps", "3", "--learning-rate=1e-4", "--packing"])
        assert getattr(options, "takes_recipe_keys", False), f"sftkit {command} refuses recipe keys"
        assert parse_overrides(rest) == {"max_steps": "3", "learning_rate": "1e-4", "packing": "true"}, command


def test_k8s_render_checks_the_overrides_and_writes_them_into_the_configmaps_recipe(tmp_path, capsys):
    from sftkit.cli import main

    path = tmp_path / "run.yaml"
    path.write_text("model_name_or_path: embedded:tiny-qwen2\ndataset_name: embedded:infinity-instruct-sample\n"
                    "output_dir: /data/run\nmax_steps: 10\n")
    render = ["k8s", "render", "--config", str(path), "--nodes", "1", "--gpus-per-node", "2", "--image", "sftkit:1",
              "--volume", "data:/data", "-o", str(tmp_path / "job.yaml")]
    assert main([*render, "--max_step", "5"]) == 2
    assert "command line: unknown key 'max_step'; did you mean max_steps?" in capsys.readouterr().err
    assert main([*render, "--max_steps", "5", "--learning_rate", "1e-4"]) == 0
    configmap = next(document for document in yaml.safe_load_all((tmp_path / "job.yaml").read_text())
                     if document["kind"] == "ConfigMap")
    rendered = configmap["data"]["recipe.yaml"]
    assert rendered.startswith(f"# {path}, with --max_steps --learning_rate from the command line and "
                               "resume_from_checkpoint: auto for restarts\n")
    assert yaml.safe_load(rendered) == {**yaml.safe_load(path.read_text()), "max_steps": 5, "learning_rate": 1e-4,
                                        "resume_from_checkpoint": "auto"}  # a restarted pod goes on from its checkpoint
