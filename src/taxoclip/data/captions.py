"""Captions from class metadata, following the LiT species paper's recipe.

1. aggregate the metadata per class (the class table does this);
2. choose the metadata columns that best tell classes apart (`choose_columns`);
3. caption every image of the class as "A photo of the {concatenated metadata}".

Named styles fix the columns instead: ``paper`` is the paper's own choice (common name,
supercategory, binomial). Every class carries every style, so training can sample among them
and evaluation can pick one or average a CLIP-style template ensemble.
"""

from __future__ import annotations

import csv
import itertools
import json
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from taxoclip.errors import TaxoclipError
from taxoclip.taxonomy import RANK_COLUMNS, ClassTable

PREFIX = "A photo of the"

STYLES: dict[str, tuple[str, ...]] = {
    "paper": ("common_name", "supercategory", "scientific_name"),
    "scientific": ("scientific_name",),
    "common": ("common_name",),
    "taxonomic": (*RANK_COLUMNS[:-1], "specific_epithet"),
    "taxonomic_common": (*RANK_COLUMNS[:-1], "specific_epithet", "common_name"),
}
STYLE_NAMES = ("auto", *STYLES)

# CLIP-style templates for evaluation ensembles (a subset of OpenAI's ImageNet prompts that suit
# photos of organisms); each takes the class's display name.
TEMPLATES = (
    "a photo of a {}.",
    "a close-up photo of a {}.",
    "a cropped photo of the {}.",
    "a bright photo of a {}.",
    "a blurry photo of a {}.",
    "a good photo of the {}.",
    "a photo of the small {}.",
    "a photo of the large {}.",
)

# Columns never worth putting in a caption: identifiers, paths, and the binomial twice.
NOT_CAPTION_COLUMNS = {"index", "id", "species", "image_dir_name", "folder", "filepath", "file_name"}
MAX_COLUMN_WORDS = 8.0  # a column longer than this on average (e.g. attribute lists) is not auto-chosen


@dataclass(frozen=True)
class CaptionChoice:
    """The columns chosen for ``auto`` captions and how well they separate the classes."""

    columns: tuple[str, ...]
    collisions: int  # classes whose caption some other class also has
    mean_words: float
    examples: tuple[tuple[str, ...], ...] = ()  # a few groups of class ids sharing a caption

    def describe(self) -> str:
        text = (
            f"columns {', '.join(self.columns)}: {self.collisions} classes share a caption, "
            f"{self.mean_words:.1f} words each"
        )
        if self.examples:
            text += "; e.g. classes " + "; ".join("/".join(group) for group in self.examples[:3])
        return text


def compose(values: list[str]) -> str:
    body = " ".join(v for v in values if v)
    return f"{PREFIX} {body}" if body else ""


def caption_for(row: dict[str, str], columns: tuple[str, ...]) -> str:
    """The caption of one class from the given columns; falls back to the scientific name,
    then the id, so that no class is left without a caption."""
    caption = compose([row.get(c, "") for c in columns])
    return (
        caption
        or compose([row.get("scientific_name", "")])
        or compose([row.get("common_name", "")])
        or compose([row["id"]])
    )


def display_name(row: dict[str, str]) -> str:
    return row.get("common_name") or row.get("scientific_name") or row["id"]


def collision_groups(captions: list[str], ids: list[str]) -> list[tuple[str, ...]]:
    groups: dict[str, list[str]] = {}
    for caption, class_id in zip(captions, ids, strict=True):
        groups.setdefault(caption, []).append(class_id)
    return [tuple(g) for g in groups.values() if len(g) > 1]


def candidate_columns(table: ClassTable) -> list[str]:
    out = []
    for column in table.filled_columns():
        if column in NOT_CAPTION_COLUMNS:
            continue
        words = sum(len(row.get(column, "").split()) for row in table) / len(table)
        if words <= MAX_COLUMN_WORDS:
            out.append(column)
    return out


def choose_columns(table: ClassTable, *, max_columns: int = 3) -> CaptionChoice:
    """The column subset (up to ``max_columns``) that leaves the fewest classes sharing a caption,
    then the fewest words, then the fewest columns; ties go to the earlier columns. Deterministic."""
    columns = candidate_columns(table)
    if not columns:
        raise TaxoclipError("no metadata column has values to caption with; add common_name or scientific_name")
    values = {c: [row.get(c, "") for row in table] for c in columns}
    word_counts = {c: sum(len(v.split()) for v in values[c]) for c in columns}
    best_key, best = None, None
    for size in range(1, min(max_columns, len(columns)) + 1):
        for subset in itertools.combinations(columns, size):
            keys = list(zip(*(values[c] for c in subset), strict=True))
            counts = Counter(keys)
            collisions = sum(n for n in counts.values() if n > 1) + sum(1 for k in keys if not any(k))
            key = (collisions, sum(word_counts[c] for c in subset), size)
            if best_key is None or key < best_key:
                best_key, best = key, subset
    assert best is not None and best_key is not None
    captions = [caption_for(row, best) for row in table]
    return CaptionChoice(
        columns=best,
        collisions=best_key[0],
        mean_words=sum(len(c.split()) for c in captions) / len(captions) - len(PREFIX.split()),
        examples=tuple(collision_groups(captions, table.ids)[:5]),
    )


@dataclass
class CaptionSet:
    """Every class's caption in every style, plus the configuration that made them."""

    style: str  # the default style for training and evaluation
    choice: CaptionChoice  # what ``auto`` chose
    by_class: list[dict[str, str]]  # per class index: style -> caption

    def captions(self, style: str | None = None) -> list[str]:
        style = style or self.style
        if style not in STYLE_NAMES:
            raise TaxoclipError(f"unknown caption style {style!r}; use one of {', '.join(STYLE_NAMES)}")
        return [entry[style] for entry in self.by_class]

    def collisions(self, style: str | None = None) -> int:
        captions = self.captions(style)
        counts = Counter(captions)
        return sum(1 for c in captions if counts[c] > 1)

    def config(self) -> dict:
        return {
            "style": self.style,
            "prefix": PREFIX,
            "styles": {k: list(v) for k, v in STYLES.items()},
            "auto": asdict(self.choice),
            "templates": list(TEMPLATES),
        }


def build_captions(table: ClassTable, style: str = "auto", *, max_columns: int = 3) -> CaptionSet:
    if style not in STYLE_NAMES:
        raise TaxoclipError(f"unknown caption style {style!r}; use one of {', '.join(STYLE_NAMES)}")
    choice = choose_columns(table, max_columns=max_columns)
    styles = {"auto": choice.columns, **STYLES}
    by_class = [{name: caption_for(row, columns) for name, columns in styles.items()} for row in table]
    return CaptionSet(style, choice, by_class)


def template_captions(row: dict[str, str], templates: tuple[str, ...] = TEMPLATES) -> list[str]:
    """A CLIP-style prompt ensemble for one class, for evaluation."""
    name = display_name(row)
    return [t.format(name) for t in templates]


def write_captions_csv(table: ClassTable, captions: CaptionSet, path: str | Path) -> None:
    """One row per class: index, id, the chosen style's caption, then every style's caption."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["index", "id", "caption", *(f"caption_{s}" for s in STYLE_NAMES)])
        for row, entry in zip(table, captions.by_class, strict=True):
            writer.writerow([row["index"], row["id"], entry[captions.style], *(entry[s] for s in STYLE_NAMES)])


def write_caption_config(captions: CaptionSet, path: str | Path) -> None:
    Path(path).write_text(json.dumps(captions.config(), indent=2) + "\n")
