"""Finding the DWI series of a study: raw BIDS and QSIPrep derivatives.

Raw BIDS: ``sub-<label>/[ses-<label>/]dwi/<entities>_dwi.<ext>`` with ``<ext>`` one of
``.nii.gz``, ``.nii``, ``.mif``, ``.mif.gz``, beside ``<entities>_dwi.bval``,
``.bvec`` and ``.json`` (bval/bvec may be absent for ``.mif``, whose header carries the
gradient table). A top-level ``dwi.json`` is inherited by every series (keys of the
series' own sidecar win), as in BIDS.

QSIPrep: the same folders, but only the preprocessed series
``*_desc-preproc_dwi.nii.gz`` are taken (any space, e.g. ``space-T1w``), each with its
``*_desc-brain_mask.nii.gz`` when present. A ``derivatives`` folder inside a raw dataset is
not searched.

Pulse timing is read from the JSON sidecar, in seconds: ``DiffusionGradientDuration`` /
``DiffusionGradientSeparation``, else ``SmallDelta`` / ``BigDelta`` or ``small_delta`` /
``big_delta`` (the names used by QSIPrep/QSIRecon configurations). Values above 1 are taken
as milliseconds and converted, with a note in the plan.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from fingerprint.errors import InputError

logger = logging.getLogger(__name__)

__all__ = ["Series", "find_series", "read_timing"]

_DWI_RE = re.compile(r"^(?P<stem>sub-[A-Za-z0-9]+(?:_[A-Za-z]+-[A-Za-z0-9]+)*)_dwi"
                     r"(?P<ext>\.nii\.gz|\.nii|\.mif\.gz|\.mif)$")
TIMING_KEYS: tuple[tuple[str, str], ...] = (
    ("DiffusionGradientDuration", "DiffusionGradientSeparation"),
    ("SmallDelta", "BigDelta"),
    ("small_delta", "big_delta"),
)


@dataclass(frozen=True)
class Series:
    """One DWI series and its companion files (absolute paths; None when absent)."""

    root: Path
    dwi: Path
    bval: Path | None
    bvec: Path | None
    sidecar: Path | None
    mask: Path | None
    layout: str  # "bids" or "qsiprep"
    subject: str
    session: str | None

    @property
    def stem(self) -> str:
        """The file name without ``_dwi`` and extension."""
        m = _DWI_RE.match(self.dwi.name)
        return m.group("stem") if m else self.dwi.name

    @property
    def entities(self) -> str:
        """Output prefix: the source entities without ``desc`` (``sub-01_ses-1_space-T1w``)."""
        return "_".join(p for p in self.stem.split("_") if not p.startswith("desc-"))

    @property
    def relative_dir(self) -> Path:
        """Folder of the series relative to the dataset (``sub-01/ses-1/dwi``)."""
        return self.dwi.parent.relative_to(self.root)

    @property
    def name(self) -> str:
        """The DWI file relative to the dataset, as shown in reports."""
        return str(self.dwi.relative_to(self.root))

    @property
    def is_mif(self) -> bool:
        return self.dwi.name.lower().endswith((".mif", ".mif.gz"))

    def metadata(self) -> dict:
        """The JSON sidecar merged over a top-level ``dwi.json`` ({} when neither)."""
        out: dict = {}
        for path in (self.root / "dwi.json", self.sidecar):
            if path is None or not path.is_file():
                continue
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise InputError(f"JSON sidecar {path} does not parse: {exc}") from None
            if not isinstance(data, dict):
                raise InputError(f"JSON sidecar {path} is not a JSON object")
            out.update(data)
        return out


def read_timing(metadata: dict, where: str) -> tuple[float | None, float | None, str, list[str]]:
    """(delta, Delta in s, the keys used, notes) from sidecar ``metadata``."""
    notes: list[str] = []
    for small, big in TIMING_KEYS:
        if small in metadata and big in metadata:
            values = []
            for key in (small, big):
                try:
                    value = float(metadata[key])
                except (TypeError, ValueError):
                    raise InputError(f"{where}: {key} must be a number of seconds, got "
                                     f"{metadata[key]!r}") from None
                if not value > 0:
                    raise InputError(f"{where}: {key} must be positive, got {value:g}")
                if value > 1.0:
                    notes.append(f"{key} {value:g} taken as milliseconds")
                    value /= 1e3
                values.append(value)
            return values[0], values[1], f"sidecar {small}/{big}", notes
    return None, None, "none", notes


def _labels(values: list[str] | None, prefix: str) -> set[str] | None:
    if not values:
        return None
    return {v[len(prefix):] if v.startswith(prefix) else v for v in values}


def _is_qsiprep(root: Path) -> bool:
    desc = root / "dataset_description.json"
    try:
        data = json.loads(desc.read_text()) if desc.is_file() else {}
    except (OSError, ValueError):
        data = {}
    gen = data.get("GeneratedBy") or data.get("PipelineDescription") or []
    if isinstance(gen, dict):
        gen = [gen]
    names = {str(g.get("Name", "")).lower() for g in gen if isinstance(g, dict)}
    return "qsiprep" in names


def find_series(root: str | Path, participant_labels: list[str] | None = None,
                session_labels: list[str] | None = None) -> tuple[list[Series], str]:
    """Every DWI series under ``root`` (sorted), and the layout ("bids" or "qsiprep").

    ``participant_labels`` / ``session_labels`` restrict the search (with or without the
    ``sub-``/``ses-`` prefix); a label that matches nothing is an InputError.
    """
    root = Path(root).absolute()
    if not root.is_dir():
        raise InputError(f"BIDS directory {root} "
                         f"{'is not a directory' if root.exists() else 'does not exist'}")
    subjects = _labels(participant_labels, "sub-")
    sessions = _labels(session_labels, "ses-")
    sub_dirs = sorted(p for p in root.glob("sub-*") if p.is_dir())
    if not sub_dirs:
        raise InputError(f"BIDS directory {root} has no sub-<label> folders")
    if subjects is not None:
        missing = sorted(subjects - {p.name[4:] for p in sub_dirs})
        if missing:
            raise InputError(f"--participant-label {' '.join(missing)}: no such subject in "
                             f"{root} (found {', '.join(p.name[4:] for p in sub_dirs)})")
        sub_dirs = [p for p in sub_dirs if p.name[4:] in subjects]
    candidates: list[tuple[str, str | None, Path]] = []
    for sub in sub_dirs:
        ses_dirs = sorted(p for p in sub.glob("ses-*") if p.is_dir())
        if ses_dirs:
            for ses in ses_dirs:
                if sessions is None or ses.name[4:] in sessions:
                    candidates.append((sub.name[4:], ses.name[4:], ses / "dwi"))
        elif sessions is None:
            candidates.append((sub.name[4:], None, sub / "dwi"))
    qsiprep = _is_qsiprep(root) or any(
        p.name.endswith(("_desc-preproc_dwi.nii.gz", "_desc-preproc_dwi.nii"))
        for _, _, d in candidates if d.is_dir() for p in d.iterdir())
    layout = "qsiprep" if qsiprep else "bids"
    found: list[Series] = []
    for subject, session, dwi_dir in candidates:
        if not dwi_dir.is_dir():
            continue
        for path in sorted(dwi_dir.iterdir()):
            m = _DWI_RE.match(path.name)
            if not m or not path.is_file():
                continue
            stem = m.group("stem")
            if qsiprep and "_desc-preproc" not in f"_{stem}":
                continue

            def sibling(suffix: str, stem: str = stem, folder: Path = dwi_dir) -> Path | None:
                p = folder / f"{stem}{suffix}"
                return p if p.is_file() else None

            mask = None
            if qsiprep:
                base = stem.replace("_desc-preproc", "")
                mask = (sibling("_desc-brain_mask.nii.gz", base)
                        or sibling("_desc-brain_mask.nii", base))
            found.append(Series(root=root, dwi=path, bval=sibling("_dwi.bval"),
                                bvec=sibling("_dwi.bvec"), sidecar=sibling("_dwi.json"),
                                mask=mask, layout=layout, subject=subject, session=session))
    if sessions is not None and not found:
        raise InputError(f"--session-label {' '.join(sorted(sessions))}: no DWI series in "
                         f"those sessions under {root}")
    return found, layout
