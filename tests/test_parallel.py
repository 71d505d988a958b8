"""FSDP2 on CPU (gloo, 2 processes under torchrun): loss curve vs one process, sharded save -> resume, the fp32 gate
inside the sharded step, per-rank sharded loading, streamed HF export; the SLURM launcher config; the -m guard.

One torchrun run of this file (``__main__`` below) does all the 2-process work and writes what it saw to JSON; the
tests compare that with the single-process reference computed here. Keeps the suite fast: one process-group start.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mtrain.models import save_pretrained
from mtrain.models import PrecisionPolicy

from conftest import LIT, train_losses

REPO_ROOT = Path(__file__).resolve().parent.parent
STEPS, BATCH, SEQ, LR = 6, 4, 16, 1e-2


def tiny_cfg():
    from mtrain.models import Glm4MoeConfig

    # odd vocab and 6 experts over 2 ranks: uneven dim-0 shards, 3 experts per rank; 1 dense + 2 MoE layers
    return Glm4MoeConfig(
        vocab_size=67, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, moe_intermediate_size=16, n_routed_experts=6, num_experts_per_tok=2,
        n_shared_experts=1, first_k_dense_replace=1,
    )


def batches():
    """STEPS global batches of counting sequences (next = previous + 1 mod V) from random starts: learnable."""
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(STEPS):
        ids = (torch.randint(0, 67, (BATCH, 1), generator=g) + torch.arange(SEQ)).remainder(67)
        targets = torch.full_like(ids, -100)
        targets[:, :-1] = ids[:, 1:]
        out.append((ids, targets))
    return out


def probe_ids():
    return torch.arange(2 * 12).remainder(67).view(2, 12)


# ---------------------------------------------------------------------------------------------------------------
# the 2-process worker (run by torchrun)
# ---------------------------------------------------------------------------------------------------------------


def _gate_probe(model):
    """Record, inside the sharded forward, each router's weight (pre-hook: after FSDP's all-gather) and logits dtype."""
    seen = []
    for layer in model.model.layers:
        if not layer.is_moe:
            continue
        router = layer.mlp.gate
        router.register_forward_pre_hook(
            lambda m, args: seen.append(("weight", type(m.weight).__name__, str(m.weight.dtype)))
        )
        orig = router.logits

        def logits(x, orig=orig):
            out = orig(x)
            seen.append(("logits", str(x.dtype), str(out.dtype)))
            return out

        router.logits = logits
    return seen


def train_steps(model, optimizer, batches, *, device="cpu", grad_clip=None) -> list[float]:
    """The reference data-parallel loop: each rank takes its contiguous rows of every global batch; FSDP averages
    gradients, so with equal tokens per rank a step equals the one-process step on the whole batch. Returns the
    global mean loss of each step."""
    import torch.distributed as dist

    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    losses = []
    model.train()
    for ids, targets in batches:
        n = ids.shape[0] // world
        loss = model.loss(ids[rank * n : (rank + 1) * n].to(device), targets[rank * n : (rank + 1) * n].to(device))
        loss.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        mean = loss.detach().float().clone()
        if dist.is_initialized():
            dist.all_reduce(mean)
            mean /= world
        losses.append(mean.item())
    return losses


def _worker(out_dir: Path, ckpt: Path) -> None:
    import torch.distributed as dist

    from mtrain.models import build_model, from_pretrained
    from mtrain.parallel import apply_fsdp, build_sharded, dp_mesh, export_hf, init_distributed, init_sharded
    from mtrain.parallel.loading import local_region

    device = init_distributed()
    mesh = dp_mesh("cpu")
    rank = dist.get_rank()
    cfg = tiny_cfg()
    res: dict = {}

    # 1. the gate inside the sharded step, bf16 mixed precision (fp32 master weights, bf16 compute)
    data = batches()
    for name, moe_gate_fp32, own_unit in (("fp32", True, True), ("model_dtype", False, False),
                                          ("no_own_unit", True, False)):
        model = build_model(cfg, device="meta", policy=PrecisionPolicy(moe_gate_fp32), init=False)
        apply_fsdp(model, mesh, param_dtype=torch.bfloat16, reduce_dtype=torch.float32, moe_gate_fp32=own_unit)
        model.to_empty(device=device)
        init_sharded(model, seed=0)
        seen = _gate_probe(model)
        train_steps(model, torch.optim.AdamW(model.parameters(), lr=LR), data[:1], device=device)
        res[f"gate_{name}"] = sorted(set(map(tuple, seen)))
        res[f"gate_{name}_master"] = str(model.model.layers[1].mlp.gate.weight.dtype)

    # 2. random init sharded == init_weights unsharded, slice by slice
    sharded, _ = build_sharded(cfg, mesh=mesh, device=device, policy=PrecisionPolicy(True), seed=0)
    full = build_model(cfg, policy=PrecisionPolicy(True), seed=0)
    res["init_max_diff"] = _max_slice_diff(sharded, full, local_region)

    # 3. sharded loading: each rank reads its slices only, equal to the non-sharded from_pretrained
    model, stats = build_sharded(checkpoint=ckpt, mesh=mesh, device=device, policy=PrecisionPolicy(True), gate_mismatch="error")
    ref = from_pretrained(ckpt, policy=PrecisionPolicy(True))  # test-only oracle
    res["load_max_diff"] = _max_slice_diff(model, ref, local_region)
    res["gate_dtype_loaded"] = str(model.model.layers[1].mlp.gate.weight.dtype)
    local_bytes = sum(local_region(t)[0].numel() * 4 for t in list(model.parameters()) + list(model.buffers()))
    per_rank = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, {"bytes_read": stats.bytes_read, "bytes_total": stats.bytes_total,
                                      "tensors_read": stats.tensors_read, "local_bytes": local_bytes})
    res["load_stats"] = per_rank
    del ref

    # 4. train from the checkpoint (sharded save/resume is Lightning's: test_lightning_resumes_...)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    res["losses"] = train_steps(model, opt, data, device=device, grad_clip=1.0)
    with torch.no_grad():
        logits = model(probe_ids()).float()
    if rank == 0:
        torch.save(logits, out_dir / "logits.pt")

    # 4b. the same training with each layer's weights kept gathered from its forward to its backward
    #     (trainer.fsdp_reshard_after_forward=false): the same losses; after a forward the layers hold full weights
    from torch.distributed.tensor import DTensor

    kept, _ = build_sharded(checkpoint=ckpt, mesh=mesh, device=device, policy=PrecisionPolicy(True),
                            reshard_after_forward=False)
    res["kept_losses"] = train_steps(kept, torch.optim.AdamW(kept.parameters(), lr=LR), data, device=device,
                                     grad_clip=1.0)
    for name, m in (("kept", kept), ("resharded", model)):
        with torch.no_grad():
            m.loss(*(t.to(device) for t in data[0]))
        res[f"{name}_layers_gathered_after_forward"] = [
            not isinstance(layer.self_attn.q_proj.weight, DTensor) for layer in m.model.layers]
        m.reshard()
    del kept

    # 5. streamed export of the trained sharded model: as stored (fp32) and in bf16 (gate stays fp32)
    export_hf(model, out_dir / "export", max_shard_size="24KB")
    export_hf(model, out_dir / "export_bf16", max_shard_size="24KB", dtype=torch.bfloat16)

    # 6. clipping folded into the fused AdamW step on sharded gradients == clip_grad_norm_ + step on the whole model
    res["fused_clip"] = _fused_clip_check(cfg, mesh, device)

    if rank == 0:
        (out_dir / "results.json").write_text(json.dumps(res, indent=1))
    dist.barrier()
    dist.destroy_process_group()


def _fused_clip_check(cfg, mesh, device) -> dict:
    """One step of the sharded model with mtrain's clip-in-fused-step against clip_grad_norm_ + fused AdamW on an
    unsharded copy with the same weights and the whole batch. eps=1 makes the update depend on the clip coefficient
    (Adam without eps would undo any gradient scale)."""
    from mtrain.lit.clipping import clip_in_fused_step
    from mtrain.models import build_model
    from mtrain.parallel import apply_fsdp

    ids, targets = batches()[0]
    sharded, full = (build_model(cfg, policy=PrecisionPolicy(True), seed=3) for _ in range(2))
    apply_fsdp(sharded, mesh)
    kw = dict(lr=0.1, eps=1.0, fused=True)
    opt, ref_opt = torch.optim.AdamW(sharded.parameters(), **kw), torch.optim.AdamW(full.parameters(), **kw)
    train_steps(sharded, _NoStep(), [(ids, targets)], device=device)  # gradients only (FSDP averages over ranks)
    full.loss(ids, targets).backward()
    out = {}
    for name, max_norm in (("clips", 0.05), ("no_clip", 1e6)):
        ref_norm = torch.nn.utils.clip_grad_norm_(full.parameters(), max_norm)
        norm = clip_in_fused_step(opt, sharded.parameters(), max_norm)
        out[f"{name}_norm"], out[f"{name}_ref_norm"] = norm.item(), ref_norm.item()
        if name == "clips":
            opt.step()
            ref_opt.step()
            ref = dict(full.named_parameters())
            out["max_diff"] = max((p.full_tensor() - ref[n]).abs().max().item() for n, p in sharded.named_parameters())
            out["max_update"] = max((p.full_tensor() - q).abs().max().item() for (n, p), q in zip(
                sharded.named_parameters(), build_model(cfg, policy=PrecisionPolicy(True), seed=3).parameters()))
    return out


class _NoStep:
    """An optimizer that keeps the gradients (train_steps' step and zero_grad do nothing)."""

    def step(self):
        pass

    def zero_grad(self, set_to_none=True):
        pass


def _max_slice_diff(sharded, full, local_region) -> float:
    """Max |local shard - matching slice of the unsharded model|, over every parameter and buffer, all ranks."""
    import torch.distributed as dist

    ref = dict(full.named_parameters()) | dict(full.named_buffers())
    worst = 0.0
    for name, t in list(sharded.named_parameters()) + list(sharded.named_buffers()):
        local, offset, shape = local_region(t)
        want = ref[name].detach()[tuple(slice(o, o + n) for o, n in zip(offset, shape))]
        assert want.dtype == local.dtype, (name, want.dtype, local.dtype)
        if local.numel():
            worst = max(worst, (local.float() - want.float()).abs().max().item())
    box = torch.tensor([worst])
    dist.all_reduce(box, op=dist.ReduceOp.MAX)
    return box.item()


# ---------------------------------------------------------------------------------------------------------------
# the tests
# ---------------------------------------------------------------------------------------------------------------


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("FD_ENABLE_RL", "HYDRA_FULL_ERROR")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    return env


def torchrun(args: list[str], cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node 2 ARGS`` (standalone: a free rendezvous port on localhost)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory):
    """A checkpoint, the 2-process torchrun of this file on it, and the 1-process reference run."""
    from mtrain.models import build_model, from_pretrained

    root = tmp_path_factory.mktemp("fsdp")
    cfg = tiny_cfg()
    # shards of ~24 KB: the experts of one layer are spread over several files
    save_pretrained(build_model(cfg, policy=PrecisionPolicy(True), seed=7), root / "ckpt", max_shard_size="24KB")
    r = torchrun([__file__, str(root), str(root / "ckpt")], cwd=root)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    res = json.loads((root / "results.json").read_text())

    torch.manual_seed(0)
    ref = from_pretrained(root / "ckpt", policy=PrecisionPolicy(True))
    ref_losses = train_steps(ref, torch.optim.AdamW(ref.parameters(), lr=LR), batches(), grad_clip=1.0)
    return root, res, ref_losses, ref


def test_two_process_loss_curve_matches_one_process(sharded_run):
    _, res, ref_losses, _ = sharded_run
    assert len(res["losses"]) == STEPS
    assert res["losses"][-1] < res["losses"][0] - 0.05  # it learns
    torch.testing.assert_close(torch.tensor(res["losses"]), torch.tensor(ref_losses), rtol=2e-5, atol=2e-5)


def test_weights_kept_gathered_after_forward_train_the_same(sharded_run):
    """trainer.fsdp_reshard_after_forward=false: each layer keeps its gathered weights from its forward to its
    backward (one all-gather a step, not two) and training is unchanged."""
    _, res, _, _ = sharded_run
    assert res["kept_losses"] == pytest.approx(res["losses"], rel=1e-6)
    assert all(res["kept_layers_gathered_after_forward"])
    # the default frees every layer but the last (its backward comes right away) after the forward
    n = len(res["kept_layers_gathered_after_forward"])
    assert res["resharded_layers_gathered_after_forward"] == [False] * (n - 1) + [True]


def test_gate_dtype_inside_sharded_step(sharded_run):
    """Under a bf16 MixedPrecisionPolicy the gate's own unit keeps its weight (and so its logits) in fp32; without
    the policy the gate runs in bf16 like the layer. The third case is the bug the own unit prevents: the layer's
    unit casts an fp32-policy gate to bf16 before the router sees it."""
    _, res, _, _ = sharded_run
    assert res["gate_fp32"] == [["logits", "torch.bfloat16", "torch.float32"], ["weight", "Parameter", "torch.float32"]]
    assert res["gate_model_dtype"] == [
        ["logits", "torch.bfloat16", "torch.bfloat16"], ["weight", "Parameter", "torch.bfloat16"]
    ]
    assert ["weight", "Parameter", "torch.bfloat16"] in res["gate_no_own_unit"]
    # master weights stay fp32 (sharded) in all cases
    assert res["gate_fp32_master"] == res["gate_model_dtype_master"] == "torch.float32"


def test_sharded_init_and_loading_equal_unsharded(sharded_run):
    _, res, _, _ = sharded_run
    assert res["init_max_diff"] == 0.0
    assert res["load_max_diff"] == 0.0
    assert res["gate_dtype_loaded"] == "torch.float32"


def test_each_rank_reads_only_its_slices(sharded_run):
    _, res, _, _ = sharded_run
    stats = res["load_stats"]
    total = stats[0]["bytes_total"]
    read = [s["bytes_read"] for s in stats]
    # a rank reads exactly the bytes of its local shards (fp32 checkpoint, fp32 model): about half of the checkpoint
    # (the small e_score_correction_bias buffers are not sharded: both ranks read them)
    assert read == [s["local_bytes"] for s in stats]
    assert all(0.4 * total < b < 0.6 * total for b in read), (read, total)
    assert sum(read) < 1.05 * total


def test_streamed_export_loads_and_gives_same_logits(sharded_run):
    from safetensors import safe_open

    from mtrain.models import from_pretrained

    root, _, _, ref = sharded_run
    export = root / "export"
    assert (export / "model.safetensors.index.json").is_file()  # several shards, flushed as they filled
    loaded = from_pretrained(export, policy=PrecisionPolicy(True), gate_mismatch="error")
    with torch.no_grad():
        torch.testing.assert_close(loaded(probe_ids()).float(), torch.load(root / "logits.pt"), rtol=0, atol=1e-6)
        # and the trained weights match the single-process run's
        for (n, a), (_, b) in zip(loaded.state_dict().items(), ref.state_dict().items()):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=n)
    bf16 = from_pretrained(root / "export_bf16", policy=PrecisionPolicy(True), gate_mismatch="error")
    assert bf16.model.embed_tokens.weight.dtype == torch.bfloat16
    assert bf16.model.layers[1].mlp.gate.weight.dtype == torch.float32
    files = list((root / "export_bf16").glob("*.safetensors"))
    dtypes = {}
    for f in files:
        with safe_open(f, "pt") as h:
            dtypes |= {k: h.get_slice(k).get_dtype() for k in h.keys()}
    assert dtypes["model.layers.1.mlp.gate.weight"] == "F32"
    assert dtypes["model.layers.1.mlp.gate.e_score_correction_bias"] == "F32"
    assert dtypes["model.layers.1.mlp.experts.0.gate_proj.weight"] == "BF16"
    assert json.loads((root / "export_bf16" / "mtrain_precision.json").read_text())["gate_dtype"] == "float32"


def test_clipping_in_the_fused_step_on_sharded_gradients_equals_clip_then_step(sharded_run):
    """Under trainer=fsdp on the GPU the clip coefficient rides in the fused AdamW step (mtrain.lit.clipping): the
    total norm of the 2 ranks' gradient shards is the whole model's, and the update equals clip_grad_norm_ + step."""
    r = sharded_run[1]["fused_clip"]
    for name in ("clips", "no_clip"):
        assert r[f"{name}_norm"] == pytest.approx(r[f"{name}_ref_norm"], rel=1e-5)
    assert r["clips_norm"] > 0.05 * 10  # the limit really clips
    assert r["max_diff"] < 1e-6 < 1e-3 < r["max_update"]


def test_multirun_with_several_devices_is_refused_without_torchrun(monkeypatch):
    from mtrain.parallel import ParallelError
    from mtrain.parallel.launch import check_launch

    for var in ("TORCHELASTIC_RUN_ID", "LOCAL_RANK", "SLURM_NTASKS", "SLURM_JOB_NAME", "GROUP_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert check_launch(1, multirun=True) is None
    assert check_launch(2, multirun=False) is None  # a single run: Lightning's own launcher is fine
    with pytest.raises(ParallelError, match="torchrun --nproc_per_node 2 -m mtrain.*hydra/launcher=slurm"):
        check_launch(2, multirun=True)
    with pytest.raises(ParallelError):
        check_launch(1, num_nodes=2, multirun=True)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    for k, v in {"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1",
                 "GROUP_RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    assert check_launch(2, multirun=True) == "torchrun"


# ---------------------------------------------------------------------------------------------------------------
# trainer=fsdp through Lightning (ModelParallelStrategy) and the CLI
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lightning_runs(tmp_path_factory, fsdp_one_process):
    """`torchrun -m mtrain trainer=fsdp trainer.devices=2` for 6 steps; the same on one process (devices=1, the
    whole global batch); 2 processes resuming the first run's step-3 distributed checkpoint; 1 process resuming it."""
    root = tmp_path_factory.mktemp("lit")
    two = torchrun(["-m", "mtrain", *LIT, "trainer.devices=2", "data.batch_size=4", f"hydra.run.dir={root / 'two'}"],
                   cwd=root)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-6000:]
    ckpt = next((root / "two" / "checkpoints").glob("best-step000003-*.ckpt"))
    resumed = torchrun(["-m", "mtrain", *LIT, "trainer.devices=2", "data.batch_size=4", f"task.ckpt_path={ckpt}",
                        f"hydra.run.dir={root / 'resumed'}"], cwd=root)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-6000:]
    # the same checkpoint on ONE process: distributed checkpoints re-shard on load
    one_more = subprocess.run([sys.executable, "-m", "mtrain", *LIT, "trainer.devices=1", "data.batch_size=8",
                               f"task.ckpt_path={ckpt}", f"hydra.run.dir={root / 'resharded'}"], cwd=root, env=_env(),
                              capture_output=True, text=True, timeout=180)
    assert one_more.returncode == 0, one_more.stdout[-3000:] + one_more.stderr[-6000:]
    return root, two, ckpt, fsdp_one_process


def test_lightning_two_processes_match_one_process(lightning_runs):
    root, two, _, one = lightning_runs
    # torchrun's two processes are the two ranks: Lightning launched nothing itself
    log = two.stdout + two.stderr
    assert log.count("MEMBER: 1/2") >= 1 and log.count("MEMBER: 2/2") >= 1 and "MEMBER: 3/" not in log
    a, b = train_losses(root / "two"), train_losses(one)
    assert len(a) == len(b) == 6 and a[-1] < a[0] - 0.3
    # variable answer lengths: equal only because each rank's loss is weighted by its share of the target tokens
    torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-5, atol=1e-5)
    metrics = json.loads((root / "two" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["moe_gate_fp32"] is True and metrics["steps"] == 6


def test_lightning_resumes_distributed_checkpoint_identically(lightning_runs):
    root, _, ckpt, _ = lightning_runs
    assert ckpt.is_dir() and sorted(p.name for p in ckpt.iterdir()) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt", "mtrain_manifest.json"]  # signed by mtrain
    full, resumed = train_losses(root / "two"), train_losses(root / "resumed")
    assert len(resumed) == 3
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(full[3:]), rtol=1e-6, atol=1e-6)
    resharded = train_losses(root / "resharded")  # 2 ranks saved it, 1 process resumed it
    torch.testing.assert_close(torch.tensor(resharded), torch.tensor(full[3:]), rtol=1e-5, atol=1e-5)
    assert json.loads((root / "resumed" / "metrics.json").read_text())["resumed_from"] == str(ckpt)


def test_lightning_streamed_export(lightning_runs):
    from mtrain.models import from_pretrained

    root, _, _, one = lightning_runs
    ids = torch.arange(20).remainder(16).view(2, 10)
    logits = {}
    for run, path in (("two", root / "two"), ("resumed", root / "resumed"), ("one", one)):
        model = from_pretrained(path / "hf_model", policy=PrecisionPolicy(True), gate_mismatch="error")
        assert model.gate_dtype() == torch.float32 and (path / "hf_model" / "tokenizer.json").is_file()
        with torch.no_grad():
            logits[run] = model(ids)
    torch.testing.assert_close(logits["resumed"], logits["two"], rtol=0, atol=1e-6)
    torch.testing.assert_close(logits["one"], logits["two"], rtol=1e-4, atol=1e-4)


def test_cli_refuses_multirun_with_several_devices_outside_torchrun(tmp_path):
    from conftest import run_cli

    r = run_cli(["-m", "task=sft", "trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2",
                 f"hydra.sweep.dir={tmp_path / 'sweep'}"], cwd=tmp_path)
    assert r.returncode != 0
    assert "under -m without torchrun or SLURM" in r.stderr and "hydra/launcher=slurm" in r.stderr
    assert "Initializing distributed" not in r.stdout + r.stderr  # refused before Lightning started anything


def test_slurm_launcher_config(compose_config):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = compose_config(["hydra/launcher=slurm", "trainer=fsdp", "trainer.devices=4", "trainer.num_nodes=2",
                          "hydra.launcher.partition=gpu"], return_hydra_config=True)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"].endswith("submitit_launcher.SlurmLauncher")
    assert (launcher["tasks_per_node"], launcher["gpus_per_node"], launcher["nodes"]) == (4, 4, 2)
    assert instantiate(cfg.hydra.launcher).params["tasks_per_node"] == 4


def test_trainer_fsdp_config_builds_model_parallel_strategy(compose_config):
    from lightning.pytorch.strategies import ModelParallelStrategy
    from omegaconf import OmegaConf

    from mtrain.config import prepare_run
    from mtrain.parallel.lightning import plan_for, trainer_kwargs

    cfg, _ = prepare_run(compose_config(["trainer=fsdp", "trainer.devices=1", "rl=on"]))
    assert cfg.model.dtype == "float32"  # bf16-mixed: fp32 master weights, bf16 compute by FSDP's policy
    kw = trainer_kwargs(OmegaConf.to_container(cfg.trainer, resolve=True), multirun=False)
    assert isinstance(kw["strategy"], ModelParallelStrategy) and kw["precision"] == "32-true"
    plan = plan_for(cfg.trainer.precision, cfg.model.checkpoint, cfg.seed)
    assert (plan.param_dtype, plan.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert plan.reshard_after_forward


def test_fsdp_reshard_after_forward_reaches_the_plan_not_lightning(compose_config, tmp_path):
    from omegaconf import OmegaConf

    from mtrain.job.build import build_setup
    from mtrain.job.run import Job
    from mtrain.parallel.lightning import trainer_kwargs

    job = Job.prepare(compose_config(["trainer=fsdp", "trainer.devices=1", "trainer.accelerator=cpu", "rl=on",
                                      "trainer.fsdp_reshard_after_forward=false"]), tmp_path)
    assert build_setup(job).fsdp.reshard_after_forward is False  # what configure_model's apply_fsdp gets
    kw = trainer_kwargs(OmegaConf.to_container(job.cfg.trainer, resolve=True), multirun=False)
    assert "fsdp_reshard_after_forward" not in kw  # not a lightning.Trainer argument


if __name__ == "__main__":  # torchrun --nproc_per_node 2 tests/test_parallel.py OUT_DIR CHECKPOINT
    sys.path.insert(0, str(REPO_ROOT))
    _worker(Path(sys.argv[1]), Path(sys.argv[2]))
