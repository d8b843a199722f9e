"""Photos of species a model never trained on (issue 25), measured: CatLIP on flowers with 20
species held out, three holdout seeds. Each model's open-set score is fitted from its training
cache (`taxoclip openset`): the threshold keeps 95% of a seeded half of valid's known photos, the
score is chosen by AUROC on 10 of the 20 held-out species; `eval` reports every score on the other
10 species and the other known photos, which chose nothing. Writes
benchmarks/results/open-set-study.md. ``$TAXOCLIP_OPENSET_FEATURES`` names an existing flowers
feature cache (default: the benchmarks' own, built from shards)."""

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


def run_seed(features: str, seed: int, folder: Path) -> dict:
    model, report = folder / f"catlip-{seed}", folder / f"eval-{seed}"
    train = ["train", "catlip", "--features", features, "-o", str(model), "--holdout", "20"]
    assert taxoclip([*train, "--holdout-seed", str(seed), "-q"]) == 0
    assert taxoclip(["openset", "--model", str(model)]) == 0
    assert taxoclip(["eval", "--model", str(model), "--data", features, "-o", str(report), "--no-baselines", "-q"]) == 0
    section = json.loads((report / "open_set.json").read_text())
    (OUT / f"open-set-seed{seed}.png").write_bytes((report / "open_set.png").read_bytes())
    return section


@benchmark("open-set")
def study_open_set(args) -> list[dict]:
    features = os.environ.get("TAXOCLIP_OPENSET_FEATURES") or str(flowers_cache().path)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        sections = {seed: run_seed(features, seed, Path(tmp)) for seed in SEEDS}
    for seed, section in sections.items():
        for name, score in section["scores"].items():
            rows.append(
                {
                    "seed": seed,
                    "score": name + (" (chosen)" if name == section["chosen"] else ""),
                    "auroc": round(score["auroc"], 3),
                    "unknown_flagged_%": round(100 * score["unknown_flagged"], 1),
                    "known_flagged_%": round(100 * score["known_rejected"], 1),
                }
            )
    summary = []
    for seed, section in sections.items():
        answers = section.get("rank_answers_for_flagged_unknowns", {})
        summary.append(
            {
                "seed": seed,
                "chosen": section["chosen"],
                "known_top1_%": round(100 * section["known_top1"], 1),
                "known_top1_kept_%": round(100 * (section["known_top1_kept"] or 0), 1),
                "flagged_unknowns_genus_right_%": round(100 * answers.get("genus", float("nan")), 1),
                "flagged_unknowns_family_right_%": round(100 * answers.get("family", float("nan")), 1),
            }
        )
    mean = {
        name: statistics.mean(r["auroc"] for r in rows if r["score"].startswith(name))
        for name in sections[SEEDS[0]]["scores"]
    }
    lines = [
        "# Open set on flowers: 20 species held out, 3 seeds (CatLIP)",
        "",
        "| seed | score | AUROC | unknown flagged | known flagged |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['seed']} | {r['score']} | {r['auroc']} | {r['unknown_flagged_%']}% | {r['known_flagged_%']}% |"
        for r in rows
    ]
    lines += [
        "",
        "Mean AUROC: " + ", ".join(f"{k} {v:.3f}" for k, v in mean.items()),
        "",
        "| seed | chosen | known top-1 | known top-1 among kept | flagged unknowns: genus right | family right |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {s['seed']} | {s['chosen']} | {s['known_top1_%']}% | {s['known_top1_kept_%']}% | "
        f"{s['flagged_unknowns_genus_right_%']}% | {s['flagged_unknowns_family_right_%']}% |"
        for s in summary
    ]
    (OUT / "open-set-study.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return rows + summary
