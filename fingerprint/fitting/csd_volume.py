"""``mc_csd``: multi-shell multi-tissue CSD of a DWI volume, written in MRtrix3's
conventions (what :func:`fingerprint.fitting.pipeline.fit_volume` runs for the volume
model ``mc_csd``; see :mod:`fingerprint.volume_models` for its options and outputs).

Steps: the scheme is checked (:func:`fingerprint.core.scheme_checks.check_csd_scheme`);
tissue responses are read from MRtrix3 response files or estimated from (a sample of at
most :data:`RESPONSE_SAMPLE` voxels of) the data by Dhollander's three-tissue method;
the FSL gradient directions are taken to the scanner frame as MRtrix3 does (x flipped
when the image's affine has a positive determinant, then the affine's rotation), so the
FOD's spherical harmonics and the peaks are in the frame MRtrix3 reads them in; the
masked voxels are deconvolved chunk by chunk (:class:`fingerprint.core.msmt_csd.MsmtCsd`,
memory bounded by the chunk size) and their FOD peaks found
(:func:`fingerprint.core.msmt_csd.fod_peaks_batched`).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fingerprint.core.acquisition_scheme import AcquisitionScheme
from fingerprint.core.csd_peaks import fod_peaks_batched, fod_to_peak_array
from fingerprint.core.msmt_csd import MsmtCsd, TissueResponses
from fingerprint.core.scheme_checks import check_csd_scheme
from fingerprint.errors import InputError
from fingerprint.fitting.pipeline import (
    DEFAULT_CHUNK_VOXELS,
    FitResult,
    _check_cancel,
    _Progress,
    _sidecar,
    check_output_directory,
    open_inputs,
    volume_mask,
)
from fingerprint.fitting.validity import report_unusable, usable_voxels
from fingerprint.io.nifti import DEFAULT_SLAB_BYTES, bids_map_name, write_map
from fingerprint.tissue_response.three_tissue_response import (
    three_tissue_response_dhollander16,
)
from fingerprint.utils.spherical_convolution import check_sh_order
from fingerprint.volume_models import MC_CSD

__all__ = ["RESPONSE_SAMPLE", "fit_mc_csd_volume", "fsl_to_scanner_directions",
           "read_mrtrix_response", "responses_from_data", "responses_from_files",
           "write_mrtrix_response"]

logger = logging.getLogger(__name__)

#: largest number of voxels the tissue responses are estimated from
RESPONSE_SAMPLE = 20_000
_TISSUES = ("wm", "gm", "csf")
_SQRT_4PI = math.sqrt(4.0 * math.pi)


# ----------------------------------------------------------------------------- responses
def read_mrtrix_response(path: str | os.PathLike[str]) -> tuple[np.ndarray, list[float] | None]:
    """An MRtrix3 response file: rows (shells, increasing b) of zonal SH coefficients
    ``R_0, R_2, ...`` and the shells' b-values (s/m²) when a ``# Shells:`` comment gives
    them (else None)."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise InputError(f"response file {p} cannot be read: {exc.strerror or exc}") from None
    rows: list[list[float]] = []
    shells: list[float] | None = None
    for n, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("#"):
            body = stripped.lstrip("#").strip()
            if body.lower().startswith("shells:"):
                try:
                    shells = [float(v) * 1e6 for v in body.split(":", 1)[1].replace(",", " ")
                              .split()]
                except ValueError:
                    raise InputError(f"response file {p}, line {n}: 'Shells:' must list "
                                     "b-values in s/mm²") from None
            continue
        if not stripped:
            continue
        try:
            rows.append([float(v) for v in stripped.replace(",", " ").split()])
        except ValueError:
            raise InputError(f"response file {p}, line {n}: expected numbers (zonal SH "
                             f"coefficients), got {stripped[:40]!r}") from None
    if not rows:
        raise InputError(f"response file {p} has no coefficients")
    width = max(len(r) for r in rows)
    out = np.zeros((len(rows), width))
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    if shells is not None and len(shells) != len(rows):
        raise InputError(f"response file {p}: {len(rows)} rows but {len(shells)} shells in "
                         "its 'Shells:' comment")
    return out, shells


def write_mrtrix_response(path: str | os.PathLike[str], rows: np.ndarray,
                          shell_bvalues: np.ndarray) -> Path:
    """Write an MRtrix3 response file (with its ``# Shells:`` comment, s/mm²)."""
    p = Path(path)
    shells = ",".join(f"{b / 1e6:g}" for b in np.asarray(shell_bvalues, dtype=float))
    lines = [f"# Shells: {shells}"]
    lines += [" ".join(f"{v:.10g}" for v in row) for row in np.atleast_2d(rows)]
    p.write_text("\n".join(lines) + "\n")
    return p


def _scheme_shells(scheme: AcquisitionScheme) -> np.ndarray:
    return np.sort(np.asarray(scheme.shell_bvalues, dtype=float))


def responses_from_files(paths: tuple[str | os.PathLike[str], ...],
                         scheme: AcquisitionScheme) -> TissueResponses:
    """Responses from MRtrix3 response files: white matter first, then the isotropic
    tissues (grey matter, CSF). Rows are matched to the scheme's shells in increasing b
    (or by the files' ``Shells:`` comments)."""
    if len(paths) < 1 or len(paths) > 3:
        raise InputError(f"give one to three response files (wm[, gm[, csf]]), got "
                         f"{len(paths)}")
    shells = _scheme_shells(scheme)
    tables = []
    for path in paths:
        rows, stated = read_mrtrix_response(path)
        b = np.asarray(stated, dtype=float) if stated is not None else shells
        if stated is None and rows.shape[0] != shells.size:
            raise InputError(f"response file {path} has {rows.shape[0]} rows but the scheme "
                             f"has {shells.size} shells ({(shells / 1e6).round(0).tolist()} "
                             "s/mm²) and the file states no 'Shells:'")
        tables.append((b, rows))
    b_wm, wm = tables[0]
    iso = []
    for path, (b, rows) in zip(paths[1:], tables[1:], strict=True):
        if b.shape != b_wm.shape or not np.allclose(b, b_wm, rtol=0.05, atol=50e6):
            raise InputError(f"response file {path} has other shells than the white-matter "
                             "response")
        iso.append(rows[:, 0])
    return TissueResponses.from_arrays(b_wm, wm, iso, _TISSUES[1:1 + len(iso)])


def responses_from_data(scheme: AcquisitionScheme, data: np.ndarray,
                        wm_algorithm: str = "tournier07") -> TissueResponses:
    """White-matter, grey-matter and CSF responses of ``data`` (voxels, N) by
    Dhollander's three-tissue method, in the data's signal units."""
    s0, models, _ = three_tissue_response_dhollander16(scheme, data,
                                                       wm_algorithm=wm_algorithm)
    shells = _scheme_shells(scheme)
    b0 = shells <= scheme.b0_threshold
    wm_model = models[0]
    wm_shells = np.asarray(wm_model.shell_bvalues, dtype=float)
    wm_rh = np.asarray(wm_model.rotational_harmonics, dtype=float)
    wm = np.zeros((shells.size, wm_rh.shape[1]))
    iso = np.zeros((2, shells.size))
    for i, b in enumerate(shells):
        if b0[i]:
            wm[i, 0] = s0[0] * _SQRT_4PI
            iso[:, i] = np.asarray(s0[1:], dtype=float) * _SQRT_4PI
            continue
        k = int(np.argmin(np.abs(wm_shells - b)))
        wm[i] = s0[0] * wm_rh[k]
        for t, model in enumerate(models[1:]):
            kb = int(np.argmin(np.abs(np.asarray(model.shell_bvalues) - b)))
            iso[t, i] = s0[1 + t] * np.asarray(model.rotational_harmonics)[kb, 0]
    return TissueResponses.from_arrays(shells, wm, list(iso), _TISSUES[1:])


# ----------------------------------------------------------------------------- frames
def fsl_to_scanner_directions(directions: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """FSL b-vectors (N, 3) (image axes, x flipped for images stored with a positive
    determinant) to unit vectors in the scanner frame (MRtrix3's convention)."""
    a = np.asarray(affine, dtype=float)[:3, :3]
    scale = np.linalg.norm(a, axis=0)
    if np.any(scale == 0):
        raise InputError("the DWI's affine is singular: no scanner frame for its b-vectors")
    rotation = a / scale
    d = np.asarray(directions, dtype=float).copy()
    if np.linalg.det(a) > 0:
        d[:, 0] = -d[:, 0]
    out = d @ rotation.T
    norm = np.linalg.norm(out, axis=1, keepdims=True)
    return np.where(norm > 0, out / np.where(norm > 0, norm, 1.0), 0.0)


# ----------------------------------------------------------------------------- options
def _options(values: Mapping[str, object] | None) -> dict[str, Any]:
    opts: dict[str, Any] = {k: v[0] for k, v in MC_CSD.options.items()}
    unknown = set(values or {}) - set(opts)
    if unknown:
        raise InputError(f"unknown mc_csd option(s) {sorted(unknown)}; options: "
                         f"{', '.join(opts)}")
    opts.update(values or {})
    opts["sh_order"] = check_sh_order(opts["sh_order"])
    if not 2 <= opts["sh_order"] <= 16:
        raise InputError(f"mc_csd option sh_order must be from 2 to 16, got {opts['sh_order']}")
    mp = opts["max_peaks"]
    if isinstance(mp, bool) or not isinstance(mp, int) or not 1 <= mp <= 6:
        raise InputError(f"mc_csd option max_peaks must be an integer from 1 to 6, got {mp!r}")
    if opts["wm_algorithm"] not in ("tournier07", "tournier13"):
        raise InputError("mc_csd option wm_algorithm must be 'tournier07' or 'tournier13', "
                         f"got {opts['wm_algorithm']!r}")
    for key in ("relative_peak_threshold", "absolute_peak_threshold"):
        v = opts[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
            raise InputError(f"mc_csd option {key} must be a number >= 0, got {v!r}")
    resp = opts["responses"]
    if resp is not None and not isinstance(resp, TissueResponses):
        if isinstance(resp, (str, os.PathLike)):
            resp = (resp,)
        opts["responses"] = tuple(resp)
    return opts


# ----------------------------------------------------------------------------- volume
def fit_mc_csd_volume(dwi: str | os.PathLike[str], bval: str | os.PathLike[str],
                      bvec: str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
                      mask: str | os.PathLike[str] | None = None,
                      prefix: str | None = None,
                      model_options: Mapping[str, object] | None = None,
                      progress: Callable[[float], object] | None = None,
                      should_cancel: Callable[[], bool] | None = None,
                      chunk_voxels: int = DEFAULT_CHUNK_VOXELS, preview: bool = False,
                      b0_threshold: float | None = None,
                      slab_bytes: int = DEFAULT_SLAB_BYTES) -> FitResult:
    """Multi-tissue CSD of a DWI volume; maps, peaks and responses written to ``out_dir``
    (BIDS-derivative NIfTI with JSON sidecars). ``model_options``: see
    ``fingerprint.volume_models.MC_CSD.options``. Returns a
    :class:`~fingerprint.fitting.pipeline.FitResult`."""
    t_start = time.perf_counter()
    opts = _options(model_options)
    if chunk_voxels < 1:
        raise InputError(f"chunk_voxels must be positive, got {chunk_voxels}")
    out_dir = check_output_directory(out_dir)
    prog = _Progress(progress)
    image, scheme, mask_arr, mask_path = open_inputs(dwi, bval, bvec, mask,
                                                      b0_threshold=b0_threshold)
    sh_order = int(opts["sh_order"])
    given = opts["responses"]
    n_tissues = 3 if given is None else (
        given.n_tissues if isinstance(given, TissueResponses) else len(given))
    report = check_csd_scheme(scheme, n_tissues, sh_order)
    report.log(logger)
    report.raise_if_refused(f"DWI file {image.path}")
    prog(0.0)
    if mask_arr is None:
        mask_arr = volume_mask(image, scheme, "b0")
    n_total = int(mask_arr.sum())
    b0_mask = np.asarray(scheme.b0_mask, dtype=bool)
    _check_cancel(should_cancel)

    # -- responses ------------------------------------------------------------------
    t0 = time.perf_counter()
    if isinstance(given, TissueResponses):
        responses = given
    elif given is not None:
        responses = responses_from_files(given, scheme)
    else:
        rng = np.random.default_rng(0)
        keep = min(1.0, RESPONSE_SAMPLE / max(n_total, 1))
        sample = []
        for slab in image.iter_slabs(mask_arr, max_bytes=int(slab_bytes)):
            data = slab.data[usable_voxels(slab.data, b0_mask)]
            if keep < 1.0:
                data = data[rng.random(data.shape[0]) < keep]
            sample.append(np.asarray(data, dtype=float))
            _check_cancel(should_cancel)
        responses = responses_from_data(scheme, np.concatenate(sample),
                                        str(opts["wm_algorithm"]))
    t_resp = time.perf_counter() - t0
    prog(0.1)
    directions = fsl_to_scanner_directions(scheme.gradient_directions, image.affine)
    solver = MsmtCsd(scheme.bvalues, directions, responses, sh_order)
    n_coef = solver.n_coef
    max_peaks = int(opts["max_peaks"])

    # -- fit --------------------------------------------------------------------------
    t0 = time.perf_counter()
    fod = np.full((n_total, n_coef), np.nan, dtype=np.float32)
    fractions = np.full((n_total, 1 + solver.n_iso), np.nan, dtype=np.float32)
    peaks = np.full((n_total, 3 * max_peaks), np.nan, dtype=np.float32)
    npeaks = np.zeros(n_total, dtype=np.float32)
    r2 = np.full(n_total, np.nan, dtype=np.float32)
    rows = np.full(mask_arr.shape, -1, dtype=np.int64)
    rows[mask_arr] = np.arange(n_total)
    unusable: list[np.ndarray] = []
    done = 0
    span = prog.span(0.1, 0.95)
    for slab in image.iter_slabs(mask_arr, max_bytes=int(slab_bytes)):
        for start in range(0, slab.data.shape[0], int(chunk_voxels)):
            _check_cancel(should_cancel)
            data = np.asarray(slab.data[start:start + chunk_voxels], dtype=float)
            coords = slab.coords[start:start + chunk_voxels]
            ok = usable_voxels(data, b0_mask)
            if not ok.all():
                unusable.append(coords[~ok])
            r = rows[coords[ok, 0], coords[ok, 1], coords[ok, 2]]
            if r.size:
                sh, iso = solver.solve(data[ok])
                d, a, c = fod_peaks_batched(sh, sh_order, max_peaks,
                                            float(opts["relative_peak_threshold"]),
                                            float(opts["absolute_peak_threshold"]))
                fod[r] = sh
                fractions[r, 0] = _SQRT_4PI * sh[:, 0]
                fractions[r, 1:] = iso
                peaks[r] = fod_to_peak_array(d, a, c)
                npeaks[r] = c
                pred = np.concatenate([sh, iso], axis=1) @ solver.design.T
                res = np.sum((data[ok] - pred) ** 2, axis=1)
                tot = np.sum((data[ok] - data[ok].mean(axis=1, keepdims=True)) ** 2, axis=1)
                with np.errstate(divide="ignore", invalid="ignore"):
                    r2[r] = np.where(tot > 0, 1.0 - res / tot, np.nan)
            done += coords.shape[0]
            span(done / max(n_total, 1))
    t_fit = time.perf_counter() - t0
    bad = np.concatenate(unusable) if unusable else np.zeros((0, 3), dtype=np.int64)
    if bad.shape[0]:
        report_unusable(bad[np.lexsort(bad.T[::-1])], n_total,
                        source=f"DWI file {image.path}")

    # -- write ------------------------------------------------------------------------
    t0 = time.perf_counter()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"output directory {out_dir} cannot be created: "
                         f"{exc.strerror or exc}") from None
    pref = prefix or ""
    sources = [Path(os.fspath(p)).name for p in (dwi, bval, bvec)]
    if mask_path is not None:
        sources.append(mask_path.name)
    model_info = {"Name": MC_CSD.name, "Class": "MultiShellMultiTissueCSD",
                  "Description": MC_CSD.description, "Reference": MC_CSD.reference,
                  "Options": {k: (v if not isinstance(v, TissueResponses) else "given")
                              if not isinstance(v, tuple) else [str(x) for x in v]
                              for k, v in opts.items()}}
    frame = {"Frame": "scanner (MRtrix3: FSL b-vectors with x flipped for a positive-"
                      "determinant affine, rotated by the affine)"}
    common = {"FittedVoxels": n_total, "UnusableInputVoxels": int(bad.shape[0]),
              "TissueResponses": {"ShellBValues_s_per_mm2":
                                  [b / 1e6 for b in responses.shell_bvalues],
                                  "Tissues": ["wm", *responses.isotropic_names]}}
    files: list[Path] = []
    maps: dict[str, Path] = {}
    model_label = MC_CSD.name

    def volume(values: np.ndarray) -> np.ndarray:
        vol = np.zeros(image.spatial_shape + values.shape[1:], dtype=np.float32)
        vol[mask_arr] = values
        return vol

    def emit(label: str, values: np.ndarray, units: str, description: str,
             extra: dict[str, Any] | None = None) -> None:
        name = bids_map_name(pref, model_label, label)
        sidecar = _sidecar(label=label, parameter=None, units=units, description=description,
                           model_info=model_info, sources=sources,
                           extra={**common, **(extra or {})}, solver="mc_csd")
        nii, js = write_map(volume(values), image.img, out_dir, name, sidecar)
        files.extend([nii, js])
        maps[label] = nii

    emit("fod", fod, "n/a", MC_CSD.outputs["fod"],
         {"SphericalHarmonics": {"Basis": "MRtrix3 real orthonormal: Y_lm = sqrt(2) "
                                          "Im[Y_l^|m|] (m<0), Y_l^0, sqrt(2) Re[Y_l^m] (m>0), "
                                          "Condon-Shortley phase",
                                 "Ordering": "volume l(l+1)/2 + m, even l only",
                                 "MaxOrder": sh_order, "Coefficients": n_coef},
          **frame})
    total = np.nansum(np.maximum(fractions, 0.0), axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        signal_fractions = np.where(total > 0, np.maximum(fractions, 0.0) / total, np.nan)
    tissues = ["wm", *responses.isotropic_names]
    for t, tissue in enumerate(tissues):
        emit(tissue, fractions[:, t], "n/a", MC_CSD.outputs.get(
            tissue, f"{tissue} volume fraction"))
        emit(f"{tissue}_signalfraction", signal_fractions[:, t], "n/a",
             f"{tissue} fraction normalised so the tissue fractions sum to one")
    emit("peaks", peaks, "n/a", MC_CSD.outputs["peaks"],
         {"PeakLayout": "sh2peaks: [x1 y1 z1 x2 y2 z2 ...], each vector's norm its FOD "
                        "amplitude", "MaxPeaks": max_peaks, **frame})
    emit("npeaks", npeaks, "n/a", MC_CSD.outputs["npeaks"])
    emit("r2", r2, "n/a", MC_CSD.outputs["r2"])
    shells = np.asarray(responses.shell_bvalues, dtype=float)
    for t, tissue in enumerate(tissues):
        rows_t = np.asarray(responses.white_matter) if t == 0 else \
            np.asarray(responses.isotropic)[t - 1][:, None]
        path = out_dir / bids_map_name(pref, model_label, None, desc=f"{tissue}response",
                                       suffix=None, extension=".txt")
        files.append(write_mrtrix_response(path, rows_t, shells))
    preview_path = None
    if preview:
        # lazy: the preview is only loaded when a preview is asked for
        from fingerprint.preview import write_preview

        first = np.nan_to_num(peaks[:, :3])
        amp = np.linalg.norm(first, axis=1, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            dec = np.where(amp > 0, first / amp, 0.0) * np.clip(
                np.nan_to_num(fractions[:, :1]), 0, 1)
        preview_path = write_preview(
            {"peak 1 (DEC x wm)": volume(dec), **{t: maps[t] for t in tissues},
             "npeaks": maps["npeaks"]},
            out_dir / bids_map_name(pref, model_label, None, desc="preview", suffix=None,
                                    extension=".png"), title=f"fingerprint {model_label}")
        files.append(preview_path)
    t_write = time.perf_counter() - t0
    prog(1.0)
    n_invalid = int(n_total - np.isfinite(r2).sum())
    return FitResult(files=files, n_voxels=n_total, seconds=time.perf_counter() - t_start,
                     out_dir=out_dir, maps=maps, n_invalid=n_invalid,
                     n_unusable=int(bad.shape[0]), model=model_label, preview=preview_path,
                     timings={"responses": t_resp, "fit": t_fit, "write": t_write})
