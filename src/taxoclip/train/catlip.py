"""CatLIP training on the shared loop: the label layer on the locked tower's cached embeddings.

Labels come from the vocabulary (`taxoclip labels`, or built here from the cache's training
classes). Each class's multi-hot target row is fixed, so a batch's targets are a row look-up.
Held-out classes (``--holdout``) contribute no image, so their species labels are not in the
vocabulary and they are scored, like any new class table, through the labels they share.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from taxoclip.data.labels import SCORINGS, Vocabulary, build_vocabulary, class_labels
from taxoclip.errors import TaxoclipError
from taxoclip.models.accuracy import SeenUnseenAccuracy
from taxoclip.models.catlip import (
    CALIBRATION_ROWS,
    LabelHead,
    catlip_loss,
    class_head,
    fit_temperature_chunks,
    reference_moments,
    save_catlip,
)
from taxoclip.runtime import Runtime
from taxoclip.train.catlip_config import CatLIPConfig
from taxoclip.train.depths import TowerSource, freeze_batch_norm_statistics
from taxoclip.train.loop import Batch, Trainer, run_training

__all__ = ["CatLIPConfig", "CatLIPTrainer", "train_catlip"]


class CatLIPStep(nn.Module):
    """The loss of one batch: label logits against the classes' multi-hot targets. With an
    ``upper`` part, the inputs are lower-stage activations (or photos) that it turns into embeddings."""

    def __init__(self, head: LabelHead, targets: torch.Tensor, upper: nn.Module | None = None):
        super().__init__()
        self.head, self.upper = head, upper
        self.register_buffer("targets", targets, persistent=False)  # (classes, labels), fixed

    def train(self, mode: bool = True) -> CatLIPStep:
        super().train(mode)
        freeze_batch_norm_statistics(self.upper)
        return self

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        embeddings = self.upper(features) if self.upper is not None else features
        return catlip_loss(self.head(embeddings), self.targets[labels])


class CatLIPTrainer(Trainer):
    """CatLIP on the shared loop at one of three depths (`TowerSource`): the label layer on cached
    embeddings (``head``), the tower's last stages too on cached activations (``upper``), or the
    whole tower on augmented photos (``full``)."""

    def __init__(self, config: CatLIPConfig, runtime: Runtime):
        self.config, self.runtime = config, runtime
        self.source = source = TowerSource(config, runtime)
        self.tower, self.upper, self.cache = source.tower, source.upper, source.cache
        self.classes, self.held_out = source.classes, source.held_out
        self.images_per_class = images = source.images_per_class
        self._reference: dict[str, torch.Tensor] | None = None
        self.vocabulary = self.load_vocabulary(source.captions)
        targets = torch.zeros(len(self.classes), len(self.vocabulary), dtype=torch.bool)  # a quarter of float's size
        for c, indices in enumerate(self.vocabulary.class_labels):
            targets[c, indices] = True
        sample = source.standardisation_sample()
        head = LabelHead(sample.shape[1], len(self.vocabulary), sample.mean(0), sample.std(0))
        frequency = (torch.from_numpy(images).float() @ targets.float()) / float(images.sum())
        head.start_from_prior(frequency)
        self.head = head.to(runtime.device)
        self.module = CatLIPStep(self.head, targets.to(runtime.device), self.upper)

    def load_vocabulary(self, captions: list[dict] | None) -> Vocabulary:
        """The given vocabulary (checked against the classes) or one built from the training
        photos, with each class's labels in it."""
        config, classes, images = self.config, self.classes, self.images_per_class
        made_for = None  # the classes a given vocabulary was made from, when they are not these
        if config.vocabulary:
            given = Vocabulary.load(config.vocabulary)
            if list(given.class_ids) != list(classes.ids):
                made_for = given.class_ids
            per_class = class_labels(classes, captions, given.extractor, given.style)
            given.class_ids, given.class_labels = classes.ids, given.labels_of(classes, per_class)
            vocabulary = given
        else:
            per_class = class_labels(classes, captions, config.extractor, config.style)
            vocabulary = build_vocabulary(
                classes,
                per_class,
                images.tolist(),
                extractor=config.extractor,
                style=config.style,
                min_count=config.min_count,
                max_size=config.max_size,
            )
        trained = [c for c in np.flatnonzero(images) if not vocabulary.class_labels[c]]
        if trained:
            ids = ", ".join(classes.ids[c] for c in trained[:10])
            raise TaxoclipError(
                f"{len(trained)} training classes carry no label of the vocabulary ({ids}): their photos would "
                "teach nothing. Lower --min-count, or use a vocabulary made from these classes"
            )
        self.check_distinguishable(vocabulary, made_for)
        return vocabulary

    def check_distinguishable(self, vocabulary: Vocabulary, made_for: list[str] | None) -> None:
        """Training classes whose label sets are identical cannot be told apart by a label model.
        With a vocabulary made from other classes that is a model at chance: refused, both named;
        with the cache's own vocabulary (--min-count cut the labels that differed), said."""
        classes, trained = self.classes, np.flatnonzero(self.images_per_class)
        groups: dict[tuple[int, ...], list[int]] = {}
        for c in trained:
            groups.setdefault(tuple(sorted(vocabulary.class_labels[c])), []).append(int(c))
        alike = [group for group in groups.values() if len(group) > 1]
        if not alike:
            return
        count = sum(len(group) for group in alike)
        largest = max(alike, key=len)
        example = ", ".join(classes.ids[c] for c in largest[:4]) + (" ..." if len(largest) > 4 else "")
        labels = ", ".join(vocabulary.labels[i] for i in vocabulary.class_labels[largest[0]]) or "none"
        detail = (
            f"{count} of {len(trained)} training classes share their whole label set with another (the largest "
            f"group, {len(largest)} classes: {example}, labels {labels}) and cannot be told apart"
        )
        if made_for is not None:
            shown = ", ".join(map(str, made_for[:4])) + (" ..." if len(made_for) > 4 else "")
            raise TaxoclipError(
                f"--vocabulary {self.config.vocabulary} was made from other classes ({len(made_for)}: {shown}) than "
                f"{self.config.features or self.config.shards} holds ({len(classes)}): {detail}. Make the vocabulary "
                "from these classes ('taxoclip labels' on the same data), or leave out --vocabulary"
            )
        self.runtime.print(f"note: {detail}; lower --min-count to keep the labels that tell them apart")

    def param_groups(self) -> list[dict]:
        config = self.config
        groups = [
            {"params": [self.head.linear.weight], "lr": config.lr, "weight_decay": config.weight_decay},
            {"params": [self.head.linear.bias], "lr": config.lr, "weight_decay": 0.0},
        ]
        if self.upper is not None:
            groups.append({"params": list(self.upper.parameters()), "lr": config.tower_lr, "weight_decay": 0.0})
        return groups

    def steps_per_epoch(self) -> int:
        steps = max(1, int(self.images_per_class.sum()) // self.config.batch_size)
        return min(steps, self.config.max_steps_per_epoch or steps)

    def batches(self, epoch: int) -> Iterator[Batch]:
        """This rank's share of each global batch: cached rows, or (``full``) augmented photos."""
        return self.source.batches(epoch)

    def classifier(self, scoring: str | None = None, reference: dict | None = None) -> torch.nn.Module:
        """The class head over the training classes, scored as configured (or as ``scoring``);
        ``reference``: the moments when already computed for the tower as it is."""
        scoring = scoring or self.config.scoring
        if scoring == "standardised" and reference is None:
            reference = self.reference()
        return class_head(
            self.head, self.vocabulary, self.vocabulary.class_labels, self.classes.ids, scoring, reference=reference
        )[0]

    def reference(self) -> dict[str, torch.Tensor]:
        """The training embeddings' moments (standardised scoring's scale) with the tower as it is
        now: kept for locked cached embeddings, computed again while a tower trains."""
        if self._reference is None or self.upper is not None:
            self._reference = reference_moments(self.head, self.source.standardisation_sample())
        return self._reference

    @torch.no_grad()
    def calibrate(self, reference: dict[str, torch.Tensor]) -> dict[str, float]:
        """Per scoring, the softmax temperature fitted on valid (the ranking, and so accuracy, is
        unchanged); 1 without valid photos. Each scoring has its own scale, so a model scored
        another way later (`use_scoring`) keeps calibrated probabilities, which summing them up
        the tree relies on. ``reference``: `reference` after training. Fitted on at most
        `CALIBRATION_ROWS` valid photos, their logits a chunk at a time."""
        chunks = list(self.source.split_chunks("valid", limit=CALIBRATION_ROWS))  # embedded once, bounded
        temperatures = {}
        for scoring in SCORINGS:
            head = self.classifier(scoring, reference)
            temperatures[scoring] = fit_temperature_chunks((head(x), y) for x, y in chunks)
        return temperatures

    @torch.no_grad()
    def evaluate(self, epoch: int) -> dict:
        """Top-1/top-5 on valid over all classes from the label logits; with held-out classes,
        the seen classes' top-1 and the unseen ones' among themselves."""
        head, total = self.classifier(), SeenUnseenAccuracy(self.held_out)
        for embeddings, labels in self.source.split_chunks("valid"):  # never the whole split at once
            total.add(head(embeddings), labels)
        return total.result() if total.count else {}


def train_catlip(config: CatLIPConfig) -> dict:
    """Train on the shared loop and write the model directory (kind ``catlip``); returns the last
    epoch's metrics."""
    trainer, history, runtime = run_training(config, CatLIPTrainer, lambda t: t.source.data_id)
    if runtime.is_main:
        reference = trainer.reference()  # once: with a trained tower it embeds photos
        training = asdict(config) | {"held_out": trainer.held_out.tolist(), "world_size": runtime.world_size}
        save_catlip(
            Path(config.output),
            trainer.head,
            trainer.vocabulary,
            trainer.classes,
            trainer.source.tower_record(),
            training,
            config.scoring,
            trainer.calibrate(reference),
            image_tower=trainer.tower,
            reference=reference,
        )
    runtime.barrier()
    return history[-1] if history else {}
