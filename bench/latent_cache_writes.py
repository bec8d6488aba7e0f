"""How long writing one latent-cache entry takes on a disk: utils.latent_cache.LatentCache.save (safetensors,
flushed to the disk, renamed) by one thread and by the fill's writer threads, against the same write unflushed.

    .venv/bin/python bench/latent_cache_writes.py [--entries N] [--workdir DIR]

Each entry is SD 1.x's at 512 px: the posterior's 8 x 64 x 64 fp32 parameters, 131 KB. Prints a markdown table
with the machine and the date, for doc/PERFORMANCE.md. Everything is written under a temporary folder (in
--workdir if given: put it on the disk the cache will use) and removed at the end.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from data.plan import Variant  # noqa: E402
from utils.latent_cache import PARAMS, WRITE_THREADS, LatentCache  # noqa: E402


def unflushed_save(cache: LatentCache, path: str, variant: Variant, params: torch.Tensor) -> None:
    """What LatentCache.save did before it flushed: write under a temporary name, rename."""
    entry = cache.entry_path(path, variant)
    os.makedirs(os.path.dirname(entry), exist_ok=True)
    save_file({PARAMS: params}, entry + ".tmp")
    os.replace(entry + ".tmp", entry)


def milliseconds_per_entry(save, entries: int, threads: int, workdir: str | None) -> float:
    paths = [f"/images/{index}.jpg" for index in range(entries)]
    params = [torch.randn(8, 64, 64) for _ in range(entries)]
    with tempfile.TemporaryDirectory(dir=workdir) as folder:
        cache = LatentCache(folder, "vae", "no", {path: f"1:{index}" for index, path in enumerate(paths)})
        variant = Variant(0, (512, 512), 0.5, 0.5, (0.0, 0.0, 0.0, 0.0), False)
        start = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda i: save(cache, paths[i], variant, params[i]), range(entries)))
        return (time.perf_counter() - start) / entries * 1000


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            return next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=500)
    parser.add_argument("--workdir", default=None, help="a folder on the disk to measure (default: the system's)")
    args = parser.parse_args()
    rows = [("unflushed, one thread", unflushed_save, 1),
            ("LatentCache.save (flushed), one thread", LatentCache.save, 1),
            (f"LatentCache.save (flushed), {WRITE_THREADS} threads, as the fill writes", LatentCache.save,
             WRITE_THREADS)]
    print(f"{args.entries} entries of 131 KB in {args.workdir or tempfile.gettempdir()}; {cpu_name()}, "
          f"{os.cpu_count()} cores, {datetime.date.today()}\n")
    print("| write | ms per entry |\n|---|---|")
    for name, save, threads in rows:
        print(f"| {name} | {milliseconds_per_entry(save, args.entries, threads, args.workdir):.2f} |")


if __name__ == "__main__":
    main()
