"""Scheme summaries and per-model verdicts of a study's series (before anything runs).

:func:`summarise_scheme` describes a series' acquisition (shells with their spread,
directions, timing) and names vendor oddities found in its raw bval/bvec values: zero
b-vectors at non-zero b (e.g. trace-weighted volumes), b-vectors that are not unit length
(scaled vectors), and b-value jitter within a shell (grouped into one shell).

:func:`check_model` gives each requested model a verdict: ``run``, ``warn`` (runs, with
the reason in the summary) or ``skip`` (with the reason). The checks are deliberately few
and live only here, so that one shared set of scheme checks can replace them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fingerprint.core.acquisition_scheme import AcquisitionScheme
from fingerprint.core.scheme_checks import check_scheme
from fingerprint.models import get_model, get_recipe, requires_timing

__all__ = ["SchemeSummary", "Shell", "Verdict", "check_model", "raw_oddities",
           "summarise_scheme"]

#: Models whose fractions need more than one non-zero shell to be well determined.
MULTI_SHELL_MODELS = frozenset({"noddi", "smt_noddi", "charmed", "activeax", "axcaliber",
                                "sphere_ball"})
#: Fewest directions on a shell for an orientation to be estimated at all.
MIN_DIRECTIONS = 6
#: b-vector norms further than this from 1 are named (after normalisation).
UNIT_TOLERANCE = 1e-2
#: b-values (s/mm²) at or below this are b=0 volumes in the raw-value checks.
RAW_B0_THRESHOLD = 10.0


@dataclass(frozen=True)
class Shell:
    """One shell: mean b (s/mm²), spread max-min (s/mm²), volumes, distinct directions."""

    bvalue: float
    spread: float
    volumes: int
    directions: int


@dataclass(frozen=True)
class SchemeSummary:
    """What a series' scheme looks like (b-values in s/mm², timing in s)."""

    n_volumes: int
    n_b0: int
    shells: tuple[Shell, ...]
    delta: float | None
    Delta: float | None
    timing_source: str
    scheme_hash: str
    oddities: tuple[str, ...] = field(default=())

    def text(self) -> str:
        """One line: ``6 b0; b=1000±5 (30 dirs); b=2000 (60 dirs); δ 15 ms, Δ 35 ms``."""
        parts = [f"{self.n_b0} b0"]
        for s in self.shells:
            spread = f"±{s.spread / 2:g}" if s.spread > 0 else ""
            parts.append(f"b={s.bvalue:.0f}{spread} ({s.directions} dirs)")
        if self.delta is not None and self.Delta is not None:
            parts.append(f"δ {self.delta * 1e3:g} ms, Δ {self.Delta * 1e3:g} ms "
                         f"({self.timing_source})")
        else:
            parts.append("no pulse timing")
        return "; ".join(parts)

    def to_dict(self) -> dict:
        return {"n_volumes": self.n_volumes, "n_b0": self.n_b0,
                "shells_s_per_mm2": [{"b": s.bvalue, "spread": s.spread, "volumes": s.volumes,
                                      "directions": s.directions} for s in self.shells],
                "delta_s": self.delta, "Delta_s": self.Delta,
                "timing_source": self.timing_source, "scheme_hash": self.scheme_hash,
                "oddities": list(self.oddities)}


@dataclass(frozen=True)
class Verdict:
    """A model's verdict on a series: ``run``, ``warn`` or ``skip``, with the reasons."""

    model: str
    status: str
    reasons: tuple[str, ...] = ()

    def text(self) -> str:
        return self.status + (f" ({'; '.join(self.reasons)})" if self.reasons else "")


def raw_oddities(bvals: np.ndarray, bvecs: np.ndarray) -> list[str]:
    """Vendor oddities in raw FSL values: ``bvals`` (N,) s/mm², ``bvecs`` (N, 3)."""
    out: list[str] = []
    bvals = np.asarray(bvals, dtype=float).ravel()
    bvecs = np.asarray(bvecs, dtype=float).reshape(-1, 3)
    if bvals.size != bvecs.shape[0]:
        return out
    dwi = bvals > RAW_B0_THRESHOLD
    norms = np.linalg.norm(bvecs, axis=1)
    zero = dwi & (norms < 1e-6)
    if zero.any():
        bs = sorted({f"{b:g}" for b in bvals[zero]})
        out.append(f"{int(zero.sum())} volumes with a zero b-vector at non-zero b "
                   f"(b={', '.join(bs)} s/mm²; trace-weighted or derived volumes?)")
    off = dwi & ~zero & (np.abs(norms - 1.0) > UNIT_TOLERANCE)
    if off.any():
        out.append(f"{int(off.sum())} b-vectors are not unit length (norms "
                   f"{norms[off].min():.3g}..{norms[off].max():.3g}); normalised, b-values "
                   "used as written")
    return out


def summarise_scheme(scheme: AcquisitionScheme, *, timing_source: str = "none",
                     oddities: list[str] | tuple[str, ...] = ()) -> SchemeSummary:
    """The :class:`SchemeSummary` of an AcquisitionScheme (SI) plus raw-value oddities."""
    b = np.asarray(scheme.bvalues, dtype=np.float64) / 1e6
    b0 = np.asarray(scheme.b0_mask, dtype=np.bool_)
    idx = np.asarray(scheme.shell_indices)
    dirs = np.asarray(scheme.gradient_directions, dtype=np.float64)
    shells = []
    jitter = []
    for s in np.unique(idx[~b0]):
        members = idx == s
        bs = b[members]
        d = np.round(dirs[members] * np.sign(dirs[members][:, 2:3] + 1e-12), 4)
        n_dirs = len({tuple(row) for row in d})
        spread = float(bs.max() - bs.min())
        shells.append(Shell(float(bs.mean()), spread, int(members.sum()), n_dirs))
        if spread > 0:
            jitter.append(f"b={bs.mean():.0f}: {bs.min():g}..{bs.max():g}")
    odd = list(oddities)
    if jitter:
        odd.append("b-values jitter within shells, grouped as one shell each ("
                   + "; ".join(jitter) + ")")
    delta = getattr(scheme, "delta", None)
    Delta = getattr(scheme, "Delta", None)
    d1 = float(np.asarray(delta)[~b0].mean()) if delta is not None else None
    d2 = float(np.asarray(Delta)[~b0].mean()) if Delta is not None else None
    return SchemeSummary(n_volumes=int(b.size), n_b0=int(b0.sum()), shells=tuple(shells),
                         delta=d1, Delta=d2, timing_source=timing_source if d1 else "none",
                         scheme_hash=str(scheme.hash),
                         oddities=tuple(odd))


def check_model(model: str, summary: SchemeSummary,
                scheme: AcquisitionScheme | None = None) -> Verdict:
    """Whether ``model`` (a named model) can be fitted on a series with ``summary``; with
    the series' ``scheme``, the library's scheme checks
    (:func:`fingerprint.core.scheme_checks.check_scheme`, the ones every fit runs) add
    their refusals (skip) and warnings (warn)."""
    name = get_recipe(model).name
    skip: list[str] = []
    warn: list[str] = []
    if requires_timing(name) and (summary.delta is None or summary.Delta is None):
        skip.append("needs pulse timing (δ, Δ): none in the JSON sidecar "
                    "(DiffusionGradientDuration/DiffusionGradientSeparation) and no "
                    "--delta/--Delta")
    if not summary.shells:
        skip.append("no diffusion-weighted shell")
    elif max(s.directions for s in summary.shells) < MIN_DIRECTIONS:
        skip.append(f"at most {max(s.directions for s in summary.shells)} directions per "
                    f"shell (fewer than {MIN_DIRECTIONS})")
    else:
        if name in MULTI_SHELL_MODELS and len(summary.shells) < 2:
            warn.append(f"one non-zero shell: {name}'s volume fractions are poorly "
                        "determined without a second shell")
        few = [s for s in summary.shells if s.directions < MIN_DIRECTIONS]
        if few:
            warn.append("shells with fewer than 6 directions: " +
                        ", ".join(f"b={s.bvalue:.0f} ({s.directions})" for s in few))
    if scheme is not None:
        report = check_scheme(scheme, get_model(name), model_name=name,
                              requires_timing=requires_timing(name))
        skip.extend(f.message for f in report.refusals if f.code != "timing" or not skip)
        warn.extend(f.message for f in report.warnings)
    if skip:
        return Verdict(name, "skip", tuple(dict.fromkeys(skip)))
    return Verdict(name, "warn" if warn else "run", tuple(dict.fromkeys(warn)))
