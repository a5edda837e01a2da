"""PNG previews of parameter maps (matplotlib's object API: no display, no pyplot state).

>>> from fingerprint.preview import write_preview
>>> write_preview({"icvf": "..._param-icvf_dwimap.nii.gz", ...}, "preview.png")

Each scalar map is shown as its middle axial slice (grey scale, 1st-99th percentile
window, or [0, 1] for maps whose values all lie in it); 4-D unit-vector maps (fibre
directions) as the usual colour code (|x| red, |y| green, |z| blue). For multi-fascicle
models (``fascicleN_direction`` with ``fascicleN_fraction`` maps) a ``fascicles`` panel
adds every fascicle's colour weighted by its fraction.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["write_preview"]


def _slice(data: np.ndarray, z: int | None) -> np.ndarray:
    k = data.shape[2] // 2 if z is None else int(z)
    k = min(max(k, 0), data.shape[2] - 1)
    return np.rot90(data[:, :, k])  # x to the right, y up


_FASCICLE_DIRECTION = re.compile(r"^fascicle(\d+)_direction$")


def _fascicle_colours(maps: Mapping[str, Any], load: Callable[[Any], np.ndarray]
                      ) -> np.ndarray | None:
    """Direction-encoded colour of every fascicle at once (multi-fascicle models): the sum
    over fascicles of |direction| (x red, y green, z blue) weighted by the fascicle's
    fraction, scaled to the brightest voxel; None without ``fascicleN_direction`` and
    ``fascicleN_fraction`` maps."""
    total = None
    for label in maps:
        match = _FASCICLE_DIRECTION.match(label)
        fraction = f"fascicle{match.group(1)}_fraction" if match else None
        if fraction is None or fraction not in maps:
            continue
        vec = np.nan_to_num(np.abs(load(maps[label])))
        weight = np.nan_to_num(load(maps[fraction]))
        if vec.ndim != 4 or weight.shape != vec.shape[:3]:
            continue
        part = vec * weight[..., None]
        total = part if total is None else total + part
    if total is None:
        return None
    top = float(total.max(initial=0.0))
    return total / top if top > 0 else total


def write_preview(maps: Mapping[str, Any], path: str | os.PathLike, *, title: str | None = None,
                  slice_index: int | None = None,
                  truth: Mapping[str, Any] | None = None) -> Path:
    """Write a PNG with one panel per map (label -> NIfTI path or array); with ``truth``
    (label -> path or array), a second row shows the ground truth of the same labels.
    The file is written atomically. Returns its path."""
    # lazy: keeps nibabel off import; keeps matplotlib off import
    import nibabel as nib
    from matplotlib.figure import Figure  # no pyplot: no global backend, thread-safe

    def load(value: Any) -> np.ndarray:
        if isinstance(value, np.ndarray):
            return value
        return np.asarray(nib.load(os.fspath(value)).dataobj, dtype=np.float32)

    maps = dict(maps)
    combined = _fascicle_colours(maps, load)
    if combined is not None:
        maps["fascicles"] = combined
    labels = list(maps)
    rows = 2 if truth else 1
    cols = max(1, len(labels))
    fig = Figure(figsize=(2.6 * cols, 2.8 * rows + 0.4))
    axes = fig.subplots(rows, cols, squeeze=False)
    for row, source in enumerate([maps, truth] if truth else [maps]):
        for col, label in enumerate(labels):
            ax = axes[row][col]
            ax.set_xticks([])
            ax.set_yticks([])
            if source is None or label not in source:
                ax.set_visible(False)
                continue
            data = load(source[label])
            if data.ndim == 4 and data.shape[3] == 3:
                rgb = np.clip(np.abs(_slice(data, slice_index)), 0, 1)
                ax.imshow(rgb, interpolation="nearest")
            else:
                if data.ndim == 4:
                    data = data[..., 0]
                img = _slice(data, slice_index)
                finite = img[np.isfinite(img)]
                if finite.size and finite.min() >= 0 and finite.max() <= 1:
                    lo, hi = 0.0, 1.0
                elif finite.size:
                    lo, hi = np.percentile(finite, [1, 99])
                    hi = hi if hi > lo else lo + 1.0
                else:
                    lo, hi = 0.0, 1.0
                im = ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
                fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
            ax.set_title(label if row == 0 else f"{label} (truth)", fontsize=10)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    try:
        fig.savefig(tmp, dpi=90)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    logger.debug("preview written to %s", path)
    return path
