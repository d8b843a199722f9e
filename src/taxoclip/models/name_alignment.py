"""Stage 1 by name alignment: the projector's K image tokens regressed onto the language model's own
input embeddings of the photo's class line, so the frozen language model reads a photo's tokens as
(nearly) the words that name it.

The class line, one fixed format (the identifier line's names, without probabilities):

  Oenothera speciosa (pink primrose); genus Oenothera; family Onagraceae; order Myrtales; class Magnoliopsida

Token position t of the projector's output learns the embedding of the line's t-th token (positions
past the line's end: a newline's, a filler the language model reads as nothing; SmolLM2's pad token
is its end of turn), by mean squared error. No language-model pass is
needed, forward or backward: a pass over flowers' 6,500 training photos takes seconds, where LLaVA's
caption stage (`--stage captions`, the language model's loss on each photo's caption) took 54 min for
a fifth of a pass and left the language model unable to read the photo (docs/questions.md).

Measured by the nearest vocabulary token (cosine) at each position of valid photos: the share of
tokens that decode to their line, and of photos whose whole line does.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from taxoclip.models.grounding import RANKS, species_label
from taxoclip.taxonomy import ClassTable

VOCABULARY_CHUNK = 8192  # vocabulary rows compared at a time when decoding tokens
CLASS_CHUNK = 512  # class lines compared at a time (10,000 lines x 40 tokens x 576 floats is 0.9 GB)


def class_line(row: dict) -> str:
    """A class's names in one line: species (common name); genus …; family …; order …; class …
    (the identifier line's names and ranks, without its probabilities)."""
    return "; ".join([species_label(row), *(f"{rank} {row[rank]}" for rank in RANKS if row.get(rank))])


def filler_id(tokenizer) -> int:
    return tokenizer("\n", add_special_tokens=False).input_ids[-1]


def name_token_ids(tokenizer, classes: ClassTable, tokens: int) -> tuple[np.ndarray, int]:
    """(each class's line as ``tokens`` token ids, filled out with newlines; the longest line's
    token count, so a caller can say when ``tokens`` cuts lines short)."""
    ids = np.full((len(classes), tokens), filler_id(tokenizer), dtype=np.int64)
    longest = 0
    for c, row in enumerate(classes.rows):
        line = tokenizer(class_line(row), add_special_tokens=False).input_ids
        longest = max(longest, len(line))
        ids[c, : min(len(line), tokens)] = line[:tokens]
    return ids, longest


def alignment_loss(projected: torch.Tensor, embeddings: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the projected tokens (B, K, hidden) and the language model's input
    embeddings (vocabulary, hidden) of the target ids (B, K)."""
    return F.mse_loss(projected.float(), embeddings[ids].float())


@torch.no_grad()
def nearest_tokens(projected: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
    """The vocabulary token nearest (cosine) to each projected token: (B, K) ids, the vocabulary
    compared a chunk at a time (49,152 x 576 for SmolLM2)."""
    flat = F.normalize(projected.float().reshape(-1, projected.shape[-1]), dim=-1)
    best = torch.full((len(flat),), -2.0)
    best_ids = torch.zeros(len(flat), dtype=torch.long)
    for start in range(0, len(embeddings), VOCABULARY_CHUNK):
        chunk = F.normalize(embeddings[start : start + VOCABULARY_CHUNK].float(), dim=-1)
        scores, where = (flat @ chunk.T).max(1)
        better = scores > best
        best[better], best_ids[better] = scores[better], where[better] + start
    return best_ids.view(projected.shape[:2])


def tokens_right(
    projected: torch.Tensor, embeddings: torch.Tensor, ids: torch.Tensor, filler: int
) -> tuple[float, float]:
    """(share of the lines' tokens decoding to their target, share of photos whose whole line
    does); the filler after each line is not counted."""
    right = nearest_tokens(projected, embeddings) == ids
    line = ids != filler
    return float(right[line].float().mean()), float((right | ~line).all(1).float().mean())


@torch.no_grad()
def nearest_lines(projected: torch.Tensor, embeddings: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
    """The class whose line's embeddings (``class_ids``: classes x K) lie nearest (squared distance)
    to each photo's projected tokens: what the projector's tokens name, as a classifier, the
    class lines gathered a chunk at a time."""
    flat = projected.float().reshape(len(projected), -1)
    best = torch.full((len(flat),), float("inf"))
    best_class = torch.zeros(len(flat), dtype=torch.long)
    for start in range(0, len(class_ids), CLASS_CHUNK):
        lines = embeddings[class_ids[start : start + CLASS_CHUNK]].float().reshape(-1, flat.shape[1])
        distance = (lines * lines).sum(1) - 2 * flat @ lines.T  # + |flat|^2, the same for every line
        scores, where = distance.min(1)
        better = scores < best
        best[better], best_class[better] = scores[better], where[better] + start
    return best_class
