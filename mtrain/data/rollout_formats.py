"""How a rollout file lays out ``routed_experts``: declared per file or in the config, never guessed.

Each engine returns the experts its routers chose in its own layout; the same bytes can fit several layouts (SGLang's
int32 over all layers at ``seq_len`` = layers / dense layers has the byte count of the MoE layers at ``seq_len + 1``
positions), so mtrain never infers a layout from a count. A :class:`RoutingLayout` says:

* ``encoding``: ``list`` (nested JSON lists), ``base64`` (base64 of the raw little-endian array, no shape) or ``npy``
  (base64 of a ``.npy`` file: dtype and shape in its header);
* ``dtype``: the element type of base64/npy bytes (``int32``, ``int64``, ``uint8``, ``uint16``) or ``by_experts``
  (vLLM: ``uint8`` up to 256 experts, else ``uint16``); lists hold plain integers;
* ``layers``: ``all`` (every decoder layer; the dense ones are dropped) or ``moe`` (the MoE layers only);
* ``order``: ``positions_first`` (``[positions, layers, top_k]``) or ``layers_first`` (``[layers, positions, top_k]``);
* ``rows``: ``seq_len-1`` (exactly one row per position that produced a next token: prompt + response - 1) or
  ``padded`` (at least that many; every row after them holds -1);
* ``dense_zero``: with ``layers=all``, the dense layers' entries must read 0 (SGLang writes 0 there; a file whose
  dense entries hold ids is in another layout, e.g. int64 of the MoE layers where the model has twice as many layers).

The engines' own layouts (:data:`FORMATS`; sources in ``docs/rollout-files.md``):

==============  ========  ==========  ======  ===============  =========
format          encoding  dtype       layers  order            rows
==============  ========  ==========  ======  ===============  =========
``sglang``      base64    int32       all     positions_first  seq_len-1
``vllm``        list      int32       all     positions_first  seq_len-1
``vllm_npy``    npy       by_experts  all     positions_first  seq_len-1
``fastdeploy``  list      int32       moe     layers_first     padded
``mtrain``      list      int32       moe     positions_first  seq_len-1
==============  ========  ==========  ======  ===============  =========

:func:`decode_routing` checks a line's value against the one declared shape and returns ``[seq_len - 1, moe layers,
top_k]``. Anything else -- a byte count, a shape, a dtype that fits only another layout, an expert id out of range,
-1 at a real position -- is a ``DataError`` naming ``file:line``, the declared layout, and what was found (for bytes:
the layouts they would fit).
"""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass, fields, replace
from typing import Any, Mapping, Optional

import torch

from mtrain.data.errors import DataError

ENCODINGS = ("list", "base64", "npy")
DTYPES = ("int32", "int64", "uint8", "uint16", "by_experts")
LAYER_SETS = ("all", "moe")
ORDERS = ("positions_first", "layers_first")
ROWS = ("seq_len-1", "padded")
_ITEMSIZE = {"int32": 4, "int64": 8, "uint8": 1, "uint16": 2}
_TORCH = {"int32": torch.int32, "int64": torch.int64, "uint8": torch.uint8, "uint16": torch.uint16}


@dataclass(frozen=True)
class RoutingLayout:
    encoding: str = "list"
    dtype: str = "int32"
    layers: str = "moe"
    order: str = "positions_first"
    rows: str = "seq_len-1"
    dense_zero: bool = False

    def __post_init__(self) -> None:
        for f, allowed in (("encoding", ENCODINGS), ("dtype", DTYPES), ("layers", LAYER_SETS), ("order", ORDERS),
                           ("rows", ROWS)):
            if getattr(self, f) not in allowed:
                raise ValueError(f"routing layout {f}={getattr(self, f)!r} is not one of {', '.join(allowed)}")
        if not isinstance(self.dense_zero, bool):
            raise ValueError(f"routing layout dense_zero={self.dense_zero!r} is not true or false")

    def element(self, num_experts: int) -> str:
        """The element type of base64/npy bytes for a model with ``num_experts`` experts."""
        if self.dtype == "by_experts":
            return "uint8" if num_experts <= 256 else "uint16"
        return self.dtype

    def describe(self, num_experts: int) -> str:
        dims = "[layers, positions, top_k]" if self.order == "layers_first" else "[positions, layers, top_k]"
        rows = "seq_len-1 positions" if self.rows == "seq_len-1" else ">= seq_len-1 positions, -1 after them"
        enc = {"list": "nested lists", "base64": "base64", "npy": "base64 .npy"}[self.encoding]
        return f"{enc} {self.element(num_experts)} {dims}, {rows}, {self.layers} layers"


FORMATS: dict[str, RoutingLayout] = {
    "sglang": RoutingLayout("base64", "int32", "all", "positions_first", "seq_len-1", dense_zero=True),
    "vllm": RoutingLayout("list", "int32", "all", "positions_first", "seq_len-1"),
    "vllm_npy": RoutingLayout("npy", "by_experts", "all", "positions_first", "seq_len-1"),
    "fastdeploy": RoutingLayout("list", "int32", "moe", "layers_first", "padded"),
    "mtrain": RoutingLayout("list", "int32", "moe", "positions_first", "seq_len-1"),
}
# formats whose engines report temperature-scaled logprobs by default (so the file must say at which temperature)
SCALED_BY_DEFAULT = {"sglang": "SGLang scales logprobs by the sampling temperature unless the server runs with "
                               "SGLANG_RETURN_ORIGINAL_LOGPROB=1",
                     "fastdeploy": "FastDeploy's logprob temperature is not documented"}


@dataclass(frozen=True)
class DeclaredLayout:
    """A file's layout: a format name (or ``custom``) resolved to its :class:`RoutingLayout`, the temperature its
    logprobs were taken at, and (mtrain's own files) the path that computed them: ``invariant`` when mtrain's exact
    engine wrote them (the trainer then recomputes through that path), else ``standard``."""

    name: str
    layout: RoutingLayout
    temperature: float = 1.0
    scoring: str = "standard"


def resolve_layout(name: Optional[str], overrides: Optional[Mapping[str, Any]] = None) -> RoutingLayout:
    """``name`` (a key of :data:`FORMATS`, or ``custom``) with the non-null ``overrides`` applied. ValueError names
    a bad name or field."""
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = set(overrides) - {f.name for f in fields(RoutingLayout)}
    if unknown:
        raise ValueError(f"routing layout has no field {sorted(unknown)[0]!r}; fields: "
                         f"{', '.join(f.name for f in fields(RoutingLayout))}")
    if name == "custom":
        missing = [f.name for f in fields(RoutingLayout) if f.name not in overrides and f.name != "dense_zero"]
        if missing:
            raise ValueError(f"rollout format custom needs every layout field; missing: {', '.join(missing)}")
        return RoutingLayout(**overrides)
    if name not in FORMATS:
        raise ValueError(f"rollout format {name!r} is not one of {', '.join([*FORMATS, 'custom'])}")
    return replace(FORMATS[name], **overrides)


# -- decoding -----------------------------------------------------------------------------------------------------
def decode_routing(value: Any, seq_len: int, where: str, declared: DeclaredLayout, num_layers: int,
                   moe_layers: tuple[int, ...], top_k: int, num_experts: int) -> torch.Tensor:
    """A line's ``routed_experts`` as int32 ``[seq_len - 1, len(moe_layers), top_k]``, checked against the declared
    layout (see the module doc). ``DataError`` naming ``where`` otherwise."""
    lay = declared.layout
    n_layers = num_layers if lay.layers == "all" else len(moe_layers)
    need = seq_len - 1
    what = f"the declared layout {declared.name} ({lay.describe(num_experts)})"
    if lay.encoding == "list":
        t = _from_list(value, where, what)
    elif lay.encoding == "base64":
        t = _from_base64(value, where, what, lay, need, n_layers, num_layers, len(moe_layers), top_k, num_experts)
    else:
        t = _from_npy(value, where, what, lay, num_experts)
    if t.dim() != 3:
        raise DataError(f"{where}: \"routed_experts\" has {t.dim()} dimensions; {what} has 3. Fix: write the "
                        "engine's routed experts as it returns them, or declare their layout (task.rollout_format).")
    pos_dim, layer_dim = (1, 0) if lay.order == "layers_first" else (0, 1)
    positions, layers, k = t.shape[pos_dim], t.shape[layer_dim], t.shape[2]
    if layers != n_layers or k != top_k:
        other = ("positions_first" if lay.order == "layers_first" else "layers_first")
        fits = (t.shape[pos_dim] == n_layers and t.shape[layer_dim] >= need and k == top_k)
        hint = f"; its axes fit order={other}" if fits else ""
        raise DataError(f"{where}: \"routed_experts\" has shape {list(t.shape)}; {what} needs {n_layers} layers and "
                        f"top_k {top_k} ({'[L, P, k]' if lay.order == 'layers_first' else '[P, L, k]'}){hint}. Fix: "
                        "export the routing of this model, or declare its layout (task.rollout_format).")
    if lay.order == "layers_first":
        t = t.transpose(0, 1)
    if lay.rows == "seq_len-1" and positions != need:
        more = (" (one row per token: no engine emits that; the routing of the position after the last token is "
                "never computed)" if positions == seq_len else "")
        raise DataError(f"{where}: \"routed_experts\" has {positions} rows; prompt + response have {seq_len} tokens, "
                        f"so {what} has {need}{more}. Fix: the routing must belong to this line's tokens.")
    if lay.rows == "padded":
        if positions < need:
            raise DataError(f"{where}: \"routed_experts\" has {positions} rows; prompt + response have {seq_len} "
                            f"tokens, so {what} needs at least {need}. Fix: the routing must belong to this line's "
                            "tokens.")
        tail = t[need:]
        if tail.numel() and bool((tail != -1).any()):
            row = need + int((tail != -1).flatten(1).any(1).nonzero()[0])
            raise DataError(f"{where}: \"routed_experts\" row {row} lies after the line's {need} routed positions "
                            f"but holds expert ids, not -1 padding ({what}). Fix: the routing must belong to this "
                            "line's tokens, padded with -1.")
        t = t[:need]
    real = t if lay.layers == "moe" else t[:, list(moe_layers)]
    if lay.layers == "all" and lay.dense_zero:
        dense = [i for i in range(num_layers) if i not in moe_layers]
        if dense and bool((t[:, dense] != 0).any()):
            pos, layer = (int(i) for i in (t[:, dense] != 0).any(-1).nonzero()[0])
            raise DataError(f"{where}: \"routed_experts\" holds expert ids at position {pos} of dense layer "
                            f"{dense[layer]}, which {what} fills with 0: these bytes are in another layout. Fix: "
                            "declare the layout the engine wrote (task.rollout_format).")
    if real.numel():
        low, high = int(real.min()), int(real.max())
        if low == -1:
            pos, layer = (int(i) for i in (real == -1).any(-1).nonzero()[0])
            raise DataError(f"{where}: \"routed_experts\" holds -1 at position {pos}, MoE layer {moe_layers[layer]}, "
                            f"a real token of the line ({what}). Fix: the engine routed every prompt and response "
                            "position but the last; export its routing for all of them.")
        if low < 0 or high >= num_experts:
            bad = low if low < 0 else high
            raise DataError(f"{where}: \"routed_experts\" has expert id {bad} outside [0, {num_experts}) ({what}). "
                            "Fix: export the routing of this model.")
    return real.to(torch.int32).contiguous()


def _from_list(value: Any, where: str, what: str) -> torch.Tensor:
    if not isinstance(value, list):
        raise DataError(f"{where}: \"routed_experts\" is a {type(value).__name__}; {what} is nested lists of "
                        "integers. Fix: declare the layout the engine wrote (task.rollout_format).")
    try:
        t = torch.tensor(value)  # the dtype JSON gave: a float or bool id must not be truncated into another id
    except (TypeError, ValueError, RuntimeError, OverflowError):
        t = None
    if t is None or t.dtype != torch.int64:
        raise DataError(f"{where}: \"routed_experts\" is not nested lists of integers of one shape ({what}). Fix: "
                        "write the engine's routed experts as such.") from None
    return t


def _b64(value: Any, where: str, what: str) -> bytes:
    if not isinstance(value, str):
        raise DataError(f"{where}: \"routed_experts\" is a {type(value).__name__}; {what} is a base64 string. Fix: "
                        "declare the layout the engine wrote (task.rollout_format).")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise DataError(f"{where}: \"routed_experts\" is not valid base64 ({what}). Fix: copy the engine's string "
                        "unchanged.") from None


def _from_base64(value, where, what, lay: RoutingLayout, need: int, n_layers: int, num_layers: int, moe: int,
                 top_k: int, num_experts: int) -> torch.Tensor:
    raw = _b64(value, where, what)
    dtype = lay.element(num_experts)
    size = _ITEMSIZE[dtype]
    per_row = n_layers * top_k * size
    ok = len(raw) == need * per_row if lay.rows == "seq_len-1" else (len(raw) % per_row == 0
                                                                    and len(raw) // per_row >= need)
    if not ok:
        fits = [f"{dt} [{rows} positions, {name} {layers} layers, {top_k}]"
                for dt, sz in _ITEMSIZE.items() for name, layers in (("all", num_layers), ("moe", moe))
                for rows in (need, need + 1) if rows * layers * top_k * sz == len(raw)]
        would = f"; the bytes would fit {' or '.join(fits)}" if fits else "; they fit no layout of this model"
        raise DataError(f"{where}: \"routed_experts\" holds {len(raw)} bytes; {what} needs "
                        f"{need * per_row if lay.rows == 'seq_len-1' else f'a multiple of {per_row}'}{would}. Fix: "
                        "declare the layout the engine wrote (task.rollout_format), or export the routing of this "
                        "model and this line.")
    flat = torch.frombuffer(bytearray(raw), dtype=_TORCH[dtype]).to(torch.int64)
    rows = len(raw) // per_row
    return flat.view(n_layers, rows, top_k) if lay.order == "layers_first" else flat.view(rows, n_layers, top_k)


def _from_npy(value, where, what, lay: RoutingLayout, num_experts: int) -> torch.Tensor:
    import numpy as np

    raw = _b64(value, where, what)
    try:
        arr = np.load(io.BytesIO(raw), allow_pickle=False)
        if not isinstance(arr, np.ndarray):  # an .npz archive
            raise ValueError
    except (ValueError, OSError, EOFError):
        raise DataError(f"{where}: \"routed_experts\" is base64 but not of a .npy file ({what}). Fix: copy the "
                        "engine's string unchanged, or declare the layout it wrote (task.rollout_format).") from None
    want = lay.element(num_experts)
    if arr.dtype != np.dtype(want):
        raise DataError(f"{where}: \"routed_experts\" is a .npy array of {arr.dtype}; {what} is {want}. Fix: "
                        "declare the dtype the engine wrote (task.rollout_layout.dtype).")
    return torch.from_numpy(arr.astype(np.int64))


# -- writing (mtrain's own format, and the engines' for tests and converters) -------------------------------------
def encode_routing(routing: torch.Tensor, layout: RoutingLayout, num_experts: int) -> Any:
    """``routing`` already in ``layout``'s axes and layers -> the JSON value of ``routed_experts``."""
    if layout.encoding == "list":
        return routing.tolist()
    dtype = layout.element(num_experts)
    if layout.encoding == "base64":
        return base64.b64encode(routing.to(_TORCH[dtype]).contiguous().numpy().tobytes()).decode()
    import numpy as np

    buf = io.BytesIO()
    np.save(buf, routing.numpy().astype(dtype), allow_pickle=False)
    return base64.b64encode(buf.getvalue()).decode()
