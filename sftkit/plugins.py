"""Finds adapters: built-in ones and those of installed distributions in the ``sftkit`` entry-point group."""

from __future__ import annotations

import difflib
import functools
import importlib
import importlib.metadata
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any

import pluggy

from sftkit import __version__, hookspecs
from sftkit.contract import CONTRACT, Adapter, compatible, debugging, option_help, options_problem
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


def _normalized(distribution: str) -> str:
    """A distribution's name as pip compares them: sftkit_qa, sftkit.qa and SFTKit-QA are sftkit-qa."""
    return re.sub(r"[-_.]+", "-", distribution).lower()


def _entry_points_to_load(broken: dict[str, str]) -> list[importlib.metadata.EntryPoint]:
    """The entry points to load: all, or those of the distributions LOAD_PLUGINS_ENV names; a name that no installed
    distribution with a plugin has is reported in ``broken``, so that a typo is not a plugin silently missing."""
    entry_points = list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))
    allowed = os.environ.get(LOAD_PLUGINS_ENV)
    if allowed is None:
        return entry_points
    names = {_normalized(name.strip()) for name in allowed.split(",") if name.strip()}
    installed = sorted({ep.dist.name for ep in entry_points if ep.dist is not None})
    for name in sorted(names - {_normalized(distribution) for distribution in installed}):
        _refuse(broken, name, f"{LOAD_PLUGINS_ENV} names {name}, but no installed distribution of that name has an "
                f"sftkit plugin (those that do: {', '.join(installed) or 'none'}); install it, or correct the name")
    return [ep for ep in entry_points if ep.dist is not None and _normalized(ep.dist.name) in names]


def _refuse(broken: dict[str, str], distribution: str, problem: str) -> None:
    """A plugin left out: listed by ``sftkit adapters`` and by the error for an adapter name not found, and warned."""
    broken[distribution] = problem
    logger.warning("sftkit plugin %s left out: %s", distribution, problem)


def add_plugin(manager: pluggy.PluginManager, plugin: Any, name: str) -> str | None:
    """Register a plugin module; what is wrong with it when it gives sftkit nothing (then it is left out).

    pluggy alone registers a plugin whose hook is misspelt or lacks ``@sftkit.hookimpl`` as one that implements
    nothing, and refuses one whose hook takes parameters the hook does not pass with a traceback; each is said here,
    by the hook's name. A misspelt hook beside a right one is a warning.
    """
    specs = {hook: caller.spec.argnames for hook, caller in vars(manager.hook).items() if caller.spec is not None}
    hooks = sorted(specs)
    signatures = ", ".join(f"{hook}({', '.join(specs[hook])})" for hook in hooks)
    try:
        manager.register(plugin, name=name)
    except pluggy.PluginValidationError as error:
        manager.unregister(plugin)  # pluggy keeps a plugin it refused half-registered
        return f"{'; '.join(str(error).splitlines()[1:])}: sftkit's hooks are {signatures}"
    implemented = [caller.name for caller in manager.get_hookcallers(plugin) or []]
    unknown = [_unknown_hook(hook, hooks, signatures) for hook in implemented if hook not in hooks]
    if len(unknown) < len(implemented):
        for problem in unknown:
            logger.warning("sftkit plugin %s: %s", name, problem)
        return None
    manager.unregister(plugin)
    if unknown:
        return "; ".join(unknown)
    unmarked = [hook for hook in hooks if callable(getattr(plugin, hook, None))]
    if unmarked:
        return f"its {', '.join(unmarked)} is not marked with @sftkit.hookimpl, so sftkit never calls it"
    return f"it implements no sftkit hook: define {signatures}, marked with @sftkit.hookimpl"


def _unknown_hook(hook: str, hooks: list[str], signatures: str) -> str:
    close = difflib.get_close_matches(hook, hooks, n=1)
    return f"it implements {hook!r}, which is not an sftkit hook" + (
        f": did you mean {close[0]!r}?" if close else f" (sftkit's hooks: {signatures})")


@functools.cache
def plugin_manager() -> tuple[pluggy.PluginManager, dict[str, str]]:
    """The one plugin manager, with built-ins and third-party plugins, and the plugins that failed to load."""
    manager = pluggy.PluginManager("sftkit")
    manager.add_hookspecs(hookspecs)
    broken: dict[str, str] = {}
    for entry_point in _entry_points_to_load(broken):
        distribution = entry_point.dist.name if entry_point.dist else entry_point.value
        try:
            plugin = entry_point.load()
        except Exception as error:  # a broken plugin must not take the others down: report it by name
            if debugging():
                raise
            _refuse(broken, distribution, f"{type(error).__name__}: {error}")
            continue
        if (problem := add_plugin(manager, plugin, f"{distribution}:{entry_point.name}")) is not None:
            _refuse(broken, distribution, f"plugin {entry_point.value}: {problem}")
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
                _refuse(found.broken, distribution, (
                    f"adapter {adapter.name!r} is written for sftkit's adapter contract {adapter.contract}, and this "
                    f"sftkit ({__version__}) speaks contract {CONTRACT} (a plugin needs the same major version and a "
                    f"minor one no newer): install a version of {distribution} for contract "
                    f"{CONTRACT.split('.')[0]}.x, or a sftkit that speaks {adapter.contract}"
                ))
                return
            if (problem := options_problem(adapter)) is not None:  # else `sftkit adapters` and every run would fail
                _refuse(found.broken, distribution, problem)
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
            if debugging():
                raise
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
