"""Exceptions raised by tuco-peft. Each message names the problem and the way out."""


class TuCoError(Exception):
    """Base class of every error raised by tuco-peft."""


class UnsupportedModelError(TuCoError, TypeError):
    """The model (or its adapters) cannot be decomposed exactly as it stands."""


class InputError(TuCoError, ValueError):
    """input_ids, attention_mask or positions are malformed."""


def first_line(error: BaseException) -> str:
    """The first line of an error's message (its type name when it has none), for one-line reports."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
