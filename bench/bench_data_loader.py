"""Data-loading speed on the CPU: preparing one training image, and scanning a data set.

    .venv/bin/python bench/bench_data_loader.py [--images N] [--workdir DIR] [--scan-images M]

1. Load: N synthetic photos (2048x1536 JPEGs, quality 90) are decoded, cropped to their 512-resolution
   bucket and resized with LANCZOS, in one process (so one core), two ways: the naive full decode, and
   data.image_io.load_image, which decodes JPEGs at a reduced scale where the crop allows it.
2. Scan: M small real JPEGs (copies of a few, named as captions) are scanned by data.items.scan_dataset.

Prints a markdown table with the machine and the date, ready for doc/PERFORMANCE.md. Everything is written
under a temporary folder (in --workdir if given) and removed at the end.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import PIL
from PIL import Image, features

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)  # run as a script from anywhere: bench/ is not a package

from data.buckets import generate_buckets, nearest_bucket  # noqa: E402
from data.image_io import crop_box, draft_scale, load_image  # noqa: E402
from data.items import scan_dataset  # noqa: E402

RESOLUTION = 512
JPEG_QUALITY = 90
NOISE_SIGMA = 12  # grey levels: about 0.35 bytes/px at quality 90, like a detailed camera photo
# (width, height) px of the JPEGs that the scan set copies in turn: landscape, portrait, wide, square
SCAN_SOURCES = ((640, 480), (480, 640), (1024, 576), (512, 512), (800, 600))
SCAN_FILES_PER_FOLDER = 1000


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=64, help="synthetic photos to load (default 64)")
    parser.add_argument("--workdir", default=None, help="folder for the temporary files (default: the system's)")
    parser.add_argument("--scan-images", type=int, default=10000, help="files to scan; 0 skips the scan")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes over the photos (default 3)")
    parser.add_argument("--size", default="2048x1536", help="photo width x height in px (default 2048x1536)")
    return parser.parse_args()


# -------------------------------------------------------------------------------------------------
# Synthetic images
# -------------------------------------------------------------------------------------------------

def synthetic_photo(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Smooth gradients and waves plus noise: JPEG decode costs what a detailed photo's does."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, 3)
    smooth = np.stack([x / width * 255, y / height * 255,
                       128 + 100 * np.sin(x / 90 + y / 60 + phase[0])], axis=-1)
    noise = rng.normal(0, NOISE_SIGMA, smooth.shape).astype(np.float32)
    return (smooth + noise).clip(0, 255).astype(np.uint8)


def write_photos(folder: str, count: int, size: tuple[int, int]) -> list[str]:
    """`count` different synthetic photos as JPEGs in `folder`."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        path = os.path.join(folder, f"photo_{i:04d}.jpg")
        Image.fromarray(synthetic_photo(rng, *size)).save(path, quality=JPEG_QUALITY)
        paths.append(path)
    return paths


def write_scan_set(folder: str, count: int) -> None:
    """`count` small real JPEGs, copies of a few sizes, named as captions, a thousand per subfolder."""
    rng = np.random.default_rng(1)
    sources = []
    for width, height in SCAN_SOURCES:
        path = os.path.join(folder, f"source_{width}x{height}.jpg")
        Image.fromarray(synthetic_photo(rng, width, height)).save(path, quality=JPEG_QUALITY)
        sources.append(path)
    root = os.path.join(folder, "data")
    for i in range(count):
        subfolder = os.path.join(root, f"part_{i // SCAN_FILES_PER_FOLDER:03d}")
        os.makedirs(subfolder, exist_ok=True)
        shutil.copyfile(sources[i % len(sources)], os.path.join(subfolder, f"a photo of thing number {i}.jpg"))
    for path in sources:
        os.remove(path)


# -------------------------------------------------------------------------------------------------
# Measurements
# -------------------------------------------------------------------------------------------------

def naive_load(path: str, bucket: tuple[int, int]) -> np.ndarray:
    """The straightforward way: decode everything, crop, resize with LANCZOS."""
    image = Image.open(path).convert("RGB")
    image = image.crop(crop_box(*image.size, bucket, 0.5, 0.5))
    return np.array(image.resize(bucket, Image.Resampling.LANCZOS))


def draft_load(path: str, bucket: tuple[int, int]) -> np.ndarray:
    return load_image(path, bucket, 0.5, 0.5, False)


def images_per_second(load, paths: list[str], bucket: tuple[int, int], repeats: int) -> list[float]:
    """One figure per timed pass over all paths, after an untimed pass (file cache, lazy imports)."""
    for path in paths:
        load(path, bucket)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for path in paths:
            load(path, bucket)
        rates.append(len(paths) / (time.perf_counter() - start))
    return rates


def mean_difference(paths: list[str], bucket: tuple[int, int]) -> float:
    """Mean absolute difference in grey levels between the two ways, over a few images."""
    diffs = [np.abs(naive_load(p, bucket).astype(np.int16) - draft_load(p, bucket)).mean() for p in paths[:8]]
    return float(np.mean(diffs))


def scan_seconds(root: str) -> tuple[float, int]:
    """Wall time of one scan_dataset call, and the images it found."""
    start = time.perf_counter()
    result = scan_dataset(root, RESOLUTION)
    seconds = time.perf_counter() - start
    items = result.items if hasattr(result, "items") else result[0]  # ScanResult, or the older tuple
    return seconds, len(items)


# -------------------------------------------------------------------------------------------------
# Report
# -------------------------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown"
    for line in lscpu.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def machine() -> str:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"{usable} usable CPU cores of {os.cpu_count()} ({cpu_model()}), {platform.system()} "
            f"{platform.machine()}; Python {platform.python_version()}, Pillow {PIL.__version__} "
            f"(libjpeg-turbo {features.version('libjpeg_turbo') or 'no'}), numpy {np.__version__}")


def rate_text(rates: list[float]) -> str:
    return f"{statistics.median(rates):.1f} (passes: {', '.join(f'{r:.1f}' for r in rates)})"


def main() -> None:
    args = parse_args()
    width, height = (int(side) for side in args.size.lower().split("x"))
    bucket = nearest_bucket(width, height, generate_buckets(RESOLUTION))
    scale = draft_scale(crop_box(width, height, bucket, 0.5, 0.5), bucket)
    with tempfile.TemporaryDirectory(prefix="bench_data_loader_", dir=args.workdir) as folder:
        paths = write_photos(folder, args.images, (width, height))
        megabytes = sum(os.path.getsize(p) for p in paths) / len(paths) / 1e6
        naive = images_per_second(naive_load, paths, bucket, args.repeats)
        drafted = images_per_second(draft_load, paths, bucket, args.repeats)
        difference = mean_difference(paths, bucket)
        if args.scan_images > 0:
            write_scan_set(folder, args.scan_images)
            seconds, found = scan_seconds(os.path.join(folder, "data"))
    command = "python bench/bench_data_loader.py " + " ".join(sys.argv[1:])
    print(f"`{command.strip()}`, {datetime.date.today().isoformat()}\n")
    print(f"Machine: {machine()}.\n")
    print(f"{args.images} JPEGs of {width}x{height} px (quality {JPEG_QUALITY}, {megabytes:.2f} MB each) into the "
          f"{bucket[0]}x{bucket[1]} bucket (resolution {RESOLUTION}); one process; median of {args.repeats} "
          f"passes after a warm-up pass.\n")
    print("| what | images/s per core |")
    print("|---|---|")
    print(f"| naive: `Image.open().convert(\"RGB\")`, crop, LANCZOS resize, `np.array` | {rate_text(naive)} |")
    print(f"| `data.image_io.load_image` (JPEG decoded at 1/{scale} scale) | {rate_text(drafted)} |")
    print(f"| speed-up | {statistics.median(drafted) / statistics.median(naive):.2f}x |")
    if args.scan_images > 0:
        print(f"| `scan_dataset(root, {RESOLUTION})`: {args.scan_images} JPEGs of 512-1024 px, "
              f"{found} found, {seconds:.2f} s | {args.scan_images / seconds:,.0f} (whole call, all threads) |")
    print(f"\nMean absolute difference between the two ways: {difference:.2f} grey levels of 255.")


if __name__ == "__main__":
    main()
