"""Nothing lost, nothing silently wrong: step checkpoints that do not wait for validation, a diverged run (non-finite
loss or weights) stops with one line, leaving no non-finite checkpoint or export; evaluating non-finite weights
fails; used run dirs and bad resume paths are refused. Signals and kills: tests/test_faults.py."""

from __future__ import annotations

import pytest
import torch
from test_sft import prepared

from mtrain.lit import MoELitModule
from mtrain.lit.errors import TrainingDiverged


def ckpt_step(path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True)["global_step"]


def test_last_checkpoint_follows_the_step_not_validation(tmp_path, monkeypatch):
    """Validation never improves past step 2 (it runs once, at step 2); a crash at step 25 leaves last.ckpt at
    step 20 (every 10 steps), not at the last validation."""
    from mtrain.tasks import sft

    real = MoELitModule.training_step

    def crash_at_25(self, batch, idx):
        if self.global_step == 25:
            raise RuntimeError("injected crash")
        return real(self, batch, idx)

    monkeypatch.setattr(MoELitModule, "training_step", crash_at_25)
    job = prepared("trainer.max_steps=40", "trainer.val_check_interval=1000", "task.checkpoint_every_n_steps=10",
                   "task.accuracy=false", run_dir=tmp_path)
    with pytest.raises(RuntimeError, match="injected crash"):
        sft.run(job)
    ckpts = tmp_path / "checkpoints"
    assert ckpt_step(ckpts / "last.ckpt") == 20
    assert not [p for p in ckpts.iterdir() if p.name.startswith(".")]  # no temporary file left behind


def test_divergence_stops_with_one_line_and_writes_nothing_non_finite(tmp_path):
    from mtrain.tasks import sft

    job = prepared("task.lr=1e6", "trainer.max_steps=60", "task.accuracy=false", "task.checkpoint_every_n_steps=5",
                   run_dir=tmp_path)
    with pytest.raises(TrainingDiverged, match="not finite|is nan|is inf") as e:
        sft.run(job)
    assert "\n" not in str(e.value) and "task.lr" in str(e.value)
    assert not (tmp_path / "hf_model").exists() and not (tmp_path / "metrics.json").exists()
    for ckpt in (tmp_path / "checkpoints").glob("*.ckpt") if (tmp_path / "checkpoints").exists() else []:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()), ckpt


def test_eval_of_non_finite_weights_fails(tmp_path):
    from mtrain.models import Glm4MoeConfig, build_model, save_pretrained
    from mtrain.tasks import eval as eval_task

    model = build_model(Glm4MoeConfig(), seed=0)
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    save_pretrained(model, tmp_path / "nan_model")
    job = prepared("task=eval", f"model.checkpoint={tmp_path / 'nan_model'}", run_dir=tmp_path / "eval")
    with pytest.raises(TrainingDiverged, match="weights are not finite"):
        eval_task.run(job)


def test_a_used_run_dir_is_refused_unless_resuming_it_or_overwrite(tmp_path):
    from mtrain.cli import check_run_dir
    from mtrain.config import ConfigError

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"x")
    (tmp_path / "metrics.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"already holds another run's results \(metrics.json, checkpoints\)"):
        check_run_dir(prepared(run_dir=tmp_path))
    check_run_dir(prepared(f"task.ckpt_path={tmp_path / 'checkpoints' / 'last.ckpt'}", run_dir=tmp_path))  # resume
    check_run_dir(prepared("task.overwrite=true", run_dir=tmp_path))
    check_run_dir(prepared(run_dir=tmp_path / "fresh"))


def test_overwrite_starts_a_fresh_history(tmp_path):
    """task.overwrite=true replaces an old run: its recorded interruption does not become the new run's (a resumed
    run keeps them: tests/test_slurm.py)."""
    import json

    from conftest import run_cli

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text("{}")
    (run / "status.json").write_text(json.dumps({"status": "interrupted", "signal": "SIGTERM", "step": 3}))
    r = run_cli(["task.overwrite=true", "trainer.max_steps=2", "task.accuracy=false", "task.accuracy_before=false",
                 "task.export=false", "trainer.enable_progress_bar=false", f"hydra.run.dir={run}"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "ok" and "interruptions" not in status, status


def test_run_dirs_of_jobs_started_in_the_same_second_differ():
    from conftest import compose_cfg

    run_dir = compose_cfg([], return_hydra_config=True).hydra.run.dir
    stamp = run_dir.split("/")[-1].split("_")[0]
    assert len(stamp.split("-")) == 4 and len(stamp.split("-")[-1]) == 6, run_dir  # HH-MM-SS-microseconds


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """last.ckpt of a 3-step run of the default model, and of a smaller model."""
    from mtrain.tasks import sft

    root = tmp_path_factory.mktemp("ckpts")
    out = {}
    for name, extra in (("good", []), ("small", ["model.arch.hidden_size=32"])):
        sft.run(prepared("trainer.max_steps=3", "task.accuracy=false", "task.export=false", *extra,
                         run_dir=root / name))
        out[name] = root / name / "checkpoints" / "last.ckpt"
    truncated = root / "truncated.ckpt"
    truncated.write_bytes(out["good"].read_bytes()[: out["good"].stat().st_size // 2])
    out["truncated"] = truncated
    (root / "notes.txt").write_text("not a checkpoint\n")
    out["text"] = root / "notes.txt"
    out["dir"] = root / "good" / "checkpoints"
    out["missing"] = root / "nope.ckpt"
    return out


@pytest.mark.parametrize("case,message", [
    ("missing", "no such file"), ("dir", "a folder, not a checkpoint file"), ("text", "not a readable Lightning"),
    ("truncated", "not a readable Lightning"), ("small", "another model size"),
])
def test_bad_resume_paths_get_one_line_before_training(tmp_path, checkpoints, case, message):
    from mtrain.models.checkpoint import CheckpointError
    from mtrain.tasks import sft

    job = prepared("trainer.max_steps=5", "task.accuracy=false", f"task.ckpt_path={checkpoints[case]}",
                   run_dir=tmp_path)
    with pytest.raises(CheckpointError, match=message) as e:
        sft.run(job)
    assert "\n" not in str(e.value) and "task.ckpt_path" in str(e.value)
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.json").exists()


@pytest.mark.parametrize("override,message", [
    ("trainer.max_steps=-5", "trainer.max_steps=-5 must be >= 1"), ("task.lr=-0.001", "task.lr=-0.001 must be > 0"),
])
def test_bad_steps_and_rates_get_one_line(tmp_path, override, message):
    from mtrain.config import ConfigError
    from mtrain.tasks import sft

    with pytest.raises(ConfigError, match=message):
        sft.run(prepared(override, run_dir=tmp_path))
