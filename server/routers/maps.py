"""/v1/jobs/{id}/summary and /v1/jobs/{id}/maps/{label}/volume: what the web page's viewer
needs to show a finished fit.

The summary describes the job (model, solver, acquisition scheme, timing) and each map
(kind, units, display range, histogram inside the mask). The volume endpoint sends one
map as compact bytes for the page to render slices itself: one byte per voxel for a
scalar map (0 outside the mask, 1-255 spanning the summary's display range) and three
bytes per voxel (red, green, blue = |x|, |y|, |z| x 255) for a direction map. Both are
computed once per job and cached beside its outputs, so a 1M-voxel map is 1 MB over the
wire and opens without reading the NIfTI again.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter
from fastapi import Path as PathParam
from fastapi.responses import Response

from ..db import Job
from ..dependencies import ApiError, CallerKey, Context, ServerContext
from ..schemas import ErrorBody, JobSummary, Responses
from ..services import finished_fit

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/jobs", tags=["viewer"])

__all__ = ["HISTOGRAM_BINS", "router"]

#: Bins of each map's histogram.
HISTOGRAM_BINS = 64
#: Version of the cached viewer files (bump when their format changes).
_CACHE_VERSION = 2

_MAP_NAME = re.compile(r"_param-([A-Za-z0-9]+)(_desc-([A-Za-z0-9]+))?_dwimap\.nii(\.gz)?$")
_LABEL = re.compile(r"^[A-Za-z0-9]+(-[A-Za-z0-9]+)?$")
_UNIT_WORDS = {"n/a": "dimensionless", "arbitrary": "arbitrary units (scanner)"}

JobId = Annotated[str, PathParam(description="job id", max_length=64)]
Label = Annotated[str, PathParam(description="map label, e.g. odi or odi-uncertainty",
                                 max_length=80)]

_ERRORS: Responses = {
    401: {"model": ErrorBody, "description": "missing or invalid API key"},
    404: {"model": ErrorBody, "description": "no such job or map (or not yours)"},
    409: {"model": ErrorBody, "description": "the job has not succeeded"},
}

_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


def _job_lock(job_id: str) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(job_id, threading.Lock())


def _maps(job: Job) -> dict[str, str]:
    """label -> NIfTI file name of the job's maps (``odi``, ``odi-uncertainty``, ...)."""
    out: dict[str, str] = {}
    for name in job.outputs:
        match = _MAP_NAME.search(name)
        if match:
            label = match.group(1) + (f"-{match.group(3)}" if match.group(3) else "")
            out[label] = name
    return out


def _sidecar(directory: Path, name: str) -> dict[str, Any]:
    path = directory / re.sub(r"\.nii(\.gz)?$", ".json", name)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _load(path: Path) -> np.ndarray:
    import nibabel as nib

    return np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)


def _voxel_size(path: Path) -> list[float]:
    """The voxel size (mm) of a NIfTI, for the viewer's aspect ratio (1 mm if unknown)."""
    import nibabel as nib

    try:
        zooms = [float(z) for z in nib.load(str(path)).header.get_zooms()[:3]]
    except Exception:  # an odd header: square voxels
        return [1.0, 1.0, 1.0]
    return [z if np.isfinite(z) and z > 0 else 1.0 for z in zooms]


def _mask(ctx: ServerContext, job: Job, maps: dict[str, str],
          shape: tuple[int, ...]) -> np.ndarray:
    """Voxels the maps describe: the uploaded mask when there is one, else the fitted
    voxels (non-zero s0; every map is 0 outside the mask)."""
    mask_name = job.inputs.get("mask")
    if mask_name:
        try:
            mask = _load(ctx.storage.inputs_dir(job.id) / mask_name)
            mask = mask.reshape(mask.shape[:3]) if mask.ndim > 3 else mask
            if mask.shape == shape:
                return np.isfinite(mask) & (mask > 0)
        except Exception:  # an unreadable mask: fall back to the fitted voxels
            logger.info("job %s: mask unreadable for the viewer", job.id)
    outputs = ctx.storage.outputs_dir(job.id)
    if "s0" in maps:
        s0 = _load(outputs / maps["s0"])
        if s0.shape == shape:
            return np.isfinite(s0) & (s0 != 0)
    return np.ones(shape, dtype=bool)


def _scheme_summary(ctx: ServerContext, job: Job) -> dict[str, Any]:
    """Measurements and shells (b-values rounded to 50 s/mm²) of the uploaded bval."""
    name = job.inputs.get("bval")
    if not name:
        return {}
    try:
        text = (ctx.storage.inputs_dir(job.id) / name).read_text()
        bvals = np.array(text.split(), dtype=float)
    except (OSError, ValueError):
        return {}
    rounded = np.round(bvals / 50.0) * 50.0
    shells, counts = np.unique(rounded, return_counts=True)
    out: dict[str, Any] = {
        "measurements": int(bvals.size),
        "shells": [{"bval": float(b), "count": int(c)}
                   for b, c in zip(shells, counts, strict=True)],
        "units": "s/mm²",
    }
    for name in ("delta", "Delta", "TE"):
        if job.options.get(name) is not None:
            out[name] = float(job.options[name])
    return out


def _seconds_between(start: str | None, end: str | None) -> float | None:
    import datetime as dt

    if not start or not end:
        return None
    try:
        return (dt.datetime.fromisoformat(end) - dt.datetime.fromisoformat(start)) \
            .total_seconds()
    except ValueError:
        return None


def _build(ctx: ServerContext, job: Job, cache: Path) -> JobSummary:
    """Compute the summary and every map's byte volume into ``cache``."""
    outputs = ctx.storage.outputs_dir(job.id)
    maps = _maps(job)
    entries: list[dict[str, Any]] = []
    mask: np.ndarray | None = None
    shape: tuple[int, ...] | None = None
    sidecars: dict[str, dict[str, Any]] = {}
    tmp = cache.with_name(cache.name + f".tmp-{os.getpid()}-{threading.get_ident()}")
    tmp.mkdir(parents=True, exist_ok=True)
    order = sorted(maps, key=lambda label: ("-" in label, label in ("s0", "r2"), label))
    for index, label in enumerate(order):
        name = maps[label]
        data = _load(outputs / name)
        sidecar = _sidecar(outputs, name)
        sidecars[label] = sidecar
        spatial = tuple(int(n) for n in data.shape[:3])
        if mask is None or spatial != shape:
            shape = spatial
            mask = _mask(ctx, job, maps, shape)
        is_direction = data.ndim == 4 and data.shape[3] == 3
        units = str(sidecar.get("Units") or "n/a")
        entry: dict[str, Any] = {
            "label": label, "file": name, "kind": "direction" if is_direction else "scalar",
            "shape": list(spatial), "units": units, "units_text": _UNIT_WORDS.get(units, units),
            "description": str(sidecar.get("Description") or label),
            "volume": f"{index}.bin",
        }
        if is_direction:
            vectors = np.nan_to_num(data[..., :3], nan=0.0, posinf=0.0, neginf=0.0)
            rgb = np.clip(np.abs(vectors) * 255.0 + 0.5, 0, 255).astype(np.uint8)
            rgb[~mask] = 0
            payload = np.ascontiguousarray(rgb).tobytes()
        else:
            values = data.reshape(spatial) if data.ndim > 3 else data
            inside = mask & np.isfinite(values)
            picked = values[inside]
            if picked.size:
                lo, hi = float(picked.min()), float(picked.max())
            else:
                lo, hi = 0.0, 1.0
            if not hi > lo:
                hi = lo + (abs(lo) or 1.0) * 1e-6 if lo else 1.0
            counts, edges = np.histogram(picked, bins=HISTOGRAM_BINS, range=(lo, hi))
            entry.update({
                "min": lo, "max": hi,
                "mean": float(picked.mean()) if picked.size else None,
                "median": float(np.median(picked)) if picked.size else None,
                "histogram": {"edges": [float(e) for e in edges],
                              "counts": [int(c) for c in counts]},
            })
            scaled = np.zeros(spatial, dtype=np.uint8)
            q = np.clip((values[inside] - lo) / (hi - lo), 0.0, 1.0)
            scaled[inside] = (1 + np.round(q * 254)).astype(np.uint8)
            payload = scaled.tobytes()
        (tmp / entry["volume"]).write_bytes(payload)
        entries.append(entry)
    first = next(iter(sidecars.values()), {})
    model_info = first.get("Model") or {}
    generated = (first.get("GeneratedBy") or [{}])[0]
    dictionary = first.get("Dictionary") or {}
    result = job.result
    summary = {
        "version": _CACHE_VERSION,
        "job": job.id,
        "model": {"name": job.model, "class": model_info.get("Class"),
                  "description": model_info.get("Description"),
                  "reference": model_info.get("Reference")},
        "solver": {"name": str(first.get("Solver") or result.get("solver")
                               or job.options.get("solver") or "fingerprint"),
                   "description": generated.get("Description"),
                   "software": f"{generated.get('Name', 'fingerprint')} "
                               f"{generated.get('Version', '')}".strip(),
                   "dictionary_atoms": dictionary.get("Atoms")},
        "scheme": _scheme_summary(ctx, job),
        "timing": {"fit_seconds": result.get("seconds"),
                   "queued_seconds": _seconds_between(job.created, job.started),
                   "run_seconds": _seconds_between(job.started, job.finished),
                   "voxels": result.get("n_voxels"),
                   "fitted_voxels": first.get("FittedVoxels"),
                   "invalid_voxels": first.get("InvalidVoxels")},
        "mask_voxels": int(mask.sum()) if mask is not None else 0,
        "shape": list(shape) if shape else [],
        "voxel_size": _voxel_size(outputs / maps[order[0]]) if order else [1.0, 1.0, 1.0],
        "maps": entries,
    }
    (tmp / "summary.json").write_text(json.dumps(summary))
    old = cache.with_name(cache.name + ".old")
    if cache.exists():
        os.rename(cache, old)
    os.rename(tmp, cache)
    if old.exists():
        import shutil

        shutil.rmtree(old, ignore_errors=True)
    return JobSummary.model_validate(summary)


def _summary(ctx: ServerContext, job: Job) -> tuple[JobSummary, Path]:
    cache = ctx.storage.job_dir(job.id) / "viewer"
    with _job_lock(job.id):
        try:
            summary = JobSummary.model_validate_json((cache / "summary.json").read_text())
            if summary.version == _CACHE_VERSION:
                return summary, cache
        except (OSError, ValueError):  # missing, unreadable or another format: rebuilt
            pass
        missing = [n for n in job.outputs if not (ctx.storage.outputs_dir(job.id) / n)
                   .is_file()]
        if missing:
            raise ApiError(410, f"the result files of job {job.id} are gone")
        return _build(ctx, job, cache), cache


@router.get("/{job_id}/summary", summary="Model, solver, scheme, timing and maps of a fit",
            response_model=JobSummary, response_model_exclude_unset=True,
            response_model_by_alias=True, responses=_ERRORS)
def get_summary(job_id: JobId, ctx: Context, key: CallerKey) -> JobSummary:
    """What the web page's viewer shows: the model, solver, acquisition scheme summary,
    timing, and for each map its kind (``scalar`` or ``direction``), units, display
    range and histogram inside the mask (``HISTOGRAM_BINS`` bins from min to max)."""
    job = finished_fit(ctx, key.id, job_id, "maps")
    summary, _ = _summary(ctx, job)
    return summary


@router.get("/{job_id}/maps/{label}/volume", summary="One map as bytes for the viewer",
            response_class=Response,
            responses={**_ERRORS, 200: {"content": {"application/octet-stream": {}},
                                        "description": "uint8 voxels, C order (x, y, z)"}})
def get_volume(job_id: JobId, label: Label, ctx: Context, key: CallerKey) -> Response:
    """A map as ``uint8`` voxels in C order over (x, y, z): scalar maps one byte per voxel
    (0 outside the mask, 1-255 from the summary's ``min`` to ``max``), direction maps
    three (|x|, |y|, |z| x 255: direction-encoded colour)."""
    job = finished_fit(ctx, key.id, job_id, "maps")
    if not _LABEL.match(label):
        raise ApiError(404, f"job {job_id} has no map {label[:80]!r}")
    summary, cache = _summary(ctx, job)
    entry = next((m for m in summary.maps if m.label == label), None)
    if entry is None:
        raise ApiError(404, f"job {job_id} has no map {label!r}")
    data = (cache / entry.volume).read_bytes()
    return Response(data, media_type="application/octet-stream",
                    headers={"Cache-Control": "private, max-age=3600"})
