"""What every `cnnlab` command module shares: the parser class, exit codes and option-value parsers.

Imports nothing heavy (no torch): every command's parser is built from these, and `cnnlab --help` must start fast.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from cnnlab.errors import UsageError

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line, `cnnlab: error: ...`, with exit code 2."""

    def error(self, message: str) -> NoReturn:
        """Print one line naming the problem and exit 2."""
        sys.stderr.write(f"cnnlab: error: {message} (see `{self.prog} --help`)\n")
        raise SystemExit(EXIT_USAGE)


def int_at_least(lo: int) -> Callable[[str], int]:
    """An argparse `type`: a whole number >= lo."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be at least {lo}, got {value}")
        return value

    return parse


def float_in(lo: float, hi: float, hi_open: bool = True, lo_open: bool = False) -> Callable[[str], float]:
    """An argparse `type`: a number in the interval lo..hi (closed at lo, open at hi unless told otherwise)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        ok_lo = value > lo if lo_open else value >= lo
        ok_hi = value < hi if hi_open else value <= hi
        if not (ok_lo and ok_hi):
            interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
            raise argparse.ArgumentTypeError(f"must be in {interval}, got {text}")
        return value

    return parse


positive_float = float_in(0.0, float("inf"), lo_open=True)


def parse_model_args(text: str | None) -> dict[str, Any]:
    """'width=16,act=elu,dropout=0.3' -> {'width': 16, 'act': 'elu', 'dropout': 0.3}."""
    out: dict[str, Any] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--model-args: expected KEY=VALUE items, got {item!r}")
        value = value.strip()
        for cast in (int, float):
            try:
                out[key.strip()] = cast(value)
                break
            except ValueError:
                continue
        else:
            out[key.strip()] = {"true": True, "false": False}.get(value.lower(), value)
        if isinstance(out[key.strip()], float) and not math.isfinite(out[key.strip()]):
            raise UsageError(f"--model-args {key.strip()}={value}: not a finite number")
    return out
