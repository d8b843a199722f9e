"""The registry: one `load_classifier` for every kind of model, and what it refuses."""

import json

import numpy as np
import pytest
import torch

import taxoclip
from taxoclip import TaxoclipError
from taxoclip.apps.cli import main
from taxoclip.data.features import load_features
from taxoclip.data.images import decode_image
from taxoclip.data.shards import iter_tar_samples
from taxoclip.models import registry
from taxoclip.models.classifier import Classifier


@pytest.fixture
def toy_model(colour_features, tmp_path, monkeypatch):
    from toy_kind import save_toy

    monkeypatch.setitem(registry.KINDS, "toy", "toy_kind:load_toy")
    save_toy(tmp_path / "toy", load_features(colour_features))
    return tmp_path / "toy"


def valid_photos(shards, n=6):
    return [s for tar in sorted(shards.glob("valid-*.tar")) for s in iter_tar_samples(tar)][:n]


def test_a_new_kind_is_one_module_and_one_entry_and_every_command_serves_it(
    toy_model, colour_features, colour_shards, tmp_path, capsys
):
    classifier = taxoclip.load(toy_model)
    assert isinstance(classifier, Classifier) and classifier.kind == "toy"
    cache = load_features(colour_features)
    x, y = cache.split("valid")
    assert (classifier.probabilities_from_features(x).argmax(-1).numpy() == y).mean() >= 0.9
    # predict: photos through the kind's own image tower
    samples = valid_photos(colour_shards)
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(samples[0]["jpg"])
    assert main(["predict", str(photo), "--model", str(toy_model), "--format", "json", "-q"]) == 0
    answer = json.loads(capsys.readouterr().out)[0]["top"][0]["id"]
    row = cache.row_of()[samples[0]["__key__"].decode()]
    assert answer == classifier.classes.ids[int(classifier.probabilities_from_features(cache.features[[row]]).argmax())]
    # eval: a report, with the baselines that need no caption embeddings
    assert (
        main(["eval", "--model", str(toy_model), "--data", str(colour_features), "-o", str(tmp_path / "r"), "-q"]) == 0
    )
    report = json.loads((tmp_path / "r" / "metrics.json").read_text())
    methods = {r["method"] for r in report["comparison"]}
    assert "nearest class mean" in methods and "Transfer Init (CatLIP)" not in methods


def test_predicting_with_a_lit_model_never_builds_its_text_tower(
    colour_features, colour_shards, tiny_text_tower, tmp_path, monkeypatch
):
    from conftest import tiny_train_config
    from taxoclip.models import towers
    from taxoclip.train.lit import train_lit

    train_lit(tiny_train_config(colour_features, tmp_path / "m", tiny_text_tower, epochs=1))

    def refuse(*args, **kwargs):
        raise AssertionError("the text tower was built")

    monkeypatch.setattr(towers, "create_text_tower", refuse)
    model = taxoclip.load(tmp_path / "m")
    predictions = taxoclip.predict(model, [decode_image(s["jpg"]) for s in valid_photos(colour_shards, 3)])
    assert len(predictions) == 3 and predictions[0].top
    with pytest.raises(AssertionError, match="text tower was built"):
        model.use_style("scientific")  # another caption style does need it


def test_what_the_registry_refuses(tmp_path, capsys):
    with pytest.raises(TaxoclipError, match="not a taxoclip model"):
        registry.load_classifier(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"version": 1, "kind": "quantum"}))
    with pytest.raises(TaxoclipError, match="kind 'quantum'"):
        registry.load_classifier(tmp_path)
    with pytest.raises(TaxoclipError, match="--classes"):
        registry.load_classifier("open_clip:ViT-B-32", pretrained=False)
    from conftest import write_image

    photo = write_image(tmp_path / "photos" / "a.jpg", 1)
    assert main(["predict", str(photo), "--model", str(tmp_path)]) == 2
    assert "kind 'quantum'" in capsys.readouterr().err


def test_open_clip_by_name_is_a_classifier_too(colour_features):
    classes = load_features(colour_features).classes
    classifier = registry.load_classifier("open_clip:ViT-B-32", classes=classes, pretrained=False)
    assert classifier.kind == "open_clip" and classifier.classes.ids == classes.ids
    features = torch.randn(4, classifier.class_embeddings.shape[1])
    probabilities = classifier.probabilities_from_features(features)
    assert probabilities.shape == (4, len(classes)) and np.allclose(probabilities.sum(-1), 1, atol=1e-5)
