"""Command-line value types (argparse ``type=`` callables): numbers with their bounds, fractions,
lists. Light and torch-free: the settings declare them beside their fields and the command line,
``train sweep --values`` and the library's checks all parse through the same ones."""

from __future__ import annotations

import argparse


def at_least(minimum: float, kind: type = int):
    """A finite number of ``kind`` that is at least ``minimum`` (NaN and infinity refused)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not {'a whole number' if kind is int else 'a number'}"
            ) from None
        if not value >= minimum:  # also false for NaN
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {text}")
        if value == float("inf"):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        return value

    parse.__name__ = f"{kind.__name__} >= {minimum}"
    return parse


POSITIVE, NON_NEGATIVE = at_least(1), at_least(0)
POSITIVE_NUMBER = at_least(1e-12, float)
NON_NEGATIVE_NUMBER = at_least(0.0, float)


def probability(text: str) -> float:
    """A number from 0 to 1."""
    value = NON_NEGATIVE_NUMBER(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def fraction_below_one(text: str) -> float:
    """A number from 0 to below 1."""
    value = probability(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"must be at least 0 and below 1, got {text}")
    return value


def port_number(text: str) -> int:
    value = POSITIVE(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"a port is 1 to 65535, got {text}")
    return value


def comma_list(text: str) -> list[str]:
    """Comma-separated names, at least one."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"{text!r} names nothing; give comma-separated names")
    return items


def layers_or_all(text: str) -> int | None:
    """A number of top layers, or "all" (None)."""
    return None if text.strip().lower() in ("all", "-1") else NON_NEGATIVE(text)
