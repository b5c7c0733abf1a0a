"""What ``diffseg tune`` writes and prints: the table, best.json, results.csv, tau.png, and how to use the choice."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Sequence

from pipeline.tune.grid import DEFAULT_WEIGHTS, PAMR_DILATIONS, Setting


def label_params(setting: Setting, resolutions: Sequence[int]) -> dict[str, Any]:
    """The setting as label options; weights None when they are label's default (proportional)."""
    params = setting.label_params(resolutions)
    if setting.weights == DEFAULT_WEIGHTS:
        params["weights"] = None
    return params


def label_flags(params: dict[str, Any], extraction: dict[str, Any]) -> str:
    """The ``diffseg label`` flags that reproduce the chosen setting on the tuned model and frame."""
    flags = [f"--model {extraction['model']}"]
    if extraction.get("image_size_given") is not None:
        flags.append(f"--image-size {extraction['image_size_given']}")
    if extraction.get("timestep", 300) != 300:
        flags.append(f"--timestep {extraction['timestep']}")
    if params.get("grouping") == "ncut":
        flags += [f"--{key.replace('_', '-')} {value}" for key, value in _cut_items(params)]
    else:
        kl = params["kl_threshold"]
        flags.append("--kl-threshold " + (",".join(_num(v) for v in kl) if isinstance(kl, list) else _num(kl)))
        if not isinstance(kl, list):
            flags.append(f"--iterations {params['iterations']}")
        flags.append(f"--num-points {params['num_points']}")
    if params.get("weights") is not None:
        flags.append("--weights " + ",".join(_num(v) for v in params["weights"]))
    if params.get("refine"):
        flags.append("--refine")
    # always said: a model card may turn PAMR on (tiny-demo's does), so "off" is a choice too
    flags.append(f"--boundaries {params.get('boundaries', 'off')}")
    if params.get("boundaries") == "pamr":
        flags.append(f"--pamr-iterations {params['pamr_iterations']}")
        if tuple(params["pamr_dilations"]) != PAMR_DILATIONS:
            flags.append("--pamr-dilations " + ",".join(map(str, params["pamr_dilations"])))
    if extraction.get("paper_preprocess"):
        flags.append("--paper-preprocess")
    return " ".join(flags)


def method_block(params: dict[str, Any]) -> str:
    """The job spec's ``method:`` section for the chosen setting (YAML)."""
    lines = ["method:"]
    if params.get("grouping") == "ncut":
        lines += [f"  {key}: {value}" for key, value in _cut_items(params)]
    else:
        kl = params["kl_threshold"]
        lines.append("  kl_threshold: " + (f"[{', '.join(_num(v) for v in kl)}]" if isinstance(kl, list) else _num(kl)))
        if not isinstance(kl, list):
            lines.append(f"  iterations: {params['iterations']}")
        lines += [f"  num_points: {params['num_points']}", f"  refine: {'true' if params['refine'] else 'false'}"]
    if params.get("weights") is not None:
        lines.append(f"  weights: [{', '.join(_num(v) for v in params['weights'])}]")
    lines.append(f"  boundaries: {params.get('boundaries', 'off')}")
    if params.get("boundaries") == "pamr":
        lines += [f"  pamr_iterations: {params['pamr_iterations']}",
                  f"  pamr_dilations: [{', '.join(map(str, params['pamr_dilations']))}]"]
    return "\n".join(lines)


def write_results_csv(path: Path, ranking: list[dict[str, Any]]) -> None:
    fields = ["rank", "miou", "pixel_accuracy", "grouping", "kl_threshold", "iterations", "num_points", "weights",
              "refine", "ncut_threshold", "ncut_affinity", "boundaries", "pamr_iterations", "is_default"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in ranking:
            writer.writerow({k: row[k] for k in fields})


def write_best_json(path: Path, report: dict[str, Any]) -> None:
    body = {k: v for k, v in report.items() if k != "ranking"}
    path.write_text(json.dumps(body, indent=2) + "\n")


def plot_tau(path: Path, ranking: list[dict[str, Any]], best: dict[str, Any], default_tau: float,
             title_note: str) -> bool:
    """mIoU and pixel accuracy against tau (one-tau schedules), one line per iteration count.

    Drawn for the best setting's anchor grid, weights and refine, or, when that
    slice of the grid has fewer than two taus (the default setting scored
    outside the grid), for the best-ranked slice that has. Returns False
    (nothing drawn) when no slice has two.
    """
    def key(r: dict[str, Any]) -> tuple:
        return r["num_points"], r["weights"], r["refine"], r["boundaries"], r["pamr_iterations"]

    slices: dict[tuple, list[dict[str, Any]]] = {}
    for r in ranking:
        if r["constant_tau"] is not None:
            slices.setdefault(key(r), []).append(r)
    wide = [k for k, rows in slices.items() if len({r["constant_tau"] for r in rows}) >= 2]
    if not wide:
        return False
    chosen = key(best) if key(best) in wide else min(wide, key=lambda k: min(r["rank"] for r in slices[k]))
    rows = slices[chosen]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    for ax, metric, name in ((axes[0], "miou", "mIoU %"), (axes[1], "pixel_accuracy", "pixel accuracy %")):
        counts = sorted({r["iterations"] for r in rows})
        for i, n in enumerate(counts):
            line = sorted((r["constant_tau"], 100 * r[metric]) for r in rows if r["iterations"] == n)
            # iteration counts often give the same scores: wider, fainter lines first and a
            # line style each, so a line drawn over another still shows
            ax.plot([x for x, _ in line], [y for _, y in line], marker="o", ms=3.5, alpha=0.85,
                    lw=1.2 + 1.6 * (len(counts) - 1 - i), ls=("-", "--", "-.", ":")[i % 4],
                    label=f"{n} iteration{'s' if n > 1 else ''}")
        ax.axvline(default_tau, color="grey", ls=":", lw=1, label=f"default tau {default_tau:g}")
        if best["constant_tau"] is not None and key(best) == chosen:
            ax.plot([best["constant_tau"]], [100 * best[metric]], marker="*", ms=14, color="black", ls="none",
                    label=f"chosen ({best['iterations']} it.)")
        ax.set_xlabel("KL threshold tau (the same at every iteration)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    num_points, weights, refine, boundaries, pamr_iterations = chosen
    title = (f"num_points={num_points}, weights={weights}, refine={'on' if refine else 'off'}, boundaries="
             + (f"pamr({pamr_iterations})" if boundaries == "pamr" else "off"))
    if chosen != key(best):
        title += " (the chosen setting's own slice has one tau)"
    fig.suptitle(title + (f"  [{title_note}]" if title_note else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def format_report(report: dict[str, Any], top: int = 15) -> str:
    """The text ``diffseg tune`` prints."""
    def pct(v: float | None) -> str:
        return "    -" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:5.1f}"

    s, c = report["sample"], report["cache"]
    lines = [
        f"tune: {s['scored']} images scored ({s['with_ground_truth']} of {s['images']} images under the input have "
        f"ground truth, {s['sampled']} sampled, {len(s['dropped'])} dropped); attention: {c['extracted']} extracted, "
        f"{c['cached']} from the cache ({c['dir']})",
        f"{report['settings']} settings in {report['search']['seconds']:.1f} s on Ray "
        f"({report['search']['tasks']} tasks, {report['search']['label_maps_scored']} distinct label maps scored), "
        f"model {report['extraction']['model']} at {report['extraction']['image_size']} px",
        "",
        f"{'rank':>4} {'mIoU %':>7} {'ACC %':>6}  setting",
    ]
    shown = report["ranking"][:top]
    default_row = next((r for r in report["ranking"] if r["is_default"]), None)
    # the default and each grouping's best are shown even below the top rows
    best_of = {}
    for r in report["ranking"]:
        best_of.setdefault(r.get("grouping", "kl-merge"), r)
    for extra in [default_row, *best_of.values()]:
        if extra is not None and extra not in shown:
            shown = shown + [extra]
    for r in shown:
        mark = "  (default)" if r["is_default"] else ""
        lines.append(f"{r['rank']:>4} {pct(r['miou']):>7} {pct(r['pixel_accuracy']):>6}  {r['setting']}{mark}")
    if len(report["ranking"]) > len(shown):
        lines.append(f"     ... {len(report['ranking']) - len(shown)} more in {report['files']['results']}")
    b, d = report["best"], report["default"]
    k = len(report["folds"])
    lines += [
        "",
        f"best setting:   {b['setting']}",
    ]
    if b.get("kept_default"):
        sh = b["search_held_out"]
        lines += [
            f"  kept the default: mIoU {pct(b['held_out']['miou'])} %  ACC {pct(b['held_out']['pixel_accuracy'])} %"
            f"  ({s['scored']} images; no choice made, so expect this on new images)",
            f"  the search:   mIoU {pct(sh['miou'])} %  ACC {pct(sh['pixel_accuracy'])} %  held out ({k}-fold), "
            "below the default: what it picks on this sample does not carry over",
        ]
    else:
        lines += [
            f"  in-sample     mIoU {pct(b['in_sample']['miou'])} %  ACC {pct(b['in_sample']['pixel_accuracy'])} %"
            f"  ({s['scored']} images; optimistic: chosen on these images)",
            f"  held-out      mIoU {pct(b['held_out']['miou'])} %  ACC {pct(b['held_out']['pixel_accuracy'])} %"
            f"  ({k}-fold: each fold scored by the setting chosen on the other {k - 1}; expect this on new images)",
        ]
    if d is not None:
        lines.append(f"default:        {d['setting']}: mIoU {pct(d['score']['miou'])} %  "
                     f"ACC {pct(d['score']['pixel_accuracy'])} %  (same images; fixed, so no selection bias)")
    chosen = sorted({f["setting"] for f in report["folds"]})
    lines.append(f"settings chosen in the {k} folds: {len(chosen)} distinct" + (f": {chosen[0]}" if len(chosen) == 1 else ""))
    lines += ["", "use it:", f"  diffseg label INPUT OUTPUT --params {report['files']['best']}",
              f"  diffseg label INPUT OUTPUT {report['label_flags']}",
              "  job spec:", *("    " + line for line in report["method_block"].splitlines()),
              "", f"wrote {report['files']['best']}, {report['files']['results']}"
              + (f", {report['files']['plot']}" if report["files"].get("plot") else "")]
    lines += [f"note: {n}" for n in report["notes"]]
    return "\n".join(lines)


def _cut_items(params: dict[str, Any]) -> list[tuple[str, str]]:
    """The normalized cut's label options (and an anchor grid when tune had to name one), as text."""
    threshold = params["ncut_threshold"]
    items = [("grouping", "ncut"), ("ncut_threshold", threshold if isinstance(threshold, str) else _num(threshold)),
             ("ncut_affinity", params["ncut_affinity"])]
    return items + ([("num_points", str(params["num_points"]))] if "num_points" in params else [])


def _num(v: float) -> str:
    """Shortest exact text of a number (integers without ".0")."""
    f = float(v)
    return str(int(f)) if f.is_integer() and abs(f) < 1e15 else repr(f)
