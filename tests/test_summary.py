"""The multirun summary: a real 4-job sweep with one failing job (subprocess), and the table writer itself."""

from __future__ import annotations

import csv
import json

from conftest import run_cli
from mtrain.summary import write_summary


def test_sweep_of_four_jobs_with_one_failure_writes_summary(tmp_path):
    sweep = tmp_path / "sweep"
    r = run_cli(
        ["-m", "data.task=add,sort,nope,reverse", "data.num_train=48", "data.num_val=16", "data.batch_size=16",
         "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.enable_progress_bar=false",
         "task.export=false", f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path, timeout=240,
    )
    assert r.returncode != 0  # the sweep reports its failed job ...
    assert "mtrain: error: data.task='nope' is not valid" in r.stderr
    assert "Traceback" not in r.stderr
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert [row["job"] for row in rows] == ["0", "1", "2", "3"]  # ... after running all four
    status = {row["overrides"].split()[0]: row["status"] for row in rows}
    assert status == {"data.task=add": "ok", "data.task=sort": "ok", "data.task=nope": "failed",
                      "data.task=reverse": "ok"}
    failed = rows[2]
    assert failed["error"].startswith("DataError: data.task='nope' is not valid") and failed["val_loss"] == ""
    for row in (rows[0], rows[1], rows[3]):
        assert row["error"] == "" and row["steps"] == "2" and float(row["val_loss"]) > 0
        assert 0.0 <= float(row["val_accuracy"]) <= 1.0
        assert float(row["routing_maxvio"]) >= 0  # the final MaxVio of each job (routing health)
    md = (sweep / "summary.md").read_text()
    assert "4 jobs, 3 ok, 1 not ok" in md and md.count("\n| ") == 5  # header + 4 rows
    job_dir = next(sweep.glob("2_*"))
    assert json.loads((job_dir / "status.json").read_text())["status"] == "failed"


def test_summary_table_unions_metric_keys_and_marks_unfinished_jobs(tmp_path):
    def job(name, num, status=None, metrics=None):
        d = tmp_path / name
        (d / ".hydra").mkdir(parents=True)
        (d / ".hydra" / "overrides.yaml").write_text(f"- seed={num}\n")
        if status:
            (d / "status.json").write_text(json.dumps({"job": num, "overrides": [f"seed={num}"], "status": status,
                                                       "error": "" if status == "ok" else "ValueError: boom"}))
        if metrics:
            (d / "metrics.json").write_text(json.dumps(metrics))

    job("10_seed=10", 10, "ok", {"loss": 1.5, "files": {"x": 1}, "tag": "a|b"})
    job("2_seed=2", 2, "ok", {"loss": 2.0, "accuracy": 0.5})
    job("3_seed=3", 3, "failed")
    job("4_seed=4", 4)  # killed: no status.json
    (tmp_path / "not_a_job").mkdir()
    csv_path, md_path, rows = write_summary(tmp_path)
    assert [r["job"] for r in rows] == [2, 3, 4, 10]  # numeric order, not name order
    header = csv_path.read_text().splitlines()[0].split(",")
    assert header[:4] == ["job", "overrides", "status", "error"] and {"loss", "accuracy", "tag"} <= set(header)
    assert "files" not in header  # nested values stay in metrics.json
    by_job = {r["job"]: r for r in csv.DictReader(csv_path.open())}
    assert by_job["3"]["status"] == "failed" and by_job["3"]["error"] == "ValueError: boom"
    assert by_job["4"]["status"] == "unknown" and by_job["4"]["overrides"] == "seed=4"
    assert by_job["10"]["accuracy"] == "" and by_job["2"]["accuracy"] == "0.5"
    assert "a\\|b" in md_path.read_text()
