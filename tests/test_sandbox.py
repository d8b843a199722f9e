"""Bad input across every command, in a sandbox: each case must end in exit 2 with a message
naming the file, class or argument at fault, and leave every file outside its output exactly as
it was (nothing written, moved or deleted elsewhere; the working directory untouched).

Each case is (command line with placeholders, what the message must name[, exit code if not 2]).
Placeholders:
PHOTOS (a small image folder with classes.csv), FEATURES (a feature cache), SHARDS (shards of
PHOTOS), MODEL (a trained LiT-free finetune model), OUT (the case's output, which does not exist
yet), and files the case's ``prepare`` makes in the sandbox.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from taxoclip.apps.cli import main


def snapshot(root: Path, skip: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` but ``skip``: (size, modification time in ns)."""
    files = {}
    for path in root.rglob("*"):
        if path == skip or skip in path.parents or (not path.is_file() and not path.is_symlink()):
            continue
        if path.name in (".verified.json", "novelty.json", "novelty.safetensors", "README.md", "evaluations.json"):
            continue  # derived data kept beside what was read, by design: shards' checksums, a model's open-set
            # score and its model card (made again when the model directory learns something about itself)
        stat = path.lstat()
        files[str(path.relative_to(root))] = (stat.st_size, stat.st_mtime_ns)
    return files


def garbage(path: Path, text: str = "not what it should be") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def sandbox_assets(tmp_path_factory, colour_features):
    """A small image folder, its shards, a feature cache and a finetune model, made once."""
    from conftest import write_classes_csv, write_image
    from taxoclip.train.finetune import FinetuneConfig, train_finetune

    root = tmp_path_factory.mktemp("assets")
    photos = root / "photos"
    for index, class_id in enumerate(["1", "2", "3", "10"]):
        for split, n in (("train", 4), ("valid", 1)):
            for i in range(n):
                write_image(photos / split / class_id / f"img_{i}.jpg", 10 * index + i)
    write_classes_csv(photos / "classes.csv")
    assert main(["shards", str(photos), "-o", str(root / "shards"), "-q"]) == 0
    model = root / "model"
    train_finetune(FinetuneConfig(output=str(model), features=str(colour_features), epochs=1, progress=False))
    return {"PHOTOS": photos, "SHARDS": root / "shards", "FEATURES": Path(colour_features), "MODEL": model}


def nan_cache(box: Path, assets) -> Path:
    copy = box / "nan-cache"
    shutil.copytree(assets["FEATURES"], copy)
    features = np.load(copy / "features.npy")
    features[3, :] = np.nan
    np.save(copy / "features.npy", features)
    return copy


def cache_without_class(box: Path, assets) -> Path:
    copy = box / "short-cache"
    shutil.copytree(assets["FEATURES"], copy)
    meta = json.loads((copy / "meta.json").read_text())
    labels, splits = np.load(copy / "labels.npy"), np.load(copy / "splits.npy")
    splits[labels == 5] = meta["split_names"].index("valid")
    np.save(copy / "splits.npy", splits)
    return copy


def shards_pointing_outside(box: Path, assets) -> Path:
    copy = box / "bad-shards"
    shutil.copytree(assets["SHARDS"], copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["shards"][0]["name"] = "../../elsewhere/train-000000.tar"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def truncated_shards(box: Path, assets) -> Path:
    copy = box / "cut-shards"
    shutil.copytree(assets["SHARDS"], copy)
    shard = sorted(copy.glob("train-*.tar"))[0]
    shard.write_bytes(shard.read_bytes()[:-1024])
    return copy


def damaged_model(box: Path, assets) -> Path:
    copy = box / "damaged-model"
    shutil.copytree(assets["MODEL"], copy)
    (copy / "head.safetensors").write_bytes(b"\x80\x04pickle, not safetensors")
    return copy


def foreign_kind(box: Path, assets) -> Path:
    copy = box / "future-model"
    shutil.copytree(assets["MODEL"], copy)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps(config | {"kind": "hologram"}))
    return copy


def rewrite_shard(box: Path, assets, name: str, change) -> Path:
    """A copy of the shards whose first train shard is ``change(bytes)``, with the manifest updated
    to match (size and checksum), as a crafted or carelessly repaired folder would be."""
    import hashlib

    copy = box / name
    shutil.copytree(assets["SHARDS"], copy)
    (copy / ".verified.json").unlink(missing_ok=True)
    manifest = json.loads((copy / "manifest.json").read_text())
    entry = next(s for s in manifest["shards"] if s["name"].startswith("train-"))
    shard = copy / entry["name"]
    shard.write_bytes(change(shard.read_bytes()))
    entry["bytes"], entry["sha256"] = shard.stat().st_size, hashlib.sha256(shard.read_bytes()).hexdigest()
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def cut_with_manifest(box: Path, assets) -> Path:
    return rewrite_shard(box, assets, "cut-matching", lambda data: data[: len(data) // 2 + 700])


def dotted_members(box: Path, assets) -> Path:
    import io
    import tarfile

    def add_members(data: bytes) -> bytes:
        out = io.BytesIO()
        with tarfile.open(fileobj=io.BytesIO(data)) as source, tarfile.open(fileobj=out, mode="w") as target:
            for member in source:
                target.addfile(member, source.extractfile(member))
            for name in (".hidden.json", "../escape.jpg", "./x.cls"):
                info = tarfile.TarInfo(name)
                info.size = 2
                target.addfile(info, io.BytesIO(b"{}"))
        return out.getvalue()

    return rewrite_shard(box, assets, "dotted", add_members)


def half_written_cache(box: Path, assets) -> Path:
    """OUT itself: a features output folder whose meta.json was cut short (a full disk, a kill)."""
    out = box / "out"
    shutil.copytree(assets["FEATURES"], out)
    (out / "meta.json").write_text((out / "meta.json").read_text()[:40])
    return out


def pickled_optimiser(box: Path, assets) -> Path:
    import pickle

    copy = box / "out"  # the run's own output: resuming it reads the checkpoint
    shutil.copytree(assets["MODEL"], copy)
    (copy / "checkpoint" / "optimizer.pt").write_bytes(pickle.dumps({"state": {}, "param_groups": print}))
    return copy


def pickled_checkpoint_weights(box: Path, assets) -> Path:
    import pickle

    copy = box / "out"
    shutil.copytree(assets["MODEL"], copy)
    (copy / "checkpoint" / "model.safetensors").write_bytes(pickle.dumps({"weight": [1.0]}))
    return copy


def kind_as_list(box: Path, assets) -> Path:
    copy = box / "kind-list"
    shutil.copytree(assets["MODEL"], copy)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps(config | {"kind": ["finetune"]}))
    return copy


def config_as_list(box: Path, assets) -> Path:
    copy = box / "config-list"
    shutil.copytree(assets["MODEL"], copy)
    (copy / "config.json").write_text(json.dumps([json.loads((copy / "config.json").read_text())]))
    return copy


def questions_of_other_photos(box: Path, assets) -> Path:
    """Questions made from the shards: their keys (train-0000000 ...) exist in the feature cache too,
    which embeds other photos."""
    assert main(["questions", str(assets["SHARDS"]), "-o", str(box / "qa.jsonl")]) == 0
    return box / "qa.jsonl"


def ragged_csv(box: Path, assets) -> Path:
    return garbage(
        box / "ragged.csv", "class_id,genus,specific_epithet\n1,Rosa,canina\n2,Tulipa\n3,Bellis,perennis,extra\n"
    )


def a_file(box: Path, assets) -> Path:
    return garbage(box / "notes.txt", "mine")


def bad_json(box: Path, assets) -> Path:
    return garbage(box / "inat.json", "{ this is not json")


def empty_folder(box: Path, assets) -> Path:
    (box / "empty").mkdir()
    return box / "empty"


def onnx_garbage(box: Path, assets) -> Path:
    return garbage(box / "model.onnx", "not an onnx file")


def no_photos(box: Path, assets) -> Path:
    return box / "missing.jpg"


QUIET = ("shards", "features", "train", "eval", "predict")  # the commands with a -q flag

PREPARE = {
    "NANCACHE": nan_cache,
    "NOCLASS": cache_without_class,
    "OUTSIDE": shards_pointing_outside,
    "CUT": truncated_shards,
    "DAMAGED": damaged_model,
    "FOREIGN": foreign_kind,
    "RAGGED": ragged_csv,
    "AFILE": a_file,
    "BADJSON": bad_json,
    "EMPTY": empty_folder,
    "BADONNX": onnx_garbage,
    "MISSING": no_photos,
    "CUTMATCH": cut_with_manifest,
    "DOTTED": dotted_members,
    "HALFMETA": half_written_cache,
    "PICKLEDOPT": pickled_optimiser,
    "PICKLEDWEIGHTS": pickled_checkpoint_weights,
    "KINDLIST": kind_as_list,
    "CONFIGLIST": config_as_list,
    "OTHERQA": questions_of_other_photos,
}

CASES = [
    # classes / captions
    (["classes", "MISSING", "-o", "OUT/c.csv"], "missing.jpg"),
    (["classes", "BADJSON", "-o", "OUT/c.csv"], "inat.json"),
    (["classes", "RAGGED", "-o", "OUT/c.csv"], "line 4"),  # a short row reads as empty fields; a long one cannot
    (["classes", "PHOTOS", "-o", "AFILE/c.csv"], "notes.txt"),
    (["captions", "EMPTY", "-o", "OUT/c.csv"], "empty"),
    # questions
    (["questions", "PHOTOS", "-o", "OUT/qa.jsonl", "--types", "riddles"], "riddles"),
    (["questions", "MISSING", "-o", "OUT/qa.jsonl"], "missing.jpg"),
    (["questions", "PHOTOS", "-o", "AFILE/qa.jsonl"], "notes.txt"),
    # shards
    (["shards", "EMPTY", "-o", "OUT"], "empty"),
    (["shards", "PHOTOS", "-o", "AFILE"], "notes.txt"),
    (["shards", "verify", "EMPTY"], "manifest.json"),
    (["shards", "verify", "OUTSIDE"], "is not a file in"),
    (["shards", "verify", "CUT"], "train-000000.tar", 1),  # a verification that found problems: exit 1, listed
    # features
    (["features", "MISSING", "-o", "OUT", "--tower", "timm:test_efficientnet", "--random-weights"], "missing.jpg"),
    (["features", "OUTSIDE", "-o", "OUT", "--tower", "timm:test_efficientnet", "--random-weights"], "is not a file in"),
    (["features", "CUT", "-o", "OUT", "--tower", "timm:test_efficientnet", "--random-weights"], "the shard changed"),
    (["features", "PHOTOS", "-o", "OUT", "--tower", "no-such-tower"], "no-such-tower"),
    (["features", "PHOTOS", "-o", "AFILE", "--tower", "timm:test_efficientnet", "--random-weights"], "notes.txt"),
    # labels
    (["labels", "MISSING", "-o", "OUT/v.json"], "missing.jpg"),
    (["labels", "PHOTOS", "-o", "OUT/v.json", "--min-count", "1000"], "vocabulary would be empty"),
    # train lit / catlip / finetune / sweep
    (["train", "lit", "--features", "EMPTY", "-o", "OUT"], "not a feature cache"),
    (["train", "lit", "--features", "NANCACHE", "-o", "OUT", "--text-tower", "hf:/nowhere"], "features.npy"),
    (["train", "catlip", "--features", "EMPTY", "-o", "OUT"], "not a feature cache"),
    (["train", "catlip", "--depth", "upper", "-o", "OUT"], "--shards"),
    (["train", "catlip", "--features", "NANCACHE", "-o", "OUT"], "NaN"),
    (["train", "finetune", "--features", "EMPTY", "-o", "OUT"], "not a feature cache"),
    (["train", "finetune", "--features", "NOCLASS", "-o", "OUT"], "no training photo (6)"),
    (["train", "finetune", "--features", "FEATURES", "-o", "OUT", "--balance", "4", "--class-weighted"], "choose one"),
    (["train", "finetune", "--features", "FEATURES", "-o", "OUT", "--cutmix", "1"], "--depth full"),
    (["train", "finetune", "--shards", "SHARDS", "--depth", "full", "-o", "OUT", "--tower", "timm:nat_tiny"], "NAT"),
    (["train", "finetune", "--shards", "SHARDS", "--depth", "full", "-o", "OUT", "--tower", "timm:no_net"], "no_net"),
    (["train", "finetune", "--features", "FEATURES", "-o", "OUT", "--holdout", "2"], "--holdout"),
    (["train", "finetune", "--features", "FEATURES", "-o", "OUT", "--patience", "2", "--select", "0"], "--select"),
    (
        ["train", "sweep", "finetune", "--features", "FEATURES", "-o", "OUT", "--param", "colour", "--values", "1"],
        "colour",
    ),
    (
        ["train", "sweep", "finetune", "--features", "FEATURES", "-o", "OUT", "--param", "lr", "--values", "fast"],
        "fast",
    ),
    # a sweep value passes the setting's own flag: its range (no NaN, no infinity) and its choices
    (["train", "sweep", "finetune", "--features", "FEATURES", "-o", "OUT", "--param", "lr", "--values", "nan"], "nan"),
    (
        ["train", "sweep", "finetune", "--features", "FEATURES", "-o", "OUT", "--param", "lr", "--values", "inf"],
        "finit",
    ),
    (
        ["train", "sweep", "finetune", "--features", "FEATURES", "-o", "OUT", "--param", "head", "--values", "../x"],
        "choose from linear, mlp",
    ),
    (
        ["train", "sweep", "finetune", "--features", "FEATURES", "-o", "OUT", "--param", "balance", "--values", "0,3"],
        "at least 1",
    ),
    (
        ["train", "sweep", "finetune", "--features", "FEATURES", "-o", "OUT", "--param", "tower", "--values", "a,b"],
        "no effect at --depth head",
    ),
    # a free-text value that names a folder outside: its run still lives inside OUT
    (
        ["train", "sweep", "lit", "--features", "FEATURES", "-o", "OUT", "--param", "text_tower"]  # noqa: RUF005
        + ["--values", "../../elsewhere"],
        "elsewhere",
    ),
    # eval
    (["eval", "--model", "EMPTY", "--data", "FEATURES", "-o", "OUT"], "config.json"),
    (["eval", "--model", "MODEL", "--data", "MISSING", "-o", "OUT"], "missing.jpg"),
    (["eval", "--model", "FOREIGN", "--data", "FEATURES", "-o", "OUT"], "hologram"),
    (["eval", "--model", "DAMAGED", "--data", "FEATURES", "-o", "OUT"], "damaged"),
    (["eval", "--model", "MODEL", "--data", "FEATURES", "-o", "OUT", "--split", "test"], "test"),
    # predict / export / serve
    (["predict", "MISSING", "--model", "MODEL"], "missing.jpg"),
    (["predict", "PHOTOS", "--model", "DAMAGED"], "damaged"),
    (["predict", "PHOTOS", "--onnx", "BADONNX"], "model.onnx"),
    (["predict", "PHOTOS", "--model", "MODEL", "--subset", ",,,"], "--subset"),
    (["predict", "PHOTOS", "--model", "MODEL", "--subset", "Nonexistentia"], "Nonexistentia"),
    (["export", "onnx", "--model", "EMPTY", "-o", "OUT/m.onnx"], "config.json"),
    (["export", "onnx", "--model", "MODEL", "-o", "AFILE/m.onnx"], "notes.txt"),
    (["serve", "--model", "FOREIGN"], "hologram"),
    # a file that names another's rows: refused with both named
    (["train", "vqa", "--features", "FEATURES", "--questions", "OTHERQA", "-o", "OUT"], "embeds other photos"),
    (["eval", "--model", "MODEL", "--data", "FEATURES", "--questions", "OTHERQA", "-o", "OUT"], "vqa"),
    # crafted or damaged files
    (["features", "CUTMATCH", "-o", "OUT", "--tower", "timm:test_efficientnet", "--random-weights"], "train-000000"),
    (["questions", "CUTMATCH", "-o", "OUT/qa.jsonl"], "train-000000"),
    (["shards", "verify", "CUTMATCH"], "unreadable tar", 1),
    (["features", "DOTTED", "-o", "OUT", "--tower", "timm:test_efficientnet", "--random-weights"], "more samples than"),
    (["questions", "DOTTED", "-o", "OUT/qa.jsonl"], "malformed", 0),
    (["shards", "verify", "DOTTED"], "incomplete", 1),
    # a cache whose meta.json was cut short is computed again, saying so (never trusted, never a traceback)
    (
        ["features", "PHOTOS", "-o", "HALFMETA", "--tower", "timm:test_efficientnet", "--random-weights"],
        "damaged",
        0,
    ),
    (["eval", "--model", "MODEL", "--data", "NANCACHE", "-o", "OUT"], "features.npy"),
    (["train", "finetune", "--features", "FEATURES", "-o", "PICKLEDOPT", "--epochs", "1"], "never loads"),
    (["train", "finetune", "--features", "FEATURES", "-o", "PICKLEDWEIGHTS", "--epochs", "1"], "model.safetensors"),
    (["eval", "--model", "KINDLIST", "--data", "FEATURES", "-o", "OUT"], "'kind'"),
    (["predict", "PHOTOS", "--model", "CONFIGLIST"], "config.json"),
    (["serve", "--model", "KINDLIST"], "config.json"),
]


@pytest.mark.parametrize("case", CASES, ids=[" ".join(c[0][:3]) + f" [{c[1]}]" for c in CASES])
def test_bad_input_is_a_message_and_nothing_outside_the_output_changes(
    case, sandbox_assets, tmp_path, capsys, monkeypatch
):
    arguments, named, expected = (*case, 2)[:3]
    box = tmp_path / "box"
    box.mkdir()
    out = box / "out"
    values = {k: str(v) for k, v in sandbox_assets.items()} | {"OUT": str(out)}
    for word in {w.split("/")[0] for w in arguments}:
        if word in PREPARE:
            values[word] = str(PREPARE[word](box, sandbox_assets))
    command = []
    for word in arguments:
        head, _, tail = word.partition("/")
        command.append(values.get(head, head) + (f"/{tail}" if tail else "") if head in values else word)
    monkeypatch.chdir(box)
    watched = [tmp_path, *sandbox_assets.values()]
    before = [snapshot(root, out) for root in watched]
    capsys.readouterr()
    try:
        code = main([*command, "-q"] if arguments[0] in QUIET else command)
    except SystemExit as exit_:
        code = exit_.code
    printed = capsys.readouterr()
    err = printed.err + printed.out
    assert code == expected, err
    assert named in err, err
    assert "Traceback" not in err and "weights_only" not in err  # never torch's advice to load a pickle
    assert [snapshot(root, out) for root in watched] == before  # nothing outside the output changed
    assert not (tmp_path.parent / "elsewhere").exists() and not (box.parent.parent / "elsewhere").exists()
