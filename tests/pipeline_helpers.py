"""Test inputs for the pipeline tests: real photographs, a corpus of bad images, shards, an S3 server."""
from __future__ import annotations

import io
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from PIL import Image

# Small options so CPU runs are quick: tiny-random at 64 px has 8 x 8 attention.
FAST = dict(model="tiny-random", image_size=64, num_points=4, batch_size=4)


def photos() -> dict[str, np.ndarray]:
    """Real photographs bundled with scikit-image (offline)."""
    from skimage import data

    return {"astronaut": data.astronaut(), "coffee": data.coffee(), "chelsea": data.chelsea()}


def actor_batch(sizes: list[tuple[int, int]], model_size: int) -> dict[str, np.ndarray]:
    """A batch as the decode stage hands it to the model actor: the sample photos resized to the
    model's square input, with each row's own (height, width) and its shard bookkeeping."""
    arrays = list(photos().values())[: len(sizes)]
    n = len(sizes)
    return {
        "image_id": np.array([f"img{i}" for i in range(n)], dtype=object),
        "source": np.array(["s"] * n, dtype=object),
        "width": np.array([w for _, w in sizes], np.int32),
        "height": np.array([h for h, _ in sizes], np.int32),
        "error": np.array([None] * n, dtype=object),
        "pixels": np.stack([np.asarray(Image.fromarray(a).resize((model_size, model_size))) for a in arrays]),
        "_shard_id": np.zeros(n, np.int64),
        "_shard_rows": np.full(n, n, np.int64),
    }


def encoded(arr: np.ndarray, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def make_photo_folder(root: Path, copies: int = 1) -> list[str]:
    """photos as jpg/png/webp (nested), ``copies`` times; returns the image ids (relative paths)."""
    ids = []
    formats = [("jpg", "JPEG"), ("png", "PNG"), ("webp", "WEBP")]
    for c in range(copies):
        for (name, arr), (ext, fmt) in zip(photos().items(), formats):
            rel = f"set{c % 2}/{name}-{c}.{ext}"
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            small = np.asarray(Image.fromarray(arr).resize((arr.shape[1] // 4, arr.shape[0] // 4)))
            path.write_bytes(encoded(small, fmt))
            ids.append(rel)
    return sorted(ids)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels and holds none: a decompression bomb's header."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def bad_image_corpus() -> dict[str, tuple[bytes, str | None, tuple[int, int] | None]]:
    """{file name: (bytes, expected error kind or None when it must be labelled, expected (w, h) or None)}."""
    rgb = np.asarray(Image.fromarray(photos()["chelsea"]).resize((60, 40)))
    corpus: dict[str, tuple[bytes, str | None, tuple[int, int] | None]] = {}
    jpeg = encoded(rgb, "JPEG", quality=90)
    corpus["zero-bytes.jpg"] = (b"", "empty file", None)
    corpus["truncated.jpg"] = (jpeg[: len(jpeg) // 2], "truncated image", None)
    png = encoded(rgb, "PNG")
    corpus["truncated.png"] = (png[: len(png) // 2], "truncated image", None)
    corpus["text-with-image-extension.png"] = (b"this is not an image, just text\n" * 10, "not an image", None)
    corpus["bomb-header.png"] = (png_header_only(60000, 60000), "decompression bomb", None)
    corpus["cmyk.jpg"] = (_save(Image.fromarray(rgb).convert("CMYK"), "JPEG"), None, (60, 40))
    rgba = np.dstack([rgb, np.linspace(0, 255, 60 * 40).reshape(40, 60).astype(np.uint8)])
    corpus["rgba.png"] = (encoded(rgba, "PNG"), None, (60, 40))
    corpus["palette.png"] = (_save(Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE), "PNG"), None, (60, 40))
    grey16 = (np.linspace(0, 65535, 60 * 40).reshape(40, 60)).astype(np.uint16)
    corpus["sixteen-bit.png"] = (_save(Image.fromarray(grey16), "PNG"), None, (60, 40))
    corpus["greyscale.png"] = (_save(Image.fromarray(rgb).convert("L"), "PNG"), None, (60, 40))
    corpus["grey-alpha.png"] = (_save(Image.fromarray(rgb).convert("LA"), "PNG"), None, (60, 40))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display: 60x40 stored -> 40x60 shown
    corpus["exif-rotated.jpg"] = (_save(Image.fromarray(rgb), "JPEG", exif=exif), None, (40, 60))
    frames = [Image.fromarray(np.roll(rgb, 10 * i, axis=1)).convert("P") for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    corpus["animated.gif"] = (buf.getvalue(), None, (60, 40))
    corpus["one-pixel.png"] = (encoded(np.array([[[200, 10, 10]]], dtype=np.uint8), "PNG"), None, (1, 1))
    corpus["tall-thin.bmp"] = (_save(Image.fromarray(np.repeat(rgb[:, :1], 1, axis=1)), "BMP"), None, (1, 40))
    big = np.asarray(Image.fromarray(photos()["astronaut"]).resize((3000, 2000)))
    corpus["very-large.jpg"] = (encoded(big, "JPEG", quality=80), None, (3000, 2000))
    corpus["tiff-rgb.tif"] = (_save(Image.fromarray(rgb), "TIFF"), None, (60, 40))
    return corpus


def _save(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def write_corpus(root: Path, corpus: dict) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for name, (data, _, _) in corpus.items():
        (root / name).write_bytes(data)


def write_tar_shard(path: Path, images: dict[str, bytes]) -> None:
    """WebDataset-style: key.jpg (+ key.json sidecar, which must be ignored)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, data in images.items():
            for name, body in ((f"{key}.jpg", data), (f"{key}.json", b'{"caption": "x"}')):
                info = tarfile.TarInfo(name)
                info.size = len(body)
                tar.addfile(info, io.BytesIO(body))


def write_parquet_shard(path: Path, images: list[bytes], struct_column: bool, row_group_size: int = 2) -> None:
    """An image-bytes column (binary, or an HF-style {bytes, path} struct) plus an unrelated column."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if struct_column:
        col = pa.array([{"bytes": b, "path": f"img{i}.jpg"} for i, b in enumerate(images)],
                       pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    else:
        col = pa.array(images, pa.binary())
    table = pa.table({"caption": [f"caption {i}" for i in range(len(images))], "image": col})
    pq.write_table(table, path, row_group_size=row_group_size)


def random_png(seed: int, size: int = 32) -> bytes:
    """A small PNG of random pixels, the same for the same seed."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def read_output(path: str, filesystem=None) -> pa.Table:
    """The committed output dataset (pyarrow skips the _-prefixed bookkeeping files)."""
    return pads.dataset(path, format="parquet", filesystem=filesystem).to_table()
