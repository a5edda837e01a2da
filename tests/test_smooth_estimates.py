"""Smooth estimates: no quantisation from the dictionary's sampling. On a phantom whose
parameters vary smoothly over 10,000 voxels, the icvf map has (nearly) 10,000 distinct
values, none sits on an atom's value, and its histogram has no spikes."""

from __future__ import annotations

import numpy as np
import pytest

from fingerprint.fitting.engine import get_estimator
from fingerprint.models import get_model
from fingerprint.phantoms import (
    add_rician_noise,
    default_scheme,
    noddi_parameter_vectors,
    random_orientations,
)

N = 10_000


@pytest.mark.slow
@pytest.mark.parametrize("snr", [None, 50])
def test_no_plateaus_on_a_smooth_phantom(tmp_path_factory, snr):
    model = get_model("noddi")
    scheme = default_scheme()
    est = get_estimator(model, scheme, dictionary_size=20000,
                        dictionary_dir=tmp_path_factory.mktemp("dict"))
    rng = np.random.default_rng(0)
    k = np.arange(N)
    icvf = np.linspace(0.2, 0.85, N)
    odi = 0.1 + 0.5 * (k % 100) / 100
    isovf = 0.05 + 0.3 * ((k // 100) % 100) / 100
    vec = noddi_parameter_vectors(model, icvf=icvf, odi=odi, isovf=isovf,
                                  mu=random_orientations(N, rng))
    data = add_rician_noise(model.simulate_signal(scheme, vec) * 1000.0,
                            1000.0 / snr if snr else 0.0, rng)
    ve = est.estimate(data)
    col = est.parameter_names.index("SD1WatsonDistributed_1_partial_volume_0")
    offsets = np.cumsum([0] + [model.parameter_cardinality[n] for n in model.parameter_names])
    c = int(offsets[col])
    estimate = ve.parameters[:, c]
    assert np.abs(estimate - icvf).mean() < 0.03  # a sanity check of the column
    assert np.unique(estimate).size >= 0.99 * N
    atoms = est.atom_parameters[:, c]
    sorted_atoms = np.sort(atoms)
    pos = np.clip(np.searchsorted(sorted_atoms, estimate), 1, sorted_atoms.size - 1)
    nearest = np.minimum(np.abs(sorted_atoms[pos] - estimate),
                         np.abs(sorted_atoms[pos - 1] - estimate))
    assert np.mean(nearest < 1e-9) < 0.01, "estimates snap to atom values"
    bins = np.linspace(0.0, 1.0, 1001)
    hist, _ = np.histogram(estimate, bins)
    truth, _ = np.histogram(icvf, bins)
    assert hist.max() <= 3 * truth.max(), "spikes in the histogram of estimates"
