"""Multi-fascicle fingerprinting: crossing fascicles, each with its own microstructure.

A model made of several copies of one single-fascicle compartment (a stick, a
Watson-dispersed NODDI bundle, ...) plus isotropic compartments (a ball, a dot) -- such
as ``ball_stick_stick`` (dmipy's ``[G1Ball, C1Stick, C1Stick]``) or ``noddi2`` -- is
fitted voxel by voxel as a sum of *rotated single-fascicle atoms* plus isotropic atoms:

1. **Atoms.** The single-fascicle compartment is simulated on the acquisition scheme
   over a grid of its own parameters (e.g. the stick's diffusivity, or the bundle's
   intra-neurite fraction and ODI); being axially symmetric, each atom is stored as its
   even Legendre coefficients per shell (:mod:`fingerprint.kernels.rotational`), so that
   the atom rotated to any direction costs one Legendre series per measurement, and a
   whole table is scored against a voxel by projections. The isotropic compartments get
   a grid of their free parameters (or one atom when they have none).
2. **Directions.** A typical atom rotated to a dense hemisphere grid is the model's own
   multi-direction dictionary: per voxel, directions are added greedily, each time the
   grid direction that with those already chosen (and the isotropic signal) gives the
   lowest non-negative least-squares residual.
3. **Fit for a given fascicle count K.** Each fascicle's atom in turn (others fixed) is
   the table atom of lowest residual with all fractions by non-negative least squares,
   then the isotropic atoms; then a Levenberg-Marquardt polish moves every fascicle's
   direction (two tangent angles, analytic derivatives), its own parameters and the
   one-parameter isotropic compartments' parameter jointly, the parameters continuously
   between grid atoms (the atoms are interpolated by Catmull-Rom cubics on their grid,
   and evaluated in the polish as power series in ``(g . u)^2``), with the fractions.
   It stops when a step gains less than a twentieth of the noise variance. For one
   fascicle, or while two fascicles are closer than ``sweeps_separation_deg``, a second
   round searches the atoms again (a discrete atom replaces a continuous one only when it
   lowers the residual) and polishes again when anything changed. Dispersed fascicles
   (Watson bundles: a large atom table, and several nearby optima when two cross at a
   moderate angle) skip the discrete search (the polish starts from the middle atom,
   one round), and their two-fascicle fit is run again from a *split start* (the
   largest fascicle's direction turned both ways in the plane normal to the voxel's
   least attenuation) and from a *swap start* (the fascicles' parameters exchanged),
   keeping an eligible fit of lower residual.
4. **Fascicle count.** K = K_max ... 1 (the model's fascicle compartments) are fitted
   and the count of lowest Bayesian information criterion
   ``BIC = N log(RSS / N) + p log N`` is kept (N measurements, p = K (2 angles + 1
   fraction + the fascicle's own parameters) + the isotropic fractions and
   parameters); a count whose smallest fascicle has a signal fraction below
   ``min_fraction`` (default 0.1) is not eligible. A smaller count is not polished where
   its grid fit could not win even with its residual divided by ``skip_factor`` against
   a larger eligible count whose fascicles are ``skip_separation_deg`` apart.
5. **Output.** Fascicles are ordered by fraction, largest first, and written into the
   model's fascicle compartments in order (``C1Stick_1_*`` is the largest fascicle);
   compartments beyond the voxel's count get fraction 0 and NaN direction and
   parameters. Fractions are the NNLS weights normalised to sum to one (their total
   scales the b=0 signal, as in the non-linear polish).

Everything runs per voxel inside compiled ``prange`` loops, so a voxel's result does not
depend on batching (chunked volume fits give the same maps as ``model.fit``).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.polynomial import legendre

from fingerprint.core.acquisition_scheme import AcquisitionScheme
from fingerprint.core.modeling_framework import MultiCompartmentModelProperties as Model
from fingerprint.core.modeling_framework import is_isotropic, model_from_spec, submodel_spec
from fingerprint.core.orientations import vectors_to_mu
from fingerprint.core.spherical_harmonics_model import hemisphere_grid
from fingerprint.errors import InputError
from fingerprint.fitting.directions import fascicle_directions
from fingerprint.fitting.estimator import VoxelEstimates
from fingerprint.kernels import run_kernel
from fingerprint.kernels.rotational import (
    fit_joint_kernel,
    forward_directions_kernel,
    legendre_to_power,
    rotated_signals,
)

logger = logging.getLogger(__name__)

#: One fit of every voxel (:func:`~fingerprint.kernels.rotational.fit_joint_kernel`):
#: grid coordinates, isotropic coordinates, directions, weights, residual sums of squares.
_Fit = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]

__all__ = ["FascicleLayout", "MultiFascicleFitter", "MultiFascicleSettings",
           "fascicle_layout", "fascicle_tables", "is_multifascicle"]

#: Where the start directions come from (:class:`MultiFascicleSettings`).
START_METHODS = ("matching", "csd")
#: Hemisphere directions the greedy direction search chooses from.
GRID_DIRECTIONS = 300
#: Orientations the single-fascicle atoms are simulated at to fit their Legendre series.
FIT_ORIENTATIONS = 31
#: Candidate Legendre orders (the smallest one fitting every atom within tolerance).
_ORDERS = (12, 16, 20, 24, 28)
_COEF_TOL = 2e-3
#: Grid points per dimension of the fascicle atoms (1, 2, 3 free parameters).
_FASCICLE_POINTS = {0: 1, 1: 60, 2: 21, 3: 9}
#: Orientation dispersion gets this many times the points of the other axes.
_ODI_DENSER = 1.5
#: Distributed models whose fascicle is axially symmetric (Bingham's is not).
_AXIAL = ("SD1WatsonDistributed",)
#: Grid points per dimension of the isotropic atoms.
_ISO_POINTS = {0: 1, 1: 30, 2: 8}


@dataclass(frozen=True)
class MultiFascicleSettings:
    """Settings of the multi-fascicle fit.

    min_fraction: smallest signal fraction of a fascicle for its count to be eligible.
    sweeps: rounds of atom search and joint polish (with two or more fascicles, the
        rounds after the first run only while two fascicles are closer than
        ``sweeps_separation_deg`` degrees: farther apart one round finds the optimum).
        None: 2 where the fits start with the atom search (``atom_search``), else 1
        (a later round searches the whole table, which for dispersed fascicles costs
        more than it gains).
    single_extra_sweeps: extra rounds of the one-fascicle fit.
    first_passes: passes of the first discrete search over the fascicles' atoms.
    polish_iterations: Levenberg-Marquardt steps of each polish (0: no polish, the
        directions stay on the search grid and the parameters on the atom grid).
    min_separation_deg: smallest angle between two fascicles' start directions (degrees).
    start: where the start directions come from: ``'matching'`` (the model's own greedy
        multi-direction matching, default) or ``'csd'`` (the FOD peaks of
        :func:`fingerprint.fitting.directions.fascicle_directions`, completed by the
        greedy matching where the FOD has fewer peaks than the model has fascicles).
    skip_factor: counts are fitted from the largest down; a smaller count is not
        polished where its discrete (grid) fit could not win the information criterion
        even if the polish divided its residual sum of squares by ``skip_factor``,
        against a larger eligible count whose fascicles are at least
        ``skip_separation_deg`` apart (two fascicles that far apart are not one
        fascicle split in two). 0 polishes every count.
    skip_separation_deg: see ``skip_factor`` (degrees).
    atom_search: whether each fit starts with a discrete search over the fascicle atoms
        (True) or from the middle atom straight into the polish (False: for a large
        table, such as the 651 (ODI, icvf) atoms of a NODDI bundle, the search costs
        more than the polish and does not make it end better; every count is then
        polished, ``skip_factor`` needing the discrete fit). None: search for fascicles
        without dispersion (a stick), not for dispersed ones.
    split_start: whether the two-fascicle fit is also run from a *split start* -- the
        largest fascicle's direction turned by +-``split_angle_deg`` in the plane of
        the voxel's least attenuation -- keeping that fit where it is eligible and the
        first is not, or where both are eligible and its residual is lower. Two
        dispersed fascicles crossing at a moderate angle are often fitted as one
        dispersed fascicle between them plus a small one; the split start finds the
        pair. None: on for dispersed fascicles, off for sticks (their greedy start
        directions already resolve 30-90 degree crossings).
    split_angle_deg: half the angle between the split start's two directions
        (degrees).
    swap_start: whether the two-fascicle fit is run once more from its own directions
        with the two fascicles' parameters swapped (kept under the same rule as the
        split start): two dispersed fascicles at a moderate angle have two nearby optima
        that differ in which of them is the more dispersed, and the polish stays in the
        one it starts in. Only where the two fascicles are closer than
        ``swap_separation_deg`` (degrees; farther apart the swap did not lower the
        residual on the benchmark phantoms). None: as ``split_start``.
    penalty: information-criterion cost of one parameter in the fascicle-count choice
        (``N log(RSS / N) + p * penalty``): None is ``log N`` (BIC, default); 2 is AIC.
        A smaller penalty finds more crossings and splits more single fascicles
        (docs/crossing.md gives the trade-off measured for both named models).
    """

    min_fraction: float = 0.1
    single_extra_sweeps: int = 1
    sweeps: int | None = None
    sweeps_separation_deg: float = 55.0
    first_passes: int = 1
    polish_iterations: int = 10
    min_separation_deg: float = 15.0
    start: str = "matching"
    atom_search: bool | None = None
    split_start: bool | None = None
    split_angle_deg: float = 30.0
    swap_start: bool | None = None
    swap_separation_deg: float = 75.0
    skip_factor: float = 2.0
    skip_separation_deg: float = 30.0
    penalty: float | None = None

    def __post_init__(self) -> None:
        if self.penalty is not None and not (math.isfinite(self.penalty)
                                             and self.penalty >= 0):
            raise InputError(f"penalty must be a finite number >= 0 or None, got "
                             f"{self.penalty!r}")
        if not 0 < self.split_angle_deg < 90:
            raise InputError(f"split_angle_deg must be between 0 and 90 degrees, got "
                             f"{self.split_angle_deg!r}")
        if self.start not in START_METHODS:
            raise InputError(f"start must be one of {', '.join(START_METHODS)}, got "
                             f"{self.start!r}")


@dataclass(frozen=True)
class FascicleLayout:
    """How a model splits into fascicles and isotropic compartments.

    fascicles: top-level compartment index of each fascicle compartment.
    isotropic: top-level compartment indices of the isotropic compartments.
    orientation: the orientation parameter of each fascicle compartment.
    micro: each fascicle compartment's own free parameters (same order for every one).
    iso_params: each isotropic compartment's free parameters.
    dispersed: whether the fascicle compartment is an orientation distribution (a
        Watson-dispersed bundle) rather than one oriented compartment.
    """

    fascicles: tuple[int, ...]
    isotropic: tuple[int, ...]
    orientation: tuple[str, ...]
    micro: tuple[tuple[str, ...], ...]
    iso_params: tuple[tuple[str, ...], ...]
    dispersed: bool = False

    @property
    def max_fascicles(self) -> int:
        """Fascicle compartments of the model (the largest count fitted)."""
        return len(self.fascicles)


def fascicle_layout(model: Model) -> FascicleLayout | None:
    """The fascicle split of ``model``, or None when it is not a multi-fascicle model:
    two or more copies of one compartment with one orientation plus isotropic
    compartments, every top-level fraction free and no link between compartments."""
    if getattr(model, "is_spherical_mean", False) or getattr(model, "N_models", 1) < 2:
        return None
    state = getattr(model, "_state", None)
    if state is None:
        return None
    free = set(model.parameter_names)
    pv = list(model.partial_volume_names)
    if not pv or any(n not in free for n in pv):
        return None
    owner = {p.name: p.owner for p in state.params}
    for link in model.parameter_links:
        names = (link.target,) + tuple(link.sources)
        owners = {owner.get(n) for n in names}
        if any(n in pv for n in names) or len(owners) > 1:
            return None
    fasc: list[int] = []
    iso: list[int] = []
    orientation: list[str] = []
    micro: list[tuple[str, ...]] = []
    iso_params: list[tuple[str, ...]] = []
    types = dict(model.parameter_types)
    cards = dict(model.parameter_cardinality)
    for k, sub in enumerate(model.models):
        own = [p.name for p in state.params if p.owner == k and p.name in free]
        orient = [n for n in own if types.get(n) == "orientation"]
        others = tuple(n for n in own if types.get(n) != "orientation")
        if any(cards[n] != 1 for n in others):
            return None
        distributed = getattr(sub, "_is_distributed_model", False)
        if len(orient) == 1 and (not distributed or type(sub).__name__ in _AXIAL):
            fasc.append(k)
            orientation.append(orient[0])
            micro.append(others)
        elif not orient and not distributed and is_isotropic(sub):
            iso.append(k)
            iso_params.append(others)
        else:
            return None
    if len(fasc) < 2 or len(micro[0]) > 3 or any(len(p) > 2 for p in iso_params):
        return None
    spec0 = _local_spec(model, fasc[0], micro[0])
    if any(_local_spec(model, k, m) != spec0 for k, m in zip(fasc[1:], micro[1:],
                                                              strict=True)):
        return None
    return FascicleLayout(tuple(fasc), tuple(iso), tuple(orientation), tuple(micro),
                          tuple(iso_params),
                          bool(getattr(model.models[fasc[0]], "_is_distributed_model", False)))


def _local_spec(model: Model, k: int, micro: tuple[str, ...]) -> tuple[object, ...]:
    """What must agree between fascicle compartments to share one atom table."""
    state = model._state
    local = {p.name: p.local for p in state.params if p.owner == k}
    ranges = tuple((local[n], tuple(np.ravel(model.parameter_ranges[n]).tolist()))
                   for n in micro)
    fixed = tuple(sorted((local.get(lk.target, lk.target), repr(lk.value))
                         for lk in model.parameter_links
                         if lk.kind == "fixed" and lk.target in local))
    return (repr(submodel_spec(model.models[k])), ranges, fixed)


def is_multifascicle(model: Model) -> bool:
    """Whether ``model`` is fitted by multi-fascicle fingerprinting (see
    :func:`fascicle_layout`)."""
    try:
        return fascicle_layout(model) is not None
    except (AttributeError, TypeError, KeyError):
        return False


# --------------------------------------------------------------------------- tables
@dataclass(frozen=True)
class FascicleTables:
    """Atoms of one model on one scheme.

    coef: (A, S, E) even Legendre coefficients of the fascicle atoms per shell; mono
        the same atoms as coefficients of (g . u)^(2j) (the polish evaluates them by
        Horner's rule).
    micro_values: (A, M) the fascicle atoms' own parameters (SI), on the grid of
        ``micro_axes`` (M axes, C order: atom index = sum_d i_d strides[d]).
    iso: (I, Amax, N) isotropic atom signals; iso_sizes (I,); iso_values (I, Amax, Q);
        iso_cont (I,) 1 where the compartment has one free parameter (polished
        continuously between its atoms), else 0.
    shell: (N,) shell of each measurement; grad (N, 3) unit gradients (0 at b=0).
    grid: (D, 3) hemisphere directions; templates (D, N) the middle fascicle atom
        rotated to them; gram (D, D); iso_mean (N,) a typical isotropic signal.
    """

    coef: np.ndarray
    mono: np.ndarray
    micro_values: np.ndarray
    micro_axes: tuple[np.ndarray, ...]
    axes_n: np.ndarray
    strides: np.ndarray
    iso: np.ndarray
    iso_sizes: np.ndarray
    iso_values: np.ndarray
    iso_cont: np.ndarray
    shell: np.ndarray
    grad: np.ndarray
    grid: np.ndarray
    templates: np.ndarray
    gram: np.ndarray
    iso_mean: np.ndarray
    max_coef_error: float
    quad: np.ndarray


def _axis_grid(model: Model, name: str, points: int) -> np.ndarray:
    """Grid of one parameter over its range: geometric for an orientation dispersion
    index (the signal changes fastest at low dispersion; the atoms are interpolated
    linearly between grid points), else uniform."""
    rng = np.asarray(model.parameter_ranges[name], dtype=float).ravel()
    scale = float(np.ravel(model.parameter_scales[name])[0])
    lo, hi = rng[0] * scale, rng[1] * scale
    if points == 1:
        return np.array([0.5 * (lo + hi)])
    if name.endswith("_odi") and lo > 0:
        return np.geomspace(lo, hi, int(points * _ODI_DENSER))
    return np.linspace(lo, hi, points)


def _product(axes: list[np.ndarray]) -> np.ndarray:
    if not axes:
        return np.zeros((1, 0))
    mesh = np.meshgrid(*axes, indexing="ij")
    return np.stack([m.ravel() for m in mesh], axis=1)


def _base_vector(model: Model) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for name, card in model.parameter_cardinality.items():
        rng = np.atleast_2d(np.asarray(model.parameter_ranges[name], dtype=float))
        scale = np.broadcast_to(np.asarray(model.parameter_scales[name], dtype=float),
                                (card,))
        mid = 0.5 * (rng[:card, 0] + rng[:card, 1]) * scale
        out[name] = mid if card > 1 else mid[:1]
    return out


def _vectors(model: Model, base: Mapping[str, np.ndarray], rows: int,
             values: Mapping[str, np.ndarray]) -> np.ndarray:
    parts = []
    for name, card in model.parameter_cardinality.items():
        if name in values:
            v = np.asarray(values[name], dtype=float).reshape(rows, card)
        else:
            v = np.broadcast_to(np.asarray(base[name], dtype=float).reshape(1, card),
                                (rows, card))
        parts.append(v)
    return np.concatenate(parts, axis=1)


def _legendre_even(t: np.ndarray, n_even: int) -> np.ndarray:
    out = np.empty(t.shape + (n_even,))
    for j in range(n_even):
        c = np.zeros(2 * j + 1)
        c[-1] = 1.0
        out[..., j] = legendre.legval(t, c)
    return out


def fascicle_tables(model: Model, scheme: AcquisitionScheme, layout: FascicleLayout
                    ) -> FascicleTables:
    """Simulate the fascicle and isotropic atoms of ``model`` on ``scheme``."""
    t0 = time.perf_counter()
    base = _base_vector(model)
    k0 = layout.fascicles[0]
    micro = layout.micro[0]
    points = _FASCICLE_POINTS[len(micro)]
    micro_axes = tuple(_axis_grid(model, n, points) for n in micro)
    micro_values = _product(list(micro_axes))
    axes_n = np.asarray([a.size for a in micro_axes], dtype=np.int64)
    strides = np.asarray([int(np.prod(axes_n[d + 1:])) for d in range(axes_n.size)],
                         dtype=np.int64)
    n_atoms = micro_values.shape[0]
    grad = np.asarray(scheme.gradient_directions, dtype=float)
    b0 = np.asarray(scheme.b0_mask, dtype=bool)
    grad = np.where(b0[:, None], 0.0, grad)
    norms = np.linalg.norm(grad, axis=1)
    grad = np.where(norms[:, None] > 0, grad / np.maximum(norms, 1e-300)[:, None], 0.0)
    shell = np.asarray(scheme.shell_indices, dtype=np.int64)
    n_shells = int(shell.max()) + 1
    n_meas = grad.shape[0]
    # each atom at FIT_ORIENTATIONS axes: the zonal function sampled at many cosines
    axes = hemisphere_grid(FIT_ORIENTATIONS)
    mu = vectors_to_mu(axes)
    rows = n_atoms * axes.shape[0]
    values = {n: np.repeat(micro_values[:, i], axes.shape[0]) for i, n in enumerate(micro)}
    values[layout.orientation[0]] = np.tile(mu, (n_atoms, 1))
    vec = _vectors(model, base, rows, values)
    sig = model.simulate_compartment_signals(scheme, vec, which=np.full(rows, k0))
    sig = sig.reshape(n_atoms, axes.shape[0], n_meas)
    cosines = np.abs(axes @ grad.T)  # (J, N)
    coef = None
    err = np.inf
    for order in _ORDERS:
        n_even = order // 2 + 1
        c = np.zeros((n_atoms, n_shells, n_even))
        worst = 0.0
        for s in range(n_shells):
            cols = np.flatnonzero(shell == s)
            t = cosines[:, cols].ravel()
            design = _legendre_even(t, n_even)
            target = sig[:, :, cols].reshape(n_atoms, -1).T
            sol, *_ = np.linalg.lstsq(design, target, rcond=None)
            c[:, s] = sol.T
            worst = max(worst, float(np.max(np.abs(design @ sol - target), initial=0.0)))
        coef, err = c, worst
        if worst < _COEF_TOL:
            break
    assert coef is not None
    if err >= _COEF_TOL:
        logger.warning("multi-fascicle atoms: Legendre series of order %d fit the "
                       "simulated signals within %.2g only", _ORDERS[-1], err)
    # isotropic atoms
    iso_sig: list[np.ndarray] = []
    iso_vals: list[np.ndarray] = []
    for k, names in zip(layout.isotropic, layout.iso_params, strict=True):
        grid_vals = _product([_axis_grid(model, n, _ISO_POINTS[len(names)]) for n in names])
        r = grid_vals.shape[0]
        v = _vectors(model, base, r, {n: grid_vals[:, i] for i, n in enumerate(names)})
        iso_sig.append(model.simulate_compartment_signals(scheme, v, which=np.full(r, k)))
        iso_vals.append(grid_vals)
    n_iso = len(iso_sig)
    amax = max([s.shape[0] for s in iso_sig], default=1)
    qmax = max([v.shape[1] for v in iso_vals], default=0)
    iso = np.zeros((n_iso, amax, n_meas))
    iso_values = np.full((n_iso, amax, qmax), np.nan)
    sizes = np.zeros(n_iso, dtype=np.int64)
    iso_cont = np.asarray([int(len(names) == 1) for names in layout.iso_params],
                          dtype=np.int64)
    for j, (signals, v) in enumerate(zip(iso_sig, iso_vals, strict=True)):
        iso[j, :signals.shape[0]] = signals
        iso_values[j, :v.shape[0], :v.shape[1]] = v
        sizes[j] = signals.shape[0]
    iso_mean = iso[:, :].mean(axis=(0, 1)) if n_iso else np.zeros(n_meas)
    grid = hemisphere_grid(GRID_DIRECTIONS)
    templates = rotated_signals(np.ascontiguousarray(coef[n_atoms // 2]), shell, grad, grid)
    gram = templates @ templates.T
    logger.info("multi-fascicle atoms: %d fascicle atoms (Legendre order %d, fit error "
                "%.1e), %s isotropic atoms, %.2f s", n_atoms, 2 * (coef.shape[2] - 1), err,
                "+".join(str(int(s)) for s in sizes) or "no", time.perf_counter() - t0)
    return FascicleTables(np.ascontiguousarray(coef), legendre_to_power(coef), micro_values,
                          micro_axes, axes_n, strides, iso, sizes, iso_values, iso_cont,
                          shell, np.ascontiguousarray(grad), grid, templates, gram,
                          iso_mean, err, _quadratic_fit(grad, shell, n_shells))


def _quadratic_fit(grad: np.ndarray, shell: np.ndarray, n_shells: int) -> np.ndarray:
    """(6, N): the least-squares map from a signal to A of ``S(g) = g^T A g +
    c_shell`` (one constant per shell; b=0 measurements not used; A is defined up to a
    multiple of the identity, which does not move its eigenvectors)."""
    dw = np.linalg.norm(grad, axis=1) > 0
    g = grad[dw]
    design = np.zeros((g.shape[0], 6 + n_shells))
    design[:, 0], design[:, 1], design[:, 2] = g[:, 0] ** 2, g[:, 1] ** 2, g[:, 2] ** 2
    design[:, 3], design[:, 4] = 2 * g[:, 0] * g[:, 1], 2 * g[:, 0] * g[:, 2]
    design[:, 5] = 2 * g[:, 1] * g[:, 2]
    design[np.arange(g.shape[0]), 6 + shell[dw]] = 1.0
    out = np.zeros((6, grad.shape[0]))
    out[:, dw] = np.linalg.pinv(design)[:6]
    return np.ascontiguousarray(out)


def _split_directions(y: np.ndarray, quad: np.ndarray, u: np.ndarray, half_angle: float
                      ) -> np.ndarray:
    """(n, 2, 3): ``u`` (n, 3) turned by +-``half_angle`` (radians) in the plane normal
    to the direction of least attenuation of ``y`` (n, N) (the largest eigenvector of
    its quadratic fit, see :func:`_quadratic_fit`): where two fascicles crossing at a
    moderate angle lie, when one dispersed fascicle was fitted between them."""
    c = y @ quad.T
    a = np.empty((y.shape[0], 3, 3))
    a[:, 0, 0], a[:, 1, 1], a[:, 2, 2] = c[:, 0], c[:, 1], c[:, 2]
    a[:, 0, 1] = a[:, 1, 0] = c[:, 3]
    a[:, 0, 2] = a[:, 2, 0] = c[:, 4]
    a[:, 1, 2] = a[:, 2, 1] = c[:, 5]
    normal = np.linalg.eigh(a)[1][:, :, 2]
    inplane = u - np.sum(u * normal, axis=1, keepdims=True) * normal
    norm = np.linalg.norm(inplane, axis=1, keepdims=True)
    inplane = np.where(norm > 1e-6, inplane / np.maximum(norm, 1e-300), u)
    side = np.cross(normal, inplane)
    ca, sa = math.cos(half_angle), math.sin(half_angle)
    return np.ascontiguousarray(np.stack([inplane * ca + side * sa,
                                          inplane * ca - side * sa], axis=1))


_TABLES: OrderedDict[tuple[str, str], FascicleTables] = OrderedDict()
_TABLES_LOCK = threading.Lock()
_MAX_TABLES = 4


def _cached_tables(model: Model, scheme: AcquisitionScheme, layout: FascicleLayout
                   ) -> FascicleTables:
    key = (str(model.spec_hash), str(scheme.hash))
    with _TABLES_LOCK:
        found = _TABLES.get(key)
        if found is not None:
            _TABLES.move_to_end(key)
            return found
    tables = fascicle_tables(model, scheme, layout)
    with _TABLES_LOCK:
        _TABLES[key] = tables
        while len(_TABLES) > _MAX_TABLES:
            _TABLES.popitem(last=False)
    return tables


# --------------------------------------------------------------------------- fitter
class MultiFascicleFitter:
    """The :class:`~fingerprint.fitting.registry.VoxelFitter` of multi-fascicle models
    (see the module docstring). Pickles to the model spec, the scheme and its settings;
    a worker process rebuilds the atoms once."""

    def __init__(self, model: Model, scheme: AcquisitionScheme,
                 settings: MultiFascicleSettings | None = None,
                 n_jobs: int | None = None) -> None:
        layout = fascicle_layout(model)
        if layout is None:
            raise InputError(f"model {type(model).__name__} ({', '.join(model.model_names)})"
                             f" is not a multi-fascicle model: it needs two or more copies "
                             f"of one single-orientation compartment plus isotropic "
                             f"compartments, free fractions and no link between "
                             f"compartments")
        self.model = model
        self.scheme = scheme
        self.layout = layout
        self.settings = settings or MultiFascicleSettings()
        self.n_jobs = n_jobs
        self.tables = _cached_tables(model, scheme, layout)

    def __reduce__(self) -> tuple[Callable[..., MultiFascicleFitter], tuple[object, ...]]:
        return _rebuild, (self.model.to_spec(), self.scheme, self.settings, self.n_jobs)

    def fit_voxels(self, data: np.ndarray,
                   x0: np.ndarray | Mapping[str, np.ndarray] | None = None
                   ) -> VoxelEstimates:
        """Fit ``data`` (n, N) raw signals (every voxel usable); ``x0`` is not used."""
        t0 = time.perf_counter()
        arr = np.ascontiguousarray(data, dtype=np.float64)
        n, n_meas = arr.shape
        b0 = np.asarray(self.scheme.b0_mask, dtype=bool)
        s0 = arr[:, b0].mean(axis=1) if b0.any() else np.ones(n)
        y = np.ascontiguousarray(arr / s0[:, None])
        tb = self.tables
        lay = self.layout
        kmax = lay.max_fascicles
        st = self.settings
        min_sep = math.cos(math.radians(st.min_separation_deg))
        idx = run_kernel(forward_directions_kernel, float(n) * tb.grid.shape[0] * kmax,
                         y, tb.templates, tb.gram, tb.grid, tb.iso_mean, kmax, min_sep)
        u0 = np.ascontiguousarray(tb.grid[idx])  # (n, kmax, 3)
        if st.start == "csd":
            peaks, _, found = fascicle_directions(self.scheme, arr, max_fascicles=kmax)
            u0 = _csd_starts(np.asarray(peaks), np.asarray(found), u0)
        # counts from the largest down: a smaller count's discrete fit is polished only
        # when the polish could still make it win (see MultiFascicleSettings.skip_factor)
        n_micro = len(lay.micro[0])
        n_iso_free = sum(1 + len(p) for p in lay.iso_params)
        results: list[tuple[np.ndarray, ...]] = [()] * kmax
        bic = np.full((n, kmax), np.inf)
        best_clear = np.full(n, np.inf)  # best BIC of a larger, well-separated count
        penalty = math.log(n_meas) if st.penalty is None else float(st.penalty)
        search = not lay.dispersed if st.atom_search is None else st.atom_search
        split = lay.dispersed if st.split_start is None else st.split_start
        swap = lay.dispersed if st.swap_start is None else st.swap_start
        sweeps = (2 if search else 1) if st.sweeps is None else st.sweeps
        for k in range(kmax, 0, -1):
            p = k * (3 + n_micro) + n_iso_free
            gate = np.full(n, np.inf)
            if st.skip_factor > 0 and search:
                with np.errstate(over="ignore", invalid="ignore"):
                    gate = np.where(np.isfinite(best_clear), n_meas * st.skip_factor * np.exp(
                        (best_clear - p * penalty) / n_meas), np.inf)
            res = run_kernel(fit_joint_kernel, float(n) * tb.coef.shape[0] * k * 50,
                             y, u0, k, tb.coef, tb.mono, tb.axes_n, tb.strides, tb.iso,
                             tb.iso_sizes, tb.iso_cont, tb.shell, int(tb.shell.max()) + 1,
                             tb.grad, sweeps + (st.single_extra_sweeps if k == 1 else 0),
                             st.first_passes, st.polish_iterations * (2 if k == 1 else 1),
                             math.cos(math.radians(st.sweeps_separation_deg)),
                             np.ascontiguousarray(gate), np.full(n, not search),
                             self._middle(n, k))
            if k == 2 and split:
                res = self._retry(y, res, gate, search, sweeps, "split")
            if k == 2 and swap:
                res = self._retry(y, res, gate, search, sweeps, "swap")
            results[k - 1] = res
            _, _, dirs, w, rss = res
            total = w.sum(axis=1)
            frac = w[:, :k] / np.where(total > 0, total, 1.0)[:, None]
            eligible = (frac.min(axis=1) >= st.min_fraction) | (k == 1)
            with np.errstate(divide="ignore", invalid="ignore"):
                b = n_meas * np.log(np.maximum(rss, 1e-300) / n_meas) + p * penalty
            bic[:, k - 1] = np.where(eligible & np.isfinite(b), b, np.inf)
            if k > 1:
                cos = np.abs(np.einsum("vid,vjd->vij", dirs[:, :k], dirs[:, :k]))
                cos[:, np.arange(k), np.arange(k)] = 0.0
                clear = cos.max(axis=(1, 2)) <= math.cos(math.radians(st.skip_separation_deg))
                best_clear = np.minimum(best_clear, np.where(clear, bic[:, k - 1], np.inf))
        count = np.argmin(bic, axis=1) + 1
        ve = self._estimates(y, s0, count, results)
        logger.info("multi-fascicle fit of %d voxels (up to %d fascicles): %.3g s", n, kmax,
                    time.perf_counter() - t0)
        return ve

    def _middle(self, n: int, k: int) -> np.ndarray:
        """Grid coordinates (n, k, M) of the middle fascicle atom."""
        tb = self.tables
        middle = ((tb.axes_n - 1) // 2).astype(float)
        return np.ascontiguousarray(np.broadcast_to(middle, (n, k, middle.size)))

    def _retry(self, y: np.ndarray, res: _Fit, gate: np.ndarray, search: bool, sweeps: int,
               how: str) -> _Fit:
        """The two-fascicle fit ``res`` again from the split start (``how='split'``) or
        from its own directions with the fascicles' parameters swapped (``'swap'``),
        see :class:`MultiFascicleSettings`; a voxel keeps the new fit where it is
        eligible (both fractions >= ``min_fraction``) and the first is not, or where
        both are eligible and its residual sum of squares is lower."""
        st, tb = self.settings, self.tables
        zs, iso, dirs, w, rss = (np.array(res[0]), np.array(res[1]), np.array(res[2]),
                                 np.array(res[3]), np.array(res[4]))
        n = y.shape[0]
        total = w.sum(axis=1)
        frac = w[:, :2] / np.where(total > 0, total, 1.0)[:, None]
        if how == "split":
            rows = np.arange(n)
            main = dirs[rows, np.argmax(frac, axis=1)]
            starts = _split_directions(y, tb.quad, main, math.radians(st.split_angle_deg))
            z0, warm = self._middle(n, 2), np.full(n, not search)
        else:
            cos = np.abs(np.sum(dirs[:, 0] * dirs[:, 1], axis=1))
            rows = np.flatnonzero(cos > math.cos(math.radians(st.swap_separation_deg)))
            starts = np.ascontiguousarray(dirs[rows])
            z0 = np.ascontiguousarray(zs[rows, ::-1])
            warm = np.ones(rows.size, dtype=np.bool_)
        if rows.size == 0:
            return zs, iso, dirs, w, rss
        nz, niso, ndirs, nw, nrss = run_kernel(
            fit_joint_kernel, float(rows.size) * tb.coef.shape[0] * 2 * 50,
            np.ascontiguousarray(y[rows]), starts, 2, tb.coef,
            tb.mono, tb.axes_n, tb.strides, tb.iso, tb.iso_sizes, tb.iso_cont, tb.shell,
            int(tb.shell.max()) + 1, tb.grad, sweeps, st.first_passes,
            st.polish_iterations, math.cos(math.radians(st.sweeps_separation_deg)),
            np.ascontiguousarray(gate[rows]), warm, z0)
        ntotal = nw.sum(axis=1)
        nfrac = nw[:, :2] / np.where(ntotal > 0, ntotal, 1.0)[:, None]
        old_ok = frac[rows].min(axis=1) >= st.min_fraction
        new_ok = nfrac.min(axis=1) >= st.min_fraction
        take = np.isfinite(nrss) & new_ok & (~old_ok | ~(rss[rows] <= nrss))
        t = rows[take]
        zs[t], iso[t], dirs[t], w[t], rss[t] = (
            nz[take], niso[take], ndirs[take], nw[take], nrss[take])
        return zs, iso, dirs, w, rss

    def _estimates(self, y: np.ndarray, s0: np.ndarray, count: np.ndarray,
                   results: Sequence[tuple[np.ndarray, ...]]) -> VoxelEstimates:
        model, lay, tb = self.model, self.layout, self.tables
        n, n_meas = y.shape
        kmax = lay.max_fascicles
        n_iso = len(lay.isotropic)
        names = list(model.parameter_cardinality)
        slices: dict[str, slice] = {}
        pos = 0
        for name, card in model.parameter_cardinality.items():
            slices[name] = slice(pos, pos + card)
            pos += card
        params = np.full((n, pos), np.nan)
        rss_out = np.zeros(n)
        weights_total = np.zeros(n)
        pv_names = list(model.partial_volume_names)
        for k in range(1, kmax + 1):
            rows = np.flatnonzero(count == k)
            if rows.size == 0:
                continue
            zs, iso_atoms, dirs, w, rss = (np.asarray(a)[rows] for a in results[k - 1])
            rss_out[rows] = rss
            total = w.sum(axis=1)
            weights_total[rows] = total
            frac = w / np.where(total > 0, total, 1.0)[:, None]
            order = np.argsort(-frac[:, :k], axis=1, kind="stable")
            for slot in range(kmax):
                comp = lay.fascicles[slot]
                pv = slices[pv_names[comp]]
                if slot >= k:
                    params[rows, pv] = 0.0
                    continue
                src = order[:, slot]
                f = frac[np.arange(rows.size), src]
                params[rows, pv] = f[:, None]
                vec = dirs[np.arange(rows.size), src]
                mu = vectors_to_mu(vec, normalise=True)
                params[rows, slices[lay.orientation[slot]]] = mu
                zk = zs[np.arange(rows.size), src]  # continuous grid coordinates
                for i, pname in enumerate(lay.micro[slot]):
                    axis = tb.micro_axes[i]
                    params[rows, slices[pname]] = np.interp(
                        zk[:, i], np.arange(axis.size), axis)[:, None]
            for j in range(n_iso):
                comp = lay.isotropic[j]
                params[rows, slices[pv_names[comp]]] = frac[:, k + j:k + j + 1]
                a = iso_atoms[:, j]
                size = int(tb.iso_sizes[j])
                for i, pname in enumerate(lay.iso_params[j]):
                    if tb.iso_cont[j]:  # continuous grid coordinate
                        value = np.interp(a, np.arange(size), tb.iso_values[j, :size, i])
                    else:
                        value = tb.iso_values[j, np.rint(a).astype(np.int64), i]
                    params[rows, slices[pname]] = value[:, None]
        valid = np.isfinite(rss_out) & (weights_total > 0)
        ss_tot = ((y - y.mean(axis=1, keepdims=True)) ** 2).sum(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            r2 = 1.0 - rss_out / ss_tot
            dof = max(n_meas - (kmax * (3 + len(lay.micro[0])) + 2 * n_iso), 1)
            sigma = np.sqrt(rss_out / dof) * s0
        unc = np.full_like(params, np.nan)
        params[~valid] = np.nan
        del names
        return VoxelEstimates(params, unc, s0 * np.where(valid, weights_total, np.nan),
                              np.where(valid, r2, np.nan),
                              np.where(valid, rss_out / n_meas, np.nan), valid,
                              np.where(valid, sigma, np.nan))


def _csd_starts(peaks: np.ndarray, found: np.ndarray, greedy: np.ndarray) -> np.ndarray:
    """Start directions (n, K, 3): a voxel's FOD peaks, the greedy directions farthest
    from them after its last peak."""
    out = greedy.copy()
    n, kmax, _ = greedy.shape
    for v in range(n):
        k = int(min(found[v], kmax))
        if k == 0:
            continue
        out[v, :k] = peaks[v, :k]
        if k < kmax:  # the greedy directions least aligned with the peaks
            cos = np.abs(greedy[v] @ peaks[v, :k].T).max(axis=1)
            out[v, k:] = greedy[v, np.argsort(cos, kind="stable")[:kmax - k]]
    return np.ascontiguousarray(out)


def _rebuild(spec: Mapping[str, object], scheme: AcquisitionScheme,
             settings: MultiFascicleSettings, n_jobs: int | None) -> MultiFascicleFitter:
    return MultiFascicleFitter(model_from_spec(spec), scheme, settings, n_jobs)
