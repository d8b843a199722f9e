"""Reading the tensor files taxoclip writes (safetensors; the optimiser's plain-tensor ``.pt``) so
that a damaged, truncated or replaced file is a message naming it, never a traceback, and never
torch's own advice to load it with ``weights_only=False`` (which would run whatever code a pickle
carries)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from taxoclip.errors import TaxoclipError


def load_tensors(path: str | Path, fix: str) -> dict:
    """A safetensors file's tensors; ``fix`` says what to do when it is not one we can read."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise TaxoclipError(f"{path}: missing; {fix}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise TaxoclipError(f"{path}: not a readable safetensors file ({short(error)}); {fix}") from None


def load_plain_tensors(path: str | Path, fix: str) -> Any:
    """A ``torch.save`` file of plain tensors and containers (an optimiser state, a weights file),
    read with ``weights_only``: a file holding any other Python object is refused, unrun."""
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise TaxoclipError(f"{path}: missing; {fix}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise TaxoclipError(
            f"{path}: holds Python objects other than tensors, which taxoclip never loads (it may run code); "
            f"it is not a file taxoclip wrote: {fix}"
        ) from None
    except (OSError, EOFError, RuntimeError, ValueError, KeyError, AttributeError) as error:
        raise TaxoclipError(f"{path}: damaged or not a tensor file ({short(error)}); {fix}") from None


def load_weights_into(module, tensors: dict, path: str | Path, fix: str) -> None:
    """``module.load_state_dict`` whose mismatch (other names or shapes: another model's file) is a
    message naming the file."""
    try:
        module.load_state_dict(tensors)
    except (RuntimeError, KeyError, ValueError) as error:
        raise TaxoclipError(f"{path}: weights of another model ({short(error)}); {fix}") from None


def short(error: BaseException, limit: int = 160) -> str:
    """The first line of an error, cut: enough to recognise, without advice meant for programmers
    (torch's for a pickle is to load it unsafely: never shown)."""
    import pickle

    if isinstance(error, pickle.UnpicklingError) or "weights_only" in str(error):
        return "a file holding Python objects other than tensors, which taxoclip never loads"
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
