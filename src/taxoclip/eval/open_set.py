"""`eval`'s open-set section: how well each novelty score tells photos of species the model never
trained on from photos of those it did, on photos never used to choose the score or set its
threshold: the held-out classes' evaluation half of a model trained with ``--holdout``, or every
photo of ``eval --unknown`` (other species), against the known photos outside the calibration half
(`taxoclip.models.novelty`).

Written as ``open_set.json`` and ``open_set.png`` (each score's histograms of known and unknown
photos, and its ROC curve), and a section of ``report.md``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from taxoclip.models.novelty import (
    NAMED_RANKS,
    SCORES,
    auroc,
    calibration_half,
    open_set_for,
    scores_of,
    taxon_masses,
    trained_only,
)
from taxoclip.taxonomy import HONEST_THRESHOLD

ANSWER_RANKS = NAMED_RANKS  # genus, family, order: what an unknown photo's answer may name


def open_set_report(classifier, cache, rows: np.ndarray, mode: str, out: Path, unknown_cache=None) -> dict | None:
    """The section's numbers (None when there are no unknown photos or no open-set score)."""
    if mode == "off" or (not classifier.held_out and unknown_cache is None):
        return None
    detector = open_set_for(classifier, "auto" if mode == "auto" else mode)
    if detector is None:
        return None
    record = detector.record
    evaluation_classes = np.array(record.get("evaluation_classes") or classifier.held_out, dtype=np.int64)
    labels = cache.labels[rows].astype(np.int64)
    known_mask = np.isin(labels, detector.known_classes.numpy())
    same_cache = record.get("cache_key") == cache.meta.get("cache_key")
    if same_cache:  # the same photos: leave out the calibration half
        known_mask &= ~calibration_half([cache.keys[int(r)] for r in rows], record.get("seed", 0))
    known_rows = rows[known_mask]
    if unknown_cache is not None:  # every photo of the other species given
        unknown_from, unknown_rows = unknown_cache, np.arange(len(unknown_cache.labels))
        unknown_names = sorted(set(unknown_cache.classes.ids))
        unknown_splits = "every photo given"
    else:
        unknown_from, unknown_names = cache, [classifier.classes.ids[int(c)] for c in evaluation_classes]
        if same_cache:  # no photo of a held-out species trained anything or chose the score: use them all
            unknown_rows = np.flatnonzero(np.isin(cache.labels, evaluation_classes))
            unknown_splits = "every split (the model never trained on these species)"
        else:
            unknown_rows = rows[np.isin(labels, evaluation_classes)]
            unknown_splits = "the evaluated split"
    if not len(known_rows) or not len(unknown_rows):
        return None
    known_scores = scores_of(detector, classifier, cache, known_rows)
    unknown_scores = scores_of(detector, classifier, unknown_from, unknown_rows)
    thresholds = record["thresholds"]
    per_score = {
        name: {
            "auroc": auroc(known_scores[name], unknown_scores[name]),
            "known_rejected": float((known_scores[name] > thresholds[name]).mean()),
            "unknown_flagged": float((unknown_scores[name] > thresholds[name]).mean()),
            "threshold": thresholds[name],
            # the ROC's own point at the same share of these known photos kept: what the score could
            # do with a threshold set on far more calibration photos
            "unknown_flagged_at_keep": float(
                (unknown_scores[name] > np.quantile(known_scores[name], record.get("keep", 0.95))).mean()
            ),
        }
        for name in SCORES
    }
    chosen = detector.score
    section = {
        "chosen": chosen,
        "chosen_by": record.get("chosen_by"),
        "keep": record.get("keep"),
        "known_photos": len(known_rows),
        "unknown_photos": len(unknown_rows),
        "unknown_classes": unknown_names,
        "unknown_from": str(unknown_from.path),
        "unknown_splits": unknown_splits,
        "scores": per_score,
    }
    section |= known_accuracy(classifier, cache, known_rows, known_scores[chosen] > thresholds[chosen])
    flagged = unknown_scores[chosen] > thresholds[chosen]
    section["flagged_unknowns"] = int(flagged.sum())
    section["rank_threshold"] = record.get("rank_threshold", HONEST_THRESHOLD)
    section["rank_answers_for_flagged_unknowns"] = rank_answers(
        classifier,
        unknown_from,
        unknown_rows[flagged],
        detector.trained_subset(len(classifier.classes)),
        section["rank_threshold"],
    )
    (out / "open_set.json").write_text(json.dumps(section, indent=1))
    plot_open_set(out / "open_set.png", known_scores, unknown_scores, thresholds, per_score)
    return section


SCORE_CHUNK = 4096  # photos per pass: (photos x classes) probabilities stay ~160 MB at 10,000 classes


def probability_chunks(classifier, cache, rows: np.ndarray):
    """(labels, class probabilities) of ``rows`` in row order, a chunk at a time: never one
    (photos x classes) matrix for the whole split."""
    for part, x in cache.chunks(np.sort(rows), SCORE_CHUNK):
        yield cache.labels[part], classifier.logits_from_features(x).softmax(-1)


def known_accuracy(classifier, cache, rows: np.ndarray, rejected: np.ndarray) -> dict:
    """Known photos' top-1 with nothing rejected, and among the photos the threshold keeps."""
    rejected = rejected[np.argsort(rows)]  # the chunks come in row order
    right = np.concatenate(
        [p.argmax(-1).numpy() == labels for labels, p in probability_chunks(classifier, cache, rows)]
    )
    kept = ~rejected
    return {
        "known_top1": float(right.mean()),
        "known_top1_kept": float(right[kept].mean()) if kept.any() else None,
        "known_kept": float(kept.mean()),
    }


def rank_answers(
    classifier, cache, rows: np.ndarray, known_classes: list[int] | None = None, threshold: float = HONEST_THRESHOLD
) -> dict:
    """For unknown photos the score flagged, at genus, family and order (each from the trained
    species' probabilities summed up the tree, by name against ``cache``'s own class table: the
    other species' data need not share the model's):

    ``given``   the share whose answer names that rank's taxon: its probability reaches the open-set
                rule's ``threshold``, so predict says "an unknown member of ..." there or deeper;
    ``right``   how often the taxon named is the photo's own, among those given;
    ``most_probable_right``  how often the most probable taxon is the photo's own, given or not.
    """
    if not len(rows):
        return {}
    truth_table = cache.classes
    counts: dict[str, dict[str, int]] = {}
    for labels, probabilities in probability_chunks(classifier, cache, rows):
        masses = taxon_masses(trained_only(probabilities, known_classes), classifier.classes, ANSWER_RANKS)
        for rank, (mass, named) in masses.items():
            truth = np.array([truth_table.rows[int(c)].get(rank, "") for c in labels], dtype=object)
            right, given = named == truth, mass >= threshold
            counts.setdefault(rank, {"given": 0, "given_right": 0, "most_probable_right": 0})
            counts[rank]["given"] += int(given.sum())
            counts[rank]["given_right"] += int((right & given).sum())
            counts[rank]["most_probable_right"] += int(right.sum())
    return {
        rank: {
            "given": c["given"] / len(rows),
            "right": c["given_right"] / c["given"] if c["given"] else None,
            "most_probable_right": c["most_probable_right"] / len(rows),
        }
        for rank, c in counts.items()
    }


def plot_open_set(path: Path, known: dict, unknown: dict, thresholds: dict, per_score: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, len(SCORES), figsize=(5 * len(SCORES), 7.5))
    for column, name in enumerate(SCORES):
        both = np.concatenate([known[name], unknown[name]])
        bins = np.linspace(both.min(), np.quantile(both, 0.995) if len(both) > 10 else both.max(), 40)
        axes[0, column].hist(known[name], bins=bins, alpha=0.6, density=True, label="species it trained on")
        axes[0, column].hist(unknown[name], bins=bins, alpha=0.6, density=True, label="species it never saw")
        axes[0, column].axvline(thresholds[name], color="black", linestyle="--", label="threshold")
        axes[0, column].set(title=f"{name}: AUROC {per_score[name]['auroc']:.3f}", xlabel="novelty score")
        axes[0, column].legend(fontsize=8)
        false_alarm, detected = roc_curve(known[name], unknown[name])
        axes[1, column].plot(false_alarm, detected)
        axes[1, column].plot([0, 1], [0, 1], color="grey", linewidth=0.5)
        axes[1, column].set(xlabel="known photos flagged", ylabel="unknown photos flagged", title=f"{name}: ROC")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def roc_curve(known: np.ndarray, unknown: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    cuts = np.unique(np.concatenate([known, unknown]))[::-1]
    return (
        np.r_[0, [(known >= c).mean() for c in cuts]],
        np.r_[0, [(unknown >= c).mean() for c in cuts]],
    )


def markdown(section: dict) -> str:
    """The report's open-set section."""
    lines = [
        "## Species the model never trained on (open set)",
        "",
        f"{section['unknown_photos']} photos of {len(section['unknown_classes'])} species the model was not trained "
        f"on (`{section['unknown_from']}`, {section.get('unknown_splits', 'the evaluated split')}; never used to "
        f"choose) against {section['known_photos']} photos of trained "
        "species. The score used: "
        f"**{section['chosen']}** ({section['chosen_by']}); threshold keeps {100 * section['keep']:.0f}% of known "
        "photos on calibration photos.",
        "",
        "| score | AUROC | known photos flagged | unknown photos flagged | unknown flagged at exactly "
        f"{100 * section['keep']:.0f}% of these known kept |",
        "|---|---|---|---|---|",
    ]
    for name, row in section["scores"].items():
        mark = " (used)" if name == section["chosen"] else ""
        lines.append(
            f"| {name}{mark} | {row['auroc']:.3f} | {100 * row['known_rejected']:.1f}% | "
            f"{100 * row['unknown_flagged']:.1f}% | {100 * row['unknown_flagged_at_keep']:.1f}% |"
        )
    kept = section.get("known_top1_kept")  # None when the threshold kept no known photo
    lines += [
        "",
        f"Known photos' top-1: {100 * section['known_top1']:.1f}% with nothing rejected, "
        + (
            f"{100 * kept:.1f}% among the {100 * section['known_kept']:.1f}% kept."
            if kept is not None
            else "none kept."
        ),
    ]
    answers = section.get("rank_answers_for_flagged_unknowns") or {}
    if answers:
        lines += [
            "",
            f"What the answer says for the {section.get('flagged_unknowns', '')} flagged unknown photos, from the "
            'trained species\' probabilities summed up the tree: a taxon is named ("an unknown member of ...") '
            f"where its probability reaches {section['rank_threshold']:g} (the open-set rule's, chosen on the "
            'calibration species), else the answer stays wider or "unknown".',
            "",
            "| rank | named for | right when named | most probable taxon right |",
            "|---|---|---|---|",
        ]
        for rank, value in answers.items():
            right = "–" if value["right"] is None else f"{100 * value['right']:.1f}%"
            lines.append(
                f"| {rank} | {100 * value['given']:.1f}% | {right} | {100 * value['most_probable_right']:.1f}% |"
            )
    lines += ["", "![open set](open_set.png)", ""]
    return "\n".join(lines)
