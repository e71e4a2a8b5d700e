"""The Ollama Modelfile for an exported GGUF file: the chat template as an Ollama (Go) TEMPLATE, the stop tokens
as ``PARAMETER stop``, greedy decoding where the model's generation config does not sample, and the system
message the chat template writes when a conversation has none.

Ollama does not run Jinja, so the template is read off the model's own chat template: conversations of marker
messages are rendered, and what the template writes around each role's text is taken from between the markers.
That reading is proved before anything is written: the Go template, rendered here as Ollama renders it, must give
the same text as the chat template for the held-out prompts and a probe conversation of several turns; a chat
template it cannot be read off that way is an error that says to use ``--to gguf`` (llama.cpp reads the
template from the file).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from sftkit.contract import RowError
from sftkit.data.templates import render
from sftkit.errors import SftkitError

MODELFILE = "Modelfile"
SYSTEM, USER, ASSISTANT, NEXT = "\x00sftkit-system\x00", "\x00sftkit-user\x00", "\x00sftkit-assistant\x00", \
    "\x00sftkit-next\x00"
PROBE = [{"role": "user", "content": "What is 3 + 4?"}, {"role": "assistant", "content": "3 + 4 = 7."},
         {"role": "user", "content": "And 5 + 6?"}]


@dataclass(frozen=True)
class Wrappers:
    """What the chat template writes around each message's text, and where the assistant's answer begins."""
    head: str  # before the first message (a BOS the template writes itself)
    system: str
    user: str
    assistant: str  # the generation prompt
    end: str  # after each message
    default_system: str | None  # the system message the template writes when a conversation has none


def _between(text: str, before: str, after: str) -> str:
    start = text.index(before) + len(before)
    return text[start:text.index(after, start)]


def read_wrappers(tokenizer: PreTrainedTokenizerBase) -> Wrappers:
    """The chat template's wrappers, read off renderings of marker messages."""
    def rendered(messages: list[dict[str, str]], generation_prompt: bool) -> str:
        return render(tokenizer, messages, None, generation_prompt=generation_prompt)

    system = {"role": "system", "content": SYSTEM}
    user, assistant = {"role": "user", "content": USER}, {"role": "assistant", "content": ASSISTANT}
    full = rendered([system, user, assistant, {"role": "user", "content": NEXT}], True)
    closed = rendered([system, user], False)
    generation = rendered([system, user], True)[len(closed):]
    after_user = _between(full, USER, ASSISTANT)
    if not generation or not after_user.endswith(generation):
        raise ValueError("the generation prompt is not what precedes an assistant's reply")
    end = after_user[: -len(generation)]
    after_system, after_assistant = _between(full, SYSTEM, USER), _between(full, ASSISTANT, NEXT)
    if not after_system.startswith(end) or after_system != after_assistant:
        raise ValueError("the roles do not end alike")
    before_system = full[: full.index(SYSTEM)]
    user_prefix = after_system[len(end):]
    alone = rendered([user], True)
    tail = f"{user_prefix}{USER}{end}{generation}"
    if not alone.endswith(tail):
        raise ValueError("a lone user message is not rendered as in a conversation")
    opening = alone[: -len(tail)]
    if opening.startswith(before_system) and opening.endswith(end) and len(opening) > len(before_system + end):
        # A system message of the template's own, written when the conversation has none.
        head, default = "", opening[len(before_system): -len(end)]
    elif before_system.startswith(opening):  # what every conversation opens with (a BOS the template writes)
        head, default = opening, None
    else:
        raise ValueError("the template opens a conversation without a system message in another way")
    system_prefix = before_system[len(head):]
    return Wrappers(head, system_prefix, user_prefix, generation, end, default)


def render_like_ollama(wrappers: Wrappers, messages: Sequence[Mapping[str, Any]], system: str | None) -> str:
    """The text Ollama renders from ``go_template(wrappers)``: the Modelfile's SYSTEM leads a conversation that
    has no system message of its own."""
    if system and not (messages and messages[0]["role"] == "system"):
        messages = [{"role": "system", "content": system}, *messages]
    text = wrappers.head
    for index, message in enumerate(messages):
        last = index == len(messages) - 1
        if message["role"] == "assistant":
            text += wrappers.assistant + message["content"] + ("" if last else wrappers.end)
        else:
            prefix = wrappers.system if message["role"] == "system" else wrappers.user
            text += prefix + message["content"] + wrappers.end + (wrappers.assistant if last else "")
    return text


def go_template(wrappers: Wrappers) -> str:
    """Ollama's TEMPLATE: Go's text/template over ``.Messages``, without whitespace trimming, so every newline the
    chat template writes stays."""
    parts = [wrappers.head, wrappers.system, wrappers.user, wrappers.assistant, wrappers.end]
    if any("{{" in part or '"""' in part for part in parts):
        raise ValueError("the template writes '{{' or '\"\"\"', which a Modelfile TEMPLATE cannot hold")
    return (f"{wrappers.head}{{{{ range $i, $_ := .Messages }}}}{{{{ $last := eq (len (slice $.Messages $i)) 1 }}}}"
            f'{{{{ if eq .Role "system" }}}}{wrappers.system}{{{{ .Content }}}}{wrappers.end}'
            f"{{{{ if $last }}}}{wrappers.assistant}{{{{ end }}}}"
            f'{{{{ else if eq .Role "user" }}}}{wrappers.user}{{{{ .Content }}}}{wrappers.end}'
            f"{{{{ if $last }}}}{wrappers.assistant}{{{{ end }}}}"
            f'{{{{ else if eq .Role "assistant" }}}}{wrappers.assistant}{{{{ .Content }}}}'
            f"{{{{ if not $last }}}}{wrappers.end}{{{{ end }}}}{{{{ end }}}}{{{{ end }}}}")


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass(frozen=True)
class Modelfile:
    text: str
    wrappers: Wrappers
    proved_on: int  # conversations whose Ollama rendering is the chat template's


def modelfile(tokenizer: PreTrainedTokenizerBase, gguf_name: str, stops: Sequence[str], greedy: bool,
              conversations: Sequence[Sequence[Mapping[str, Any]]]) -> Modelfile:
    """The Modelfile for ``gguf_name`` (beside it), its template proved on ``conversations`` and a probe."""
    try:
        wrappers = read_wrappers(tokenizer)
        template = go_template(wrappers)
    except (ValueError, RowError) as error:
        raise SftkitError(f"the model's chat template cannot be written as an Ollama TEMPLATE ({error}); export "
                          "with --to gguf instead: llama.cpp reads the chat template from the file") from None
    proved = [*conversations, PROBE]
    for messages in proved:
        expected = render(tokenizer, messages, None, generation_prompt=messages[-1]["role"] != "assistant")
        if render_like_ollama(wrappers, messages, wrappers.default_system) != expected:
            raise SftkitError("the Ollama TEMPLATE read off the chat template renders a conversation differently "
                              f"from it ({list(messages)!r}); export with --to gguf instead: llama.cpp reads the chat "
                              "template from the file")
    lines = [f"FROM ./{gguf_name}", "", f'TEMPLATE """{template}"""', ""]
    if wrappers.default_system is not None:
        lines += [f'SYSTEM """{wrappers.default_system}"""', ""]
    lines += [f"PARAMETER stop {_quoted(stop)}" for stop in stops]
    if greedy:  # sftkit chat decodes greedily when the generation config does not sample
        lines += ["PARAMETER temperature 0"]
    return Modelfile("\n".join(lines) + "\n", wrappers, len(proved))
