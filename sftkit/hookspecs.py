"""The plugin hook: how a dataset-format plugin hands sftkit its adapters (the adapter contract: ``sftkit.contract``).

A plugin is a module with a function decorated by ``sftkit.hookimpl``::

    @sftkit.hookimpl
    def register_adapters(register):
        register(MyAdapter())

Third-party distributions expose that module through the ``sftkit`` entry-point group; sftkit's own
adapters register through exactly the same hook. A plugin whose function is not marked, or is named for a
hook that is not here, would register nothing: sftkit names it, and the hook, instead (``plugins.add_plugin``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("sftkit")
hookimpl = pluggy.HookimplMarker("sftkit")


@hookspec
def register_adapters(register: Callable[[Any], None]) -> None:
    """Called once, when sftkit first needs the adapters: call ``register(adapter)`` once for each adapter.

    Since contract 1.0. A later minor version may pass more parameters; an implementation receives only those
    it names.
    """
