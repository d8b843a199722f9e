"""Bad and unusual input: each gets a clean outcome (a message naming the file or argument and
exit 2, or a counted reject), and photos are read as a person sees them."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from taxoclip import ClassTable
from taxoclip.apps.cli import main
from taxoclip.data.images import as_rgb, decode_image
from taxoclip.data.preprocess import Preprocess

PRE = Preprocess(size=32, crop_pct=1.0)


def two_colour_photo() -> Image.Image:
    """Red on the left, blue on the right: any rotation shows."""
    image = Image.new("RGB", (64, 32), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 32, 32))
    return image


def jpeg(image: Image.Image, orientation: int | None = None) -> bytes:
    out = io.BytesIO()
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    image.save(out, format="JPEG", quality=95, exif=exif.tobytes())
    return out.getvalue()


def test_exif_orientation_is_applied_and_upright_photos_are_untouched():
    upright = two_colour_photo().transpose(Image.Transpose.ROTATE_270)  # as a person sees it
    stored_sideways = jpeg(two_colour_photo(), orientation=6)  # camera: "rotate 90 degrees to view"
    seen = PRE.to_uint8(decode_image(stored_sideways)).float()
    expected = PRE.to_uint8(decode_image(jpeg(upright))).float()
    assert (seen - expected).abs().mean() < 3  # JPEG noise only; sideways it would differ by ~170
    plain = jpeg(two_colour_photo())  # no orientation tag: exactly the old path
    direct = decode_image(plain).convert("RGB")
    assert np.array_equal(np.asarray(as_rgb(decode_image(plain))), np.asarray(direct))


def test_sixteen_bit_grey_is_scaled_not_clipped():
    ramp = (np.linspace(0, 65535, 32 * 32).reshape(32, 32)).astype(np.uint16)
    out = io.BytesIO()
    Image.fromarray(ramp).save(out, format="PNG")
    pixels = np.asarray(as_rgb(decode_image(out.getvalue())))
    assert pixels.shape == (32, 32, 3)
    assert abs(pixels.mean() - 127.5) < 2  # PIL's own convert makes this 254.99 (white)
    assert np.array_equal(pixels[..., 0], np.round(ramp / 65535 * 255).astype(np.uint8))


ARGUMENT_CASES = [
    (["shards", "SRC", "-o", "OUT", "--resize", "-10"], "--resize"),
    (["shards", "SRC", "-o", "OUT", "--shard-mb", "0"], "--shard-mb"),
    (["shards", "SRC", "-o", "OUT", "--shard-size", "0"], "--shard-size"),
    (["shards", "SRC", "-o", "OUT", "--workers", "zero"], "--workers"),
    (["features", "SRC", "-o", "OUT", "--batch-size", "0"], "--batch-size"),
    (["train", "lit", "--features", "F", "-o", "OUT", "--epochs", "0"], "--epochs"),
    (["train", "lit", "--features", "F", "-o", "OUT", "--lr", "nan"], "--lr"),
    (["train", "lit", "--features", "F", "-o", "OUT", "--batch-size", "-3"], "--batch-size"),
    (["train", "lit", "--features", "F", "-o", "OUT", "--eval-every", "0"], "--eval-every"),
    (["train", "catlip", "--features", "F", "-o", "OUT", "--epochs", "0"], "--epochs"),
    (["train", "catlip", "--features", "F", "-o", "OUT", "--grad-clip", "-1"], "--grad-clip"),
    (["labels", "SRC", "-o", "OUT", "--min-count", "0"], "--min-count"),
    (["predict", "PHOTO", "--model", "M", "--top-k", "0"], "--top-k"),
    (["predict", "PHOTO", "--model", "M", "--threshold", "2"], "--threshold"),
    (["predict", "PHOTO", "--model", "M", "--threshold", "nan"], "--threshold"),
    (["serve", "--model", "M", "--port", "99999"], "--port"),
    (["eval", "--model", "M", "--data", "D", "-o", "OUT", "--group-by"], "--group-by"),
]


@pytest.mark.parametrize(
    ("arguments", "named"), ARGUMENT_CASES, ids=[" ".join(a[:2]) + " " + n for a, n in ARGUMENT_CASES]
)
def test_bad_arguments_are_refused_when_parsed(arguments, named, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(arguments)
    assert exit_.value.code == 2
    assert named in capsys.readouterr().err


def test_output_of_the_wrong_kind_and_impossible_paths(image_folder, tmp_path, capsys):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    assert main(["shards", str(image_folder), "-o", str(a_file)]) == 2
    assert "is a file" in capsys.readouterr().err and a_file.read_text() == "mine"
    assert main(["classes", str(image_folder), "-o", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert main(["classes", str(image_folder), "-o", str(a_file / "classes.csv")]) == 2
    assert "notes.txt" in capsys.readouterr().err


def test_an_empty_subset_is_a_message(tmp_path, capsys):
    from conftest import write_image

    photo = write_image(tmp_path / "a.jpg", 1)
    assert main(["predict", str(photo), "--model", str(tmp_path), "--subset", ",,,"]) == 2
    assert "names no taxon" in capsys.readouterr().err


def test_onnx_for_other_classes_or_damaged_is_refused(colour_features, tiny_text_tower, tmp_path, capsys):
    import shutil

    from conftest import tiny_train_config, write_image
    from taxoclip.inference.export import export_onnx
    from taxoclip.train.lit import train_lit

    train_lit(tiny_train_config(colour_features, tmp_path / "m", tiny_text_tower, epochs=1))
    onnx = export_onnx(tmp_path / "m", tmp_path / "m.onnx")
    other = tmp_path / "other"
    shutil.copytree(tmp_path / "m", other)
    (other / "classes.csv").write_text("id,scientific_name\n1,Bellis perennis\n2,Taraxacum officinale\n")
    photo = write_image(tmp_path / "a.jpg", 1)
    capsys.readouterr()
    assert main(["predict", str(photo), "--onnx", str(onnx), "--model", str(other), "-q"]) == 2
    assert "other classes" in capsys.readouterr().err
    assert main(["predict", str(photo), "--onnx", str(onnx), "--model", str(tmp_path / "m"), "-q"]) == 0
    capsys.readouterr()
    damaged = tmp_path / "damaged.onnx"
    damaged.write_bytes(onnx.read_bytes()[:1000])
    assert main(["predict", str(photo), "--onnx", str(damaged), "-q"]) == 2
    assert "not a readable ONNX model" in capsys.readouterr().err


@pytest.fixture
def small_shards(image_folder, tmp_path):
    assert main(["shards", str(image_folder), "-o", str(tmp_path / "shards"), "--shard-size", "5", "-q"]) == 0
    return tmp_path / "shards"


def test_a_manifest_pointing_outside_its_folder_is_refused(small_shards, tmp_path, capsys):
    import json

    manifest = json.loads((small_shards / "manifest.json").read_text())
    manifest["shards"][0]["name"] = "../../elsewhere/train-000000.tar"
    (small_shards / "manifest.json").write_text(json.dumps(manifest))
    before = sorted(p for p in tmp_path.parent.rglob("*") if "elsewhere" in str(p))
    capsys.readouterr()
    assert main(["shards", "verify", str(small_shards), "-q"]) == 2
    assert "is not a file in" in capsys.readouterr().err
    out = tmp_path / "features"
    arguments = ["features", str(small_shards), "--tower", "timm:test_efficientnet", "--random-weights", "-o", str(out)]
    assert main([*arguments, "--workers", "0", "-q"]) == 2
    assert sorted(p for p in tmp_path.parent.rglob("*") if "elsewhere" in str(p)) == before


def test_a_shard_changed_after_its_manifest_is_never_served_from_the_cache(small_shards, tmp_path, capsys):
    arguments = ["features", str(small_shards), "--tower", "timm:test_efficientnet", "--random-weights"]
    arguments += ["-o", str(tmp_path / "f"), "--workers", "0", "-q"]
    assert main(arguments) == 0
    shard = sorted(small_shards.glob("train-*.tar"))[0]
    shard.write_bytes(shard.read_bytes()[:-2048])  # truncated after the manifest was written
    capsys.readouterr()
    assert main(arguments) == 2
    assert "the shard changed after it was written" in capsys.readouterr().err


def test_a_shard_with_the_same_size_but_other_bytes_is_never_served_from_the_cache(small_shards, tmp_path, capsys):
    import os

    arguments = ["features", str(small_shards), "--tower", "timm:test_efficientnet", "--random-weights"]
    arguments += ["-o", str(tmp_path / "f"), "--workers", "0", "-q"]
    assert main(arguments) == 0
    assert main(arguments) == 0  # unchanged: served, with no checksum recomputed (the record matches)
    shard = sorted(small_shards.glob("train-*.tar"))[0]
    original = shard.read_bytes()
    data = bytearray(original)
    data[1000:1010] = bytes(x ^ 0xFF for x in data[1000:1010])  # ten bytes changed in place: same size
    shard.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(arguments) == 2
    assert "its bytes changed after it was written" in capsys.readouterr().err
    # The right bytes with a new modification time (a copy to another disk): checked, then served.
    shard.write_bytes(original)
    os.utime(shard, ns=(1, 1))
    assert main(arguments) == 0


def copy_cache(source, target):
    import shutil

    shutil.copytree(source, target)
    return target


def test_nan_embeddings_are_refused_naming_the_file_and_sample(colour_features, tiny_text_tower, tmp_path):
    from conftest import tiny_train_config
    from taxoclip import TaxoclipError
    from taxoclip.data.features import load_features
    from taxoclip.train.lit import train_lit

    features = copy_cache(colour_features, tmp_path / "f")
    array = np.load(features / "features.npy", mmap_mode="r+")
    array[3, 5] = np.nan
    array.flush()
    key = load_features(features).keys[3]
    with pytest.raises(TaxoclipError, match=f"features.npy: 1 rows hold NaN.*{key}"):
        train_lit(tiny_train_config(features, tmp_path / "m", tiny_text_tower))


def test_a_diverging_loss_stops_training_with_a_message(tmp_path):
    from taxoclip import TaxoclipError
    from taxoclip.runtime import Runtime
    from taxoclip.train.loop import Batch, LoopConfig, Trainer, fit
    from taxoclip.train.settings import LoopSettings as Settings

    class Diverging(Trainer):
        def __init__(self):
            self.module = torch.nn.Linear(2, 1)

        def param_groups(self):
            return [{"params": list(self.module.parameters()), "lr": 1e3}]

        def steps_per_epoch(self):
            return 2

        def batches(self, epoch):
            for _ in range(2):
                yield Batch({"x": torch.tensor([[float("inf"), 1.0]])}, 1)

    trainer = Diverging()
    trainer.module.forward = lambda x: (trainer.module.weight * x).sum()  # inf * a weight: inf or nan
    with pytest.raises(TaxoclipError, match=r"loss became -?(inf|nan) at epoch 1, step 1; lower the learning rate"):
        fit(trainer, LoopConfig(Settings(output=str(tmp_path), epochs=1, progress=False)), Runtime())


def test_a_replaced_features_folder_is_another_run_not_a_resume(
    colour_features, colour_shards, tiny_text_tower, tmp_path
):
    import shutil

    from conftest import tiny_train_config
    from taxoclip import TaxoclipError
    from taxoclip.models.extraction import extract_features
    from taxoclip.train.lit import train_lit

    features = copy_cache(colour_features, tmp_path / "f")
    train_lit(tiny_train_config(features, tmp_path / "m", tiny_text_tower, epochs=1))
    other = extract_features(
        colour_shards, "timm:test_resnet", tmp_path / "o", pretrained=False, workers=0, progress=False
    )
    shutil.rmtree(features)
    copy_cache(other.path, features)  # the same path, another cache
    with pytest.raises(TaxoclipError, match="other settings"):
        train_lit(tiny_train_config(features, tmp_path / "m", tiny_text_tower, epochs=1))


def test_eval_refuses_a_cache_of_the_same_tower_name_with_other_weights(colour_features, tiny_text_tower, tmp_path):
    import json

    from conftest import tiny_train_config
    from taxoclip import TaxoclipError
    from taxoclip.eval.report import EvalConfig, run_evaluation
    from taxoclip.train.lit import train_lit

    train_lit(tiny_train_config(colour_features, tmp_path / "m", tiny_text_tower, epochs=1))
    features = copy_cache(colour_features, tmp_path / "f")
    meta = json.loads((features / "meta.json").read_text())
    meta["tower"]["id"] = "0123456789abcdef"  # e.g. pretrained vs --random-weights: same name, other weights
    (features / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(TaxoclipError, match="another version of timm:test_efficientnet"):
        run_evaluation(
            EvalConfig(model=str(tmp_path / "m"), data=str(features), output=str(tmp_path / "r"), progress=False)
        )


def test_a_pipe_named_like_a_photo_is_a_reason_not_a_hang(image_folder, tmp_path, capsys):
    import json
    import os
    import signal

    def hung(*_):
        raise TimeoutError("reading a pipe hung: it was not refused as a non-regular file")

    signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)  # a regression here would otherwise hang the suite instead of failing it
    fifo = image_folder / "train" / "1" / "pipe.jpg"
    os.mkfifo(fifo)
    assert main(["shards", str(image_folder), "-o", str(tmp_path / "s"), "-q"]) == 0
    rejects = json.loads((tmp_path / "s" / "manifest.json").read_text())["rejects"]
    assert [r["reason"] for r in rejects] == ["not a regular file (a pipe, device or folder)"]
    capsys.readouterr()
    from taxoclip.inference.predict import Predictor

    predictor = Predictor(ClassTable.from_records([{"id": "1"}], origin="t"), PRE, lambda x: torch.ones(len(x), 1))
    (result,) = predictor.predict_paths([fifo])
    signal.alarm(0)
    assert result.error == "not a regular file (a pipe, device or folder)"


def test_a_decompression_bomb_is_refused_by_every_decoder():
    from taxoclip.data.images import BadImage

    bomb = io.BytesIO()
    Image.new("L", (Image.MAX_IMAGE_PIXELS // 1000 + 1, 1001)).save(bomb, format="PNG")
    with pytest.raises(BadImage, match="decompression bomb"):
        decode_image(bomb.getvalue())


def test_the_server_refuses_a_declared_oversized_body_before_reading_it():
    from fastapi.testclient import TestClient

    from taxoclip.apps.serve import create_app
    from taxoclip.inference.predict import Predictor

    predictor = Predictor(ClassTable.from_records([{"id": "1"}], origin="t"), PRE, lambda x: torch.ones(len(x), 1))
    client = TestClient(create_app(predictor, max_file_bytes=1000, max_files=2))
    response = client.post("/api/predict", content=b"x" * 10, headers={"content-length": str(50 * 1024 * 1024)})
    assert response.status_code == 413 and "request too large" in response.json()["error"]


def guarded_app(timeout: float = 30.0):
    from taxoclip.apps.serve import create_app
    from taxoclip.inference.predict import Predictor

    predictor = Predictor(ClassTable.from_records([{"id": "1"}], origin="t"), PRE, lambda x: torch.ones(len(x), 1))
    app = create_app(predictor, max_file_bytes=1000, max_files=2)
    for middleware in app.user_middleware:
        middleware.kwargs["timeout"] = timeout
    return app


def call(app, body_messages, headers=()):
    """Drive the ASGI app with the given body messages (an endless wait after them); returns
    (status, JSON body, how many body messages were read)."""
    import asyncio

    messages, sent, read = list(body_messages), [], []

    async def receive():
        if messages:
            read.append(1)
            return messages.pop(0)
        await asyncio.sleep(3600)  # a client that stops sending

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/api/predict",
        "raw_path": b"/api/predict",
        "query_string": b"",
        "headers": [(b"content-type", b"multipart/form-data; boundary=xyz"), *headers],
        "http_version": "1.1",
        "scheme": "http",
        "server": ("t", 80),
        "client": ("c", 1),
        "root_path": "",
    }
    asyncio.run(asyncio.wait_for(app(scope, receive, send), 10))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, json.loads(body), len(read)


def test_a_body_without_a_length_is_cut_off_at_the_limit_not_spooled_whole():
    head = b'--xyz\r\nContent-Disposition: form-data; name="files"; filename="a.jpg"\r\n'
    head += b"Content-Type: image/jpeg\r\n\r\n"
    endless = [{"type": "http.request", "body": head, "more_body": True}]
    endless += [{"type": "http.request", "body": b"x" * 100_000, "more_body": True} for _ in range(1000)]  # 100 MB
    status, body, read = call(guarded_app(), endless)
    assert status == 413 and "request too large" in body["error"]
    assert read <= 2 * 1000 * 1024 * 1024 // 100_000  # stopped near the limit, not after 100 MB


def test_a_body_that_stops_arriving_is_answered_and_the_connection_freed():
    started = [{"type": "http.request", "body": b"--xyz\r\n", "more_body": True}]
    status, body, _ = call(guarded_app(timeout=0.3), started, headers=[(b"content-length", b"5000")])
    assert status == 408 and "stopped arriving" in body["error"]


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda f: (f / "meta.json").write_text("{not json"), "damaged"),
        (lambda f: (f / "features.npy").write_bytes((f / "features.npy").read_bytes()[:200]), "damaged"),
        (lambda f: (f / "keys.json").write_text("[]"), "keys.json has 0"),
        (lambda f: np.save(f / "labels.npy", np.full(len(np.load(f / "labels.npy")), 99, np.int32)), "outside"),
        (lambda f: (f / "splits.npy").unlink(), "damaged"),
    ],
    ids=["bad meta", "truncated features", "keys short", "labels out of range", "part missing"],
)
def test_a_damaged_feature_cache_is_named_not_a_traceback(colour_features, tmp_path, damage, message):
    from taxoclip import TaxoclipError
    from taxoclip.data.features import load_features

    features = copy_cache(colour_features, tmp_path / "f")
    damage(features)
    with pytest.raises(TaxoclipError, match=message):
        load_features(features)


def test_a_damaged_model_directory_is_named_not_a_traceback(colour_features, tiny_text_tower, tmp_path, capsys):
    import shutil

    from conftest import tiny_train_config, write_image
    from taxoclip.train.lit import train_lit

    train_lit(tiny_train_config(colour_features, tmp_path / "m", tiny_text_tower, epochs=1))
    photo = write_image(tmp_path / "a.jpg", 1)
    for name, damage in {
        "pickle": lambda m: (m / "model.safetensors").write_bytes(b"\x80\x04K\x01."),
        "missing": lambda m: (m / "class_embeddings.npy").unlink(),
    }.items():
        broken = tmp_path / name
        shutil.copytree(tmp_path / "m", broken)
        damage(broken)
        capsys.readouterr()
        assert main(["predict", str(photo), "--model", str(broken), "-q"]) == 2, name
        assert "model directory is damaged" in capsys.readouterr().err, name


def test_a_ragged_csv_row_is_named_by_its_line(image_folder, tmp_path, capsys):
    csv_path = image_folder / "classes.csv"
    lines = csv_path.read_text().splitlines()
    lines[2] += ",an extra field"  # the second class's row
    csv_path.write_text("\n".join(lines) + "\n")
    assert main(["classes", str(image_folder), "-o", str(tmp_path / "c.csv")]) == 2
    assert "classes.csv, line 3: 8 fields but the header has 7" in capsys.readouterr().err
    short = [
        "class_id,common_name,genus",
        "1,rose,Rosa",
        "2,sweet pea",
        "3,garden pea,Lathyrus",
        "10,sunflower,Helianthus",
    ]
    csv_path.write_text("\n".join(short) + "\n")  # a short row: its last column is empty
    assert main(["classes", str(image_folder), "-o", str(tmp_path / "c.csv")]) == 0


def test_a_looping_symbolic_link_is_called_that(tmp_path, capsys):
    (tmp_path / "a.jpg").symlink_to(tmp_path / "b.jpg")
    (tmp_path / "b.jpg").symlink_to(tmp_path / "a.jpg")
    assert main(["predict", str(tmp_path / "a.jpg"), "--model", str(tmp_path)]) == 2
    assert "symbolic link that leads nowhere" in capsys.readouterr().err


def noisy_photo_jpeg() -> bytes:
    rng = np.random.default_rng(0)
    pixels = (rng.random((128, 128, 3)) * 60 + np.linspace(0, 190, 128)[None, :, None]).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=90)
    return out.getvalue()


def overwrite_entropy_data(data: bytes) -> bytes:
    """Bytes a third of the way into the entropy-coded stream overwritten: PIL decodes the result
    without a word (libjpeg fills what it lost with grey and only warns)."""
    damaged = bytearray(data)
    start_of_scan = damaged.index(b"\xff\xda")
    start = start_of_scan + 2 + int.from_bytes(damaged[start_of_scan + 2 : start_of_scan + 4], "big")
    middle = start + (len(damaged) - start) // 3
    damaged[middle : middle + 300] = b"\x55" * 300
    return bytes(damaged)


def test_a_jpeg_with_damaged_entropy_data_is_a_reject_everywhere_not_a_photo(tmp_path, capsys):
    from taxoclip.data.images import BadImage, check_image

    whole = noisy_photo_jpeg()
    damaged = overwrite_entropy_data(whole)
    Image.open(io.BytesIO(damaged)).load()  # what PIL alone says: nothing wrong
    for check in (check_image, decode_image):
        with pytest.raises(BadImage, match="damaged JPEG data"):
            check(damaged)
    # harmless warnings lose no pixel and keep the photo: bytes before the end marker, as cameras write
    assert check_image(whole[:-2] + b"\x00\x00\x00\xff\xd9") == "jpg"
    # shards: a counted reject, the rest written
    from conftest import write_classes_csv

    folder = tmp_path / "photos"
    for class_id in ("1", "2"):
        (folder / "train" / class_id).mkdir(parents=True)
        (folder / "train" / class_id / "whole.jpg").write_bytes(whole)
    (folder / "train" / "1" / "damaged.jpg").write_bytes(damaged)
    write_classes_csv(folder / "classes.csv")
    assert main(["shards", str(folder), "-o", str(tmp_path / "shards"), "-q"]) == 0
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert manifest["totals"] == manifest["totals"] | {"input": 3, "written": 2, "rejected": 1}
    rejects = json.dumps(manifest) + "".join(p.read_text() for p in (tmp_path / "shards").glob("*reject*"))
    assert "damaged.jpg" in rejects and "damaged JPEG data" in rejects


def test_a_model_refuses_a_tower_with_other_weights_than_it_was_trained_on(colour_features, tmp_path, capsys):
    """Another version of the tower (same name and width, other weights) would feed the head
    features it never saw: a fine-tuned head named a sweet pea for a primrose at 100%."""
    import shutil

    from taxoclip.train.finetune import FinetuneConfig, train_finetune

    model = tmp_path / "model"
    train_finetune(FinetuneConfig(output=str(model), features=str(colour_features), epochs=1, progress=False))
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(jpeg(two_colour_photo()))
    assert main(["predict", str(photo), "--model", str(model)]) == 0  # its own tower: fine
    capsys.readouterr()
    other = tmp_path / "other-version"
    shutil.copytree(model, other)
    config = json.loads((other / "config.json").read_text())
    recorded = config["image_tower"]["id"]
    config["image_tower"]["id"] = "0123456789abcdef"  # trained on weights this tower no longer has
    (other / "config.json").write_text(json.dumps(config))
    assert main(["predict", str(photo), "--model", str(other)]) == 2
    said = capsys.readouterr().err
    assert "0123456789abcdef" in said and recorded in said and "another version of the tower" in said
