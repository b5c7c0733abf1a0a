"""Before the search: pick the labelled sample, fill the attention cache, load the ground truth.

The images are image files under IMAGES, matched to ground truth with the same
readers as ``diffseg eval`` (pipeline.after.datasets_gt: by relative path, else by
file stem). Each sampled image is decoded exactly as ``diffseg label`` decodes
it (pipeline.data.decode, with or without the paper's crop), so its attention and
its label frame are what labeling would give. Ground truth is brought to that
frame the way ``diffseg eval`` does (centre-crop to its aspect, nearest resize).
"""
from __future__ import annotations

import hashlib
import logging
import random
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np

from pipeline.after.datasets_gt import GroundTruth, GroundTruthError
from pipeline.after.image_index import ImageIndex, center_crop_resize
from pipeline.data.decode import decode_image
from pipeline.tune.cache import AttentionCache, extraction_key, has_features

logger = logging.getLogger(__name__)


class SampleError(ValueError):
    """No usable sample (one sentence saying why)."""


@dataclass
class TuneImage:
    image_id: str
    gt_uri: str
    key: str = ""  # attention cache key
    frame: tuple[int, int] = (0, 0)  # (height, width) of the label diffseg label would make
    fold: int = 0


def pick_sample(images: str, gt: GroundTruth, n: int, seed: int, storage_options: dict[str, Any] | None,
                ) -> tuple[ImageIndex, list[TuneImage], dict[str, int]]:
    """The image files under ``images`` that have ground truth; ``n`` of them (seeded) when more."""
    if n < 1:
        raise SampleError(f"--n must be at least 1, got {n}")
    from pipeline.data.sources import NoInputError

    try:
        index = ImageIndex.build(images, storage_options)
    except NoInputError as exc:
        raise SampleError(str(exc).rstrip(".")) from None
    except (OSError, ValueError) as exc:
        raise SampleError(f"cannot list {images!r}: {type(exc).__name__}: {exc}") from None
    if not index.files:
        shards = f" ({len(index.containers)} tar/Parquet shards: tune reads image files only)" if index.containers else ""
        raise SampleError(f"no image files under {images!r}{shards}")
    matched = [TuneImage(i, uri) for i in sorted(index.files) if (uri := gt.find(i)) is not None]
    if not matched:
        example = next(iter(sorted(index.files)))
        raise SampleError(
            f"none of the {len(index.files)} images under {images!r} has ground truth under {gt.root!r} "
            f"(format {gt.format}; e.g. {example!r} matches no PNG by relative path or file stem)"
        )
    sample = sorted(random.Random(seed).sample(matched, n), key=lambda t: t.image_id) if len(matched) > n else matched
    return index, sample, {"images": len(index.files), "with_ground_truth": len(matched), "sampled": len(sample)}


def assign_folds(sample: list[TuneImage], folds: int, seed: int) -> int:
    """Seeded split into ``min(folds, len(sample))`` folds of near-equal size; returns the fold count."""
    if folds < 2:
        raise SampleError(f"--folds must be at least 2, got {folds}")
    if len(sample) < 2:
        raise SampleError(f"k-fold selection needs at least 2 images with ground truth, found {len(sample)}")
    k = min(folds, len(sample))
    order = list(range(len(sample)))
    random.Random(seed + 1).shuffle(order)
    for rank, i in enumerate(order):
        sample[i].fold = rank % k
    return k


def read_sample(index: ImageIndex, sample: list[TuneImage], skipped: Callable[[str, str], None]) -> Iterator[tuple[TuneImage, bytes]]:
    by_id = {t.image_id: t for t in sample}
    for image_id, data, error in index.read(list(by_id)):
        if data is None:
            skipped(image_id, error or "unreadable")
            continue
        yield by_id[image_id], data


def fill_cache(
    index: ImageIndex,
    sample: list[TuneImage],
    cache: AttentionCache,
    key_settings: dict[str, Any],
    identity: dict[str, Any],
    load_extractor: Callable[[], Any],
    check_model: Callable[[list[int], int], None],
    *,
    check_model_files: Callable[[], None] = lambda: None,
    batch_size: int,
    progress: bool,
) -> dict[str, Any]:
    """Key every sampled image, extract the missing ones; returns counts and what was dropped.

    ``load_extractor`` is called only when something is missing (a fully cached
    sample never loads the model); ``check_model_files()`` runs before it (the
    model's configs: a missing model or a grid it cannot run fails in a second,
    before any weight is loaded), and ``check_model(resolutions, image_size)``
    again on the loaded extractor, before any extraction. Images that cannot be read or decoded leave
    the sample (reported, not fatal). ``without_features``: how many entries hold no encoder
    features (cached before they were kept, or a model that gives none).
    """
    from tqdm.auto import tqdm

    dropped: dict[str, str] = {}
    misses: list[tuple[TuneImage, bytes]] = []
    hits = 0
    without_features = 0
    model: dict[str, Any] = {}
    for item, data in read_sample(index, sample, lambda i, why: dropped.__setitem__(i, why)):
        item.key = extraction_key(identity, hashlib.sha256(data).hexdigest(), **key_settings)
        meta = cache.meta(item.key)
        if meta is None:
            misses.append((item, data))
        else:
            item.frame = (int(meta["height"]), int(meta["width"]))
            model = {"resolutions": list(meta["resolutions"]), "image_size": int(meta["image_size"])}
            hits += 1
            without_features += not has_features(meta)
    extracted = 0
    if misses:
        check_model_files()
        extractor = load_extractor()
        from pipeline.job.tasks import (
            chunked,  # imported here: it pulls in torch, which a refusal never needs
        )

        model = {"resolutions": list(extractor.attention_resolutions), "image_size": int(extractor.image_size)}
        check_model(model["resolutions"], model["image_size"])
        bar = tqdm(total=len(misses), desc="extract attention", unit="img", disable=not progress)
        for batch in chunked(_decoded(misses, extractor.image_size, key_settings["paper_preprocess"], dropped), batch_size):
            extraction = extractor.extract(np.stack([pixels for _, pixels in batch]))  # maps and features: one pass
            maps, features = extraction.self_attention, extraction.features
            for b, (item, _) in enumerate(batch):
                cache.put(item.key, {r: m[b] for r, m in maps.items()},
                          {"image_id": item.image_id, "height": item.frame[0], "width": item.frame[1],
                           "image_size": extractor.image_size}, pixels=batch[b][1],
                          features=features[b] if features is not None else None)
                without_features += features is None
            extracted += len(batch)
            bar.update(len(batch))
        bar.close()
    elif model:
        check_model(model["resolutions"], model["image_size"])
    sample[:] = [t for t in sample if t.image_id not in dropped]
    return {"cached": hits, "extracted": extracted, "dropped": dropped, "without_features": without_features,
            **model}


def _decoded(misses: list[tuple[TuneImage, bytes]], image_size: int, paper_preprocess: bool,
             dropped: dict[str, str]) -> Iterator[tuple[TuneImage, np.ndarray]]:
    for item, data in misses:
        decoded = decode_image(data, image_size, paper_preprocess=paper_preprocess)
        if decoded.error is not None:
            dropped[item.image_id] = decoded.error
            continue
        item.frame = (decoded.height, decoded.width)
        yield item, decoded.pixels


def score_frame(frame: tuple[int, int], max_side: int) -> tuple[int, int]:
    """The label frame, scaled down (aspect kept) so its longer side is at most ``max_side`` (0: as is)."""
    h, w = frame
    if max_side <= 0 or max(h, w) <= max_side:
        return h, w
    s = max_side / max(h, w)
    return max(1, round(h * s)), max(1, round(w * s))


def load_targets(sample: list[TuneImage], gt: GroundTruth, max_side: int,
                 dropped: dict[str, str]) -> list[np.ndarray]:
    """Ground truth of each image at its scoring frame (int16, -1 ignored); unreadable ones leave the sample."""
    targets, kept = [], []
    for item in sample:
        try:
            target = gt.load(item.gt_uri)
            if target.shape != item.frame:  # as diffseg eval: the label's frame
                target = center_crop_resize(target, item.frame, nearest=True)
            size = score_frame(item.frame, max_side)
            if size != item.frame:
                target = center_crop_resize(target, size, nearest=True)
        except (GroundTruthError, OSError, ValueError) as exc:
            dropped[item.image_id] = f"ground truth: {type(exc).__name__}: {exc}"
            continue
        targets.append(target.astype(np.int16))
        kept.append(item)
    sample[:] = kept
    return targets
