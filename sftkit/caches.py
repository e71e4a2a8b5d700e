"""Where sftkit keeps what it computes once and reuses: prepared rows, downloaded sources, TRL's recipe keys."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "SFTKIT_CACHE"


def cache_home() -> Path:
    """sftkit's cache folder: $SFTKIT_CACHE, else ~/.cache/sftkit."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "sftkit")
