"""CatLIP: image-tower features -> one linear layer over a label vocabulary, trained as multi-label
classification with binary cross-entropy (no text tower in the step), and Transfer Init: a
classifier for any class table whose row for a class is the weighted mean of its labels' rows.

Model directory (kind ``catlip``):
  config.json        image tower, feature width, vocabulary summary, training record
  head.safetensors   the label layer (weight, bias) and the feature standardisation (mean, std)
  image_tower.safetensors  only when the tower's upper stages trained too (--depth upper)
  vocabulary.json    labels, counts, each class's labels
  classes.csv        the class table
  reference.safetensors  the mean and covariance of the (standardised) training embeddings, from
                     which ``standardised`` scoring puts every class's score on one scale
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from taxoclip.data.labels import SCORINGS, Vocabulary, label_rank, label_weight
from taxoclip.errors import TaxoclipError
from taxoclip.models.classifier import DirectoryClassifier
from taxoclip.taxonomy import ClassTable


class LabelHead(nn.Module):
    """Standardised features -> label logits. The bias starts at the labels' log prior odds, so
    training starts from "every label is as rare as it is" rather than from p = 0.5 everywhere."""

    def __init__(self, width: int, n_labels: int, mean: torch.Tensor | None = None, std: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("mean", torch.zeros(width) if mean is None else mean.float())
        self.register_buffer("std", torch.ones(width) if std is None else std.float().clamp(min=1e-6))
        self.linear = nn.Linear(width, n_labels)

    def prepare(self, features: torch.Tensor) -> torch.Tensor:
        return (features.float() - self.mean) / self.std

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(self.prepare(features))

    @torch.no_grad()
    def start_from_prior(self, frequency: torch.Tensor) -> None:
        p = frequency.clamp(1e-4, 1 - 1e-4)
        self.linear.bias.copy_(torch.log(p / (1 - p)))
        nn.init.normal_(self.linear.weight, std=0.01)


def catlip_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy summed over the labels and averaged over the samples (CatLIP's
    reduction: a sample with many labels weighs more than one with few)."""
    return F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="sum") / len(logits)


def transfer_init(
    weight: torch.Tensor,
    bias: torch.Tensor,
    labels: list[str],
    class_labels: list[list[int]],
    class_ids: list[str],
    scoring: str = "transfer",
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Each class's classifier row (and bias) from its labels' rows. Returns (rows, biases,
    coverage: how many classes are covered down to which rank).

    ``transfer``: CatLIP's Transfer Init, the mean of the rows weighted by `label_weight` (deeper
    ranks weigh more), a starting point for a classifier trained further.
    ``likelihood``: the sum of the rows: a class's logit is then the log-likelihood of its label
    set under the independent-label model the BCE loss fits, up to a term shared by all classes.
    Seen and unseen classes are compared fairly: a seen species' label firing counts against the
    unseen classes that lack it, while a mean would favour classes with only broad labels.
    ``standardised`` starts from ``likelihood``; `standardise_rows` then rescales each class's row
    by its score's spread over the training photos (it needs their moments)."""
    empty = [class_ids[c] for c, indices in enumerate(class_labels) if not indices]
    if empty:
        shown = ", ".join(empty[:10]) + (f" and {len(empty) - 10} more" if len(empty) > 10 else "")
        raise TaxoclipError(
            f"{len(empty)} of {len(class_ids)} classes share no label with the model's vocabulary ({shown}); "
            "they cannot be scored. Check the class table's taxonomy columns, or train with these classes"
        )
    if scoring not in SCORINGS:
        raise TaxoclipError(f"unknown scoring {scoring!r}; use one of {', '.join(SCORINGS)}")
    # A sparse (classes x labels) mix: dense, 10,000 classes x 21,883 labels would be 875 MB.
    rows, columns, values = [], [], []
    covered: dict[str, int] = {}
    for c, indices in enumerate(class_labels):
        weights = torch.tensor([label_weight(labels[i]) for i in indices])
        weights = weights / weights.sum() if scoring == "transfer" else torch.ones_like(weights)
        rows += [c] * len(indices)
        columns += list(indices)
        values.append(weights)
        ranks = [r for r in (label_rank(labels[i]) for i in indices) if r is not None]
        depth = max(ranks).column if ranks else "other"
        covered[depth] = covered.get(depth, 0) + 1
    size = (len(class_labels), len(labels))
    mix = torch.sparse_coo_tensor(torch.tensor([rows, columns]), torch.cat(values), size, check_invariants=True)
    summary = {"classes": len(class_ids), "deepest_rank": covered}
    return torch.sparse.mm(mix, weight.float()), torch.sparse.mm(mix, bias.float()[:, None])[:, 0], summary


class ClassHead(nn.Module):
    """Standardised features -> one logit per class (rows from the label layer), divided by a
    temperature: summed label logits are far apart, and a softmax over them would claim
    certainty it does not have (the temperature changes no ranking)."""

    def __init__(self, label_head: LabelHead, rows: torch.Tensor, biases: torch.Tensor, temperature: float = 1.0):
        super().__init__()
        self.temperature = float(temperature)
        self.register_buffer("mean", label_head.mean.detach().cpu().clone())
        self.register_buffer("std", label_head.std.detach().cpu().clone())
        self.register_buffer("rows", rows.detach().clone())
        self.register_buffer("biases", biases.detach().clone())

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return (((features.float() - self.mean) / self.std) @ self.rows.T + self.biases) / self.temperature


CALIBRATION_ROWS = 10_000  # held-out photos a temperature is fitted on: one number needs no more


@torch.no_grad()
def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature that minimises the negative log-likelihood of ``labels`` (a grid over
    0.01 .. 100, log-spaced): temperature scaling, fitted on held-out photos."""
    return fit_temperature_chunks([(logits, labels)])


@torch.no_grad()
def fit_temperature_chunks(chunks: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """`fit_temperature` over (logits, labels) chunks, summed chunk by chunk, so the photos'
    logits over every class are never held at once."""
    grid = torch.logspace(-2, 2, 81)
    losses = torch.zeros(len(grid), dtype=torch.float64)
    for logits, labels in chunks:
        for i, t in enumerate(grid):
            losses[i] += float(torch.nn.functional.cross_entropy(logits / t, labels, reduction="sum"))
    return float(grid[int(losses.argmin())])


@torch.no_grad()
def reference_moments(head: LabelHead, embeddings: torch.Tensor) -> dict[str, torch.Tensor]:
    """The mean and covariance of training embeddings as the label layer sees them (standardised):
    enough to know any class score's mean and spread over those photos, for any class table."""
    prepared = head.prepare(embeddings.to(head.mean.device)).double().cpu()
    mean = prepared.mean(0)
    centred = prepared - mean
    return {"mean": mean.float(), "covariance": (centred.T @ centred / max(1, len(prepared) - 1)).float()}


@torch.no_grad()
def standardise_rows(rows: torch.Tensor, reference: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows and biases whose class scores have mean 0 and spread 1 over the training photos.

    Summed label logits are on each class's own scale: a class with many or very selective labels
    swings far more than one with few broad ones, so a few unseen classes win almost every photo
    of the unseen (hubs). Dividing by the spread puts them on one scale; it is still one linear
    layer, so predict, eval, serve and ONNX export see no difference."""
    mean, covariance = reference["mean"].to(rows), reference["covariance"].to(rows)
    spread = ((rows @ covariance) * rows).sum(1).clamp(min=1e-12).sqrt()
    # (r.x + b - (r.m + b)) / spread: a class's bias, a constant, cancels with its mean
    return rows / spread[:, None], -(rows @ mean) / spread


def class_head(
    head: LabelHead,
    vocabulary: Vocabulary,
    class_labels: list[list[int]],
    class_ids: list[str],
    scoring: str = "likelihood",
    temperature: float = 1.0,
    reference: dict[str, torch.Tensor] | None = None,
):
    """The classifier over a class table from a label head: (ClassHead, coverage). ``standardised``
    scoring needs ``reference`` (`reference_moments` of training embeddings)."""
    weight, bias = head.linear.weight.detach().cpu(), head.linear.bias.detach().cpu()
    rows, biases, covered = transfer_init(weight, bias, vocabulary.labels, class_labels, class_ids, scoring)
    if scoring == "standardised":
        if reference is None:
            raise TaxoclipError(
                "standardised scoring needs the training embeddings' moments (reference.safetensors); "
                "this model has none: retrain it, or use --scoring likelihood"
            )
        rows, biases = standardise_rows(rows, reference)
    return ClassHead(head, rows, biases, temperature), covered


REFERENCE_FILE = "reference.safetensors"


def save_catlip(
    out: Path,
    head: LabelHead,
    vocabulary: Vocabulary,
    classes: ClassTable,
    tower: dict,
    training: dict,
    scoring: str = "likelihood",
    temperatures: dict[str, float] | None = None,
    image_tower=None,
    reference: dict[str, torch.Tensor] | None = None,
):
    """Write the model directory; ``temperatures`` per scoring (fitted on valid); ``image_tower``
    when the tower's own stages trained too; ``reference`` (`reference_moments`), so any scoring
    can be chosen later."""
    from safetensors.torch import save_file

    from taxoclip.models.bundle import save_weights, write_config

    temperatures = temperatures or {scoring: 1.0}
    out.mkdir(parents=True, exist_ok=True)
    save_weights(out / "head.safetensors", head)
    if reference is not None:
        save_file({k: v.contiguous() for k, v in reference.items()}, str(out / REFERENCE_FILE))
    if image_tower is not None:
        save_weights(out / "image_tower.safetensors", image_tower)
    vocabulary.save(out / "vocabulary.json")
    classes.to_csv(out / "classes.csv")
    fields = {
        "image_tower": tower,
        "width": int(head.linear.in_features),
        "vocabulary": {"labels": len(vocabulary), "extractor": vocabulary.extractor, "style": vocabulary.style},
        "scoring": scoring,
        "temperature": temperatures[scoring],
        "temperatures": temperatures,
        "training": training,
    }
    write_config(out, "catlip", fields)


class CatLIPClassifier(DirectoryClassifier):
    """A CatLIP model as a classifier over its class table: a class's score comes from its labels'
    rows (its species label when trained, else its genus, family ... labels)."""

    kind = "catlip"

    def __init__(self, path: Path, config: dict):
        super().__init__(path, config)
        self.vocabulary = Vocabulary.load(path / "vocabulary.json")
        weights = load_file(str(path / "head.safetensors"))
        self.label_head = LabelHead(config["width"], len(self.vocabulary))
        self.label_head.load_state_dict(weights)
        self.label_head.eval()
        self.scoring, self.temperature = config.get("scoring", "likelihood"), config.get("temperature", 1.0)
        reference = path / REFERENCE_FILE
        self.reference = load_file(str(reference)) if reference.exists() else None  # older models have none
        self.class_label_indices = self.vocabulary.class_labels
        self._head, self.coverage = self.class_head(self.class_label_indices, self.classes.ids)

    def class_head(self, class_labels: list[list[int]], class_ids: list[str]):
        return class_head(
            self.label_head,
            self.vocabulary,
            class_labels,
            class_ids,
            self.scoring,
            self.temperature,
            self.reference,
        )

    def use_scoring(self, scoring: str) -> None:
        """Score classes another way (`SCORINGS`) from the same label layer, with the temperature
        fitted for that scoring (models from before those were kept reuse the trained one, so
        their probabilities, not their rankings, may be less calibrated)."""
        self.scoring = scoring
        self.temperature = self.config.get("temperatures", {}).get(scoring, self.temperature)
        self._head, self.coverage = self.class_head(self.class_label_indices, self.classes.ids)

    def head(self) -> nn.Module:
        return self._head

    def for_classes(self, classes: ClassTable, captions_by_class: list[dict] | None = None) -> CatLIPClassifier:
        """The same model over another class table (e.g. species it never saw), by Transfer Init."""
        from taxoclip.data.labels import class_labels

        per_class = class_labels(classes, captions_by_class, self.vocabulary.extractor, self.vocabulary.style)
        indices = self.vocabulary.labels_of(classes, per_class)
        other = object.__new__(CatLIPClassifier)
        other.__dict__.update(self.__dict__)
        other.classes, other.class_label_indices = classes, indices
        other._head, other.coverage = self.class_head(indices, classes.ids)
        return other


def load_catlip(path: Path, config: dict) -> CatLIPClassifier:
    """The registry's entry for kind "catlip"."""
    return CatLIPClassifier(path, config)
