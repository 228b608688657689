"""Bundles on disk: the export folder and the per-device folders, verified before anything runs.

    DIR/manifest.json           the export: model spec, P, CR, split, wire dtype, opset, export id,
                                sha256 of every file under DIR
    DIR/device-K/manifest.json  the same settings + rank K + sha256 of every file in device-K/
    DIR/device-K/*.onnx         the graphs (identical on every device: the split is computed at run time),
                                and their external data (embed.onnx.data: the embedding table, read by the
                                head too when the model ties them); one copy per export, hard-linked
    DIR/device-K/tokenizer.json or preprocessor_config.json

The export id is a digest of the export's content: every manifest setting and every file's sha256
(`content_digest`), the same for every device; not the creation time, so the same model exported twice with
the same settings (and the same prism version) gets the same id. Loading checks every sha256 and recomputes
the export id, so a changed file, an edited manifest, or a device folder from another export is refused with an error
that names the file. Keys (DIR/device-K/keys, runtime/keys.py) are not content: they rotate without a
re-export and are in no file table.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from ..errors import BundleError
from ..manifest import FORMAT, FORMAT_VERSION, Manifest

MANIFEST = "manifest.json"
__all__ = ["FORMAT", "FORMAT_VERSION", "MANIFEST", "DeviceBundle", "Export", "Limits", "read_manifest",
           "sha256_file", "verify_files", "content_digest", "check_export_id"]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_raw_manifest(path: Path) -> dict:
    """manifest.json as JSON (for its content digest); BundleError naming the file when unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise BundleError(f"{path}: no manifest (is this a prism export or device bundle?)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise BundleError(f"{path}: unreadable manifest ({e})") from None


def read_manifest(path: Path) -> Manifest:
    """The typed manifest at `path`; BundleError naming the file when it is missing or does not fit."""
    return Manifest.from_dict(read_raw_manifest(path), str(path))


NOT_CONTENT = ("export_id", "rank", "files", "created")  # the id itself, what differs between the devices'
# manifests, and when it was written (not content: exporting the same content twice gives the same id)


def content_digest(manifest: dict, files: dict[str, str], legacy: bool = False) -> str:
    """The export id: sha256 of every manifest setting (all fields but NOT_CONTENT) and of the payload
    files' sha256 (names relative to a device folder). Independent of rank: every device computes the same.
    `legacy`: the digest of exports written before the creation time was left out (it was included)."""
    skip = [k for k in NOT_CONTENT if not (legacy and k == "created")]
    settings = {k: v for k, v in manifest.items() if k not in skip}
    blob = json.dumps({"settings": settings, "files": dict(sorted(files.items()))}, sort_keys=True,
                      separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def check_export_id(manifest: dict, files: dict[str, str], path: Path) -> None:
    """Refuse a manifest (`manifest`: the JSON as read) whose export id is not the digest of its content (it
    was edited after export)."""
    try:
        digest = content_digest(manifest, files)
        legacy = content_digest(manifest, files, legacy=True) if "created" in manifest else digest
    except (TypeError, ValueError) as e:
        raise BundleError(f"{path}: manifest cannot be digested ({e})") from None
    if manifest.get("export_id") not in (digest, legacy):  # legacy: the same check of an older export's id
        raise BundleError(f"{path}: export id {str(manifest.get('export_id'))[:12]} does not match the manifest's "
                          f"content (digest {digest[:12]}): the manifest was edited after export, or predates "
                          f"content-addressed export ids; re-export it")


def verify_files(root: Path, files: dict[str, str], label: str = "", seen: dict | None = None) -> None:
    """Every listed file exists and has its recorded sha256. `seen` ({(device, inode, size, mtime): sha256},
    shared between calls) hashes a file that several names hard-link (an export's device folders) once."""
    seen = {} if seen is None else seen
    for rel, digest in sorted(files.items()):
        path = root / rel
        name = f"{label}{rel}"
        if not path.is_file():
            raise BundleError(f"{name}: missing from the bundle")
        st = path.stat()
        inode = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        if inode not in seen:
            seen[inode] = sha256_file(path)
        if seen[inode] != digest:
            shared = f" (one file with {st.st_nlink - 1} hard link(s): the device folders of an export share it)" \
                if st.st_nlink > 1 else ""
            raise BundleError(f"{name}: sha256 mismatch, the file changed after export{shared}")


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

    @property
    def path(self) -> Path:
        return self.root / MANIFEST

    @property
    def keys_dir(self) -> Path:
        """Where `prism keys` puts this device's keys (runtime/keys.py)."""
        return self.root / "keys"

    @property
    def handshake_settings(self) -> dict:
        """The settings peers compare at the handshake (with the export id), to name what differs."""
        return {**self.manifest.settings.to_dict(), "exchange": self.manifest.model.exchange,
                "package_version": self.manifest.package_version}

    @cached_property
    def limits(self) -> "Limits":
        return Limits.of(self.manifest)

    def has_graph(self, name: str) -> bool:
        return name in self.manifest.graphs

    @classmethod
    def load(cls, root: str | Path, verify: bool = True, seen: dict | None = None) -> "DeviceBundle":
        """`seen`: verify_files' memo of files already hashed (Export.load shares one over its devices)."""
        root = Path(root)
        if not root.is_dir():
            raise BundleError(f"{root}: no such bundle folder")
        raw = read_raw_manifest(root / MANIFEST)
        manifest = Manifest.from_dict(raw, str(root / MANIFEST))
        if manifest.rank is None:
            raise BundleError(f"{root / MANIFEST}: this is an export folder, not a device bundle (use {root}/device-K)")
        if verify:
            verify_files(root, manifest.files, label=f"{root.name}/", seen=seen)
            check_export_id(raw, manifest.files, Path(root.name) / MANIFEST)
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
        raw = read_raw_manifest(root / MANIFEST)
        manifest = Manifest.from_dict(raw, str(root / MANIFEST))
        if manifest.rank is not None:
            raise BundleError(f"{root}: this is one device's bundle; give the export folder that holds device-K/")
        seen: dict = {}  # the device folders hard-link one copy of each file: hash it once
        if verify:
            verify_files(root, manifest.files, seen=seen)
            prefix = "device-0/"
            files = {k[len(prefix):]: v for k, v in manifest.files.items()
                     if k.startswith(prefix) and k != prefix + MANIFEST}
            check_export_id(raw, files, root / MANIFEST)
        devices = []
        for k in range(manifest.devices):
            folder = root / f"device-{k}"
            dev = DeviceBundle.load(folder, verify=verify, seen=seen)
            if dev.export_id != manifest.export_id:
                raise BundleError(f"device-{k}/{MANIFEST}: belongs to export {dev.export_id[:12]}, not to this export "
                                  f"{manifest.export_id[:12]} (a device folder from another export)")
            if dev.rank != k:
                raise BundleError(f"device-{k}/{MANIFEST}: claims rank {dev.rank}")
            devices.append(dev)
        return cls(root, manifest, devices)


@dataclass(frozen=True)
class Limits:
    """What a runner accepts, from the manifest: requests, control messages and frames are checked against
    these numbers before anything is tokenized, decoded or allocated."""

    devices: int
    max_batch: int
    max_seq_len: int
    max_rows: int  # mean rows one device can send per exchange point
    hidden: int  # values per row on the wire (the exchange's row width)
    layers: int  # exchange points
    wire_dtype: str
    input_kind: str  # "text" | "image"
    vocab_size: int
    embed_inputs: tuple[str, ...]
    token_inputs: dict  # embed input -> (dtype, trailing width or None): [B, n] or [B, n, width]
    outputs: tuple[str, ...]
    image: tuple[int, int]  # (channels, size) of pixel_values
    max_text_chars: int  # per text, checked before tokenizing
    max_image_bytes: int  # per encoded image file (preprocess.py limits the decoded pixels)
    max_message_bytes: int  # largest legitimate array part between runners
    max_client_bytes: int  # largest client message
    max_positions: int = 0  # positions of the model: a prompt plus its new tokens fit in them
    generates: bool = False  # a decoder with a language-model head (generate.generates)
    token_ranges: dict = field(default_factory=dict)  # id input -> [lo, hi): input_ids, token_type_ids

    @classmethod
    def of(cls, m: Manifest) -> "Limits":
        from ..plan import max_rows

        spec, s = m.model, m.settings
        B, N, W = s.max_batch, s.max_seq_len, spec.row_width
        embed = {t.name: t for t in m.graphs["embed"].inputs}
        token_inputs = {name: (embed[name].dtype, int(embed[name].shape[-1]) if len(embed[name].shape) == 3 else None)
                        for name in spec.embed_inputs}
        outs = [int(o.shape[-1]) for g in m.graphs.values() for o in g.outputs if isinstance(o.shape[-1], int)]
        per_token_in = max([8] + [4 * w for _, w in token_inputs.values() if w])
        biggest = max(B * N * max([W, spec.hidden_size] + outs) * 4, B * N * per_token_in, B * N * 8) + (1 << 16)
        ranges = {"input_ids": (0, spec.vocab_size)}
        if "token_type_ids" in spec.embed_inputs:  # exports before type_vocab_size was recorded: BERT's 2
            ranges["token_type_ids"] = (0, int(m.config_summary.get("type_vocab_size", 2)))
        return cls(devices=s.devices, max_batch=B, max_seq_len=N,
                   max_rows=max_rows(N, s.compression_ratio, s.window, s.devices),
                   hidden=W, layers=len(m.program.points), wire_dtype=s.wire_dtype, input_kind=spec.input_kind,
                   vocab_size=spec.vocab_size, embed_inputs=spec.embed_inputs, token_inputs=token_inputs,
                   outputs=spec.outputs, image=(spec.num_channels, spec.image_size),
                   max_text_chars=max(4096, 32 * N), max_image_bytes=16 << 20,
                   max_message_bytes=biggest, max_client_bytes=max(biggest, 32 << 20),
                   max_positions=spec.max_positions,
                   generates="logits" in m.program.token_outputs,
                   token_ranges={k: v for k, v in ranges.items() if k in spec.embed_inputs})
