"""The training images as scanned: settings, size and bucket of each, and the files that were skipped.

Torch-free: scanning reads file names, caption and settings files, and image headers only, so a data
set with no usable image is reported before any model or framework loads. Headers are read by a pool of
threads (file access dominates), in a fixed order of results whatever the pool does.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Sequence

from data.buckets import generate_buckets, nearest_bucket
from data.captions import Tag, caption_from_filename, compose_caption
from data.image_config import (ImageConfig, ImageConfigError, fold, global_config, local_config, parse_mapping,
                               sidecar_config, with_filename_caption)
from data.image_io import MIN_IMAGE_SIDE, UNREADABLE, read_image_size
from data.scan import data_root_entries, read_manifest, unpack_zips, walk_image_folders

SCAN_THREADS = 16  # header reads wait on the disk far more than on the CPU


@dataclass(frozen=True)
class ImageItem:
    """A training image: where it is, its caption and settings, and the bucket it trains at."""

    path: str  # absolute
    size: tuple[int, int]  # (width, height) px as displayed, after EXIF rotation
    bucket: tuple[int, int]  # (width, height) px
    main_prompt: str = ""
    tags: tuple[Tag, ...] = ()
    shuffle_tags: bool = False  # this image's own setting; the config's shuffle_tags applies to all
    max_caption_length: int | None = None  # characters, for weighted tag shuffling
    multiply: float = 1.0  # copies per epoch
    rating: float = 1.0
    flip_p: float | None = None  # None: the config's flip_p
    cond_dropout: float | None = None  # None: the config's cond_dropout
    batch_id: str | None = None  # None: the default batch
    loss_scale: float = 1.0
    source: str = ""  # for messages: the path, or the manifest entry it came from

    @property
    def caption(self) -> str:
        """The caption without shuffling: main prompt, then tags from the heaviest."""
        return compose_caption(self.main_prompt, self.tags)

    @property
    def undersized(self) -> bool:
        """Smaller than its bucket after cropping to the bucket's shape, so it is upscaled."""
        (width, height), (bucket_w, bucket_h) = self.size, self.bucket
        return width < bucket_w or height < bucket_h


@dataclass(frozen=True)
class SkippedFile:
    path: str
    reason: str


@dataclass
class ScanResult:
    items: list[ImageItem]
    skipped: list[SkippedFile]
    notes: list[str] = field(default_factory=list)  # unknown keys, several main prompts: worth a look


@dataclass(frozen=True)
class _Candidate:
    """An image to scan with the settings that apply to it before its own files, or why it cannot train."""

    path: str
    inherited: ImageConfig | ImageConfigError
    read_sidecars: bool  # folder images have sidecars; manifest entries carry their settings themselves
    source: str


def scan_dataset(data_root: str | list[str], resolution: int, threads: int = SCAN_THREADS) -> ScanResult:
    """Every usable image of data_root (folders and manifests) with its settings and bucket.

    Raises DataRootError for an entry that cannot be read at all (a broken manifest).
    """
    notes: list[str] = []
    candidates, skipped = [], []
    for root in data_root_entries(data_root):
        root = os.path.normpath(root)  # `folder/` and `folder` must walk alike
        if os.path.isfile(root):
            found, problems = _manifest_candidates(root, notes)
        else:
            unpacked, problems = unpack_zips(root)
            notes += unpacked
            found, unreadable = _folder_candidates(root, notes)
            problems += unreadable
        candidates += found
        skipped += [SkippedFile(source, reason) for source, reason in problems]
    buckets = generate_buckets(resolution)
    with ThreadPoolExecutor(max(1, threads)) as pool:
        results = list(pool.map(lambda c: _scan_one(c, buckets, notes), candidates))
    items = [r for r in results if isinstance(r, ImageItem)]
    skipped += [r for r in results if isinstance(r, SkippedFile)]
    return ScanResult(items, skipped, sorted(set(notes)))  # threads add notes in any order


def _folder_candidates(root: str, notes: list[str]) -> tuple[list[_Candidate], list[tuple[str, str]]]:
    """Images under a folder with the settings of the global files above them and of their folder's files;
    and the folders that could not be read."""
    inherited: dict[str, ImageConfig | ImageConfigError] = {}
    candidates = []
    folders, problems = walk_image_folders(root)
    for folder, paths in folders:
        parent = inherited[os.path.dirname(folder)] if folder != root else ImageConfig()  # walked top-down
        inherited[folder] = _settings(parent, global_config, folder, notes)
        settings = _settings(inherited[folder], local_config, folder, notes)
        candidates += [_Candidate(os.path.abspath(path), settings, True, path) for path in paths]
    return candidates, problems


def _settings(parent: ImageConfig | ImageConfigError, read, *args) -> ImageConfig | ImageConfigError:
    """`read(*args)` folded over `parent`, or the error that keeps the images out (a parent's is passed on)."""
    if isinstance(parent, ImageConfigError):
        return parent
    try:
        return fold([parent, read(*args)])
    except ImageConfigError as error:
        return error


def _manifest_candidates(path: str, notes: list[str]) -> tuple[list[_Candidate], list[tuple[str, str]]]:
    entries, problems = read_manifest(path)
    folder = os.path.dirname(os.path.abspath(path))  # where file names in `caption:` are looked up
    candidates = []
    for entry in entries:
        settings = _settings(ImageConfig(), parse_mapping, entry.settings, entry.source, notes, folder)
        candidates.append(_Candidate(entry.path, settings, False, entry.source))
    return candidates, problems


def _scan_one(candidate: _Candidate, buckets: list[tuple[int, int]], notes: list[str]) -> ImageItem | SkippedFile:
    """The item for one image, or why it is skipped."""
    if isinstance(candidate.inherited, ImageConfigError):
        return SkippedFile(candidate.path, str(candidate.inherited))
    try:
        size = read_image_size(candidate.path, min_side=MIN_IMAGE_SIDE)
    except FileNotFoundError:
        listed = "" if candidate.read_sidecars else f" (listed in {candidate.source})"
        return SkippedFile(candidate.path, f"does not exist{listed}")
    except UNREADABLE as error:
        return SkippedFile(candidate.path, f"cannot be read as an image: {error}")
    try:
        own = sidecar_config(candidate.path, notes) if candidate.read_sidecars else ImageConfig()
    except ImageConfigError as error:
        return SkippedFile(candidate.path, str(error))
    except Exception as error:  # a bad file must not stop a 10,000-image scan: report it and go on
        return SkippedFile(candidate.path, f"its caption or settings files cannot be used: "
                                           f"{type(error).__name__}: {error}")
    config = with_filename_caption(fold([candidate.inherited, own]), caption_from_filename(candidate.path))
    if len(config.main_prompts) > 1:
        notes.append(f"{candidate.source}: several main prompts {list(config.main_prompts)}; the most specific, "
                     f"{config.main_prompts[0]!r}, is used")
    return ImageItem(
        path=candidate.path, size=size, bucket=nearest_bucket(*size, buckets),
        main_prompt=config.main_prompts[0] if config.main_prompts else "", tags=config.tags,
        shuffle_tags=bool(config.shuffle_tags), max_caption_length=config.max_caption_length,
        multiply=1.0 if config.multiply is None else config.multiply,
        rating=1.0 if config.rating is None else config.rating,
        flip_p=config.flip_p, cond_dropout=config.cond_dropout, batch_id=config.batch_id,
        loss_scale=1.0 if config.loss_scale is None else config.loss_scale, source=candidate.source)


def item_key(path: str, roots: Sequence[str] = ()) -> str:
    """The image's path relative to the first root (a folder, or a manifest's folder) that holds it, with `/`
    separators; the absolute path when none does."""
    return relative_key(path, root_folders(roots))


def root_folders(roots: Sequence[str]) -> tuple[str, ...]:
    """The absolute folder of each data root: the folder itself, or the folder a manifest file is in."""
    return tuple(os.path.abspath(os.path.dirname(root) if os.path.isfile(root) else root) for root in roots)


def relative_key(path: str, folders: Sequence[str]) -> str:
    """item_key with the roots' folders already found (root_folders), so no file is looked at."""
    absolute = os.path.abspath(path)
    for folder in folders:
        try:
            inside = os.path.commonpath([folder, absolute]) == folder
        except ValueError:  # another drive (Windows)
            inside = False
        if inside:
            return os.path.relpath(absolute, folder).replace(os.sep, "/")
    return absolute.replace(os.sep, "/")
