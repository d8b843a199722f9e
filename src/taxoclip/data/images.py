"""Checking and (optionally) resizing image bytes, so a bad file is a counted reject, never a crash."""

from __future__ import annotations

import io
import os
import stat
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# The WebDataset key an image is stored under, by PIL format; the bytes are kept as they are.
FORMAT_KEYS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff"}
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tiff")
# Where extraction decodes JPEGs (see data/device_decode.py); here, torch-free, for the CLI's choices.
DECODES = ("auto", "workers", "device")


class BadImage(Exception):
    """Why an image cannot be used, in a few words (goes into the rejects list)."""


def check_image(data: bytes) -> str:
    """Fully decode ``data`` (at reduced scale for JPEG, which still reads every byte) and return
    the WebDataset key for its format. Raises `BadImage` with the reason otherwise."""
    if not data:
        raise BadImage("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                key = FORMAT_KEYS.get(image.format or "")
                if key is None:
                    raise BadImage(f"unsupported image format {image.format}")
                if image.format == "JPEG":
                    check_jpeg_stream(data)  # every byte of the stream, with libjpeg's warnings counted
                else:
                    image.load()
                return key
    except BadImage:
        raise
    except UnidentifiedImageError:
        raise BadImage("not an image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadImage("too many pixels (possible decompression bomb)") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise BadImage(f"corrupt or truncated image ({error})") from None


# libjpeg's warnings that lose no pixel: bytes between markers (common in cameras' files), an
# unknown JFIF version. Every other warning ("premature end of data segment", "bad Huffman code")
# means a region of the photo was filled in with grey, which PIL decodes without a word.
HARMLESS_JPEG_WARNINGS = ("extraneous bytes", "JFIF")


def check_jpeg_stream(data: bytes) -> None:
    """Decode a JPEG's whole entropy-coded stream at reduced scale (DCT scaling still reads every
    byte) with libjpeg-turbo's warnings raised (simplejpeg's strict mode): damaged or truncated
    data is a `BadImage`, never a photo scored as if it were whole."""
    import simplejpeg

    try:
        colorspace = simplejpeg.decode_jpeg_header(data)[2]
        target = {"Gray": "GRAY", "CMYK": "CMYK", "YCCK": "CMYK"}.get(colorspace, "RGB")
        simplejpeg.decode_jpeg(data, colorspace=target, min_factor=8, strict=True)
    except ValueError as error:
        message = str(error)
        if not any(harmless in message for harmless in HARMLESS_JPEG_WARNINGS):
            raise BadImage(f"damaged JPEG data ({message})") from None


EXIF_ORIENTATION = 0x0112
HIGH_BIT_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def as_rgb(image: Image.Image) -> Image.Image:
    """The photo as a person sees it, in 8-bit RGB: turned upright by its EXIF orientation (a
    phone stores portrait photos sideways), and high-bit-depth grey scaled down rather than clipped
    (PIL's convert would turn a 16-bit PNG white). Ordinary photos pass through untouched."""
    orientation = image.getexif().get(EXIF_ORIENTATION, 1)
    if orientation in (2, 3, 4, 5, 6, 7, 8):
        image = ImageOps.exif_transpose(image)
    if image.mode in HIGH_BIT_DEPTH_MODES:
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 255.0
        image = Image.fromarray(np.clip(values / top * 255 + 0.5, 0, 255).astype(np.uint8), mode="L")
    return image.convert("RGB")


def resize_shorter_side(data: bytes, size: int, quality: int = 90) -> bytes:
    """Re-encode as JPEG with the shorter side at most ``size`` pixels (bicubic)."""
    with Image.open(io.BytesIO(data)) as image:
        image = as_rgb(image)
        scale = size / min(image.size)
        if scale < 1:
            image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=quality)
        return out.getvalue()


def decode_image(data: bytes) -> Image.Image:
    """Open image bytes lazily (so a JPEG can still be decoded at reduced scale); raises on bad
    data, and refuses decompression bombs and damaged JPEG streams here, so every path that decodes
    refuses them."""
    if not data:
        raise BadImage("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadImage("too many pixels (possible decompression bomb)") from None
    if image.format == "JPEG":
        check_jpeg_stream(data)
    return image


def read_photo(path: str | os.PathLike) -> bytes:
    """A photo file's bytes; a pipe, device or folder named like a photo is a `BadImage`, never a
    read that waits forever."""
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise BadImage("not a regular file (a pipe, device or folder)")
    with open(path, "rb") as handle:
        return handle.read()
