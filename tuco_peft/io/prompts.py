"""Prompt files for the command line: .txt (one prompt per line) or .jsonl, and their tokenization.

A prompt is tokenized as given unless the chat template is asked for: the paper measures TuCo on
chat-formatted prompts, at the last template token, but applying a template silently would change what
is measured.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError

PromptId = int | str
PromptJson = str | list[dict[str, str]]  # a prompt as a row stores it: its text, or its chat messages


@dataclass(frozen=True)
class Prompt:
    """One prompt from a file: plain ``text`` or chat ``messages``, and the line it came from."""

    id: PromptId
    line: int
    text: str | None = None
    messages: tuple[dict[str, str], ...] | None = None

    @property
    def plain_text(self) -> str:
        """The text of a prompt without chat messages (every prompt holds one or the other)."""
        assert self.text is not None, f"prompt {self.id!r} holds neither text nor messages"
        return self.text

    @property
    def is_empty(self) -> bool:
        if self.messages is not None:
            return not any(m["content"].strip() for m in self.messages)
        return not self.plain_text.strip()

    def as_json(self) -> PromptJson:
        return list(self.messages) if self.messages is not None else self.plain_text


def _read_lines(path: Path) -> list[str]:
    """The lines of ``path``, split on "\\n" only: str.splitlines would also split at Unicode separators
    (U+2028, form feed …) that may sit inside a JSON string or a prompt."""
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise InputError(f"prompt file {path} does not exist.") from None
    except IsADirectoryError:
        raise InputError(f"prompt file {path} is a directory; pass a .txt or .jsonl file.") from None
    except PermissionError:
        raise InputError(f"prompt file {path} is not readable (permission denied).") from None
    except UnicodeDecodeError as error:
        raise InputError(f"prompt file {path} is not UTF-8 text (byte {error.start}).") from None
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    return lines[:-1] if lines[-1] == "" else lines


def _messages(value: Any, where: str) -> tuple[dict[str, str], ...]:
    if not isinstance(value, list) or not value:
        raise InputError(f'{where}: "messages" must be a non-empty list of {{"role", "content"}} objects.')
    for message in value:
        if not (
            isinstance(message, dict)
            and isinstance(message.get("role"), str)
            and isinstance(message.get("content"), str)
        ):
            raise InputError(f'{where}: each message needs a string "role" and a string "content", got {message!r}.')
    return tuple({"role": m["role"], "content": m["content"]} for m in value)


def _jsonl_prompt(line: str, number: int, where: str) -> Prompt:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise InputError(f"{where}: not valid JSON ({error.msg} at column {error.colno}).") from None
    if not isinstance(record, dict):
        raise InputError(f'{where}: expected a JSON object with "prompt" or "messages", got {type(record).__name__}.')
    prompt_id = record.get("id", number)
    if not isinstance(prompt_id, (int, str)) or isinstance(prompt_id, bool):
        raise InputError(f'{where}: "id" must be a string or an integer, got {prompt_id!r}.')
    if "messages" in record:
        return Prompt(id=prompt_id, line=number, messages=_messages(record["messages"], where))
    if isinstance(record.get("prompt"), str):
        return Prompt(id=prompt_id, line=number, text=record["prompt"])
    raise InputError(f'{where}: expected a string "prompt" or a "messages" list.')


def read_prompts(path: str | Path) -> list[Prompt]:
    """Read a .txt file (one prompt per line, id = line number) or a .jsonl file.

    JSONL lines are ``{"id": …, "prompt": "…"}`` or ``{"id": …, "messages": [{"role", "content"}, …]}``;
    the id defaults to the line number, and blank lines are ignored. Ids must be unique: they are the key
    that lets an interrupted run resume.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".jsonl"):
        raise InputError(f"prompt file {path} must end in .txt (one prompt per line) or .jsonl.")
    lines = _read_lines(path)
    if suffix == ".txt":
        prompts = [Prompt(id=number, line=number, text=line) for number, line in enumerate(lines, start=1)]
    else:
        prompts = [
            _jsonl_prompt(line, number, f"{path}:{number}")
            for number, line in enumerate(lines, start=1)
            if line.strip()
        ]
    seen: dict[PromptId, int] = {}
    for prompt in prompts:
        if prompt.id in seen:
            raise InputError(
                f"{path}:{prompt.line}: id {prompt.id!r} was already used on line {seen[prompt.id]}; "
                "ids must be unique."
            )
        seen[prompt.id] = prompt.line
    return prompts


def check_formats(prompts: Sequence[Prompt], *, chat_template: bool) -> None:
    """Refuse chat messages without ``--chat-template`` before any model is loaded."""
    if chat_template:
        return
    for prompt in prompts:
        if prompt.messages is not None:
            raise InputError(
                f"prompt {prompt.id!r} (line {prompt.line}) has chat messages; pass --chat-template to format them."
            )


def format_prompt(tokenizer: Any, prompt: Prompt, *, chat_template: bool, system: str | None = None) -> str:
    """The exact text that is tokenized: the prompt itself, or its chat-template rendering.

    With the template, the generation prompt is appended (TuCo is measured where the reply would start)
    unless the conversation already ends with an assistant turn.
    """
    if not chat_template:
        check_formats([prompt], chat_template=False)  # refuses chat messages, so the prompt is plain text
        return prompt.plain_text
    if not getattr(tokenizer, "chat_template", None):
        raise InputError(
            "--chat-template was given but the tokenizer has no chat template; drop the flag or use a chat tokenizer."
        )
    messages = (
        list(prompt.messages) if prompt.messages is not None else [{"role": "user", "content": prompt.plain_text}]
    )
    if system is not None and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=messages[-1]["role"] != "assistant"
    )


# A text longer than this many characters per token of the context is far longer than the context: only
# its end is tokenized (no token of a tokenizer in use spans this many characters).
CHARACTERS_PER_TOKEN_AT_MOST = 64


@dataclass(frozen=True)
class EncodedPrompt:
    """A prompt's token ids as analysed, and how many of its first tokens were cut to fit the context
    (None: cut, but only the end of the text was tokenized, so the count is not known)."""

    prompt: Prompt
    ids: list[int]
    n_cut: int | None = 0

    @property
    def was_cut(self) -> bool:
        """Whether the prompt lost its first tokens to fit the context (its row then keeps what was analysed)."""
        return self.n_cut != 0


def _last_tokens(tokenizer: Any, text: str, count: int) -> list[int] | None:
    """The last ``count`` token ids of a very long ``text``, from tokenizing a window of its end that grows
    until it holds more than ``count`` tokens; the window's first token, maybe a piece of a word the window
    cut, is never kept. None when the text is not long enough for this to save anything."""
    window = count * CHARACTERS_PER_TOKEN_AT_MOST
    while window < len(text) // 2:
        ids = tokenizer(text[-window:], add_special_tokens=False)["input_ids"]
        if len(ids) > count + 1:
            return list(ids[-count:])
        window *= 4
    return None


def encode_prompt(
    tokenizer: Any,
    prompt: Prompt | str,
    *,
    chat_template: bool = False,
    system: str | None = None,
    context_length: int | None = None,
) -> EncodedPrompt:
    """Format ``prompt`` as the flags say, tokenize it and keep its last ``context_length`` tokens.

    The one way prompts become token ids (command line, training callback, α sweep, demo), so that TuCo is
    measured on the same tokens everywhere. A chat-template rendering, here or by the caller (a text that
    already starts with the BOS token), holds its special tokens, so none are added to it. The end of an
    over-long prompt is kept: TuCo is read at the last token. Of a text far longer than the context (see
    ``CHARACTERS_PER_TOKEN_AT_MOST``) only the end is tokenized, so that a huge prompt costs what its kept
    tokens cost.
    """
    if isinstance(prompt, str):
        prompt = Prompt(id=0, line=0, text=prompt)
    text = format_prompt(tokenizer, prompt, chat_template=chat_template, system=system)
    bos = getattr(tokenizer, "bos_token", None)
    templated = chat_template or bool(bos and text.startswith(bos))
    if context_length is not None and len(text) > context_length * CHARACTERS_PER_TOKEN_AT_MOST:
        tail = _last_tokens(tokenizer, text, context_length)
        if tail is not None:
            return EncodedPrompt(prompt, tail, None)
    ids = list(tokenizer(text, add_special_tokens=not templated)["input_ids"])
    kept = ids if context_length is None or len(ids) <= context_length else ids[-context_length:]
    return EncodedPrompt(prompt, kept, len(ids) - len(kept))
