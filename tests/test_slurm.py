"""SLURM for real: a one-node cluster (``slurmctld`` + ``slurmd`` + ``munged``, tests/slurm_cluster.py) brought up
for this module; a sweep submitted through ``hydra/launcher=slurm`` (submitit) whose jobs are preempted mid-training
-- by submitit's time-limit signal and by ``scontrol requeue`` -- requeued, and finish on the uninterrupted run's loss
curve, beside a job that fails; a 2-task FSDP job. Skipped, with the reason, where SLURM is not installed
(``.ci/run`` installs it)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from slurm_cluster import SlurmCluster, unavailable
from test_faults import RUN, losses, uninterrupted  # noqa: F401  (a fixture: the same run, never stopped)

from conftest import LIT, REPO_ROOT, run_cli, train_losses

pytestmark = [pytest.mark.slurm, pytest.mark.skipif(unavailable() is not None, reason=f"SLURM: {unavailable()}")]

# what a user sets for this cluster: its partition, the CPUs it has; the rest of hydra/launcher=slurm as shipped
LAUNCH = ["hydra/launcher=slurm", "hydra.launcher.partition=debug", "hydra.launcher.timeout_min=10",
          "trainer.enable_progress_bar=false"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    yield c
    c.stop()


def env(cluster: SlurmCluster) -> dict[str, str]:
    """The submitting command's environment; without the suite's OMP_NUM_THREADS, so the jobs size torch's threads
    from their allocation as on a cluster."""
    out = cluster.env({**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    out.pop("OMP_NUM_THREADS", None)
    return out


def job_dirs(sweep: Path) -> list[Path]:
    return sorted((d for d in sweep.iterdir() if (d / ".hydra").is_dir()), key=lambda d: int(d.name.split("_")[0]))


def our_jobs(cluster: SlurmCluster, workdir: Path, timeout: float = 60) -> list[dict[str, str]]:
    """The jobs submitted from ``workdir``, once they have all ended (a job writes its result, then exits)."""
    deadline = time.time() + timeout
    while True:
        jobs = [j for j in cluster.jobs() if j.get("WorkDir") == str(workdir)]
        if time.time() > deadline or not any(j["JobState"] in ("RUNNING", "COMPLETING", "PENDING") for j in jobs):
            return jobs
        time.sleep(0.2)


def test_two_task_fsdp_job_matches_one_process(cluster, tmp_path, fsdp_one_process):
    """``tasks_per_node = trainer.devices = 2``: SLURM starts both ranks (gloo on CPU); Lightning launches none."""
    sweep = tmp_path / "sweep"
    r = run_cli(["-m", *LAUNCH, "hydra.launcher.cpus_per_task=1", *LIT, "trainer.devices=2", "data.batch_size=4",
                 f"hydra.sweep.dir={sweep}"], cwd=tmp_path, env=env(cluster), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:] + cluster.logs()
    (two,) = job_dirs(sweep)
    assert json.loads((two / "metrics.json").read_text())["world_size"] == 2
    a, b = train_losses(two), train_losses(fsdp_one_process)
    assert len(a) == len(b) == 6 and a[-1] < a[0] - 0.3
    torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-5, atol=1e-5)  # test_parallel's tolerance
    (job,) = our_jobs(cluster, tmp_path)
    assert (job["NumTasks"], job["JobState"]) == ("2", "COMPLETED")


# the sweep: what each job's learning rate is, and how it is stopped mid-training. USR2 is submitit's time-limit
# signal (what hydra/launcher=slurm asks for; SIGUSR1 from `--signal=USR1@<s>` takes the same path: test_faults.py);
# `scontrol requeue` is the scheduler taking the node back (SIGTERM); the third job fails.
JOBS = {0: ("3e-3", "USR2"), 1: ("1e-3", "requeue"), 2: ("-1", None)}


@pytest.fixture(scope="module")
def references(tmp_path_factory, uninterrupted) -> dict[str, dict[int, float]]:
    """The loss curve of each job's training, run once here without interruption (RUN's learning rate is 3e-3)."""
    from test_sft import prepared

    from mtrain.tasks import sft

    run = tmp_path_factory.mktemp("uninterrupted_lr1e-3")
    sft.run(prepared(*RUN, "task.lr=1e-3", run_dir=run))
    return {"3e-3": uninterrupted, "1e-3": losses(run)}


def test_sweep_preempted_and_requeued_on_slurm(cluster, tmp_path, references):
    """A 3-job sweep through hydra/launcher=slurm: each job a task of a SLURM job array on the cluster's node, one CPU
    each. Two are stopped mid-training (see JOBS): each writes last.ckpt at the current step and goes back in the
    queue (mtrain requeues itself on USR2); the rerun resumes in the same job dir -- no ``task.ckpt_path`` given --
    and ends on its uninterrupted loss curve, step for step. The third fails: the sweep lists it with its error and
    exits non-zero, the others' results stand."""
    sweep = tmp_path / "sweep"
    p = subprocess.Popen([sys.executable, "-m", "mtrain", "-m", *LAUNCH, "hydra.launcher.cpus_per_task=1", *RUN,
                          f"task.lr={','.join(lr for lr, _ in JOBS.values())}", f"hydra.sweep.dir={sweep}"],
                         cwd=tmp_path, env=env(cluster), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stopped: dict[int, tuple[str, Path]] = {}  # job number -> (SLURM job id, its last.ckpt when stopped)
    released: set[str] = set()
    deadline = time.time() + 400
    while p.poll() is None and time.time() < deadline:
        for j in cluster.jobs():
            if j.get("WorkDir") != str(tmp_path) or not j.get("ArrayTaskId", "").isdigit():
                continue  # another test's, or the array's record of its tasks not started yet
            num, job_id = int(j["ArrayTaskId"]), f"{j['ArrayJobId']}_{j['ArrayTaskId']}"
            stop = JOBS[num][1]
            last = next(sweep.glob(f"{num}_*/checkpoints/last.ckpt"), None)
            if stop and num not in stopped and j["JobState"] == "RUNNING" and last is not None:
                if stop == "requeue":
                    cluster.run("scontrol", "requeue", job_id)
                else:
                    cluster.run("scancel", f"--signal={stop}", job_id)
                stopped[num] = (job_id, last)
            elif j["JobState"] == "PENDING" and j["Restarts"] == "1" and job_id not in released:
                # SLURM holds a requeued job for a while (BeginTime): let it start now
                cluster.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")
                released.add(job_id)
        time.sleep(0.05)
    if p.poll() is None:
        p.kill()
    out, err = p.communicate()
    assert p.returncode != 0, "a failed job fails the sweep"
    assert "task.lr=-1.0 must be > 0" in err, err[-3000:] + cluster.logs()
    assert sorted(stopped) == [0, 1] and len(released) == 2, (stopped, released, err[-3000:], cluster.logs())

    with (sweep / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["job"], r["status"], r["interruptions"]) for r in rows] == [("0", "ok", "1"), ("1", "ok", "1"),
                                                                         ("2", "failed", "")], rows
    assert rows[2]["error"] == "ConfigError: task.lr=-1.0 must be > 0 (the peak learning rate)"
    for num, run in enumerate(job_dirs(sweep)[:2]):
        (lr, how), (job_id, last) = JOBS[num], stopped[num]
        # inside a SLURM job: torch sized to the task's one CPU, not to the node (two jobs shared its 2 CPUs)
        assert "SLURM: 1 CPU thread(s) per task" in (run / "mtrain.log").read_text()
        status = json.loads((run / "status.json").read_text())
        assert status["status"] == "ok" and len(status["interruptions"]) == 1, status
        (first,) = status["interruptions"]  # the first attempt's record, kept by the rerun
        assert first["signal"] == ("SIGTERM" if how == "requeue" else f"SIG{how}")
        assert first["checkpoint"] == str(last) and 6 <= first["step"] < 60
        if how != "requeue":
            assert first["requeued"] == job_id  # mtrain asked for it, after the checkpoint
        err_log = (sweep / ".submitit" / job_id / f"{job_id}_0_log.err").read_text()
        assert f"mtrain: error: interrupted by {first['signal']} at step {first['step']}" in err_log
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["resumed_from"] == str(last) and metrics["steps"] == 60
        curve, reference = losses(run), references[lr]  # the stopped attempt's rows up to its checkpoint, then the rerun's
        assert set(curve) == set(reference)
        for s, loss in curve.items():
            assert loss == pytest.approx(reference[s], rel=1e-5, abs=1e-6), (num, s, loss, reference[s])
    # the controller ran them: one array task per sweep job, all ended (the failed one inside its Hydra job)
    jobs = sorted(our_jobs(cluster, tmp_path), key=lambda j: int(j["ArrayTaskId"]))
    assert [(j["JobState"], j["Restarts"], j["NumCPUs"]) for j in jobs] == [("COMPLETED", "1", "1"),
                                                                          ("COMPLETED", "1", "1"),
                                                                          ("COMPLETED", "0", "1")], jobs
