"""The reference rollout: batched autoregressive decoding in the trainer's own shapes.

:func:`generate` left-pads prompts of different lengths and decodes one token per step by re-running the trainer's
full forward over the whole fixed-width buffer, future slots masked: every step computes in exactly the shapes of the
trainer's forward over the finished sequences (:func:`recompute`), so its logprobs and experts are the trainer's bit
for bit, with the standard (cuBLAS, SDPA) kernels. It costs a full forward per token (O(length^2)): it is the oracle
the fast engine (:mod:`mtrain.models.decoding`) is checked against, not what users run.
It returns the tokens, the logprob of each sampled token under the model's (temperature-1) distribution, the top-k
experts every MoE layer chose at the position that produced each token, and those chosen at the prompt's positions:
together the routing an engine reports for R3 replay (:meth:`Generation.replay_ids`). Tokens are drawn by
:func:`mtrain.models.ops.sample` with noise keyed by (seed, row, step), as the fast engine draws them.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from . import ops
from .logprobs import gather_logprobs, token_logprobs
from .loss import IGNORE_INDEX
from .routing import RoutingTrace
from .transformer import MoECausalLM


@dataclass
class Generation:
    tokens: torch.Tensor  # [B, N] generated ids (pad_id after a row finished)
    logprobs: torch.Tensor  # [B, N] fp32 logprob of each generated token while decoding (0 after finishing)
    routing: torch.Tensor  # [B, N, moe_layers, k] experts chosen at the position that produced each token (-1 after
    # a row's end)
    lengths: torch.Tensor  # [B] generated tokens per row, the stop token included
    prompts: list[list[int]]
    width: int  # prompt + generation buffer width the rollout computed in (the trainer recompute reuses it)
    # [B, longest - 1, moe_layers, k] experts at the prompt positions before the last one (buffer layout: prompts
    # left-padded to the longest; -1 at padding). None: not recorded (no R3 replay possible).
    prompt_routing: torch.Tensor | None = None
    temperature: float = 1.0  # the temperature ``logprobs`` were taken at (the trainer's recompute uses it too)

    def select(self, rows: torch.Tensor | list[int]) -> "Generation":
        """The rows ``rows`` (e.g. a mini-batch), in the same buffer width."""
        idx = torch.as_tensor(rows, device=self.tokens.device)
        pr = self.prompt_routing[idx] if self.prompt_routing is not None else None
        return Generation(self.tokens[idx], self.logprobs[idx], self.routing[idx], self.lengths[idx],
                          [self.prompts[int(i)] for i in idx], self.width, pr, self.temperature)

    def to(self, device) -> "Generation":
        pr = self.prompt_routing.to(device) if self.prompt_routing is not None else None
        return Generation(self.tokens.to(device), self.logprobs.to(device), self.routing.to(device),
                          self.lengths.to(device), self.prompts, self.width, pr, self.temperature)

    @property
    def first(self) -> int:
        """Buffer index of the first generated token (= the longest prompt's length)."""
        return max(len(p) for p in self.prompts)

    def buffer_routing(self) -> torch.Tensor:
        """The rollout's expert ids over the whole buffer ``[B, width, moe_layers, k]``: prompt positions, then the
        positions that produced each generated token; positions the rollout never routed (the last token, padding
        after it) hold -1: a replay lets the trainer's routers choose there (their outputs reach no logprob)."""
        if self.prompt_routing is None:
            raise ValueError("this rollout has no prompt routing; it cannot be replayed (R3)")
        B, N, L, k = self.routing.shape
        fill = self.routing.new_full((B, self.width - (self.first - 1) - N, L, k), -1)
        return torch.cat([self.prompt_routing, self.routing, fill], dim=1)

    def replay_ids(self, moe_layers: Sequence[int]) -> dict[int, torch.Tensor]:
        """``{layer index: [B, width, k]}``: the rollout's routing as a :class:`RoutingTrace` replays it (R3)."""
        full = self.buffer_routing()
        if full.shape[2] != len(moe_layers):
            raise ValueError(f"the rollout routed {full.shape[2]} MoE layers; the model has {len(moe_layers)}")
        return {layer: full[:, :, i].long().contiguous() for i, layer in enumerate(moe_layers)}

    def buffer(self, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """The buffer [B, width] (prompts left-padded, generated tokens after them): its ids, and which positions
        hold a real token (the prompt's and the generated ones, up to and including the stop token)."""
        N, longest = self.tokens.shape[1], self.first
        ids, real = left_padded(self.prompts, self.width, pad_id, self.tokens.device)
        ids[:, longest : longest + N] = self.tokens
        real[:, longest : longest + N] = self.mask
        return ids, real

    def real_tokens(self) -> torch.Tensor:
        """[B, width] bool: the buffer's real tokens (:meth:`buffer`), False at padding."""
        return self.buffer()[1]

    @property
    def mask(self) -> torch.Tensor:
        """[B, N] bool: a generated token (up to and including the stop token)."""
        n = self.tokens.shape[1]
        return torch.arange(n, device=self.lengths.device)[None, :] < self.lengths[:, None]


def eager():
    """Run compiled layers eagerly inside (generation has changing shapes and a Python KV cache; a recompute that
    must match an eager rollout bit for bit must use the same kernels)."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()


@torch.no_grad()
def generate(
    model: MoECausalLM,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_ids: Sequence[int] = (),
    pad_id: int = 0,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = 0,
    logits_hook: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Generation:
    """Decode ``max_new_tokens`` (or until every row emitted one of ``eos_ids``) after each prompt.
    ``logits_hook``: applied to each step's fp32 logits [B, V] before sampling and the reported logprob."""
    with eager():
        return _generate(model, prompts, max_new_tokens, eos_ids, pad_id, temperature, top_p, seed or 0, logits_hook)


def _generate(model, prompts, max_new_tokens, eos_ids, pad_id, temperature, top_p, seed,
              logits_hook=None) -> Generation:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt and no empty prompt")
    device = model.output_weight.device
    B, longest = len(prompts), max(len(p) for p in prompts)
    total = longest + max_new_tokens
    ids, real = left_padded(prompts, total, pad_id, device)
    eos = torch.tensor(list(eos_ids) or [-1], device=device)
    out_tokens = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    out_logprobs = torch.zeros((B, max_new_tokens), dtype=torch.float32, device=device)
    out_routing: list[torch.Tensor] = []
    prompt_routing = None
    lengths = torch.zeros(B, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    rows = torch.arange(B, device=device)
    end = longest
    for step in range(max_new_tokens):
        positions, mask = positions_and_mask(real, total)  # the whole buffer every step, future slots masked
        trace = RoutingTrace()
        h = model.hidden_states(ids, position_ids=positions, attn_mask=mask, trace=trace)
        logits = (h[:, end - 1] @ model.output_weight.t()).float()
        if logits_hook is not None:
            logits = logits_hook(logits)
        token = ops.sample(logits, temperature, top_p, ops.noise_keys(seed, rows, torch.full_like(rows, step)))
        token = torch.where(done, torch.full_like(token, pad_id), token)
        out_tokens[:, step] = token
        out_logprobs[:, step] = torch.where(done, 0.0, gather_logprobs(logits, token))
        if trace.ids:  # routing at real tokens only; -1 where a row holds padding (no engine routes those)
            stacked = trace.stacked()
            out_routing.append(stacked[:, end - 1].masked_fill(done[:, None, None], -1))  # [B, layers, k]
            if step == 0:  # every prompt position (the same values later steps recompute)
                prompt_routing = stacked[:, : longest - 1].masked_fill(~real[:, : longest - 1, None, None], -1)
        lengths += (~done).long()
        ids[:, end] = token
        real[:, end] = ~done
        done |= torch.isin(token, eos)
        end += 1
        if bool(done.all()):
            break
    n = int(lengths.max())
    routing_t = (
        torch.stack(out_routing, dim=1)[:, :n]
        if out_routing
        else torch.zeros((B, n, 0, 0), dtype=torch.long, device=device)
    )
    return Generation(out_tokens[:, :n], out_logprobs[:, :n], routing_t, lengths, [list(p) for p in prompts], total,
                      prompt_routing)


def left_padded(prompts: Sequence[Sequence[int]], total: int, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [B, total] with each prompt right-aligned at the longest prompt's end, and the mask of real tokens."""
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), total), pad_id, dtype=torch.long, device=device)
    real = torch.zeros((len(prompts), total), dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p) : longest] = torch.tensor(list(p), device=device)
        real[i, longest - len(p) : longest] = True
    return ids, real


def positions_and_mask(real: torch.Tensor, q_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For the last ``q_len`` of ``real.shape[1]`` tokens: RoPE positions counting real tokens only, and the bool
    attention mask [B, 1, q_len, kv] (causal, real keys only; a pad query attends to itself so no row is empty)."""
    kv = real.shape[1]
    positions = (real.long().cumsum(-1) - 1).clamp(min=0)[:, kv - q_len :]
    q_pos = torch.arange(kv - q_len, kv, device=real.device)[:, None]
    k_pos = torch.arange(kv, device=real.device)[None, :]
    mask = ((k_pos <= q_pos)[None] & real[:, None, :]) | (k_pos == q_pos)[None]
    return positions, mask[:, None]


def rollout_layout(gen: Generation, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """The rollout's buffer as one trainer forward sees it: ids [B, width] (prompts left-padded, generated tokens
    after them), RoPE positions, the attention mask, and the index of the first generated slot."""
    ids, real = gen.buffer(pad_id)
    positions, mask = positions_and_mask(real, gen.width)
    return ids, positions, mask, gen.first


def recompute(model: MoECausalLM, gen: Generation, pad_id: int = 0, *, trace: RoutingTrace | None = None,
              with_entropy: bool = False, rollout_shapes: bool = True):
    """The trainer's side of a rollout: one full forward over prompt + generated tokens in the rollout's layout and
    buffer width, returning the logprob [B, N] of every generated token (0 after a row's end) at the temperature
    the rollout's logprobs were taken at (``gen.temperature``: logits / T; 1 = unscaled). Differentiable.
    The output projection runs as the rollout ran it, one ``[B, hidden] @ [hidden, V]`` GEMM per generated position:
    a GEMM's rows can depend on its shape, so the same shapes give the same numbers. ``rollout_shapes=False``: one
    chunked projection over all generated positions instead (faster under autograd: what the policy updates use,
    where float-level differences do not matter). ``trace`` records (or replays)
    routing over the whole buffer; the rows that produced generated token j are at position ``first - 1 + j``.
    With ``with_entropy``: (logprobs, entropy of each position's distribution)."""
    ids, positions, mask, first = rollout_layout(gen, pad_id)
    N = gen.tokens.shape[1]
    T = gen.temperature
    if not rollout_shapes:
        targets = torch.full_like(ids, IGNORE_INDEX)
        targets[:, first - 1 : first - 1 + N] = torch.where(gen.mask, gen.tokens, IGNORE_INDEX)
        out = token_logprobs(model, ids, targets, position_ids=positions, attn_mask=mask, trace=trace,
                             with_entropy=with_entropy, temperature=T)
        producing = slice(first - 1, first - 1 + N)
        return tuple(x[:, producing] for x in out) if with_entropy else out[:, producing]
    h = model.hidden_states(ids, position_ids=positions, attn_mask=mask, trace=trace)
    w = model.output_weight
    targets = torch.where(gen.mask, gen.tokens, -1)
    lps, ents = [], []
    for j in range(N):
        logits = h[:, first - 1 + j] @ w.t()
        if T != 1.0:
            logits = logits.float() / T
        lps.append(gather_logprobs(logits, targets[:, j]))
        if with_entropy:
            logp = logits.float().log_softmax(-1)
            ents.append(torch.where(gen.mask[:, j], -(logp.exp() * logp).sum(-1), 0.0))
    lp = torch.stack(lps, dim=1)
    return (lp, torch.stack(ents, dim=1)) if with_entropy else lp
