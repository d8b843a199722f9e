"""CatLIP's settings: the library's defaults, which the command line shows (no torch to import)."""

from __future__ import annotations

from dataclasses import dataclass

from taxoclip.data.captions import STYLE_NAMES
from taxoclip.data.labels import EXTRACTORS, SCORINGS
from taxoclip.errors import TaxoclipError
from taxoclip.flag_types import POSITIVE
from taxoclip.train.depth_config import DEPTHS, DepthSettings
from taxoclip.train.settings import LoopSettings, option, redefault

__all__ = ["DEPTHS", "SCORINGS", "CatLIPConfig"]


@dataclass(kw_only=True)
class CatLIPConfig(DepthSettings):
    """CatLIP's own settings; the depth and the data come from `DepthSettings`."""

    vocabulary: str | None = option(
        None, "--vocabulary", help="vocabulary.json from 'taxoclip labels' (default: built from the features)"
    )
    extractor: str = option(
        "taxonomy", "--extractor", help="labels from the taxonomy or from captions' WordNet nouns", choices=EXTRACTORS
    )
    style: str = option("paper", "--style", help="caption style the wordnet extractor reads", choices=STYLE_NAMES)
    min_count: int = option(
        1, "--min-count", help="drop labels carried by fewer training photos (V_tau)", type=POSITIVE
    )
    max_size: int | None = option(
        None, "--max-size", help="keep at most this many labels, the most frequent", type=POSITIVE
    )
    batch_size: int = redefault(LoopSettings, "batch_size", 512)
    epochs: int = redefault(LoopSettings, "epochs", 30)
    lr: float = redefault(LoopSettings, "lr", 3e-3)
    grad_clip: float = redefault(LoopSettings, "grad_clip", 5.0)
    scoring: str = option(
        "likelihood",
        "--scoring",
        help="class scores from label logits: likelihood (their sum), standardised (that sum on one scale for "
        "every class, from the training photos' spread) or transfer (their mean)",
        choices=SCORINGS,
    )

    def check(self) -> None:
        if self.extractor not in EXTRACTORS:
            raise TaxoclipError(f"unknown label extractor {self.extractor!r}; use one of {', '.join(EXTRACTORS)}")
        if self.scoring not in SCORINGS:
            raise TaxoclipError(f"unknown scoring {self.scoring!r}; use one of {', '.join(SCORINGS)}")
        self.check_depth()


def summary(final: dict, settings: CatLIPConfig) -> list[str]:
    """What `taxoclip train catlip` prints when done."""
    lines = []
    if "top1" in final:
        lines.append(f"final on valid: top-1 {100 * final['top1']:.1f}%, top-5 {100 * final['top5']:.1f}%")
    if "unseen_top1" in final:
        lines.append(f"held-out classes among themselves: top-1 {100 * final['unseen_top1']:.1f}%")
    return [*lines, f"model in {settings.output} (kind catlip: predict, eval, serve and export open it)"]
