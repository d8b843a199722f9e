"""CatLIP on real flowers (EfficientNet-Lite0 embeddings, cached), side by side in one run:

- speed: seconds per epoch of CatLIP (label layer, BCE) against LiT (the contrastive image-text
  trainer: text tower and projections) on the same cached embeddings, photos and batch size;
  interleaved rounds, medians;
- accuracy on valid: CatLIP vs LiT vs the logistic-regression probe;
- species never trained on (20 held out, three seeds): CatLIP's score through shared labels,
  20-way and among all 102 classes, against LiT's;
- few-shot on those 20 species: a linear classifier started from Transfer Init rows, from random
  rows, and the probe, at 1, 2, 4, 8 photos per species.
"""

from __future__ import annotations

import statistics
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from common import benchmark, interleaved_step_seconds
from taxoclip.data.captions import build_captions
from taxoclip.data.features import FeatureCache
from taxoclip.data.paths import find_dataset
from taxoclip.data.shards import ShardOptions, write_shards
from taxoclip.data.sources import load_source
from taxoclip.models import baselines
from taxoclip.models.catlip import transfer_init
from taxoclip.models.extraction import extract_features
from taxoclip.models.registry import load_classifier
from taxoclip.train.catlip import CatLIPConfig, train_catlip
from taxoclip.train.lit import LiTSettings, train_lit
from taxoclip.train.log import load_history

HERE = Path(__file__).resolve().parent
CACHE = HERE / "results" / "cache"  # kept between runs: the shards and the one extraction pass
BATCH, ROUNDS, SEEDS, SHOTS = 512, 3, (0, 1, 2), (1, 2, 4, 8)


def flowers_cache() -> FeatureCache:
    dataset = load_source(find_dataset("flowers102"))
    shards = CACHE / "flowers-shards"
    write_shards(
        dataset, shards, build_captions(dataset.classes, "paper"), ShardOptions(progress=False), overwrite=True
    )  # our own cache folder: rebuilt when the data or the shard format changed
    return extract_features(shards, "efficientnet-lite0", CACHE / "flowers-lite0", progress=False)


def epoch_seconds(train, config) -> float:
    """Median training seconds per epoch of one run (evaluation excluded)."""
    train(config)
    return statistics.median(row["seconds"] for row in load_history(config.output))


@benchmark("catlip")
def bench_catlip(args) -> list[dict]:
    cache = flowers_cache()
    features = str(cache.path)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # --- speed, interleaved ----------------------------------------------------------------
        catlip_base = CatLIPConfig(
            features=features, output="", batch_size=BATCH, epochs=3, eval_every=99, progress=False
        )
        lit_base = LiTSettings(features=features, output="", batch_size=BATCH, epochs=3, eval_every=99, progress=False)
        catlip_s, lit_s = [], []
        for round_ in range(ROUNDS):
            catlip_s.append(epoch_seconds(train_catlip, replace(catlip_base, output=str(tmp / f"c{round_}"))))
            lit_s.append(epoch_seconds(train_lit, replace(lit_base, output=str(tmp / f"l{round_}"))))
        catlip_epoch, lit_epoch = statistics.median(catlip_s), statistics.median(lit_s)
        rows.append({"what": "CatLIP epoch, label layer on cached embeddings (batch 512)", "seconds": catlip_epoch})
        rows.append({"what": "LiT epoch, text tower + projections on the same embeddings", "seconds": lit_epoch})
        rows.append(
            {"what": "speed-up of CatLIP over LiT, head depth (paper: 2.7x)", "ratio": lit_epoch / catlip_epoch}
        )
        rows.extend(upper_depth_speed())
        rows.extend(full_depth_speed(features, tmp))

        # --- accuracy on valid ---------------------------------------------------------------------
        catlip = train_catlip(replace(catlip_base, output=str(tmp / "catlip"), epochs=30, eval_every=1))
        lit = train_lit(replace(lit_base, output=str(tmp / "lit"), epochs=10, eval_every=10))
        train_x, train_y = cache.split("train")
        valid_x, valid_y = cache.split("valid")
        probe = baselines.probe(train_x, train_y, valid_x, len(cache.classes)).argmax(-1).numpy()
        rows.append({"what": "valid top-1, CatLIP (30 epochs)", "top1 %": 100 * catlip["top1"]})
        rows.append({"what": "valid top-1, LiT (10 epochs)", "top1 %": 100 * lit["top1"]})
        rows.append(
            {"what": "valid top-1, logistic-regression probe", "top1 %": 100 * float((probe == valid_y).mean())}
        )

        # --- species never trained on ------------------------------------------------------------
        unseen = {"catlip 20-way": [], "catlip among all": [], "lit 20-way": [], "lit among all": []}
        for seed in SEEDS:
            out = tmp / f"catlip-holdout-{seed}"
            final = train_catlip(
                replace(catlip_base, output=str(out), epochs=30, eval_every=30, holdout=20, holdout_seed=seed)
            )
            unseen["catlip 20-way"].append(final["unseen_top1"])
            unseen["catlip among all"].append(among_all(load_classifier(out), valid_x, valid_y))
            lit_out = tmp / f"lit-holdout-{seed}"
            final = train_lit(
                replace(lit_base, output=str(lit_out), epochs=10, eval_every=10, holdout=20, holdout_seed=seed)
            )
            unseen["lit 20-way"].append(final["unseen_top1"])
            unseen["lit among all"].append(among_all(load_classifier(lit_out), valid_x, valid_y))
        for name, values in unseen.items():
            rows.append(
                {
                    "what": f"20 unseen species, {name} (seeds {', '.join(map(str, SEEDS))}; chance 5% 20-way)",
                    "top1 %": 100 * statistics.mean(values),
                    "spread": f"{100 * min(values):.1f}-{100 * max(values):.1f}",
                }
            )
        rows.extend(few_shot(load_classifier(tmp / "catlip-holdout-0"), cache))
    return rows


def upper_depth_speed(steps: int = 3) -> list[dict]:
    """Seconds per step (batch 512) with the tower's last stage training on cached activations:
    CatLIP's label layer against the contrastive LiT loss (text tower + projections) on the same
    upper stage, interleaved."""
    import copy

    from taxoclip.data.labels import build_vocabulary, class_labels
    from taxoclip.models.catlip import LabelHead
    from taxoclip.models.lit import CaptionBank, LiTConfig, LiTModel
    from taxoclip.models.split import split_tower
    from taxoclip.models.towers import create_image_tower, create_text_tower
    from taxoclip.train.catlip import CatLIPStep

    tower = create_image_tower("efficientnet-lite0")
    lower, upper = split_tower(tower, 1)
    acts = extract_features(CACHE / "flowers-shards", lower, CACHE / "flowers-lite0-lower", progress=False)
    x, y = acts.split("train")
    rows = np.random.default_rng(0).choice(len(y), BATCH, replace=False)
    batch, labels = torch.from_numpy(x[rows]), torch.from_numpy(y[rows].astype(np.int64))
    classes, captions = acts.classes, acts.meta["captions"]["by_class"]
    vocabulary = build_vocabulary(classes, class_labels(classes, None, "taxonomy"), None, extractor="taxonomy")
    targets = torch.zeros(len(classes), len(vocabulary))
    for c, indices in enumerate(vocabulary.class_labels):
        targets[c, indices] = 1.0
    catlip = CatLIPStep(LabelHead(upper.head[0].out_channels, len(vocabulary)), targets, upper).train()
    text = create_text_tower("minilm-l6")
    width = upper.head[0].out_channels
    lit_config = LiTConfig("efficientnet-lite0", "minilm-l6", width, text.width, width, image_projection=True)
    lit = LiTModel(lit_config, text)
    bank = CaptionBank(lit.text_tower, [[entry["paper"] for entry in captions]], torch.device("cpu"))
    contrastive_upper = copy.deepcopy(upper).train()
    styles = torch.zeros(len(classes), dtype=torch.long)

    def contrastive(features, labels):
        return lit(contrastive_upper(features), labels, bank, styles)

    runs = {
        "catlip": (lambda: catlip(batch, labels), list(catlip.parameters())),
        "contrastive": (lambda: contrastive(batch, labels), [*contrastive_upper.parameters(), *lit.parameters()]),
    }
    median = interleaved_step_seconds(runs, steps)
    catlip_step, contrastive_step = median["catlip"], median["contrastive"]
    return [
        {"what": "CatLIP step, last stage + label layer on cached activations", "seconds": catlip_step},
        {"what": "contrastive step, last stage + LiT text side on the same activations", "seconds": contrastive_step},
        {"what": "speed-up of CatLIP, upper depth", "ratio": contrastive_step / catlip_step},
    ]


def full_depth_speed(features: str, tmp: Path, steps: int = 3, batch: int = 64) -> list[dict]:
    """Seconds per step with the whole tower training on photos: CatLIP (label layer, augmented
    photos) against LiT with the tower unlocked (the contrastive loss, text side too). Batch 64:
    backpropagating through EfficientNet-Lite0 keeps every activation, and 512 photos need more
    than this machine's 24 GB."""
    shards = str(CACHE / "flowers-shards")
    catlip = CatLIPConfig(
        output=str(tmp / "full-catlip"),
        depth="full",
        shards=shards,
        batch_size=batch,
        epochs=1,
        max_steps_per_epoch=steps,
        progress=False,
    )
    lit = LiTSettings(
        features=features,
        output=str(tmp / "full-lit"),
        unlock_image=True,
        shards=shards,
        batch_size=batch,
        epochs=1,
        max_steps_per_epoch=steps,
        progress=False,
    )
    train_catlip(catlip)
    train_lit(lit)
    catlip_step = load_history(catlip.output)[-1]["seconds"] / steps
    lit_step = load_history(lit.output)[-1]["seconds"] / steps
    return [
        {"what": f"CatLIP step, whole tower on augmented photos (batch {batch})", "seconds": catlip_step},
        {"what": f"LiT step, whole tower unlocked (contrastive, text side too; batch {batch})", "seconds": lit_step},
        {"what": "speed-up of CatLIP, full depth", "ratio": lit_step / catlip_step},
    ]


def among_all(classifier, valid_x: np.ndarray, valid_y: np.ndarray) -> float:
    """Top-1 over all classes on the valid photos of the held-out classes (the generalised setting)."""
    unseen = np.isin(valid_y, classifier.held_out)
    predicted = classifier.probabilities_from_features(valid_x[unseen]).argmax(-1).numpy()
    return float((predicted == valid_y[unseen]).mean())


def few_shot(classifier, cache: FeatureCache) -> list[dict]:
    """k photos per unseen species: linear classifiers over the 20 of them, 20-way on valid."""
    held_out = np.asarray(classifier.held_out)
    position = {c: i for i, c in enumerate(held_out)}
    head = classifier.label_head
    train_x, train_y = cache.split("train")
    valid_x, valid_y = cache.split("valid")
    keep_train, keep_valid = np.isin(train_y, held_out), np.isin(valid_y, held_out)
    tx, ty = train_x[keep_train], np.array([position[c] for c in train_y[keep_train]])
    vx, vy = valid_x[keep_valid], np.array([position[c] for c in valid_y[keep_valid]])
    prepared_valid = head.prepare(torch.from_numpy(vx)).detach()
    labels = [classifier.vocabulary.class_labels[c] for c in held_out]
    ids = [classifier.classes.ids[c] for c in held_out]
    rows_t, bias_t, _ = transfer_init(
        head.linear.weight.detach(), head.linear.bias.detach(), classifier.vocabulary.labels, labels, ids
    )
    generator = torch.Generator().manual_seed(0)
    random_rows = torch.randn(rows_t.shape, generator=generator) * 0.01
    zero_shot = ((prepared_valid @ rows_t.T + bias_t).argmax(-1).numpy() == vy).mean()
    results = [{"what": "few-shot, 20 unseen species, Transfer Init with 0 photos", "top1 %": 100 * zero_shot}]
    for shots in SHOTS:
        picked = baselines.few_shot_rows(ty, shots)
        x = head.prepare(torch.from_numpy(tx[picked])).detach()
        accuracy = {}
        for name, (weight, bias) in {
            "Transfer Init": (rows_t, bias_t),
            "random init": (random_rows, torch.zeros(len(held_out))),
        }.items():
            probabilities = baselines.fit_linear(x, ty[picked], prepared_valid, weight, bias, epochs=100, lr=1e-2)
            accuracy[name] = float((probabilities.argmax(-1).numpy() == vy).mean())
        probe = baselines.probe(tx[picked], ty[picked], vx, len(held_out)).argmax(-1).numpy()
        accuracy["probe"] = float((probe == vy).mean())
        results.append(
            {"what": f"few-shot, 20 unseen species, {shots} photo(s) each", **{k: 100 * v for k, v in accuracy.items()}}
        )
    return results
