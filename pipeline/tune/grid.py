"""The parameter grid of ``diffseg tune``: settings, weight presets, parsing and checks.

A :class:`Setting` is one full set of DiffSeg parameters. The KL merge's grid is
the product of anchor grids x aggregation weights x refine x threshold schedules,
where a schedule is one threshold per iteration: every base tau x iteration
count x per-iteration step (0 = the same tau at every iteration), plus any
schedules given explicitly. Beside it, ``grouping="ncut"``: the normalized cut at
each of its thresholds x affinities (the attention affinity at the default
setting's weights, what ``label --grouping ncut`` aggregates with). The default
setting (label's defaults) is always scored too, so its score can be reported
beside the best.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

from diffseg_core.method_defaults import PAPER_DEFAULTS
from diffseg_core.parameters import KL_MERGE

#: PAMR's parameters when a setting turns it on without saying (the PAMR paper's).
PAMR_ITERATIONS: int = PAPER_DEFAULTS["pamr_iterations"]
PAMR_DILATIONS: tuple[int, ...] = tuple(PAPER_DEFAULTS["pamr_dilations"])
#: Method settings whose PAMR variants are scored: the best this many of the plain search, per fold.
BOUNDARY_CANDIDATES = 3
#: The normalized cut's stopping thresholds searched by default ("auto": its per-image rule).
NCUT_THRESHOLDS: tuple[float | str, ...] = ("auto", 0.35, 0.5, 0.7)

#: Aggregation weight presets, as functions of the resolution r (normalised later).
#: proportional is the paper's (and label's) default; the others span from every
#: resolution alike (equal) to the finest alone.
WEIGHT_PRESETS = {
    "proportional": lambda r, finest: float(r),
    "equal": lambda r, finest: 1.0,
    "sqrt": lambda r, finest: math.sqrt(r),
    "squared": lambda r, finest: float(r * r),
    "finest": lambda r, finest: 1.0 if r == finest else 0.0,
}
DEFAULT_WEIGHTS = "proportional"


class GridError(ValueError):
    """A grid that cannot be searched (one sentence saying why)."""


@dataclass(frozen=True)
class Setting:
    """One set of DiffSeg parameters. ``weights``: a preset name or numbers "w1,w2,..." (finest first)."""

    thresholds: tuple[float, ...]
    num_points: int
    weights: str = DEFAULT_WEIGHTS
    refine: bool = False
    boundaries: str = "off"  # "off" or "pamr"; the two below matter only with "pamr"
    pamr_iterations: int = PAMR_ITERATIONS
    pamr_dilations: tuple[int, ...] = PAMR_DILATIONS
    grouping: str = KL_MERGE  # or "ncut": the three below matter only then, the KL merge's four above only not
    ncut_threshold: float | str = "auto"
    ncut_affinity: str = "attention"

    def __post_init__(self) -> None:
        if self.boundaries == "off":  # one setting, whatever PAMR's unused parameters say
            object.__setattr__(self, "pamr_iterations", PAMR_ITERATIONS)
            object.__setattr__(self, "pamr_dilations", PAMR_DILATIONS)
        else:
            object.__setattr__(self, "pamr_dilations", tuple(int(d) for d in self.pamr_dilations))
        if self.grouping == KL_MERGE:  # likewise for the cut's unused parameters
            object.__setattr__(self, "ncut_threshold", "auto")
            object.__setattr__(self, "ncut_affinity", "attention")
        else:  # and the merge's
            object.__setattr__(self, "thresholds", ())
            object.__setattr__(self, "num_points", 0)
            object.__setattr__(self, "refine", False)
            if self.ncut_threshold != "auto":
                object.__setattr__(self, "ncut_threshold", round(float(self.ncut_threshold), 6))

    @property
    def method(self) -> "Setting":
        """The same setting with boundaries off: what the plain search scores."""
        return replace(self, boundaries="off")

    def with_pamr(self, iterations: int, dilations: Sequence[int] = PAMR_DILATIONS) -> "Setting":
        return replace(self, boundaries="pamr", pamr_iterations=int(iterations), pamr_dilations=tuple(dilations))

    @property
    def is_ncut(self) -> bool:
        return self.grouping != KL_MERGE

    @property
    def boundary_spec(self) -> tuple[int, tuple[int, ...]] | None:
        """(iterations, dilations) of PAMR, or None when off."""
        return (self.pamr_iterations, self.pamr_dilations) if self.boundaries == "pamr" else None

    def describe_boundaries(self) -> str:
        if self.boundaries == "off":
            return "off"
        dil = "" if self.pamr_dilations == PAMR_DILATIONS else ":" + ",".join(map(str, self.pamr_dilations))
        return f"pamr({self.pamr_iterations}{dil})"

    @property
    def iterations(self) -> int:
        return len(self.thresholds)

    @property
    def constant_tau(self) -> float | None:
        """The tau when every iteration uses the same one, else None."""
        return self.thresholds[0] if len(set(self.thresholds)) == 1 else None

    def describe(self) -> str:
        if self.is_ncut:
            return (f"grouping=ncut ncut_tau={_fmt_tau(self.ncut_threshold)} affinity={self.ncut_affinity} "
                    + (f"weights={self.weights} " if self.ncut_affinity == "attention" else "")
                    + f"boundaries={self.describe_boundaries()}")
        tau = _fmt(self.thresholds[0]) if self.constant_tau is not None else ",".join(map(_fmt, self.thresholds))
        return (f"tau={tau} iterations={self.iterations} num_points={self.num_points} "
                f"weights={self.weights} refine={'on' if self.refine else 'off'} "
                f"boundaries={self.describe_boundaries()}")

    def label_params(self, resolutions: Sequence[int]) -> dict[str, Any]:
        """The parameters as ``diffseg label --params`` reads them (weights as numbers, finest first).

        The KL merge's keys are those of every best.json before the cut; a cut's setting has the
        cut's keys instead of the merge's."""
        pamr = ({"pamr_iterations": self.pamr_iterations, "pamr_dilations": list(self.pamr_dilations)}
                if self.boundaries == "pamr" else {})
        if self.is_ncut:
            return {"grouping": self.grouping, "ncut_threshold": self.ncut_threshold,
                    "ncut_affinity": self.ncut_affinity, "weights": weight_values(self.weights, resolutions),
                    "boundaries": self.boundaries, **pamr}
        tau: float | list[float] = self.constant_tau if self.constant_tau is not None else list(self.thresholds)
        return {
            "kl_threshold": tau,
            "iterations": self.iterations,
            "num_points": self.num_points,
            "refine": self.refine,
            "weights": weight_values(self.weights, resolutions),
            "boundaries": self.boundaries,
            **pamr,
        }


@dataclass
class Grid:
    """What to search. Every list is tried in full (a product), schedules deduplicated."""

    taus: list[float] = field(default_factory=lambda: frange(0.6, 1.4, 0.1))
    iterations: list[int] = field(default_factory=lambda: [1, 2, 3, 4])
    tau_steps: list[float] = field(default_factory=lambda: [0.0, -0.1])
    schedules: list[tuple[float, ...]] = field(default_factory=list)  # explicit, one tau per iteration
    num_points: list[int] | None = None  # None: DEFAULT_NUM_POINTS that fit the model
    weights: list[str] = field(default_factory=lambda: list(WEIGHT_PRESETS))
    refine: list[bool] = field(default_factory=lambda: [False])
    # PAMR is scored on the best BOUNDARY_CANDIDATES method settings of the plain search (per fold):
    # at 512 px it costs seconds an image on a CPU, too much for every setting of the grid
    boundaries: list[str] = field(default_factory=lambda: ["off", "pamr"])
    pamr_iterations: list[int] = field(default_factory=lambda: [PAMR_ITERATIONS])
    boundary_candidates: int = BOUNDARY_CANDIDATES
    # the groupings searched: ["kl-merge"] leaves the normalized cut out
    groupings: list[str] = field(default_factory=lambda: [KL_MERGE, "ncut"])
    ncut_thresholds: list[float | str] = field(default_factory=lambda: list(NCUT_THRESHOLDS))
    # "features" is scored only where the cache holds the encoder's features (entries made since it does)
    ncut_affinities: list[str] = field(default_factory=lambda: ["attention", "features"])


DEFAULT_NUM_POINTS = (8, 16)


def default_setting(model: str | None = None) -> Setting:
    """What ``diffseg label --model MODEL`` does without flags: LabelOptions' defaults, which are the
    model's (its ``diffseg.json`` card, as tiny-demo's) or else the paper's."""
    from pipeline.job.options import LabelOptions

    d = LabelOptions(**({"model": model} if model else {})).with_model_defaults()
    kl = d.kl_threshold
    thresholds = tuple(float(v) for v in kl) if isinstance(kl, (list, tuple)) else (float(kl),) * d.iterations
    if d.weights is None:
        weights = DEFAULT_WEIGHTS
    elif len(set(d.weights)) == 1:  # the same setting as the grid's "equal": one row, not two
        weights = "equal"
    else:
        weights = ",".join(f"{float(w):g}" for w in d.weights)
    return Setting(thresholds, d.num_points, weights, bool(d.refine), d.boundaries or "off",
                   int(d.pamr_iterations), tuple(int(v) for v in d.pamr_dilations), d.grouping or KL_MERGE,
                   d.ncut_threshold, d.ncut_affinity)


def boundary_settings(candidates: Sequence[Setting], grid: Grid) -> list[Setting]:
    """The PAMR variants of these method settings that the grid asks for (none when it is off only)."""
    if "pamr" not in grid.boundaries:
        return []
    return list(dict.fromkeys(c.method.with_pamr(n) for c in candidates for n in sorted(set(grid.pamr_iterations))))


def frange(start: float, stop: float, step: float) -> list[float]:
    """start, start + step, ..., stop (inclusive), rounded to 6 decimals."""
    if step <= 0 or stop < start:
        raise GridError(f"a tau range needs start <= stop and a positive step, got {start}:{stop}:{step}")
    n = int(math.floor((stop - start) / step + 1e-9)) + 1
    return [round(start + i * step, 6) for i in range(n)]


def schedules(grid: Grid) -> list[tuple[float, ...]]:
    """Every threshold schedule of the grid, in a stable order, non-positive ones dropped."""
    out: dict[tuple[float, ...], None] = {}
    for tau, n, step in itertools.product(grid.taus, grid.iterations, grid.tau_steps):
        if n == 1 and step != 0:
            continue  # one iteration has no per-iteration change
        s = tuple(round(tau + i * step, 6) for i in range(n))
        if all(v > 0 for v in s):
            out[s] = None
    for s in grid.schedules:
        out[tuple(round(float(v), 6) for v in s)] = None
    return list(out)


def settings(grid: Grid, resolutions: Sequence[int], model: str, image_size: int) -> tuple[list[Setting], list[str]]:
    """All settings of ``grid`` for a model with these attention ``resolutions``, and notes.

    Raises GridError when an explicitly asked value cannot run on the model.
    """
    check_grid(grid, resolutions, model, image_size)
    notes = []
    points = grid.num_points
    if points is None:
        finest = max(resolutions)
        points = [n for n in DEFAULT_NUM_POINTS if n <= finest] or [finest]
        dropped = [n for n in DEFAULT_NUM_POINTS if n > finest]
        if dropped:
            notes.append(f"num_points {dropped} left out of the default grid: the model's finest attention "
                         f"is {finest} x {finest}")
    combos = itertools.product(sorted(set(points)), dict.fromkeys(grid.weights), sorted(set(grid.refine)))
    out = []
    if KL_MERGE in grid.groupings:
        scheds = schedules(grid)
        if not scheds:
            raise GridError("the tau grid gives no schedule with every threshold positive")
        out = [Setting(s, n, w, r) for n, w, r in combos for s in scheds]
    return out + ncut_settings(grid, default_setting(model).weights), notes


def ncut_settings(grid: Grid, weights: str) -> list[Setting]:
    """The grid's normalized cuts (none when it leaves ncut out), at these aggregation ``weights``."""
    if "ncut" not in grid.groupings:
        return []
    return list(dict.fromkeys(Setting((), 0, weights, grouping="ncut", ncut_threshold=t, ncut_affinity=a)
                              for a in grid.ncut_affinities for t in grid.ncut_thresholds))


def without_features(settings: Sequence[Setting]) -> list[Setting]:
    """The settings that need no encoder features (what a cache without them can score)."""
    return [s for s in settings if not (s.is_ncut and s.ncut_affinity == "features")]


def check_grid(grid: Grid, resolutions: Sequence[int], model: str, image_size: int) -> None:
    """One sentence for the first value of the grid this model cannot run."""
    from diffseg_core.parameters import anchor_grid_problem

    for n in grid.num_points or []:
        problem = anchor_grid_problem(n, resolutions, model, image_size)
        if problem:
            raise GridError(f"the grid cannot run on this model: {problem} (--num-points)")
    for w in grid.weights:
        weight_values(w, resolutions)


def check_values(grid: Grid) -> None:
    """Checks that need no model: run before anything is read or loaded."""
    if not grid.taus and not grid.schedules:
        raise GridError("the tau grid is empty")
    for tau in grid.taus:
        if not math.isfinite(tau) or tau <= 0:
            raise GridError(f"tau must be positive, got {tau}")
    for s in grid.schedules:
        if not s or any(not math.isfinite(v) or v <= 0 for v in s):
            raise GridError(f"a schedule needs one positive tau per iteration, got {list(s)}")
    if not grid.iterations or any(n < 1 for n in grid.iterations):
        raise GridError(f"iterations must be integers >= 1, got {grid.iterations}")
    if grid.num_points is not None and (not grid.num_points or any(n < 2 for n in grid.num_points)):
        raise GridError(f"num_points must be integers >= 2, got {grid.num_points}")
    if not grid.weights:
        raise GridError("the weights grid is empty")
    for w in grid.weights:
        if w not in WEIGHT_PRESETS:
            parse_weight_numbers(w)
    if not grid.refine:
        raise GridError("the refine grid is empty")
    check_groupings(grid)
    from diffseg_core.parameters import BOUNDARY_MODES

    if not grid.boundaries or any(b not in BOUNDARY_MODES for b in grid.boundaries):
        raise GridError(f"--boundaries takes {', '.join(BOUNDARY_MODES)} or off,pamr; got {','.join(grid.boundaries)}")
    if "pamr" in grid.boundaries:
        if not grid.pamr_iterations or any(n < 1 for n in grid.pamr_iterations):
            raise GridError(f"--pamr-iterations must be integers >= 1, got {grid.pamr_iterations}")
        if grid.boundary_candidates < 1:
            raise GridError(f"--boundary-candidates must be at least 1, got {grid.boundary_candidates}")


def check_groupings(grid: Grid) -> None:
    """One sentence for a grouping, cut threshold or affinity the search cannot take."""
    from diffseg_core.parameters import GROUPINGS, NCUT_AFFINITIES, grouping_problem

    if not grid.groupings or any(g not in GROUPINGS for g in grid.groupings):
        raise GridError(f"--grouping takes {', '.join(GROUPINGS)} or kl-merge,ncut; got {','.join(grid.groupings)}")
    if "ncut" not in grid.groupings:
        return
    if not grid.ncut_thresholds:
        raise GridError("the --ncut-threshold grid is empty")
    if not grid.ncut_affinities or any(a not in NCUT_AFFINITIES for a in grid.ncut_affinities):
        raise GridError(f"--ncut-affinity takes {', '.join(NCUT_AFFINITIES)} or attention,features; "
                        f"got {','.join(grid.ncut_affinities)}")
    for t in grid.ncut_thresholds:
        problem = grouping_problem("ncut", t)
        if problem:
            raise GridError(f"--ncut-threshold: {problem}")


def weight_values(weights: str, resolutions: Sequence[int]) -> list[float]:
    """Weights as numbers, one per resolution, finest first (what DiffSeg and label take)."""
    res = sorted(resolutions, reverse=True)
    if weights in WEIGHT_PRESETS:
        return [WEIGHT_PRESETS[weights](r, res[0]) for r in res]
    from diffseg_core.parameters import weights_problem

    values = parse_weight_numbers(weights)
    problem = weights_problem(values, res)
    if problem:
        raise GridError(f"the grid cannot run on this model: --weights {weights}: {problem}")
    return values


def parse_weight_numbers(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise GridError(f"weights {text!r}: a preset ({', '.join(WEIGHT_PRESETS)}) or numbers "
                        "like 8,4,2,1 (finest resolution first)") from None
    if any(not math.isfinite(v) or v < 0 for v in values) or sum(values) <= 0:
        raise GridError(f"weights {text!r} must be non-negative numbers, not all zero")
    return values


def _fmt(v: float) -> str:
    return f"{v:g}"


def _fmt_tau(v: float | str) -> str:
    return v if isinstance(v, str) else _fmt(v)
