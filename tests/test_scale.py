"""The paths that must hold at iNat2021's size, on small data: the synthetic cache writer, the
streamed LiT start (centring mean, ridge class means), streamed baselines and chunked scoring.
Each streamed path gives the dense path's answer, and a spy on the memory map fails the test if
a whole split is read at once again."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import taxoclip.data.features as features_module
from taxoclip.data.features import load_features, write_synthetic_cache
from taxoclip.models import baselines
from taxoclip.models.accuracy import SeenUnseenAccuracy, accuracy
from taxoclip.taxonomy import ClassTable

WIDTH = 32
TOWER = {"name": "timm:test_efficientnet", "id": "synthetic-test", "width": WIDTH, "pretrained": False}


def tiny_table(n: int = 40) -> ClassTable:
    rows = [
        {
            "id": str(i),
            "order": f"Order{i // 20}",
            "family": f"Family{i // 10}",
            "genus": f"Genus{i // 4}",
            "species": f"Genus{i // 4} species{i}",
            "common_name": f"thing {i}",
        }
        for i in range(n)
    ]
    return ClassTable.from_records(rows, origin="test")


class SpyArray:
    """A (N, d) array that records the most rows any one read asked for."""

    def __init__(self, array: np.ndarray):
        self.array, self.largest = array, 0
        self.shape, self.dtype = array.shape, array.dtype

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, index):
        part = self.array[index]
        self.largest = max(self.largest, len(part) if np.ndim(part) > 1 else 1)
        return part

    def __array__(self, dtype=None, copy=None):
        self.largest = len(self.array)
        return np.asarray(self.array, dtype)


class SpyCache:
    """A feature cache whose reads go through a `SpyArray` (what `RowSource.of_cache` reads)."""

    def __init__(self, features):
        self.features = features if isinstance(features, SpyArray) else SpyArray(features)

    def read(self, rows: np.ndarray) -> np.ndarray:
        return np.asarray(self.features[rows], np.float32)


@pytest.fixture
def cache(tmp_path):
    return write_synthetic_cache(
        tmp_path / "c", tiny_table(), rows=3000, valid_rows=400, tower=TOWER, noise=1.0, chunk=700, progress=False
    )


def test_synthetic_cache_is_a_real_cache_with_a_right_answer(cache, tmp_path):
    again = load_features(cache.path)
    assert again.features.shape == (3400, WIDTH) and again.features.dtype == np.float16
    assert again.meta["split_counts"] == {"train": 3000, "valid": 400}
    assert len(set(again.keys)) == 3400 and again.keys[0] == "train-00000000"
    assert len(again.meta["captions"]["by_class"]) == 40 and again.meta["tower"] == TOWER
    assert set(np.unique(again.labels)) == set(range(40))
    # Deterministic: the draws are seeded per chunk, so the same call writes the same rows.
    same = write_synthetic_cache(
        tmp_path / "d", tiny_table(), rows=3000, valid_rows=400, tower=TOWER, noise=1.0, chunk=700, progress=False
    )
    assert np.array_equal(np.asarray(same.features), np.asarray(again.features))
    # Nearest class mean on train recovers the valid labels far above chance (1/40).
    train, valid = again.split_mask("train"), again.split_mask("valid")
    probabilities = baselines.nearest_class_mean(
        np.asarray(again.features[train], np.float32),
        again.labels[train],
        np.asarray(again.features[valid], np.float32),
        40,
    )
    assert (probabilities.argmax(1).numpy() == again.labels[valid]).mean() > 0.5


def test_cache_mean_streams_and_equals_the_dense_mean(cache, monkeypatch):
    rows = np.flatnonzero(cache.split_mask("train"))
    dense = np.asarray(cache.features[rows], np.float32).mean(0)
    spy = SpyArray(cache.features)
    cache.features = spy
    assert np.allclose(cache.mean(rows, chunk=500), dense, atol=1e-5)
    assert spy.largest <= 500


def test_lit_start_reads_the_training_rows_in_chunks_and_matches_the_dense_fit(
    cache, tiny_text_tower, tmp_path, monkeypatch
):
    from taxoclip.runtime import setup
    from taxoclip.train.lit import LiTSettings, LiTTrainer, class_mean_embeddings

    spy = SpyArray(load_features(cache.path).features)
    original = features_module.load_features

    def spied(path):
        loaded = original(path)
        loaded.features = spy
        return loaded

    monkeypatch.setattr("taxoclip.train.lit.load_features", spied)
    monkeypatch.setattr(features_module, "STREAM_CHUNK", 256)
    config = LiTSettings(
        features=str(cache.path), output=str(tmp_path / "m"), text_tower=tiny_text_tower, batch_size=64, progress=False
    )
    trainer = LiTTrainer(config, setup("cpu"))
    assert spy.largest <= 400  # chunks of 256 and the valid split's 400; never the 3,000 train rows
    # The streamed start equals the dense one.
    rows = trainer.train_rows
    dense = torch.from_numpy(np.asarray(spy.array[rows], np.float32))
    assert torch.allclose(trainer.model.image_mean, dense.mean(0), atol=1e-5)
    centred = torch.nn.functional.normalize(dense - dense.mean(0), dim=-1)
    sums = torch.zeros(40, WIDTH).index_add_(0, torch.from_numpy(cache.labels[rows].astype(np.int64)), centred)
    assert torch.allclose(class_mean_embeddings(trainer.model, trainer.cache, rows, 40), sums, atol=1e-4)


def test_few_shot_rows_take_at_most_k_per_class_without_a_pass_per_class():
    labels = np.random.default_rng(0).integers(0, 50, 5000)
    for shots in (1, 3, 10):
        picked = baselines.few_shot_rows(labels, shots)
        counts = np.bincount(labels[picked], minlength=50)
        assert (counts == np.minimum(shots, np.bincount(labels, minlength=50))).all()
        assert len(set(picked.tolist())) == len(picked)
    assert np.array_equal(baselines.few_shot_rows(labels, 3), baselines.few_shot_rows(labels, 3))
    assert len(baselines.few_shot_rows(labels, None)) == 5000


def test_streamed_baselines_read_batches_and_score_in_chunks(tmp_path):
    """20,000 rows × 2,000 classes: every read of the memory map is one batch or chunk, and no
    probability matrix over all test rows is ever made (the old path made a 160 MB one)."""
    table = ClassTable.from_records([{"id": str(i), "species": f"S{i}"} for i in range(2000)], origin="t")
    cache = write_synthetic_cache(
        tmp_path / "big", table, rows=20000, valid_rows=2000, tower=TOWER, noise=1.0, progress=False
    )
    spy = SpyArray(cache.features)
    train = np.flatnonzero(cache.split_mask("train"))
    source = baselines.RowSource.of_cache(SpyCache(spy), train, cache.labels[train])
    budget = baselines.BaselineBudget(max_steps=40, lr=1e-2)
    probe = baselines.fit_probe(source, 2000, budget)
    ncm = baselines.fit_nearest_class_mean(source, 2000)
    assert 0 < spy.largest <= baselines.CHUNK
    valid = np.flatnonzero(cache.split_mask("valid"))
    shapes = []
    for scorer in (probe, ncm):
        for start in range(0, len(valid), 512):
            x = np.asarray(cache.features[valid[start : start + 512]], np.float32)
            shapes.append(scorer.probabilities(x).shape)
    assert max(s[0] for s in shapes) == 512 and all(s[1] == 2000 for s in shapes)


def test_streamed_probe_equals_the_array_probe_and_learns(cache):
    train, valid = np.flatnonzero(cache.split_mask("train")), np.flatnonzero(cache.split_mask("valid"))
    x, y = np.asarray(cache.features[train], np.float32), cache.labels[train]
    vx, vy = np.asarray(cache.features[valid], np.float32), cache.labels[valid]
    dense = baselines.probe(x, y, vx, 40)
    streamed = baselines.fit_probe(baselines.RowSource.of_cache(cache, train, y), 40).dense(vx)
    assert torch.allclose(dense, streamed, atol=1e-4)
    assert (dense.argmax(1).numpy() == vy).mean() > 0.5


def test_report_baselines_never_read_the_train_split_whole(cache, tmp_path, monkeypatch):
    """eval's baselines through run_evaluation on a LiT-like model: the spy sees only batches."""
    from taxoclip.eval import report

    seen = {}
    original = report.baselines.RowSource.of_cache

    def spied(train_cache, rows, labels):
        spy = seen.setdefault("spy", SpyCache(train_cache.features))
        return original(spy, rows, labels)

    monkeypatch.setattr(report.baselines.RowSource, "of_cache", staticmethod(spied))
    monkeypatch.setattr(baselines, "CHUNK", 500)

    class Plain:  # a classifier that is not an embedding model: probe and nearest class mean only
        kind = "finetune"

    config = report.EvalConfig(
        model="m", data=str(cache.path), output=str(tmp_path / "r"), shots=(2,), baseline_steps=5, progress=False
    )
    rows = np.flatnonzero(cache.split_mask("valid"))
    comparison, _ = report.run_baselines(
        config, cache, cache, Plain(), rows, cache.labels[rows].astype(np.int64), cache.classes, [], 0.0
    )
    assert {r["method"] for r in comparison} == {"logistic-regression probe", "nearest class mean"}
    assert 0 < seen["spy"].features.largest <= 500  # batches of 256, passes of 500: never the 3,000 train rows


def test_seen_unseen_accuracy_in_chunks_equals_one_pass():
    generator = torch.Generator().manual_seed(0)
    inputs, labels = torch.randn(300, 12, generator=generator), torch.randint(0, 12, (300,), generator=generator)
    held_out = np.array([2, 5, 7])
    whole = SeenUnseenAccuracy(held_out)
    whole.add(inputs, labels)
    parts = SeenUnseenAccuracy(held_out)
    for start in range(0, 300, 37):
        parts.add(inputs[start : start + 37], labels[start : start + 37])
    assert whole.result() == parts.result()
    unseen = torch.from_numpy(np.isin(labels.numpy(), held_out))
    among = accuracy(lambda x: x, inputs[unseen], labels[unseen], classes=held_out)
    assert parts.result()["unseen_top1"] == pytest.approx(among["top1"])
    assert parts.result()["top1"] == pytest.approx(accuracy(lambda x: x, inputs, labels)["top1"])


class FakeTower:
    width = 4

    def describe(self) -> dict:
        return {"name": "fake", "id": "fake", "width": self.width}


def test_merging_parts_holds_one_part_record_at_a_time(tmp_path):
    """Extraction's merge at a million rows: each part's record (its rows' keys, labels, splits)
    is read, written and dropped in turn; the rows come out in plan order, rejects counted."""
    import tracemalloc

    from taxoclip.data.features import DataPlan, Unit
    from taxoclip.models.extraction import merge_parts, save_part

    parts = tmp_path / "out" / "parts"
    parts.mkdir(parents=True)
    units, rows_per_part = [Unit(f"train-{u:06d}", 1001) for u in range(30)], 1000
    for u, unit in enumerate(units):
        keys = [f"train-{u:06d}-{i:05d}-" + "x" * 200 for i in range(rows_per_part)]  # ~0.2 MB a record
        buffer = {
            "features": list(np.full((rows_per_part, 4), u, np.float16)),
            "keys": keys,
            "labels": [u % 7] * rows_per_part,
            "splits": ["train"] * rows_per_part,
            "rejects": [{"key": f"bad-{u}", "reason": "truncated"}],
        }
        save_part(parts, unit.name, buffer, "k", 4)
    classes = [{"id": str(c)} for c in range(7)]
    plan = DataPlan(
        units, "data", classes, None, {"kind": "test"}, rejects=[{"key": "planned", "reason": "cannot read"}]
    )
    tracemalloc.start()
    merge_parts(plan, FakeTower(), "k", tmp_path / "out", seconds=1.0)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    cache = load_features(tmp_path / "out")
    assert len(cache.labels) == 30 * rows_per_part
    assert np.array_equal(np.asarray(cache.features[::rows_per_part, 0]), np.arange(30, dtype=np.float16))
    assert cache.keys[rows_per_part] == "train-000001-00000-" + "x" * 200
    assert cache.meta["rejected"] == 31  # the plan's reject and one per part
    # every record at once is ~7 MB of keys as Python strings; one at a time stays near one record
    assert peak < 3 * 2**20, f"merge peaked at {peak / 2**20:.1f} MB of Python allocations"


def test_chunked_scores_and_temperature_equal_one_pass():
    from taxoclip.models.catlip import fit_temperature, fit_temperature_chunks
    from taxoclip.train.finetune import Scores

    generator = torch.Generator().manual_seed(0)
    logits, labels = 3 * torch.randn(500, 30, generator=generator), torch.randint(0, 30, (500,), generator=generator)
    whole, parts = Scores(30), Scores(30)
    whole.add(logits, labels)
    for start in range(0, 500, 64):
        parts.add(logits[start : start + 64], labels[start : start + 64])
    assert whole.result() == pytest.approx(parts.result())
    recalls = [float((logits.argmax(1)[labels == c] == c).float().mean()) for c in labels.unique()]
    assert whole.result()["balanced"] == pytest.approx(np.mean(recalls))  # the per-class loop it replaced
    assert whole.result()["worst_recall"] == pytest.approx(min(recalls))
    chunks = [(logits[s : s + 64], labels[s : s + 64]) for s in range(0, 500, 64)]
    assert fit_temperature_chunks(chunks) == fit_temperature(logits, labels)


@pytest.mark.parametrize("trainer", ["finetune", "catlip"])
def test_classifier_trainers_score_valid_in_chunks(cache, tmp_path, monkeypatch, trainer):
    """finetune's and CatLIP's evaluation, calibration and valid report read the valid split a
    chunk at a time: iNat2021's 100,000 valid photos would be 512 MB of float32, their logits over
    10,000 classes 4 GB (and finetune's confusion matrix 800 MB)."""
    import taxoclip.train.depths as depths

    spies = []
    original = depths.load_features

    def spied(path):
        loaded = original(path)
        loaded.features = SpyArray(loaded.features)
        spies.append(loaded.features)
        return loaded

    monkeypatch.setattr(depths, "load_features", spied)
    monkeypatch.setattr(depths, "EVAL_CHUNK", 50)
    monkeypatch.setattr(features_module, "STREAM_CHUNK", 50)  # the streamed passes (finite check)
    monkeypatch.setattr(depths, "STANDARDISE_ROWS", 50)  # the input standardisation's sample
    out = tmp_path / trainer
    common = {"features": str(cache.path), "output": str(out), "batch_size": 64, "epochs": 1, "progress": False}
    if trainer == "finetune":
        from taxoclip.train.finetune import FinetuneConfig, train_finetune

        metrics = train_finetune(FinetuneConfig(**common))
        per_class = (out / "per_class.csv").read_text().splitlines()[1:]
        assert sum(int(line.split(",")[3]) for line in per_class) == 400  # every valid photo, in chunks
        assert (out / "confusion.npy").exists()  # 40 classes: small enough to keep the matrix
    else:
        from taxoclip.train.catlip import CatLIPConfig, train_catlip

        metrics = train_catlip(CatLIPConfig(**common))
    assert 0 < metrics["top1"] <= 1  # scored
    assert spies and max(s.largest for s in spies) <= 64  # batches of 64, chunks of 50; never 400 valid rows


def test_an_open_cache_holds_its_keys_compactly(tmp_path):
    """Every command that opens a cache holds its row keys: as Python strings ~70 bytes a row
    (190 MB at iNat2021's 2.7M rows), as one bytes array ~14. Read back, they are the same keys."""
    import tracemalloc

    tower = TOWER | {"width": 4}
    write_synthetic_cache(tmp_path / "c", tiny_table(), rows=200_000, tower=tower, progress=False)
    tracemalloc.start()
    cache = load_features(tmp_path / "c")
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert held < 5 * 2**20, f"an open 200,000-row cache holds {held / 2**20:.1f} MB"
    assert len(cache.keys) == 200_000 and cache.keys[199_999] == "train-00199999"
    assert cache.keys[np.int64(7)] == "train-00000007" and cache.keys[:2] == ["train-00000000", "train-00000001"]
    assert list(cache.keys)[-1] == "train-00199999" and cache.row_of()["train-00000042"] == 42


class CountedLabels(np.ndarray):
    """Labels that count the whole-array comparisons made on them (a mask per class is one)."""

    comparisons = 0

    def __eq__(self, other):
        CountedLabels.comparisons += 1
        return np.asarray(self) == other


def test_balanced_rows_take_one_sort_not_a_pass_per_class():
    """finetune --balance at iNat2021's size: 10,000 classes x 2.7M rows was a mask per class.
    The one sort gives the same rows in the same order as the per-class masks did."""
    from taxoclip.train.sampling import balanced_rows

    generator = np.random.default_rng(0)
    labels = generator.integers(0, 300, 20_000)
    rows = np.sort(generator.choice(1_000_000, 20_000, replace=False))

    def per_class_masks(rng):  # the former implementation, as the reference
        chosen = []
        for c in np.unique(labels):
            mine = rows[labels == c]
            whole, rest = divmod(25, len(mine))
            chosen += [np.tile(mine, whole), rng.choice(mine, size=rest, replace=False)]
        return rng.permutation(np.concatenate(chosen))

    CountedLabels.comparisons = 0
    order = balanced_rows(rows, labels.view(CountedLabels), 25, np.random.default_rng(3))
    assert CountedLabels.comparisons == 0
    assert np.array_equal(order, per_class_masks(np.random.default_rng(3)))


def test_questions_hold_photos_as_arrays(tmp_path):
    """`taxoclip questions` on iNat2021's 2.7M photos held a Photo object each, two dicts keyed by
    photo and a sorted copy (~600 bytes a photo); as arrays it is ~60, records made one at a time."""
    import tracemalloc

    from taxoclip.data.questions import write_questions

    tower = TOWER | {"width": 4}
    write_synthetic_cache(tmp_path / "c", tiny_table(), rows=30_000, tower=tower, progress=False)
    tracemalloc.start()
    counts = write_questions(tmp_path / "c", tmp_path / "q.jsonl", types=("rank",))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert counts["photos"] == 30_000 and counts["questions"] >= 30_000
    assert peak < 6 * 2**20, f"questions for 30,000 photos peaked at {peak / 2**20:.1f} MB"
