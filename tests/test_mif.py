"""MRtrix .mif / .mif.gz: a hand-made oblique file, FSL bvec conversion, `fingerprint fit`."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fingerprint.cli.main import main
from fingerprint.errors import InputError
from fingerprint.io.mif import (
    fsl_to_scanner_gradients,
    mif_as_nifti,
    read_mif,
    scanner_to_fsl_bvecs,
    write_mif,
)
from fingerprint.phantoms import noddi_phantom, write_phantom

COS, SIN = np.cos(np.radians(30)), np.sin(np.radians(30))


def _hand_made(path: Path, compress: bool = False) -> None:
    """dim 3x2x2x3, Int16LE scaled by 0.5 with offset 1, axis 0 stored reversed, axes
    rotated 30 degrees about z; logical value v[i,j,k,t] = 1000t + 100i + 10j + k."""
    header = (
        "mrtrix image\n"
        "dim: 3,2,2,3\n"
        "vox: 2,2.5,3,nan\n"
        "layout: -0,+1,+2,+3\n"
        "datatype: Int16LE\n"
        "scaling: 1,0.5\n"
        f"transform: {COS},{-SIN},0,10\n"
        f"transform: {SIN},{COS},0,-20\n"
        "transform: 0,0,1,30\n"
        "dw_scheme: 0,0,0,0\n"
        "dw_scheme: 1,0,0,1000\n"
        "dw_scheme: 0,0,1,2000\n"
        "command_history: hand made\n"
    )
    offset = 512
    head = (header + f"file: . {offset}\nEND\n").encode()
    head += b"\0" * (offset - len(head))
    values = []
    for t in range(3):
        for k in range(2):
            for j in range(2):
                for i_disk in range(3):
                    i = 2 - i_disk  # reversed axis 0
                    stored = (1000 * t + 100 * i + 10 * j + k - 1) / 0.5
                    values.append(int(stored))
    payload = head + struct.pack(f"<{len(values)}h", *values)
    if compress:
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)


@pytest.mark.parametrize("compress", [False, True])
def test_hand_made_oblique_file(tmp_path, compress):
    path = tmp_path / ("x.mif.gz" if compress else "x.mif")
    _hand_made(path, compress)
    image = read_mif(path)
    i, j, k, t = np.meshgrid(*map(np.arange, (3, 2, 2, 3)), indexing="ij")
    np.testing.assert_allclose(image.data, 1000 * t + 100 * i + 10 * j + k)
    expected_affine = np.array([[2 * COS, -2.5 * SIN, 0, 10], [2 * SIN, 2.5 * COS, 0, -20],
                                [0, 0, 3, 30], [0, 0, 0, 1]])
    np.testing.assert_allclose(image.affine, expected_affine, atol=1e-12)
    np.testing.assert_allclose(image.bvals, [0, 1000, 2000])
    # scanner x seen from axes rotated by +30 degrees is (cos, -sin, 0) in voxel axes; the
    # affine's determinant is positive, so FSL's convention flips the first axis
    np.testing.assert_allclose(image.bvecs, [[0, -COS, 0], [0, -SIN, 0], [0, 0, 1]],
                               atol=1e-12)


def test_neurological_and_radiological_conventions():
    g = np.array([[1.0, 0, 0], [0, 1, 0], [0.6, 0, 0.8]])
    radiological = np.diag([-2.0, 2.0, 2.0, 1.0])  # det < 0: voxel axes as FSL's
    np.testing.assert_allclose(scanner_to_fsl_bvecs(g, radiological),
                               [[-1, 0, -0.6], [0, 1, 0], [0, 0, 0.8]])
    neurological = np.diag([2.0, 2.0, 2.0, 1.0])  # det > 0: FSL flips x
    np.testing.assert_allclose(scanner_to_fsl_bvecs(g, neurological),
                               [[-1, 0, -0.6], [0, 1, 0], [0, 0, 0.8]])
    rng = np.random.default_rng(3)
    for _ in range(5):
        q, _r = np.linalg.qr(rng.standard_normal((3, 3)))
        affine = np.eye(4)
        affine[:3, :3] = q * [1.5, 2.0, 2.5]
        v = rng.standard_normal((7, 3))
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        np.testing.assert_allclose(
            fsl_to_scanner_gradients(scanner_to_fsl_bvecs(v, affine), affine), v, atol=1e-12)


def test_round_trip_and_errors(tmp_path):
    data = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
    affine = np.array([[0, -2.0, 0, 5], [2.0, 0, 0, 6], [0, 0, 2.0, 7], [0, 0, 0, 1]])
    grad = np.column_stack([np.eye(5, 3), np.arange(5) * 500.0])
    for name in ("a.mif", "a.mif.gz"):
        write_mif(tmp_path / name, data, affine, grad)
        image = read_mif(tmp_path / name)
        np.testing.assert_array_equal(image.data, data)
        np.testing.assert_allclose(image.affine, affine)
        np.testing.assert_allclose(image.grad, grad)
    with mif_as_nifti(tmp_path / "a.mif.gz", tmp_path / "conv") as files:
        nii = nib.load(files["dwi"])
        np.testing.assert_array_equal(np.asarray(nii.dataobj), data)
        np.testing.assert_allclose(nii.affine, affine)
        assert files["dwi"].name == "a.nii" and files["bvec"].name == "a.bvec"
        np.testing.assert_allclose(np.loadtxt(files["bvec"]),
                                   scanner_to_fsl_bvecs(grad[:, :3], affine), atol=1e-8)
    assert not any((tmp_path / "conv").iterdir())  # the temporary files are gone

    full = (tmp_path / "a.mif").read_bytes()
    (tmp_path / "short.mif").write_bytes(full[:-40])
    with pytest.raises(InputError, match=r"short\.mif is truncated"):
        read_mif(tmp_path / "short.mif")
    (tmp_path / "bad.mif").write_bytes(b"not an image\n")
    with pytest.raises(InputError, match=r"bad\.mif does not start with 'mrtrix image'"):
        read_mif(tmp_path / "bad.mif")
    (tmp_path / "type.mif").write_bytes(full.replace(b"Float32LE", b"CFloat32L"))
    with pytest.raises(InputError, match="datatype 'CFloat32L' is not supported"):
        read_mif(tmp_path / "type.mif")


def test_fit_accepts_mif_with_its_gradient_table(tmp_path, capsys):
    phantom = noddi_phantom(shape=(3, 3, 2), seed=4, snr=40)
    files = write_phantom(phantom, tmp_path / "in", prefix="sub-03")
    img = nib.load(files["dwi"])
    bvecs = np.loadtxt(files["bvec"])
    grad = np.column_stack([fsl_to_scanner_gradients(bvecs, img.affine),
                            np.loadtxt(files["bval"])])
    mif = write_mif(tmp_path / "in" / "sub-03_dwi.mif.gz", np.asarray(img.dataobj),
                    img.affine, grad)
    common = ["--model", "noddi", "--dictionary-size", "3000", "--no-progress",
              "--threads", "1"]
    assert main(["fit", "--dwi", str(mif), "--out", str(tmp_path / "mif"), *common]) == 0
    assert main(["fit", "--dwi", str(files["dwi"]), "--bval", str(files["bval"]),
                 "--bvec", str(files["bvec"]), "--out", str(tmp_path / "nii"), *common]) == 0
    capsys.readouterr()
    for label in ("icvf", "odi", "isovf"):
        name = f"sub-03_model-noddi_param-{label}_dwimap.nii.gz"
        a = np.asarray(nib.load(tmp_path / "mif" / name).dataobj)
        b = np.asarray(nib.load(tmp_path / "nii" / name).dataobj)
        np.testing.assert_allclose(a, b, atol=1e-4, err_msg=label)
    assert not [p for p in (tmp_path / "mif").iterdir() if p.name.startswith(".")]
    side = json.loads((tmp_path / "mif" / "sub-03_model-noddi_param-odi_dwimap.json")
                      .read_text())
    assert side["Sources"] == ["sub-03_dwi.mif.gz"]
    code = main(["fit", "--dwi", str(files["dwi"]), "--out", str(tmp_path / "x"), *common])
    err = capsys.readouterr().err
    assert code == 2 and "--bval and --bvec are required" in err
