"""Errors meant for people.

A `TaxoclipError` is a user's mistake or a problem with their data (a missing file, a bad column,
an unknown class). Its message names the file, class or column and says what to do. The CLI prints
it without a traceback and exits with code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class TaxoclipError(Exception):
    """A problem with the user's input, explained in words a person can act on."""

    exit_code = 2
