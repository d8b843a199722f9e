import pytest

from taxoclip import ClassTable, Rank, TaxoclipError
from taxoclip.taxonomy import complete_ranks


def test_ranks_are_ordered_and_parse():
    assert Rank.KINGDOM < Rank.GENUS < Rank.SPECIES
    assert [r.column for r in Rank] == ["kingdom", "phylum", "class", "order", "family", "genus", "species"]
    assert Rank.parse(" Genus ") is Rank.GENUS
    with pytest.raises(TaxoclipError, match="unknown rank 'tribe'"):
        Rank.parse("tribe")


def test_complete_ranks_derives_genus_epithet_and_binomial():
    row = complete_ranks({"id": "1", "scientific_name": "Boissonneaua flavescens"})
    assert (row["genus"], row["specific_epithet"], row["species"]) == (
        "Boissonneaua",
        "flavescens",
        "Boissonneaua flavescens",
    )
    genus_only = complete_ranks({"id": "2", "genus": "Dahlia", "family": "Asteraceae"})
    assert genus_only["species"] == "" and genus_only["scientific_name"] == "Dahlia"


def test_class_table_keeps_order_extras_and_round_trips(tmp_path):
    table = ClassTable.from_records(
        [{"id": "b", "Common Name": "B", "habitat": "pond"}, {"id": "a", "common_name": "A"}], origin="t"
    )
    assert table.ids == ["b", "a"] and table.rows[1]["index"] == "1"
    assert table.rows[0]["common_name"] == "B" and table.extra_columns == ["habitat"]
    table.to_csv(tmp_path / "c.csv")
    again = ClassTable.from_csv(tmp_path / "c.csv")
    assert again.ids == table.ids and again.rows[0]["habitat"] == "pond"
    assert table.lineage(0)[Rank.SPECIES] == ""


def test_duplicate_class_ids_are_named():
    with pytest.raises(TaxoclipError, match=r"duplicate class id '7' \(rows 1 and 2\)"):
        ClassTable.from_records([{"id": "7"}, {"id": "7"}], origin="classes.csv")
