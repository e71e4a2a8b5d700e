"""docs/plugins.md, followed as a new author would: every file on the page is written out as shown, the plugin is
installed, listed with its contract version, auto-detected, trained with, its own tests pass, and the errors the
page shows are the errors a user gets.

The page's ``pip install -e`` becomes ``pip install --target`` here, so that the test leaves the environment as it
found it; every other command runs with the arguments the page gives.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT

PAGE = ROOT / "docs" / "plugins.md"
FILE_BLOCK = re.compile(r"<!-- file: (?P<path>\S+) -->\n```\w*\n(?P<body>.*?)```", re.DOTALL)


def files_of_the_page() -> dict[str, str]:
    return {match["path"]: match["body"] for match in FILE_BLOCK.finditer(PAGE.read_text())}


@pytest.fixture(scope="module")
def author(tmp_path_factory) -> Path:
    """A directory holding what the page has the author write, with the plugin installed beside it."""
    folder = tmp_path_factory.mktemp("author")
    for path, body in files_of_the_page().items():
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_text(body)
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                              "--quiet", "--target", str(folder / "site"), str(folder / "sftkit-qa")],
                             capture_output=True, text=True, check=False)
    assert install.returncode == 0, install.stderr
    return folder


def sftkit(author: Path, *arguments: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(author / "site"), "SFTKIT_LOAD_PLUGINS": "sftkit-qa"}
    return subprocess.run([sys.executable, "-m", "sftkit", *arguments], cwd=author, env=env, capture_output=True,
                          text=True, timeout=600, check=False)


def test_the_page_holds_a_whole_plugin():
    assert {"sftkit-qa/pyproject.toml", "sftkit-qa/sftkit_qa/__init__.py", "sftkit-qa/tests/test_qa.py", "qa.yaml",
            "faq.jsonl"} <= set(files_of_the_page())
    adapter = files_of_the_page()["sftkit-qa/sftkit_qa/__init__.py"]
    imports = {line for line in adapter.splitlines() if line.startswith(("import sftkit", "from sftkit"))}
    assert imports == {"import sftkit"}  # the authors' API is one import


def test_it_is_listed_with_its_contract_version_as_the_page_shows(author):
    result = sftkit(author, "adapters")
    assert result.returncode == 0, result.stderr
    shown = re.search(r"```\n(qa .*?)\n```", PAGE.read_text(), re.DOTALL).group(1)
    listed = [line for line in result.stdout.splitlines() if line.startswith(("qa ", " " * 22))]
    assert all(line in result.stdout for line in shown.splitlines()), result.stdout
    assert listed


@pytest.mark.slow
def test_it_is_auto_detected_and_trains(author):
    checked = sftkit(author, "check", "--config", "qa.yaml", "--no-color")
    assert checked.returncode == 0, checked.stderr[-2000:]
    assert "adapter        qa from sftkit-qa 0.1.0" in checked.stdout and "dataset_format auto: qa" in checked.stdout
    assert "[geography] Where is Amberhold?" in checked.stdout  # the recipe's option reached the adapter
    trained = sftkit(author, "--config", "qa.yaml")
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert "sftkit: training finished" in trained.stdout


@pytest.mark.slow
def test_its_own_tests_pass_against_the_installed_distribution(author):
    env = {**os.environ, "PYTHONPATH": str(author / "site")}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--import-mode=importlib",
                             str(author / "sftkit-qa" / "tests")], cwd=author, env=env, capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 0, result.stdout[-2000:]


@pytest.mark.slow
def test_the_errors_on_the_page_are_what_users_get(author):
    shown = [line.removeprefix("sftkit: error: ") for line in PAGE.read_text().splitlines()
             if line.startswith("sftkit: error: ")]
    assert len(shown) == 3
    rows = [json.loads(line) for line in (author / "faq.jsonl").read_text().splitlines()]
    (author / "reply.jsonl").write_text("".join(json.dumps({"question": row["question"], "reply": row["answer"]})
                                                + "\n" for row in rows))
    missing = sftkit(author, "check", "--config", "qa.yaml", "--dataset_name", "reply.jsonl", "--dataset_format", "qa")
    bad_value = sftkit(author, "check", "--config", "qa.yaml", "--dataset_options", "{topic: title}")
    unknown = sftkit(author, "check", "--config", "qa.yaml", "--dataset_options", "{topics: system}")
    for result, expected in zip((missing, bad_value, unknown), shown, strict=True):
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert expected.replace("faq.jsonl", "reply.jsonl") in result.stderr, result.stderr[-1000:]
