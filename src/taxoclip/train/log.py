"""The per-epoch log (metrics.jsonl, metrics.csv) and its plots (accuracy.png, loss.png)."""

from __future__ import annotations

import csv
import json
from pathlib import Path


def write_log(folder: Path, history: list[dict]) -> None:
    """metrics.jsonl and metrics.csv, one row per epoch."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in history))
    columns = list(dict.fromkeys(k for row in history for k in row))
    with open(folder / "metrics.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(history)


def load_history(folder: str | Path) -> list[dict]:
    """The rows `write_log` wrote (empty when the run has not finished an epoch)."""
    path = Path(folder) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def plot_history(folder: Path, history: list[dict], title: str = "") -> list[Path]:
    """accuracy.png (zero-shot top-1/top-5 per epoch) and loss.png, as the paper's figures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    written = []
    figure, axis = plt.subplots(figsize=(6, 4))
    shown = (
        ("top1", "top-1"),
        ("top5", "top-5"),
        ("select_top1", "selection top-1"),
        ("unseen_top1", "unseen classes top-1"),
        ("exact_match", "answers exactly right"),
    )
    for key, label in shown:
        if any(key in row for row in history):
            axis.plot(epochs, [100 * row.get(key, float("nan")) for row in history], marker="o", label=label)
    axis.set(xlabel="epoch", ylabel="accuracy (%)", title=title or "accuracy on held-out photos")
    axis.grid(alpha=0.3)
    if axis.lines:
        axis.legend()
    figure.tight_layout()
    figure.savefig(folder / "accuracy.png", dpi=120)
    written.append(folder / "accuracy.png")
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(6, 4))
    axis.plot(epochs, [row["train_loss"] for row in history], marker="o")
    axis.set(xlabel="epoch", ylabel="train loss", title=title or "training loss")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(folder / "loss.png", dpi=120)
    written.append(folder / "loss.png")
    plt.close(figure)
    return written
