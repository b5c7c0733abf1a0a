"""Job specs: a YAML file that says what to label, where, with what, and in which environment.

A spec is read with ``yaml.safe_load`` and validated completely before anything is
submitted: every problem is a ``SpecError`` whose message names the file and the key.
The same schema is accepted as JSON text by ``python -m jobs.run``; that is how the
resolved job travels to the cluster (a spec file on the submitter's laptop is not
there).

Layout (every section but ``input``/``output`` is optional)::

    name: my-run                      # default: the file's stem
    input: s3://bucket/images/        # absolute path or URL (the cluster resolves it)
    output: s3://bucket/labels/
    model: tiny-demo                  # or a mapping: name, revision, dtype, vae_dtype, image_size, timestep,
                                      #   allow_unsafe_weights (pickle weights; off)
    method: {kl_threshold, num_points, iterations, refine, weights, boundaries, pamr_iterations,
             pamr_dilations, min_region_area, connected, grouping, ncut_threshold, ncut_affinity,
             paper_preprocess, vocabulary, vocabulary_file, class_voting, class_threshold}   # class names: see below
    resources: {actors, max_actors, actor_resources, batch_size, device, gpu_wait_s, gpus_per_actor,
                cpus_per_actor, driver_cpus, driver_gpus, driver_memory}
    io: {rle, rows_per_file, overwrite, retry_errors, part, image_column, max_pixels, storage_options,
         storage_retry_s}                 # part: "i/N", one of N jobs writing one output
    runtime_env: {working_dir, pip, py_modules, excludes, env_vars, ship_code}

``method.vocabulary`` names segments: a list of class names, a comma-separated
string, or a preset (``coco-stuff-27``, ``cityscapes``); judged here like the
command line's ``--vocabulary``. ``method.vocabulary_file`` is read where the
job runs (a path or URL the cluster can read), before any work there.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

# Secrets: a secret-looking storage_options name is never accepted as a literal (use ${VAR}
# there and put VAR in runtime_env.env_vars), a URL with a credential in it is refused
# anywhere, and a dry run masks every env var value but ${VAR} references and harmless settings.
from pipeline.data.credentials import (
    ENV_REF as _ENV_REF,
)
from pipeline.data.credentials import (
    looks_secret,
    masked_storage_options,
    shown_env_value,
    url_credential_problem,
    url_credentials_in,
)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class SpecError(ValueError):
    """A spec that must not be submitted. The message names the file and the key."""


# ------------------------------------------------------------------ value checkers
# Each checker returns the (possibly coerced) value or raises _Bad with what was expected.


class _Bad(Exception):
    pass


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _int(min_value: int | None = None) -> Callable[[Any], int]:
    def check(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise _Bad(f"an integer, not {_type_name(v)} {v!r}")
        if min_value is not None and v < min_value:
            raise _Bad(f"an integer >= {min_value}, not {v!r}")
        return v

    return check


def _number(min_value: float = 0.0, strict: bool = False) -> Callable[[Any], float]:
    def check(v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise _Bad(f"a number, not {_type_name(v)} {v!r}")
        if v < min_value or (strict and v == min_value):
            raise _Bad(f"a number {'>' if strict else '>='} {min_value:g}, not {v!r}")
        return float(v)

    return check


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise _Bad(f"true or false, not {_type_name(v)} {v!r}")
    return v


def _str(v: Any) -> str:
    if not isinstance(v, str) or not v.strip():
        raise _Bad(f"a non-empty string, not {_type_name(v)} {v!r}")
    return v


def _optional(check: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def opt(v: Any) -> Any:
        return None if v is None else check(v)

    return opt


def _choice(*choices: str) -> Callable[[Any], str]:
    def check(v: Any) -> str:
        if v not in choices:
            raise _Bad(f"one of {', '.join(choices)}, not {v!r}")
        return v

    return check


def _part(v: Any) -> str:
    from pipeline.data.parts import Part

    try:
        return str(Part.parse(_str(v)))
    except ValueError:
        raise _Bad(f"i/N (this job's part i of N, e.g. \"1/4\"), not {_type_name(v)} {v!r}") from None


def _kl_threshold(v: Any) -> float | list[float]:
    positive = _number(0.0, strict=True)
    if isinstance(v, list):
        if not v:
            raise _Bad("a number or a non-empty list of numbers, not an empty list")
        return [positive(x) for x in v]
    return positive(v)


def _ncut_threshold(v: Any) -> float | str:
    if v == "auto":
        return "auto"
    value = _number(0.0, strict=True)(v) if not isinstance(v, str) else None
    if value is None or not value <= 2.0:  # also NaN
        raise _Bad(f"auto or a number in (0, 2], not {_type_name(v)} {v!r}")
    return value


def _vocabulary(v: Any) -> str | list[str] | None:
    from diffseg_core.vocabulary import Vocabulary, VocabularyError

    if v is None:
        return None
    try:
        vocab = Vocabulary.parse(v)
    except VocabularyError as exc:
        raise _Bad(str(exc)) from None
    return v if isinstance(v, str) else list(vocab.names)


def _share(v: Any) -> float:
    value = _number(0.0)(v)
    if value > 1.0:
        raise _Bad(f"a share between 0 and 1, not {v!r}")
    return value


def _weights(v: Any) -> list[float]:
    if not isinstance(v, list) or not v:
        raise _Bad(f"a non-empty list of numbers (one per attention resolution, finest first), not {_type_name(v)} {v!r}")
    values = [_number(0.0)(x) for x in v]
    if sum(values) <= 0:
        raise _Bad(f"weights that are not all zero, not {v!r}")
    return values


def _dilations(v: Any) -> list[int]:
    if not isinstance(v, list) or not v:
        raise _Bad(f"a non-empty list of integers >= 1, not {_type_name(v)} {v!r}")
    return [_int(1)(x) for x in v]


def _str_mapping(v: Any) -> dict[str, Any]:
    if not isinstance(v, dict) or not all(isinstance(k, str) for k in v):
        raise _Bad(f"a mapping with string keys, not {_type_name(v)}")
    return dict(v)


def _str_list(v: Any) -> list[str]:
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
        raise _Bad(f"a list of strings, not {_type_name(v)} {v!r}")
    return list(v)


# ------------------------------------------------------------------ the schema
# section -> key -> (checker, LabelOptions field or None when the key is not a label() option)

_MODEL: dict[str, tuple[Callable[[Any], Any], str | None]] = {
    "name": (_str, "model"),
    "revision": (_optional(_str), "revision"),
    "dtype": (_optional(_choice("fp32", "fp16", "bf16")), "dtype"),
    "vae_dtype": (_optional(_choice("auto", "fp32", "fp16", "bf16")), "vae_dtype"),
    "image_size": (_optional(_int(8)), "image_size"),
    "timestep": (_int(0), "timestep"),
    "allow_unsafe_weights": (_bool, "allow_unsafe_weights"),  # pickle weights (.bin/.ckpt) can run code
}
_METHOD = {
    "kl_threshold": (_kl_threshold, "kl_threshold"),
    "num_points": (_int(1), "num_points"),
    "iterations": (_int(1), "iterations"),
    "refine": (_bool, "refine"),
    "weights": (_optional(_weights), "weights"),  # diffseg tune's choice; null: proportional to r
    "boundaries": (_optional(_choice("off", "pamr")), "boundaries"),  # null: the model's
    "pamr_iterations": (_optional(_int(1)), "pamr_iterations"),
    "pamr_dilations": (_optional(_dilations), "pamr_dilations"),
    "min_region_area": (_int(0), "min_region_area"),
    "connected": (_bool, "connected"),
    "grouping": (_choice("kl-merge", "ncut"), "grouping"),
    "ncut_threshold": (_ncut_threshold, "ncut_threshold"),
    "ncut_affinity": (_choice("attention", "features"), "ncut_affinity"),
    "paper_preprocess": (_bool, "paper_preprocess"),
    "vocabulary": (_vocabulary, "vocabulary"),
    "vocabulary_file": (_optional(_str), "vocabulary_file"),
    "class_voting": (_choice("majority", "mean"), "class_voting"),
    "class_threshold": (_share, "class_threshold"),
}
_RESOURCES = {
    "actors": (_optional(_int(1)), "actors"),
    "max_actors": (_optional(_int(1)), "max_actors"),  # autoscaling: the pool grows from actors to this
    "actor_resources": (_optional(_str_mapping), "actor_resources"),  # custom Ray resources per model actor
    "batch_size": (_int(1), "batch_size"),
    "device": (_choice("auto", "gpu", "cpu"), "device"),  # gpu: GPUs or stop; auto: GPUs when there or coming
    "gpu_wait_s": (_number(0.0), "gpu_wait_s"),  # how long to wait for an autoscaler to add GPU nodes
    "gpus_per_actor": (_optional(_number(0.0)), "gpus_per_actor"),
    "cpus_per_actor": (_number(0.0, strict=True), "cpus_per_actor"),
    # what the job's driver (the entrypoint) reserves: Ray's entrypoint_num_cpus/gpus/memory
    "driver_cpus": (_number(0.0), None),
    "driver_gpus": (_number(0.0), None),
    "driver_memory": (_int(0), None),
}
_IO = {
    "rle": (_bool, "rle"),
    "rows_per_file": (_int(1), "rows_per_file"),
    "overwrite": (_bool, "overwrite"),
    "retry_errors": (_optional(_str_list), "retry_errors"),
    "part": (_optional(_part), "part"),  # "i/N": this job is part i of N writing one output
    "image_column": (_optional(_str), "image_column"),
    "max_pixels": (_int(1), "max_pixels"),
    "storage_options": (_optional(_str_mapping), "storage_options"),
    "storage_retry_s": (_number(0.0), "storage_retry_s"),
}
_RUNTIME_ENV = {
    "working_dir": (_str, None),
    "pip": (_str_list, None),
    "py_modules": (_str_list, None),
    "excludes": (_str_list, None),
    "env_vars": (_str_mapping, None),
    # ship this package's code (diffseg_core, pipeline, jobs) as py_modules; "auto": unless
    # working_dir is given. false: the cluster's image already has it installed.
    "ship_code": (lambda v: v if v == "auto" else _bool(v), None),
}
SECTIONS: dict[str, dict[str, tuple[Callable[[Any], Any], str | None]]] = {
    "model": _MODEL,
    "method": _METHOD,
    "resources": _RESOURCES,
    "io": _IO,
    "runtime_env": _RUNTIME_ENV,
}
TOP_LEVEL = ("name", "input", "output", *SECTIONS)
CODE_PACKAGES = ("diffseg_core", "pipeline", "jobs")


@dataclass
class JobSpec:
    """A validated spec, resolved for one submission."""

    name: str
    input: str
    output: str
    options: dict[str, Any]  # keyword arguments of pipeline.label (no ray_address)
    driver: dict[str, Any]  # entrypoint_num_cpus / entrypoint_num_gpus / entrypoint_memory
    runtime_env: dict[str, Any]  # as written (env var values unexpanded), relative paths resolved
    source: str  # the file it came from, or "<json>"
    raw: dict[str, Any] = field(repr=False, default_factory=dict)  # the job part, in spec schema

    @property
    def content_hash(self) -> str:
        """Hash of what the job does (not of the file's bytes: comments and order do not count)."""
        body = json.dumps({"job": self.raw, "runtime_env": self.runtime_env}, sort_keys=True, default=str)
        return hashlib.sha256(body.encode()).hexdigest()

    @property
    def submission_prefix(self) -> str:
        """Every submission of this spec has an id ``<prefix>-<attempt>``."""
        return f"diffseg-{self.name}-{self.content_hash[:10]}"

    def with_part(self, part: str) -> "JobSpec":
        """This job as part ``part`` ("i/N") of N jobs writing its output (``diffseg submit --parts N``):
        its own name, hence its own submission ids."""
        from pipeline.data.parts import Part

        chosen = Part.parse(_part(part))
        name = f"{self.name}-part-{chosen.index}-of-{chosen.count}"
        raw = {**self.raw, "name": name, "io": {**(self.raw.get("io") or {}), "part": str(chosen)}}
        return replace(self, name=name, options={**self.options, "part": str(chosen)}, raw=raw)

    def entrypoint_json(self) -> str:
        """The job part of the spec (no runtime_env: env var values may be secrets) as JSON."""
        return json.dumps(self.raw, sort_keys=True, separators=(",", ":"))

    def ray_runtime_env(self, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
        """Ray's runtime_env: ``${VAR}`` values expanded from ``environ``, code packages shipped."""
        environ = os.environ if environ is None else environ
        env = dict(self.runtime_env)
        ship = env.pop("ship_code", "auto")
        if "env_vars" in env:
            env["env_vars"] = {k: _expand(v, environ, self.source, f"runtime_env.env_vars.{k}")
                               for k, v in env["env_vars"].items()}
        if ship is True or (ship == "auto" and "working_dir" not in env):
            env["py_modules"] = [*code_package_dirs(), *env.get("py_modules", [])]
        if "py_modules" in env or "working_dir" in env:
            env["excludes"] = [*env.get("excludes", []), "__pycache__/", "*.pyc"]
        return env

    def printable(self, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
        """The resolved job for ``--dry-run``: ``${VAR}`` shown as written, every other env var
        value masked unless it is a known-harmless setting, storage_options strings masked
        unless harmless (see pipeline.data.credentials)."""
        env = self.ray_runtime_env(environ)  # expands ${VAR}s: an unset one is refused here
        if "env_vars" in env:
            env["env_vars"] = {k: shown_env_value(k, self.runtime_env["env_vars"][k]) for k in env["env_vars"]}
        options = dict(self.options)
        if options.get("storage_options"):
            options["storage_options"] = masked_storage_options(options["storage_options"])
        shown = JobSpec(self.name, self.input, self.output, options, self.driver, self.runtime_env, self.source,
                        raw=_masked_raw(self.raw))
        return {
            "name": self.name,
            "source": self.source,
            "submission_id_prefix": self.submission_prefix,
            "input": self.input,
            "output": self.output,
            "options": options,
            "driver": self.driver,
            "runtime_env": env,
            "method": method_sources(self.options),
            "entrypoint": entrypoint_command(shown),
        }


def method_sources(options: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """DiffSeg's parameters for this job, each with where it comes from: the spec's ``method:``, the
    model card (read here when the model is tiny-demo or a folder on this machine), or the paper's
    defaults (for a folder only the cluster has, its card's defaults apply there instead)."""
    from diffseg_core.method_defaults import PAPER_DEFAULTS, model_method_defaults
    from pipeline.job.options import DEFAULT_MODEL

    model = str(options.get("model") or DEFAULT_MODEL)
    card = model_method_defaults(model)
    shown: dict[str, dict[str, Any]] = {}
    for key in (*PAPER_DEFAULTS, "refine"):
        if options.get(key) is not None:
            shown[key] = {"value": options[key], "from": "spec"}
        elif key == "refine":
            shown[key] = {"value": False, "from": "default"}
        elif key == "iterations" and isinstance(options.get("kl_threshold"), list):
            shown[key] = {"value": len(options["kl_threshold"]), "from": "spec (one per kl_threshold value)"}
        elif card[key] != PAPER_DEFAULTS[key]:
            shown[key] = {"value": card[key], "from": f"model card ({model})"}
        else:
            shown[key] = {"value": card[key], "from": "default"}
    return shown


def _masked_raw(raw: dict[str, Any]) -> dict[str, Any]:
    io = raw.get("io") or {}
    if not io.get("storage_options"):
        return raw
    return {**raw, "io": {**io, "storage_options": masked_storage_options(io["storage_options"])}}


def entrypoint_command(spec: JobSpec) -> str:
    import shlex

    return f"python -m jobs.run {shlex.quote(spec.entrypoint_json())}"


def code_package_dirs() -> list[str]:
    """Folders of this project's packages, wherever they are imported from (checkout or wheel)."""
    import importlib

    return [str(Path(importlib.import_module(p).__file__).parent) for p in CODE_PACKAGES]


def load_spec(path: str | os.PathLike) -> JobSpec:
    """Read and validate a YAML spec file."""
    p = Path(path)
    where = str(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise SpecError(f"{where}: cannot read the spec ({exc.strerror or exc}).") from None
    return parse_spec(text, source=where, base_dir=p.resolve().parent, default_name=p.stem)


def parse_spec(text_or_data: str | Mapping[str, Any], *, source: str = "<json>", base_dir: Path | None = None,
               default_name: str | None = None) -> JobSpec:
    """Validate a spec given as YAML/JSON text or as an already-loaded mapping."""
    if isinstance(text_or_data, str):
        try:
            data = yaml.safe_load(text_or_data)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
            raise SpecError(f"{source}: not valid YAML{at}: {getattr(exc, 'problem', None) or exc}.") from None
    else:
        data = dict(text_or_data)
    if not isinstance(data, dict):
        raise SpecError(f"{source}: a spec must be a mapping of keys (input, output, ...), not {_type_name(data)}.")
    return _validate(data, source, base_dir, default_name)


def _fail(source: str, key: str, message: str) -> SpecError:
    return SpecError(f"{source}: {key}: {message}")


def _validate(data: dict[str, Any], source: str, base_dir: Path | None, default_name: str | None) -> JobSpec:
    unknown = [k for k in data if k not in TOP_LEVEL]
    if unknown:
        raise _fail(source, str(unknown[0]), f"unknown key (allowed: {', '.join(TOP_LEVEL)}).")
    for key in ("input", "output"):
        if key not in data or data[key] is None:
            raise _fail(source, key, "missing; every spec names its input and its output.")
        try:
            _str(data[key])
        except _Bad as exc:
            raise _fail(source, key, f"must be {exc}.") from None
        problem = url_credential_problem(data[key])
        if problem:
            raise _fail(source, key, f"is {problem}; give the cluster its credentials through its own environment "
                                     "(IAM role, runtime_env.env_vars with ${VAR}), never in the URL.")
        if not (_URL.match(data[key]) or os.path.isabs(data[key])):
            raise _fail(source, key, f"{data[key]!r} must be an absolute path or a URL (s3://, gs://, file://...): "
                                     "the job runs in the cluster, not in this folder.")
    name = data.get("name", default_name or "job")
    if not isinstance(name, str) or not _NAME.match(name):
        raise _fail(source, "name", f"must be letters, digits, '-' or '_' (at most 63), not {name!r}.")

    model = data.get("model")
    if isinstance(model, str):
        model = {"name": model}
    sections: dict[str, dict[str, Any]] = {}
    for section, schema in SECTIONS.items():
        value = model if section == "model" else data.get(section)
        if value is None:
            sections[section] = {}
            continue
        if not isinstance(value, dict):
            raise _fail(source, section, f"must be a mapping{' or a model name' if section == 'model' else ''}, "
                                         f"not {_type_name(value)}.")
        checked = {}
        for key, v in value.items():
            if key not in schema:
                raise _fail(source, f"{section}.{key}", f"unknown key (allowed in {section}: {', '.join(schema)}).")
            try:
                checked[key] = schema[key][0](v)
            except _Bad as exc:
                raise _fail(source, f"{section}.{key}", f"must be {exc}.") from None
        sections[section] = checked

    options: dict[str, Any] = {}
    driver: dict[str, Any] = {}
    for section, schema in SECTIONS.items():
        for key, v in sections[section].items():
            target = schema[key][1]
            if target is not None:
                options[target] = v
            elif section == "resources":
                driver[{"driver_cpus": "entrypoint_num_cpus", "driver_gpus": "entrypoint_num_gpus",
                        "driver_memory": "entrypoint_memory"}[key]] = v
    _check_storage_options(options.get("storage_options"), source)
    kl = options.get("kl_threshold")
    if isinstance(kl, list) and "iterations" in options and options["iterations"] != len(kl):
        raise _fail(source, "method.iterations", f"is {options['iterations']} but kl_threshold lists {len(kl)} "
                                                  "values (one per iteration); drop iterations or make them agree.")
    _check_label_options(options, source)
    runtime_env = _runtime_env(sections["runtime_env"], source, base_dir)
    raw = {"name": name, "input": data["input"], "output": data["output"],
           **{s: sections[s] for s in ("model", "method", "resources", "io") if sections[s]}}
    return JobSpec(name=name, input=data["input"], output=data["output"], options=options, driver=driver,
                   runtime_env=runtime_env, source=source, raw=raw)


def _check_label_options(options: dict[str, Any], source: str) -> None:
    """What pipeline.label itself would refuse (e.g. DiffSeg's bounds), refused before submission."""
    from pipeline.errors import LabelError
    from pipeline.job.options import LabelOptions, validate_options

    try:
        validate_options(LabelOptions(**options))
    except LabelError as exc:
        raise SpecError(f"{source}: {exc}") from None


def _check_storage_options(opts: dict[str, Any] | None, source: str, prefix: str = "io.storage_options") -> None:
    """Credentials as literals would travel in the job's command line: ask for ${VAR} instead."""
    if not opts:
        return
    if prefix == "io.storage_options":
        found = next(url_credentials_in(opts, prefix), None)
        if found:
            raise _fail(source, found[0], f"is {found[1]}; write the credential as ${{SOME_VAR}} in its own option "
                                          "(key, secret, ...) and put SOME_VAR in runtime_env.env_vars.")
    for k, v in opts.items():
        key = f"{prefix}.{k}"
        if isinstance(v, dict):
            _check_storage_options(v, source, key)
        elif looks_secret(str(k)) and not (isinstance(v, str) and _ENV_REF.match(v)) and v not in (None, False):
            raise _fail(source, key, "looks like a credential; write it as ${SOME_VAR} and put SOME_VAR in "
                                     "runtime_env.env_vars (or use the provider's own environment variables).")


def _runtime_env(env: dict[str, Any], source: str, base_dir: Path | None) -> dict[str, Any]:
    env = dict(env)
    for key in ("working_dir", "pip", "py_modules"):  # e.g. git+https://user:TOKEN@host/repo in pip
        found = next(url_credentials_in(env.get(key), f"runtime_env.{key}"), None) if key in env else None
        if found:
            raise _fail(source, found[0], f"is {found[1]}; the cluster's job list shows it to anyone who can "
                                          "read it: use a credential helper or a package index the cluster can reach.")
    for key in ("working_dir",):
        if key in env and not _URL.match(env[key]):
            path = Path(env[key]).expanduser()
            if not path.is_absolute() and base_dir is not None:
                path = base_dir / path
            if not path.is_dir():
                raise _fail(source, f"runtime_env.{key}", f"{env[key]!r} is not a folder ({path}).")
            env[key] = str(path.resolve())
    if "env_vars" in env:
        fixed = {}
        for k, v in env["env_vars"].items():
            if isinstance(v, bool):
                v = "1" if v else "0"
            if not isinstance(v, (str, int, float)):
                raise _fail(source, f"runtime_env.env_vars.{k}", f"must be a string or a number, not {_type_name(v)}.")
            if k in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
                raise _fail(source, f"runtime_env.env_vars.{k}", "is the cluster's own setting; the cluster's nodes "
                                                                 "already have it, do not ship it with a job.")
            fixed[k] = str(v)
        env["env_vars"] = fixed
    return env


def _expand(value: str, environ: Mapping[str, str], source: str, key: str) -> str:
    m = _ENV_REF.match(value)
    if not m:
        return value
    if m.group(1) not in environ:
        raise _fail(source, key, f"refers to ${{{m.group(1)}}}, which is not set in this environment.")
    return environ[m.group(1)]


def expand_env_refs(value: Any, environ: Mapping[str, str], where: str = "io.storage_options") -> Any:
    """Replace ``${VAR}`` strings in nested mappings/lists (used in the cluster, on storage_options)."""
    if isinstance(value, dict):
        return {k: expand_env_refs(v, environ, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env_refs(v, environ, where) for v in value]
    if isinstance(value, str):
        return _expand(value, environ, "job", where)
    return value
