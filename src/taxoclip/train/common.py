"""Pieces every trainer shares: the learning-rate schedule, distributed helpers, checkpoints and
the per-epoch log with its plots."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """Learning-rate multiplier: linear from 0 over ``warmup_steps``, then cosine down to 0."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# --- distributed ------------------------------------------------------------------------------


def is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank_and_world() -> tuple[int, int]:
    if is_distributed():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def gather_with_grad(image: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All ranks' image embeddings (gradients flow back to their owners) and labels, in rank order,
    so every rank computes the same global loss over the whole batch."""
    from torch.distributed.nn.functional import all_gather

    images = torch.cat(all_gather(image))
    gathered = [torch.empty_like(labels) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(gathered, labels)
    return images, torch.cat(gathered)


# --- checkpoints --------------------------------------------------------------------------------


def save_checkpoint(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Weights as safetensors, optimizer state as plain tensors, progress as JSON; the JSON is
    written last so a checkpoint is complete exactly when its state file says so."""
    folder.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(weights, str(folder / "model.safetensors.tmp"))
    os.replace(folder / "model.safetensors.tmp", folder / "model.safetensors")
    torch.save(optimizer.state_dict(), folder / "optimizer.pt.tmp")
    os.replace(folder / "optimizer.pt.tmp", folder / "optimizer.pt")
    (folder / "state.json.tmp").write_text(json.dumps(state, indent=1))
    os.replace(folder / "state.json.tmp", folder / "state.json")


def load_checkpoint(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict | None:
    state_path = folder / "state.json"
    if not state_path.exists():
        return None
    state = json.loads(state_path.read_text())
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    # A file we wrote ourselves; weights_only keeps torch.load from running any code regardless.
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    return state


# --- the per-epoch log ----------------------------------------------------------------------------


def write_log(folder: Path, history: list[dict]) -> None:
    """metrics.jsonl and metrics.csv, one row per epoch."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in history))
    columns = list(dict.fromkeys(k for row in history for k in row))
    with open(folder / "metrics.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(history)


def plot_history(folder: Path, history: list[dict], title: str = "") -> list[Path]:
    """accuracy.png (zero-shot top-1/top-5 per epoch) and loss.png, as the paper's figures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    written = []
    figure, axis = plt.subplots(figsize=(6, 4))
    for key, label in (("top1", "top-1"), ("top5", "top-5"), ("unseen_top1", "unseen classes top-1")):
        if any(key in row for row in history):
            axis.plot(epochs, [100 * row.get(key, float("nan")) for row in history], marker="o", label=label)
    axis.set(xlabel="epoch", ylabel="zero-shot accuracy (%)", title=title or "zero-shot accuracy on valid")
    axis.grid(alpha=0.3)
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
