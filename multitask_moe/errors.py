"""Bad input, said once: the error type of a config value that cannot run, the one-line
wording of any error, and the integer check every layer makes.

Every command (train, evaluate, extract, evolve) raises ConfigError for bad input before
it writes anything, and the command line prints it as one `error:` line with exit status
2. The layers below the commands (moe, data, models, parallel) raise ValueError through
the same check, so a value is worded the same wherever it is refused.
"""

from __future__ import annotations

import numpy as np


class ConfigError(ValueError):
    """A config that cannot run; the message says which field and what is allowed."""


def one_line(error: BaseException, limit: int | None = None) -> str:
    """An exception's message on one line (a KeyError's key without its quotes; the
    type's name for an empty message), cut to `limit` characters when given."""
    text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    text = " ".join(text.split()) or type(error).__name__
    if limit is not None and len(text) > limit:
        return text[: limit - 3] + "..."
    return text


def check_int(
    value,
    name: str,
    minimum: int,
    maximum: int | None = None,
    *,
    error: type[Exception] = ValueError,
) -> int:
    """`value` as an int if it is an integer (not a bool; numpy integers too) in
    [minimum, maximum]; else `error`: "{name}={value!r} must be an int >= {minimum}"
    (or "in [minimum, maximum]")."""
    integer = isinstance(value, int | np.integer) and not isinstance(value, bool)
    if integer and minimum <= value and (maximum is None or value <= maximum):
        return int(value)
    allowed = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
    raise error(f"{name}={value!r} must be an int {allowed}")
