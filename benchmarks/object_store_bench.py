"""What the model actor puts in the object store per image, and the labels it leads to.

    python benchmarks/object_store_bench.py --save after.npz
    PYTHONPATH=/path/to/older/checkout python benchmarks/object_store_bench.py --save before.npz
    python benchmarks/object_store_bench.py --compare before.npz after.npz

Runs `pipeline.job.actors.LabelActor` directly (no Ray: Ray stores exactly these columns)
on photographs at their own sizes, from 300 x 451 up to 4000 x 3000 (12 MP), then the
encode stage, and reports per image the bytes of the actor's output row (every column;
the label map column separately) and of the written PNG. Works with the actor before
issue 15 (raw uint16 ``label_raw``) and after it (zstd ``label_packed``); ``--compare``
says how many label pixels the two runs share. tiny-random (RANDOM weights) at 64 px,
kl_threshold 1e-3 so its nearly uniform attention still gives ~50 segments.
"""
from __future__ import annotations

import argparse
import inspect
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

SIZES = [(300, 451), (512, 512), (600, 400), (2000, 3000), (3000, 4000)]  # (height, width)


def rows() -> dict[str, np.ndarray]:
    from skimage import data

    n = len(SIZES)
    sources = [data.chelsea(), data.astronaut(), data.coffee(), data.rocket(), data.cat()]
    return {
        "image_id": np.array([f"img{i}" for i in range(n)], dtype=object),
        "source": np.array(["bench"] * n, dtype=object),
        "width": np.array([w for _, w in SIZES], np.int32), "height": np.array([h for h, _ in SIZES], np.int32),
        "error": np.array([None] * n, dtype=object),
        "pixels": np.stack([np.asarray(Image.fromarray(s).resize((64, 64))) for s in sources]),
        "_shard_id": np.zeros(n, np.int64), "_shard_rows": np.full(n, n, np.int64),
    }


def value_bytes(v) -> int:
    if isinstance(v, (bytes, str)):
        return len(v)
    return np.asarray(v).nbytes if v is not None else 0


def run(save: Path) -> None:
    from pipeline.data.encode import decode_png
    from pipeline.job.actors import LabelActor
    from pipeline.job.tasks import encode_rows

    kwargs = dict(device="cpu", dtype=None, image_size=64, timestep=300, revision=None,
                  diffseg_kwargs={"kl_threshold": 1e-3, "num_points": 8}, threads=2)
    if "merge_on" in inspect.signature(LabelActor.__init__).parameters:
        kwargs["merge_on"] = "gpu"  # the actor before issue 15
    actor = LabelActor("tiny-random", **kwargs)
    out = actor(rows())
    column = "label_packed" if "label_packed" in out else "label_raw"
    table = encode_rows(out, rle=False)
    pngs = table.column("label_map").to_pylist()
    report = []
    for i, (h, w) in enumerate(SIZES):
        row = {"size": f"{w}x{h}", "megapixels": round(h * w / 1e6, 2),
               "row_bytes": sum(value_bytes(v[i]) for v in out.values()),
               f"{column}_bytes": value_bytes(out[column][i]), "png_bytes": len(pngs[i]),
               "segments": int(table.column("num_segments")[i].as_py())}
        report.append(row)
        print(json.dumps(row), flush=True)
    total = sum(r["row_bytes"] for r in report)
    print(f"# {column}: {total / len(report) / 1024:.1f} KiB per row on average over {len(report)} images", flush=True)
    np.savez_compressed(save, **{f"img{i}": decode_png(p) for i, p in enumerate(pngs)},
                        report=json.dumps(report))


def compare(a: Path, b: Path) -> None:
    with np.load(a) as fa, np.load(b) as fb:
        for i, (h, w) in enumerate(SIZES):
            x, y = fa[f"img{i}"], fb[f"img{i}"]
            print(f"{w}x{h}: label pixels equal {float((x == y).mean()) * 100:.4f}%", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--save", type=Path, default=Path("object-store.npz"))
    p.add_argument("--compare", type=Path, nargs=2, default=None)
    args = p.parse_args(argv)
    if args.compare:
        compare(*args.compare)
    else:
        run(args.save)
    return 0


if __name__ == "__main__":
    sys.exit(main())
