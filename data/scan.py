"""Finding training images: folders walked, manifests read. Pure: no image is opened here."""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from dataclasses import dataclass

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".jfif"})  # compared lower-cased


class DataRootError(ValueError):
    """A data_root entry that cannot be read at all (not a folder, a broken manifest)."""


def is_image_file(name: str) -> bool:
    """An image by its extension (any case); hidden names (starting with '.') are not."""
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def walk_folders(root: str, problems: list[tuple[str, str]]):
    """os.walk, top-down in a fixed order, following folder links (once each: no loops), without hidden
    names. Folders that cannot be listed are added to `problems`."""
    seen = set()

    def unlistable(error: OSError) -> None:
        problems.append((error.filename or root, f"folder cannot be read: {error.strerror or error}"))

    for folder, subfolders, files in os.walk(root, onerror=unlistable, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # a link back up the tree, or a second link to the same folder
            subfolders[:] = []
            continue
        seen.add(real)
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))  # prune hidden, fix the order
        yield folder, subfolders, sorted(name for name in files if not name.startswith("."))


def walk_image_folders(root: str) -> tuple[list[tuple[str, list[str]]], list[tuple[str, str]]]:
    """(folder, sorted image paths in it) for `root` and every folder below it, parents before children;
    and (path, reason) for folders that could not be read."""
    problems: list[tuple[str, str]] = []
    found = [(folder, [os.path.join(folder, name) for name in files if is_image_file(name)])
             for folder, _, files in walk_folders(root, problems)]
    return found, problems


def find_images(root: str) -> list[str]:
    """Every image path under `root`, recursively, sorted."""
    return sorted(path for _, paths in walk_image_folders(root)[0] for path in paths)


@dataclass(frozen=True)
class ManifestEntry:
    """One image listed in a JSON manifest, with the settings given beside it."""

    path: str  # absolute
    settings: dict  # the entry's keys other than `image` (main_prompt, tags, multiply, ...)
    source: str  # "manifest.json, entry 3": where to look when something is wrong


def read_manifest(path: str) -> tuple[list[ManifestEntry], list[tuple[str, str]]]:
    """A JSON list of objects `{"image": PATH, ...}`; image paths are relative to the manifest's folder.

    Returns the entries and (source, reason) for entries that are unusable. The same image may be listed
    several times: each entry is its own training item (as in EveryDream2).
    """
    try:
        with open(path, encoding="utf-8-sig") as handle:  # a byte-order mark is fine, as in caption files
            data = json.load(handle)
    except (OSError, UnicodeDecodeError) as error:
        raise DataRootError(f"manifest {path!r} cannot be read: {error}") from None
    except json.JSONDecodeError as error:
        raise DataRootError(f"manifest {path!r} is not valid JSON: {error.msg} at line {error.lineno}, "
                            f"column {error.colno}") from None
    if not isinstance(data, list):
        raise DataRootError(f"manifest {path!r} must hold a JSON list of {{\"image\": path, ...}} objects")
    folder = os.path.dirname(os.path.abspath(path))
    entries, problems = [], []
    for number, entry in enumerate(data):
        source = f"{path}, entry {number}"
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
            problems.append((source, 'has no "image": every entry needs the image\'s path'))
            continue
        settings = {key: value for key, value in entry.items() if key != "image"}
        entries.append(ManifestEntry(os.path.normpath(os.path.join(folder, entry["image"])), settings, source))
    return entries, problems


def data_root_entries(data_root: str | list[str]) -> list[str]:
    """data_root as a list: one folder or manifest, or a list of them."""
    return [data_root] if isinstance(data_root, str) else list(data_root)


def unpack_zips(root: str) -> tuple[list[str], list[tuple[str, str]]]:
    """Unpack every `NAME.zip` under root, once, into the folder `NAME/` beside it, so its images are scanned.

    EveryDream2 meant to do this and never did (it opened the folder instead of the zip). A zip whose folder
    exists already is left alone, so it is unpacked once, and nothing is overwritten. Unpacking goes to a
    hidden temporary folder renamed when complete: an interrupted unpack is never scanned and is redone.
    Returns (notes, problems as (zip path, reason)); a damaged zip, or one with paths outside itself, is
    not unpacked.
    """
    notes, problems = [], []
    for folder, subfolders, files in walk_folders(root, problems):
        for name in (f for f in files if f.lower().endswith(".zip")):
            archive, target = os.path.join(folder, name), os.path.join(folder, name[:-4])
            if os.path.exists(target):
                continue
            partial = os.path.join(folder, f".{name}-unpacking")
            shutil.rmtree(partial, ignore_errors=True)
            try:
                with zipfile.ZipFile(archive) as opened:
                    outside = [m for m in opened.namelist() if not _inside(partial, m)]
                    if outside:
                        raise zipfile.BadZipFile(f"it holds paths outside itself ({outside[0]!r})")
                    opened.extractall(partial)
            # BadZipFile: damaged; RuntimeError: encrypted; NotImplementedError: a compression method Python
            # lacks (Windows makes Deflate64 zips of large files); OSError: the disk.
            except (zipfile.BadZipFile, zipfile.LargeZipFile, RuntimeError, NotImplementedError, OSError) as error:
                shutil.rmtree(partial, ignore_errors=True)
                problems.append((archive, f"zip not unpacked: {error}"))
                continue
            os.rename(partial, target)
            subfolders.append(os.path.basename(target))  # walk it too: it may hold zips of its own
            notes.append(f"{archive}: unpacked into {target}")
    return notes, problems


def _inside(folder: str, member: str) -> bool:
    destination = os.path.realpath(os.path.join(folder, member))
    return destination == os.path.realpath(folder) or destination.startswith(os.path.realpath(folder) + os.sep)
