"""Photos of species a model does not know: a novelty score for every classifier kind, and the
threshold above which a photo is "not one of the N species this model knows".

Five scores, each higher for a photo less like the training photos:

  max-softmax    1 - the top class probability (the baseline every paper reports), its softmax at
                 a temperature chosen on the calibration classes
  energy         -logsumexp(logits): low total evidence for every class
  mahalanobis    the squared distance of the photo's image-tower features to the nearest class
                 mean under the training photos' shared within-class covariance
  relative-mahalanobis
                 that distance less the photo's distance to all training photos under their
                 overall covariance (Ren et al. 2021): on a locked tower's features, where species
                 of one family sit close, plain distances scored 0.61 AUROC on flowers' held-out
                 species, relative ones 0.84
  combined       max-softmax and relative-mahalanobis, each standardised on the known calibration
                 photos, added (CatLIP on flowers' held-out species: 0.922 mean AUROC, max-softmax
                 0.917; LiT's max-softmax alone 0.955, its best)

The class means and the covariance (kept as a whitening matrix) come from the training cache's
rows of the classes the model trained on, read in chunks. The threshold is the share ``keep`` of
known photos' scores (default 95% kept) on *calibration* photos: a seeded half of the valid
split's known photos. The score itself is chosen by AUROC on *calibration classes*: a seeded half
of the classes the model was trained without (``--holdout``); the other half, and the other valid
photos, are left for `eval` to report on, never used to choose. The calibration classes also
choose max-softmax's temperature and the rank threshold at which a flagged photo's genus, family
or order is named ("an unknown member of Asteraceae"). Without held-out classes the kind's
measured defaults are used and the record says so.

The logit scores (max-softmax, energy) read only the logits of the species the model trained on:
for a model trained with ``--holdout`` the held-out species stand for species outside the class
table, so they must not be there to catch a photo's probability (a LiT model would name some of
them zero-shot). Directories fitted before this rule keep their own (``"logits"`` absent from the
record: every class), so their thresholds stay the ones they were set with.

Kept in the model directory as ``novelty.json`` (the choice, threshold, what it rests on) and
``novelty.safetensors`` (whitened class means, whitening, centre).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from taxoclip.errors import TaxoclipError
from taxoclip.models.novelty_names import NOVELTY_SCORES
from taxoclip.taxonomy import HONEST_THRESHOLD

SCORES = NOVELTY_SCORES
COMBINED = ("max-softmax", "relative-mahalanobis")  # the scores "combined" adds, each standardised
# The score a model without held-out species to choose on gets, by kind: the best mean AUROC on
# flowers' held-out species over three seeds (`bench open-set`): LiT's max-softmax 0.955 against
# combined 0.925 (0.953 against 0.943 at temperature 1); CatLIP's combined 0.922 against 0.917.
DEFAULT_SCORES = {"lit": "max-softmax"}
DEFAULT_SCORE = "combined"  # every other kind
# The softmax temperature of the max-softmax score, chosen by AUROC on the calibration classes from
# these (as ODIN tempers its softmax). On flowers' held-out species LiT chose 2 in all three seeds
# (flagged at 95% kept: 61/73/76% against 57/72/71% at 1); CatLIP chose 1. Without held-out
# classes a kind takes its measured default.
TEMPERATURES = (0.5, 1.0, 2.0, 4.0)
DEFAULT_TEMPERATURES = {"lit": 2.0}
# An unknown photo's answer names the deepest genus, family or order whose trained species' summed
# probability reaches the rule's rank threshold: the lowest of RANK_THRESHOLDS at which at least
# RANK_PRECISION of such answers were right on the flagged photos of the calibration species (at
# least MIN_NAMED of them), else none ("unknown", or a class or wider). Predict's honest threshold
# (0.5) named a wrong genus or family for most unknown flowers; on flowers' calibration species LiT
# chose 0.7, 0.7 and 0.6 over three seeds, CatLIP 0.95, 0.95 and 0.9: their defaults without held-out species.
RANK_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
RANK_PRECISION = 0.8
MIN_NAMED = 5
NAMED_RANKS = ("genus", "family", "order")  # deepest first: the answers worth naming
NEVER = 1.01  # a rank threshold no probability reaches
DEFAULT_RANK_THRESHOLDS = {"lit": 0.7, "catlip": 0.95}
DEFAULT_KEEP = 0.95
MIN_CALIBRATION = 8  # known photos the threshold is set on, at the least (the record says how many)
SHRINKAGE = 1e-3  # added to the covariance's eigenvalues (relative to their mean): a stable inverse
CLASS_CHUNK = 2048  # class means compared per pass: bounded memory at 10,000 classes
SCORE_CHUNK = 4096  # photos scored per pass: their logits over 10,000 classes stay ~160 MB
STATISTICS_CHUNK = 16384  # training rows per pass of the statistics: 170 MB as float64 at 1,280-d
RECORD, WEIGHTS = "novelty.json", "novelty.safetensors"
KNOWN_LOGITS = "trained species"  # the record's "logits": the scores read only the trained species'


def trained_only(probabilities: torch.Tensor, known_classes: Sequence[int] | None) -> torch.Tensor:
    """Probabilities renormalised over the trained species (the others set to 0): what a model
    whose class table held only those would say. Unchanged when ``known_classes`` is None."""
    if known_classes is None:
        return probabilities
    index = torch.as_tensor(known_classes, dtype=torch.long)
    out = torch.zeros_like(probabilities)
    kept = probabilities.index_select(-1, index)
    out.index_copy_(-1, index, kept / kept.sum(-1, keepdim=True).clamp(min=1e-12))
    return out


def calibration_half(keys, seed: int = 0) -> np.ndarray:
    """True for the photos (by key) that calibrate the threshold; the others are left for `eval`.
    A hash of the key, so every command draws the same half."""
    return np.array([hashlib.sha256(f"{seed}:{k}".encode()).digest()[0] % 2 == 0 for k in keys], dtype=bool)


def calibration_classes(held_out: list[int], seed: int = 0) -> list[int]:
    """The half of the held-out classes that choose the score (the rest are the evaluation's)."""
    chosen = sorted(held_out, key=lambda c: hashlib.sha256(f"{seed}:class:{c}".encode()).hexdigest())
    return sorted(chosen[: len(chosen) // 2])


def auroc(known: np.ndarray, unknown: np.ndarray) -> float:
    """The chance an unknown photo scores higher than a known one (ties count half): the
    Mann-Whitney statistic from average ranks."""
    if not len(known) or not len(unknown):
        return float("nan")
    scores = np.concatenate([np.asarray(known, np.float64), np.asarray(unknown, np.float64)])
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2)[inverse]
    n_known, n_unknown = len(known), len(unknown)
    return float((ranks[n_known:].sum() - n_unknown * (n_unknown + 1) / 2) / (n_known * n_unknown))


@dataclass
class NoveltyDetector:
    """Scores a batch of (features, logits); ``unknown`` is the chosen score above the threshold."""

    score: str
    threshold: float
    centre: torch.Tensor  # (d,)
    whitening: torch.Tensor  # (d, d): |W (x - m)|^2 is the Mahalanobis distance
    means: torch.Tensor  # (C, d): the class means, centred and whitened
    known_classes: torch.Tensor  # (C,) class indices the means belong to
    background: torch.Tensor  # (d, d): whitening by all training photos' covariance
    background_centre: torch.Tensor  # (d,): the mean of all training photos
    record: dict = field(default_factory=dict)

    def scores(self, features: torch.Tensor, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        features, logits = torch.as_tensor(features).float(), torch.as_tensor(logits).float()
        logits = self.known_logits(logits)
        temperature = self.record.get("softmax_temperature", 1.0)
        scores = {
            "max-softmax": max_softmax(logits, temperature),
            "energy": -torch.logsumexp(logits, -1),
            "mahalanobis": self.mahalanobis(features),
        }
        scores["relative-mahalanobis"] = scores["mahalanobis"] - self.background_distance(features)
        spread = self.record.get("standardise", {})  # set once the known calibration photos are scored
        if spread:
            scores["combined"] = sum((scores[n] - spread[n][0]) / spread[n][1] for n in COMBINED)
        return scores

    def known_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits of the species the model trained on (all of them for a model fitted before
        that rule, or one without held-out species)."""
        if self.record.get("logits") != KNOWN_LOGITS or len(self.known_classes) == logits.shape[-1]:
            return logits
        return logits.index_select(-1, self.known_classes)

    def trained_subset(self, n_classes: int) -> list[int] | None:
        """The trained species' class indices when the scores leave others of the ``n_classes``
        out (a model with held-out species), else None."""
        if self.record.get("logits") != KNOWN_LOGITS or len(self.known_classes) == n_classes:
            return None
        return self.known_classes.tolist()

    def mahalanobis(self, features: torch.Tensor) -> torch.Tensor:
        """The squared distance to the nearest class mean, class chunk by class chunk."""
        x = (features.float() - self.centre) @ self.whitening.T
        norms = (x * x).sum(-1)
        nearest = None  # no batch-sized constant: the ONNX export keeps its batch size free
        for start in range(0, len(self.means), CLASS_CHUNK):
            means = self.means[start : start + CLASS_CHUNK]
            distances = norms[:, None] - 2 * x @ means.T + (means * means).sum(-1)[None]
            closest = distances.min(-1).values
            nearest = closest if nearest is None else torch.minimum(nearest, closest)
        return nearest.clamp(min=0)

    def background_distance(self, features: torch.Tensor) -> torch.Tensor:
        """The squared distance to all training photos, under their overall covariance."""
        z = (features.float() - self.background_centre) @ self.background.T
        return (z * z).sum(-1)

    def novelty(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return self.scores(features, logits)[self.score]

    def save(self, folder: Path) -> None:
        """Into the model directory, each file written whole then renamed (a reader never sees
        half of one; the record last, so it names weights that are there)."""
        import os

        from safetensors.torch import save_file

        tensors = {
            "centre": self.centre,
            "whitening": self.whitening,
            "means": self.means,
            "background": self.background,
            "background_centre": self.background_centre,
        }
        tensors = {k: v.contiguous() for k, v in tensors.items()} | {"known_classes": self.known_classes}
        save_file(tensors, str(folder / (WEIGHTS + ".tmp")))
        os.replace(folder / (WEIGHTS + ".tmp"), folder / WEIGHTS)
        record = self.record | {"score": self.score, "threshold": self.threshold}
        (folder / (RECORD + ".tmp")).write_text(json.dumps(record, indent=1))
        os.replace(folder / (RECORD + ".tmp"), folder / RECORD)
        if (folder / "config.json").exists():  # its card names the open-set rule now
            from taxoclip.models.model_card import write_model_card

            write_model_card(folder)

    @classmethod
    def load(cls, folder: Path, score: str | None = None) -> NoveltyDetector:
        """The detector kept in ``folder``; ``score`` uses another score at its own threshold."""
        from taxoclip.tensor_files import load_tensors

        record = json.loads((folder / RECORD).read_text())
        tensors = load_tensors(folder / WEIGHTS, f"delete {folder / RECORD} to compute the open-set score again")
        score = score or record["score"]
        if score not in record.get("thresholds", {}):
            raise TaxoclipError(f"--open-set {score}: {folder / RECORD} has no threshold for it ({', '.join(SCORES)})")
        return cls(
            score,
            float(record["thresholds"][score]),
            tensors["centre"],
            tensors["whitening"],
            tensors["means"],
            tensors["known_classes"],
            tensors["background"],
            tensors["background_centre"],
            record,
        )


def class_statistics(cache, rows: np.ndarray, classes: np.ndarray) -> tuple[torch.Tensor, ...]:
    """(centre, whitening, whitened class means, background whitening, background centre) from the
    training ``rows`` of ``classes``, read in chunks: per-class sums and one (d, d) scatter, in
    float64."""
    width = cache.features.shape[1]
    position = {int(c): i for i, c in enumerate(classes)}
    sums = np.zeros((len(classes), width))
    counts = np.zeros(len(classes))
    scatter = np.zeros((width, width))
    for part, x in cache.chunks(rows, STATISTICS_CHUNK):
        x = x.astype(np.float64)
        index = np.array([position[int(c)] for c in cache.labels[part]])
        np.add.at(sums, index, x)
        counts += np.bincount(index, minlength=len(classes))
        scatter += x.T @ x
    means = sums / counts[:, None].clip(min=1)
    centre = means.mean(0)
    # within-class covariance: the scatter less each class's mean, pooled over every training photo
    within = (scatter - (means * counts[:, None]).T @ means) / max(1.0, counts.sum() - len(classes))
    whitening = whiten(within)
    photo_mean = sums.sum(0) / max(1.0, counts.sum())
    overall = scatter / max(1.0, counts.sum()) - np.outer(photo_mean, photo_mean)
    whitened = (means - centre) @ whitening.T
    as_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
    return (
        as_tensor(centre),
        as_tensor(whitening),
        as_tensor(whitened),
        as_tensor(whiten(overall)),
        as_tensor(photo_mean),
    )


def whiten(covariance: np.ndarray) -> np.ndarray:
    """W with W Sigma W^T = I, its eigenvalues shrunk towards their mean for a stable inverse."""
    values, vectors = np.linalg.eigh(covariance)
    values = values.clip(min=0) + SHRINKAGE * max(values.mean(), 1e-12)
    return (vectors / np.sqrt(values)).T


def scores_of(detector: NoveltyDetector, classifier, cache, rows: np.ndarray) -> dict[str, np.ndarray]:
    """Every score the detector gives for ``rows`` of the cache (in their order), chunk by chunk."""
    out: dict[str, list] = {}
    for _, x in cache.chunks(np.sort(rows), SCORE_CHUNK):
        features = torch.from_numpy(x)
        for name, value in detector.scores(features, classifier.logits_from_features(features)).items():
            out.setdefault(name, []).append(value.numpy())
    back = np.argsort(np.argsort(rows))  # row order back to ``rows``' own order
    return {name: np.concatenate(parts)[back] for name, parts in out.items()}


def max_softmax(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """1 - the top class probability of the softmax at ``temperature``."""
    return 1 - (logits / temperature).softmax(-1).max(-1).values


def choose_temperature(detector, classifier, cache, known_rows: np.ndarray, unknown_rows: np.ndarray) -> dict:
    """The max-softmax score's AUROC at each of TEMPERATURES, known against unknown calibration
    photos: one pass over their logits, a chunk at a time."""
    values: dict[str, dict[float, list]] = {"known": {}, "unknown": {}}
    for side, rows in (("known", known_rows), ("unknown", unknown_rows)):
        for _, x in cache.chunks(np.sort(rows), SCORE_CHUNK):
            logits = detector.known_logits(classifier.logits_from_features(torch.from_numpy(x)).float())
            for t in TEMPERATURES:
                values[side].setdefault(t, []).append(max_softmax(logits, t).numpy())
    return {t: auroc(np.concatenate(values["known"][t]), np.concatenate(values["unknown"][t])) for t in TEMPERATURES}


def taxon_masses(probabilities: torch.Tensor, classes, ranks=NAMED_RANKS) -> dict[str, tuple]:
    """Per rank with names in ``classes``: each photo's most probable taxon there, as (its summed
    probability, its name), from class ``probabilities`` summed up the tree."""
    masses = {}
    for rank in ranks:
        values, index = classes.values_at(rank)
        if not values:
            continue
        summed = torch.zeros(len(probabilities), len(values) + 1).index_add_(
            1, torch.from_numpy(index), probabilities.float()
        )[:, :-1]  # the last column: classes with no name at this rank
        best_mass, best = summed.max(-1)
        masses[rank] = (best_mass.numpy(), np.array(values, dtype=object)[best.numpy()])
    return masses


def named_answers(probabilities: torch.Tensor, classes, thresholds=RANK_THRESHOLDS) -> dict[float, tuple]:
    """For each threshold: (named, rank, taxon) per photo, where ``named`` says whether a genus,
    family or order reaches it (the deepest such ``rank`` and its ``taxon``), from class
    ``probabilities`` (trained species only) summed up ``classes``' tree."""
    masses = taxon_masses(probabilities, classes)
    out = {}
    for t in thresholds:
        named = np.zeros(len(probabilities), dtype=bool)
        rank = np.full(len(probabilities), "", dtype=object)
        taxon = np.full(len(probabilities), "", dtype=object)
        for r, (mass, value) in masses.items():  # deepest first: a photo keeps its first named rank
            new = ~named & (mass >= t)
            rank[new], taxon[new], named = r, value[new], named | new
        out[t] = (named, rank, taxon)
    return out


def choose_rank_threshold(detector, classifier, cache, flagged_rows: np.ndarray) -> tuple[float, dict]:
    """The lowest of RANK_THRESHOLDS whose named answers for the flagged calibration-species photos
    were right at least RANK_PRECISION of the time (NEVER when none), and each one's record."""
    counts = {t: [0, 0] for t in RANK_THRESHOLDS}
    for part, x in cache.chunks(np.sort(flagged_rows), SCORE_CHUNK):
        logits = classifier.logits_from_features(torch.from_numpy(x)).float()
        probabilities = trained_only(logits.softmax(-1), detector.trained_subset(logits.shape[-1]))
        truth = [classifier.classes.rows[int(c)] for c in cache.labels[part]]
        for t, (named, rank, taxon) in named_answers(probabilities, classifier.classes).items():
            counts[t][0] += int(named.sum())
            counts[t][1] += sum(truth[i].get(rank[i], "") == taxon[i] for i in np.flatnonzero(named))
    record = {str(t): {"named": n, "right": r / n if n else None} for t, (n, r) in counts.items()}
    return lowest_precise_threshold(counts), record


def lowest_precise_threshold(counts: dict[float, list[int] | tuple[int, int]]) -> float:
    """The lowest threshold whose (named, right) answers number at least MIN_NAMED and are right at
    least RANK_PRECISION of the time; NEVER when none is."""
    good = [t for t, (n, r) in counts.items() if n >= MIN_NAMED and r / n >= RANK_PRECISION]
    return min(good) if good else NEVER


def fit_novelty(classifier, cache, *, keep: float = DEFAULT_KEEP, seed: int = 0) -> NoveltyDetector:
    """The detector for ``classifier`` from its training cache (see the module docstring)."""
    if not 0 < keep < 1:
        raise TaxoclipError(f"--keep {keep}: the share of known photos kept, between 0 and 1")
    held_out = [int(c) for c in classifier.held_out]
    n_classes = len(classifier.classes)
    known = np.setdiff1d(np.arange(n_classes), held_out)
    labels = cache.labels
    train = np.flatnonzero(cache.split_mask("train") & np.isin(labels, known))
    if not len(train):
        raise TaxoclipError(f"{cache.path}: no training photo of the model's classes to measure novelty against")
    centre, whitening, means, background, background_centre = class_statistics(cache, train, known)
    detector = NoveltyDetector(
        DEFAULT_SCORE,
        float("inf"),
        centre,
        whitening,
        means,
        torch.from_numpy(known),
        background,
        background_centre,
        {"logits": KNOWN_LOGITS},
    )
    valid = np.flatnonzero(cache.split_mask("valid") & np.isin(labels, known)) if "valid" in cache.split_names else []
    valid = np.asarray(valid, dtype=np.int64)
    calibrating = valid[calibration_half([cache.keys[int(r)] for r in valid], seed)] if len(valid) else valid
    if len(calibrating) < MIN_CALIBRATION:
        raise TaxoclipError(
            f"{cache.path}: {len(calibrating)} known valid photos to set the open-set threshold on; "
            f"it needs at least {MIN_CALIBRATION}"
        )
    chosen_classes = calibration_classes(held_out, seed)
    unknown_rows = np.flatnonzero(np.isin(labels, chosen_classes))
    kind = getattr(classifier, "kind", "")
    if len(unknown_rows):
        by_temperature = choose_temperature(detector, classifier, cache, calibrating, unknown_rows)
        best_auroc = max(by_temperature.values())
        temperature = 1.0 if by_temperature[1.0] == best_auroc else max(by_temperature, key=by_temperature.get)
        detector.record["temperature_auroc"] = {str(t): a for t, a in by_temperature.items()}
    else:
        temperature = DEFAULT_TEMPERATURES.get(kind, 1.0)
    detector.record["softmax_temperature"] = temperature
    known_scores = scores_of(detector, classifier, cache, calibrating)
    detector.record |= {
        "standardise": {n: [float(known_scores[n].mean()), float(known_scores[n].std()) or 1.0] for n in COMBINED}
    }
    known_scores = scores_of(detector, classifier, cache, calibrating)  # now with the combined score
    thresholds = {name: float(np.quantile(values, keep)) for name, values in known_scores.items()}
    record = detector.record | {
        "keep": keep,
        "seed": seed,
        "thresholds": thresholds,
        "cache": str(cache.path),
        "cache_key": cache.meta.get("cache_key"),
        "known_classes": len(known),
        "calibration_photos": len(calibrating),
        "calibration_classes": chosen_classes,
        "evaluation_classes": sorted(set(held_out) - set(chosen_classes)),
    }
    if len(unknown_rows):
        unknown_scores = scores_of(detector, classifier, cache, unknown_rows)
        areas = {name: auroc(known_scores[name], unknown_scores[name]) for name in SCORES}
        best = max(SCORES, key=lambda name: areas[name])
        flagged = unknown_rows[unknown_scores[best] > thresholds[best]]
        rank_threshold, by_threshold = choose_rank_threshold(detector, classifier, cache, flagged)
        record |= {
            "calibration_auroc": areas,
            "chosen_by": "AUROC on the calibration classes",
            "rank_threshold": rank_threshold,
            "rank_answers_by_threshold": by_threshold,
        }
    else:
        best = DEFAULT_SCORES.get(kind, DEFAULT_SCORE)
        record["rank_threshold"] = DEFAULT_RANK_THRESHOLDS.get(kind, HONEST_THRESHOLD)
        record |= {
            "chosen_by": f"the default for {kind or 'this'} models (it has no held-out classes to choose on; "
            "see the open-set study)"
        }
    detector.score, detector.threshold, detector.record = best, thresholds[best], record
    return detector


def open_set_for(classifier, mode: str = "auto", *, keep: float = DEFAULT_KEEP) -> NoveltyDetector | None:
    """The detector a command uses: ``off`` none; ``auto`` the kept one, else fitted from the
    training cache and kept (none, with a note, when there is no cache); a score name that score."""
    if mode == "off":
        return None
    if mode not in ("auto", *SCORES):
        raise TaxoclipError(f"--open-set {mode}: use off, auto or one of {', '.join(SCORES)}")
    path = getattr(classifier, "path", None)  # a model directory (an open_clip model has none)
    folder = Path(path) if path and (Path(path) / "config.json").exists() else None
    if folder is not None and (folder / RECORD).exists():
        return NoveltyDetector.load(folder, None if mode == "auto" else mode)
    features = (getattr(classifier, "training", {}) or {}).get("features")
    if folder is None or not features or not (Path(features) / "meta.json").exists():
        if mode == "auto":
            return None
        where = f"its training cache {features} is gone" if features else "it records no training cache"
        raise TaxoclipError(
            f"--open-set {mode}: {classifier.name} has no open-set score yet and {where}; "
            "run 'taxoclip openset --model DIR --features CACHE' with the cache it trained on, or --open-set off"
        )
    import sys

    from taxoclip.data.features import load_features

    print(
        f"computing {folder.name}'s open-set score from {features} (once; kept in {folder / RECORD})", file=sys.stderr
    )
    detector = fit_novelty(classifier, load_features(features), keep=keep)
    detector.save(folder)
    return NoveltyDetector.load(folder, None if mode == "auto" else mode)
