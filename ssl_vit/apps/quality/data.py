"""The benchmark's data: an archive or an image folder -> ``train/`` and ``test/`` ImageFolder trees
(optionally a class-balanced subset) -> webdataset shards.

The input is either an archive (``.tar``, ``.tar.gz``...) holding ``.../train/<class>/<image>`` and
``.../test/<class>/<image>`` members (``../shared/datasets/cifar10-jpg.tar.gz`` holds
``cifar10/train/airplane/0001.jpg``...), or a folder with ``train/`` and ``test/`` ImageFolder
trees. Archive members are never extracted by name: each selected image is written to
``<dest>/<split>/<class>/<file>`` from names checked to be plain (no ``..``, no ``/``), and every
other member (links, directories, other files) is ignored.

A limit of ``n`` images for a split keeps, of each class, the first ``n // classes`` files in sorted
name order, so a subset is class-balanced and the same on every run.
"""
import bisect
import re
import shutil
import tarfile
from pathlib import Path, PurePosixPath
from typing import Dict, Iterator, List, Optional, Tuple

from ssl_vit.apps.runs import shard_pattern
from ssl_vit.data import write_shards
from ssl_vit.data.decode import IMAGE_SUFFIXES

SPLITS = ("train", "test")
SHARD_SIZE = 5000
_PLAIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
Listing = Dict[str, Dict[str, List[str]]]  # split -> class -> file names


def _image_member(name: str) -> Optional[Tuple[str, str, str]]:
    """``(split, class, file)`` of an archive member ``.../<split>/<class>/<file>``, else None."""
    parts = PurePosixPath(name).parts
    if len(parts) < 3:
        return None
    split, cls, file = parts[-3:]
    if split not in SPLITS or not _PLAIN.fullmatch(cls) or not _PLAIN.fullmatch(file):
        return None
    return (split, cls, file) if PurePosixPath(file).suffix.lower() in IMAGE_SUFFIXES else None


def _members(archive: Path) -> Iterator[Tuple[tarfile.TarFile, tarfile.TarInfo, Tuple[str, str, str]]]:
    try:
        with tarfile.open(archive, "r|*") as tar:  # streamed: one pass over the compressed file
            for member in tar:
                found = _image_member(member.name) if member.isfile() else None
                if found is not None:
                    yield tar, member, found
    except (tarfile.TarError, EOFError, OSError) as err:
        raise ValueError(f"cannot read the archive {archive}: {err}") from err


def _check_listing(listing: Listing, where: str) -> None:
    for split in SPLITS:
        if not listing.get(split):
            raise ValueError(
                f"{where} has no images under {split}/<class>/: expected train/<class>/<image> and "
                "test/<class>/<image> (e.g. cifar10/train/airplane/0001.jpg)"
            )
    if sorted(listing["train"]) != sorted(listing["test"]):
        raise ValueError(f"{where}: the train classes {sorted(listing['train'])} differ from the test classes "
                         f"{sorted(listing['test'])}")


def select(listing: Listing, limits: Dict[str, Optional[int]]) -> Listing:
    """Keep, for each split with a limit ``n``, the first ``n // classes`` sorted files of each class."""
    chosen: Listing = {}
    for split, classes in listing.items():
        limit = limits.get(split)
        if limit is not None and limit < len(classes):
            raise ValueError(f"--limit-{split} {limit} is smaller than the number of classes ({len(classes)}): "
                             "the subset must hold every class")
        per_class = None if limit is None else limit // len(classes)
        chosen[split] = {cls: sorted(files)[:per_class] for cls, files in classes.items()}
    return chosen


def _count(listing: Listing) -> Dict[str, int]:
    return {split: sum(len(files) for files in classes.values()) for split, classes in listing.items()}


def unpack_archive(archive: Path, dest: Path, limits: Dict[str, Optional[int]]) -> Listing:
    """Write the archive's (selected) train/test images under ``dest/<split>/<class>/<file>``.

    One pass over the archive: images of a split without a limit are written as they come; for a
    split with limit ``n``, each class keeps its ``n`` smallest names in memory (enough whatever the
    number of classes turns out to be), and :func:`select` picks from them at the end.
    """
    held: Dict[str, Dict[str, List[Tuple[str, bytes]]]] = {}
    written: Listing = {}

    def write(split: str, cls: str, file: str, payload: bytes) -> None:
        target = dest / split / cls / file
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(payload)
        written.setdefault(split, {}).setdefault(cls, []).append(file)

    for tar, member, (split, cls, file) in _members(archive):
        source = tar.extractfile(member)
        if source is None:
            raise ValueError(f"{archive}: member {member.name} has no data")
        limit = limits.get(split)
        if limit is None:
            write(split, cls, file, source.read())
            continue
        kept = held.setdefault(split, {}).setdefault(cls, [])
        if len(kept) < limit or file < kept[-1][0]:
            bisect.insort(kept, (file, source.read()))
            del kept[limit:]
    listing = {**{s: {c: [f for f, _ in kept] for c, kept in classes.items()} for s, classes in held.items()}, **written}
    _check_listing(listing, str(archive))
    for split, classes in select({s: listing[s] for s in held}, limits).items():
        for cls, files in classes.items():
            payloads = dict(held[split][cls])
            for file in files:
                write(split, cls, file, payloads[file])
    return {split: written[split] for split in SPLITS}


def _folder_listing(root: Path) -> Listing:
    listing: Listing = {}
    for split in SPLITS:
        if not (root / split).is_dir():
            continue
        for class_dir in sorted(p for p in (root / split).iterdir() if p.is_dir() and not p.name.startswith(".")):
            files = sorted(p.name for p in class_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            listing.setdefault(split, {})[class_dir.name] = files
    return listing


def prepare_images(source: Path, dest: Path, limit_train: Optional[int] = None, limit_test: Optional[int] = None) -> Dict:
    """The ``train`` and ``test`` ImageFolder trees of ``source`` (an archive or a folder), limited.

    Returns:
        ``{"train": dir, "test": dir, "classes": [...], "counts": {"train": n, "test": n}, "source": str}``;
        a folder without limits is used where it is, anything else is written under ``dest``.
    """
    source = Path(source)
    limits = {"train": limit_train, "test": limit_test}
    for split, value in limits.items():
        if value is not None and value < 1:
            raise ValueError(f"--limit-{split} must be >= 1, got {value}")
    if source.is_dir():
        listing = _folder_listing(source)
        _check_listing(listing, str(source))
        if limit_train is None and limit_test is None:
            root = source
        else:
            root, listing = dest, select(listing, limits)
            for split, classes in listing.items():
                for cls, files in classes.items():
                    (dest / split / cls).mkdir(parents=True, exist_ok=True)
                    for file in files:
                        shutil.copyfile(source / split / cls / file, dest / split / cls / file)
    elif source.is_file():
        root, listing = dest, unpack_archive(source, dest, limits)
    else:
        raise FileNotFoundError(f"--data {source} does not exist (an archive or a folder with train/ and test/)")
    return {
        "train": str(root / "train"), "test": str(root / "test"), "classes": sorted(listing["train"]),
        "counts": _count(listing), "source": str(source),
    }


def make_shards(images: Dict, dest: Path, seed: int = 0, shard_size: int = SHARD_SIZE) -> Dict[str, str]:
    """Shards of the train tree (``train-*.tar``) and of the test tree (``val-*.tar``, as the recipes
    name them), with their info JSONs; returns the brace patterns."""
    patterns = {}
    for split, name in (("train", "train"), ("test", "val")):
        info = write_shards(images[split], dest, name, shard_size=shard_size, seed=seed, overwrite=True, progress=False)
        if info["skipped"]:
            raise ValueError(f"{len(info['skipped'])} unreadable images in {images[split]}, e.g. {info['skipped'][0]}")
        patterns[name] = shard_pattern(info, dest)
    return patterns


def gallery_images(test_dir: Path, count: int) -> List[Path]:
    """``count`` test images, taking each class's next image in turn (sorted names): all classes shown."""
    classes = [sorted(p for p in d.iterdir() if p.is_file()) for d in sorted(Path(test_dir).iterdir()) if d.is_dir()]
    chosen: List[Path] = []
    for index in range(max((len(c) for c in classes), default=0)):
        chosen += [files[index] for files in classes if index < len(files)]
        if len(chosen) >= count:
            break
    if not chosen:
        raise ValueError(f"no test images in {test_dir}")
    return chosen[:count]
