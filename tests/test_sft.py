"""task=sft and the Lightning module: resume, precision plugin vs the gate policy, loss masking, schedule, FLOPs,
the task end to end (JSONL + own tokenizer -> HF export -> eval), and the default CLI job."""

from __future__ import annotations

import json
import math

import lightning as L
import pytest
import torch

from mtrain.job import Job
from mtrain.models import PrecisionPolicy
import torch.nn.functional as F

from conftest import compose_cfg, run_cli
from mtrain.config import prepare_run
from mtrain.data import DataConfig, DataError, build_datamodule, save_tokenizer, synthetic_tokenizer
from mtrain.job import build_setup
from mtrain.lit.checkpoint_io import wait_for_checkpoints
from mtrain.lit import MoELitModule, OptimSettings, WarmupCosine, build_trainer, param_groups
from mtrain.models.flops import active_params_per_token
from mtrain.models import build_model, from_pretrained
from mtrain.models import Glm4MoeConfig, Qwen3MoeConfig
from mtrain.models.moe import Router

TINY_DATA = ["data.num_train=64", "data.num_val=16", "data.batch_size=16"]
TINY_TRAINER = ["trainer.val_check_interval=2", "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false"]


def prepared(*overrides: str, run_dir=None) -> Job:
    """The prepared job of ``python -m mtrain <overrides>``, with tiny synthetic data unless data= is given."""
    data = [] if any(o.startswith("data=") for o in overrides) else TINY_DATA
    return Job.prepare(compose_cfg([*data, *TINY_TRAINER, *overrides]), run_dir)


class Probe(L.Callback):
    """Records the trainer's state at the start and end of fit."""

    def __init__(self):
        self.start = self.end = None

    @staticmethod
    def snapshot(trainer, module):
        opt, sched = trainer.optimizers[0], trainer.lr_scheduler_configs[0].scheduler
        state = {
            k: {n: (v.clone() if torch.is_tensor(v) else v) for n, v in s.items()}
            for k, s in opt.state_dict()["state"].items()
        }
        weights = {k: v.detach().clone() for k, v in module.model.state_dict().items()}
        return {"step": trainer.global_step, "opt": state, "sched": sched.last_epoch, "lr": sched.get_last_lr()[0],
                "weights": weights}

    def on_train_start(self, trainer, module):
        self.start = self.snapshot(trainer, module)

    def on_train_end(self, trainer, module):
        self.end = self.snapshot(trainer, module)


def _fit(job, run_dir, max_steps, ckpt_path=None):
    L.seed_everything(0, verbose=False)
    s = build_setup(job)
    lit = MoELitModule(s.model, OptimSettings(lr=1e-2, warmup_steps=2, weight_decay=0.1))
    probe = Probe()
    trainer = build_trainer(job.cfg, run_dir, callbacks=[probe], max_steps=max_steps)
    trainer.fit(lit, datamodule=s.datamodule, ckpt_path=ckpt_path)
    wait_for_checkpoints()  # the last write runs in the background (a job's finish() waits for it)
    return trainer, probe


def test_fit_checkpoint_resume_continues_with_same_optimizer_state(tmp_path):
    job = prepared("model=qwen3_moe")
    # 3 steps with validation every 2: ModelCheckpoint alone would leave last.ckpt at step 2
    _, first = _fit(job, tmp_path / "a", max_steps=3)
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    assert last.is_file() and list((tmp_path / "a" / "checkpoints").glob("best-*.ckpt"))
    saved = torch.load(last, map_location="cpu", weights_only=False)
    assert saved["global_step"] == 3 and first.end["step"] == 3

    trainer, second = _fit(job, tmp_path / "b", max_steps=6, ckpt_path=str(last))
    assert second.start["step"] == 3  # continues at the right step ...
    assert second.start["sched"] == first.end["sched"] == 3 and second.start["lr"] == pytest.approx(first.end["lr"])
    assert second.start["opt"].keys() == first.end["opt"].keys() and first.end["opt"]
    for k, state in first.end["opt"].items():  # ... with the same optimizer state (moments and step counts)
        for name, value in state.items():
            got = second.start["opt"][k][name]
            if torch.is_tensor(value):
                assert torch.equal(got, value), (k, name)
            else:
                assert got == value
    for k, w in first.end["weights"].items():
        assert torch.equal(second.start["weights"][k], w), k
    assert trainer.global_step == 6
    steps = {float(s["step"]) for s in second.end["opt"].values()}
    assert steps == {6.0}


@pytest.mark.parametrize("model", ["glm4_moe", "qwen3_moe"])
@pytest.mark.parametrize("built_as", ["float32", "bfloat16"])
def test_bf16_true_keeps_fp32_gate_inside_training_step(tmp_path, monkeypatch, model, built_as):
    """Lightning's bf16-true plugin casts the whole module; the fp32 gate must stay fp32 and its logits be fp32,
    while experts (and everything else) run in bf16."""
    job = prepared(f"model={model}", "rl=on", f"model.dtype={built_as}", "trainer.precision=bf16-true")
    seen = []
    logits_dtypes = []
    orig = Router.logits

    def logits_spy(self, x):
        out = orig(self, x)
        logits_dtypes.append(out.dtype)
        return out

    monkeypatch.setattr(Router, "logits", logits_spy)

    class Checked(MoELitModule):
        def training_step(self, batch, i):
            moe = [layer.mlp for layer in self.model.model.layers if layer.is_moe]
            assert moe
            seen.append({
                "gate": {m.gate.weight.dtype for m in moe},
                "experts": {m.experts.gate_up_proj.dtype for m in moe},
                "embed": self.model.model.embed_tokens.weight.dtype,
                "default": torch.get_default_dtype(),
            })
            logits_dtypes.clear()
            loss = super().training_step(batch, i)
            seen[-1]["logits"] = set(logits_dtypes)
            return loss

    s = build_setup(job)
    lit = Checked(s.model, OptimSettings(lr=1e-3, warmup_steps=0))
    trainer = build_trainer(job.cfg, tmp_path, max_steps=2, checkpoint=False, limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(lit, datamodule=s.datamodule)
    assert len(seen) == 2
    for step in seen:
        assert step["gate"] == {torch.float32}
        assert step["logits"] == {torch.float32}
        assert step["experts"] == {torch.bfloat16} and step["embed"] == torch.bfloat16
        assert step["default"] == torch.bfloat16  # really inside the plugin's forward context
    if model == "glm4_moe":
        bias = {layer.mlp.gate.e_score_correction_bias.dtype for layer in s.model.model.layers if layer.is_moe}
        assert bias == {torch.float32}


def test_bf16_true_without_fp32_gate_runs_the_gate_in_bf16(tmp_path, monkeypatch):
    job = prepared("model=qwen3_moe", "rl=off", "trainer.precision=bf16-true")
    dtypes = []
    orig = Router.logits
    monkeypatch.setattr(Router, "logits", lambda self, x: dtypes.append((self.weight.dtype, (o := orig(self, x)).dtype)) or o)
    s = build_setup(job)
    lit = MoELitModule(s.model, OptimSettings(lr=1e-3, warmup_steps=0))
    trainer = build_trainer(job.cfg, tmp_path, max_steps=1, checkpoint=False, limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(lit, datamodule=s.datamodule)
    assert dtypes and set(dtypes) == {(torch.bfloat16, torch.bfloat16)}


def test_gate_policy_check_catches_a_cast_gate():
    model = build_model(Glm4MoeConfig(), policy=PrecisionPolicy(True))
    lit = MoELitModule(model)
    lit.check_gate_policy()
    moe = next(layer.mlp for layer in model.model.layers if layer.is_moe)
    moe.gate.weight.data = moe.gate.weight.data.bfloat16()
    with pytest.raises(RuntimeError, match="gate"):
        lit.check_gate_policy()


def test_fp32_gate_on_cuda_turns_tf32_off():
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision())
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        PrecisionPolicy(moe_gate_fp32=False).apply_backends(cuda=True)
        assert torch.backends.cuda.matmul.allow_tf32
        PrecisionPolicy(moe_gate_fp32=True).apply_backends(cuda=True)
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert torch.get_float32_matmul_precision() == "highest"
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
        torch.set_float32_matmul_precision(saved[2])


def test_response_only_loss_masking_reaches_the_loss():
    dm = build_datamodule(DataConfig(num_train=32, num_val=0, batch_size=32))
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    ids, targets = batch["input_ids"], batch["targets"]
    # the scored targets of each row are exactly its response and eos; no prompt token is a target
    for i in range(ids.shape[0]):
        row = ids[i].tolist()
        scored = targets[i][targets[i] != -100].tolist()
        text = dm.tokenizer.decode(row, skip_special_tokens=True)
        prompt, response = text.split("=")[0] + "=", text.split("=")[1]
        assert scored == dm.tokenizer.encode(response, add_special_tokens=False).ids + [dm.eos_id], text
        assert response == str(eval(prompt[:-1]))  # noqa: S307 (digits and '+')
    model = build_model(Qwen3MoeConfig(), seed=1)
    lit = MoELitModule(model)
    got = lit.model.loss(ids, targets)  # what training_step returns
    logits = model(ids).float()
    by_hand = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    assert got.item() == pytest.approx(by_hand.item(), rel=1e-5)
    everything = ids.roll(-1, dims=1)  # the same rows scored on every next token, prompt included
    unmasked = F.cross_entropy(logits[:, :-1].flatten(0, 1), everything[:, :-1].flatten())
    assert abs(unmasked.item() - got.item()) > 1e-3


def test_warmup_cosine_schedule_and_decay_groups():
    f = WarmupCosine(warmup=10, total=110, min_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1)
    assert f(500) == pytest.approx(0.1)
    model = build_model(Glm4MoeConfig(attention_bias=True))
    decay, keep = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    kept = {names[id(p)] for p in keep["params"]}
    assert keep["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1
    assert kept and all(n.endswith(("norm.weight", ".bias")) for n in kept)
    assert any("q_proj.bias" in n for n in kept) and any("layernorm" in n for n in kept)
    assert len(decay["params"]) + len(keep["params"]) == len(list(model.parameters()))


@pytest.mark.parametrize("cfg", [Qwen3MoeConfig(), Glm4MoeConfig(n_shared_experts=2, attention_bias=True)])
def test_active_params_count_only_the_routed_top_k(cfg):
    model = build_model(cfg)
    matmul = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n and "norm" not in n)
    h, inter = cfg.hidden_size, cfg.moe_intermediate_size
    inactive = sum((cfg.num_experts - cfg.num_experts_per_tok) * 3 * h * inter for i in model.moe_layers)
    assert active_params_per_token(cfg) == matmul - inactive


def test_sft_task_on_own_jsonl_then_eval_of_the_export(tmp_path, monkeypatch):
    """The "own data" path: JSONL prompt/response + a tokenizer.json, random init -> HF export with the tokenizer;
    then task=eval on that export, its tokenizer found in the checkpoint folder."""
    from mtrain.tasks import eval as eval_task
    from mtrain.tasks import sft

    tok_dir = tmp_path / "tok"
    save_tokenizer(synthetic_tokenizer(), tok_dir)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"reverse:{i:03d}=", "response": f"{i:03d}"[::-1]}) + "\n"
                            for i in range(60)))
    monkeypatch.chdir(tmp_path)
    cfg = prepared("data=jsonl", f"data.train_path={data}", f"data.tokenizer_path={tok_dir}", "data.val_fraction=0.2",
                   "data.max_length=16", "data.batch_size=8", "trainer.max_steps=4", "task.accuracy=true",
                   "model=qwen3_moe")
    m = sft.run(cfg)
    assert m["steps"] == 4 and math.isfinite(m["val_loss"]) and m["accuracy_examples"] == 12
    assert 0.0 <= m["val_accuracy"] <= 1.0 and "val_accuracy_before" in m
    out = tmp_path / "metrics.json"
    assert json.loads(out.read_text())["steps"] == 4
    export = tmp_path / "hf_model"
    assert (export / "tokenizer.json").is_file() and (export / "tokenizer_config.json").is_file()
    assert (tmp_path / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "csv" / "metrics.csv").is_file() and (tmp_path / "checkpoints" / "last.ckpt").is_file()

    ev_dir = tmp_path / "eval"
    ev_dir.mkdir()
    monkeypatch.chdir(ev_dir)
    ecfg = prepared("task=eval", "model=qwen3_moe", f"model.checkpoint={export}", "data=jsonl",
                    f"data.train_path={data}", "data.val_fraction=0.2", "data.max_length=16", "data.batch_size=8")
    e = eval_task.run(ecfg)
    assert e["split"] == "val" and e["loss"] == pytest.approx(m["val_loss"], rel=1e-6)
    assert "accuracy" not in e  # JSONL: accuracy only with task.accuracy=true


def test_cli_default_job(tmp_path):
    """``python -m mtrain`` (the default task=sft), shortened: metrics.json, loss_curve.png, checkpoints, and an
    hf_model/ that from_pretrained loads."""
    run = tmp_path / "run"
    r = run_cli(["trainer.max_steps=30", "task.warmup_steps=5", "trainer.val_check_interval=15", "data.num_train=960", "data.num_val=64",
                 f"hydra.run.dir={run}"], cwd=tmp_path, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((run / "metrics.json").read_text())
    assert m["task"] == "sft" and m["steps"] == 30
    for key in ("val_loss", "val_accuracy", "val_accuracy_before", "train_loss_first", "train_loss_last", "tokens_per_s"):
        assert m[key] is not None, key
    assert m["train_loss_last"] < m["train_loss_first"] - 1.0  # loss falls
    assert (run / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert (run / "config_resolved.yaml").is_file() and (run / "csv" / "metrics.csv").is_file()
    assert (run / "checkpoints" / "last.ckpt").is_file()
    model = from_pretrained(run / "hf_model")
    assert model.config.model_type == "glm4_moe" and (run / "hf_model" / "tokenizer.json").is_file()
    assert f"run dir      {run}" in r.stdout and "metrics.json" in r.stdout
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("experiment,model", [("qwen3_30b_a3b", "qwen3_moe"), ("glm45_air", "glm4_moe")])
def test_real_checkpoint_experiments_compose_for_gpu(tmp_path, experiment, model):
    from mtrain.config import ConfigError

    job = Job.prepare(compose_cfg([f"experiment={experiment}"]))
    cfg, plan = job.cfg, job.plan
    assert cfg.model.name == model and cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "bf16-true"
    assert cfg.model.dtype == "bfloat16" and plan.moe_gate_fp32 and cfg.task.name == "sft" and cfg.data.name == "jsonl"
    with pytest.raises(DataError, match=r"needs a file: set data.train_path="):
        build_setup(job)
    data = tmp_path / "x.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\n')
    job = Job.prepare(compose_cfg([f"experiment={experiment}", f"data.train_path={data}"]))
    with pytest.raises(DataError, match="model.checkpoint"):  # no checkpoint: no tokenizer for the JSONL data
        build_setup(job)
    cfg, _ = prepare_run(compose_cfg([f"experiment={experiment}", f"model.checkpoint={tmp_path}",
                                      f"data.train_path={data}"]))
    assert cfg.model.checkpoint == str(tmp_path) and cfg.task.lr == pytest.approx(1e-5)


def test_trainer_gpu_composes_bf16_true_with_compile():
    cfg, plan = prepare_run(compose_cfg(["trainer=gpu", "rl=on"]))
    assert cfg.trainer.precision == "bf16-true" and cfg.model.dtype == "bfloat16" and cfg.task.compile is True
    assert plan.moe_gate_fp32 and cfg.precision.dtype.source == "trainer.precision=bf16-true"


@pytest.mark.gpu
@pytest.mark.parametrize("model", ["glm4_moe", "qwen3_moe"])
def test_gpu_sft_then_eval_bf16_true(tmp_path, monkeypatch, model):
    """On CUDA: bf16-true, compiled layers, grouped-GEMM experts, fused AdamW; fp32 gate kept; then eval the export."""
    from mtrain.tasks import eval as eval_task
    from mtrain.tasks import sft

    monkeypatch.chdir(tmp_path)
    cfg = prepared("trainer=gpu", "rl=on", f"model={model}", "trainer.max_steps=40", "trainer.val_check_interval=20",
                   "data.num_train=2048", "data.num_val=64", "data.batch_size=64", "data=synthetic")
    m = sft.run(cfg)
    assert m["steps"] == 40 and m["dtype"] == "bfloat16" and m["train_loss_last"] < m["train_loss_first"]
    assert m["tokens_per_s"] > 0 and m.get("mfu") is not None
    export = tmp_path / "hf_model"
    assert json.loads((export / "mtrain_precision.json").read_text())["gate_dtype"] == "float32"
    (tmp_path / "ev").mkdir()
    monkeypatch.chdir(tmp_path / "ev")
    e = eval_task.run(prepared("task=eval", "trainer=gpu", "rl=on", f"model={model}", f"model.checkpoint={export}",
                               "data.num_train=2048", "data.num_val=64", "data.batch_size=64", "data=synthetic"))
    assert e["loss"] == pytest.approx(m["val_loss"], rel=2e-2) and e["tokens_per_s"] > 0


def test_a_slow_checkpoint_write_does_not_lower_the_reported_training_throughput(tmp_path, monkeypatch):
    """tokens_per_s (and MFU) count training steps only: checkpoint writes and validation are timed apart, in
    metrics.json's seconds breakdown."""
    import time as _time

    from mtrain.tasks import sft

    real, writes = L.Trainer.save_checkpoint, []

    def slow_disk(self, *a, **kw):
        writes.append(self.global_step)
        _time.sleep(0.3)
        return real(self, *a, **kw)

    monkeypatch.setattr(L.Trainer, "save_checkpoint", slow_disk)
    m = sft.run(prepared("trainer.max_steps=20", "task.checkpoint_every_n_steps=4", "task.accuracy=false",
                         "task.export=false", run_dir=tmp_path))
    s = m["seconds"]
    assert len(writes) >= 5  # last.ckpt at steps 4, 8, 12, 16, 20, and the best by val/loss
    assert s["checkpoint"] >= 0.3 * len(writes)  # every write timed as a checkpoint write...
    assert m["train_seconds"] == s["train_steps"] < s["fit"] - 0.3 * len(writes)  # ...and none as training
    assert m["tokens_per_s"] == pytest.approx(m["train_tokens"] / m["train_seconds"])
    assert s["fit"] >= s["train_steps"] + s["checkpoint"] + s["validation"] - 1e-6
    assert set(s) >= {"startup", "fit", "train_steps", "validation", "checkpoint", "final_validation"}
    # the job's end, from the last step on: the final validation and the wait for the last write are part of it
    assert s["final_validation"] + s["checkpoint_wait_at_end"] <= s["after_last_step"] < m["wall_s"] - s["startup"]
    # the disk's pace beside what was written: every write counted, at the size it left on disk
    last = next(tmp_path.rglob("last.ckpt")).stat().st_size
    assert m["checkpoint_written_gb"] * 1e9 == pytest.approx(len(writes) * last, rel=0.01)
    assert m["checkpoint_write_mb_per_s"] == pytest.approx(m["checkpoint_written_gb"] * 1e3 / s["checkpoint_writes"],
                                                           rel=0.01)


def test_clipping_folded_into_the_fused_adamw_step_equals_clip_then_step():
    """The GPU path clips by setting the fused AdamW's grad_scale (no separate scaling pass): the same update as
    clip_grad_norm_ + step, both when the norm is above the limit and below it."""
    from mtrain.lit.clipping import clip_in_fused_step, is_fused
    from mtrain.lit.optim import param_groups
    from mtrain.models import Qwen3MoeConfig, build_model

    cfg = Qwen3MoeConfig()
    ids = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    targets = torch.roll(ids, -1, dims=1)
    for max_norm in (0.05, 1e6):  # clipping, and not
        models = [build_model(cfg, seed=0) for _ in range(2)]
        opts = [torch.optim.AdamW(param_groups(m, 0.1), lr=1e-2, fused=True) for m in models]  # fused runs on CPU
        assert all(is_fused(o) for o in opts)
        for _ in range(3):
            for m, o in zip(models, opts):
                m.loss(ids, targets).backward()
            ref = torch.nn.utils.clip_grad_norm_(models[0].parameters(), max_norm)
            ours = clip_in_fused_step(opts[1], models[1].parameters(), max_norm)
            torch.testing.assert_close(ours, ref)
            assert (ref > max_norm) == (max_norm < 1)  # the small limit really clips
            for o in opts:
                o.step()
                o.zero_grad(set_to_none=True)
        for a, b in zip(models[0].parameters(), models[1].parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_checkpoints_false_writes_no_checkpoint_and_the_profiler_reports_the_loop(tmp_path, monkeypatch):
    """task.checkpoints=false (throughput runs, sweep jobs nobody resumes): the fit saves nothing, not even at the end.
    trainer.profiler=simple: the host seconds of each loop action in the run dir's fit-profile.txt."""
    from mtrain.tasks import sft

    saves = []
    real = L.Trainer.save_checkpoint
    monkeypatch.setattr(L.Trainer, "save_checkpoint", lambda self, *a, **kw: saves.append(1) or real(self, *a, **kw))
    m = sft.run(prepared("trainer.max_steps=4", "task.checkpoint_every_n_steps=2", "task.checkpoints=false",
                         "task.accuracy=false", "task.export=false", "trainer.profiler=simple", run_dir=tmp_path))
    assert m["steps"] == 4 and saves == []
    assert not (tmp_path / "checkpoints").exists() and m["files"]["checkpoints"] is None
    report = (tmp_path / "fit-profile.txt").read_text()
    assert "MoELitModule.optimizer_step" in report and "run_training_batch" in report


def test_training_logs_no_python_numbers(tmp_path, monkeypatch):
    """Lightning makes a logged Python number a tensor on the module's device (a blocking copy: a GPU sync a step);
    what the training step and its batch end log every step must already be tensors, the numbers on the host."""
    from mtrain.tasks import sft

    logged = []
    real = L.LightningModule.log

    def log(self, name, value, *a, **kw):
        if self.trainer.training:
            logged.append((name, type(value).__name__, getattr(value, "device", None)))
        return real(self, name, value, *a, **kw)

    monkeypatch.setattr(L.LightningModule, "log", log)
    sft.run(prepared("trainer.max_steps=12", "trainer.log_every_n_steps=4", "task.accuracy=false", "task.export=false",
                     "task.checkpoints=false", run_dir=tmp_path))
    assert {n for n, _, _ in logged} >= {"train/loss", "lr", "train/tokens_per_s"}
    assert all(t == "Tensor" for _, t, _ in logged), sorted(set(logged))
    assert all(d.type == "cpu" for n, _, d in logged if n != "train/loss")


def test_the_progress_bar_reads_the_metrics_only_every_logging_interval(tmp_path, monkeypatch):
    """The bar (on by default) shows the loss: reading a GPU loss is a device sync, so it reads the metrics on the
    steps of the logging interval (where the loop syncs anyway), not every step; the step count moves every step."""
    from mtrain.lit.progress import StepProgressBar
    from mtrain.tasks import sft

    reads, shown = [], []
    real_postfix, real_end = StepProgressBar._postfix, StepProgressBar.on_train_batch_end

    def postfix(self, trainer):
        reads.append(trainer.global_step)
        return real_postfix(self, trainer)

    def batch_end(self, trainer, *a, **kw):
        real_end(self, trainer, *a, **kw)
        shown.append(self._bar.n)

    monkeypatch.setattr(StepProgressBar, "_postfix", postfix)
    monkeypatch.setattr(StepProgressBar, "on_train_batch_end", batch_end)
    sft.run(prepared("trainer.max_steps=12", "trainer.log_every_n_steps=4", "trainer.enable_progress_bar=true",
                     "task.accuracy=false", "task.export=false", "task.checkpoints=false", run_dir=tmp_path))
    assert shown == list(range(1, 13))
    assert reads == [4, 8, 12, 12]  # the interval's steps, and once at the end of the fit
