"""ImageFolderDataModule against ShardDataModule, unreadable files, ranks, and the CLI view of both."""
import logging
from collections import Counter

import pytest
import torch
from jsonargparse import ArgumentParser

from ssl_vit.data import EvalTransform, ImageFolderDataModule, PretrainTransform, ShardDataModule, write_shards
from ssl_vit.data.decode import CorruptDataError

TO_TENSOR = EvalTransform(size=8, crop_pct=1.0)


class TwoViews:
    def __call__(self, image):
        return [EvalTransform(8, crop_pct=1.0)(image), EvalTransform(4, resize=4)(image)]


def content(loader) -> Counter:
    """Multiset of (label, image bytes) over one pass."""
    return Counter(
        (int(y), x.numpy().tobytes()) for images, labels in loader for x, y in zip(images, labels)
    )


@pytest.fixture
def both(tmp_path, make_folder):
    make_folder(tmp_path / "src", [6, 5, 5])
    write_shards(tmp_path / "src", tmp_path / "shards", "train", 5, progress=False)
    common = dict(batch_size=4, num_workers=0, train_transform=TO_TENSOR, val_transform=TO_TENSOR)
    shards = ShardDataModule(str(tmp_path / "shards" / "train-{000000..000003}.tar"),
                             val=str(tmp_path / "shards" / "train-{000000..000003}.tar"), **common)
    folder = ImageFolderDataModule(str(tmp_path / "src"), val=str(tmp_path / "src"), **common)
    return shards, folder


def test_image_folder_matches_shards(both):
    shards, folder = both
    for module in both:
        module.setup("fit")
    assert folder.classes == shards.classes == ["c000", "c001", "c002"]
    assert folder.num_classes == shards.num_classes == 3
    assert folder.num_train_samples == shards.num_train_samples == 16
    assert content(folder.val_dataloader()) == content(shards.val_dataloader())  # same pixels, same labels
    for module in both:
        images, labels = next(iter(module.train_dataloader()))
        assert type(images) is torch.Tensor and images.shape == (4, 3, 8, 8) and images.dtype == torch.float32
        assert labels.dtype == torch.int64 and labels.shape == (4,)
        module.train_transform = TwoViews()
        views, _ = next(iter(module.train_dataloader()))
        assert isinstance(views, list) and [tuple(v.shape) for v in views] == [(4, 3, 8, 8), (4, 3, 4, 4)]
    assert len(folder.train_dataloader()) == 4 and len(shards.train_dataloader()) == 4


def test_unreadable_files_are_skipped_reported_and_limited(tmp_path, make_folder, caplog):
    make_folder(tmp_path / "src", [10, 9])
    broken = tmp_path / "src" / "c001" / "999.jpg"  # sorts last in c001
    broken.write_bytes(b"\xff\xd8 truncated jpeg")
    module = ImageFolderDataModule(str(tmp_path / "src"), val=str(tmp_path / "src"), batch_size=5,
                                   num_workers=0, val_transform=TO_TENSOR, max_corrupt_fraction=0.1)
    with caplog.at_level(logging.WARNING, logger="ssl_vit.data.pipeline"):
        labels = [int(y) for _, ys in module.val_dataloader() for y in ys]
    # 20 files, the broken one replaced by the next readable file (wrapping to the first)
    assert len(labels) == 20 and Counter(labels) == {0: 11, 1: 9}
    assert any(str(broken) in r.message for r in caplog.records)
    strict = ImageFolderDataModule(str(tmp_path / "src"), val=str(tmp_path / "src"), batch_size=5,
                                   num_workers=2, val_transform=TO_TENSOR, max_corrupt_fraction=0.01)
    with pytest.raises(CorruptDataError, match="999.jpg"):
        list(strict.val_dataloader())


def test_image_folder_ranks_get_equal_batches(tmp_path, make_folder):
    make_folder(tmp_path / "src", [1] * 23)  # label == file id
    seen, lengths = [], []
    for rank in range(2):
        module = ImageFolderDataModule(str(tmp_path / "src"), batch_size=4, num_workers=0, rank=rank,
                                       world_size=2, train_transform=TO_TENSOR)
        loader = module.train_dataloader()
        batches = [ys.tolist() for _, ys in loader]
        lengths.append((len(loader), len(batches)))
        seen += [y for b in batches for y in b]
    assert lengths == [(3, 3), (3, 3)]  # 12 per rank (DistributedSampler), full batches only
    assert len(seen) == 24 and len(set(seen)) >= 20


def test_bad_arguments_and_mismatched_classes(tmp_path, make_folder):
    make_folder(tmp_path / "a", [2, 2])
    make_folder(tmp_path / "b", [2, 2, 2])
    with pytest.raises(ValueError, match="batch_size"):
        ImageFolderDataModule(str(tmp_path / "a"), batch_size=0)
    with pytest.raises(ValueError, match="rank"):
        ShardDataModule("x-000000.tar", rank=2, world_size=2)
    with pytest.raises(ValueError, match="classes"):
        ImageFolderDataModule(str(tmp_path / "a"), val=str(tmp_path / "b")).setup("fit")
    with pytest.raises(ValueError, match="fewer than one batch"):
        ImageFolderDataModule(str(tmp_path / "a"), batch_size=8).train_dataloader()
    with pytest.raises(FileNotFoundError, match="train.json"):
        ShardDataModule(str(tmp_path / "nowhere" / "train-000000.tar")).setup("fit")


def test_cli_parses_typed_arguments_and_transform_class_paths():
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(ShardDataModule, "data")
    cfg = parser.parse_object(
        {"data": {"train": "/d/train-{000000..000009}.tar", "batch_size": 32, "resampled": True,
                  "train_transform": {"class_path": "ssl_vit.data.PretrainTransform", "init_args": {"size": 32}}}}
    )
    module = parser.instantiate_classes(cfg).data
    assert isinstance(module, ShardDataModule) and module.batch_size == 32 and module.resampled
    assert isinstance(module.train_transform, PretrainTransform) and module.train_transform.size == 32
    with pytest.raises(Exception, match="batchsize"):
        parser.parse_object({"data": {"train": "/d/x-000000.tar", "batchsize": 3}})
