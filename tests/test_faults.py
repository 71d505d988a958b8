"""Fault injection: a job killed at a random step (SIGTERM, SIGUSR1, Ctrl-C, kill -9) resumes onto the uninterrupted run's
loss curve; a write killed half-way leaves the previous checkpoint or export whole; concurrent jobs never share a
run dir; a run dir that cannot be created, a crafted resume file and an unsigned or altered distributed checkpoint
are refused before anything runs."""

from __future__ import annotations

import csv
import json
import os
import pickle
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_sft import prepared

from conftest import ENV_VAR, REPO_ROOT, run_cli
from mtrain.models.checkpoint import CheckpointError

# 60 steps over 19 batches an epoch: a kill lands mid-epoch, and the resumed run crosses epoch boundaries
RUN = ["trainer.max_steps=60", "task.checkpoint_every_n_steps=6", "task.accuracy=false", "task.export=false",
       "data.num_train=600", "data.num_val=32", "data.batch_size=32", "trainer.val_check_interval=25",
       "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false"]


def losses(run_dir: Path) -> dict[int, float]:
    """step -> train loss, from the run's CSV log."""
    with (run_dir / "csv" / "metrics.csv").open() as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


def ckpt_step(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True)["global_step"]


def env() -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if k not in (ENV_VAR, "HYDRA_FULL_ERROR")}
    out["PYTHONPATH"] = str(REPO_ROOT)
    return out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[int, float]:
    from mtrain.tasks import sft

    run = tmp_path_factory.mktemp("uninterrupted")
    sft.run(prepared(*RUN, run_dir=run))
    return losses(run)


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGUSR1", "SIGINT", "SIGKILL"])
def test_killed_job_resumes_onto_the_uninterrupted_loss_curve(tmp_path, uninterrupted, sig):
    """SIGUSR1 runs as a SLURM job would (SLURM_JOB_ID set, a stand-in ``scontrol`` on PATH): the job requeues itself,
    and its rerun in the same run dir continues with ``task.ckpt_path=auto``."""
    from mtrain.tasks import sft

    run, environ = tmp_path / "run", env()
    if sig == "SIGUSR1":
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path / 'scontrol_args'}\n")
        (bin_dir / "scontrol").chmod(0o755)
        environ |= {"SLURM_JOB_ID": "4242", "PATH": f"{bin_dir}{os.pathsep}{environ['PATH']}"}
    # SIGINT back to its default in the job: a shell starts background jobs (CI, say) with SIGINT ignored, and the
    # job would inherit that
    p = subprocess.Popen([sys.executable, "-m", "mtrain", *RUN, "task.ckpt_path=auto", f"hydra.run.dir={run}"],
                         cwd=tmp_path, env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    last = run / "checkpoints" / "last.ckpt"
    deadline = time.time() + 120
    while not last.exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.01)
    assert last.exists() and p.poll() is None, p.communicate()[1][-2000:]
    time.sleep(0.03)  # a few steps past the periodic checkpoint (~15 ms a step): the stop must write its own
    p.send_signal(getattr(signal, sig))
    _, err = p.communicate(timeout=120)
    step = ckpt_step(last)
    assert 6 <= step < 60, "the job must be stopped mid-run"
    if sig == "SIGKILL":
        assert p.returncode == -signal.SIGKILL and step % 6 == 0  # the last periodic checkpoint
    else:
        assert p.returncode == 128 + getattr(signal, sig), err[-2000:]
        status = json.loads((run / "status.json").read_text())
        assert (status["status"], status["signal"], status["step"]) == ("interrupted", sig, step)
        assert f"mtrain: error: interrupted by {sig} at step {step}" in err
    if sig == "SIGUSR1":
        assert (tmp_path / "scontrol_args").read_text().split() == ["requeue", "4242"] and status["requeued"] == "4242"
    assert not (run / "metrics.json").exists()

    # the rerun: same run dir, task.ckpt_path=auto finds last.ckpt; its CSV log continues the killed run's
    metrics = sft.run(prepared(*RUN, "task.ckpt_path=auto", run_dir=run))
    assert metrics["resumed_from"] == str(last)
    with (run / "csv" / "metrics.csv").open() as f:
        steps = [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]
    assert steps == sorted(set(steps))  # each step once: the killed run's rows after the checkpoint were replaced
    curve = losses(run)
    # the whole run, killed part included. After kill -9 the row of the step just before the checkpoint may be
    # missing: Lightning hands a step's row to the logger after the callback that writes the checkpoint (and flushes
    # the log) has run, and kill -9 loses what is not on disk. SIGTERM, SIGUSR1 and Ctrl-C stop at a step boundary
    # and lose nothing.
    assert set(uninterrupted) - set(curve) <= ({step - 1} if sig == "SIGKILL" else set())
    assert set(curve) <= set(uninterrupted)
    for s, loss in curve.items():  # same weights, optimizer state, schedule and batches: the same curve
        assert loss == pytest.approx(uninterrupted[s], rel=1e-5, abs=1e-6), (s, loss, uninterrupted[s])
    assert metrics["train_loss_first"] == pytest.approx(uninterrupted[min(uninterrupted)], rel=1e-6)  # history kept


def test_a_second_ctrl_c_stops_at_once_without_checkpointing_a_half_step(tmp_path):
    """The first Ctrl-C asks for a stop at the end of the step (Lightning's SIGTERM path); a second one raises
    KeyboardInterrupt at once, and the checkpoint callback then writes nothing: a mid-step state is not a checkpoint.
    The interruption names the last checkpoint on disk."""
    from mtrain.lit.checkpointing import LastCheckpoint
    from mtrain.lit.signals import StopOnSignal

    connector = SimpleNamespace(received_sigterm=False, _original_handlers={})
    trainer = SimpleNamespace(_signal_connector=connector, global_step=9)
    stop, before = StopOnSignal(), signal.getsignal(signal.SIGINT)
    stop.setup(trainer, None, "fit")
    try:
        handler = signal.getsignal(signal.SIGINT)
        handler(signal.SIGINT, None)  # while the model is set up, before Lightning registers its handlers ...
        connector.received_sigterm = False  # ... which clears its stop flag
        connector._original_handlers = {signal.SIGINT: handler}  # and snapshots what it finds: ours
        stop.on_train_start(trainer, None)
        assert connector.received_sigterm and stop.received == "SIGINT"  # the early Ctrl-C still stops the fit
        # after any end of the fit Lightning restores its snapshot: the handler from before ours, not ours
        assert connector._original_handlers[signal.SIGINT] is before
        with pytest.raises(KeyboardInterrupt):
            handler(signal.SIGINT, None)
    finally:
        stop.teardown(trainer, None, "fit")
    assert signal.getsignal(signal.SIGINT) is before

    last = LastCheckpoint(tmp_path)
    last.save = lambda *a: pytest.fail("a checkpoint written mid-step")
    (tmp_path / "last.ckpt").write_bytes(b"step 6")
    e = KeyboardInterrupt()
    trainer.strategy = SimpleNamespace(checkpoint_io=None)
    last.on_exception(trainer, None, e)
    assert (e.mtrain_step, e.mtrain_checkpoint) == (9, str(tmp_path / "last.ckpt"))


_CTRL_C_IN_THE_JOB = """
import sys
import mtrain.cli as cli

def task(job):  # a job Ctrl-C'd outside a fit's steps (or twice while its stop checkpoint was being written)
    (job.dir / "checkpoints").mkdir()
    (job.dir / "checkpoints" / "last.ckpt").write_bytes(b"an earlier checkpoint")
    raise KeyboardInterrupt

cli.get_task = lambda name: task
sys.argv[0] = "mtrain"
cli.main()
"""


def test_a_ctrl_c_outside_the_fit_steps_is_one_line_exit_130_and_a_status(tmp_path):
    r = run_cli(["task=info", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, entry=("-c", _CTRL_C_IN_THE_JOB))
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert r.returncode == 130 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert f"mtrain: error: interrupted by SIGINT, checkpoint {last}; resume with task.ckpt_path={last}" in r.stderr
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert (status["status"], status["signal"], status["checkpoint"]) == ("interrupted", "SIGINT", str(last))


def test_a_write_killed_half_way_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    """The second last.ckpt write of a run dies half-way (in the background writer): the job fails with that error,
    and last.ckpt is still the first write, whole; no partial file is left."""
    from mtrain.tasks import sft

    real, calls = torch.save, []

    def dies_on_the_second_write(obj, f, *a, **kw):
        calls.append(Path(f))
        if len(calls) == 2:
            Path(f).write_bytes(b"PK\x03\x04 half a zip")  # what a killed write leaves
            raise OSError("killed while writing")  # (kill -9 itself cannot be caught; SIGTERM/SIGINT save again)
        return real(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", dies_on_the_second_write)
    with pytest.raises(OSError, match="killed while writing"):
        sft.run(prepared(*RUN, run_dir=tmp_path))
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert ckpt_step(last) == 6  # the first write, whole; the half-written one never took its name
    assert sorted(p.name for p in last.parent.iterdir() if p.name.startswith(".")) == []


def test_a_slow_checkpoint_write_does_not_hold_up_training(tmp_path, monkeypatch):
    """The step-6 last.ckpt write stalls until training reaches step 9: training gets there (the write runs in the
    background; a blocking write would stall the loop and time out), and at the job's end every write is on disk."""
    import threading

    from mtrain.lit.module import MoELitModule
    from mtrain.tasks import sft

    reached, real_save, real_step = threading.Event(), torch.save, MoELitModule.training_step
    released = []

    def stalls_the_first_write(obj, f, *a, **kw):
        if not released:
            released.append(reached.wait(timeout=30))
        return real_save(obj, f, *a, **kw)

    def step(self, batch, batch_idx):
        if self.trainer.global_step >= 9:
            reached.set()
        return real_step(self, batch, batch_idx)

    monkeypatch.setattr(torch, "save", stalls_the_first_write)
    monkeypatch.setattr(MoELitModule, "training_step", step)
    run = ["trainer.max_steps=12", *RUN[1:]]
    m = sft.run(prepared(*run, run_dir=tmp_path))
    assert released == [True]  # the loop went on to step 9 while the step-6 write waited
    assert ckpt_step(tmp_path / "checkpoints" / "last.ckpt") == 12
    assert m["seconds"]["checkpoint_wait_at_end"] >= 0


def test_the_end_of_a_fit_leaves_the_model_in_place_and_frees_the_optimizer_state(tmp_path, monkeypatch):
    """Lightning's teardown moves the model and the optimizer state to the CPU after every fit, and the job's final
    validation moves the model back (about 18 s at a 3.1B-parameter model on an H200): mtrain's leaves the model
    where it trained and drops the optimizer state instead."""
    from mtrain.lit.module import MoELitModule
    from mtrain.tasks import sft

    moved, states = [], []
    real_cpu, real_end = MoELitModule.cpu, MoELitModule.on_train_end

    def cpu(self):
        moved.append(True)
        return real_cpu(self)

    def on_train_end(self):
        real_end(self)
        states.append(self.optimizers().optimizer)

    monkeypatch.setattr(MoELitModule, "cpu", cpu)
    monkeypatch.setattr(MoELitModule, "on_train_end", on_train_end)
    sft.run(prepared(*RUN, run_dir=tmp_path))
    assert moved == []
    assert len(states) == 1 and len(states[0].state) == 0  # the AdamW moments are gone after the fit
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)  # ...not from last.ckpt
    assert saved["global_step"] == 60 and saved["optimizer_states"][0]["state"]


@pytest.mark.gpu
def test_a_device_snapshot_checkpoint_holds_the_values_at_save_time(tmp_path):
    """On the GPU the checkpoint's snapshot is a device copy written from a side stream: tensors changed in place
    right after the save returns (the next optimizer step) do not reach the file."""
    from mtrain.lit.checkpoint_io import BackgroundCheckpointIO

    io = BackgroundCheckpointIO()
    state = {"w": torch.arange(2**20, dtype=torch.float32, device="cuda"), "step": 3}
    io.save_checkpoint({"state_dict": state}, tmp_path / "last.ckpt")
    state["w"].mul_(-1)  # queued on the training stream right after the snapshot
    io.wait()
    assert io.device_snapshots == 1
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]
    assert torch.equal(saved["w"], torch.arange(2**20, dtype=torch.float32)) and saved["step"] == 3


def test_an_export_killed_half_way_leaves_the_previous_export_whole(tmp_path, monkeypatch):
    from mtrain.models import Glm4MoeConfig, build_model, from_pretrained, save_pretrained

    dest = tmp_path / "hf_model"
    save_pretrained(build_model(Glm4MoeConfig(), seed=0), dest)
    before = {p.name: p.read_bytes() for p in dest.iterdir()}

    def killed(folder):
        raise KeyboardInterrupt("killed while writing the tokenizer")

    with pytest.raises(KeyboardInterrupt):
        save_pretrained(build_model(Glm4MoeConfig(), seed=1), dest, overwrite=True, extra=killed)
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf_model"]  # no temporary folder left behind
    from_pretrained(dest)


def test_jobs_started_together_get_their_own_run_dirs(tmp_path):
    cmd = [sys.executable, "-m", "mtrain", "trainer.max_steps=2", "task.accuracy=false", "task.export=false",
           "data.num_train=64", "data.num_val=16", "trainer.enable_progress_bar=false"]
    jobs = [subprocess.Popen(cmd, cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    for p in jobs:
        assert p.wait(timeout=180) == 0, p.communicate()[1][-2000:]
    runs = sorted(tmp_path.glob("outputs/*/*"))
    assert len(runs) == 2 and all((r / "metrics.json").is_file() for r in runs)
    assert all(json.loads((r / "metrics.json").read_text())["steps"] == 2 for r in runs)


def test_a_run_dir_belongs_to_one_job_at_a_time(tmp_path):
    """A second job given the running job's hydra.run.dir stops at once with one line naming the first (pid, host,
    start time) and writes nothing there; once the first is killed (kill -9: its lock dies with it) the same command
    resumes the dir, and after that job ended, once more."""
    import socket

    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "mtrain", *RUN, "task.ckpt_path=auto", f"hydra.run.dir={run}"]
    log = tmp_path / "first.log"
    with log.open("w") as out:
        # the first job: long enough to be running when the second one starts
        first = subprocess.Popen([*cmd, "trainer.max_steps=100000"], cwd=tmp_path, env=env(), stdout=out, stderr=out)
    last = run / "checkpoints" / "last.ckpt"
    deadline = time.time() + 120
    while not last.exists() and time.time() < deadline and first.poll() is None:
        time.sleep(0.01)
    assert last.exists() and first.poll() is None, log.read_text()[-2000:]
    hydra_files = {p.name: p.read_bytes() for p in (run / ".hydra").iterdir()}

    second = run_cli([*RUN, "task.ckpt_path=auto", f"hydra.run.dir={run}", "seed=1"], cwd=tmp_path)
    assert second.returncode == 2 and first.poll() is None
    host, when = re.escape(socket.gethostname()), r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \w+"
    assert re.fullmatch(rf"mtrain: error: run dir {re.escape(str(run))} is in use by another job \(pid {first.pid} on "
                        rf"{host}, started {when}\); wait for it to end, or choose another hydra.run.dir",
                        second.stderr.strip()), second.stderr
    assert {p.name: p.read_bytes() for p in (run / ".hydra").iterdir()} == hydra_files  # the first job's, untouched
    assert not (run / "status.json").exists()

    first.kill()
    first.wait(timeout=60)
    step = ckpt_step(last)
    for steps in (step + 3, step + 3):  # resume the killed job's dir; then the finished one's (nothing to train)
        r = run_cli([*RUN, "task.ckpt_path=auto", f"hydra.run.dir={run}", f"trainer.max_steps={steps}"], cwd=tmp_path,
                    timeout=180)
        assert r.returncode == 0, r.stderr[-2000:]
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["resumed_from"] == str(last) and metrics["steps"] == step + 3


def test_a_sweep_job_whose_dir_is_taken_fails_alone(tmp_path):
    """A job of a sweep whose dir another process holds (the same sweep started twice) fails with that line in the
    summary and leaves the dir alone; the sweep's other jobs run."""
    from mtrain.rundir import claim, release

    sweep = tmp_path / "sweep"
    taken = sweep / "0_rl=on,task=info"
    claim(taken)  # this test's process plays the other job
    try:
        r = run_cli(["-m", "rl=on,off", "task=info", f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    finally:
        release(taken)
    assert r.returncode != 0
    assert f"run dir {taken} is in use by another job (pid {os.getpid()} on" in r.stderr
    assert sorted(p.name for p in taken.iterdir()) == [".hydra", ".mtrain.lock", "mtrain.log"]  # no status.json
    assert json.loads((sweep / "1_rl=off,task=info" / "status.json").read_text())["status"] == "ok"


def test_a_run_dir_that_cannot_be_created_is_one_line(tmp_path):
    (tmp_path / "a_file").write_text("")
    r = run_cli([f"hydra.run.dir={tmp_path / 'a_file' / 'run'}"], cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"mtrain: error: hydra.run.dir: {tmp_path / 'a_file'} is a file, so {tmp_path / 'a_file' / 'run'} cannot be "
        "created under it. Fix: point hydra.run.dir=... at a writable folder"]


def test_a_path_in_a_sweep_override_does_not_nest_the_job_dir():
    from mtrain.config import dir_name

    name = dir_name("task.rollouts_path=/data/run 1/rollouts.jsonl,task.lr=0.001")
    assert name == "task.rollouts_path=_data_run_1_rollouts.jsonl,task.lr=0.001"
    assert len(dir_name("x=" + "a" * 500)) <= 120


class _Payload:
    """Unpickling this runs code: it creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture
def module():
    from mtrain.lit import MoELitModule
    from mtrain.models import Glm4MoeConfig, build_model

    return MoELitModule(build_model(Glm4MoeConfig(), seed=0))


def test_a_crafted_ckpt_runs_nothing_even_when_torch_is_told_to_unpickle(tmp_path, monkeypatch, module):
    from mtrain.lit.resume import check_resume

    marker, crafted = tmp_path / "code_ran", tmp_path / "last.ckpt"
    torch.save({"state_dict": {}, "global_step": 1, "x": _Payload(marker)}, crafted)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(CheckpointError, match="not a readable Lightning checkpoint"):
        check_resume(crafted, module)
    assert not marker.exists()


def test_distributed_checkpoints_resume_only_when_signed_and_unchanged(tmp_path, monkeypatch, module):
    from mtrain.lit.manifest import MANIFEST, write_manifest
    from mtrain.lit.resume import check_resume

    monkeypatch.setenv("MTRAIN_CHECKPOINT_KEY", str(tmp_path / "key"))
    folder, marker = tmp_path / "last.ckpt", tmp_path / "code_ran"
    folder.mkdir()
    (folder / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))  # DCP unpickles .metadata on load
    (folder / "__0_0.distcp").write_bytes(b"\0" * 64)
    with pytest.raises(CheckpointError, match=f"has no {MANIFEST}"):
        check_resume(folder, module, sharded=True)

    write_manifest(folder)
    check_resume(folder, module, sharded=True)  # what mtrain wrote, unchanged: accepted

    (folder / "__0_0.distcp").write_bytes(b"\1" + b"\0" * 63)
    with pytest.raises(CheckpointError, match="__0_0.distcp changed"):
        check_resume(folder, module, sharded=True)
    write_manifest(folder)
    (folder / "extra.distcp").write_bytes(b"")
    with pytest.raises(CheckpointError, match="extra.distcp is not in the manifest"):
        check_resume(folder, module, sharded=True)
    (folder / "extra.distcp").unlink()

    monkeypatch.setenv("MTRAIN_CHECKPOINT_KEY", str(tmp_path / "another_users_key"))
    with pytest.raises(CheckpointError, match="signature .* does not match") as e:
        check_resume(folder, module, sharded=True)
    assert "\n" not in str(e.value) and "task.ckpt_path" in str(e.value)
    assert not marker.exists()


def test_the_checkpoint_writer_streams_to_disk_and_stays_atomic(tmp_path, monkeypatch):
    """StreamingCheckpointIO (every non-FSDP trainer's): a write that dies half-way leaves the previous file whole and
    no partial file behind; a finished write loads."""
    from mtrain.lit.checkpoint_io import StreamingCheckpointIO

    io, path = StreamingCheckpointIO(), tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "w": torch.ones(3)}, path)
    real = torch.save

    def dies(obj, f, *a, **kw):
        real({"half": torch.zeros(10)}, f)
        raise OSError("killed while writing")

    monkeypatch.setattr(torch, "save", dies)
    with pytest.raises(OSError, match="killed while writing"):
        io.save_checkpoint({"global_step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.setattr(torch, "save", real)
    assert torch.load(path, weights_only=True)["global_step"] == 1
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]


def _on_a_small_disk(tmp_path: Path, kilobytes: int, runs: list[list[str]]) -> list[subprocess.CompletedProcess]:
    """``python -m mtrain <args>`` for each of ``runs`` in turn, in a user and mount namespace of their own (no root
    needed) where ``tmp_path/disk`` is a tmpfs of ``kilobytes``: a real full disk. The disk's files are copied to
    ``tmp_path/after`` when the last run ends (the tmpfs goes with the namespace)."""
    disk, after = tmp_path / "disk", tmp_path / "after"
    disk.mkdir()
    after.mkdir()
    mount = f"mount -t tmpfs -o size={kilobytes}k tmpfs {disk}"
    if shutil.which("unshare") is None or subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh",
                                                          "-c", mount], capture_output=True).returncode:
        pytest.skip("needs unshare with unprivileged user namespaces to mount a small tmpfs")
    script = [mount]
    for i, args in enumerate(runs):
        cmd = " ".join(shlex.quote(a) for a in [sys.executable, "-m", "mtrain", *args])
        script.append(f"{cmd} > {tmp_path}/out{i} 2> {tmp_path}/err{i}; echo $? > {tmp_path}/rc{i}")
    script.append(f"cp -a {disk}/. {after}/")
    subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", "\n".join(script)], cwd=tmp_path,
                   env=env(), check=True, timeout=300)
    return [subprocess.CompletedProcess(args, int((tmp_path / f"rc{i}").read_text()),
                                        (tmp_path / f"out{i}").read_text(), (tmp_path / f"err{i}").read_text())
            for i, args in enumerate(runs)]


def test_a_full_disk_during_a_checkpoint_write_is_one_line_and_keeps_the_last_checkpoint(tmp_path):
    """On a 2.2 MB disk the first last.ckpt (1.4 MB) fits and the second, written beside it before the swap, does
    not: the job stops with one line naming the file, the bytes needed and free (exit 2), and last.ckpt is the
    first, whole; no partial file is left."""
    run = tmp_path / "disk" / "run"
    [r] = _on_a_small_disk(tmp_path, 2200, [[*RUN, "task.save_top_k=0", f"hydra.run.dir={run}"]])
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert re.fullmatch(rf"mtrain: error: no space left on the device for the checkpoint {re.escape(str(run))}/"
                        r"checkpoints/last\.ckpt: it needs 1\.3\d MB and \d{3} kB were free there; last\.ckpt is "
                        r"as it was before this write\. Fix: .*", r.stderr.strip().splitlines()[-1]), r.stderr
    ckpts = tmp_path / "after" / "run" / "checkpoints"
    assert [p.name for p in ckpts.iterdir()] == ["last.ckpt"] and ckpt_step(ckpts / "last.ckpt") == 6


def test_a_full_disk_during_an_export_is_one_line_and_keeps_the_previous_export(tmp_path):
    """A run exports hf_model/ (0.45 MB) on a 0.8 MB disk; a second run over it (task.overwrite=true) has no room
    for its export beside the first: one line, exit 2, and the first export is whole."""
    from mtrain.models import from_pretrained

    run = tmp_path / "disk" / "run"
    args = ["trainer.max_steps=2", "task.checkpoints=false", "task.accuracy=false", "data.num_train=64",
            "data.num_val=16", "trainer.enable_progress_bar=false", f"hydra.run.dir={run}"]
    done, full = _on_a_small_disk(tmp_path, 800, [args, [*args, "task.overwrite=true", "seed=1"]])
    assert done.returncode == 0, done.stderr[-3000:]
    assert full.returncode == 2 and "Traceback" not in full.stderr, full.stderr[-3000:]
    assert re.fullmatch(rf"mtrain: error: no space left on the device for the export {re.escape(str(run))}/hf_model: "
                        r"it needs \d{3} kB and \d{3} kB were free there; hf_model is as it was before this write\. "
                        r"Fix: .*", full.stderr.strip().splitlines()[-1]), full.stderr
    after = tmp_path / "after" / "run"
    assert sorted(p.name for p in after.iterdir() if "hf_model" in p.name) == ["hf_model"]  # no temporary folder
    from_pretrained(after / "hf_model")


@pytest.mark.parametrize("writer", ["checkpoint", "export"])
def test_a_full_disk_is_told_apart_from_other_write_errors(tmp_path, monkeypatch, writer):
    """Where a small disk cannot be made: each writer's own full-disk error (torch's zip writer names no errno, so
    the free space decides), patched in half-way through the write, becomes one line; the previous file stays."""
    import mtrain.disk
    from mtrain.data import synthetic_tokenizer
    from mtrain.disk import DiskFull
    from mtrain.job.outputs import export_hf
    from mtrain.lit.checkpoint_io import StreamingCheckpointIO
    from mtrain.models import Glm4MoeConfig, build_model, from_pretrained, save_pretrained

    if writer == "checkpoint":
        dest, io = tmp_path / "last.ckpt", StreamingCheckpointIO()
        io.save_checkpoint({"global_step": 1, "w": torch.ones(10**5)}, dest)
        write = lambda: io.save_checkpoint({"global_step": 2, "w": torch.zeros(10**5)}, dest)  # noqa: E731
        error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

        def half_way(obj, f, *a, **kw):
            Path(f).write_bytes(b"PK\x03\x04 half a zip")
            raise error

        monkeypatch.setattr(torch, "save", half_way)
    else:
        dest, model = tmp_path / "hf_model", build_model(Glm4MoeConfig(), seed=0)
        save_pretrained(model, dest)
        data = SimpleNamespace(tokenizer=synthetic_tokenizer())
        write = lambda: export_hf(model, data, None, dest)  # noqa: E731
        error = OSError("Error while serializing: I/O error: No space left on device (os error 28)")

        def half_way(tensors, filename, *a, **kw):
            Path(filename).write_bytes(b"half a shard")
            raise error

        monkeypatch.setattr("mtrain.models.saving.save_file", half_way)
    before = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}

    monkeypatch.setattr(mtrain.disk, "free_bytes", lambda path: 100_000)  # less than either write needs
    with pytest.raises(DiskFull) as e:
        write()
    assert str(e.value).startswith(f"no space left on the device for the {writer} {dest}: it needs ")
    assert "100 kB were free there" in str(e.value) and "\n" not in str(e.value) and e.value.__cause__ is error
    assert {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before  # as it was

    if writer == "checkpoint":  # with room to spare the same message is no full disk: the writer's error stands
        monkeypatch.setattr(mtrain.disk, "free_bytes", lambda path: 10**12)
        with pytest.raises(RuntimeError, match="unexpected pos"):
            write()
        assert torch.load(dest, weights_only=True)["global_step"] == 1
    else:
        from_pretrained(dest)


def test_a_resumed_csv_log_keeps_the_rows_before_the_resume(tmp_path):
    """The rows logged before the checkpoint stay; rows after it (logged again by the resumed run) and a row cut short
    by a killed write go; without a resume the log starts afresh (Lightning's behaviour)."""
    from mtrain.lit.csvlog import KeepingCSVLogger

    log = tmp_path / "csv" / "metrics.csv"
    old = "epoch,step,train/loss\n0,0,4.0\n0,1,3.5\n0,2,3.0\n0,3,2.9\n0,1"  # the last: "0,13,2.8" cut short
    for keep, expected in ((True, [("0", "4.0"), ("1", "3.5"), ("2", "2.5"), ("3", "2.4")]),
                           (False, [("2", "2.5"), ("3", "2.4")])):
        log.parent.mkdir(exist_ok=True)
        log.write_text(old)
        logger = KeepingCSVLogger(save_dir=str(tmp_path), name="csv", version="", keep=keep)
        logger.log_metrics({"train/loss": 2.5, "lr": 0.1}, step=2)
        logger.log_metrics({"train/loss": 2.4, "lr": 0.1}, step=3)
        logger.save()
        with log.open() as f:
            rows = list(csv.DictReader(f))
        assert [(r["step"], r["train/loss"]) for r in rows] == expected
        assert [r["lr"] for r in rows][-2:] == ["0.1", "0.1"]


def test_the_signals_that_requeue_a_slurm_job():
    """SIGUSR1 always (``sbatch --signal=USR1@<s>``); in a job submitit started (hydra/launcher=slurm) also its own
    time-limit signal, SIGUSR2 unless renamed. tests/test_slurm.py sends SIGUSR2 to a live job."""
    from mtrain.parallel.launch import requeue_signals, slurm_restarted

    assert requeue_signals({}) == ("SIGUSR1",)
    assert requeue_signals({"SUBMITIT_EXECUTOR": "slurm"}) == ("SIGUSR1", "SIGUSR2")
    assert requeue_signals({"SUBMITIT_EXECUTOR": "slurm", "SUBMITIT_PREEMPT_SIGNAL": "USR1"}) == ("SIGUSR1",)
    assert requeue_signals({"SUBMITIT_EXECUTOR": "local"}) == ("SIGUSR1",)
    assert slurm_restarted({"SLURM_RESTART_COUNT": "1"}) and not slurm_restarted({"SLURM_RESTART_COUNT": "0"})


def test_the_multi_process_sigterm_broadcast_runs_every_logging_interval(tmp_path, monkeypatch):
    """Lightning's per-batch broadcast of rank 0's SIGTERM flag (a host sync each step with several processes) runs
    on the steps of the logging interval only, decided from global_step so that every rank joins the same ones."""
    from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop

    from test_sft import prepared
    from mtrain.lit import build_trainer

    import lightning as L

    step, calls = [0], []
    monkeypatch.setattr(L.Trainer, "global_step", property(lambda self: step[0]))
    monkeypatch.setattr(_TrainingEpochLoop, "_broadcast_sigterm_tensor", lambda self: calls.append(step[0]))
    trainer = build_trainer(prepared("trainer.log_every_n_steps=4", run_dir=tmp_path).cfg, tmp_path)
    for step[0] in range(10):
        trainer.fit_loop.epoch_loop._broadcast_sigterm_tensor()  # what the loop calls before each batch
    assert calls == [0, 4, 8]
