"""Fit options in the lab server: learned from the library's option specs, validated once
by ``FitOptions`` (422 naming the field), stored with the job and used by its fit."""

from __future__ import annotations

import argparse
import gzip
import io
import json
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from server_helpers import client, serve, upload_files, wait_for

from fingerprint.cli import submit
from fingerprint.cli.flags import option_flag
from fingerprint.cli.main import CLIError
from fingerprint.fitting.options import FIT_OPTION_SPECS, FitOptions
from server.forms import SERVER_HIGH, FitForm, parse_form

#: atoms of the test dictionary: small, so the build is quick
SIZE = 2000
#: voxels a classical-solver job may fit on the test server (the phantom's mask has 18)
MAX_CLASSICAL = 12


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from serve(tmp_path_factory, "options-server", "--workers", "1",
                     "--max-classical-voxels", str(MAX_CLASSICAL))


@pytest.fixture(scope="module")
def small_mask(phantom, tmp_path_factory) -> Path:
    """The phantom's first slice (9 voxels): within the classical solvers' limit."""
    mask = nib.load(phantom["mask"])
    data = np.asarray(mask.dataobj).copy()
    data[..., 1:] = 0
    path = tmp_path_factory.mktemp("small-mask") / "mask.nii.gz"
    nib.save(nib.Nifti1Image(data, mask.affine), path)
    return path


def test_the_form_offers_the_library_s_server_options():
    offered = {s.name for s in FIT_OPTION_SPECS if s.server}
    assert {"n_neighbors", "refine", "solver", "Ns", "N_sphere_samples", "maxiter",
            "mask_rule", "threads", "dictionary_size"} <= offered
    # every offered option is a field of the form and of the multipart body, with the
    # existing fields kept for old clients
    text = set(FitForm.model_fields)
    assert offered <= text
    assert {"model", "prefix", "delta", "Delta", "TE", "b0_threshold"} <= text
    assert offered <= set(FitOptions.option_names())
    # a spec's bounds become the field's (the server may only narrow them)
    fields = FitForm.model_json_schema()["properties"]
    ns = next(s for s in FIT_OPTION_SPECS if s.name == "Ns")
    assert fields["Ns"]["anyOf"][0]["minimum"] == ns.low
    assert fields["Ns"]["anyOf"][0]["maximum"] == ns.high
    assert fields["threads"]["anyOf"][0]["maximum"] == SERVER_HIGH["threads"]
    form = parse_form(FitForm, {"n_neighbors": "8", "solver": "brute2fine", "refine": "",
                                "tol": "0.1"})
    assert (form.n_neighbors, form.solver, form.refine, form.tol) == (8, "brute2fine",  # type: ignore[attr-defined]
                                                                      None, 0.1)


def test_fit_options_endpoint_and_openapi(server):
    with client(server, server.keys["alice"]) as http:
        options = {o["name"]: o for o in http.get("/v1/fit-options").json()}
        schema = http.get("/openapi.json").json()
    assert set(options) == {s.name for s in FIT_OPTION_SPECS if s.server}
    assert options["solver"]["choices"] == ["fingerprint", "brute2fine", "mix"]
    assert options["solver"]["default"] == "fingerprint"
    assert options["Ns"]["default"] == 5 and options["refine"]["kind"] == "refine"
    assert options["threads"]["high"] == 256
    assert options["multi_tissue"]["kind"] == "text"
    assert options["count_penalty"]["kind"] == "float"
    assert (options["count_penalty"]["low"], options["count_penalty"]["high"]) == (0, 1000)
    assert options["count_penalty"]["default"] is None  # the model's (recipe, else BIC)
    assert options["multi_tissue"]["default"] is None
    # refine: chosen per model (a recipe may set its default), so no single default
    assert options["refine"]["default"] is None
    body = schema["paths"]["/v1/jobs"]["post"]["requestBody"]["content"][
        "multipart/form-data"]["schema"]
    assert body["required"] == ["dwi", "bval", "bvec"]
    assert body["properties"]["n_neighbors"]["type"] == "integer"
    assert body["properties"]["solver"]["enum"] == ["fingerprint", "brute2fine", "mix"]
    assert body["properties"]["dwi"]["format"] == "binary"


@pytest.mark.parametrize("data,field,words", [
    ({"solver": "amico"}, "solver", "not implemented"),
    ({"solver": "levenberg"}, "solver", "'solver' must be one of"),
    ({"n_neighbors": "0"}, "n_neighbors", "greater than or equal to 1"),
    ({"n_neighbors": "eight"}, "n_neighbors", "valid integer"),
    ({"refine": "maybe"}, "refine", "true, false or 'nonlinear'"),
    ({"Ns": "1000"}, "Ns", "less than or equal to 100"),
    ({"tol": "2"}, "tol", "less than or equal to 1"),
    ({"count_penalty": "-1"}, "count_penalty", "greater than or equal to 0"),
    ({"count_penalty": "1e9"}, "count_penalty", "less than or equal to 1000"),
    ({"count_penalty": "lots"}, "count_penalty", "valid number"),
    ({"count_penalty": "nan"}, "count_penalty", "'count_penalty'"),
    ({"mask_rule": "brain"}, "mask_rule", "'positive_b0', 'all'"),
    ({"threads": "1000"}, "threads", "less than or equal to 256"),
    ({"b0_threshold": "-1"}, "b0_threshold", "greater than or equal to 0"),
    ({"seed": "3"}, "seed", "unknown form field"),  # not offered by the server
    ({"multi_tissue": "lots"}, "multi_tissue", "responses must be 'auto', positive numbers"),
    ({"multi_tissue": "wm=1,brain=2"}, "multi_tissue", "name each of the tissues"),
    ({"multi_tissue": "3000,-1"}, "multi_tissue", "must be positive numbers"),
    ({"multi_tissue": "1" * 300}, "multi_tissue", "at most 200 characters"),
    ({"model": "noddi", "multi_tissue": "1,2,3"}, "multi_tissue",
     "must be 2 positive numbers (one per top-level compartment)"),
    ({"model": "noddi", "multi_tissue": "wm=3000,gm=4000"}, "multi_tissue",
     "miss tissue(s) ['csf']"),
])
def test_bad_fit_options_are_422_naming_the_field(server, phantom, data, field, words):
    with client(server, server.keys["alice"]) as http:
        r = http.post("/v1/jobs", files=upload_files(phantom), data=data)
        assert r.status_code == 422, r.text
        body = r.json()
        assert body["field"] == field, body
        assert words in body["detail"] and f"'{field}'" in body["detail"], body
        assert http.get("/v1/jobs").json()["total"] == 0  # nothing queued
    assert list((server.data_dir / "tmp").iterdir()) == []


def _sidecar(http, job: dict) -> dict:
    archive = zipfile.ZipFile(io.BytesIO(http.get(f"/v1/jobs/{job['id']}/results").content))
    name = next(n for n in archive.namelist() if n.endswith("param-odi_dwimap.json"))
    return json.loads(archive.read(name))


def test_fit_options_are_recorded_and_used_by_the_fit(server, phantom, small_mask):
    with client(server, server.keys["bob"]) as http:
        r = http.post("/v1/jobs", files=upload_files({**phantom, "mask": small_mask}), data={
            "model": "noddi", "solver": "brute2fine", "n_neighbors": "8", "Ns": "2",
            "N_sphere_samples": "6", "maxiter": "20", "refine": "false",
            "b0_threshold": "20"})
        assert r.status_code == 202, r.text
        job = r.json()
        assert job["options"] == {"solver": "brute2fine", "n_neighbors": 8, "Ns": 2,
                                  "N_sphere_samples": 6, "maxiter": 20, "refine": False,
                                  "b0_threshold": 20e6}
        done = wait_for(http, job["id"], timeout=600)
        assert done["status"] == "succeeded", done
        assert done["options"] == job["options"]  # the job record keeps them
        sidecar = _sidecar(http, done)
        assert sidecar["Solver"] == "brute2fine"
        # the same job with dictionary matching and its neighbour count (the non-linear
        # polish: within the per-voxel fits' limit)
        r = http.post("/v1/jobs", files=upload_files({**phantom, "mask": small_mask}), data={
            "model": "noddi", "n_neighbors": "4", "dictionary_size": str(SIZE),
            "refine": "nonlinear"})
        assert r.status_code == 202, r.text
        done = wait_for(http, r.json()["id"], timeout=600)
        assert done["status"] == "succeeded", done
        assert done["options"] == {"n_neighbors": 4, "dictionary_size": SIZE,
                                   "refine": "nonlinear"}
        assert _sidecar(http, done)["Solver"] == "fingerprint"
        assert done["result"]["n_voxels"] == 9
        # matching alone fits every voxel (18: above the per-voxel fits' limit)
        r = http.post("/v1/jobs", files=upload_files(phantom), data={
            "model": "noddi", "dictionary_size": str(SIZE), "refine": "true"})
        assert r.status_code == 202, r.text
        done = wait_for(http, r.json()["id"], timeout=600)
        assert done["status"] == "succeeded", done
        assert done["result"]["n_voxels"] == 18


def test_classical_solvers_fit_fewer_voxels(server, phantom):
    """A classical solver (a non-linear fit per voxel) may fit at most
    --max-classical-voxels: a mask over it is refused at once, a default mask over it
    fails the job before it fits."""
    with client(server, server.keys["root"]) as http:
        r = http.post("/v1/jobs", files=upload_files(phantom), data={"solver": "mix"})
        assert r.status_code == 422 and r.json()["field"] == "mask", r.text
        assert f"limit of {MAX_CLASSICAL} voxels per job with solver 'mix'" in \
            r.json()["detail"]
        files = upload_files(phantom)
        del files["mask"]
        r = http.post("/v1/jobs", files=files, data={"solver": "brute2fine"})
        assert r.status_code == 202, r.text
        job = wait_for(http, r.json()["id"], timeout=300)
        assert job["status"] == "failed", job
        assert f"limit of {MAX_CLASSICAL} voxels per job with solver 'brute2fine'" in \
            job["error"], job


def test_multi_tissue_job_writes_volume_fractions(server, phantom):
    """``multi_tissue`` is a job option like the others: recorded in the library's
    canonical form, and the fit writes the tissues' volume-fraction maps."""
    with client(server, server.keys["bob"]) as http:
        r = http.post("/v1/jobs", files=upload_files(phantom), data={
            "model": "noddi", "dictionary_size": str(SIZE),
            "multi_tissue": " WM=1000, csf=4e3"})
        assert r.status_code == 202, r.text
        job = r.json()
        assert job["options"] == {"dictionary_size": SIZE, "multi_tissue": "wm=1000,csf=4000"}
        done = wait_for(http, job["id"], timeout=600)
        assert done["status"] == "succeeded", done
        archive = zipfile.ZipFile(io.BytesIO(http.get(f"/v1/jobs/{job['id']}/results").content))
    names = archive.namelist()
    wm = next(n for n in names if n.endswith("param-wmVf_dwimap.nii.gz"))
    csf = next(n for n in names if n.endswith("param-csfVf_dwimap.nii.gz"))
    isovf = next(n for n in names if n.endswith("param-isovf_dwimap.nii.gz"))

    def read(name: str) -> np.ndarray:
        return np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(archive.read(name))).dataobj)

    w, c, iso = read(wm), read(csf), read(isovf)
    inside = np.isfinite(w) & np.isfinite(c)
    assert inside.sum() == 18
    np.testing.assert_allclose(w[inside] + c[inside], 1.0, atol=1e-5)
    # CSF's four-fold S0 makes its volume fraction smaller than its signal fraction
    expected = (iso / 4000.0) / (iso / 4000.0 + (1.0 - iso) / 1000.0)
    np.testing.assert_allclose(c[inside], expected[inside], atol=1e-5)


#: A valid value of every fit option the server offers, as ``fingerprint submit`` flags
#: (cheap: a classical fit of a few voxels), and what the job record holds for it.
SUBMIT_FLAGS = {"dictionary_size": ("2000", 2000), "n_neighbors": ("8", 8),
                "refine": ("false", False), "threads": ("1", 1),
                "mask_rule": ("all", "all"), "solver": ("brute2fine", "brute2fine"),
                "Ns": ("2", 2), "N_sphere_samples": ("6", 6), "grid_starts": ("2", 2),
                "maxiter": ("20", 20), "popsize": ("4", 4), "tol": ("0.1", 0.1),
                "multi_tissue": ("wm=1000,csf=4000", "wm=1000,csf=4000"),
                "count_penalty": ("2.5", 2.5)}


def test_submit_has_a_flag_for_every_server_option_and_sends_it(server, phantom, small_mask,
                                                                  capsys):
    offered = {s.name for s in FIT_OPTION_SPECS if s.server}
    assert set(SUBMIT_FLAGS) <= offered
    parser = argparse.ArgumentParser()
    submit.add_parser(parser.add_subparsers())
    # every option the server offers has its flag (generated from the specs)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    flags = {f for a in sub.choices["submit"]._actions for f in a.option_strings}
    assert {option_flag(name) for name in offered} <= flags
    base = ["submit", "--server", server.url, "--api-key", server.keys["bob"],
            "--dwi", str(phantom["dwi"]), "--bval", str(phantom["bval"]),
            "--bvec", str(phantom["bvec"]), "--mask", str(small_mask), "--no-progress"]
    argv = [*base, "--b0-threshold", "20"]
    for name, (text, _) in SUBMIT_FLAGS.items():
        argv += [option_flag(name), text]
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    job_id = capsys.readouterr().out.split()[-1]
    with client(server, server.keys["bob"]) as http:
        job = http.get(f"/v1/jobs/{job_id}").json()
        expected = {name: value for name, (_, value) in SUBMIT_FLAGS.items()}
        assert job["options"] == {**expected, "b0_threshold": 20e6, "prefix": "sub-01"}, job
        assert http.delete(f"/v1/jobs/{job_id}").status_code in (200, 202)
    # a value the server refuses is reported with the field it names
    args = parser.parse_args([*base, "--solver", "brute2fine", "--Ns", "1"])
    with pytest.raises(CLIError, match="422.*Ns"):
        args.func(args)


@pytest.mark.parametrize("data, what", [
    ({"model": "noddi", "refine": "nonlinear"},
     "with the non-linear polish of model 'noddi' (refine='nonlinear')"),
    # a Bingham distribution's psi: the polish is the model's default
    ({"model": "noddi_bingham"},
     "with the non-linear polish of model 'noddi_bingham' (the model's default; "
     "refine=false turns it off)"),
])
def test_per_voxel_non_linear_fits_fit_fewer_voxels(server, phantom, data, what):
    """Jobs whose fit ends with the non-linear polish (about a second per voxel) fall
    under --max-classical-voxels like the classical solvers: a mask over it is 422 on
    ``mask``, a default mask over it fails the job before it fits; the message names the
    limit."""
    with client(server, server.keys["bob"]) as http:
        r = http.post("/v1/jobs", files=upload_files(phantom), data=data)
        assert r.status_code == 422 and r.json()["field"] == "mask", r.text
        detail = r.json()["detail"]
        assert f"the mask has 18 voxels, more than the server's limit of {MAX_CLASSICAL} " \
            f"voxels per job {what}, a non-linear fit per voxel (max_classical_voxels)" \
            in detail, detail
        files = upload_files(phantom)
        del files["mask"]
        r = http.post("/v1/jobs", files=files, data=data)
        assert r.status_code == 202, r.text
        job = wait_for(http, r.json()["id"], timeout=300)
        assert job["status"] == "failed", job
        assert f"limit of {MAX_CLASSICAL} voxels per job {what}" in job["error"], job


def test_fits_without_a_per_voxel_fit_keep_the_voxel_limit(server, phantom):
    """Turning the polish off (or a multi-fascicle model fitted by multi-fascicle
    fingerprinting) is not a per-voxel fit: the 18-voxel mask is accepted."""
    with client(server, server.keys["bob"]) as http:
        for data in ({"model": "noddi_bingham", "refine": "false"},
                     {"model": "ball_stick_stick"}):
            r = http.post("/v1/jobs", files=upload_files(phantom), data=data)
            assert r.status_code == 202, (data, r.text)
            assert http.delete(f"/v1/jobs/{r.json()['id']}").status_code in (200, 202)
