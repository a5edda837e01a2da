"""`fingerprint fit` and `fingerprint demo`: outputs, progress, one-line errors (exit 2)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fingerprint.cli.main import main
from fingerprint.phantoms import noddi_phantom, write_phantom

SIZE = 3000


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    phantom = noddi_phantom(shape=(4, 3, 2), seed=1, snr=40)
    return write_phantom(phantom, tmp_path_factory.mktemp("phantom"), prefix="sub-07_ses-2")


def _run(capsys, *argv):
    code = main([*map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def _fit_args(files, out, *extra):
    return ["fit", "--model", "noddi", "--dwi", files["dwi"], "--bval", files["bval"],
            "--bvec", files["bvec"], "--out", out, "--dictionary-size", SIZE, *extra]


def test_fit_writes_maps_with_the_prefix_of_the_input(capsys, files, tmp_path):
    code, out, err = _run(capsys, *_fit_args(files, tmp_path / "maps", "--mask", files["mask"],
                                             "--threads", 1, "--preview"))
    assert code == 0, err
    assert "100%" in err  # tqdm progress bar on stderr
    written = sorted(p.name for p in (tmp_path / "maps").iterdir())
    assert "sub-07_ses-2_model-noddi_param-odi_dwimap.nii.gz" in written
    assert "sub-07_ses-2_model-noddi_param-odi_dwimap.json" in written
    assert "sub-07_ses-2_model-noddi_desc-preview.png" in written
    assert "fitted 24 voxels with noddi" in out
    assert "sub-07_ses-2_model-noddi_param-direction_dwimap.nii.gz" in out
    direction = nib.load(
        tmp_path / "maps" / "sub-07_ses-2_model-noddi_param-direction_dwimap.nii.gz")
    assert direction.shape == (4, 3, 2, 3)

    code, out, err = _run(capsys, *_fit_args(files, tmp_path / "other", "--prefix", "sub-x",
                                             "--no-progress", "--chunk-voxels", 5))
    assert code == 0 and err == ""
    for name in ("icvf", "odi", "isovf", "direction", "s0", "r2"):
        ours = np.asarray(nib.load(tmp_path / "other" /
                                   f"sub-x_model-noddi_param-{name}_dwimap.nii.gz").dataobj)
        theirs = np.asarray(nib.load(tmp_path / "maps" /
                                     f"sub-07_ses-2_model-noddi_param-{name}_dwimap.nii.gz")
                            .dataobj)
        np.testing.assert_array_equal(ours, theirs, err_msg=name)


def test_fit_errors_are_one_line_with_exit_code_2(capsys, files, tmp_path):
    cases = [
        (_fit_args(files, tmp_path)[:2] + ["nodi"] + _fit_args(files, tmp_path)[3:], "nodi"),
        (_fit_args(files, tmp_path, "--mask", tmp_path / "missing.nii.gz"), "missing.nii.gz"),
        (_fit_args(files, tmp_path, "--delta", 0.01), "--Delta"),
        (_fit_args(files, tmp_path, "--threads", 0), "--threads"),
        (_fit_args(files, tmp_path, "--prefix", "a/b"), "prefix"),
        (["fit", "--model", "noddi", "--dwi", files["bval"], "--bval", files["bval"],
          "--bvec", files["bvec"], "--out", tmp_path], files["bval"].name),
    ]
    for argv, needle in cases:
        code, out, err = _run(capsys, *argv)
        assert code == 2, (argv, err)
        assert needle in err and err.startswith("fingerprint fit: error:"), err
        assert len(err.strip().splitlines()) == 1, err
    with pytest.raises(SystemExit):
        main(["fit", "--model", "noddi"])  # argparse: missing required arguments


def test_demo_runs_and_reports_accuracy(capsys, tmp_path):
    code, out, err = _run(capsys, "demo", "--out", tmp_path, "--shape", 4, 4, 2,
                          "--dictionary-size", SIZE, "--no-progress")
    assert code == 0, err
    assert "accuracy vs ground truth" in out and "icvf" in out and "angular error" in out
    png = tmp_path / "sub-demo_model-noddi_desc-preview.png"
    assert png.read_bytes()[:4] == b"\x89PNG" and str(png) in out
    assert (tmp_path / "fit" / "sub-demo_model-noddi_param-icvf_dwimap.nii.gz").exists()
    assert (tmp_path / "phantom" / "sub-demo_dwi.nii.gz").exists()
    mae = float(out.split("icvf")[1].split()[0])
    assert 0 <= mae < 0.2


def test_invalid_voxels_do_not_stop_a_fit_and_the_summary_counts_flags(tmp_path, capsys):
    # a NaN voxel and a voxel with a negative signal: left out, counted, NaN in the maps,
    # flagged "invalid" in the quality map; the b=0 volumes are at b = 5 s/mm² and the
    # run says so with --b0-threshold (the physics uses b = 5)
    phantom = noddi_phantom(shape=(4, 3, 2), seed=2, snr=40)
    phantom["dwi"][1, 1, 0, 9] = np.nan
    phantom["dwi"][2, 0, 1, 20] = -5.0
    paths = write_phantom(phantom, tmp_path / "in", prefix="sub-09")
    bvals = np.loadtxt(paths["bval"]).ravel()
    paths["bval"].write_text(" ".join(f"{5.0 if b == 0 else b:g}" for b in bvals) + "\n")
    args = ["fit", "--model", "noddi", "--dwi", paths["dwi"], "--bval", paths["bval"],
            "--bvec", paths["bvec"], "--out", tmp_path / "out", "--dictionary-size", SIZE,
            "--no-progress"]
    code, out, err = _run(capsys, *args)
    assert code == 0, err
    assert "2 voxels were left out" in out
    assert "quality:" in out and "invalid 2" in out
    quality = np.asarray(nib.load(tmp_path / "out" /
                                  "sub-09_model-noddi_desc-quality_dwimap.nii.gz").dataobj)
    assert int(quality[1, 1, 0]) & 1 and int(quality[2, 0, 1]) & 1
    odi = np.asarray(nib.load(tmp_path / "out" /
                              "sub-09_model-noddi_param-odi_dwimap.nii.gz").dataobj)
    assert np.isnan(odi[1, 1, 0]) and np.isnan(odi[2, 0, 1])
    assert np.isfinite(odi[0, 0, 0])
    # with a threshold below 5 s/mm² those volumes are diffusion-weighted without a
    # direction: refused, naming the file and the measurement
    code, out, err = _run(capsys, *args, "--b0-threshold", 2)
    assert code == 2 and "measurement 0 has b = 5 s/mm² but a zero gradient vector" in err


def test_fit_with_a_classical_solver_records_it(capsys, files, tmp_path):
    """--solver brute2fine with dmipy's options: no dictionary, the sidecars say which
    solver ran, the fit matches the library's, and bad values name the flag."""
    import json

    from fingerprint.fitting.options import FitOptions
    from fingerprint.fitting.pipeline import fit_volume

    out_dir = tmp_path / "b2f"
    argv = ["fit", "--model", "noddi", "--dwi", files["dwi"], "--bval", files["bval"],
            "--bvec", files["bvec"], "--mask", files["mask"], "--out", out_dir,
            "--no-progress", "--threads", 1, "--solver", "brute2fine", "--Ns", 3,
            "--N-sphere-samples", 12, "--maxiter", 50]
    code, out, err = _run(capsys, *argv)
    assert code == 0, err
    assert "fitted 24 voxels with noddi" in out and "brute2fine" in out
    sidecar = json.loads((out_dir / "sub-07_ses-2_model-noddi_param-odi_dwimap.json")
                         .read_text())
    assert sidecar["Solver"] == "brute2fine"
    assert not list(out_dir.glob("*uncertainty*"))
    ref = fit_volume("noddi", files["dwi"], files["bval"], files["bvec"], tmp_path / "lib",
                     mask=files["mask"], prefix="sub-07_ses-2",
                     options=FitOptions.from_mapping({"solver": "brute2fine", "Ns": 3,
                                                      "N_sphere_samples": 12,
                                                      "maxiter": 50, "threads": 1}))
    for name in ("icvf", "odi", "isovf"):
        fname = f"sub-07_ses-2_model-noddi_param-{name}_dwimap.nii.gz"
        np.testing.assert_allclose(np.asarray(nib.load(out_dir / fname).dataobj),
                                   np.asarray(nib.load(ref.out_dir / fname).dataobj),
                                   atol=1e-6, err_msg=name)
    # mix runs too, and records itself
    code, out, err = _run(capsys, *argv[:-8], "--solver", "mix", "--maxiter", 20,
                          "--popsize", 3, "--out", tmp_path / "mix")
    assert code == 0, err
    sidecar = json.loads((tmp_path / "mix" / "sub-07_ses-2_model-noddi_param-icvf_dwimap"
                          ".json").read_text())
    assert sidecar["Solver"] == "mix"
    for bad, needle in ((["--Ns", 1], "Ns"), (["--maxiter", 0], "maxiter")):
        code, _, err = _run(capsys, *argv, *bad)
        assert code == 2 and needle in err, err
    with pytest.raises(SystemExit):  # not a choice (amico is refused, not offered)
        main([*map(str, argv[:-8]), "--solver", "amico"])
