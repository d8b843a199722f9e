"""Predictions for photos: the top species with probabilities and lineage, the answer at any rank
(probabilities summed up the tree), answers restricted to a list of taxa, and an honest answer:
the deepest rank whose probability passes a threshold ("Dahlia, genus; species uncertain").

A `Predictor` needs the class table and a function from uint8 pixels (N, 3, H, W) to class
probabilities, so the same code serves a PyTorch model and an ONNX file.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from taxoclip.data.images import BadImage, check_image, decode_image, read_photo
from taxoclip.data.preprocess import Preprocess
from taxoclip.errors import TaxoclipError
from taxoclip.eval.metrics import ROLLUP_RANKS, RankCodes, rollup
from taxoclip.models.novelty import trained_only
from taxoclip.taxonomy import HONEST_THRESHOLD, ClassTable, Rank

# Measured on flowers valid (LiT with the defaults: efficientnet-lite0 + minilm-l6, image projection,
# 10 epochs, top-1 96.6%; `honest_answer_table`): the reported answer is right for
#   threshold 0.3: 97.3% of photos (at species for 98.3%)   0.4: 97.8% (95.7%)
#   threshold 0.5: 98.0% (92.8%)                              0.6: 98.9% (89.5%)   0.8: 99.4% (78.5%)
# 0.5 keeps the answer right 98% of the time while still naming the species for 93% of photos.
DEFAULT_THRESHOLD = HONEST_THRESHOLD
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


@dataclass
class Prediction:
    source: str
    top: list[dict] = field(default_factory=list)
    at_rank: dict | None = None
    confident: dict | None = None
    known: bool | None = None  # with an open-set score: False for a photo of no species the model knows
    novelty: dict | None = None  # the score, its value and the threshold the answer rests on
    error: str | None = None

    def to_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def class_name(row: dict[str, str]) -> str:
    return row.get("scientific_name") or row.get("common_name") or row["id"]


class Predictor:
    def __init__(
        self,
        classes: ClassTable,
        preprocess: Preprocess,
        pixels_to_probabilities: Callable[[torch.Tensor], torch.Tensor],
        *,
        subset: Sequence[str] | None = None,
        threshold: float = DEFAULT_THRESHOLD,
        open_set: OpenSetRule | None = None,
    ):
        """``pixels_to_probabilities`` returns the class probabilities, or (probabilities, novelty
        scores) when ``open_set`` says which score and threshold make a photo unknown."""
        self.classes, self.preprocess, self.run = classes, preprocess, pixels_to_probabilities
        self.threshold, self.open_set = threshold, open_set
        self.lineage = {rank.column: RankCodes.of(classes, rank.column) for rank in ROLLUP_RANKS}
        self.allowed = self.subset_mask(subset) if subset else None

    def subset_mask(self, taxa: Sequence[str]) -> torch.Tensor:
        """Classes whose name at any rank (or id, common or scientific name) is one of ``taxa``."""
        given = {t.strip().lower(): t.strip() for t in taxa if t.strip()}
        wanted = set(given)
        columns = ["id", "common_name", "scientific_name", *(r.column for r in Rank)]
        mask = [any(row.get(c, "").lower() in wanted for c in columns) for row in self.classes]
        found = {row.get(c, "").lower() for row, keep in zip(self.classes, mask, strict=True) if keep for c in columns}
        missing = sorted(given[m] for m in wanted - found)
        if missing:
            raise TaxoclipError(
                f"--subset: no class has the taxon {', '.join(repr(m) for m in missing)} at any rank; "
                "check the spelling against the class table"
            )
        return torch.tensor(mask)

    def probabilities(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(class probabilities, novelty scores or None) for a batch of pixels."""
        out = self.run(pixels)
        probabilities, novelty = out if isinstance(out, tuple) else (out, None)
        probabilities = probabilities.float()
        if self.allowed is not None:
            probabilities = probabilities * self.allowed
            probabilities = probabilities / probabilities.sum(-1, keepdim=True).clamp(min=1e-12)
        return probabilities, novelty

    def describe(
        self,
        probabilities: torch.Tensor,
        source: str,
        *,
        top_k: int = 5,
        rank: str | None = None,
        novelty: float | None = None,
    ) -> Prediction:
        """Turn one row of class probabilities into a Prediction."""
        k = min(top_k, len(self.classes))
        values, indices = probabilities.topk(k)
        top = []
        for p, i in zip(values.tolist(), indices.tolist(), strict=True):
            row = self.classes.rows[i]
            top.append(
                {
                    "id": row["id"],
                    "name": row.get("common_name", ""),
                    "scientific_name": class_name(row),
                    "probability": round(p, 6),
                    "lineage": {r.column: row.get(r.column, "") for r in Rank},
                }
            )
        prediction = Prediction(source, top=top, confident=self.deepest_confident(probabilities))
        if rank:
            prediction.at_rank = self.answer_at(probabilities, rank)
        if self.open_set is not None and novelty is not None:
            self.judge_novelty(prediction, probabilities, float(novelty))
        return prediction

    def judge_novelty(self, prediction: Prediction, probabilities: torch.Tensor, novelty: float) -> None:
        """Above the threshold the photo is of no species the model knows: the answer is then the
        deepest rank above species whose known members' probability clears the honest threshold
        ("an unknown member of Asteraceae"), else "unknown"."""
        rule = self.open_set
        prediction.known = novelty <= rule.threshold
        prediction.novelty = {"score": rule.score, "value": round(novelty, 6), "threshold": round(rule.threshold, 6)}
        if prediction.known:
            return
        above = self.deepest_confident(
            trained_only(probabilities, rule.known_classes), above_species=True, threshold=rule.rank_threshold
        )
        trained = rule.trained_species or len(self.classes)
        unknown = f"not one of the {trained} species this model was trained on"
        if above["rank"] == "none":
            prediction.confident = above | {"rank": "none", "text": f"unknown ({unknown})"}
        else:
            prediction.confident = above | {
                "text": f"an unknown member of {above['name']} ({above['rank']}; {unknown})"
            }

    def answer_at(self, probabilities: torch.Tensor, rank: str) -> dict:
        if rank == "species":
            index = int(probabilities.argmax())
            return {
                "rank": "species",
                "name": class_name(self.classes.rows[index]),
                "probability": round(float(probabilities[index]), 6),
            }
        codes = self.lineage.get(rank)
        if codes is None or not codes.known:
            raise TaxoclipError(f"--rank {rank}: the class table has no {rank} names")
        grouped = rollup(probabilities[None], codes)[0]
        best = int(grouped.argmax())
        return {"rank": rank, "name": codes.groups[best], "probability": round(float(grouped[best]), 6)}

    def deepest_confident(
        self, probabilities: torch.Tensor, above_species: bool = False, threshold: float | None = None
    ) -> dict:
        """The narrowest answer whose probability (summed up the tree) reaches the threshold
        (``above_species``: a genus or wider, for a photo of a species the model does not know, at
        the open-set rule's own ``threshold``)."""
        threshold = self.threshold if threshold is None else threshold
        best = int(probabilities.argmax())
        if not above_species and float(probabilities[best]) >= threshold:
            row = self.classes.rows[best]
            level = (
                "species"
                if row.get("species")
                else next((r.column for r in reversed(ROLLUP_RANKS) if row.get(r.column)), "species")
            )
            return {
                "rank": level,
                "name": class_name(row),
                "probability": round(float(probabilities[best]), 6),
                "text": f"{class_name(row)} ({level})",
                "class_index": best,
            }
        for rank in reversed(ROLLUP_RANKS):
            codes = self.lineage[rank.column]
            if not codes.known:
                continue
            grouped = rollup(probabilities[None], codes)[0]
            group = int(grouped.argmax())
            if float(grouped[group]) >= threshold:
                name = codes.groups[group]
                return {
                    "rank": rank.column,
                    "name": name,
                    "probability": round(float(grouped[group]), 6),
                    "text": f"{name} ({rank.column}); species uncertain",
                }
        return {"rank": "none", "name": "", "probability": 0.0, "text": "uncertain at every rank"}

    # --- photos -----------------------------------------------------------------------------------

    def predict_images(
        self, images: Iterable[Image.Image], sources: Sequence[str] | None = None, **options
    ) -> list[Prediction]:
        images = list(images)
        sources = sources or [f"image {i}" for i in range(len(images))]
        if not images:
            return []
        pixels = torch.stack([self.preprocess.to_uint8(image) for image in images])
        probabilities, novelty = self.probabilities(pixels)
        scores = novelty.tolist() if novelty is not None else [None] * len(images)
        return [
            self.describe(p, s, novelty=n, **options) for p, s, n in zip(probabilities, sources, scores, strict=True)
        ]

    def predict_paths(
        self, paths: Sequence[str | Path], *, batch_size: int = 32, progress: bool = False, **options
    ) -> list[Prediction]:
        """Predictions for photo files in order; an unreadable file gets an ``error``, not an exception."""
        from tqdm import tqdm

        results: list[Prediction] = []
        bar = tqdm(total=len(paths), unit="photo", desc="predict", disable=not progress)
        for start in range(0, len(paths), batch_size):
            batch = [str(p) for p in paths[start : start + batch_size]]
            good, sources, slots = [], [], []
            chunk: list[Prediction | None] = []
            for path in batch:
                try:
                    data = read_photo(path)
                    check_image(data)
                    good.append(decode_image(data))
                    sources.append(path)
                    slots.append(len(chunk))
                    chunk.append(None)
                except (OSError, BadImage) as error:
                    chunk.append(
                        Prediction(
                            path, error=str(error) if isinstance(error, BadImage) else f"cannot read: {error.strerror}"
                        )
                    )
            for slot, prediction in zip(slots, self.predict_images(good, sources, **options), strict=True):
                chunk[slot] = prediction
            results.extend(p for p in chunk if p is not None)
            bar.update(len(batch))
        bar.close()
        return results


@dataclass(frozen=True)
class OpenSetRule:
    """Which novelty score makes a photo unknown, above which value."""

    score: str
    threshold: float
    trained_species: int | None = None  # how many species its training photos showed
    # the class indices of those species when the class table has others (held out at training):
    # an unknown photo's rank answer then sums only the trained species' probabilities
    known_classes: tuple[int, ...] | None = None
    # the summed probability at which an unknown photo's genus, family or order is named (chosen
    # on the calibration species, `taxoclip.models.novelty`); None: the predictor's own threshold
    rank_threshold: float | None = None

    @classmethod
    def of(cls, novelty, n_classes: int) -> OpenSetRule:
        """The rule a fitted `NoveltyDetector` gives a model of ``n_classes`` classes."""
        subset = novelty.trained_subset(n_classes)
        return cls(
            novelty.score,
            novelty.threshold,
            len(novelty.known_classes),
            tuple(subset) if subset else None,
            novelty.record.get("rank_threshold"),
        )

    @classmethod
    def from_json(cls, rule: dict) -> OpenSetRule:
        """Back from `dataclasses.asdict` in JSON (an ONNX sidecar; older ones lack the later fields)."""
        known = rule.get("known_classes")
        return cls(
            rule["score"],
            float(rule["threshold"]),
            rule.get("trained_species"),
            tuple(known) if known else None,
            rule.get("rank_threshold"),
        )


def torch_predictor(model, *, novelty=None, **options) -> Predictor:
    """A Predictor over a loaded model (`taxoclip.load`); with ``novelty`` (a
    `taxoclip.models.novelty.NoveltyDetector`) each photo is also judged known or not."""
    tower = model.image_tower

    @torch.no_grad()
    def run(pixels: torch.Tensor):
        features = tower.embed(pixels)
        logits = model.logits_from_features(features)
        probabilities = logits.softmax(-1)
        return (probabilities, novelty.novelty(features, logits)) if novelty is not None else probabilities

    rule = OpenSetRule.of(novelty, len(model.classes)) if novelty is not None else None
    return Predictor(model.classes, tower.preprocess, run, open_set=rule, **options)


def collect_photos(inputs: Sequence[str]) -> list[Path]:
    """Files given directly, and every image file below the folders given (sorted)."""
    photos: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(
                Path(d) / f
                for d, _, files in os.walk(path)
                for f in files
                if Path(f).suffix.lower() in IMAGE_SUFFIXES and not f.startswith(".")
            )
            photos.extend(found)
        elif path.exists():
            photos.append(path)
        elif path.is_symlink():
            raise TaxoclipError(f"{path}: a symbolic link that leads nowhere (broken, or a loop); fix or remove it")
        else:
            raise TaxoclipError(f"{path}: no such photo or folder")
    if not photos:
        raise TaxoclipError(f"no photos found in {', '.join(inputs)} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    return photos


def honest_answer_table(
    probabilities: torch.Tensor, labels: np.ndarray, classes: ClassTable, thresholds: Sequence[float]
) -> list[dict]:
    """For each threshold: how often the deepest confident answer is right, and how often it names
    the class itself. The measurement behind DEFAULT_THRESHOLD (`taxoclip predict --calibrate`)."""
    rows = []
    for threshold in thresholds:
        predictor = Predictor(classes, Preprocess(), lambda x: x, threshold=threshold)
        right = at_class = answered = 0
        for p, label in zip(probabilities, labels, strict=True):
            answer = predictor.deepest_confident(p)
            if answer["rank"] == "none":
                continue
            answered += 1
            truth = classes.rows[int(label)]
            if answer.get("class_index") is not None:
                at_class += 1
                right += answer["class_index"] == int(label)
            else:
                right += truth.get(answer["rank"], "") == answer["name"]
        n = max(len(labels), 1)
        rows.append(
            {
                "threshold": threshold,
                "answered": answered / n,
                "right_when_answered": right / max(answered, 1),
                "answered_at_class": at_class / n,
            }
        )
    return rows


def predict(
    classifier, images, *, top_k: int = 5, rank: str | None = None, subset=None, threshold: float | None = None
):
    """Predictions for PIL images or photo paths with any `Classifier`: top-k species with
    lineage, the answer at ``rank``, restricted to ``subset`` taxa, and the deepest confident rank."""
    threshold = DEFAULT_THRESHOLD if threshold is None else threshold
    predictor = torch_predictor(classifier, subset=subset, threshold=threshold)
    images = list(images)
    if images and isinstance(images[0], str | Path):
        return predictor.predict_paths(images, top_k=top_k, rank=rank)
    return predictor.predict_images(images, top_k=top_k, rank=rank)
