"""Shared pieces of the benchmarks: the registry and the table printer."""

from __future__ import annotations

import argparse
from collections.abc import Callable

BENCHMARKS: dict[str, Callable[[argparse.Namespace], list[dict]]] = {}


def benchmark(name: str):
    def register(function):
        BENCHMARKS[name] = function
        return function

    return register


def print_table(rows: list[dict]) -> None:
    if not rows:
        return
    columns = list(dict.fromkeys(k for row in rows for k in row))
    widths = {c: max(len(c), *(len(format_cell(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    print("  ".join("-" * widths[c] for c in columns))
    for row in rows:
        print("  ".join(format_cell(row.get(c)).ljust(widths[c]) for c in columns))


def format_cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return "" if value is None else str(value)


def interleaved_step_seconds(runs: dict, steps: int) -> dict[str, float]:
    """Median seconds of one training step (loss, backward, AdamW step) for each run, given as
    name -> (loss function of no arguments, parameters). The runs take turns step by step, the
    first round untimed (warm-up), so a noisy shared machine slows them alike."""
    import statistics
    import time

    import torch

    optimizers = {name: torch.optim.AdamW([p for p in params if p.requires_grad]) for name, (_, params) in runs.items()}
    timings: dict[str, list[float]] = {name: [] for name in runs}
    for step in range(steps + 1):
        for name, (loss_of, _) in runs.items():
            started = time.perf_counter()
            loss = loss_of()
            optimizers[name].zero_grad()
            loss.backward()
            optimizers[name].step()
            if step:
                timings[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in timings.items()}
