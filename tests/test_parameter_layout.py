"""One parameter layout, owned by the model, read by the fitted model, the estimator, the
volume runner and the dictionary."""

from __future__ import annotations

import numpy as np
import pytest

from fingerprint.core.parameter_layout import ParameterLayout
from fingerprint.errors import InputError
from fingerprint.models import available_models, get_model


@pytest.mark.parametrize("name", available_models())
def test_the_model_owns_its_layout(name):
    model = get_model(name)
    layout = model.parameter_layout
    assert list(layout.names) == list(model.parameter_names)
    assert layout.size == sum(model.parameter_cardinality.values())
    assert layout.units == {n: model.parameter_units[n] for n in layout.names}
    vector = np.arange(layout.size, dtype=float)
    split = model.parameter_vector_to_parameters(vector)
    for n, sl in layout.slices.items():
        np.testing.assert_array_equal(np.atleast_1d(split[n]), vector[sl])
    assert layout.offsets == {n: sl.start for n, sl in layout.slices.items()}


def test_layout_split_and_errors():
    layout = ParameterLayout.from_cardinality({"mu": 2, "f": 1}, {"mu": "rad"})
    parts = layout.split(np.array([[1.0, 2.0, 3.0]]))
    np.testing.assert_array_equal(parts["mu"], [[1.0, 2.0]])
    np.testing.assert_array_equal(parts["f"], [3.0])
    assert layout.units == {"mu": "rad", "f": "n/a"}
    with pytest.raises(InputError, match="last dimension 3"):
        layout.split(np.zeros(4))
    with pytest.raises(InputError, match="no cardinality"):
        ParameterLayout(("a",), {})
