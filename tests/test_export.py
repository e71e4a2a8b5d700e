"""sftkit export, proved against consumers sftkit did not write: transformers' GGUF reader builds the tokenizer and
the model from the file alone and gives the trained model's token ids and logits (f32 to 1e-5, the other types
within their measured bounds), Llama's rotary permutation included; a file broken on purpose (its chat template
removed, its EOS swapped, with llama.cpp's own metadata tool) is caught; the Ollama Modelfile and the vLLM folder
stop at the end of turn; what cannot be exported is refused with what to do. llama.cpp itself, built from its
source package, reads the quickstart's model in a slow test (scripts/check_llamacpp.py)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import pytest
import torch
from helpers import ROOT, python_without
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from sftkit import embedded
from sftkit.cli import main
from sftkit.data.templates import render
from sftkit.errors import SftkitError
from sftkit.export import checks as proof
from sftkit.export.gguf_file import ARCHITECTURES, Architecture, write_gguf
from sftkit.export.job import REPORT, export, held_out
from sftkit.export.ollama import read_wrappers
from sftkit.jobs.train import train
from sftkit.outputs.trained import open_trained
from sftkit.setup.resolve import load_recipe

QUICKSTART = ROOT / "configs" / "recipes" / "quickstart.yaml"
# A short run of the quickstart: a checkpoint at step 10, held-out prompts answered at the end.
SHORT = {"max_steps": 12, "save_steps": 10, "logging_steps": 4, "eval_strategy": "no", "eval_on_start": False}
IM_END, ENDOFTEXT = 633, 631


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("run")
    train(load_recipe(str(QUICKSTART), {"output_dir": str(output), **SHORT}))
    return output


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory) -> Path:
    """The short run exported to GGUF in f32."""
    output = tmp_path_factory.mktemp("exported") / "gguf"
    export(str(run), "gguf", str(output), "f32", progress=False)
    return output


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    """A Llama model of random weights with the embedded tokenizer: rows of 128 values, whole q8_0 blocks."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=634, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=False, eos_token_id=ENDOFTEXT, pad_token_id=ENDOFTEXT)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # logits of a trained model's size, not the near-zero ones of a fresh initialisation
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0, 0.08)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(embedded.resolve("embedded:tiny-qwen2")).save_pretrained(folder)
    return folder


def conversations(directory: Path) -> list[list[dict]]:
    prompts, _ = held_out(directory)
    return [[*prompt.messages, {"role": "assistant", "content": prompt.reference}] for prompt in prompts]


def largest_logit_difference(trained, other, tokenizer, directory: Path) -> float:
    worst = 0.0
    for messages in conversations(directory):
        ids = torch.tensor([tokenizer(render(tokenizer, messages, None), add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            worst = max(worst, (trained(input_ids=ids).logits - other(input_ids=ids).logits).abs().max().item())
    return worst


def rewritten(source: Path, target: Path, remove=(), change=None) -> Path:
    """A copy of a GGUF file with metadata removed or changed, by llama.cpp's own tool (gguf_new_metadata)."""
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(target, reader.fields["general.architecture"].contents())
    changes = {key: MetadataDetails(gguf.GGUFValueType.UINT32, value) for key, value in (change or {}).items()}
    copy_with_new_metadata(reader, writer, changes, list(remove))
    return target


def test_the_gguf_file_loads_in_transformers_as_the_trained_model(run, exported):
    """transformers builds the tokenizer and the model from the file alone: the same chat template, the same ids,
    and logits within 1e-5 of the trained model's on the held-out conversations."""
    [path] = exported.glob("*.gguf")
    assert path.name == f"{run.name}-f32.gguf"
    model = AutoModelForCausalLM.from_pretrained(exported, gguf_file=path.name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(exported, gguf_file=path.name)
    trained = open_trained(str(run))
    assert tokenizer.chat_template == trained.tokenizer.chat_template
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|endoftext|>", "<|endoftext|>")
    for messages in conversations(run):
        text = render(trained.tokenizer, messages, None)
        assert render(tokenizer, messages, None) == text
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == \
            trained.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert largest_logit_difference(trained.model, model, trained.tokenizer, run) <= proof.EXACT
    metadata = {key: field.contents() for key, field in gguf.GGUFReader(path).fields.items()
                if key.startswith("tokenizer.ggml.") and not key.endswith(("tokens", "merges", "token_type"))}
    assert metadata | {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2", "tokenizer.ggml.eos_token_id":
                       ENDOFTEXT, "tokenizer.ggml.eot_token_id": IM_END} == metadata


def test_the_export_reports_its_checks_and_how_to_run_it(run, exported):
    report = (exported / REPORT).read_text()
    assert f"- model: {run}" in report and "3 held-out prompts of" in report
    reader = "transformers' GGUF reader"
    for check in ("chat template in the file", "stop tokens in the file", f"prompts and token ids ({reader})",
                  f"logits ({reader})", f"greedy answers ({reader})"):
        assert f"- passed: {check}: " in report
    assert "FAILED" not in report
    assert f"llama-server -m {exported / f'{run.name}-f32.gguf'} --jinja" in report


def test_a_gguf_without_its_chat_template_is_caught(run, exported, tmp_path):
    [path] = exported.glob("*.gguf")
    broken = rewritten(path, tmp_path / "no-template.gguf", remove=["tokenizer.chat_template"])
    trained = open_trained(str(run))
    template, stops = proof.check_metadata(broken, trained.tokenizer, trained.model)
    assert not template.passed and "has no tokenizer.chat_template" in template.detail
    assert stops.passed
    # What a consumer reading only the file gets: no template, so no prompt rendered as training did.
    _, tokenizer = proof.load_gguf(broken)
    prompts, _ = held_out(run)
    check = proof.compare_tokenizers(trained.tokenizer, tokenizer, prompts, "transformers' GGUF reader")
    assert not check.passed and "it has no chat template" in check.detail
    assert [check.passed for check in proof.check_metadata(path, trained.tokenizer, trained.model)] == [True, True]


def test_a_gguf_with_another_eos_is_caught(run, exported, tmp_path):
    [path] = exported.glob("*.gguf")
    broken = rewritten(path, tmp_path / "swapped-eos.gguf", change={"tokenizer.ggml.eos_token_id": 632})
    trained = open_trained(str(run))
    template, stops = proof.check_metadata(broken, trained.tokenizer, trained.model)
    assert template.passed and not stops.passed
    assert "tokenizer.ggml.eos_token_id is 632 ('<|im_start|>') where the tokenizer's EOS is 631 ('<|endoftext|>')" \
        in stops.detail
    _, tokenizer = proof.load_gguf(broken)
    assert tokenizer.eos_token == "<|im_start|>"  # what the consumer now takes for the end of a text


def test_held_out_prompts_carry_the_answers_of_the_exported_step(run):
    prompts, where = held_out(run / "checkpoint-10")
    assert "samples.jsonl" in where and all(prompt.answer is None for prompt in prompts)  # answered at step 12 only
    prompts, _ = held_out(run)
    assert {prompt.step for prompt in prompts} == {12} and all(prompt.answer is not None for prompt in prompts)


def test_the_vllm_folder_stops_at_the_end_of_turn_and_reproduces_samples(run, tmp_path, capsys):
    output = tmp_path / "vllm"
    assert main(["export", str(run), "--to", "vllm", "-o", str(output)]) == 0
    printed = capsys.readouterr().out
    assert f"vllm serve {output} --served-model-name {run.name} --dtype float32 --generation-config auto --port 8000" \
        in printed
    model = AutoModelForCausalLM.from_pretrained(output)
    assert IM_END in model.generation_config.eos_token_id
    assert (output / "chat_template.jinja").read_text() == open_trained(str(run)).tokenizer.chat_template
    request = json.loads((output / "request.json").read_text())
    assert request["temperature"] == 0 and request["messages"][-1]["role"] == "user"
    report = (output / REPORT).read_text()
    assert "- passed: a line of samples.md: held-out row" in report and "at step 12" in report
    assert "curl -s http://localhost:8000/v1/chat/completions" in report


def test_a_checkpoint_for_ollama_has_a_modelfile_with_the_template_stops_and_system(run, tmp_path):
    output = tmp_path / "ollama"
    result = export(str(run / "checkpoint-10"), "ollama", str(output), "f16", progress=False)
    name = f"{run.name}-checkpoint-10"
    modelfile = (output / "Modelfile").read_text()
    assert modelfile.startswith(f"FROM ./{name}-f16.gguf\n")
    assert 'PARAMETER stop "<|im_end|>"\nPARAMETER stop "<|endoftext|>"\nPARAMETER temperature 0\n' in modelfile
    assert 'SYSTEM """You are Qwen, created by Alibaba Cloud. You are a helpful assistant."""' in modelfile
    assert '{{ else if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n' in modelfile
    wrappers = read_wrappers(open_trained(str(run)).tokenizer)
    assert (wrappers.user, wrappers.assistant, wrappers.end) == ("<|im_start|>user\n", "<|im_start|>assistant\n",
                                                                 "<|im_end|>\n")
    assert f"ollama create {name} -f Modelfile" in result.commands[0]
    assert any(check.name == "Modelfile TEMPLATE" and check.passed for check in result.checks)


def test_llama_is_permuted_as_llama_cpp_wants_and_read_back(llama, tmp_path):
    """transformers' reader undoes llama.cpp's rotary permutation of q and k: the f32 file gives the model's logits
    to 1e-5, and a file written without the permutation does not."""
    trained = open_trained(str(llama))
    path = write_gguf(trained.model, trained.tokenizer, tmp_path / "llama.gguf", "f32", "llama", progress=False).path
    model, tokenizer = proof.load_gguf(path)
    prompts, _ = held_out(llama)
    assert proof.compare_tokenizers(trained.tokenizer, tokenizer, prompts, "reader").passed
    exact = proof.compare_logits(trained.model, model, trained.tokenizer, prompts, (proof.EXACT, False), "reader")
    assert exact.passed, exact.detail
    ARCHITECTURES["llama"], kept = Architecture(gguf.MODEL_ARCH.LLAMA, False, ()), ARCHITECTURES["llama"]
    try:
        unpermuted = write_gguf(trained.model, trained.tokenizer, tmp_path / "u.gguf", "f32", "u", progress=False)
    finally:
        ARCHITECTURES["llama"] = kept
    unpermuted_model, _ = proof.load_gguf(unpermuted.path)
    wrong = proof.compare_logits(trained.model, unpermuted_model, trained.tokenizer, prompts, (1e-2, False), "reader")
    assert not wrong.passed


@pytest.mark.parametrize("type_name", [pytest.param("f16", marks=pytest.mark.slow),
                                       pytest.param("bf16", marks=pytest.mark.slow), "q8_0"])
def test_types_that_round_the_weights_stay_within_their_bounds(llama, tmp_path, type_name):
    result = export(str(llama), "gguf", str(tmp_path / type_name), type_name, progress=False)
    logits = next(check for check in result.checks if check.name.startswith("logits"))
    assert logits.passed and f"allowed: {proof.TOLERANCE[type_name]:g} x the largest" in logits.detail
    if type_name == "q8_0":  # every matrix in q8_0, vectors in f32
        assert result.files[0].endswith("21 tensors (5 f32, 16 q8_0)")


def test_what_cannot_be_exported_is_refused_with_what_to_do(run, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    assert main(["export", str(run), "--to", "gguf", "-o", str(taken)]) == 2
    assert f"{taken} already exists and is not an empty directory" in capsys.readouterr().err
    assert main(["export", str(tmp_path), "--to", "gguf", "-o", str(tmp_path / "a")]) == 2
    assert f"{tmp_path} holds no model: no config.json (a full model) and no adapter_config.json" in \
        capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", str(run), "--to", "gguf", "-o", str(tmp_path / "b"), "--type", "q4_k"])
    assert "invalid choice: 'q4_k'" in capsys.readouterr().err
    with pytest.raises(SftkitError, match="--type q8_0 is a GGUF quantisation; --to vllm writes f32, f16 or bf16"):
        export(str(run), "vllm", str(tmp_path / "c"), "q8_0")
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=634, n_embd=32, n_layer=1, n_head=2)).save_pretrained(gpt2)
    AutoTokenizer.from_pretrained(embedded.resolve("embedded:tiny-qwen2")).save_pretrained(gpt2)
    with pytest.raises(SftkitError, match=r"a gpt2 model \(GPT2LMHeadModel\), which sftkit export cannot write as "
                                          r"GGUF; it converts model types qwen2 \(qwen2\), llama \(llama\)"):
        export(str(gpt2), "gguf", str(tmp_path / "d"))
    assert not any((tmp_path / name).exists() for name in "abcd")


def test_a_tokenizer_that_splits_otherwise_is_refused_and_llama3s_split_is_kept(llama, tmp_path):
    folder = tmp_path / "llama3-split"
    shutil.copytree(llama, folder)
    tokenizer_json = json.loads((folder / "tokenizer.json").read_text())
    split = tokenizer_json["pre_tokenizer"]["pretokenizers"][0]["pattern"]
    split["Regex"] = split["Regex"].replace(r"\p{N}|", r"\p{N}{1,3}|")  # Llama 3's: up to three digits a token
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = "TokenizersBackend"  # the file's split, not Qwen2Tokenizer's own
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    trained = open_trained(str(folder))
    path = write_gguf(trained.model, trained.tokenizer, tmp_path / "l3.gguf", "f32", "l3", progress=False).path
    assert gguf.GGUFReader(path).fields["tokenizer.ggml.pre"].contents() == "llama-bpe"
    _, tokenizer = proof.load_gguf(path)
    for text in ("What is 1234 + 56?", "The year 2026 has 365 days."):
        assert tokenizer(text)["input_ids"] == trained.tokenizer(text)["input_ids"]
    def pieces(tokenizer):
        return [piece for piece, _ in tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str("in 2026")]

    assert pieces(tokenizer) == pieces(trained.tokenizer) == ["in", "Ġ", "202", "6"]  # Qwen2 splits 2, 0, 2, 6
    split["Regex"] = r"\s+|\S+"
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    with pytest.raises(SftkitError, match="not a byte-level BPE tokenizer that splits text as Qwen2 or Llama 3 do"):
        export(str(folder), "gguf", str(tmp_path / "out"))


def test_without_gguf_the_export_says_what_to_install(run, tmp_path):
    result = subprocess.run(["python3", "-m", "sftkit", "export", str(run), "--to", "gguf", "-o", str(tmp_path / "o")],
                            cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
                            env=python_without(tmp_path, "gguf"))
    assert result.returncode == 2, result.stderr[-2000:]
    assert 'writing GGUF needs the gguf package (llama.cpp\'s GGUF writer): pip install "sftkit[export]"' in \
        result.stderr


@pytest.mark.slow
def test_a_lora_run_is_merged_and_exported(tmp_path):
    pytest.importorskip("peft")
    lora = tmp_path / "lora"
    train(load_recipe(str(QUICKSTART), {"output_dir": str(lora), **SHORT, "use_peft": True, "lora_r": 8,
                                        "lora_alpha": 32, "learning_rate": 0.01}))
    assert (lora / "adapter_config.json").is_file()
    for target in ("gguf", "vllm"):
        result = export(str(lora), target, str(tmp_path / target), "f32", progress=False)
        assert all(check.passed for check in result.checks)
        assert "a LoRA adapter on" in (tmp_path / target / REPORT).read_text()
    trained = open_trained(str(lora))
    merged = trained.model.merge_and_unload()
    [path] = (tmp_path / "gguf").glob("*.gguf")
    model, _ = proof.load_gguf(path)
    assert largest_logit_difference(merged, model, trained.tokenizer, lora) <= proof.EXACT


def llama_cpp_builder():
    spec = importlib.util.spec_from_file_location("check_llamacpp", ROOT / "scripts" / "check_llamacpp.py")
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    return builder


# Building llama.cpp from source takes about ten minutes of CPU, more than the whole suite can spare on a small CI
# machine: the test builds it only when asked to, and otherwise runs where it is built already.
BUILD_VARIABLE = "SFTKIT_BUILD_LLAMA_CPP"


@pytest.mark.slow
def test_llama_cpp_reads_the_quickstart_model_and_answers_as_sftkit_chat(tmp_path):
    """llama.cpp, built from its source package by scripts/check_llamacpp.py: the prompts its chat template
    renders, the same token ids, the same greedy tokens, the same stop; and a file without its chat template is
    caught by llama.cpp's reading too."""
    builder = llama_cpp_builder()
    built = importlib.util.find_spec("llama_cpp") is not None or (
        builder.build_dir(None) / "llama_cpp" / "__init__.py").is_file()
    if not built and os.environ.get(BUILD_VARIABLE) != "1":
        pytest.skip(f"llama-cpp-python is not built here: {BUILD_VARIABLE}=1 builds it from its source package for "
                    "this test (about ten minutes of CPU), as python scripts/check_llamacpp.py RUN does")
    run, exported = tmp_path / "quickstart", tmp_path / "exported"
    train(load_recipe(str(QUICKSTART), {"output_dir": str(run)}))
    script = ROOT / "scripts" / "check_llamacpp.py"
    result = subprocess.run([sys.executable, str(script), str(run), "-o", str(exported)], cwd=ROOT,
                            capture_output=True, text=True, timeout=3600, check=False)
    if result.returncode == 3:
        pytest.skip(result.stderr.strip().splitlines()[-1])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for check in ("prompts and token ids (llama.cpp)", "logits (llama.cpp)", "greedy answers (llama.cpp)"):
        assert f"- passed: {check}: " in result.stdout
    assert "3 of 3 greedy answers the same as sftkit chat's, token for token, llama.cpp stopping at <|im_end|>" in \
        result.stdout

    builder.ensure_built(builder.build_dir(None), None)  # built above: only made importable here
    [path] = exported.glob("*.gguf")
    broken = rewritten(path, tmp_path / "no-template.gguf", remove=["tokenizer.chat_template"])
    trained = open_trained(str(run))
    prompts, _ = held_out(run)
    replies = proof.answers(trained.model, trained.tokenizer, prompts, 64)
    def llama_cpp_checks(file: Path) -> list[proof.Check]:
        return proof.check_llama_cpp(file, trained.model, trained.tokenizer, prompts, replies, 64, "f32", torch.float32)

    broken_checks = llama_cpp_checks(broken)
    assert not broken_checks[0].passed and "llama.cpp finds no chat template in the file" in broken_checks[0].detail
    assert all(check.passed for check in llama_cpp_checks(path))
