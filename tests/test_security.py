"""What a recipe or a dataset can make sftkit do: read data, never run code; and secrets never written down."""

from __future__ import annotations

import json
import logging

import pytest
from helpers import ROOT, TINY_MODEL, sharegpt_row, write_jsonl, write_recipe

from sftkit.errors import SftkitError
from sftkit.recipe import load_recipe

QUICKSTART = ROOT / "configs" / "recipes" / "quickstart.yaml"
TOKEN = "hf_DoNotWriteThisAnywhere42"


def test_a_recipe_is_read_as_data_never_as_code(tmp_path):
    marker = tmp_path / "ran"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model_name_or_path: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(SftkitError, match=f"recipe {recipe}: not valid YAML"):
        load_recipe(str(recipe))
    assert not marker.exists()


def test_a_chat_template_runs_in_the_sandbox(tmp_path):
    from sftkit.check import check

    template = tmp_path / "escape.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}{{ ''.__class__.__mro__[1].__subclasses__() }}"
                        "<|im_end|>{% endfor %}")
    rows = [sharegpt_row(index, ("human", "Q?"), ("gpt", "A.")) for index in range(8)]
    recipe = load_recipe(str(QUICKSTART), {"output_dir": str(tmp_path / "out"), "chat_template_path": str(template),
                                           "dataset_name": str(write_jsonl(tmp_path / "rows.jsonl", rows))})
    with pytest.raises(SftkitError, match="access to attribute '__class__' of 'str' object is unsafe"):
        check(recipe, 0, colour=False)


def test_remote_code_is_off_unless_asked_and_loud_when_on(tmp_path, caplog):
    from sftkit.train.preflight import preflight

    assert load_recipe(str(QUICKSTART)).training.trust_remote_code is False
    caplog.set_level(logging.WARNING, logger="sftkit")
    preflight(load_recipe(str(QUICKSTART), {"output_dir": str(tmp_path / "out"), "trust_remote_code": True}))
    assert f"trust_remote_code: true runs Python code from {TINY_MODEL} on this machine" in caplog.text


def test_secrets_from_env_are_never_written(tmp_path):
    from sftkit.train.job import train

    rows = [sharegpt_row(index, ("human", f"What is {index}?"), ("gpt", f"{index}.")) for index in range(30)]
    rows[3] = sharegpt_row(3, ("human", f"my token is {TOKEN}"))  # invalid (no reply), and it holds the secret
    recipe_file = write_recipe(
        tmp_path / "recipe.yaml", model_name_or_path=TINY_MODEL, output_dir=str(tmp_path / "out"), max_steps=2,
        dataset_name=str(write_jsonl(tmp_path / "rows.jsonl", rows)), on_invalid="skip", max_invalid_fraction=0.5,
        test_split_size=0, save_steps=1, report_to="none", env={"HF_TOKEN": TOKEN, "SFTKIT_TEST_SETTING": "plain"})
    train(load_recipe(str(recipe_file)))
    written = {path: path.read_text(errors="replace") for path in (tmp_path / "out").rglob("*")
               if path.is_file() and path.suffix in (".yaml", ".jsonl", ".json", ".md")}
    assert written and not [path for path, text in written.items() if TOKEN in text]
    skipped = [json.loads(line) for line in (tmp_path / "out" / "skipped_rows.jsonl").read_text().splitlines()]
    assert [entry["row"] for entry in skipped] == [3] and "[redacted]" in json.dumps(skipped)
    assert not list((tmp_path / "out").rglob("pytorch_model*.bin")) and (tmp_path / "out" / "model.safetensors").is_file()


def test_a_kubernetes_job_never_carries_a_secret_in_its_configmap(tmp_path):
    from sftkit.cli import main

    recipe = write_recipe(tmp_path / "recipe.yaml", model_name_or_path=TINY_MODEL, dataset_name="embedded:x",
                          output_dir="/data/out", env={"HF_TOKEN": TOKEN})
    assert main(["k8s", "render", "--config", str(recipe), "--nodes", "1", "--gpus-per-node", "1", "--image",
                 "registry.example.com/sftkit:1", "--volume", "data:/data", "-o", str(tmp_path / "job.yaml")]) == 2
    assert not (tmp_path / "job.yaml").exists()
