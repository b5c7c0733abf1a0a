"""Which method made a labels output, in words: read from the manifest's ``parameters``.

``diffseg eval``, the gallery and the label run's summary say which grouping made the labels.
The manifest's parameters name the grouping only when it is not the paper's KL merge (so
outputs made before the normalized cut resume), and PAMR only when it is on: absent means
``kl-merge`` and ``off``.
"""
from __future__ import annotations

from typing import Any

from diffseg_core.parameters import KL_MERGE


def grouping_of(parameters: dict[str, Any] | None) -> str:
    """The grouping that made labels with these manifest parameters (absent: the KL merge)."""
    return str((parameters or {}).get("grouping") or KL_MERGE)


def method_fields(parameters: dict[str, Any] | None) -> dict[str, Any]:
    """The parameters' grouping and boundaries, absent ones filled in (JSON for reports)."""
    p = parameters or {}
    out: dict[str, Any] = {"grouping": grouping_of(p), "boundaries": str(p.get("boundaries") or "off")}
    if out["grouping"] == "ncut":
        out.update(ncut_threshold=p.get("ncut_threshold", "auto"), ncut_affinity=p.get("ncut_affinity", "attention"))
    return out


def describe_method(parameters: dict[str, Any] | None) -> str:
    """"grouping kl-merge, boundaries pamr" or "grouping ncut (threshold auto, attention affinity), boundaries off"."""
    m = method_fields(parameters)
    cut = (f" (threshold {m['ncut_threshold']}, {m['ncut_affinity']} affinity)" if m["grouping"] == "ncut" else "")
    return f"grouping {m['grouping']}{cut}, boundaries {m['boundaries']}"
