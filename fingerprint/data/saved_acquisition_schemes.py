"""Named acquisition schemes used throughout dmipy's tutorials and tests (SI units).

The gradient tables are package data (``fingerprint/data/schemes``):

* ``wu_minn_hcp``: the WU-Minn Human Connectome Project scheme, 288 measurements
  (18 b0 and 90 directions on each of b = 1000, 2000, 3000 s/mm²), pulse duration
  delta = 10.6 ms, separation Delta = 43.1 ms (FSL ``.bval`` / ``.bvec`` files).
* ``duval_cat_spinal_cord_2d``: a 2-D q-space scheme after the ex vivo cat spinal cord
  acquisition of Duval et al. (2015): gradients along the four diagonals of the plane
  transverse to the cord, 50 gradient strengths up to 0.6 T/m per axis (0.849 T/m along
  the diagonals), four b0s per timing, nine (Delta, delta, TE) timings from
  (7, 3, 36.2) ms to (40, 8, 62.3) ms (Camino ``STEJSKALTANNER`` file). It reproduces the
  published design (several diffusion times and pulse durations), not the measured table
  measurement for measurement.
* ``panagiotaki_verdict``: the VERDICT protocol of Panagiotaki et al. (2015): b = 90,
  500, 1500, 2000, 3000 s/mm² with (delta, Delta, TE) = (3.9, 23.8, 50), (11.4, 31.3, 65),
  (23.9, 43.8, 90), (14.4, 34.3, 71), (18.9, 38.8, 80) ms, three orthogonal directions and
  a b0 at each timing (20 measurements). dmipy downloads the Camino tutorial's VERDICT
  table instead; this one is written from the published protocol and ships with the
  package.

Not shipped: dmipy's ``duval_cat_spinal_cord_3d``, ``de_santis_generated`` and
``isbi2015_white_matter_challenge`` schemes are measured (or simulation-generated)
tables whose measurement-by-measurement gradients and timings the published descriptions
do not give (they give ranges: numbers of shells, gradient strengths, diffusion times),
so they cannot be rebuilt faithfully from them. Their functions keep dmipy's names and
read the table from a Camino scheme file the caller has (``schemefile``); without one
they raise an InputError saying so.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

import numpy as np

from fingerprint.core.acquisition_scheme import (
    AcquisitionScheme,
    acquisition_scheme_from_bvalues,
    acquisition_scheme_from_schemefile,
)
from fingerprint.errors import InputError

__all__ = [
    "SCHEME_DIRECTORY",
    "de_santis_generated_acquisition_scheme",
    "duval_cat_spinal_cord_2d_acquisition_scheme",
    "duval_cat_spinal_cord_3d_acquisition_scheme",
    "isbi2015_white_matter_challenge_scheme",
    "panagiotaki_verdict_acquisition_scheme",
    "wu_minn_hcp_acquisition_scheme",
]

#: Folder of the shipped gradient tables.
SCHEME_DIRECTORY = Path(str(resources.files("fingerprint.data").joinpath("schemes")))

#: HCP WU-Minn pulse duration and separation (s).
HCP_DELTA = 0.0106
HCP_BIG_DELTA = 0.0431


def wu_minn_hcp_acquisition_scheme() -> AcquisitionScheme:
    """The WU-Minn HCP scheme: 288 measurements, b = 0/1000/2000/3000 s/mm² (stored in
    s/m²), delta = 10.6 ms, Delta = 43.1 ms."""
    bvals = np.loadtxt(SCHEME_DIRECTORY / "wu_minn_hcp.bval") * 1e6
    bvecs = np.loadtxt(SCHEME_DIRECTORY / "wu_minn_hcp.bvec").T
    return acquisition_scheme_from_bvalues(bvals, bvecs, HCP_DELTA, HCP_BIG_DELTA)


def duval_cat_spinal_cord_2d_acquisition_scheme() -> AcquisitionScheme:
    """2-D q-space scheme of the ex vivo cat spinal cord design (Duval et al. 2015):
    1836 measurements with nine (Delta, delta, TE) timings (see the module docstring)."""
    return acquisition_scheme_from_schemefile(
        SCHEME_DIRECTORY / "duval_cat_spinal_cord_2d.scheme")


def panagiotaki_verdict_acquisition_scheme() -> AcquisitionScheme:
    """The VERDICT protocol (Panagiotaki et al. 2015): five b-values with their own
    (delta, Delta, TE), three orthogonal directions and a b0 each (20 measurements)."""
    table = np.loadtxt(SCHEME_DIRECTORY / "panagiotaki_verdict.txt")
    return acquisition_scheme_from_bvalues(table[:, 3], table[:, :3], table[:, 4],
                                           table[:, 5], TE=table[:, 6])


def _not_shipped(name: str, what: str, schemefile: str | os.PathLike[str] | None,
                 **options: float) -> AcquisitionScheme:
    if schemefile is None:
        raise InputError(f"{name}: the {what} is a measured gradient table that fingerprint "
                         f"does not ship (the published description does not give it "
                         f"measurement by measurement); pass the Camino scheme file you "
                         f"have as schemefile=...")
    return acquisition_scheme_from_schemefile(schemefile, **options)


def duval_cat_spinal_cord_3d_acquisition_scheme(
        schemefile: str | os.PathLike[str] | None = None) -> AcquisitionScheme:
    """The 3-D q-space scheme of the ex vivo cat spinal cord (Duval et al. 2015), read
    from its Camino scheme file ``schemefile`` (not shipped: see the module docstring);
    shells closer than 20e6 s/m² (20 s/mm²) are merged, as dmipy does."""
    return _not_shipped("duval_cat_spinal_cord_3d_acquisition_scheme",
                        "3-D cat spinal cord scheme", schemefile, min_b_shell_distance=20e6)


def de_santis_generated_acquisition_scheme(
        schemefile: str | os.PathLike[str] | None = None) -> AcquisitionScheme:
    """The Camino-generated scheme of De Santis et al., read from its Camino scheme file
    ``schemefile`` (not shipped: see the module docstring)."""
    return _not_shipped("de_santis_generated_acquisition_scheme",
                        "De Santis Camino-generated scheme", schemefile)


def isbi2015_white_matter_challenge_scheme(
        schemefile: str | os.PathLike[str] | None = None) -> AcquisitionScheme:
    """The 35-shell scheme of the ISBI 2015 White Matter Modeling Challenge (Connectom
    scanner, Ferizi et al. 2017), read from its Camino scheme file ``schemefile`` (not
    shipped: see the module docstring)."""
    return _not_shipped("isbi2015_white_matter_challenge_scheme",
                        "ISBI 2015 challenge scheme", schemefile)
