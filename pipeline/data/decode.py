"""Decode image bytes into the model's input: RGB uint8, resized to S x S.

Every failure is per image and ends as an error string ``"<kind>: <detail>"``;
the kinds (the text before the colon) are what the run summary counts.
The width and height recorded are the image's own, after EXIF orientation:
the label map is produced at that size, not at S x S. With ``paper_preprocess``
(the paper's protocol) the image is first centre-cropped to a square (after EXIF
orientation) and the recorded size is S x S: the label map is made at S x S.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Decompression-bomb guard: images with more pixels than this are refused, checked on the
# header before any pixel is decoded. Pillow's own guard (a warning at 89 MP, an error at
# 179 MP) stays as it is: its global setting is not ours to change in a shared process.
DEFAULT_MAX_PIXELS = 178_956_970
_SWAPPED_ORIENTATIONS = {5, 6, 7, 8}
_EXIF_ORIENTATION = 0x0112


@dataclass
class Decoded:
    pixels: np.ndarray | None  # (S, S, 3) uint8, or None on error
    width: int  # after EXIF orientation (S with paper_preprocess); 0 when unknown
    height: int
    error: str | None = None


def decode_image(
    data: bytes | None, image_size: int, max_pixels: int = DEFAULT_MAX_PIXELS, paper_preprocess: bool = False
) -> Decoded:
    """Bytes -> (S, S, 3) uint8 RGB (first frame, EXIF-oriented, alpha on white), or an error.

    ``paper_preprocess``: centre-crop to a square (after EXIF orientation) before the
    resize, and record width = height = S (the size the label map is then made at).
    """
    if data is None:
        return Decoded(None, 0, 0, "read error: no bytes")
    if len(data) == 0:
        return Decoded(None, 0, 0, "empty file: zero bytes")
    width = height = 0
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit decides
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
                if width * height > max_pixels:
                    raise Image.DecompressionBombError(f"{width}x{height} pixels exceeds the limit of {max_pixels}")
                if getattr(img, "n_frames", 1) > 1:
                    img.seek(0)
                orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
                if orientation in _SWAPPED_ORIENTATIONS:
                    width, height = height, width
                if img.format == "JPEG":
                    img.draft("RGB", (image_size, image_size))  # DCT-domain downscale: big JPEGs decode fast
                img.load()
                rgb = to_rgb(ImageOps.exif_transpose(img))
                if paper_preprocess:
                    rgb = center_crop_square(rgb)
                pixels = np.asarray(rgb.resize((image_size, image_size), Image.Resampling.BICUBIC), dtype=np.uint8)
    except Image.DecompressionBombError as exc:
        return Decoded(None, width, height, f"decompression bomb: {exc}")
    except UnidentifiedImageError:
        return Decoded(None, 0, 0, f"not an image: {len(data)} bytes in no image format Pillow reads")
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError) as exc:
        text = str(exc)
        kind = "truncated image" if "truncated" in text or isinstance(exc, EOFError) else "decode error"
        return Decoded(None, width, height, f"{kind}: {type(exc).__name__}: {text}")
    except MemoryError as exc:
        return Decoded(None, width, height, f"decode error: MemoryError: {exc}")
    if pixels.shape != (image_size, image_size, 3):  # pragma: no cover - defensive
        return Decoded(None, width, height, f"decode error: unexpected decoded shape {pixels.shape}")
    if paper_preprocess:
        return Decoded(pixels, image_size, image_size)
    return Decoded(pixels, width, height)


def center_crop_square(img: Image.Image) -> Image.Image:
    """The centred square of side min(width, height): the paper's crop, before its resize.

    Same window as ``pipeline.after.image_index.center_crop_resize`` with a square size
    (offsets ``(long - short) // 2``), so ``diffseg eval`` crops ground truth where
    the labeler cropped the image. That function is not reused here: it resizes
    images bilinearly on numpy arrays, and the labeler's resize stays PIL bicubic.
    """
    w, h = img.size
    side = min(w, h)
    if w == h:
        return img
    left, top = (w - side) // 2, (h - side) // 2
    return img.crop((left, top, left + side, top + side))


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. Alpha is composited on white; 16/32-bit greyscale is scaled, not clipped."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16") or (img.mode == "I" and arr.size and arr.max() > 255):
            arr = arr / 257.0
        elif img.mode == "F":
            lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 1.0)
            arr = (arr - lo) / (hi - lo or 1.0) * 255.0
        grey = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")
        return grey.convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")
