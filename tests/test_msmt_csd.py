"""MRtrix3 conventions (SH basis, peak layout), batched MSMT-CSD and fascicle directions
from CSD on crossing phantoms."""

import math

import numpy as np
import pytest
from scipy.special import factorial, lpmv

from fingerprint.core.csd_peaks import fod_peaks_batched, fod_to_peak_array
from fingerprint.core.msmt_csd import CONSTRAINT_POINTS, MsmtCsd, TissueResponses
from fingerprint.core.orientations import fibonacci_hemisphere as unit_hemisphere
from fingerprint.data.saved_acquisition_schemes import wu_minn_hcp_acquisition_scheme
from fingerprint.errors import InputError
from fingerprint.fitting.directions import default_responses, fascicle_directions
from fingerprint.utils.spherical_convolution import (
    mrtrix3_sh_basis,
    real_sym_sh_mrtrix,
    sh_degrees_orders,
    sh_from_mrtrix3,
    sh_to_mrtrix3,
)

SCHEME = wu_minn_hcp_acquisition_scheme()
RNG_SEED = 17


def _unit(v):
    v = np.asarray(v, dtype=float)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


# ----------------------------------------------------------------------------- basis
def _mrtrix3_documented(ell, m, theta, phi):
    """MRtrix3's documented definition, written out: Y_l^m = sqrt((2l+1)/(4 pi)
    (l-m)!/(l+m)!) P_l^m(cos theta) e^{i m phi}; Y_lm = sqrt(2) Im[Y_l^{-m}] (m < 0),
    Y_l^0 (m = 0), sqrt(2) Re[Y_l^m] (m > 0). scipy's lpmv carries the Condon-Shortley
    phase, as MRtrix3's Legendre functions do."""
    am = abs(m)
    norm = math.sqrt((2 * ell + 1) / (4 * math.pi) * factorial(ell - am) / factorial(ell + am))
    complex_y = norm * lpmv(am, ell, np.cos(theta)) * np.exp(1j * am * phi)
    if m < 0:
        return math.sqrt(2) * complex_y.imag
    if m == 0:
        return complex_y.real
    return math.sqrt(2) * complex_y.real


def test_mrtrix3_basis_matches_documented_definition():
    rng = np.random.default_rng(RNG_SEED)
    v = _unit(rng.normal(size=(40, 3)))
    theta, phi = np.arccos(v[:, 2]), np.arctan2(v[:, 1], v[:, 0])
    basis = mrtrix3_sh_basis(8, v)
    degrees, orders = sh_degrees_orders(8)
    assert basis.shape == (40, 45)
    for col, (ell, m) in enumerate(zip(degrees, orders, strict=True)):
        # MRtrix3 storage: c_lm at volume l (l + 1) / 2 + m
        assert col == ell * (ell + 1) // 2 + m
        np.testing.assert_allclose(basis[:, col], _mrtrix3_documented(ell, m, theta, phi),
                                   atol=1e-12)


def test_mrtrix3_basis_closed_forms_at_known_directions():
    c = 1.0 / math.sqrt(4 * math.pi)
    # z axis: only m = 0 survive, Y_l0(z) = sqrt((2l + 1) / 4 pi)
    z = mrtrix3_sh_basis(4, [[0.0, 0.0, 1.0]])[0]
    expected = np.zeros(15)
    expected[[0, 3, 10]] = [c, math.sqrt(5) * c, 3 * c]
    np.testing.assert_allclose(z, expected, atol=1e-14)
    # x axis (theta = pi/2, phi = 0): Y_20 = -sqrt(5)/2 c, Y_22 = sqrt(2) * sqrt(5/(4 pi)/24)
    # * P_2^2(0) = sqrt(15 / (16 pi)), Y_2-2 = Y_2-1 = Y_21 = 0
    x = mrtrix3_sh_basis(2, [[1.0, 0.0, 0.0]])[0]
    np.testing.assert_allclose(x, [c, 0.0, 0.0, -math.sqrt(5) / 2 * c, 0.0,
                                   math.sqrt(15 / (16 * math.pi))], atol=1e-14)
    # y axis (phi = pi/2): cos(2 phi) = -1, so Y_22 = -sqrt(15 / (16 pi))
    y = mrtrix3_sh_basis(2, [[0.0, 1.0, 0.0]])[0]
    np.testing.assert_allclose(y[5], -math.sqrt(15 / (16 * math.pi)), atol=1e-14)
    # (1, 0, 1)/sqrt 2: Y_21 = sqrt(2) * sqrt(5/(4 pi)/6) * P_2^1(cos) with the
    # Condon-Shortley phase P_2^1(x) = -3 x sqrt(1 - x^2): negative
    d = mrtrix3_sh_basis(2, [[1.0, 0.0, 1.0]])[0]
    np.testing.assert_allclose(d[4], -math.sqrt(2) * math.sqrt(5 / (24 * math.pi)) * 1.5,
                               atol=1e-14)
    # (0, 1, 1)/sqrt 2: Y_2-1 = sqrt(2) Im[Y_2^1] = same magnitude, sin(phi) = 1
    e = mrtrix3_sh_basis(2, [[0.0, 1.0, 1.0]])[0]
    np.testing.assert_allclose(e[2], d[4], atol=1e-14)


def test_mrtrix3_basis_is_orthonormal():
    nodes, weights = np.polynomial.legendre.leggauss(20)
    phi = np.arange(40) * 2 * np.pi / 40
    ct, ph = np.meshgrid(nodes, phi, indexing="ij")
    st = np.sqrt(1 - ct ** 2)
    v = np.stack([st * np.cos(ph), st * np.sin(ph), ct], axis=-1).reshape(-1, 3)
    w = (weights[:, None] * np.full(40, 2 * np.pi / 40)[None, :]).reshape(-1)
    basis = mrtrix3_sh_basis(8, v)
    np.testing.assert_allclose(basis.T @ (basis * w[:, None]), np.eye(45), atol=1e-12)


def test_sh_round_trip_dmipy_and_mrtrix3():
    rng = np.random.default_rng(RNG_SEED)
    coef = rng.normal(size=(5, 45))
    v = _unit(rng.normal(size=(30, 3)))
    theta, phi = np.arccos(v[:, 2]), np.arctan2(v[:, 1], v[:, 0])
    dmipy_basis = real_sym_sh_mrtrix(8, theta, phi)[0]
    mrtrix = sh_to_mrtrix3(coef)
    # same function on the sphere in both bases
    np.testing.assert_allclose(coef @ dmipy_basis.T, mrtrix @ mrtrix3_sh_basis(8, v).T,
                               atol=1e-12)
    np.testing.assert_allclose(sh_from_mrtrix3(mrtrix), coef, atol=1e-14)
    np.testing.assert_allclose(sh_to_mrtrix3(sh_from_mrtrix3(coef)), coef, atol=1e-14)


# ----------------------------------------------------------------------------- phantoms
def _tensor_fibre(u, d_par=1.7e-9, d_perp=0.2e-9):
    cos2 = (SCHEME.gradient_directions @ u) ** 2
    return np.exp(-SCHEME.bvalues * (d_perp + (d_par - d_perp) * cos2))


def _stick_zeppelin_fibre(u):
    cos2 = (SCHEME.gradient_directions @ u) ** 2
    b = SCHEME.bvalues
    return 0.6 * np.exp(-b * 1.7e-9 * cos2) + 0.4 * np.exp(-b * (0.5e-9 + 1.2e-9 * cos2))


def _crossings(angle_deg, n, snr, fibre=_tensor_fibre, seed=RNG_SEED):
    """n two-fibre voxels (equal weights, 10 % free water) at random orientations."""
    rng = np.random.default_rng(seed + int(angle_deg))
    data, truth = [], []
    a = math.radians(angle_deg)
    for _ in range(n):
        u1 = _unit(rng.normal(size=3))
        t = rng.normal(size=3)
        t = _unit(t - (t @ u1) * u1)
        u2 = math.cos(a) * u1 + math.sin(a) * t
        s = 0.9 * (0.5 * fibre(u1) + 0.5 * fibre(u2)) + 0.1 * np.exp(-SCHEME.bvalues * 3e-9)
        if snr:
            s = np.abs(s + rng.normal(scale=1 / snr, size=s.shape)
                       + 1j * rng.normal(scale=1 / snr, size=s.shape))
        data.append(100.0 * s)
        truth.append((u1, u2))
    return np.array(data), np.array(truth)


def _errors(directions, count, truth):
    """Worst angular error (degrees) of the two true fibres against the first two
    peaks, per voxel; 90 where fewer than two peaks were found."""
    out = []
    for d, c, (u1, u2) in zip(directions, count, truth, strict=True):
        if c < 2:
            out.append(90.0)
            continue
        cos = np.abs(d[:2] @ np.stack([u1, u2]).T).max(axis=0)
        out.append(float(np.degrees(np.arccos(np.clip(cos, -1, 1))).max()))
    return np.array(out)


@pytest.mark.parametrize("angle", [60, 90])
def test_peaks_point_along_fibres_noise_free(angle):
    data, truth = _crossings(angle, 24, 0)
    dirs, amps, count = fascicle_directions(SCHEME, data, 3)
    assert np.all(count == 2)
    err = _errors(dirs, count, truth)
    assert err.max() < 5.0, err
    # peak map: MRtrix sh2peaks layout, vector scaled by the amplitude, NaN past count
    peaks = fod_to_peak_array(dirs, amps, count)
    assert peaks.shape == (24, 9)
    np.testing.assert_allclose(np.linalg.norm(peaks[:, 0:3], axis=1), amps[:, 0])
    assert np.all(np.isnan(peaks[:, 6:9]))
    assert np.all(amps[:, 0] >= amps[:, 1])
    assert np.all(dirs[:, :2, 2] >= 0)


@pytest.mark.parametrize("angle", [60, 90])
def test_fascicle_directions_snr30(angle):
    data, truth = _crossings(angle, 40, 30, fibre=_stick_zeppelin_fibre)
    dirs, amps, count = fascicle_directions(SCHEME, data, 3)
    assert np.mean(count == 2) >= 0.95
    err = _errors(dirs, count, truth)
    assert np.median(err) < 5.0 and np.percentile(err, 80) < 8.0, err


@pytest.mark.parametrize("snr", [0, 30])
def test_fascicle_directions_45_degrees_at_order_10(snr):
    """A 45° crossing merges into one lobe at order 8; order 10 separates it."""
    data, truth = _crossings(45, 30, snr)
    dirs, _, count = fascicle_directions(SCHEME, data, 3, sh_order=10)
    assert np.mean(count == 2) >= 0.9
    err = _errors(dirs, count, truth)
    assert np.median(err) < 6.0, err


def test_single_fibre_and_isotropic_voxels():
    u = _unit([0.3, -0.2, 0.9])
    single = 100 * _tensor_fibre(u)
    water = 100 * np.exp(-SCHEME.bvalues * 3e-9)
    dirs, amps, count = fascicle_directions(SCHEME, np.stack([single, water]), 2)
    assert count.tolist() == [1, 0]
    assert abs(dirs[0, 0] @ u) > math.cos(math.radians(1.0))
    assert np.all(dirs[1] == 0) and np.all(amps[1] == 0)


def test_mask_and_shape_are_kept():
    data, _ = _crossings(90, 6, 0)
    vol = data.reshape(2, 3, -1)
    mask = np.array([[True, False, True], [True, True, False]])
    dirs, amps, count = fascicle_directions(SCHEME, vol, 2, mask=mask)
    assert dirs.shape == (2, 3, 2, 3) and amps.shape == (2, 3, 2) and count.shape == (2, 3)
    assert np.all(count[~mask] == 0) and np.all(count[mask] == 2)


def test_fascicle_directions_bad_inputs():
    data, _ = _crossings(90, 2, 0)
    with pytest.raises(InputError, match="max_fascicles"):
        fascicle_directions(SCHEME, data, 0)
    with pytest.raises(InputError, match="method"):
        fascicle_directions(SCHEME, data, 2, method="dti")
    with pytest.raises(InputError, match="expected"):
        fascicle_directions(SCHEME, data[:, :10], 2)
    with pytest.raises(InputError, match="mask"):
        fascicle_directions(SCHEME, data, 2, mask=np.ones(3, bool))
    with pytest.raises(InputError, match="relative_peak_threshold"):
        fod_peaks_batched(np.zeros((1, 45)), 8, relative_peak_threshold=2.0)


# ----------------------------------------------------------------------------- solver
def test_csd_recovers_fractions_and_is_non_negative():
    full = default_responses(SCHEME)
    assert full.isotropic_names == ("csf", "gm")
    responses = TissueResponses(full.shell_bvalues, full.white_matter, full.isotropic[:1],
                                ("csf",))
    solver = MsmtCsd(SCHEME.bvalues, SCHEME.gradient_directions, responses)
    u = _unit([1.0, 1.0, 0.2])
    degrees, _ = sh_degrees_orders(8)
    # a band-limited non-negative FOD of fraction 0.7: a heat-kernel smoothed fibre on
    # a uniform background
    fod_true = 0.35 * np.exp(-degrees * (degrees + 1) * 0.03) * mrtrix3_sh_basis(8, [u])[0]
    fod_true[0] += 0.35 / math.sqrt(4 * math.pi)
    grid = mrtrix3_sh_basis(8, _unit(np.random.default_rng(1).normal(size=(2000, 3))))
    assert (grid @ fod_true).min() > 0
    signal = solver.design @ np.concatenate([fod_true, [0.3]])
    fod, iso = solver.solve(250.0 * signal[None])
    np.testing.assert_allclose(fod[0] / 250.0, fod_true, atol=1e-6)
    np.testing.assert_allclose(iso[0] / 250.0, [0.3], atol=1e-6)
    np.testing.assert_allclose(math.sqrt(4 * math.pi) * fod[0, 0] / 250.0, 0.7, atol=1e-6)
    # a fibre with no angular band limit: non-negative FOD, fractions close (the
    # band-limited FOD trades a little of the fibre for free water)
    s = 0.7 * _tensor_fibre(u) + 0.3 * np.exp(-SCHEME.bvalues * 3e-9)
    fod, iso = solver.solve(s[None])
    np.testing.assert_allclose(math.sqrt(4 * math.pi) * fod[0, 0] + iso[0, 0], 1.0,
                               atol=0.01)
    np.testing.assert_allclose(iso[0], [0.3], atol=0.05)
    # non-negative on the constraint directions (up to the penalty's slack); between
    # them the band-limited FOD may dip by ~1 % of its peak (as MRtrix3's)
    on_constraints = mrtrix3_sh_basis(8, unit_hemisphere(CONSTRAINT_POINTS)) @ fod[0]
    values = grid @ fod[0]
    assert on_constraints.min() > -2e-3 * values.max()
    assert values.min() > -2e-2 * values.max()


def test_tissue_responses_validation():
    with pytest.raises(InputError, match="increase"):
        TissueResponses.from_arrays([1e9, 0.0], [[1.0], [1.0]])
    with pytest.raises(InputError, match="one row per shell"):
        TissueResponses.from_arrays([0.0, 1e9], [[1.0]])
    r = TissueResponses.from_arrays([0.0, 1e9], [[3.5, 0.0], [2.0, -0.5]])
    with pytest.raises(InputError, match="match none"):
        r.shell_of([5e9])
