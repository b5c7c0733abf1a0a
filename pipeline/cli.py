"""The ``diffseg`` command line: a thin argparse layer over ``pipeline.label``."""
from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

from pipeline.arg_parser import CommandParser
from pipeline.after.method import describe_method
from pipeline.arg_types import comma_floats, comma_ints, described
from pipeline.data.credentials import storage_options_json
from pipeline.console import EVERY_ENV, PLAIN_EVERY_S, command_console, plain_every_s
from pipeline.help_format import DefaultsHelpFormatter
from pipeline.job.devices import DEVICES
from pipeline.job.params import METHOD_PARAMS, read_frame, read_params
from pipeline.errors import LabelError
from pipeline.job.options import DEFAULT_MODEL, LabelOptions

_DEFAULTS = LabelOptions()
# a frame option at its default counts as not given (best.json's value is taken)
_DEFAULTS_OF = {"revision": None, "image_size": _DEFAULTS.image_size, "timestep": _DEFAULTS.timestep,
                "paper_preprocess": False}


def _one_or_per_iteration(text: str) -> float | list[float]:
    values = comma_floats(text)
    return values[0] if len(values) == 1 else values


_kl_threshold = described(_one_or_per_iteration, "a number, or one per iteration separated by commas (1.1 or "
                          "1.1,1.0,0.9)", "1.1", "1.0,1.1,1.2")
_weights = described(comma_floats, "numbers separated by commas, one per attention resolution, finest first "
                     "(8,4,2,1)", "8,4,2,1", "1")
_dilations = described(comma_ints, "whole numbers separated by commas (1,2,4,8,12,24)", "1,2,4,8,12,24", "2")
def _auto_or_float(text: str) -> float | str:
    return "auto" if text == "auto" else float(text)


_ncut_threshold = described(_auto_or_float, "auto, or a number in (0, 2] (0.35)", "auto", "0.35")
_resources = described(json.loads, "a JSON object of Ray resources and amounts ('{\"labeler\": 1}')",
                       '{"labeler": 1}')


def build_parser(extra: Callable[[Any], None] | None = None) -> argparse.ArgumentParser:
    """The ``diffseg`` parser; ``extra(subparsers)`` may add commands (jobs.cli adds the job commands)."""
    from pipeline.data.manifest import package_version

    parser = CommandParser(prog="diffseg", description="DiffSeg pseudo-labels at scale.")
    parser.add_argument("--version", action="version", version=f"diffseg-labeler {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "label",
        help="label every image under INPUT, write Parquet pseudo-labels under OUTPUT",
        description="Label every image under INPUT (folder, glob, Parquet or tar shards; local, file://, s3://, "
        "gs://) and write Parquet pseudo-labels under OUTPUT. Rerun the same command to resume.",
        formatter_class=DefaultsHelpFormatter,
    )
    p.add_argument("input", help="input URL: folder, file or glob")
    p.add_argument("output", help="output folder URL")
    m = p.add_argument_group("model")
    m.add_argument("--model", default=None,
                   help="hub id, local diffusers folder, .safetensors, tiny-demo (small learned demo model) "
                   f"or tiny-random (random weights); default: {DEFAULT_MODEL}, or the model a --params "
                   "best.json was tuned on")
    m.add_argument("--revision", default=None, help="hub revision")
    m.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"], help="default: fp16 on GPU, fp32 on CPU")
    m.add_argument("--vae-dtype", default=None, choices=["auto", "fp32", "fp16", "bf16"],
                   help="VAE encoder precision (default auto: bf16 on GPU, the UNet's dtype on CPU); "
                   "recorded in the manifest when given")
    m.add_argument("--image-size", type=int, default=None, help="model input size S (default: the model's native size)")
    m.add_argument("--allow-unsafe-weights", action="store_true",
                   help="load pickle weights (.bin, .ckpt) when a model has no .safetensors: such files can run "
                   "code, use only models you trust (recorded in the manifest)")
    m.add_argument("--timestep", type=int, default=_DEFAULTS.timestep,
                   help="timestep the one UNet call is conditioned on, as in the paper; the latent stays clean "
                   "(no noise is added)")
    d = p.add_argument_group("DiffSeg")
    # These default to None so that a --params file, then the model's card, can fill what the command
    # line leaves out (pipeline.job.options.LabelOptions.with_model_defaults).
    d.add_argument("--kl-threshold", type=_kl_threshold, default=None,
                   help="merge threshold tau on the symmetric KL (default: the model's; 1.1 suits COCO-like "
                   "photos with SD, 0.9 street scenes); comma-separated for one per iteration")
    d.add_argument("--num-points", type=int, default=None, help="anchor grid side (default: the model's; 16 for SD)")
    d.add_argument("--iterations", type=int, default=None,
                   help="merging iterations (default: the model's; 3 for SD; a --kl-threshold list sets its own: "
                   "one per iteration)")
    d.add_argument("--refine", action=argparse.BooleanOptionalAction, default=None,
                   help="k-means refinement of the proposals (default: off)")
    d.add_argument("--weights", type=_weights, default=None,
                   help="aggregation weights, one per attention resolution, finest first, e.g. 8,4,2,1 "
                   "(default: the model's; for SD proportional to the resolution)")
    d.add_argument("--boundaries", default=None, metavar="{off,pamr}",
                   help="pamr: refine the soft proposal maps with the image's own pixels (PAMR) before the "
                   "argmax, so segments follow the picture's edges (default: the model's; off for SD, the paper)")
    d.add_argument("--pamr-iterations", type=int, default=None,
                   help="PAMR iterations (default: the model's; 10 for SD, the PAMR paper's)")
    d.add_argument("--pamr-dilations", type=_dilations, default=None, metavar="D,D,...",
                   help="PAMR's neighbourhood dilations (default: the model's; 1,2,4,8,12,24 for SD)")
    d.add_argument("--min-region-area", type=int, default=_DEFAULTS.min_region_area, metavar="PIXELS",
                   help="connected regions (islands, holes) smaller than this many pixels join the segment "
                   "around them (default 0: off)")
    d.add_argument("--connected", action="store_true",
                   help="every connected region becomes its own segment (instance-like masks)")
    d.add_argument("--grouping", default=None, choices=["kl-merge", "ncut"],
                   help="which pixels belong together: kl-merge, the paper's merge of attention maps by KL "
                   "divergence (kl-threshold, num-points, iterations and refine apply), or ncut, a recursive "
                   "normalized cut of a token affinity, as DiffCut (default: kl-merge)")
    d.add_argument("--ncut-threshold", type=_ncut_threshold, default=None, metavar="TAU",
                   help="ncut: a segment is cut in two while its best cut's value is under TAU; auto: per image, "
                   "from its own spectrum (default: auto)")
    d.add_argument("--ncut-affinity", default=None, choices=["attention", "features"],
                   help="ncut: cut the aggregated self-attention's rows (attention), or the UNet encoder's last "
                   "self-attention block's output (features, DiffCut's) (default: attention)")
    d.add_argument("--params", default=None, metavar="JSON",
                   help="DiffSeg parameters from a file, e.g. tune/best.json from `diffseg tune` (kl_threshold, "
                   "iterations, num_points, refine, weights, grouping, ncut_threshold); flags given on the command line win over the file")
    d.add_argument("--paper-preprocess", action="store_true",
                   help="the paper's protocol: centre-crop each image to a square, resize to the image size, "
                   "and label at that size (S x S) instead of the image's own")
    v = p.add_argument_group("class names (open vocabulary, from the same UNet pass)")
    v.add_argument("--vocabulary", default=None,
                   help="name segments with these classes: comma-separated names ('person,dog,grass field') or "
                   "a preset (coco-stuff-27, cityscapes); adds class and class_score per segment and a class_map "
                   "per row")
    v.add_argument("--vocabulary-file", default=None, help="the classes from a file, one name a line ('#' comments)")
    v.add_argument("--class-voting", default=_DEFAULTS.class_voting, choices=["majority", "mean"],
                   help="a segment's class: the one most of its pixels vote for (official), or the largest mean "
                   "of the normalised class maps inside it")
    v.add_argument("--class-threshold", type=float, default=_DEFAULTS.class_threshold,
                   help="a segment whose class gets less than this share of its pixels' votes is unknown (null)")
    r = p.add_argument_group("resources")
    r.add_argument("--actors", type=int, default=None, help="model actors (default: one per GPU, or CPUs - 1)")
    r.add_argument("--batch-size", type=int, default=_DEFAULTS.batch_size, help="images per model call")
    r.add_argument("--device", choices=DEVICES, default=_DEFAULTS.device,
                   help="gpu: GPU model actors, or stop with one sentence when the cluster has none (waiting up to "
                   "--gpu-wait s for an autoscaler to add them); cpu: CPU actors; auto: GPUs when the cluster has "
                   "or can add them, else CPU (said in the log)")
    r.add_argument("--gpu-wait", dest="gpu_wait_s", type=float, default=_DEFAULTS.gpu_wait_s, metavar="SECONDS",
                   help="how long to wait for an autoscaler to add GPU nodes")
    r.add_argument("--gpus-per-actor", type=float, default=None, help="default 1 on GPUs, 0 for CPU actors")
    r.add_argument("--cpus-per-actor", type=float, default=_DEFAULTS.cpus_per_actor,
                   help="CPU actors: CPUs Ray reserves for each")
    r.add_argument("--threads-per-actor", type=int, default=None,
                   help="CPU actors: torch threads each (default: CPUs / actors)")
    r.add_argument("--max-actors", type=int, default=None,
                   help="autoscaling clusters: let the model actor pool grow from --actors up to this many")
    r.add_argument("--actor-resources", type=_resources, default=None,
                   help='custom Ray resources each model actor needs, as JSON, e.g. \'{"labeler": 1}\'')
    r.add_argument("--ray-address", default=None, help="Ray cluster address (default: start a local Ray)")
    o = p.add_argument_group("input/output")
    o.add_argument("--rle", action="store_true", help="add COCO RLE per segment")
    o.add_argument("--rows-per-file", type=int, default=_DEFAULTS.rows_per_file,
                   help="rows per Parquet file (and image files per work shard)")
    o.add_argument("--overwrite", action="store_true", help="delete earlier labels in OUTPUT and start over")
    o.add_argument("--retry-errors", nargs="+", metavar="KIND", default=None,
                   help="redo the committed error rows of these kinds in OUTPUT (e.g. 'read error'), "
                   "replacing them; every image stays exactly once")
    o.add_argument("--part", default=None, metavar="I/N",
                   help="label part I of N: N jobs (one per driver) write one OUTPUT, each its own share of the "
                   "input files; run every part with the same options and N")
    o.add_argument("--storage-retry-s", type=float, default=_DEFAULTS.storage_retry_s,
                   help="seconds a storage read or write keeps retrying connection errors, timeouts and 5xx")
    o.add_argument("--image-column", default=None, help="Parquet inputs: the image-bytes column (default: guessed)")
    o.add_argument("--max-pixels", type=int, default=_DEFAULTS.max_pixels, help="refuse larger images (bombs)")
    o.add_argument("--storage-options", type=storage_options_json, default=None,
                   help='fsspec options as JSON, e.g. \'{"client_kwargs": {"endpoint_url": "http://..."}}\' '
                   "(never printed; no credentials inside URLs)")
    o.add_argument("--json", action="store_true", help="print the summary as JSON")
    o.add_argument("--verbose", action="store_true",
                   help="also show Ray's own progress bars and INFO lines; without it: one progress bar on a "
                   f"terminal, off one a progress line every {PLAIN_EVERY_S:g} s (${EVERY_ENV} sets how often)")
    from pipeline.after.cli import (
        add_subcommands,  # eval, export, show: each sets args.handler
    )
    from pipeline.tune.cli import add_tune

    add_subcommands(sub)
    add_tune(sub)
    if extra is not None:
        extra(sub)
    return parser


def plural(n: int, word: str, words: str | None = None) -> str:
    """``1 shard``, ``2 shards``, ``0 errors``."""
    return f"{n} {word if n == 1 else (words or word + 's')}"


def format_summary(summary: dict) -> str:
    """The run summary for people: what is true, in words; a figure that was not measured is left out."""
    run, shards = summary["this_run"], summary["shards"]
    errors = summary["errors"]
    where = f"part {summary['part']} of {summary['output']}" if summary.get("part") else summary["output"]
    if summary.get("nothing_to_do"):
        return "\n".join([_nothing_to_do_line(summary, where), *_model_note(summary)])
    head = (f"labelled {summary['labelled']} of {plural(summary['images'], 'image')} into {where}"
            f" ({plural(errors, 'error') if errors else 'no errors'})")
    if not summary["complete"]:
        head += " - INCOMPLETE, rerun the same command to finish"
    lines = [head]
    if summary.get("part"):
        lines.append(_parts_line(summary.get("parts") or {}))
    lines += _model_note(summary)
    if "method" in summary:  # which grouping made the labels (the manifest's parameters)
        lines.append(f"method: {describe_method(summary['method'])}")
    this = f"this run: {plural(run['images'], 'image')}"
    if run["images"]:
        this += f" in {summary['stage_seconds'].get('pipeline', 0):.1f} s"
        rate, steady = summary.get("images_per_s"), summary.get("steady_images_per_s")
        if rate:
            this += f", {_rate(rate)} images/s"
            if steady and steady > rate * 1.05:
                this += f" ({_rate(steady)} once running)"
    this += f"; {plural(shards['written_this_run'], 'shard')} written"
    if shards["skipped_already_done"]:
        this += f", {shards['skipped_already_done']} already done"
    lines.append(this)
    if summary.get("skipped_inputs"):  # FIFOs, sockets, devices named like inputs: never read
        lines.append(summary["skipped_inputs"]["summary"])
    if summary["errors_by_kind"]:
        lines.append("errors by kind: " + ", ".join(f"{k}: {v}" for k, v in summary["errors_by_kind"].items()))
    stages = summary["stage_seconds"]
    driver = [f"{k} {v:.1f}" for k, v in stages.items() if "(" not in k]
    workers = [f"{k.split(' (')[0]} {v:.2f}" for k, v in stages.items() if "(worker s)" in k]
    lines.append("seconds: " + ", ".join(driver) + (f"; in workers: {', '.join(workers)}" if workers else ""))
    return "\n".join(lines)


def _model_note(summary: dict) -> list[str]:
    """The line that says the labels come from a random-weights or demo model (none for a real one)."""
    if summary.get("random_weights"):
        return [f"model {summary['model']!r} has RANDOM weights: these labels only show the plumbing"]
    if summary.get("demo_model"):
        return [f"model {summary['model']!r} is a small demo model trained for minutes on synthetic scenes, "
                "not Stable Diffusion: its segments are coarse"]
    return []


def _nothing_to_do_line(summary: dict, where: str) -> str:
    """A rerun whose output already holds every input and has no error row to retry (Ray never started)."""
    images, errors = summary["images"], summary["errors"]
    line = f"diffseg: nothing to do: all {plural(images, 'image')} under {summary['input']} are already "
    if not errors:
        return line + f"labelled in {where} (use --overwrite to label again)"
    kinds = " ".join(shlex.quote(k) for k in summary["errors_by_kind"])
    return line + (f"done in {where}, {errors} of them as error rows (use --overwrite to label again, "
                   f"--retry-errors {kinds} to retry the {plural(errors, 'error row')})")


def _parts_line(parts: dict) -> str:
    """Where the output's parts stand, from the merged manifest:
    "the output: 1 of 4 parts complete (2/4 running, ...)"."""
    count, status = parts.get("count", 0), parts.get("status", {})
    done = sum(1 for s in status.values() if s == "complete")
    others = [f"{k} {s}" for k, s in status.items() if s != "complete"]
    missing = count - len(status)
    if missing:
        others.append(f"{plural(missing, 'part')} not started")
    line = f"the output: {done} of {plural(count, 'part')} complete"
    return line + (f" ({', '.join(others)})" if others else "")


def _rate(value: float) -> str:
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def _method_options(options: dict[str, Any], params: str | None) -> dict[str, Any]:
    """Method options: the command line's, then the --params file's, then label's defaults (left out).

    A ``diffseg tune`` best.json also names the model (and frame: image size, timestep) it was
    tuned on: used when the command line gives none, warned about when it gives another."""
    given = {k: v for k, v in options.items() if k in METHOD_PARAMS and v is not None}
    from_file = read_params(params) if params else {}
    for key in sorted(set(given) & set(from_file)):
        print(f"diffseg label: --{key.replace('_', '-')} on the command line overrides {params}'s value "
              f"{from_file[key]!r}", file=sys.stderr)
    merged = {**from_file, **given}
    rest = {k: v for k, v in options.items() if k not in METHOD_PARAMS}
    if params:
        rest = _tuned_frame(rest, params)
    if rest.get("model") is None:
        rest["model"] = DEFAULT_MODEL
    return {**rest, **{k: v for k, v in merged.items() if v is not None}}


def _tuned_frame(rest: dict[str, Any], params: str) -> dict[str, Any]:
    frame = read_frame(params)
    tuned_model = frame.get("model")
    if tuned_model is None:
        return rest
    if rest.get("model") is None:
        print(f"diffseg label: using model {tuned_model} from {params} (the model its parameters were tuned on)",
              file=sys.stderr)
        # the whole frame comes along, but for what the command line set (a value at its default counts as unset)
        unset = {k for k in frame if k == "model" or rest.get(k) == _DEFAULTS_OF.get(k)}
        return {**rest, **{k: frame[k] for k in unset}}
    if rest["model"] != tuned_model:
        print(f"diffseg label: warning: {params}'s parameters were tuned on model {tuned_model}, "
              f"not {rest['model']}; they may not suit it (run `diffseg tune` on this model)", file=sys.stderr)
    return rest


def main(argv: Sequence[str] | None = None, extra: Callable[[Any], None] | None = None) -> int:
    """Run one command; ``extra`` as for ``build_parser`` (so that a usage error lists every command)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(extra).parse_args(argv)
    if args.command == "label":
        return _label_command(args, argv)
    return args.handler(args)


def _label_command(args: argparse.Namespace, argv: list[str]) -> int:
    from pipeline.job.interrupt import RunInterrupted
    from pipeline.job.run import label
    from pipeline.job.stderr_filter import filtered_stderr

    options = {k: v for k, v in vars(args).items()
               if k not in ("command", "input", "output", "json", "params", "verbose")}
    try:
        every_s = plain_every_s()
    except ValueError as exc:
        print(f"diffseg label: error: {exc}", file=sys.stderr)
        return 2
    try:
        options = _method_options(options, args.params)
        with _notes_on_stderr(), filtered_stderr(), command_console(args.verbose, every_s):
            summary = label(args.input, args.output, **options)
    except LabelError as exc:
        print(f"diffseg label: error: {exc}", file=sys.stderr)
        return 2
    except RunInterrupted as exc:
        print(interrupted_sentence(exc, ["diffseg", *argv]), file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("diffseg label: interrupted before labelling started; nothing was written.", file=sys.stderr)
        return 130
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0


def interrupted_sentence(exc: Any, command: Sequence[str]) -> str:
    """One sentence: what a stopped run kept, and the command that resumes it."""
    kept = ""
    if exc.committed is not None and exc.total is not None and exc.committed >= exc.total:
        return (f"diffseg label: stopped by {exc.signal_name} after every shard was committed "
                f"({plural(exc.total, 'shard')}): the output is complete.")
    if exc.committed is not None and exc.total is not None:
        kept = f"; {exc.committed} of {plural(exc.total, 'shard')} are committed and kept"
    return (f"diffseg label: stopped by {exc.signal_name}{kept}; "
            f"resume with the same command: {shlex.join(command)}")


class _CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of each record (not the stream
    that was current when the handler was made, which a caller may since have closed)."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


@contextmanager
def _notes_on_stderr() -> Iterator[None]:
    """The job's own notes (INFO and up from the ``pipeline`` loggers) on stderr, one line
    each, for the length of one command; the logger is left as it was found afterwards
    (``main`` may be called many times in one process: tests, notebooks)."""
    notes = logging.getLogger("pipeline")
    handler = _CurrentStderrHandler()
    handler.setFormatter(logging.Formatter("diffseg: %(message)s"))
    saved = (notes.level, notes.propagate)
    notes.addHandler(handler)
    notes.setLevel(logging.INFO)
    notes.propagate = False
    try:
        yield
    finally:
        notes.removeHandler(handler)
        notes.setLevel(saved[0])
        notes.propagate = saved[1]


if __name__ == "__main__":
    sys.exit(main())
