"""The embedded default: a tiny Qwen2 model and an Infinity-Instruct-shaped sample that ship with sftkit.

Recipes name them ``embedded:tiny-qwen2`` and ``embedded:infinity-instruct-sample`` so they work
offline from any directory; ``scripts/build_embedded.py`` rebuilds them deterministically.
"""

from __future__ import annotations

from pathlib import Path

from sftkit.errors import SftkitError

PREFIX = "embedded:"
ROOT = Path(__file__).parent / "embedded"


def resolve(name: str) -> str:
    """Map ``embedded:NAME`` to its directory inside the package; leave any other name as it is."""
    if not name.startswith(PREFIX):
        return name
    path = ROOT / name[len(PREFIX) :]
    if not path.exists():
        available = ", ".join(PREFIX + child.name for child in sorted(ROOT.iterdir()) if child.is_dir())
        raise SftkitError(f"{name!r} is not an embedded asset; available: {available}")
    return str(path)
