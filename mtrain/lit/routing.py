"""Routing health in a Lightning run: :class:`RoutingHealth` taps the model's MoE blocks (``RouterStats``), logs the
experts' load every logging step, applies the aux-loss-free bias update after each optimizer step and freezes the
router when asked; afterwards it gives the run's routing results and plots.

Logged (CSV/TensorBoard, at the module's step): ``routing/maxvio`` (mean over MoE layers), ``routing/maxvio_max``
(the worst layer), ``routing/dead_expert_frac``, ``routing/entropy`` (mean per-token entropy of the routing
distribution, nats), ``routing/aux_loss`` (the load-balancing loss pooled over layers, as trained), ``routing/z_loss``,
and per layer ``routing/layer<L>/{maxvio,dead_expert_frac,entropy}``; tokens per expert, per layer, go to
``<run dir>/expert_load.csv`` (one line per layer and logging step). Each value is over the window since the last
logging step, summed over the ranks: one device-to-host copy per logging step.

Plots: ``expert_load.png`` (layer x expert heat map of each expert's load / the layer's mean load, over the last
window; for ``task=eval`` the whole evaluation) and ``maxvio_curve.png`` (MaxVio of each layer and their mean against
the step).
"""

from __future__ import annotations

import csv
import dataclasses
import logging
from pathlib import Path
from typing import Any, Callable, Optional

import lightning as L
import torch

from mtrain.models.balance import BalanceSettings, freeze_routers
from mtrain.models.loss import IGNORE_INDEX
from mtrain.models.router_stats import RouterStats
from mtrain.plots import figure

log = logging.getLogger("mtrain")

SUMMARY = ("maxvio", "maxvio_max", "dead_expert_frac", "entropy", "aux_loss", "z_loss")
PER_LAYER = ("maxvio", "dead_expert_frac", "entropy")


def real_tokens(batch: Any) -> Optional[torch.Tensor]:
    """[B, S] bool: the positions of a batch up to each row's last target (right padding excluded); None for a batch
    without targets."""
    if not isinstance(batch, dict) or "targets" not in batch:
        return None
    has_target = (batch["targets"] != IGNORE_INDEX).int()
    return has_target.flip(-1).cummax(-1).values.flip(-1).bool()


class RoutingHealth(L.Callback):
    """``mode="train"`` (``task=sft``/``grpo``): counts the training forwards, logs every ``every`` optimizer steps
    at ``step_of(trainer, module)`` (default: the step's 0-based index, Lightning's ``step`` of ``train/loss``),
    updates the bias before each optimizer step (``settings.bias_update``) and freezes the routers at setup (``settings.freeze_router``). ``mode="eval"``
    (``task=validate``): counts every validation forward, logs every ``every`` batches."""

    def __init__(self, stats: RouterStats, run_dir: Optional[Path] = None, *, every: int = 10, mode: str = "train",
                 step_of: Optional[Callable[[L.Trainer, L.LightningModule], int]] = None):
        if mode not in ("train", "eval"):
            raise ValueError(f"RoutingHealth mode={mode!r}: use train or eval")
        self.stats, self.run_dir, self.every, self.mode = stats, run_dir, max(1, every), mode
        # Lightning logs an optimizer step's metrics at its 0-based index: the routing rows share that CSV row
        self.step_of = step_of or (lambda trainer, module: trainer.global_step - 1)
        self.history: list[dict] = []  # one summary per logged window (plain numbers: saved in the checkpoint)
        self.last: Optional[dict] = None  # the last window's metrics (train) / the whole evaluation's (eval)
        self._eval_sum: Optional[torch.Tensor] = None
        self._seen_step = -1
        self._batches = 0

    @classmethod
    def of(cls, settings: BalanceSettings, run_dir: Optional[Path] = None, **kw) -> "RoutingHealth":
        """The callback for ``model.routing`` settings (``mode="eval"``: every forward counts, not only those with
        gradient)."""
        return cls(RouterStats(settings, grad_only=kw.get("mode", "train") == "train"), run_dir, **kw)

    @property
    def settings(self) -> BalanceSettings:
        return self.stats.settings

    @property
    def losses(self) -> Optional[RouterStats]:
        """What ``MoELitModule(router_losses=...)`` takes: the stats when a routing loss is on, else None."""
        return self.stats if self.settings.has_loss else None

    # -- training ------------------------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.mode == "train" and stage == "fit" and self.settings.freeze_router:
            n = freeze_routers(pl_module.model)  # before the optimizer is built: the router is not in it
            log.info("model.routing.freeze_router: %d router tensors get no updates", n)

    def on_train_start(self, trainer, pl_module) -> None:
        if self.mode == "train":
            self.stats.attach(pl_module.model)
            self._seen_step = trainer.global_step
            if hasattr(pl_module, "expect_tokens"):  # a module whose batches are not token tensors (GRPO)
                pl_module.expect_tokens = self.stats.expect

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.mode == "train":
            self.stats.expect(real_tokens(batch))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.mode == "train" and self.settings.bias_update:
            self.stats.update_bias(self.settings.bias_update_rate, self._sum_over_ranks(trainer))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.mode != "train" or trainer.global_step == self._seen_step:
            return
        self._seen_step = trainer.global_step
        if trainer.global_step % self.every == 0:
            self.flush(trainer, self.step_of(trainer, pl_module))

    def on_train_end(self, trainer, pl_module) -> None:
        if self.mode == "train":
            if not self.history or self.history[-1]["step"] != self.step_of(trainer, pl_module):
                self.flush(trainer, self.step_of(trainer, pl_module))
            self.stats.detach()

    # -- evaluation ----------------------------------------------------------------------------------------------
    def on_validation_start(self, trainer, pl_module) -> None:
        if self.mode == "eval":
            self.stats.attach(pl_module.model)
            self._batches = 0

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if self.mode == "eval":
            self.stats.expect(real_tokens(batch))

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self.mode == "eval":
            self._batches += 1
            if self._batches % self.every == 0:
                self.flush(trainer, self._batches)

    def on_validation_end(self, trainer, pl_module) -> None:
        if self.mode == "eval":
            self.flush(trainer, self._batches)
            if self._eval_sum is not None:
                self.last = self.stats.window_metrics(self._eval_sum)
            self.stats.detach()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self.stats.detach()

    # -- one window ----------------------------------------------------------------------------------------------
    @staticmethod
    def _sum_over_ranks(trainer: L.Trainer):
        if trainer.world_size <= 1:
            return None
        return lambda t: trainer.strategy.reduce(t, reduce_op="sum")

    def flush(self, trainer: L.Trainer, step: int) -> Optional[dict]:
        """Read the window (every rank takes part in the sum), record and log it."""
        packed = self.stats.packed()
        if packed is None:
            return None
        reduce = self._sum_over_ranks(trainer)
        packed = (reduce(packed) if reduce is not None else packed).cpu()  # the one host copy of the window
        m = self.stats.window_metrics(packed)
        if m is None:
            return None
        if self.mode == "eval":
            self._eval_sum = packed if self._eval_sum is None else self._eval_sum + packed
        self.last = m
        self.history.append({"step": int(step), **{k: m[k] for k in SUMMARY},
                             "layers": {k: m["layers"][k] for k in ("maxvio",)}})
        if trainer.is_global_zero:
            logged = {f"routing/{k}": m[k] for k in SUMMARY}
            for i, layer in enumerate(self.stats.layers):
                logged |= {f"routing/layer{layer}/{k}": m["layers"][k][i] for k in PER_LAYER}
            for logger in trainer.loggers:
                logger.log_metrics(logged, step=int(step))
            self._write_loads(int(step), m)
        return m

    def _write_loads(self, step: int, m: dict) -> None:
        if self.run_dir is None:
            return
        path = Path(self.run_dir) / "expert_load.csv"
        new = not path.exists()
        E = len(m["tokens_per_expert"][0])
        with path.open("a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(["step", "layer", *[f"expert{e}" for e in range(E)]])
            for layer, row in zip(self.stats.layers, m["tokens_per_expert"]):
                w.writerow([step, layer, *row])

    # -- checkpoint: the curve of a resumed run starts at its first step -------------------------------------------
    def state_dict(self) -> dict:
        return {"history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self.history = list(state.get("history") or [])

    # -- results -------------------------------------------------------------------------------------------------
    def results(self) -> dict:
        """For ``metrics.json``: the final window's summary as top-level scalars (``routing_maxvio``, ...: the sweep
        summary shows them) and, under ``routing``, its per-layer values, tokens per expert and the biases."""
        if self.last is None:
            return {}
        m = self.last
        out: dict[str, Any] = {f"routing_{k}": m[k] for k in SUMMARY}
        detail = {"window": "last logging window" if self.mode == "train" else "whole evaluation",
                  "layers": self.stats.layers, "tokens": m["tokens"], "per_layer": m["layers"],
                  "tokens_per_expert": m["tokens_per_expert"], "settings": dataclasses.asdict(self.settings)}
        biases = [b.gate.expert_bias for b in self.stats.blocks]
        if any(b is not None for b in biases):
            detail["expert_bias"] = [None if b is None else [round(float(x), 6) for x in b.float().cpu()]
                                     for b in biases]
        out["routing"] = detail
        return out

    def plot(self, out_dir: Path, title: str = "") -> dict[str, str]:
        """``expert_load.png`` and ``maxvio_curve.png`` in ``out_dir``; returns their paths by name."""
        if self.last is None:
            return {}
        files = {"expert_load": str(plot_expert_load(self.last, self.stats.layers, Path(out_dir) / "expert_load.png",
                                                     title, self.mode))}
        if self.history:
            xlabel = "optimizer step" if self.mode == "train" else "eval batch"
            files["maxvio_curve"] = str(plot_maxvio(self.history, self.stats.layers,
                                                    Path(out_dir) / "maxvio_curve.png", title, xlabel))
        if self.run_dir is not None and (Path(self.run_dir) / "expert_load.csv").is_file():
            files["expert_load_csv"] = str(Path(self.run_dir) / "expert_load.csv")
        return files


def plot_expert_load(m: dict, layers: list[int], path: Path, title: str = "", mode: str = "train") -> Path:
    """Heat map, layer x expert, of each expert's token-slots / the layer's mean (1 = its fair share)."""
    from matplotlib.colors import TwoSlopeNorm

    load = torch.tensor(m["tokens_per_expert"], dtype=torch.float64)
    share = (load / load.mean(-1, keepdim=True).clamp(min=1e-12)).numpy()
    L, E = share.shape
    with figure(path, size=(max(5.0, 0.35 * E + 2.5), max(2.5, 0.35 * L + 1.8))) as ax:
        im = ax.imshow(share, aspect="auto", cmap="coolwarm",
                       norm=TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=max(2.0, float(share.max()))))
        ax.set_yticks(range(L), [str(i) for i in layers])
        if E <= 32:
            ax.set_xticks(range(E))
        ax.set_xlabel("expert")
        ax.set_ylabel("MoE layer")
        ax.figure.colorbar(im, ax=ax, label="load / mean load")
        window = "last logging window" if mode == "train" else "whole evaluation"
        ax.set_title(f"{title + ': ' if title else ''}expert load, {window} (MaxVio {m['maxvio']:.3f})", fontsize=9)
    return path


def plot_maxvio(history: list[dict], layers: list[int], path: Path, title: str = "", xlabel: str = "step") -> Path:
    steps = [h["step"] for h in history]
    with figure(path, size=(7, 4)) as ax:
        for i, layer in enumerate(layers):
            ax.plot(steps, [h["layers"]["maxvio"][i] for h in history], lw=0.8, alpha=0.6, label=f"layer {layer}")
        ax.plot(steps, [h["maxvio"] for h in history], color="black", lw=1.8, label="mean over layers")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("MaxVio = (max load - mean) / mean")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        if title:
            ax.set_title(title, fontsize=9)
    return path
