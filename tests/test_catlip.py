"""CatLIP: labels from captions, the label head on the shared loop, Transfer Init, and the
catlip model kind through predict and eval."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import taxoclip
import taxoclip.train.loop as loop_module
from conftest import die_after_checkpoint, one_and_two_processes
from taxoclip import ClassTable, TaxoclipError
from taxoclip.apps.cli import main
from taxoclip.data.features import load_features
from taxoclip.data.labels import Vocabulary, build_vocabulary, class_labels, label_weight, taxonomy_labels
from taxoclip.models.catlip import (
    LabelHead,
    catlip_loss,
    class_head,
    fit_temperature,
    reference_moments,
    transfer_init,
)
from taxoclip.train.catlip import CatLIPConfig, train_catlip

ROW = {
    "kingdom": "Plantae",
    "family": "Fabaceae",
    "genus": "Lathyrus",
    "species": "Lathyrus odoratus",
    "common_name": "Sweet pea of the garden",
}


def wordnet_or_skip():
    from taxoclip.data.wordnet import wordnet

    try:
        return wordnet()
    except TaxoclipError as error:
        pytest.skip(f"WordNet is not installed here: {error}")


def test_taxonomy_labels_are_every_rank_and_the_common_words():
    assert taxonomy_labels(ROW) == [
        "kingdom:Plantae",
        "family:Fabaceae",
        "genus:Lathyrus",
        "species:Lathyrus odoratus",
        "common:sweet",
        "common:pea",
        "common:garden",
    ]
    assert label_weight("species:Lathyrus odoratus") > label_weight("genus:Lathyrus") > label_weight("kingdom:Plantae")


def test_wordnet_labels_longest_match_plurals_and_no_label():
    from taxoclip.data.labels import WordNetLabeller

    wordnet_or_skip()
    labeller = WordNetLabeller()
    assert labeller("A photo of the sweet pea") == ["sweet_pea.n.01"]  # one synset, not sweet + pea
    assert labeller("Two roses and a bee") == ["rose.n.01", "bee.n.01"]  # plural lemmatised, "two" an adjective
    assert labeller("A photo of the Xyzzyqua") == []  # the photo is boilerplate, the rest unknown


def test_vocabulary_threshold_cap_coverage_and_the_empty_case():
    table = ClassTable.from_records(
        [
            {"id": "1", "genus": "Rosa", "specific_epithet": "canina"},
            {"id": "2", "genus": "Rosa", "specific_epithet": "gallica"},
            {"id": "3", "genus": "Tulipa", "specific_epithet": "sylvestris"},
        ],
        origin="test",
    )
    per_class = class_labels(table, None, "taxonomy")
    vocabulary = build_vocabulary(table, per_class, [5, 1, 0], extractor="taxonomy", min_count=2)
    # Rosa is carried by 6 photos, R. canina by 5; R. gallica (1) is under the threshold and
    # Tulipa's photos are absent (0), so their labels are not in the vocabulary.
    assert vocabulary.labels == ["genus:Rosa", "species:Rosa canina"] and vocabulary.counts == [6, 5]
    assert vocabulary.class_labels == [[0, 1], [0], []]
    assert vocabulary.coverage["classes_without_label"] == 1
    assert vocabulary.coverage["classes_without_label_ids"] == ["3"]
    capped = build_vocabulary(table, per_class, [5, 1, 0], extractor="taxonomy", max_size=1)
    assert capped.labels == ["genus:Rosa"]
    with pytest.raises(TaxoclipError, match="vocabulary would be empty"):
        build_vocabulary(table, per_class, [5, 1, 0], extractor="taxonomy", min_count=100)


def test_loss_is_summed_over_labels_and_averaged_over_samples():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 0.0, 0.0]])
    targets = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    per_entry = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    assert catlip_loss(logits, targets) == pytest.approx(float(per_entry.sum() / 2))
    assert catlip_loss(logits, targets) == pytest.approx(float(per_entry.mean() * 3))


def test_transfer_init_rows_are_the_weighted_mean_and_likelihood_the_sum():
    labels = ["genus:Rosa", "species:Rosa canina", "family:Rosaceae"]
    weight, bias = torch.randn(3, 4), torch.randn(3)
    rows, biases, coverage = transfer_init(weight, bias, labels, [[0, 1, 2], [0, 2]], ["1", "2"])
    w = torch.tensor([32.0, 64.0, 16.0])
    assert torch.allclose(rows[0], (w[:, None] * weight).sum(0) / w.sum())
    assert torch.allclose(rows[1], (32 * weight[0] + 16 * weight[2]) / 48)
    assert torch.allclose(biases[1], (32 * bias[0] + 16 * bias[2]) / 48)
    assert coverage["deepest_rank"] == {"species": 1, "genus": 1}
    sums, _, _ = transfer_init(weight, bias, labels, [[0, 1, 2], [0, 2]], ["1", "2"], scoring="likelihood")
    assert torch.allclose(sums[1], weight[0] + weight[2])
    with pytest.raises(TaxoclipError, match="1 of 2 classes share no label with the model's vocabulary \\(2\\)"):
        transfer_init(weight, bias, labels, [[0], []], ["1", "2"])


def test_standardised_scores_put_every_class_on_one_scale_over_the_training_photos():
    torch.manual_seed(0)
    embeddings = torch.randn(400, 8) * 3 + 1
    head = LabelHead(8, 3, embeddings.mean(0), embeddings.std(0))
    with torch.no_grad():
        head.linear.weight.copy_(torch.randn(3, 8))
        head.linear.weight[2] *= 25  # label 2 swings far more than the others
    class_rows = [[0], [1], [1, 2]]  # class 3's summed logits inherit label c's swing
    vocabulary = Vocabulary("taxonomy", "paper", ["a", "b", "c"], [1, 1, 1], ["1", "2", "3"], class_rows)
    reference = reference_moments(head, embeddings)
    plain, _ = class_head(head, vocabulary, class_rows, ["1", "2", "3"], "likelihood")
    standard, _ = class_head(head, vocabulary, class_rows, ["1", "2", "3"], "standardised", reference=reference)
    scores = standard(embeddings)
    assert torch.allclose(scores.mean(0), torch.zeros(3), atol=1e-4)
    assert torch.allclose(scores.std(0), torch.ones(3), atol=1e-4)
    # The wide class wins about half the photos by its scale alone; on one scale the wins even out.
    wins = lambda logits: torch.bincount(logits.argmax(1), minlength=3) / len(logits)  # noqa: E731
    assert wins(plain(embeddings))[2] > 0.45 and wins(scores).max() < 0.45
    with pytest.raises(TaxoclipError, match=r"reference\.safetensors"):
        class_head(head, vocabulary, class_rows, ["1", "2", "3"], "standardised")


def settings(features, out, **overrides):
    values = dict(features=str(features), output=str(out), batch_size=32, epochs=8, lr=1e-2, progress=False)
    return CatLIPConfig(**values | overrides)


def test_catlip_learns_and_its_model_serves_predict_and_eval(colour_features, colour_shards, tmp_path, capsys):
    final = train_catlip(settings(colour_features, tmp_path / "m"))
    assert final["top1"] >= 0.9
    model = taxoclip.load(tmp_path / "m")
    assert model.kind == "catlip" and model.classes.ids == ["1", "2", "3", "4", "5", "6"]
    x, y = load_features(colour_features).split("valid")
    assert (model.probabilities_from_features(x).argmax(-1).numpy() == y).mean() == pytest.approx(final["top1"])
    photo = tmp_path / "photo.jpg"
    from taxoclip.data.shards import iter_tar_samples

    photo.write_bytes(next(iter_tar_samples(sorted(colour_shards.glob("valid-*.tar"))[0]))["jpg"])
    assert main(["predict", str(photo), "--model", str(tmp_path / "m"), "--format", "json", "-q"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["top"]
    assert (
        main(["eval", "--model", str(tmp_path / "m"), "--data", str(colour_features), "-o", str(tmp_path / "r"), "-q"])
        == 0
    )
    report = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert report["metrics"]["top1"] == pytest.approx(final["top1"])


def count_epochs(monkeypatch) -> list[int]:
    """The epochs the shared loop trains from now on (1-based), recorded as they run."""
    ran, original = [], loop_module.train_epoch

    def counting(model, trainer, optimizer, epoch, *args, **kwargs):
        ran.append(epoch + 1)
        return original(model, trainer, optimizer, epoch, *args, **kwargs)

    monkeypatch.setattr(loop_module, "train_epoch", counting)
    return ran


def test_killed_and_resumed_catlip_run_ends_like_an_uninterrupted_one(colour_features, tmp_path, monkeypatch):
    train_catlip(settings(colour_features, tmp_path / "clean", epochs=3))
    die_after_checkpoint(
        monkeypatch, 1, lambda: train_catlip(settings(colour_features, tmp_path / "resumed", epochs=3))
    )
    epochs_run = count_epochs(monkeypatch)
    train_catlip(settings(colour_features, tmp_path / "resumed", epochs=3))
    assert epochs_run == [2, 3]  # it went on from the checkpoint, not from scratch
    clean = load_file(str(tmp_path / "clean" / "head.safetensors"))
    resumed = load_file(str(tmp_path / "resumed" / "head.safetensors"))
    for key in clean:
        assert torch.equal(clean[key], resumed[key]), key


def test_held_out_species_are_scored_through_the_labels_they_share(colour_features, tmp_path):
    final = train_catlip(settings(colour_features, tmp_path / "m", holdout=2))
    assert final["unseen_count"] == 10 and 0 <= final["unseen_top1"] <= 1
    model = taxoclip.load(tmp_path / "m")
    held_out = model.training["held_out"]
    vocabulary = Vocabulary.load(tmp_path / "m" / "vocabulary.json")
    for c in held_out:  # never trained: its species label is not in the vocabulary, its genus is
        row = model.classes.rows[c]
        assert f"species:{row['species']}" not in vocabulary.labels
        assert f"genus:{row['genus']}" in vocabulary.labels
    # Any other class table: classes sharing a genus are scored; one sharing nothing is refused.
    new = ClassTable.from_records([{"id": "a", "genus": "Genus1", "specific_epithet": "novus"}], origin="new")
    width = model.config["width"]
    assert model.for_classes(new).probabilities_from_features(np.zeros((1, width), np.float32)).shape == (1, 1)
    alien = ClassTable.from_records([{"id": "z", "genus": "Nothing", "specific_epithet": "alike"}], origin="new")
    with pytest.raises(TaxoclipError, match="share no label"):
        model.for_classes(alien)


def test_a_model_trained_with_standardised_scoring_keeps_its_reference(colour_features, tmp_path, capsys):
    out = tmp_path / "m"
    arguments = ["train", "catlip", "--features", str(colour_features), "-o", str(out), "--epochs", "4"]
    assert main([*arguments, "--holdout", "2", "--scoring", "standardised", "--batch-size", "32", "-q"]) == 0
    model = taxoclip.load(out)
    assert model.scoring == "standardised" and (out / "reference.safetensors").exists()
    train_x, train_y = load_features(colour_features).split("train")
    trained_on = train_x[~np.isin(train_y, model.held_out)]  # the photos the reference describes
    scores = model.logits_from_features(trained_on) * model.temperature  # before the temperature
    assert torch.allclose(scores.mean(0), torch.zeros(len(model.classes)), atol=1e-3)
    assert torch.allclose(scores.std(0), torch.ones(len(model.classes)), atol=1e-3)
    model.use_scoring("likelihood")  # the same label layer, scored the other way
    assert not torch.allclose(model.logits_from_features(trained_on) * model.temperature, scores)
    (out / "reference.safetensors").unlink()  # a model from before the reference was kept
    assert main(["eval", "--model", str(out), "--data", str(colour_features), "-o", str(tmp_path / "r"), "-q"]) == 2
    assert "reference.safetensors" in capsys.readouterr().err
    with pytest.raises(SystemExit) as refused:  # refused while parsing, naming the choices
        main([*arguments, "--scoring", "mean", "-q"])
    assert refused.value.code == 2 and "standardised" in capsys.readouterr().err


def test_eval_and_predict_choose_the_scoring_of_a_trained_model(colour_features, tmp_path, capsys):
    train_catlip(settings(colour_features, tmp_path / "m", holdout=2, epochs=4))  # likelihood, the default
    model = taxoclip.load(tmp_path / "m")
    x, y = load_features(colour_features).split("valid")
    trained_temperature = model.temperature
    model.use_scoring("standardised")
    logits = model.logits_from_features(x)
    expected = float((logits.argmax(-1).numpy() == y).mean())
    # the temperature fitted on valid for this scoring, not the trained scoring's
    assert model.temperature != trained_temperature
    assert fit_temperature(logits * model.temperature, torch.from_numpy(y).long()) == pytest.approx(model.temperature)
    arguments = ["eval", "--model", str(tmp_path / "m"), "--data", str(colour_features), "--no-baselines", "-q"]
    assert main([*arguments, "-o", str(tmp_path / "r"), "--scoring", "standardised"]) == 0
    report = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert report["scoring"] == "standardised" and report["metrics"]["top1"] == pytest.approx(expected)
    assert "scoring standardised" in (tmp_path / "r" / "report.md").read_text()
    assert main([*arguments, "-o", str(tmp_path / "r2")]) == 0  # the model's own: likelihood
    assert json.loads((tmp_path / "r2" / "metrics.json").read_text())["scoring"] == "model default"
    classes = tmp_path / "classes.csv"
    model.classes.to_csv(classes)
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(b"not needed: refused first")
    refused = ["predict", str(photo), "--model", "open_clip:ViT-B-32", "--classes", str(classes), "--scoring"]
    assert main([*refused, "standardised", "-q"]) == 2
    assert "leave out --scoring" in capsys.readouterr().err


def test_two_processes_under_torchrun_match_one(colour_features, tmp_path):
    arguments = [
        "train",
        "catlip",
        "--features",
        str(colour_features),
        "--batch-size",
        "32",
        "--epochs",
        "2",
        "--lr",
        "0.01",
        "-q",
    ]
    double = one_and_two_processes(
        arguments,
        tmp_path,
    )
    rows = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [row["samples_by_rank"] for row in rows] == [[48, 48], [48, 48]]
    assert double.stdout.count("kind catlip") == 1
    one = load_file(str(tmp_path / "one" / "head.safetensors"))
    two = load_file(str(tmp_path / "two" / "head.safetensors"))
    for key in one:
        assert torch.allclose(one[key], two[key], atol=1e-5, rtol=1e-4), key


def test_labels_command_and_its_errors(image_folder, tmp_path, capsys):
    assert main(["labels", str(image_folder), "-o", str(tmp_path / "v.json")]) == 0
    vocabulary = Vocabulary.load(tmp_path / "v.json")
    assert "genus:Lathyrus" in vocabulary.labels and vocabulary.counted == "images"
    assert vocabulary.counts[vocabulary.labels.index("genus:Lathyrus")] == 10  # 2 classes x 5 train photos
    assert main(["labels", str(image_folder), "-o", str(tmp_path / "w.json"), "--min-count", "1000"]) == 2
    assert "vocabulary would be empty" in capsys.readouterr().err
    assert main(["train", "catlip", "--features", str(tmp_path), "-o", str(tmp_path / "m"), "-q"]) == 2
    assert "not a feature cache" in capsys.readouterr().err


def test_temperature_scaling_recovers_an_overconfident_scale():
    from taxoclip.models.catlip import fit_temperature

    generator = torch.Generator().manual_seed(0)
    true_logits = torch.randn(4000, 10, generator=generator)
    labels = torch.multinomial(true_logits.softmax(-1), 1, generator=generator).squeeze(1)
    assert fit_temperature(3 * true_logits, labels) == pytest.approx(3, rel=0.15)


def tower_settings(shards, out, depth: str, **overrides) -> CatLIPConfig:
    """CatLIP settings that train a random-weight tiny EfficientNet's stages on the colour photos."""
    values = dict(output=str(out), depth=depth, shards=str(shards), tower="timm:test_efficientnet", pretrained=False)
    values |= dict(batch_size=32, lr=1e-2, tower_lr=1e-3, progress=False)
    return CatLIPConfig(**values | overrides)


def test_upper_stages_train_on_cached_activations_and_the_model_predicts_photos(colour_shards, tmp_path):
    """--depth upper: the lower stages run once (their activations cached), the last stage and
    the label layer train; the saved model runs the whole changed tower on photos."""
    from taxoclip.data.images import decode_image
    from taxoclip.data.shards import iter_tar_samples
    from taxoclip.models.split import split_tower
    from taxoclip.models.towers import create_image_tower

    final = train_catlip(tower_settings(colour_shards, tmp_path / "m", "upper", epochs=6))
    assert final["top1"] >= 0.8
    activations = load_features(tmp_path / "m" / "activations")
    tower = create_image_tower("timm:test_efficientnet", pretrained=False)
    lower, upper = split_tower(tower, 1)
    assert activations.meta["tower"]["name"] == "timm:test_efficientnet|lower:4"
    assert activations.features.shape[1] == lower.width
    # The split is exact: lower then upper is the whole tower.
    size = tower.preprocess.size
    pixels = torch.randint(0, 255, (2, 3, size, size), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.allclose(upper.eval()(lower.embed(pixels).clone()), tower.embed(pixels), atol=1e-4)
    # The model directory carries the trained tower: photos give what the training evaluated.
    model = taxoclip.load(tmp_path / "m")
    trained = load_file(str(tmp_path / "m" / "image_tower.safetensors"))
    assert any(not torch.equal(trained[k], v) for k, v in tower.state_dict().items())
    assert all(torch.equal(trained[k], v.cpu()) for k, v in model.image_tower.state_dict().items())
    samples = [s for tar in sorted(colour_shards.glob("valid-*.tar")) for s in iter_tar_samples(tar)]
    predictions = model.classify_images([decode_image(s["jpg"]) for s in samples]).argmax(-1)
    truth = torch.tensor([int(s["cls"]) for s in samples])
    assert float((predictions == truth).float().mean()) == pytest.approx(final["top1"], abs=0.05)


def test_whole_tower_trains_on_augmented_photos(colour_shards, tmp_path):
    final = train_catlip(tower_settings(colour_shards, tmp_path / "m", "full", epochs=4))
    assert final["top1"] >= 0.8
    rows = [json.loads(line) for line in (tmp_path / "m" / "metrics.jsonl").read_text().splitlines()]
    assert all(row["samples"] == 96 for row in rows)  # 3 steps of 32 of the 96 training photos
    model = taxoclip.load(tmp_path / "m")
    trained = load_file(str(tmp_path / "m" / "image_tower.safetensors"))
    assert all(torch.equal(trained[k], v.cpu()) for k, v in model.image_tower.state_dict().items())


def test_crop_and_flip_keeps_the_size_and_is_reproducible():
    from taxoclip.train.photos import crop_and_flip

    pixels = torch.arange(2 * 3 * 16 * 16, dtype=torch.int64).remainder(256).to(torch.uint8).view(2, 3, 16, 16)
    once = crop_and_flip(pixels, torch.Generator().manual_seed(1))
    again = crop_and_flip(pixels, torch.Generator().manual_seed(1))
    assert once.shape == pixels.shape and once.dtype == torch.uint8
    assert torch.equal(once, again) and not torch.equal(once, pixels)


def test_a_vocabulary_of_other_species_is_refused_when_it_cannot_tell_these_apart(colour_features, tmp_path, capsys):
    """A vocabulary made from other species keeps only their families for these classes: three
    classes to a label set, a model that cannot tell them apart. Refused, both class tables named."""
    labels = ["family:Family0", "family:Family1", "genus:Quercus"]
    oaks = Vocabulary("taxonomy", "paper", labels, [9, 9, 9], ["q1", "q2"], [[0, 2], [1, 2]])
    oaks.save(tmp_path / "oaks.json")
    arguments = ["train", "catlip", "--features", str(colour_features), "--epochs", "1", "-q"]
    assert main([*arguments, "-o", str(tmp_path / "m"), "--vocabulary", str(tmp_path / "oaks.json")]) == 2
    said = capsys.readouterr().err
    assert "made from other classes (2: q1, q2)" in said and "cannot be told apart" in said and "family:Family" in said
