import json

import numpy as np
import pytest
import torch

from taxoclip import ClassTable
from taxoclip.eval.metrics import Evaluation, RankCodes, lca_depth, lineage_codes, rollup
from taxoclip.models.baselines import few_shot_rows, nearest_class_mean, probe

# Two genera of one family, a second family in the same order, and a class in another order.
TABLE = ClassTable.from_records(
    [
        {
            "id": "a",
            "kingdom": "Plantae",
            "order": "O1",
            "family": "F1",
            "genus": "G1",
            "specific_epithet": "x",
            "supercategory": "Plants",
        },
        {
            "id": "b",
            "kingdom": "Plantae",
            "order": "O1",
            "family": "F1",
            "genus": "G1",
            "specific_epithet": "y",
            "supercategory": "Plants",
        },
        {
            "id": "c",
            "kingdom": "Plantae",
            "order": "O1",
            "family": "F1",
            "genus": "G2",
            "specific_epithet": "z",
            "supercategory": "Plants",
        },
        {
            "id": "d",
            "kingdom": "Plantae",
            "order": "O1",
            "family": "F2",
            "genus": "G3",
            "specific_epithet": "w",
            "supercategory": "Plants",
        },
        {
            "id": "e",
            "kingdom": "Animalia",
            "order": "O9",
            "family": "F9",
            "genus": "G9",
            "specific_epithet": "v",
            "supercategory": "Insects",
        },
    ],
    origin="test",
)


def test_rollup_sums_species_probabilities_per_group():
    genus = RankCodes.of(TABLE, "genus")
    probabilities = torch.tensor([[0.3, 0.3, 0.4, 0.0, 0.0]])
    assert genus.groups == ["G1", "G2", "G3", "G9"]
    assert torch.allclose(rollup(probabilities, genus), torch.tensor([[0.6, 0.4, 0.0, 0.0]]))


def test_lca_depth_counts_shared_ranks():
    lineage = lineage_codes(TABLE)
    truth, predicted = np.array([0, 0, 0, 0]), np.array([1, 2, 3, 4])
    # a/b same genus; a/c same family; a/d same order; a/e not even the kingdom.
    # (phylum and class are empty in this table: unknown ranks never count as shared.)
    assert lca_depth(truth, predicted, lineage).tolist() == [1, 1, 1, 0]
    full = ClassTable.from_records([{**r, "phylum": "P", "class": "C"} for r in TABLE.to_json()[:4]], origin="t")
    assert lca_depth(np.array([0, 0, 0]), np.array([1, 2, 3]), lineage_codes(full)).tolist() == [6, 5, 4]


def test_rank_accuracy_two_ways_and_per_class():
    evaluation = Evaluation(TABLE, group_by=["supercategory"])
    # Image 1 (class a): top-1 is c (wrong species, wrong genus), but G1 as a genus sums to 0.6.
    # Image 2 (class e): right.
    evaluation.add(torch.tensor([[0.3, 0.3, 0.4, 0.0, 0.0], [0.0, 0.0, 0.1, 0.0, 0.9]]), torch.tensor([0, 4]))
    result = evaluation.result()
    assert result["top1"] == 0.5 and result["top5"] == 1.0
    assert result["per_rank"]["genus"]["rollup"] == 1.0  # summed up the tree: G1 wins for image 1
    assert result["per_rank"]["genus"]["top1_lineage"] == 0.5  # c's genus is G2
    assert result["per_rank"]["family"]["top1_lineage"] == 1.0
    assert result["mistakes"] == 1 and result["mistake_lca_depth_counts"]["kingdom"] == 1
    groups = {g["group"]: g["top1"] for g in result["groups"]["supercategory"]}
    assert groups == {"Plants": 0.0, "Insects": 1.0}
    per_class = {r["id"]: r for r in evaluation.per_class()}
    assert per_class["a"]["most_confused_with"] == "c" and per_class["e"]["top1"] == 1.0
    assert evaluation.confused_pairs()[0]["true_id"] == "a"


def test_unseen_classes_are_scored_among_all_and_among_the_unseen_only():
    seen = np.array([True, True, True, False, False])  # d and e never trained
    evaluation = Evaluation(TABLE, seen=seen)
    probabilities = torch.tensor(
        [
            [0.1, 0.6, 0.0, 0.2, 0.1],  # d: a seen class wins overall, d wins among d and e
            [0.0, 0.1, 0.5, 0.1, 0.3],  # e: seen c wins overall, e among the unseen
            [0.0, 0.0, 0.0, 0.1, 0.9],  # d: wrong both ways
            [0.9, 0.1, 0.0, 0.0, 0.0],  # a: seen, right
        ]
    )
    evaluation.add(probabilities, torch.tensor([3, 4, 3, 0]))
    result = evaluation.result()
    assert result["unseen_images"] == 3 and result["unseen_classes"] == 2
    assert result["unseen_top1"] == 0.0  # among all classes, no unseen photo is named right
    assert result["unseen_top1_among_unseen"] == pytest.approx(2 / 3)
    assert result["seen_top1"] == 1.0


def test_chunks_add_up_to_one_pass():
    torch.manual_seed(0)
    probabilities = torch.rand(50, 5).softmax(-1)
    labels = torch.randint(0, 5, (50,))
    whole, parts = Evaluation(TABLE), Evaluation(TABLE)
    whole.add(probabilities, labels)
    for start in range(0, 50, 7):
        parts.add(probabilities[start : start + 7], labels[start : start + 7])
    assert json.dumps(whole.result(), sort_keys=True) == json.dumps(parts.result(), sort_keys=True)


def test_few_shot_rows_and_baselines_on_separable_data():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 16)) * 5
    labels = np.repeat(np.arange(4), 20)
    x = (centres[labels] + rng.normal(size=(80, 16))).astype(np.float32)
    picked = few_shot_rows(labels, 3)
    assert np.bincount(labels[picked]).tolist() == [3, 3, 3, 3]
    assert len(few_shot_rows(labels, None)) == 80
    test = (centres[labels] + rng.normal(size=(80, 16))).astype(np.float32)
    for method in (probe, nearest_class_mean):
        probabilities = method(x[picked], labels[picked], test, 4)
        assert probabilities.shape == (80, 4)
        assert (probabilities.argmax(-1).numpy() == labels).mean() > 0.9


@pytest.fixture(scope="module")
def trained_model(colour_features, tiny_text_tower, tmp_path_factory):
    from conftest import tiny_train_config
    from taxoclip.train.lit import train_lit

    out = tmp_path_factory.mktemp("model")
    final = train_lit(tiny_train_config(colour_features, out, tiny_text_tower, holdout=1))
    return out, final


def test_eval_report_for_a_trained_model(trained_model, colour_features, tmp_path):
    from taxoclip.apps.cli import main

    model, final = trained_model
    assert (
        main(
            ["eval", "--model", str(model), "--data", str(colour_features), "-o", str(tmp_path), "--shots", "1,3", "-q"]
        )
        == 0
    )
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert report["metrics"]["top1"] == pytest.approx(final["top1"])
    assert report["metrics"]["unseen_images"] == 5  # one held-out class, 5 valid photos
    methods = {(r["method"], r["train images per class"]) for r in report["comparison"]}
    assert ("Transfer Init (CatLIP)", "1") in methods and ("logistic-regression probe", "all") in methods
    for name in (
        "report.md",
        "report.html",
        "per_class.csv",
        "per_rank.csv",
        "confused_pairs.csv",
        "comparison.csv",
        "confusion.png",
        "accuracy_by_rank.png",
        "long_tail.png",
        "data_efficiency.png",
    ):
        assert (tmp_path / name).exists(), name
    assert "Accuracy at every rank" in (tmp_path / "report.md").read_text()
    assert "<table>" in (tmp_path / "report.html").read_text()


def test_eval_with_template_ensemble_caches_class_embeddings(trained_model, colour_features, tmp_path):
    from taxoclip.eval.report import EvalConfig, run_evaluation

    model, _ = trained_model
    before = set(model.glob("class_embeddings-*.npy"))
    run_evaluation(
        EvalConfig(
            model=str(model),
            data=str(colour_features),
            output=str(tmp_path),
            style="templates",
            baselines=False,
            progress=False,
        )
    )
    assert len(set(model.glob("class_embeddings-*.npy")) - before) == 1


def test_eval_of_an_open_clip_model_embeds_the_shards_itself(colour_shards, tmp_path):
    from taxoclip.eval.report import EvalConfig, run_evaluation

    report = run_evaluation(
        EvalConfig(
            model="open_clip:ViT-B-32",
            data=str(colour_shards),
            output=str(tmp_path),
            random_weights=True,
            baselines=False,
            progress=False,
        )
    )
    assert report["metrics"]["images"] == 30 and 0 <= report["metrics"]["top1"] <= 1
    assert (tmp_path / "features" / "meta.json").exists()


def test_eval_refuses_features_of_another_tower(trained_model, tmp_path, colour_shards):
    from taxoclip import TaxoclipError
    from taxoclip.eval.report import EvalConfig, run_evaluation
    from taxoclip.models.extraction import extract_features

    model, _ = trained_model
    other = extract_features(
        colour_shards, "timm:test_resnet", tmp_path / "f", pretrained=False, workers=0, progress=False
    )
    with pytest.raises(TaxoclipError, match="embeddings of timm:test_resnet"):
        run_evaluation(EvalConfig(model=str(model), data=str(other.path), output=str(tmp_path / "r"), progress=False))


def test_test_only_data_gets_baselines_fitted_on_the_model_training_cache(colour_features, tiny_text_tower, tmp_path):
    """A test set with no train split: the probe, nearest class mean and Transfer Init are fitted
    on the cache the model trained on (same tower id), scored on the test set, and the report says
    so; with that cache gone the report says that instead of leaving the rows out silently."""
    import shutil

    from conftest import tiny_train_config
    from taxoclip.apps.cli import main
    from taxoclip.train.lit import train_lit

    training = tmp_path / "training-cache"
    shutil.copytree(colour_features, training)
    train_lit(tiny_train_config(training, tmp_path / "model", tiny_text_tower, epochs=2))
    test_only = tmp_path / "test-set"  # the valid photos alone, relabelled as a test split
    shutil.copytree(colour_features, test_only)
    meta = json.loads((test_only / "meta.json").read_text())
    splits = np.load(test_only / "splits.npy")
    keep = splits == meta["split_names"].index("valid")
    for name in ("features.npy", "labels.npy"):
        np.save(test_only / name, np.load(test_only / name)[keep])
    np.save(test_only / "splits.npy", np.zeros(int(keep.sum()), dtype=splits.dtype))
    keys = json.loads((test_only / "keys.json").read_text())
    (test_only / "keys.json").write_text(json.dumps([k for k, kept in zip(keys, keep, strict=True) if kept]))
    (test_only / "meta.json").write_text(json.dumps(meta | {"split_names": ["test"]}))

    arguments = ["eval", "--model", str(tmp_path / "model"), "--data", str(test_only), "--split", "test"]
    assert main([*arguments, "-o", str(tmp_path / "report"), "--shots", "2", "-q"]) == 0
    report = json.loads((tmp_path / "report" / "metrics.json").read_text())
    methods = {(r["method"], r["train images per class"]) for r in report["comparison"]}
    assert {
        ("logistic-regression probe", "all"),
        ("nearest class mean", "2"),
        ("Transfer Init (CatLIP)", "all"),
    } <= methods
    assert f"the model's training cache {training}" in report["baselines"]
    probe = next(
        r
        for r in report["comparison"]
        if r["method"] == "logistic-regression probe" and r["train images per class"] == "all"
    )
    assert probe["top1"] > 0.5  # fitted on 96 training photos, scored on the 30 test photos
    assert "Where the baselines come from" in (tmp_path / "report" / "report.md").read_text()

    shutil.rmtree(training)
    assert main([*arguments, "-o", str(tmp_path / "report-2"), "-q"]) == 0
    report = json.loads((tmp_path / "report-2" / "metrics.json").read_text())
    assert [r["method"] for r in report["comparison"]] == ["LiT zero-shot"]
    assert f"the feature cache the model trained on ({training}) is gone" in report["baselines"]
    assert "is gone" in (tmp_path / "report-2" / "report.md").read_text()
