"""A record of the training data as a run saw it, to tell what changed before the run is resumed."""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor

from data.items import ImageItem


SAMPLED_BYTES = 8192  # from each end of a file: an edited or re-encoded image differs there
READ_THREADS = 16  # files read at once: a network disk or bucket mount answers many small reads in parallel


def dataset_fingerprint(items: list[ImageItem], threads: int = READ_THREADS) -> dict[str, list]:
    """{path: [bytes, digest of the file's ends, digest of its caption and settings]} for every usable image.

    File times are not used: data copied or unpacked again onto a new machine (after a preemption, say)
    is the same data.
    """
    paths = list(dict.fromkeys(item.path for item in items))  # an image listed twice is read once
    with ThreadPoolExecutor(max(1, threads)) as pool:  # small reads: the disk's latency dominates
        digests = dict(zip(paths, pool.map(file_digest, paths)))
    return {item.path: [*digests[item.path], _settings_digest(item)] for item in items}


def file_digest(path: str) -> list:
    """[bytes, digest of the file's first and last SAMPLED_BYTES]; [-1, ""] for a file that cannot be read."""
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            digest = hashlib.sha1(handle.read(SAMPLED_BYTES))
            if size > SAMPLED_BYTES:
                handle.seek(max(SAMPLED_BYTES, size - SAMPLED_BYTES))
                digest.update(handle.read())
        return [size, digest.hexdigest()[:16]]
    except OSError:  # gone since the scan: recorded as unreadable, so a later comparison sees it change
        return [-1, ""]


def dataset_changes(before: dict[str, list], now: dict[str, list]) -> str | None:
    """`images: 3 added, 1 removed, ...`, or None when the data is as it was."""
    added = len(now.keys() - before.keys())
    removed = len(before.keys() - now.keys())
    common = before.keys() & now.keys()
    modified = sum(before[path][:2] != now[path][:2] for path in common)
    recaptioned = sum(before[path][2] != now[path][2] for path in common)
    counts = [(added, "added"), (removed, "removed"), (modified, "modified"),
              (recaptioned, "with another caption or settings")]
    changes = [f"{count} {what}" for count, what in counts if count]
    return "images: " + ", ".join(changes) if changes else None


def _settings_digest(item: ImageItem) -> str:
    """Everything about an image that decides how it trains, except its pixels."""
    text = repr((item.caption, item.tags, item.bucket, item.shuffle_tags, item.max_caption_length, item.multiply,
                 item.rating, item.flip_p, item.cond_dropout, item.batch_id, item.loss_scale))
    return hashlib.sha1(text.encode()).hexdigest()[:16]
