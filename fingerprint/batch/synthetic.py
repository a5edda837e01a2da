"""Small synthetic studies (raw BIDS or QSIPrep layout) for tests, demos and benchmarks.

Subjects alternate between two acquisition schemes:

* scheme A: 3 b=0, b=1000 and b=2000 s/mm² (12 directions each), pulse timing in the JSON
  sidecar (``DiffusionGradientDuration`` 15 ms, ``DiffusionGradientSeparation`` 35 ms);
* scheme B: 3 b=0, b=700 (10 directions) and b=2000 (14 directions) with the b-values
  jittered by ±5 s/mm² as scanners write them, no timing; in raw BIDS its series are
  MRtrix ``.mif.gz`` files when ``mif`` is true (gradient table in the header).

Each series is a NODDI phantom (:func:`fingerprint.phantoms.noddi_phantom`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fingerprint.core.acquisition_scheme import (
    AcquisitionScheme,
    acquisition_scheme_from_bvalues,
)
from fingerprint.io.gradients import write_bvals_bvecs
from fingerprint.io.mif import fsl_to_scanner_gradients, write_mif
from fingerprint.io.nifti import atomic_write_json, atomic_write_nifti
from fingerprint.phantoms import default_scheme, noddi_phantom

__all__ = ["scheme_a", "scheme_b", "write_study"]


def scheme_a() -> AcquisitionScheme:
    """Scheme A (SI units, with timing)."""
    return default_scheme(n_b0=3, shells=((1000.0, 12), (2000.0, 12)))


def scheme_b() -> AcquisitionScheme:
    """Scheme B (SI units, jittered b-values, no timing)."""
    base = default_scheme(n_b0=3, shells=((700.0, 10), (2000.0, 14)))
    b = np.asarray(base.bvalues, dtype=float).copy()
    dwi = ~np.asarray(base.b0_mask)
    b[dwi] += np.resize([-5e6, 0.0, 5e6], int(dwi.sum()))
    return acquisition_scheme_from_bvalues(b, np.asarray(base.gradient_directions))


def write_study(root: str | Path, *, subjects: int = 2, layout: str = "bids",
                shape: tuple[int, int, int] = (3, 3, 2), snr: float = 40.0,
                mif: bool = True, sessions: bool = True, seed: int = 0) -> list[Path]:
    """Write a study under ``root``; returns the DWI files written.

    ``layout`` is ``"bids"`` (``sub-XX/ses-1/dwi/sub-XX_ses-1_dwi.*``) or ``"qsiprep"``
    (``sub-XX/dwi/sub-XX_space-T1w_desc-preproc_dwi.nii.gz`` with a brain mask and a
    ``dataset_description.json`` naming QSIPrep).
    """
    import nibabel as nib  # lazy: keeps nibabel off import

    if layout not in ("bids", "qsiprep"):
        raise ValueError(f"layout must be 'bids' or 'qsiprep', got {layout!r}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    desc: dict[str, object] = {"Name": "synthetic fingerprint study", "BIDSVersion": "1.9.0"}
    if layout == "qsiprep":
        desc.update(DatasetType="derivative",
                    GeneratedBy=[{"Name": "qsiprep", "Version": "synthetic"}])
    atomic_write_json(desc, root / "dataset_description.json")
    schemes = (scheme_a(), scheme_b())
    written = []
    for i in range(subjects):
        sub = f"sub-{i + 1:02d}"
        which = i % 2
        scheme = schemes[which]
        phantom = noddi_phantom(shape=shape, seed=seed + i, snr=snr, scheme=scheme)
        affine = np.asarray(phantom["affine"])
        if layout == "bids":
            folder = root / sub / "ses-1" / "dwi" if sessions else root / sub / "dwi"
            stem = f"{sub}_ses-1" if sessions else sub
        else:
            folder = root / sub / "dwi"
            stem = f"{sub}_space-T1w_desc-preproc"
        folder.mkdir(parents=True, exist_ok=True)
        data = np.asarray(phantom["dwi"], dtype=np.float32)
        bval, bvec = folder / f"{stem}_dwi.bval", folder / f"{stem}_dwi.bvec"
        write_bvals_bvecs(scheme, bval, bvec)
        if layout == "bids" and mif and which == 1:
            grad = np.column_stack([
                fsl_to_scanner_gradients(np.loadtxt(bvec), affine), np.loadtxt(bval)])
            dwi = write_mif(folder / f"{stem}_dwi.mif.gz", data, affine, grad)
            bval.unlink()
            bvec.unlink()
        else:
            img = nib.Nifti1Image(data, affine)
            img.set_qform(affine, 1)
            img.set_sform(affine, 1)
            dwi = atomic_write_nifti(img, folder / f"{stem}_dwi.nii.gz")
        if which == 0:
            (folder / f"{stem}_dwi.json").write_text(json.dumps(
                {"DiffusionGradientDuration": 0.015, "DiffusionGradientSeparation": 0.035}))
        if layout == "qsiprep":
            base = stem.replace("_desc-preproc", "")
            mask = nib.Nifti1Image(np.asarray(phantom["mask"], dtype=np.uint8), affine)
            atomic_write_nifti(mask, folder / f"{base}_desc-brain_mask.nii.gz")
        written.append(dwi)
    return written
