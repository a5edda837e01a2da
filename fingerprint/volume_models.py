"""Named models fitted per volume rather than by dictionary matching (``mc_csd``).

They share the named models' entry points (``fingerprint fit --model NAME``,
:func:`fingerprint.fitting.pipeline.fit_volume`, server jobs) but need the whole volume
(tissue responses estimated from the data) and write maps of their own (4-D spherical
harmonics, peaks). Each declares its description, reference, options, scheme
requirements and output maps here, like a recipe does for the dictionary models.

>>> from fingerprint.volume_models import VOLUME_MODELS, is_volume_model
>>> is_volume_model("mc_csd"), VOLUME_MODELS["mc_csd"].outputs["fod"]
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TypeGuard

from fingerprint.errors import InputError

__all__ = ["VOLUME_MODELS", "VolumeModel", "get_volume_model", "is_volume_model"]


@dataclass(frozen=True)
class VolumeModel:
    """A named model fitted per volume: what it is, its options and its outputs."""

    name: str
    description: str
    reference: str
    #: option name -> (default, description)
    options: Mapping[str, tuple[object, str]] = field(default_factory=dict)
    #: output map label -> description
    outputs: Mapping[str, str] = field(default_factory=dict)
    #: scheme requirements, in words
    requirements: str = ""
    #: ``module:function`` fitting a volume with the keywords of
    #: :func:`fingerprint.fitting.pipeline.fit_volume` it shares (resolved when used, so
    #: that the volume runner and the model's module do not import each other)
    runner: str = ""


MC_CSD = VolumeModel(
    name="mc_csd",
    description=(
        "Multi-shell multi-tissue constrained spherical deconvolution (white matter, grey "
        "matter, CSF): a non-negative white-matter fibre orientation distribution (FOD) in "
        "spherical harmonics plus isotropic grey-matter and CSF fractions, with tissue "
        "responses estimated from the data (Dhollander 2016) or read from MRtrix3 response "
        "files. Outputs follow MRtrix3's conventions (orthonormal SH basis, scanner frame, "
        "sh2peaks layout)."),
    reference=("Jeurissen B, Tournier J-D, Dhollander T, Connelly A, Sijbers J. Multi-tissue "
               "constrained spherical deconvolution for improved analysis of multi-shell "
               "diffusion MRI data. NeuroImage 103 (2014) 411-426; Dhollander T, Raffelt D, "
               "Connelly A. Unsupervised 3-tissue response function estimation from "
               "single-shell or multi-shell diffusion MR data without a co-registered T1 "
               "image. ISMRM Workshop on Breaking the Barriers of Diffusion MRI (2016) 5."),
    options={
        "sh_order": (8, "even SH order of the white-matter FOD (lmax)"),
        "responses": (None, "three MRtrix3 response files (white matter, grey matter, CSF; "
                            "one row per shell, increasing b) instead of estimating them"),
        "max_peaks": (3, "peaks written per voxel"),
        "relative_peak_threshold": (0.1, "smallest peak, relative to the voxel's largest"),
        "absolute_peak_threshold": (0.1, "smallest peak amplitude (FOD units: a voxel of "
                                         "pure single-fibre white matter peaks near 1)"),
        "wm_algorithm": ("tournier07", "white-matter response selection inside dhollander16 "
                                       "('tournier07' or 'tournier13')"),
    },
    outputs={
        "fod": "white-matter FOD, 4-D: SH coefficients in MRtrix3's orthonormal basis and "
               "order (volume l(l+1)/2 + m), scanner frame (as dwi2fod writes)",
        "wm": "white-matter volume fraction sqrt(4 pi) c_00 (relative to the response)",
        "gm": "grey-matter volume fraction",
        "csf": "CSF volume fraction",
        "wm_signalfraction": "white-matter fraction normalised so the three sum to one "
                             "(also gm_, csf_)",
        "peaks": "FOD peaks in MRtrix3 sh2peaks layout: 4-D, 3 values per peak (x, y, z "
                 "scaled by the peak amplitude), NaN where absent",
        "npeaks": "number of FOD peaks",
        "r2": "coefficient of determination of the fitted signal",
    },
    requirements=("b=0 measurements; at least as many distinct b-values (b=0 included) as "
                  "tissues: three for white matter, grey matter and CSF"),
    runner="fingerprint.fitting.csd_volume:fit_mc_csd_volume",
)

#: The named models fitted per volume, by name.
VOLUME_MODELS: dict[str, VolumeModel] = {MC_CSD.name: MC_CSD}


def is_volume_model(name: object) -> TypeGuard[str]:
    """Whether ``name`` names a model of :data:`VOLUME_MODELS`."""
    return isinstance(name, str) and name.strip().lower().replace("-", "_") in VOLUME_MODELS


def get_volume_model(name: str) -> VolumeModel:
    """The volume model ``name`` (InputError otherwise)."""
    key = str(name).strip().lower().replace("-", "_")
    if key not in VOLUME_MODELS:
        raise InputError(f"{name!r} is not a volume model; volume models: "
                         f"{', '.join(VOLUME_MODELS)}")
    return VOLUME_MODELS[key]
