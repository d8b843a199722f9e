"""One writer per output: a command that writes a folder (or a file) holds a lock on it for as long
as it runs, and a second run aimed at the same output is refused with a message naming the first.

The lock is an OS file lock (``filelock``: ``flock`` on Linux and macOS), so the kernel drops it when
its process dies however it dies; a run killed while holding it never blocks the next one. Who holds
it (process id, command line, start time) is written beside it for the refusal to name.

A folder output is locked by ``OUT/.taxoclip.lock``; a file output by ``.NAME.lock`` in its folder.
A folder the lock made for a run that then wrote nothing (it was refused) is removed again; otherwise
the (empty, hidden) lock file stays when the run ends: deleting it would let a run that opened it
just before lock a file no longer on disk while a third locks a new one. Within one process the
lock is re-entrant: the command line takes it, and the library functions it calls (which take it
too, for library users) pass through.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from taxoclip.errors import TaxoclipError

FOLDER_LOCK = ".taxoclip.lock"
_held: dict[Path, int] = {}  # lock path -> nesting depth, in this process


def lock_path(output: str | Path, folder: bool) -> Path:
    path = Path(output)
    return path / FOLDER_LOCK if folder else path.parent / f".{path.name}.lock"


def is_coordinator() -> bool:
    """Under torchrun every rank runs the command; only global rank 0 writes, so only it locks."""
    return os.environ.get("RANK", "0") == "0"


@contextmanager
def output_lock(output: str | Path, *, folder: bool = True) -> Iterator[None]:
    """Hold the output's lock while the block runs; refuse (exit 2) when another run holds it."""
    if not is_coordinator():
        yield
        return
    path = lock_path(output, folder).absolute()
    if path in _held:
        _held[path] += 1
        try:
            yield
        finally:
            _held[path] -= 1
        return
    created = not path.parent.exists()  # a refused or failed run leaves no folder it made behind
    path.parent.mkdir(parents=True, exist_ok=True)
    owner = path.with_name(path.name + ".owner")
    lock = FileLock(path, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise TaxoclipError(
            f"{output} is being written by another run ({describe(owner)}); wait for it to "
            "finish or choose another output. A run that was killed lets go by itself"
        ) from None
    _held[path] = 1
    try:
        owner.write_text(json.dumps({"pid": os.getpid(), "command": " ".join(sys.argv), "since": time.time()}))
        yield
    finally:
        del _held[path]
        owner.unlink(missing_ok=True)  # while still held: the next holder writes its own
        left_empty = created and {p.name for p in path.parent.iterdir()} == {path.name}
        if left_empty:
            path.unlink(missing_ok=True)
        lock.release()
        if left_empty:
            with contextlib.suppress(OSError):  # someone else's file arrived meanwhile: keep the folder
                path.parent.rmdir()


def describe(owner: Path) -> str:
    """The holder as its owner file tells it; a holder that has not written it yet is still named."""
    try:
        record = json.loads(owner.read_text())
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record["since"]))
        return f"process {record['pid']}, '{record['command']}', since {since}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that is starting"


def locks_output(argument: str, *, folder: bool = True):
    """Decorate a library function that writes the folder named by its ``argument``: it holds that
    output's lock while it runs (so library users get the same guard as the command line)."""

    def decorate(function):
        signature = inspect.signature(function)

        @functools.wraps(function)
        def locked(*args, **kwargs):
            output = signature.bind(*args, **kwargs).arguments[argument]
            with output_lock(output, folder=folder):
                return function(*args, **kwargs)

        return locked

    return decorate
