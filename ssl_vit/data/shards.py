"""Convert a folder of images (ImageFolder, or unlabelled) into webdataset shards plus the info JSON
the DataModule reads.

Layout written into ``output_dir`` for split ``NAME``::

    NAME-000000.tar, NAME-000001.tar, ...   samples <key>.<ext> (the file's bytes, untouched)
                                            and <key>.cls (class index, ASCII; none when unlabelled)
    NAME.json                               {"num_samples", "shards", "shard_samples", "classes",
                                             "empty_classes", "skipped": [{"path", "reason"}], ...}

``<ext>`` is the format PIL detects in the bytes (``jpg`` for JPEG, ``png``, ``webp``), so the key
always tells the truth about the stored bytes whatever the file was called. Keys are the running
sample index (``00000000``...). Samples are shuffled across shards by ``seed`` (the file list is
sorted first, so the result depends on the seed only); every shard holds ``shard_size`` samples but
the last.

The files are those :func:`ssl_vit.data.listing.list_images` lists (each real file once; links that
loop or lead back into the tree are listed in ``skipped``, with the reason). Each is decoded fully
with the same restricted decoder the pipeline uses; files that fail are listed in ``skipped`` and left
out. Class folders without a readable image stay classes (indices are stable) and are named in
``empty_classes`` and in a warning.
Shards are written as ``NAME-000000.tar.tmp`` ... and renamed only once all are written; the JSON
is written last (atomically). A run that fails part-way removes its temporary files and leaves
nothing that looks like a complete split.
"""
import contextlib
import json
import logging
import os
import random
import re
from multiprocessing import Pool
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

from tqdm.auto import tqdm
from webdataset import TarWriter

from ssl_vit.data.decode import FORMAT_KEYS, CorruptSampleError, open_image, to_rgb
from ssl_vit.data.listing import UNLABELLED, list_images, warn_empty_classes

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
TMP_SUFFIX = ".tmp"


def read_checked(path: str) -> Tuple[Optional[bytes], str]:
    """``(bytes, ext)`` of a readable JPEG/PNG/WEBP file that :func:`to_rgb` converts, else ``(None, reason)``.

    The bytes are kept as they are: the EXIF orientation is applied when training decodes them."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        image = open_image(data)
        to_rgb(image)  # a mode training could not convert is refused here, by name
        return data, FORMAT_KEYS[image.format]
    except (OSError, CorruptSampleError) as exc:
        return None, str(exc)


def _existing(output_dir: Path, split: str) -> List[Path]:
    pattern = re.compile(re.escape(split) + r"-\d{6}\.tar")
    found = [p for p in output_dir.iterdir() if pattern.fullmatch(p.name)]
    info = output_dir / f"{split}.json"
    return sorted(found) + ([info] if info.exists() else [])


def _checked(items: List[Tuple[str, int]], num_workers: int) -> Iterator[Tuple[Optional[bytes], str]]:
    paths = [path for path, _ in items]
    if num_workers <= 0:
        yield from map(read_checked, paths)
        return
    with Pool(num_workers) as pool:
        yield from pool.imap(read_checked, paths, chunksize=64)


def write_shards(
    input_dir: PathLike,
    output_dir: PathLike,
    split: str,
    shard_size: int,
    seed: int = 0,
    overwrite: bool = False,
    num_workers: int = 0,
    progress: bool = True,
    labels: str = "auto",
) -> Dict[str, Any]:
    """Write ``input_dir`` as shuffled webdataset shards and ``<split>.json``.

    Args:
        input_dir: ``input_dir/<class>/<image>`` tree, or a flat or nested folder of unlabelled images.
        output_dir: where shards and JSON go (created if needed).
        split: shard name prefix (``train`` -> ``train-000000.tar``, ``train.json``).
        shard_size: samples per shard (>= 1).
        seed: shuffle seed.
        overwrite: replace an existing split of the same name (else FileExistsError).
        num_workers: processes that read and check images (0: this process).
        progress: show a tqdm progress bar.
        labels: ``"folders"`` (classes from the folders), ``"none"`` (unlabelled: no ``.cls``, no classes)
            or ``"auto"``: unlabelled when ``input_dir`` holds image files and no folder at its top level
            (:func:`ssl_vit.data.listing.list_images`).

    Returns:
        The info dict written to ``<split>.json``.

    Raises:
        FileNotFoundError, NotADirectoryError, ValueError, FileExistsError: bad input, with the
            offending path or value in the message.
    """
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be an integer >= 1, got {shard_size!r}")
    if not split or not re.fullmatch(r"[\w.-]+", split):
        raise ValueError(f"split name must be letters, digits, '_', '-' or '.', got {split!r}")
    listing = list_images(input_dir, labels)
    classes, items = listing.classes, listing.items
    if not items:
        raise ValueError(f"no files under {str(input_dir)!r}")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    old = _existing(output_dir, split)
    if old and not overwrite:
        raise FileExistsError(
            f"{output_dir} already holds split {split!r} ({old[0].name}, ...); pass overwrite=True (--overwrite)"
        )
    random.Random(seed).shuffle(items)

    tmp_paths: List[Path] = []
    shard_samples: List[int] = []
    skipped: List[Dict[str, str]] = list(listing.skipped)
    writer: Optional[TarWriter] = None
    written = 0
    labels_written = set()
    bar = tqdm(total=len(items), desc=f"{split} shards", unit="img", disable=not progress)
    try:
        for (path, label), (data, ext) in zip(items, _checked(items, num_workers)):
            bar.update()
            if data is None:
                logger.warning("skipping unreadable %s: %s", path, ext)
                skipped.append({"path": path, "reason": ext})
                continue
            if writer is None or shard_samples[-1] == shard_size:
                if writer is not None:
                    writer.close()
                tmp_paths.append(output_dir / f"{split}-{len(tmp_paths):06d}.tar{TMP_SUFFIX}")
                writer = TarWriter(str(tmp_paths[-1]), encoder=False, mtime=0)  # int: no pax headers
                shard_samples.append(0)
            sample = {"__key__": f"{written:08d}", ext: data}
            if label != UNLABELLED:
                sample["cls"] = str(label).encode("ascii")
            writer.write(sample)
            shard_samples[-1] += 1
            written += 1
            labels_written.add(label)
        if writer is not None:
            writer.close()
            writer = None
        if not tmp_paths:
            raise ValueError(f"no readable image under {str(input_dir)!r} ({len(skipped)} files skipped)")
        empty = [name for index, name in enumerate(classes) if index not in labels_written]
        if set(empty) - set(listing.empty_classes):
            warn_empty_classes(input_dir, empty, "no readable image")
        # Publish: drop the old JSON first so no moment shows an old JSON beside new shards.
        (output_dir / f"{split}.json").unlink(missing_ok=True)
        names = [p.name[: -len(TMP_SUFFIX)] for p in tmp_paths]
        for tmp, name in zip(tmp_paths, names):
            os.replace(tmp, output_dir / name)
        for stale in set(p.name for p in old) - set(names) - {f"{split}.json"}:
            (output_dir / stale).unlink()
        info = {
            "num_samples": written,
            "shards": names,
            "shard_samples": shard_samples,
            "classes": classes,
            "empty_classes": empty,
            "skipped": skipped,
            "split": split,
            "source": str(Path(input_dir).resolve()),
            "seed": seed,
            "shard_size": shard_size,
        }
        tmp_json = output_dir / f"{split}.json{TMP_SUFFIX}"
        tmp_json.write_text(json.dumps(info, indent=1))
        os.replace(tmp_json, output_dir / f"{split}.json")
    except BaseException:
        # The first error is the one to report: on a full disk the close fails too, and must neither
        # replace it nor stop the temporary files from being removed.
        if writer is not None:
            with contextlib.suppress(Exception):
                writer.close()
            with contextlib.suppress(Exception):
                writer.own_fileobj.close()  # left open when the tar's own close failed
        for tmp in [*tmp_paths, output_dir / f"{split}.json{TMP_SUFFIX}"]:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        raise
    finally:
        bar.close()
    return info
