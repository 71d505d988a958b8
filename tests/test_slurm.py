"""SLURM for real: a one-node cluster (``slurmctld`` + ``slurmd`` + ``munged``, tests/slurm_cluster.py) brought up
for this module; sweeps submitted through ``hydra/launcher=slurm`` (submitit), a 2-task FSDP job, and jobs preempted
mid-training -- by SLURM's time-limit signals and by ``scontrol requeue`` -- that are requeued and finish on the
uninterrupted run's loss curve. Skipped, with the reason, where SLURM is not installed (``.ci/run`` installs it)."""

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
    return cluster.env({**os.environ, "PYTHONPATH": str(REPO_ROOT)})


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


def test_sweep_jobs_run_as_slurm_jobs_and_a_failed_job_shows_its_error(cluster, tmp_path):
    sweep = tmp_path / "sweep"
    r = run_cli(["-m", *LAUNCH, "hydra.launcher.cpus_per_task=1", "trainer.max_steps=12", "trainer.log_every_n_steps=1",
                 "trainer.val_check_interval=6", "data.num_train=256", "data.num_val=32", "data.batch_size=32",
                 "task.accuracy=false", "task.export=false", f"hydra.sweep.dir={sweep}", "task.lr=1e-3,3e-3,-1"],
                cwd=tmp_path, env=env(cluster), timeout=300)
    assert r.returncode != 0, "a failed job fails the sweep"
    assert "task.lr=-1.0 must be > 0" in r.stderr, r.stderr[-3000:] + cluster.logs()
    with (sweep / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(row["job"], row["status"]) for row in rows] == [("0", "ok"), ("1", "ok"), ("2", "failed")], rows
    assert rows[2]["error"] == "ConfigError: task.lr=-1.0 must be > 0 (the peak learning rate)"
    dirs = job_dirs(sweep)
    for row, d in zip(rows[:2], dirs):
        assert row["steps"] == "12" and float(row["train_loss_last"]) < float(row["train_loss_first"])
        assert json.loads((d / "metrics.json").read_text())["steps"] == 12 and (d / "checkpoints" / "last.ckpt").is_file()
        # inside a SLURM job: torch sized to the task's one CPU, not to the node (two jobs shared its 2 CPUs)
        assert "SLURM: 1 CPU thread(s) per task" in (d / "mtrain.log").read_text()
    assert rows[0]["train_loss_last"] != rows[1]["train_loss_last"]  # each job its own learning rate
    # the controller ran them: one array task per sweep job, all ended (the failed one inside its Hydra job)
    ours = our_jobs(cluster, tmp_path)
    assert sorted(j.get("ArrayTaskId") for j in ours) == ["0", "1", "2"], ours
    assert {j["JobState"] for j in ours} == {"COMPLETED"} and {j["NumCPUs"] for j in ours} == {"1"}


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


def _wait(what: str, ready, timeout: float, p: subprocess.Popen, cluster: SlurmCluster):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = ready()
        if value:
            return value
        if p.poll() is not None:
            break
        time.sleep(0.05)
    p.kill()
    out, err = p.communicate()
    raise AssertionError(f"{what}: not within {timeout} s\n{err[-3000:]}\n{cluster.logs()}")


# how each job of the preempted sweep is stopped: USR1 is ``sbatch --signal=USR1@<s>``'s time-limit warning, USR2
# submitit's own (what hydra/launcher=slurm asks for), ``scontrol requeue`` the scheduler taking the node back (SIGTERM)
STOPS = {0: "USR1", 1: "USR2", 2: "requeue"}


def test_preempted_sweep_is_requeued_and_each_job_ends_on_the_uninterrupted_curve(cluster, tmp_path, uninterrupted):
    """A sweep of 3 jobs with the same training (only the checkpoint interval differs), each stopped mid-training its
    own way. Each writes last.ckpt at the current step and goes back in the queue (mtrain requeues itself on
    USR1/USR2); its rerun resumes in the same job dir -- no ``task.ckpt_path`` given -- and ends where the
    uninterrupted run ends, step for step. The sweep then finishes as if nothing happened."""
    sweep = tmp_path / "sweep"
    p = subprocess.Popen([sys.executable, "-m", "mtrain", "-m", *LAUNCH, "hydra.launcher.cpus_per_task=1", *RUN,
                          "task.checkpoint_every_n_steps=5,6,7", f"hydra.sweep.dir={sweep}"], cwd=tmp_path,
                         env=env(cluster), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stopped: dict[int, tuple[str, Path]] = {}  # job number -> (SLURM job id, its last.ckpt when stopped)
    released: set[str] = set()
    deadline = time.time() + 400
    while p.poll() is None and time.time() < deadline:
        for j in cluster.jobs():
            if j.get("WorkDir") != str(tmp_path) or not j.get("ArrayTaskId", "").isdigit():
                continue  # another test's, or the array's record of its tasks not started yet
            num, job_id = int(j["ArrayTaskId"]), f"{j['ArrayJobId']}_{j['ArrayTaskId']}"
            last = next(sweep.glob(f"{num}_*/checkpoints/last.ckpt"), None)
            if num not in stopped and j["JobState"] == "RUNNING" and last is not None:
                if STOPS[num] == "requeue":
                    cluster.run("scontrol", "requeue", job_id)
                else:
                    cluster.run("scancel", f"--signal={STOPS[num]}", job_id)
                stopped[num] = (job_id, last)
            elif j["JobState"] == "PENDING" and j["Restarts"] == "1" and job_id not in released:
                # SLURM holds a requeued job for a while (BeginTime): let it start now
                cluster.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")
                released.add(job_id)
        time.sleep(0.05)
    if p.poll() is None:
        p.kill()
    out, err = p.communicate()
    assert p.returncode == 0, err[-3000:] + cluster.logs()
    assert sorted(stopped) == [0, 1, 2] and len(released) == 3, (stopped, released)

    with (sweep / "summary.csv").open() as f:
        assert [(r["status"], r["interruptions"]) for r in csv.DictReader(f)] == [("ok", "1")] * 3
    for num, run in enumerate(job_dirs(sweep)):
        job_id, last = stopped[num]
        status = json.loads((run / "status.json").read_text())
        assert status["status"] == "ok" and len(status["interruptions"]) == 1, status
        (stop,) = status["interruptions"]  # the first attempt's record, kept by the rerun
        assert stop["signal"] == ("SIGTERM" if STOPS[num] == "requeue" else f"SIG{STOPS[num]}")
        assert stop["checkpoint"] == str(last) and 5 <= stop["step"] < 60
        if STOPS[num] != "requeue":
            assert stop["requeued"] == job_id  # mtrain asked for it, after the checkpoint
        err_log = (sweep / ".submitit" / job_id / f"{job_id}_0_log.err").read_text()
        assert f"mtrain: error: interrupted by {stop['signal']} at step {stop['step']}" in err_log
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["resumed_from"] == str(last) and metrics["steps"] == 60
        curve = losses(run)  # the stopped attempt's rows up to its checkpoint, then the rerun's
        assert set(curve) == set(uninterrupted)
        for s, loss in curve.items():
            assert loss == pytest.approx(uninterrupted[s], rel=1e-5, abs=1e-6), (num, s, loss, uninterrupted[s])
    jobs = our_jobs(cluster, tmp_path)
    assert sorted((j["JobState"], j["Restarts"]) for j in jobs) == [("COMPLETED", "1")] * 3
