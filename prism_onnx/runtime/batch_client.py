"""The batch client (`prism infer --texts-file F` / `--ids-file F`): one request per line of F, in order, one
JSON line per request on stdout; for real use and for measuring (failover, latency, traffic).

F is read lazily, line by line (`-` is stdin), so a pipe can feed requests as they come. Each record:
    index          the 0-based line number
    ok, error      whether the request succeeded; the server's (or the client's) one-line error
    latency_ms     measured by the client: request sent -> reply, failovers and reruns included
    devices        the ranks that computed it (the plan in force); `spans`: their tokens [start, end) in order;
                   `split_weights`: their split weights (null: as even as possible)
    bytes          bytes the devices sent each other for it (the sum of their own counters)
    attempts       attempts the coordinator made (2 or more: rerun after a lost device); `reruns`: why
    server         the HOST:PORT that answered; `failovers`: the servers lost first, with their errors
With `save`, each request's outputs go to SAVE/NNNNNN.npz (its line number, six digits), under the
transformers names (`generated_ids` for generation; `sentence_embedding` for a sentence-transformers export).
`save_target` resolves a --save argument before any request is sent (folders created, the file named as it
will be written), so that a path that cannot be written fails at once, in one line, and no work is lost.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from ..errors import InputError, PrismError


def save_target(save: str | os.PathLike, folder: bool = False) -> Path:
    """Where `--save SAVE` writes, checked before any request runs: a folder (`folder`: a batch file's
    NNNNNN.npz files; or SAVE names an existing folder or ends with '/': then its 000000.npz), else the
    file SAVE, with the `.npz` suffix numpy adds when it is missing. Missing folders are created; a path
    that cannot be written is an InputError naming it."""
    text = os.fspath(save)
    path = Path(text)
    as_folder = folder or path.is_dir() or text.endswith(("/", os.sep))
    if folder and path.exists() and not path.is_dir():
        raise InputError(f"--save {text}: with a batch file, --save names a folder (NNNNNN.npz per request), and "
                         f"{text} is a file")
    target = path / "000000.npz" if as_folder and not folder else path
    if not folder and target.suffix != ".npz":
        target = target.with_name(target.name + ".npz")
    where = target if folder else target.parent
    try:
        where.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"--save {text}: cannot create the folder {where}: {e.strerror or e}") from None
    if not os.access(where, os.W_OK) or (target.exists() and not folder and not os.access(target, os.W_OK)):
        raise InputError(f"--save {text}: {target if target.exists() and not folder else where} is not writable")
    return target


def write_npz(target: Path, outputs: dict) -> str:
    """Write the outputs to `target` (save_target's); an error writing it is an InputError naming it."""
    try:
        np.savez(target, **outputs)
    except OSError as e:
        raise InputError(f"--save: cannot write {target}: {e.strerror or e}") from None
    return str(target)


def read_lines(path: str) -> Iterator[tuple[int, str]]:
    """(index, line without its newline), lazily; `-` reads stdin."""
    f = sys.stdin if path == "-" else open(path, encoding="utf-8")
    try:
        for i, line in enumerate(f):
            yield i, line.rstrip("\r\n")
    finally:
        if f is not sys.stdin:
            f.close()


def parse_line(line: str, kind: str) -> dict:
    """One line -> the keyword arguments of Client.infer/generate: a text, or comma-separated token ids."""
    if kind == "texts":
        return {"texts": [line]}
    try:
        ids = [int(x) for x in line.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise InputError("ids must be comma-separated integers") from None
    if not ids:
        raise InputError("an ids line needs at least one id")
    return {"input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, len(ids)), np.int64)}


def record(index: int, ok: bool, error: str | None, latency_s: float, reply: dict | None, client) -> dict:
    stats = (reply or {}).get("stats") or {}
    return {"index": index, "ok": ok, "error": error, "latency_ms": round(1e3 * latency_s, 3),
            "devices": stats.get("ranks"), "spans": stats.get("spans"), "split_weights": stats.get("split_weights"),
            "bytes": sum(stats["bytes_sent"]) if stats.get("bytes_sent") is not None else None,
            "attempts": (reply or {}).get("attempts"), "reruns": (reply or {}).get("reruns"),
            "server": client.last_server.removeprefix("tcp://") if ok and client.last_server else None,
            "failovers": list(client.last_failovers) if ok else None}


def run_batch(client, lines, kind: str, save: str | Path | None = None, generate=None,
              emit: Callable[[dict], None] | None = None) -> tuple[int, int]:
    """Send each (index, line) of `lines` as one request, in order; emit one record per request (default:
    a JSON line on stdout, flushed). `kind`: "texts" or "ids"; `generate`: a GenerationConfig to generate
    instead of running the model's heads. -> (requests, failed)."""
    emit = emit or (lambda r: print(json.dumps(r), flush=True))
    folder = save_target(save, folder=True) if save else None
    n = failed = 0
    for index, line in lines:
        n += 1
        t0 = time.monotonic()
        try:
            kwargs = parse_line(line, kind)
            if generate is not None:
                ids, reply = client.generate(**kwargs, config=generate)
                width = max(map(len, ids)) if ids else 0
                outputs = {"generated_ids": np.array([r + [-1] * (width - len(r)) for r in ids], np.int64)}
            else:
                outputs, _ = client.infer(**kwargs)
                reply = client.last_reply
            latency = time.monotonic() - t0
            saved = write_npz(folder / f"{index:06d}.npz", outputs) if folder is not None else None
            emit({**record(index, True, None, latency, reply, client), **({"saved": saved} if saved else {})})
        except PrismError as e:
            failed += 1
            emit(record(index, False, str(e), time.monotonic() - t0, None, client))
    return n, failed
