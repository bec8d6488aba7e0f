"""Captions from file names and `.txt` sidecars, as EveryDream2 reads them. Pure and torch-free."""

from __future__ import annotations

import os

SIDECAR_EXTENSIONS = (".txt", ".caption")


def caption_from_filename(path: str) -> str:
    """The file name without its extension and without everything from the first underscore.

    So `a photo of ted_(1).jpg` and `a photo of ted_(2).jpg` both give `a photo of ted`: the suffix lets
    several images share one caption.
    """
    stem = os.path.splitext(os.path.basename(path))[0]
    return stem.split("_", 1)[0]


def read_text(path: str) -> str:
    """A text file as UTF-8, falling back to Latin-1 (which decodes any byte) for older files."""
    with open(path, "rb") as handle:
        raw = handle.read()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def normalize_caption(text: str) -> str:
    """One line, comma-separated parts stripped, empty parts dropped: `main prompt, tag, tag`."""
    parts = (part.strip() for part in " ".join(text.split()).split(","))
    return ", ".join(part for part in parts if part)


def sidecar_path(image_path: str) -> str | None:
    """The caption file next to an image (`IMG.txt`, then `IMG.caption`), if there is one."""
    base = os.path.splitext(image_path)[0]
    for extension in SIDECAR_EXTENSIONS:
        if os.path.isfile(base + extension):
            return base + extension
    return None


def image_caption(image_path: str) -> str:
    """The caption of an image: its sidecar file if present, else its file name."""
    sidecar = sidecar_path(image_path)
    text = read_text(sidecar) if sidecar else caption_from_filename(image_path)
    return normalize_caption(text)
