"""Labels from captions, CatLIP's targets: every class gets a set of labels, and the labels that
enough training images carry form the vocabulary the image tower learns to predict.

Two extractors:
  taxonomy   exact labels from the class table: each rank's value prefixed by the rank
             (``genus:Rosa``, ``species:Rosa canina``) plus the common name's words (``common:rose``)
  wordnet    free-text captions (web-style data): nouns mapped to WordNet synsets as CatLIP does
             (lemmatised, the most frequent noun sense, ``rose.n.01``), longest match first for
             multi-word names (``sweet_pea.n.01``); needs WordNet installed (`taxoclip.data.wordnet`)

A vocabulary keeps the labels carried by at least ``min_count`` training images (the paper's
V_tau), the most frequent ``max_size`` of them, and records each class's labels in it.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from taxoclip.errors import TaxoclipError
from taxoclip.taxonomy import ClassTable, Rank

EXTRACTORS = ("taxonomy", "wordnet")
# How a class's score comes from its labels' logits (models.catlip: transfer_init, standardise_rows).
SCORINGS = ("likelihood", "standardised", "transfer")
VOCABULARY_VERSION = 1
_STOPWORD_TEXT = (
    "a an the of and or in on at by for from to with without as is are be this that these those it "
    "its de la le du des von van "
)
STOPWORDS = frozenset(_STOPWORD_TEXT.split())
# Caption boilerplate ("A photo of the ...") names no organism: never a label.
BOILERPLATE_SYNSETS = frozenset({"photograph.n.01", "picture.n.01", "image.n.01", "exposure.n.09"})
MAX_PHRASE_WORDS = 3
COMMON_PREFIX = "common"


def label_rank(label: str) -> Rank | None:
    """The rank a taxonomy label names (``genus:Rosa`` -> GENUS), None for other labels."""
    prefix = label.split(":", 1)[0]
    return next((rank for rank in Rank if rank.column == prefix), None)


def label_weight(label: str) -> float:
    """How much a label speaks for a class in Transfer Init: deeper ranks weigh more (kingdom 1,
    phylum 2, ... species 64), each common-name word 8 (about an order's weight), WordNet nouns 1."""
    rank = label_rank(label)
    if rank is not None:
        return float(2 ** int(rank))
    return 8.0 if label.startswith(f"{COMMON_PREFIX}:") else 1.0


def words(text: str) -> list[str]:
    """Lower-case words of letters (hyphens and punctuation split words), without stopwords."""
    return [w for w in re.findall(r"[a-z]+", text.lower()) if w not in STOPWORDS and len(w) > 1]


def taxonomy_labels(row: dict[str, str]) -> list[str]:
    labels = [f"{rank.column}:{row[rank.column]}" for rank in Rank if row.get(rank.column)]
    labels += [f"{COMMON_PREFIX}:{word}" for word in words(row.get("common_name", ""))]
    return list(dict.fromkeys(labels))


class WordNetLabeller:
    """Nouns of a caption as WordNet synset names, longest phrase first.

    Offline there is no part-of-speech tagger (NLTK's must be downloaded), so a single word that
    WordNet knows as a noun is taken as one unless its adjective senses are more frequent in
    WordNet's sense counts ("two", "pink", "common" are adjectives in captions; "rose", "bee" are
    nouns). Verb senses are ignored: inflections collide with nouns (rose/rise) and captions
    name things."""

    def __init__(self):
        from taxoclip.data.wordnet import wordnet

        self.wordnet = wordnet()
        self.known: dict[str, str | None] = {}

    def synset(self, phrase: str) -> str | None:
        if phrase not in self.known:
            synsets = self.wordnet.synsets(phrase, pos="n")  # lemmatises (morphy) first
            noun = bool(synsets) and ("_" in phrase or self.sense_count(phrase, "n") >= self.sense_count(phrase, "a"))
            self.known[phrase] = synsets[0].name() if noun else None
        return self.known[phrase]

    def sense_count(self, word: str, pos: str) -> int:
        """How often WordNet's tagged corpus used ``word`` in this part of speech."""
        lemma = self.wordnet.morphy(word, pos) or word
        synsets = self.wordnet.synsets(word, pos=pos)
        return sum(x.count() for s in synsets for x in s.lemmas() if x.name().lower() == lemma)

    def __call__(self, caption: str) -> list[str]:
        tokens = re.findall(r"[a-z]+", caption.lower())
        labels, i = [], 0
        while i < len(tokens):
            for n in range(min(MAX_PHRASE_WORDS, len(tokens) - i), 0, -1):
                phrase = tokens[i : i + n]
                if n == 1 and (phrase[0] in STOPWORDS or len(phrase[0]) < 2):
                    continue
                name = self.synset("_".join(phrase))
                if name is not None:
                    if name not in BOILERPLATE_SYNSETS:
                        labels.append(name)
                    i += n
                    break
            else:
                i += 1
        return list(dict.fromkeys(labels))


def class_labels(
    classes: ClassTable, captions_by_class: Sequence[dict[str, str]] | None, extractor: str, style: str = "paper"
) -> list[list[str]]:
    """Every class's labels, in class-table order."""
    if extractor == "taxonomy":
        return [taxonomy_labels(row) for row in classes]
    if extractor == "wordnet":
        if not captions_by_class:
            raise TaxoclipError("the wordnet extractor reads captions, and this data has none")
        if style not in captions_by_class[0]:
            raise TaxoclipError(f"unknown caption style {style!r}; the captions have {', '.join(captions_by_class[0])}")
        labeller: Callable[[str], list[str]] = WordNetLabeller()
        return [labeller(entry[style]) for entry in captions_by_class]
    raise TaxoclipError(f"unknown label extractor {extractor!r}; use one of {', '.join(EXTRACTORS)}")


@dataclass
class Vocabulary:
    extractor: str
    style: str
    labels: list[str]
    counts: list[int]  # training images (or classes, for metadata without images) carrying each label
    class_ids: list[str]
    class_labels: list[list[int]]  # per class: indices into labels
    min_count: int = 1
    max_size: int | None = None
    counted: str = "images"
    coverage: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"version": VOCABULARY_VERSION, **asdict(self)}, indent=1, ensure_ascii=False))

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        path = Path(path)
        if not path.exists():
            raise TaxoclipError(f"{path}: no such vocabulary; make one with 'taxoclip labels'")
        try:
            data = json.loads(path.read_text())
            data.pop("version", None)
            return cls(**data)
        except (json.JSONDecodeError, TypeError) as error:
            raise TaxoclipError(f"{path}: not a taxoclip vocabulary ({error})") from None

    def labels_of(self, classes: ClassTable, per_class: list[list[str]]) -> list[list[int]]:
        """Vocabulary indices of each class's labels (labels outside the vocabulary dropped)."""
        index = {label: i for i, label in enumerate(self.labels)}
        return [[index[label] for label in labels if label in index] for labels in per_class]


def build_vocabulary(
    classes: ClassTable,
    per_class: list[list[str]],
    images_per_class: Sequence[int] | None,
    *,
    extractor: str,
    style: str = "paper",
    min_count: int = 1,
    max_size: int | None = None,
) -> Vocabulary:
    """The labels carried by at least ``min_count`` training images, most frequent first (at most
    ``max_size``). Without images (class metadata only), each class counts once."""
    counted = "images" if images_per_class is not None else "classes"
    weights = list(images_per_class) if images_per_class is not None else [1] * len(classes)
    counts: Counter[str] = Counter()
    for labels, n in zip(per_class, weights, strict=True):
        for label in labels:
            counts[label] += int(n)
    kept = sorted((label for label, n in counts.items() if n >= min_count and n > 0), key=lambda x: (-counts[x], x))
    if max_size:
        kept = kept[:max_size]
    if not kept:
        raise TaxoclipError(
            f"no label is carried by {min_count} or more training {counted}: the vocabulary would be empty; "
            "lower --min-count, or check that the classes have taxonomy columns or captions"
        )
    vocabulary = Vocabulary(
        extractor, style, kept, [counts[x] for x in kept], classes.ids, [], min_count, max_size, counted
    )
    vocabulary.class_labels = vocabulary.labels_of(classes, per_class)
    vocabulary.coverage = coverage(vocabulary, classes)
    return vocabulary


def coverage(vocabulary: Vocabulary, classes: ClassTable) -> dict:
    """Which classes the vocabulary covers and how deep; which labels many classes share."""
    without = [classes.ids[c] for c, labels in enumerate(vocabulary.class_labels) if not labels]
    deepest: Counter[str] = Counter()
    for labels in vocabulary.class_labels:
        ranks = [label_rank(vocabulary.labels[i]) for i in labels]
        ranks = [r for r in ranks if r is not None]
        deepest[max(ranks).column if ranks else ("other" if labels else "none")] += 1
    sharing = Counter(i for labels in vocabulary.class_labels for i in labels)
    most_shared = [{"label": vocabulary.labels[i], "classes": n} for i, n in sharing.most_common(10)]
    return {
        "classes": len(classes),
        "labels": len(vocabulary),
        "classes_without_label": len(without),
        "classes_without_label_ids": without[:100],
        "deepest_rank_covered": dict(deepest),
        "mean_labels_per_class": round(sum(map(len, vocabulary.class_labels)) / max(1, len(classes)), 2),
        "most_shared_labels": most_shared,
    }


def label_data(
    path: str | Path, split: str = "train", **source_options
) -> tuple[ClassTable, list[dict], list[int] | None]:
    """(class table, captions per class, training images per class or None) of shards, a feature
    cache or any source."""
    path = Path(path)
    if (path / "manifest.json").exists():  # shards
        from taxoclip.data.shards import read_manifest

        manifest = read_manifest(path)
        classes = ClassTable.from_json(manifest["classes"])
        counts = manifest["splits"].get(split, {}).get("class_counts")
        images = [int(counts.get(class_id, 0)) for class_id in classes.ids] if counts else None
        return classes, (manifest.get("captions") or {}).get("by_class") or [], images
    if (path / "meta.json").exists():  # a feature cache
        import numpy as np

        from taxoclip.data.features import load_features

        cache = load_features(path)
        images = None
        if split in cache.split_names:
            images = np.bincount(cache.labels[cache.split_mask(split)], minlength=len(cache.classes)).tolist()
        return cache.classes, (cache.meta.get("captions") or {}).get("by_class") or [], images
    from taxoclip.data.captions import build_captions
    from taxoclip.data.sources import load_source

    dataset = load_source(path, **source_options)
    index = dataset.classes.index_of()
    images = None
    if any(s.split == split for s in dataset.samples):
        images = [0] * len(dataset.classes)
        for sample in dataset.samples:
            if sample.split == split:
                images[index[sample.class_id]] += 1
    return dataset.classes, build_captions(dataset.classes).by_class, images
