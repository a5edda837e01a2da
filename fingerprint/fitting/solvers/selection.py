"""Model selection: compare fitted models voxel by voxel by an information criterion.

>>> comparison = compare_models({"ball_stick": bs_fit, "noddi": noddi_fit}, data)
>>> comparison.winner            # index into comparison.names, -1 outside the mask
>>> comparison.values["noddi"]   # the criterion map of one model

Each fitted model gives its criterion map (:meth:`FittedMultiCompartmentModel.bic`,
``aic``, ``aicc``: Gaussian noise of unknown variance per voxel, k free parameters
counted from the model's configuration); the winner of a voxel is the model with the
lowest value. Voxels that any model could not fit are left out (winner -1).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fingerprint.core.fitted_model import FittedMultiCompartmentModel
from fingerprint.errors import InputError
from fingerprint.io.nifti import bids_map_name, write_map
from fingerprint.models import get_model, get_recipe
from fingerprint.preview import write_preview

if TYPE_CHECKING:
    from numpy.typing import ArrayLike

logger = logging.getLogger(__name__)

__all__ = ["CRITERIA", "ModelComparison", "VolumeComparison", "compare_models", "compare_volume"]

#: Information criteria a comparison can use.
CRITERIA = ("bic", "aic", "aicc")


@dataclass(frozen=True)
class ModelComparison:
    """Result of :func:`compare_models`.

    names: the models' names, in the order of ``winner``'s indices.
    criterion: ``'bic'``, ``'aic'`` or ``'aicc'``.
    values: name -> criterion map (spatial shape; lower is better; NaN where not fitted).
    winner: spatial int map, the index of the best model; -1 outside the common mask.
    n_free_parameters: name -> free-parameter count used by the criterion.
    """

    names: list[str]
    criterion: str
    values: dict[str, np.ndarray]
    winner: np.ndarray
    n_free_parameters: dict[str, int]

    def fractions(self) -> dict[str, float]:
        """Share of the compared voxels won by each model."""
        compared = self.winner >= 0
        total = max(int(compared.sum()), 1)
        return {name: float(np.sum(self.winner == i)) / total
                for i, name in enumerate(self.names)}

    def legend(self) -> dict[str, Any]:
        """JSON-able description of the winner map."""
        return {"criterion": self.criterion, "lower_is_better": True,
                "values": {str(i): name for i, name in enumerate(self.names)},
                "outside": -1,
                "n_free_parameters": dict(self.n_free_parameters),
                "fraction_of_voxels": self.fractions()}


def compare_models(fitted: Mapping[str, FittedMultiCompartmentModel]
                   | Sequence[FittedMultiCompartmentModel], data: ArrayLike,
                   criterion: str = "bic") -> ModelComparison:
    """Compare fitted models (name -> FittedMultiCompartmentModel, or a list, named
    ``model_0``, ...) on the ``data`` they were fitted to, voxel by voxel."""
    criterion = str(criterion).lower()
    if criterion not in CRITERIA:
        raise InputError(f"criterion must be one of {', '.join(CRITERIA)}, got "
                         f"{criterion!r}")
    items = list(fitted.items()) if isinstance(fitted, Mapping) else \
        [(f"model_{i}", f) for i, f in enumerate(fitted)]
    if len(items) < 2:
        raise InputError(f"compare at least two fitted models, got {len(items)}")
    shape = items[0][1].mask.shape
    for name, fit in items:
        if not hasattr(fit, criterion) or not hasattr(fit, "mask"):
            raise InputError(f"{name!r} is not a fitted model (got {type(fit).__name__})")
        if fit.mask.shape != shape:
            raise InputError(f"{name!r} was fitted on shape {fit.mask.shape}; the first "
                             f"model on {shape}: compare fits of the same data")
    values: dict[str, np.ndarray] = {}
    common = np.ones(shape, dtype=bool)
    for name, fit in items:
        v = np.asarray(getattr(fit, criterion)(data), dtype=float)
        common &= fit.mask & fit.valid & np.isfinite(v)
        values[name] = np.where(fit.mask & fit.valid, v, np.nan)
    stack = np.stack([values[name] for name, _ in items])
    winner = np.full(shape, -1, dtype=np.int16)
    if common.any():
        winner[common] = np.argmin(stack[:, common], axis=0)
    result = ModelComparison([n for n, _ in items], criterion, values, winner,
                             {n: int(f.n_free_parameters) for n, f in items})
    logger.info("model comparison by %s over %d voxels: %s", criterion, int(common.sum()),
                ", ".join(f"{n} {100 * p:.1f} %" for n, p in result.fractions().items()))
    return result


@dataclass(frozen=True)
class VolumeComparison:
    """What :func:`compare_volume` wrote: the comparison, the output files, the
    directory, the seconds it took."""

    comparison: ModelComparison
    files: list[Any]
    out_dir: Any
    seconds: float


def compare_volume(models: Sequence[str], dwi: str | os.PathLike[str], bval: str | os.PathLike[str],
                   bvec: str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
                   mask: str | os.PathLike[str] | None = None, criterion: str = "bic",
                   solver: str = "fingerprint", threads: int | None = None,
                   prefix: str | None = None, delta: ArrayLike | None = None,
                   Delta: ArrayLike | None = None, TE: ArrayLike | None = None,
                   preview: bool = True, fit_options: Mapping[str, Any] | None = None
                   ) -> VolumeComparison:
    """Fit named models (``fingerprint dictionary models``) to a DWI volume with
    ``solver``, compare them by ``criterion`` voxel by voxel and write, into
    ``out_dir``: the winning-model index map
    (``<prefix>_model-comparison_desc-<criterion>Winner_dwimap.nii.gz``, its JSON
    sidecar holding the legend index -> model and the share of voxels each won; -1
    outside the mask), one criterion map per model
    (``<prefix>_model-<model>_param-<criterion>_dwimap.nii.gz``) and, with ``preview``,
    a PNG of the middle slices. The volume is held in memory (float32)."""
    from fingerprint.fitting.pipeline import (  # lazy: keeps numba off import
        check_output_directory,
        open_inputs,
        volume_mask,
    )

    t0 = time.perf_counter()
    names = [str(m) for m in models]
    if len(names) < 2:
        raise InputError(f"give at least two models to compare, got {names}")
    if len(set(names)) != len(names):
        raise InputError(f"models to compare must differ, got {names}")
    for name in names:
        get_recipe(name)  # unknown names fail before any file is read
    criterion = str(criterion).lower()
    if criterion not in CRITERIA:
        raise InputError(f"criterion must be one of {', '.join(CRITERIA)}, got "
                         f"{criterion!r}")
    image, scheme, mask_arr, _ = open_inputs(dwi, bval, bvec, mask, delta, Delta, TE)
    out = check_output_directory(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if mask_arr is None:
        mask_arr = volume_mask(image, scheme, "positive_b0")
    data = np.asarray(image.img.dataobj, dtype=np.float32)
    fits = {}
    for name in names:
        model = get_model(name)
        logger.info("comparison: fitting %s with solver %r", name, solver)
        fit = model.fit(scheme, data, mask=mask_arr, solver=solver, n_jobs=threads,
                        **dict(fit_options or {}))
        # named models are multi-compartment or spherical-mean models (never the
        # spherical-harmonics framework, whose fit has no information criteria)
        assert isinstance(fit, FittedMultiCompartmentModel)
        fits[name] = fit
    comparison = compare_models(fits, data, criterion=criterion)
    files: list[Path] = []
    common = {"Criterion": criterion.upper(), "Solver": solver,
              "NoiseModel": "Gaussian, one unknown variance per voxel",
              "Sources": [Path(str(dwi)).name]}
    legend = comparison.legend()
    winner_name = bids_map_name(prefix or "", "comparison", None,
                                desc=f"{criterion}Winner")
    files.extend(write_map(comparison.winner.astype(np.float32), image.img, out,
                           winner_name, {**common, "Description":
                                         f"index of the model with the lowest "
                                         f"{criterion.upper()} per voxel", **legend}))
    previews: dict[str, Any] = {"winner": comparison.winner.astype(np.float32)}
    for name in names:
        values = np.nan_to_num(comparison.values[name], nan=0.0).astype(np.float32)
        fname = bids_map_name(prefix or "", name, criterion)
        files.extend(write_map(values, image.img, out, fname, {
            **common, "Model": name, "NumberOfFreeParameters":
                comparison.n_free_parameters[name],
            "Description": f"{criterion.upper()} of the {name} fit (lower is better)"}))
        previews[f"{criterion} {name}"] = values
    if preview:
        png = out / bids_map_name(prefix or "", "comparison", None,
                                  desc=f"{criterion}Winner", extension=".png",
                                  suffix="preview")
        files.append(write_preview(previews, png, title=" / ".join(
            f"{i}: {n}" for i, n in enumerate(names))))
    return VolumeComparison(comparison, files, out, time.perf_counter() - t0)
