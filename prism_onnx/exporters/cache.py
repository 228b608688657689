"""A content-addressed cache of exported graph sets, so that exporting the same model again with other
settings (another P, CR, split, wire precision: none of them changes a graph) traces nothing.

Key: sha256 of what decides the graphs: the model's tensors (every parameter and buffer of the PRISM model:
name, dtype, shape, bytes), its ModelSpec (exchange kind included) and device program, the opset, the weight
quantization (kind, block size), the versions of torch, onnx, onnxscript and onnxruntime, and a digest of
prism-onnx's own source (any code change is a new key).

Location: $PRISM_GRAPH_CACHE (a folder; "off" turns the cache off), else $XDG_CACHE_HOME/prism-onnx/graphs
(~/.cache/prism-onnx/graphs). An entry is a folder KEY/ holding the graph files, their external data and
`graphs.json` (the graphs' record and every file's sha256); it is written in a staging folder and renamed
into place (atomic), and checked before it is used (every file's size and modification time as stored: an
entry whose files changed is removed). Entries beyond $PRISM_GRAPH_CACHE_GB gigabytes (default 20) are
evicted, least recently used first. Exports hard-link the cached files (one copy on disk for a sweep of
exports): deleting the cache never affects an export, and an export file changed in place is noticed by
the cache (its modification time) and by the export's own sha256 table.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

RECORD = "graphs.json"
ENV, ENV_GB = "PRISM_GRAPH_CACHE", "PRISM_GRAPH_CACHE_GB"
VERSIONED = ("torch", "onnx", "onnxscript", "onnxruntime")


@lru_cache(maxsize=1)
def code_digest() -> str:
    """sha256 of prism-onnx's Python source (the exporter, the model families and everything they import)."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def _version(name: str) -> str:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "-"


def model_digest(pm) -> str:
    """sha256 of every parameter and buffer of a PrismModel (tied tensors once)."""
    import torch

    h = hashlib.sha256()
    tensors = list(pm.named_parameters()) + list(pm.named_buffers())
    for name, t in sorted(tensors, key=lambda kv: kv[0]):
        t = t.detach().contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        if t.numel():
            h.update(t.view(-1).view(torch.uint8).numpy().data)  # the tensor's own buffer, no copy
    return h.hexdigest()


def graph_key(pm, program, **parts) -> str:
    """The cache key of pm's graphs with `parts` (opset, quantize, block_size...)."""
    blob = {"model": model_digest(pm), "spec": pm.spec.to_dict(), "program": program.to_dict(), **parts,
            "code": code_digest(), "versions": {n: _version(n) for n in VERSIONED}}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()


def _sha256(path: Path) -> str:
    from ..runtime.bundle import sha256_file

    return sha256_file(path)


def place(src: Path, dst: Path) -> None:
    """Hard-link src to dst (one copy on disk); a copy on another filesystem."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


class GraphCache:
    """Graph sets by key (see the module docstring)."""

    def __init__(self, root: str | os.PathLike, max_bytes: int = 20 << 30):
        self.root, self.max_bytes = Path(root), int(max_bytes)

    @classmethod
    def default(cls) -> "GraphCache | None":
        """The cache the environment asks for, or None when $PRISM_GRAPH_CACHE is "off"."""
        env = os.environ.get(ENV, "")
        if env.lower() in ("off", "0", "none", "false"):
            return None
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "prism-onnx" / "graphs"
        try:
            gb = float(os.environ.get(ENV_GB, "20"))
        except ValueError:
            gb = 20.0
        return cls(Path(env).expanduser() if env else base, int(gb * (1 << 30)))

    def get(self, key: str, into: Path) -> dict | None:
        """Place entry `key`'s files in folder `into` (hard links) and return its record, or None when there is
        no such entry or it fails verification (then it is removed). Verification: every file has the size
        and modification time it had when stored (an in-place write changes them; the files' sha256, in the
        record, were computed then), so a warm export reads nothing twice."""
        entry = self.root / key
        try:
            record = json.loads((entry / RECORD).read_text())
            for name, digest in record["sha256"].items():
                st = (entry / name).stat()
                if [st.st_size, st.st_mtime_ns] != record["stat"][name]:
                    raise ValueError(f"{name} changed")
        except (OSError, ValueError, KeyError, TypeError):
            if entry.exists():
                shutil.rmtree(entry, ignore_errors=True)
            return None
        into.mkdir(parents=True, exist_ok=True)
        for name in record["sha256"]:
            place(entry / name, into / name)
        os.utime(entry / RECORD)  # recently used
        return record

    def put(self, key: str, folder: Path, files: list[str], record: dict) -> dict[str, str] | None:
        """Store `files` of `folder` (hard links, and `record`) as entry `key`. -> the files' sha256, or None
        when it could not (a full disk, a read-only cache: the export goes on without caching)."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{key[:12]}-", dir=self.root))
        except OSError:
            return None
        try:
            digests, stats = {}, {}
            for name in files:
                place(folder / name, staging / name)
                st = (staging / name).stat()
                digests[name], stats[name] = _sha256(staging / name), [st.st_size, st.st_mtime_ns]
            (staging / RECORD).write_text(json.dumps({**record, "sha256": digests, "stat": stats}, indent=1))
            staging.chmod(0o755)
            os.rename(staging, self.root / key)  # atomic; fails if another export stored it meanwhile
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
            return None
        self.evict(keep=key)
        return digests

    def entries(self) -> list[tuple[float, int, Path]]:
        """(last use, bytes, folder) of every complete entry."""
        out = []
        for entry in self.root.iterdir() if self.root.is_dir() else []:
            record = entry / RECORD
            if not entry.name.startswith(".") and record.is_file():
                size = sum(f.stat().st_size for f in entry.iterdir() if f.is_file())
                out.append((record.stat().st_mtime, size, entry))
        return sorted(out)

    def evict(self, keep: str | None = None) -> None:
        entries = self.entries()
        total = sum(size for _, size, _ in entries)
        for _, size, entry in entries:
            if total <= self.max_bytes:
                break
            if entry.name != keep:
                shutil.rmtree(entry, ignore_errors=True)
                total -= size
