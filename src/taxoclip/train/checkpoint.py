"""Checkpoints: everything that trains as safetensors, the optimiser state, and the progress as
JSON written last, so a checkpoint is complete exactly when its state file says so."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def save_checkpoint(
    folder: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict,
    extra: dict[str, dict[str, torch.Tensor]] | None = None,
) -> None:
    """Weights as safetensors, optimizer state as plain tensors, progress as JSON; the JSON is
    written last so a checkpoint is complete exactly when its state file says so. ``extra``:
    other named tensor sets (the weight average, the best weights) as NAME.safetensors."""
    folder.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    for name, tensors in {"model": weights, **(extra or {})}.items():
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(folder / f"{name}.safetensors.tmp")
        )
        os.replace(folder / f"{name}.safetensors.tmp", folder / f"{name}.safetensors")
    torch.save(optimizer.state_dict(), folder / "optimizer.pt.tmp")
    os.replace(folder / "optimizer.pt.tmp", folder / "optimizer.pt")
    (folder / "state.json.tmp").write_text(json.dumps(state, indent=1))
    os.replace(folder / "state.json.tmp", folder / "state.json")


def read_state(folder: Path) -> dict | None:
    """The progress record of a checkpoint (None when there is none yet)."""
    path = folder / "state.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        from taxoclip.errors import TaxoclipError

        raise TaxoclipError(f"{path}: damaged; delete {folder} to start the run again") from None


def load_checkpoint(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict | None:
    state_path = folder / "state.json"
    if not state_path.exists():
        return None
    state = json.loads(state_path.read_text())
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    # A file we wrote ourselves; weights_only keeps torch.load from running any code regardless.
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    return state


def load_extra(folder: Path, name: str) -> dict[str, torch.Tensor] | None:
    """A named tensor set saved with the checkpoint (None when absent)."""
    path = folder / f"{name}.safetensors"
    return load_file(str(path)) if path.exists() else None
