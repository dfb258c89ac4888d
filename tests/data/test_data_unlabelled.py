"""Unlabelled images: make-shards on flat and nested folders, pretraining on the result, and
index-shards for webdataset shards written elsewhere."""
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image
from webdataset import TarWriter

from ssl_vit.data import EvalTransform, PretrainTransform, ShardDataModule, write_shards
from ssl_vit.data.shard_index import index_shards
from ssl_vit.data.shard_tools import index_shards_main, make_shards_main
from ssl_vit.methods.mae import MAE

TO_TENSOR = EvalTransform(8, crop_pct=1.0)


def photos(root: Path, image_bytes, nested: bool, n: int = 6, size: int = 8) -> Path:
    """``n`` images under ``root``: at its top level, or in dated sub-folders when ``nested``."""
    for i in range(n):
        folder = root / f"2024-0{i % 2 + 1}" if nested else root
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"img{i}.jpg").write_bytes(image_bytes(i, size))
    return root


def members(shard: Path) -> list:
    with tarfile.open(shard) as tar:
        return sorted(m.name.split(".", 1)[1] for m in tar.getmembers())


def all_labels(module: ShardDataModule) -> list:
    module.setup()
    return [int(y) for _, labels in module.val_dataloader() for y in labels]


def test_flat_folder_is_written_unlabelled_and_streams_with_label_minus_one(tmp_path, image_bytes):
    flat = photos(tmp_path / "flat", image_bytes, nested=False)
    info = write_shards(flat, tmp_path / "out", "train", 4, progress=False)
    assert info["num_samples"] == 6 and info["classes"] == [] and info["shard_samples"] == [4, 2]
    assert members(tmp_path / "out" / "train-000000.tar") == ["jpg"] * 4  # no .cls
    pattern = str(tmp_path / "out" / "train-{000000..000001}.tar")
    module = ShardDataModule(pattern, val=pattern, batch_size=2, num_workers=0, val_transform=TO_TENSOR,
                             pin_memory=False)
    assert module.num_classes == 0 and all_labels(module) == [-1] * 6


def test_nested_folder_needs_unlabelled_and_a_mixed_top_level_is_refused(tmp_path, image_bytes, capsys):
    nested = photos(tmp_path / "nested", image_bytes, nested=True)
    args = ["--input", str(nested), "--output", str(tmp_path / "out"), "--split", "train", "--shard-size", "4",
            "--no-progress"]
    assert make_shards_main(args) == 0 and "2 classes" in capsys.readouterr().out  # sub-folders read as classes
    assert make_shards_main([*args, "--unlabelled", "--overwrite"]) == 0
    assert "6 samples in 2 shards, unlabelled" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "train.json").read_text())["classes"] == []
    (nested / "loose.jpg").write_bytes(image_bytes(99))
    assert make_shards_main([*args, "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "holds both image files (loose.jpg, ...) and folders (2024-01, ...)" in err and "--unlabelled" in err
    assert make_shards_main([*args, "--overwrite", "--unlabelled"]) == 0
    assert "7 samples" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        make_shards_main(["--help"])
    assert "--unlabelled" in capsys.readouterr().out


def test_mae_pretrains_on_unlabelled_shards(tmp_path, image_bytes):
    write_shards(photos(tmp_path / "flat", image_bytes, nested=False, n=8, size=32), tmp_path / "out", "train", 4,
                 progress=False)
    data = ShardDataModule(str(tmp_path / "out" / "train-{000000..000001}.tar"), batch_size=4, num_workers=0,
                           train_transform=PretrainTransform(size=32), pin_memory=False)
    model = MAE(arch="vit_tiny_patch4_32", embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32, decoder_depth=1,
                decoder_num_heads=2, warmup_epochs=0)
    before = [p.detach().clone() for p in model.parameters()]
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=data)
    assert trainer.global_step == 2
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def foreign_shards(root: Path, image_bytes, names: list, per_shard: int, label: bool) -> None:
    """Shards as other tools write them: ``.png`` images, ``.txt``/``.json`` side members, ``.cls`` if ``label``."""
    root.mkdir(parents=True)
    for s, name in enumerate(names):
        with TarWriter(str(root / name)) as writer:
            for i in range(per_shard):
                n = s * per_shard + i
                sample = {"__key__": f"{n:09d}", "png": image_bytes(n, fmt="PNG"), "txt": "a caption", "json": {"n": n}}
                if label:
                    sample["cls"] = n % 3
                writer.write(sample)


def test_index_shards_lets_foreign_shards_stream(tmp_path, image_bytes, capsys):
    foreign_shards(tmp_path / "web", image_bytes, ["00000.tar", "00001.tar"], 3, label=False)  # img2dataset names
    pattern = str(tmp_path / "web" / "{00000..00001}.tar")
    with pytest.raises(ValueError, match="index_shards.py --output"):
        ShardDataModule(pattern, batch_size=2).setup()
    with pytest.raises(ValueError, match="pass the info JSON path explicitly"):
        index_shards(pattern, progress=False)  # no NAME- prefix to derive NAME.json from
    output = str(tmp_path / "web" / "web.json")
    assert index_shards_main(["--shards", pattern, "--output", output, "--no-progress"]) == 0
    assert "6 samples in 2 shards, no classes" in capsys.readouterr().out
    module = ShardDataModule(pattern, val=pattern, train_info=str(tmp_path / "web" / "web.json"),
                             val_info=str(tmp_path / "web" / "web.json"), batch_size=2, num_workers=0,
                             val_transform=TO_TENSOR, pin_memory=False)
    assert module.num_train_samples == 6 and all_labels(module) == [-1] * 6

    foreign_shards(tmp_path / "lab", image_bytes, ["set-000000.tar", "set-000001.tar"], 4, label=True)
    pattern = str(tmp_path / "lab" / "set-{000000..000001}.tar")
    with pytest.raises(FileNotFoundError, match="tools/index_shards.py for shards written elsewhere"):
        ShardDataModule(pattern, batch_size=2).setup()
    assert index_shards(pattern, progress=False) == str(tmp_path / "lab" / "set.json")
    meta = json.loads((tmp_path / "lab" / "set.json").read_text())
    assert meta["shard_samples"] == [4, 4] and meta["classes"] == ["0", "1", "2"]
    module = ShardDataModule(pattern, val=pattern, batch_size=2, num_workers=0, val_transform=TO_TENSOR,
                             pin_memory=False)
    assert all_labels(module) == [n % 3 for n in range(8)]
    assert index_shards_main(["--shards", pattern, "--no-progress"]) == 2
    assert "set.json already exists" in capsys.readouterr().err


def test_index_shards_refuses_shards_without_samples(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    with TarWriter(str(tmp_path / "x" / "x-000000.tar")) as writer:
        writer.write({"__key__": "a", "txt": "no image"})
    assert index_shards_main(["--shards", str(tmp_path / "x" / "x-000000.tar"), "--no-progress"]) == 2
    assert "x-000000.tar holds no sample with a .jpg/.jpeg/.png/.webp/.cls member" in capsys.readouterr().err
    assert index_shards_main(["--shards", str(tmp_path / "x" / "missing-000000.tar"), "--no-progress"]) == 2
    assert "missing-000000.tar" in capsys.readouterr().err
