"""`fingerprint bids`: whole studies (raw BIDS, QSIPrep, .mif), provenance, resume, reports."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fingerprint.batch.checks import raw_oddities
from fingerprint.batch.layout import find_series, read_timing
from fingerprint.batch.runner import job_outputs_valid
from fingerprint.batch.synthetic import write_study
from fingerprint.cli.main import main
from fingerprint.errors import InputError

SIZE = "2000"
REPO = Path(__file__).resolve().parents[1]


def _study(root: Path) -> Path:
    """sub-01 (scheme A, NIfTI, timing), sub-02 (scheme B, jittered, .mif.gz), sub-03
    (scheme A with a bvec file missing its last vector)."""
    write_study(root, subjects=3)
    bvec = root / "sub-03" / "ses-1" / "dwi" / "sub-03_ses-1_dwi.bvec"
    rows = [line.split() for line in bvec.read_text().splitlines()]
    bvec.write_text("\n".join(" ".join(r[:-1]) for r in rows) + "\n")
    return root


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    return _study(tmp_path_factory.mktemp("bids") / "study")


def _run(capsys, *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _args(study: Path, out: Path, dicts: Path, *extra: object) -> list[object]:
    return ["bids", study, out, "participant", "--model", "noddi", "ball_stick",
            "--dictionary-size", SIZE, "--dictionary-dir", dicts, "--no-progress",
            "--threads", 1, *extra]


def _tsv(out: Path) -> list[dict[str, str]]:
    lines = (out / "logs" / "fingerprint_summary.tsv").read_text().splitlines()
    head = lines[0].split("\t")
    return [dict(zip(head, line.split("\t"), strict=True)) for line in lines[1:]]


def test_dry_run_prints_the_plan_and_writes_nothing(capsys, study, tmp_path):
    code, out, err = _run(capsys, "bids", study, tmp_path / "out", "participant", "--model",
                          "noddi", "activeax", "--dry-run", "--dictionary-size", SIZE)
    assert code == 0, err
    assert not (tmp_path / "out").exists()
    assert "3 DWI series" in out and "raw BIDS" in out
    sub1, sub2, sub3 = out.split("\n\n")[1:4]
    assert "sub-01_ses-1_dwi.nii.gz" in sub1 and "3 b0; b=1000 (12 dirs); b=2000 (12 dirs)" in sub1
    assert "δ 15 ms, Δ 35 ms (sidecar DiffusionGradientDuration" in sub1
    assert "activeax: run -- to do" in sub1
    # jittered b-values grouped into two shells, named as an oddity
    assert "b=700±5 (10 dirs); b=2000±5 (14 dirs); no pulse timing" in sub2
    assert "oddity: b-values jitter within shells" in sub2
    assert "activeax: skip (needs pulse timing" in sub2 and "noddi: run -- to do" in sub2
    assert "cannot be read: bvec file" in sub3 and "26 vectors" in sub3
    assert "3 fits to run" in out

    one = tmp_path / "one"
    write_study(one, subjects=1)
    folder = one / "sub-01" / "ses-1" / "dwi"
    for ext in ("bval", "bvec"):  # consistent gradient files, one volume short
        f = folder / f"sub-01_ses-1_dwi.{ext}"
        f.write_text("\n".join(" ".join(r.split()[:-1]) for r in f.read_text().splitlines()))
    code, out, err = _run(capsys, "bids", one, tmp_path / "o", "participant", "--model",
                          "noddi", "--dry-run")
    assert code == 0, err
    assert "cannot be read: DWI file sub-01/ses-1/dwi/sub-01_ses-1_dwi.nii.gz has 27 " \
           "volumes but its gradient table describes 26 measurements" in out


def test_fit_option_flags_reach_every_job_and_its_provenance(capsys, study, tmp_path):
    from fingerprint.batch.runner import StudyOptions, plan_study

    default = plan_study(study, tmp_path / "out", StudyOptions(models=("noddi",),
                                                               dictionary_size=2000))
    chosen = plan_study(study, tmp_path / "out", StudyOptions(
        models=("noddi",), dictionary_size=2000,
        fit=(("count_penalty", 2.5), ("n_neighbors", 16), ("refine", "false"))))
    job = chosen.series[0].jobs["noddi"]
    assert job.options.refine is False and job.options.n_neighbors == 16
    assert job.options.count_penalty == 2.5 and job.options.dictionary_size == 2000
    solver = job.provenance["Solver"]["Options"]
    assert solver["refine"] is False and solver["n_neighbors"] == 16
    # other options, another job: a rerun with them refits instead of skipping
    assert job.job_hash != default.series[0].jobs["noddi"].job_hash

    code, out, err = _run(capsys, "bids", study, tmp_path / "out", "participant", "--model",
                          "noddi", "--dry-run", "--dictionary-size", SIZE, "--refine",
                          "false", "--count-penalty", "2.5")
    assert code == 0, err
    assert "noddi: run -- to do" in out
    code, out, err = _run(capsys, "bids", study, tmp_path / "out", "participant", "--model",
                          "noddi", "--dry-run", "--count-penalty", "-1")
    assert code != 0 and "count_penalty" in err
    assert not (tmp_path / "out").exists()


def test_study_outputs_provenance_resume_and_failures(capsys, study, tmp_path):
    out, dicts = tmp_path / "derivatives", tmp_path / "dictionaries"
    code, stdout, err = _run(capsys, *_args(study, out, dicts))
    assert code == 1, err  # sub-03 failed; the others finished
    rows = _tsv(out)
    status = {(r["subject"], r["model"]): r["status"] for r in rows}
    assert status == {("01", "ball_stick"): "done", ("01", "noddi"): "done",
                      ("02", "ball_stick"): "done", ("02", "noddi"): "done",
                      ("03", "*"): "failed"}
    failed = next(r for r in rows if r["status"] == "failed")
    assert "sub-03_ses-1_dwi.bvec" in failed["message"]
    assert "4 done, 0 skipped, 1 failed" in stdout

    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative"
    assert desc["GeneratedBy"][0]["Name"] == "fingerprint"
    assert desc["GeneratedBy"][0]["CodeURL"].startswith("https://")
    folder = out / "sub-02" / "ses-1" / "dwi"
    for model, label in (("noddi", "odi"), ("noddi", "icvf"), ("ballStick", "stickFraction")):
        img = nib.load(folder / f"sub-02_ses-1_model-{model}_param-{label}_dwimap.nii.gz")
        assert img.shape == (3, 3, 2)
        assert np.all(np.isfinite(np.asarray(img.dataobj)))
    side = json.loads((folder / "sub-02_ses-1_model-noddi_param-odi_dwimap.json").read_text())
    prov = side["Provenance"]
    assert prov["Software"]["Name"] == "fingerprint" and prov["Software"]["Version"]
    assert prov["Recipe"]["Name"] == "noddi" and len(prov["Recipe"]["SHA256"]) == 64
    assert prov["Dictionary"]["Atoms"] == 2000 and len(prov["Dictionary"]["Key"]) == 64
    assert prov["Solver"]["Options"]["dictionary_size"] == 2000
    assert [s["Path"] for s in prov["SourceFiles"]] == ["sub-02/ses-1/dwi/sub-02_ses-1_dwi.mif.gz"]
    assert side["Sources"] == ["sub-02/ses-1/dwi/sub-02_ses-1_dwi.mif.gz"]
    assert "sub-02_ses-1_model-noddi_param-odi_dwimap.nii.gz" in prov["Outputs"]
    timing = json.loads((out / "sub-01" / "ses-1" / "dwi" /
                         "sub-01_ses-1_model-noddi_param-odi_dwimap.json").read_text())
    assert timing["Provenance"]["Scheme"]["Timing"]["delta"] == pytest.approx(0.015)
    # one dictionary per model and distinct scheme (2 x 2), each built once
    stores = [p for p in dicts.iterdir() if not p.name.startswith(".")]
    assert len(stores) == 4
    # QC page: one mosaic per scalar parameter
    html = (out / "qc" / "index.html").read_text()
    assert "group_model-noddi_param-odi_mosaic.png" in html
    assert (out / "qc" / "group_model-noddi_param-odi_mosaic.png").stat().st_size > 1000
    assert "sub-03_ses-1_dwi.bvec" in html

    # re-run: everything finished is skipped, by its provenance
    code, stdout, _ = _run(capsys, *_args(study, out, dicts))
    assert "0 done, 4 skipped, 1 failed" in stdout
    assert all(r["message"].startswith("complete") for r in _tsv(out) if r["status"] == "skipped")

    # damage: a missing map, a sidecar from other inputs, a leftover of a killed run
    f1 = out / "sub-01" / "ses-1" / "dwi"
    (f1 / "sub-01_ses-1_model-noddi_param-isovf_dwimap.nii.gz").unlink()
    js = folder / "sub-02_ses-1_model-ballStick_param-r2_dwimap.json"
    data = json.loads(js.read_text())
    data["Provenance"]["JobHash"] = "0" * 64
    js.write_text(json.dumps(data))
    leftover = f1 / ".fingerprint-partial-noddi-1-abc"
    leftover.mkdir()
    (leftover / "half.nii.gz").write_bytes(b"\x1f\x8b")
    code, stdout, _ = _run(capsys, *_args(study, out, dicts))
    status = {(r["subject"], r["model"]): r["status"] for r in _tsv(out)}
    assert status[("01", "noddi")] == "done" and status[("02", "ball_stick")] == "done"
    assert status[("01", "ball_stick")] == "skipped" and status[("02", "noddi")] == "skipped"
    assert not leftover.exists()
    assert (f1 / "sub-01_ses-1_model-noddi_param-isovf_dwimap.nii.gz").is_file()
    assert len([p for p in dicts.iterdir() if not p.name.startswith(".")]) == 4

    (out / "qc" / "index.html").unlink()
    code, stdout, _ = _run(capsys, "bids", study, out, "group", "--model", "noddi",
                           "ball_stick", "--dictionary-size", SIZE)
    assert code == 0 and "QC page:" in stdout
    assert "group_model-ballStick_param-stickFraction_mosaic.png" in \
        (out / "qc" / "index.html").read_text()


def test_qsiprep_layout_uses_the_brain_mask(capsys, tmp_path):
    root = tmp_path / "qsiprep"
    write_study(root, subjects=2, layout="qsiprep")
    mask = root / "sub-01" / "dwi" / "sub-01_space-T1w_desc-brain_mask.nii.gz"
    data = np.asarray(nib.load(mask).dataobj).copy()
    data[0] = 0  # fewer voxels than the default (positive b=0) mask
    nib.save(nib.Nifti1Image(data, nib.load(mask).affine), mask)
    found, layout = find_series(root)
    assert layout == "qsiprep" and [s.entities for s in found] == ["sub-01_space-T1w",
                                                                    "sub-02_space-T1w"]
    out = tmp_path / "out"
    code, stdout, err = _run(capsys, "bids", root, out, "participant", "--model", "noddi",
                             "--participant-label", "sub-01", "--dictionary-size", SIZE,
                             "--no-progress", "--threads", 1, "--no-qc")
    assert code == 0, err
    side = json.loads((out / "sub-01" / "dwi" /
                       "sub-01_space-T1w_model-noddi_param-odi_dwimap.json").read_text())
    assert side["FittedVoxels"] == int(data.sum()) == 12
    assert "sub-01/dwi/sub-01_space-T1w_desc-brain_mask.nii.gz" in side["Sources"]
    assert not (out / "sub-02").exists()
    # a corrupt image found only when fitting: reported, the others finish or are kept
    dwi2 = root / "sub-02" / "dwi" / "sub-02_space-T1w_desc-preproc_dwi.nii.gz"
    dwi2.write_bytes(dwi2.read_bytes()[:-200])
    code, stdout, err = _run(capsys, "bids", root, out, "participant", "--model", "noddi",
                             "--dictionary-size", SIZE, "--no-progress", "--threads", 1,
                             "--no-qc")
    assert code == 1
    rows = {r["subject"]: r for r in _tsv(out)}
    assert rows["01"]["status"] == "skipped"
    assert rows["02"]["status"] == "failed" and "sub-02_space-T1w_desc-preproc_dwi.nii.gz" \
        in rows["02"]["message"]
    assert not list((out / "sub-02" / "dwi").iterdir())
    code, _, err = _run(capsys, "bids", root, out, "participant", "--model", "noddi",
                        "--participant-label", "05")
    assert code == 2 and "--participant-label 05: no such subject" in err


def test_timing_and_oddity_helpers():
    assert read_timing({"SmallDelta": 15, "BigDelta": 35}, "x.json")[:2] == (0.015, 0.035)
    d, D, source, notes = read_timing({"DiffusionGradientDuration": 0.01,
                                       "DiffusionGradientSeparation": 0.03}, "x.json")
    assert (d, D, notes) == (0.01, 0.03, []) and "DiffusionGradientDuration" in source
    assert read_timing({}, "x.json")[:3] == (None, None, "none")
    with pytest.raises(InputError, match="x.json: BigDelta must be positive"):
        read_timing({"SmallDelta": 0.01, "BigDelta": -1}, "x.json")
    b = np.array([0, 1000, 1000, 1000, 2000])
    v = np.array([[0, 0, 0], [1, 0, 0], [0, 0, 0], [0, 0.9, 0], [0, 0, 1]])
    odd = raw_oddities(b, v)
    assert "1 volumes with a zero b-vector at non-zero b (b=1000" in odd[0]
    assert "1 b-vectors are not unit length (norms 0.9..0.9)" in odd[1]


@pytest.mark.slow
def test_kill_minus_9_loses_no_finished_series_and_dask(capsys, tmp_path):
    root = tmp_path / "study"
    write_study(root, subjects=4, mif=False)
    out, dicts = tmp_path / "out", tmp_path / "dicts"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    argv = [sys.executable, "-m", "fingerprint", "bids", str(root), str(out), "participant",
            "--model", "noddi", "--dictionary-size", SIZE, "--dictionary-dir", str(dicts),
            "--no-progress", "--threads", "1"]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    anchors = [out / f"sub-0{i}" / "ses-1" / "dwi" /
               f"sub-0{i}_ses-1_model-noddi_param-s0_dwimap.json" for i in range(1, 5)]
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not any(a.exists() for a in anchors):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    finished = [a for a in anchors if a.exists()]
    assert finished
    # whatever is visible and looks complete is complete
    for a in finished:
        prov = json.loads(a.read_text())["Provenance"]
        assert job_outputs_valid(a.parent, a.name.split("_model-")[0], "noddi",
                                 prov["JobHash"]) is None

    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                      dashboard_address=None) as cluster:
        code, stdout, err = _run(capsys, "bids", root, out, "participant", "--model", "noddi",
                                 "--dictionary-size", SIZE, "--dictionary-dir", dicts,
                                 "--no-progress", "--threads", 1, "--dask-scheduler",
                                 cluster.scheduler_address)
    assert code == 0, err
    rows = _tsv(out)
    skipped = {r["series"].split("/")[0] for r in rows if r["status"] == "skipped"}
    assert {a.parent.parent.parent.name for a in finished} <= skipped
    assert all(r["status"] in ("done", "skipped") for r in rows) and len(rows) == 4
    assert not list(out.glob("sub-*/ses-1/dwi/.fingerprint-partial-*"))
