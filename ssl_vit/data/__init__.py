"""Data: webdataset shards (writer and streaming DataModule), ImageFolder DataModule, transforms.

    write_shards("cifar10/train", "shards", "train", shard_size=5000)      # or tools/make_shards.py
    write_shards("photos", "shards", "train", shard_size=1000, labels="none")  # unlabelled, nested
    index_shards("web/train-{000000..000099}.tar")     # web/train.json for shards written elsewhere
    dm = ShardDataModule("shards/train-{000000..000009}.tar", batch_size=256,
                         train_transform=PretrainTransform(size=32))

Names are imported lazily, so that ``tools/make_shards.py`` does not pay for Lightning.
"""
from importlib import import_module
from typing import Any

_EXPORTS = {
    "ShardDataModule": "ssl_vit.data.datamodule",
    "ImageFolderDataModule": "ssl_vit.data.folders",
    "PretrainTransform": "ssl_vit.data.transforms",
    "EvalTransform": "ssl_vit.data.transforms",
    "write_shards": "ssl_vit.data.shards",
    "index_shards": "ssl_vit.data.shard_index",
    "export_digits": "ssl_vit.data.digits",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'ssl_vit.data' has no attribute {name!r}")
