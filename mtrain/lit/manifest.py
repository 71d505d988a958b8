"""Trusted distributed checkpoints: a signed manifest of every file of a checkpoint folder, checked before resuming.

A distributed checkpoint (``trainer=fsdp``: ``last.ckpt/`` is a folder) keeps its metadata in a pickle that
``torch.distributed.checkpoint`` unpickles on load, so a crafted folder runs code on resume. mtrain writes
``mtrain_manifest.json`` into every such folder it saves: the SHA-256 and size of each file, signed with HMAC-SHA256
under a key private to the user (``~/.config/mtrain/checkpoint.key``, mode 600, made on first use; or the file named by
``MTRAIN_CHECKPOINT_KEY``). Resuming checks the signature and every hash before anything in the folder is read, and
refuses folders without a manifest, with a file added, missing or changed, or signed with another key.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mtrain.models.errors import CheckpointError

MANIFEST = "mtrain_manifest.json"
FORMAT = "mtrain-checkpoint-manifest/1"
KEY_ENV = "MTRAIN_CHECKPOINT_KEY"


def key_file() -> Path:
    env = os.environ.get(KEY_ENV)
    return Path(env).expanduser() if env else Path.home() / ".config" / "mtrain" / "checkpoint.key"


def _key() -> bytes:
    path = key_file()
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # O_EXCL: one process makes the key
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32) + "\n")
    for _ in range(100):  # another process may be writing it right now
        key = path.read_text().strip()
        if key:
            return key.encode()
        time.sleep(0.05)
    raise CheckpointError(f"{path}: the checkpoint key file is empty. Fix: delete it (a new key is made)")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def _hashes(paths: list[Path]) -> list[str]:
    """SHA-256 of each file, several at a time (hashlib releases the GIL: a checkpoint of one shard per rank hashes
    at about the disk's pace instead of one file after another, ~1.5 GB/s a core)."""
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(paths), os.cpu_count() or 1))) as pool:
        return list(pool.map(_sha256, paths))


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def _sign(files: dict) -> str:
    body = json.dumps({"format": FORMAT, "files": files}, sort_keys=True).encode()
    return hmac.new(_key(), body, hashlib.sha256).hexdigest()


def write_manifest(folder: str | os.PathLike) -> Path:
    """Hash every file of ``folder`` and write the signed manifest into it."""
    folder = Path(folder)
    paths = _files(folder)
    files = {p.relative_to(folder).as_posix(): {"sha256": h, "bytes": p.stat().st_size}
             for p, h in zip(paths, _hashes(paths))}
    out = folder / MANIFEST
    tmp = folder / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps({"format": FORMAT, "files": files, "hmac_sha256": _sign(files)}, indent=1) + "\n")
    os.replace(tmp, out)
    return out


def verify_manifest(folder: str | os.PathLike) -> None:
    """Raise :class:`CheckpointError` (naming the folder and the reason) unless ``folder`` is exactly what an mtrain
    job of this user wrote. Reads only the manifest (JSON) and the files' bytes; nothing is unpickled."""
    folder = Path(folder)
    refuse = (f"task.ckpt_path={folder} is a distributed checkpoint folder not written by mtrain under your key "
              f"({key_file()}), or altered since: {{}}. Resuming it would unpickle its metadata. Fix: resume a "
              "folder your own mtrain job wrote")
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files, signature = manifest["files"], manifest["hmac_sha256"]
    except FileNotFoundError:
        raise CheckpointError(refuse.format(f"it has no {MANIFEST}")) from None
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(refuse.format(f"its {MANIFEST} is not a manifest")) from None
    if manifest.get("format") != FORMAT or not hmac.compare_digest(str(signature), _sign(files)):
        raise CheckpointError(refuse.format(f"the signature of {MANIFEST} does not match"))
    present = {p.relative_to(folder).as_posix(): p for p in _files(folder)}
    for name in sorted(set(present) | set(files)):
        if name not in files:
            raise CheckpointError(refuse.format(f"{name} is not in the manifest"))
        if name not in present:
            raise CheckpointError(refuse.format(f"{name} is missing"))
        if present[name].stat().st_size != files[name]["bytes"]:
            raise CheckpointError(refuse.format(f"{name} changed"))
    names = sorted(present)
    for name, h in zip(names, _hashes([present[n] for n in names])):
        if h != files[name]["sha256"]:
            raise CheckpointError(refuse.format(f"{name} changed"))
