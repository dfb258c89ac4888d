"""Features to disk during ``trainer.predict``: each rank writes its own chunks, rank 0 a manifest.

    OUTPUT/manifest.json
    OUTPUT/<split>/rank000-00000.safetensors    # format safetensors: {cls: [n, F], labels: [n]}, keys in metadata
    OUTPUT/<split>/rank000-00000.cls.npy        # format npy: one file per array,
    OUTPUT/<split>/rank000-00000.labels.npy     #   keys as a unicode array (np.load without pickle)
    OUTPUT/<split>/rank000-00000.keys.npy

``manifest.json`` says what is where: the features and their widths, the format, and per split the
list of parts ``{"rank", "files", "rows"}`` in rank and chunk order, plus the model it came from. Rows
keep the loader's order within a part; a sample may appear twice across ranks where the data was padded
to equal counts per rank (dedupe by key). Chunks hold ``chunk_rows`` rows (the last one fewer), so the
memory held is one chunk whatever the data size.
"""
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BasePredictionWriter
from safetensors import safe_open
from safetensors.torch import save_file

FORMATS = ("safetensors", "npy")


class FeatureWriter(BasePredictionWriter):
    """Write the ``predict_step`` outputs (``{feature: [B, F], "labels": [B], "keys": [B]}``) as chunks.

    Args:
        output_dir: where to write (default ``<trainer.default_root_dir>/features``); an existing
            ``manifest.json`` there is refused unless ``overwrite``.
        format: ``"safetensors"`` or ``"npy"``.
        chunk_rows: rows per chunk file.
        overwrite: replace an earlier extraction in ``output_dir``.
    """

    def __init__(self, output_dir: Optional[str] = None, format: str = "safetensors", chunk_rows: int = 65536,
                 overwrite: bool = False) -> None:
        super().__init__(write_interval="batch")
        if format not in FORMATS:
            raise ValueError(f"FeatureWriter format must be one of {FORMATS}, got {format!r}")
        if chunk_rows < 1:
            raise ValueError(f"FeatureWriter chunk_rows must be >= 1, got {chunk_rows}")
        self.output_dir, self.format, self.chunk_rows, self.overwrite = output_dir, format, chunk_rows, overwrite
        self.out: Optional[Path] = None
        self._pending: Dict[int, List[Dict[str, Any]]] = {}
        self._parts: Dict[int, List[Dict[str, Any]]] = {}
        self._widths: Dict[str, int] = {}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "predict":
            return
        self.out = Path(self.output_dir or os.path.join(trainer.default_root_dir, "features"))
        if (self.out / "manifest.json").exists() and not self.overwrite:
            raise FileExistsError(f"{self.out / 'manifest.json'} exists: an earlier extraction; pass overwrite=true "
                                  "(--trainer.callbacks...init_args.overwrite) or another output_dir")
        self._pending, self._parts, self._widths = {}, {}, {}

    def _split(self, trainer: pl.Trainer, dataloader_idx: int) -> str:
        names = getattr(trainer.datamodule, "predict_splits", None)
        return names[dataloader_idx] if names and dataloader_idx < len(names) else f"loader{dataloader_idx}"

    def write_on_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, prediction: Any,
                           batch_indices: Optional[Sequence[int]], batch: Any, batch_idx: int,
                           dataloader_idx: int = 0) -> None:
        if not isinstance(prediction, dict) or "labels" not in prediction or "keys" not in prediction:
            raise TypeError("FeatureWriter needs predict_step to return {feature: tensor, 'labels': ..., 'keys': ...} "
                            "(ssl_vit.methods.features.FeatureExtractor)")
        pending = self._pending.setdefault(dataloader_idx, [])
        pending.append({k: v.detach().cpu() if isinstance(v, torch.Tensor) else list(v) for k, v in prediction.items()})
        if sum(len(p["keys"]) for p in pending) >= self.chunk_rows:
            self._flush(trainer, dataloader_idx, final=False)

    def _flush(self, trainer: pl.Trainer, dataloader_idx: int, final: bool) -> None:
        """Write the pending rows of a loader in chunks of ``chunk_rows``; a short remainder stays
        pending unless ``final``."""
        pending = self._pending.pop(dataloader_idx, [])
        if not pending:
            return
        rows = {k: torch.cat([p[k] for p in pending]) for k in pending[0] if k != "keys"}
        keys = [key for p in pending for key in p["keys"]]
        split = self._split(trainer, dataloader_idx)
        for start in range(0, len(keys), self.chunk_rows):
            end = min(start + self.chunk_rows, len(keys))
            if end - start < self.chunk_rows and not final:
                self._pending[dataloader_idx] = [{**{k: v[start:] for k, v in rows.items()}, "keys": keys[start:]}]
                return
            chunk = {k: v[start:end].contiguous() for k, v in rows.items()}
            self._write_chunk(trainer.global_rank, split, dataloader_idx, chunk, keys[start:end])

    def _write_chunk(self, rank: int, split: str, dataloader_idx: int, chunk: Dict[str, torch.Tensor],
                     keys: List[str]) -> None:
        assert self.out is not None
        parts = self._parts.setdefault(dataloader_idx, [])
        folder = self.out / split
        folder.mkdir(parents=True, exist_ok=True)
        stem = f"rank{rank:03d}-{len(parts):05d}"
        self._widths.update({k: int(v.shape[1]) for k, v in chunk.items() if v.dim() == 2})
        if self.format == "safetensors":
            files = [f"{split}/{stem}.safetensors"]
            save_file(chunk, str(self.out / files[0]), metadata={"keys": json.dumps(keys)})
        else:
            files = []
            for name, array in [*((k, v.numpy()) for k, v in chunk.items()), ("keys", np.asarray(keys, dtype=str))]:
                files.append(f"{split}/{stem}.{name}.npy")
                np.save(self.out / files[-1], array, allow_pickle=False)
        parts.append({"rank": rank, "split": split, "files": files, "rows": len(keys)})

    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Write what is left, this rank's part list, and (rank 0, once every rank is done) the manifest."""
        for dataloader_idx in list(self._pending):
            self._flush(trainer, dataloader_idx, final=True)
        assert self.out is not None
        self.out.mkdir(parents=True, exist_ok=True)
        mine = [part for idx in sorted(self._parts) for part in self._parts[idx]]
        (self.out / f"parts-rank{trainer.global_rank:03d}.json").write_text(
            json.dumps({"parts": mine, "widths": self._widths}))
        trainer.strategy.barrier("feature_writer")
        if trainer.is_global_zero:
            self._write_manifest(trainer, pl_module)

    def _write_manifest(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.out is not None
        splits: Dict[str, List[Dict[str, Any]]] = {}
        widths: Dict[str, int] = {}
        for rank in range(trainer.world_size):
            found = json.loads((self.out / f"parts-rank{rank:03d}.json").read_text())
            widths.update(found["widths"])
            for part in found["parts"]:
                splits.setdefault(part.pop("split"), []).append(part)
        hparams = dict(getattr(pl_module, "hparams", {}))
        manifest = {
            "format": self.format,
            "features": widths,
            "splits": {name: {"rows": sum(p["rows"] for p in parts), "parts": parts} for name, parts in splits.items()},
            "world_size": trainer.world_size,
            "model": {k: hparams.get(k) for k in ("weights", "arch", "role", "features", "n_last_blocks") if k in hparams},
        }
        tmp = self.out / ".manifest.json.partial"
        tmp.write_text(json.dumps(manifest, indent=2))
        os.replace(tmp, self.out / "manifest.json")


def read_features(output_dir: str, split: str) -> Dict[str, Any]:
    """Every part of ``split`` listed in ``output_dir/manifest.json``, concatenated in manifest order:
    ``{feature: np.ndarray [N, F], "labels": [N], "keys": [N] str}``."""
    out = Path(output_dir)
    manifest = json.loads((out / "manifest.json").read_text())
    if split not in manifest["splits"]:
        raise KeyError(f"{out / 'manifest.json'} has no split {split!r}; it has {sorted(manifest['splits'])}")
    columns: Dict[str, List[Any]] = {}
    for part in manifest["splits"][split]["parts"]:
        if manifest["format"] == "safetensors":
            from_file = _read_safetensors(out / part["files"][0])
        else:
            from_file = {f.rsplit(".", 2)[-2]: np.load(out / f, allow_pickle=False) for f in part["files"]}
        for name, value in from_file.items():
            columns.setdefault(name, []).append(value)
    return {name: np.concatenate(values) for name, values in columns.items()}


def _read_safetensors(path: Path) -> Dict[str, Any]:
    with safe_open(str(path), framework="np") as f:
        arrays = {k: f.get_tensor(k) for k in f.keys()}
        arrays["keys"] = np.asarray(json.loads(f.metadata()["keys"]), dtype=str)
    return arrays
