"""Bad and unusual input: each gets a clean outcome (a message naming the file or argument and
exit 2, or a counted reject), and photos are read as a person sees them."""

import io

import numpy as np
from PIL import Image

from taxoclip.data.images import as_rgb, decode_image
from taxoclip.models.towers import Preprocess

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
