"""Every mistake a new user makes (issue 15) ends the same way: a non-zero exit code, one line on stderr
that names the problem, no traceback; with --json, the error shape {"error": {"type", "message"}} on
stdout. One table, each case run with and without --json (click's CliRunner: in process, no hub, tiny
random models of tests/conftest.py). The cases that need processes (runners, a port where nothing
listens) are the few subprocess calls below.

Vocabulary: a *case* is (name, argv builder, expected error type, a fragment the message must contain);
the argv builder gets a `Setup` (a tiny export, a tampered copy, a free port...) built once per module.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from gguf_files import write_metadata_only
from prism_onnx.cli import main


@dataclass
class Setup:
    model: Path  # a tiny BERT folder (with MiniLM's tokenizer)
    export: Path  # its export: 2 devices, CR 4, --max-seq-len 16
    tampered: Path  # a copy of it with one byte of device-0's first graph changed
    not_a_model: Path  # a folder with a text file in it
    free_port: int  # a port where nothing listens
    ggufs: Path  # not.gguf (random bytes), bert.gguf (an architecture transformers' GGUF reader lacks),
    #              qwen3.gguf (one prism lacks), two/ (a folder with two .gguf files)


@pytest.fixture(scope="module")
def setup(tiny_dirs, exported_graphs, tmp_path_factory) -> Setup:
    from prism_onnx.exporters.bundle import ExportSettings, write_bundles
    from prism_onnx.runtime.cluster import free_ports

    root = tmp_path_factory.mktemp("cli-errors")
    export = write_bundles(exported_graphs["BertModel"], root / "export",
                           ExportSettings(devices=2, compression_ratio=4, max_seq_len=16))
    tampered = root / "tampered"
    shutil.copytree(export, tampered)
    graph = sorted((tampered / "device-0").glob("*.onnx"))[0]
    data = bytearray(graph.read_bytes())
    data[-1] ^= 1
    graph.write_bytes(bytes(data))
    not_a_model = root / "notes"
    not_a_model.mkdir()
    (not_a_model / "README.txt").write_text("not a model")
    ggufs = root / "ggufs"
    (ggufs / "two").mkdir(parents=True)
    (ggufs / "not.gguf").write_bytes(np.random.default_rng(0).bytes(4096))
    write_metadata_only(ggufs / "bert.gguf", "bert")
    write_metadata_only(ggufs / "qwen3.gguf", "qwen3")
    for name in ("a.gguf", "b.gguf"):
        shutil.copyfile(ggufs / "qwen3.gguf", ggufs / "two" / name)
    return Setup(tiny_dirs["BertModel"], Path(export), tampered, not_a_model, free_ports(1)[0], ggufs)


def _export(s: Setup, *more: str) -> list[str]:
    return ["export", str(s.model), "--out", str(s.model.parent / "unused-out"), "-P", "2", "--cr", "4", *more]


def _export_of(source) -> list[str]:
    return ["export", str(source), "--out", str(Path(source).parent / "unused-out"), "-P", "2", "--cr", "1"]


# (name, argv(setup), error type under --json, a fragment of the message)
CASES = [
    ("split with a negative weight", lambda s: _export(s, "--split", "1,-1"), "BadParameter", "'-1'"),
    ("split with a zero weight", lambda s: _export(s, "--split", "0,1"), "BadParameter", "positive"),
    ("split that is not numbers", lambda s: _export(s, "--split", "1,x"), "BadParameter", "'x' is not a number"),
    ("split with a weight too many", lambda s: _export(s, "--split", "1,1,1"), "BadParameter", "3 weights for 2"),
    ("export of a missing folder", lambda s: ["export", str(s.model.parent / "nowhere"), "--out",
                                              str(s.model.parent / "o"), "-P", "2", "--cr", "4"],
     "ModelLoadError", "nowhere"),
    ("export of a folder that is not a model", lambda s: ["export", str(s.not_a_model), "--out",
                                                          str(s.model.parent / "o"), "-P", "2", "--cr", "4"],
     "ModelLoadError", "notes"),
    ("export of a hub id not cached, hub offline", lambda s: ["export", "no-such-org/no-such-model", "--out",
                                                              str(s.model.parent / "o"), "-P", "2", "--cr", "4"],
     "ModelLoadError", "no-such-org/no-such-model"),
    ("export of a .gguf file that is not GGUF", lambda s: _export_of(s.ggufs / "not.gguf"), "ModelLoadError",
     "not.gguf' is not a GGUF file"),
    ("export of a GGUF file transformers cannot read", lambda s: _export_of(s.ggufs / "bert.gguf"),
     "ModelLoadError", "architecture bert is not supported"),
    ("simulate of a GGUF file of an unsupported model type", lambda s: ["simulate", str(s.ggufs / "qwen3.gguf"), "-P",
                                                                      "2", "--cr", "1", "--input-ids", "1,2"],
     "ModelLoadError", "unsupported model type 'qwen3'"),
    ("export of a folder with two GGUF files", lambda s: _export_of(s.ggufs / "two"), "ModelLoadError",
     "holds 2 GGUF files (a.gguf, b.gguf); pass one of them"),
    ("export of a missing GGUF file", lambda s: _export_of(s.ggufs / "missing.gguf"), "ModelLoadError",
     "missing.gguf': no such GGUF file"),
    ("export without --cr", lambda s: ["export", str(s.model), "--out", "o", "-P", "2"], "MissingParameter",
     "--compression-ratio"),
    ("opset below 18", lambda s: _export(s, "--opset", "11"), "BadParameter", "--opset"),
    ("simulate with two kinds of input", lambda s: ["simulate", str(s.model), "-P", "2", "--cr", "4", "--text", "a",
                                                    "--input-ids", "1,2"], "UsageError", "exactly one of"),
    ("simulate with ids that are not integers", lambda s: ["simulate", str(s.model), "-P", "2", "--cr", "4",
                                                           "--input-ids", "1,b"], "InputError", "'1,b'"),
    ("simulate of a text longer than --max-seq-len", lambda s: ["simulate", str(s.model), "-P", "2", "--cr", "4",
                                                                "--input-ids", ",".join(["7"] * 80)],
     "InputError", "80 tokens"),
    ("inspect --verify of a tampered bundle", lambda s: ["inspect", str(s.tampered), "--verify"], "BundleError",
     "device-0"),
    ("validate of a folder that is no export", lambda s: ["validate", str(s.not_a_model)], "BundleError", "notes"),
    ("infer: a server without a port", lambda s: ["infer", "--server", "localhost", "--insecure", "--input-ids", "1"],
     "InputError", "expected HOST:PORT"),
    ("infer: a port that is not a number", lambda s: ["infer", "--server", "127.0.0.1:abc", "--insecure",
                                                      "--input-ids", "1"], "InputError", "'abc' is not a number"),
    ("infer: a port where nothing listens", lambda s: ["infer", "--server", f"127.0.0.1:{s.free_port}", "--insecure",
                                                       "--input-ids", "1"], "ServerLost", "connection refused"),
    ("infer without keys nor --insecure", lambda s: ["infer", "--server", "127.0.0.1:1", "--input-ids", "1"],
     "UsageError", "--keys"),
    ("infer: a server given as a port only", lambda s: ["infer", "--server", "5600", "--insecure", "--input-ids", "1"],
     "InputError", "expected HOST:PORT, e.g. localhost:5600 "),
    ("infer --save where no folder can be made", lambda s: [
        "infer", "--server", f"127.0.0.1:{s.free_port}", "--insecure", "--input-ids", "1", "--save",
        str(s.not_a_model / "README.txt" / "out.npz")], "InputError", "cannot create the folder"),
    ("infer --split that is not numbers", lambda s: ["infer", "--server", "127.0.0.1:1", "--insecure",
                                                     "--input-ids", "1", "--split", "1,x"],
     "BadParameter", "'x' is not a number"),
    ("export into a folder that is not empty", lambda s: _export(s, "--out", str(s.export)), "BadParameter",
     "exists and is not empty; choose another --out or pass --overwrite"),
    ("export with --max-seq-len beyond the model's positions", lambda s: _export(s, "--max-seq-len", "1000"),
     "BadParameter", "1000 is more tokens than the model's positions (64 in its config.json)"),
    ("run with an execution provider onnxruntime lacks", lambda s: [
        "run", str(s.export / "device-0"), "--peers", "127.0.0.1:1,127.0.0.1:2", "--provider", "NoSuch"],
     "InputError", "NoSuchExecutionProvider not available here; this onnxruntime has"),
    ("run with an unknown graph optimization level", lambda s: [
        "run", str(s.export / "device-0"), "--peers", "127.0.0.1:1,127.0.0.1:2", "--graph-optimization", "max"],
     "BadParameter", "--graph-optimization"),
    ("run with too few --peers", lambda s: ["run", str(s.export / "device-0"), "--peers", "127.0.0.1:1",
                                            "--insecure"], "UsageError", "--peers lists 1 devices"),
    ("run with --serve on its own peer port", lambda s: ["run", str(s.export / "device-0"), "--peers",
                                                         "127.0.0.1:5611,127.0.0.1:5612", "--serve", "5611",
                                                         "--insecure"],
     "UsageError", "--serve 5611 is this device's own peer port in --peers"),
    ("run with a --split with an empty weight", lambda s: ["run", str(s.export / "device-0"), "--peers",
                                                           "127.0.0.1:1,127.0.0.1:2", "--insecure", "--split", "1,,2"],
     "UsageError", "--split '1,,2'"),
    ("run with a --peers entry without a port", lambda s: ["run", str(s.export / "device-0"), "--peers",
                                                           "127.0.0.1,127.0.0.1:2", "--insecure"],
     "UsageError", "'127.0.0.1' is not HOST:PORT"),
    ("run with a --split of the wrong count", lambda s: ["run", str(s.export / "device-0"), "--peers",
                                                         "127.0.0.1:1,127.0.0.1:2", "--insecure", "--split", "1,1,1"],
     "UsageError", "expected 2 positive weights"),
    ("run with a --split that is no mode", lambda s: ["run", str(s.export / "device-0"), "--peers",
                                                      "127.0.0.1:1,127.0.0.1:2", "--insecure", "--split", "fast"],
     "UsageError", "expected auto, even, or 2"),
    ("bench with a --slow-device rank the export lacks", lambda s: ["bench", str(s.export), "--no-latency",
                                                                    "--slow-device", "5:0.5"],
     "BadParameter", "RANK must be 0..1"),
    ("bench with --clients that are not numbers", lambda s: ["bench", str(s.export), "--no-latency", "--clients",
                                                             "1,x"], "BadParameter", "'1,x'"),
    ("launch with a kill of a rank the export lacks", lambda s: ["launch", str(s.export), "--input-ids", "1,2",
                                                                 "--kill", "5@1"], "UsageError", "--kill 5@1"),
]


def stderr_lines(r) -> list[str]:
    return [ln for ln in r.stderr.splitlines() if ln.strip()]


USAGE = ("UsageError", "BadParameter", "NoSuchOption", "MissingParameter")


@pytest.mark.parametrize("name, argv, kind, fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_the_json_error_shape(setup, name, argv, kind, fragment):
    args = argv(setup)
    r = CliRunner().invoke(main, args)
    assert r.exit_code == (2 if kind in USAGE else 1), r.output  # README: 2 for a misused option, 1 otherwise
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)  # no uncaught error
    lines = stderr_lines(r)
    assert len(lines) == 1 and lines[0].startswith("Error: ") and fragment in lines[0], r.stderr
    assert "Traceback" not in r.output and r.stdout == ""

    j = CliRunner().invoke(main, [*args, "--json"])
    assert j.exit_code == r.exit_code and "Traceback" not in j.output
    error = json.loads(j.stdout)["error"]
    assert error["type"] == kind and fragment in error["message"], error
    assert not stderr_lines(j), j.stderr


def prism(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`prism ...` in a process of its own (what a user's shell runs)."""
    return subprocess.run([sys.executable, "-m", "prism_onnx.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_a_real_process_prints_one_line_and_no_traceback(setup):
    """The table above runs in process; here the same contract holds for `python -m prism_onnx.cli`."""
    r = prism("infer", "--server", f"127.0.0.1:{setup.free_port}", "--insecure", "--input-ids", "1,2")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "connection refused" in r.stderr
    r = prism("infer", "--server", "localhost", "--insecure", "--input-ids", "1", "--json")
    assert r.returncode == 1 and r.stderr == ""
    assert json.loads(r.stdout)["error"]["type"] == "InputError"


def test_a_text_longer_than_max_seq_len_is_refused_by_the_runners(setup):
    """launch: the runners refuse it with its length (never cut silently), one line, exit 1; under --json its
    type is the cluster's own: an InputError (code too_long), not a wrapper of the client's."""
    args = ["launch", str(setup.export), "--insecure", "--input-ids", ",".join(["7"] * 40)]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1 and "Traceback" not in r.output
    lines = stderr_lines(r)
    assert len(lines) == 1 and "40 tokens" in lines[0] and "--max-seq-len 16" in lines[0], r.stderr
    assert lines[0].startswith("Error: InputError: ")
    j = CliRunner().invoke(main, [*args, "--json"])
    assert j.exit_code == 1 and json.loads(j.stdout)["error"]["type"] == "InputError"


def test_runners_given_different_peers_lists_say_so_and_stop(setup):
    """Device 1 lists itself on another port than device 0 lists it on: device 0 hears device 1's HELLO,
    refuses it naming the entry that differs, and stops (exit 1) instead of waiting --peer-timeout with
    'lost' lines. Device 1 stops too (exit 1): on device 0's REFUSE, which names the same entry, or, when
    that message is lost with device 0's exit, at its --peer-timeout (device 0 is unreachable at the
    port device 1 was given)."""
    from prism_onnx.runtime.cluster import free_ports

    p0, p1, p2 = free_ports(3)
    lists = [f"127.0.0.1:{p0},127.0.0.1:{p1}", f"127.0.0.1:{p0},127.0.0.1:{p2}"]
    procs = [subprocess.Popen([sys.executable, "-m", "prism_onnx.cli", "run", str(setup.export / f"device-{k}"),
                               "--peers", lists[k], "--insecure", "--peer-timeout", "30"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in range(2)]
    try:
        logs = [p.communicate(timeout=120)[1] for p in procs]
    finally:
        for p in procs:
            p.kill()
    line = f"--peers lists differ: rank 1 is 127.0.0.1:{p2} for device 1, 127.0.0.1:{p1} for device 0"
    assert procs[0].returncode == 1 and line in logs[0], logs[0]
    assert procs[1].returncode == 1 and (line in logs[1] or "did not come up" in logs[1]), logs[1]
    assert "Traceback" not in logs[0] + logs[1]


def test_success_has_the_one_json_shape(setup, tmp_path):
    """Every command's --json: {"command", "settings", ...results}; `export` has --json too."""
    r = CliRunner().invoke(main, ["inspect", str(setup.export), "--json"])
    rep = json.loads(r.stdout)
    assert r.exit_code == 0 and rep["command"] == "inspect" and rep["settings"]["devices"] == 2
    r = CliRunner().invoke(main, ["export", str(setup.model), "--out", str(tmp_path / "e"), "-P", "2", "--cr", "4",
                                  "--split", "2,1", "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["command"] == "export" and rep["settings"]["split_weights"] == [2.0, 1.0]
    assert rep["devices"] == 2 and (tmp_path / "e" / "device-1" / "manifest.json").exists()
    r = CliRunner().invoke(main, ["keys", str(tmp_path / "e"), "--add-client", "ci", "--json"])
    rep = json.loads(r.stdout)
    assert rep["command"] == "keys" and rep["settings"] == {"export_dir": str(tmp_path / "e"), "add": "ci"}


def test_every_option_has_help():
    import click

    missing = [(name, p.opts) for name, cmd in main.commands.items() for p in cmd.params
               if isinstance(p, click.Option) and not p.help]
    assert not missing


@pytest.mark.parametrize("argv", [
    lambda s: _export(s, "--out", str(s.export)),
    lambda s: _export(s, "--max-seq-len", "1000"),
    lambda s: _export(s, "--max-seq-len", "1"),
    lambda s: ["export", str(s.not_a_model), "--out", str(s.model.parent / "o"), "-P", "2", "--cr", "4"],
    lambda s: ["run", str(s.export / "device-0"), "--peers", "127.0.0.1:1,127.0.0.1:2", "--split", "1,,2"],
], ids=["export --out not empty", "export --max-seq-len too long", "export --max-seq-len below P",
        "export of a folder that is no model", "run --split malformed"])
def test_option_mistakes_are_refused_before_torch_is_imported(setup, argv):
    """Issue 23: export's option mistakes surfaced after 15-18 s of loading torch and the model; now they are
    found first (prism_onnx/precheck.py): the process that refuses them has not imported torch."""
    code = ("import sys; from click.testing import CliRunner; from prism_onnx.cli import main; "
            "r = CliRunner().invoke(main, sys.argv[1:]); print(r.exit_code, 'torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code, *argv(setup)], capture_output=True, text=True, timeout=120)
    exit_code, torch_imported = r.stdout.split()
    assert exit_code in ("1", "2") and torch_imported == "False", r.stdout + r.stderr


def test_save_target_creates_folders_and_names_the_file_it_writes(tmp_path):
    """--save (issue 23): the suffix numpy adds is in the name reported; a folder (existing, or ending with
    '/') gets 000000.npz; missing folders are created before any work; a batch file's folder too."""
    from prism_onnx.errors import InputError
    from prism_onnx.runtime.batch_client import save_target

    assert save_target(tmp_path / "a" / "b" / "out2") == tmp_path / "a" / "b" / "out2.npz"
    assert (tmp_path / "a" / "b").is_dir()
    assert save_target(str(tmp_path / "c") + "/") == tmp_path / "c" / "000000.npz"
    assert save_target(tmp_path / "a") == tmp_path / "a" / "000000.npz"  # an existing folder
    assert save_target(tmp_path / "d" / "x.npz") == tmp_path / "d" / "x.npz"
    assert save_target(tmp_path / "batch", folder=True) == tmp_path / "batch" and (tmp_path / "batch").is_dir()
    (tmp_path / "file").write_text("")
    with pytest.raises(InputError, match="names a folder"):
        save_target(tmp_path / "file", folder=True)


def test_launch_saves_into_missing_folders_and_one_file_per_request(setup, tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("a gripping, funny film\ndull\n")
    r = CliRunner().invoke(main, ["launch", str(setup.export), "--insecure", "--texts-file", str(texts), "--save",
                                  str(tmp_path / "new" / "runs")])
    assert r.exit_code == 0, r.output
    records = [json.loads(line) for line in r.stdout.splitlines()]
    assert [rec["saved"] for rec in records] == [str(tmp_path / "new" / "runs" / f"00000{i}.npz") for i in (0, 1)]
    assert all(np.load(rec["saved"])["last_hidden_state"].shape[0] == 1 for rec in records)
    r = CliRunner().invoke(main, ["launch", str(setup.export), "--insecure", "--text", "dull", "--save",
                                  str(tmp_path / "missing" / "out2"), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["saved"] == str(tmp_path / "missing" / "out2.npz")
    assert set(np.load(tmp_path / "missing" / "out2.npz").files) == {"last_hidden_state", "pooler_output"}


def test_insecure_against_a_keyed_cluster_says_to_give_keys(setup):
    """Issue 23: `prism infer --insecure` against runners that speak CurveZMQ said "closed the connection (...
    over its size limit)"; now one line says why: plain text to a keyed runner, give --keys EXPORT_DIR/client."""
    from prism_onnx.runtime.cluster import LocalCluster

    with LocalCluster(setup.export) as cluster:
        r = CliRunner().invoke(main, ["infer", "--server", cluster.serve_address, "--insecure", "--input-ids", "1,2",
                                      "--timeout", "20"])
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    lines = stderr_lines(r)
    assert len(lines) == 1 and "this client speaks plain text (--insecure)" in lines[0], r.stderr
    assert "give --keys EXPORT_DIR/client" in lines[0] and "size limit" not in lines[0]
