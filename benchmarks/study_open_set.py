"""Photos of species a model never trained on (issue 25), measured: LiT (the paper's system, at its
default settings) and CatLIP on flowers with 20 species held out, three holdout seeds. Each model's
open-set score is fitted from its training cache (`taxoclip openset`): the threshold keeps 95% of a
seeded half of valid's known photos, the score is chosen by AUROC on 10 of the 20 held-out species;
`eval` reports every score on the other 10 species (every photo of them: none trained anything or
chose anything) and on the other half of valid's known photos. Writes
benchmarks/results/open-set-study.md and .json. ``$TAXOCLIP_OPENSET_FEATURES`` names an existing
flowers feature cache (default: the benchmarks' own, built from shards); ``$TAXOCLIP_OPENSET_KINDS``
the trainers (default ``lit,catlip``)."""

from __future__ import annotations

import json
import os
import statistics
import tempfile
from pathlib import Path

from bench_catlip import HERE, flowers_cache
from common import benchmark
from taxoclip.apps.cli import main as taxoclip

SEEDS = (0, 1, 2)
OUT = HERE / "results"
RANKS = ("genus", "family", "order")


def run_seed(features: str, kind: str, seed: int, folder: Path) -> dict:
    model, report = folder / f"{kind}-{seed}", folder / f"eval-{kind}-{seed}"
    train = ["train", kind, "--features", features, "-o", str(model), "--holdout", "20"]
    assert taxoclip([*train, "--holdout-seed", str(seed), "-q"]) == 0
    assert taxoclip(["openset", "--model", str(model)]) == 0
    assert taxoclip(["eval", "--model", str(model), "--data", features, "-o", str(report), "--no-baselines", "-q"]) == 0
    section = json.loads((report / "open_set.json").read_text())
    (OUT / f"open-set-{kind}-seed{seed}.png").write_bytes((report / "open_set.png").read_bytes())
    return section


def percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def pooled_right(sections: list[dict], rank: str) -> float | None:
    """Right when named, pooled over seeds (each seed weighted by the answers it named)."""
    named = right = 0.0
    for section in sections:
        answer = section["rank_answers_for_flagged_unknowns"].get(rank)
        if answer and answer["right"] is not None:
            count = answer["given"] * section["flagged_unknowns"]
            named, right = named + count, right + answer["right"] * count
    return right / named if named else None


@benchmark("open-set")
def study_open_set(args) -> list[dict]:
    features = os.environ.get("TAXOCLIP_OPENSET_FEATURES") or str(flowers_cache().path)
    kinds = os.environ.get("TAXOCLIP_OPENSET_KINDS", "lit,catlip").split(",")
    with tempfile.TemporaryDirectory() as tmp:
        sections = {(kind, seed): run_seed(features, kind, seed, Path(tmp)) for kind in kinds for seed in SEEDS}
    rows = []
    for (kind, seed), section in sections.items():
        for name, score in section["scores"].items():
            rows.append(
                {
                    "model": kind,
                    "seed": seed,
                    "score": name,
                    "chosen": name == section["chosen"],
                    "auroc": round(score["auroc"], 3),
                    "unknown_flagged_%": round(100 * score["unknown_flagged"], 1),
                    "known_flagged_%": round(100 * score["known_rejected"], 1),
                    "unknown_flagged_at_95%_kept_%": round(100 * score["unknown_flagged_at_keep"], 1),
                }
            )
    lines = [
        "# Open set on flowers: 20 species held out, 3 seeds",
        "",
        "Each score at its own threshold (95% of known calibration photos kept); the chosen one (by AUROC on "
        "the 10 calibration species) in bold. Reported on the other 10 species, every photo of them, and on "
        "the known valid photos that chose nothing.",
        "",
        "| model | seed | unknown photos | " + " | ".join(sections[kinds[0], SEEDS[0]]["scores"]) + " |",
        "|---|---|---|" + "---|" * len(sections[kinds[0], SEEDS[0]]["scores"]),
    ]
    for (kind, seed), section in sections.items():
        cells = []
        for name, score in section["scores"].items():
            cell = (
                f"{score['auroc']:.3f} · {100 * score['unknown_flagged']:.0f}% / {100 * score['known_rejected']:.1f}%"
                f" · {100 * score['unknown_flagged_at_keep']:.0f}%"
            )
            cells.append(f"**{cell}**" if name == section["chosen"] else cell)
        lines.append(f"| {kind} | {seed} | {section['unknown_photos']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Cells: AUROC · unknown photos flagged / known photos flagged, at the threshold set on the calibration "
        "half · unknown photos flagged at exactly 95% of the evaluated known photos kept (the ROC's point).",
        "",
    ]
    lines += [
        "| model | chosen AUROC (mean) | max-softmax AUROC (mean) | unknown flagged (chosen, per seed) | "
        "known flagged | at exactly 95% kept | known top-1 / among kept | rank threshold | "
        + " | ".join(f"{rank} named for / right when named" for rank in RANKS)
        + " |",
        "|---|---|---|---|---|---|---|---|" + "---|" * len(RANKS),
    ]
    summary = []
    for kind in kinds:
        mine = [sections[kind, seed] for seed in SEEDS]
        chosen = [s["scores"][s["chosen"]] for s in mine]
        entry = {
            "model": kind,
            "chosen": [s["chosen"] for s in mine],
            "chosen_auroc_mean": round(statistics.mean(c["auroc"] for c in chosen), 3),
            "max_softmax_auroc_mean": round(statistics.mean(s["scores"]["max-softmax"]["auroc"] for s in mine), 3),
            "unknown_flagged": [round(c["unknown_flagged"], 3) for c in chosen],
            "known_flagged": [round(c["known_rejected"], 3) for c in chosen],
            "unknown_flagged_at_keep": [round(c["unknown_flagged_at_keep"], 3) for c in chosen],
            "known_top1": [round(s["known_top1"], 3) for s in mine],
            "known_top1_kept": [round(s["known_top1_kept"] or 0, 3) for s in mine],
            "rank_threshold": [s.get("rank_threshold") for s in mine],
            "answers": {rank: [s["rank_answers_for_flagged_unknowns"].get(rank) for s in mine] for rank in RANKS},
            "pooled_right": {rank: pooled_right(mine, rank) for rank in RANKS},
        }
        summary.append(entry)
        answers = []
        for rank in RANKS:
            per_seed = ", ".join(
                f"{percent(a['given'])} / {percent(a['right'])}" if a else "–" for a in entry["answers"][rank]
            )
            answers.append(f"{per_seed} (pooled right {percent(entry['pooled_right'][rank])})")
        lines.append(
            f"| {kind} | {entry['chosen_auroc_mean']} ({', '.join(entry['chosen'])}) | "
            f"{entry['max_softmax_auroc_mean']} | {', '.join(percent(v) for v in entry['unknown_flagged'])} | "
            f"{', '.join(percent(v) for v in entry['known_flagged'])} | "
            f"{', '.join(percent(v) for v in entry['unknown_flagged_at_keep'])} | "
            + ", ".join(
                f"{percent(a)} / {percent(b)}"
                for a, b in zip(entry["known_top1"], entry["known_top1_kept"], strict=True)
            )
            + " | "
            + ", ".join("none" if t > 1 else f"{t:g}" for t in entry["rank_threshold"])
            + " | "
            + " | ".join(answers)
            + " |"
        )
    (OUT / "open-set-study.md").write_text("\n".join(lines) + "\n")
    (OUT / "open-set-study.json").write_text(json.dumps({"rows": rows, "summary": summary}, indent=1))
    print("\n".join(lines))
    return rows
