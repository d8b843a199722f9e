"""Studies: the same run at several values of one setting (``train sweep TRAINER --param P --values
...``), compared in one table and one plot (``sweep.md``, ``sweep.csv``, ``sweep.json``,
``sweep.png`` in the output folder; each run in its own sub-folder).

A value is *chosen* on the selection split (``select_top1``, photos carved from train), never on
valid, whose numbers are reported beside it. A run without a selection split (LiT) is tabulated
without a choice. Re-balancing studies also draw the valid confusion matrices of the unbalanced
run and the chosen one on one figure (``confusion.png``).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from taxoclip.errors import TaxoclipError
from taxoclip.train.log import load_history

ALIASES = {"warmup": "warmup_steps", "select": "select_fraction"}  # command-line flag names
SHORT = {long: short for short, long in ALIASES.items()}  # run folders: warmup-12, not warmup_steps-12
BALANCING = ("balance", "class_weighted")


def setting_name(config: Any, param: str) -> str:
    name = ALIASES.get(param.lstrip("-").replace("-", "_"), param.lstrip("-").replace("-", "_"))
    names = [f.name for f in fields(config) if f.name not in ("output", "progress", "device")]
    if name not in names:
        raise TaxoclipError(f"--param {param}: not a setting of this trainer; one of {', '.join(names)}")
    unused = config.settings_without_effect() if hasattr(config, "settings_without_effect") else set()
    if name in unused:
        raise TaxoclipError(
            f"--param {param}: has no effect at --depth {config.depth} (every run would be the same); "
            "vary it at the depth that reads it"
        )
    return name


def parse_values(config: Any, name: str, text: str, flag: FlagParser | None = None) -> list:
    """Comma-separated values, each through the same parsing and checks as the setting's own flag
    (``flag``: its name, type and choices) where it has one, else converted to the field's type;
    "none" for an absent value where the field allows it."""
    kind = str(next(f.type for f in fields(config) if f.name == name))
    shown = flag.name if flag else name
    values = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        if item.lower() == "none" and "None" in kind:
            values.append(None)
            continue
        try:
            value = flag.parse(item) if flag and flag.parse not in (None, str) else convert(item, kind)
        except (ValueError, TypeError, argparse.ArgumentTypeError) as error:
            detail = str(error) if isinstance(error, argparse.ArgumentTypeError) else f"not a value of {name} ({kind})"
            raise TaxoclipError(f"--values: {item!r} for {shown}: {detail}") from None
        if flag and flag.choices is not None and value not in flag.choices:
            raise TaxoclipError(f"--values: {item!r} for {shown}: choose from {', '.join(map(str, flag.choices))}")
        values.append(value)
    if not values:
        raise TaxoclipError("--values names no value; give them comma-separated, e.g. --values 1e-4,1e-3")
    check_values(name, values)
    return values


@dataclass(frozen=True)
class FlagParser:
    """What the command line knows of a setting's flag: its name, its argparse type, its choices."""

    name: str
    parse: Callable[[str], Any] | None
    choices: Sequence | None = None


def convert(item: str, kind: str):
    """A value for a field that has no flag of its own, by the field's declared type."""
    if kind.startswith("bool"):
        if item.lower() not in ("true", "false", "yes", "no", "1", "0"):
            raise ValueError(item)
        return item.lower() in ("true", "yes", "1")
    if kind.startswith("int"):
        return int(item)
    if kind.startswith("float"):
        return float(item)
    return item


def check_values(name: str, values: list) -> None:
    """Refused whatever their source (the command line or the library): a number that is not finite
    (a NaN run would be 'chosen') and a value given twice (two runs in one folder)."""
    for value in values:
        if isinstance(value, float) and not math.isfinite(value):
            raise TaxoclipError(f"--values: {value} is not a usable value of {name}: give finite numbers")
    folders = [run_folder(name, v) for v in values]
    if len(set(folders)) != len(folders):
        raise TaxoclipError(f"--values: {name} is given the same value twice ({', '.join(map(str, values))})")


def run_folder(param: str, value) -> str:
    """A run's sub-folder name, safe whatever the value's text: letters, digits and ``.+-_`` only,
    never starting with a dot, so a value such as ``../x`` cannot name a folder outside the sweep's."""
    text = re.sub(r"[^A-Za-z0-9.+_-]", "_", str(value)).lstrip(".") or "_"
    return f"{SHORT.get(param, param)}-{text}"[:120]


def run_sweep(trainer: str, config: Any, param: str, values: list) -> dict:
    """Train one run per value (each resumable in OUTPUT/PARAM-VALUE) and write the comparison."""
    from taxoclip.train.registry import train_function

    train = train_function(trainer)
    check_values(param, values)
    out = Path(config.output)
    rows, histories = [], {}
    for value in values:
        run = replace(config, **{param: value}, output=str(out / run_folder(param, value)))
        if config.progress:
            print(f"== {param} = {value} -> {run.output}")
        train(run)
        history = load_history(run.output)
        histories[str(value)] = history
        rows.append(summarise(param, value, history, Path(run.output)))
    chosen = choose(rows)
    result = {"trainer": trainer, "param": param, "rows": rows, "chosen": chosen, "histories": histories}
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(result, indent=1, default=str))
    write_table(out, rows, param, chosen)
    plot_sweep(out, param, rows, histories)
    if param in BALANCING and chosen is not None:
        plot_confusions(out, param, rows, chosen)
    return result


def summarise(param: str, value, history: list[dict], folder: Path) -> dict:
    """One table row: the run's final numbers (the best selection epoch's when it stopped early,
    since those are the weights it kept)."""
    scored = [r for r in history if "select_top1" in r]
    kept = history[-1]
    if any(r.get("stopped_early") for r in history) and scored:
        kept = max(scored, key=lambda r: r["select_top1"])
    return {
        param: value,
        "select_top1": kept.get("select_top1"),
        "top1": kept.get("top1"),
        "top5": kept.get("top5"),
        "balanced": kept.get("balanced"),
        "worst_recall": kept.get("worst_recall"),
        "unseen_top1": kept.get("unseen_top1"),
        "epoch": kept["epoch"],
        "epochs_run": len(history),
        "seconds": round(sum(r["seconds"] for r in history), 1),
        "folder": folder.name,
    }


def choose(rows: list[dict]) -> int | None:
    """The row with the best selection top-1 (the first on ties); None without a selection split."""
    scored = [i for i, r in enumerate(rows) if r["select_top1"] is not None]
    return max(scored, key=lambda i: rows[i]["select_top1"]) if scored else None


COLUMNS = [
    ("select_top1", "selection top-1"),
    ("top1", "valid top-1"),
    ("top5", "valid top-5"),
    ("balanced", "valid balanced"),
    ("worst_recall", "worst class recall"),
    ("unseen_top1", "unseen top-1"),
]


def markdown(rows: list[dict], param: str, chosen: int | None) -> str:
    shown = [(k, title) for k, title in COLUMNS if any(r.get(k) is not None for r in rows)]
    lines = [
        "| " + " | ".join([param, *(t for _, t in shown), "epoch kept / run", "seconds"]) + " |",
        "|---" * (len(shown) + 3) + "|",
    ]
    for i, r in enumerate(rows):
        name = f"**{r[param]}** (chosen)" if i == chosen else str(r[param])
        cells = [name, *(pct(r.get(k)) for k, _ in shown), f"{r['epoch']} / {r['epochs_run']}", str(r["seconds"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def write_table(out: Path, rows: list[dict], param: str, chosen: int | None) -> None:
    note = (
        f"Chosen on the selection split (photos carved from train): {param} = {rows[chosen][param]}; "
        "valid numbers are reported, never used to choose."
        if chosen is not None
        else "No selection split in these runs: nothing is chosen."
    )
    (out / "sweep.md").write_text(f"# Sweep of {param}\n\n{markdown(rows, param, chosen)}\n\n{note}\n")
    with open(out / "sweep.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def numeric(values: list) -> bool:
    return all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)


def plot_sweep(out: Path, param: str, rows: list[dict], histories: dict[str, list[dict]]) -> None:
    """Left: final top-1 (valid, selection, balanced) against the value; right: valid top-1 by epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (summary, curves) = plt.subplots(1, 2, figsize=(11, 4))
    values = [r[param] for r in rows]
    if numeric(values):
        x = values
        if min(values) > 0 and max(values) / min(values) >= 20:
            summary.set_xscale("log")
    else:
        x = list(range(len(values)))
        summary.set_xticks(x, [str(v) for v in values])
    for key, title in COLUMNS[:4]:
        ys = [r.get(key) for r in rows]
        if any(y is not None for y in ys):
            summary.plot(x, [100 * y if y is not None else math.nan for y in ys], marker="o", label=title)
    summary.set(xlabel=param, ylabel="%", title=f"final accuracy by {param}")
    for value, history in histories.items():
        curves.plot(
            [r["epoch"] for r in history],
            [100 * r.get("top1", np.nan) for r in history],
            marker=".",
            label=f"{param}={value}",
        )
    curves.set(xlabel="epoch", ylabel="valid top-1 (%)", title="valid top-1 by epoch")
    for axis in (summary, curves):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out / "sweep.png", dpi=120)
    plt.close(figure)


def plot_confusions(out: Path, param: str, rows: list[dict], chosen: int) -> None:
    """The unbalanced run's and the chosen run's valid confusion matrices (rows normalised, classes
    ordered from most to fewest training photos) side by side, with each class's recall below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    baseline = next((i for i, r in enumerate(rows) if r[param] in (None, False)), 0)
    pair = [baseline, chosen] if baseline != chosen else [chosen]
    matrices = []
    for i in pair:
        folder = out / rows[i]["folder"]
        if not (folder / "confusion.npy").exists():
            return
        matrices.append(np.load(folder / "confusion.npy"))
    training = load_training_counts(out / rows[chosen]["folder"])
    order = np.argsort(-training, kind="stable") if training is not None else np.arange(len(matrices[0]))
    figure, axes = plt.subplots(2, len(pair), figsize=(6 * len(pair), 8), height_ratios=[3, 1], squeeze=False)
    for column, (i, matrix) in enumerate(zip(pair, matrices, strict=True)):
        m = matrix[np.ix_(order, order)].astype(float)
        m /= np.maximum(1, m.sum(1, keepdims=True))
        axes[0, column].imshow(m, cmap="viridis", vmin=0, vmax=1)
        axes[0, column].set(
            title=f"{param} = {rows[i][param]}: valid top-1 {pct(rows[i]['top1'])}, "
            f"balanced {pct(rows[i]['balanced'])}",
            xlabel="predicted (most to fewest training photos)",
            ylabel="true",
        )
        axes[1, column].bar(range(len(m)), np.diag(m), width=1.0)
        axes[1, column].set(ylim=(0, 1), xlabel="class (most to fewest training photos)", ylabel="recall")
    figure.tight_layout()
    figure.savefig(out / "confusion.png", dpi=110)
    plt.close(figure)


def load_training_counts(folder: Path) -> np.ndarray | None:
    path = folder / "per_class.csv"
    if not path.exists():
        return None
    with open(path) as handle:
        return np.array([int(r["training_images"]) for r in csv.DictReader(handle)])


# The paper's warm-up study, kept by its name: LiT at several warm-up lengths.


def default_warmups(config) -> list[int]:
    """Half an epoch, one epoch, two epochs of steps: the paper's 500/1000/2000 ratio, scaled to
    this dataset and batch size."""
    from taxoclip.data.features import load_features

    cache = load_features(config.features)
    steps = max(1, int(cache.split_mask("train").sum()) // config.batch_size)
    return sorted({max(1, steps // 2), steps, 2 * steps})


def warmup_sweep(config, warmups: list[int] | None = None) -> str:
    result = run_sweep("lit", config, "warmup_steps", warmups or default_warmups(config))
    return markdown(result["rows"], "warmup_steps", result["chosen"])
