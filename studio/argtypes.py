"""argparse ``type=`` callables that refuse impossible numbers at parse time.

Use them for every numeric CLI option, e.g. ``p.add_argument("--epochs", type=positive_int)``. A bad value then
exits with status 2 and one line (``argument --epochs: must be a positive integer, not '-3'``) before any model
is loaded, instead of running on a silently wrong setting. Each raises :class:`argparse.ArgumentTypeError`.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from typing import Any

__all__ = [
    "finite_float",
    "fraction",
    "in_range",
    "integer",
    "json_object",
    "nonnegative_float",
    "nonnegative_int",
    "positive_float",
    "positive_int",
]

# counts beyond this are typos (an exponent, an extra zero run), never a real epoch, sample or pixel count
MAX_COUNT = 2**31 - 1


def _int(text: str, what: str) -> int:
    # int() alone refuses "1e3" and "2.0"; both are read only when they are exactly whole, so "1e20" reaches
    # the bound check below instead of being refused as "not an integer"
    try:
        return int(text)
    except ValueError:
        pass
    try:
        f = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, not {text!r}") from None
    if not math.isfinite(f) or f != int(f):
        raise argparse.ArgumentTypeError(f"must be {what}, not {text!r}")
    return int(f)


def _bounded_int(text: str, low: int | None, what: str) -> int:
    n = _int(text, what)
    if low is not None and n < low:
        raise argparse.ArgumentTypeError(f"must be {what}, not {text!r}")
    if abs(n) > MAX_COUNT:
        raise argparse.ArgumentTypeError(f"{text!r} is too large; use at most {MAX_COUNT:,}")
    return n


def integer(text: str) -> int:
    """Any whole number of magnitude at most :data:`MAX_COUNT` (an option whose bounds are checked later)."""
    return _bounded_int(text, None, "a whole number")


def positive_int(text: str) -> int:
    """A whole number >= 1 (a count: samples, epochs, pixels, classes), at most :data:`MAX_COUNT`."""
    return _bounded_int(text, 1, "a positive integer")


def nonnegative_int(text: str) -> int:
    """A whole number >= 0 (a seed, warm-up steps, workers), at most :data:`MAX_COUNT`."""
    return _bounded_int(text, 0, "an integer >= 0")


def finite_float(text: str) -> float:
    """Any real number; NaN and +-inf are refused (they poison every computation they enter)."""
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, not {text!r}") from None
    if not math.isfinite(x):
        raise argparse.ArgumentTypeError(f"must be a finite number, not {text!r}")
    return x


def positive_float(text: str) -> float:
    """A finite number > 0 (a learning rate, a temperature, a time limit)."""
    x = finite_float(text)
    if x <= 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, not {text!r}")
    return x


def nonnegative_float(text: str) -> float:
    """A finite number >= 0 (a weight decay, a loss weight)."""
    x = finite_float(text)
    if x < 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, not {text!r}")
    return x


def fraction(text: str) -> float:
    """A finite number in [0, 1] (a ratio, a smoothing, a loss mix)."""
    x = finite_float(text)
    if not 0.0 <= x <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a number from 0 to 1, not {text!r}")
    return x


def in_range(kind: type, low: float | None = None, high: float | None = None) -> Callable[[str], Any]:
    """An ``int`` or ``float`` type for argparse, refusing NaN/inf and values outside ``[low, high]``.

    For options that declare their own bounds (a method's options): the flag then refuses what the option would,
    at parse time and in one line.
    """

    def parse(text: str) -> Any:
        x: Any = integer(text) if kind is int else finite_float(text)
        if (low is not None and x < low) or (high is not None and x > high):
            span = f"from {low:g} to {high:g}" if low is not None and high is not None else None
            span = span or (f">= {low:g}" if low is not None else f"<= {high:g}")
            raise argparse.ArgumentTypeError(f"must be a number {span}, not {text!r}")
        return x

    parse.__name__ = kind.__name__  # argparse names the type in its message for other errors
    return parse


def json_object(text: str) -> dict[str, Any]:
    """A JSON object (``'{"patch_size": 8}'``): a list, a number or a string is refused, and so are NaN/inf."""

    def no_constant(name: str) -> Any:
        raise ValueError(f"{name} is not a number")

    try:
        value = json.loads(text or "{}", parse_constant=no_constant)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"is not valid JSON ({e.msg}): {text!r}") from None
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{e} in {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(
            f"must be a JSON object of constructor arguments, e.g. '{{\"patch_size\": 8}}', not a "
            f"{type(value).__name__}: {text!r}"
        )
    return value
