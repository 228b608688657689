"""CurveZMQ keys of an export (`prism keys DIR`): one keypair per device, one for the client ports, one
per client, and the key set that binds them to the export.

    DIR/device-K/keys/device-K.key_secret   device K's keypair (0600): its identity on the device ports
    DIR/device-K/keys/server.key_secret     the cluster's client-port keypair (0600), the same on every device:
                                            any serving runner answers clients with it, so a client knows
                                            the key of whichever runner it reaches (no probing, no failed
                                            handshakes on the runners)
    DIR/device-K/keys/peers/device-J.key    public keys of the other devices: the only peers it accepts
    DIR/device-K/keys/clients/NAME.key      public keys of the clients it accepts on --serve
    DIR/device-K/keys/keyset.json           the key set: the export id and every device's and the client
                                            port's public key (KeySet), checked at every start
    DIR/NAME/NAME.key_secret                a client's keypair (0600); NAME is `client` or `client-<name>`
    DIR/NAME/server.key, DIR/NAME/keyset.json   the client ports' public key, the key set

Copy device-K/ to board K (its keys/ folder holds no other device's secret) and DIR/client/ to whoever
sends requests. A runner's client port also accepts the devices' own keys (named "device-K"): an
operator's connection, which sees every client's requests in STATUS (`Client(keys="device-K/keys")`). A
runner started with --http also accepts one more client key, made in memory at its start and never
written anywhere (`with_local_client`): the HTTP server's, in the same process.

Keys are not in any manifest's file table: `prism keys DIR` rotates them all (device, client-port and
client keys; clients added with --add-client keep their names) without a re-export, so manifests stay
content-addressed. What binds keys to an export is keys/keyset.json: at start a runner checks that each
keypair's secret matches its public key, that the key set names this bundle's export id, and that its own,
its peers' and the client port's public keys are the key set's (`RunnerKeys.load`), so a keys folder of
another export, a peer key copied from another export or another `prism keys` run, or a swapped keypair
is refused in one line instead of failing every handshake. The files are pyzmq's certificate format
(zmq.auth.create_certificates / load_certificate).
"""

from __future__ import annotations

import hashlib
import json
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
SERVER = "server"  # the client ports' keypair
KEYSET = "keyset.json"
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


def _copy(src: Path, dst_dir: Path, mode: int = 0o644, name: str | None = None) -> None:
    dst_dir.mkdir(parents=True, exist_ok=True)
    dst = dst_dir / (name or src.name)
    shutil.copyfile(src, dst)
    os.chmod(dst, mode)


def _export(export_dir: Path) -> tuple[int, str]:
    """(devices, export id) of an export folder."""
    m = read_manifest(export_dir / MANIFEST)
    if m.rank is not None:
        raise BundleError(f"{export_dir}: this is one device's bundle; give the export folder that holds device-K/")
    return m.devices, m.export_id


def client_folders(export_dir: Path) -> list[str]:
    return sorted(p.name for p in export_dir.iterdir() if p.is_dir() and (p.name == CLIENT or
                                                                             p.name.startswith(CLIENT + "-")))


@dataclass(frozen=True)
class KeySet:
    """keys/keyset.json: the export a key set belongs to and its public keys (z85 text): `devices` by rank,
    `server` the client ports'. `digest` (sha256 of the keys) names the key set in logs."""

    export_id: str
    devices: tuple[str, ...]
    server: str

    @property
    def digest(self) -> str:
        blob = json.dumps({"devices": list(self.devices), "server": self.server}, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    def write(self, folder: Path) -> None:
        (folder / KEYSET).write_text(json.dumps({"export_id": self.export_id, "keyset": self.digest,
                                                 "devices": list(self.devices), "server": self.server}, indent=2))

    @classmethod
    def read(cls, folder: Path) -> "KeySet":
        path = folder / KEYSET
        if not path.is_file():
            raise BundleError(f"{path}: missing (keys written before key sets were recorded, or not by `prism keys`): "
                              f"run `prism keys EXPORT_DIR` and copy device-K/keys to each board again")
        try:
            d = json.loads(path.read_text())
            return cls(str(d["export_id"]), tuple(str(k) for k in d["devices"]), str(d["server"]))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise BundleError(f"{path}: unreadable key set ({type(e).__name__}: {e})") from None


def generate_keys(export_dir: str | Path, devices: int | None = None) -> list[Path]:
    """(Re)generate every key of an export: each device's keypair, the client ports' keypair, the default
    client and every client added before, and the key set (keyset.json, naming the export). Old keys stop
    working everywhere. Returns the client folders."""
    root = Path(export_dir)
    n, export_id = _export(root)
    devices = n if devices is None else devices
    clients = sorted(set(client_folders(root)) | {CLIENT})
    for k in range(devices):
        shutil.rmtree(root / f"device-{k}" / KEYS, ignore_errors=True)
    for name in clients:
        shutil.rmtree(root / name, ignore_errors=True)
    publics = [_keypair(root / f"device-{k}" / KEYS, f"device-{k}")[0] for k in range(devices)]
    with tempfile.TemporaryDirectory(prefix=".server-", dir=root) as tmp:
        server_public, server_secret = _keypair(Path(tmp), SERVER)
        keyset = KeySet(export_id, tuple(_load(p, False)[0].decode() for p in publics),
                        _load(server_public, False)[0].decode())
        for k in range(devices):
            folder = root / f"device-{k}" / KEYS
            for j, pub in enumerate(publics):
                if j != k:
                    _copy(pub, folder / "peers")
            (folder / "clients").mkdir(exist_ok=True)
            _copy(server_public, folder)
            _copy(server_secret, folder, 0o600)
            keyset.write(folder)
        return [_add_client(root, name, devices, server_public) for name in clients]


def add_client(export_dir: str | Path, name: str) -> Path:
    """A new client keypair in DIR/client-NAME/, accepted by every device from its next start."""
    root = Path(export_dir)
    if not _NAME.match(name):
        raise BundleError(f"client name '{name}': use letters, digits, '.', '_' or '-' (at most 48)")
    devices, _ = _export(root)
    server = root / "device-0" / KEYS / f"{SERVER}.key"
    if not server.is_file() or not (root / "device-0" / KEYS / KEYSET).is_file():
        raise BundleError(f"{server.parent}: no key set; run `prism keys {root}` first")
    folder = f"{CLIENT}-{name}"
    if (root / folder).exists():
        raise BundleError(f"{root / folder} exists; remove it first to replace that client's key")
    return _add_client(root, folder, devices, server)


def _add_client(root: Path, name: str, devices: int, server_public: Path) -> Path:
    public, _ = _keypair(root / name, name)
    _copy(server_public, root / name)
    _copy(root / "device-0" / KEYS / KEYSET, root / name)
    for k in range(devices):
        _copy(public, root / f"device-{k}" / KEYS / "clients")
    return root / name


def _load(path: Path, secret: bool) -> tuple[bytes, bytes | None]:
    try:
        public, sec = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        raise BundleError(f"{path}: unreadable key ({e})") from None
    if secret and not sec:
        raise BundleError(f"{path}: holds no secret key")
    if secret and zmq.curve_public(sec) != public:
        raise BundleError(f"{path}: its public key is not the one of its secret key (an edited or mixed-up keypair)")
    return public, sec


def _publics(folder: Path) -> dict[str, bytes]:
    return {p.stem: _load(p, False)[0] for p in sorted(folder.glob("*.key"))} if folder.is_dir() else {}


def loose_permissions(path: Path) -> bool:
    return bool(path.stat().st_mode & 0o077)


def _must_be(folder: Path, file: str, key: bytes, want: str, what: str) -> None:
    if key.decode() != want:
        raise BundleError(f"{folder / file}: not {what} of this key set ({KEYSET}): copied from another export or "
                          f"another `prism keys` run? Copy the whole keys/ folder of this export's device")


@dataclass(frozen=True)
class RunnerKeys:
    """What one runner needs: its keypair, the client ports' keypair (`server_public`, `server_secret`), the
    peers' public keys (by rank), the allowed clients' keys, and the key set they were checked against.
    Keys are z85-encoded bytes, as zmq.auth.load_certificate returns them and socket options take them."""

    public: bytes
    secret: bytes
    peers: dict[int, bytes]
    clients: dict[str, bytes] = field(default_factory=dict)
    folder: Path | None = None
    server_public: bytes = b""
    server_secret: bytes = b""
    keyset: KeySet | None = None

    @classmethod
    def load(cls, folder: str | Path, rank: int, devices: int, export_id: str | None = None) -> "RunnerKeys":
        """Device `rank`'s keys, checked: each secret against its public key, and (keyset.json) the export id
        (when given), this device's, its peers' and the client ports' public keys. BundleError naming the
        file otherwise."""
        folder = Path(folder)
        own = folder / f"device-{rank}.key_secret"
        if not own.is_file():
            raise BundleError(f"{own}: no key for device {rank} (run `prism keys EXPORT_DIR` and copy "
                              f"device-{rank}/keys to this board, or pass --insecure on a trusted network)")
        public, secret = _load(own, True)
        server_public, server_secret = _load(folder / f"{SERVER}.key_secret", True)
        ks = KeySet.read(folder)
        if export_id is not None and ks.export_id != export_id:
            raise BundleError(f"{folder / KEYSET}: these keys belong to export {ks.export_id[:12]}, this bundle is "
                              f"export {export_id[:12]}: a keys folder from another export (copy this export's "
                              f"device-{rank}/keys, or run `prism keys` on this export)")
        if len(ks.devices) != devices:
            raise BundleError(f"{folder / KEYSET}: a key set of {len(ks.devices)} devices, this export has {devices}")
        _must_be(folder, own.name, public, ks.devices[rank], f"device {rank}'s keypair")
        _must_be(folder, f"{SERVER}.key_secret", server_public, ks.server, "the client ports' keypair")
        found = _publics(folder / "peers")
        peers = {}
        for q in range(devices):
            if q != rank:
                if f"device-{q}" not in found:
                    raise BundleError(f"{folder / 'peers'}/device-{q}.key: missing (the public key of device {q})")
                _must_be(folder, f"peers/device-{q}.key", found[f"device-{q}"], ks.devices[q], f"device {q}'s key")
                peers[q] = found[f"device-{q}"]
        return cls(public, secret, peers, _publics(folder / "clients"), folder, server_public, server_secret, ks)

    def user_ids(self) -> dict[bytes, str]:
        """z85 public key -> the name the authenticator gives its connections ("device-K" or the client)."""
        ids = {k: f"device-{q}" for q, k in self.peers.items()}
        if self.keyset is not None:
            ids.update({k.encode(): f"device-{q}" for q, k in enumerate(self.keyset.devices)})
        ids.update({k: name for name, k in self.clients.items()})
        return ids

    def client_port_keys(self) -> dict[bytes, str]:
        """The keys the client port accepts, with their names: the clients', and the devices' (operators)."""
        devices = {k.encode(): f"device-{q}" for q, k in enumerate(self.keyset.devices)} if self.keyset else \
            {k: f"device-{q}" for q, k in self.peers.items()}
        return {**devices, **{k: n for n, k in self.clients.items()}}


@dataclass(frozen=True)
class ClientKeys:
    """A client's keypair and the client ports' public key (DIR/client), or an operator's: a device's own
    keys/ folder (its device keypair, accepted on the client ports too, with the full STATUS)."""

    public: bytes
    secret: bytes
    server: bytes

    @classmethod
    def load(cls, folder: str | Path) -> "ClientKeys":
        folder = Path(folder)
        secrets = sorted(folder.glob("*.key_secret")) if folder.is_dir() else []
        device = [p for p in secrets if p.stem.startswith("device-")]
        mine = device if device else [p for p in secrets if p.stem != SERVER]
        if len(mine) != 1:
            raise BundleError(f"{folder}: expected one client key (NAME.key_secret), found {len(mine)}; give "
                              f"the client folder that `prism keys` wrote (EXPORT_DIR/client)")
        public, secret = _load(mine[0], True)
        if not (folder / f"{SERVER}.key").is_file():
            raise BundleError(f"{folder / (SERVER + '.key')}: missing (the client ports' public key): client keys "
                              f"written before it existed; run `prism keys EXPORT_DIR` and use the new client folder")
        return cls(public, secret, _load(folder / f"{SERVER}.key", False)[0])


LOCAL_CLIENT = "local-http"  # the authenticated name of the in-process HTTP server's connection


def with_local_client(keys: RunnerKeys) -> tuple[RunnerKeys, ClientKeys]:
    """A fresh client keypair for the HTTP server that runs inside this runner's process (prism_onnx/serve):
    the runner's keys with its public key added to the accepted clients (named LOCAL_CLIENT), and the
    client's keys. The secret lives in this process's memory only and changes at every start, so nothing on
    disk grants it, and no export's client folder is needed on the board; the HTTP server still talks to
    the runner through the ordinary CurveZMQ client port."""
    public, secret = zmq.curve_keypair()
    return replace(keys, clients={**keys.clients, LOCAL_CLIENT: public}), ClientKeys(public, secret, keys.server_public)
