"""Bundles on disk: the export folder and the per-device folders, verified before anything runs.

    DIR/manifest.json           the export: model spec, P, CR, split, wire dtype, opset, export id,
                                sha256 of every file under DIR
    DIR/device-K/manifest.json  the same settings + rank K + sha256 of every file in device-K/
    DIR/device-K/*.onnx         the graphs (identical on every device: the split is computed at run time)
    DIR/device-K/tokenizer.json or preprocessor_config.json

Loading checks every sha256 and the export id, so a changed file, or a device folder from another
export, is refused with an error that names the file.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import BundleError
from ..manifest import FORMAT, FORMAT_VERSION, Manifest

MANIFEST = "manifest.json"
__all__ = ["FORMAT", "FORMAT_VERSION", "MANIFEST", "DeviceBundle", "Export", "read_manifest", "sha256_file",
           "verify_files"]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_manifest(path: Path) -> Manifest:
    """The typed manifest at `path`; BundleError naming the file when it is missing or does not fit."""
    try:
        raw = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise BundleError(f"{path}: no manifest (is this a prism export or device bundle?)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise BundleError(f"{path}: unreadable manifest ({e})") from None
    return Manifest.from_dict(raw, str(path))


def verify_files(root: Path, files: dict[str, str], label: str = "") -> None:
    """Every listed file exists and has its recorded sha256."""
    for rel, digest in sorted(files.items()):
        path = root / rel
        name = f"{label}{rel}"
        if not path.is_file():
            raise BundleError(f"{name}: missing from the bundle")
        if sha256_file(path) != digest:
            raise BundleError(f"{name}: sha256 mismatch, the file changed after export")


@dataclass(frozen=True)
class DeviceBundle:
    """One device's folder, verified."""

    root: Path
    manifest: Manifest

    @property
    def rank(self) -> int:
        return int(self.manifest.rank)

    @property
    def export_id(self) -> str:
        return self.manifest.export_id

    @property
    def spec(self):
        return self.manifest.model

    @property
    def devices(self) -> int:
        return self.manifest.devices

    def graph(self, name: str) -> Path:
        return self.root / self.manifest.graphs[name].file

    def has_graph(self, name: str) -> bool:
        return name in self.manifest.graphs

    @classmethod
    def load(cls, root: str | Path, verify: bool = True) -> "DeviceBundle":
        root = Path(root)
        if not root.is_dir():
            raise BundleError(f"{root}: no such bundle folder")
        manifest = read_manifest(root / MANIFEST)
        if manifest.rank is None:
            raise BundleError(f"{root / MANIFEST}: this is an export folder, not a device bundle (use {root}/device-K)")
        if verify:
            verify_files(root, manifest.files, label=f"{root.name}/")
        return cls(root, manifest)


@dataclass(frozen=True)
class Export:
    """An export folder: its manifest and all P device bundles, cross-checked."""

    root: Path
    manifest: Manifest
    devices: list[DeviceBundle]

    @property
    def export_id(self) -> str:
        return self.manifest.export_id

    @classmethod
    def load(cls, root: str | Path, verify: bool = True) -> "Export":
        root = Path(root)
        manifest = read_manifest(root / MANIFEST)
        if manifest.rank is not None:
            raise BundleError(f"{root}: this is one device's bundle; give the export folder that holds device-K/")
        if verify:
            verify_files(root, manifest.files)
        devices = []
        for k in range(manifest.devices):
            folder = root / f"device-{k}"
            dev = DeviceBundle.load(folder, verify=verify)
            if dev.export_id != manifest.export_id:
                raise BundleError(f"device-{k}/{MANIFEST}: belongs to export {dev.export_id[:12]}, not to this export "
                                  f"{manifest.export_id[:12]} (a device folder from another export)")
            if dev.rank != k:
                raise BundleError(f"device-{k}/{MANIFEST}: claims rank {dev.rank}")
            devices.append(dev)
        return cls(root, manifest, devices)
