"""What a run leaves to look at and use, on the embedded model: loss curves at every save (a crashed run has them),
sftkit plot over two runs, a LoRA run merged into a model that loads and matches, sftkit chat on an adapter,
trackers that write locally, and the held-out prompts that sample answers are made from."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from helpers import ROOT, RecordingStream, python_without, write_recipe
from PIL import Image
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, TrainerCallback

from sftkit import embedded
from sftkit.cli import main
from sftkit.jobs.train import train
from sftkit.outputs.chat import Conversation, interactive
from sftkit.outputs.trained import open_trained
from sftkit.setup.resolve import load_recipe

QUICKSTART = ROOT / "configs" / "recipes" / "quickstart.yaml"
# A short run: a save at step 10, losses logged every 2 steps, no evaluation but the final one.
SHORT = {"max_steps": 12, "save_steps": 10, "logging_steps": 2, "eval_strategy": "no", "eval_on_start": False}
LOGITS_TOLERANCE = 1e-5  # float32 logits of the merged model against the adapter applied to its base


def picture_description(path: Path) -> str:
    """What sftkit wrote into the PNG about the curves it drew (one line a run)."""
    return Image.open(path).text["Description"]


class CrashAfterSave(TrainerCallback):
    """An error two steps after the save at step 10, as a run that dies mid-way."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 12:
            raise RuntimeError("the run died at step 12")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """The embedded model with a generation config that knows only <|endoftext|>, as many base models ship."""
    base = tmp_path_factory.mktemp("base") / "tiny-qwen2"
    shutil.copytree(embedded.resolve("embedded:tiny-qwen2"), base)
    config = GenerationConfig.from_pretrained(base)
    config.eos_token_id = AutoTokenizer.from_pretrained(base).convert_tokens_to_ids("<|endoftext|>")
    config.save_pretrained(base)
    return base


@pytest.fixture(scope="module")
def crashed(base, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("crashed")
    recipe = load_recipe(str(QUICKSTART), {"model_name_or_path": str(base), "output_dir": str(output), **SHORT})
    with pytest.raises(RuntimeError, match="died at step 12"):
        train(recipe, callbacks=[CrashAfterSave()])
    return output


@pytest.fixture(scope="module")
def lora(base, tmp_path_factory) -> Path:
    pytest.importorskip("peft")
    output = tmp_path_factory.mktemp("lora")
    train(load_recipe(str(QUICKSTART), {"model_name_or_path": str(base), "output_dir": str(output), **SHORT,
                                        "use_peft": True, "lora_r": 8, "lora_alpha": 32, "learning_rate": 0.01}))
    return output


def test_a_crashed_run_has_the_loss_curves_of_its_last_save(crashed):
    assert not (crashed / "trainer_state.json").exists()  # it never finished
    assert (crashed / "checkpoint-10").is_dir()
    assert picture_description(crashed / "loss.png").startswith(f"{crashed.name}: steps 2-10, train loss ")


def test_plot_overlays_runs_labelled_by_what_differs(crashed, lora, tmp_path, capsys):
    picture = tmp_path / "compare.png"
    assert main(["plot", str(crashed), str(lora), "-o", str(picture)]) == 0
    crashed_line, lora_line = picture_description(picture).splitlines()
    # The crashed run is drawn from its checkpoint; each label is what its recipe says differently.
    assert crashed_line.startswith("learning_rate=0.003, lora_alpha=default, lora_r=default, use_peft=default: "
                                   "steps 2-10, train loss")
    assert lora_line.startswith("learning_rate=0.01, lora_alpha=32, lora_r=8, use_peft=True: steps 2-12, train loss")
    assert Image.open(picture).size == (1600, 500)
    assert f"loss curves of 2 runs drawn in {picture}" in capsys.readouterr().out


def test_plot_names_what_is_missing(tmp_path, capsys):
    assert main(["plot", str(tmp_path / "nowhere")]) == 2
    assert f"sftkit: error: {tmp_path / 'nowhere'}: no such directory" in capsys.readouterr().err
    assert main(["plot", str(tmp_path)]) == 2
    assert "no trainer_state.json, in it or in a checkpoint-* folder" in capsys.readouterr().err


def test_merged_lora_loads_alone_and_gives_the_adapters_logits(base, lora, tmp_path, capsys):
    from peft import PeftModel

    merged = tmp_path / "merged"
    assert main(["merge", str(lora), "-o", str(merged)]) == 0
    assert f"holds the full model (sftkit chat {merged}" in capsys.readouterr().out
    assert (merged / "model.safetensors").is_file() and not (merged / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(merged)
    tokenizer = AutoTokenizer.from_pretrained(merged)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    ends = model.generation_config.eos_token_id
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in ([ends] if isinstance(ends, int) else ends)  # base: no

    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), lora).eval()
    untouched_model = AutoModelForCausalLM.from_pretrained(base)
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of Veloria?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        expected, got, untouched = adapted(**inputs).logits, model(**inputs).logits, untouched_model(**inputs).logits
    assert (got - expected).abs().max() < LOGITS_TOLERANCE
    assert (expected - untouched).abs().max() > 1e-2  # the adapter changes the model: the match means something


def test_merge_refuses_what_it_cannot_merge(lora, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    assert main(["merge", str(lora), "-o", str(taken)]) == 2
    assert f"{taken} already exists and is not an empty directory" in capsys.readouterr().err
    full = embedded.resolve("embedded:tiny-qwen2")
    assert main(["merge", full, "-o", str(tmp_path / "out")]) == 2
    assert "holds a full model (config.json, no adapter_config.json)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_chat_on_an_adapter_keeps_the_conversation_and_resets_it(base, lora):
    trained = open_trained(str(lora))
    assert trained.base == str(base)
    conversation = Conversation(trained, "You are a concise assistant.", max_new_tokens=4)
    seen, lines = [], iter(["What is 1 + 1?", "And 2 + 2?", "/reset", "/bogus", "Hi", "/exit", "never read"])

    def read(prompt: str) -> str:
        seen.append(len(conversation.messages))  # the turns kept when the next line is read
        return next(lines)

    out = RecordingStream()
    interactive(conversation, out, read)
    assert seen == [0, 2, 4, 0, 0, 2]
    assert "(a new conversation)" in out.text() and "unknown command /bogus" in out.text()
    assert [message["role"] for message in conversation.messages] == ["user", "assistant"]
    assert next(lines) == "never read"


def test_chat_says_what_is_wrong_with_the_model_directory(lora, tmp_path, capsys):
    assert main(["chat", str(tmp_path), "--prompt", "hi"]) == 2
    assert f"{tmp_path} holds no model: no config.json (a full model) and no adapter_config.json" in \
        capsys.readouterr().err
    moved = tmp_path / "moved"
    shutil.copytree(lora, moved, ignore=shutil.ignore_patterns("checkpoint-*"))
    config = json.loads((moved / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "gone" / "base")
    (moved / "adapter_config.json").write_text(json.dumps(config))
    assert main(["chat", str(moved), "--prompt", "hi"]) == 2
    error = capsys.readouterr().err
    assert f"{moved} is a LoRA adapter on {tmp_path / 'gone' / 'base'}, which is not there" in error
    assert f"set base_model_name_or_path in {moved / 'adapter_config.json'}" in error and "Traceback" not in error


@pytest.mark.slow
def test_trackers_write_locally_and_a_run_without_matplotlib_says_so_once(tmp_path):
    """TensorBoard's event files and trackio's database land on this machine, where the log says; on a Python
    without matplotlib the run draws no picture, says so once, and finishes."""
    output, trackio_dir = tmp_path / "run", tmp_path / "trackio"
    recipe = yaml.safe_load(QUICKSTART.read_text())
    recipe.update(output_dir=str(output), max_steps=3, logging_steps=1, eval_strategy="no", eval_on_start=False,
                  eval_samples=0, report_to=["tensorboard", "trackio"], project="sftkit-tests", run_name="three-steps")
    environment = {**python_without(tmp_path, "matplotlib"), "TRACKIO_DIR": str(trackio_dir), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(["python3", "-m", "sftkit", "--config", str(write_recipe(tmp_path / "r.yaml", **recipe))],
                            cwd=ROOT, capture_output=True, text=True, timeout=300, check=False, env=environment)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = output / "runs"
    assert f"trackers: tensorboard writes event files under {runs}; see them with: tensorboard --logdir {runs}" \
        in result.stderr
    assert f"trackers: trackio writes project 'sftkit-tests' to {trackio_dir}; see it with: trackio show --project " \
           "sftkit-tests" in result.stderr
    assert result.stderr.count("matplotlib is not installed") == 1 and not (output / "loss.png").exists()

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    [run] = runs.iterdir()  # one run, its events in a file or two (the evaluation after training)
    accumulator = EventAccumulator(str(run))
    accumulator.Reload()
    assert [event.step for event in accumulator.Scalars("train/loss")] == [1, 2, 3]

    with sqlite3.connect(trackio_dir / "sftkit-tests.db") as database:
        rows = database.execute("SELECT run_name, metrics FROM metrics").fetchall()
    losses = [json.loads(metrics)["train/loss"] for name, metrics in rows if "train/loss" in json.loads(metrics)]
    assert {name for name, _ in rows} == {"three-steps"} and len(losses) == 3


def test_an_unknown_tracker_stops_before_any_data_is_read(tmp_path, capsys):
    assert main(["--config", str(QUICKSTART), "--output_dir", str(tmp_path / "out"), "--report_to", "tensorbord"]) == 2
    assert "report_to: 'tensorbord' is not a tracker; did you mean tensorboard?" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_sample_prompts_are_held_out_conversations_cut_before_their_last_reply(tokenizer):
    from sftkit.data.preparation import prepare_data
    from sftkit.outputs.samples import held_out_prompts

    data = prepare_data(load_recipe(str(QUICKSTART), {}), tokenizer)
    prompts, why = held_out_prompts(data, 3)
    rows = (ROOT / "sftkit" / "embedded" / "infinity-instruct-sample" / "train.jsonl").read_text().splitlines()
    assert why is None and len(prompts) == 3
    for prompt in prompts:
        turns = json.loads(rows[prompt.row])["conversations"]
        assert prompt.reference == turns[-1]["value"] and turns[-1]["from"] == "gpt"
        assert [message["content"] for message in prompt.messages] == [turn["value"] for turn in turns[:-1]]
    assert set(data.eval.rows["row"]) >= {prompt.row for prompt in prompts}


def test_sample_answers_are_skipped_with_a_note_for_text_data(tokenizer, caplog):
    from sftkit.data.preparation import prepare_data
    from sftkit.outputs.samples import sample_answers

    recipe = load_recipe(str(ROOT / "configs" / "recipes" / "formats" / "text.yaml"), {"test_split_size": 0.2})
    data = prepare_data(recipe, tokenizer)
    with caplog.at_level("INFO", logger="sftkit"):
        assert sample_answers(recipe, data, tokenizer) is None
    assert "sample answers: skipped: the held-out rows are not conversations" in caplog.text


def test_a_model_that_trains_with_variable_length_attention_answers_with_sdpa(tokenizer):
    """torch_varlen attends within packed rows only; sample answers during such a run generate with sdpa."""
    from sftkit.outputs.generation import answer
    from sftkit.train.attention import VARLEN, use_varlen_attention

    use_varlen_attention()
    model = AutoModelForCausalLM.from_pretrained(embedded.resolve("embedded:tiny-qwen2"), attn_implementation=VARLEN)
    model.train()
    [reply] = answer(model, tokenizer, [[{"role": "user", "content": "hi"}]], max_new_tokens=3)
    assert reply.new_tokens >= 1
    assert model.config._attn_implementation == VARLEN and model.training  # as it was


def test_commands_have_their_own_help(capsys):
    for command in ("chat", "merge", "plot"):
        with pytest.raises(SystemExit) as exit_code:
            main([command, "--help"])
        assert exit_code.value.code == 0 and f"usage: sftkit {command}" in capsys.readouterr().out


def test_a_lora_run_shorter_than_logging_steps_logs_its_last_step_and_its_trainable_parameters(tmp_path, caplog):
    """Three steps, a loss logged every ten: the last step's loss is still logged and drawn; the LoRA run says how
    many parameters train; its card names the base model, the data, sftkit and the recipe."""
    pytest.importorskip("peft")
    caplog.set_level("INFO", logger="sftkit")
    output = tmp_path / "short"
    train(load_recipe(str(QUICKSTART), {"output_dir": str(output), "max_steps": 3, "logging_steps": 10,
                                        "eval_strategy": "no", "eval_on_start": False, "eval_samples": 0,
                                        "use_peft": True, "lora_r": 4}))
    history = json.loads((output / "trainer_state.json").read_text())["log_history"]
    assert [entry["step"] for entry in history if "loss" in entry] == [3]
    assert picture_description(output / "loss.png").startswith("short: steps 3-3, train loss ")
    [line] = [record.getMessage() for record in caplog.records if record.getMessage().startswith("peft: ")]
    trainable, total = (int(number.replace(",", "")) for number in line.split()[1:6:4])
    assert 0 < trainable < total and line.endswith(f"({100 * trainable / total:.2f}%)")
    card = (output / "README.md").read_text()
    assert "[None]" not in card and "A fine-tuned version of `embedded:tiny-qwen2` (a LoRA adapter on it)" in card
    assert "trained on `embedded:infinity-instruct-sample`" in card and "sftkit 0.1.0" in card
    assert "lora_r: 4" in card and f"sftkit merge {output} -o MERGED" in card


def test_plot_says_when_there_is_nothing_to_draw(tmp_path, capsys):
    (tmp_path / "trainer_state.json").write_text(json.dumps({"log_history": [{"train_runtime": 1.0, "step": 0}]}))
    assert main(["plot", str(tmp_path), "-o", str(tmp_path / "loss.png")]) == 2
    assert "nothing to draw:" in capsys.readouterr().err and not (tmp_path / "loss.png").exists()


def test_a_model_card_puts_hub_ids_in_its_front_matter_and_no_secret_anywhere(monkeypatch):
    from sftkit.train.model_card import model_card

    monkeypatch.setenv("WANDB_API_KEY", "wandb-secret-12345678")
    card = model_card({"model_name_or_path": "Qwen/Qwen2.5-0.5B", "dataset_name": "BAAI/Infinity-Instruct",
                       "hub_token": "hf_abcdefghijklmnop", "run_name": "wandb-secret-12345678"}, "outputs/x")
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == "Qwen/Qwen2.5-0.5B" and front["datasets"] == ["BAAI/Infinity-Instruct"]
    assert "hf_abcdefghijklmnop" not in card and "wandb-secret-12345678" not in card
