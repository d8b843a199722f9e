"""Where the shared real data lives: a flag, then $TAXOCLIP_DATA, then ../shared/data."""

from __future__ import annotations

import os
from pathlib import Path

from taxoclip.errors import TaxoclipError

ENV_VAR = "TAXOCLIP_DATA"


def shared_data_dirs() -> list[Path]:
    """Candidate data folders, most specific first."""
    candidates = []
    if os.environ.get(ENV_VAR):
        candidates.append(Path(os.environ[ENV_VAR]))
    candidates.append(Path.cwd().parent / "shared" / "data")
    repo = Path(__file__).resolve().parents[3]  # src/taxoclip/data/ -> repository root
    candidates.append(repo.parent / "shared" / "data")
    return candidates


def find_dataset(name: str, explicit: str | Path | None = None) -> Path:
    """The folder of a shared dataset (e.g. "flowers102"), or a clear error saying where we looked."""
    if explicit:
        path = Path(explicit)
        if not path.exists():
            raise TaxoclipError(f"{path}: no such folder; pass the {name} folder with --data")
        return path
    looked = []
    for base in shared_data_dirs():
        for path in (base / name, base):
            if path.name == name and path.exists():
                return path
        looked.append(str(base / name))
    raise TaxoclipError(
        f"cannot find the {name} data; looked in {', '.join(dict.fromkeys(looked))}. "
        f"Pass --data PATH or set {ENV_VAR} to the folder that holds {name}/"
    )


def optional_dataset(name: str) -> Path | None:
    """The folder of a shared dataset, or None when it is absent (tests skip then)."""
    try:
        return find_dataset(name)
    except TaxoclipError:
        return None
