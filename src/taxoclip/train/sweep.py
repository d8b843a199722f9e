"""The paper's warm-up study: the same LiT run at several warm-up lengths, compared in one plot
and one table (``sweep.png``, ``sweep.md``, ``sweep.csv``, ``sweep.json`` in the output folder)."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from taxoclip.data.features import load_features
from taxoclip.train.lit import TrainConfig, load_history, train_lit


def default_warmups(config: TrainConfig) -> list[int]:
    """Half an epoch, one epoch, two epochs of steps: the paper's 500/1000/2000 ratio, scaled to
    this dataset and batch size."""
    cache = load_features(config.features)
    steps = max(1, int(cache.split_mask("train").sum()) // config.batch_size)
    return sorted({max(1, steps // 2), steps, 2 * steps})


def warmup_sweep(config: TrainConfig, warmups: list[int] | None = None) -> str:
    warmups = warmups or default_warmups(config)
    out = Path(config.output)
    rows, histories = [], {}
    for warmup in warmups:
        run = replace(config, warmup_steps=warmup, output=str(out / f"warmup-{warmup}"))
        if config.progress:
            print(f"== warm-up {warmup} steps -> {run.output}")
        train_lit(run)
        history = load_history(run.output)
        histories[warmup] = history
        best = max(history, key=lambda r: r.get("top1", 0))
        rows.append(
            {
                "warmup_steps": warmup,
                "final_top1": history[-1].get("top1"),
                "final_top5": history[-1].get("top5"),
                "best_top1": best.get("top1"),
                "best_epoch": best["epoch"],
                "seconds": round(sum(r["seconds"] for r in history), 1),
            }
        )
    write_table(out, rows)
    plot_sweep(out, histories)
    (out / "sweep.json").write_text(json.dumps({"rows": rows, "histories": histories}, indent=1))
    return markdown(rows)


def markdown(rows: list[dict]) -> str:
    lines = [
        "| warm-up steps | final top-1 | final top-5 | best top-1 (epoch) | seconds |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['warmup_steps']} | {pct(r['final_top1'])} | {pct(r['final_top5'])} | "
            f"{pct(r['best_top1'])} ({r['best_epoch']}) | {r['seconds']} |"
        )
    return "\n".join(lines)


def pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def write_table(out: Path, rows: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.md").write_text("# Warm-up sweep\n\n" + markdown(rows) + "\n")
    with open(out / "sweep.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def plot_sweep(out: Path, histories: dict[int, list[dict]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (top1, top5) = plt.subplots(1, 2, figsize=(10, 4))
    for warmup, history in histories.items():
        epochs = [r["epoch"] for r in history]
        top1.plot(epochs, [100 * r.get("top1", np.nan) for r in history], marker="o", label=f"warm-up {warmup}")
        top5.plot(epochs, [100 * r.get("top5", np.nan) for r in history], marker="o", label=f"warm-up {warmup}")
    for axis, name in ((top1, "top-1"), (top5, "top-5")):
        axis.set(xlabel="epoch", ylabel=f"zero-shot {name} (%)", title=f"{name} by warm-up length")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(out / "sweep.png", dpi=120)
    plt.close(figure)
