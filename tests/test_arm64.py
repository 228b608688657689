"""An aarch64 board in the cluster: device 1 of a P=2 deployment runs `prism run` inside a Debian arm64 root
under qemu-user (binfmt_misc), on the board's core install (this checkout's wheel, with the aarch64 wheels
of onnxruntime, numpy, pyzmq, tokenizers, pillow and click from PyPI; tests/arm64_root.py builds it once
under out/arm64-root). Device 0 runs on this x86-64 host; a client on the host sends the requests. Loopback
only, CurveZMQ on as in production.

Bound: the replies equal the in-process executor (all devices on this host) within 1e-4 absolute. Both run
the same ONNX graphs in float32 and the means cross the same wire encoding, but device 1's onnxruntime is
the aarch64 build: its MLAS kernels (NEON; qemu emulates the float32 arithmetic exactly) add in another
order and fuse other multiply-adds than the host's x86 kernels, so results differ in the last bits (~1e-7
relative per operation), and over a few layers of activations of order 1 that stays near 1e-6 (MiniLM,
measured by hand before this test: 1.3e-6). 1e-4 leaves a 100x margin and is still far below what a wrong
plan or a lost or misdecoded exchange gives: the same request computed without device 1's means differs by
more than 1e-2 (asserted below, so the comparison is shown to discriminate).

Long (`make test-long`, or `make test-arm64` alone): building the root takes minutes once (debootstrap's
second stage and pip run under emulation); later runs reuse it. Skipped, with the reason, on a machine that
cannot run it (not root, no binfmt_misc); CI runs as root and runs it. No assertion depends on timing;
timeouts are generous because everything on device 1 runs emulated.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from arm64_root import VENV, Unavailable, ensure_root, in_root
from conftest import as_served, inputs_for_arch, minilm_path, sst2_sentences
from prism_onnx.runtime.cluster import LocalCluster
from prism_onnx.runtime.executor import Executor

pytestmark = [pytest.mark.long, pytest.mark.arm64]
TOLERANCE = 1e-4  # see the module docstring


@pytest.fixture(scope="module")
def board():
    """The arm64 root (built on first use, reused after) with this checkout installed; what its python
    reports about itself. Its /proc is mounted while the tests run, as a board's is: onnxruntime opens a
    graph's external data (the embedding table) through /proc/self/fd, and refuses it without /proc."""
    try:
        info = ensure_root()
    except Unavailable as e:
        pytest.skip(f"no emulated aarch64 board on this machine: {e}")
    proc = Path(info["root"]) / "proc"
    proc.mkdir(exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "proc", "proc", str(proc)], capture_output=True, text=True)
    assert mounted.returncode == 0, mounted.stderr
    try:
        yield info
    finally:
        subprocess.run(["umount", "-l", str(proc)], capture_output=True)


def test_the_board_is_aarch64_with_the_core_install_only(board):
    root = Path(board["root"])
    assert board["machine"] == "aarch64"  # platform.machine() of the root's python, under qemu
    # the venv's python is a symlink (absolute, within the root): resolve it inside, read its ELF header outside
    exe = subprocess.run(in_root(root, "readlink", "-f", f"{VENV}/bin/python"), capture_output=True, text=True,
                         timeout=300).stdout.strip()
    elf = subprocess.run(["file", "-b", str(root / exe.lstrip("/"))], capture_output=True, text=True).stdout
    assert exe and "ARM aarch64" in elf, (exe, elf)
    code = ("import importlib.util as u; "
            "print([m for m in ('torch', 'transformers', 'onnx', 'optimum') if u.find_spec(m)])")
    p = subprocess.run(in_root(root, f"{VENV}/bin/python", "-c", code), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and p.stdout.strip() == "[]", p.stderr


def minilm_bundle(folder: Path) -> Path:
    from prism_onnx.exporters.bundle import ExportSettings, export

    return export(minilm_path(), folder, ExportSettings(devices=2, compression_ratio=4, max_seq_len=128))


def minilm_inputs() -> dict:
    from transformers import AutoTokenizer

    enc = AutoTokenizer.from_pretrained(minilm_path())(sst2_sentences(4), padding=True, return_tensors="np")
    return {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)}


def qemu_runs(pid: int) -> str:
    """The program the kernel runs as process pid: the binfmt_misc interpreter (qemu-aarch64) for an aarch64
    executable."""
    return os.path.realpath(f"/proc/{pid}/exe")


@pytest.mark.parametrize("model", ["tiny-bert", "minilm"])
def test_a_cluster_across_x86_and_aarch64_equals_the_executor(board, model, make_bundle, tmp_path):
    if model == "minilm":
        bundle, inputs = minilm_bundle(tmp_path / "minilm"), minilm_inputs()
    else:
        bundle, inputs = make_bundle("BertModel", devices=2, compression_ratio=2), inputs_for_arch("BertModel")
    root = Path(board["root"])
    # device 1's folder, and only it, on the board, at the same path as on the host
    on_board = root / bundle.resolve().relative_to("/")
    shutil.copytree(bundle / "device-1", on_board / "device-1")
    ex = Executor(bundle)
    try:
        with LocalCluster(bundle, prefix=lambda k: in_root(root) if k == 1 else [],
                          python={1: f"{VENV}/bin/python"}, timeout=120.0, ready_timeout=900.0,
                          extra_args=["--peer-timeout", "900", "--heartbeat-timeout", "60"]) as cluster:
            runner = qemu_runs(cluster.procs[1].pid)
            outputs, stats = cluster.client.infer(input_ids=inputs["input_ids"],
                                                  attention_mask=inputs["attention_mask"])
            short = {k: v[:1, :5] for k, v in inputs.items()}  # another length, one row
            outputs2, stats2 = cluster.client.infer(**short)
    finally:
        shutil.rmtree(on_board, ignore_errors=True)

    assert "qemu-aarch64" in runner, runner  # device 1 really ran emulated, not on the host's python
    for reply, request, got in ((stats, inputs, outputs), (stats2, short, outputs2)):
        assert reply["ranks"] == [0, 1]  # both devices computed it, device 1's means were exchanged
        assert reply["bytes_received"][0] > 0 and reply["bytes_sent"][1] > 0
        expected = as_served(ex, request, reply)
        # a sentence-transformers export's replies add the pooled embedding (issue 23); the rest as executed
        assert set(expected) <= set(got) and set(got) - set(expected) <= {"sentence_embedding"}, set(got)
        for name in expected:
            assert got[name].shape == expected[name].shape, name
            diff = float(np.abs(got[name] - expected[name]).max())
            print(f"{model} {name} {got[name].shape}: max |aarch64 cluster - executor| = {diff:.2e}")
            assert diff <= TOLERANCE, (name, diff)
    # the bound discriminates: without device 1 (its means never received) the outputs are far off
    alone = ex.run(inputs, ranks=[0]).outputs["last_hidden_state"]
    off = float(np.abs(alone - outputs["last_hidden_state"]).max())
    print(f"{model}: max |device 0 alone - cluster| = {off:.2e}")
    assert off > 1e-2
