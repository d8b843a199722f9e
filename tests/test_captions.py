import json

import pytest

from taxoclip import ClassTable, TaxoclipError
from taxoclip.data.captions import build_captions, choose_columns, template_captions
from taxoclip.data.sources import load_source


def table(rows):
    return ClassTable.from_records(rows, origin="test")


def test_choose_columns_prefers_fewest_collisions_then_fewest_words():
    classes = table(
        [
            {"id": "1", "common_name": "oak", "genus": "Quercus", "family": "Fagaceae"},
            {"id": "2", "common_name": "oak", "genus": "Lithocarpus", "family": "Fagaceae"},
            {"id": "3", "common_name": "beech", "genus": "Fagus", "family": "Fagaceae"},
        ]
    )
    choice = choose_columns(classes)
    # common_name alone leaves 2 classes sharing "oak"; genus alone separates all with 1 word each.
    assert choice.columns == ("genus",) and choice.collisions == 0


def test_choose_columns_reports_remaining_collisions():
    classes = table(
        [{"id": "1", "common_name": "oak"}, {"id": "2", "common_name": "oak"}, {"id": "3", "common_name": "ash"}]
    )
    choice = choose_columns(classes)
    assert choice.collisions == 2 and choice.examples == (("1", "2"),)
    assert "2 classes share a caption" in choice.describe()


def test_choice_is_deterministic_whatever_the_run():
    rows = [{"id": str(i), "common_name": f"n{i % 7}", "genus": f"G{i % 11}", "family": f"F{i % 3}"} for i in range(60)]
    assert choose_columns(table(rows)) == choose_columns(table(rows))


def test_every_style_present_and_never_empty():
    captions = build_captions(
        table([{"id": "x", "scientific_name": "Dahlia"}, {"id": "y", "common_name": "rose"}]), "common"
    )
    assert captions.captions() == ["A photo of the Dahlia", "A photo of the rose"]  # falls back to the scientific name
    assert set(captions.by_class[0]) == {"auto", "paper", "scientific", "common", "taxonomic", "taxonomic_common"}
    with pytest.raises(TaxoclipError, match="unknown caption style"):
        build_captions(table([{"id": "x", "common_name": "a"}]), "poetic")


def test_templates_use_the_display_name():
    assert template_captions({"id": "1", "common_name": "sweet pea"})[0] == "a photo of a sweet pea."


def test_paper_caption_on_real_inat2021(inat2021_categories):
    dataset = load_source(inat2021_categories)
    captions = build_captions(dataset.classes, "paper")
    index = next(i for i, r in enumerate(dataset.classes) if r["scientific_name"] == "Boissonneaua flavescens")
    assert captions.captions("paper")[index] == "A photo of the Buff-tailed Coronet Birds Boissonneaua flavescens"


def test_auto_columns_leave_no_shared_caption_on_real_inat2021(inat2021_categories):
    dataset = load_source(inat2021_categories)
    captions = build_captions(dataset.classes, "auto")
    assert len(dataset.classes) == 10000
    assert captions.choice.collisions == 0 and captions.collisions("auto") == 0


def test_captions_cli_writes_csv_and_config(image_folder, tmp_path):
    from taxoclip.apps.cli import main

    out = tmp_path / "captions.csv"
    assert main(["captions", str(image_folder), "--style", "paper", "-o", str(out)]) == 0
    lines = out.read_text().splitlines()
    assert lines[1].startswith("0,1,A photo of the pink primrose Oenothera speciosa,")
    assert json.loads(out.with_suffix(".json").read_text())["style"] == "paper"
