"""Index webdataset shards that ssl_vit did not write: count their samples and write the info JSON
:class:`ssl_vit.data.ShardDataModule` reads, so that they stream without being rewritten.

A sample is what the stream reads (:func:`ssl_vit.data.pipeline.read_shard`): the members of one key
among ``.jpg``/``.jpeg``/``.png``/``.webp`` (the image) and ``.cls`` (an ASCII class index); other
members (``.txt``, ``.json``...) are ignored, and a key with none of these is not a sample. The counts
are read, so every shard is read once, whole.

Classes: when every sample has a valid ``.cls``, the JSON lists ``"0"`` ... ``"K-1"`` (``K`` = the
largest index + 1: the shards hold no class names); otherwise no classes (labels then read as -1 where
there is no ``.cls``). Samples without an image member stay in the counts (the stream skips and counts
them as corrupt) and are reported.
"""
import json
import logging
import os
import posixpath
from typing import Any, Dict, Optional

from tqdm.auto import tqdm
from webdataset.shardlists import expand_urls

from ssl_vit.data.decode import IMAGE_KEYS, LABEL_KEY, CorruptSampleError, decode_label
from ssl_vit.data.pipeline import read_shard
from ssl_vit.data.shard_info import default_info_path

logger = logging.getLogger(__name__)


def _count(url: str) -> Dict[str, Any]:
    """Samples, samples without an image member, and the labels of one shard (``None``: some lack one)."""
    samples, imageless, labels = 0, 0, []
    for sample in read_shard(url):
        samples += 1
        imageless += not any(key in sample for key in IMAGE_KEYS)
        if labels is not None:
            try:
                labels.append(decode_label(sample[LABEL_KEY]))
            except (KeyError, CorruptSampleError):
                labels = None
    return {"samples": samples, "imageless": imageless, "labels": labels}


def index_shards(shards: str, info: Optional[str] = None, overwrite: bool = False, progress: bool = True) -> str:
    """Count the samples of ``shards`` and write their info JSON.

    Args:
        shards: local path, brace pattern, ``::`` list or any URL webdataset opens.
        info: where the JSON goes; default ``<dirname>/<NAME>.json`` of the first shard
            (``NAME-INDEX.tar``), where :class:`ShardDataModule` looks for it.
        overwrite: replace an existing JSON (else ``FileExistsError``).
        progress: show a progress bar over the shards.

    Returns:
        The path of the JSON written.

    Raises:
        ValueError: no shards, a shard with no sample, or shard names that are not unique.
        FileExistsError: the JSON exists and ``overwrite`` is false.
        ssl_vit.data.decode.ShardReadError: a shard cannot be read (named).
    """
    urls = expand_urls(shards)
    if not shards or not urls:
        raise ValueError(f"no shards in {shards!r}")
    names = [posixpath.basename(url) for url in urls]
    if len(set(names)) != len(names):
        raise ValueError(f"shard names in {shards!r} are not unique; the info JSON lists shards by file name")
    info = info or default_info_path(urls[0])
    if "://" in info or info.startswith("pipe:"):
        raise ValueError(f"the info JSON is written to a local path, got {info!r}; pass one (--output)")
    if os.path.exists(info) and not overwrite:
        raise FileExistsError(f"{info} already exists; pass overwrite=True (--overwrite) to replace it")
    counts = []
    for url in tqdm(urls, desc="index", unit="shard", disable=not progress):
        counts.append(_count(url))
        if counts[-1]["samples"] == 0:
            raise ValueError(
                f"shard {url} holds no sample with a {'/'.join('.' + k for k in (*IMAGE_KEYS, LABEL_KEY))} member"
            )
    labels = [c["labels"] for c in counts]
    classes = [] if None in labels else [str(i) for i in range(max(max(l, default=-1) for l in labels) + 1)]
    imageless = sum(c["imageless"] for c in counts)
    if imageless:
        logger.warning(
            "%d sample(s) of %s have no image member: the stream will skip them as corrupt", imageless, shards
        )
    meta = {
        "num_samples": sum(c["samples"] for c in counts),
        "shards": names,
        "shard_samples": [c["samples"] for c in counts],
        "classes": classes,
        "imageless_samples": imageless,
        "source": shards,
        "indexed": True,  # counted from the shards, not written by make_shards
    }
    with open(info + ".tmp", "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(info + ".tmp", info)
    logger.info("%s: %d samples in %d shards, %d classes", info, meta["num_samples"], len(names), len(classes))
    return info
