"""Routing health through the tasks (Lightning, Hydra config): the load metrics every logging step in the CSV,
``expert_load.csv`` and ``metrics.json``; the plots of task=sft, task=eval and task=grpo; the balancing losses in
the trained loss; the bias update saved, resumed, exported and handed to the rollout engine in fp32; a frozen router
left bit for bit as it was; bad settings refused in one line before anything runs."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import compose_cfg
from mtrain.config import ConfigError
from mtrain.job import Job

SMALL = ["data.num_train=64", "data.num_val=16", "data.batch_size=16", "trainer.enable_progress_bar=false",
         "trainer.val_check_interval=4", "task.warmup_steps=0", "task.accuracy_before=false"]
GRPO = ["task=grpo", "trainer.enable_progress_bar=false", "data.num_train=64", "data.num_val=16",
        "task.prompts_per_step=4", "task.group_size=4", "task.eval_every=0", "task.export=false", "trainer.max_steps=2"]


def run_task(tmp_path, name, *overrides, callbacks=()):
    """Run a task in-process: (its metrics, its run dir); ``callbacks`` join the task's trainer."""
    from mtrain.tasks import eval as eval_task, get_task, sft as sft_task
    from mtrain.tasks.grpo import task as grpo_task

    job = Job.prepare(compose_cfg(list(overrides)), tmp_path / name)
    mp = pytest.MonkeyPatch()
    extra = list(callbacks)
    for task in (sft_task, eval_task, grpo_task):
        build = task.build_trainer
        mp.setattr(task, "build_trainer",
                   lambda *a, callbacks=(), _build=build, **kw: _build(*a, callbacks=[*callbacks, *extra], **kw))
    try:
        with job.plan.job_env():
            return get_task(job.cfg.task.name)(job), job.dir
    finally:
        mp.undo()


def gates(model):
    """Every router tensor (gate weights, biases), cloned."""
    return {n: t.detach().clone() for n, t in list(model.named_parameters()) + list(model.named_buffers())
            if ".gate." in n}


class Snapshot:
    """The model's router tensors and all its weights at the start and end of fit, and every trained loss."""

    def __init__(self):
        import lightning as L

        outer = self

        class _CB(L.Callback):
            def on_train_start(self, trainer, module):
                outer.start, outer.start_all = gates(module.model), dict(_weights(module.model))

            def on_train_end(self, trainer, module):
                outer.end, outer.end_all = gates(module.model), dict(_weights(module.model))
                outer.module = module

            def on_before_backward(self, trainer, module, loss):
                outer.losses.append(float(loss.detach()))

        self.callback, self.losses = _CB(), []


def _weights(model):
    return ((n, p.detach().clone()) for n, p in model.named_parameters())


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("model", ["glm4_moe", "qwen3_moe"])
def test_sft_frozen_router_stays_bit_identical(tmp_path, model):
    snap = Snapshot()
    m, run = run_task(tmp_path, "frozen", f"model={model}", "model.routing.freeze_router=true", "trainer.max_steps=4",
                      "task.export=false", "task.lr=1e-2", *SMALL, callbacks=[snap.callback])
    assert m["steps"] == 4 and snap.start
    for name, t in snap.start.items():
        assert torch.equal(snap.end[name], t), name
    moved = [n for n, t in snap.start_all.items() if not torch.equal(snap.end_all[n], t)]
    assert moved and not any(".gate." in n for n in moved)  # the rest of the model trained
    assert m["routing"]["settings"]["freeze_router"] is True


def test_grpo_frozen_router_stays_bit_identical(tmp_path):
    snap = Snapshot()
    m, _ = run_task(tmp_path, "grpo", *GRPO, "rl=on", "model.routing.freeze_router=true",
                    "task.reward=test_grpo.digit_reward", callbacks=[snap.callback])
    assert m["steps"] == 2
    for name, t in snap.start.items():
        assert torch.equal(snap.end[name], t), name
    assert any(not torch.equal(snap.end_all[n], t) for n, t in snap.start_all.items())  # the policy did move


def test_sft_logs_load_metrics_every_logging_step_and_plots_them(tmp_path):
    """trainer.log_every_n_steps=2, 6 steps: routing rows at steps 1, 3, 5 (Lightning's 0-based step of that
    step's train/loss, in the same row); expert_load.csv holds each window's counts, which add up to top_k slots per
    real token; metrics.json's final MaxVio is the last window's; then task=eval of the export plots its own."""
    m, run = run_task(tmp_path, "sft", "trainer.max_steps=6", "trainer.log_every_n_steps=2", *SMALL)
    rows = read_csv(run / "csv" / "metrics.csv")
    routed = [r for r in rows if r.get("routing/maxvio")]
    assert [int(r["step"]) for r in routed] == [1, 3, 5]
    assert all(r["train/loss"] for r in routed)  # one row per step
    for key in ("maxvio_max", "dead_expert_frac", "entropy", "aux_loss", "z_loss", "layer1/maxvio",
                "layer1/dead_expert_frac", "layer1/entropy"):
        assert all(r[f"routing/{key}"] != "" for r in routed), key
    loads = read_csv(run / "expert_load.csv")
    assert [int(r["step"]) for r in loads] == [1, 3, 5] and {r["layer"] for r in loads} == {"1"}
    counts = [[int(v) for k, v in r.items() if k.startswith("expert")] for r in loads]
    k = 2  # tiny GLM: top-2
    assert all(sum(c) % k == 0 and sum(c) > 0 for c in counts)
    last = torch.tensor(counts[-1], dtype=torch.float64)
    vio = float((last.max() - last.mean()) / last.mean())
    assert m["routing_maxvio"] == pytest.approx(vio) and float(routed[-1]["routing/maxvio"]) == pytest.approx(vio)
    assert m["routing"]["tokens_per_expert"] == [counts[-1]] and m["routing"]["tokens"] == sum(counts[-1]) // k
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["routing_maxvio"] == pytest.approx(vio)
    for f in ("expert_load.png", "maxvio_curve.png"):
        assert (run / f).read_bytes()[:4] == b"\x89PNG"

    e, ev = run_task(tmp_path, "eval", "task=eval", f"model.checkpoint={run / 'hf_model'}", "data.num_val=40",
                     "data.batch_size=16", "trainer.log_every_n_steps=1")
    assert (ev / "expert_load.png").is_file() and (ev / "maxvio_curve.png").is_file()
    per_batch = read_csv(ev / "expert_load.csv")
    assert [int(r["step"]) for r in per_batch] == [1, 2, 3]  # 40 val rows in batches of 16
    total = torch.tensor([[int(v) for k, v in r.items() if k.startswith("expert")] for r in per_batch]).sum(0)
    assert e["routing"]["tokens_per_expert"] == [total.tolist()]  # the whole evaluation
    assert e["routing_maxvio"] == pytest.approx(float((total.max() - total.double().mean()) / total.double().mean()))


def test_the_trained_loss_holds_the_balancing_and_z_losses(tmp_path):
    snap = Snapshot()
    m, run = run_task(tmp_path, "aux", "model=qwen3_moe", "model.routing.load_balancing=seq_aux",
                      "model.routing.aux_loss_coef=0.5", "model.routing.z_loss_coef=0.25", "trainer.max_steps=2",
                      "trainer.log_every_n_steps=1",
                      "task.export=false", *SMALL, callbacks=[snap.callback])
    stats = snap.module.router_losses
    lm = [v for _, v in snap.module.train_losses()]
    last = stats.last_losses
    assert snap.losses[-1] == pytest.approx(lm[-1] + 0.5 * float(last["aux_loss"]) + 0.25 * float(last["z_loss"]),
                                            rel=1e-6)
    assert float(last["aux_loss"]) > 0 and float(last["z_loss"]) > 0
    rows = read_csv(run / "csv" / "metrics.csv")
    assert [float(r["train/loss"]) for r in rows if r.get("train/loss")] == pytest.approx(lm)  # the LM loss alone


def test_bias_update_is_saved_resumed_and_exported(tmp_path):
    snap = Snapshot()
    common = ["model.routing.bias_update=true", "model.routing.bias_update_rate=0.01", *SMALL]
    m, run = run_task(tmp_path, "a", "trainer.max_steps=3", *common, callbacks=[snap.callback])
    (name, bias), = [(n, t) for n, t in snap.end.items() if n.endswith("_bias")]
    assert bias.dtype == torch.float32 and bias.abs().max() > 0
    assert ((bias / 0.01).round() - bias / 0.01).abs().max() < 1e-4  # moved in steps of the rate
    assert bias.abs().max() <= 3 * 0.01 + 1e-7
    assert m["routing"]["expert_bias"] == [[round(float(x), 6) for x in bias]]
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert torch.equal(ckpt["state_dict"][f"model.{name}"], bias)
    exported = {}
    for f in (run / "hf_model").glob("*.safetensors"):
        exported |= load_file(f)
    hf_name = [k for k in exported if k.endswith("_bias")]
    assert len(hf_name) == 1 and exported[hf_name[0]].dtype == torch.float32
    assert torch.equal(exported[hf_name[0]], bias)

    resumed = Snapshot()
    run_task(tmp_path, "b", "trainer.max_steps=5", f"task.ckpt_path={run / 'checkpoints' / 'last.ckpt'}", *common,
             callbacks=[resumed.callback])
    assert torch.equal(resumed.start[name], bias)  # resumed with the saved bias ...
    assert not torch.equal(resumed.end[name], bias)  # ... and it kept moving


def test_the_bias_reaches_the_rollout_engine_in_fp32():
    """The weight hand-over copies the updated bias into a bf16 engine as fp32, equal to the trainer's."""
    from mtrain.models import Glm4MoeConfig, PrecisionPolicy, RoutingTrace, build_model
    from mtrain.models.balance import BalanceSettings
    from mtrain.models.router_stats import RouterStats
    from mtrain.rl.engines import FastEngine

    policy = PrecisionPolicy(moe_gate_fp32=True, rope_fp32=True)
    trainer = build_model(Glm4MoeConfig(), dtype="bfloat16", policy=policy, seed=0)
    engine = FastEngine(copy_of=trainer, policy=policy, dtype="bfloat16")
    stats = RouterStats(BalanceSettings(bias_update=True)).attach(trainer)
    for _ in range(3):
        trainer.hidden_states(torch.randint(0, 64, (4, 8)))
        stats.update_bias(1e-3 / 3)  # steps the bf16 grid cannot hold
    engine.sync(trainer)
    (_, mine), (_, theirs) = trainer.routers()[0], engine.model.routers()[0]
    assert mine.expert_bias.abs().max() > 0
    assert theirs.expert_bias.dtype == torch.float32 and torch.equal(theirs.expert_bias, mine.expert_bias)
    ids = torch.randint(0, 64, (2, 6))
    a, b = RoutingTrace(), RoutingTrace()
    with torch.no_grad():
        trainer.hidden_states(ids, trace=a)
        engine.model.hidden_states(ids, trace=b)
    assert torch.equal(a.stacked(), b.stacked())  # the engine routes as the trainer does


@pytest.mark.parametrize("overrides,needle", [
    (["model.routing.aux_loss_coef=-1"], "model.routing.aux_loss_coef=-1.0 must be >= 0"),
    (["model=qwen3_moe", "model.routing.bias_update=true"],
     "model.routing.bias_update=true: the routers of model=qwen3_moe have no selection bias"),
    (["model.routing.load_balancing=switch"], "model.routing.load_balancing='switch' is not one of none, aux"),
    (["model.routing.bias_update=true", "model.routing.freeze_router=true"], "choose one"),
    (["task=grpo", "model.routing.load_balancing=aux"], "the balancing losses are for task=sft"),
])
def test_bad_routing_settings_are_one_line_config_errors(overrides, needle):
    from mtrain.job.preflight import check_model_job

    job = Job.prepare(compose_cfg(overrides))
    with pytest.raises(ConfigError) as e:
        check_model_job(job.cfg, multirun=False)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_csv_rows_of_one_step_are_one_row_also_across_a_flush(tmp_path):
    """The routing metrics and Lightning's train/loss of a step land in one row, also when the first of them was
    flushed to the file already (every 100 steps)."""
    from mtrain.lit.csvlog import KeepingCSVLogger

    logger = KeepingCSVLogger(save_dir=str(tmp_path), name="csv", version="")
    logger.log_metrics({"routing/maxvio": 0.5}, step=0)
    logger.log_metrics({"train/loss": 4.0}, step=0)
    logger.log_metrics({"routing/maxvio": 0.25}, step=99)  # step 99: the logger flushes to the file
    logger.log_metrics({"train/loss": 3.0}, step=99)  # flushed again: joins the row in the file
    logger.log_metrics({"train/loss": 2.0}, step=100)
    logger.save()
    rows = read_csv(tmp_path / "csv" / "metrics.csv")
    assert [(r["step"], r["routing/maxvio"], r["train/loss"]) for r in rows] == [
        ("0", "0.5", "4.0"), ("99", "0.25", "3.0"), ("100", "", "2.0")]


def test_grpo_bias_update_reaches_the_engine_before_its_next_rollout(tmp_path):
    """GRPO (manual optimisation) updates the bias at each optimizer step; the hand-over after the updates gives
    the engine the new bias, so under rl=on its next rollout routes every token as the trainer's recompute does."""
    m, run = run_task(tmp_path, "grpo", *GRPO, "rl=on", "trainer.max_steps=3", "model.routing.bias_update=true",
                      "model.routing.bias_update_rate=0.05", "task.reward=test_grpo.digit_reward")
    bias = torch.tensor(m["routing"]["expert_bias"])
    assert bias.abs().max() >= 0.05 and ((bias / 0.05).round() * 0.05 - bias).abs().max() < 1e-5
    rows = [r for r in read_csv(run / "csv" / "metrics.csv") if r.get("mismatch/routing_disagreement")]
    assert len(rows) == 3 and all(r["routing/maxvio"] != "" for r in rows)  # one row per RL step
    assert all(float(r["mismatch/routing_disagreement"]) == 0.0 for r in rows)


def test_fsdp_two_ranks_balance_as_one_process_on_the_whole_batch(tmp_path):
    """trainer=fsdp on 2 processes (gloo) with the bias update and global_aux: the bias moves from the counts of
    both ranks, the loss of the global batch is trained and the logged load is both ranks' -- the same steps, counts
    and biases as one process on the whole batch."""
    import test_parallel as tp
    from conftest import LIT, run_cli, train_losses

    args = [*LIT, "trainer.max_steps=3", "task.checkpoints=false", "task.export=false",
            "model.routing.bias_update=true", "model.routing.bias_update_rate=0.01",
            "model.routing.load_balancing=global_aux", "model.routing.aux_loss_coef=0.1"]
    two = tp.torchrun(["-m", "mtrain", *args, "trainer.devices=2", "data.batch_size=4",
                       f"hydra.run.dir={tmp_path / 'two'}"], cwd=tmp_path)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-6000:]
    one = run_cli([*args, "trainer.devices=1", "data.batch_size=8", f"hydra.run.dir={tmp_path / 'one'}"],
                  cwd=tmp_path, timeout=180)
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-6000:]
    torch.testing.assert_close(torch.tensor(train_losses(tmp_path / "two")), torch.tensor(train_losses(tmp_path / "one")),
                               rtol=1e-5, atol=1e-5)
    assert read_csv(tmp_path / "two" / "expert_load.csv") == read_csv(tmp_path / "one" / "expert_load.csv")
    m2, m1 = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("two", "one"))
    assert m2["world_size"] == 2 and m2["routing"]["expert_bias"] == m1["routing"]["expert_bias"]
    assert max(abs(x) for x in m2["routing"]["expert_bias"][0]) > 0


def test_grpo_counts_the_real_tokens_not_the_padding(tmp_path):
    """A GRPO step's forwards run over left-padded prompts and responses padded to the longest: the load metrics
    (and the bias update) count the prompt and response tokens only, every one of them once per epoch."""
    m, run = run_task(tmp_path, "grpo", *GRPO, "trainer.max_steps=1", "task.max_new_tokens=12",
                      "task.dump_rollouts=true", "task.num_minibatches=3")
    lines = [json.loads(x) for x in (run / "rollout_batches.jsonl").read_text().splitlines()[1:]]
    real = sum(len(x["prompt_ids"]) + len(x["response_ids"]) for x in lines)
    assert len(lines) == 16 and m["routing"]["tokens"] == real * len(m["routing"]["layers"])
