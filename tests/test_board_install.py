"""A board's install: the project's wheel with its core dependencies only (no torch, no transformers, no
onnx), in a virtualenv of its own. `prism run`, `infer`, `launch` and `inspect` work on a bundle; the
commands that load PyTorch models say what to install, in one line, with a non-zero exit.

Long (`make test-long`): pip installs the core dependencies into a fresh virtualenv (a minute on 2 cores).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import inputs_for_arch

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.long


@pytest.fixture(scope="module")
def board(tmp_path_factory) -> Path:
    """bin/ of a virtualenv holding prism-onnx and its core dependencies only."""
    root = tmp_path_factory.mktemp("board")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(root / "dist"), str(REPO)],
                   check=True, capture_output=True)
    subprocess.run([sys.executable, "-m", "venv", str(root / "venv")], check=True)
    wheel = next((root / "dist").glob("prism_onnx-*.whl"))
    subprocess.run([str(root / "venv/bin/pip"), "install", "-q", str(wheel)], check=True, capture_output=True)
    return root / "venv/bin"


def prism(board: Path, *args, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([str(board / "prism"), *map(str, args)], capture_output=True, text=True, timeout=timeout)


def test_the_core_install_has_no_torch(board):
    p = subprocess.run([str(board / "python"), "-c", "import importlib.util as u; "
                        "print([m for m in ('torch', 'transformers', 'onnx', 'optimum') if u.find_spec(m)])"],
                       capture_output=True, text=True, check=True)
    assert p.stdout.strip() == "[]"


def test_run_infer_launch_and_inspect_work_on_a_board(board, make_bundle, tmp_path):
    bundle = make_bundle("BertModel", devices=2, compression_ratio=2)
    r = prism(board, "inspect", bundle, "--verify", "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["verified"] and "ops" not in rep["graphs"]["embed"]  # no onnx here: sizes only
    r = prism(board, "launch", bundle, "--input-ids", "101,2023,2003,102", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["outputs"]["last_hidden_state"]["shape"] == [1, 4, 32]
    r = prism(board, "profile", bundle / "device-1", "--seq-len", "16", "--repeats", "1", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["weight"] > 0  # this board's speed, for `prism run --split`

    # prism run (two runners) + prism infer, all from the board's install
    code = (f"import sys, json\nfrom prism_onnx.runtime.cluster import LocalCluster\n"
            f"c = LocalCluster({str(bundle)!r}).__enter__()\nprint(json.dumps([c.serve_address]), flush=True)\n"
            f"sys.stdin.read()\nc.close()\n")
    cluster = subprocess.Popen([str(board / "python"), "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               text=True)
    try:
        address = json.loads(cluster.stdout.readline())[0]
        ids = ",".join(map(str, inputs_for_arch("BertModel")["input_ids"][0][:9]))
        r = prism(board, "infer", "--server", address, "--keys", bundle / "client", "--input-ids", ids, "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["outputs"]["pooler_output"]["shape"] == [1, 32]
    finally:
        cluster.communicate("", timeout=60)


@pytest.mark.parametrize("command", [["export", "some-model", "-P", "2", "--cr", "2", "--out", "x"],
                                     ["simulate", "some-model", "-P", "2", "--cr", "2", "--input-ids", "1,2"],
                                     ["validate", "BUNDLE"], ["bench", "BUNDLE"], ["evaluate", "--task", "sst2"]])
def test_commands_that_need_pytorch_say_what_to_install(board, make_bundle, command):
    bundle = make_bundle("BertModel", devices=2, compression_ratio=2)
    r = prism(board, *[bundle if a == "BUNDLE" else a for a in command])
    assert r.returncode != 0
    assert 'pip install "prism-onnx[export]"' in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
