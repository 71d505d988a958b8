"""Fast generation with a static KV cache, and the exact scoring of a generation through the same path.

:class:`Decoder` generates as inference engines do: every prompt token of every row in one batched prefill (chunked
by tokens), then one token a step for the unfinished rows. State lives in preallocated device tensors (the
:class:`~mtrain.models.cache.StaticCache`, each slot's last token, position, count, stop flag, and the output
buffers); a decode step reads and writes only them, so on CUDA it is captured once per batch-size bucket in a CUDA
graph and replayed. Sampling (:func:`mtrain.models.ops.sample`), the stop check and the routing capture happen inside
the step: the host looks at the GPU every ``sync_every`` steps, to stop when every row is done and to let finished
rows leave the batch (the next bucket holds only the unfinished slots; no KV moves).

Weights are read in place: copying new values into the model's tensors (the engine's weight hand-over) needs no
re-capture.

With ``exact=True`` everything runs under :func:`mtrain.models.ops.invariant`: a token's numbers depend neither on the
batch nor on prefill vs decode. :func:`score` computes a generation's logprobs (and routing) the same way, in one
prefill over whole sequences: with the same weights it returns the rollout's logprobs and experts bit for bit -- the
trainer's old-logprob recompute of the engine's exact mode.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch

from . import ops
from .cache import StaticCache
from .generate import Generation, eager
from .routing import RoutingTrace
from .transformer import MoECausalLM

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 448, 512)
PREFILL_TOKENS = 16384  # tokens per prefill chunk (a chunk's tokens see every earlier chunk's keys)


def _grow(need: int, have: int, step: int) -> int:
    return have if need <= have else max(need, -(-int(have * 1.25) // step) * step)


class Decoder:
    """``Decoder(model).generate(prompts, max_new_tokens=..., temperature=..., top_p=..., seed=...)``.

    ``graphs``: capture decode steps in CUDA graphs (default: on CUDA in bf16/fp16, without a ``logits_hook``).
    ``logits_hook``: applied to each step's fp32 logits [B, V] before sampling and the reported logprob (an engine
    stand-in's noise; eager only)."""

    MAX_STOP_IDS = 8  # stop ids a row is checked against on the device each step

    def __init__(self, model: MoECausalLM, *, exact: bool = False, graphs: bool | None = None, sync_every: int = 8,
                 logits_hook: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.model, self.exact, self.hook = model, exact, logits_hook
        w = model.output_weight
        self.device = w.device
        can_graph = w.is_cuda and logits_hook is None and w.dtype != torch.float32  # fp32 experts loop on the host
        self.graphs_on = can_graph if graphs is None else (graphs and can_graph)
        self.sync_every = sync_every if w.is_cuda else 1
        self.moe = bool(model.moe_layers)
        self.cap = self.width = self.cols = 0
        self.graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self.pool = None

    # -- buffers ------------------------------------------------------------------------------------------------------
    def _ensure(self, rows: int, width: int, cols: int) -> None:
        """Capacity for ``rows`` slots of ``width`` positions and ``cols`` generated tokens (re-allocates, and drops
        the captured graphs, only when a call needs more)."""
        if rows <= self.cap and width <= self.width and cols <= self.cols:
            return
        self.cap, self.width = _grow(rows, self.cap, 8), _grow(width, self.width, 128)
        self.cols = _grow(cols, self.cols, 64)
        self.graphs.clear()
        self.pool = None  # a fresh memory pool for the graphs of the new buffers
        m, dev, C = self.model, self.device, self.cap + 1  # + the scratch slot (bucket padding; never live)
        L, k = len(m.moe_layers), m.config.num_experts_per_tok
        self.cache = StaticCache.for_model(m, C, self.width)
        self.tok = torch.zeros(C, dtype=torch.long, device=dev)
        self.pos = torch.zeros(C, dtype=torch.long, device=dev)
        self.ngen = torch.zeros(C, dtype=torch.long, device=dev)
        self.req = torch.zeros(C, dtype=torch.long, device=dev)
        self.done = torch.ones(C, dtype=torch.bool, device=dev)
        self.out_tok = torch.zeros(C, self.cols + 1, dtype=torch.long, device=dev)  # + a scratch column
        self.out_lp = torch.zeros(C, self.cols + 1, dtype=torch.float32, device=dev)
        self.out_route = torch.full((C, self.cols + 1, L, k), -1, dtype=torch.long, device=dev)
        self.slot_buf = torch.full((_cpu_padded(C, True),), self.cap, dtype=torch.long, device=dev)
        self.seed_buf = torch.zeros((), dtype=torch.long, device=dev)
        self.max_new_buf = torch.zeros((), dtype=torch.long, device=dev)
        self.eos_buf = torch.full((self.MAX_STOP_IDS,), -1, dtype=torch.long, device=dev)

    def _context(self):
        stack = contextlib.ExitStack()
        stack.enter_context(torch.no_grad())
        stack.enter_context(eager())
        stack.enter_context(ops.invariant(self.exact))
        stack.enter_context(ops.fused())
        return stack

    # -- one decode step (what a graph captures) ------------------------------------------------------------------
    def _step(self, n: int, temperature: float, top_p: float) -> None:
        s = self.slot_buf[:n]
        p = self.pos[s]
        self.cache.bind(s, p)
        trace = RoutingTrace() if self.moe else None
        h = self.model.hidden_states(self.tok[s][None], position_ids=p[None], cache=self.cache, trace=trace)[0]
        logits = ops.linear(h, self.model.output_weight)
        if self.hook is not None:
            logits = self.hook(logits.float())
        steps = self.ngen[s]
        new = ops.sample(logits, temperature, top_p, ops.noise_keys(self.seed_buf, self.req[s], steps))
        lp = ops.logprob(logits, new)
        was = self.done[s]
        live = ~was
        col = torch.where(was, self.cols, steps)
        self.out_tok[s, col] = new
        self.out_lp[s, col] = lp
        if trace is not None:
            self.out_route[s, col] = trace.stacked()[0]
        self.ngen[s] = steps + live.long()
        self.tok[s] = torch.where(was, self.tok[s], new)
        self.pos[s] = p + live.long()
        self.done[s] = was | torch.isin(new, self.eos_buf) | (steps + 1 >= self.max_new_buf)

    def _run(self, n: int, temperature: float, top_p: float) -> None:
        if not self.graphs_on:
            self._step(n, temperature, top_p)
            return
        key = (n, float(temperature), float(top_p))
        graph = self.graphs.get(key)
        if graph is None:
            live = self.slot_buf[:n].clone()
            self.slot_buf[:n] = self.cap  # warm-up and capture write only to the scratch slot
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self._step(n, temperature, top_p)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self._step(n, temperature, top_p)
            self.graphs[key] = graph
            self.slot_buf[:n] = live
        graph.replay()

    def _bucket(self, n: int) -> int:
        if not self.graphs_on:
            return _cpu_padded(n, self.exact and self.device.type != "cuda")
        return next((b for b in BUCKETS if b >= n and b <= self.cap), self.cap)

    def warmup(self) -> None:
        """Compile the kernels once (Triton JIT, the first graph captures) before anything is timed: a one-prompt,
        three-token generate, sampled and greedy."""
        for temperature in (1.0, 0.0):
            self.generate([[0, 1]], max_new_tokens=3, temperature=temperature)

    # -- generate -------------------------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, eos_ids: Sequence[int] = (),
                 pad_id: int = 0, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> Generation:
        """Sample (temperature > 0) or greedily decode up to ``max_new_tokens`` after each prompt, stopping a row at
        one of ``eos_ids``. The same draw for a row whatever the batch: its noise is keyed by (seed, row, step)."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generate needs at least one prompt and no empty prompt")
        if len(eos_ids) > self.MAX_STOP_IDS:
            raise ValueError(f"at most {self.MAX_STOP_IDS} stop ids, got {len(eos_ids)}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens}: generate at least one token")
        B, dev = len(prompts), self.device
        lens = [len(p) for p in prompts]
        longest = max(lens)
        self._ensure(B, longest + max_new_tokens, max_new_tokens)
        with self._context():
            slots = torch.arange(B, device=dev)
            self.done.fill_(True)
            self.ngen[slots] = 0
            self.req[slots] = slots
            self.seed_buf.fill_(int(seed) & 0xFFFFFFFF)
            self.max_new_buf.fill_(max_new_tokens)
            self.eos_buf.fill_(-1)
            if eos_ids:
                self.eos_buf[: len(eos_ids)] = torch.tensor(list(eos_ids), device=dev)
            last_h, prompt_route = self._prefill(prompts, lens)
            logits = ops.linear(last_h, self.model.output_weight)
            if self.hook is not None:
                logits = self.hook(logits.float())
            zero = torch.zeros(B, dtype=torch.long, device=dev)
            first = ops.sample(logits, temperature, top_p, ops.noise_keys(self.seed_buf, slots, zero))
            self.out_tok[slots, 0] = first
            self.out_lp[slots, 0] = ops.logprob(logits, first)
            if prompt_route is not None:
                ends = torch.tensor(lens, device=dev).cumsum(0) - 1
                self.out_route[slots, 0] = prompt_route[ends]
            self.tok[slots] = first
            self.pos[slots] = torch.tensor(lens, device=dev)
            self.ngen[slots] = 1
            self.done[slots] = torch.isin(first, self.eos_buf) | (max_new_tokens <= 1)
            active = [b for b, d in enumerate(self.done[:B].tolist()) if not d]
            left = max_new_tokens - 1  # decode steps a row can still take
            while active and left > 0:
                n = self._bucket(len(active))
                self.slot_buf[:n] = torch.tensor(active + [self.cap] * (n - len(active)), device=dev)
                steps = min(self.sync_every, left)  # no step past the last token a row may take
                for _ in range(steps):
                    self._run(n, temperature, top_p)
                left -= steps
                flags = self.done[torch.tensor(active, device=dev)].tolist()
                active = [a for a, d in zip(active, flags) if not d]
            return self._collect(prompts, lens, longest, max_new_tokens, pad_id, prompt_route)

    def _prefill(self, prompts, lens) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Every prompt token into the cache; the hidden state at each prompt's last token [B, H], and the routing
        [tokens, L, k] of every prompt token (flat, prompt after prompt)."""
        dev = self.device
        ids = torch.tensor([t for p in prompts for t in p], device=dev)
        rows = torch.repeat_interleave(torch.arange(len(prompts), device=dev), torch.tensor(lens, device=dev))
        pos = torch.cat([torch.arange(n, device=dev) for n in lens])
        pad = self.exact and self.device.type != "cuda"
        hs, routes = [], []
        for a in range(0, ids.numel(), PREFILL_TOKENS):
            b = a + PREFILL_TOKENS
            trace = RoutingTrace() if self.moe else None
            hs.append(forward_tokens(self.model, self.cache, ids[a:b], rows[a:b], pos[a:b], trace, pad, self.cap))
            if trace is not None:
                routes.append(trace.stacked()[0])
        ends = torch.tensor(lens, device=dev).cumsum(0) - 1
        h = torch.cat(hs)
        return h[ends], (torch.cat(routes) if routes else None)

    def _collect(self, prompts, lens, longest, max_new, pad_id, prompt_route) -> Generation:
        B, dev = len(prompts), self.device
        lengths = self.ngen[:B].clone()
        N = int(lengths.max())
        within = torch.arange(N, device=dev)[None, :] < lengths[:, None]
        tokens = torch.where(within, self.out_tok[:B, :N], pad_id)
        logprobs = torch.where(within, self.out_lp[:B, :N], 0.0)
        L, k = self.out_route.shape[2:]
        routing = torch.where(within[..., None, None], self.out_route[:B, :N], -1)
        prompt_routing = None
        if prompt_route is not None:
            prompt_routing = torch.full((B, longest - 1, L, k), -1, dtype=torch.long, device=dev)
            flat = _flat_index(lens, longest, dev)
            keep = flat.position < longest - 1  # the last prompt token's routing produced the first new token
            prompt_routing[flat.row[keep], flat.position[keep]] = prompt_route[keep]
        else:
            routing = torch.zeros((B, N, 0, 0), dtype=torch.long, device=dev)
        return Generation(tokens, logprobs, routing, lengths, [list(p) for p in prompts], longest + max_new,
                          prompt_routing)


def _cpu_padded(n: int, pad: bool) -> int:
    """``n`` rounded up to a multiple of :data:`ops.CPU_TOKENS` when ``pad`` (exact mode on the CPU)."""
    return -(-n // ops.CPU_TOKENS) * ops.CPU_TOKENS if pad else n


def forward_tokens(model: MoECausalLM, cache: StaticCache, ids, rows, pos, trace: RoutingTrace | None, pad: bool,
                   pad_row: int) -> torch.Tensor:
    """Hidden states [T, H] of a flat list of tokens (slot ``rows``, position ``pos``) through ``cache``. With
    ``pad`` (exact mode on the CPU) the list is first padded to a multiple of :data:`ops.CPU_TOKENS` with tokens of
    slot ``pad_row`` at position 0 (their keys land in that scratch slot; a replay trace's ids are padded with -1);
    the padding is cut from the result and from the trace."""
    n = ids.numel()
    extra = _cpu_padded(n, pad) - n
    if extra:
        ids = torch.cat([ids, ids.new_zeros(extra)])
        rows = torch.cat([rows, rows.new_full((extra,), pad_row)])
        pos = torch.cat([pos, pos.new_zeros(extra)])
        if trace is not None and trace.mode == "replay":
            trace.ids = {i: torch.cat([v, v.new_full((1, extra, v.shape[-1]), -1)], dim=1)
                         for i, v in trace.ids.items()}
    cache.bind(rows, pos)
    h = model.hidden_states(ids[None], position_ids=pos[None], cache=cache, trace=trace)[0]
    if extra and trace is not None:
        for store in (trace.ids, trace.own):
            for i in list(store):
                store[i] = store[i][:, :n]
    return h[:n]


class _Flat:
    """Where each token of a flat, row-after-row list of sequences sits in the trainer's buffer layout (sequences
    right-aligned at the longest prompt's end)."""

    def __init__(self, row: torch.Tensor, position: torch.Tensor):
        self.row, self.position = row, position


def _flat_index(lens: Sequence[int], longest: int, device, extra: Sequence[int] | None = None) -> _Flat:
    """Buffer (row, position) of every token of sequences of ``lens`` prompt tokens (+ ``extra`` generated ones)."""
    total = [n + (extra[b] if extra is not None else 0) for b, n in enumerate(lens)]
    row = torch.repeat_interleave(torch.arange(len(lens), device=device), torch.tensor(total, device=device))
    start = torch.tensor([longest - n for n in lens], device=device)
    within = torch.cat([torch.arange(t, device=device) for t in total])
    return _Flat(row, start[row] + within)


@torch.no_grad()
def score(model: MoECausalLM, gen: Generation, *, trace: RoutingTrace | None = None, exact: bool = True,
          chunk_tokens: int = PREFILL_TOKENS, rows_per_logit_chunk: int = 4096) -> torch.Tensor:
    """The logprob [B, N] of every generated token of ``gen`` (0 after a row's end, at ``gen.temperature``),
    computed as the :class:`Decoder` computes them: one prefill over every whole sequence through a static cache
    (under :func:`ops.invariant` with ``exact``). ``trace`` (buffer layout, as :func:`~mtrain.models.generate.recompute`
    takes it) records the routing over the whole buffer, or replays the ids it holds."""
    dev = model.output_weight.device
    B, N = gen.tokens.shape
    lens = [len(p) for p in gen.prompts]
    n_gen = gen.lengths.tolist()
    first = gen.first
    flat = _flat_index(lens, first, dev, n_gen)
    ids = torch.cat([torch.cat([torch.tensor(p, device=dev), gen.tokens[b, : n_gen[b]]])
                     for b, p in enumerate(gen.prompts)])
    pos = torch.cat([torch.arange(lens[b] + n_gen[b], device=dev) for b in range(B)])
    cache = StaticCache.for_model(model, B + 1, max(lens[b] + n_gen[b] for b in range(B)))  # + a padding slot
    pad = exact and dev.type != "cuda"
    replay = trace is not None and trace.mode == "replay"
    layers = model.moe_layers
    recorded: dict[int, list] = {i: [] for i in layers}
    own: dict[int, list] = {i: [] for i in layers}
    hs = []
    with eager(), ops.invariant(exact), ops.fused():
        for a in range(0, ids.numel(), chunk_tokens):
            b = a + chunk_tokens
            t = None
            if trace is not None:
                t = RoutingTrace.replay({i: trace.ids[i][flat.row[a:b], flat.position[a:b]][None] for i in layers}) \
                    if replay else RoutingTrace()
            hs.append(forward_tokens(model, cache, ids[a:b], flat.row[a:b], pos[a:b], t, pad, B))
            if t is not None:
                for i in layers:
                    (own if replay else recorded)[i].append((t.own if replay else t.ids)[i][0])
        h = torch.cat(hs)
        # the position that produced generated token j of row b: prompt length - 1 + j after the row's start
        starts = torch.tensor([0] + [lens[b] + n_gen[b] for b in range(B)], device=dev).cumsum(0)[:-1]
        j = torch.arange(N, device=dev)
        valid = j[None, :] < gen.lengths[:, None]
        src = (starts[:, None] + torch.tensor(lens, device=dev)[:, None] - 1 + j[None, :])[valid]
        targets = gen.tokens[valid]
        out = torch.zeros(B, N, dtype=torch.float32, device=dev)
        lps = []
        for a in range(0, src.numel(), rows_per_logit_chunk):
            logits = ops.linear(h[src[a : a + rows_per_logit_chunk]], model.output_weight)
            lps.append(ops.logprob(logits, targets[a : a + rows_per_logit_chunk], gen.temperature))
        out[valid] = torch.cat(lps) if lps else out[valid]
    if trace is not None and layers:
        k = model.config.num_experts_per_tok
        for i in layers:
            full = torch.full((B, gen.width, k), -1, dtype=torch.long, device=dev)
            full[flat.row, flat.position] = torch.cat((own if replay else recorded)[i]).long()
            (trace.own if replay else trace.ids)[i] = full
    return out
