"""llama.cpp itself reads what ``sftkit export`` writes, and answers as the trained model does.

    python scripts/check_llamacpp.py RUN [--type f32] [--sdist FILE] [--build-dir DIR]

llama-cpp-python (llama.cpp's Python binding) is built from its source package, once, into ``--build-dir``
(default ``$SFTKIT_LLAMACPP_DIR``, else ``~/.cache/sftkit-llama-cpp-python/VERSION-PYTHON``): pip fetches the
source package from PyPI, or takes ``--sdist FILE``, and compiles llama.cpp with cmake and the C++ compiler, its
examples, tests, tools and multimodal library left out. Then ``sftkit export RUN --to gguf`` runs with llama.cpp
importable, so that its llama.cpp checks run beside transformers': llama.cpp loads the file, renders each
held-out prompt with the chat template it finds in the file, tokenizes it to the trained tokenizer's ids, and
greedy-decodes the tokens ``sftkit chat`` answers, stopping where it stops. The export's report is printed.

Exit status: 0 when every check passed, 1 when one failed, 3 when llama.cpp cannot be built here (no cmake or no
C++ compiler; the line says which), 4 when the build failed (its log is named).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VERSION = "0.3.36"
# What the binding needs: the library and its Python code. Examples, tests, tools and the multimodal library
# (which the binding loads only for image models) are not built.
CMAKE_ARGS = "-DLLAVA_BUILD=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF " \
             "-DLLAMA_BUILD_SERVER=OFF"
CANNOT_BUILD, BUILD_FAILED = 3, 4


def build_dir(given: str | None) -> Path:
    if given or os.environ.get("SFTKIT_LLAMACPP_DIR"):
        return Path(given or os.environ["SFTKIT_LLAMACPP_DIR"]).expanduser()
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    return Path("~/.cache/sftkit-llama-cpp-python").expanduser() / f"{VERSION}-{python}"


def missing_tools() -> str | None:
    """Why llama.cpp cannot be compiled here, or None."""
    if shutil.which("cmake") is None:
        return "no cmake on PATH (install cmake 3.21 or later)"
    if not any(shutil.which(compiler) for compiler in (os.environ.get("CXX") or "c++", "g++", "clang++")):
        return "no C++ compiler on PATH (install g++ or clang++)"
    return None


def ensure_built(site: Path, sdist: str | None) -> float | None:
    """Make llama_cpp importable from ``site``, building it there when it is not; the build's seconds, or None
    when it was built before (or is installed already)."""
    if importlib.util.find_spec("llama_cpp") is not None:
        return None
    if (site / "llama_cpp" / "__init__.py").is_file():
        sys.path.insert(0, str(site))
        return None
    if why := missing_tools():
        print(f"check_llamacpp: cannot build llama-cpp-python here: {why}", file=sys.stderr)
        sys.exit(CANNOT_BUILD)
    partial = site.with_name(site.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    log = site.with_name(site.name + ".log")
    package = sdist or f"llama-cpp-python=={VERSION}"
    environment = {**os.environ, "CMAKE_ARGS": f"{CMAKE_ARGS} {os.environ.get('CMAKE_ARGS', '')}".strip(),
                   "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 1)}
    print(f"check_llamacpp: building llama-cpp-python {VERSION} from source into {site} (once; several minutes; "
          f"log in {log})", file=sys.stderr, flush=True)
    started = time.monotonic()
    with log.open("w") as out:
        for command in (
                [sys.executable, "-m", "pip", "install", "--no-deps", "--no-binary", "llama-cpp-python", "--target",
                 str(partial), package],
                # The binding's pure-Python dependency the rest of this environment may lack.
                [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(partial), "diskcache>=5.6.1"]):
            if command[-1].startswith("diskcache") and importlib.util.find_spec("diskcache") is not None:
                continue
            if subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=environment, check=False).returncode:
                print(f"check_llamacpp: building llama-cpp-python failed; see {log}", file=sys.stderr)
                sys.exit(BUILD_FAILED)
    shutil.rmtree(site, ignore_errors=True)
    partial.rename(site)  # whole or not at all: a build cut short is started over
    sys.path.insert(0, str(site))
    return time.monotonic() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a run's output_dir or checkpoint-* folder (a LoRA run is merged first)")
    parser.add_argument("--type", default="f32", choices=("f32", "f16", "bf16", "q8_0"))
    parser.add_argument("--sdist", help="llama-cpp-python's source package to build, instead of PyPI's")
    parser.add_argument("--build-dir", help="where llama-cpp-python is built and kept")
    parser.add_argument("-o", "--output", help="where the export goes (default: a temporary directory)")
    options = parser.parse_args(argv)
    site = build_dir(options.build_dir)
    seconds = ensure_built(site, options.sdist)
    if seconds is not None:
        print(f"check_llamacpp: built llama-cpp-python in {seconds:.0f} s", file=sys.stderr)
    sys.path.insert(0, str(ROOT))
    import llama_cpp

    from sftkit.errors import SftkitError
    from sftkit.export.job import export

    print(f"check_llamacpp: llama-cpp-python {llama_cpp.__version__} from {Path(llama_cpp.__file__).parent}",
          file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="sftkit-llamacpp-") as scratch:
        output = Path(options.output or Path(scratch) / "export")
        try:
            exported = export(options.run, "gguf", str(output), options.type, progress=False)
        except SftkitError as error:
            report = output / "export_report.md"
            print(report.read_text() if report.is_file() else "", end="")
            print(f"check_llamacpp: {error}", file=sys.stderr)
            return 1
        print(exported.report.read_text(), end="")
    if not any("llama.cpp" in check.name for check in exported.checks):
        print("check_llamacpp: the export ran no llama.cpp check", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
