"""The shard writer: content, JSON, shuffling, failure safety, bad input, the CLI."""
import importlib.util
import json
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pytest

import ssl_vit.data.shards as shards_mod
from ssl_vit.data import write_shards

REPO = Path(__file__).resolve().parents[2]


def read_tar(path: Path) -> dict:
    """key -> {suffix: bytes} of one shard."""
    samples: dict = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, suffix = member.name.split(".", 1)
            samples.setdefault(key, {})[suffix] = tar.extractfile(member).read()
    return samples


def source_order(out: Path, info: dict, files: dict) -> list:
    """Source paths in the order the shards hold them."""
    by_bytes = {data: path for path, (data, _) in files.items()}
    order = []
    for name in info["shards"]:
        for key, sample in sorted(read_tar(out / name).items()):
            image = sample.get("jpg", sample.get("png"))
            order.append(by_bytes[image])
    return order


def test_writer_output_json_and_bytes(tmp_path, make_folder, image_bytes):
    src = tmp_path / "src"
    files = make_folder(src, [5, 4, 3])
    png = src / "c001" / "extra.png"  # a PNG keeps its bytes and gets the .png key
    png.write_bytes(image_bytes(7, fmt="PNG"))
    files[str(png)] = (png.read_bytes(), 1)
    (src / "c000" / "broken.jpg").write_bytes(b"this is not an image")
    truncated = image_bytes(8)[:-40]
    (src / "c002" / "truncated.jpg").write_bytes(truncated)
    (src / "c002" / ".hidden.jpg").write_bytes(b"ignored")

    info = write_shards(src, tmp_path / "out", "train", shard_size=5, seed=3, progress=False)
    out = tmp_path / "out"
    assert info == json.loads((out / "train.json").read_text())
    assert info["num_samples"] == 13
    assert info["classes"] == ["c000", "c001", "c002"]
    assert info["shards"] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert info["shard_samples"] == [5, 5, 3]
    assert sorted(s["path"] for s in info["skipped"]) == sorted(
        [str(src / "c000" / "broken.jpg"), str(src / "c002" / "truncated.jpg")]
    )
    assert all(s["reason"] for s in info["skipped"])
    assert sorted(p.name for p in out.iterdir()) == sorted(info["shards"] + ["train.json"])

    stored = Counter()
    keys = []
    for name, count in zip(info["shards"], info["shard_samples"]):
        samples = read_tar(out / name)
        assert len(samples) == count
        for key, sample in samples.items():
            keys.append(key)
            (suffix,) = set(sample) - {"cls"}
            assert suffix in ("jpg", "png")
            stored[(suffix, sample[suffix], int(sample["cls"].decode("ascii")))] += 1
    expected = Counter(("png" if p.endswith(".png") else "jpg", data, label) for p, (data, label) in files.items())
    assert stored == expected  # bytes exactly as stored in the source files, right class
    assert len(set(keys)) == 13 and all("." not in k for k in keys)


def test_shuffle_depends_on_seed_and_is_reproducible(tmp_path, make_folder):
    files = make_folder(tmp_path / "src", [10, 10])
    infos = {}
    for name, seed, workers in (("a", 0, 0), ("b", 0, 2), ("c", 1, 0)):  # b: checked in 2 processes
        infos[name] = write_shards(
            tmp_path / "src", tmp_path / name, "train", 7, seed=seed, num_workers=workers, progress=False
        )
    orders = {name: source_order(tmp_path / name, infos[name], files) for name in infos}
    assert sorted(orders["a"]) == sorted(files)
    assert orders["a"] == orders["b"]
    assert orders["a"] != orders["c"]
    assert orders["a"] != sorted(files)  # shuffled across classes, not in listing order
    for shard in infos["a"]["shards"]:  # same seed -> byte-identical shards, however many workers
        assert (tmp_path / "a" / shard).read_bytes() == (tmp_path / "b" / shard).read_bytes()


def test_failure_part_way_leaves_no_shards(tmp_path, make_folder, monkeypatch):
    make_folder(tmp_path / "src", [6, 6])
    real = shards_mod.read_checked
    calls = []

    def failing(path):
        calls.append(path)
        if len(calls) == 9:  # after one full shard of 4 and part of the next
            raise OSError("simulated disk failure")
        return real(path)

    monkeypatch.setattr(shards_mod, "read_checked", failing)
    with pytest.raises(OSError, match="simulated"):
        write_shards(tmp_path / "src", tmp_path / "out", "train", 4, progress=False)
    assert list((tmp_path / "out").iterdir()) == []

    # A failing --overwrite run leaves the previous complete split untouched.
    monkeypatch.setattr(shards_mod, "read_checked", real)
    first = write_shards(tmp_path / "src", tmp_path / "out", "train", 4, progress=False)
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    calls.clear()
    monkeypatch.setattr(shards_mod, "read_checked", failing)
    with pytest.raises(OSError, match="simulated"):
        write_shards(tmp_path / "src", tmp_path / "out", "train", 2, seed=5, overwrite=True, progress=False)
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    assert json.loads(before["train.json"])["shards"] == first["shards"]


def test_overwrite_replaces_and_removes_stale_shards(tmp_path, make_folder):
    make_folder(tmp_path / "src", [5, 5])
    write_shards(tmp_path / "src", tmp_path / "out", "train", 2, progress=False)
    assert len(list((tmp_path / "out").glob("train-*.tar"))) == 5
    with pytest.raises(FileExistsError, match="overwrite"):
        write_shards(tmp_path / "src", tmp_path / "out", "train", 5, progress=False)
    info = write_shards(tmp_path / "src", tmp_path / "out", "train", 5, overwrite=True, progress=False)
    assert sorted(p.name for p in (tmp_path / "out").glob("train-*.tar")) == info["shards"] == [
        "train-000000.tar",
        "train-000001.tar",
    ]
    # Another split name in the same folder is not an overwrite.
    write_shards(tmp_path / "src", tmp_path / "out", "val", 5, progress=False)


def test_bad_input_raises_with_clear_message(tmp_path, make_folder, image_bytes):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_shards(tmp_path / "missing", tmp_path / "out", "train", 4, progress=False)
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.jpg").write_bytes(image_bytes(0))
    with pytest.raises(ValueError, match="no class folders"):
        write_shards(tmp_path / "flat", tmp_path / "out", "train", 4, progress=False, labels="folders")
    make_folder(tmp_path / "src", [2])
    with pytest.raises(ValueError, match="shard_size"):
        write_shards(tmp_path / "src", tmp_path / "out", "train", 0, progress=False)
    with pytest.raises(ValueError, match="split name"):
        write_shards(tmp_path / "src", tmp_path / "out", "a/b", 4, progress=False)
    (tmp_path / "bad" / "c0").mkdir(parents=True)
    (tmp_path / "bad" / "c0" / "x.jpg").write_bytes(b"junk")
    with pytest.raises(ValueError, match="no readable image"):
        write_shards(tmp_path / "bad", tmp_path / "out2", "train", 4, progress=False)
    assert list((tmp_path / "out2").iterdir()) == []


def test_cli(tmp_path, make_folder, capsys):
    make_folder(tmp_path / "src", [3, 3])
    args = ["--input", str(tmp_path / "src"), "--output", str(tmp_path / "out"), "--split", "train", "--no-progress"]
    done = subprocess.run(
        [sys.executable, str(REPO / "tools" / "make_shards.py"), *args, "--shard-size", "4"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "6 samples in 2 shards" in done.stdout
    assert json.loads((tmp_path / "out" / "train.json").read_text())["num_samples"] == 6
    spec = importlib.util.spec_from_file_location("make_shards", REPO / "tools" / "make_shards.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main([*args, "--shard-size", "4"]) != 0  # would overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert tool.main([*args, "--shard-size", "0", "--overwrite"]) != 0
    assert "shard_size must be" in capsys.readouterr().err
    assert tool.main([*args, "--shard-size", "4", "--input", str(tmp_path / "nope")]) != 0
    assert "does not exist" in capsys.readouterr().err
