"""argparse types shared by the benchmark scripts, so a meaningless value is refused while the arguments are
parsed: one ``error: argument --x: ...`` line from ``charnn.cli.OneLineArgumentParser``, exit code 2, before any work.

The scripts import this module as ``classify_transfer_sweep.py`` imports ``bench_classify``: with this folder put
first on ``sys.path``, so it is found however the script is started (``python benchmarks/X.py``, or loaded from its
file by a test).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Iterable


def _checked(kind: type, what: str, ok: Callable) -> Callable[[str], object]:
    """argparse type: ``text`` as a ``kind`` for which ``ok(value)`` holds; otherwise 'must be WHAT, got TEXT'."""

    def check(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value

    return check


def at_least(minimum: int) -> Callable[[str], int]:
    """argparse type: a whole number of ``minimum`` or more."""
    check = _checked(int, f"a whole number of {minimum} or more", lambda v: v >= minimum)
    check.__name__ = f"at_least_{minimum}"
    return check


at_least_one = at_least(1)
non_negative_int = at_least(0)
positive_float = _checked(float, "a number above 0", lambda v: 0 < v < math.inf)  # seconds, a learning rate
non_negative_float = _checked(float, "a number of 0 or more", lambda v: 0 <= v < math.inf)
fraction = _checked(float, "a number above 0 and below 1", lambda v: 0 < v < 1)
probability = _checked(float, "a number of 0 or more and below 1", lambda v: 0 <= v < 1)  # a dropout rate


def comma_list(item: Callable[[str], object], allow_empty: bool = False) -> Callable[[str], str]:
    """argparse type: a comma-separated list each of whose items ``item`` (an argparse type) accepts; the text
    itself is returned unchanged (the scripts split it where they use it). ``allow_empty``: '' means none."""

    def check(text: str) -> str:
        if text.strip() == "" and allow_empty:
            return text
        for piece in text.split(","):
            if not piece.strip():
                raise argparse.ArgumentTypeError(f"has an empty item in {text!r}; separate the values by single commas")
            try:
                item(piece.strip())
            except argparse.ArgumentTypeError as e:
                raise argparse.ArgumentTypeError(f"item {piece.strip()!r} {e}") from None
        return text

    check.__name__ = "comma_list"
    return check


def comma_choices(choices: Iterable[str]) -> Callable[[str], str]:
    """argparse type: comma-separated names, each one of ``choices``; the text is returned unchanged."""
    choices = list(choices)

    def check(text: str) -> str:
        for piece in text.split(","):
            if piece not in choices:
                raise argparse.ArgumentTypeError(f"takes comma-separated names from {', '.join(choices)}; "
                                                 f"got {piece!r} in {text!r}")
        return text

    check.__name__ = "comma_choices"
    return check
