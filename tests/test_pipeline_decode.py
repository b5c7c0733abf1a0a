"""Decoding: every kind of bad or unusual image ends as pixels or a clear error (no Ray)."""
from __future__ import annotations

import numpy as np
import pytest
from pipeline_helpers import bad_image_corpus, encoded, png_header_only

from pipeline.data.decode import decode_image

CORPUS = bad_image_corpus()


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_each_bad_or_odd_image_has_its_expected_outcome(name):
    data, expected_error, expected_size = CORPUS[name]
    decoded = decode_image(data, 64)
    if expected_error is None:
        assert decoded.error is None, decoded.error
        assert decoded.pixels.shape == (64, 64, 3) and decoded.pixels.dtype == np.uint8
        assert (decoded.width, decoded.height) == expected_size
    else:
        assert decoded.pixels is None
        assert decoded.error.split(":")[0] == expected_error, decoded.error


def test_sixteen_bit_greyscale_is_scaled_not_clipped():
    data, _, _ = CORPUS["sixteen-bit.png"]
    px = decode_image(data, 64).pixels
    assert 0 <= px.min() < 30 and 225 < px.max() <= 255  # a full ramp, not a white image


def test_rgba_alpha_is_composited_on_white():
    rgba = np.zeros((8, 8, 4), np.uint8)  # black, fully transparent
    px = decode_image(encoded(rgba, "PNG"), 8).pixels
    assert (px == 255).all()


def test_exif_orientation_rotates_the_pixels():
    from PIL import Image

    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6
    decoded = decode_image(encoded(arr, "JPEG", exif=exif, quality=95), 40)
    assert (decoded.width, decoded.height) == (20, 40)
    top, bottom = decoded.pixels[:20].mean(), decoded.pixels[20:].mean()
    assert top > 200 > 50 > bottom  # rotated clockwise: the white half is on top


def test_pixel_limit_between_warning_and_error_is_refused():
    # PIL only warns between MAX_IMAGE_PIXELS and twice that; the pipeline refuses at its limit.
    decoded = decode_image(png_header_only(200, 200), 64, max_pixels=30_000)
    assert decoded.error.startswith("decompression bomb")


def test_none_bytes_is_a_read_error():
    assert decode_image(None, 64).error.startswith("read error")
