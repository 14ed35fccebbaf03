"""argparse types shared by the subcommands: a bad value is argparse's error (exit 2), naming the option."""

import argparse


def _parse(text: str, kind: type, what: str):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None


def _refuse(message: str):
    raise argparse.ArgumentTypeError(message)


def positive(text: str) -> int:
    value = _parse(text, int, "an integer")
    return value if value >= 1 else _refuse(f"must be at least 1, got {value}")


def non_negative(text: str) -> int:
    value = _parse(text, int, "an integer")
    return value if value >= 0 else _refuse(f"must be at least 0, got {value}")


def bc_depth(text: str) -> int:
    """A DenseNet-BC depth: 6n + 4 with n >= 1."""
    value = positive(text)
    if value < 10 or (value - 4) % 6:
        _refuse(f"DenseNet-BC depth must be 6n + 4 with n >= 1 (10, 40, 100, ...), got {value}")
    return value


def positive_float(text: str) -> float:
    value = _parse(text, float, "a number")
    return value if value > 0 else _refuse(f"must be positive, got {text}")  # NaN fails `> 0` too


def non_negative_float(text: str) -> float:
    value = _parse(text, float, "a number")
    return value if value >= 0 else _refuse(f"must be at least 0, got {text}")  # NaN fails `>= 0` too


def fraction(text: str) -> float:
    """A number in [0, 1)."""
    value = non_negative_float(text)
    return value if value < 1 else _refuse(f"must be less than 1, got {text}")
