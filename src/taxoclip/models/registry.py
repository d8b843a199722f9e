"""One name for any model, everywhere (predict, eval, serve, export, Python):

  a model directory        opened by the module registered for the ``kind`` its config.json records
  open_clip:NAME           a pretrained open_clip model (BioCLIP: open_clip:hf-hub:imageomics/bioclip),
                           zero-shot over a class table you give it

Adding a model kind is one module with a ``load(path, config) -> Classifier`` function and one
line in `KINDS`. Loaders are imported on use, so naming a kind costs nothing until it is opened.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path

from taxoclip.errors import TaxoclipError
from taxoclip.models.classifier import Classifier
from taxoclip.taxonomy import ClassTable

OPEN_CLIP_PREFIX = "open_clip:"

# kind recorded in a model directory's config.json -> "module:function" that opens it
KINDS: dict[str, str] = {
    "lit": "taxoclip.models.lit:load_lit",
    "catlip": "taxoclip.models.catlip:load_catlip",
    "finetune": "taxoclip.models.finetune:load_finetune",
}


def load_classifier(
    spec: str | Path,
    *,
    classes: ClassTable | str | Path | None = None,
    captions: Sequence[dict[str, str]] | None = None,
    style: str | None = None,
    scoring: str | None = None,
    pretrained: bool = True,
    cache_dir: Path | None = None,
) -> Classifier:
    """Open ``spec`` (a model directory or ``open_clip:NAME``) as a `Classifier`.

    ``classes`` (a table or a class CSV) and ``captions`` (per class, every caption style) are
    what an open_clip model classifies over; ``style`` picks the caption style or ``templates``;
    ``scoring`` how a label model (catlip) turns label logits into class scores;
    ``pretrained=False`` builds an open_clip architecture with random weights (tests, no network).
    """
    spec = str(spec)
    if spec.startswith(OPEN_CLIP_PREFIX):
        if scoring:
            raise TaxoclipError(f"{spec}: an open_clip model scores classes by caption; leave out --scoring")
        return open_clip_classifier(spec, classes, captions, style, pretrained, cache_dir)
    from taxoclip.models.bundle import read_config

    path = Path(spec)
    config = read_config(path)
    kind = config.get("kind", "lit")
    if kind not in KINDS:
        raise TaxoclipError(
            f"{path}: a model of kind {kind!r}, which this taxoclip cannot open (it knows {', '.join(KINDS)}); "
            "upgrade taxoclip"
        )
    module_name, function = KINDS[kind].split(":")
    try:
        classifier = getattr(importlib.import_module(module_name), function)(path, config)
    except TaxoclipError:
        raise
    except Exception as error:  # a missing, truncated or foreign file where the kind expects its own
        from taxoclip.tensor_files import short

        raise TaxoclipError(
            f"{path}: the {kind} model directory is damaged ({type(error).__name__}: {short(error)}); "
            "copy the whole directory again or retrain"
        ) from None
    for option, value, method, lacking in (
        ("--style", style, "use_style", "caption styles"),
        ("--scoring", scoring, "use_scoring", "label scorings (catlip has)"),
    ):
        if value:
            choose = getattr(classifier, method, None)
            if choose is None:
                raise TaxoclipError(f"{path}: a {kind} model has no {lacking}; leave out {option}")
            choose(value)
    return classifier


def open_clip_classifier(spec, classes, captions, style, pretrained, cache_dir) -> Classifier:
    from taxoclip.data.captions import build_captions
    from taxoclip.models.open_clip_classifier import OpenClipClassifier

    if classes is None:
        raise TaxoclipError(f"{spec} needs the classes to choose among: --classes CSV (one row per class)")
    if not isinstance(classes, ClassTable):
        from taxoclip.data.sources.tables import load_class_csv

        classes = load_class_csv(Path(classes))
    by_class = list(captions) if captions else build_captions(classes).by_class
    return OpenClipClassifier(spec, classes, by_class, style or "paper", pretrained=pretrained, cache_dir=cache_dir)
