"""One writer per output: a second run aimed at an output another run is writing is refused with
the first named; a run killed while writing lets go by itself."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from taxoclip.apps.cli import main

HOLD = """
import sys, time
from taxoclip.output_lock import output_lock
with output_lock(sys.argv[1], folder=sys.argv[2] == "folder"):
    print("held", flush=True)
    time.sleep(120)
"""


def holder(output, kind: str = "folder") -> subprocess.Popen:
    """Another process, writing ``output`` (as the first of two runs would be) until it is killed."""
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(output), kind], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    return process


def test_a_second_writer_is_refused_naming_the_first_and_a_killed_one_lets_go(image_folder, tmp_path, capsys):
    out = tmp_path / "shards"
    first = holder(out)
    try:
        assert main(["shards", str(image_folder), "-o", str(out), "-q"]) == 2
        said = capsys.readouterr().err
        assert "being written by another run" in said and f"process {first.pid}" in said, said
        assert not list(out.glob("*.tar"))  # the second run wrote nothing
    finally:
        os.kill(first.pid, signal.SIGKILL)  # killed holding it, as a crashed run would be
        first.wait()
    assert main(["shards", str(image_folder), "-o", str(out), "-q"]) == 0  # not blocked forever
    assert list(out.glob("*.tar"))


def test_a_file_output_is_locked_too_and_the_library_takes_the_same_lock(image_folder, tmp_path, capsys):
    import pytest

    from taxoclip.errors import TaxoclipError
    from taxoclip.output_lock import output_lock

    table = tmp_path / "classes.csv"
    first = holder(table, "file")
    try:
        assert main(["classes", str(image_folder), "-o", str(table)]) == 2
        assert f"process {first.pid}" in capsys.readouterr().err
        assert not table.exists()
        with pytest.raises(TaxoclipError, match="being written by another run"):  # library users are guarded too
            output_lock(table, folder=False).__enter__()
    finally:
        first.kill()
        first.wait()
    with output_lock(tmp_path / "model"), output_lock(tmp_path / "model"):  # re-entrant within one process
        pass


def test_a_refused_run_leaves_no_folder_behind(tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["train", "finetune", "--features", str(tmp_path / "nowhere"), "-o", str(out), "-q"]) == 2
    assert not out.exists()
