"""Fit options: one typed, validated object shared by ``model.fit``, ``fit_volume``, the
command line and the lab server, plus the limits of what they accept.

>>> opts = FitOptions.from_mapping({"n_neighbors": 16, "refine": "nonlinear"})
>>> opts.n_neighbors, opts.polish_for(model)
>>> FitOptions(n_neighbors=0)          # InputError: option 'n_neighbors' must be ...

Every field is checked in :meth:`FitOptions.__post_init__`, once, with an error that names
the option; unknown names are refused by :meth:`FitOptions.from_mapping`. What the CLI
and the server offer is read from :data:`FIT_OPTION_SPECS` (name, type, bounds, help),
never from function signatures.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from fingerprint.errors import InputError
from fingerprint.fitting.registry import (
    BUILTIN_SOLVER,
    DMIPY_SOLVERS,
    REFUSED_SOLVERS,
    check_solver,
)
from fingerprint.recipes import TISSUES

__all__ = ["CLASSICAL_OPTION_NAMES", "COUNT_PENALTY_MAX", "DMIPY_IGNORED_OPTIONS", "DMIPY_SOLVERS",
           "FIT_OPTION_SPECS", "MASK_RULES", "RESPONSES_MAX_LENGTH", "RESPONSE_TISSUES",
           "Responses", "parse_responses", "ClassicalSettings", "OptionError",
           "PREFIX_PATTERN", "TIMING_LIMITS_S", "FitOptions", "OptionSpec", "PolishSettings",
           "check_prefix", "check_timing"]

#: dmipy ``fit`` keywords of its other optimisers: accepted and ignored
#: (``number_of_processors`` and ``use_parallel_processing`` set ``threads``).
DMIPY_IGNORED_OPTIONS = ("hard_constraints", "lambda_inf", "lambda_1")
#: Options of the classical solvers (:class:`ClassicalSettings`; dmipy's ``Ns``,
#: ``N_sphere_samples``, ``maxiter``), ignored by dictionary matching.
CLASSICAL_OPTION_NAMES = ("Ns", "N_sphere_samples", "maxiter", "grid_starts", "popsize",
                          "tol")
#: Default-mask rules: ``'positive_b0'`` (voxels whose mean b=0 signal is finite and
#: positive) or ``'all'`` (every voxel; unusable ones are reported and left out).
MASK_RULES = ("positive_b0", "all")
#: Largest plausible pulse timing (s) per acquisition parameter; larger values are
#: milliseconds given as seconds.
TIMING_LIMITS_S: Mapping[str, float] = {"delta": 1.0, "Delta": 10.0, "TE": 10.0}
#: Largest ``count_penalty`` (information-criterion cost of one parameter): far beyond
#: any data's log N, where one fascicle is always chosen.
COUNT_PENALTY_MAX = 1000.0
#: Output-name prefixes: BIDS entity strings such as ``sub-01_ses-1`` (1-64 characters).
PREFIX_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")

RefineOption = bool | Literal["nonlinear"]


@dataclass(frozen=True)
class OptionSpec:
    """What a front end needs to offer one fit option."""

    name: str
    kind: Literal["int", "float", "bool", "choice", "refine", "text"]
    help: str
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] = ()
    #: offered by the lab server's job form
    server: bool = False


#: The options front ends offer (the rest are library tuning knobs).
FIT_OPTION_SPECS: tuple[OptionSpec, ...] = (
    OptionSpec("dictionary_size", "int", "atoms in the dictionary (default: the model's)",
               low=1, high=10**9, server=True),
    OptionSpec("n_neighbors", "int", "dictionary atoms matched per voxel (default 32)",
               low=1, high=4096, server=True),
    OptionSpec("refine", "refine", "after matching: true (local-linear step), false, or "
               "'nonlinear' (plus a non-linear least-squares polish; the default for models "
               "with more than one orientation); default: the model's (its recipe's [fit] "
               "refine, else true)", server=True),
    OptionSpec("count_penalty", "float", "multi-fascicle models (ball_stick_stick, noddi2, "
               "...) fitted by dictionary matching: information-criterion cost of one "
               "parameter when each voxel's fascicle count is chosen, N log(RSS/N) + p x "
               "penalty (2 is the AIC; smaller finds more crossings and splits more single "
               "fascicles); default: the model's (its recipe's [fit] count_penalty, else "
               "log N, the BIC); other models ignore it", low=0.0, high=COUNT_PENALTY_MAX,
               server=True),
    OptionSpec("multi_tissue", "text", "also write volume fractions (<tissue>_vf maps) from "
               "S0 responses: 'auto' (estimated from the data's white-matter, grey-matter "
               "and CSF voxels), 'wm=..,gm=..,csf=..' or one number per compartment (units "
               "of the data); default: none", server=True),
    OptionSpec("threads", "int", "threads for matching and dictionary builds (default: all "
               "cores)", low=1, high=4096, server=True),
    OptionSpec("seed", "int", "seed of the dictionary's sampling", low=0, high=2**31 - 1),
    OptionSpec("mask_rule", "choice", "default mask when none is given: 'positive_b0' "
               "(voxels with a positive mean b=0 signal) or 'all'", choices=MASK_RULES,
               server=True),
    OptionSpec("solver", "choice", "'fingerprint' (dictionary matching, the fast fit), or "
               "dmipy's classical non-linear fits 'brute2fine' (grid, then least squares) and "
               "'mix' (differential evolution, then least squares)",
               choices=(BUILTIN_SOLVER, *(s for s in DMIPY_SOLVERS
                                          if s not in REFUSED_SOLVERS)), server=True),
    OptionSpec("Ns", "int", "brute2fine: grid points per scalar parameter (default 5)",
               low=2, high=100, server=True),
    OptionSpec("N_sphere_samples", "int", "brute2fine: orientations of the grid (default 30)",
               low=1, high=10_000, server=True),
    OptionSpec("grid_starts", "int", "brute2fine: best grid points refined per voxel "
               "(default 1)", low=1, high=64, server=True),
    OptionSpec("maxiter", "int", "brute2fine and mix: residual evaluations per start of the "
               "refinement; mix: also generations of the evolution (default 300)",
               low=1, high=100_000, server=True),
    OptionSpec("popsize", "int", "mix: population members per searched parameter "
               "(default 6)", low=2, high=100, server=True),
    OptionSpec("tol", "float", "mix: relative spread of a voxel's population costs at which "
               "its evolution stops (default 0.05)", low=1e-12, high=1.0, server=True),
)


#: Largest length of a ``multi_tissue`` value.
RESPONSES_MAX_LENGTH = 200
#: Tissue names of per-tissue responses (white matter, grey matter, CSF).
RESPONSE_TISSUES = TISSUES
Responses = list[float] | dict[str, float] | str


def parse_responses(text: str) -> Responses:
    """Multi-tissue S0 responses from text: ``'auto'``, ``'wm=3000,gm=4000,csf=9000'``
    (per tissue) or ``'9000,3000'`` (one per top-level compartment); every value a
    positive number. InputError naming what was expected otherwise."""
    value = str(text).strip()
    if value.lower() == "auto":
        return "auto"
    expected = ("'auto', positive numbers separated by commas (one per compartment) or "
                "wm=..,gm=..,csf=..")
    parts = [p.strip() for p in value.split(",")]
    if len(value) > RESPONSES_MAX_LENGTH or not value or not all(parts):
        raise InputError(f"multi-tissue responses must be {expected}; got {text!r}")
    by_tissue = all("=" in p for p in parts)
    try:
        pairs = [(k.strip().lower(), float(v)) for k, v in (p.split("=", 1) for p in parts)] \
            if by_tissue else [("", float(p)) for p in parts]
    except ValueError:
        raise InputError(f"multi-tissue responses must be {expected}; got {text!r}") from None
    values = [v for _, v in pairs]
    out: Responses = values
    if by_tissue:
        out = dict(pairs)
        if set(out) - set(RESPONSE_TISSUES) or len(out) != len(pairs):
            raise InputError(f"multi-tissue responses name each of the tissues "
                             f"{list(RESPONSE_TISSUES)} at most once; got {text!r}")
    if not all(math.isfinite(v) and v > 0 for v in values):
        raise InputError(f"multi-tissue responses must be positive numbers; got {text!r}")
    return out


def _responses_text(value: object) -> str | None:
    """The canonical text of a ``multi_tissue`` value (text, per-tissue mapping or one
    number per compartment), checked; None stays None."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        text = ",".join(f"{k}={v}" for k, v in value.items())
    elif isinstance(value, (list, tuple)):
        text = ",".join(str(v) for v in value)
    elif isinstance(value, str):
        text = value
    else:
        raise _fail("multi_tissue", "'auto', wm=..,gm=..,csf=.. or numbers", value)
    try:
        parsed = parse_responses(text)
    except InputError as exc:
        raise OptionError(f"option 'multi_tissue': {exc}", "multi_tissue") from None
    if isinstance(parsed, str):
        return parsed
    if isinstance(parsed, dict):
        return ",".join(f"{k}={v:g}" for k, v in parsed.items())
    return ",".join(f"{v:g}" for v in parsed)


@dataclass(frozen=True)
class PolishSettings:
    """The non-linear least-squares polish after matching
    (:func:`fingerprint.fitting.nonlinear.refine_nonlinear`)."""

    #: best atoms added to the estimate as starts (signal-feature models)
    starts: int = 3
    #: residual evaluations per start (None: the refinement's default)
    max_nfev: int | None = None
    #: ``'batched'`` (all voxels advance together) or ``'scipy'`` (voxel by voxel)
    method: Literal["batched", "scipy"] = "batched"


@dataclass(frozen=True)
class ClassicalSettings:
    """Settings of the classical solvers (:mod:`fingerprint.fitting.solvers`).

    Ns: grid points per scalar parameter (brute2fine; dmipy's name and default).
    N_sphere_samples: orientations of the brute-force grid (brute2fine).
    maxiter: residual evaluations per start of the refinement; for mix also the
        generations of the differential evolution.
    grid_starts: best grid points refined per voxel (brute2fine).
    popsize: differential-evolution members per searched parameter (mix).
    tol: relative spread of a voxel's population costs at which its evolution stops (mix).
    """

    Ns: int = 5
    N_sphere_samples: int = 30
    maxiter: int = 300
    grid_starts: int = 1
    popsize: int = 6
    tol: float = 0.05


class OptionError(InputError):
    """An invalid fit option; :attr:`option` names it (as :meth:`FitOptions.from_mapping`
    spells it), so front ends can point at their field of that name."""

    def __init__(self, message: str, option: str | None = None) -> None:
        super().__init__(message)
        self.option = option


def _fail(name: str, expected: str, value: object) -> OptionError:
    return OptionError(f"option {name!r} must be {expected}, got {value!r}", name)


def _int(name: str, value: object, low: int, *, optional: bool = True) -> int | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise _fail(name, f"an integer >= {low}", value)
    try:
        number = float(value)
    except ValueError:
        raise _fail(name, f"an integer >= {low}", value) from None
    if not math.isfinite(number) or number != int(number) or number < low:
        raise _fail(name, f"an integer >= {low}", value)
    return int(number)


def _float(name: str, value: object, low: float, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise _fail(name, f"a number in [{low:g}, {high:g}]", value)
    try:
        number = float(value)
    except ValueError:
        raise _fail(name, f"a number in [{low:g}, {high:g}]", value) from None
    if not (low <= number <= high):  # also false for NaN
        raise _fail(name, f"a number in [{low:g}, {high:g}]", value)
    return number


def _bool(name: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.lower() in ("true", "1", "yes")
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise _fail(name, "true or false", value)


def _choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    text = str(value).lower() if isinstance(value, str) else None
    if text not in choices:
        raise _fail(name, "one of " + ", ".join(repr(c) for c in choices), value)
    return text


@dataclass(frozen=True)
class FitOptions:
    """How to fit: solver, dictionary, matching, refinement, threads, default mask.

    Attributes
    ----------
    solver: a registered solver (:func:`fingerprint.fitting.registry.available_solvers`;
        ``'fingerprint'``, dictionary matching, by default; dmipy's ``'brute2fine'`` and
        ``'mix'``, :mod:`fingerprint.fitting.solvers`, with the settings of
        :attr:`classical`; ``'amico'`` is refused).
    dictionary_size: atoms (default: the model's recipe); seed: its sampling seed.
    n_neighbors: atoms matched per voxel (default 32).
    refine: local-linear step after matching; ``'nonlinear'`` adds the non-linear polish,
        which models with more than one orientation get by default; False turns both off.
        None (default): the model's own default (a named model's recipe ``[fit] refine``,
        else True), resolved by :meth:`with_model_refine` when the fit is prepared.
    threads: threads for FAISS, BLAS and Numba (default: all cores).
    mask_rule: default mask when none is given (:data:`MASK_RULES`).
    rician, matcher_method, hnsw_threshold, ef_search, frame_iterations, temperature,
    cache_index, marginalise_orientation, refine_shrinkage, align_axis: estimator knobs
        (:meth:`fingerprint.fitting.estimator.FingerprintEstimator.from_dictionary`).
    polish: :class:`PolishSettings` of the non-linear polish.
    multi_tissue: S0 responses of a multi-tissue fit (:mod:`fingerprint.fitting.multi_tissue`):
        ``'auto'``, ``'wm=..,gm=..,csf=..'`` or one number per top-level compartment
        (units of the data), kept as canonical text; volume fits (``fit_volume``,
        ``fingerprint fit``, server jobs) then also write volume-fraction maps. None
        (default): signal fractions only.
    count_penalty: information-criterion cost of one parameter when multi-fascicle
        fingerprinting chooses a voxel's fascicle count (``N log(RSS / N) + p *
        count_penalty``; 2 is the AIC), in [0, :data:`COUNT_PENALTY_MAX`]. None (default):
        the model's own (a named model's recipe ``[fit] count_penalty``, else log N, the
        BIC). Used by dictionary matching of multi-fascicle models
        (:mod:`fingerprint.fitting.multifascicle`) unless ``refine='nonlinear'``; other
        fits ignore it.
    b0_threshold: b-value (s/m²) at or below which measurements are the b=0 reference that
        normalises S0 (None: the scheme's own, 10e6 s/m² = 10 s/mm² by default); it never
        changes the forward models (:mod:`fingerprint.core.scheme_checks`).
    """

    solver: str = "fingerprint"
    dictionary_size: int | None = None
    seed: int = 0
    n_neighbors: int | None = None
    refine: RefineOption | None = None
    threads: int | None = None
    mask_rule: Literal["positive_b0", "all"] = "positive_b0"
    rician: bool = True
    matcher_method: Literal["auto", "exact", "hnsw"] = "auto"
    hnsw_threshold: int | None = None
    ef_search: int | None = None
    frame_iterations: int | None = None
    temperature: float = 1.0
    cache_index: bool = True
    marginalise_orientation: float = 0.0
    refine_shrinkage: float = 1.0
    align_axis: bool = True
    polish: PolishSettings = field(default_factory=PolishSettings)
    classical: ClassicalSettings = field(default_factory=ClassicalSettings)
    b0_threshold: float | None = None
    multi_tissue: str | None = None
    count_penalty: float | None = None

    def __post_init__(self) -> None:
        setv = object.__setattr__
        if self.count_penalty is not None:
            setv(self, "count_penalty", _float("count_penalty", self.count_penalty, 0.0,
                                               COUNT_PENALTY_MAX))
        setv(self, "multi_tissue", _responses_text(self.multi_tissue))
        if self.b0_threshold is not None:
            setv(self, "b0_threshold", _float("b0_threshold", self.b0_threshold, 0.0, 1e11))
        try:
            setv(self, "solver", check_solver(self.solver))
        except InputError as exc:
            raise OptionError(str(exc), "solver") from None
        setv(self, "dictionary_size", _int("dictionary_size", self.dictionary_size, 1))
        setv(self, "seed", _int("seed", self.seed, 0, optional=False))
        setv(self, "n_neighbors", _int("n_neighbors", self.n_neighbors, 1))
        refine = self.refine
        if refine is None:
            pass
        elif isinstance(refine, str) and refine.lower() == "nonlinear":
            refine = "nonlinear"
        else:
            try:
                refine = _bool("refine", refine)
            except InputError:
                raise _fail("refine", "true, false or 'nonlinear'", self.refine) from None
        setv(self, "refine", refine)
        setv(self, "threads", _int("threads", self.threads, 1))
        setv(self, "mask_rule", _choice("mask_rule", self.mask_rule, MASK_RULES))
        setv(self, "rician", _bool("rician", self.rician))
        setv(self, "matcher_method", _choice("matcher_method", self.matcher_method,
                                             ("auto", "exact", "hnsw")))
        setv(self, "hnsw_threshold", _int("hnsw_threshold", self.hnsw_threshold, 1))
        setv(self, "ef_search", _int("ef_search", self.ef_search, 1))
        setv(self, "frame_iterations", _int("frame_iterations", self.frame_iterations, 0))
        setv(self, "temperature", _float("temperature", self.temperature, 1e-9))
        setv(self, "cache_index", _bool("cache_index", self.cache_index))
        setv(self, "marginalise_orientation",
             _float("marginalise_orientation", self.marginalise_orientation, 0.0))
        setv(self, "refine_shrinkage", _float("refine_shrinkage", self.refine_shrinkage, 0.0))
        setv(self, "align_axis", _bool("align_axis", self.align_axis))
        if not isinstance(self.polish, PolishSettings):
            raise _fail("polish", "PolishSettings", self.polish)
        c = self.classical
        if not isinstance(c, ClassicalSettings):
            raise _fail("classical", "ClassicalSettings", c)
        setv(self, "classical", ClassicalSettings(
            Ns=int(_int("Ns", c.Ns, 2, optional=False) or 2),
            N_sphere_samples=int(_int("N_sphere_samples", c.N_sphere_samples, 1,
                                      optional=False) or 1),
            maxiter=int(_int("maxiter", c.maxiter, 1, optional=False) or 1),
            grid_starts=int(_int("grid_starts", c.grid_starts, 1, optional=False) or 1),
            popsize=int(_int("popsize", c.popsize, 2, optional=False) or 2),
            tol=_float("tol", c.tol, 1e-12, 1.0)))
        p = self.polish
        setv(self, "polish", PolishSettings(
            starts=int(_int("nonlinear_starts", p.starts, 1, optional=False) or 1),
            max_nfev=_int("nonlinear_max_nfev", p.max_nfev, 1),
            method=_choice("nonlinear_method", p.method, ("batched", "scipy"))))  # type: ignore[arg-type]

    # ------------------------------------------------------------------ constructors
    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        """Every name :meth:`from_mapping` accepts."""
        names = [f.name for f in dataclasses.fields(cls)
                 if f.name not in ("polish", "classical")]
        return tuple(names + ["n_jobs", "nonlinear_starts", "nonlinear_max_nfev",
                              "nonlinear_method", *CLASSICAL_OPTION_NAMES])

    @classmethod
    def from_mapping(cls, values: Mapping[str, object] | None = None, *,
                     dmipy: bool = False) -> FitOptions:
        """Options from keyword values; unknown names are an InputError listing the known
        ones. ``n_jobs`` is an alias of ``threads``; ``nonlinear_starts`` /
        ``nonlinear_max_nfev`` / ``nonlinear_method`` set :attr:`polish`. With ``dmipy``,
        dmipy's ``number_of_processors`` / ``use_parallel_processing`` set ``threads`` and
        its optimiser settings (:data:`DMIPY_IGNORED_OPTIONS`) are ignored."""
        kw = dict(values or {})
        if dmipy:
            processors = kw.pop("number_of_processors", None)
            if processors is not None and kw.get("threads", kw.get("n_jobs")) is None:
                kw["threads"] = _int("number_of_processors", processors, 1)
            if kw.pop("use_parallel_processing", True) is False and \
                    kw.get("threads", kw.get("n_jobs")) is None:
                kw["threads"] = 1
            for name in DMIPY_IGNORED_OPTIONS:
                kw.pop(name, None)
        if "n_jobs" in kw:
            jobs = _int("n_jobs", kw.pop("n_jobs"), 1)
            if kw.get("threads") is None:
                kw["threads"] = jobs
        polish = {}
        for key, attr in (("nonlinear_starts", "starts"), ("nonlinear_max_nfev", "max_nfev"),
                          ("nonlinear_method", "method")):
            if key in kw:
                polish[attr] = kw.pop(key)
        classical = {name: kw.pop(name) for name in CLASSICAL_OPTION_NAMES if name in kw}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kw) - known)
        if unknown:
            raise OptionError(f"unknown fit option(s) {unknown}; known options: "
                              f"{sorted(cls.option_names())}", unknown[0])
        if classical:
            base_c = kw.get("classical", ClassicalSettings())
            if not isinstance(base_c, ClassicalSettings):
                raise _fail("classical", "ClassicalSettings", base_c)
            kw["classical"] = dataclasses.replace(base_c, **classical)  # type: ignore[arg-type]
        if polish:
            base = kw.get("polish", PolishSettings())
            if not isinstance(base, PolishSettings):
                raise _fail("polish", "PolishSettings", base)
            kw["polish"] = dataclasses.replace(base, **polish)  # type: ignore[arg-type]
        return cls(**kw)  # type: ignore[arg-type]

    def replace(self, **changes: object) -> FitOptions:
        """A copy with ``changes`` (validated like :meth:`from_mapping`)."""
        values: dict[str, object] = {f.name: getattr(self, f.name)
                                     for f in dataclasses.fields(self)}
        values.update(changes)
        return FitOptions.from_mapping(values)

    # ------------------------------------------------------------------ derived
    def estimator_options(self) -> dict[str, object]:
        """Keyword arguments of ``FingerprintEstimator.from_dictionary`` (defaults left
        out, so that equal settings give equal cache keys)."""
        out: dict[str, object] = {"n_neighbors": self.n_neighbors,
                                  "refine": self.refine is not False,
                                  "n_jobs": self.threads}
        defaults = FitOptions.__dataclass_fields__
        for name in ("rician", "matcher_method", "hnsw_threshold", "ef_search",
                     "frame_iterations", "temperature", "cache_index",
                     "marginalise_orientation", "refine_shrinkage", "align_axis"):
            value = getattr(self, name)
            if value is not None and value != defaults[name].default:
                out[name] = value
        return out

    def with_model_refine(self, model_refine: bool | str | None) -> FitOptions:
        """These options with ``refine`` resolved: the user's when given, else the
        model's default ``model_refine`` (a recipe's ``[fit] refine``), else True."""
        if self.refine is not None:
            return self
        return self.replace(refine=True if model_refine is None else model_refine)

    def nonlinear_for(self, n_orientations: int) -> bool:
        """Whether the non-linear polish runs for a model with ``n_orientations``
        (``refine`` None counts as True)."""
        if self.refine is False:
            return False
        return self.refine == "nonlinear" or n_orientations > 1

    def to_dict(self) -> dict[str, object]:
        """JSON-able values (the polish flattened to ``nonlinear_*``, the classical
        settings to their names)."""
        out: dict[str, object] = {f.name: getattr(self, f.name)
                                  for f in dataclasses.fields(self)
                                  if f.name not in ("polish", "classical")}
        out.update(nonlinear_starts=self.polish.starts,
                   nonlinear_max_nfev=self.polish.max_nfev,
                   nonlinear_method=self.polish.method)
        out.update(dataclasses.asdict(self.classical))
        return out


def check_timing(name: str, value: float | None, *, flag: str | None = None) -> float | None:
    """``value`` (s) of pulse-timing parameter ``name`` (``delta``, ``Delta``, ``TE``) when
    finite, positive and below :data:`TIMING_LIMITS_S`; InputError naming ``flag`` (default
    the parameter) otherwise, with a hint when it looks like milliseconds."""
    if value is None:
        return None
    label = flag or name
    limit = TIMING_LIMITS_S[name]
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{label} must be a number of seconds, got {value!r}") from None
    if not (0.0 < number < limit):  # also false for NaN
        hint = f" (milliseconds? {number:g} ms is {number / 1e3:g} s)" \
            if limit <= number < limit * 1e3 else ""
        raise InputError(f"{label} must be in seconds, between 0 and {limit:g}; got "
                         f"{number:g}{hint}")
    return number


def check_prefix(prefix: str | None, *, label: str = "prefix") -> str | None:
    """``prefix`` when it is a BIDS entity string (:data:`PREFIX_PATTERN`), None when empty;
    InputError naming ``label`` otherwise."""
    if prefix is None or prefix == "":
        return None
    if not isinstance(prefix, str) or not PREFIX_PATTERN.match(prefix):
        raise InputError(f"{label} {prefix!r} must be 1-64 letters, digits, '_' or '-' (a "
                         f"BIDS entity string such as sub-01_ses-1)")
    return prefix
