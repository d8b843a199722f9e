"""Supervised fine-tuning on the shared loop: a linear or MLP head over the classes, on the locked
tower's cached embeddings, on its last stages (cached activations below), or with the whole tower
on augmented photos (`TowerSource`); with class re-balancing or class-weighted loss, label
smoothing, mixup/cutmix, layer-wise learning-rate decay, a weight average and early stopping on the
selection split (the loop's), and the selection split's numbers next to valid's in every row.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from taxoclip.errors import TaxoclipError
from taxoclip.models.accuracy import topk_correct
from taxoclip.models.catlip import CALIBRATION_ROWS, fit_temperature_chunks
from taxoclip.models.finetune import FinetuneHead, save_finetune
from taxoclip.runtime import Runtime
from taxoclip.train.depths import TowerOnPixels, TowerSource, freeze_batch_norm_statistics
from taxoclip.train.finetune_config import FinetuneConfig
from taxoclip.train.loop import Batch, Trainer, run_training
from taxoclip.train.sampling import balanced_rows, class_weights, repeat_factors, repeats, sampling_summary

CONFUSION_MAX_CLASSES = 1_000  # confusion.npy (8 MB at this size) only up to here

__all__ = ["FinetuneConfig", "FinetuneTrainer", "train_finetune"]


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Cross-entropy against soft targets (smoothed or mixed labels); with class ``weights``, each
    photo weighs its target's weight and the mean is over those weights (as torch's weighted mean)."""
    per_photo = -(targets * F.log_softmax(logits.float(), dim=-1)).sum(-1)
    if weights is None:
        return per_photo.mean()
    photo_weights = targets @ weights
    return (per_photo * photo_weights).sum() / photo_weights.sum().clamp(min=1e-12)


class FinetuneStep(nn.Module):
    """The loss of one batch: head logits against the (smoothed, possibly mixed) class targets."""

    def __init__(
        self,
        head: FinetuneHead,
        upper: nn.Module | None,
        n_classes: int,
        label_smoothing: float = 0.0,
        weights: torch.Tensor | None = None,
        mixup=None,
        keep_statistics: bool = True,
    ):
        super().__init__()
        self.head, self.upper, self.n_classes = head, upper, n_classes
        self.label_smoothing, self.mixup, self.keep_statistics = label_smoothing, mixup, keep_statistics
        self.register_buffer("weights", weights, persistent=False)

    def train(self, mode: bool = True) -> FinetuneStep:
        """A pretrained tower's batch norms keep their statistics (see depths); one trained from
        scratch has none worth keeping, so its batch norms learn them."""
        super().train(mode)
        if self.keep_statistics:
            freeze_batch_norm_statistics(self.upper)
        return self

    def targets(self, labels: torch.Tensor) -> torch.Tensor:
        smooth = self.label_smoothing
        return F.one_hot(labels, self.n_classes).float() * (1 - smooth) + smooth / self.n_classes

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # mixup/cutmix (timm's) mix whole photos, so only on even batches of pixels at depth full
        if self.mixup is not None and self.training and isinstance(self.upper, TowerOnPixels) and len(labels) % 2 == 0:
            tower = self.upper.tower
            pixels, targets = self.mixup(tower.prepare(features), labels)
            embeddings = tower(pixels)
        else:
            embeddings = self.upper(features) if self.upper is not None else features
            targets = self.targets(labels)
        return soft_cross_entropy(self.head(embeddings), targets, self.weights)


EPOCH_WARNING_FACTOR = 10  # an epoch this many times the training photos is worth a word
MAX_EPOCH_ROWS = 200_000_000  # an epoch's order as int64: 1.6 GB


class FinetuneTrainer(Trainer):
    def __init__(self, config: FinetuneConfig, runtime: Runtime):
        self.config, self.runtime = config, runtime
        self.source = source = TowerSource(config, runtime)
        self.classes = source.classes
        self.images_per_class = images = source.images_per_class
        empty = [self.classes.ids[c] for c in np.flatnonzero(images == 0)]
        if empty:
            shown = ", ".join(empty[:10]) + (f" and {len(empty) - 10} more" if len(empty) > 10 else "")
            raise TaxoclipError(
                f"{len(empty)} classes have no training photo ({shown}): a supervised classifier cannot learn "
                "them. Add photos of them to train, remove them from the class table, or lower --select "
                "(the selection split takes its photos from train)"
            )
        self.drawn = np.zeros(len(self.classes), dtype=np.int64)  # what the current epoch drew, per class
        self.check_epoch_size()
        sample = source.standardisation_sample()
        self.head = FinetuneHead(
            sample.shape[1], len(self.classes), config.head, config.hidden, mean=sample.mean(0), std=sample.std(0)
        ).to(runtime.device)
        weights = class_weights(images).to(runtime.device) if config.class_weighted else None
        self.module = FinetuneStep(
            self.head,
            source.upper,
            len(self.classes),
            config.label_smoothing,
            weights,
            self.make_mixup(),
            keep_statistics=config.pretrained,
        )

    def make_mixup(self):
        config = self.config
        if not (config.mixup or config.cutmix):
            return None
        from timm.data import Mixup

        return Mixup(
            mixup_alpha=config.mixup,
            cutmix_alpha=config.cutmix,
            label_smoothing=config.label_smoothing,
            num_classes=len(self.classes),
        )

    def param_groups(self) -> list[dict]:
        config = self.config
        linear = [m for m in self.head.layers if isinstance(m, nn.Linear)]
        groups = [
            {"params": [m.weight for m in linear], "lr": config.lr, "weight_decay": config.weight_decay},
            {"params": [m.bias for m in linear], "lr": config.lr, "weight_decay": 0.0},
        ]
        if self.source.upper is not None:
            groups += self.tower_groups()
        return groups

    def tower_groups(self) -> list[dict]:
        """The tower's trainable parameters at ``tower_lr``; with ``layer_decay`` < 1, timm's
        layer-wise groups (each stage's rate shrinks by the factor per stage down from the top)."""
        config, trainable = self.config, list(self.source.upper.parameters())
        if config.layer_decay >= 1:
            return [{"params": trainable, "lr": config.tower_lr, "weight_decay": config.weight_decay}]
        from timm.optim import param_groups_layer_decay

        mine = {id(p) for p in trainable}
        groups = []
        for group in param_groups_layer_decay(
            self.source.tower.model, weight_decay=config.weight_decay, layer_decay=config.layer_decay
        ):
            params = [p for p in group["params"] if id(p) in mine]
            if params:
                lr = config.tower_lr * group["lr_scale"]
                groups.append({"params": params, "lr": lr, "weight_decay": group["weight_decay"]})
        return groups

    def check_epoch_size(self) -> None:
        """Say before the run when re-balancing makes an epoch far larger than the data (``--balance
        2000000`` on 40 photos is a 30-minute epoch of repeats); refuse one whose order alone would
        not fit in memory."""
        config, photos = self.config, int(self.images_per_class.sum())
        drawn = self.samples_per_epoch()
        if not config.balance or drawn <= EPOCH_WARNING_FACTOR * photos:
            return
        trained = int((self.images_per_class > 0).sum())
        detail = (
            f"--balance {config.balance} x {trained} classes = {drawn:,} photos an epoch, drawn from {photos:,} "
            f"training photos ({drawn / max(1, photos):,.0f} times the data)"
        )
        if drawn > MAX_EPOCH_ROWS:
            raise TaxoclipError(f"{detail}: too many to order in memory; lower --balance")
        steps = max(1, drawn // config.batch_size)
        cap = config.max_steps_per_epoch
        advice = (
            f"capped at {cap} by --steps-per-epoch"
            if cap and cap < steps
            else "lower --balance (e.g. to the median class size) or cap the epoch with --steps-per-epoch"
        )
        self.runtime.print(f"note: {detail}: {steps:,} steps of {config.batch_size} an epoch; {advice}")

    def samples_per_epoch(self) -> int:
        trained = int((self.images_per_class > 0).sum())
        return self.config.balance * trained if self.config.balance else int(self.images_per_class.sum())

    def steps_per_epoch(self) -> int:
        steps = max(1, self.samples_per_epoch() // self.config.batch_size)
        return min(steps, self.config.max_steps_per_epoch or steps)

    def batches(self, epoch: int) -> Iterator[Batch]:
        """Training rows (or photos), re-balanced to N per class with ``--balance``; counts what this
        rank draws."""
        self.drawn = np.zeros(len(self.classes), dtype=np.int64)
        config, source = self.config, self.source
        order, repeat = None, None
        if config.balance and source.cache is not None:
            rng = np.random.default_rng([config.seed, epoch, 1])
            labels = source.cache.labels[source.train_rows]
            order = balanced_rows(source.train_rows, labels, config.balance, rng)
        elif config.balance:
            factors = repeat_factors(self.images_per_class, config.balance)

            def repeat(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
                return repeats(labels, factors, generator)

        for batch in source.batches(epoch, order, repeat):
            self.drawn += np.bincount(batch.inputs["labels"].cpu().numpy(), minlength=len(self.drawn))
            yield batch

    def epoch_extras(self) -> dict:
        """What re-balancing drew this epoch, over every rank's share (one gather per epoch)."""
        if not self.config.balance:
            return {}
        if self.runtime.world_size > 1:
            self.drawn = np.sum(self.runtime.gather_objects(self.drawn), axis=0)
        return {f"balance_{k}": v for k, v in sampling_summary(self.images_per_class, self.drawn).items()}

    @torch.no_grad()
    def evaluate(self, epoch: int) -> dict:
        """Valid's top-1/top-5 and balanced accuracy (mean per-class recall) as ``top1``...; the
        selection split's as ``select_top1``... (what early stopping and sweeps choose on)."""
        metrics = {}
        self.head.eval()
        for part, prefix in (("valid", ""), ("select", "select_")):
            total = Scores(len(self.classes))
            for embeddings, labels in self.source.split_chunks(part):  # never the whole split at once
                total.add(self.head(embeddings.to(self.runtime.device)).cpu(), labels)
            if total.count:
                metrics.update({prefix + k: v for k, v in total.result().items()})
        self.head.train()
        return metrics

    @torch.no_grad()
    def calibrate(self) -> float:
        """The head's temperature, fitted on the selection split (valid when there is none), with
        the weights as they are now (the best epoch's, with --patience); at most
        `CALIBRATION_ROWS` photos, their logits a chunk at a time."""
        chunks = list(self.source.split_chunks("select", limit=CALIBRATION_ROWS)) or list(
            self.source.split_chunks("valid", limit=CALIBRATION_ROWS)
        )
        if not chunks:
            return 1.0
        self.head.eval()
        self.head.temperature.fill_(1.0)
        device = self.runtime.device
        temperature = fit_temperature_chunks((self.head(x.to(device)).cpu(), y) for x, y in chunks)
        self.head.temperature.fill_(temperature)
        return temperature

    @torch.no_grad()
    def write_valid_report(self, out: Path) -> dict | None:
        """per_class.csv (each class's training photos, valid photos, recall and what it is most
        often taken for) and confusion.npy (valid counts, true x predicted), with the final weights."""
        self.head.eval()
        n = len(self.classes)
        total, truth, predicted = Scores(n), [], []
        for embeddings, labels in self.source.split_chunks("valid"):
            logits = self.head(embeddings.to(self.runtime.device)).cpu()
            total.add(logits, labels)
            predicted.append(logits.argmax(-1).numpy())
            truth.append(labels.numpy())
        if not truth:
            return None
        truth, predicted = np.concatenate(truth), np.concatenate(predicted)
        photos, right = total.photos, total.right
        # each class's most frequent wrong answer, from the (true, predicted) pairs that occur: a
        # class x class matrix is 800 MB at iNat2021's 10,000 classes
        wrong = truth != predicted
        pairs, counts = np.unique(truth[wrong].astype(np.int64) * n + predicted[wrong], return_counts=True)
        taken_for = np.full(n, -1)
        order = np.lexsort((-counts, pairs // n))  # by true class, the largest count first
        firsts = order[np.r_[True, np.diff(pairs[order] // n) != 0]] if len(order) else order
        taken_for[pairs[firsts] // n] = pairs[firsts] % n
        if n <= CONFUSION_MAX_CLASSES:  # the matrix the study plots, where it is small enough to look at
            confusion = np.zeros((n, n), dtype=np.int64)
            np.add.at(confusion, (truth, predicted), 1)
            np.save(out / "confusion.npy", confusion)
        names = [row.get("common_name") or row.get("species") or "" for row in self.classes.rows]
        with open(out / "per_class.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["class_id", "name", "training_images", "valid_photos", "recall", "most_taken_for"])
            for c in range(n):
                recall = f"{right[c] / photos[c]:.4f}" if photos[c] else ""
                other = self.classes.ids[taken_for[c]] if taken_for[c] >= 0 else ""
                training = int(self.images_per_class[c])
                writer.writerow([self.classes.ids[c], names[c], training, int(photos[c]), recall, other])
        return {"photos": photos, "right": right}

    def write_sampling(self, out: Path) -> None:
        """sampling.csv: each class's training photos and what the last epoch drew of it."""
        with open(out / "sampling.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["class_id", "training_images", "drawn_last_epoch"])
            for class_id, have, drawn in zip(self.classes.ids, self.images_per_class, self.drawn, strict=True):
                writer.writerow([class_id, int(have), int(drawn)])


class Scores:
    """top1, top5, balanced (mean recall over the classes present) and the worst class's recall,
    accumulated chunk by chunk (``add(logits, labels)``): per-class counts, one bincount a chunk."""

    def __init__(self, classes: int):
        self.hits = {1: 0, 5: 0}
        self.photos = np.zeros(classes, np.int64)
        self.right = np.zeros(classes, np.int64)

    @property
    def count(self) -> int:
        return int(self.photos.sum())

    def add(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        for k, n in topk_correct(logits, labels, (1, 5)).items():
            self.hits[k] += n
        truth, predicted = labels.numpy(), logits.argmax(-1).numpy()
        self.photos += np.bincount(truth, minlength=len(self.photos))
        self.right += np.bincount(truth[truth == predicted], minlength=len(self.photos))

    def result(self) -> dict[str, float]:
        present = self.photos > 0
        recalls = self.right[present] / self.photos[present]
        return {
            "top1": self.hits[1] / self.count,
            "top5": self.hits[5] / self.count,
            "balanced": float(np.mean(recalls)),
            "worst_recall": float(np.min(recalls)),
        }


def train_finetune(config: FinetuneConfig) -> dict:
    """Train on the shared loop and write the model directory (kind ``finetune``); returns the
    last epoch's metrics (the best selection epoch's weights are kept with --patience)."""
    trainer, history, runtime = run_training(
        config,
        FinetuneTrainer,
        lambda t: t.source.data_id,
        monitor="select_top1",
        accumulate=config.accumulate,
        ema=config.ema,
        patience=config.patience,
    )
    if config.patience and history:  # the weights kept are the best selection epoch's: report that epoch
        scored = [r for r in history if "select_top1" in r]
        final = max(scored, key=lambda r: r["select_top1"]) if scored else history[-1]
    else:
        final = history[-1] if history else {}
    if runtime.is_main:
        out = Path(config.output)
        temperature = trainer.calibrate()
        training = asdict(config) | {
            "world_size": runtime.world_size,
            "temperature": temperature,
            "images_per_class": trainer.images_per_class.tolist(),
            "epochs_run": len(history),
        }
        tower = trainer.source.tower if trainer.source.upper is not None else None
        save_finetune(out, trainer.head, trainer.classes, trainer.source.tower_record(), training, tower)
        trainer.write_sampling(out)
        trainer.write_valid_report(out)
    runtime.barrier()
    return final
