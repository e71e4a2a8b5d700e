"""Adapters: ShareGPT conversion, options, detection, and the plugin registry's rules."""

from __future__ import annotations

import datasets
import pluggy
import pytest
from helpers import sharegpt_row

from sftkit import Adapter, Columns, RowError, hookimpl, hookspecs, plugins
from sftkit.adapters.sharegpt import ShareGPTAdapter
from sftkit.data.adapt import choose_adapter, resolve_options
from sftkit.data.rows import PREPARED, RowChain, prepare_rows
from sftkit.data.templates import reply_end
from sftkit.data.tokenization import TokenizeSettings
from sftkit.errors import SftkitError
from sftkit.testing import convert_rows, detects


def chain(tokenizer, adapter: Adapter, options: dict | None = None) -> RowChain:
    end_of_turn, appended, _ = reply_end(tokenizer)
    settings = TokenizeSettings(max_length=None, truncate=False, truncation_mode="keep_start", long_rows="truncate",
                                assistant_only_loss=True, completion_only_loss=None, end_of_turn=end_of_turn,
                                eos_after_replies=appended)
    return RowChain(adapter, resolve_options(adapter, options or {}), tokenizer, settings)


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


def test_unknown_role_names_row_role_and_option(tokenizer):
    rows = [sharegpt_row(0, ("human", "hi"), ("gpt", "hello")), sharegpt_row(1, ("human", "hi"), ("robot", "x"))]
    prepared = prepare_rows(datasets.Dataset.from_list(rows), chain(tokenizer, ShareGPTAdapter()), "train", "roles")
    assert prepared["invalid"] == [None, "unknown role"]
    assert "'robot'" in prepared["problem"][1] and "role_map" in prepared["problem"][1]


def test_unknown_option_is_an_error():
    with pytest.raises(SftkitError, match="has no option 'rolemap'.*accepted: content_key, messages_column"):
        convert_rows(ShareGPTAdapter(), [], {"rolemap": {}})


def test_unread_columns_are_dropped(tokenizer, sharegpt_rows):
    prepared = prepare_rows(datasets.Dataset.from_list(sharegpt_rows), chain(tokenizer, ShareGPTAdapter()), "t", "cols")
    assert prepared.column_names == list(PREPARED)
    assert chain(tokenizer, ShareGPTAdapter()).record(sharegpt_rows[0]) == {"messages": [
        {"role": "system", "content": "You are a concise assistant."},
        {"role": "user", "content": "What is 1 + 2?"},
        {"role": "assistant", "content": "1 + 2 = 3."},
    ]}


def test_auto_detects_sharegpt_and_says_why(sharegpt_rows):
    dataset = datasets.Dataset.from_list(sharegpt_rows)
    installed, reason, options = choose_adapter("auto", dataset, plugins.registry())
    assert installed.adapter.name == "sharegpt" and options == {}
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


class Crashes(Adapter):
    """A plugin with a bug: a null context fails a concatenation."""

    name = "crashes"

    def columns(self, options):
        return Columns(required=("instruction", "context"))

    def convert(self, row, options):
        return {"messages": [{"role": "user", "content": row["instruction"] + row["context"]},
                             {"role": "assistant", "content": "ok"}]}


def test_an_adapters_own_exception_is_that_rows_error_not_the_runs(tokenizer):
    rows = [{"instruction": "a", "context": "b"}, {"instruction": "a", "context": None}]
    prepared = prepare_rows(datasets.Dataset.from_list(rows), chain(tokenizer, Crashes()), "train", "crash")
    assert prepared["invalid"] == [None, "rejected by adapter"]
    assert "adapter 'crashes' failed on this row: TypeError" in prepared["problem"][1]
    with pytest.raises(RowError, match="failed on this row"):
        convert_rows(Crashes(), rows[1:])


class FromTheFuture(Adapter):
    name = "future"
    contract = "2.0"

    def columns(self, options):
        return Columns(required=("text",))


class FuturePlugin:
    @hookimpl
    def register_adapters(self, register):
        register(FromTheFuture())


def test_a_plugin_for_an_incompatible_contract_is_reported_and_the_others_load():
    registry = _registry(FuturePlugin())
    assert "future" not in registry.adapters and "sharegpt" in registry.adapters
    assert "written for sftkit's adapter contract 2.0" in registry.broken["thirdparty-0"]
    with pytest.raises(SftkitError, match="(?s)no adapter named 'future'.*contract 2.0"):
        registry.get("future")


class OldColumns(Adapter):
    """Declares its columns as a bare list, as no version of the contract does."""

    name = "old"

    def columns(self, options):
        return ["text"]

    def convert(self, row, options):
        return {"text": row["text"]}


def test_columns_that_are_not_declared_with_columns_are_a_clear_error():
    with pytest.raises(SftkitError, match="adapter 'old': columns\\(\\) returned list; .* asks for sftkit.Columns"):
        convert_rows(OldColumns(), [{"text": "hi"}])


def test_built_in_adapters_and_the_plugin_template_use_only_the_public_api():
    """What sftkit's own adapters import, a third-party one can: ``sftkit`` itself, nothing private."""
    import ast

    from helpers import ROOT

    files = [*(ROOT / "sftkit" / "adapters").glob("*.py"), ROOT / "plugins" / "sftkit-dolly" / "sftkit_dolly" / "__init__.py"]
    for file in files:
        for node in ast.walk(ast.parse(file.read_text())):
            modules = [node.module] if isinstance(node, ast.ImportFrom) else (
                [alias.name for alias in node.names] if isinstance(node, ast.Import) else [])
            private = [module for module in modules if module and module.startswith("sftkit.")]
            assert not private, f"{file.name} imports {private}; adapters use `import sftkit` only"


def test_an_options_default_mapping_is_its_own_in_every_run():
    from sftkit.adapters.sharegpt import ShareGPTOptions

    first, second = ShareGPTOptions(), ShareGPTOptions()
    assert first.role_map == second.role_map and first.role_map is not second.role_map


def test_option_values_are_checked_inside_mappings():
    with pytest.raises(SftkitError, match="role_map of adapter 'sharegpt' must be mapping of string to string, got"):
        resolve_options(ShareGPTAdapter(), {"role_map": {"bot": 3}})
