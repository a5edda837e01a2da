"""Helpers shared by the tests that read the dmipy reference fixtures."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from fingerprint.core.acquisition_scheme import acquisition_scheme_from_bvalues
from fingerprint.core.modeling_framework import MultiCompartmentModel
from fingerprint.distributions.distribute_models import SD1WatsonDistributed
from fingerprint.signal_models.cylinder_models import C1Stick
from fingerprint.signal_models.gaussian_models import G1Ball, G2Zeppelin

#: The dmipy 1.0.5 reference signals kept in the repository as test data.
REFERENCE_DIR = Path(__file__).resolve().parent / "data" / "reference"


def default_reference_dir() -> Path:
    """``$FINGERPRINT_REFERENCE_DIR`` when set, else the repository's ``tests/data/reference``."""
    env = os.environ.get("FINGERPRINT_REFERENCE_DIR")
    return Path(env) if env else REFERENCE_DIR


def reference_scheme(reference_dir: Path, name: str):
    """The fixture scheme ``name`` ('hcp', 'activeax') from its SI JSON description."""
    info = json.loads((reference_dir / "schemes" / f"{name}.json").read_text())
    return acquisition_scheme_from_bvalues(
        np.array(info["bvalues_s_per_m2"]), np.array(info["gradient_directions"]),
        delta=np.array(info["delta_s"]), Delta=np.array(info["Delta_s"]))


def load_reference(reference_dir: Path, name: str):
    """(name, scheme, signals npz, case descriptions) of the fixtures of scheme ``name``."""
    signals = np.load(reference_dir / f"signals_{name}.npz")
    names = json.loads((reference_dir / f"signals_{name}.json").read_text())
    return name, reference_scheme(reference_dir, name), signals, names


def noddi_watson() -> MultiCompartmentModel:
    """The reference NODDIWatson case built with dmipy's calls."""
    bundle = SD1WatsonDistributed(models=[C1Stick(), G2Zeppelin()])
    bundle.set_tortuous_parameter("G2Zeppelin_1_lambda_perp", "C1Stick_1_lambda_par",
                                  "partial_volume_0")
    bundle.set_equal_parameter("G2Zeppelin_1_lambda_par", "C1Stick_1_lambda_par")
    bundle.set_fixed_parameter("G2Zeppelin_1_lambda_par", 1.7e-9)
    model = MultiCompartmentModel(models=[G1Ball(), bundle])
    model.set_fixed_parameter("G1Ball_1_lambda_iso", 3e-9)
    return model
