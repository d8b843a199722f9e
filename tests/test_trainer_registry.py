"""A new trainer is its settings, its trainer module and one line in the trainer table: the
command line then trains it, sweeps it, and `predict` opens what it wrote (tests/toy_trainer.py,
for the `toy` kind of tests/toy_kind.py)."""

from __future__ import annotations

import json

from taxoclip.apps.cli import main
from taxoclip.models import registry as kinds
from taxoclip.train import registry as trainers


def test_a_trainer_registered_in_one_line_trains_sweeps_and_predicts(
    colour_features, colour_shards, tmp_path, monkeypatch, capsys
):
    from taxoclip.data.shards import iter_tar_samples

    monkeypatch.setitem(
        trainers.TRAINERS,
        "toy",
        trainers.TrainerEntry("toy_trainer:ToySettings", "toy_trainer:train_toy", "class means", "toy_trainer:summary"),
    )
    monkeypatch.setitem(kinds.KINDS, "toy", "toy_kind:load_toy")
    model = tmp_path / "toy"
    assert main(["train", "toy", "--features", str(colour_features), "-o", str(model), "--spread", "0.5", "-q"]) == 0
    said = capsys.readouterr().out
    assert "toy: valid top-1" in said and json.loads((model / "config.json").read_text())["kind"] == "toy"
    sweep = tmp_path / "sweep"
    arguments = ["train", "sweep", "toy", "--features", str(colour_features), "-o", str(sweep)]
    assert main([*arguments, "--param", "spread", "--values", "0.5,1", "-q"]) == 0
    rows = json.loads((sweep / "sweep.json").read_text())["rows"]
    assert [r["spread"] for r in rows] == [0.5, 1.0] and (sweep / "spread-0.5" / "means.npy").exists()
    assert main([*arguments, "--param", "spread", "--values", "-1"]) == 2  # its own flag's check
    assert "--spread" in capsys.readouterr().err
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(next(iter_tar_samples(sorted(colour_shards.glob("valid-*.tar"))[0]))["jpg"])
    assert main(["predict", str(photo), "--model", str(model), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["top"]
