"""Contrastive losses between image embeddings and per-class caption embeddings.

In a species dataset a batch of B images holds U <= B classes, and every image of a class has
that class's caption. `class_contrastive_loss` encodes each distinct caption once and treats all
images of a class as positives for its caption. `clip_loss` is the standard CLIP loss, one caption
per image with duplicates counted as negatives, kept so the difference can be measured.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def class_contrastive_loss(
    image: torch.Tensor, text: torch.Tensor, targets: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """Image embeddings (B, D) and distinct caption embeddings (U, D), both L2-normalised;
    ``targets[i]`` is the row of ``text`` holding image i's caption.

    image -> text: cross-entropy over the U captions (one positive each).
    text -> image: for each caption, the mean log-probability of its images among all B images
    (several positives, none of them pushed apart).
    """
    logits = (logit_scale * image @ text.T).float()  # (B, U); the softmax in float32 under autocast
    image_to_text = F.cross_entropy(logits, targets)
    log_prob = logits.T.log_softmax(dim=1)  # (U, B): each caption's distribution over the images
    positives = F.one_hot(targets, num_classes=text.shape[0]).T.to(log_prob.dtype)  # (U, B)
    text_to_image = -((log_prob * positives).sum(1) / positives.sum(1).clamp(min=1)).mean()
    return (image_to_text + text_to_image) / 2


def clip_loss(image: torch.Tensor, text_per_image: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """The standard CLIP loss: image i's positive is caption i, every other caption a negative
    (even when it is the same class's caption)."""
    logits = (logit_scale * image @ text_per_image.T).float()
    labels = torch.arange(len(image), device=image.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def unique_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(distinct classes in order, each label's position among them)."""
    classes, targets = torch.unique(labels, sorted=True, return_inverse=True)
    return classes, targets


def bucket_size(count: int) -> int:
    """``count`` rounded up to a multiple of an eighth of its power of two (at least 8): 100 -> 104,
    497 -> 512; at most 12.5% more."""
    step = max(8, (1 << (max(count, 1).bit_length() - 1)) // 8)
    return -(-count // step) * step


def bucketed(classes: torch.Tensor) -> torch.Tensor:
    """``classes`` padded to `bucket_size` by repeating the first; the caller keeps only the
    first ``len(classes)`` rows of what it computes from them.

    Why: the distinct captions of a batch change in number every step (490-510 at iNat2021's
    10,000 classes), so every text-tower tensor changed shape every step and glibc's heap
    fragmented: `train lit` at 10,000 classes x 100k rows peaked at 3.1-3.4 GB. With a few
    repeated shapes freed blocks are reused: 2.8 GB, at the same step time (docs/measured.md)."""
    extra = bucket_size(len(classes)) - len(classes)
    return torch.cat([classes, classes[:1].expand(extra)]) if extra and len(classes) else classes
