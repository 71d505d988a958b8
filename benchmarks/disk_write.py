"""How fast the run dir's disk takes a checkpoint: raw sequential writes (dd-like, fsync'd) against torch.save of a
tensor dict of the same size, in the folder given (default: the current one).

    python benchmarks/disk_write.py --gb 8 --dir outputs

Tells whether a checkpoint write is bound by the disk or by serialization (issue 14: the end of a job waits for
``last.ckpt``). Prints MB/s of both and appends a row to benchmarks/results.jsonl (and $OUT).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import append_results, card  # noqa: E402


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gb", type=float, default=8.0)
    p.add_argument("--dir", default=".")
    p.add_argument("--no-save", action="store_true")
    a = p.parse_args()
    size = int(a.gb * 1e9)
    block = os.urandom(1 << 24)
    with tempfile.TemporaryDirectory(dir=a.dir) as tmp:
        raw = os.path.join(tmp, "raw.bin")

        def write_raw():
            with open(raw, "wb") as f:
                for _ in range(size // len(block)):
                    f.write(block)
                f.flush()
                os.fsync(f.fileno())

        raw_s = timed(write_raw)
        os.remove(raw)
        n = size // 2 // 8  # 8 bf16 tensors of equal size
        state = {f"t{i}": torch.randn(n, dtype=torch.float32).to(torch.bfloat16) for i in range(8)}
        ckpt = os.path.join(tmp, "state.pt")

        def write_torch():
            torch.save(state, ckpt)
            with open(ckpt, "rb+") as f:
                os.fsync(f.fileno())

        torch_s = timed(write_torch)
    row = {"bench": "disk_write", "gb": a.gb, "raw_mb_s": round(size / raw_s / 1e6), "torch_save_mb_s":
           round(size / torch_s / 1e6), "dir": os.path.abspath(a.dir)}
    print(f"{card()}: raw sequential write {row['raw_mb_s']:,} MB/s, torch.save {row['torch_save_mb_s']:,} MB/s "
          f"({a.gb:g} GB to {row['dir']})")
    if not a.no_save:
        append_results([row])


if __name__ == "__main__":
    main()
