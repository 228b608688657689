"""CurveZMQ keys of an export (`prism keys DIR`): one keypair per device, one per client.

    DIR/device-K/keys/device-K.key_secret   device K's keypair (0600): its runner's identity
    DIR/device-K/keys/peers/device-J.key    public keys of the other devices: the only peers it accepts
    DIR/device-K/keys/clients/NAME.key      public keys of the clients it accepts on --serve
    DIR/NAME/NAME.key_secret                a client's keypair (0600); NAME is `client` or `client-<name>`
    DIR/NAME/servers/device-K.key           public keys of the devices, to authenticate the one it talks to

Copy device-K/ to board K (its keys/ folder holds no other device's secret) and DIR/client/ to whoever
sends requests. A runner started with --http also accepts one more client key, made in memory at its start
and never written anywhere (`with_local_client`): the HTTP server's, in the same process. Keys are not in
any manifest's file table: `prism keys DIR` rotates them all (device
and client keys; clients added with --add-client keep their names) without a re-export. The files are
pyzmq's certificate format (zmq.auth.create_certificates / load_certificate).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import zmq
import zmq.auth

from ..errors import BundleError
from .bundle import MANIFEST, read_manifest

KEYS = "keys"
CLIENT = "client"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,47}$")


def _keypair(folder: Path, name: str) -> tuple[Path, Path]:
    """Create NAME.key (public, 0644) and NAME.key_secret (0600) in `folder` (made 0700)."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(folder, 0o700)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".new-") as tmp:  # 0700: no reader during the write
        public, secret = zmq.auth.create_certificates(tmp, name)
        os.chmod(secret, 0o600)
        os.chmod(public, 0o644)
        os.replace(secret, folder / f"{name}.key_secret")
        os.replace(public, folder / f"{name}.key")
    return folder / f"{name}.key", folder / f"{name}.key_secret"


def _copy_public(src: Path, dst_dir: Path) -> None:
    dst_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst_dir / src.name)
    os.chmod(dst_dir / src.name, 0o644)


def _export_devices(export_dir: Path) -> int:
    m = read_manifest(export_dir / MANIFEST)
    if m.rank is not None:
        raise BundleError(f"{export_dir}: this is one device's bundle; give the export folder that holds device-K/")
    return m.devices


def client_folders(export_dir: Path) -> list[str]:
    return sorted(p.name for p in export_dir.iterdir() if p.is_dir() and (p.name == CLIENT or
                                                                             p.name.startswith(CLIENT + "-")))


def generate_keys(export_dir: str | Path, devices: int | None = None) -> list[Path]:
    """(Re)generate every key of an export: each device's keypair, the default client and every client
    added before. Old keys stop working everywhere. Returns the client folders."""
    root = Path(export_dir)
    devices = _export_devices(root) if devices is None else devices
    clients = sorted(set(client_folders(root)) | {CLIENT})
    for k in range(devices):
        shutil.rmtree(root / f"device-{k}" / KEYS, ignore_errors=True)
    for name in clients:
        shutil.rmtree(root / name, ignore_errors=True)
    publics = [_keypair(root / f"device-{k}" / KEYS, f"device-{k}")[0] for k in range(devices)]
    for k in range(devices):
        for j, pub in enumerate(publics):
            if j != k:
                _copy_public(pub, root / f"device-{k}" / KEYS / "peers")
        (root / f"device-{k}" / KEYS / "clients").mkdir(exist_ok=True)
    return [_add_client(root, name, publics) for name in clients]


def add_client(export_dir: str | Path, name: str) -> Path:
    """A new client keypair in DIR/client-NAME/, accepted by every device from its next start."""
    root = Path(export_dir)
    if not _NAME.match(name):
        raise BundleError(f"client name '{name}': use letters, digits, '.', '_' or '-' (at most 48)")
    devices = _export_devices(root)
    publics = [root / f"device-{k}" / KEYS / f"device-{k}.key" for k in range(devices)]
    missing = [p for p in publics if not p.is_file()]
    if missing:
        raise BundleError(f"{missing[0]}: no device key; run `prism keys {root}` first")
    folder = f"{CLIENT}-{name}"
    if (root / folder).exists():
        raise BundleError(f"{root / folder} exists; remove it first to replace that client's key")
    return _add_client(root, folder, publics)


def _add_client(root: Path, name: str, device_publics: list[Path]) -> Path:
    public, _ = _keypair(root / name, name)
    for pub in device_publics:
        _copy_public(pub, root / name / "servers")
    for k in range(len(device_publics)):
        _copy_public(public, root / f"device-{k}" / KEYS / "clients")
    return root / name


def _load(path: Path, secret: bool) -> tuple[bytes, bytes | None]:
    try:
        public, sec = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        raise BundleError(f"{path}: unreadable key ({e})") from None
    if secret and not sec:
        raise BundleError(f"{path}: holds no secret key")
    return public, sec


def _publics(folder: Path) -> dict[str, bytes]:
    return {p.stem: _load(p, False)[0] for p in sorted(folder.glob("*.key"))} if folder.is_dir() else {}


def loose_permissions(path: Path) -> bool:
    return bool(path.stat().st_mode & 0o077)


@dataclass(frozen=True)
class RunnerKeys:
    """What one runner needs: its keypair, the peers' public keys (by rank), the allowed clients' keys.
    Keys are z85-encoded bytes, as zmq.auth.load_certificate returns them and socket options take them."""

    public: bytes
    secret: bytes
    peers: dict[int, bytes]
    clients: dict[str, bytes] = field(default_factory=dict)
    folder: Path | None = None

    @classmethod
    def load(cls, folder: str | Path, rank: int, devices: int) -> "RunnerKeys":
        folder = Path(folder)
        own = folder / f"device-{rank}.key_secret"
        if not own.is_file():
            raise BundleError(f"{own}: no key for device {rank} (run `prism keys EXPORT_DIR` and copy "
                              f"device-{rank}/keys to this board, or pass --insecure on a trusted network)")
        public, secret = _load(own, True)
        found = _publics(folder / "peers")
        peers = {}
        for q in range(devices):
            if q != rank:
                if f"device-{q}" not in found:
                    raise BundleError(f"{folder / 'peers'}/device-{q}.key: missing (the public key of device {q})")
                peers[q] = found[f"device-{q}"]
        return cls(public, secret, peers, _publics(folder / "clients"), folder)

    def user_ids(self) -> dict[bytes, str]:
        """z85 public key -> the name the authenticator gives its connections ("device-K" or the client)."""
        ids = {k: f"device-{q}" for q, k in self.peers.items()}
        ids.update({k: name for name, k in self.clients.items()})
        return ids


@dataclass(frozen=True)
class ClientKeys:
    """A client's keypair and the devices' public keys (DIR/client)."""

    public: bytes
    secret: bytes
    servers: dict[int, bytes]

    @classmethod
    def load(cls, folder: str | Path) -> "ClientKeys":
        folder = Path(folder)
        secrets = sorted(folder.glob("*.key_secret")) if folder.is_dir() else []
        device = next((s.stem for s in secrets if s.stem.startswith("device-") and s.stem[7:].isdigit()), None)
        if device is not None:
            raise BundleError(f"{folder} holds {device}'s own keys (a runner's): a client uses the client folder "
                              f"`prism keys` wrote beside the device folders, EXPORT_DIR/client (or "
                              f"EXPORT_DIR/client-NAME of `prism keys --add-client NAME`)")
        if len(secrets) != 1:
            raise BundleError(f"{folder}: expected one client key (NAME.key_secret), found {len(secrets)}; give "
                              f"the client folder that `prism keys` wrote (EXPORT_DIR/client)")
        public, secret = _load(secrets[0], True)
        servers = {}
        for name, key in _publics(folder / "servers").items():
            if name.startswith("device-") and name[7:].isdigit():
                servers[int(name[7:])] = key
        if not servers:
            raise BundleError(f"{folder / 'servers'}: no device public keys")
        return cls(public, secret, servers)


LOCAL_CLIENT = "local-http"  # the authenticated name of the in-process HTTP server's connection


def with_local_client(keys: RunnerKeys, rank: int) -> tuple[RunnerKeys, ClientKeys]:
    """A fresh client keypair for the HTTP server that runs inside this runner's process (prism_onnx/serve):
    the runner's keys with its public key added to the accepted clients (named LOCAL_CLIENT), and the
    client's keys, which know only this device as server. The secret lives in this process's memory only
    and changes at every start, so nothing on disk grants it, and no export's client folder is needed on
    the board; the HTTP server still talks to the runner through the ordinary CurveZMQ client port."""
    public, secret = zmq.curve_keypair()
    return replace(keys, clients={**keys.clients, LOCAL_CLIENT: public}), ClientKeys(public, secret, {rank: keys.public})
