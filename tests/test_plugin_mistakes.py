"""Plugin authors' mistakes: each is reported by the plugin's or the adapter's name and says what to do, and none
takes the other plugins, the other rows or ``dataset_format: auto`` down with it. ``--debug`` shows the traceback."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import datasets
import pluggy
import pytest
from helpers import sharegpt_row
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import sftkit
from sftkit import Adapter, Columns, RowError, hookimpl, hookspecs, plugins
from sftkit.adapters.messages import MessagesAdapter
from sftkit.contract import BROKEN_CONTRACT, DEBUG_ENV, RowView
from sftkit.data.adapt import choose_adapter, resolve_options
from sftkit.data.on_demand import on_demand_rows
from sftkit.data.plan import SourceRows
from sftkit.data.rows import RowChain, prepare_rows
from sftkit.data.templates import reply_end
from sftkit.data.tokenization import TokenizeSettings
from sftkit.errors import SftkitError
from sftkit.testing import convert_rows, detects


def chain(tokenizer, adapter: Adapter) -> RowChain:
    end_of_turn, appended, _ = reply_end(tokenizer)
    return RowChain(adapter, resolve_options(adapter, {}), tokenizer, TokenizeSettings(
        max_length=None, truncate=False, truncation_mode="keep_start", long_rows="truncate", assistant_only_loss=True,
        completion_only_loss=None, end_of_turn=end_of_turn, eos_after_replies=appended))


def registry_with(*adapters: Adapter) -> plugins.Registry:
    """sharegpt, and each of ``adapters`` registered by a plugin of its own distribution, thirdparty-N."""
    manager = pluggy.PluginManager("sftkit")
    manager.add_hookspecs(hookspecs)
    manager.register(__import__("sftkit.adapters.sharegpt", fromlist=["x"]), name="sftkit:sharegpt")
    for position, adapter in enumerate(adapters):
        plugin = types.SimpleNamespace(register_adapters=hookimpl(lambda register, adapter=adapter: register(adapter)))
        manager.register(plugin, name=f"thirdparty-{position}:plugin")
    return plugins.collect_adapters(manager, {})


# ---------------------------------------------------------------- the row an adapter is handed


class FAQ(Adapter):
    """Declares question (required) and topic (optional); ``read`` is what else its convert does with the row."""

    name = "faq"

    def __init__(self, read: Callable | None = None) -> None:
        self.read, self.seen = read, []

    def columns(self, options):
        return Columns(required=("question",), optional=("topic",))

    def convert(self, row, options):
        self.seen.append(dict(row))
        if self.read:
            self.read(row)
        return {"messages": [{"role": "user", "content": row["question"]}, {"role": "assistant", "content": "ok"}]}


def through_testing(adapter, rows, tokenizer):
    return convert_rows(adapter, rows)


def through_the_chain(adapter, rows, tokenizer):  # lazy, streamed and packed runs, sftkit check
    return chain(tokenizer, adapter)(rows)


def through_eager_preparation(adapter, rows, tokenizer):
    return prepare_rows(datasets.Dataset.from_list(rows), chain(tokenizer, adapter), "train", "view")


def through_rows_drawn_on_demand(adapter, rows, tokenizer):
    return on_demand_rows([SourceRows("faq", chain(tokenizer, adapter), datasets.Dataset.from_list(rows))], [0])[0]


PATHS = [through_testing, through_the_chain, through_eager_preparation, through_rows_drawn_on_demand]


def reads_of(column: str) -> dict[str, Callable]:
    """Every way an adapter may ask a row for a column."""
    return {"row[...]": lambda row: row[column], "row.get(...)": lambda row: row.get(column),
            "row.get(..., default)": lambda row: row.get(column, ""), "... in row": lambda row: column in row}


@pytest.mark.parametrize("path", PATHS)
def test_every_way_to_convert_hands_the_adapter_exactly_its_declared_columns(path, tokenizer):
    adapter = FAQ()
    path(adapter, [{"question": "Why?", "context": "unread", "stray": 3}], tokenizer)
    assert adapter.seen == [{"question": "Why?", "topic": None}]


@pytest.mark.parametrize("read", list(reads_of("context").values()), ids=list(reads_of("context")))
@pytest.mark.parametrize("path", PATHS)
def test_reading_an_undeclared_column_stops_with_the_adapter_and_the_column(path, read, tokenizer):
    """Not a row error: every row would read nothing there, so skipping rows would hide a plugin's bug."""
    with pytest.raises(SftkitError) as error:
        path(FAQ(read), [{"question": "Why?", "context": "the data has it"}], tokenizer)
    assert "adapter 'faq' read column 'context', which its columns() does not declare" in str(error.value)
    assert "add 'context' to the required or optional columns that columns() returns" in str(error.value)


names = st.text(min_size=1, max_size=5)


@settings(max_examples=200, deadline=None)
@given(declared=st.lists(names, unique=True, max_size=5), row=st.dictionaries(names, st.integers(), max_size=6),
       other=names)
def test_a_row_view_holds_the_declared_columns_and_refuses_every_other(declared, row, other):
    view = RowView("qa", declared, row)
    assert list(view) == declared and dict(view) == {column: row.get(column) for column in declared}
    assume(other not in declared)
    for read in reads_of(other).values():
        with pytest.raises(SftkitError) as error:
            read(view)
        assert f"adapter 'qa' read column {other!r}, which its columns() does not declare" in str(error.value)


# ---------------------------------------------------------------- what convert returns


class Returns(Adapter):
    """Returns ``made`` from convert, whatever the row."""

    name = "returns"

    def __init__(self, made) -> None:
        self.made = made

    def columns(self, options):
        return Columns(required=("text",))

    def convert(self, row, options):
        return self.made


@pytest.mark.parametrize("made", [None, [], [{"role": "assistant", "content": "hi"}], "hi", ("text", "hi")],
                         ids=["None", "empty list", "list of turns", "text", "tuple"])
def test_convert_returning_no_record_is_a_row_error_that_names_the_adapter(made, tokenizer):
    rows = [{"text": "a"}, {"text": "b"}]
    prepared = prepare_rows(datasets.Dataset.from_list(rows), chain(tokenizer, Returns(made)), "train", "returns")
    assert prepared["invalid"] == [BROKEN_CONTRACT, BROKEN_CONTRACT]  # counted and skipped by the policy, not raised
    assert "adapter 'returns' broke the adapter contract: its convert() returned" in prepared["problem"][0]
    with pytest.raises(RowError) as error:
        convert_rows(Returns(made), rows)
    assert error.value.reason == BROKEN_CONTRACT


@pytest.mark.parametrize(("made", "wrong"), [
    ({"messages": [{"role": "bot", "content": "hi"}]}, "made turn 0 of the messages with role 'bot'"),
    ({"prompt": [{"content": "hi"}], "completion": "ok"}, "made turn 0 of the prompt with role None"),
    ({"messages": ["hi"]}, "made turn 0 of the messages with 'hi', not a mapping,"),
    ({"reply": "hi"}, "made a record of 'reply', where the contract asks for messages, prompt and completion, or text"),
])
def test_a_record_outside_the_contract_is_the_adapters_fault_and_says_so(made, wrong):
    with pytest.raises(RowError) as error:
        convert_rows(Returns(made), [{"text": "a"}])
    assert error.value.reason == BROKEN_CONTRACT and f"adapter 'returns' {wrong}" in str(error.value)
    if "role" in wrong:
        assert "the data is not at fault" in str(error.value)


def test_an_unknown_speaker_in_the_data_is_the_datas_and_names_the_option_that_maps_it():
    with pytest.raises(RowError) as error:
        convert_rows(MessagesAdapter(), [{"messages": [{"role": "robot", "content": "hi"}]}])
    assert error.value.reason == "unknown role"
    assert "has unknown role 'robot'; map it with dataset_options: {role_map: {robot: " in str(error.value)


def test_role_map_helpers_name_the_option_as_the_adapter_calls_it():
    with pytest.raises(ValueError, match="speakers maps 'bot' to 'robot'; roles are"):
        sftkit.check_role_map({"bot": "robot"}, sftkit.ROLES, "speakers")
    with pytest.raises(RowError, match="map it with dataset_options: {speakers: {bot: user"):
        sftkit.messages_from_turns([{"role": "bot", "content": "hi"}], "turns", {}, "speakers")


# ---------------------------------------------------------------- detect


class DetectRaises(Adapter):
    name = "flaky"

    def detect(self, columns, rows):
        return rows[0]["conversations"][5]  # a bug: an index that most rows do not have


class DetectSaysYes(Adapter):
    name = "eager"

    def detect(self, columns, rows):
        return "conversations" in columns  # a bool, where the contract asks for a reason


@pytest.mark.parametrize(("adapter", "problem"), [
    (DetectRaises(), "adapter 'flaky': detect() raised IndexError: list index out of range"),
    (DetectSaysYes(), "adapter 'eager': detect() returned True; the adapter contract 1.0 asks for the reason it fits"),
])
def test_a_broken_detect_is_left_out_of_auto_by_name_and_the_others_still_detect(adapter, problem, caplog):
    rows = [sharegpt_row(0, ("human", "hi"), ("gpt", "hello"))]
    with caplog.at_level(logging.WARNING, logger="sftkit"):
        installed, reason, _ = choose_adapter("auto", datasets.Dataset.from_list(rows), registry_with(adapter))
    assert installed.adapter.name == "sharegpt" and reason.startswith("dataset_format auto: sharegpt")
    assert f"dataset_format auto leaves out adapter {adapter.name!r} (from thirdparty-0 unknown)" in caplog.text
    assert problem in caplog.text
    with pytest.raises(SftkitError, match=f"{adapter.name} left out: detect\\(\\) failed"):
        choose_adapter("auto", datasets.Dataset.from_list([{"other": 1}]), registry_with(adapter))
    with pytest.raises(SftkitError) as error:  # what an author's test hears
        detects(adapter, rows)
    assert problem in str(error.value)


# ---------------------------------------------------------------- registering


@dataclass
class NoDefault:
    column: str


@dataclass
class UnknownType:
    column: NoSuchType = "text"  # noqa: F821 - the annotation names a type that cannot be found


class PlainOptions:
    column = "text"


@pytest.mark.parametrize(("options", "problem"), [
    (PlainOptions, ("Options is <class 'test_plugin_mistakes.PlainOptions'>, not a dataclass; declare it as a "
                    "@dataclass(frozen=True) class")),
    (NoDefault(column="text"), "Options is NoDefault(column='text'), not a dataclass"),
    (NoDefault, "Options field 'column' has no default; declare each field as `key: type = sftkit.Option("),
    (UnknownType, "the types of its Options fields cannot be read (NameError: name 'NoSuchType' is not defined)"),
])
def test_options_the_contract_cannot_read_leave_the_plugin_out_by_name(options, problem, monkeypatch):
    adapter = type("Odd", (Adapter,), {"name": "odd", "Options": options})()
    registry = registry_with(adapter)
    assert "odd" not in registry.adapters and "sharegpt" in registry.adapters
    assert registry.broken["thirdparty-0"].startswith(f"adapter 'odd': {problem}")
    monkeypatch.setattr(plugins, "registry", lambda: registry)
    listing = plugins.describe_adapters()  # `sftkit adapters` lists the others, and this one as failed
    assert listing.startswith("sharegpt ") and "(failed to load)     thirdparty-0: adapter 'odd': " in listing


def hooks_module(**functions: Callable) -> types.ModuleType:
    module = types.ModuleType("sftkit_author")
    for name, function in functions.items():
        setattr(module, name, function)
    return module


def nothing() -> Callable:
    """A new function that registers nothing (``hookimpl`` marks the function it is given, so each needs its own)."""
    return lambda register: None


@pytest.mark.parametrize(("plugin", "problem"), [
    (hooks_module(register_adapter=hookimpl(nothing())),
     "it implements 'register_adapter', which is not an sftkit hook: did you mean 'register_adapters'?"),
    (hooks_module(register_adapters=nothing()),
     "its register_adapters is not marked with @sftkit.hookimpl, so sftkit never calls it"),
    (hooks_module(),
     "it implements no sftkit hook: define register_adapters(register), marked with @sftkit.hookimpl"),
    (hooks_module(register_adapters=hookimpl(lambda reg: None)),
     ("hookimpl definition: <lambda>(reg); Argument(s) {'reg'} are declared in the hookimpl but can not be found in "
      "the hookspec: sftkit's hooks are register_adapters(register)")),
])
def test_a_plugin_that_would_register_nothing_says_why_by_its_hooks_name(plugin, problem):
    manager = pluggy.PluginManager("sftkit")
    manager.add_hookspecs(hookspecs)
    assert plugins.add_plugin(manager, plugin, "sftkit-author:author") == problem
    assert not manager.is_registered(plugin)


def test_a_misspelt_hook_beside_a_right_one_is_a_warning(caplog):
    manager = pluggy.PluginManager("sftkit")
    manager.add_hookspecs(hookspecs)
    plugin = hooks_module(register_adapters=hookimpl(nothing()), register_adaptors=hookimpl(nothing()))
    with caplog.at_level(logging.WARNING, logger="sftkit"):
        assert plugins.add_plugin(manager, plugin, "sftkit-author:author") is None
    assert manager.is_registered(plugin)
    assert "sftkit plugin sftkit-author:author: it implements 'register_adaptors', which is not an sftkit hook: did " \
           "you mean 'register_adapters'?" in caplog.text


def fake_distribution(site: Path, name: str, module: str, source: str) -> None:
    """An installed distribution with an ``sftkit`` entry point: its metadata and its module, as pip leaves them."""
    (site / f"{module}.py").write_text(source)
    info = site / f"{module}-0.0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.0.1\n")
    (info / "entry_points.txt").write_text(f"[sftkit]\n{module} = {module}\n")


def sftkit_command(site: Path, load: str, *arguments: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site), plugins.LOAD_PLUGINS_ENV: load}
    env.pop(DEBUG_ENV, None)
    return subprocess.run([sys.executable, "-m", "sftkit", *arguments], env=env, cwd=site, capture_output=True,
                          text=True, timeout=120, check=False)


def test_sftkit_adapters_names_each_plugin_that_loads_nothing_and_lists_the_others(tmp_path):
    fake_distribution(tmp_path, "sftkit-typo", "sftkit_typo",
                      "import sftkit\n\n@sftkit.hookimpl\ndef register_adapter(register):\n    pass\n")
    fake_distribution(tmp_path, "sftkit-unmarked", "sftkit_unmarked", "def register_adapters(register):\n    pass\n")
    result = sftkit_command(tmp_path, "SFTKit_Typo, sftkit-unmarked, sftkit-qaa", "adapters")
    assert result.returncode == 0, result.stderr
    assert ("(failed to load)     sftkit-typo: plugin sftkit_typo: it implements 'register_adapter', which is not an "
            "sftkit hook: did you mean 'register_adapters'?") in result.stdout
    assert "sftkit-unmarked: plugin sftkit_unmarked: its register_adapters is not marked with @sftkit.hookimpl" \
        in result.stdout
    assert ("sftkit-qaa: SFTKIT_LOAD_PLUGINS names sftkit-qaa, but no installed distribution of that name has an "
            "sftkit plugin (those that do: sftkit-typo, sftkit-unmarked)") in result.stdout
    assert result.stdout.count("(failed to load)") == 3 and "\nsharegpt " in result.stdout
    assert "sftkit: sftkit plugin sftkit-qaa left out" in result.stderr  # and a warning, as every run gives


# ---------------------------------------------------------------- seeing the traceback


def test_debug_lets_an_adapters_exception_through_with_its_traceback(monkeypatch, tokenizer):
    rows = [{"question": "Why?", "context": "the data has it"}]
    broken = FAQ(lambda row: row["question"] + 1)
    with pytest.raises(RowError, match=r"adapter 'faq' failed on this row: TypeError: .* \(SFTKIT_DEBUG=1 shows where\)"):
        convert_rows(broken, rows)
    monkeypatch.setenv(DEBUG_ENV, "1")
    with pytest.raises(TypeError):
        convert_rows(broken, rows)
    with pytest.raises(TypeError):
        chain(tokenizer, broken)(rows)
    with pytest.raises(IndexError):
        choose_adapter("auto", datasets.Dataset.from_list([sharegpt_row(0, ("human", "hi"), ("gpt", "hello"))]),
                       registry_with(DetectRaises()))


def test_the_debug_flag_works_with_any_command_and_shows_where_a_plugin_failed(tmp_path):
    fake_distribution(tmp_path, "sftkit-raises", "sftkit_raises",
                      "import sftkit\n\n@sftkit.hookimpl\ndef register_adapters(register):\n"
                      "    raise ValueError('a bug in the plugin')\n")
    plain = sftkit_command(tmp_path, "sftkit-raises", "adapters")
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    assert ("sftkit: error: plugin sftkit-raises failed while registering adapters: ValueError('a bug in the plugin')"
            in plain.stderr)
    debugged = sftkit_command(tmp_path, "sftkit-raises", "adapters", "--debug")
    assert "Traceback" in debugged.stderr and "sftkit_raises.py\", line 5, in register_adapters" in debugged.stderr
    assert debugged.stderr.rstrip().endswith("ValueError: a bug in the plugin")
