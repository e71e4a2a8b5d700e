"""End to end, as a user runs it: `accelerate launch -m sftkit --config ...` on the CPU with the embedded assets."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import ROOT, RecordingStream, python_without, sharegpt_row, write_jsonl

QUICKSTART = ROOT / "configs" / "recipes" / "quickstart.yaml"
SAMPLE_DATA = ROOT / "sftkit" / "embedded" / "infinity-instruct-sample" / "train.jsonl"


def run(*arguments: str, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(arguments, cwd=cwd, capture_output=True, text=True, timeout=600, check=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    output = tmp_path_factory.mktemp("quickstart")
    result = run(
        "accelerate", "launch", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "-m", "sftkit", "--config", str(QUICKSTART),
        "--output_dir", str(output), "--max_steps", "60", "--eval_steps", "30",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return output, result


def test_run_writes_a_loadable_model_that_stops_at_end_of_turn(trained):
    output, _ = trained
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(output)
    tokenizer = AutoTokenizer.from_pretrained(output)
    assert (output / "model.safetensors").is_file()
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in model.generation_config.eos_token_id


def test_loss_falls_on_train_and_held_out_rows(trained):
    output, result = trained
    history = json.loads((output / "trainer_state.json").read_text())["log_history"]
    losses = [entry["loss"] for entry in history if "loss" in entry]
    eval_losses = [entry["eval_loss"] for entry in history if "eval_loss" in entry]
    assert len(eval_losses) >= 2
    assert losses[-1] < losses[0] / 2
    assert eval_losses[-1] < eval_losses[0] / 2
    assert "sftkit: training finished" in result.stdout
    assert "held-out loss" in result.stdout and "trained of" in result.stdout


def test_run_record_is_complete(trained):
    output, _ = trained
    record = yaml.safe_load((output / "sftkit_run.yaml").read_text())
    assert record["recipe"]["max_steps"] == 60  # the command-line override, resolved
    assert record["recipe"]["bf16"] is False and record["recipe"]["fp16"] is False  # derived on CPU
    assert record["adapter"]["name"] == "sharegpt" and record["adapter"]["distribution"] == "sftkit"
    assert record["data"]["eval_rows"] == 60 and record["data"]["train_rows"] == 540
    assert set(record["versions"]) >= {"sftkit", "trl", "transformers", "accelerate", "deepspeed", "datasets", "torch"}


def test_run_draws_its_falling_loss_curves(trained):
    from PIL import Image

    output, result = trained
    description = Image.open(output / "loss.png").text["Description"]  # what the picture shows, written into it
    losses = re.search(r"steps 10-60, train loss ([\d.]+) -> ([\d.]+), held-out loss ([\d.]+) -> ([\d.]+) at steps "
                       r"0-60", description)
    assert losses, description
    first, last, eval_first, eval_last = map(float, losses.groups())
    assert last < first / 2 and eval_last < eval_first / 2
    assert f"loss curves    {output / 'loss.png'}" in result.stdout


def test_run_answers_held_out_prompts_at_each_evaluation_and_shows_one(trained):
    output, result = trained
    samples = [json.loads(line) for line in (output / "samples.jsonl").read_text().splitlines()]
    assert [sample["step"] for sample in samples] == [0] * 3 + [30] * 3 + [60] * 3
    rows = SAMPLE_DATA.read_text().splitlines()
    for sample in samples:  # the held-out conversation up to its last reply, and that reply as the reference
        turns = json.loads(rows[sample["row"]])["conversations"]
        assert sample["reference"] == turns[-1]["value"] and sample["prompt"][-1]["content"] == turns[-2]["value"]
        assert sample["stopped_at"] in ("<|im_end|>", "max_new_tokens")

    def words_shared(step: int) -> int:
        return sum(len(set(sample["answer"].split()) & set(sample["reference"].split()))
                   for sample in samples if sample["step"] == step)

    assert words_shared(60) > words_shared(0)  # real generations: the trained model answers more like the data
    markdown = (output / "samples.md").read_text()
    assert all(f"> {sample['reference']}" in markdown for sample in samples) and "**answer at step 60**" in markdown
    summary = result.stdout[result.stdout.index("sftkit: training finished"):]
    assert f"samples        {output / 'samples.md'} (3 held-out prompts, answered at steps 0, 30, 60)" in summary
    assert f"  reference    {samples[-3]['reference']}" in summary


def test_answers_stop_at_the_end_of_turn_when_the_generation_config_lacks_it(trained, tmp_path):
    """Generation stops at <|im_end|>, the end of the turn the replies were trained to end with, even for a model
    whose generation config names only <|endoftext|>; the answer streams as it is generated."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from sftkit.outputs.chat import Conversation
    from sftkit.outputs.generation import answer
    from sftkit.outputs.trained import open_trained

    model_dir = tmp_path / "model"
    shutil.copytree(trained[0], model_dir, ignore=shutil.ignore_patterns("checkpoint-*"))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    end_of_text, end_of_turn = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    config = GenerationConfig.from_pretrained(model_dir)
    config.eos_token_id = end_of_text
    config.save_pretrained(model_dir)

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    questions = ["What is 3 + 4?", "Calculate 74 + 4.", "Compute 82 - 79.", "How many minutes are in 2 hours?"]
    answers = answer(model, tokenizer, [[{"role": "user", "content": q}] for q in questions], max_new_tokens=48)
    assert any(reply.end_token == end_of_turn for reply in answers)
    assert all(reply.end_token in (end_of_turn, None) for reply in answers)  # none ran on past the end of its turn

    stream = RecordingStream()
    conversation = Conversation(open_trained(str(model_dir)), None, max_new_tokens=48)
    reply = conversation.reply("What is the capital of Veloria?", stream)
    assert len(stream.writes) > 2 and stream.text().strip() == reply.text  # streamed in pieces, as generated


@pytest.mark.slow
def test_the_readmes_chat_line_answers_offline(trained):
    output, _ = trained
    [line] = [line for line in (ROOT / "README.md").read_text().splitlines()
              if line.startswith("sftkit chat outputs/quickstart --prompt ")]
    result = subprocess.run(shlex.split(line.replace("outputs/quickstart", str(output))), cwd=ROOT, capture_output=True,
                            text=True, timeout=300, check=False, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() and "Traceback" not in result.stderr
    assert f"sftkit: chat: {output}" in result.stderr


@pytest.mark.slow
def test_check_shows_what_trains_without_training(tmp_path):
    result = run(sys.executable, "-m", "sftkit", "check", "--config", str(QUICKSTART), "--rows", "1",
                 "--output_dir", str(tmp_path / "never"))
    assert result.returncode == 0, result.stderr
    assert "adapter        sharegpt" in result.stdout
    assert "<|im_start|>user" in result.stdout and "training would start: ok" in result.stdout
    assert not (tmp_path / "never").exists()


@pytest.mark.slow
def test_reasoning_in_earlier_turns_trains_with_a_qwen3_template(tmp_path):
    """Qwen3's own template would drop the first turn's reasoning; the rows keep it, and it is trained."""
    import trl

    template = tmp_path / "qwen3.jinja"  # TRL's copy of Qwen3's template, as the model ships it
    template.write_text((Path(trl.__path__[0]) / "chat_templates" / "qwen3.jinja").read_text())
    rows = [{"messages": [{"role": "user", "content": f"What is {i} + 1?"},
                          {"role": "assistant", "content": f"<think>\nadd one to {i}\n</think>\n\n{i + 1}"},
                          {"role": "user", "content": "And doubled?"},
                          {"role": "assistant", "content": str(2 * (i + 1))}]} for i in range(20)]
    result = run(sys.executable, "-m", "sftkit", "check", "--config", str(QUICKSTART), "--rows", "1",
                 "--dataset_name", str(write_jsonl(tmp_path / "rows.jsonl", rows)),
                 "--chat_template_path", str(template), "--assistant_only_loss", "true")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "TRL's training version" in result.stderr
    assert "[[<think>\nadd one to" in result.stdout and "And doubled?<|im_end|>\n<|im_start|>assistant\n[[" in result.stdout


@pytest.mark.slow
def test_bad_data_stops_check_and_train_with_the_row_named(tmp_path):
    rows = [sharegpt_row(0, ("human", "hi"), ("gpt", "hello")), sharegpt_row(1, ("human", "hi"), ("robot", "x"))]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    common = ("--config", str(QUICKSTART), "--dataset_name", str(data), "--test_split_size", "0",
              "--eval_strategy", "no", "--output_dir", str(tmp_path / "out"))
    checked = run(sys.executable, "-m", "sftkit", "check", *common)
    assert checked.returncode == 1
    assert "rows.jsonl row 1: turn 1 has unknown role 'robot'" in checked.stderr
    assert "Traceback" not in checked.stderr
    trained = run(sys.executable, "-m", "sftkit", *common)
    assert trained.returncode == 2 and "unknown role 'robot'" in trained.stderr


def test_misspelled_key_on_the_command_line_fails_fast(tmp_path):
    result = run(sys.executable, "-m", "sftkit", "train", f"--config={QUICKSTART}", "--max_step", "5")
    assert result.returncode == 2
    assert "sftkit: error: command line: unknown key 'max_step'; did you mean max_steps?" in result.stderr
    assert "Traceback" not in result.stderr


def test_adapters_lists_name_distribution_version_and_description():
    result = run("sftkit", "adapters")
    assert result.returncode == 0
    line = next(line for line in result.stdout.splitlines() if line.startswith("sharegpt"))
    assert "sftkit 0.1.0" in line and "human -> user" in line


@pytest.mark.slow
def test_two_processes_split_the_global_batch(tmp_path):
    """DDP over gloo on the CPU: the same global_batch_size means half the accumulation on two processes."""
    result = run(
        "accelerate", "launch", "--multi_gpu", "--num_processes", "2", "-m", "sftkit", "--config", str(QUICKSTART),
        "--output_dir", str(tmp_path), "--max_steps", "4", "--global_batch_size", "32", "--eval_strategy", "no",
        "--eval_on_start", "false", "--logging_steps", "1",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    record = yaml.safe_load((tmp_path / "sftkit_run.yaml").read_text())
    assert record["processes"] == 2
    assert record["recipe"]["gradient_accumulation_steps"] == 2  # 32 = 8 per device x 2 processes x 2
    assert result.stdout.count("sftkit: training finished") == 1  # one summary, from the main process


@pytest.mark.slow
def test_lora_without_peft_is_one_line_that_says_what_to_install(tmp_path):
    """On a Python without peft (this one, less peft), use_peft stops before anything loads, naming the extra."""
    result = subprocess.run(
        ["python3", "-m", "sftkit", "--config", str(QUICKSTART), "--output_dir", str(tmp_path / "out"),
         "--use_peft", "--lora_r", "4"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False, env=python_without(tmp_path, "peft"))
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"sftkit: error: recipe {QUICKSTART} with --output_dir, --use_peft, --lora_r from the command line: "
        "use_peft: true needs the peft package, which is not installed: "
        "pip install 'sftkit[peft]'")
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_lora_with_peft_installed(tmp_path):
    pytest.importorskip("peft")
    result = run(
        sys.executable, "-m", "sftkit", "--config", str(QUICKSTART), "--output_dir", str(tmp_path), "--max_steps", "2",
        "--use_peft", "--lora_r", "4", "--lora_alpha", "8", "--eval_strategy", "no", "--eval_on_start", "false",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "adapter_config.json").is_file() and (tmp_path / "adapter_model.safetensors").is_file()


def test_training_leaves_the_recipes_arguments_as_they_were(tmp_path):
    """The trainer gets its own copy of the training arguments: the recipe the data was prepared from stays as it was
    (here with eval asked for but no eval rows, which the trainer's copy switches off)."""
    from sftkit.jobs.train import train
    from sftkit.setup.resolve import load_recipe

    recipe = load_recipe(str(QUICKSTART), {"output_dir": str(tmp_path), "max_steps": 1, "test_split_size": 0,
                                           "eval_strategy": "steps", "eval_on_start": False})
    before = recipe.training.to_dict()
    train(recipe, save=False)
    assert recipe.training.to_dict() == before


def test_a_model_whose_generation_config_lacks_the_end_of_turn_token_learns_to_stop_at_it(tmp_path):
    """The saved model stops at the template's end-of-turn token even when its own generation config only knew
    <|endoftext|>: the trained replies end in <|im_end|>, so generation must stop there too."""
    import shutil

    from transformers import AutoTokenizer, GenerationConfig

    from sftkit import embedded
    from sftkit.jobs.train import train
    from sftkit.setup.resolve import load_recipe

    model = tmp_path / "model"
    shutil.copytree(embedded.resolve("embedded:tiny-qwen2"), model)
    tokenizer = AutoTokenizer.from_pretrained(model)
    end_of_text, end_of_turn = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    config = GenerationConfig.from_pretrained(model)
    config.eos_token_id = end_of_text
    config.save_pretrained(model)

    recipe = load_recipe(str(QUICKSTART), {"model_name_or_path": str(model), "output_dir": str(tmp_path / "out"),
                                           "max_steps": 1, "eval_strategy": "no", "eval_on_start": False})
    train(recipe)
    saved = GenerationConfig.from_pretrained(tmp_path / "out").eos_token_id
    assert end_of_turn in saved and end_of_text in saved


@pytest.mark.slow
def test_an_error_under_the_readmes_accelerate_launch_is_one_message_without_a_traceback(tmp_path):
    """The README's launch line (accelerate launch -q ...): sftkit's own error, and no launcher traceback after it."""
    [line] = [line for line in (ROOT / "README.md").read_text().splitlines()[:8] if "accelerate launch" in line]
    launch = shlex.split(line[line.index("accelerate launch"):])
    result = run(*launch, "--output_dir", str(tmp_path / "out"), "--max_steps", "-1", "--num_train_epochs", "0")
    assert result.returncode != 0
    assert "sftkit: error: recipe" in result.stderr and "would train nothing" in result.stderr
    assert "Traceback" not in result.stderr
