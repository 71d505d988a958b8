"""The ``logger`` config group with the real packages, offline: one SFT job with every logger, then its resume into
the same run dir; each logger's own files (or store) are read back for the step metrics, the resolved config, the
final metrics and the plot. Also: what a missing package does, and what the default still writes."""

from __future__ import annotations

import importlib.util
import json
import struct
from pathlib import Path

import pytest
from test_cli import _MAIN_THEN_LIGHTNING
from test_sft import prepared

from conftest import run_cli

RUN = ["trainer.max_steps=8", "trainer.val_check_interval=4", "trainer.log_every_n_steps=2", "task.accuracy=false",
       "task.export=false", "task.save_top_k=0", "task.checkpoint_every_n_steps=4"]
# every logger whose package is here (the dev extras install them all: CI runs every test below)
INSTALLED = [name for name, package in (("tensorboard", "tensorboard"), ("wandb", "wandb"), ("mlflow", "mlflow"))
             if importlib.util.find_spec(package)]


@pytest.fixture(scope="module")
def logged(tmp_path_factory) -> dict:
    """An 8-step job with all four loggers (W&B offline, MLflow in a file store), then the same job resumed to
    step 12 in its run dir (``task.ckpt_path=auto``)."""
    from mtrain.tasks import sft

    every = f"logger=[{','.join(['csv', *INSTALLED])}]"
    root = tmp_path_factory.mktemp("loggers")
    run, uri = root / "run", f"file:{root / 'mlruns'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        mp.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 refuses a file store unless told
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        first = sft.run(prepared(*RUN, every, run_dir=run))
        resumed = sft.run(prepared(*RUN, every, "trainer.max_steps=12", "task.ckpt_path=auto", run_dir=run))
    return {"run": run, "uri": uri, "first": first, "resumed": resumed}


def test_csv_is_the_default_and_writes_what_it_wrote_before(tmp_path, compose_config):
    """The default is csv alone: ``csv/metrics.csv``, and no TensorBoard, W&B or MLflow files in the run dir."""
    from mtrain.tasks import sft

    assert list(compose_config().logger) == ["csv"]
    m = sft.run(prepared(*RUN, run_dir=tmp_path))
    assert m["files"]["csv_log"] == str(tmp_path / "csv" / "metrics.csv")
    assert "train/loss" in (tmp_path / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert not {"tensorboard", "wandb", "mlruns", "loggers.json"} & {p.name for p in tmp_path.iterdir()}


def test_no_logger_at_all(tmp_path):
    from mtrain.tasks import sft

    m = sft.run(prepared(*RUN, "logger=[]", run_dir=tmp_path))
    assert m["files"]["csv_log"] is None and m["steps"] == 8 and not (tmp_path / "csv").exists()


def _wandb_records(run_file: Path):
    """The records of a W&B run file (``run-<id>.wandb``: a LevelDB-style log of protobuf records, 32 KiB blocks,
    each chunk headed by crc32, length and type; the file starts with a 7-byte W&B header)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, buf = run_file.read_bytes(), 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        buf, pos = buf + data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = pb.Record()
            record.ParseFromString(buf)
            yield record
            buf = b""


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def test_wandb_offline_run_has_the_metrics_config_and_plot(logged):
    pytest.importorskip("wandb")
    runs = sorted((logged["run"] / "wandb").glob("offline-run-*"))
    assert len(runs) == 2  # the job and its resume ...
    ids = {next(r.glob("run-*.wandb")).stem for r in runs}
    assert ids == {f"run-{json.loads((logged['run'] / 'loggers.json').read_text())['wandb']['id']}"}  # ... one run

    config, history, summary = {}, [], {}
    for record in _wandb_records(next(runs[0].glob("run-*.wandb"))):
        kind = record.WhichOneof("record_type")
        if kind == "config":
            config |= {_key(i): json.loads(i.value_json) for i in record.config.update}
        elif kind == "history":
            history.append({_key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            summary |= {_key(i): json.loads(i.value_json) for i in record.summary.update}
    assert config["task"]["lr"] == 3e-3 and config["precision"]["moe_gate_fp32"]["value"] is False
    assert [h["trainer/global_step"] for h in history if "train/loss" in h][:3] == [1, 3, 5]
    assert summary["final/val_loss"] == pytest.approx(logged["first"]["val_loss"])
    assert summary["final/steps"] == 8
    assert list(runs[0].glob("files/media/images/plots/loss_curve_*.png"))


def test_mlflow_run_has_the_metrics_params_and_plot(logged):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(logged["uri"])
    exp = client.get_experiment_by_name("mtrain")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1  # the resumed job continued the run
    run = runs[0]
    assert run.data.params["task/lr"] == "0.003" and run.data.params["model/name"] == "glm4_moe"
    assert run.data.tags["mlflow.runName"] == "run"  # the run dir's name
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert steps[0] == 1 and steps[-1] == 11 and steps == sorted(steps)  # both jobs' steps
    assert run.data.metrics["final/steps"] == 12
    assert run.data.metrics["final/val_loss"] == pytest.approx(logged["resumed"]["val_loss"])
    assert "plots/loss_curve.png" in [a.path for a in client.list_artifacts(run.info.run_id, "plots")]
    assert logged["resumed"]["files"]["loggers"]["mlflow"] == f"{logged['uri']} run {run.info.run_id}"


def test_tensorboard_has_the_metrics_config_and_plot(logged):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logged["run"] / "tensorboard"), size_guidance={"images": 0, "scalars": 0}).Reload()
    tags = events.Tags()
    assert {"train/loss", "val/loss", "final/val_loss"} <= set(tags["scalars"])
    assert [e.step for e in events.Scalars("final/steps")] == [8, 12]
    assert "plots/loss_curve" in tags["images"]
    hparams = events.PluginTagToContent("hparams")
    assert any(b"task/lr" in content for content in hparams.values())


def test_csv_continues_and_keeps_out_of_the_way(logged):
    """CSV gets the step metrics only (config, final metrics and plots are files of the run dir already)."""
    rows = (logged["run"] / "csv" / "metrics.csv").read_text().splitlines()
    assert not any("final/" in h for h in rows[0].split(",")) and not (logged["run"] / "csv" / "hparams.yaml").exists()
    assert logged["resumed"]["files"]["loggers"]["csv"] == str(logged["run"] / "csv" / "metrics.csv")


def test_a_logger_whose_package_is_missing_is_one_line_before_the_job(tmp_path):
    hide = "import sys\nsys.modules['wandb'] = None  # as if not installed\n"
    r = run_cli(["logger=[csv,wandb]", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path,
                entry=("-c", hide + _MAIN_THEN_LIGHTNING))
    assert r.stdout.strip().splitlines()[-1] == "exit 2 False", r.stdout + r.stderr
    assert r.stderr.strip().splitlines() == ["mtrain: error: logger=wandb needs the wandb package, which is not "
                                             "installed. Fix: pip install wandb, or leave wandb out of logger="]
