import json
import shutil

import pytest
import torch
from PIL import Image

import taxoclip
from taxoclip import ClassTable, TaxoclipError
from taxoclip.apps.cli import main
from taxoclip.data.preprocess import Preprocess
from taxoclip.inference.predict import Predictor, collect_photos, honest_answer_table

TABLE = ClassTable.from_records(
    [
        {"id": "1", "family": "Rosaceae", "genus": "Rosa", "specific_epithet": "canina", "common_name": "dog rose"},
        {"id": "2", "family": "Rosaceae", "genus": "Rosa", "specific_epithet": "gallica", "common_name": "French rose"},
        {"id": "3", "family": "Rosaceae", "genus": "Prunus", "specific_epithet": "avium", "common_name": "cherry"},
        {"id": "4", "family": "Liliaceae", "genus": "Tulipa", "specific_epithet": "sylvestris", "common_name": "tulip"},
    ],
    origin="test",
)


def fixed(probabilities):
    return Predictor(TABLE, Preprocess(), lambda pixels: torch.tensor([probabilities] * len(pixels)))


def test_honest_answer_goes_only_as_deep_as_the_threshold():
    predictor = fixed([0.35, 0.35, 0.2, 0.1])
    answer = predictor.deepest_confident(torch.tensor([0.35, 0.35, 0.2, 0.1]))
    assert (answer["rank"], answer["name"]) == ("genus", "Rosa")  # 0.70 for Rosa, no species reaches 0.4
    assert answer["text"] == "Rosa (genus); species uncertain"
    sure = predictor.deepest_confident(torch.tensor([0.9, 0.05, 0.03, 0.02]))
    assert (sure["rank"], sure["name"]) == ("species", "Rosa canina")
    family = predictor.deepest_confident(torch.tensor([0.2, 0.15, 0.3, 0.35]))
    assert (family["rank"], family["name"]) == ("family", "Rosaceae")


def test_answer_at_a_rank_and_subset():
    predictor = fixed([0.3, 0.3, 0.1, 0.3])
    image = Image.new("RGB", (40, 30))
    prediction = predictor.predict_images([image], rank="genus")[0]
    assert prediction.at_rank == {"rank": "genus", "name": "Rosa", "probability": pytest.approx(0.6)}
    assert prediction.top[0]["lineage"]["family"] == "Rosaceae"
    restricted = Predictor(TABLE, Preprocess(), predictor.run, subset=["Tulipa", "cherry"])
    top = restricted.predict_images([image])[0].top
    assert {t["id"] for t in top if t["probability"] > 0} == {"3", "4"}
    assert sum(t["probability"] for t in top) == pytest.approx(1.0)
    with pytest.raises(TaxoclipError, match="no class has the taxon 'Quercus'"):
        Predictor(TABLE, Preprocess(), predictor.run, subset=["Quercus"])


def test_calibration_table_counts_right_answers():
    probabilities = torch.tensor([[0.9, 0.05, 0.03, 0.02], [0.35, 0.35, 0.2, 0.1]])
    rows = honest_answer_table(probabilities, [0, 1], TABLE, [0.4])
    # Photo 1 answered at species (right), photo 2 at genus Rosa (right: its class is in Rosa).
    assert rows[0]["right_when_answered"] == 1.0 and rows[0]["answered_at_class"] == 0.5


def test_collect_photos_and_unreadable_files(tmp_path):
    (tmp_path / "a").mkdir()
    Image.new("RGB", (20, 20)).save(tmp_path / "a" / "x.jpg")
    (tmp_path / "a" / "broken.jpg").write_bytes(b"nope")
    (tmp_path / "a" / "notes.txt").write_text("skip me")
    photos = collect_photos([str(tmp_path / "a")])
    assert [p.name for p in photos] == ["broken.jpg", "x.jpg"]
    results = fixed([0.25] * 4).predict_paths(photos)
    assert results[0].error == "not an image" and results[1].error is None
    with pytest.raises(TaxoclipError, match="no such photo"):
        collect_photos([str(tmp_path / "missing.jpg")])


@pytest.mark.slow
def test_predict_cli_and_python_api_on_real_photos(quick_demo, flowers, capsys):
    model_dir = quick_demo / "model"
    model = taxoclip.load(model_dir)
    daisy_class = model.classes.ids[0]
    photos = sorted((flowers / "valid" / daisy_class).glob("*.jpg"))[:3]
    predictions = taxoclip.predict(model, [str(p) for p in photos], rank="family")
    assert all(p.top[0]["id"] == daisy_class for p in predictions)
    assert main(["predict", *map(str, photos), "--model", str(model_dir), "--format", "json", "-q"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert [r["top"][0]["id"] for r in printed] == [daisy_class] * 3


@pytest.mark.slow
def test_onnx_export_agrees_with_pytorch_and_predict_runs_it(quick_demo, flowers, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    from taxoclip.inference.export import OnnxClassifier, export_onnx

    model_dir = quick_demo / "model"
    path = export_onnx(model_dir, tmp_path / "model.onnx")
    model = taxoclip.load(model_dir)
    photos = [p for class_id in model.classes.ids for p in sorted((flowers / "valid" / class_id).glob("*.jpg"))[:2]]
    pixels = torch.stack([model.image_tower.preprocess.to_uint8(Image.open(p)) for p in photos])
    with torch.no_grad():
        expected = model.probabilities_from_features(model.image_tower.embed(pixels))
    got = OnnxClassifier(path)(pixels)
    got = got[0] if isinstance(got, tuple) else got  # (probabilities, novelty) with an open-set score
    assert torch.allclose(got, expected, atol=1e-4)
    assert torch.equal(got.argmax(1), expected.argmax(1))
    assert main(["predict", str(photos[0]), "--onnx", str(path), "--format", "json", "-q"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["top"][0]["id"] == model.classes.ids[0]


def test_predict_cli_errors_are_messages(tmp_path, capsys):
    assert main(["predict", str(tmp_path / "nothing.jpg"), "--model", str(tmp_path)]) == 2
    assert "no such photo" in capsys.readouterr().err
    shutil.copy(__file__, tmp_path / "x.jpg")
    assert main(["predict", str(tmp_path / "x.jpg"), "--model", str(tmp_path)]) == 2
    assert "not a taxoclip model" in capsys.readouterr().err
