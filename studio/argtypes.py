"""argparse ``type=`` callables that refuse impossible numbers at parse time.

Use them for every numeric CLI option, e.g. ``p.add_argument("--epochs", type=positive_int)``. A bad value then
exits with status 2 and one line (``argument --epochs: must be a positive integer, not '-3'``) before any model
is loaded, instead of running on a silently wrong setting. Each raises :class:`argparse.ArgumentTypeError`.
"""

from __future__ import annotations

import argparse
import math

__all__ = ["finite_float", "nonnegative_float", "nonnegative_int", "positive_float", "positive_int"]

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


def _bounded_int(text: str, low: int, what: str) -> int:
    n = _int(text, what)
    if n < low:
        raise argparse.ArgumentTypeError(f"must be {what}, not {text!r}")
    if n > MAX_COUNT:
        raise argparse.ArgumentTypeError(f"{text!r} is too large; use at most {MAX_COUNT:,}")
    return n


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
