"""Finding training images under data_root. Pure: file names only, no image is opened here."""

from __future__ import annotations

import os

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".jfif"})  # compared lower-cased


def is_image_file(name: str) -> bool:
    """An image by its extension (any case); hidden names (starting with '.') are not."""
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def find_images(root: str) -> list[str]:
    """Every image path under `root`, recursively, sorted; hidden files and folders are skipped."""
    found = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))  # prune hidden, fix the order
        found.extend(os.path.join(folder, name) for name in files if is_image_file(name))
    return sorted(found)
