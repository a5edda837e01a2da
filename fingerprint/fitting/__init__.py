"""fingerprint.fitting: dictionary-matching fitting engine and volume pipeline.

- :mod:`.features`: what atoms and voxels are matched on (``FeatureMap``,
  ``FEATURES_VERSION``);
- :mod:`.frame`: per-voxel fibre frames;
- :mod:`.matcher`: FAISS nearest-neighbour search (exact / HNSW, cached index);
- :mod:`.refine`: posterior-weighted neighbours and the local-linear refinement;
- :mod:`.estimator`: ``FingerprintEstimator`` / ``VoxelEstimates``;
- :mod:`.engine`: ``fit_model`` (what ``model.fit`` runs);
- :mod:`.pipeline`: NIfTI in, maps out.

Names are imported lazily so that ``import fingerprint.fitting.features`` (used by the
dictionary builder) does not load FAISS.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["FEATURES_VERSION", "FeatureMap", "FingerprintEstimator", "VoxelEstimates",
           "fit_model"]

_LAZY = {
    "FEATURES_VERSION": "features",
    "FeatureMap": "features",
    "FingerprintEstimator": "estimator",
    "VoxelEstimates": "estimator",
    "fit_model": "engine",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fingerprint.fitting' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
