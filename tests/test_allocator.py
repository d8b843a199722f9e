"""How much freed memory a long job hands back (`taxoclip.allocator`, ``TAXOCLIP_MALLOC``): a heap
of freed 1 MiB blocks pinned by one live block above them stays resident under glibc's defaults;
``mmap`` returns each block as it is freed, ``trim`` returns them after the training step."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = r"""
import ctypes, ctypes.util
from taxoclip import allocator
mode = allocator.configure()
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]

def anonymous_mb():
    for line in open("/proc/self/smaps_rollup"):
        if line.startswith("Anonymous:"):
            return int(line.split()[1]) / 1024

big = libc.malloc(8 << 20); ctypes.memset(big, 1, 8 << 20); libc.free(big)  # glibc raises its threshold
before = anonymous_mb()
blocks = []
for _ in range(100):  # 100 MiB in 1 MiB blocks, touched so they are resident
    block = libc.malloc(1 << 20); ctypes.memset(block, 1, 1 << 20); blocks.append(block)
for block in blocks[:-1]:  # the last one stays alive, above the others in the heap
    libc.free(block)
freed = anonymous_mb() - before
allocator.after_step()
print(mode, round(freed), round(anonymous_mb() - before))
"""


def held(mode: str) -> tuple[str, int, int]:
    """(mode in force, MiB still held after freeing 99 MiB, and after the step's hook)."""
    done = subprocess.run(
        [sys.executable, "-c", PROBE], env=os.environ | {"TAXOCLIP_MALLOC": mode}, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    chosen, freed, after = done.stdout.split()
    return chosen, int(freed), int(after)


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps_rollup"), reason="Linux (glibc) only")
def test_each_mode_hands_freed_memory_back_when_it_says():
    assert held("default") == ("default", pytest.approx(99, abs=8), pytest.approx(99, abs=8))
    chosen, freed, after = held("mmap")
    assert chosen == "mmap" and freed < 10 and after < 10  # returned as each block was freed
    chosen, freed, after = held("trim")
    assert chosen == "trim" and freed > 80 and after < 10  # held until the step ended, then returned


def test_the_command_line_sets_the_allocator_and_refuses_an_unknown_mode(monkeypatch, capsys):
    import taxoclip.apps.cli as cli

    calls = []
    monkeypatch.setattr(cli, "configure_allocator", lambda: calls.append(1) or "default")
    assert cli.main(["predict", "no-such-photo.jpg"]) == 2 and calls == [1]
    monkeypatch.undo()
    monkeypatch.setenv("TAXOCLIP_MALLOC", "lean")
    assert cli.main(["predict", "no-such-photo.jpg"]) == 2
    assert "TAXOCLIP_MALLOC=lean: use one of default, trim, mmap" in capsys.readouterr().err


def test_the_training_loop_calls_the_hook_after_every_step(colour_features, tmp_path, monkeypatch):
    import taxoclip.train.loop as loop
    from taxoclip.apps.cli import main

    steps = []
    monkeypatch.setattr(loop, "after_step", lambda: steps.append(1))
    arguments = ["train", "catlip", "--features", str(colour_features), "-o", str(tmp_path / "m"), "--epochs", "2"]
    assert main([*arguments, "--batch-size", "32", "-q"]) == 0
    assert len(steps) == 2 * 3  # 96 training photos in batches of 32, two epochs
