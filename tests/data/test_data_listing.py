"""Listing image folders: links that loop or lead back into the tree are not followed, every real
file is listed once, and the shard writer and ImageFolderDataModule share the listing."""
import logging
import os
from pathlib import Path

import pytest

from ssl_vit.data import ImageFolderDataModule, write_shards
from ssl_vit.data.listing import list_images

pytestmark = pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symbolic links")


@pytest.fixture
def looped(tmp_path, make_folder) -> Path:
    """``src/c000`` and ``src/c001`` with two images each, and ``c000/up -> ..`` (the issue's loop)."""
    make_folder(tmp_path / "src", [2, 2])
    os.symlink("..", tmp_path / "src" / "c000" / "up")
    return tmp_path / "src"


def test_loop_back_to_the_parent_lists_each_file_once(looped, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="ssl_vit.data.listing"):
        listing = list_images(looped)
    assert sorted(listing.items) == [(str(looped / f"c{c:03d}" / f"{j:03d}.jpg"), c) for c in (0, 1) for j in (0, 1)]
    reason = f"link to {looped.resolve()}, inside the tree (a loop, or files listed where they are)"
    assert listing.skipped == [{"path": str(looped / "c000" / "up"), "reason": reason}]
    assert "1 link(s) not followed" in caplog.text and str(looped / "c000" / "up") in caplog.text

    info = write_shards(looped, tmp_path / "out", "train", 8, progress=False)
    assert info["num_samples"] == 4 and info["skipped"] == listing.skipped
    module = ImageFolderDataModule(str(looped), batch_size=2, num_workers=0)
    assert module.num_train_samples == 4 and module.classes == ["c000", "c001"]


def test_links_inside_the_tree_keep_the_real_label(tmp_path, make_folder):
    files = make_folder(tmp_path / "src", [2, 2])
    src = tmp_path / "src"
    os.symlink("../c001", src / "c000" / "to_b")  # a folder link to another class
    os.symlink(src / "c001" / "000.jpg", src / "c000" / "b0.jpg")  # a file link to another class's file
    os.symlink("c000", src / "c002")  # a class folder that is a link to another class
    os.symlink("../../..", src / "c001" / "root")  # contains the tree
    os.symlink("gone.jpg", src / "c001" / "broken.jpg")
    listing = list_images(src)
    assert sorted(listing.items) == sorted((path, label) for path, (_, label) in files.items())
    reasons = {Path(s["path"]).name: s["reason"] for s in listing.skipped}
    assert set(reasons) == {"to_b", "b0.jpg", "c002", "root", "broken.jpg"}
    assert "contains the tree" in reasons["root"] and reasons["broken.jpg"] == "broken link"
    assert listing.empty_classes == ["c002"]


def test_links_out_of_the_tree_are_followed_once(tmp_path, make_folder, image_bytes):
    outside = tmp_path / "elsewhere"
    (outside / "deep").mkdir(parents=True)
    (outside / "deep" / "x.jpg").write_bytes(image_bytes(1))
    os.symlink("..", outside / "deep" / "loop")  # a loop outside the tree
    (tmp_path / "src" / "c000").mkdir(parents=True)
    (tmp_path / "src" / "c000" / "y.jpg").write_bytes(image_bytes(2))
    os.symlink(outside, tmp_path / "src" / "c001")  # a class kept on another disk
    os.symlink(outside, tmp_path / "src" / "c000" / "again")  # the same folder a second time
    listing = list_images(tmp_path / "src")
    assert listing.items == [(str(tmp_path / "src" / "c000" / "y.jpg"), 0),
                             (str(tmp_path / "src" / "c001" / "deep" / "x.jpg"), 1)]
    assert sorted(Path(s["path"]).name for s in listing.skipped) == ["again", "loop"]


def test_empty_class_folders_keep_their_index_and_are_named(tmp_path, make_folder, caplog):
    make_folder(tmp_path / "src", [2, 0, 2])
    with caplog.at_level(logging.WARNING, logger="ssl_vit.data.listing"):
        info = write_shards(tmp_path / "src", tmp_path / "out", "train", 8, progress=False)
    assert info["classes"] == ["c000", "c001", "c002"] and info["empty_classes"] == ["c001"]
    assert "1 class folder(s) with no file: c001" in caplog.text
