"""Decoding JPEGs on the tower's device (data/device_decode.py): on CPU here, against the
workers' PIL path, photo for photo; the GPU itself is measured by benchmarks/bench_gpu.py."""

import io
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import write_classes_csv
from taxoclip.data.device_decode import choose_decode, device_decodable, pixels_on_device
from taxoclip.data.images import EXIF_ORIENTATION, decode_image
from taxoclip.data.preprocess import Preprocess
from taxoclip.errors import TaxoclipError
from taxoclip.models.extraction import extract_features
from taxoclip.models.towers import create_image_tower

CPU = torch.device("cpu")
TOWER = "timm:test_efficientnet"


def photo(seed: int, size=(300, 260), orientation: int = 1, mode: str = "RGB", **save) -> bytes:
    """A textured photo (so a wrong turn, crop or resize shows in the pixels) as JPEG bytes."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (size[1] // 20, size[0] // 20, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)
    image.paste((250, 250, 250), (0, 0, size[0] // 4, size[1] // 5))  # a corner that marks which way is up
    image = image.convert(mode)
    exif = Image.Exif()
    if orientation != 1:
        exif[EXIF_ORIENTATION] = orientation
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=90, exif=exif, **save)
    return out.getvalue()


def assert_same_to_rounding(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal but for resize rounding: the decoded pixels are PIL's exactly and torchvision's resize
    kernels are PIL's, their fixed-point rounding not always (1-2 grey levels in 1 of ~500 values)."""
    difference = (a.int() - b.int()).abs()
    assert a.shape == b.shape and difference.max() <= 2 and difference.float().mean() < 0.02


def device_pixels(data: bytes, preprocess: Preprocess) -> torch.Tensor:
    assert device_decodable(decode_image(data))
    pixels, reasons = pixels_on_device([data], preprocess, CPU)
    assert reasons == [None]
    return pixels[0]


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_turns_as_pil_turns_it(orientation):
    preprocess = Preprocess()
    data = photo(orientation, orientation=orientation)
    assert_same_to_rounding(device_pixels(data, preprocess), preprocess.to_uint8(decode_image(data)))


@pytest.mark.parametrize(
    "kind,save",
    [("grey", {"mode": "L"}), ("progressive", {"progressive": True}), ("subsampled 4:4:4", {"subsampling": 0})],
)
def test_grey_progressive_and_unsubsampled_jpegs_match_the_workers_pixels(kind, save):
    preprocess = Preprocess(size=192, crop_pct=0.9, interpolation="bilinear")
    data = photo(3, size=(240, 330), **save)
    assert_same_to_rounding(device_pixels(data, preprocess), preprocess.to_uint8(decode_image(data)))


def test_a_large_photo_differs_from_the_drafted_cpu_decode_by_a_few_grey_levels():
    """PIL decodes a photo over twice the resize target at reduced scale (DCT draft); the device
    decodes it whole and resizes: close, not equal."""
    preprocess = Preprocess()
    data = photo(5, size=(1400, 1100))
    difference = (device_pixels(data, preprocess).int() - preprocess.to_uint8(decode_image(data)).int()).abs()
    assert difference.float().mean() < 3 and difference.max() < 60


def test_what_the_device_decoder_cannot_take_stays_with_the_workers():
    png, cmyk = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (40, 30), (10, 200, 30)).save(png, format="PNG")
    Image.new("CMYK", (40, 30), (10, 200, 30, 5)).save(cmyk, format="JPEG")
    assert not device_decodable(decode_image(png.getvalue())) and not device_decodable(decode_image(cmyk.getvalue()))


def test_a_corrupt_photo_in_a_batch_costs_only_itself():
    good, other = photo(1), photo(2, size=(250, 400))
    truncated = good[: len(good) // 2]
    pixels, reasons = pixels_on_device([good, truncated, other], Preprocess(), CPU)
    assert reasons[0] is None and reasons[2] is None and "truncated" in reasons[1]
    assert pixels.shape == (2, 3, 224, 224)
    assert_same_to_rounding(pixels[1], Preprocess().to_uint8(decode_image(other)))


@pytest.fixture
def mixed_folder(tmp_path):
    """Photos of every kind the two paths split between them, plus two bad files."""
    root = tmp_path / "photos"
    files = {
        ("1", "upright.jpg"): photo(1),
        ("1", "turned.jpg"): photo(2, orientation=6),
        ("1", "mirrored.jpg"): photo(3, orientation=7),
        ("2", "grey.jpg"): photo(4, mode="L"),
        ("2", "progressive.jpg"): photo(5, progressive=True),
        ("3", "large.jpg"): photo(6, size=(900, 1200)),
        ("3", "truncated.jpg"): photo(7)[:3000],
        ("10", "garbage.jpg"): b"\xff\xd8\xff\xe0" + b"\x00" * 50,
        ("10", "tall.jpg"): photo(8, size=(200, 500)),
    }
    png = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 60, 20)).save(png, format="PNG")
    files["10", "drawing.png"] = png.getvalue()
    for (class_id, name), data in files.items():
        (root / "train" / class_id).mkdir(parents=True, exist_ok=True)
        (root / "train" / class_id / name).write_bytes(data)
    write_classes_csv(root / "classes.csv")
    return root


def test_extraction_decoding_on_the_device_matches_the_workers(mixed_folder, tmp_path):
    tower = create_image_tower(TOWER, pretrained=False)
    runs = {
        decode: extract_features(
            mixed_folder, tower, tmp_path / decode, workers=1, batch_size=4, progress=False, decode=decode
        )
        for decode in ("workers", "device")
    }
    workers, device = runs["workers"], runs["device"]
    assert device.meta["ranks"][0]["decode"] == "device" and workers.meta["ranks"][0]["decode"] == "workers"
    # Nothing lost: the same 8 photos embedded, the same 2 rejected, on either path.
    assert device.meta["count"] == workers.meta["count"] == 8
    assert device.meta["rejected"] == workers.meta["rejected"] == 2
    assert sorted(device.keys) == sorted(workers.keys)
    row = workers.row_of()
    order = [row[key] for key in device.keys]
    assert np.array_equal(device.labels, workers.labels[order])
    a, b = np.asarray(device.features, np.float32), np.asarray(workers.features[order], np.float32)
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert np.all(cosine > 0.99)  # the large photo (drafted on CPU) included
    # Every other photo has the workers' pixels to rounding, so its embedding too.
    photos = sorted(str(path) for path in (mixed_folder / "train").rglob("*.*"))
    large = f"train-{photos.index(str(mixed_folder / 'train' / '3' / 'large.jpg')):07d}"
    exact = [i for i, key in enumerate(device.keys) if key != large]
    assert len(exact) == 7
    assert np.all(cosine[exact] > 0.9999)


def test_auto_decodes_in_the_workers_without_a_working_gpu_decoder(capsys):
    assert choose_decode("auto", CPU) == "workers"
    if not torch.cuda.is_available():  # the trial decode fails, and the run goes on in the workers
        assert choose_decode("auto", torch.device("cuda")) == "workers"
        assert "GPU decoder does not work here" in capsys.readouterr().out
    assert choose_decode("device", CPU) == "device"


def test_asking_for_the_device_decoder_where_it_does_not_work_is_a_clear_error(monkeypatch, mixed_folder, tmp_path):
    import taxoclip.data.device_decode as device_decode

    monkeypatch.setattr(device_decode, "device_decoder_problem", lambda device: "nvJPEG missing")
    with pytest.raises(TaxoclipError, match=r"--decode device.*nvJPEG missing.*--decode workers"):
        extract_features(mixed_folder, TOWER, tmp_path / "f", pretrained=False, progress=False, decode="device")
    # auto falls back to the workers, and the run completes
    cache = extract_features(mixed_folder, TOWER, tmp_path / "f", pretrained=False, progress=False, workers=0)
    assert cache.meta["count"] == 8 and cache.meta["ranks"][0]["decode"] == "workers"


def test_cli_refuses_an_unknown_decode(mixed_folder, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "taxoclip", "features", str(mixed_folder), "-o", str(tmp_path / "f"), "--decode", "gpu"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "--decode" in result.stderr and "Traceback" not in result.stderr
