"""Species never seen in training (issue 14, part 1), measured: LiT and CatLIP on flowers with 20
classes held out, three holdout seeds, at a few settings, plus calibrated stacking for the
generalised setting.

For each setting and seed: valid top-1 over all classes, the held-out species' top-1 among the 20
unseen only ("20-way") and among all 102 (the generalised setting a field user is in), on their
valid photos; and 20-way on their train-split photos, which no run trained on and no choice was
made on (about 8 times as many photos as valid, so a steadier number). Calibrated
stacking subtracts gamma from every seen class's logit; gamma is chosen on seed 0's photos (the
harmonic mean of seen and unseen top-1) and reported on seeds 1 and 2 only, so the reported numbers
never chose it. Writes benchmarks/results/unseen-study.md and .png.
$TAXOCLIP_UNSEEN_SETTINGS (comma-separated words) runs only the settings whose names hold one.
"""

from __future__ import annotations

import os
import statistics
from dataclasses import replace

import numpy as np
import torch

from bench_catlip import HERE, flowers_cache
from common import benchmark
from taxoclip.models.registry import load_classifier
from taxoclip.train.catlip import CatLIPConfig, train_catlip
from taxoclip.train.lit import LiTSettings, train_lit

OUT = HERE / "results" / "unseen-study"
SEEDS = (0, 1, 2)
SETTINGS = {
    "default (top 2 text blocks train)": {},
    "text tower frozen (projections only)": {"text_layers": 0},
    "paper + common-name captions mixed": {"styles": ["paper", "common"]},
    # rank weights 0.25 / 0.5 / 1 / 2 were tried on seed 0 only; 0.5 was best there (20.9% 20-way)
    "hierarchy-aware targets (rank weight 0.5)": {"rank_weight": 0.5},
    "hierarchy-aware targets, text tower frozen": {"rank_weight": 0.5, "text_layers": 0},
    # CatLIP's label layer on the same embeddings, one run scored both ways (models.catlip)
    "CatLIP, likelihood scoring": {"catlip": "likelihood"},
    "CatLIP, standardised scoring": {"catlip": "standardised"},
}
TEMPLATES_FOR = ("default (top 2 text blocks train)", "hierarchy-aware targets (rank weight 0.5)")
GAMMAS = np.linspace(0, 20, 81)


def scores(
    logits: torch.Tensor, labels: np.ndarray, held_out: np.ndarray, gamma: float = 0.0, unseen_train: float = 0.0
) -> dict:
    seen = np.ones(logits.shape[1], bool)
    seen[held_out] = False
    adjusted = logits - gamma * torch.from_numpy(seen).float()
    predicted = adjusted.argmax(-1).numpy()
    unseen_rows = np.isin(labels, held_out)
    return {
        "all": float((predicted == labels).mean()),
        "seen": float((predicted[~unseen_rows] == labels[~unseen_rows]).mean()),
        "unseen_all": float((predicted[unseen_rows] == labels[unseen_rows]).mean()),
        "unseen_20": among_unseen(logits[unseen_rows], labels[unseen_rows], held_out),
        "unseen_20_train": unseen_train,
    }


def among_unseen(logits: torch.Tensor, labels: np.ndarray, held_out: np.ndarray) -> float:
    """Top-1 among the held-out classes only, of photos of held-out classes."""
    return float((held_out[logits[:, held_out].argmax(-1).numpy()] == labels).mean())


CATLIP_TRAINED: set = set()  # this run's CatLIP folders


def train_and_load(change: dict, base: LiTSettings, folder, seed: int):
    """The setting's model, trained with this holdout seed (CatLIP scored as the setting says)."""
    change = dict(change)
    scoring = change.pop("catlip", None)
    if scoring is None:
        train_lit(replace(base, output=str(folder), holdout_seed=seed, **change))
        return load_classifier(folder)
    folder = folder.parent / f"catlip-seed{seed}"  # one run serves both scorings
    if folder not in CATLIP_TRAINED:
        CATLIP_TRAINED.add(folder)
        train_catlip(
            CatLIPConfig(
                features=base.features, output=str(folder), holdout=base.holdout, holdout_seed=seed, progress=False
            )
        )
    model = load_classifier(folder)
    model.use_scoring(scoring)
    return model


def harmonic(s: dict) -> float:
    return 2 * s["seen"] * s["unseen_all"] / max(1e-9, s["seen"] + s["unseen_all"])


@benchmark("unseen-study")
def study(args) -> list[dict]:
    cache = flowers_cache()
    valid_x, valid_y = cache.split("valid")
    train_x, train_y = cache.split("train")
    base = LiTSettings(features=str(cache.path), output="", holdout=20, eval_every=100, progress=False)
    wanted = [w for w in os.environ.get("TAXOCLIP_UNSEEN_SETTINGS", "").split(",") if w]
    rows = []
    for name, change in SETTINGS.items():
        if wanted and not any(w in name for w in wanted):
            continue
        logits_by_seed, held_by_seed, templates_by_seed, on_train, templates_on_train = {}, {}, {}, {}, {}
        for seed in SEEDS:
            folder = OUT / f"{'-'.join(f'{k}={v}' for k, v in change.items()) or 'default'}-seed{seed}"
            model = train_and_load(change, base, folder, seed)
            logits_by_seed[seed] = model.logits_from_features(valid_x)
            held_by_seed[seed] = held = np.asarray(model.held_out)
            unseen = np.isin(train_y, held)  # photos of the unseen species no run trained on
            on_train[seed] = among_unseen(model.logits_from_features(train_x[unseen]), train_y[unseen], held)
            if name in TEMPLATES_FOR:  # the same model, classes embedded as a CLIP-style template ensemble
                model.use_style("templates")
                templates_by_seed[seed] = model.logits_from_features(valid_x)
                templates_on_train[seed] = among_unseen(
                    model.logits_from_features(train_x[unseen]), train_y[unseen], held
                )
        plain = [scores(logits_by_seed[s], valid_y, held_by_seed[s], unseen_train=on_train[s]) for s in SEEDS]
        gamma = max(GAMMAS, key=lambda g: harmonic(scores(logits_by_seed[0], valid_y, held_by_seed[0], g)))
        # stacking moves seen classes only: the ranking among the unseen, and so that column, is unchanged
        stacked = [scores(logits_by_seed[s], valid_y, held_by_seed[s], gamma, on_train[s]) for s in SEEDS[1:]]
        variants = [(name, plain), (f"{name} + calibrated stacking (gamma {gamma:.2f}, seeds 1-2)", stacked)]
        if templates_by_seed:
            templated = [
                scores(templates_by_seed[s], valid_y, held_by_seed[s], unseen_train=templates_on_train[s])
                for s in SEEDS
            ]
            variants.append((f"{name}, template ensemble at evaluation", templated))
        for label, results in variants:
            row = {"setting": label}
            for key, title in (
                ("all", "valid top-1"),
                ("unseen_20", "unseen 20-way"),
                ("unseen_all", "unseen among all"),
                ("unseen_20_train", "unseen 20-way, train-split photos"),
            ):
                values = [r[key] for r in results]
                row[f"{title} %"] = 100 * statistics.mean(values)
                row[f"{title} spread"] = f"{100 * min(values):.1f}-{100 * max(values):.1f}"
            # seeds 1-2 alone: the seeds no setting was chosen on
            row["unseen 20-way, seeds 1-2 %"] = 100 * statistics.mean(r["unseen_20"] for r in results[-2:])
            rows.append(row)
    lines = ["| " + " | ".join(rows[0]) + " |", "|---" * len(rows[0]) + "|"]
    lines += [
        "| " + " | ".join(f"{v:.1f}" if isinstance(v, float) else str(v) for v in r.values()) + " |" for r in rows
    ]
    OUT.mkdir(parents=True, exist_ok=True)
    (HERE / "results" / "unseen-study.md").write_text(
        "# Species never seen in training (LiT and CatLIP, flowers, 20 held out)\n\n" + "\n".join(lines) + "\n"
    )
    plot(rows, HERE / "results" / "unseen-study.png")
    return rows


def plot(rows: list[dict], path) -> None:
    """Bars per setting: unseen 20-way, unseen among all and valid top-1, with the seeds' spread,
    beside the issue's aims (30% 20-way, 10% among all)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = ("unseen 20-way", "unseen 20-way, train-split photos", "unseen among all", "valid top-1")
    figure, axis = plt.subplots(figsize=(11, 0.7 * len(rows) + 1.5))
    positions = np.arange(len(rows))
    for i, metric in enumerate(metrics):
        means = np.array([r[f"{metric} %"] for r in rows])
        spread = np.array([[float(v) for v in r[f"{metric} spread"].split("-")] for r in rows])
        errors = np.abs(spread.T - means)
        axis.barh(positions + (i - 1.5) * 0.2, means, height=0.2, xerr=errors, label=metric, capsize=2)
    for aim, style in ((30, "--"), (10, ":")):
        axis.axvline(aim, color="black", linestyle=style, linewidth=0.8)
    axis.set_yticks(positions, [r["setting"] for r in rows], fontsize=7)
    axis.invert_yaxis()
    axis.set_xlabel("% (mean over holdout seeds, whiskers min-max); aims: dashed 30%, dotted 10%")
    axis.legend(loc="upper right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
