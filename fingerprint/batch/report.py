"""Reports of a study run: the dry-run plan, the summary table, the group QC page.

* :func:`plan_text` -- every series, its scheme summary, oddities, each model's verdict
  and whether its outputs are already complete;
* :func:`summary_table` / :func:`write_summary_tsv` -- one row per series and model
  (done, skipped with the reason, failed with the error, seconds, voxels), on the terminal
  and as ``OUTPUT_DIR/logs/fingerprint_summary.tsv``;
* :func:`write_qc_report` -- ``OUTPUT_DIR/qc/index.html``, a static page with the
  summary and one PNG mosaic per model parameter (the middle axial slice of every
  series' map, one tile per series, on a common colour scale).
"""

from __future__ import annotations

import html
import logging
from pathlib import Path

import numpy as np

from fingerprint.batch.runner import SUMMARY_COLUMNS, Row, StudyPlan
from fingerprint.io.nifti import _tmp_sibling, bids_map_name
from fingerprint.models import get_model, map_labels

logger = logging.getLogger(__name__)

__all__ = ["plan_text", "summary_table", "write_qc_report", "write_summary_tsv"]


def plan_text(plan: StudyPlan) -> str:
    """The dry-run report."""
    kind = "QSIPrep derivatives" if plan.layout == "qsiprep" else "raw BIDS"
    lines = [f"{len(plan.series)} DWI series in {plan.root} ({kind}); "
             f"models: {', '.join(plan.options.models)}"]
    for sp in plan.series:
        s = sp.series
        lines.append("")
        lines.append(f"{s.name}" + (f"  [mask {s.mask.name}]" if s.mask else ""))
        if sp.error is not None:
            lines.append(f"  cannot be read: {sp.error}")
            for note in sp.notes:
                lines.append(f"  oddity: {note}")
            continue
        assert sp.summary is not None
        lines.append(f"  scheme {sp.summary.scheme_hash[:12]}: {sp.summary.n_volumes} volumes; "
                     f"{sp.summary.text()}")
        for note in dict.fromkeys([*sp.summary.oddities, *sp.notes]):
            lines.append(f"  oddity: {note}")
        for model in plan.options.models:
            verdict = sp.verdicts[model]
            state = ""
            if verdict.status != "skip":
                state = " -- outputs complete, will be skipped" if sp.complete.get(model) \
                    else " -- to do"
            lines.append(f"  {model}: {verdict.text()}{state}")
    dicts = plan.dictionaries()
    schemes = {key for _, key in dicts}
    lines.append("")
    lines.append(f"{sum(len(j) for j in dicts.values())} fits to run; {len(schemes)} "
                 f"dictionaries to find or build (one per model and distinct scheme)")
    return "\n".join(lines)


def summary_table(rows: list[Row]) -> str:
    """Fixed-width text table of the rows (messages shortened to 70 characters)."""
    header = list(SUMMARY_COLUMNS)
    body = []
    for r in rows:
        values = r.values()
        msg = values[-1]
        values[-1] = msg if len(msg) <= 70 else msg[:67] + "..."
        body.append(values)
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h)
              for i, h in enumerate(header)]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    for b in body:
        out.append("  ".join(v.ljust(w) for v, w in zip(b, widths, strict=True)).rstrip())
    counts = {s: sum(r.status == s for r in rows) for s in ("done", "skipped", "failed")}
    out.append(f"{counts['done']} done, {counts['skipped']} skipped, {counts['failed']} failed")
    return "\n".join(out)


def write_summary_tsv(rows: list[Row], output_dir: Path) -> Path:
    """``logs/fingerprint_summary.tsv`` (tabs and newlines in messages become spaces)."""
    path = Path(output_dir) / "logs" / "fingerprint_summary.tsv"
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["\t".join(SUMMARY_COLUMNS)]
    for r in rows:
        lines.append("\t".join(v.replace("\t", " ").replace("\n", " ") for v in r.values()))
    tmp = _tmp_sibling(path)
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)
    return path


def _scalar_labels(model: str) -> list[str]:
    m = get_model(model)
    card = dict(m.parameter_cardinality)
    return [label for label, name in map_labels(model).items() if int(card.get(name, 1)) == 1]


def _mosaic(tiles: list[tuple[str, np.ndarray]], title: str, path: Path) -> Path:
    import matplotlib  # lazy: keeps matplotlib off import

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt  # lazy: keeps matplotlib off import

    n = len(tiles)
    cols = min(n, 6)
    rows = (n + cols - 1) // cols
    finite = np.concatenate([t[np.isfinite(t)].ravel() for _, t in tiles]) if tiles else \
        np.zeros(1)
    nonzero = finite[finite != 0]
    lo, hi = (np.percentile(nonzero, [1, 99]) if nonzero.size else (0.0, 1.0))
    if hi <= lo:
        hi = lo + 1.0
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.4 * rows + 0.4), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (name, tile) in zip(axes.ravel(), tiles, strict=False):
        ax.imshow(np.rot90(tile), cmap="viridis", vmin=lo, vmax=hi, interpolation="nearest")
        ax.set_title(name, fontsize=7)
    fig.suptitle(f"{title}  (colour range {lo:.3g} .. {hi:.3g})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def write_qc_report(plan: StudyPlan, rows: list[Row]) -> Path:
    """``qc/index.html`` with the summary and one mosaic per model parameter."""
    import nibabel as nib  # lazy: keeps nibabel off import

    qc = plan.output_dir / "qc"
    qc.mkdir(parents=True, exist_ok=True)
    sections = []
    for model in plan.options.models:
        for label in _scalar_labels(model):
            tiles = []
            for sp in plan.series:
                job = sp.jobs.get(model)
                if job is None:
                    continue
                path = Path(job.out_dir) / bids_map_name(job.prefix, model, label)
                if not path.is_file():
                    continue
                try:
                    img = nib.load(path)
                    z = img.shape[2] // 2
                    tile = np.asarray(img.dataobj[:, :, z], dtype=np.float32)
                except Exception as exc:  # a broken map does not stop the report
                    logger.warning("QC: cannot read %s: %s", path, exc)
                    continue
                tiles.append((job.prefix, tile))
            if not tiles:
                continue
            png = _mosaic(tiles, f"{model} {label}",
                          qc / bids_map_name("group", model, label, suffix="mosaic",
                                             extension=".png"))
            sections.append(f"<h2>{html.escape(model)}: {html.escape(label)}</h2>\n"
                            f'<img src="{html.escape(png.name)}" alt="{html.escape(label)}">')
    head = "".join(f"<th>{html.escape(c)}</th>" for c in SUMMARY_COLUMNS)
    body = "\n".join("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in r.values())
                     + "</tr>" for r in rows)
    page = (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>fingerprint QC</title>"
        "<style>body{font-family:sans-serif;margin:1em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 6px;font-size:12px}img{max-width:100%}"
        "</style></head><body>\n"
        f"<h1>fingerprint group QC</h1><p>{len(plan.series)} series from "
        f"{html.escape(str(plan.root))}; models {html.escape(', '.join(plan.options.models))}."
        " Each mosaic shows the middle axial slice of every series' map on one colour "
        "scale.</p>\n"
        f"<table><tr>{head}</tr>\n{body}</table>\n" + "\n".join(sections) +
        "\n</body></html>\n")
    path = qc / "index.html"
    path.write_text(page)
    return path
