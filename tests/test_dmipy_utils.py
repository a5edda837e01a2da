"""dmipy's helper modules: coordinates, rotations, tortuosity, spherical harmonics,
spherical means and the named acquisition schemes."""

import numpy as np
import pytest

from fingerprint.data.saved_acquisition_schemes import (
    duval_cat_spinal_cord_2d_acquisition_scheme,
    wu_minn_hcp_acquisition_scheme,
)
from fingerprint.errors import InputError
from fingerprint.signal_models import gaussian_models
from fingerprint.utils import spherical_convolution as sc
from fingerprint.utils import utils
from fingerprint.utils.spherical_mean import (
    estimate_spherical_mean_multi_shell,
    estimate_spherical_mean_shell,
)

RNG = np.random.default_rng(7)


def test_cart2sphere_known_values_and_round_trip():
    np.testing.assert_allclose(utils.cart2sphere([0.0, 0.0, 2.0]), [2.0, 0.0, 0.0])
    np.testing.assert_allclose(utils.cart2sphere([0.0, 3.0, 0.0]), [3.0, np.pi / 2, np.pi / 2])
    np.testing.assert_allclose(utils.cart2sphere([-1.0, 0.0, 0.0]), [1.0, np.pi / 2, np.pi])
    xyz = RNG.normal(size=(50, 3))
    np.testing.assert_allclose(utils.sphere2cart(utils.cart2sphere(xyz)), xyz, atol=1e-14)
    unit = xyz / np.linalg.norm(xyz, axis=1, keepdims=True)
    np.testing.assert_allclose(utils.unitsphere2cart_Nd(utils.cart2mu(unit)), unit, atol=1e-14)
    np.testing.assert_allclose(utils.unitsphere2cart_1d([np.pi / 2, 0.0]), [1.0, 0.0, 0.0],
                               atol=1e-16)
    with pytest.raises(InputError, match="last dimension 3"):
        utils.cart2sphere([1.0, 2.0])


def test_perpendicular_vector_is_unit_and_orthogonal():
    for v in [*RNG.normal(size=(20, 3)), np.array([2.0, 0.0, 0.0])]:
        p = utils.perpendicular_vector(v)
        assert abs(p @ v) < 1e-12
        assert abs(np.linalg.norm(p) - 1.0) < 1e-14
    np.testing.assert_allclose(utils.perpendicular_vector([1.0, 0.0, 0.0]), [0.0, 0.0, 1.0])
    with pytest.raises(InputError, match="zero vector"):
        utils.perpendicular_vector([0.0, 0.0, 0.0])


def test_rotations_take_x_to_mu_and_invert():
    for theta, phi, psi in RNG.uniform([0, -np.pi, 0], [np.pi, np.pi, np.pi], size=(20, 3)):
        R = utils.rotation_matrix_100_to_theta_phi_psi(theta, phi, psi)
        np.testing.assert_allclose(R @ R.T, np.eye(3), atol=1e-13)
        assert np.isclose(np.linalg.det(R), 1.0)
        np.testing.assert_allclose(R[:, 0], utils.unitsphere2cart_1d([theta, phi]), atol=1e-13)
        mu, psi_back = utils.R2mu_psi(R)
        np.testing.assert_allclose(mu, [theta, phi], atol=1e-10)
        assert np.isclose(psi_back, psi)
    np.testing.assert_allclose(utils.rotation_matrix_around_100(np.pi / 2) @ [0, 1, 0],
                               [0, 0, 1], atol=1e-16)
    np.testing.assert_allclose(utils.rotation_matrix_001_to_xyz(0, 0, -1) @ [0, 0, 1],
                               [0, 0, -1], atol=1e-16)


def test_t1_tortuosity_single_and_multi_tissue():
    tort = utils.T1_tortuosity()
    assert np.isclose(tort(1.7e-9, 0.7), 0.3 * 1.7e-9)
    assert np.isclose(tort(1.7e-9, 0.7, 0.2), 0.2 / 0.9 * 1.7e-9)
    # signal fractions 0.6 / 0.4 with responses 3000 / 4000: volume fractions 0.2 / 0.1333
    mt = utils.T1_tortuosity(3000.0, 4000.0)
    f = 0.6 / 3000 / (0.6 / 3000 + 0.4 / 4000)
    assert np.isclose(mt(2e-9, 0.6), (1 - f) * 2e-9)
    with pytest.raises(InputError, match="S0_intra"):
        utils.T1_tortuosity(0.0, 1.0)


def test_define_shell_indices():
    idx, means = utils.define_shell_indices([0, 5e6, 1e9, 1.02e9, 2e9],
                                            [[0, 1e7], [0.9e9, 1.1e9], [1.9e9, 2.1e9]])
    np.testing.assert_array_equal(idx, [0, 0, 1, 1, 2])
    np.testing.assert_allclose(means, [2.5e6, 1.01e9, 2e9])
    with pytest.raises(InputError, match="b_value_ranges"):
        utils.define_shell_indices([0, 3e9], [[0, 1e7]])


def test_sh_basis_analytic_low_orders():
    theta = RNG.uniform(0, np.pi, 30)
    phi = RNG.uniform(-np.pi, np.pi, 30)
    basis, m, degree = sc.real_sym_sh_mrtrix(2, theta, phi)
    np.testing.assert_array_equal(m, [0, -2, -1, 0, 1, 2])
    np.testing.assert_array_equal(degree, [0, 2, 2, 2, 2, 2])
    np.testing.assert_allclose(basis[:, 0], 0.5 / np.sqrt(np.pi))
    y20 = np.sqrt(5 / (16 * np.pi)) * (3 * np.cos(theta) ** 2 - 1)
    np.testing.assert_allclose(basis[:, 3], y20, atol=1e-14)
    # Re(Y_2^2) = 1/4 sqrt(15 / (2 pi)) sin^2 theta cos 2 phi
    np.testing.assert_allclose(basis[:, 5], 0.25 * np.sqrt(15 / (2 * np.pi))
                               * np.sin(theta) ** 2 * np.cos(2 * phi), atol=1e-14)
    np.testing.assert_allclose(sc.real_sym_rh_basis(2, theta, phi), basis[:, [0, 3]])
    np.testing.assert_allclose(sc.sh_to_mrtrix3(np.ones(6)), [1, *[2 ** -0.5] * 2, 1,
                                                              *[2 ** -0.5] * 2])
    with pytest.raises(InputError, match="even"):
        sc.real_sym_sh_mrtrix(3, theta, phi)


def test_sh_basis_matches_dipy_when_installed():
    shm = pytest.importorskip("dipy.reconst.shm")
    theta = RNG.uniform(0, np.pi, 40)
    phi = RNG.uniform(-np.pi, np.pi, 40)
    ours = sc.real_sym_sh_mrtrix(8, theta, phi)
    theirs = shm.real_sh_tournier(8, theta, phi, legacy=True)
    np.testing.assert_allclose(ours[0], theirs[0], atol=1e-13)


def test_sh_convolution_funk_hecke_factor():
    f_sh = np.arange(1.0, 16.0)
    k_rh = np.array([2.0, 3.0, 5.0])
    out = sc.sh_convolution(f_sh, k_rh)
    assert np.isclose(out[0], 1.0 * 2.0 * np.sqrt(4 * np.pi))
    np.testing.assert_allclose(out[1:6], f_sh[1:6] * 3.0 * np.sqrt(4 * np.pi / 5))
    np.testing.assert_allclose(out[6:], f_sh[6:] * 5.0 * np.sqrt(4 * np.pi / 9))
    with pytest.raises(InputError, match="zonal"):
        sc.sh_convolution(f_sh, k_rh[:2])


def test_spherical_mean_of_zeppelin_matches_closed_form():
    scheme = wu_minn_hcp_acquisition_scheme()
    zeppelin = gaussian_models.G2Zeppelin(mu=[0.4, 1.1], lambda_par=1.7e-9,
                                          lambda_perp=0.5e-9)
    exact = zeppelin.spherical_mean(scheme)
    estimated = estimate_spherical_mean_multi_shell(zeppelin(scheme), scheme, sh_order=8)
    np.testing.assert_allclose(estimated, exact, atol=2e-3)
    shell = scheme.shell_indices == 1
    one = estimate_spherical_mean_shell(zeppelin(scheme)[shell],
                                        scheme.gradient_directions[shell], 8)
    assert np.isclose(one, estimated[1])


def test_hcp_scheme_contents():
    scheme = wu_minn_hcp_acquisition_scheme()
    assert scheme.number_of_measurements == 288
    assert scheme.number_of_b0s == 18
    np.testing.assert_allclose(scheme.shell_bvalues, [0, 1e9, 2e9, 3e9], atol=0.02e9)
    assert np.bincount(scheme.shell_indices).tolist() == [18, 90, 90, 90]
    np.testing.assert_allclose(scheme.delta, 0.0106)
    np.testing.assert_allclose(scheme.Delta, 0.0431)
    dwi = ~scheme.b0_mask
    np.testing.assert_allclose(np.linalg.norm(scheme.gradient_directions[dwi], axis=1), 1,
                               atol=1e-5)


def test_duval_scheme_timings():
    scheme = duval_cat_spinal_cord_2d_acquisition_scheme()
    assert scheme.number_of_measurements == 9 * (4 + 50 * 4)
    timings = set(zip(np.round(scheme.Delta, 4), np.round(scheme.delta, 4), strict=True))
    assert len(timings) == 9 and (0.007, 0.003) in timings and (0.04, 0.008) in timings
    assert np.isclose(scheme.gradient_strengths.max(), 0.6 * np.sqrt(2), rtol=1e-5)
    np.testing.assert_allclose(scheme.gradient_directions[~scheme.b0_mask][:, 2], 0.0)


def test_unshipped_named_schemes_read_a_given_file_or_say_why_not(tmp_path):
    from fingerprint.data import saved_acquisition_schemes as saved

    duval = duval_cat_spinal_cord_2d_acquisition_scheme()
    path = tmp_path / "given.scheme"
    duval.to_schemefile(path)
    for name in ("duval_cat_spinal_cord_3d_acquisition_scheme",
                 "de_santis_generated_acquisition_scheme",
                 "isbi2015_white_matter_challenge_scheme"):
        function = getattr(saved, name)
        with pytest.raises(InputError, match="does not ship.*schemefile"):
            function()
        scheme = function(schemefile=path)  # a table the caller has, read as given
        np.testing.assert_allclose(scheme.bvalues, duval.bvalues, rtol=1e-6)
        np.testing.assert_allclose(scheme.Delta, duval.Delta, rtol=1e-6)
