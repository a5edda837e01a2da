"""Job stages: what a fit is doing (queued, building dictionary, fitting, writing maps) and
how far along that stage it is, in the pipeline, the API's job view and `fingerprint
submit`."""

from __future__ import annotations

import pytest

from fingerprint.fitting.pipeline import PROGRESS_STAGES, fit_volume, progress_stage
from server.db import Job
from server.schemas import job_out, job_stage

STAGES = ("building dictionary", "fitting", "writing maps")


def test_progress_stage_boundaries() -> None:
    assert [s for s, _, _ in PROGRESS_STAGES] == list(STAGES)
    assert progress_stage(0.0) == ("building dictionary", 0.0)
    (lo, hi) = PROGRESS_STAGES[1][1:]
    name, within = progress_stage((lo + hi) / 2)
    assert name == "fitting" and within == pytest.approx(0.5)
    assert progress_stage(hi) == ("writing maps", 0.0)
    assert progress_stage(1.0) == ("writing maps", 1.0)
    assert progress_stage(-1.0)[0] == "building dictionary"
    assert progress_stage(2.0) == ("writing maps", 1.0)


def _row(status, progress: float, kind="fit") -> Job:
    return Job(id="0" * 32, seq=1, owner="k", kind=kind, model="noddi", status=status,
               created="2026-01-01T00:00:00Z", progress=progress)


def test_job_view_reports_the_stage() -> None:
    assert job_stage("fit", "queued", 0.0) == ("queued", 0.0)
    lo, hi = PROGRESS_STAGES[1][1:]
    out = job_out(_row("running", lo + 0.25 * (hi - lo)))
    assert out.stage == "fitting" and out.stage_progress == pytest.approx(0.25, abs=1e-3)
    assert job_out(_row("running", 0.1)).stage == "building dictionary"
    assert job_out(_row("running", 0.99)).stage == "writing maps"
    dictionary = job_out(_row("running", 0.4, kind="dictionary"))
    assert dictionary.stage == "building dictionary" and dictionary.stage_progress == 0.4
    for status in ("succeeded", "failed", "cancelled"):
        assert job_out(_row(status, 1.0)).stage is None
    assert "stage" in job_out(_row("queued", 0.0)).model_dump()


def test_fit_volume_goes_through_the_stages_in_order(tmp_path) -> None:
    from server_helpers import write_phantom

    inputs = write_phantom(tmp_path / "phantom")
    seen: list[tuple[str, float]] = []
    fit_volume("noddi", inputs["dwi"], inputs["bval"], inputs["bvec"], tmp_path / "out",
               mask=inputs["mask"], dictionary_size=600, dictionary_dir=tmp_path / "dicts",
               progress=lambda f: seen.append(progress_stage(f)))
    order = [name for name, _ in seen]
    assert set(order) == set(STAGES)
    firsts = [order.index(s) for s in STAGES]
    assert firsts == sorted(firsts)  # stages never go back
    assert seen[-1] == ("writing maps", 1.0)


def test_submit_shows_stage_and_its_progress(capsys) -> None:
    from fingerprint.cli.submit import _wait

    views = [job_out(_row("queued", 0.0)).model_dump(),
             job_out(_row("running", 0.15)).model_dump(),
             job_out(_row("running", 0.6)).model_dump(),
             job_out(_row("succeeded", 1.0)).model_dump()]

    class FakeClient:
        def wait(self, job_id, poll, progress):
            for view in views:
                progress(view)
            return views[-1]

    assert _wait(FakeClient(), "abcdef0123", 0.01, True)["status"] == "succeeded"
    err = capsys.readouterr().err
    assert "building dictionary 50%" in err and "fitting" in err and "succeeded" in err
