"""Fitting a whole study: plan, dictionaries once per scheme, resumable series fits.

Steps of :func:`run_study`:

1. **plan** (:func:`plan_study`): find every series (:mod:`fingerprint.batch.layout`),
   read its scheme (gradient table, pulse timing from the JSON sidecar or the options),
   summarise it and give each model a verdict (:mod:`fingerprint.batch.checks`); a series
   whose files do not read is reported with the error. Every (series, model) pair is a
   *job* whose provenance (software version, recipe and its hash, scheme hash,
   dictionary key and size, solver options, source files with sizes and modification
   times, bval/bvec/JSON content hashes) hashes to ``JobHash``;
2. **resume**: a job whose outputs all exist, are complete NIfTI files and carry its
   ``JobHash`` in their sidecars is skipped; any other is (re)done;
3. **dictionaries**: one task per distinct (model, scheme hash) among the jobs to run
   builds (or finds) the dictionary and its index in the dictionary directory, so each is
   built once however many series share it; the fits of a scheme start as soon as its
   dictionary is ready (the dictionary cache's file lock also keeps two processes from
   ever building the same dictionary);
4. **fits**: each job calls the same fitting core as ``fingerprint fit``
   (:func:`fingerprint.fitting.pipeline.fit_volume`) into a hidden staging folder beside
   the outputs, adds the provenance to every sidecar, then moves the maps into place
   (all NIfTI files first, sidecars last): a map is only taken as complete once its
   sidecar with the job's hash is there, so an interrupted run (even ``kill -9``) leaves
   nothing that looks complete but is not, and loses no finished series. Jobs run in
   worker processes, or as Dask tasks through ``--dask-scheduler`` (the output and
   dictionary directories must then be on storage the workers share);
5. **report**: the summary table (terminal and ``logs/fingerprint_summary.tsv``) and the
   group QC page (:mod:`fingerprint.batch.report`).
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import dataclasses
import hashlib
import json
import logging
import multiprocessing as mp
import os
import secrets
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

import fingerprint
from fingerprint.batch.checks import (
    SchemeSummary,
    Verdict,
    check_model,
    raw_oddities,
    summarise_scheme,
)
from fingerprint.batch.layout import Series, find_series, read_timing
from fingerprint.errors import FingerprintError, InputError
from fingerprint.fitting.options import FitOptions
from fingerprint.io.mif import is_mif, mif_as_nifti, mif_gradients_as_fsl, read_mif_header
from fingerprint.io.nifti import atomic_write_json, bids_map_name, check_file_complete, open_nifti
from fingerprint.models import get_model, get_recipe

if TYPE_CHECKING:
    from fingerprint.core.acquisition_scheme import AcquisitionScheme
    from fingerprint.fitting.options import FitOptions

logger = logging.getLogger(__name__)

__all__ = ["CODE_URL", "Job", "SeriesPlan", "StudyOptions", "StudyPlan", "job_outputs_valid",
           "plan_study", "run_study"]

CODE_URL = "https://github.com/fingerprint-mri/fingerprint"
SOLVER = "fingerprint dictionary matching (FAISS neighbours, local-linear refinement)"
STAGING_PREFIX = ".fingerprint-partial-"
PROGRESS_DIR = Path("logs") / "progress"
SUMMARY_COLUMNS = ("subject", "session", "series", "model", "status", "seconds", "voxels",
                   "message")


@dataclass(frozen=True)
class StudyOptions:
    """Options of a study run (timing in s; None = the library's default)."""

    models: tuple[str, ...]
    dictionary_dir: Path | None = None
    dictionary_size: int | None = None
    delta: float | None = None
    Delta: float | None = None
    workers: int = 1
    threads: int | None = None
    chunk_voxels: int | None = None
    dask_scheduler: str | None = None
    #: b-value (s/m²) at or below which volumes are the b=0 reference (None: 10 s/mm²)
    b0_threshold: float | None = None
    #: further fit options for every series, as (name, value) pairs of
    #: :class:`~fingerprint.fitting.options.FitOptions` fields (e.g. ``("refine", "false")``,
    #: ``("count_penalty", 2.0)``); validated by it, errors name the option
    fit: tuple[tuple[str, int | float | str], ...] = ()

    def fit_options(self) -> FitOptions:
        """The fitting core's options for every series (threads set per worker)."""
        values: dict[str, object] = dict(self.fit)
        values.update(dictionary_size=self.dictionary_size, threads=self.threads,
                      b0_threshold=self.b0_threshold)
        return FitOptions.from_mapping(values)

    def solver_options(self) -> dict:
        """What changes the numbers of a fit (part of every job's provenance): the
        :class:`~fingerprint.fitting.options.FitOptions` fields but ``threads``."""
        out = dataclasses.asdict(self.fit_options())
        out.pop("threads", None)
        return out


@dataclass(frozen=True)
class Job:
    """One (series, model) fit: everything a worker needs (picklable)."""

    job_id: str
    model: str
    dwi: str
    bval: str | None
    bvec: str | None
    mask: str | None
    out_dir: str
    prefix: str
    delta: float | None
    Delta: float | None
    dictionary_dir: str | None
    dictionary_size: int | None
    threads: int | None
    chunk_voxels: int | None
    progress_file: str | None
    provenance: dict
    job_hash: str
    options: FitOptions | None = None


@dataclass
class SeriesPlan:
    """A series, its scheme summary (or the error reading it) and the models' verdicts."""

    series: Series
    summary: SchemeSummary | None = None
    error: str | None = None
    verdicts: dict[str, Verdict] = field(default_factory=dict)
    jobs: dict[str, Job] = field(default_factory=dict)
    complete: dict[str, bool] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    #: (delta, Delta in s, where they came from)
    timing: tuple[float | None, float | None, str] = (None, None, "none")


@dataclass
class StudyPlan:
    """Everything found and decided before running."""

    root: Path
    output_dir: Path
    layout: str
    options: StudyOptions
    series: list[SeriesPlan]

    def dictionaries(self) -> dict[tuple[str, str], list[Job]]:
        """Jobs to run by (model, dictionary key)."""
        out: dict[tuple[str, str], list[Job]] = {}
        for sp in self.series:
            for model, job in sp.jobs.items():
                if not sp.complete.get(model):
                    key = job.provenance["Dictionary"]["Key"]
                    out.setdefault((model, key), []).append(job)
        return out


# ----------------------------------------------------------------------------- hashing
def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _source_entry(path: Path, root: Path, *, content: bool) -> dict:
    st = path.stat()
    entry = {"Path": str(path.relative_to(root)) if path.is_relative_to(root) else str(path),
             "Bytes": int(st.st_size)}
    if content:
        entry["SHA256"] = _sha256_file(path)
    else:
        entry["ModifiedNs"] = int(st.st_mtime_ns)
    return entry


def _hash(obj: dict) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


# ----------------------------------------------------------------------------- schemes
@contextlib.contextmanager
def _fsl_files(series_dwi: str, bval: str | None, bvec: str | None, workdir: Path | None,
               *, gradients_only: bool = False) -> Iterator[tuple[str, str, str]]:
    """(dwi, bval, bvec) as NIfTI + FSL files; a .mif is converted into ``workdir`` (only
    its gradient table when ``gradients_only``; the dwi is then the .mif itself)."""
    def pair(bval: str | None, bvec: str | None) -> tuple[str, str]:
        if bval is None or bvec is None:
            raise InputError(f"{series_dwi}: needs both a .bval and a .bvec file")
        return bval, bvec

    if not is_mif(series_dwi) or (gradients_only and bval is not None):
        yield (series_dwi, *pair(bval, bvec))
        return
    opened = mif_gradients_as_fsl(series_dwi) if gradients_only else \
        mif_as_nifti(series_dwi, workdir)
    with opened as files:
        if bval is None:
            if "bval" not in files:
                raise InputError(f"MRtrix image {series_dwi} has no gradient table "
                                 "(dw_scheme) and no .bval/.bvec beside it")
            bval, bvec = str(files["bval"]), str(files["bvec"])
        yield (str(files.get("dwi", series_dwi)), *pair(bval, bvec))


def _mif_gradients(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(bvals s/mm², bvecs (N, 3) FSL) of a .mif's header without reading its voxels."""
    header = read_mif_header(path)
    return header.bvals, header.bvecs.T


def _raw_fsl(bval: Path, bvec: Path) -> tuple[np.ndarray, np.ndarray] | None:
    try:
        b = np.loadtxt(bval, ndmin=1).ravel()
        v = np.loadtxt(bvec, ndmin=2)
    except (OSError, ValueError):
        return None
    if v.shape[0] == 3 and v.shape[1] == b.size:
        v = v.T
    return (b, v) if v.shape == (b.size, 3) else None


def _read_scheme(series: Series, options: StudyOptions, sp: SeriesPlan) -> AcquisitionScheme:
    """The series' AcquisitionScheme exactly as the fit will read it (same hash)."""
    from fingerprint.fitting.pipeline import read_fsl_scheme  # lazy: keeps numba off import

    meta = series.metadata()
    delta, Delta, source, notes = read_timing(meta, str(series.sidecar or series.dwi))
    sp.notes.extend(notes)
    if delta is None and options.delta is not None:
        delta, Delta, source = options.delta, options.Delta, "options --delta/--Delta"
    sp.timing = (delta, Delta, source)
    if series.bval is None and not series.is_mif:
        raise InputError(f"{series.name}: no {series.stem}_dwi.bval beside it")
    if series.bvec is None and not series.is_mif:
        raise InputError(f"{series.name}: no {series.stem}_dwi.bvec beside it")
    raw: tuple[np.ndarray, np.ndarray] | None
    if series.is_mif and series.bval is None:
        raw = _mif_gradients(series.dwi)
    else:
        raw = _raw_fsl(series.bval, series.bvec)  # type: ignore[arg-type]
    oddities = raw_oddities(*raw) if raw is not None else []
    sp.notes.extend(oddities)
    with _fsl_files(str(series.dwi), str(series.bval) if series.bval else None,
                    str(series.bvec) if series.bvec else None, None,
                    gradients_only=True) as (_, bval, bvec):
        scheme = read_fsl_scheme(bval, bvec, delta=delta, Delta=Delta,
                                 b0_threshold=options.b0_threshold)
    n_volumes = _volume_count(series)
    if n_volumes != int(scheme.number_of_measurements):
        raise InputError(f"DWI file {series.name} has {n_volumes} volumes but its gradient "
                         f"table describes {int(scheme.number_of_measurements)} measurements")
    sp.summary = summarise_scheme(scheme, timing_source=source, oddities=oddities)
    return scheme


def _volume_count(series: Series) -> int:
    """Volumes of the series' DWI from its header (NIfTI or MRtrix)."""
    if series.is_mif:
        dim = read_mif_header(series.dwi).header["dim"][0].replace(" ", "").split(",")
        return int(dim[3]) if len(dim) > 3 else 1

    shape = open_nifti(series.dwi, "DWI").shape
    return int(shape[3]) if len(shape) > 3 else 1


# ----------------------------------------------------------------------------- plan
def _recipe_provenance(model: str) -> dict:
    recipe = get_recipe(model)
    entry = {"Name": recipe.name, "ModelSpecHash": str(get_model(recipe.name).spec_hash)}
    if recipe.path is not None and Path(recipe.path).is_file():
        entry["File"] = Path(recipe.path).name
        entry["SHA256"] = _sha256_file(Path(recipe.path))
    return entry


def _dictionary_entry(model: str, scheme: AcquisitionScheme, options: StudyOptions) -> dict:
    from fingerprint.dictionary.build import prepare_build  # lazy: keeps numba off import

    request = prepare_build(model, scheme, size=options.dictionary_size,
                            seed=options.fit_options().seed)
    return {"Key": request.key, "Atoms": int(request.plan.size)}


def _job_id(series: Series, model: str) -> str:
    return f"{series.entities}_model-{model}"


def plan_study(bids_dir: str | Path, output_dir: str | Path, options: StudyOptions, *,
               participant_labels: list[str] | None = None,
               session_labels: list[str] | None = None) -> StudyPlan:
    """Find the series, read their schemes, judge each model and check what is done."""
    models = tuple(dict.fromkeys(get_recipe(m).name for m in options.models))
    options = StudyOptions(**{**options.__dict__, "models": models})
    root = Path(bids_dir).absolute()
    out = Path(output_dir).absolute()
    if out == root or root in out.parents and not out.is_relative_to(root / "derivatives"):
        raise InputError(f"OUTPUT_DIR {out} must not be inside the input dataset {root} "
                         "(except under its derivatives/ folder)")
    found, layout = find_series(root, participant_labels, session_labels)
    recipes = {m: _recipe_provenance(m) for m in models}
    plans: list[SeriesPlan] = []
    for series in found:
        sp = SeriesPlan(series)
        plans.append(sp)
        try:
            scheme = _read_scheme(series, options, sp)
        except (FingerprintError, ValueError, OSError) as exc:
            sp.error = str(exc)
            continue
        delta, Delta, _ = sp.timing
        sources = [_source_entry(series.dwi, root, content=False)]
        for p in (series.bval, series.bvec, series.sidecar):
            if p is not None:
                sources.append(_source_entry(p, root, content=True))
        if series.mask is not None:
            sources.append(_source_entry(series.mask, root, content=False))
        out_dir = out / series.relative_dir
        for model in models:
            assert sp.summary is not None  # set by _read_scheme
            verdict = check_model(model, sp.summary, scheme)
            sp.verdicts[model] = verdict
            if verdict.status == "skip":
                continue
            try:
                dictionary = _dictionary_entry(model, scheme, options)
            except (FingerprintError, ValueError) as exc:
                sp.verdicts[model] = Verdict(model, "skip", (str(exc),))
                continue
            provenance = {
                "Software": {"Name": "fingerprint", "Version": fingerprint.__version__,
                             "CodeURL": CODE_URL},
                "Recipe": recipes[model],
                "Scheme": {"Hash": sp.summary.scheme_hash,
                           "Timing": {"delta": delta, "Delta": Delta,
                                      "Source": sp.summary.timing_source}},
                "Dictionary": dictionary,
                "Solver": {"Name": options.fit_options().solver, "Description": SOLVER,
                           "Options": options.solver_options()},
                "SourceFiles": sources,
            }
            job_hash = _hash(provenance)
            job_id = _job_id(series, model)
            sp.jobs[model] = Job(
                job_id=job_id, model=model, dwi=str(series.dwi),
                bval=str(series.bval) if series.bval else None,
                bvec=str(series.bvec) if series.bvec else None,
                mask=str(series.mask) if series.mask else None, out_dir=str(out_dir),
                prefix=series.entities, delta=delta, Delta=Delta,
                dictionary_dir=str(options.dictionary_dir) if options.dictionary_dir else None,
                dictionary_size=options.dictionary_size, threads=options.threads,
                chunk_voxels=options.chunk_voxels,
                progress_file=str(out / PROGRESS_DIR / f"{job_id}.txt"),
                provenance=provenance, job_hash=job_hash, options=options.fit_options())
            sp.complete[model] = job_outputs_valid(out_dir, series.entities, model,
                                                   job_hash) is None
    return StudyPlan(root=root, output_dir=out, layout=layout, options=options, series=plans)


# ----------------------------------------------------------------------------- validity
def _anchor(out_dir: Path, prefix: str, model: str) -> Path:
    return out_dir / bids_map_name(prefix, model, "s0", extension=".json")


def job_outputs_valid(out_dir: str | Path, prefix: str, model: str, job_hash: str
                      ) -> str | None:
    """None when every output of the job is present, complete and carries ``job_hash``;
    else the reason it is not."""
    out_dir = Path(out_dir)
    anchor = _anchor(out_dir, prefix, model)
    try:
        outputs = json.loads(anchor.read_text())["Provenance"]["Outputs"]
    except (OSError, ValueError, KeyError, TypeError):
        return "no complete outputs"
    for name in outputs:
        nii = out_dir / name
        side = out_dir / (name[:-7] + ".json")
        try:
            prov = json.loads(side.read_text())["Provenance"]
        except (OSError, ValueError, KeyError, TypeError):
            return f"{side.name} missing or unreadable"
        if prov.get("JobHash") != job_hash:
            return f"{side.name} was made from other inputs or options"
        try:
            check_file_complete(open_nifti(nii, "map"), nii, "map")
        except (FingerprintError, ValueError, OSError) as exc:
            return str(exc)
    return None


# ----------------------------------------------------------------------------- workers
def _progress_writer(path: str | None) -> Callable[[float], None] | None:
    if not path:
        return None
    last = [-1.0]

    def report(fraction: float) -> None:
        if fraction - last[0] < 0.02 and fraction < 1.0:
            return
        last[0] = fraction
        with contextlib.suppress(OSError):
            tmp = f"{path}.{os.getpid()}.tmp"
            Path(tmp).write_text(f"{fraction:.3f}\n")
            os.replace(tmp, path)

    return report


def prepare_dictionary(job: Job) -> dict:
    """Find or build the dictionary (and index) of ``job``'s model on its scheme.

    Returns ``{"key", "atoms", "seconds"}``; runs in a worker."""
    # lazy: keeps numba off import
    from fingerprint.fitting.engine import prepare_fitter
    from fingerprint.fitting.pipeline import read_fsl_scheme

    t0 = time.perf_counter()
    with _fsl_files(job.dwi, job.bval, job.bvec, None, gradients_only=True) as (_, bval,
                                                                                bvec):
        scheme = read_fsl_scheme(bval, bvec, delta=job.delta, Delta=job.Delta)
    fitter = prepare_fitter(get_model(job.model), scheme, _job_options(job),
                            dictionary_dir=job.dictionary_dir)
    dictionary = getattr(getattr(fitter, "estimator", fitter), "dictionary", None)
    return {"key": getattr(dictionary, "key", None),
            "atoms": int(getattr(dictionary, "n_atoms", 0) or 0),
            "seconds": time.perf_counter() - t0}


def _job_options(job: Job) -> FitOptions:
    return job.options if job.options is not None else FitOptions(
        dictionary_size=job.dictionary_size, threads=job.threads)


def run_job(job: Job) -> dict:
    """Fit one (series, model) job and install its maps; runs in a worker.

    Returns ``{"status": "done"|"failed", "seconds", "voxels", "invalid", "message",
    "timings"}`` (never raises for a bad series: the error is the message)."""
    from fingerprint.fitting.pipeline import (  # lazy: keeps numba off import
        DEFAULT_CHUNK_VOXELS,
        fit_volume,
    )

    t0 = time.perf_counter()
    out_dir = Path(job.out_dir)
    staging = out_dir / f"{STAGING_PREFIX}{job.model}-{os.getpid()}-{secrets.token_hex(3)}"
    try:
        staging.mkdir(parents=True)
        with _fsl_files(job.dwi, job.bval, job.bvec, staging) as (dwi, bval, bvec):
            result = fit_volume(
                job.model, dwi, bval, bvec, staging / "maps", mask=job.mask,
                prefix=job.prefix, options=_job_options(job),
                progress=_progress_writer(job.progress_file),
                dictionary_dir=job.dictionary_dir, delta=job.delta, Delta=job.Delta,
                chunk_voxels=job.chunk_voxels or DEFAULT_CHUNK_VOXELS)
        niftis = [p for p in result.files if p.name.endswith(".nii.gz")]
        sidecars = [p for p in result.files if p.suffix == ".json"]

        provenance = {**job.provenance, "JobHash": job.job_hash,
                      "Outputs": sorted(p.name for p in niftis)}
        sources = [s["Path"] for s in job.provenance["SourceFiles"]]
        for side in sidecars:
            data = json.loads(side.read_text())
            data["Sources"] = sources  # relative to the input dataset
            data["Provenance"] = provenance
            atomic_write_json(data, side)
        for p in result.files:  # maps (and previews) first ...
            if p.suffix != ".json":
                os.replace(p, out_dir / p.name)
        anchor = _anchor(out_dir, job.prefix, job.model).name
        # ... their sidecars last (only then do they count as complete), the s0 sidecar,
        # which lists the outputs, the very last
        for p in sorted(sidecars, key=lambda q: q.name == anchor):
            os.replace(p, out_dir / p.name)
        return {"status": "done", "seconds": time.perf_counter() - t0,
                "voxels": result.n_voxels, "invalid": result.n_invalid, "message": "",
                "timings": dict(result.timings)}
    except Exception as exc:  # a bad series is reported; the others go on
        logger.debug("job %s failed", job.job_id, exc_info=True)
        message = str(exc) if isinstance(exc, (FingerprintError, ValueError, OSError)) \
            else f"{type(exc).__name__}: {exc}"
        return {"status": "failed", "seconds": time.perf_counter() - t0, "voxels": 0,
                "invalid": 0, "message": message.replace("\n", " "), "timings": {}}
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if job.progress_file:
            with contextlib.suppress(OSError):
                os.unlink(job.progress_file)


# ----------------------------------------------------------------------------- running
def _clean_staging(output_dir: Path) -> int:
    removed = 0
    for p in output_dir.glob(f"sub-*/**/{STAGING_PREFIX}*"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
            removed += 1
    return removed


@contextlib.contextmanager
def _run_lock(output_dir: Path) -> Iterator[None]:
    try:
        import fcntl  # lazy: POSIX-only module (absent on Windows)
    except ImportError:  # pragma: no cover
        yield
        return
    lock = output_dir / "logs" / ".fingerprint.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise InputError(f"another fingerprint run is writing to {output_dir}") from None
        yield
    finally:
        os.close(fd)


def write_dataset_description(plan: StudyPlan) -> Path:
    """``dataset_description.json`` of the derivatives dataset (and ``.bidsignore``)."""
    out = plan.output_dir
    out.mkdir(parents=True, exist_ok=True)
    desc = {
        "Name": "fingerprint microstructure maps",
        "BIDSVersion": "1.9.0",
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "fingerprint", "Version": fingerprint.__version__,
                         "CodeURL": CODE_URL,
                         "Description": "dictionary-matching fits of diffusion "
                                        "microstructure models ("
                                        f"{', '.join(plan.options.models)})"}],
        "SourceDatasets": [{"URL": plan.root.as_uri()}],
    }
    path = atomic_write_json(desc, out / "dataset_description.json")
    ignore = out / ".bidsignore"
    if not ignore.exists():
        ignore.write_text("logs/\nqc/\n")
    return path


@dataclass
class Row:
    """One line of the summary table."""

    subject: str
    session: str
    series: str
    model: str
    status: str
    seconds: float = 0.0
    voxels: int = 0
    message: str = ""

    def values(self) -> list[str]:
        return [self.subject, self.session or "n/a", self.series, self.model, self.status,
                f"{self.seconds:.1f}", str(self.voxels), self.message]


def _executor(options: StudyOptions) -> tuple[cf.Executor, Callable[[], None]]:
    if options.dask_scheduler:
        from distributed import Client  # lazy: keeps dask off import

        client = Client(options.dask_scheduler, timeout=30)
        return client.get_executor(pure=False), client.close
    if options.workers <= 1:
        ex: cf.Executor = cf.ThreadPoolExecutor(max_workers=1)
    else:
        ex = cf.ProcessPoolExecutor(max_workers=options.workers,
                                    mp_context=mp.get_context("spawn"))
    return ex, lambda: ex.shutdown(wait=True, cancel_futures=True)


def run_study(plan: StudyPlan, *, progress: bool = True,
              on_row: Callable[[Row], None] | None = None) -> tuple[list[Row], dict]:
    """Run every job of ``plan`` that is not already complete.

    Returns the summary rows (one per series and model) and totals: ``dictionaries``
    (key -> {seconds, atoms}), ``wall`` (s), ``fit_seconds``, ``dictionary_seconds``.
    """
    out = plan.output_dir
    out.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    totals: dict = {"dictionaries": {}, "fit_seconds": 0.0, "dictionary_seconds": 0.0}
    t_start = time.perf_counter()
    with _run_lock(out):
        removed = _clean_staging(out)
        if removed:
            logger.info("removed %d unfinished series folders of an interrupted run", removed)
        write_dataset_description(plan)
        (out / PROGRESS_DIR).mkdir(parents=True, exist_ok=True)
        todo: dict[tuple[str, str], list[Job]] = plan.dictionaries()
        by_job: dict[str, tuple[SeriesPlan, str]] = {}
        for sp in plan.series:
            s = sp.series
            base = (s.subject, s.session or "", s.name)  # subject, session, series
            if sp.error is not None:
                rows.append(Row(*base, model="*", status="failed", message=sp.error))
                continue
            for model in plan.options.models:
                verdict = sp.verdicts[model]
                if verdict.status == "skip":
                    rows.append(Row(*base, model=model, status="skipped",
                                    message="; ".join(verdict.reasons)))
                elif sp.complete.get(model):
                    rows.append(Row(*base, model=model, status="skipped",
                                    message="complete (outputs valid by their provenance)"))
                else:
                    by_job[sp.jobs[model].job_id] = (sp, model)
        n_jobs = len(by_job)
        bar = None
        redirect = contextlib.ExitStack()
        if progress and n_jobs:
            # lazy: keeps tqdm off import
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            bar = tqdm(total=n_jobs, desc="series", unit="fit", file=sys.stderr)
            redirect.enter_context(logging_redirect_tqdm())  # log lines above the bar
        executor, close = _executor(plan.options)
        pending: dict[cf.Future, tuple[str, object]] = {}
        running: dict[str, Job] = {}
        try:
            for (model, key), jobs in todo.items():
                pending[executor.submit(prepare_dictionary, jobs[0])] = ("dict", (model, key))
            while pending:
                finished, _ = cf.wait(list(pending), timeout=0.5,
                                      return_when=cf.FIRST_COMPLETED)
                for fut in finished:
                    kind, what = pending.pop(fut)
                    if kind == "dict":
                        model, key = what  # type: ignore[misc]
                        jobs = todo[(model, key)]
                        try:
                            info = fut.result()
                        except Exception as exc:  # the scheme's fits all fail with it
                            message = f"dictionary: {exc}".replace("\n", " ")
                            for job in jobs:
                                sp, _m = by_job[job.job_id]
                                row = _row(sp, model, "failed", message=message)
                                rows.append(row)
                                if on_row:
                                    on_row(row)
                                if bar is not None:
                                    bar.update(1)
                            continue
                        totals["dictionaries"][key] = info
                        totals["dictionary_seconds"] += float(info["seconds"])
                        for job in jobs:
                            pending[executor.submit(run_job, job)] = ("fit", job)
                            running[job.job_id] = job
                    else:
                        job = what  # type: ignore[assignment]
                        running.pop(job.job_id, None)
                        sp, model = by_job[job.job_id]
                        try:
                            res = fut.result()
                        except Exception as exc:  # a worker that died
                            res = {"status": "failed", "seconds": 0.0, "voxels": 0,
                                   "message": f"worker: {exc}".replace("\n", " ")}
                        totals["fit_seconds"] += float(res.get("seconds", 0.0))
                        message = res.get("message", "")
                        job_verdict = sp.verdicts.get(model)
                        if res["status"] == "done" and job_verdict and \
                                job_verdict.status == "warn":
                            message = "warning: " + "; ".join(job_verdict.reasons)
                        row = _row(sp, model, res["status"], seconds=res.get("seconds", 0.0),
                                   voxels=res.get("voxels", 0), message=message)
                        rows.append(row)
                        if on_row:
                            on_row(row)
                        if bar is not None:
                            bar.update(1)
                if bar is not None:
                    bar.set_postfix_str(_running_text(running, out), refresh=True)
        except BaseException:
            for fut in pending:
                fut.cancel()
            raise
        finally:
            if bar is not None:
                bar.close()
            redirect.close()
            close()
    totals["wall"] = time.perf_counter() - t_start
    order = {(sp.series.name): i for i, sp in enumerate(plan.series)}
    rows.sort(key=lambda r: (order.get(r.series, 0), r.model))
    return rows, totals


def _row(sp: SeriesPlan, model: str, status: str, *, seconds: float = 0.0, voxels: int = 0,
         message: str = "") -> Row:
    s = sp.series
    return Row(subject=s.subject, session=s.session or "", series=s.name, model=model,
               status=status, seconds=float(seconds), voxels=int(voxels), message=message)


def _running_text(running: dict[str, Job], out: Path) -> str:
    parts = []
    for job in list(running.values())[:4]:
        try:
            frac = float(Path(job.progress_file).read_text()) if job.progress_file else 0.0
        except (OSError, ValueError):
            continue  # not started yet
        parts.append(f"{job.job_id} {frac:.0%}")
    return ", ".join(parts)
