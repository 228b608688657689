"""An aarch64 board for the tests: a Debian arm64 root (bookworm, minbase) run under qemu-user through
binfmt_misc, with the project's core install in /venv (the wheel and its dependencies from PyPI, no torch).

    python tests/arm64_root.py [--out out/arm64-root]     # build once, or reuse; then install this checkout

The root is built once and cached under out/arm64-root: it is built under a temporary name and renamed
when complete, with a stamp naming what it was built from (Debian suite, packages, the wheel's
dependencies), so a run killed half-way leaves nothing that looks finished; the next run removes it and
builds again. Every use reinstalls the current checkout's wheel (no dependencies: a few seconds).

Needs root (debootstrap, chroot, binfmt_misc) and Debian's qemu-user-static and debootstrap (installed
with apt-get when missing). `Unavailable` says why a machine cannot have the board (not root, binfmt_misc
cannot be mounted or written); anything else that fails (a mirror, PyPI) is an error.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ROOT = REPO / "out" / "arm64-root"
SUITE = "bookworm"
PACKAGES = ["python3", "python3-venv", "python3-pip"]
MIRROR = os.environ.get("PRISM_ARM64_MIRROR", "http://deb.debian.org/debian")
BINFMT = Path("/proc/sys/fs/binfmt_misc")
BINFMT_CONF = Path("/usr/lib/binfmt.d/qemu-aarch64.conf")  # installed by qemu-user-static
STAMP = ".prism-arm64-root.json"
VENV = "/venv"  # inside the root
# chroot runs with a clean environment: the host's PIP_CERT, find-links or PYTHONPATH name host paths.
HOST_CA = Path(os.environ.get("PIP_CERT") or "/etc/ssl/certs/ca-certificates.crt")
ROOT_CA = "/etc/ssl/certs/host-ca.crt"  # the host's CA bundle, copied in: pip trusts what the host trusts
PASS_ENV = ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "PIP_INDEX_URL",
            "PIP_DEFAULT_TIMEOUT")


class Unavailable(RuntimeError):
    """This machine cannot run an emulated aarch64 root (the reason is the message)."""


def log(msg: str) -> None:
    print(f"[arm64-root] {msg}", file=sys.stderr, flush=True)


def chroot_env(root: Path) -> list[str]:
    """`env -i ...` for a command run with chroot: PATH, HOME, a UTF-8 locale, the host's proxies and CA
    bundle (a proxy that intercepts TLS is trusted inside as outside)."""
    keep = [f"{k}={os.environ[k]}" for k in PASS_ENV if os.environ.get(k)
            and not (k == "PIP_INDEX_URL" and os.environ[k].startswith("file:"))]
    if (root / ROOT_CA.lstrip("/")).exists():
        keep.append(f"PIP_CERT={ROOT_CA}")
    return ["env", "-i", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root",
            "LANG=C.UTF-8", "PYTHONUNBUFFERED=1", *keep]


def in_root(root: Path, *cmd: str) -> list[str]:
    """The command line that runs cmd inside root (an aarch64 program there runs under qemu-aarch64)."""
    return [*chroot_env(root), "chroot", str(root), *cmd]


def run(cmd: list[str], what: str, timeout: float = 3600) -> str:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        tail = "\n".join((p.stdout + p.stderr).strip().splitlines()[-20:])
        raise RuntimeError(f"{what} failed (exit {p.returncode}): {' '.join(cmd)}\n{tail}")
    return p.stdout


# ------------------------------------------------------------------------------------------ preconditions
def ensure_tools() -> None:
    """debootstrap and qemu-user-static, from apt when missing."""
    if shutil.which("debootstrap") and BINFMT_CONF.exists():
        return
    if not shutil.which("apt-get"):
        raise Unavailable("needs debootstrap and qemu-user-static (no apt-get here to install them)")
    log("apt-get install qemu-user-static debootstrap")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "qemu-user-static", "debootstrap"]):
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        if p.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {p.stderr.strip().splitlines()[-1:]}")


def binfmt_flags(entry: Path) -> tuple[bool, str]:
    """(enabled, flags) of a registered binfmt_misc entry."""
    text = entry.read_text()
    flags = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("flags:")), "")
    return text.startswith("enabled"), flags


def ensure_binfmt() -> None:
    """qemu-aarch64 registered with binfmt_misc, with the F flag (the kernel opens the interpreter at
    registration, so it runs aarch64 programs inside a chroot that does not hold qemu)."""
    if not (BINFMT / "register").exists():
        p = subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)], capture_output=True,
                           text=True)
        if p.returncode != 0 or not (BINFMT / "register").exists():
            raise Unavailable(f"cannot mount binfmt_misc on {BINFMT}: {p.stderr.strip() or 'no register file'}")
    entry = BINFMT / "qemu-aarch64"
    if entry.exists():
        enabled, flags = binfmt_flags(entry)
        if enabled and "F" in flags:
            return
        log(f"qemu-aarch64 is registered without the F flag (flags {flags!r}): registering it again")
        try:
            entry.write_text("-1")  # unregister
        except OSError as e:
            raise Unavailable(f"cannot unregister {entry} (flags {flags!r}, F needed): {e}")
    line = BINFMT_CONF.read_text().strip()
    if not line.rsplit(":", 1)[-1].count("F"):
        line += "F"
    try:
        (BINFMT / "register").write_text(line)
    except OSError as e:
        raise Unavailable(f"cannot register qemu-aarch64 with binfmt_misc: {e}")
    enabled, flags = binfmt_flags(entry)
    if not (enabled and "F" in flags):
        raise Unavailable(f"qemu-aarch64 registered but not enabled with F (flags {flags!r})")


def check_machine() -> None:
    if sys.platform != "linux":
        raise Unavailable("needs Linux (binfmt_misc, chroot)")
    if os.geteuid() != 0:
        raise Unavailable("needs root (debootstrap, chroot, binfmt_misc)")


# ---------------------------------------------------------------------------------------------- the root
def core_dependencies(whl: Path) -> list[str]:
    """The wheel's Requires-Dist without extras (the core install's dependencies)."""
    with zipfile.ZipFile(whl) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    return sorted(ln.split(":", 1)[1].strip() for ln in meta.splitlines()
                  if ln.startswith("Requires-Dist:") and "extra ==" not in ln)


def recipe(whl: Path) -> dict:
    """What a cached root was built from: a root whose stamp differs is built again."""
    return {"suite": SUITE, "packages": PACKAGES, "mirror": MIRROR, "dependencies": core_dependencies(whl)}


def mounts_under(path: Path) -> list[str]:
    prefix = str(path.resolve()) + "/"
    with open("/proc/mounts") as f:
        points = [ln.split()[1].encode().decode("unicode_escape") for ln in f]
    return sorted((p for p in points if p.startswith(prefix) or p == prefix[:-1]), reverse=True)


def remove_root(path: Path) -> None:
    """rm -rf a (half-built) root, after unmounting anything a killed debootstrap left mounted in it (its
    /proc, /sys): never delete through a mount."""
    if not path.exists() and not path.is_symlink():
        return
    for point in mounts_under(path):
        subprocess.run(["umount", "-l", point], capture_output=True)
    left = mounts_under(path)
    if left:
        raise RuntimeError(f"cannot remove {path}: still mounted: {', '.join(left)}")
    shutil.rmtree(path)


def wheel(dist: Path) -> Path:
    """This checkout's wheel (`pip wheel --no-deps`), built on the host."""
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(REPO)], "pip wheel")
    return next(dist.glob("prism_onnx-*.whl"))


def install_wheel(root: Path, whl: Path, deps: bool) -> None:
    """pip install the wheel into the root's venv (with its dependencies from PyPI, or only the wheel)."""
    inside = Path("/tmp") / whl.name
    shutil.copy(whl, root / inside.relative_to("/"))
    try:
        args = ["--no-deps", "--force-reinstall"] if not deps else []
        run(in_root(root, f"{VENV}/bin/pip", "install", "-q", "--disable-pip-version-check", *args, str(inside)),
            "pip install in the arm64 root")
    finally:
        (root / inside.relative_to("/")).unlink(missing_ok=True)


def build(target: Path, whl: Path) -> dict:
    """debootstrap an arm64 root into target (which must not exist), make /venv, install whl with its
    dependencies. Returns the seconds each step took."""
    times = {}
    t = time.monotonic()
    log(f"debootstrap --foreign {SUITE} arm64 into {target}")
    run(["debootstrap", "--arch=arm64", "--variant=minbase", "--foreign", f"--include={','.join(PACKAGES)}",
         SUITE, str(target), MIRROR], "debootstrap (first stage)")
    times["debootstrap_first_stage_s"] = time.monotonic() - t
    t = time.monotonic()
    log("debootstrap --second-stage (aarch64, under qemu)")
    run(in_root(target, "/debootstrap/debootstrap", "--second-stage"), "debootstrap --second-stage")
    times["debootstrap_second_stage_s"] = time.monotonic() - t
    shutil.copy("/etc/resolv.conf", target / "etc/resolv.conf")  # pip reaches PyPI from inside
    if HOST_CA.is_file():
        (target / ROOT_CA.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(HOST_CA, target / ROOT_CA.lstrip("/"))
    t = time.monotonic()
    log(f"python3 -m venv {VENV}; pip install the core wheel and its dependencies")
    run(in_root(target, "/usr/bin/python3", "-m", "venv", VENV), "python3 -m venv")
    install_wheel(target, whl, deps=True)
    times["install_s"] = time.monotonic() - t
    return times


def describe(root: Path) -> dict:
    """What the root's python reports about itself, from inside (under qemu)."""
    code = ("import json, platform, sys, onnxruntime, numpy, zmq\n"
            "print(json.dumps({'machine': platform.machine(), 'python': platform.python_version(), "
            "'onnxruntime': onnxruntime.__version__, 'numpy': numpy.__version__, 'pyzmq': zmq.__version__}))")
    return json.loads(run(in_root(root, f"{VENV}/bin/python", "-c", code), "python in the arm64 root",
                          timeout=600).strip().splitlines()[-1])


def ensure_root(root: Path = DEFAULT_ROOT) -> dict:
    """The arm64 root at `root`, built on first use and reused after, holding this checkout's wheel.
    Returns {"root", "reused", times in seconds, and what the root's python reports}. Raises Unavailable
    when this machine cannot run it."""
    check_machine()
    ensure_tools()
    ensure_binfmt()
    root = root.resolve()
    root.parent.mkdir(parents=True, exist_ok=True)
    partial = root.with_name(root.name + ".partial")
    with open(root.with_name(root.name + ".lock"), "w") as lock, tempfile.TemporaryDirectory() as dist:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder at a time; the others wait, then reuse
        t0 = time.monotonic()
        whl = wheel(Path(dist))
        report = {"root": str(root), "wheel_s": time.monotonic() - t0}
        want = recipe(whl)
        stamp = root / STAMP
        if stamp.exists() and json.loads(stamp.read_text()).get("recipe") == want:
            report["reused"] = True
            t = time.monotonic()
            install_wheel(root, whl, deps=False)  # this checkout's code over the cached dependencies
            report["reinstall_s"] = time.monotonic() - t
        else:
            if root.exists():
                log(f"{root} is incomplete or was built from another recipe: building it again")
            remove_root(root)
            if partial.exists():
                log(f"removing {partial}, left by a run that did not finish")
            remove_root(partial)
            report["reused"] = False
            report.update(build(partial, whl))
            (partial / STAMP).write_text(json.dumps({"recipe": want, "built": time.strftime("%Y-%m-%d %H:%M:%S"),
                                                     "times": report}, indent=1))
            partial.rename(root)
        t = time.monotonic()
        report.update(describe(root))
        report["describe_s"] = time.monotonic() - t
        report["total_s"] = time.monotonic() - t0
    if report["machine"] != "aarch64":
        raise RuntimeError(f"the root's python reports machine {report['machine']!r}, not aarch64")
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_ROOT, help="where the root is cached (default: %(default)s)")
    args = ap.parse_args(argv)
    try:
        report = ensure_root(args.out)
    except Unavailable as e:
        print(f"Error: no arm64 root on this machine: {e}", file=sys.stderr)
        return 1
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
        log(str(e))  # the failed command's last lines, then the one-line error
        print(f"Error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 1
    print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in report.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
