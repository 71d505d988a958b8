"""``MoELitModule``: an mtrain model as a LightningModule (causal-LM loss, AdamW + warm-up/cosine, throughput/MFU).

The model is built BEFORE the module (``mtrain.job.model_from_config``), in the run's dtype with the run's
gate policy, and handed in. Lightning's ``bf16-true`` plugin then casts the whole module with ``.to(bfloat16)``;
``Router._apply`` keeps an fp32 gate fp32 through that, and :meth:`on_fit_start` checks it (building the model inside
``configure_model`` would be wrong: the plugin sets the default dtype to bf16 there, so the gate would be BORN bf16).

Logged: ``train/loss`` (each step), ``lr``, ``train/tokens_per_s`` and ``train/mfu`` (every ``log_every_n_steps``
optimizer steps, over that window, validation time excluded; MFU only with a peak FLOP/s), ``val/loss`` and
``val/ppl`` (token-weighted over the whole val set, summed across ranks).
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Optional

import lightning as L
import torch

from mtrain.lit.clipping import clip_in_fused_step, is_fused, no_clip
from mtrain.lit.optim import OptimSettings, adamw_with_schedule
from mtrain.models import MoECausalLM, token_logprobs
from mtrain.models.flops import eval_flops_per_token, train_flops_per_token
from mtrain.models.loss import IGNORE_INDEX
from mtrain.models.router_stats import RouterStats
from mtrain.parallel import root_unsharded
from mtrain.parallel.lightning import FSDPPlan


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def on_host(value: float) -> torch.Tensor:
    """A Python number to ``self.log`` as a CPU tensor. Lightning turns a number into a tensor on the module's device,
    a blocking host-to-device copy, and keeps the metric on the device of the value it gets. Logged every step (the
    learning rate, the throughput), that was a GPU sync a step: each copy waited for the GPU's queue to drain
    (``benchmarks/RESULTS.md``, the ``fsdp_cli`` rows with logging)."""
    return torch.tensor(float(value))


class MoELitModule(L.LightningModule):
    """Fine-tunes / evaluates ``model`` (an ``MoECausalLM``).

    ``optim``: AdamW and its schedule (``task.lr``, ...). ``peak_tflops``: per-device peak for MFU (0 = don't log
    MFU). ``logprob_sink``: if set, validation computes per-token logprobs and calls ``logprob_sink(batch, logprobs)``
    for every batch (``task=eval``).
    ``router_losses``: adds the balancing / z losses of each batch's routing (``model.routing``) to the trained loss;
    ``train/loss`` stays the language-model loss.
    """

    def __init__(
        self,
        model: MoECausalLM,
        optim: OptimSettings = OptimSettings(),
        *,
        peak_tflops: float = 0.0,
        logprob_sink: Optional[Callable[[dict, torch.Tensor], None]] = None,
        sharding: Optional[FSDPPlan] = None,
        router_losses: Optional[RouterStats] = None,
    ):
        super().__init__()
        self.model = model
        self.sharding = sharding  # trainer=fsdp: shard + fill the meta-device model in configure_model
        self.optim = optim
        self.peak_tflops = float(peak_tflops or 0.0)
        self.logprob_sink = logprob_sink
        self.router_losses = router_losses  # tapped into the model by mtrain.lit.routing.RoutingHealth
        # results, read by the tasks after fit/validate
        self.history: dict[str, list] = {"train": [], "val": []}  # (global step, loss)
        self.last_val: Optional[dict[str, float]] = None
        self.train_tokens = 0
        self.train_flops = 0.0
        self.train_seconds = 0.0
        self._reset_window()
        self._fit_t0: Optional[float] = None
        self.excluded: dict[str, float] = {}  # seconds of fit spent outside training steps, by kind
        self._paused = 0.0  # their sum: left out of every training throughput
        self._steady: Optional[tuple[float, int, float]] = None  # (time, tokens, paused) after the first step
        self.steady_tokens_per_s: Optional[float] = None  # training throughput without the first step (compile)
        self.last_step_at: Optional[float] = None  # perf_counter() when the last training batch ended

    # -- model ---------------------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids)

    def configure_model(self) -> None:
        """``trainer=fsdp`` (``ModelParallelStrategy``): FSDP2 per decoder layer (fp32 gates in their own units),
        then each rank allocates and fills only its shards (``mtrain.parallel``). Idempotent; no-op otherwise."""
        if self.sharding is not None:
            self.sharding.apply(self.model, self.device_mesh["data_parallel"], self.trainer.strategy.root_device)

    def check_gate_policy(self) -> None:
        """The gate precision decided for the run must have survived the precision plugin."""
        self.model.policy.check(self.model)

    def on_fit_start(self) -> None:
        self.check_gate_policy()

    def on_validation_start(self) -> None:
        self.check_gate_policy()

    # -- training ------------------------------------------------------------------------------------------------
    def configure_optimizers(self):
        total = self.trainer.max_steps if self.trainer.max_steps > 0 else int(self.trainer.estimated_stepping_batches)
        return adamw_with_schedule(self.model, self.optim, self.optim.warmup_steps, total)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Clip by norm inside the fused AdamW step when there is one (``mtrain.lit.clipping``: no separate scaling
        pass over the gradients; FSDP's sharded gradients too); Lightning's clipping otherwise (CPU, clip by value)."""
        opt = getattr(optimizer, "optimizer", optimizer)
        if gradient_clip_val and (gradient_clip_algorithm or "norm") == "norm" and is_fused(opt):
            clip_in_fused_step(opt, self.model.parameters(), float(gradient_clip_val))
            return
        no_clip(opt)
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        targets = batch["targets"]
        loss = self.model.loss(batch["input_ids"], targets)
        shown = loss.detach()
        world = self.trainer.world_size
        if world > 1:
            # Data parallel averages gradients over ranks: weight each rank's mean by its share of the global target
            # tokens, so a step is the step of one process on the whole global batch (and the logged loss its mean)
            # whatever the per-rank token counts.
            count = (targets != IGNORE_INDEX).sum().to(loss.dtype)
            sums = self.trainer.strategy.reduce(torch.stack([shown * count, count]), reduce_op="sum")
            total = sums[1].clamp(min=1)
            shown = sums[0] / total
            loss = loss * (count * world / total)
        if self.router_losses is not None:  # load balancing / router z-loss of this batch (mtrain.models.balance)
            extra = self.router_losses.loss(lambda t: self.trainer.strategy.reduce(t, reduce_op="sum"))
            if extra is not None:
                loss = loss + extra
        self.history["train"].append((self.global_step + 1, shown))
        self.log("train/loss", shown, prog_bar=True)
        sched = self.lr_schedulers()
        if sched is not None:
            self.log("lr", on_host(sched.get_last_lr()[0]))
        return loss

    def _reset_window(self) -> None:
        self._win_t0: Optional[float] = None
        self._win_tokens = 0
        self._win_flops = 0.0
        self._win_steps = 0
        self._win_paused = 0.0
        self._last_step = -1
        self._tps: Optional[float] = None
        self._mfu: Optional[float] = None

    def on_train_start(self) -> None:
        self._reset_window()
        self._last_step = self.global_step
        _sync(self.device)
        self._fit_t0 = time.perf_counter()
        self.excluded, self._paused = {}, 0.0

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        if self._win_t0 is None:
            _sync(self.device)
            self._win_t0 = time.perf_counter()

    def on_train_batch_end(self, outputs: Any, batch: dict, batch_idx: int) -> None:
        ids = batch["input_ids"]
        n = ids.numel()
        flops = n * train_flops_per_token(self.model.config, ids.shape[1])
        self.train_tokens += n
        self.train_flops += flops
        self._win_tokens += n
        self._win_flops += flops
        if self.global_step != self._last_step:  # an optimizer step happened in this batch
            self._last_step = self.global_step
            self._win_steps += 1
            if self._steady is None:
                _sync(self.device)
                self._steady = (time.perf_counter(), self.train_tokens, self._paused)
            if self._win_steps >= max(1, self.trainer.log_every_n_steps):
                _sync(self.device)
                dt = time.perf_counter() - self._win_t0 - self._win_paused
                if dt > 0:
                    self._tps = self._win_tokens / dt
                    self._mfu = self._win_flops / dt / (self.peak_tflops * 1e12) if self.peak_tflops > 0 else None
                self._win_t0, self._win_tokens, self._win_flops = None, 0, 0.0
                self._win_steps, self._win_paused = 0, 0.0
        self.last_step_at = time.perf_counter()
        if self._tps is not None:
            self.log("train/tokens_per_s", on_host(self._tps))
            if self._mfu is not None:
                self.log("train/mfu", on_host(self._mfu))

    def exclude(self, kind: str, seconds: float) -> None:
        """``seconds`` of the fit went to ``kind`` (``validation``, ``checkpoint``), not to training steps: recorded
        in :attr:`excluded` and left out of ``train/tokens_per_s``, ``train_seconds`` and MFU."""
        self.excluded[kind] = self.excluded.get(kind, 0.0) + seconds
        self._paused += seconds
        if self._win_t0 is not None:
            self._win_paused += seconds

    def on_train_end(self) -> None:  # after the callbacks' on_train_end: the last checkpoint write is excluded
        _sync(self.device)
        now = time.perf_counter()
        if self._fit_t0 is not None:
            self.train_seconds = now - self._fit_t0 - self._paused
        if self._steady is not None:
            t0, tokens0, paused0 = self._steady
            dt = now - t0 - (self._paused - paused0)
            if dt > 0 and self.train_tokens > tokens0:
                self.steady_tokens_per_s = (self.train_tokens - tokens0) / dt

    # -- validation (also task=eval) -----------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        _sync(self.device)
        self._val_t0 = time.perf_counter()
        self._val_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self._val_count = torch.zeros((), dtype=torch.int64, device=self.device)
        self._val_tokens = 0
        self._val_flops = 0.0
        self._val_first: Optional[tuple[float, int]] = None  # (time, tokens) after the first batch (warm-up, compile)

    def on_validation_batch_end(self, outputs: Any, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._val_first is None:
            _sync(self.device)
            self._val_first = (time.perf_counter(), self._val_tokens)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        ids, targets = batch["input_ids"], batch["targets"]
        count = (targets != IGNORE_INDEX).sum()
        if self.logprob_sink is not None:
            with torch.no_grad(), root_unsharded(self.model):  # token_logprobs reads output_weight outside forward
                lp = token_logprobs(self.model, ids, targets)
            loss_sum = -lp.double().sum()
            self.logprob_sink(batch, lp)
        else:
            loss_sum = self.model.loss(ids, targets).double() * count
        self._val_sum += loss_sum.detach()
        self._val_count += count
        self._val_tokens += ids.numel()
        self._val_flops += ids.numel() * eval_flops_per_token(self.model.config, ids.shape[1])

    def on_validation_epoch_end(self) -> None:
        total = self.trainer.strategy.reduce(self._val_sum, reduce_op="sum")
        count = self.trainer.strategy.reduce(self._val_count, reduce_op="sum")
        _sync(self.device)
        seconds = time.perf_counter() - self._val_t0
        if self.trainer.state.fn == "fit":
            self.exclude("validation", seconds)
        loss = float(total / count.clamp(min=1))
        self.log("val/loss", loss)
        self.log("val/ppl", math.exp(min(loss, 80.0)))
        if self.trainer.sanity_checking:
            return
        stats = {
            "loss": loss,
            "ppl": math.exp(min(loss, 80.0)),
            "target_tokens": int(count),
            "tokens": self._val_tokens,
            "seconds": seconds,
            "tokens_per_s": self._val_tokens / seconds if seconds > 0 else float("nan"),
            "step": self.global_step,
        }
        if self._val_first is not None and self._val_tokens > self._val_first[1]:
            t1, tok1 = self._val_first
            stats["tokens_per_s_steady"] = (self._val_tokens - tok1) / max(time.perf_counter() - t1, 1e-9)
        if self.peak_tflops > 0 and seconds > 0:
            stats["mfu"] = self._val_flops / seconds / (self.peak_tflops * 1e12)
        self.last_val = stats
        if self.trainer.state.fn == "fit":
            self.history["val"].append((self.global_step, loss))

    # -- checkpoint ----------------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """The loss history rides in the checkpoint: a resumed run's curve and ``train_loss_first`` start at step 1."""
        checkpoint["mtrain_history"] = {"train": self.train_losses(),
                                        "val": [(s, float(v)) for s, v in self.history["val"]]}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get("mtrain_history") or {}
        self.history = {k: [(int(s), float(v)) for s, v in saved.get(k, [])] for k in ("train", "val")}

    # -- results -------------------------------------------------------------------------------------------------
    def train_losses(self) -> list[tuple[int, float]]:
        """(global step, loss) of every training batch of this run, as floats."""
        return [(s, float(v)) for s, v in self.history["train"]]
