"""``tune()``: from a labelled sample to the best DiffSeg parameters for it.

Order of work, cheapest and most likely to fail first:

  1. the grid's own values (no model needed);            -> GridError
  2. the ground truth, the images, their match, the sample, the folds;
                                                          -> GroundTruthError / SampleError
  3. attention: cached per image under OUT/attention (keyed by model, image
     bytes, size, timestep, dtype, crop); when an image is missing, the model
     is first checked from its configs (diffseg_core.model_check: no weights,
     no torch) and the grid against the resolutions they give, then loaded;
                                                          -> TuneError / GridError
  4. ground truth at each label frame; Ray (started only now): every setting
     on every image;
  5. selection (in-sample best + k-fold held-out estimate), best.json,
     results.csv, tau.png.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

from pipeline.after.datasets_gt import load_ground_truth
from pipeline.job.params import (
    TUNE_KEY,  # the part of best.json that `diffseg label --params` reads
)
from pipeline.tune.cache import CACHE_DIR, AttentionCache, model_identity
from pipeline.tune.grid import Grid, Setting, check_values, default_setting, without_features
from pipeline.tune.grid import settings as grid_settings
from pipeline.tune.prepare import (
    SampleError,
    assign_folds,
    fill_cache,
    load_targets,
    pick_sample,
)
from pipeline.tune.report import (
    label_flags,
    label_params,
    method_block,
    plot_tau,
    write_best_json,
    write_results_csv,
)
from pipeline.tune.select import select

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "CompVis/stable-diffusion-v1-4"
RANDOM_WEIGHT_MODELS = {"tiny-random": "RANDOM weights: these scores say nothing about DiffSeg"}


class TuneError(RuntimeError):
    """The search cannot run (one sentence saying why)."""


def tune(
    images: str,
    ground_truth: str,
    format: str,
    *,
    model: str = DEFAULT_MODEL,
    revision: str | None = None,
    image_size: int | None = None,
    timestep: int = 300,
    dtype: str | None = None,
    paper_preprocess: bool = False,
    n: int = 100,
    out: str = "tune",
    folds: int = 5,
    seed: int = 0,
    grid: Grid | None = None,
    score_size: int = 512,
    batch_size: int = 4,
    chunk_size: int | None = None,
    categories: Sequence[str] | None = None,
    coco_offset: int = 1,
    num_classes: int | None = None,
    ignore_values: Sequence[int] = (255,),
    storage_options: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Search DiffSeg's parameters on ``n`` labelled images; write OUT/best.json, results.csv, tau.png.

    Returns the report (also in best.json, without the full ranking). Raises
    GridError, GroundTruthError, SampleError or TuneError (one sentence each).
    """
    grid = grid or Grid()
    check_values(grid)
    if batch_size < 1:
        raise TuneError(f"--batch-size must be at least 1, got {batch_size}")
    gt = load_ground_truth(format, ground_truth, categories=categories, coco_offset=coco_offset,
                           num_classes=num_classes, ignore_values=ignore_values, storage_options=storage_options)
    index, sample, counts = pick_sample(images, gt, n, seed, storage_options)
    assign_folds(sample, folds, seed)
    chosen: dict[str, Any] = {}

    def load_extractor() -> Any:
        from diffseg_core.extract import AttentionExtractor

        try:
            return AttentionExtractor.from_pretrained(model, dtype=dtype, image_size=image_size, timestep=timestep,
                                                      revision=revision)
        except Exception as exc:  # noqa: BLE001 - ModelLoadError, bad size, missing files
            raise TuneError(f"cannot load model {model!r}: {_one_line(exc)}") from None

    def check_model(resolutions: list[int], size: int) -> None:
        chosen["settings"], chosen["notes"] = grid_settings(grid, resolutions, model, size)

    def check_model_files() -> None:
        """Before any weight is loaded: the model exists and the grid can run on it (from its configs)."""
        from diffseg_core.model_check import ModelLoadError
        from diffseg_core.model_check import check_model as check_files

        try:
            found = check_files(model, revision=revision)
            size = found.image_size(image_size) if found.complete else None
        except ModelLoadError as exc:
            raise TuneError(f"cannot load model {model!r}: {_one_line(exc.what)}") from None
        except ValueError as exc:
            raise TuneError(f"--image-size for model {model!r}: {_one_line(exc)}") from None
        if size is not None:  # a single-file checkpoint's configs are known only once it is loaded
            check_model(found.attention_resolutions(size), size)

    # A grid the model cannot run fails here, in a second; a model that cannot be found fails only
    # if some attention is not cached (a fully cached sample needs neither the model nor its files).
    missing_model: list[TuneError] = []
    try:
        check_model_files()
    except TuneError as exc:
        missing_model.append(exc)

    def model_files_found() -> None:
        if missing_model:
            raise missing_model[0]

    dtype = dtype or _default_dtype()  # imports torch: after the checks above
    try:
        identity = model_identity(model, revision)
    except Exception as exc:  # noqa: BLE001 - building tiny-random, reading a folder
        raise TuneError(f"cannot identify model {model!r}: {_one_line(exc)}") from None

    out_dir = Path(out)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TuneError(f"cannot write to --out {out!r}: {exc}") from None
    cache = AttentionCache(out_dir / CACHE_DIR)
    key_settings = {"image_size": image_size, "timestep": timestep, "dtype": dtype, "paper_preprocess": paper_preprocess}
    filled = fill_cache(index, sample, cache, key_settings, identity, load_extractor, check_model,
                        check_model_files=model_files_found, batch_size=batch_size, progress=progress)
    dropped = filled["dropped"]
    targets = load_targets(sample, gt, score_size, dropped)
    if len(sample) < 2:
        raise SampleError(f"k-fold selection needs at least 2 usable images; {len(sample)} left after "
                          f"{len(dropped)} could not be read (e.g. {next(iter(dropped.items()), ('', ''))[0]!r})")
    num_folds = assign_folds(sample, folds, seed)  # again, over the images that are left
    resolutions, size = filled["resolutions"], filled["image_size"]
    default, notes = _default(resolutions, size, model)
    notes = chosen["notes"] + notes
    plain = chosen["settings"]
    if filled["without_features"] and len(without_features(plain)) < len(plain):
        plain = without_features(plain)
        notes.append(f"grouping ncut with the features affinity left out: {filled['without_features']} of the "
                     f"{filled['cached'] + filled['extracted']} cached images hold no encoder features (cached "
                     f"before they were kept; remove {cache.root} to extract them again)")
    if default is not None and default.is_ncut and default.ncut_affinity == "features" and filled["without_features"]:
        default, notes = None, notes + ["the default setting cuts the encoder's features, which the cache does "
                                        "not hold for every image; no default score"]
    if not plain:
        raise TuneError("no setting of the grid can be scored: ncut's features affinity needs encoder features, "
                        f"which {filled['without_features']} cached images do not hold (remove {cache.root} "
                        "to extract them again)")

    from pipeline.tune.search import (
        SearchSession,  # torch and Ray: only once every check has passed
    )

    with SearchSession([str(cache.path(t.key)) for t in sample], targets, [t.fold for t in sample], num_folds,
                       gt.num_classes, resolutions, chunk_size=chunk_size, progress=progress) as session:
        all_settings, scores, eligible, result = _search_stages(session, grid, plain, default, notes)
    default_index = 0 if default is not None else None
    sel = select(scores, result.images, default_index, eligible)

    ranking = [_row(rank + 1, all_settings[i], s, i == default_index) for rank, (i, s) in enumerate(sel.ranking)]
    if sel.kept_default:
        notes.append(f"kept the default: the search's {num_folds}-fold held-out mIoU "
                     f"({100 * sel.held_out.miou:.1f} %) is below the default's ({100 * sel.default_score.miou:.1f} %) "
                     "on this sample, so its best in-sample setting would not carry over to new images "
                     "(more labelled images or a narrower grid can change that)")
    best_setting = all_settings[sel.best]
    params = label_params(best_setting, resolutions)
    extraction = {"model": model, "revision": identity.get("revision"), "image_size": size,
                  "image_size_given": image_size, "timestep": timestep, "dtype": dtype,
                  "paper_preprocess": paper_preprocess, "resolutions": resolutions}
    if model in RANDOM_WEIGHT_MODELS:
        notes.append(f"model {model!r} has {RANDOM_WEIGHT_MODELS[model]}")
    if score_size > 0:
        notes.append(f"labels and ground truth scored at most {score_size} px on the longer side "
                     "(--score-size 0: the full label frame)")
    files = {"best": str(out_dir / "best.json"), "results": str(out_dir / "results.csv")}
    report: dict[str, Any] = {
        TUNE_KEY: params,
        "best": {"setting": best_setting.describe(), "in_sample": dict(sel.ranking)[sel.best].as_dict(),
                 # kept default: no choice was made, so its score on the sample is the held-out one
                 "held_out": (sel.default_score if sel.kept_default else sel.held_out).as_dict(),
                 "search_held_out": sel.held_out.as_dict(), "kept_default": sel.kept_default,
                 **_fields(best_setting)},
        "default": ({"setting": all_settings[default_index].describe(), "score": sel.default_score.as_dict()}
                    if default_index is not None else None),
        "folds": [dict(f, setting=all_settings[f["chosen"]].describe()) for f in sel.folds],
        "label_flags": label_flags(params, extraction),
        "method_block": method_block(params),
        "extraction": extraction,
        "format": format,
        "sample": {**counts, "scored": len(sample), "dropped": dropped, "seed": seed, "folds": num_folds,
                   "image_ids": [t.image_id for t in sample]},
        "cache": {"dir": str(cache.root), "cached": filled["cached"], "extracted": filled["extracted"]},
        "settings": len(all_settings),
        "search": {"seconds": round(result.seconds, 3), "tasks": result.tasks, "label_maps_scored": result.scored},
        "score_size": score_size,
        "notes": notes,
        "files": files,
        "ranking": ranking,
    }
    write_results_csv(Path(files["results"]), ranking)
    plot = out_dir / "tau.png"
    best_row = next(r for r in ranking if r["rank"] == 1)
    note = RANDOM_WEIGHT_MODELS.get(model, "").split(":")[0]
    if plot_tau(plot, ranking, best_row, default_setting(model).thresholds[0], note):
        files["plot"] = str(plot)
    write_best_json(Path(files["best"]), report)
    return report


def _default(resolutions: list[int], image_size: int, model: str) -> tuple[Setting | None, list[str]]:
    """The default setting (scored even when outside the grid), unless the model cannot run it."""
    from diffseg_core.parameters import anchor_grid_problem

    default = default_setting(model)
    problem = anchor_grid_problem(default.num_points, resolutions, model, image_size)
    if problem:
        return None, [f"the default setting cannot run on this model ({problem}); no default score"]
    return default, []


def _search_stages(session: Any, grid: Grid, plain: list[Setting], default: Setting | None,
                   notes: list[str]) -> tuple[list[Setting], Any, Any, Any]:
    """Score the plain grid, then PAMR on the best few plain settings of each grouping on each fold's
    training folds (per grouping: the cut's rows would seldom be among the merge's many otherwise).

    Returns the settings (the default first), their counts (settings, folds, 3, classes), which of
    them each fold (and, last row, the in-sample choice) may choose, and the stages' result (images,
    seconds, tasks and label maps scored).
    """
    from dataclasses import replace

    import numpy as np

    from pipeline.tune.grid import boundary_settings
    from pipeline.tune.select import top

    # the default's own method is scored plain too (tiny-demo's card turns PAMR on, at weights no preset gives)
    stage1 = list(dict.fromkeys(([default.method] if default is not None else []) + plain))
    first = session.search(stage1)
    counts = first.counts
    settings = list(stage1)
    plain_ok = "off" in grid.boundaries
    k = counts.shape[1]
    searched = [i for i, s in enumerate(stage1) if s.grouping in grid.groupings]
    chosen_by: list[list[int]] = [[] for _ in range(k + 1)]  # per fold, then row k: the in-sample choice
    for grouping in grid.groupings:
        among = [i for i in searched if stage1[i].grouping == grouping]
        if among:
            in_sample, per_fold = top(counts, first.images, grid.boundary_candidates, among)
            for row, picked in enumerate(per_fold + [in_sample]):
                chosen_by[row] += picked
    variants = [boundary_settings([stage1[i] for i in rows], grid) for rows in chosen_by]
    stage2 = list(dict.fromkeys(s for v in variants for s in v if s not in settings))
    if default is not None and default.boundaries != "off" and default not in stage2:
        stage2.insert(0, default)
    summary = first
    if stage2:
        second = session.search(stage2, desc="score with --boundaries pamr")
        settings += stage2
        counts = np.concatenate([counts, second.counts])
        summary = replace(first, seconds=first.seconds + second.seconds, tasks=first.tasks + second.tasks,
                          scored=first.scored + second.scored)
        notes.append(f"--boundaries pamr scored on the best {grid.boundary_candidates} plain settings of each "
                     f"fold and grouping ({len(stage2)} settings with PAMR, {second.seconds:.0f} s)")
    eligible = np.zeros((k + 1, len(settings)), dtype=bool)
    for row, v in enumerate(variants):
        eligible[row, searched] = plain_ok
        for s in v:
            eligible[row, settings.index(s)] = True
    if default is not None:
        d = settings.index(default)
        eligible[:, d] = default.boundaries in grid.boundaries and default.grouping in grid.groupings
        if d != 0:  # the default first: ties keep it
            order = [d] + [i for i in range(len(settings)) if i != d]
            settings, counts, eligible = [settings[i] for i in order], counts[order], eligible[:, order]
    if not eligible.any(axis=1).all():
        raise TuneError("no setting of the grid can be chosen (--boundaries asks for none that was scored)")
    return settings, counts, eligible, summary


def _fields(s: Setting) -> dict[str, Any]:
    return {"grouping": s.grouping, "kl_threshold": list(s.thresholds), "constant_tau": s.constant_tau,
            "iterations": s.iterations, "num_points": s.num_points, "weights": s.weights, "refine": s.refine,
            "boundaries": s.boundaries, "pamr_iterations": s.pamr_iterations if s.boundaries == "pamr" else None,
            "ncut_threshold": s.ncut_threshold if s.is_ncut else None,
            "ncut_affinity": s.ncut_affinity if s.is_ncut else None}


def _row(rank: int, s: Setting, score: Any, is_default: bool) -> dict[str, Any]:
    return {"rank": rank, "miou": score.miou, "pixel_accuracy": score.pixel_accuracy, "setting": s.describe(),
            **_fields(s), "kl_threshold": ",".join(f"{v:g}" for v in s.thresholds), "is_default": is_default}


def _default_dtype() -> str:
    import torch

    return "fp16" if torch.cuda.is_available() else "fp32"


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) < 400 else text[:400] + "..."
