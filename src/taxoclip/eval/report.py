"""`taxoclip eval`: score a model on cached image embeddings, run the baselines on the same
embeddings, and write a report directory a person can open:

  report.md, report.html    the tables and plots
  metrics.json              every number
  per_class.csv, per_rank.csv, confused_pairs.csv, groups-<column>.csv, comparison.csv
  confusion.png, accuracy_by_rank.png, long_tail.png, data_efficiency.png
"""

from __future__ import annotations

import csv
import html
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from taxoclip.data.features import FeatureCache, load_features
from taxoclip.errors import TaxoclipError
from taxoclip.eval.config import EvalConfig
from taxoclip.eval.metrics import ROLLUP_RANKS, Evaluation, RankCodes
from taxoclip.eval.open_set import markdown as open_set_markdown
from taxoclip.eval.open_set import open_set_report
from taxoclip.models import baselines
from taxoclip.models.classifier import Classifier, EmbeddingClassifier
from taxoclip.models.extraction import extract_features
from taxoclip.models.registry import OPEN_CLIP_PREFIX, load_classifier
from taxoclip.taxonomy import ClassTable

CONFUSION_MAX_GROUPS = 300  # beyond this a species-level matrix is unreadable: use a coarser rank


def features_for(config: EvalConfig, tower_name: str, pretrained: bool, classifier=None) -> FeatureCache:
    """The data's embeddings by the model's own image tower: a cache made by that very tower
    (same id, not only the same name), or the photos embedded now."""
    data = Path(config.data)
    if (data / "meta.json").exists():
        cache = load_features(data)
        cached = cache.meta["tower"]
        wanted = getattr(classifier, "image_tower_id", None)
        if cached["name"] != tower_name or (wanted and cached.get("id") != wanted):
            what = cached["name"] if cached["name"] != tower_name else f"another version of {tower_name}"
            raise TaxoclipError(
                f"{data} holds embeddings of {what} (tower id {cached.get('id')}), but the model uses "
                f"{tower_name}{f' (id {wanted})' if wanted else ''}; pass the shards or photos instead and they "
                "will be embedded with the model's tower"
            )
        return cache
    tower = classifier.image_tower if classifier is not None else tower_name  # a trained tower, when it has one
    return extract_features(
        data, tower, Path(config.output) / "features", pretrained=pretrained, progress=config.progress
    )


def run_evaluation(config: EvalConfig) -> dict:
    started = time.perf_counter()
    out = Path(config.output)
    out.mkdir(parents=True, exist_ok=True)
    tower_name, pretrained, classifier = resolve_tower(config)
    cache = features_for(config, tower_name, pretrained, classifier)
    classes = cache.classes
    if classifier is None:  # open_clip: its class embeddings come from the data's class table
        classifier = load_classifier(
            config.model,
            classes=classes,
            captions=(cache.meta.get("captions") or {}).get("by_class"),
            style=config.style,
            pretrained=not config.random_weights,
            cache_dir=out / "cache",
        )
    if classifier.classes.ids != classes.ids:
        raise TaxoclipError(
            "the model's classes differ from the data's class table; evaluate on data made from the same class metadata"
        )
    rows = np.flatnonzero(cache.split_mask(config.split))
    labels = cache.labels[rows].astype(np.int64)
    train_cache, baseline_note = baseline_source(cache, classifier) if config.baselines else (None, "not asked for")
    train_counts = (
        np.bincount(train_cache.labels[train_cache.split_mask("train")], minlength=len(classes))
        if train_cache is not None
        else None
    )
    seen = seen_classes(classifier, len(classes))
    group_by = config.group_by or default_groups(classes)

    # The model, chunk by chunk: memory stays bounded however many images and classes.
    evaluation = Evaluation(classes, group_by=group_by, seen=seen)
    scoring_started = time.perf_counter()
    for start in range(0, len(rows), config.chunk):
        chunk = rows[start : start + config.chunk]
        logits = classifier.logits_from_features(cache.read(chunk))
        evaluation.add(logits.softmax(-1), torch.from_numpy(labels[start : start + config.chunk]))
    scoring_seconds = time.perf_counter() - scoring_started
    metrics = evaluation.result()
    name = "LiT zero-shot" if classifier.kind == "lit" else f"{config.model} zero-shot"
    comparison = [summary_row(name, "all", metrics)]

    efficiency = []
    if train_cache is not None:
        comparison, efficiency = run_baselines(
            config, train_cache, cache, classifier, rows, labels, classes, comparison, metrics["top1"]
        )
        scored = len(baseline_test_positions(len(rows), config.baseline_rows))
        if scored < len(rows):
            baseline_note += f"; scored on a seeded sample of {scored:,} of the {len(rows):,} photos"
        baseline_note += f"; trained baselines take at most {config.baseline_steps} steps of 256 rows"

    is_directory = not config.model.startswith(OPEN_CLIP_PREFIX)
    unknown = None
    if config.unknown and is_directory:  # other species' photos, embedded by the model's own tower
        unknown = features_for(
            replace(config, data=config.unknown, output=str(out / "unknown")), tower_name, pretrained, classifier
        )
    open_set = open_set_report(classifier, cache, rows, config.open_set, out, unknown) if is_directory else None
    report = {
        "model": config.model,
        "data": str(cache.path),
        "split": config.split,
        "style": config.style or "model default",
        "scoring": config.scoring or "model default",
        "metrics": metrics,
        "comparison": comparison,
        "baselines": baseline_note,
        "data_efficiency": efficiency,
        "timing": {
            "scoring_seconds": round(scoring_seconds, 3),
            "total_seconds": round(time.perf_counter() - started, 1),
            "images": len(rows),
            "classes": len(classes),
        },
    }
    if open_set:
        report["open_set"] = open_set
    write_report(out, report, evaluation, classes, train_counts)
    if open_set:  # its own section, after the rest
        with open(out / "report.md", "a") as handle:
            handle.write("\n" + open_set_markdown(open_set))
    if is_directory and (Path(config.model) / "config.json").exists():  # its card shows what eval measured
        from taxoclip.models.model_card import record_evaluation

        record_evaluation(Path(config.model), str(cache.path), config.split, metrics)
    return report


def resolve_tower(config: EvalConfig):
    """(image tower name, pretrained?, the classifier when it can be opened before the data)."""
    if config.model.startswith(OPEN_CLIP_PREFIX):  # needs the data's class table: opened later
        return config.model, not config.random_weights, None
    classifier = load_classifier(config.model, style=config.style, scoring=config.scoring)
    return classifier.image_tower_name, classifier.image_pretrained, classifier


def seen_classes(classifier: Classifier, n_classes: int) -> np.ndarray | None:
    """Which classes had training images, for a model trained with --holdout (else None)."""
    if not classifier.held_out:
        return None
    seen = np.ones(n_classes, dtype=bool)
    seen[classifier.held_out] = False
    return seen


def default_groups(classes: ClassTable) -> list[str]:
    """Supercategory when the table has one, else the coarsest rank that splits the classes."""
    if any(row.get("supercategory") for row in classes):
        return ["supercategory"]
    for rank in ROLLUP_RANKS:
        if len({row.get(rank.column) for row in classes if row.get(rank.column)}) > 1:
            return [rank.column]
    return []


def summary_row(method: str, shots: str, metrics: dict) -> dict:
    per_rank = metrics["per_rank"]
    return {
        "method": method,
        "train images per class": shots,
        "top1": metrics["top1"],
        "top5": metrics["top5"],
        "genus top1": per_rank.get("genus", {}).get("rollup"),
        "family top1": per_rank.get("family", {}).get("rollup"),
        "mistake LCA depth": metrics["mistake_lca_depth_mean"],
    }


def baseline_source(cache: FeatureCache, classifier: Classifier) -> tuple[FeatureCache | None, str]:
    """(the cache whose train split the baselines are fitted on, a sentence for the report saying
    which it is, or why there are no baselines). The data's own train split when it has one, else
    the feature cache the model trained on, when it still exists with the same tower and classes."""
    if "train" in cache.split_names:
        return cache, f"fitted on the train split of {cache.path}"
    recorded = (getattr(classifier, "training", None) or {}).get("features")
    none = f"not run: {cache.path} has no train split"
    if not recorded:
        return (
            None,
            f"{none}, and the model records no feature cache it trained on; evaluate on data with a train split",
        )
    path = Path(recorded)
    if not (path / "meta.json").exists():
        return None, (
            f"{none}, and the feature cache the model trained on ({path}) is gone; rebuild it with 'taxoclip "
            "features' at that path, or evaluate on data with a train split"
        )
    source = load_features(path)
    ours, theirs = cache.meta["tower"].get("id"), source.meta["tower"].get("id")
    if ours != theirs:
        return (
            None,
            f"{none}, and the model's training cache {path} holds another tower's embeddings ({theirs}, not {ours})",
        )
    if source.classes.ids != cache.classes.ids or "train" not in source.split_names:
        return None, f"{none}, and the model's training cache {path} has another class table or no train split"
    return (
        source,
        f"fitted on the train split of the model's training cache {path} (tower {theirs}), scored on {cache.path}",
    )


def run_baselines(config, train_cache, cache, classifier, rows, labels, classes, comparison, zero_shot_top1):
    """The probe, nearest class mean and (embedding models) Transfer Init, fitted on
    ``train_cache``'s train split (streamed from its memory map, never read whole) and scored chunk
    by chunk on ``rows`` of ``cache`` (at most ``config.baseline_rows`` of them, a seeded sample
    whose size the report states)."""
    train_rows = np.flatnonzero(train_cache.split_mask("train"))
    train_y_all = train_cache.labels[train_rows].astype(np.int64)
    source_all = baselines.RowSource.of_cache(train_cache, train_rows, train_y_all)
    test_positions = baseline_test_positions(len(rows), config.baseline_rows)
    test_rows, test_labels = rows[test_positions], labels[test_positions]
    budget = baselines.BaselineBudget(max_steps=config.baseline_steps)
    embeddings = classifier.image_embeddings if isinstance(classifier, EmbeddingClassifier) else None
    efficiency = [{"method": "zero-shot", "shots": 0, "top1": zero_shot_top1}]

    def score(scorer: baselines.Scorer, prepare=None) -> dict:
        evaluation = Evaluation(classes)
        for start in range(0, len(test_rows), config.chunk):
            x = cache.read(test_rows[start : start + config.chunk])
            x = prepare(x) if prepare is not None else x
            evaluation.add(scorer.probabilities(x), torch.from_numpy(test_labels[start : start + config.chunk]))
        return evaluation.result()

    def as_numpy(function):
        return lambda x: np.asarray(function(x), np.float32)

    for shots in (*config.shots, None):
        source = source_all.subset(baselines.few_shot_rows(train_y_all, shots))
        label = "all" if shots is None else str(shots)
        methods = {
            "logistic-regression probe": (
                lambda s=source: baselines.fit_probe(
                    s, len(classes), baselines.BaselineBudget(max_steps=config.baseline_steps, lr=baselines.PROBE_LR)
                ),
                None,
            ),
            "nearest class mean": (lambda s=source: baselines.fit_nearest_class_mean(s, len(classes)), None),
        }
        if embeddings is not None:  # Transfer Init needs caption embeddings
            methods["Transfer Init (CatLIP)"] = (
                lambda s=source: baselines.fit_transfer_init(
                    s.mapped(as_numpy(embeddings)), classifier.class_embeddings, classifier.scale, budget
                ),
                as_numpy(embeddings),
            )
        for method, (fit, prepare) in methods.items():
            if config.progress:
                print(f"baseline: {method}, {label} training images per class ({len(source):,} rows)")
            metrics = score(fit(), prepare)
            comparison.append(summary_row(method, label, metrics))
            efficiency.append(
                {
                    "method": method,
                    "shots": shots if shots is not None else int(np.bincount(source.labels).max()),
                    "label": label,
                    "top1": metrics["top1"],
                }
            )
    return comparison, efficiency


def baseline_test_positions(count: int, limit: int | None, seed: int = 0) -> np.ndarray:
    """Which of the ``count`` evaluated rows the baselines are scored on: all of them, or a seeded
    sample of ``limit`` (in row order) when there are more."""
    if limit is None or count <= limit:
        return np.arange(count)
    return np.sort(np.random.default_rng(seed).choice(count, size=limit, replace=False))


# --- writing --------------------------------------------------------------------------------------


def write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        writer.writeheader()
        writer.writerows(rows)


def write_report(
    out: Path, report: dict, evaluation: Evaluation, classes: ClassTable, train_counts: np.ndarray | None
) -> None:
    metrics = report["metrics"]
    per_class = evaluation.per_class(train_counts)
    confused = evaluation.confused_pairs(30)
    hardest = evaluation.hardest_taxa()
    per_rank = [{"rank": rank, **values} for rank, values in metrics["per_rank"].items()]
    report["hardest_classes"] = sorted(per_class, key=lambda r: (r["top1"], -r["images"]))[:15]
    report["hardest_taxa"] = hardest
    report["confused_pairs"] = confused
    (out / "metrics.json").write_text(json.dumps(report, indent=1, default=float))
    write_csv(out / "per_class.csv", per_class)
    write_csv(out / "per_rank.csv", per_rank)
    write_csv(out / "confused_pairs.csv", confused)
    write_csv(out / "comparison.csv", report["comparison"])
    for column, rows in metrics["groups"].items():
        write_csv(out / f"groups-{column}.csv", rows)
    plots = make_plots(out, report, evaluation, classes, per_class)
    sections = report_sections(report, per_rank, plots)
    (out / "report.md").write_text(to_markdown(sections))
    (out / "report.html").write_text(to_html(sections))


def make_plots(
    out: Path, report: dict, evaluation: Evaluation, classes: ClassTable, per_class: list[dict]
) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    # Confusion matrix at species level when readable, else at the finest rank that is.
    codes, level = confusion_level(evaluation, classes)
    if codes is not None:
        size = len(codes.groups)
        matrix = np.zeros((size, size))
        if level == "species":
            for t in range(size):
                matrix[t, t] = evaluation.top1[t]
            for (t, p), n in evaluation.pairs.items():
                matrix[t, p] += n
        else:
            for (t, p), n in evaluation.rank_confusion[level].items():
                matrix[t, p] += n
        rows = matrix.sum(1, keepdims=True)
        figure, axis = plt.subplots(figsize=(8, 7))
        image = axis.imshow(
            np.divide(matrix, rows, out=np.zeros_like(matrix), where=rows > 0),
            cmap="viridis",
            vmin=0,
            vmax=1,
            interpolation="nearest",
        )
        axis.set(title=f"confusion at {level} level (rows: truth, normalised)", xlabel="predicted", ylabel="true")
        if size <= 40:
            axis.set_xticks(range(size), codes.groups, rotation=90, fontsize=6)
            axis.set_yticks(range(size), codes.groups, fontsize=6)
        figure.colorbar(image, ax=axis, fraction=0.046)
        figure.tight_layout()
        figure.savefig(out / "confusion.png", dpi=120)
        plt.close(figure)
        made.append("confusion.png")

    per_rank = report["metrics"]["per_rank"]
    ranks = [r.column for r in ROLLUP_RANKS if r.column in per_rank] + ["species"]
    figure, axis = plt.subplots(figsize=(7, 4))
    x = np.arange(len(ranks))
    axis.bar(x - 0.2, [100 * per_rank[r]["rollup"] for r in ranks], 0.4, label="probabilities summed up the tree")
    axis.bar(x + 0.2, [100 * per_rank[r]["top1_lineage"] for r in ranks], 0.4, label="lineage of the top-1 species")
    axis.set_xticks(x, ranks)
    axis.set(ylabel="top-1 accuracy (%)", ylim=(0, 100), title="accuracy at every rank")
    axis.legend(loc="lower left")
    axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(out / "accuracy_by_rank.png", dpi=120)
    plt.close(figure)
    made.append("accuracy_by_rank.png")

    if per_class and "train_images" in per_class[0]:
        figure, axis = plt.subplots(figsize=(7, 4))
        axis.scatter([r["train_images"] for r in per_class], [100 * r["top1"] for r in per_class], s=12, alpha=0.6)
        axis.set(
            xlabel="training images of the class",
            ylabel="class top-1 (%)",
            title="per-class accuracy and the long tail",
        )
        axis.grid(alpha=0.3)
        figure.tight_layout()
        figure.savefig(out / "long_tail.png", dpi=120)
        plt.close(figure)
        made.append("long_tail.png")

    efficiency = report.get("data_efficiency") or []
    if len(efficiency) > 1:
        figure, axis = plt.subplots(figsize=(7, 4))
        zero = next((r["top1"] for r in efficiency if r["method"] == "zero-shot"), None)
        for method in dict.fromkeys(r["method"] for r in efficiency if r["method"] != "zero-shot"):
            points = [r for r in efficiency if r["method"] == method]
            axis.plot([r["shots"] for r in points], [100 * r["top1"] for r in points], marker="o", label=method)
        if zero is not None:
            axis.axhline(100 * zero, color="black", linestyle="--", label="zero-shot (no training images)")
        axis.set_xscale("log")
        axis.set(xlabel="training images per class", ylabel="top-1 (%)", title="data efficiency")
        axis.grid(alpha=0.3)
        axis.legend()
        figure.tight_layout()
        figure.savefig(out / "data_efficiency.png", dpi=120)
        plt.close(figure)
        made.append("data_efficiency.png")
    return made


def confusion_level(evaluation: Evaluation, classes: ClassTable) -> tuple[RankCodes | None, str]:
    if len(classes) <= CONFUSION_MAX_GROUPS:
        return RankCodes(
            "species", np.arange(len(classes)), [r.get("common_name") or r["id"] for r in classes]
        ), "species"
    for rank in reversed(ROLLUP_RANKS):
        codes = evaluation.lineage[rank.column]
        if codes.known and len(codes.groups) <= CONFUSION_MAX_GROUPS:
            return codes, rank.column
    return None, ""


# --- the report text: one list of sections, rendered to Markdown and to HTML --------------------------


def pct(value) -> str:
    return "" if value is None else f"{100 * value:.1f}%"


def report_sections(report: dict, per_rank: list[dict], plots: list[str]) -> list[tuple[str, object]]:
    m = report["metrics"]
    scoring = report.get("scoring", "model default")
    intro = (
        f"Model `{report['model']}` on the `{report['split']}` split of `{report['data']}`: "
        f"{m['images']} images, {m['classes_scored']} classes, caption style {report['style']}"
        f"{'' if scoring == 'model default' else f', scoring {scoring}'}. "
        f"Zero-shot top-1 **{pct(m['top1'])}**, top-5 **{pct(m['top5'])}**, mean per-class top-1 "
        f"{pct(m['mean_class_top1'])}."
    )
    if "unseen_top1" in m:
        intro += (
            f" Classes seen in training: {pct(m.get('seen_top1'))}; never seen: {pct(m['unseen_top1'])} among all "
            f"classes, {pct(m.get('unseen_top1_among_unseen'))} among the {m.get('unseen_classes')} unseen only."
        )
    if m["mistakes"]:
        intro += (
            f" Of {m['mistakes']} mistakes, the truth and the answer share on average "
            f"{m['mistake_lca_depth_mean']:.2f} ranks (kingdom = 1 … genus = 6)."
        )
    comparison = [
        {
            k: (
                pct(v)
                if isinstance(v, float) and k not in ("mistake LCA depth",)
                else (f"{v:.2f}" if isinstance(v, float) else v)
            )
            for k, v in row.items()
        }
        for row in report["comparison"]
    ]
    ranks = [
        {
            "rank": r["rank"],
            "groups": r["groups"],
            "images": r["images"],
            "summed up the tree": pct(r["rollup"]),
            "top-1 lineage": pct(r["top1_lineage"]),
        }
        for r in per_rank
    ]
    sections: list[tuple[str, object]] = [
        ("Summary", intro),
        ("Comparison (in the shape of the paper's Table 1)", comparison),
        ("Where the baselines come from", f"Baselines: {report['baselines']}."),
        ("Accuracy at every rank", ranks),
    ]
    if "accuracy_by_rank.png" in plots:
        sections.append(("", "accuracy_by_rank.png"))
    sections.append(
        (
            "Hardest classes",
            [
                {
                    "class": r["name"],
                    "images": r["images"],
                    "top-1": pct(r["top1"]),
                    "most confused with": r["most_confused_name"],
                }
                for r in report["hardest_classes"]
            ],
        )
    )
    for rank, rows in report["hardest_taxa"].items():
        if rows:
            sections.append(
                (
                    f"Hardest {rank} groups",
                    [
                        {rank: r["group"], "images": r["images"], "classes": r["classes"], "top-1": pct(r["top1"])}
                        for r in rows[:5]
                    ],
                )
            )
    sections.append(
        (
            "Most confused pairs",
            [
                {"true": r["true"], "predicted": r["predicted"], "images": r["images"], "they share down to": r["lca"]}
                for r in report["confused_pairs"][:15]
            ],
        )
    )
    for column, rows in m["groups"].items():
        sections.append(
            (
                f"By {column}",
                [
                    {column: r["group"], "images": r["images"], "top-1": pct(r["top1"]), "top-5": pct(r["top5"])}
                    for r in rows
                ],
            )
        )
    for plot, title in (
        ("confusion.png", "Confusion"),
        ("long_tail.png", "The long tail"),
        ("data_efficiency.png", "Data efficiency"),
    ):
        if plot in plots:
            sections.append((title, plot))
    timing = report["timing"]
    sections.append(
        (
            "Timing",
            f"Scored {timing['images']} images against {timing['classes']} classes in "
            f"{timing['scoring_seconds']} s; the whole evaluation took {timing['total_seconds']} s.",
        )
    )
    return sections


def to_markdown(sections: list[tuple[str, object]]) -> str:
    lines = ["# Evaluation report", ""]
    for title, body in sections:
        if title:
            lines += [f"## {title}", ""]
        if isinstance(body, str) and body.endswith(".png"):
            lines += [f"![{title or body}]({body})", ""]
        elif isinstance(body, str):
            lines += [body, ""]
        elif body:
            columns = list(body[0])
            lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            lines += ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in body]
            lines.append("")
    return "\n".join(lines)


def to_html(sections: list[tuple[str, object]]) -> str:
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>taxoclip evaluation</title><style>",
        "body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}",
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}",
        "th{background:#f3f3f3}img{max-width:100%}</style></head><body><h1>Evaluation report</h1>",
    ]
    for title, body in sections:
        if title:
            parts.append(f"<h2>{html.escape(title)}</h2>")
        if isinstance(body, str) and body.endswith(".png"):
            parts.append(f"<img src='{html.escape(body)}' alt='{html.escape(title or body)}'>")
        elif isinstance(body, str):
            text = html.escape(body)
            while "**" in text:
                text = text.replace("**", "<b>", 1).replace("**", "</b>", 1)
            parts.append(f"<p>{text.replace('`', '')}</p>")
        elif body:
            columns = list(body[0])
            parts.append("<table><tr>" + "".join(f"<th>{html.escape(str(c))}</th>" for c in columns) + "</tr>")
            parts += [
                "<tr>" + "".join(f"<td>{html.escape(str(row.get(c, '')))}</td>" for c in columns) + "</tr>"
                for row in body
            ]
            parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)
