import json

import pytest

from taxoclip.apps.cli import main


@pytest.mark.slow
def test_quick_demo_runs_the_whole_path_on_real_photos(quick_demo):
    """The README's main command, on 5 real classes: shards, features, LiT, zero-shot accuracy."""
    tmp_path = quick_demo
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["verify_ok"] and summary["classes"] == 5
    assert summary["features"]["count"] == sum(summary["images"].values())
    assert summary["lit"]["top1"] >= 0.6  # 5-way, chance is 20%
    assert (tmp_path / "model" / "accuracy.png").exists()


def test_demo_without_data_says_where_it_looked(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TAXOCLIP_DATA", str(tmp_path / "nowhere"))
    monkeypatch.setattr("taxoclip.data.paths.shared_data_dirs", lambda: [tmp_path / "nowhere"])
    assert main(["demo", "-o", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert "cannot find the flowers102 data" in error and "TAXOCLIP_DATA" in error
