"""Adapters: ShareGPT conversion, options, detection, and the plugin registry's rules."""

from __future__ import annotations

import json

import datasets
import pluggy
import pytest
from helpers import sharegpt_row

from sftkit import hookspecs, plugins
from sftkit.adapt import adapt, choose_adapter, resolve_options
from sftkit.adapters.sharegpt import ShareGPTAdapter
from sftkit.errors import SftkitError
from sftkit.hookspecs import Adapter, RowError, hookimpl
from sftkit.testing import convert_rows, detects


def test_sharegpt_maps_infinity_instruct_roles(sharegpt_rows):
    records = convert_rows(ShareGPTAdapter(), sharegpt_rows[:2])
    assert records[0]["messages"] == [
        {"role": "system", "content": "You are a concise assistant."},
        {"role": "user", "content": "What is 1 + 2?"},
        {"role": "assistant", "content": "1 + 2 = 3."},
    ]
    assert [message["role"] for message in records[1]["messages"]] == ["user", "assistant"]


def test_role_map_is_configurable():
    row = sharegpt_row(0, ("user", "hi"), ("bot", "hello"))
    records = convert_rows(ShareGPTAdapter(), [row], {"role_map": {"user": "user", "bot": "assistant"}})
    assert [message["role"] for message in records[0]["messages"]] == ["user", "assistant"]


def test_unknown_role_names_row_role_and_option():
    rows = [sharegpt_row(0, ("human", "hi"), ("gpt", "hello")), sharegpt_row(1, ("human", "hi"), ("robot", "x"))]
    installed = plugins.InstalledAdapter(ShareGPTAdapter(), "sftkit", "test")
    options = resolve_options(installed.adapter, {})
    adapted = adapt(datasets.Dataset.from_list(rows), installed, options, "train")
    assert adapted["invalid"] == [None, "unknown role"]
    assert "'robot'" in adapted["problem"][1] and "role_map" in adapted["problem"][1]


def test_unknown_option_is_an_error():
    with pytest.raises(SftkitError, match="has no option 'rolemap'.*accepted: content_key, messages_column"):
        convert_rows(ShareGPTAdapter(), [], {"rolemap": {}})


def test_unread_columns_are_dropped(sharegpt_rows):
    installed = plugins.InstalledAdapter(ShareGPTAdapter(), "sftkit", "test")
    adapted = adapt(datasets.Dataset.from_list(sharegpt_rows), installed, resolve_options(installed.adapter, {}), "t")
    assert adapted.column_names == ["record", "invalid", "problem"]
    assert json.loads(adapted["record"][0]) == {"messages": [
        {"role": "system", "content": "You are a concise assistant."},
        {"role": "user", "content": "What is 1 + 2?"},
        {"role": "assistant", "content": "1 + 2 = 3."},
    ]}


def test_auto_detects_sharegpt_and_says_why(sharegpt_rows):
    dataset = datasets.Dataset.from_list(sharegpt_rows)
    installed, reason = choose_adapter("auto", dataset, plugins.registry())
    assert installed.adapter.name == "sharegpt"
    assert "conversations" in reason
    assert detects(ShareGPTAdapter(), [{"text": "x"}]) is None


def test_no_match_lists_columns_and_adapters():
    dataset = datasets.Dataset.from_list([{"question": "q", "answer": "a"}])
    with pytest.raises(SftkitError) as error:
        choose_adapter("auto", dataset, plugins.registry())
    assert "['question', 'answer']" in str(error.value) and "sharegpt" in str(error.value)


def test_unknown_format_name_lists_installed():
    dataset = datasets.Dataset.from_list([{"text": "x"}])
    with pytest.raises(SftkitError, match="no adapter named 'shargpt'. Installed adapters: .*sharegpt"):
        choose_adapter("shargpt", dataset, plugins.registry())


class Echo(Adapter):
    name = "echo"
    description = "test adapter"

    def detect(self, columns, rows):
        return "has conversations" if "conversations" in columns else None


class EchoPlugin:
    @hookimpl
    def register_adapters(self, register):
        register(Echo())


def _registry(*extra_plugins) -> plugins.Registry:
    manager = pluggy.PluginManager("sftkit")
    manager.add_hookspecs(hookspecs)
    manager.register(__import__("sftkit.adapters.sharegpt", fromlist=["x"]), name="sftkit:sharegpt")
    for position, plugin in enumerate(extra_plugins):
        manager.register(plugin, name=f"thirdparty-{position}:plugin")
    return plugins.collect_adapters(manager, {})


def test_ambiguous_detection_is_an_error(sharegpt_rows):
    dataset = datasets.Dataset.from_list(sharegpt_rows)
    with pytest.raises(SftkitError, match="several adapters recognise .*echo, sharegpt"):
        choose_adapter("auto", dataset, _registry(EchoPlugin()))


def test_two_adapters_claiming_one_name_is_an_error():
    with pytest.raises(SftkitError, match="two adapters claim the name 'echo'"):
        _registry(EchoPlugin(), EchoPlugin())


def test_adapters_are_credited_to_their_distribution():
    registry = _registry(EchoPlugin())
    assert registry.adapters["sharegpt"].distribution == "sftkit"
    assert registry.adapters["echo"].distribution == "thirdparty-0"


def test_row_error_is_a_value_error():
    assert issubclass(RowError, ValueError)
