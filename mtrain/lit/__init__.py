"""Lightning glue: the LightningModule around an mtrain model, callbacks/loggers, analytic MoE FLOPs, evaluation."""

from mtrain.lit.callbacks import LossCurve, make_checkpoint, make_loggers, plot_loss_curve
from mtrain.lit.evaluate import LogprobWriter, greedy_accuracy
from mtrain.lit.flops import active_params_per_token, peak_tflops, train_flops_per_token
from mtrain.lit.module import MoELitModule, WarmupCosine, param_groups, token_logprobs
from mtrain.lit.setup import Setup, build_setup, build_trainer, configure_backends, tokenizer_source, uses_cuda

__all__ = [
    "LogprobWriter", "LossCurve", "MoELitModule", "Setup", "WarmupCosine", "active_params_per_token",
    "build_setup", "build_trainer", "configure_backends", "greedy_accuracy", "make_checkpoint", "make_loggers",
    "param_groups", "peak_tflops", "plot_loss_curve", "token_logprobs", "tokenizer_source", "train_flops_per_token",
    "uses_cuda",
]
