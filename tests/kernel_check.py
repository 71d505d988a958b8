"""Run by tests/test_engine.py under TRITON_INTERPRET=1: each Triton kernel of mtrain.models.kernels against its
torch version (fp32 and fp16; the interpreter has no bf16), and each kernel's row invariance. Not collected by
pytest (no test_ prefix); prints "all kernels match" when every check holds."""

import os
import sys

import torch
import torch.nn.functional as F

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
from mtrain.models import cache as C  # noqa: E402
from mtrain.models import ops  # noqa: E402
from mtrain.models.kernels import attention, experts, gemm as matmul, rowwise  # noqa: E402

torch.manual_seed(0)
bad = []


def check(name, got, want, tol):
    err = (got.float() - want.float()).abs().max().item()
    print(f"{name}: max |diff| {err:.3g}")
    if not err <= tol:
        bad.append(name)


def same(name, a, b):
    print(f"{name}: {'bit-identical' if torch.equal(a, b) else 'DIFFERS'}")
    if not torch.equal(a, b):
        bad.append(name)


for dt, tol in ((torch.float32, 1e-5), (torch.float16, 5e-3)):
    kc, vc = torch.randn(3, 2, 48, 16).to(dt), torch.randn(3, 2, 48, 16).to(dt)
    q = torch.randn(7, 8, 16).to(dt)
    rows = torch.tensor([0, 0, 1, 2, 2, 2, 1])
    lens = torch.tensor([1, 5, 17, 33, 40, 2, 48], dtype=torch.int32)
    a = attention.cache_attention(q, kc, vc, rows.to(torch.int32), lens, block_n=16)
    check(f"attention {dt}", a, C._attend_torch(q, kc, vc, rows, lens), tol)
    same(f"attention rows {dt}", attention.cache_attention(q[2:4].contiguous(), kc, vc, rows[2:4].to(torch.int32),
                                                             lens[2:4], block_n=16), a[2:4])

    x, w, bias = torch.randn(37, 96).to(dt), torch.randn(80, 96).to(dt), torch.randn(80).to(dt)
    y = matmul.matmul(x, w, bias)
    check(f"matmul {dt}", y, F.linear(x.float(), w.float(), bias.float()), 1e-4 if dt == torch.float32 else 2e-2)
    same(f"matmul rows {dt}", matmul.matmul(x[:3], w, bias), y[:3])

    E, H, I, T, k = 6, 32, 48, 9, 2
    x = torch.randn(T, H).to(dt)
    gu, dn = (torch.randn(E, 2 * I, H) / 5).to(dt), (torch.randn(E, H, I) / 5).to(dt)
    idx = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
    wts = torch.rand(T, k)
    y = experts.routed_experts(x, wts, idx, gu, dn)
    check(f"experts {dt}", y, ops.experts_invariant(x, wts, idx, gu, dn), tol)
    same(f"experts rows {dt}", experts.routed_experts(x[:2], wts[:2], idx[:2], gu, dn), y[:2])

x, wt = torch.randn(5, 40), torch.randn(40)
check("rms_norm", rowwise.rms_norm(x, wt, 1e-6), ops.rms_norm(x, wt, 1e-6), 1e-6)
logits, tok = torch.randn(6, 5000), torch.tensor([0, 4999, 17, -1, 2500, 3])
check("logprob", rowwise.logprob(logits, tok, 0.7), ops.logprob(logits, tok, 0.7), 1e-5)
keys = ops.noise_keys(7, torch.arange(6), torch.arange(6))
for t, p in ((0.8, 1.0), (0.8, 0.5), (0.0, 1.0)):
    ref = ops.sample(logits, t, p, keys)  # the CPU torch version
    thr = ops.nucleus_threshold(logits, t, p)
    same(f"sample T={t} top_p={p}", rowwise.sample(logits, keys, thr, t), ref)

if bad:
    print("FAILED:", ", ".join(bad))
    sys.exit(1)
print("all kernels match")
