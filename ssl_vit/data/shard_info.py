"""The shard info JSON (written by :func:`ssl_vit.data.shards.write_shards`): which shards a pattern
names, how many samples each holds, the class names; checked at start-up (missing or empty local
shards fail here, naming them, before any compute)."""
import json
import os
import posixpath
import re
from dataclasses import dataclass
from typing import Dict, List, Optional

from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls

from ssl_vit.data.decode import ShardReadError


@dataclass
class ShardInfo:
    """What a split's info JSON says about the shards a pattern names.

    Attributes:
        urls: the shard URLs (brace patterns and ``::`` lists expanded).
        shard_samples: samples per URL (``None`` when the JSON has no per-shard counts).
        num_samples: samples in these shards.
        classes: class names in index order (possibly empty).
        info_path: where the JSON was read.
    """

    urls: List[str]
    shard_samples: Optional[List[int]]
    num_samples: int
    classes: List[str]
    info_path: str


def default_info_path(url: str) -> str:
    """``<dirname>/<NAME>.json`` for a shard URL ``<dirname>/<NAME>-<index>.tar``."""
    if url.startswith("pipe:"):
        raise ValueError(f"cannot derive the info JSON location from the pipe: URL {url!r}; pass it explicitly")
    dirname, basename = posixpath.split(url)
    if "-" not in basename:
        raise ValueError(
            f"shard name {basename!r} is not NAME-INDEX.tar; pass the info JSON path explicitly "
            "(write one for shards from elsewhere with tools/index_shards.py --output)"
        )
    return posixpath.join(dirname, basename.rsplit("-", 1)[0] + ".json")


def _shard_name(url: str, known: Dict[str, int]) -> Optional[str]:
    candidates = re.findall(r"[^/\s'\"=:]+\.tar(?![\w.])", url)
    return next((c for c in reversed(candidates) if c in known), None)


def _local_path(url: str) -> Optional[str]:
    """The file of a local shard URL (a path or ``file:``); None for ``pipe:``, ``http:``... URLs."""
    if url.startswith("file:"):
        return url[len("file:"):]
    return None if re.match(r"[a-zA-Z][a-zA-Z0-9+.-]+:", url) else url


def _check_local_shards(shards: str, urls: List[str], counts: Optional[List[int]], info_path: str) -> None:
    """Start-up checks of the local shards of a pattern: every file exists (else
    ``FileNotFoundError`` naming the missing ones) and none that the JSON says holds samples is an
    empty tar (else ``ShardReadError``; one 512-byte read per shard: an empty tar starts with a zero
    end-of-archive block)."""
    missing = [url for url in urls if _local_path(url) is not None and not os.path.isfile(_local_path(url))]
    if missing:
        what = "matches no file" if len(missing) == len(urls) else f"names {len(missing)} missing shard(s) of {len(urls)}"
        raise FileNotFoundError(f"the shard pattern {shards!r} {what}: {', '.join(missing[:3])}" + (" ..." if len(missing) > 3 else ""))
    for url, count in zip(urls, counts or []):
        path = _local_path(url)
        if path is not None and count > 0:
            with open(path, "rb") as f:
                block = f.read(512)
            if len(block) < 512 or not block.strip(b"\0"):
                raise ShardReadError(f"shard {url} is empty (no tar member), but {info_path} says it holds {count} samples")


def load_shard_info(shards: str, info: Optional[str] = None) -> ShardInfo:
    """Expand a shard pattern and read its sample counts from the info JSON.

    Args:
        shards: local path, brace pattern (``/d/train-{000000..000127}.tar``), ``::``-separated list
            or any URL webdataset opens (``pipe:...``, ``http://...``).
        info: the info JSON (path or URL); default ``<dirname>/<NAME>.json`` of the first shard.

    Raises:
        FileNotFoundError: the JSON cannot be read.
        ValueError: a malformed JSON, or a shard the JSON does not list.
    """
    urls = expand_urls(shards)
    if not shards or not urls:
        raise ValueError(f"no shards in {shards!r}")
    info_path = info or default_info_path(urls[0])
    try:
        stream = gopen(info_path, "rb")
        try:
            meta = json.loads(stream.read().decode("utf-8"))
        finally:
            stream.close()
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(
            f"cannot read the shard info JSON {info_path!r} ({exc}); it is written beside the shards by "
            "tools/make_shards.py (tools/index_shards.py for shards written elsewhere), or pass its path as "
            "train_info/val_info"
        ) from exc
    for key, kind in (("num_samples", int), ("shards", list)):
        if not isinstance(meta.get(key), kind):
            raise ValueError(f"{info_path}: {key!r} missing or not a {kind.__name__}")
    classes = meta.get("classes") or []
    counts = meta.get("shard_samples")
    if counts is None:
        _check_local_shards(shards, urls, None, info_path)
        return ShardInfo(urls, None, int(meta["num_samples"]), [str(c) for c in classes], info_path)
    if len(counts) != len(meta["shards"]) or not all(isinstance(c, int) and c >= 0 for c in counts):
        raise ValueError(f"{info_path}: 'shard_samples' must be one count >= 0 per entry of 'shards'")
    known = dict(zip(meta["shards"], counts))
    shard_samples = []
    for url in urls:
        name = _shard_name(url, known)
        if name is None:
            raise ValueError(f"shard {url!r} is not listed in {info_path} (shards: {meta['shards'][:3]}...)")
        shard_samples.append(known[name])
    _check_local_shards(shards, urls, shard_samples, info_path)
    return ShardInfo(urls, shard_samples, sum(shard_samples), [str(c) for c in classes], info_path)
