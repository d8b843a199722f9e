"""Checkpoints: everything that trains as safetensors, the optimiser state, and the progress as
JSON written last, so a checkpoint is complete exactly when its state file says so."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from taxoclip.errors import TaxoclipError
from taxoclip.tensor_files import load_plain_tensors, load_tensors, load_weights_into, short


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
        state = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        state = None
    if not isinstance(state, dict) or not isinstance(state.get("epoch"), int):
        raise TaxoclipError(f"{path}: damaged; delete {folder} to start the run again")
    return state


def load_checkpoint(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict | None:
    """Resume a model and optimiser; any file that is damaged, replaced or another run's is named,
    with what to do (torch.load runs with weights_only: a pickle is refused, never run)."""
    state = read_state(folder)
    if state is None:
        return None
    fix = f"delete {folder} to start the run again"
    weights = folder / "model.safetensors"
    load_weights_into(model, load_tensors(weights, fix), weights, fix)
    optimiser = folder / "optimizer.pt"
    state_dict = load_plain_tensors(optimiser, fix)
    try:
        optimizer.load_state_dict(state_dict)
    except (ValueError, KeyError, TypeError, RuntimeError) as error:
        raise TaxoclipError(f"{optimiser}: another run's optimiser state ({short(error)}); {fix}") from None
    return state


def load_extra(folder: Path, name: str) -> dict[str, torch.Tensor] | None:
    """A named tensor set saved with the checkpoint (None when absent)."""
    path = folder / f"{name}.safetensors"
    return load_tensors(path, f"delete {folder} to start the run again") if path.exists() else None
