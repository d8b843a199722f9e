"""Decoding JPEG photos on the device that runs the image tower (nvJPEG on a GPU), in batches.

With a GPU doing the forward pass, JPEG decoding on the CPU is what limits extraction (an H100
embedded 1,200-2,800 photos/s against 8,500-19,000 for the bare forward). So the decode workers
only read the bytes and the JPEG header (format, colour mode); the main process
decodes each batch in one call on the device (TorchCodec: nvJPEG on a GPU, libjpeg-turbo on CPU;
both apply the EXIF orientation) and resizes and crops there. Anything the device
decoder cannot take (PNG, CMYK JPEG ...) is decoded by the worker as before, and a photo the
device decoder refuses is retried alone, so one bad file costs only itself (a counted reject).

On CPU this path decodes in the main process with the same libjpeg-turbo as PIL (the same pixels)
and resizes with torchvision's PIL-matching kernels: the result is ``Preprocess.to_uint8``'s to
resize rounding (at most 2 grey levels) for photos whose shorter side is under twice the resize
target; larger ones skip PIL's DCT-domain draft and are resized from full size, a difference of a
few grey levels on average. That is what the tests check here; nvJPEG's closeness to libjpeg-turbo
is measured on a GPU by benchmarks/bench_gpu.py.
"""

from __future__ import annotations

import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

from taxoclip.data.images import DECODES
from taxoclip.data.preprocess import Preprocess
from taxoclip.errors import TaxoclipError

DEVICE_MODES = ("RGB", "L")  # JPEG colour modes the device decoder turns into RGB as PIL does


def device_decodable(image: Image.Image) -> bool:
    """Whether the device decoder takes this photo, opened lazily by `decode_image` (so only its
    header is read): a JPEG in RGB or grey; the worker decodes anything else. The decoder turns
    the photo upright by its EXIF orientation itself."""
    return image.format == "JPEG" and image.mode in DEVICE_MODES


def resize_and_crop(image: torch.Tensor, preprocess: Preprocess) -> torch.Tensor:
    """``Preprocess.to_uint8`` on a decoded uint8 tensor: the shorter side to size / crop_pct
    (antialiased, PIL's kernels), then the centre ``size`` x ``size``."""
    width, height = preprocess.resized(image.shape[2], image.shape[1])
    mode = {"bicubic": F.InterpolationMode.BICUBIC, "bilinear": F.InterpolationMode.BILINEAR}
    image = F.resize(image, [height, width], interpolation=mode[preprocess.interpolation], antialias=True)
    top, left = (height - preprocess.size) // 2, (width - preprocess.size) // 2
    return image[:, top : top + preprocess.size, left : left + preprocess.size]


def decode_jpegs(data: list[bytes], device: torch.device) -> list[torch.Tensor | str]:
    """Each JPEG decoded to RGB on ``device``, or the reason it could not be. One batched call;
    when it fails (a decoder does not return part of a batch), each photo is tried alone."""
    from torchcodec.decoders import decode_jpeg

    try:
        return list(decode_jpeg(data, mode="RGB", device=device))
    except RuntimeError:
        pass
    decoded: list[torch.Tensor | str] = []
    for one in data:
        try:
            decoded.append(decode_jpeg(one, mode="RGB", device=device))
        except RuntimeError as error:
            decoded.append(f"corrupt or truncated image ({str(error).splitlines()[-1].split(', ')[-1]})")
    return decoded


def pixels_on_device(
    jpegs: list[bytes], preprocess: Preprocess, device: torch.device
) -> tuple[torch.Tensor | None, list[str | None]]:
    """The photos as ``Preprocess.to_uint8`` makes them, stacked on ``device``, and per photo
    None (decoded: its row follows the others decoded) or the reason it was rejected."""
    rows, reasons = [], []
    for image in decode_jpegs(jpegs, device):
        if isinstance(image, str):
            reasons.append(image)
            continue
        rows.append(resize_and_crop(image, preprocess))
        reasons.append(None)
    return (torch.stack(rows) if rows else None), reasons


def choose_decode(decode: str, device: torch.device) -> str:
    """``workers`` or ``device`` for ``decode`` (one of DECODES) on ``device``: auto picks the
    device on a GPU whose JPEG decoder works, and says so when it falls back to the workers."""
    if decode not in DECODES:
        raise TaxoclipError(f"decode must be one of {', '.join(DECODES)}, not {decode!r}")
    if decode == "workers" or (decode == "auto" and device.type != "cuda"):
        return "workers"
    problem = device_decoder_problem(device)
    if problem and decode == "device":
        # Said now: otherwise every photo would become a "corrupt" reject, one batch at a time.
        raise TaxoclipError(
            f"--decode device: the JPEG decoder does not work on {device} ({problem}); use --decode workers"
        )
    if problem:
        print(f"decoding JPEGs in the worker processes: the GPU decoder does not work here ({problem})")
        return "workers"
    return "device"


def device_decoder_problem(device: torch.device) -> str | None:
    """Why the JPEG decoder cannot decode on ``device`` (a trial on a tiny JPEG), or None when it can."""
    import io

    out = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 40, 90)).save(out, format="JPEG")
    try:
        decoded = decode_jpegs([out.getvalue()], device)[0]
    except Exception as error:  # a missing library, driver or wheel: say why instead of failing mid-run
        return f"{type(error).__name__}: {error}"
    return decoded if isinstance(decoded, str) else None
