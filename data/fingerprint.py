"""A record of the training data as a run saw it, to tell what changed before the run is resumed."""

from __future__ import annotations

import hashlib
import os

from data.items import ImageItem


def dataset_fingerprint(items: list[ImageItem]) -> dict[str, list]:
    """{path: [bytes, modification time in ns, digest of its caption and settings]} for every usable image."""
    fingerprint = {}
    for item in items:
        try:
            stat = os.stat(item.path)
            file_id = [stat.st_size, stat.st_mtime_ns]
        except OSError:  # gone since the scan: recorded as unreadable, so a later comparison sees it change
            file_id = [-1, -1]
        fingerprint[item.path] = file_id + [_settings_digest(item)]
    return fingerprint


def dataset_changes(before: dict[str, list], now: dict[str, list]) -> str | None:
    """`images: 3 added, 1 removed, ...`, or None when the data is as it was."""
    added = len(now.keys() - before.keys())
    removed = len(before.keys() - now.keys())
    common = before.keys() & now.keys()
    modified = sum(before[path][:2] != now[path][:2] for path in common)
    recaptioned = sum(before[path][2] != now[path][2] for path in common)
    counts = [(added, "added"), (removed, "removed"), (modified, "modified (size or time)"),
              (recaptioned, "with another caption or settings")]
    changes = [f"{count} {what}" for count, what in counts if count]
    return "images: " + ", ".join(changes) if changes else None


def _settings_digest(item: ImageItem) -> str:
    """Everything about an image that decides how it trains, except its pixels."""
    text = repr((item.caption, item.tags, item.bucket, item.shuffle_tags, item.max_caption_length, item.multiply,
                 item.rating, item.flip_p, item.cond_dropout, item.batch_id, item.loss_scale))
    return hashlib.sha1(text.encode()).hexdigest()[:16]
