"""Quiet after a failed checkpoint read: what Orbax and tensorstore leave behind when one
array of a step cannot be read, silenced, and nothing else (core/checkpoint.py uses it
around every restore attempt).
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import traceback


class QuietFailedReads:
    """Silences what the reads of a failed restore leave behind, and nothing else.

    When one array of a step fails to read, Orbax's restore raises and closes its asyncio
    loop while tensorstore still completes its other reads: each completion fails to reach
    the closed loop ("Event loop is closed") and each sibling read coroutine dies with its
    own error, and Python prints every one as an unraisable traceback, dozens after our
    one-line warning; asyncio logs the read tasks nobody awaited ("Task exception was
    never retrieved", with a traceback each). Inside the block the hook drops unraisable
    errors raised in Orbax's code or by a closed loop, a filter on asyncio's logger drops
    Orbax's unretrieved task errors, and the dead coroutines and tasks are collected
    before it ends. After a failed read (`failed`) the late closed-loop callbacks and
    Orbax task errors stay silenced; nothing else is.
    """

    def __init__(self) -> None:
        self.failed = False
        self._previous = sys.unraisablehook

    def __enter__(self) -> QuietFailedReads:
        sys.unraisablehook = self._inside
        logging.getLogger("asyncio").addFilter(drop_orbax_task_errors)
        return self

    def __exit__(self, *exc_info) -> None:
        gc.collect()  # finalizes the failed reads' coroutines while `_inside` is the hook
        sys.unraisablehook = self._after if self.failed else self._previous
        if not self.failed:
            logging.getLogger("asyncio").removeFilter(drop_orbax_task_errors)

    def _inside(self, unraisable) -> None:
        if not _leftover(unraisable.exc_value):
            self._previous(unraisable)

    def _after(self, unraisable) -> None:
        if not _closed_loop(unraisable.exc_value):
            self._previous(unraisable)


def drop_orbax_task_errors(record: logging.LogRecord) -> bool:
    """False (drop) for asyncio's report of an Orbax task whose error nobody retrieved."""
    return not _leftover(record.exc_info[1] if record.exc_info else None)


def _leftover(error: BaseException | None) -> bool:
    """A closed loop's refusal or an error raised in Orbax's code."""
    if _closed_loop(error):
        return True
    frames = traceback.extract_tb(error.__traceback__) if error is not None else []
    return any(f"{os.sep}orbax{os.sep}" in frame.filename for frame in frames)


def _closed_loop(error: BaseException | None) -> bool:
    return isinstance(error, RuntimeError) and str(error) == "Event loop is closed"
