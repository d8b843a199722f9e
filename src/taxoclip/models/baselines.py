"""Baselines on the same cached image embeddings, so they compare with zero-shot like for like:

- ``probe``: a softmax (multinomial logistic-regression) probe on standardised features, the
  supervised ceiling;
- ``ncm``: nearest class mean of centred, normalised features (no training at all);
- ``transfer_init``: CatLIP's Transfer Init, a linear classifier on the model's image embeddings
  whose weights start as the model's class (caption) embeddings, then trained with cross-entropy.

Every fit reads its training rows through a `RowSource` a mini-batch (or a chunk) at a time, so
a baseline on 2.7M memory-mapped rows holds one batch, never the split as float32; each returns
a `Scorer` that scores test rows chunk by chunk, never a dense (test × classes) matrix. The probe
and Transfer Init train for at most ``max_steps`` mini-batches (`BaselineBudget`): their cost is
bounded, not a number of passes over all rows. (scikit-learn's lbfgs was the probe until the
iNat2021-scale check: on 100,000 rows × 10,000 classes it took 13 minutes and 11 GB.)

`few_shot_rows` picks k training images per class (seeded) so each baseline can be scored at
1, 5, 10 images per class: the data-efficiency curve CatLIP plots.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

PROBE_LR = 3e-3  # AdamW, 300 steps of 256: 95.6% on flowers valid (1e-2: 92.4%, 3e-2: 84.0%; lbfgs was 95.4%)
PROBE_C = 0.1  # inverse L2 regularisation, scikit-learn's meaning (C × summed loss + ½‖W‖²)
CHUNK = 8192  # rows read at a time by a streamed pass


@dataclass
class BaselineBudget:
    """How much a trained baseline may cost: at most ``epochs`` passes and ``max_steps`` steps."""

    epochs: int = 30
    max_steps: int = 300
    batch_size: int = 256
    lr: float = 1e-3
    seed: int = 0

    def steps(self, rows: int) -> int:
        return max(1, min(self.max_steps, self.epochs * -(-rows // self.batch_size)))


@dataclass
class RowSource:
    """Training rows a baseline reads a batch at a time: ``read(positions)`` gives their float32
    features, ``labels[positions]`` their classes. Positions are 0 … len-1."""

    read: Callable[[np.ndarray], np.ndarray]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    @classmethod
    def of_array(cls, features: np.ndarray, labels: np.ndarray) -> RowSource:
        return cls(lambda positions: np.asarray(features[positions], np.float32), np.asarray(labels, np.int64))

    @classmethod
    def of_cache(cls, cache, rows: np.ndarray, labels: np.ndarray) -> RowSource:
        """``rows`` of a feature cache (read in row order through ``cache.read``, which refuses
        damaged rows), with their ``labels``."""
        rows = np.asarray(rows)

        def read(positions: np.ndarray) -> np.ndarray:
            order = np.argsort(rows[positions], kind="stable")  # row order: sequential reads of the map
            out = np.empty((len(positions), cache.features.shape[1]), np.float32)
            out[order] = cache.read(rows[positions][order])
            return out

        return cls(read, np.asarray(labels, np.int64))

    def subset(self, positions: np.ndarray) -> RowSource:
        positions = np.asarray(positions)
        return RowSource(lambda p: self.read(positions[p]), self.labels[positions])

    def mapped(self, transform: Callable[[np.ndarray], np.ndarray]) -> RowSource:
        """The same rows through ``transform`` (e.g. a model's image embedding), batch by batch."""
        return RowSource(lambda p: transform(self.read(p)), self.labels)

    def chunks(self, chunk: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        chunk = chunk or CHUNK
        for start in range(0, len(self), chunk):
            positions = np.arange(start, min(start + chunk, len(self)))
            yield positions, self.read(positions)

    def moments(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean, standard deviation) of every feature, in float64 over one streamed pass."""
        total = square = None
        for _, x in self.chunks():
            x64 = x.astype(np.float64)
            total = x64.sum(0) if total is None else total + x64.sum(0)
            square = (x64**2).sum(0) if square is None else square + (x64**2).sum(0)
        n = max(1, len(self))
        mean = total / n
        std = np.sqrt(np.maximum(square / n - mean**2, 0.0))
        return mean.astype(np.float32), np.where(std > 0, std, 1.0).astype(np.float32)


class Scorer:
    """A fitted baseline: class probabilities of a chunk of test features."""

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def probabilities(self, x: np.ndarray | torch.Tensor) -> torch.Tensor:
        return self.logits(torch.as_tensor(np.asarray(x, np.float32))).softmax(-1)

    def dense(self, x: np.ndarray, chunk: int = CHUNK) -> torch.Tensor:
        """Probabilities of every row of ``x`` at once: for small test sets only."""
        parts = [self.probabilities(x[i : i + chunk]) for i in range(0, len(x), chunk)]
        return torch.cat(parts) if parts else torch.zeros(0)


class LinearScorer(Scorer):
    """``scale * prepare(x) @ W.T + b``, W's rows optionally normalised; absent classes never win."""

    def __init__(self, weight, bias, *, scale=1.0, normalise_weight=False, prepare=None, present=None):
        self.weight, self.bias, self.scale = weight.detach(), bias.detach(), scale
        self.normalise_weight, self.prepare, self.present = normalise_weight, prepare, present

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.prepare is not None:
            x = self.prepare(x)
        rows = F.normalize(self.weight, dim=-1) if self.normalise_weight else self.weight
        logits = self.scale * x @ rows.T + self.bias
        if self.present is not None:
            logits[:, ~self.present] = -torch.inf
        return logits


def few_shot_rows(labels: np.ndarray, shots: int | None, seed: int = 0) -> np.ndarray:
    """Row positions of at most ``shots`` examples per class (all rows when shots is None), in
    O(N log N): one shuffle and one stable sort by class, never a pass per class."""
    if shots is None:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    shuffled = rng.permutation(len(labels))
    by_class = shuffled[np.argsort(labels[shuffled], kind="stable")]
    sorted_labels = labels[by_class]
    first = np.searchsorted(sorted_labels, sorted_labels, side="left")  # start of each row's class run
    rank_in_class = np.arange(len(by_class)) - first
    return np.sort(by_class[rank_in_class < shots])


def adamw(parameters: list[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    """AdamW, fused where this torch has it: at 10,000 classes the update of the 12.8M-weight
    classifier took 0.14 s a step unfused and 0.024 s fused (2 cores), a third of each step."""
    try:
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)


def train_linear(
    source: RowSource,
    weight: torch.Tensor,
    bias: torch.Tensor,
    budget: BaselineBudget,
    *,
    scale: float = 1.0,
    normalise_weight: bool = False,
    prepare: Callable[[torch.Tensor], torch.Tensor] | None = None,
    l2: float = 0.0,
    present: torch.Tensor | None = None,
) -> LinearScorer:
    """A linear classifier started from ``weight``/``bias``, trained with cross-entropy (plus
    ``l2``·‖W‖²) on mini-batches drawn from ``source`` (each epoch a new shuffle), for
    ``budget.steps(len(source))`` steps."""
    rng = np.random.default_rng(budget.seed)
    weight = torch.nn.Parameter(weight.clone().float())
    bias = torch.nn.Parameter(bias.clone().float())
    optimizer = adamw([weight, bias], budget.lr)
    scorer = LinearScorer(weight, bias, scale=scale, normalise_weight=normalise_weight, prepare=prepare)
    scorer.weight, scorer.bias = weight, bias  # trained in place
    size = min(budget.batch_size, len(source))
    order, used = rng.permutation(len(source)), 0
    for _ in range(budget.steps(len(source))):
        if used + size > len(order):
            order, used = rng.permutation(len(source)), 0
        positions = np.sort(order[used : used + size])
        used += size
        x = torch.from_numpy(source.read(positions))
        loss = F.cross_entropy(scorer.logits(x), torch.from_numpy(source.labels[positions]))
        if l2:
            loss = loss + l2 * weight.pow(2).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return LinearScorer(weight, bias, scale=scale, normalise_weight=normalise_weight, prepare=prepare, present=present)


def fit_probe(source: RowSource, n_classes: int, budget: BaselineBudget | None = None) -> LinearScorer:
    """The softmax probe on standardised features (mean and spread from one streamed pass),
    L2-regularised as scikit-learn's LogisticRegression(C=PROBE_C) is."""
    budget = budget or BaselineBudget(lr=PROBE_LR)
    mean, std = (torch.from_numpy(v) for v in source.moments())
    present = torch.zeros(n_classes, dtype=torch.bool)
    present[np.unique(source.labels)] = True

    def standardise(x: torch.Tensor) -> torch.Tensor:
        return (x - mean) / std

    # sklearn minimises C·Σ loss + ½‖W‖²; divided by C·N: mean loss + ‖W‖² / (2·C·N).
    l2 = 1.0 / (2 * PROBE_C * max(1, len(source)))
    width = len(mean)
    return train_linear(
        source,
        torch.zeros(n_classes, width),
        torch.zeros(n_classes),
        budget,
        prepare=standardise,
        l2=l2,
        present=present,
    )


def fit_nearest_class_mean(source: RowSource, n_classes: int, temperature: float = 0.05) -> LinearScorer:
    """Nearest class mean of centred, normalised features: two streamed passes (mean, class sums)."""
    mean = torch.from_numpy(source.moments()[0])
    sums = None
    for positions, x in source.chunks():
        centred = F.normalize(torch.from_numpy(x) - mean, dim=-1)
        sums = torch.zeros(n_classes, centred.shape[1]) if sums is None else sums
        sums.index_add_(0, torch.from_numpy(source.labels[positions]), centred)
    present = sums.norm(dim=1) > 0  # classes with no training image cannot be predicted

    def centre(x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x - mean, dim=-1)

    return LinearScorer(
        F.normalize(sums, dim=-1), torch.zeros(n_classes), scale=1 / temperature, prepare=centre, present=present
    )


def fit_transfer_init(
    source: RowSource, class_embeddings: torch.Tensor, scale: float, budget: BaselineBudget | None = None
) -> LinearScorer:
    """Transfer Init on a source of the model's (normalised) image embeddings: the classifier
    starts as zero-shot (the class embeddings) and trains from there."""
    budget = budget or BaselineBudget()
    bias = torch.zeros(len(class_embeddings))
    return train_linear(source, class_embeddings, bias, budget, scale=scale, normalise_weight=True)


# --- the array forms, for small in-memory data (benchmarks on flowers, the QA probe control) -----


def probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, n_classes: int) -> torch.Tensor:
    """Probe probabilities of every test row (dense: keep ``test_x`` small)."""
    return fit_probe(RowSource.of_array(train_x, train_y), n_classes).dense(test_x)


def nearest_class_mean(
    train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, n_classes: int, temperature: float = 0.05
) -> torch.Tensor:
    return fit_nearest_class_mean(RowSource.of_array(train_x, train_y), n_classes, temperature).dense(test_x)


def fit_linear(
    train_x: torch.Tensor,
    train_y: np.ndarray,
    test_x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    *,
    scale: float = 1.0,
    normalise_weight: bool = False,
    epochs: int = 30,
    lr: float = 1e-3,
    batch_size: int = 256,
    seed: int = 0,
) -> torch.Tensor:
    """``train_linear`` on in-memory rows for ``epochs`` full passes; dense test probabilities."""
    budget = BaselineBudget(epochs=epochs, max_steps=10**9, batch_size=batch_size, lr=lr, seed=seed)
    source = RowSource.of_array(np.asarray(train_x, np.float32), train_y)
    scorer = train_linear(source, weight, bias, budget, scale=scale, normalise_weight=normalise_weight)
    return scorer.dense(np.asarray(test_x, np.float32))
