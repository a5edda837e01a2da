"""Simulated NODDI phantoms (for the demo, tests and benchmarks).

Signals come from our own forward model (``fingerprint.models.get_model('noddi')``) with
Rician noise. Without a scheme, a small multi-shell scheme built into the package is used
(:func:`default_scheme`: 6 b=0, 30 directions at b=1000 s/mm² and 60 at b=2000 s/mm²,
directions on Fibonacci spirals), so the phantom needs no data files.

>>> from fingerprint.phantoms import noddi_phantom, write_phantom
>>> phantom = noddi_phantom(shape=(8, 8, 4), seed=0, snr=30)
>>> paths = write_phantom(phantom, "phantom", prefix="sub-01")
>>> paths["dwi"], paths["bval"], paths["bvec"], paths["mask"]
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fingerprint.core.acquisition_scheme import AcquisitionScheme, acquisition_scheme_from_bvalues
from fingerprint.core.orientations import angular_error_deg, vectors_to_mu
from fingerprint.dictionary.sampling import ParameterSpace
from fingerprint.errors import InputError
from fingerprint.fitting.multifascicle import fascicle_layout
from fingerprint.io.gradients import write_bvals_bvecs
from fingerprint.io.nifti import atomic_write_nifti, bids_map_name, mu_to_vectors
from fingerprint.models import get_model, get_recipe, map_labels
from fingerprint.signal_models.tensor_models import TENSOR_ELEMENTS

if TYPE_CHECKING:
    from fingerprint.core.modeling_framework import MultiCompartmentModelProperties

logger = logging.getLogger(__name__)

__all__ = [
    "NODDI_LABELS",
    "add_rician_noise",
    "default_scheme",
    "fibonacci_hemisphere",
    "model_phantom",
    "model_truth",
    "model_truth_ranges",
    "noddi_parameter_vectors",
    "noddi_phantom",
    "random_orientations",
    "write_phantom",
]

#: Ground-truth labels of a NODDI phantom (the NODDI recipe's map labels).
NODDI_LABELS = ("icvf", "odi", "isovf", "direction")

_GOLDEN_ANGLE = np.pi * (3.0 - np.sqrt(5.0))


def fibonacci_hemisphere(n: int, twist: float = 0.0) -> np.ndarray:
    """``n`` nearly uniform unit vectors on the upper hemisphere (Fibonacci spiral; ``twist``
    rotates the spiral about z, in rad). Deterministic."""
    if n < 1:
        raise InputError(f"number of directions must be positive, got {n}")
    i = np.arange(n, dtype=np.float64)
    z = (i + 0.5) / n
    r = np.sqrt(np.clip(1.0 - z * z, 0.0, None))
    phi = i * _GOLDEN_ANGLE + twist
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=1)


def default_scheme(*, n_b0: int = 6, shells: tuple[tuple[float, int], ...] = (
        (1000.0, 30), (2000.0, 60)), delta: float = 0.015, Delta: float = 0.035
        ) -> AcquisitionScheme:
    """The built-in multi-shell scheme (b-values in s/mm² in ``shells``; returned in SI).

    b=0 volumes are interleaved (one every ``len(dwis) // n_b0`` measurements), like on a
    scanner; pulse duration ``delta`` and separation ``Delta`` are in s.
    """
    bvals: list[float] = []
    dirs: list[np.ndarray] = []
    for k, (b, n) in enumerate(shells):
        d = fibonacci_hemisphere(int(n), twist=0.7 * k)
        bvals += [float(b)] * int(n)
        dirs.append(d)
    dwi_dirs = np.concatenate(dirs) if dirs else np.zeros((0, 3))
    dwi_b = np.asarray(bvals)
    # interleave the shells (round-robin by direction index) then the b0s
    order = np.argsort(np.concatenate([np.arange(n) / n for _, n in shells]), kind="stable")
    dwi_b, dwi_dirs = dwi_b[order], dwi_dirs[order]
    n_total = n_b0 + dwi_b.size
    b0_pos = set(np.linspace(0, n_total - 1, n_b0, endpoint=False).round().astype(int).tolist()) \
        if n_b0 else set()
    b_all = np.zeros(n_total)
    d_all = np.zeros((n_total, 3))
    j = 0
    for i in range(n_total):
        if i in b0_pos:
            continue
        b_all[i], d_all[i] = dwi_b[j], dwi_dirs[j]
        j += 1
    return acquisition_scheme_from_bvalues(b_all * 1e6, d_all, delta=delta, Delta=Delta)


def random_orientations(n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 2) angles (theta, phi) of orientations uniform on the sphere (theta in
    [0, pi/2] by antipodal symmetry)."""
    v = rng.standard_normal((n, 3))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    v[v[:, 2] < 0] *= -1
    theta = np.arccos(np.clip(v[:, 2], -1.0, 1.0))
    phi = np.arctan2(v[:, 1], v[:, 0])
    return np.stack([theta, phi], axis=1)


def noddi_parameter_vectors(model: MultiCompartmentModelProperties, *, icvf: np.ndarray,
                            odi: np.ndarray, isovf: np.ndarray, mu: np.ndarray) -> np.ndarray:
    """(n, P) parameter vectors of the NODDI recipe model from (n,) icvf, odi, isovf
    (dimensionless) and (n, 2) mu = (theta, phi) in rad."""
    labels = map_labels("noddi")
    icvf, odi, isovf = (np.asarray(a, dtype=np.float64).ravel() for a in (icvf, odi, isovf))
    mu = np.asarray(mu, dtype=np.float64).reshape(-1, 2)
    values: dict[str, np.ndarray] = {
        labels["icvf"]: icvf, labels["odi"]: odi, labels["isovf"]: isovf,
        labels["direction"]: mu,
    }
    for name in model.parameter_names:
        if name in values:
            continue
        if name.startswith("partial_volume_"):  # the bundle's fraction completes isovf
            values[name] = 1.0 - isovf
        else:
            raise InputError(f"cannot set NODDI parameter {name!r} of this model")
    return np.asarray(model.parameters_to_parameter_vector(**values), dtype=np.float64)


def crossing_directions(n: int, angle_deg: float | np.ndarray, rng: np.random.Generator
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Two (n, 3) unit-vector arrays: random first directions (uniform on the sphere) and
    second directions at ``angle_deg`` (degrees, scalar or (n,)) from them, in a random
    plane."""
    u1 = rng.standard_normal((n, 3))
    u1 /= np.linalg.norm(u1, axis=1, keepdims=True)
    a = np.cross(u1, rng.standard_normal((n, 3)))
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    ang = np.radians(np.broadcast_to(np.asarray(angle_deg, dtype=np.float64), (n,)))
    u2 = np.cos(ang)[:, None] * u1 + np.sin(ang)[:, None] * a
    return u1, u2


def crossing_parameter_vectors(model: MultiCompartmentModelProperties, *,
                               directions: list[np.ndarray], fractions: np.ndarray,
                               micro: list[dict[str, np.ndarray]],
                               iso: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """(n, P) parameter vectors of a multi-fascicle model (``ball_stick_stick``,
    ``noddi2``, ...): per fascicle compartment k, ``directions[k]`` (n, 3) unit vectors
    and ``micro[k]`` its own parameters by *local* name (e.g. ``{'lambda_par': ...}``
    in m²/s, or ``{'SD1Watson_1_odi': ..., 'partial_volume_0': ...}``);
    ``fractions`` (n, K) the top-level volume fractions in the model's compartment
    order; ``iso`` the isotropic compartments' free parameters by full name. A fascicle
    compartment given a zero fraction may have any direction."""
    layout = fascicle_layout(model)
    if layout is None:
        raise InputError("crossing phantoms need a multi-fascicle model")
    fr = np.asarray(fractions, dtype=np.float64)
    values: dict[str, np.ndarray] = dict(iso or {})
    for i, name in enumerate(model.partial_volume_names):
        values[name] = fr[:, i]
    state = model._state
    for slot, comp in enumerate(layout.fascicles):
        values[layout.orientation[slot]] = vectors_to_mu(directions[slot], normalise=True)
        local = {p.local: p.name for p in state.params if p.owner == comp}
        for key, value in micro[slot].items():
            if key not in local:
                raise InputError(f"fascicle {slot + 1} has no parameter {key!r} "
                                 f"(has {', '.join(local)})")
            values[local[key]] = np.asarray(value, dtype=np.float64)
    return np.asarray(model.parameters_to_parameter_vector(**values), dtype=np.float64)


def add_rician_noise(signal: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Rician noise of Gaussian standard deviation ``sigma`` (signal units) on each of the
    real and imaginary channels."""
    signal = np.asarray(signal, dtype=np.float64)
    if sigma <= 0:
        return signal.copy()
    real = signal + rng.normal(0.0, sigma, signal.shape)
    imag = rng.normal(0.0, sigma, signal.shape)
    return np.sqrt(real * real + imag * imag)


def _ramp(n: int, lo: float, hi: float) -> np.ndarray:
    return np.linspace(lo, hi, n) if n > 1 else np.array([(lo + hi) / 2])


def noddi_phantom(shape: tuple[int, ...] = (8, 8, 4), seed: int = 0, snr: float | None = 30,
                  scheme: AcquisitionScheme | None = None, *, s0: float = 1000.0,
                  voxel_size: float = 2.0, jitter: float = 0.03, background: int = 0
                  ) -> dict[str, Any]:
    """A NODDI phantom with smooth parameter gradients and random fibre orientations.

    icvf rises along x (0.2 -> 0.85), odi along y (0.05 -> 0.7), isovf along z
    (0 -> 0.4), each with a uniform jitter of ±``jitter``; fibre orientations are uniform
    on the sphere. Signals are simulated with the NODDI recipe model, scaled by ``s0``
    (arbitrary units) and given Rician noise with sigma = s0 / snr (no noise if ``snr`` is
    None or 0). ``background`` adds that many zero-signal voxels outside the mask on each
    side of x and y.

    Returns a dict: ``dwi`` (X, Y, Z, N) float32, ``scheme``, ``mask`` (X, Y, Z) bool,
    ``affine`` (4, 4), ``truth`` {icvf, odi, isovf: (X, Y, Z); direction: (X, Y, Z, 3) unit
    vectors; mu: (X, Y, Z, 2) rad}, ``parameters`` (X, Y, Z, P) parameter vectors,
    ``parameter_names``, ``s0``, ``snr``, ``sigma``, ``seed``.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise InputError(f"phantom shape must be three positive integers, got {shape}")
    if snr is not None and snr < 0:
        raise InputError(f"snr must be positive (or 0/None for no noise), got {snr}")
    if scheme is None:
        scheme = default_scheme()
    rng = np.random.default_rng(seed)
    X, Y, Z = shape
    gx, gy, gz = np.meshgrid(_ramp(X, 0.2, 0.85), _ramp(Y, 0.05, 0.7), _ramp(Z, 0.0, 0.4),
                             indexing="ij")

    def jit(a: np.ndarray, lo: float, hi: float) -> np.ndarray:
        return np.clip(a + rng.uniform(-jitter, jitter, a.shape), lo, hi)

    icvf = jit(gx, 0.05, 0.95)
    odi = jit(gy, 0.03, 0.95)
    isovf = jit(gz, 0.0, 0.9)
    n = X * Y * Z
    mu = random_orientations(n, rng)
    model = get_model("noddi")
    vectors = noddi_parameter_vectors(model, icvf=icvf, odi=odi, isovf=isovf, mu=mu)
    clean = np.asarray(model.simulate_signal(scheme, vectors), dtype=np.float64) * s0
    sigma = float(s0 / snr) if snr else 0.0
    noisy = add_rician_noise(clean, sigma, rng)

    pad = int(background)
    full = (X + 2 * pad, Y + 2 * pad, Z)
    dwi = np.zeros(full + (noisy.shape[1],), dtype=np.float32)
    mask = np.zeros(full, dtype=bool)
    inner = (slice(pad, pad + X), slice(pad, pad + Y), slice(None))
    dwi[inner] = noisy.reshape(shape + (-1,)).astype(np.float32)
    mask[inner] = True

    def embed(a: np.ndarray) -> np.ndarray:
        out = np.zeros(full + a.shape[3:], dtype=np.float32)
        out[inner] = a
        return out

    mu_map = mu.reshape(shape + (2,))
    affine = np.diag([voxel_size, voxel_size, voxel_size, 1.0])
    affine[:3, 3] = -0.5 * voxel_size * (np.asarray(full) - 1)
    return {
        "dwi": dwi,
        "scheme": scheme,
        "mask": mask,
        "affine": affine,
        "truth": {"icvf": embed(icvf), "odi": embed(odi), "isovf": embed(isovf),
                  "direction": embed(mu_to_vectors(mu_map)), "mu": embed(mu_map)},
        "parameters": vectors.reshape(shape + (-1,)),
        "parameter_names": list(model.parameter_names),
        "s0": float(s0),
        "snr": snr,
        "sigma": sigma,
        "seed": seed,
    }


def write_phantom(phantom: dict[str, Any], directory: str | os.PathLike,
                  prefix: str = "sub-01", *, compress: bool = True) -> dict[str, Path]:
    """Write a phantom as BIDS-like files in ``directory`` (created if needed).

    Returns paths by key: ``dwi`` (``<prefix>_dwi.nii.gz``), ``bval``, ``bvec`` (FSL,
    s/mm²), ``mask`` (``<prefix>_desc-brain_mask.nii.gz``) and ``truth_<label>`` for each
    ground-truth map (``<prefix>_model-noddi_param-<label>_desc-truth_dwimap.nii.gz``).
    """
    import nibabel as nib  # lazy: keeps nibabel off import

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ext = ".nii.gz" if compress else ".nii"
    affine = np.asarray(phantom["affine"], dtype=np.float64)

    def image(data: np.ndarray) -> Any:
        img = nib.Nifti1Image(data, affine)
        img.header.set_xyzt_units("mm", "sec")
        img.set_qform(affine, 1)
        img.set_sform(affine, 1)
        return img

    paths: dict[str, Path] = {
        "dwi": directory / f"{prefix}_dwi{ext}",
        "bval": directory / f"{prefix}_dwi.bval",
        "bvec": directory / f"{prefix}_dwi.bvec",
        "mask": directory / f"{prefix}_desc-brain_mask{ext}",
    }
    atomic_write_nifti(image(np.asarray(phantom["dwi"], dtype=np.float32)), paths["dwi"])
    write_bvals_bvecs(phantom["scheme"], paths["bval"], paths["bvec"])
    atomic_write_nifti(image(np.asarray(phantom["mask"], dtype=np.uint8)), paths["mask"])
    for label, data in phantom.get("truth", {}).items():
        if label == "mu":
            continue
        path = directory / bids_map_name(prefix, "noddi", label, desc="truth", extension=ext)
        atomic_write_nifti(image(np.asarray(data, dtype=np.float32)), path)
        paths[f"truth_{label}"] = path
    logger.debug("phantom written to %s", directory)
    return paths


def noddi_errors(estimated: dict[str, np.ndarray], truth: dict[str, np.ndarray],
                 mask: np.ndarray | None = None) -> dict[str, float]:
    """Accuracy of NODDI maps against the ground truth: mean absolute error of each scalar
    label present in both (``<label>_mae``) and the median angular error of ``direction``
    in degrees (``direction_median_deg``), over ``mask`` (default: every voxel)."""
    out: dict[str, float] = {}
    for label in ("icvf", "odi", "isovf"):
        if label in estimated and label in truth:
            est = np.asarray(estimated[label], dtype=np.float64)
            ref = np.asarray(truth[label], dtype=np.float64)
            sel = mask if mask is not None else np.ones(est.shape, dtype=bool)
            out[f"{label}_mae"] = float(np.mean(np.abs(est[sel] - ref[sel])))
    if "direction" in estimated and "direction" in truth:
        err = angular_error_deg(estimated["direction"], truth["direction"])
        sel = mask if mask is not None else np.ones(err.shape, dtype=bool)
        out["direction_median_deg"] = float(np.nanmedian(err[sel]))
    return out


# --------------------------------------------------------------------------- any named model
#: Ground-truth ranges of :func:`model_phantom` by map label (SI units), inside the models'
#: bounds and away from their edges, where the parameters are identifiable; labels not
#: listed are drawn from the recipe's sampling range.
PHANTOM_TRUTH_RANGES: dict[str, dict[str, tuple[float, float]]] = {
    "noddi": {"odi": (0.1, 0.6)},
    "noddi_bingham": {"odi": (0.1, 0.5), "beta_fraction": (0.0, 0.9), "psi": (0.2, 2.9)},
    "watson_stick": {"odi": (0.1, 0.6), "lambda_par": (1.0e-9, 2.5e-9)},
    "ball_stick": {"lambda_iso": (1.5e-9, 3e-9), "lambda_par": (1.0e-9, 2.5e-9)},
    "smt": {"lambda_par": (1.5e-9, 2.5e-9), "lambda_perp": (0.2e-9, 0.9e-9)},
    "smt_noddi": {"lambda_par": (1.2e-9, 2.5e-9)},
    "sandi": {"soma_diameter": (8e-6, 20e-6), "neurite_diffusivity": (1.5e-9, 2.5e-9),
              "extracellular_diffusivity": (0.8e-9, 2.0e-9)},
    "sphere_ball": {"diameter": (4e-6, 15e-6), "lambda_iso": (1.0e-9, 2.5e-9)},
    "activeax": {"diameter": (2e-6, 10e-6)},
    "charmed": {"diameter": (2e-6, 10e-6), "lambda_par": (1.2e-9, 2.2e-9),
                "lambda_perp": (0.3e-9, 1.0e-9)},
    "axcaliber": {"alpha": (2.0, 8.0), "beta": (0.3e-6, 1.5e-6),
                  "lambda_par": (1.2e-9, 2.2e-9), "lambda_perp": (0.3e-9, 1.0e-9)},
}
#: Fraction of each top-level compartment at least (Dirichlet draws are rescaled).
MIN_FRACTION = 0.1


def _random_tensors(n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 6) tensor elements of random white/grey-matter-like tensors (m²/s)."""
    lam = np.sort(rng.uniform(0.2e-9, 2.0e-9, (n, 3)), axis=1)[:, ::-1]
    v = rng.standard_normal((n, 3, 3))
    q, r = np.linalg.qr(v)
    q = q * np.sign(np.diagonal(r, axis1=1, axis2=2))[:, None, :]
    d = np.einsum("nij,nj,nkj->nik", q, lam, q)
    idx = {"d_xx": (0, 0), "d_yy": (1, 1), "d_zz": (2, 2), "d_xy": (0, 1), "d_xz": (0, 2),
           "d_yz": (1, 2)}
    return np.stack([d[:, i, j] for i, j in (idx[k] for k in TENSOR_ELEMENTS)], axis=1)


def model_truth_ranges(name: str) -> dict[str, tuple[float, float]]:
    """The uniform ranges (SI units) :func:`model_truth` draws the named model's scalar
    parameters from: :data:`PHANTOM_TRUTH_RANGES` of the map label, else the recipe's
    sampling range, else the parameter's bounds (always within the bounds). Volume
    fractions and orientations are not listed (flat Dirichlet with a floor of
    :data:`MIN_FRACTION` for up to three fractions, uniform orientations)."""
    recipe = get_recipe(name)
    space = ParameterSpace.from_model(get_model(recipe.name))
    by_param = {v: k for k, v in recipe.maps.items()}
    truth = PHANTOM_TRUTH_RANGES.get(recipe.name, {})
    sampled = dict(recipe.sampling.get("ranges", {}))
    pv = set(space.partial_volume_names)
    out: dict[str, tuple[float, float]] = {}
    for p in space.parameters:
        if p.name in pv or p.kind == "orientation":
            continue
        lo, hi = truth.get(by_param.get(p.name, "")) or sampled.get(p.name) or p.bounds[0]
        out[p.name] = (max(float(lo), p.bounds[0][0]), min(float(hi), p.bounds[0][1]))
    return out


def model_truth(name: str, n: int, seed: int = 0) -> np.ndarray:
    """(n, P) random ground-truth parameter vectors of the named model ``name``:
    orientations uniform on the sphere, top-level volume fractions from a flat Dirichlet
    (each at least 0.1 when there are up to three), scalars uniform in
    :data:`PHANTOM_TRUTH_RANGES` or else the recipe's sampling range (SI units)."""
    recipe = get_recipe(name)
    model = get_model(recipe.name)
    rng = np.random.default_rng(seed)
    if recipe.solver == "dti":
        return _random_tensors(n, rng)
    space = ParameterSpace.from_model(model)
    ranges = model_truth_ranges(name)
    values: dict[str, np.ndarray] = {}
    pv = space.partial_volume_names
    if pv:
        k = len(pv)
        f = rng.dirichlet(np.ones(k), n)
        floor = min(MIN_FRACTION, 0.5 / k)
        f = floor + (1.0 - k * floor) * f
        for i, pname in enumerate(pv):
            values[pname] = f[:, i]
    for p in space.parameters:
        if p.name in values:
            continue
        if p.kind == "orientation":
            values[p.name] = random_orientations(n, rng)
            continue
        lo, hi = ranges[p.name]
        values[p.name] = rng.uniform(lo, hi, n)
    return np.asarray(model.parameters_to_parameter_vector(**values), dtype=np.float64)


def model_phantom(name: str, scheme: AcquisitionScheme, n: int = 200, *, seed: int = 0,
                  snr: float | None = None, s0: float = 1000.0) -> dict[str, Any]:
    """A phantom of ``n`` voxels of the named model ``name`` on ``scheme``: ground truth
    (``'parameters'`` (n, P), :func:`model_truth`), the noise-free signals and (``snr``
    given: b=0 SNR, Rician) the noisy ones (``'signals'``, (n, N), scaled by ``s0``).
    Spherical-mean models give powder-averaged voxels: each measurement holds its shell's
    spherical mean."""

    model = get_model(name)
    params = model_truth(name, n, seed)
    clean = np.asarray(model.simulate_signal(scheme, params), dtype=np.float64) * s0
    if getattr(model, "is_spherical_mean", False):
        # per-shell spherical means: every measurement of a shell holds its shell's mean
        # (a powder-averaged voxel, whose spherical means are exactly the model's)
        clean = clean[:, np.asarray(scheme.shell_indices, dtype=int)]
    rng = np.random.default_rng(seed + 1)
    noisy = clean if not snr else add_rician_noise(clean, s0 / float(snr), rng)
    return {"model": name, "parameters": params, "clean": clean, "signals": noisy,
            "snr": snr, "s0": s0}
