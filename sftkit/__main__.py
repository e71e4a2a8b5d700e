"""``python -m sftkit`` and ``accelerate launch -m sftkit``: the same as the ``sftkit`` command."""

from sftkit.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
