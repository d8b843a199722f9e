"""Grounded question answering: the identifier's answer as one short line of text beside the image
tokens, so the language model answers from what the identifier (a lit, catlip, finetune or open_clip
classifier) already knows, and says so in words when the identifier is unsure.

Per photo, from its class probabilities: the two most likely species with their probabilities, then
at each rank the most likely value with its summed probability, in one fixed format:

  Identifier: Helianthus annuus (common sunflower) 0.93, Rudbeckia hirta (black-eyed Susan) 0.04;
  genus Helianthus 0.95; family Asteraceae 0.99; order Asterales 1.00; class Magnoliopsida 1.00

The photos the language model trains on must get this line from an identifier that never saw them
(one that is always right on its training photos would teach the language model to trust it
blindly): `cross_fitted` fits a softmax probe on all but one fold of the training photos' cached
embeddings and describes that fold, fold after fold. Photos asked about later (valid, `ask`) get the
grounding model's own line. Training answers follow the honest-rank rule of ``predict``: below
`HONEST_THRESHOLD` at the asked rank the answer is "probably Asteraceae; the species is uncertain"
(the deepest rank the identifier is sure of), or "not sure; the species is uncertain".

A summary is a few numbers a photo (`Summaries`), kept as arrays: never a photos x classes matrix.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from taxoclip.data.questions import species_name, stable
from taxoclip.errors import TaxoclipError
from taxoclip.taxonomy import HONEST_THRESHOLD, ClassTable

RANKS = ("genus", "family", "order", "class")  # broader ranks in the line, narrowest first
SPECIES_SHOWN = 2
FOLDS = 5
CHUNK = 4096  # photos scored at a time


@dataclass
class Summaries:
    """One row per photo: the top species (class indices) and their probabilities, and at each of
    `RANKS` the top value (an index into `Grounder.values[rank]`, -1: none) and its summed mass."""

    species: np.ndarray  # (n, SPECIES_SHOWN) int32
    species_p: np.ndarray  # (n, SPECIES_SHOWN) float32
    values: np.ndarray  # (n, len(RANKS)) int32
    masses: np.ndarray  # (n, len(RANKS)) float32

    @classmethod
    def empty(cls, n: int) -> Summaries:
        return cls(
            np.zeros((n, SPECIES_SHOWN), np.int32),
            np.zeros((n, SPECIES_SHOWN), np.float32),
            np.full((n, len(RANKS)), -1, np.int32),
            np.zeros((n, len(RANKS)), np.float32),
        )

    def put(self, positions: np.ndarray, other: Summaries) -> None:
        self.species[positions], self.species_p[positions] = other.species, other.species_p
        self.values[positions], self.masses[positions] = other.values, other.masses


class Grounder:
    """Turns an identifier's class probabilities (over ``classes``) into summaries, their line of
    text, and the answers a grounded model learns."""

    def __init__(self, classes: ClassTable, threshold: float = HONEST_THRESHOLD):
        self.classes, self.rows, self.threshold = classes, list(classes.rows), threshold
        self.values: dict[str, list[str]] = {}
        self.value_of_class: dict[str, torch.Tensor] = {}
        for rank in RANKS:
            self.values[rank], index = classes.values_at(rank)
            self.value_of_class[rank] = torch.from_numpy(index)

    @torch.no_grad()
    def summarise(self, probabilities: torch.Tensor) -> Summaries:
        """Summaries of a chunk of photos' class probabilities (n, classes)."""
        probabilities = probabilities.float()
        n, shown = len(probabilities), min(SPECIES_SHOWN, probabilities.shape[1])
        out = Summaries.empty(n)
        top = probabilities.topk(shown, dim=1)
        out.species[:, :shown], out.species_p[:, :shown] = top.indices.numpy(), top.values.numpy()
        for r, rank in enumerate(RANKS):
            count = len(self.values[rank])
            if not count:
                continue
            mass = torch.zeros(n, count + 1).index_add_(1, self.value_of_class[rank], probabilities)[:, :count]
            best = mass.max(1)
            out.values[:, r], out.masses[:, r] = best.indices.numpy(), best.values.numpy()
        return out

    def species_label(self, c: int) -> str:
        return species_label(self.rows[c])

    def text(self, summaries: Summaries, i: int) -> str:
        """The identifier's line for photo ``i`` of ``summaries``."""
        species = ", ".join(
            f"{self.species_label(int(c))} {p:.2f}"
            for c, p in zip(summaries.species[i], summaries.species_p[i], strict=True)
            if p > 0
        )
        ranks = "; ".join(
            f"{rank} {self.values[rank][v]} {m:.2f}"
            for rank, v, m in zip(RANKS, summaries.values[i], summaries.masses[i], strict=True)
            if v >= 0
        )
        return f"Identifier: {species}" + (f"; {ranks}" if ranks else "")

    def sure_at(self, summaries: Summaries, i: int, rank: str) -> bool:
        if rank == "species":
            return bool(summaries.species_p[i, 0] >= self.threshold)
        return rank in RANKS and self.sure_at_index(summaries, i, RANKS.index(rank))

    def sure_at_index(self, summaries: Summaries, i: int, r: int) -> bool:
        return summaries.values[i, r] >= 0 and bool(summaries.masses[i, r] >= self.threshold)

    def hedged(self, summaries: Summaries, i: int, rank: str) -> str:
        """The answer when the identifier is unsure at ``rank``: the deepest broader rank it is sure
        of, in words."""
        start = RANKS.index(rank) + 1 if rank in RANKS else 0
        for r in range(start, len(RANKS)):
            if self.sure_at_index(summaries, i, r):
                return f"probably {self.values[RANKS[r]][summaries.values[i, r]]}; the {rank} is uncertain"
        return f"not sure; the {rank} is uncertain"

    def target(self, record: dict, summaries: Summaries, i: int) -> str:
        """What the grounded model learns to answer: the true answer where the identifier is sure
        at the asked rank, the honest hedge where it is not (closed questions: always the truth)."""
        rank = asked_rank(record)
        if rank is None or self.sure_at(summaries, i, rank):
            return record["answer"]
        return self.hedged(summaries, i, rank)

    def top(self, probabilities: torch.Tensor, k: int = 5) -> list[dict]:
        """The identifier's top-k for one photo, as `ask` shows what an answer rested on."""
        best = probabilities.float().topk(min(k, len(probabilities)))
        return [
            {
                "id": self.rows[int(c)]["id"],
                "name": self.species_label(int(c)),
                "probability": round(float(p), 4),
                **{rank: self.rows[int(c)].get(rank, "") for rank in RANKS},
            }
            for c, p in zip(best.indices, best.values, strict=True)
        ]


def species_label(row: dict) -> str:
    """A class's species name with its common name: "Helianthus annuus (common sunflower)"."""
    name = species_name(row) or row.get("scientific_name") or row["id"]
    return f"{name} ({row['common_name']})" if row.get("common_name") else name


def asked_rank(record: dict) -> str | None:
    """The rank an open question asks about (None for closed and attribute questions)."""
    if record["type"] in ("species", "common_name"):
        return "species"
    if record["type"] == "rank":
        return record.get("rank")
    return None


def summarise_with(classifier, grounder: Grounder, cache, rows: np.ndarray) -> Summaries:
    """The grounding model's summaries of these cache rows, scored a chunk at a time."""
    out = Summaries.empty(len(rows))
    for start in range(0, len(rows), CHUNK):
        chunk = rows[start : start + CHUNK]
        order = np.argsort(chunk, kind="stable")  # row order: sequential reads of the memory map
        features = np.asarray(cache.features[chunk[order]], np.float32)
        part = grounder.summarise(classifier.probabilities_from_features(features))
        out.put(start + order, part)
    return out


def fold_of(keys, rows: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Each photo's fold, from a hash of its key: the same photo is in the same fold every run."""
    return np.array([stable(seed, "grounding fold", keys[int(r)]) % folds for r in rows], dtype=np.int64)


def cross_fitted(cache, grounder: Grounder, rows: np.ndarray, folds: int = FOLDS, seed: int = 0) -> Summaries:
    """Summaries of training rows, each from a probe that never saw it: ``folds`` probes, each
    fitted (streamed) on the other folds' rows and scoring its own fold in chunks."""
    from taxoclip.models.baselines import RowSource, fit_probe

    rows = np.asarray(rows, dtype=np.int64)
    fold = fold_of(cache.keys, rows, folds, seed)
    labels = cache.labels[rows].astype(np.int64)
    # the probe's classes are the cache's; the grounder's table is the identifier's (a superset)
    to_grounder = class_map(cache.classes, grounder.classes)
    out = Summaries.empty(len(rows))
    for f in range(folds):
        held = np.flatnonzero(fold == f)
        fitted = np.flatnonzero(fold != f)
        if not len(held):
            continue
        if not len(fitted):
            raise TaxoclipError("grounding needs at least two folds of training photos to cross-fit the identifier")
        scorer = fit_probe(RowSource.of_cache(cache, rows[fitted], labels[fitted]), len(cache.classes))
        for start in range(0, len(held), CHUNK):
            chunk = held[start : start + CHUNK]
            probabilities = scorer.probabilities(torch.from_numpy(np.asarray(cache.features[rows[chunk]], np.float32)))
            wide = torch.zeros(len(chunk), len(grounder.classes))
            wide[:, to_grounder] = probabilities.float()
            out.put(chunk, grounder.summarise(wide))
    return out


def class_map(cache_classes: ClassTable, identifier_classes: ClassTable) -> torch.Tensor:
    """Each cache class's index in the identifier's table (the identifier must have every one)."""
    where = identifier_classes.index_of()
    return torch.tensor([where[class_id] for class_id in cache_classes.ids], dtype=torch.long)


def open_grounding(spec: str, cache):
    """The identifier ``spec`` opened for grounding questions about ``cache``'s photos, after the
    checks that it reads the same embeddings and knows every class asked about."""
    from taxoclip.models.bundle import read_config
    from taxoclip.models.registry import load_classifier

    path = Path(spec)
    if path.is_dir() and (path / "config.json").is_file() and read_config(path).get("kind") == "vqa":
        raise TaxoclipError(
            f"--grounding {spec}: a question-answering model; ground with an identifier instead "
            "(a lit, catlip or finetune model directory, or open_clip:NAME)"
        )
    classifier = load_classifier(spec, classes=cache.classes, captions=cache.meta.get("captions", {}).get("by_class"))
    tower = cache.meta["tower"]
    if classifier.image_tower_id and classifier.image_tower_id != tower["id"]:
        raise TaxoclipError(
            f"--grounding {spec} reads {classifier.image_tower_name} embeddings ({classifier.image_tower_id}), but "
            f"{cache.path} holds {tower['name']} embeddings ({tower['id']}); ground with a model trained on the "
            "same image tower, or make the questions' cache with its tower"
        )
    if classifier.image_tower_name != tower["name"]:
        raise TaxoclipError(
            f"--grounding {spec} reads {classifier.image_tower_name} embeddings, but {cache.path} holds "
            f"{tower['name']} embeddings; ground with a model of the same image tower"
        )
    known = set(classifier.classes.ids)
    missing = [c for c in cache.classes.ids if c not in known]
    if missing:
        raise TaxoclipError(
            f"--grounding {spec} does not know class {missing[0]!r} ({len(missing)} of {cache.path}'s "
            f"{len(cache.classes)} classes are not in its class table of {len(known)}); ground with an identifier "
            "trained on the same class table"
        )
    return classifier, Grounder(classifier.classes)
