"""The fine-tuning study on real flowers (EfficientNet-Lite0 from PyPI), as runs of `train sweep`:

1. the head's learning rate (chosen on the selection split: a tenth of train, never valid);
2. re-balancing at that rate: N per class (27, 54, 100, 206, 400) against no re-balancing and
   class-weighted loss, with balanced accuracy and the worst class's recall next to top-1, and the
   two confusion matrices on one figure; a control that trains the unbalanced run as many steps
   as N = 400 does (N = 400 also means six times more steps per epoch);
3. depth: the head on cached embeddings vs the last stage too on cached activations, (with
   TAXOCLIP_STUDY_FULL=1) the whole tower on photos and the same architecture from scratch, both
   for the epochs this machine affords;
4. the paper's Table 1 from these runs: LiT zero-shot vs the linear probe vs fine-tuned head vs
   fine-tuned tower, same tower, same photos, valid split.

Everything lands in benchmarks/results/finetune-study/ (each sweep's sweep.md/png/csv/json and
runs, table1.md); the returned rows are the summary the benchmark runner prints.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace

from bench_catlip import CACHE, HERE, flowers_cache
from common import benchmark
from taxoclip.models import baselines
from taxoclip.train.finetune import FinetuneConfig, train_finetune
from taxoclip.train.lit import LiTSettings, train_lit
from taxoclip.train.sweep import markdown, run_sweep

OUT = HERE / "results" / "finetune-study"
RATES = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2]
PER_CLASS = [None, 27, 54, 100, 206, 400]


def pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


@benchmark("finetune-study")
def study(args) -> list[dict]:
    cache = flowers_cache()
    OUT.mkdir(parents=True, exist_ok=True)
    base = FinetuneConfig(
        output="", features=str(cache.path), shards=str(CACHE / "flowers-shards"), epochs=20, progress=False
    )
    summary, sections = [], []

    lr = run_sweep("finetune", replace(base, output=str(OUT / "lr")), "lr", RATES)
    best_lr = lr["rows"][lr["chosen"]]["lr"]
    sections.append(("Head learning rate (depth head, 20 epochs)", markdown(lr["rows"], "lr", lr["chosen"])))
    tuned = replace(base, lr=best_lr)

    balance = run_sweep("finetune", replace(tuned, output=str(OUT / "balance")), "balance", PER_CLASS)
    weighted = train_finetune(replace(tuned, output=str(OUT / "class-weighted"), class_weighted=True))
    steps_400 = 400 * len(cache.classes) // tuned.batch_size
    long_epochs = max(tuned.epochs, round(tuned.epochs * steps_400 / (6552 * 0.9 // tuned.batch_size)))
    long_run = train_finetune(replace(tuned, output=str(OUT / "unbalanced-long"), epochs=long_epochs))
    extra = [
        ("class-weighted loss", weighted),
        (f"no re-balancing, {long_epochs} epochs (the steps of N = 400)", long_run),
    ]
    table = markdown(balance["rows"], "balance", balance["chosen"]) + "\n\nControls (same rate):\n\n"
    table += "| run | selection top-1 | valid top-1 | valid balanced | worst class recall |\n|---|---|---|---|---|\n"
    table += "\n".join(
        f"| {name} | {pct(m.get('select_top1'))} | {pct(m.get('top1'))} | {pct(m.get('balanced'))} | "
        f"{pct(m.get('worst_recall'))} |"
        for name, m in extra
    )
    sections.append((f"Re-balancing, N photos per class per epoch (lr {best_lr:g})", table))
    chosen_balance = balance["rows"][balance["chosen"]]["balance"]
    tuned = replace(tuned, balance=chosen_balance)

    depth_base = replace(tuned, output=str(OUT / "depth"), epochs=8, activations=str(CACHE / "flowers-lite0-lower"))
    depth = run_sweep("finetune", depth_base, "depth", ["head", "upper"])
    depth_rows = depth["rows"]
    text = markdown(depth_rows, "depth", depth["chosen"])
    whole = {}
    if os.environ.get("TAXOCLIP_STUDY_FULL"):
        # The whole tower on photos costs ~8 min an epoch on 2 CPU cores: one epoch each, pretrained
        # and from scratch (batch 64), reported as what this machine affords, not as converged runs.
        full = replace(
            tuned,
            depth="full",
            batch_size=64,
            epochs=1,
            warmup_steps=10,
            balance=None,  # N = 400 would make the epoch six times longer: an epoch of the photos as they come
            output=str(OUT / "full"),
        )
        whole["whole tower, pretrained, 1 epoch"] = train_finetune(full)
        scratch = replace(full, pretrained=False, output=str(OUT / "scratch"), lr=1e-3, tower_lr=1e-3)
        whole["whole tower from scratch (random weights), 1 epoch"] = train_finetune(scratch)
        text += "\n\n| run | selection top-1 | valid top-1 | valid balanced |\n|---|---|---|---|\n"
        text += "\n".join(
            f"| {name} | {pct(m.get('select_top1'))} | {pct(m.get('top1'))} | {pct(m.get('balanced'))} |"
            for name, m in whole.items()
        )
    sections.append(("Depth (chosen lr and N; 8 epochs)", text))

    # Table 1: the same tower and photos, valid split.
    lit = train_lit(LiTSettings(features=str(cache.path), output=str(OUT / "lit"), progress=False))
    train_x, train_y = cache.split("train")
    valid_x, valid_y = cache.split("valid")
    probe = float((baselines.probe(train_x, train_y, valid_x, len(cache.classes)).argmax(-1).numpy() == valid_y).mean())
    by_depth = {r["depth"]: r for r in depth_rows}
    table1 = [
        ("LiT zero-shot (text tower tuned, image tower locked)", lit.get("top1")),
        ("linear probe (logistic regression on the locked embeddings)", probe),
        ("fine-tuned head (linear, cross-entropy)", by_depth["head"]["top1"]),
        ("fine-tuned head + last stage (cached activations)", by_depth["upper"]["top1"]),
    ]
    table1 += [(f"fine-tuned {name}", m.get("top1")) for name, m in whole.items()]
    text = "| model (EfficientNet-Lite0, flowers valid) | top-1 |\n|---|---|\n"
    text += "\n".join(f"| {name} | {pct(value)} |" for name, value in table1)
    sections.append(("Table 1: the same tower and photos", text))
    report = "# Fine-tuning study on flowers (EfficientNet-Lite0)\n\n" + "\n\n".join(
        f"## {title}\n\n{body}" for title, body in sections
    )
    (OUT / "study.md").write_text(report + "\n")
    (OUT / "study.json").write_text(
        json.dumps(
            {"lr": lr, "balance": balance, "depth": depth, "controls": dict(extra), "table1": table1},
            indent=1,
            default=str,
        )
    )
    print(report)
    summary += [{"what": name, "top1 %": None if value is None else 100 * value} for name, value in table1]
    summary.append({"what": f"chosen lr {best_lr:g}, N {chosen_balance} (on the selection split)"})
    return summary
