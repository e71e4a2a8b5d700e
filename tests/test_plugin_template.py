"""plugins/sftkit-dolly, the template third parties copy, must install, register, detect, train and pass its tests.

Each check runs sftkit in a subprocess against a ``pip install --target`` copy of the plugin, so it sees
exactly what a user who installed the distribution would see, and never the test process's registry.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = REPO_ROOT / "plugins" / "sftkit-dolly"


def pip_install(source: Path, target: Path) -> Path:
    """Install a distribution from a source tree into ``target`` as pip would, offline."""
    command = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
               "--disable-pip-version-check", "--quiet", "--target", str(target), str(source)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"pip could not install {source}:\n{result.stderr}"
    return target


def run(arguments: list[str], sites: list[Path], load: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run ``python ARGUMENTS`` with these installs importable and only these distributions' plugins loaded."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, sites)), "SFTKIT_LOAD_PLUGINS": load}
    return subprocess.run([sys.executable, *arguments], env=env, cwd=cwd, capture_output=True, text=True, timeout=300, check=False)


@pytest.fixture(scope="module")
def dolly_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Build from a copy, so that setuptools' build/ and egg-info never land in the repository.
    source = tmp_path_factory.mktemp("source") / "sftkit-dolly"
    shutil.copytree(TEMPLATE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__", ".*"))
    return pip_install(source, tmp_path_factory.mktemp("site"))


def dolly_rows(count: int) -> list[dict[str, str]]:
    """Rows shaped like databricks/databricks-dolly-15k; every other one has a context."""
    cities = ["Veloria", "Marnes", "Quillon", "Ostrava", "Belcourt"]
    rows = []
    for index in range(count):
        city = cities[index % len(cities)]
        year = 1900 + 7 * index
        with_context = index % 2 == 0
        rows.append({
            "instruction": f"When was the {city} library founded?" if with_context else f"Name a river near {city}.",
            "context": f"The {city} library was founded in {year} by the town council." if with_context else "",
            "response": f"It was founded in {year}." if with_context else f"The {city} river runs past it.",
            "category": "closed_qa" if with_context else "open_qa",
        })
    return rows


def test_adapters_lists_dolly_with_its_distribution(dolly_site: Path, tmp_path: Path) -> None:
    result = run(["-m", "sftkit", "adapters"], [dolly_site], "sftkit-dolly", tmp_path)
    assert result.returncode == 0, result.stderr
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("dolly ")]
    (installed,) = importlib.metadata.distributions(name="sftkit-dolly", path=[str(dolly_site)])
    assert line.split()[1:5] == ["sftkit-dolly", f"{installed.version},", "contract", "1.0"]
    assert "context_position: one of 'after', 'before', default \"after\": where a non-empty context goes" in result.stdout


@pytest.mark.slow
def test_trains_on_auto_detected_dolly_data(dolly_site: Path, tmp_path: Path) -> None:
    data = tmp_path / "dolly.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in dolly_rows(40)))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "model_name_or_path": "embedded:tiny-qwen2",
        "dataset_name": str(data),
        "dataset_format": "auto",
        "output_dir": str(tmp_path / "out"),
        "max_steps": 5,
        "per_device_train_batch_size": 8,
        "save_strategy": "no",
        "report_to": "none",
    }))
    result = run(["-m", "sftkit", "--config", str(recipe)], [dolly_site], "sftkit-dolly", tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    record = yaml.safe_load((tmp_path / "out" / "sftkit_run.yaml").read_text())
    assert record["adapter"]["name"] == "dolly"
    assert record["adapter"]["distribution"] == "sftkit-dolly"
    assert record["adapter"]["chosen"].startswith("dataset_format auto: dolly")
    assert record["data"]["train_rows"] == 40
    assert (tmp_path / "out" / "model.safetensors").is_file()


@pytest.mark.slow
def test_data_without_the_optional_column_trains_and_without_a_required_one_is_one_clear_error(
        dolly_site: Path, tmp_path: Path) -> None:
    rows = [{key: value for key, value in row.items() if key != "context"} for row in dolly_rows(20)]
    data = tmp_path / "no-context.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    base = ["-m", "sftkit", "check", "--config", str(TEMPLATE.parent.parent / "configs/recipes/quickstart.yaml"),
            "--dataset_name", str(data), "--dataset_format", "dolly", "--output_dir", str(tmp_path / "out")]
    result = run(base, [dolly_site], "sftkit-dolly", tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    data.write_text("".join(json.dumps({"instruction": row["instruction"], "answer": row["response"]}) + "\n"
                            for row in rows))
    result = run(base, [dolly_site], "sftkit-dolly", tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert ("adapter 'dolly' (from sftkit-dolly 0.1.0) needs column 'response', which the data lacks (it has "
            "instruction, answer)") in result.stderr


@pytest.mark.slow
def test_template_tests_pass_against_the_installed_distribution(dolly_site: Path, tmp_path: Path) -> None:
    # importlib mode keeps the template's directory off sys.path: sftkit_dolly comes from the install.
    arguments = ["-m", "pytest", "-q", "-p", "no:cacheprovider", "--import-mode=importlib", str(TEMPLATE / "tests")]
    result = run(arguments, [dolly_site], "sftkit-dolly", tmp_path)
    assert result.returncode == 0, result.stdout[-3000:]
    assert " passed" in result.stdout


def test_a_broken_plugin_is_reported_by_distribution(dolly_site: Path, tmp_path: Path) -> None:
    source = tmp_path / "sftkit-broken"
    source.mkdir()
    (source / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=68"]\nbuild-backend = "setuptools.build_meta"\n'
        '[project]\nname = "sftkit-broken"\nversion = "0.0.1"\n'
        '[project.entry-points.sftkit]\nbroken = "sftkit_broken"\n'
        '[tool.setuptools]\npy-modules = ["sftkit_broken"]\n'
    )
    module = 'raise ImportError("sftkit_broken needs the package missing_dependency")\n'
    (source / "sftkit_broken.py").write_text(module)
    broken_site = pip_install(source, tmp_path / "site")

    result = run(["-m", "sftkit", "adapters"], [dolly_site, broken_site], "sftkit-dolly,sftkit-broken", tmp_path)
    assert result.returncode == 0, result.stderr
    assert "sftkit-broken: ImportError: sftkit_broken needs the package missing_dependency" in result.stdout
    assert any(line.startswith("dolly ") for line in result.stdout.splitlines())
