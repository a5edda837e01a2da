"""Checks of an acquisition scheme against a model, run before any fit.

One function, :func:`check_scheme`, decides whether a scheme can support a model; the
library (``model.fit``), ``fingerprint fit`` / ``fingerprint check``, the lab server and
study-wide runs all call it, so they refuse and warn for the same reasons with the same
words. :func:`check_gradient_table` inspects the raw b-values and vectors of a gradient
file before they become a scheme (vectors of the wrong length, missing directions).

>>> from fingerprint.core.scheme_checks import check_scheme
>>> report = check_scheme(scheme, model)
>>> print(report.text())            # shells with their spread, then the verdict
>>> report.raise_if_refused()       # InputError naming every refusal

Every finding is a :class:`SchemeFinding` with a level:

``refuse``
    the scheme cannot support the model (the fit would be meaningless);
``warn``
    a matter of degree: the fit runs, the maps are less certain;
``note``
    something worth knowing that changes nothing (a NaN direction of a b=0 volume).

The rules (b-values in s/mm² in the messages, SI units in the code):

* ``units``: the largest b-value is below 1 s/mm² expressed in s/m² (b-values given in
  s/mm² where s/m² are expected), or above 10^6 s/mm² -> refuse.
* ``no-b0``: no measurement at or below the b=0 threshold -> refuse, naming the lowest
  b-value and the ``b0_threshold`` that would make it the b=0 reference.
* ``only-b0``: no diffusion-weighted measurement -> refuse.
* ``low-b``: measurements with 0 < b <= threshold normalise S0; the forward models still
  use their own b-value, direction and timing -> note.
* ``shell-spread``: a shell whose members' b-values spread over more than
  :data:`SHELL_SPREAD_TOLERANCE` of its mean (and more than
  :data:`SHELL_SPREAD_FLOOR` s/m²) -> warn (spherical means stay exact: they are averaged
  from each member's own b-value, see ``AcquisitionScheme.spherical_mean_groups``).
* ``timing``: the model needs pulse timing (restricted compartments) and the scheme has
  none -> refuse.
* ``single-shell``: a spherical-mean model, or a model with an isotropic compartment
  beside an orientation-dispersed bundle (NODDI), on one diffusion-weighted shell -> refuse;
  any other multi-compartment model on one shell -> warn.
* ``spherical-mean-shells``: a spherical-mean model with fewer diffusion-weighted shells
  than free parameters (top-level volume fractions, which sum to 1, count one less)
  -> refuse.
* ``directions``: fewer distinct directions (antipodal pairs merged) than the model's free
  parameters -> refuse; fewer than :data:`FEW_DIRECTIONS` per orientation of an
  anisotropic model -> warn.
* ``low-bmax``: an anisotropic model whose largest b-value is below :data:`LOW_BMAX` -> warn.
* ``requirement-shells`` / ``requirement-bmax`` / ``requirement-directions``: a named
  model's recipe states the diffusion-weighted shells, largest b-value or distinct
  directions it needs at least (``[requirements]`` of ``dictionaries/<name>.toml``) and
  the scheme has fewer / a lower one -> refuse.
* ``bvec-norm`` / ``bvec-zero`` / ``bvec-nan`` (raw gradient tables): non-unit vectors at
  non-zero b -> note (they are normalised); zero or NaN vectors at b above the threshold
  -> refuse; zero or NaN vectors of b=0 measurements -> note (a b=0 direction is
  irrelevant); zero vectors at 0 < b <= threshold -> note (those measurements are
  modelled without a direction: exact for isotropic compartments only).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from fingerprint.core.acquisition_scheme import DEFAULT_B0_THRESHOLD
from fingerprint.core.backends import backend
from fingerprint.errors import InputError

if TYPE_CHECKING:
    from numpy.typing import ArrayLike

    from fingerprint.core.acquisition_scheme import AcquisitionScheme
    from fingerprint.core.modeling_framework import MultiCompartmentModelProperties
    from fingerprint.signal_models.base import CompartmentModel

__all__ = [
    "FEW_DIRECTIONS",
    "check_csd_scheme",
    "LOW_BMAX",
    "SHELL_SPREAD_FLOOR",
    "SHELL_SPREAD_TOLERANCE",
    "SchemeFinding",
    "SchemeReport",
    "ShellSummary",
    "check_gradient_table",
    "check_scheme",
    "distinct_directions",
    "prepare_scheme",
]

logger = logging.getLogger(__name__)

#: Relative spread (max - min) / mean of a shell's b-values above which it is reported.
SHELL_SPREAD_TOLERANCE = 0.05
#: ... provided the spread also exceeds this many s/m² (20 s/mm²).
SHELL_SPREAD_FLOOR = 20e6
#: Fewer distinct directions than this per fibre orientation: a warning.
FEW_DIRECTIONS = 15
#: Largest b-value (s/m², 500 s/mm²) below which anisotropic models are only warned about.
LOW_BMAX = 500e6
#: Plausible range of the largest b-value, s/m² (1 s/mm² .. 10^6 s/mm²).
_BMAX_PLAUSIBLE = (1e6, 1e12)
#: Tolerance on the norm of a gradient vector before it is reported.
_NORM_TOLERANCE = 1e-2

LEVELS = ("refuse", "warn", "note")


@dataclass(frozen=True)
class SchemeFinding:
    """One finding: ``level`` (refuse / warn / note), a short ``code`` and the message."""

    level: str
    code: str
    message: str

    def to_dict(self) -> dict[str, str]:
        return {"level": self.level, "code": self.code, "message": self.message}


@dataclass(frozen=True)
class ShellSummary:
    """One shell: its index, measurement count, b-values (s/m²), timing (s) and directions."""

    index: int
    n_measurements: int
    bvalue: float
    b_min: float
    b_max: float
    n_directions: int
    delta: float | None = None
    Delta: float | None = None
    TE: float | None = None
    b0: bool = False

    @property
    def spread(self) -> float:
        """max - min of the members' b-values, s/m²."""
        return self.b_max - self.b_min

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "n_measurements": self.n_measurements,
                "bvalue_s_per_mm2": self.bvalue / 1e6, "b_min_s_per_mm2": self.b_min / 1e6,
                "b_max_s_per_mm2": self.b_max / 1e6, "n_directions": self.n_directions,
                "delta_s": self.delta, "Delta_s": self.Delta, "TE_s": self.TE, "b0": self.b0}


@dataclass(frozen=True)
class SchemeReport:
    """What :func:`check_scheme` found: the shells and the findings, with a verdict."""

    shells: tuple[ShellSummary, ...] = ()
    findings: tuple[SchemeFinding, ...] = ()
    model: str | None = None
    n_measurements: int = 0
    n_b0: int = 0
    b0_threshold: float = DEFAULT_B0_THRESHOLD
    has_timing: bool = False
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def of_level(self, level: str) -> list[SchemeFinding]:
        return [f for f in self.findings if f.level == level]

    @property
    def refusals(self) -> list[SchemeFinding]:
        return self.of_level("refuse")

    @property
    def warnings(self) -> list[SchemeFinding]:
        return self.of_level("warn")

    @property
    def notes(self) -> list[SchemeFinding]:
        return self.of_level("note")

    @property
    def ok(self) -> bool:
        """True when nothing is refused."""
        return not self.refusals

    @property
    def verdict(self) -> str:
        """``refused``, ``fit with warnings`` or ``ok``."""
        if self.refusals:
            return "refused"
        return "fit with warnings" if self.warnings else "ok"

    def merged(self, findings: Sequence[SchemeFinding]) -> SchemeReport:
        """A report with ``findings`` added (e.g. those of :func:`check_gradient_table`)."""
        return SchemeReport(self.shells, tuple(findings) + self.findings, self.model,
                            self.n_measurements, self.n_b0, self.b0_threshold,
                            self.has_timing, dict(self.extra))

    def message(self) -> str:
        """The refusals as one sentence (empty when nothing is refused)."""
        return "; ".join(f.message for f in self.refusals)

    def raise_if_refused(self, who: str = "") -> None:
        """InputError naming every refusal (nothing when the scheme is accepted)."""
        if self.refusals:
            prefix = f"{who}: " if who else ""
            raise InputError(prefix + self.message())

    def log(self, log: logging.Logger | None = None) -> None:
        """Log warnings at WARNING level and notes at INFO level."""
        log = log or logger
        for f in self.warnings:
            log.warning("%s", f.message)
        for f in self.notes:
            log.info("%s", f.message)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able report (b-values in s/mm²)."""
        return {"model": self.model, "verdict": self.verdict,
                "n_measurements": self.n_measurements, "n_b0": self.n_b0,
                "b0_threshold_s_per_mm2": self.b0_threshold / 1e6,
                "has_timing": self.has_timing,
                "shells": [s.to_dict() for s in self.shells],
                "findings": [f.to_dict() for f in self.findings], **self.extra}

    def text(self) -> str:
        """Readable summary: the shells with their spread, then findings and verdict."""
        lines = [f"{self.n_measurements} measurements, {self.n_b0} at b <= "
                 f"{self.b0_threshold / 1e6:g} s/mm² (b=0 reference), "
                 f"{'with' if self.has_timing else 'without'} pulse timing",
                 f"{'shell':>5} {'n':>5} {'b [s/mm²]':>10} {'range [s/mm²]':>17} "
                 f"{'dirs':>5} {'delta/Delta [ms]':>17}"]
        for s in self.shells:
            timing = "-" if s.delta is None or s.Delta is None else \
                f"{s.delta * 1e3:.2f}/{s.Delta * 1e3:.2f}"
            rng = f"{s.b_min / 1e6:.1f}-{s.b_max / 1e6:.1f}"
            lines.append(f"{s.index:>5} {s.n_measurements:>5} {s.bvalue / 1e6:>10.1f} "
                         f"{rng:>17} {s.n_directions:>5} {timing:>17}"
                         + ("  (b=0)" if s.b0 else ""))
        for f in self.findings:
            lines.append(f"{f.level}: {f.message}")
        what = f" for {self.model}" if self.model else ""
        lines.append(f"verdict{what}: {self.verdict}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- helpers
def distinct_directions(directions: ArrayLike, decimals: int = 3) -> int:
    """Number of distinct non-zero unit directions, antipodal pairs counted once."""
    d = np.asarray(directions, dtype=float).reshape(-1, 3)
    norms = np.linalg.norm(d, axis=1)
    d = d[np.isfinite(norms) & (norms > 0)]
    if d.shape[0] == 0:
        return 0
    d = d / np.linalg.norm(d, axis=1, keepdims=True)
    # canonical hemisphere: first non-zero component positive
    first = np.argmax(np.abs(d) > 1e-9, axis=1)
    sign = np.sign(d[np.arange(d.shape[0]), first])
    d = np.round(d * sign[:, None], decimals) + 0.0
    return int(np.unique(d, axis=0).shape[0])


def _sm(b: float) -> str:
    return f"{b / 1e6:g} s/mm²"


def _model_label(model: Any, name: str | None) -> str:
    if name:
        return name
    if model is None:
        return ""
    return type(model).__name__


def _required(model: Any) -> list[str]:
    try:
        return list(getattr(model, "_required_acquisition_parameters", []) or [])
    except Exception:  # a model that cannot say is treated as needing nothing
        return []


def _submodels(model: Any) -> list[Any]:
    return list(getattr(model, "models", []) or [])


def _is_isotropic(compartment: Any) -> bool:
    ranges = getattr(compartment, "parameter_ranges", {}) or {}
    return "mu" not in ranges and not _submodels(compartment)


def _is_dispersed(sub: Any) -> bool:
    """An orientation-dispersed bundle (SD1WatsonDistributed, SD2BinghamDistributed)."""
    return bool(_submodels(sub)) and type(sub).__name__.startswith("SD")


def _n_free(model: Any) -> int:
    """Free parameter values; top-level volume fractions count one less (they sum to 1)."""
    card = getattr(model, "parameter_cardinality", None)
    if not card:
        return 0
    total = int(sum(int(c) for c in card.values()))
    fractions = [n for n in card if n.startswith("partial_volume_")]
    return total - 1 if len(fractions) >= 2 else total


def _n_orientations(model: Any) -> int:
    try:
        return len(model.orientation_parameter_names)
    except AttributeError:
        return 0


def _anisotropic(model: Any) -> bool:
    subs = _submodels(model)
    if not subs:
        return not _is_isotropic(model)
    return any(not _is_isotropic(s) for s in subs)


# ----------------------------------------------------------------------------- raw tables
def check_gradient_table(bvalues: ArrayLike, vectors: ArrayLike,
                         b0_threshold: float = DEFAULT_B0_THRESHOLD,
                         source: str = "gradient table") -> list[SchemeFinding]:
    """Findings about raw b-values (s/m²) and gradient vectors (N, 3) of a file.

    ``source`` names the file in the messages. Nothing is raised: the caller decides (the
    readers refuse what is refused here).
    """
    b = np.asarray(bvalues, dtype=float).ravel()
    v = np.asarray(vectors, dtype=float).reshape(-1, 3)
    out: list[SchemeFinding] = []
    finite = np.isfinite(v).all(axis=1)
    norms = np.where(finite, np.linalg.norm(np.where(finite[:, None], v, 0.0), axis=1), 0.0)
    dwi = b > b0_threshold
    low = (b > 0) & ~dwi

    def idx(mask: np.ndarray) -> str:
        i = np.flatnonzero(mask)
        text = ", ".join(str(int(k)) for k in i[:5])
        return text + (f" and {i.size - 5} more" if i.size > 5 else "")

    bad = dwi & ~finite
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        out.append(SchemeFinding("refuse", "bvec-nan",
                                 f"{source}: measurement {i} has b = {_sm(float(b[i]))} but a "
                                 f"non-finite (NaN or inf) gradient vector ({int(bad.sum())} "
                                 f"such measurements at b > {_sm(b0_threshold)})"))
    bad = dwi & finite & (norms < 1e-8)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        top = float(b[bad].max())
        out.append(SchemeFinding("refuse", "bvec-zero",
                                 f"{source}: measurement {i} has b = {_sm(float(b[i]))} but a "
                                 f"zero gradient vector ({int(bad.sum())} such measurements at "
                                 f"b > {_sm(b0_threshold)}); if they are the b=0 volumes, set "
                                 f"b0_threshold to {top:g} s/m² (--b0-threshold "
                                 f"{top / 1e6:g} on the command line, b0_threshold="
                                 f"{top / 1e6:g} s/mm² on the server)"))
    off = (b > 0) & finite & (norms >= 1e-8) & (np.abs(norms - 1.0) > _NORM_TOLERANCE)
    if off.any():
        out.append(SchemeFinding("note", "bvec-norm",
                                 f"{source}: {int(off.sum())} gradient vectors at non-zero b are "
                                 f"not unit length (norms {norms[off].min():.3g}.."
                                 f"{norms[off].max():.3g}, measurement {idx(off)}); they are "
                                 "normalised"))
    nan_b0 = ~dwi & ~finite
    if nan_b0.any():
        out.append(SchemeFinding("note", "bvec-nan-b0",
                                 f"{source}: {int(nan_b0.sum())} b=0 measurements have NaN "
                                 f"gradient vectors (measurement {idx(nan_b0)}); accepted, a "
                                 "b=0 direction is irrelevant"))
    zero_low = low & finite & (norms < 1e-8)
    if zero_low.any():
        out.append(SchemeFinding("note", "bvec-zero-low-b",
                                 f"{source}: {int(zero_low.sum())} measurements with 0 < b <= "
                                 f"{_sm(b0_threshold)} have no gradient direction (measurement "
                                 f"{idx(zero_low)}); they are modelled without one (exact for "
                                 "isotropic compartments only)"))
    return out


# ----------------------------------------------------------------------------- scheme
def _shells(scheme: Any) -> list[ShellSummary]:
    b = np.asarray(scheme.bvalues, dtype=float)
    idx = np.asarray(scheme.shell_indices)
    dirs = np.asarray(scheme.gradient_directions, dtype=float)
    shell_b0 = np.asarray(scheme.shell_b0_mask, dtype=bool)
    out = []

    def at(arr: Any, i: int) -> float | None:
        return None if arr is None else float(np.asarray(arr)[i])

    for s in range(int(scheme.number_of_shells)):
        m = idx == s
        out.append(ShellSummary(
            index=s, n_measurements=int(m.sum()), bvalue=float(scheme.shell_bvalues[s]),
            b_min=float(b[m].min()), b_max=float(b[m].max()),
            n_directions=distinct_directions(dirs[m]),
            delta=at(scheme.shell_delta, s), Delta=at(scheme.shell_Delta, s),
            TE=at(scheme.shell_TE, s), b0=bool(shell_b0[s])))
    return out


def check_csd_scheme(scheme: AcquisitionScheme, n_tissues: int, sh_order: int,
                     model_name: str = "mc_csd") -> SchemeReport:
    """Check ``scheme`` for multi-tissue constrained spherical deconvolution with
    ``n_tissues`` tissues (white matter plus isotropic ones) and a white-matter FOD of
    even order ``sh_order``.

    Refusals: ``no-b0`` / ``only-b0`` (as :func:`check_scheme`); ``csd-tissues``: fewer
    distinct b-values (b=0 included) than tissues (each isotropic tissue is told apart
    by its decay across shells); ``csd-directions``: fewer distinct directions on the
    best-sampled shell than the FOD's SH coefficients of order 4 (15). Warning:
    ``csd-order``: fewer than the coefficients of ``sh_order`` (the order is then carried
    by the non-negativity constraint alone, as in MRtrix3's super-resolved CSD)."""
    base = check_scheme(scheme, model_name=model_name)
    findings = [f for f in base.findings if f.code in ("units", "no-b0", "only-b0")
                or f.level != "refuse"]
    n_b = sum(1 for _ in base.shells)
    if n_b < n_tissues:
        findings.append(SchemeFinding(
            "refuse", "csd-tissues",
            f"{model_name} separates {n_tissues} tissues but the scheme has {n_b} distinct "
            f"b-value(s) ({', '.join(f'{s.bvalue / 1e6:g}' for s in base.shells)} s/mm²), "
            f"b=0 included; it needs at least {n_tissues} (multi-shell data for white "
            "matter, grey matter and CSF)"))
    dwi = [s for s in base.shells if not s.b0]
    best = max((s.n_directions for s in dwi), default=0)
    n_coef = (sh_order + 1) * (sh_order + 2) // 2
    if dwi and best < 15:
        findings.append(SchemeFinding(
            "refuse", "csd-directions",
            f"{model_name}: the best-sampled shell has {best} distinct directions; a FOD "
            "needs at least 15 (order 4)"))
    elif dwi and best < n_coef:
        findings.append(SchemeFinding(
            "warn", "csd-order",
            f"{model_name}: the best-sampled shell has {best} distinct directions, fewer "
            f"than the {n_coef} SH coefficients of order {sh_order}"))
    return SchemeReport(base.shells, tuple(findings), model_name, base.n_measurements,
                        base.n_b0, base.b0_threshold, base.has_timing, dict(base.extra))


def check_scheme(scheme: AcquisitionScheme,
                 model: MultiCompartmentModelProperties | CompartmentModel | None = None, *,
                 model_name: str | None = None, requires_timing: bool | None = None
                 ) -> SchemeReport:
    """Check ``scheme`` (an AcquisitionScheme) alone, or against ``model``.

    ``model`` is a MultiCompartmentModel (or SphericalMean model, or a compartment);
    ``model_name`` labels it in the messages; ``requires_timing`` overrides what the
    model's compartments say (named models whose recipe says so). Returns a
    :class:`SchemeReport`; nothing is raised (see :meth:`SchemeReport.raise_if_refused`).
    """
    if not (hasattr(scheme, "bvalues") and hasattr(scheme, "b0_mask")):
        raise InputError(f"expected an AcquisitionScheme, got {type(scheme).__name__}")
    findings: list[SchemeFinding] = []
    b = np.asarray(scheme.bvalues, dtype=float)
    b0_mask = np.asarray(scheme.b0_mask, dtype=bool)
    threshold = float(scheme.b0_threshold)
    label = _model_label(model, model_name)
    has_timing = scheme.delta is not None and scheme.Delta is not None
    shells = _shells(scheme)
    bmax = float(b.max()) if b.size else 0.0

    # --- units
    if 0.0 < bmax < _BMAX_PLAUSIBLE[0]:
        findings.append(SchemeFinding(
            "refuse", "units",
            f"the largest b-value is {bmax:g} s/m² ({_sm(bmax)}): b-values look like s/mm² "
            "given where s/m² are expected (multiply by 1e6)"))
    elif bmax > _BMAX_PLAUSIBLE[1]:
        findings.append(SchemeFinding(
            "refuse", "units",
            f"the largest b-value is {_sm(bmax)}: b-values look like they were converted to "
            "s/m² twice (or are in the wrong unit)"))
    units_ok = not findings

    # --- b=0 reference
    n_b0 = int(b0_mask.sum())
    if units_ok and n_b0 == 0:
        lowest = float(b.min())
        findings.append(SchemeFinding(
            "refuse", "no-b0",
            f"no b=0 measurement (b <= {_sm(threshold)}): signals cannot be normalised; the "
            f"lowest b-value is {_sm(lowest)}: to use the measurements at that b-value as the "
            f"b=0 reference, set b0_threshold to {lowest:g} s/m² (--b0-threshold "
            f"{lowest / 1e6:g} on the command line, b0_threshold={lowest / 1e6:g} s/mm² on "
            "the server)"))
    if units_ok and n_b0 == b.size:
        findings.append(SchemeFinding(
            "refuse", "only-b0",
            f"every measurement is at b <= {_sm(threshold)}: there is no diffusion weighting "
            "to fit"))
    low = (b > 0) & b0_mask
    if low.any():
        findings.append(SchemeFinding(
            "note", "low-b",
            f"{int(low.sum())} measurements at 0 < b <= {_sm(threshold)} (up to "
            f"{_sm(float(b[low].max()))}) are used as the b=0 reference; the forward models "
            "still use their own b-value, direction and timing"))

    # --- shells
    dwi_shells = [s for s in shells if not s.b0]
    wide = [s for s in shells if s.spread > SHELL_SPREAD_FLOOR
            and s.spread > SHELL_SPREAD_TOLERANCE * max(s.bvalue, 1.0)]
    if wide:
        desc = ", ".join(f"shell {s.index} ({s.b_min / 1e6:g}-{s.b_max / 1e6:g} s/mm²)"
                         for s in wide[:5])
        more = f" and {len(wide) - 5} more" if len(wide) > 5 else ""
        findings.append(SchemeFinding(
            "warn", "shell-spread",
            f"{len(wide)} shells mix b-values spread over more than "
            f"{SHELL_SPREAD_TOLERANCE:.0%} of their mean: {desc}{more}; spherical means are "
            "averaged from each measurement's own b-value (exact when the directions of each "
            "b-value cover the sphere evenly); lower min_b_shell_distance to split them"))

    report_extra: dict[str, Any] = {
        "n_dwi_shells": len(dwi_shells),
        "n_directions": distinct_directions(np.asarray(scheme.gradient_directions)[~b0_mask]),
        "b_max_s_per_mm2": bmax / 1e6,
    }

    if model is not None and units_ok:
        findings.extend(_model_findings(scheme, model, label, has_timing, dwi_shells,
                                        report_extra["n_directions"], bmax, requires_timing))

    return SchemeReport(tuple(shells), tuple(findings), label or None,
                        int(b.size), n_b0, threshold, has_timing, report_extra)


def _model_findings(scheme: Any, model: Any, label: str, has_timing: bool,
                    dwi_shells: list[ShellSummary], n_dirs: int, bmax: float,
                    requires_timing: bool | None) -> list[SchemeFinding]:
    out: list[SchemeFinding] = []
    who = label or "the model"
    required = _required(model)
    needs_timing = bool(requires_timing) or any(
        p in ("delta", "Delta", "qvalues", "gradient_strengths", "tau") for p in required)
    if needs_timing and not has_timing:
        out.append(SchemeFinding(
            "refuse", "timing",
            f"{who} has restricted compartments that need the pulse timing (delta, Delta), "
            "which this scheme does not have (give --delta/--Delta in seconds, or a Camino "
            ".scheme file)"))
    n_shells = len(dwi_shells)
    spherical_mean = bool(getattr(model, "is_spherical_mean", False))
    subs = _submodels(model)
    n_free = _n_free(model)
    if spherical_mean:
        if n_shells < 2:
            out.append(SchemeFinding(
                "refuse", "single-shell",
                f"{who} is fitted to spherical means, which need at least 2 diffusion-weighted "
                f"shells; this scheme has {n_shells}"))
        elif n_shells < n_free:
            out.append(SchemeFinding(
                "refuse", "spherical-mean-shells",
                f"{who} has {n_free} free parameters but the scheme has only {n_shells} "
                "diffusion-weighted shells to fit them to"))
    elif n_shells < 2 and len(subs) > 1:
        noddi_like = any(_is_isotropic(s) for s in subs) and \
            any(_is_dispersed(s) for s in subs)
        if noddi_like:
            out.append(SchemeFinding(
                "refuse", "single-shell",
                f"{who} separates an isotropic compartment from a dispersed bundle, which needs "
                f"at least 2 diffusion-weighted shells; this scheme has {n_shells}"))
        else:
            out.append(SchemeFinding(
                "warn", "single-shell",
                f"{who} has {len(subs)} compartments and the scheme a single "
                "diffusion-weighted shell: volume fractions and diffusivities are confounded"))
    if not spherical_mean and _anisotropic(model):
        k = max(_n_orientations(model), 1)
        if n_dirs < n_free:
            out.append(SchemeFinding(
                "refuse", "directions",
                f"{who} has {n_free} free parameters ({_n_orientations(model)} orientations) "
                f"but the scheme has only {n_dirs} distinct gradient directions"))
        elif n_dirs < FEW_DIRECTIONS * k:
            out.append(SchemeFinding(
                "warn", "directions",
                f"only {n_dirs} distinct gradient directions for {k} fibre orientation(s) "
                f"(at least {FEW_DIRECTIONS * k} recommended): orientations and dispersion "
                "are uncertain"))
    out.extend(_requirement_findings(model, who, n_shells, n_dirs, bmax))
    if _anisotropic(model) and 0 < bmax < LOW_BMAX:
        out.append(SchemeFinding(
            "warn", "low-bmax",
            f"the largest b-value is {_sm(bmax)}, below {_sm(LOW_BMAX)}: anisotropic "
            "compartments are poorly resolved"))
    return out


def _recipe_requirements(model: Any) -> dict[str, float]:
    """The ``[requirements]`` of the recipe ``model`` was built from ({} for any other)."""
    if not hasattr(model, "parameter_names"):
        return {}
    try:
        found = backend("model_requirements")(model)
    except Exception as exc:  # a recipe directory that cannot be read: no requirements
        logger.debug("no recipe requirements for the model: %s", exc)
        return {}
    return dict(found or {})


def _requirement_findings(model: Any, who: str, n_shells: int, n_dirs: int,
                          bmax: float) -> list[SchemeFinding]:
    req = _recipe_requirements(model)
    out: list[SchemeFinding] = []
    shells = int(req.get("min_shells", 0))
    if n_shells < shells:
        out.append(SchemeFinding(
            "refuse", "requirement-shells",
            f"{who} needs at least {shells} diffusion-weighted shells; this scheme has "
            f"{n_shells}"))
    need_b = float(req.get("min_bmax", 0.0))
    if bmax < need_b:
        out.append(SchemeFinding(
            "refuse", "requirement-bmax",
            f"{who} needs a largest b-value of at least {_sm(need_b)}; this scheme's is "
            f"{_sm(bmax)}"))
    dirs = int(req.get("min_directions", 0))
    if n_dirs < dirs:
        out.append(SchemeFinding(
            "refuse", "requirement-directions",
            f"{who} needs at least {dirs} distinct gradient directions; this scheme has "
            f"{n_dirs}"))
    return out


def prepare_scheme(scheme: AcquisitionScheme, model: MultiCompartmentModelProperties | None = None,
                   *, b0_threshold: float | None = None, who: str = "",
                   model_name: str | None = None, requires_timing: bool | None = None,
                   log: logging.Logger | None = None) -> tuple[AcquisitionScheme, SchemeReport]:
    """What every entry point runs before a fit: apply ``b0_threshold`` (s/m², None keeps
    the scheme's), check the scheme against ``model``, raise an InputError (prefixed by
    ``who``) naming every refusal, log the warnings and notes.

    Returns ``(scheme, report)``; the scheme is a new one when the threshold changed.
    """
    if b0_threshold is not None:
        value = float(b0_threshold)
        if not np.isfinite(value) or value < 0:
            raise InputError(f"b0_threshold must be a finite non-negative b-value in s/m², "
                             f"got {b0_threshold!r}")
        scheme = scheme.with_b0_threshold(value)
    report = check_scheme(scheme, model, model_name=model_name,
                          requires_timing=requires_timing)
    report.raise_if_refused(who)
    report.log(log)
    return scheme, report
