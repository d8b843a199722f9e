"""Metrics for a species classifier, at every taxonomic rank, computed chunk by chunk so that
100,000 images against 10,000 classes never need the whole probability matrix in memory.

For each image the classifier gives class (species) probabilities. From them:
- top-1 / top-5 over classes;
- accuracy at every rank two ways: rolling probabilities up the tree (summing per genus,
  family, ...) and reading the lineage of the top-1 class;
- per class: count, top-1, top-5, the most frequent wrong answer;
- confusions between classes (sparse counts) and, per rank, between groups;
- mistake severity: for a wrong top-1, the deepest rank where the truth and the answer still agree
  (the depth of their lowest common ancestor: 0 = not even the kingdom, 6 = same genus);
- any grouping column (supercategory, order, ...) and seen/unseen classes.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch

from taxoclip.taxonomy import ClassTable, Rank

ROLLUP_RANKS = [r for r in Rank if r is not Rank.SPECIES]  # species is the class itself


@dataclass
class RankCodes:
    """For one rank (or grouping column): each class's group number, -1 where unknown."""

    name: str
    codes: np.ndarray  # (classes,)
    groups: list[str]

    @classmethod
    def of(cls, table: ClassTable, column: str) -> RankCodes:
        values = [row.get(column, "") for row in table]
        groups = sorted({v for v in values if v})
        position = {g: i for i, g in enumerate(groups)}
        return cls(column, np.array([position.get(v, -1) for v in values], dtype=np.int64), groups)

    @property
    def known(self) -> bool:
        return len(self.groups) > 0


def lineage_codes(table: ClassTable) -> dict[str, RankCodes]:
    return {rank.column: RankCodes.of(table, rank.column) for rank in ROLLUP_RANKS}


def lca_depth(truth: np.ndarray, predicted: np.ndarray, lineage: dict[str, RankCodes]) -> np.ndarray:
    """How many ranks (kingdom first) two classes share before they part; 6 means same genus."""
    depth = np.zeros(len(truth), dtype=np.int64)
    still = np.ones(len(truth), dtype=bool)
    for rank in ROLLUP_RANKS:
        codes = lineage[rank.column].codes
        same = (codes[truth] == codes[predicted]) & (codes[truth] >= 0)
        still &= same
        depth += still
    return depth


@dataclass
class Evaluation:
    """Accumulates metrics over chunks of (probabilities, labels); `result()` summarises them."""

    classes: ClassTable
    group_by: list[str] = field(default_factory=list)
    seen: np.ndarray | None = None  # (classes,) bool: classes that had training images

    def __post_init__(self) -> None:
        n = len(self.classes)
        self.lineage = lineage_codes(self.classes)
        self.grouping = {c: RankCodes.of(self.classes, c) for c in self.group_by}
        self.count = np.zeros(n, np.int64)
        self.top1 = np.zeros(n, np.int64)
        self.top5 = np.zeros(n, np.int64)
        self.pairs: Counter = Counter()  # (true, predicted) -> images, for wrong top-1 only
        self.rank_rollup = {r.column: 0 for r in ROLLUP_RANKS}
        self.rank_lineage = {r.column: 0 for r in ROLLUP_RANKS}
        self.rank_counted = {r.column: 0 for r in ROLLUP_RANKS}
        self.rank_confusion = {r.column: Counter() for r in ROLLUP_RANKS}
        self.severity = Counter()
        self.unseen_among_unseen = 0  # unseen-class photos right when only unseen classes may be answered

    def add(self, probabilities: torch.Tensor, labels: torch.Tensor) -> None:
        """One chunk: probabilities (N, classes) summing to 1 per row, labels (N,) class indices."""
        probabilities = probabilities.float()
        labels_np = labels.cpu().numpy()
        k = min(5, probabilities.shape[1])
        top = probabilities.topk(k, dim=1).indices.cpu().numpy()
        predicted = top[:, 0]
        np.add.at(self.count, labels_np, 1)
        np.add.at(self.top1, labels_np, predicted == labels_np)
        np.add.at(self.top5, labels_np, (top == labels_np[:, None]).any(1))
        if self.seen is not None:  # the restricted setting: answers among the never-seen classes only
            unseen_rows = ~self.seen[labels_np]
            if unseen_rows.any():
                columns = np.flatnonzero(~self.seen)
                among = probabilities[torch.from_numpy(unseen_rows)][:, torch.from_numpy(columns)].argmax(1)
                self.unseen_among_unseen += int((columns[among.cpu().numpy()] == labels_np[unseen_rows]).sum())
        wrong = predicted != labels_np
        self.pairs.update(zip(labels_np[wrong].tolist(), predicted[wrong].tolist(), strict=True))
        self.severity.update(lca_depth(labels_np[wrong], predicted[wrong], self.lineage).tolist())
        for rank in ROLLUP_RANKS:
            codes = self.lineage[rank.column]
            if not codes.known:
                continue
            truth = codes.codes[labels_np]
            counted = truth >= 0
            summed = rollup(probabilities, codes).argmax(1).cpu().numpy()
            self.rank_rollup[rank.column] += int((summed == truth)[counted].sum())
            self.rank_lineage[rank.column] += int((codes.codes[predicted] == truth)[counted].sum())
            self.rank_counted[rank.column] += int(counted.sum())
            self.rank_confusion[rank.column].update(zip(truth[counted].tolist(), summed[counted].tolist(), strict=True))

    def result(self) -> dict:
        n = int(self.count.sum())
        scored = self.count > 0
        per_rank = {}
        for rank in ROLLUP_RANKS:
            counted = self.rank_counted[rank.column]
            if counted:
                per_rank[rank.column] = {
                    "rollup": self.rank_rollup[rank.column] / counted,
                    "top1_lineage": self.rank_lineage[rank.column] / counted,
                    "images": counted,
                    "groups": len(self.lineage[rank.column].groups),
                }
        per_rank["species"] = {
            "rollup": self.top1.sum() / max(n, 1),
            "top1_lineage": self.top1.sum() / max(n, 1),
            "images": n,
            "groups": int(scored.sum()),
        }
        mistakes = sum(self.severity.values())
        result = {
            "images": n,
            "classes_scored": int(scored.sum()),
            "top1": float(self.top1.sum() / max(n, 1)),
            "top5": float(self.top5.sum() / max(n, 1)),
            "mean_class_top1": float(np.mean(self.top1[scored] / self.count[scored])) if scored.any() else 0.0,
            "per_rank": per_rank,
            "mistakes": mistakes,
            "mistake_lca_depth_mean": (sum(d * c for d, c in self.severity.items()) / mistakes) if mistakes else None,
            "mistake_lca_depth_counts": {depth_name(d): self.severity.get(d, 0) for d in range(len(ROLLUP_RANKS) + 1)},
            "groups": {column: self.group_accuracy(codes) for column, codes in self.grouping.items() if codes.known},
        }
        if self.seen is not None:
            for name, mask in (("seen", self.seen), ("unseen", ~self.seen)):
                images = int(self.count[mask].sum())
                if images:
                    result[f"{name}_top1"] = float(self.top1[mask].sum() / images)
                    result[f"{name}_images"] = images
            if result.get("unseen_images"):
                result["unseen_top1_among_unseen"] = self.unseen_among_unseen / result["unseen_images"]
                result["unseen_classes"] = int((~self.seen).sum())
        return result

    def group_accuracy(self, codes: RankCodes) -> list[dict]:
        rows = []
        for index, name in enumerate(codes.groups):
            mask = codes.codes == index
            images = int(self.count[mask].sum())
            if images:
                rows.append(
                    {
                        "group": name,
                        "images": images,
                        "classes": int((self.count[mask] > 0).sum()),
                        "top1": float(self.top1[mask].sum() / images),
                        "top5": float(self.top5[mask].sum() / images),
                    }
                )
        return sorted(rows, key=lambda r: r["top1"])

    def per_class(self, train_counts: np.ndarray | None = None) -> list[dict]:
        """One row per class with images: accuracy and the most frequent wrong answer."""
        worst_answer: dict[int, tuple[int, int]] = {}
        for (truth, predicted), n in self.pairs.items():
            if n > worst_answer.get(truth, (-1, 0))[1]:
                worst_answer[truth] = (predicted, n)
        rows = []
        for index, row in enumerate(self.classes):
            if not self.count[index]:
                continue
            answer, n = worst_answer.get(index, (None, 0))
            entry = {
                "index": index,
                "id": row["id"],
                "name": row.get("common_name") or row.get("scientific_name", ""),
                "scientific_name": row.get("scientific_name", ""),
                "images": int(self.count[index]),
                "top1": self.top1[index] / self.count[index],
                "top5": self.top5[index] / self.count[index],
                "most_confused_with": "" if answer is None else self.classes.rows[answer]["id"],
                "most_confused_name": "" if answer is None else display(self.classes.rows[answer]),
                "confused_images": n,
            }
            if train_counts is not None:
                entry["train_images"] = int(train_counts[index])
            if self.seen is not None:
                entry["seen_in_training"] = bool(self.seen[index])
            rows.append(entry)
        return rows

    def confused_pairs(self, top: int = 20) -> list[dict]:
        return [
            {
                "true_id": self.classes.rows[t]["id"],
                "true": display(self.classes.rows[t]),
                "predicted_id": self.classes.rows[p]["id"],
                "predicted": display(self.classes.rows[p]),
                "images": n,
                "lca": depth_name(int(lca_depth(np.array([t]), np.array([p]), self.lineage)[0])),
            }
            for (t, p), n in self.pairs.most_common(top)
        ]

    def hardest_taxa(self, min_images: int = 5, top: int = 10) -> dict[str, list[dict]]:
        """Per rank, the groups with the lowest top-1 (by the lineage of the top-1 class)."""
        out = {}
        for rank in ROLLUP_RANKS:
            codes = self.lineage[rank.column]
            if codes.known and len(codes.groups) > 1:
                rows = [r for r in self.group_accuracy(codes) if r["images"] >= min_images]
                out[rank.column] = rows[:top]
        return out


def rollup(probabilities: torch.Tensor, codes: RankCodes) -> torch.Tensor:
    """Group probabilities (N, groups): the sum of the probabilities of each group's classes."""
    known = torch.from_numpy(codes.codes >= 0)
    index = torch.from_numpy(np.where(codes.codes >= 0, codes.codes, 0))
    out = torch.zeros(probabilities.shape[0], len(codes.groups), dtype=probabilities.dtype, device=probabilities.device)
    out.index_add_(1, index[known].to(probabilities.device), probabilities[:, known.to(probabilities.device)])
    return out


def depth_name(depth: int) -> str:
    """0 -> 'none', 1 -> 'kingdom', ..., 6 -> 'genus'."""
    return "none" if depth == 0 else ROLLUP_RANKS[depth - 1].column


def display(row: dict[str, str]) -> str:
    return row.get("common_name") or row.get("scientific_name") or row["id"]
