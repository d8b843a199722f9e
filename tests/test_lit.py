import itertools
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import taxoclip
import taxoclip.train.loop as loop_module
from conftest import die_after_checkpoint, one_and_two_processes, tiny_train_config
from taxoclip import TaxoclipError
from taxoclip.models.losses import class_contrastive_loss, clip_loss, unique_targets
from taxoclip.train.lit import train_lit
from taxoclip.train.log import load_history
from taxoclip.train.loop import warmup_cosine
from test_catlip import count_epochs


def test_same_class_images_are_not_negatives():
    """Two images of one class with identical embeddings: the CLIP loss counts the other as a
    negative and cannot reach its floor; the class-aware loss can."""
    torch.manual_seed(0)
    text = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    labels = torch.tensor([0, 0, 1, 2])
    image = text[labels]
    classes, targets = unique_targets(labels)
    assert classes.tolist() == [0, 1, 2] and targets.tolist() == [0, 0, 1, 2]
    scale = torch.tensor(100.0)
    class_loss = class_contrastive_loss(image, text, targets, scale)
    clip = clip_loss(image, text[labels], scale)
    # CLIP's best case here is log(2) on the duplicated pair; the class-aware loss goes to ~log(2)/4 at most.
    assert clip > 0.3 and class_loss < clip / 2


def test_class_loss_decreases_when_images_move_to_their_caption():
    torch.manual_seed(0)
    text = torch.nn.functional.normalize(torch.randn(4, 16), dim=-1)
    labels = torch.tensor([0, 1, 1, 2, 3, 3])
    noisy = torch.nn.functional.normalize(text[labels] + 0.8 * torch.randn(6, 16), dim=-1)
    _, targets = unique_targets(labels)
    far = class_contrastive_loss(noisy, text, targets, torch.tensor(10.0))
    near = class_contrastive_loss(text[labels], text, targets, torch.tensor(10.0))
    assert near < far


def test_warmup_then_cosine():
    values = [warmup_cosine(s, 10, 100) for s in range(100)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert values[10] == pytest.approx(1.0) and values[99] < 0.01
    assert all(a >= b for a, b in itertools.pairwise(values[10:]))  # non-increasing after the warm-up


def config(features, out, text_tower, **overrides):
    return tiny_train_config(features, out, text_tower, **overrides)


def test_training_learns_and_the_model_directory_classifies(colour_features, tiny_text_tower, tmp_path):
    final = train_lit(config(colour_features, tmp_path / "m", tiny_text_tower))
    assert final["top1"] >= 0.9
    for name in (
        "config.json",
        "model.safetensors",
        "classes.csv",
        "captions.json",
        "class_embeddings.npy",
        "metrics.csv",
        "metrics.jsonl",
        "accuracy.png",
        "loss.png",
    ):
        assert (tmp_path / "m" / name).exists(), name
    model = taxoclip.load(tmp_path / "m")
    from taxoclip.data.features import load_features

    cache = load_features(colour_features)
    x, y = cache.split("valid")
    predictions = model.probabilities_from_features(x).argmax(-1).numpy()
    assert (predictions == y).mean() == pytest.approx(final["top1"])
    assert model.classes.ids == ["1", "2", "3", "4", "5", "6"]


def test_killed_and_resumed_run_ends_like_an_uninterrupted_one(colour_features, tiny_text_tower, tmp_path, monkeypatch):
    train_lit(config(colour_features, tmp_path / "clean", tiny_text_tower))
    # killed right after the first epoch's checkpoint
    die_after_checkpoint(
        monkeypatch, 1, lambda: train_lit(config(colour_features, tmp_path / "resumed", tiny_text_tower))
    )
    epochs_run = count_epochs(monkeypatch)
    train_lit(config(colour_features, tmp_path / "resumed", tiny_text_tower))
    assert epochs_run == [2, 3]  # it went on from the checkpoint, not from scratch

    clean = load_file(str(tmp_path / "clean" / "model.safetensors"))
    resumed = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert clean.keys() == resumed.keys()
    for key in clean:
        assert torch.equal(clean[key], resumed[key]), key
    read = lambda p: [line.split(",")[1:2] + line.split(",")[4:] for line in p.read_text().splitlines()]  # noqa: E731
    assert read(tmp_path / "clean" / "metrics.csv") == read(tmp_path / "resumed" / "metrics.csv")


def test_resuming_with_other_settings_is_refused(colour_features, tiny_text_tower, tmp_path):
    train_lit(config(colour_features, tmp_path / "m", tiny_text_tower, epochs=1))
    with pytest.raises(TaxoclipError, match="other settings"):
        train_lit(config(colour_features, tmp_path / "m", tiny_text_tower, epochs=1, lr=0.5))


def test_holdout_reports_unseen_classes_and_clip_loss_runs(colour_features, tiny_text_tower, tmp_path):
    final = train_lit(config(colour_features, tmp_path / "m", tiny_text_tower, holdout=2, loss="clip", epochs=2))
    assert {"seen_top1", "unseen_top1", "unseen_count"} <= final.keys()
    assert final["unseen_count"] == 10  # 2 held-out classes x 5 valid photos


def test_caption_styles_sampled_and_text_layers(colour_features, tiny_text_tower, tmp_path):
    final = train_lit(
        config(
            colour_features,
            tmp_path / "m",
            tiny_text_tower,
            styles=["paper", "scientific"],
            text_layers=None,
            image_projection=True,
            embed_dim=16,
            projection_init="random",
            epochs=4,
        )
    )
    assert final["top1"] > 1 / 6


def test_image_in_loop_matches_the_cached_path(colour_features, colour_shards, tiny_text_tower, tmp_path):
    cached = train_lit(config(colour_features, tmp_path / "a", tiny_text_tower, epochs=2))
    in_loop = train_lit(
        config(
            colour_features, tmp_path / "b", tiny_text_tower, epochs=2, image_in_loop=True, shards=str(colour_shards)
        )
    )
    assert in_loop["top1"] >= cached["top1"] - 0.1


def test_unlocked_image_tower_trains_and_is_saved(colour_features, colour_shards, tiny_text_tower, tmp_path):
    final = train_lit(
        config(colour_features, tmp_path / "m", tiny_text_tower, epochs=1, unlock_image=True, shards=str(colour_shards))
    )
    assert "top1" in final and (tmp_path / "m" / "image_tower.safetensors").exists()


def test_two_processes_under_torchrun_match_one(colour_features, tiny_text_tower, tmp_path):
    arguments = [
        "train",
        "lit",
        "--features",
        str(colour_features),
        "--text-tower",
        tiny_text_tower,
        "--batch-size",
        "32",
        "--epochs",
        "2",
        "--warmup",
        "2",
        "--lr",
        "3e-3",
        "--text-lr",
        "1e-3",
        "-q",
    ]
    double = one_and_two_processes(
        arguments,
        tmp_path,
    )
    # One process group of two: each rank trained on its half of every global batch of 32
    # (96 train photos: 3 steps of 16 per rank per epoch) ...
    history = load_history(tmp_path / "two")
    assert [row["samples_by_rank"] for row in history] == [[48, 48], [48, 48]]
    assert [row["samples_by_rank"] for row in load_history(tmp_path / "one")] == [[96], [96]]
    assert json.loads((tmp_path / "two" / "config.json").read_text())["training"]["world_size"] == 2
    # ... only rank 0 reported and wrote ...
    assert double.stdout.count("model, metrics.csv and plots in") == 1
    # ... and the global loss over gathered embeddings with averaged gradients gives the weights
    # one process gets on the same global batches.
    one = load_file(str(tmp_path / "one" / "model.safetensors"))
    two = load_file(str(tmp_path / "two" / "model.safetensors"))
    for key in one:
        assert torch.allclose(one[key], two[key], atol=1e-4, rtol=1e-3), key
    assert np.isclose(float(one["logit_scale"]), float(two["logit_scale"]))


def test_warmup_sweep_writes_one_table_and_plot(colour_features, tiny_text_tower, tmp_path):
    from taxoclip.train.sweep import default_warmups, warmup_sweep

    base = config(colour_features, tmp_path / "sweep", tiny_text_tower, epochs=2)
    assert default_warmups(base) == [1, 3, 6]  # 96 train photos / batch 32 = 3 steps per epoch
    table = warmup_sweep(base, [1, 4])
    assert "| 1 |" in table and "| 4 |" in table
    for name in ("sweep.png", "sweep.md", "sweep.csv", "sweep.json", "warmup-1/metrics.csv", "warmup-4/config.json"):
        assert (tmp_path / "sweep" / name).exists(), name


def test_a_model_trained_on_a_random_weight_tower_predicts_from_photos(
    colour_features, colour_shards, tiny_text_tower, tmp_path
):
    """The model records that its image tower had random weights, so it rebuilds the same tower
    (no download) and classifies photos as it classified their cached embeddings."""
    from taxoclip.data.features import load_features
    from taxoclip.data.images import decode_image
    from taxoclip.data.shards import iter_tar_samples

    train_lit(config(colour_features, tmp_path / "m", tiny_text_tower))
    model = taxoclip.load(tmp_path / "m")
    assert model.image_pretrained is False
    samples = [s for tar in sorted(colour_shards.glob("valid-*.tar")) for s in iter_tar_samples(tar)][:6]
    predictions = taxoclip.predict(model, [decode_image(s["jpg"]) for s in samples])
    cache = load_features(colour_features)
    rows = [cache.row_of()[s["__key__"].decode()] for s in samples]
    from_cache = model.probabilities_from_features(np.asarray(cache.features[rows], np.float32)).argmax(-1)
    assert [p.top[0]["id"] for p in predictions] == [model.classes.ids[i] for i in from_cache.tolist()]


def test_unlocked_image_tower_is_checkpointed_and_resumes_exactly(
    colour_features, colour_shards, tiny_text_tower, tmp_path, monkeypatch
):
    settings = dict(epochs=2, unlock_image=True, shards=str(colour_shards))
    train_lit(config(colour_features, tmp_path / "clean", tiny_text_tower, **settings))
    original = loop_module.save_checkpoint

    def save_then_die(*args, **kwargs):
        original(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(loop_module, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_lit(config(colour_features, tmp_path / "resumed", tiny_text_tower, **settings))
    checkpoint = load_file(str(tmp_path / "resumed" / "checkpoint" / "model.safetensors"))
    assert any(key.startswith("image.") for key in checkpoint)
    monkeypatch.setattr(loop_module, "save_checkpoint", original)
    epochs_run = count_epochs(monkeypatch)
    train_lit(config(colour_features, tmp_path / "resumed", tiny_text_tower, **settings))
    assert epochs_run == [2]
    for name in ("image_tower.safetensors", "model.safetensors"):
        clean = load_file(str(tmp_path / "clean" / name))
        resumed = load_file(str(tmp_path / "resumed" / name))
        for key in clean:
            assert torch.allclose(clean[key], resumed[key], atol=1e-6), (name, key)


def test_eval_every_spaces_out_evaluation_but_always_scores_the_last_epoch(colour_features, tiny_text_tower, tmp_path):

    train_lit(config(colour_features, tmp_path / "m", tiny_text_tower, epochs=3, eval_every=2))
    history = load_history(tmp_path / "m")
    assert ["top1" in row for row in history] == [False, True, True]
    assert (tmp_path / "m" / "accuracy.png").exists() and (tmp_path / "m" / "metrics.csv").exists()


def test_hierarchy_aware_targets_add_each_rank_to_the_loss_and_to_the_class_embeddings(
    colour_features, tiny_text_tower, tmp_path
):
    """--rank-weight w: the loss gains w x (the genus and the family contrastive terms), and each
    class's embedding is its species caption's plus w x its genus and family captions'; the saved
    classifier, the model re-embedding another style, and training's own evaluation agree."""
    from taxoclip.models.lit import CaptionBank, RankBank, RankCaptions, rank_caption
    from taxoclip.models.registry import load_classifier

    train_lit(config(colour_features, tmp_path / "m", tiny_text_tower, rank_weight=0.5, holdout=2, epochs=2))
    classifier = load_classifier(tmp_path / "m")
    model, rows = classifier.model, list(classifier.classes.rows)
    by_class = json.loads((tmp_path / "m" / "captions.json").read_text())["by_class"]
    species = model.encode_captions([entry["paper"] for entry in by_class])
    genus = model.encode_captions([rank_caption("genus", row["genus"]) for row in rows])
    family = model.encode_captions([rank_caption("family", row["family"]) for row in rows])
    expected = species + 0.5 * (genus + family)  # the colour table has no order
    assert torch.allclose(classifier.class_embeddings, expected, atol=1e-5)
    classifier.use_style("paper")  # embedded again from the captions: composed the same way
    assert torch.allclose(classifier.class_embeddings, expected, atol=1e-5)

    ranks = RankCaptions(rows)
    assert ranks.ranks == ("genus", "family", "order") and ranks.captions[2] == []
    bank = CaptionBank(model.text_tower, [[entry["paper"] for entry in by_class]], torch.device("cpu"))
    rank_bank = RankBank(model.text_tower, ranks, torch.device("cpu"))
    torch.manual_seed(0)
    features = torch.randn(12, model.config.image_width)
    labels = torch.tensor([0, 0, 1, 2, 3, 3, 4, 5, 5, 2, 4, 1]) % len(rows)
    styles = torch.zeros(len(rows), dtype=torch.long)
    with torch.no_grad():
        plain = model(features, labels, bank, styles)
        with_ranks = model(features, labels, bank, styles, ranks=rank_bank, rank_weight=0.5)
        image = model.encode_image_features(features)
        terms = []
        for r in range(2):  # genus, family
            values, targets = unique_targets(ranks.of_class[r][labels])
            text = model.encode_captions([ranks.captions[r][v] for v in values])
            terms.append(class_contrastive_loss(image, text, targets, model.scale()))
    assert float(with_ranks - plain) == pytest.approx(0.5 * float(sum(terms)), rel=1e-4)
    assert all(t > 0 for t in terms)


def test_the_ridge_from_the_caption_bank_equals_the_ridge_through_the_whole_tower(tiny_text_tower):
    """The ridge start reuses the bank's frozen prefix (the frozen blocks run once, not twice at
    10,000 classes): the projection it fits is the one the whole tower's caption embeddings give."""
    from taxoclip.models.lit import CaptionBank, LiTConfig, LiTModel, ridge_text_projection
    from taxoclip.models.towers import create_text_tower

    tower = create_text_tower(tiny_text_tower)
    model = LiTModel(
        LiTConfig(image_tower="x", text_tower=tiny_text_tower, image_width=16, text_width=tower.width, embed_dim=16),
        tower,
        image_mean=torch.zeros(16),
    )
    assert model.text_tower.frozen_blocks > 0  # the bank holds hidden states, not tokens
    captions = [f"a photo of species number {i}" + " with a long name" * (i % 4) for i in range(300)]
    bank = CaptionBank(model.text_tower, [captions], torch.device("cpu"), batch_size=64)
    assert bank.prefix["hidden"].shape[0] == 300
    torch.manual_seed(0)
    means, has_class = torch.randn(300, 16), torch.rand(300) > 0.2
    with torch.no_grad():  # the reference: every caption through the whole tower, then the ridge
        t = model.text_tower.eval()(model.text_tower.tokenize(captions))[has_class]
        target = torch.nn.functional.normalize(means[has_class], dim=-1)
        gram = t.T @ t + 1e-2 * len(t) * torch.eye(t.shape[1])
        whole = torch.linalg.solve(gram, t.T @ target).T
    ridge_text_projection(model, bank, means, has_class, batch_size=128)
    assert torch.allclose(model.text_projection.weight, whole, atol=1e-4)


def test_the_last_evaluation_and_the_saved_model_share_one_encoding_of_the_captions(
    colour_features, tiny_text_tower, tmp_path, monkeypatch
):
    """At 10,000 classes each pass over the captions costs minutes: the last epoch's evaluation
    and the saved classifier use one, and a changed weight makes the next one encode again."""
    import taxoclip.train.lit as lit_module
    from taxoclip.models.registry import load_classifier

    calls = []
    real = lit_module.class_embeddings_of
    monkeypatch.setattr(lit_module, "class_embeddings_of", lambda *a, **k: calls.append(1) or real(*a, **k))
    train_lit(config(colour_features, tmp_path / "m", tiny_text_tower, epochs=2))
    assert len(calls) == 2  # one per evaluation; saving re-used the last
    classifier = load_classifier(tmp_path / "m")
    by_class = json.loads((tmp_path / "m" / "captions.json").read_text())["by_class"]
    fresh = classifier.model.encode_captions([entry["paper"] for entry in by_class])
    assert torch.allclose(classifier.class_embeddings, fresh, atol=1e-5)

    model = classifier.model
    before = lit_module.weights_fingerprint(model)
    assert lit_module.weights_fingerprint(model) == before
    with torch.no_grad():
        next(model.text_tower.parameters()).view(-1)[0] += 1e-3
    assert lit_module.weights_fingerprint(model) != before
    with torch.no_grad():
        model.logit_scale += 1  # a 0-d weight counts too
    assert lit_module.weights_fingerprint(model) != before


def test_a_step_pads_its_distinct_captions_to_a_few_shapes_and_the_loss_ignores_the_padding(tiny_text_tower):
    """The text tower sees a bucketed number of captions (a few repeated shapes: glibc's heap
    stops fragmenting at 10,000 classes), and the loss is the one of the distinct captions alone."""
    from taxoclip.models.lit import CaptionBank, LiTConfig, LiTModel
    from taxoclip.models.losses import bucket_size
    from taxoclip.models.towers import create_text_tower

    assert [bucket_size(n) for n in (5, 9, 100, 497, 513)] == [8, 16, 104, 512, 576]
    tower = create_text_tower(tiny_text_tower)
    model = LiTModel(
        LiTConfig(image_tower="x", text_tower=tiny_text_tower, image_width=16, text_width=tower.width, embed_dim=16),
        tower,
        image_mean=torch.zeros(16),
    )
    bank = CaptionBank(model.text_tower, [[f"a photo of species number {i}" for i in range(40)]], torch.device("cpu"))
    seen = []
    encode = model.encode_text_prefix
    model.encode_text_prefix = lambda prefix: seen.append(len(next(iter(prefix.values())))) or encode(prefix)
    torch.manual_seed(0)
    styles = torch.zeros(40, dtype=torch.long)
    for distinct in (9, 13, 17):
        labels = torch.arange(distinct).repeat(2)
        features = torch.randn(len(labels), 16)
        with torch.no_grad():
            loss = model(features, labels, bank, styles)
            classes, targets = unique_targets(labels)
            alone = class_contrastive_loss(
                model.encode_image_features(features),
                encode(bank.select(classes, styles[classes])),
                targets,
                model.scale(),
            )
        assert float(loss) == pytest.approx(float(alone), rel=1e-5)
    assert seen == [16, 16, 24]  # 9 and 13 distinct captions share one shape, 17 the next


def test_the_weights_fingerprint_hashes_each_tensor_where_it_lies():
    """The end-of-epoch check of whether the weights changed reads them in place: copying each to
    bytes added the text tower's largest table (100 MB) to LiT's peak at 10,000 classes."""
    import hashlib
    import tracemalloc

    from taxoclip.train import lit as lit_module

    module = torch.nn.Linear(2048, 4096)  # a 32 MB weight
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in module.state_dict().items():  # the hash of the bytes, as it always was
        digest.update(name.encode())
        digest.update(tensor.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    tracemalloc.start()
    fingerprint = lit_module.weights_fingerprint(module)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert fingerprint == digest.hexdigest()
    assert peak < 2**20, f"fingerprinting peaked at {peak / 2**20:.1f} MB of copies"
