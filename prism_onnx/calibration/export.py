"""`prism calibrate DIR --data FILE|FOLDER --out DIR2`: an export in, a calibrated export out.

Reads DIR's manifest (its source model and its settings: P, CR, split, switches, wire, exchange), calibrates
the source model for exactly those settings (train.py) on the unlabeled data, saves the calibrated model with
`save_pretrained` to DIR2/model, and exports it through the normal path (export_graphs -> write_bundles):
new graphs, a new export id, the same settings. DIR2's manifest has `source` = DIR2/model (so `prism
validate` checks the graphs against the calibrated PyTorch model) and a `calibration` record: the base model,
the data's sha256, the steps, the trained parameter groups and count, the held-out loss before and after.
"""

from __future__ import annotations

import datetime as _dt
import shutil
import tempfile
from pathlib import Path

import torch

from .. import models
from ..errors import BundleError, InputError, ModelLoadError
from ..exporters.bundle import TOKENIZER_FILES, export_graphs, write_bundles
from ..reference import prism_model
from ..runtime.bundle import Export
from ..runtime.device import Requests
from . import data as D
from .params import check_groups
from .train import TrainSettings, calibrate_model

MODEL_FOLDER = "model"
SIDE_FILES = TOKENIZER_FILES + ("special_tokens_map.json", "merges.txt", "preprocessor_config.json",
                                 "chat_template.jinja")


def base_source(manifest) -> str:
    """The unpartitioned model an export approximates: its source, or for a calibrated export the model it
    was calibrated from."""
    return str(manifest.calibration["base_source"]) if manifest.calibration else manifest.source


def _load(source: str, what: str):
    try:
        return models.load(source)
    except ModelLoadError as e:
        raise ModelLoadError(f"cannot load the export's {what} ({e})") from None


def save_model(model, pm, source: str, folder: Path) -> Path:
    """save_pretrained to `folder`, pm's RemoteCalibration beside it (models.CALIBRATION_FILE), and the source
    folder's tokenizer and image-processor files."""
    model.save_pretrained(folder)
    models.save_calibration(pm, folder)
    src = Path(models.resolve_source(source))
    for name in SIDE_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, folder / name)
    return folder


def calibrate(export_dir: str | Path, data: str | Path, out: str | Path, cfg: TrainSettings = TrainSettings(), *,
              window: int | None = None, max_inputs: int | None = None, overwrite: bool = False,
              progress: bool = False) -> dict:
    """Calibrate the export in `export_dir` on `data` and write the calibrated export to `out` (module
    docstring). Returns the manifest's calibration record plus the new export's path and id."""
    export_dir, out = Path(export_dir), Path(out)
    check_groups(cfg.params)
    if not (export_dir / "manifest.json").is_file():
        raise BundleError(f"{export_dir}: not a prism export (no manifest.json); give the folder `prism export` wrote")
    export = Export.load(export_dir)
    manifest = export.manifest
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise BundleError(f"{out} exists and is not empty; choose another --out or pass --overwrite")
    if out.resolve() == export_dir.resolve():
        raise BundleError("--out must differ from the export being calibrated")

    requests = Requests(export.devices[0])
    cut: dict = {}
    inputs = D.read_inputs(requests, data, window=window, limit=max_inputs, cut=cut)
    batches = D.make_batches(manifest.model, inputs, cfg.batch_size)
    train, held_out = D.split(batches, cfg.held_out, cfg.seed)

    base = base_source(manifest)
    teacher = _load(base, "base model")
    model = _load(manifest.source, "source model")
    if prism_model(model, manifest.model.exchange).spec != manifest.model:
        raise ModelLoadError(f"the export's source {manifest.source} is not the model it was exported from")
    settings = manifest.settings
    student, report = calibrate_model(model, settings.prism(), train, held_out, cfg, exchange=settings.exchange,
                                      teacher=teacher, progress=progress)
    previous = dict(manifest.calibration or {})
    record = {
        "base_source": base, "base_export_id": previous.get("base_export_id", manifest.export_id),
        "calibrated_from": manifest.export_id, "data": str(Path(data).resolve()), "data_sha256": D.digest(data),
        "window": window, "inputs": sum(b.size for b in batches), "train_inputs": sum(b.size for b in train),
        "long_lines_cut": cut or None,
        "settings": cfg.to_dict(), "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **report.to_dict(),
    }
    with tempfile.TemporaryDirectory(prefix="prism-calibrate-") as tmp:
        folder = save_model(model, student, manifest.source, Path(tmp) / MODEL_FOLDER)
        calibrated = models.load(str(folder))
        _check_saved(student, calibrated, settings.exchange)
        graphs = export_graphs(calibrated, Path(tmp) / "graphs", opset=settings.opset, quantize=settings.quantize,
                               block_size=settings.block_size, exchange=settings.exchange, progress=progress)
        graphs.source = str((out / MODEL_FOLDER).resolve())
        graphs.calibration = record
        write_bundles(graphs, out, settings, overwrite=overwrite, extra={MODEL_FOLDER: folder})
    new = Export.load(out).manifest
    return {"export": str(out), "export_id": new.export_id, **record}


def _check_saved(student, reloaded, exchange: str) -> None:
    """The saved folder must reproduce every tensor the device program runs (a trained tensor that neither
    save_pretrained nor save_calibration wrote would be lost)."""
    a = student.state_dict()
    b = prism_model(reloaded, exchange).state_dict()
    if set(a) != set(b):
        raise RuntimeError(f"the saved calibrated model has other tensors than the trained one: {set(a) ^ set(b)}")
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    if bad:
        raise RuntimeError(f"the saved calibrated model differs from the trained one in {bad[:3]}")


__all__ = ["calibrate", "base_source", "MODEL_FOLDER", "InputError"]
