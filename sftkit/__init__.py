"""sftkit: supervised fine-tuning of causal language models from one recipe file.

For authors of dataset-format plugins, everything is here: ``import sftkit``, then subclass
``sftkit.Adapter``, declare options as a frozen dataclass of ``sftkit.Option`` fields and columns with
``sftkit.Columns``, build
records (``sftkit.Conversation``, ``sftkit.Message``, ...) with the helpers (``sftkit.text``,
``sftkit.role_of``, ``sftkit.tool_calls``, ...), raise ``sftkit.RowError`` for a row that cannot train,
and register the adapter with ``@sftkit.hookimpl``. ``sftkit.CONTRACT`` is the contract's version;
docs/plugins.md walks through a whole plugin.
"""

from sftkit.contract import (
    CONTRACT,
    ROLES,
    Adapter,
    Columns,
    Conversation,
    Detection,
    Function,
    Message,
    NoOptions,
    Option,
    PromptCompletion,
    Record,
    Role,
    RowError,
    Text,
    ToolCall,
)
from sftkit.errors import SftkitError
from sftkit.hookspecs import hookimpl
from sftkit.records import (
    EMPTY_CONTENT,
    INVALID_WEIGHT,
    MALFORMED_TOOL_CALL,
    REASONING_KEYS,
    UNKNOWN_ROLE,
    attach_tools,
    check_role_map,
    detect_turns,
    load_json,
    messages_from_turns,
    name_tool_turns,
    role_of,
    short,
    text,
    tool_call,
    tool_calls,
    tool_definitions,
    turn_fields,
)

__version__ = "0.1.0"
__all__ = [
    "CONTRACT", "EMPTY_CONTENT", "INVALID_WEIGHT", "MALFORMED_TOOL_CALL", "REASONING_KEYS", "ROLES", "UNKNOWN_ROLE", "Adapter", "Columns",
    "Conversation", "Detection", "Function", "Message", "NoOptions", "Option", "PromptCompletion", "Record", "Role",
    "RowError", "SftkitError", "Text", "ToolCall", "attach_tools", "check_role_map", "detect_turns", "hookimpl", "load_json",
    "messages_from_turns", "name_tool_turns", "role_of", "short", "text", "tool_call", "tool_calls",
    "tool_definitions", "turn_fields",
]
