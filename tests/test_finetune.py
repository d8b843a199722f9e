"""Supervised fine-tuning: the re-balancing samplers, the shared loop's accumulation, weight
average and early stopping, exact resume, the three depths, the finetune model kind through
predict/eval/export, and clear messages for bad input."""

import csv
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import taxoclip
from conftest import die_after_checkpoint, one_and_two_processes
from taxoclip.apps.cli import main
from taxoclip.data.features import load_features
from taxoclip.errors import TaxoclipError
from taxoclip.train.finetune import FinetuneConfig, FinetuneTrainer, soft_cross_entropy, train_finetune
from taxoclip.train.sampling import balanced_rows, class_weights, repeat_factors, repeats
from taxoclip.train.selection import SelectionSplit


def test_balanced_rows_over_and_under_sample_every_class_to_n():
    labels = np.repeat([0, 1, 2], [3, 10, 50])
    rows = np.arange(len(labels)) + 1000
    order = balanced_rows(rows, labels, 20, np.random.default_rng(0))
    drawn = labels[order - 1000]
    assert np.bincount(drawn).tolist() == [20, 20, 20]
    small = np.unique(order[drawn == 0], return_counts=True)[1]
    assert sorted(small.tolist()) == [6, 7, 7]  # 20 = 6 whole copies of 3 photos + 2 more, never 8 of one
    assert len(np.unique(order[drawn == 2])) == 20  # under-sampled: 20 distinct photos of 50
    assert np.unique(order[drawn == 1], return_counts=True)[1].tolist() == [2] * 10
    assert np.array_equal(order, balanced_rows(rows, labels, 20, np.random.default_rng(0)))  # seeded
    assert not np.array_equal(order, balanced_rows(rows, labels, 20, np.random.default_rng(1)))


def test_streamed_repeats_give_n_per_class_in_expectation_and_lose_nothing():
    from taxoclip.train.depths import repeated

    factors = repeat_factors(np.array([4, 40, 0]), 10)
    assert factors.tolist() == [2.5, 0.25, 0.0]
    generator = torch.Generator().manual_seed(0)
    labels = torch.tensor([0] * 4 + [1] * 40).repeat(200)
    counts = torch.bincount(labels.repeat_interleave(repeats(labels, factors, generator)), minlength=3) / 200
    assert counts[:2].tolist() == pytest.approx([10, 10], rel=0.05) and counts[2] == 0
    # Pooled into batches of 8: every repeated photo comes out once, batches are full but the last.
    stream = [
        (torch.arange(i, i + 5).view(5, 1, 1, 1).expand(5, 3, 2, 2), torch.zeros(5, dtype=torch.long))
        for i in range(0, 50, 5)
    ]

    def twice(labels, generator):
        return torch.full_like(labels, 2)

    batches = list(repeated(iter(stream), twice, 8, torch.Generator().manual_seed(0)))
    assert all(len(b[1]) == 8 for b in batches)
    seen = torch.cat([b[0][:, 0, 0, 0] for b in batches])
    assert len(seen) == 96 and torch.bincount(seen).max() == 2  # 100 copies: 96 in full batches, 4 left over


def test_class_weights_are_inverse_to_size_and_average_one_per_photo():
    counts = np.array([10, 30, 0])
    weights = class_weights(counts)
    assert weights[0] / weights[1] == pytest.approx(3) and weights[2] == 0
    assert float((weights[:2] * torch.tensor([10.0, 30.0])).sum() / 40) == pytest.approx(1)
    logits, labels = torch.randn(6, 3), torch.tensor([0, 0, 1, 1, 1, 1])
    hard = torch.nn.functional.one_hot(labels, 3).float()
    assert soft_cross_entropy(logits, hard, None) == pytest.approx(
        float(torch.nn.functional.cross_entropy(logits, labels))
    )
    assert soft_cross_entropy(logits, hard, weights) == pytest.approx(
        float(torch.nn.functional.cross_entropy(logits, labels, weight=weights)), rel=1e-5
    )


def test_selection_split_is_a_stable_share_of_keys():
    keys = [f"train-{i:07d}" for i in range(4000)]
    chosen = SelectionSplit(0.1, seed=3)
    inside = [k for k in keys if chosen(k)]
    assert 330 < len(inside) < 470
    assert not any(chosen.complement()(k) for k in inside)  # the complement trains: disjoint
    assert inside == [k for k in keys if SelectionSplit(0.1, seed=3)(k)]
    assert inside != [k for k in keys if SelectionSplit(0.1, seed=4)(k)]


def settings(features, out, **overrides) -> FinetuneConfig:
    values = dict(features=str(features), output=str(out), batch_size=16, epochs=6, lr=1e-2, select_fraction=0.25)
    return FinetuneConfig(**values | dict(warmup_steps=2, progress=False) | overrides)


def test_finetune_learns_and_its_model_serves_predict_eval_and_export(colour_features, colour_shards, tmp_path, capsys):
    final = train_finetune(settings(colour_features, tmp_path / "m", head="mlp", hidden=32))
    assert final["top1"] >= 0.9 and "select_top1" in final and "balanced" in final
    model = taxoclip.load(tmp_path / "m")
    assert model.kind == "finetune" and model.classes.ids == ["1", "2", "3", "4", "5", "6"]
    x, y = load_features(colour_features).split("valid")
    assert (model.probabilities_from_features(x).argmax(-1).numpy() == y).mean() == pytest.approx(final["top1"])
    # The selection photos came out of train and never trained: what the run counted excludes them.
    cache = load_features(colour_features)
    train_keys = [k for k, s in zip(cache.keys, cache.split_codes, strict=True) if cache.split_names[s] == "train"]
    selected = [k for k in train_keys if SelectionSplit(0.25)(k)]
    assert sum(model.training["images_per_class"]) == len(train_keys) - len(selected) and selected
    photo = tmp_path / "photo.jpg"
    from taxoclip.data.shards import iter_tar_samples

    photo.write_bytes(next(iter_tar_samples(sorted(colour_shards.glob("valid-*.tar"))[0]))["jpg"])
    assert main(["predict", str(photo), "--model", str(tmp_path / "m"), "--format", "json", "-q"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["top"]
    report = tmp_path / "r"
    assert main(["eval", "--model", str(tmp_path / "m"), "--data", str(colour_features), "-o", str(report), "-q"]) == 0
    assert json.loads((report / "metrics.json").read_text())["metrics"]["top1"] == pytest.approx(final["top1"])
    pytest.importorskip("onnxruntime")
    assert main(["export", "onnx", "--model", str(tmp_path / "m"), "-o", str(tmp_path / "m.onnx")]) == 0
    assert main(["predict", str(photo), "--onnx", str(tmp_path / "m.onnx"), "--model", str(tmp_path / "m"), "-q"]) == 0


def test_balance_draws_n_photos_of_every_class_each_epoch(colour_features, tmp_path):
    train_finetune(settings(colour_features, tmp_path / "m", balance=12, batch_size=24, epochs=2))
    rows = [json.loads(line) for line in (tmp_path / "m" / "metrics.jsonl").read_text().splitlines()]
    with open(tmp_path / "m" / "sampling.csv") as handle:
        table = list(csv.DictReader(handle))
    have = np.array([int(r["training_images"]) for r in table])
    assert [int(r["drawn_last_epoch"]) for r in table] == [12] * 6  # 6 x 12 = 72 = 3 batches of 24
    assert rows[-1]["balance_drawn_min"] == rows[-1]["balance_drawn_max"] == 12
    assert rows[-1]["balance_oversampled"] == int((have < 12).sum())
    assert rows[-1]["balance_undersampled"] == int((have > 12).sum())
    assert rows[-1]["balance_oversampled"] and rows[-1]["balance_undersampled"]  # this split needs both
    assert all(r["samples"] == 72 for r in rows)


def test_gradient_accumulation_matches_one_bigger_batch(colour_features, tmp_path):
    big = train_finetune(settings(colour_features, tmp_path / "big", batch_size=32, epochs=2, grad_clip=None))
    small = train_finetune(
        settings(colour_features, tmp_path / "acc", batch_size=16, accumulate=2, epochs=2, grad_clip=None)
    )
    assert big["top1"] == pytest.approx(small["top1"])
    one, two = (load_file(str(tmp_path / name / "head.safetensors")) for name in ("big", "acc"))
    for key in one:
        assert torch.allclose(one[key], two[key], atol=1e-5), key


def test_early_stopping_keeps_the_best_selection_epoch(colour_features, tmp_path, monkeypatch):
    scripted = iter([0.5, 0.8, 0.7, 0.6, 0.9, 0.9])
    kept = {}
    original = FinetuneTrainer.evaluate

    def scripted_evaluate(self, epoch):
        metrics = original(self, epoch) | {"select_top1": next(scripted)}
        kept[epoch + 1] = {k: v.clone() for k, v in self.head.state_dict().items()}
        return metrics

    monkeypatch.setattr(FinetuneTrainer, "evaluate", scripted_evaluate)
    train_finetune(settings(colour_features, tmp_path / "m", patience=2, epochs=6))
    rows = [json.loads(line) for line in (tmp_path / "m" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4] and rows[-1]["stopped_early"]
    saved = load_file(str(tmp_path / "m" / "head.safetensors"))
    for key, value in kept[2].items():
        if key != "temperature":
            assert torch.equal(saved[key], value), key  # epoch 2's weights, not epoch 4's


def test_killed_and_resumed_run_with_average_balance_and_patience_ends_like_an_uninterrupted_one(
    colour_features, tmp_path, monkeypatch
):
    for name, options in {
        "average": dict(epochs=4, ema=0.9, balance=12, head="mlp", hidden=16),
        "patience": dict(epochs=4, patience=1, lr=0.1),
    }.items():
        rows = kill_after_epoch_two_and_resume(colour_features, tmp_path / name, monkeypatch, options)
        assert bool(rows[-1].get("stopped_early")) == (name == "patience")  # it stopped at 2, then stayed stopped


def kill_after_epoch_two_and_resume(colour_features, tmp_path, monkeypatch, options):
    train_finetune(settings(colour_features, tmp_path / "clean", **options))
    die_after_checkpoint(
        monkeypatch, 2, lambda: train_finetune(settings(colour_features, tmp_path / "resumed", **options))
    )
    train_finetune(settings(colour_features, tmp_path / "resumed", **options))
    clean = load_file(str(tmp_path / "clean" / "head.safetensors"))
    resumed = load_file(str(tmp_path / "resumed" / "head.safetensors"))
    for key in clean:
        assert torch.equal(clean[key], resumed[key]), key
    rows = {
        name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        for name in ("clean", "resumed")
    }
    assert [(r["epoch"], r["top1"], r.get("stopped_early")) for r in rows["resumed"]] == [
        (r["epoch"], r["top1"], r.get("stopped_early")) for r in rows["clean"]
    ]
    return rows["resumed"]


def test_weight_average_is_what_evaluates_and_saves(colour_features, tmp_path):
    train_finetune(settings(colour_features, tmp_path / "raw", epochs=3))
    train_finetune(settings(colour_features, tmp_path / "avg", epochs=3, ema=0.9))
    raw, averaged = (load_file(str(tmp_path / n / "head.safetensors")) for n in ("raw", "avg"))
    assert not torch.allclose(raw["layers.0.weight"], averaged["layers.0.weight"])  # same run, averaged weights


def tower_settings(shards, out, depth: str, **overrides) -> FinetuneConfig:
    values = dict(output=str(out), depth=depth, shards=str(shards), tower="timm:test_efficientnet", pretrained=False)
    values |= dict(batch_size=16, lr=1e-2, tower_lr=1e-3, select_fraction=0.0, warmup_steps=2, progress=False)
    return FinetuneConfig(**values | overrides)


def test_upper_stages_on_cached_activations_give_what_the_whole_tower_gives_on_photos(colour_shards, tmp_path):
    from taxoclip.data.images import decode_image
    from taxoclip.data.shards import iter_tar_samples
    from taxoclip.train.depths import TowerSource

    config = tower_settings(colour_shards, tmp_path / "m", "upper", epochs=4, layer_decay=0.5)
    final = train_finetune(config)
    model = taxoclip.load(tmp_path / "m")
    # The cached path: the saved tower's upper stages on the cached activations, then the head.
    from taxoclip.runtime import setup

    source = TowerSource(config, setup("cpu"))
    source.tower.load_state_dict(load_file(str(tmp_path / "m" / "image_tower.safetensors")))
    cached = model.head()(source.embed(source.valid_rows)).softmax(-1)
    # The full forward on the photos, through the model directory.
    samples = [s for tar in sorted(colour_shards.glob("valid-*.tar")) for s in iter_tar_samples(tar)]
    photos = model.classify_images([decode_image(s["jpg"]) for s in samples])
    assert torch.allclose(cached, photos, atol=1e-4)
    truth = torch.tensor([int(s["cls"]) for s in samples])
    assert float((photos.argmax(-1) == truth).float().mean()) == pytest.approx(final["top1"])


def test_layer_decay_gives_each_trainable_stage_its_own_rate(colour_shards, tmp_path):
    from taxoclip.runtime import setup

    config = tower_settings(colour_shards, tmp_path / "m", "upper", train_blocks=2, layer_decay=0.5)
    trainer = FinetuneTrainer(config, setup("cpu"))
    groups = trainer.param_groups()
    tower_groups = groups[2:]
    assert {id(p) for g in tower_groups for p in g["params"]} == {id(p) for p in trainer.source.upper.parameters()}
    rates = sorted({g["lr"] for g in tower_groups})
    assert rates == pytest.approx([config.tower_lr / 2, config.tower_lr])  # two stages, the lower at half


def test_whole_tower_from_scratch_with_mixup_balance_and_selection(colour_shards, tmp_path):
    config = tower_settings(
        colour_shards, tmp_path / "m", "full", epochs=2, mixup=0.4, cutmix=1.0, balance=20, select_fraction=0.2
    )
    final = train_finetune(config)
    assert "select_top1" in final and "top1" in final
    rows = [json.loads(line) for line in (tmp_path / "m" / "metrics.jsonl").read_text().splitlines()]
    # About 13 photos per class train (a fifth is the selection split): each is repeated ~1.5 times
    # for 20 per class in expectation, 120 in all, of which the full batches of 16 train.
    for row in rows:
        assert row["balance_oversampled"] >= 4 and row["balance_max_repeat"] > 1
        assert 80 <= row["samples"] <= 112 and row["samples"] % 16 == 0
        assert 10 <= row["balance_drawn_min"] <= row["balance_drawn_max"] <= 30
    model = taxoclip.load(tmp_path / "m")
    trained = load_file(str(tmp_path / "m" / "image_tower.safetensors"))
    assert all(torch.equal(trained[k], v.cpu()) for k, v in model.image_tower.state_dict().items())


def test_two_processes_under_torchrun_match_one(colour_features, tmp_path):
    arguments = ["train", "finetune", "--features", str(colour_features), "--batch-size", "24", "--epochs", "2"]
    arguments += ["--balance", "12", "--lr", "0.01", "-q"]
    double = one_and_two_processes(arguments, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [row["samples_by_rank"] for row in rows] == [[36, 36], [36, 36]]
    assert rows[-1]["balance_drawn_min"] == rows[-1]["balance_drawn_max"] == 12
    assert double.stdout.count("kind finetune") == 1
    one = load_file(str(tmp_path / "one" / "head.safetensors"))
    two = load_file(str(tmp_path / "two" / "head.safetensors"))
    for key in one:
        assert torch.allclose(one[key], two[key], atol=1e-5, rtol=1e-4), key


def test_bad_input_gets_a_message(colour_features, tmp_path, capsys):
    import shutil

    def run(*extra: str) -> str:
        try:
            code = main(
                ["train", "finetune", "--features", str(colour_features), "-o", str(tmp_path / "m"), "-q", *extra]
            )
        except SystemExit as exit:  # refused while parsing
            code = exit.code
        assert code == 2
        return capsys.readouterr().err

    assert "must be at least 1, got 0" in run("--balance", "0")
    assert "choose one" in run("--balance", "5", "--class-weighted")
    assert "need --depth full" in run("--mixup", "0.2")
    assert "no way to name classes it never saw" in run("--holdout", "2")
    assert "timm has no model 'no_such_net'" in run(
        "--depth", "full", "--shards", str(tmp_path), "--tower", "timm:no_such_net"
    )
    assert "NAT and DiNAT are not in timm" in run(
        "--depth", "full", "--shards", str(tmp_path), "--tower", "timm:dinat_mini"
    )
    # A class with no training photo: its training rows become valid rows in a copy of the cache.
    copy = tmp_path / "cache"
    shutil.copytree(colour_features, copy)
    cache = load_features(copy)
    splits = cache.split_codes.copy()
    splits[cache.labels == 5] = cache.split_names.index("valid")
    np.save(copy / "splits.npy", splits)
    assert main(["train", "finetune", "--features", str(copy), "-o", str(tmp_path / "n"), "-q"]) == 2
    assert "1 classes have no training photo (6)" in capsys.readouterr().err


def test_sweep_chooses_on_the_selection_split_and_draws_the_confusions(colour_features, tmp_path, capsys):
    from taxoclip.train.sweep import choose

    out = tmp_path / "sweep"
    arguments = ["train", "sweep", "finetune", "--features", str(colour_features), "-o", str(out), "-q"]
    arguments += ["--batch-size", "24", "--epochs", "2", "--select", "0.25", "--param", "balance"]
    assert main([*arguments, "--values", "none,6,12"]) == 0
    result = json.loads((out / "sweep.json").read_text())
    selection = [r["select_top1"] for r in result["rows"]]
    assert result["chosen"] == int(np.argmax(selection))  # chosen on selection, whatever valid says
    assert [r["balance"] for r in result["rows"]] == [None, 6, 12]
    for name in ("sweep.md", "sweep.png", "sweep.csv", "confusion.png", "balance-6/per_class.csv"):
        assert (out / name).exists(), name
    assert "(chosen)" in capsys.readouterr().out
    rows = [{"select_top1": 0.5, "top1": 0.9}, {"select_top1": 0.7, "top1": 0.1}, {"select_top1": None}]
    assert choose(rows) == 1  # the better selection score wins even with the worse valid score
    assert main([*arguments, "--values", "none,zero"]) == 2
    assert "'zero' for --balance: 'zero' is not a whole number" in capsys.readouterr().err
    assert main([*arguments[:-2], "--param", "nonsense", "--values", "1"]) == 2
    assert "not a setting of this trainer" in capsys.readouterr().err


@pytest.mark.parametrize("tower", ["timm:test_vit", "timm:test_maxvit"])
def test_transformer_backbones_fine_tune_whole_with_layer_decay(colour_shards, tmp_path, tower):
    """The study's transformer family (ViT, MaxViT) at depth full, from scratch, with layer-wise
    learning-rate decay over their blocks; the model directory then predicts photos."""
    from taxoclip.data.images import decode_image
    from taxoclip.data.shards import iter_tar_samples
    from taxoclip.runtime import setup

    config = tower_settings(
        colour_shards, tmp_path / "m", "full", tower=tower, epochs=1, layer_decay=0.7, max_steps_per_epoch=2
    )
    trainer = FinetuneTrainer(config, setup("cpu"))
    rates = {round(g["lr"], 12) for g in trainer.param_groups()[2:]}
    assert len(rates) >= 3 and max(rates) <= config.tower_lr  # one rate per depth of blocks
    final = train_finetune(config)
    assert "top1" in final
    model = taxoclip.load(tmp_path / "m")
    sample = next(iter_tar_samples(sorted(colour_shards.glob("valid-*.tar"))[0]))
    probabilities = model.classify_images([decode_image(sample["jpg"])])
    assert probabilities.shape == (1, 6) and torch.allclose(probabilities.sum(-1), torch.ones(1))


@pytest.mark.parametrize("value", ["../../elsewhere", "/etc/passwd", "..", ".hidden", "a/b\\c", "x" * 400, "é ü"])
def test_a_sweep_value_never_names_a_folder_outside_the_sweep(value, tmp_path):
    from taxoclip.train.sweep import run_folder

    folder = tmp_path / run_folder("text_tower", value)
    assert folder.resolve().parent == tmp_path.resolve() and not folder.name.startswith(".")


def test_a_sweep_refuses_values_no_run_can_use_from_the_library_too(colour_features, tmp_path):
    from taxoclip.train.sweep import run_sweep

    base = FinetuneConfig(output=str(tmp_path / "sweep"), features=str(colour_features), progress=False)
    for values, named in (([1e-3, float("nan")], "finite"), ([1e-3, 1e-3], "same value twice")):
        with pytest.raises(TaxoclipError, match=named):
            run_sweep("finetune", base, "lr", values)
    assert not (tmp_path / "sweep").exists()


def test_an_epoch_far_larger_than_the_data_is_announced_and_one_too_large_to_order_refused(
    colour_features, tmp_path, capsys
):
    arguments = ["train", "finetune", "--features", str(colour_features), "--epochs", "1", "--steps-per-epoch", "1"]
    assert main([*arguments, "-o", str(tmp_path / "a"), "--balance", "1000"]) == 0
    said = capsys.readouterr().out
    assert "--balance 1000 x 6 classes = 6,000 photos an epoch, drawn from 87 training photos" in said
    assert "23 steps of 256 an epoch; capped at 1 by --steps-per-epoch" in said
    assert main([*arguments, "-o", str(tmp_path / "b"), "--balance", "100000000"]) == 2
    assert "too many to order in memory" in capsys.readouterr().err
    assert main([*arguments, "-o", str(tmp_path / "c"), "--balance", "6"]) == 0  # about the data: no word
    assert "note:" not in capsys.readouterr().out
