import csv
import json

import pytest

from conftest import write_classes_csv, write_image
from taxoclip import TaxoclipError
from taxoclip.data.sources import detect_format, load_source


def test_image_folder_with_splits_and_csv(image_folder):
    dataset = load_source(image_folder)
    assert dataset.source["format"] == "folder"
    assert dataset.classes.ids == ["1", "2", "3", "10"]  # natural order, not "1, 10, 2, 3"
    assert dataset.splits == ["train", "valid"]
    assert len(dataset.samples) == 4 * 7
    assert {s.split for s in dataset.only_split("val").samples} == {"valid"}
    row = dataset.classes.rows[1]
    assert (row["species"], row["family"], row["common_name"]) == ("Lathyrus odoratus", "Fabaceae", "sweet pea")


def test_image_folder_without_csv_uses_folder_names(tmp_path):
    write_image(tmp_path / "Quercus_robur" / "a.jpg", 1)
    write_image(tmp_path / "red fox" / "b.jpg", 2)
    dataset = load_source(tmp_path)
    rows = {r["id"]: r for r in dataset.classes}
    assert rows["Quercus_robur"]["scientific_name"] == "Quercus robur"
    assert rows["Quercus_robur"]["genus"] == "Quercus"
    assert rows["red fox"]["common_name"] == "red fox"
    assert {s.split for s in dataset.samples} == {"train"}


def test_class_with_images_but_no_metadata_is_named(image_folder):
    write_image(image_folder / "train" / "99" / "x.jpg", 5)
    with pytest.raises(TaxoclipError, match=r"have images but no row in .*classes.csv: '99'"):
        load_source(image_folder)


def test_duplicate_class_in_csv_is_an_error(image_folder):
    with open(image_folder / "classes.csv", "a") as handle:
        handle.write("2,another pea,Plantae,Fabaceae,Lathyrus,latifolius,Lathyrus latifolius\n")
    with pytest.raises(TaxoclipError, match="duplicate class id '2'"):
        load_source(image_folder)


def test_inat_coco_json(inat_json):
    dataset = load_source(inat_json)
    assert dataset.source["format"] == "inat"
    assert len(dataset.classes) == 3 and len(dataset.samples) == 6
    assert all(s.split == "train" for s in dataset.samples)
    first = dataset.classes.rows[0]
    assert (first["scientific_name"], first["supercategory"], first["order"]) == (
        "Oenothera speciosa",
        "Plants",
        "Fabales",
    )
    assert all(
        (inat_json.parent / "train").exists() and s.path.startswith(str(inat_json.parent)) for s in dataset.samples
    )


def test_inat_2017_style_and_bare_list(tmp_path):
    # 2017 categories carry only id, name and supercategory: genus and epithet come from the name.
    payload = {
        "images": [],
        "annotations": [],
        "categories": [{"id": 5, "name": "Vulpes vulpes", "supercategory": "Mammalia"}],
    }
    (tmp_path / "val2017.json").write_text(json.dumps(payload))
    row = load_source(tmp_path / "val2017.json").classes.rows[0]
    assert (row["genus"], row["specific_epithet"], row["supercategory"]) == ("Vulpes", "vulpes", "Mammalia")
    (tmp_path / "cats.json").write_text(json.dumps(payload["categories"]))
    assert load_source(tmp_path / "cats.json").classes.ids == ["5"]


def test_inat_directory_loads_train_and_val(inat_json):
    val = json.loads(inat_json.read_text())
    (inat_json.parent / "val.json").write_text(json.dumps(val))
    dataset = load_source(inat_json.parent)
    assert dataset.splits == ["train", "valid"] and len(dataset.samples) == 12


def test_inat_annotation_to_missing_image_is_named(tmp_path):
    bad = {"images": [], "annotations": [{"image_id": 3, "category_id": 0}], "categories": [{"id": 0, "name": "A b"}]}
    (tmp_path / "train.json").write_text(json.dumps(bad))
    with pytest.raises(TaxoclipError, match="image id 3"):
        load_source(tmp_path / "train.json")


def make_cub(root, with_attributes=True):
    classes = ["001.Black_footed_Albatross", "002.Laysan_Albatross"]
    (root / "images").mkdir(parents=True)
    lines_images, lines_labels, lines_split = [], [], []
    for n in range(4):
        folder = classes[n % 2]
        write_image(root / "images" / folder / f"{n}.jpg", n)
        lines_images.append(f"{n + 1} {folder}/{n}.jpg")
        lines_labels.append(f"{n + 1} {n % 2 + 1}")
        lines_split.append(f"{n + 1} {1 if n < 2 else 0}")
    (root / "classes.txt").write_text("".join(f"{i + 1} {c}\n" for i, c in enumerate(classes)))
    (root / "images.txt").write_text("\n".join(lines_images) + "\n")
    (root / "image_class_labels.txt").write_text("\n".join(lines_labels) + "\n")
    (root / "train_test_split.txt").write_text("\n".join(lines_split) + "\n")
    if with_attributes:
        (root / "attributes").mkdir()
        (root / "attributes" / "attributes.txt").write_text(
            "1 has_bill_shape::hooked_seabird\n2 has_wing_color::black\n"
        )
        (root / "attributes" / "class_attribute_labels_continuous.txt").write_text("80.0 10.0\n5.0 60.0\n")


def test_cub_folder_with_attributes(tmp_path):
    make_cub(tmp_path)
    assert detect_format(tmp_path) == "cub"
    dataset = load_source(tmp_path)
    assert [r["common_name"] for r in dataset.classes] == ["Black footed Albatross", "Laysan Albatross"]
    assert dataset.classes.rows[0]["attributes"] == "hooked seabird bill shape, black wing color"
    assert [s.split for s in dataset.samples] == ["train", "train", "test", "test"]


def test_cub_missing_file_is_named(tmp_path):
    make_cub(tmp_path, with_attributes=False)
    (tmp_path / "image_class_labels.txt").write_text("1 1\n")
    with pytest.raises(TaxoclipError, match=r"image 2 .* has no class label"):
        load_source(tmp_path)


def test_per_image_csv_bioclip_style(tmp_path):
    # BioCLIP's metadata: 'cls' is the taxonomic class and 'class' the binomial.
    with open(tmp_path / "metadata.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["", "kingdom", "phylum", "cls", "order", "family", "genus", "species", "common_name", "filepath", "class"]
        )
        for n, (genus, species, common) in enumerate(
            [("Vulpes", "vulpes", "red fox"), ("Vulpes", "vulpes", "red fox"), ("Canis", "lupus", "wolf")]
        ):
            write_image(tmp_path / "img" / f"{n}.jpg", n)
            writer.writerow(
                [
                    n,
                    "Animalia",
                    "Chordata",
                    "Mammalia",
                    "Carnivora",
                    "Canidae",
                    genus,
                    species,
                    common,
                    f"img/{n}.jpg",
                    f"{genus} {species}",
                ]
            )
    dataset = load_source(tmp_path / "metadata.csv")
    assert dataset.classes.ids == ["Vulpes vulpes", "Canis lupus"]
    row = dataset.classes.rows[0]
    assert (row["class"], row["specific_epithet"], row["species"]) == ("Mammalia", "vulpes", "Vulpes vulpes")
    assert len(dataset.samples) == 3


def test_per_image_csv_disagreeing_rows_are_named(tmp_path):
    (tmp_path / "m.csv").write_text("filepath,class_id,family\na.jpg,1,Canidae\nb.jpg,1,Felidae\n")
    with pytest.raises(TaxoclipError, match=r"line 3: class '1' has family='Felidae'"):
        load_source(tmp_path / "m.csv")


def test_unknown_file_type_and_missing_path(tmp_path):
    (tmp_path / "x.parquet").write_bytes(b"PAR1")
    with pytest.raises(TaxoclipError, match="pass --format"):
        load_source(tmp_path / "x.parquet")
    with pytest.raises(TaxoclipError, match="no such file"):
        load_source(tmp_path / "nope")


def test_classes_csv_override_for_folder(tmp_path):
    write_image(tmp_path / "data" / "1" / "a.jpg", 1)
    write_classes_csv(tmp_path / "meta.csv")
    dataset = load_source(tmp_path / "data", classes=tmp_path / "meta.csv")
    assert len(dataset.classes) == 4 and dataset.samples[0].class_id == "1"


def test_real_rare_species_metadata():
    from taxoclip.data.paths import optional_dataset

    root = optional_dataset("rare_species")
    if root is None:
        pytest.skip("../shared/data/rare_species is absent")
    dataset = load_source(root / "metadata.csv")
    assert len(dataset.classes) == 400 and len(dataset.samples) == 11983
    assert all(r["kingdom"] == "Animalia" and r["species"] for r in dataset.classes)
