"""``diffseg show``: overlay PNGs and an ``index.html`` gallery to look at the pseudo-labels.

Each overlay is the image and, beside it, the image blended with one colour per
segment (a fixed palette: the same segment id always gets the same colour) and
the segment boundaries in white. The page lists every image's segment count and
every error row. It needs no server and no network: open it from disk.

Labels made with a vocabulary are coloured by class instead (the same class has
the same colour in every image, unknown segments grey) and each named segment
carries its class name, written at the point deepest inside it; the caption
lists the classes found.
"""
from __future__ import annotations

import colorsys
import html
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from pipeline.after.image_index import ImageIndex, center_crop_resize, decode_rgb
from pipeline.data.label_files import (
    committed_label_files,
    is_error,
    iter_label_batches,
    label_map,
    vocabulary_names,
)
from pipeline.after.method import describe_method
from pipeline.data.manifest import read_labels_manifest

MAX_SIDE = 640  # overlay panels are downscaled to this longest side
MAX_ERRORS_LISTED = 1000
UNKNOWN_COLOUR = (128, 128, 128)
MIN_NAMED_PIXELS = 150  # a segment smaller than this in the panel is coloured but not written on


def palette(n: int = 256) -> np.ndarray:
    """(n, 3) uint8 fixed colours, well apart: hues stepped by the golden ratio, two lightness levels."""
    out = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        h = (i * 0.618033988749895) % 1.0
        light = 0.55 if i % 2 == 0 else 0.42
        out[i] = [round(255 * c) for c in colorsys.hls_to_rgb(h, light, 0.85)]
    return out


PALETTE = palette()


def boundaries(labels: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels whose right or lower neighbour has another segment id."""
    edge = np.zeros(labels.shape, dtype=bool)
    diff_x = labels[:, 1:] != labels[:, :-1]
    diff_y = labels[1:, :] != labels[:-1, :]
    edge[:, :-1] |= diff_x
    edge[:, 1:] |= diff_x
    edge[:-1, :] |= diff_y
    edge[1:, :] |= diff_y
    return edge


def overlay(image: np.ndarray, labels: np.ndarray, alpha: float = 0.5,
            classes: np.ndarray | None = None, names: list[str] | None = None) -> np.ndarray:
    """(H, 2W + gap, 3) uint8: the image, then the image with coloured segments and white boundaries.

    With ``classes`` (vocabulary index per segment id, -1 unknown) and their ``names``:
    coloured by class (unknown grey) and each named segment's class written on it.
    """
    if image.shape[:2] != labels.shape:  # e.g. labels made at a square crop: show that crop
        image = center_crop_resize(image, labels.shape, nearest=False)
    h, w = labels.shape
    scale = min(1.0, MAX_SIDE / max(h, w))
    if scale < 1.0:
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        image = center_crop_resize(image, size, nearest=False)
        labels = center_crop_resize(labels, size, nearest=True)
        h, w = size
    if classes is not None:
        lut = np.array([PALETTE[c % len(PALETTE)] if c >= 0 else UNKNOWN_COLOUR for c in classes], dtype=np.uint8)
        colours = lut[labels]
    else:
        colours = PALETTE[labels % len(PALETTE)]
    blend = (image.astype(np.float32) * (1 - alpha) + colours.astype(np.float32) * alpha).astype(np.uint8)
    blend[boundaries(labels)] = 255
    if classes is not None and names is not None:
        blend = _write_names(blend, labels, classes, names)
    gap = max(2, w // 100)
    out = np.full((h, 2 * w + gap, 3), 255, dtype=np.uint8)
    out[:, :w] = image
    out[:, w + gap :] = blend
    return out


def name_positions(labels: np.ndarray, classes: np.ndarray) -> list[tuple[int, int, int]]:
    """(segment id, row, col) where to write each named segment's class: its pixel farthest from
    its border (inside the segment even when it is not convex); tiny segments are left out."""
    out = []
    for seg in np.unique(labels):
        if seg >= len(classes) or classes[seg] < 0:
            continue
        mask = labels == seg
        if mask.sum() < MIN_NAMED_PIXELS:
            continue
        depth = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
        r, c = np.unravel_index(int(np.argmax(depth)), depth.shape)
        out.append((int(seg), int(r), int(c)))
    return out


def _write_names(panel: np.ndarray, labels: np.ndarray, classes: np.ndarray, names: list[str]) -> np.ndarray:
    picture = Image.fromarray(panel)
    draw = ImageDraw.Draw(picture)
    font = ImageFont.load_default(size=max(10, min(panel.shape[:2]) // 24))
    for seg, r, c in name_positions(labels, classes):
        draw.text((c, r), names[classes[seg]], fill=(255, 255, 255), font=font, anchor="mm",
                  stroke_width=2, stroke_fill=(0, 0, 0))
    return np.asarray(picture)


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>DiffSeg pseudo-labels: {title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }}
.grid {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(520px, 1fr)); gap: 1em; }}
figure {{ margin: 0; border: 1px solid #ddd; border-radius: 6px; padding: .5em; background: #fafafa; }}
figure img {{ width: 100%; height: auto; display: block; }}
figcaption {{ font-size: .85em; margin-top: .3em; word-break: break-all; }}
table {{ border-collapse: collapse; font-size: .85em; }}
td, th {{ border: 1px solid #ddd; padding: .2em .5em; text-align: left; }}
.err {{ color: #b00; }}
.warning {{ background: #fff3cd; border: 1px solid #e0b000; padding: .5em .8em; border-radius: 6px; }}
</style></head>
<body data-images="{n_images}">
<h1>DiffSeg pseudo-labels</h1>
{method}{warning}<p>{summary}</p>
<div class="grid">
{figures}
</div>
<h2>Errors ({n_errors})</h2>
{errors}
<script>
// Record each image's decoded width in the DOM, so a headless browser's --dump-dom shows what rendered.
function record() {{
  let ok = 0;
  for (const img of document.images) {{
    img.dataset.naturalWidth = img.naturalWidth;
    if (img.complete && img.naturalWidth > 0) ok++;
  }}
  document.body.dataset.imagesLoaded = ok;
}}
window.addEventListener("load", record);
</script>
</body></html>
"""


def _method_line(manifest: dict[str, Any] | None) -> str:
    """Which grouping (and boundaries) made the labels, from the manifest's parameters."""
    if manifest is None:
        return ""
    return f'<p class="method">Labels made with {html.escape(describe_method(manifest.get("parameters")))}.</p>\n'


def _model_warning(manifest: dict[str, Any] | None) -> str:
    """A banner when the run's manifest says its model had random weights (tiny-random)
    or is a demo model (tiny-demo), not Stable Diffusion."""
    model = (manifest or {}).get("model") or {}
    name = html.escape(str(model.get("model", "the model")))
    if model.get("random_weights"):
        return (f'<p class="warning"><b>These labels come from {name}, a model with random weights:</b> '
                "they exercise the pipeline and mean nothing.</p>\n")
    if model.get("demo_model"):
        about = html.escape(str(model.get("description") or "a small demo model"))
        return (f'<p class="warning"><b>These labels come from {name}, a demo model, not Stable Diffusion:</b> '
                f"{about}</p>\n")
    return ""


def segment_classes(row: dict[str, Any], names: list[str]) -> np.ndarray:
    """Vocabulary index per segment id of a row (-1 unknown), from its ``segments`` records."""
    segments = row.get("segments") or []
    classes = np.full(max((int(s["id"]) for s in segments), default=-1) + 1, -1, dtype=np.int64)
    for s in segments:
        if s.get("class") in names:
            classes[int(s["id"])] = names.index(s["class"])
    return classes


def _class_caption(classes: np.ndarray | None, names: list[str] | None) -> str:
    if classes is None or names is None:
        return ""
    found = [names[c] for c in sorted(set(classes.tolist())) if c >= 0]
    unknown = int((classes < 0).sum())
    text = ", ".join(found) or "no class"
    return f" &middot; <span class=\"classes\">{html.escape(text)}</span>" + (f" ({unknown} unknown)" if unknown else "")


def build_gallery(
    labels_uri: str,
    images_uri: str,
    out_dir: str,
    n: int = 64,
    storage_options: dict[str, Any] | None = None,
    image_column: str | None = None,
) -> dict[str, Any]:
    """Write ``out_dir/index.html`` and up to ``n`` overlay PNGs (first ok rows in file order)."""
    out = Path(out_dir)
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    files = committed_label_files(labels_uri, storage_options)
    chosen: list[dict[str, Any]] = []
    errors: list[tuple[str, str]] = []
    total = error_count = 0
    names = vocabulary_names(labels_uri, storage_options)
    columns = ("image_id", "label_map", "num_segments", "error") + (("segments",) if names else ())
    for rows in iter_label_batches(files, columns, storage_options):
        for row in rows:
            total += 1
            if is_error(row):
                error_count += 1
                if len(errors) < MAX_ERRORS_LISTED:
                    errors.append((row["image_id"], str(row.get("error"))))
            elif len(chosen) < n:
                chosen.append(row)
    index = ImageIndex.build(images_uri, storage_options, image_column)
    positions: dict[str, list[int]] = {}  # image_id -> its rows among the chosen (ids repeat in old outputs)
    for k, r in enumerate(chosen):
        positions.setdefault(r["image_id"], []).append(k)
    figures: dict[int, str] = {}
    image_errors = []
    for image_id, data, error in index.read(positions):
        for k in positions[image_id]:
            row = chosen[k]
            try:
                if data is None:
                    raise OSError(error)
                classes = segment_classes(row, names) if names else None
                panel = overlay(decode_rgb(data), label_map(row), classes=classes, names=names)
            except Exception as exc:  # noqa: BLE001 - a missing or broken source image: list it, go on
                image_errors.append((image_id, f"image not shown: {exc}"))
                continue
            # Files are named by position, never by id: an id may hold any character.
            name = f"overlays/{k:05d}.png"
            Image.fromarray(panel).save(out / name, optimize=False, compress_level=6)
            figures[k] = (
                f'<figure><img src="{name}" alt="{html.escape(image_id)}" loading="eager">'
                f"<figcaption><b>{html.escape(image_id)}</b> &middot; {int(row['num_segments'] or 0)} segments"
                f"{_class_caption(classes, names)}</figcaption></figure>"
            )
    all_errors = errors + image_errors
    error_html = "<p>None.</p>" if not all_errors else (
        "<table><tr><th>image_id</th><th>error</th></tr>"
        + "".join(f'<tr><td>{html.escape(i)}</td><td class="err">{html.escape(e)}</td></tr>' for i, e in all_errors)
        + "</table>"
        + (f"<p>... and {error_count - len(errors)} more.</p>" if error_count > len(errors) else "")
    )
    manifest = read_labels_manifest(labels_uri, storage_options)
    summary = (f"{total} label rows in {html.escape(labels_uri)}: {total - error_count} labelled, {error_count} error rows. "
               f"Showing {len(figures)} (image | segments and boundaries).")
    (out / "index.html").write_text(_PAGE.format(
        title=html.escape(labels_uri), n_images=len(figures), summary=summary,
        method=_method_line(manifest), warning=_model_warning(manifest), figures="\n".join(figures[k] for k in sorted(figures)),
        n_errors=error_count + len(image_errors), errors=error_html,
    ))
    return {"shown": len(figures), "rows": total, "errors": error_count, "images_not_shown": len(image_errors),
            "index": str(out / "index.html")}
