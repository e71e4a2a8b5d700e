"""What a recipe or a dataset can make sftkit do: read data, never run code; and secrets never written down."""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch
import yaml
from helpers import ROOT, TINY_MODEL, sharegpt_row, write_jsonl, write_recipe
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from sftkit.cli import main
from sftkit.errors import SftkitError
from sftkit.redaction import REDACTED, is_secret, redact, redacted
from sftkit.setup.resolve import load_recipe

QUICKSTART = ROOT / "configs" / "recipes" / "quickstart.yaml"
TOKEN = "hf_DoNotWriteThisAnywhere42"
QUOTED_KEY = 'sk-"quoted"\\pass phrase'  # JSON and YAML escape the quotes and the backslash
DATABASE_PASSWORD = "s3cr3t-db-pass"
DATABASE_URL = f"postgres://trainer:{DATABASE_PASSWORD}@db.internal:5432/runs"
HUB_TOKEN = "hf_HubTokenOnlyForTheHubClient7"
SECRET_WORDS = ("KEY", "SECRET", "PASSWORD", "PASSWD", "TOKEN", "CREDENTIAL")
# Names that say they hold a secret, wherever the word stands and however it is spelled.
SECRET_NAMES = ("HF_TOKEN", "MY_PRIVATE_KEY", "OPENAI_KEY", "WANDB_API_KEY", "AWS_SECRET_ACCESS_KEY", "DB_PASSWORD",
                "LDAP_PASSWD", "GOOGLE_APPLICATION_CREDENTIALS", "github_token", "apikey", "ClientSecret",
                "HUGGING_FACE_HUB_TOKEN", "SSH_KEY", "TOKEN", "KEYCHAIN_PATH")
PLAIN_NAMES = ("HF_HOME", "NCCL_DEBUG", "TOKENIZERS_PARALLELISM", "CUDA_VISIBLE_DEVICES", "PYTHONHASHSEED")


def test_a_recipe_is_read_as_data_never_as_code(tmp_path):
    marker = tmp_path / "ran"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model_name_or_path: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(SftkitError, match=f"recipe {recipe}: not valid YAML"):
        load_recipe(str(recipe))
    assert not marker.exists()


def test_a_chat_template_runs_in_the_sandbox(tmp_path):
    from sftkit.jobs.check import check

    template = tmp_path / "escape.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}{{ ''.__class__.__mro__[1].__subclasses__() }}"
                        "<|im_end|>{% endfor %}")
    rows = [sharegpt_row(index, ("human", "Q?"), ("gpt", "A.")) for index in range(8)]
    recipe = load_recipe(str(QUICKSTART), {"output_dir": str(tmp_path / "out"), "chat_template_path": str(template),
                                           "dataset_name": str(write_jsonl(tmp_path / "rows.jsonl", rows))})
    with pytest.raises(SftkitError, match="access to attribute '__class__' of 'str' object is unsafe"):
        check(recipe, 0, colour=False)


def test_remote_code_is_off_unless_asked_and_loud_when_on(tmp_path, caplog):
    from sftkit.setup.preflight import preflight

    assert load_recipe(str(QUICKSTART)).training.trust_remote_code is False
    caplog.set_level(logging.WARNING, logger="sftkit")
    preflight(load_recipe(str(QUICKSTART), {"output_dir": str(tmp_path / "out"), "trust_remote_code": True}))
    assert f"trust_remote_code: true runs Python code from {TINY_MODEL} on this machine" in caplog.text


def test_secrets_are_never_written(tmp_path):
    """The env: secrets (a token, a key with quotes and a backslash, a URL with a password) and hub_token reach no
    file of the run in any encoding, even from the data; the Hub client gets hub_token through HF_TOKEN."""
    from sftkit.jobs.train import train

    rows = [sharegpt_row(index, ("human", f"What is {index}?"), ("gpt", f"{index}.")) for index in range(30)]
    # invalid (no reply), so listed in skipped_rows.jsonl, and it holds the secrets
    rows[3] = sharegpt_row(3, ("human", f"my token is {TOKEN}, my key {QUOTED_KEY}, the database {DATABASE_URL}"))
    recipe_file = write_recipe(
        tmp_path / "recipe.yaml", model_name_or_path=TINY_MODEL, output_dir=str(tmp_path / "out"), max_steps=2,
        dataset_name=str(write_jsonl(tmp_path / "rows.jsonl", rows)), on_invalid="skip", max_invalid_fraction=0.5,
        test_split_size=0, save_steps=1, report_to="none", hub_token=HUB_TOKEN,
        env={"HF_TOKEN": TOKEN, "MY_PRIVATE_KEY": QUOTED_KEY, "DATABASE_URL": DATABASE_URL,
             "SFTKIT_TEST_SETTING": "plain"})
    train(load_recipe(str(recipe_file)))
    out = tmp_path / "out"
    files = [path for path in out.rglob("*") if path.is_file()]
    secrets = (TOKEN, QUOTED_KEY, DATABASE_PASSWORD, HUB_TOKEN)
    for path in files:  # binary ones too: training_args.bin pickles the trainer's arguments
        content = path.read_bytes()
        for secret in secrets:
            for form in {secret, json.dumps(secret)[1:-1], json.dumps(secret, ensure_ascii=False)[1:-1]}:
                assert form.encode() not in content, (path.relative_to(out), secret)
    for path in out.rglob("*.yaml"):
        assert not [text for text in _strings(yaml.safe_load(path.read_text())) for secret in secrets if secret in text]
    skipped = [json.loads(line) for line in (out / "skipped_rows.jsonl").read_text().splitlines()]
    assert [entry["row"] for entry in skipped] == [3] and not [
        text for text in _strings(skipped) for secret in secrets if secret in text]
    assert yaml.safe_load((out / "sftkit_run.yaml").read_text())["recipe"]["hub_token"] == REDACTED
    arguments = [torch.load(path, weights_only=False) for path in files if path.name == "training_args.bin"]
    assert len(arguments) == 3 and all(args.hub_token is None for args in arguments)  # 2 checkpoints, the model
    assert os.environ["HF_TOKEN"] == HUB_TOKEN
    assert not list(out.rglob("pytorch_model*.bin")) and (out / "model.safetensors").is_file()


def test_a_checkpoint_records_the_recipe_without_its_secrets_and_a_rotated_token_resumes(tmp_path):
    from sftkit.recipe import BatchGeometry
    from sftkit.train.checkpoints import CHECKPOINT_RECORD, differences, write_checkpoint_record

    values = {"learning_rate": 1e-4, "hub_token": HUB_TOKEN, "dataset_name": DATABASE_URL}
    write_checkpoint_record(tmp_path, values, processes=1)
    written = (tmp_path / CHECKPOINT_RECORD).read_text()
    assert HUB_TOKEN not in written and DATABASE_PASSWORD not in written
    batch = BatchGeometry.recorded(values, processes=1)
    assert differences(tmp_path, {**values, "hub_token": "hf_RotatedSinceTheCheckpoint1"}, batch) == []
    assert differences(tmp_path, {**values, "learning_rate": 2e-4}, batch) == ["learning_rate: 0.0001 -> 0.0002"]


def _render(recipe, capsys, *options: str) -> tuple[int, str]:
    status = main(["k8s", "render", "--config", str(recipe), "--nodes", "1", "--gpus-per-node", "1", "--image",
                   "registry.example.com/sftkit:1", "--volume", "data:/data", "-o", str(recipe.parent / "job.yaml"),
                   *options])
    return status, capsys.readouterr().err


@pytest.mark.parametrize(("recipe_values", "options", "named"), [
    *(({"env": {name: QUOTED_KEY}}, (), f"env: {name}") for name in SECRET_NAMES),
    ({"env": {"DATABASE_URL": DATABASE_URL}}, (), "env: DATABASE_URL"),
    ({"hub_token": TOKEN}, (), "hub_token"),
    ({}, ("--hub_token", TOKEN), "hub_token"),
    ({"dataset_name": f"https://reader:{DATABASE_PASSWORD}@data.internal/rows.jsonl"}, (), "dataset_name"),
])
def test_a_kubernetes_job_never_carries_a_secret_in_its_configmap(tmp_path, capsys, recipe_values, options, named):
    recipe = write_recipe(tmp_path / "recipe.yaml", **{"model_name_or_path": TINY_MODEL, "dataset_name": "embedded:x",
                                                       "output_dir": "/data/out", **recipe_values})
    status, error = _render(recipe, capsys, *options)
    assert status == 2 and not (tmp_path / "job.yaml").exists()
    assert f"recipe {recipe}: {named} would be stored in plain text in the job's ConfigMap" in error
    assert "--env-from-secret" in error and not [secret for secret in (QUOTED_KEY, TOKEN, DATABASE_PASSWORD)
                                                 if secret in error]


# ---------------------------------------------------------------- the rule: what is a secret, and every form it takes


def _text_forms(text: str) -> dict[str, tuple[str, object]]:
    """What sftkit writes a text as, each with the reader that gets the text back: JSON lines (ASCII or not),
    YAML quoted either way, Python's repr."""
    import ast

    unbounded = float("inf")
    return {
        "as it is": (text, str),
        "json": (json.dumps({"data": text}), lambda written: json.loads(written)["data"]),
        "json, not ASCII": (json.dumps({"data": text}, ensure_ascii=False), lambda written: json.loads(written)["data"]),
        "yaml, double-quoted": (yaml.safe_dump({"data": text}, default_style='"', width=unbounded),
                                lambda written: yaml.safe_load(written)["data"]),
        "yaml, double-quoted, unicode": (
            yaml.safe_dump({"data": text}, default_style='"', width=unbounded, allow_unicode=True),
            lambda written: yaml.safe_load(written)["data"]),
        "yaml, single-quoted": (yaml.safe_dump({"data": text}, default_style="'", width=unbounded, allow_unicode=True),
                                lambda written: yaml.safe_load(written)["data"]),
        "repr": (repr({"data": text}), lambda written: ast.literal_eval(written)["data"]),
    }


def _strings(value: object) -> list[str]:
    if isinstance(value, dict):
        return [text for key, item in value.items() for text in (*_strings(key), *_strings(item))]
    if isinstance(value, list):
        return [text for item in value for text in _strings(item)]
    return [value] if isinstance(value, str) else []


def _assert_never_readable(secret: str, text: str) -> None:
    """``secret`` is redacted from ``text`` in every form sftkit writes it in: the data it is in redacted and then
    serialised (YAML folding long lines, JSON escaping) and read back, no string holds it; and text already written
    (a log line, a command) holds it in no readable form."""
    assert secret not in redact(text)
    data = {"recipe": {"dataset_name": text, "datasets": [{"path": text}]}, "rows": [text, {text: 1}]}
    for serialise, read in ((lambda value: yaml.safe_dump(value, allow_unicode=True), yaml.safe_load),
                            (yaml.safe_dump, yaml.safe_load), (json.dumps, json.loads),
                            (lambda value: json.dumps(value, ensure_ascii=False), json.loads)):
        assert not [found for found in _strings(read(serialise(redacted(data)))) if secret in found]


secret_names = st.builds(lambda before, word, lower, after: before + (word.lower() if lower else word) + after,
                         st.from_regex(r"[A-Za-z0-9_]{0,6}", fullmatch=True), st.sampled_from(SECRET_WORDS),
                         st.booleans(), st.from_regex(r"[A-Za-z0-9]{0,6}", fullmatch=True))
# Anything an environment variable can hold: quotes, backslashes, spaces, line breaks, any script.
secret_values = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), min_size=8,
                        max_size=40).filter(lambda value: value not in REDACTED and value.strip())


@settings(max_examples=200, deadline=None)
@given(name=secret_names, secret=secret_values, before=st.text(max_size=30), after=st.text(max_size=30))
def test_a_secret_variable_is_redacted_from_every_form_it_is_written_in(name, secret, before, after):
    if "TOKENIZER" in name.upper():  # the tokenizers library's settings (TOKENIZERS_PARALLELISM) are not secrets
        name = name.upper().replace("TOKENIZER", "TOKEN_")
    assert is_secret(name, "x")
    saved = dict(os.environ)
    os.environ[name] = secret
    try:
        _assert_never_readable(secret, f"{before}{secret}{after}")
    finally:
        os.environ.clear()
        os.environ.update(saved)


@pytest.mark.parametrize("name", SECRET_NAMES)
def test_names_that_say_secret_are_secret(name, monkeypatch):
    monkeypatch.setenv(name, QUOTED_KEY)
    assert is_secret(name, "plain") and redact(f"key: {QUOTED_KEY}") == f"key: {REDACTED}"


@settings(max_examples=100, deadline=None)
@given(scheme=st.sampled_from(["postgres", "postgresql+psycopg", "mysql", "https", "redis", "s3", "git+https"]),
       user=st.from_regex(r"[A-Za-z0-9._~%!$&'()*+,;=-]{0,12}", fullmatch=True),
       password=st.from_regex(r"[A-Za-z0-9._~%!$&'()*+,;=-]{8,24}", fullmatch=True),
       host=st.from_regex(r"[a-z0-9.-]{1,20}(:[0-9]{1,5})?", fullmatch=True), before=st.text(max_size=20))
def test_a_url_with_credentials_is_a_secret_wherever_it_is(scheme, user, password, host, before):
    assume(password not in f"{scheme}://{user}:@{host}/data {before}")  # found in the rest, it is no secret of it
    url = f"{scheme}://{user}:{password}@{host}/data"
    assert is_secret("DATABASE_URL", url) and is_secret("ANYTHING", f"{scheme}://{password}@{host}")
    _assert_never_readable(password, f"{before} {url} ")


def test_settings_are_not_secrets_and_tokenizer_settings_stay_in_the_record(monkeypatch):
    for name in PLAIN_NAMES:
        assert not is_secret(name, "/data/hf-cache")
    assert not is_secret("DATASET", "https://huggingface.co/datasets/org/name@main")
    monkeypatch.setenv("HF_TOKEN", "true")  # too short to be told from a setting: nothing else would be readable
    recipe = {"pad_token": "<|endoftext|>", "eos_token": "<|im_end|>", "packing": "true", "hub_token": None}
    assert redacted(recipe) == recipe
    assert redacted({"hub_token": HUB_TOKEN}) == {"hub_token": REDACTED}


# ---------------------------------------------------------------- the command line


class _Executed(Exception):
    """Raised in place of os.execvp: the command sftkit launch would become."""


@pytest.mark.parametrize("given", [["--hub_token", HUB_TOKEN], [f"--hub-token={HUB_TOKEN}"]])
def test_launch_hands_hub_token_to_the_hub_client_and_prints_no_secret(tmp_path, capsys, monkeypatch, given):
    def execvp(file: str, command: list[str]) -> None:
        raise _Executed(command)

    monkeypatch.setattr(os, "execvp", execvp)
    recipe = write_recipe(tmp_path / "recipe.yaml", model_name_or_path=TINY_MODEL, dataset_name="embedded:x")
    source = f"https://reader:{DATABASE_PASSWORD}@data.internal/rows.jsonl"
    with pytest.raises(_Executed) as executed:
        main(["launch", "--config", str(recipe), "--max_steps", "3", *given, "--dataset_name", source])
    command = executed.value.args[0]
    assert HUB_TOKEN not in " ".join(command) and os.environ["HF_TOKEN"] == HUB_TOKEN
    assert command[-6:] == ["--config", str(recipe), "--max_steps", "3", "--dataset_name", source]
    printed = capsys.readouterr().err
    assert "sftkit: launch: accelerate launch" in printed and DATABASE_PASSWORD not in printed


def test_the_commands_early_read_of_env_runs_no_code(tmp_path, capsys):
    marker = tmp_path / "ran"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"env:\n  SFTKIT_PROBE: !!python/object/apply:os.system ['touch {marker}']\n")
    assert main(["check", "--config", str(recipe)]) == 1
    assert not marker.exists() and f"recipe {recipe}: not valid YAML" in capsys.readouterr().err


def test_the_commands_early_read_takes_no_more_than_the_recipe_reader():
    from sftkit.cli import ENVIRONMENT_READ_BYTES
    from sftkit.recipe import MAX_RECIPE_BYTES

    assert ENVIRONMENT_READ_BYTES == MAX_RECIPE_BYTES


@pytest.mark.parametrize("secret", [QUOTED_KEY, TOKEN, "s3cr3t-with spaces\\and \"quotes\" and 'apostrophes'",
                                    "ключ-пароль-éè-🔑-token"])
def test_text_already_written_is_redacted_in_every_encoding_of_a_realistic_secret(secret):
    """Text sftkit writes as it comes (a printed command, a log line) may hold a secret JSON-escaped, YAML-quoted or
    in Python's repr: redacted in each."""
    saved = dict(os.environ)
    os.environ["SOME_API_KEY"] = secret
    try:
        for form, (written, read) in _text_forms(f"before {secret} after").items():
            assert secret not in read(redact(written)), form
    finally:
        os.environ.clear()
        os.environ.update(saved)
