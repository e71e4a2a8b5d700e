"""Finds adapters: built-in ones and those of installed distributions in the ``sftkit`` entry-point group."""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import logging
import os
from dataclasses import dataclass, field

import pluggy

from sftkit import __version__, hookspecs
from sftkit.contract import CONTRACT, Adapter, compatible, option_help
from sftkit.errors import SftkitError

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "sftkit"
BUILTIN_PLUGINS = tuple(f"sftkit.adapters.{n}" for n in ("alpaca", "messages", "prompt_completion", "sharegpt", "text"))
# A comma-separated list of distributions to load plugins from; empty loads none (tests use this).
LOAD_PLUGINS_ENV = "SFTKIT_LOAD_PLUGINS"


@dataclass(frozen=True)
class InstalledAdapter:
    adapter: Adapter
    distribution: str
    version: str


@dataclass
class Registry:
    adapters: dict[str, InstalledAdapter] = field(default_factory=dict)
    broken: dict[str, str] = field(default_factory=dict)  # distribution -> import error

    def get(self, name: str) -> InstalledAdapter:
        if name in self.adapters:
            return self.adapters[name]
        broken = "".join(f"\n  plugin {dist} failed to load: {err}" for dist, err in self.broken.items())
        raise SftkitError(
            f"dataset_format: no adapter named {name!r}. Installed adapters: {', '.join(sorted(self.adapters))}."
            f"{broken}\nRun `sftkit adapters` to list them, or install the distribution that provides {name!r}."
        )


def _entry_points_to_load() -> list[importlib.metadata.EntryPoint]:
    entry_points = list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))
    allowed = os.environ.get(LOAD_PLUGINS_ENV)
    if allowed is None:
        return entry_points
    names = {name.strip() for name in allowed.split(",") if name.strip()}
    return [ep for ep in entry_points if ep.dist is not None and ep.dist.name in names]


@functools.cache
def plugin_manager() -> tuple[pluggy.PluginManager, dict[str, str]]:
    """The one plugin manager, with built-ins and third-party plugins, and the plugins that failed to load."""
    manager = pluggy.PluginManager("sftkit")
    manager.add_hookspecs(hookspecs)
    broken: dict[str, str] = {}
    for entry_point in _entry_points_to_load():
        distribution = entry_point.dist.name if entry_point.dist else entry_point.value
        try:
            plugin = entry_point.load()
        except Exception as error:  # noqa: BLE001 - a broken plugin must not take the others down: report it by name
            broken[distribution] = f"{type(error).__name__}: {error}"
            logger.warning("sftkit plugin %s (%s) failed to load: %s", distribution, entry_point.value, error)
            continue
        manager.register(plugin, name=f"{distribution}:{entry_point.name}")
    for module_name in BUILTIN_PLUGINS:
        manager.register(importlib.import_module(module_name), name=f"sftkit:{module_name}")
    return manager, broken


def _distribution_of(plugin_name: str) -> tuple[str, str]:
    distribution = plugin_name.split(":", 1)[0]
    if distribution == "sftkit":
        return "sftkit", __version__
    try:
        return distribution, importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return distribution, "unknown"


@functools.cache
def registry() -> Registry:
    """Every installed adapter by name."""
    return collect_adapters(*plugin_manager())


def collect_adapters(manager: pluggy.PluginManager, broken: dict[str, str]) -> Registry:
    """Ask every plugin for its adapters; two adapters claiming one name is an error."""
    found = Registry(broken=dict(broken))
    # Call each implementation on its own so that every adapter is credited to its distribution.
    for impl in manager.hook.register_adapters.get_hookimpls():
        distribution, version = _distribution_of(impl.plugin_name)

        def register(adapter: Adapter, distribution: str = distribution, version: str = version) -> None:
            if not adapter.name:
                raise SftkitError(f"plugin {distribution} registered an adapter without a name: {adapter!r}")
            if not compatible(adapter.contract):  # reported like a plugin that fails to import; the others still load
                found.broken[distribution] = (
                    f"adapter {adapter.name!r} is written for sftkit's adapter contract {adapter.contract}, and this "
                    f"sftkit ({__version__}) speaks contract {CONTRACT} (a plugin needs the same major version and a "
                    f"minor one no newer): install a version of {distribution} for contract "
                    f"{CONTRACT.split('.')[0]}.x, or a sftkit that speaks {adapter.contract}"
                )
                return
            if adapter.name in found.adapters:
                other = found.adapters[adapter.name].distribution
                raise SftkitError(
                    f"two adapters claim the name {adapter.name!r}: one from {other}, one from {distribution}. "
                    f"Uninstall one of them, or set {LOAD_PLUGINS_ENV} to the distributions to load."
                )
            found.adapters[adapter.name] = InstalledAdapter(adapter, distribution, version)

        try:
            impl.function(register=register)
        except SftkitError:
            raise
        except Exception as error:
            raise SftkitError(f"plugin {distribution} failed while registering adapters: {error!r}") from error
    return found


def describe_adapters() -> str:
    """What ``sftkit adapters`` prints: each adapter with its distribution, version, contract and options."""
    import json

    found = registry()
    lines = []
    for name, installed in sorted(found.adapters.items()):
        adapter = installed.adapter
        lines.append(f"{name:<20} {installed.distribution} {installed.version}, contract {adapter.contract}  "
                     f"{adapter.description}")
        for key, default, kind, text in option_help(adapter.Options):
            lines.append(f"{'':<22}{key}: {kind}, default {json.dumps(default)}: {text}")
    for distribution, error in found.broken.items():
        lines.append(f"{'(failed to load)':<20} {distribution}: {error}")
    return "\n".join(lines)
