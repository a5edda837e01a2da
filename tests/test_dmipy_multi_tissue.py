"""Multi-tissue models: S0 responses, S0-corrected tortuosity, volume fractions."""

import numpy as np
import pytest

from fingerprint.core.modeling_framework import (
    MultiCompartmentModel,
    model_from_spec,
    tortuosity,
)
from fingerprint.errors import InputError
from fingerprint.signal_models import cylinder_models, gaussian_models
from fingerprint.utils.utils import T1_tortuosity


def _model(s0=(3000.0, 4000.0, 10000.0)):
    return MultiCompartmentModel([cylinder_models.C1Stick(), gaussian_models.G2Zeppelin(),
                                  gaussian_models.G1Ball()], S0_tissue_responses=list(s0))


def test_tortuosity_with_responses():
    # signal fractions 0.6 / 0.3 with responses 2 / 1: volume fractions 0.3 / 0.3
    lam = tortuosity(np.array(2e-9), np.array(0.6), np.array(0.3), 2.0, 1.0)
    n = 0.6 / 0.9
    f = n * 1.0 / (n * 1.0 + 0.3 * 2.0)
    assert np.isclose(lam, (1 - f) * 2e-9)
    assert np.isclose(tortuosity(np.array(2e-9), np.array(0.6), None, 1.0, 1.0), 0.8e-9)
    assert np.isclose(T1_tortuosity(2.0, 1.0)(2e-9, 0.6, 0.3), lam)


def test_s0_corrected_tortuosity_link_and_spec_round_trip():
    model = _model()
    model.set_tortuous_parameter("G2Zeppelin_1_lambda_perp", "C1Stick_1_lambda_par",
                                 "partial_volume_0", "partial_volume_1", True)
    tort = model.parameter_links[0][2]
    assert (tort.S0_intra, tort.S0_extra) == (3000.0, 4000.0)
    assert model.parameter_links[0][1] == "G2Zeppelin_1_lambda_perp"
    rebuilt = model_from_spec(model.to_spec())
    assert rebuilt.S0_tissue_responses == (3000.0, 4000.0, 10000.0)
    assert rebuilt.parameter_links[0][2].S0_intra == 3000.0
    values = rebuilt.add_linked_parameters_to_parameters({
        "C1Stick_1_mu": [0.1, 0.2], "C1Stick_1_lambda_par": 2e-9, "G2Zeppelin_1_mu": [0, 0],
        "G2Zeppelin_1_lambda_par": 2e-9, "G1Ball_1_lambda_iso": 3e-9,
        "partial_volume_0": 0.5, "partial_volume_1": 0.3, "partial_volume_2": 0.2})
    expected = T1_tortuosity(3000.0, 4000.0)(2e-9, 0.5, 0.3)
    assert np.isclose(values["G2Zeppelin_1_lambda_perp"], expected)
    plain = _model()
    plain.set_tortuous_parameter("G2Zeppelin_1_lambda_perp", "C1Stick_1_lambda_par",
                                 "partial_volume_0", "partial_volume_1")
    assert plain.parameter_links[0][2].S0_intra == 1.0


def test_s0_responses_validated():
    with pytest.raises(InputError, match="S0_tissue_responses"):
        MultiCompartmentModel([cylinder_models.C1Stick()], S0_tissue_responses=[1.0, 2.0])
    with pytest.raises(InputError, match="S0_tissue_responses"):
        _model((1.0, -1.0, 1.0))


def test_fitted_multi_tissue_fractions():
    from fingerprint.core.fitted_model import FittedMultiCompartmentModel
    from fingerprint.data.saved_acquisition_schemes import wu_minn_hcp_acquisition_scheme

    model = MultiCompartmentModel([gaussian_models.G1Ball(), cylinder_models.C1Stick()],
                                  S0_tissue_responses=[1.0, 2.0])
    model.set_fixed_parameter("C1Stick_1_lambda_par", 1.7e-9)
    model.set_fixed_parameter("G1Ball_1_lambda_iso", 3e-9)
    model.set_fixed_parameter("C1Stick_1_mu", [0.0, 0.0])
    vectors = np.array([[0.5, 0.5], [0.2, 0.8]])
    fitted = FittedMultiCompartmentModel(model, wu_minn_hcp_acquisition_scheme(), vectors,
                                         mask=np.ones(2, dtype=bool), S0=np.ones(2))
    volume = fitted.fitted_multi_tissue_fractions
    np.testing.assert_allclose(volume["partial_volume_0"], [0.5, 0.2])
    np.testing.assert_allclose(volume["partial_volume_1"], [0.25, 0.4])
    normalised = fitted.fitted_multi_tissue_fractions_normalized
    np.testing.assert_allclose(normalised["partial_volume_0"], [2 / 3, 1 / 3])
