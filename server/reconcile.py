"""Start-up reconciliation of the database with the data directory.

Run once, before the dispatcher starts, while this process holds the data directory's
lock (so no other server is using it):

* jobs still ``running`` were interrupted by a crash: they go back to the queue, unless
  they have used up their attempts, in which case they fail with a reason; a job whose
  owner had asked to cancel it is cancelled;
* ``queued`` jobs stay queued (the dispatcher resumes them), unless their inputs are gone;
* finished jobs are left alone (their outputs are never touched), except that files of
  deleted jobs are removed;
* partial outputs, cancel flags of finished jobs, worker pid files (no worker survives
  a restart), job directories without a database row and everything in ``tmp/`` are
  removed.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field

from .db import Database
from .storage import JobStorage

logger = logging.getLogger(__name__)

__all__ = ["ReconcileReport", "reconcile"]


@dataclass
class ReconcileReport:
    """What start-up reconciliation did (job ids)."""

    requeued: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)
    orphans_removed: list[str] = field(default_factory=list)
    tmp_removed: int = 0


def reconcile(db: Database, storage: JobStorage, *, max_attempts: int) -> ReconcileReport:
    """Bring the database and the job directories back into agreement after a stop."""
    report = ReconcileReport()
    for job in db.jobs_with_status("running"):
        job_id = job.id
        if job.cancel_requested:
            db.finish(job_id, "cancelled", error="cancelled by the owner")
            report.cancelled.append(job_id)
        elif job.attempts >= max_attempts:
            db.finish(job_id, "failed", error=(
                f"the server stopped during each of {job.attempts} attempts to run this "
                f"job (limit {max_attempts}); giving up"))
            report.failed.append(job_id)
        else:
            db.requeue(job_id, f"re-queued after a server restart (attempt {job.attempts} "
                               "was interrupted)")
            report.requeued.append(job_id)
    for job in db.jobs_with_status("queued"):
        if not storage.inputs_dir(job.id).is_dir():
            db.finish(job.id, "failed", error="the job's input files are missing")
            report.failed.append(job.id)
        elif job.id not in report.requeued:
            report.resumed.append(job.id)

    known = db.all_job_ids()
    for name in storage.job_dir_ids():
        path = storage.jobs_dir / name
        if name not in known:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            report.orphans_removed.append(name)
            continue
        stored = db.get_job(name)
        if stored is None or stored.deleted:
            storage.remove_job(name)
            continue
        for partial in path.glob("outputs.partial*"):
            shutil.rmtree(partial, ignore_errors=True)
        (path / "worker.pid").unlink(missing_ok=True)
        if stored.status in ("queued", "succeeded", "failed"):
            storage.cancel_flag(name).unlink(missing_ok=True)
        if stored.status == "cancelled":
            shutil.rmtree(storage.outputs_dir(name), ignore_errors=True)
    report.tmp_removed = storage.clean_tmp()
    logger.info("start-up reconciliation: %d re-queued, %d resumed, %d failed, %d cancelled, "
                "%d orphan job directories and %d temporary entries removed",
                len(report.requeued), len(report.resumed), len(report.failed),
                len(report.cancelled), len(report.orphans_removed), report.tmp_removed)
    return report
