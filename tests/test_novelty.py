"""Photos of species the model does not know: the novelty scores, the threshold, and the answer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from taxoclip.models.novelty import SCORES, NoveltyDetector, auroc, class_statistics


class Rows:
    """The part of a feature cache the statistics read: features, labels, chunks of rows."""

    def __init__(self, features: np.ndarray, labels: np.ndarray):
        self.features, self.labels = features.astype(np.float32), labels

    def chunks(self, rows: np.ndarray, chunk: int = 64):
        for start in range(0, len(rows), chunk):
            part = np.sort(rows[start : start + chunk])
            yield part, self.features[part]


def elongated_clusters(seed: int = 0) -> Rows:
    """Two classes in 8-d: wide along dimension 1 (spread 20), narrow elsewhere (0.1)."""
    rng = np.random.default_rng(seed)
    spread = np.array([0.1, 20, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1])
    centres = np.zeros((2, 8))
    centres[1, 0] = 10
    labels = np.repeat([0, 1], 400)
    return Rows(centres[labels] + rng.normal(size=(800, 8)) * spread, labels)


def detector_for(rows: Rows, identity: bool = False) -> NoveltyDetector:
    centre, whitening, means, background, middle = class_statistics(rows, np.arange(len(rows.labels)), np.array([0, 1]))
    if identity:  # what the test must catch: Euclidean distance instead of the covariance's
        whitening = torch.eye(8)
        means = torch.from_numpy(np.stack([rows.features[rows.labels == c].mean(0) for c in (0, 1)])) - centre
    training = (torch.from_numpy(rows.features) - centre) @ whitening.T
    scores = torch.cdist(training, means).min(-1).values ** 2
    threshold = float(torch.quantile(scores, 0.95))  # 95% of known photos kept
    return NoveltyDetector("mahalanobis", threshold, centre, whitening, means, torch.tensor([0, 1]), background, middle)


@pytest.mark.parametrize("identity", [False, True])
def test_a_far_cluster_is_unknown_and_a_near_one_known_under_the_shared_covariance(identity):
    rows = elongated_clusters()
    detector = detector_for(rows, identity)
    near = torch.zeros(1, 8)
    near[0, 1] = 30  # 1.5 spreads along the wide axis: an ordinary photo of class 0
    far = torch.zeros(1, 8)
    far[0, 2] = 2  # only 2 away, but 20 spreads across the narrow axis: nothing like either class
    logits = torch.zeros(1, 2)
    unknown = [bool(detector.novelty(x, logits) > detector.threshold) for x in (near, far)]
    if identity:
        assert unknown[1] is False  # Euclidean distance calls the stranger known: the covariance matters
    else:
        assert unknown == [False, True]


def test_the_scores_rank_unknowns_above_knowns_and_auroc_is_the_mann_whitney_statistic():
    rows = elongated_clusters()
    detector = detector_for(rows)
    rng = np.random.default_rng(1)
    known = torch.from_numpy(rows.features[rng.choice(800, 100)])
    strangers = torch.from_numpy(
        (rng.normal(size=(100, 8)) * 0.1 + np.array([5, 0, 3, 0, 0, 0, 0, 0])).astype(np.float32)
    )
    area = auroc(detector.mahalanobis(known).numpy(), detector.mahalanobis(strangers).numpy())
    assert area > 0.99
    assert auroc(np.array([1.0, 2.0]), np.array([1.0, 2.0])) == 0.5
    confident, unsure = torch.tensor([[9.0, 0.0]]), torch.tensor([[0.1, 0.0]])
    assert detector.scores(known[:1], confident)["max-softmax"] < detector.scores(known[:1], unsure)["max-softmax"]
    assert detector.scores(known[:1], confident)["energy"] < detector.scores(known[:1], unsure)["energy"]


def test_predict_says_unknown_for_a_species_never_trained_on_and_names_its_family(
    colour_features, colour_shards, image_folder, tmp_path, capsys
):
    """A CatLIP model trained without two of the six colour species, from before open-set scores:
    its score is computed on first use from its training cache and kept; a photo of a held-out
    species is 'not one of the species this model knows', a photo of a trained one is known."""
    import json
    import shutil

    from taxoclip.apps.cli import main
    from taxoclip.data.shards import iter_tar_samples
    from taxoclip.models.novelty import RECORD

    model = tmp_path / "m"
    arguments = ["train", "catlip", "--features", str(colour_features), "-o", str(model), "--holdout", "2"]
    assert main([*arguments, "--epochs", "30", "-q"]) == 0
    assert not (model / RECORD).exists()  # a directory as made before this issue
    held_out = json.loads((model / "config.json").read_text())["training"]["held_out"]
    photos = {}
    for sample in iter_tar_samples(sorted(colour_shards.glob("valid-*.tar"))[0]):
        photos.setdefault(int(sample["cls"]), sample["jpg"])
    unknown_class = held_out[0]
    known_class = next(c for c in photos if c not in held_out)
    for name, c in (("unknown.jpg", unknown_class), ("known.jpg", known_class)):
        (tmp_path / name).write_bytes(photos[c])
    capsys.readouterr()
    assert (
        main(
            [
                "predict",
                str(tmp_path / "unknown.jpg"),
                str(tmp_path / "known.jpg"),
                "--model",
                str(model),
                "--format",
                "json",
            ]
        )
        == 0
    )
    results = json.loads(capsys.readouterr().out)
    assert (model / RECORD).exists()  # computed from the training cache on first use, and kept
    record = json.loads((model / RECORD).read_text())  # the temperature with the best calibration AUROC
    by_temperature = {float(t): a for t, a in record["temperature_auroc"].items()}
    assert by_temperature[record["softmax_temperature"]] == max(by_temperature.values()) and len(by_temperature) == 4
    by_photo = {Path(r["source"]).name: r for r in results}
    assert by_photo["unknown.jpg"]["known"] is False and by_photo["known.jpg"]["known"] is True
    answer = by_photo["unknown.jpg"]["confident"]
    assert "not one of the 4 species this model was trained on" in answer["text"]
    truth = json.loads((model / "config.json").read_text())  # the held-out species' own lineage
    from taxoclip.models.bundle import read_classes

    lineage = read_classes(model).rows[unknown_class]
    assert answer["rank"] in ("genus", "family") and answer["name"] == lineage[answer["rank"]], answer
    assert truth["kind"] == "catlip"
    assert by_photo["unknown.jpg"]["novelty"]["value"] > by_photo["unknown.jpg"]["novelty"]["threshold"]
    # eval reports every score on the held-out species it never used to choose
    report = tmp_path / "report"
    assert main(["eval", "--model", str(model), "--data", str(colour_features), "-o", str(report), "-q"]) == 0
    section = json.loads((report / "open_set.json").read_text())
    assert set(section["scores"]) == set(SCORES) and (report / "open_set.png").exists()
    from taxoclip.data.features import load_features

    evaluation_class = json.loads((model / RECORD).read_text())["evaluation_classes"]
    # every photo of the held-out species left for eval, in every split: none trained or chose anything
    assert section["unknown_photos"] == int(np.isin(load_features(colour_features).labels, evaluation_class).sum())
    assert section["unknown_photos"] > 5 and section["unknown_splits"].startswith("every split")
    assert "open set" in (report / "report.md").read_text()
    answers = section["rank_answers_for_flagged_unknowns"]["family"]
    assert answers["given"] > 0 and answers["right"] is not None
    assert "open set (" in capsys.readouterr().out
    # --unknown: photos of other species altogether (another folder), embedded with the model's tower
    other = tmp_path / "other-report"
    arguments = ["eval", "--model", str(model), "--data", str(colour_features), "-o", str(other), "-q"]
    assert main([*arguments, "--unknown", str(image_folder), "--no-baselines"]) == 0
    section = json.loads((other / "open_set.json").read_text())
    assert section["unknown_photos"] == 28 and section["unknown_from"].endswith("features")
    # ONNX carries the score: the same values as PyTorch, the same rule in its sidecar
    import torch

    from taxoclip.data.images import decode_image
    from taxoclip.inference.export import OnnxClassifier, export_onnx
    from taxoclip.inference.predict import torch_predictor
    from taxoclip.models.novelty import open_set_for
    from taxoclip.models.registry import load_classifier

    onnx = OnnxClassifier(export_onnx(model, tmp_path / "m.onnx"))
    classifier = load_classifier(model)
    pytorch = torch_predictor(classifier, novelty=open_set_for(classifier))
    pixels = torch.stack([pytorch.preprocess.to_uint8(decode_image(photos[c])) for c in (unknown_class, known_class)])
    pixels = torch.cat([pixels, pixels[:1]])  # 3 photos: the graph was traced on 2, its batch stays free
    (p_torch, n_torch), (p_onnx, n_onnx) = pytorch.run(pixels), onnx(pixels)
    assert torch.allclose(p_torch, p_onnx, atol=1e-4) and torch.allclose(n_torch, n_onnx, rtol=1e-3, atol=1e-2)
    assert onnx.open_set_rule() == pytorch.open_set
    # the cache gone: a clear message for a score asked for by name; auto goes on without one
    (model / RECORD).unlink()
    copy = tmp_path / "moved"
    shutil.copytree(model, copy)
    config = json.loads((copy / "config.json").read_text())
    config["training"]["features"] = str(tmp_path / "gone")
    (copy / "config.json").write_text(json.dumps(config))
    assert main(["predict", str(tmp_path / "known.jpg"), "--model", str(copy), "--open-set", "energy"]) == 2
    assert "training cache" in capsys.readouterr().err
    assert main(["predict", str(tmp_path / "known.jpg"), "--model", str(copy), "--format", "json"]) == 0
    said = capsys.readouterr()
    assert "known" not in json.loads(said.out)[0] and "no open-set score" in said.err


def test_the_logit_scores_and_the_rank_answer_read_only_the_trained_species():
    """Held-out species stand for species outside the class table: a photo whose probability goes
    to one of them (a LiT model names some zero-shot) is unsure among the trained ones, and its
    rank answer sums only the trained species. A record from before the rule keeps every class."""
    from taxoclip.data.preprocess import Preprocess
    from taxoclip.inference.predict import OpenSetRule, Predictor
    from taxoclip.models.novelty import KNOWN_LOGITS
    from taxoclip.taxonomy import ClassTable

    rows = elongated_clusters()
    detector = detector_for(rows)
    detector.known_classes = torch.tensor([0, 1])
    logits = torch.tensor([[0.0, 0.0, 9.0]])  # classes 0 and 1 trained, 2 held out and most probable
    legacy = detector.scores(torch.zeros(1, 8), logits)["max-softmax"]
    detector.record = {"logits": KNOWN_LOGITS}
    trained = detector.scores(torch.zeros(1, 8), logits)
    assert float(legacy) < 0.01 and float(trained["max-softmax"]) == pytest.approx(0.5)
    assert float(trained["energy"]) == pytest.approx(-float(torch.logsumexp(torch.zeros(2), 0)))
    assert detector.trained_subset(3) == [0, 1] and detector.trained_subset(2) is None
    # the max-softmax score at the record's temperature: 1 - sigmoid(2 / T) for logits (2, 0)
    two = torch.tensor([[2.0, 0.0]])
    detector.record["softmax_temperature"] = 2.0
    assert float(detector.scores(torch.zeros(1, 8), two)["max-softmax"]) == pytest.approx(
        1 - torch.sigmoid(torch.tensor(1.0))
    )

    table = ClassTable.from_records(
        [
            {"id": "a", "family": "Rosaceae", "genus": "Rosa", "species": "canina"},
            {"id": "b", "family": "Asteraceae", "genus": "Bellis", "species": "perennis"},
            {"id": "c", "family": "Asteraceae", "genus": "Aster", "species": "alpinus"},
        ],
        origin="test",
    )
    probabilities = torch.tensor([0.3, 0.05, 0.65])  # most of it on the held-out Aster
    answers = {}
    for known in (None, (0, 1)):
        rule = OpenSetRule("max-softmax", 0.1, 2, known)
        predictor = Predictor(table, Preprocess(), lambda p: p, open_set=rule)
        answers[known] = predictor.describe(probabilities, "photo", novelty=0.9).confident["name"]
    # every class: the held-out species' own genus (0.65); trained ones only: Rosa (0.86)
    assert answers == {None: "Aster", (0, 1): "Rosa"}
    # the rule's rank threshold, not the predictor's 0.5, decides what is named for an unknown photo
    for rank_threshold, said in ((0.8, "Rosa"), (0.9, "")):
        rule = OpenSetRule("max-softmax", 0.1, 2, (0, 1), rank_threshold)
        answer = Predictor(table, Preprocess(), lambda p: p, open_set=rule).describe(probabilities, "p", novelty=0.9)
        assert answer.confident["name"] == said and answer.known is False


def test_an_unknown_photos_taxon_is_named_at_the_lowest_threshold_its_calibration_answers_were_right():
    from taxoclip.models.novelty import NEVER, lowest_precise_threshold, named_answers
    from taxoclip.taxonomy import ClassTable

    # (named, right) at each threshold: 0.5 names many but wrongly, 0.7 too few to judge
    assert lowest_precise_threshold({0.5: (40, 12), 0.6: (20, 17), 0.8: (10, 10), 0.9: (3, 3)}) == 0.6
    assert lowest_precise_threshold({0.5: (40, 12), 0.6: (20, 15), 0.7: (3, 3)}) == NEVER
    table = ClassTable.from_records(
        [
            {"id": "a", "order": "Rosales", "family": "Rosaceae", "genus": "Rosa", "species": "canina"},
            {"id": "b", "order": "Rosales", "family": "Rosaceae", "genus": "Prunus", "species": "avium"},
            {"id": "c", "order": "Asterales", "family": "Asteraceae", "genus": "Bellis", "species": "perennis"},
        ],
        origin="test",
    )
    answers = named_answers(torch.tensor([[0.45, 0.4, 0.15], [0.2, 0.1, 0.7]]), table, (0.5, 0.8, 0.9))
    named, rank, taxon = answers[0.5]
    assert (
        named.tolist() == [True, True] and list(rank) == ["family", "genus"] and list(taxon) == ["Rosaceae", "Bellis"]
    )
    named, rank, taxon = answers[0.8]  # the first photo's family (0.85) still, the second nothing
    assert named.tolist() == [True, False] and list(taxon) == ["Rosaceae", ""]
    assert not answers[0.9][0].any()


def test_a_model_without_held_out_species_gets_its_kinds_measured_default_score(colour_features, tmp_path):
    """No held-out species to choose on: LiT takes max-softmax, other kinds combined (the open-set
    study's means), and the record says why."""
    from taxoclip.apps.cli import main
    from taxoclip.data.features import load_features
    from taxoclip.models.novelty import DEFAULT_SCORE, DEFAULT_SCORES, fit_novelty
    from taxoclip.models.registry import load_classifier

    model = tmp_path / "m"
    assert main(["train", "catlip", "--features", str(colour_features), "-o", str(model), "--epochs", "3", "-q"]) == 0
    classifier, cache = load_classifier(model), load_features(colour_features)
    chosen, temperatures = {}, {}
    for kind in ("catlip", "lit"):
        classifier.kind = kind  # the same weights: only the kind decides the default
        detector = fit_novelty(classifier, cache)
        chosen[kind] = detector.score
        assert f"default for {kind} models" in detector.record["chosen_by"]
        temperatures[kind] = detector.record["softmax_temperature"]
        assert detector.trained_subset(len(classifier.classes)) is None  # every class was trained on
    assert temperatures == {"catlip": 1.0, "lit": 2.0}  # LiT's measured default softmax temperature
    assert chosen == {"catlip": DEFAULT_SCORE, "lit": DEFAULT_SCORES["lit"]} and DEFAULT_SCORES["lit"] != DEFAULT_SCORE
