"""The gate-precision check of a loaded checkpoint: its stored gate dtype and its precision record
(``mtrain_precision.json``, written at export) against the policy it is loaded under."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from .errors import CheckpointError

log = logging.getLogger(__name__)

PRECISION_FILE = "mtrain_precision.json"


def read_precision_record(path: str | os.PathLike) -> dict | None:
    f = Path(path) / PRECISION_FILE
    return json.loads(f.read_text()) if f.is_file() else None


def check_gate(folder: Path, gate_dtypes: set, moe_gate_fp32: bool, gate_mismatch: str) -> None:
    """Compare the gate's stored dtype and the checkpoint's precision record (``mtrain_precision.json``, if mtrain
    wrote it) with the policy it is loaded under. Upcasting a bf16-stored gate of a published checkpoint to fp32 is
    what the rollout engine does under ``FD_ENABLE_RL=1``: an info line, not a warning. A warning (or, with
    ``gate_mismatch="error"``, a refusal) when the record disagrees with the policy, or records an fp32 gate that is
    not stored in fp32 (a gate downcast on export)."""
    want = "float32" if moe_gate_fp32 else "the model dtype"
    stored = {str(d).removeprefix("torch.") for d in gate_dtypes}
    record = read_precision_record(folder)
    problems = []
    if record is not None and bool(record.get("moe_gate_fp32")) != moe_gate_fp32:
        problems.append(
            f"it was exported with moe_gate_fp32={str(record.get('moe_gate_fp32')).lower()} "
            f"but is loaded with moe_gate_fp32={str(moe_gate_fp32).lower()} (gate in {want})"
        )
    elif record is not None and record.get("moe_gate_fp32") and stored - {"float32"}:
        problems.append(f"its record says moe_gate_fp32=true but the gate weights are stored as "
                        f"{'/'.join(sorted(stored))}: the export downcast the gate")
    elif moe_gate_fp32 and stored - {"float32"}:
        log.info("gate weights of %s stored as %s are upcast to float32 (moe_gate_fp32=true), as the rollout engine "
                 "does under FD_ENABLE_RL=1", folder, "/".join(sorted(stored)))
    if not problems:
        return
    msg = (
        f"gate precision mismatch for checkpoint {folder}: {'; '.join(problems)}. Trainer and rollout will route "
        f"differently; load with the policy it was exported with (rl=on / moe_gate_fp32) or re-export it."
    )
    if gate_mismatch == "error":
        raise CheckpointError(msg)
    log.warning(msg)
