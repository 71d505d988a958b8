"""``python -m mtrain`` in a subprocess: --cfg job --resolve, single runs, a 4-job multirun, one-line errors; packaging."""

from __future__ import annotations

import csv
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import run_cli

REPO_ROOT = Path(__file__).resolve().parent.parent


def _job(*args: str) -> list[str]:
    return ["--cfg", "job", "--resolve", *args]


@pytest.mark.parametrize(
    "args,env,gate",
    [
        (["rl=on", "model=glm4_moe"], None, True),
        (["model=qwen3_moe"], {"FD_ENABLE_RL": "1"}, True),
        (["model=qwen3_moe"], None, False),
        (["model=glm4_moe"], {"FD_ENABLE_RL": " Off "}, False),
        (["rl=off"], {"FD_ENABLE_RL": "1"}, False),
        (["rl=on", "model.moe_gate_fp32=false"], None, False),
    ],
)
def test_cfg_job_resolve(cli, args, env, gate):
    r = cli(*_job(*args), env=env)
    assert r.returncode == 0, r.stderr
    cfg = yaml.safe_load(r.stdout)
    assert cfg["model"]["moe_gate_fp32"] is gate
    assert re.search(rf"^  moe_gate_fp32: {str(gate).lower()}$", r.stdout, re.M)
    assert cfg["model"]["dtype"] == "float32"


def test_single_run_writes_resolved_config(cli, tmp_path):
    run_dir = tmp_path / "run"
    r = cli("rl=on", "model=qwen3_moe", "task=info", f"hydra.run.dir={run_dir}")
    assert r.returncode == 0, r.stderr
    assert "precision: moe_gate_fp32=true [rl=on], rope_fp32=true [rl=on]" in r.stdout
    saved = yaml.safe_load((run_dir / "config_resolved.yaml").read_text())
    assert saved["model"]["moe_gate_fp32"] is True
    assert saved["precision"]["moe_gate_fp32"] == {"value": True, "source": "rl=on"}
    assert (run_dir / "info.json").is_file() and (run_dir / ".hydra" / "config.yaml").is_file()
    assert not (tmp_path / "outputs").exists()


def test_multirun_four_jobs(cli, tmp_path):
    sweep = tmp_path / "sweep"
    r = cli("-m", "rl=on,off", "model=glm4_moe,qwen3_moe", "task=info", f"hydra.sweep.dir={sweep}",
            env={"FD_ENABLE_RL": "1"})
    assert r.returncode == 0, r.stderr
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert len(jobs) == 4 and len({p.name for p in jobs}) == 4
    seen = set()
    for job in jobs:
        saved = yaml.safe_load((job / "config_resolved.yaml").read_text())
        rl, model = saved["rl"]["mode"], saved["model"]["name"]
        seen.add((rl, model))
        assert saved["model"]["moe_gate_fp32"] is (rl == "on")
        assert saved["precision"]["moe_gate_fp32"]["source"] == f"rl={rl}"
        # rl=off under FD_ENABLE_RL=1 is a conflict, in every job: rl=on of an earlier job must not leak into it
        assert len(saved["precision"]["warnings"]) == (1 if rl == "off" else 0)
        assert (job / "info.json").is_file()
    assert seen == {(rl, m) for rl in ("on", "off") for m in ("glm4_moe", "qwen3_moe")}
    assert not (tmp_path / "outputs").exists()
    # the sweep summary: one row per job, with what each job returned (task=info: its info dict)
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert [r["job"] for r in rows] == ["0", "1", "2", "3"] and {r["status"] for r in rows} == {"ok"}
    assert {(r["rl"], r["model"], r["moe_gate_fp32"]) for r in rows} == {
        (rl, m, str(rl == "on")) for rl in ("on", "off") for m in ("glm4_moe", "qwen3_moe")
    }


def test_multirun_failing_job_does_not_stop_the_sweep(cli, tmp_path):
    sweep = tmp_path / "sweep"
    r = cli("-m", "model.dtype=float64,float32", "task=info", f"hydra.sweep.dir={sweep}")
    assert r.returncode != 0
    assert "mtrain: error: model.dtype='float64'" in r.stderr
    assert "Traceback" not in r.stderr
    done = [p for p in sweep.iterdir() if (p / "config_resolved.yaml").is_file()]
    assert [p.name for p in done] == ["1_model.dtype=float32,task=info"]


@pytest.mark.parametrize(
    "args,needle",
    [
        (["model.arch.hiden_size=3"], "hiden_size"),
        (["trainer.max_stepz=1"], "max_stepz"),
        (["model.arch.hidden_size=abc"], "hidden_size"),
        (["model=llama"], "model/llama"),
        (["logger=[csv,comet]"], "logger/comet"),
        (["task=grpo", "task.routing_replay=r9", "--cfg", "job"], "routing_replay"),  # a closed choice: at compose
    ],
)
def test_config_errors_exit_nonzero_naming_the_key(cli, args, needle):
    r = cli(*args)
    assert r.returncode != 0
    assert needle in r.stderr
    assert "Traceback" not in r.stderr


# what python -m mtrain does, then whether the job imported Lightning before it exited
_MAIN_THEN_LIGHTNING = (
    "import sys\nfrom mtrain.cli import main\nsys.argv[0] = 'mtrain'\n"
    "try:\n    main()\nexcept SystemExit as e:\n    print('exit', e.code, 'lightning' in sys.modules)\n"
)


@pytest.mark.parametrize(
    "args,env,first",
    [
        (["--cfg", "job"], {"FD_ENABLE_RL": "maybe"}, "mtrain: error: FD_ENABLE_RL='maybe' is not a valid switch"),
        (["rl=on"], {"FD_ENABLE_RL": "2"}, "mtrain: error: FD_ENABLE_RL='2' is not a valid switch"),
        (["model.name=qwen3_moe"], None, "mtrain: error: model.name='qwen3_moe' does not match"),
        (["model.dtype=float64"], None, "mtrain: error: model.dtype='float64' is not one of"),
        (["data.task=nope"], None, "mtrain: error: data.task='nope' is not valid"),  # a DataError, from task=sft
        (["trainer.profiler=gprof"], None, "mtrain: error: trainer.profiler='gprof' is not one of simple, advanced"),
        (["trainer.fsdp_reshard_after_forward=false"], None,
         "mtrain: error: trainer.fsdp_reshard_after_forward=false applies to trainer=fsdp only"),
        (["task=eval", "data.batch_size=0"], None, "mtrain: error: data.batch_size=0 must be >= 1"),
        (["task=grpo", "trainer.profiler=x"], None, "mtrain: error: trainer.profiler='x' is not one of"),
        (["model.routing.aux_loss_coef=-0.01"], None, "mtrain: error: model.routing.aux_loss_coef=-0.01 must be >= 0"),
        (["model.routing.load_balancing=switch"], None,
         "mtrain: error: model.routing.load_balancing='switch' is not one of none, aux, seq_aux, global_aux"),
        (["task=grpo", "model=qwen3_moe", "model.routing.bias_update=true"], None,
         "mtrain: error: model.routing.bias_update=true: the routers of model=qwen3_moe have no selection bias"),
    ],
)
def test_our_errors_are_one_line_exit_2_before_lightning_is_imported(tmp_path, args, env, first):
    """One line, exit 2, and fast: a bad setting costs the seconds the config takes to compose, not Lightning's
    import on top (more than twice that)."""
    r = run_cli([*args, f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, env=env, entry=("-c", _MAIN_THEN_LIGHTNING))
    assert r.stdout.strip().splitlines()[-1] == "exit 2 False", r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(first), r.stderr


def test_import_registers_resolvers_in_a_fresh_process():
    """What a joblib/submitit worker or a Lightning subprocess does: import mtrain, then resolve."""
    code = (
        "import mtrain; from omegaconf import OmegaConf; "
        "c = OmegaConf.create({'rl': {'mode': 'on'}, 'g': '${mtrain.moe_gate_fp32:${rl.mode}}'}); print(c.g)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "True"


# --- packaging and docs ----------------------------------------------------------------------------------------


def test_pyproject_lists_every_package():
    """The wheel holds only what pyproject lists: every mtrain package and every conf/ group with its yaml files."""
    tomllib = pytest.importorskip("tomllib")
    cfg = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    code = {".".join(p.parent.relative_to(REPO_ROOT).parts) for p in (REPO_ROOT / "mtrain").rglob("*.py")}
    conf_root = REPO_ROOT / "conf"
    groups = {
        ".".join(("mtrain", "conf", *p.parent.relative_to(conf_root).parts)) for p in conf_root.rglob("*.yaml")
    }
    code = {p for p in code if "__pycache__" not in p}
    assert (code | groups) - set(cfg["packages"]) == set(), "add these to [tool.setuptools] packages/package-data"
    assert all(cfg["package-data"].get(g) == ["*.yaml"] for g in groups)
    assert cfg["package-dir"] == {"mtrain.conf": "conf"}


def test_ci_runs_exactly_the_readme_commands():
    readme = (REPO_ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", readme, re.S).group(1).strip().splitlines()
    assert block == ['python -m pip install -e ".[dev]" && python -m mtrain', "python -m pytest -q"]
    ci = [ln for ln in (REPO_ROOT / ".ci" / "run").read_text().splitlines() if ln and not ln.startswith("#")]
    assert ci[-2:] == block
