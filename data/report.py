"""What the data will do, in words: the dataset report, the batch schedule and the undersized-image list.

Pure and torch-free; the caller writes the text where it belongs (console, run folder). The formats are
documented in doc/DATA.md.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter

from data.items import ScanResult
from data.plan import PlanOptions, Sample
from data.scan import is_image_file

SHOWN = 10  # examples listed in the report per kind of problem; the files in the run folder list them all


def dataset_report(data_root, resolution: int, scan: ScanResult, options: PlanOptions, first_epoch: list[list[Sample]],
                   batches_per_epoch: list[int], long_captions: list[tuple[str, int]] | None,
                   token_limit: int | None) -> str:
    """The dataset report, printed at start and saved as dataset_report.txt in the run folder."""
    items, skipped = scan.items, scan.skipped
    found = len(items) + sum(1 for entry in skipped if is_image_file(os.path.basename(entry.path)))
    lines = [f"Dataset report: {data_root}",
             f"  images found: {found}, used: {len(items)}, skipped: {len(skipped)}"
             + (" (each listed with its reason in skipped_images.txt)" if skipped else "")]
    lines += [f"    skipped {entry.path}: {entry.reason}" for entry in skipped[:SHOWN]]
    if len(skipped) > SHOWN:
        lines.append(f"    ... and {len(skipped) - SHOWN} more")
    lines += _bucket_table(resolution, items, first_epoch, options.batch_size)
    undersized = [item for item in items if item.undersized]
    lines.append(f"  undersized images (smaller than their bucket, so upscaled): {len(undersized)}"
                 + (" (listed in undersized_images.txt)" if undersized else ""))
    lines += [f"    {item.path}: {item.size[0]}x{item.size[1]} for bucket {item.bucket[0]}x{item.bucket[1]}"
              for item in undersized[:SHOWN]]
    lines += _caption_lines(long_captions, token_limit)
    lines += _epoch_lines(items, options, first_epoch, batches_per_epoch)
    lines += [f"  note: {note}" for note in scan.notes[:SHOWN]]
    if len(scan.notes) > SHOWN:
        lines.append(f"  ... and {len(scan.notes) - SHOWN} more notes")
    return "\n".join(lines) + "\n"


def _bucket_table(resolution: int, items, first_epoch: list[list[Sample]], batch_size: int) -> list[str]:
    images = Counter(item.bucket for item in items)
    samples = Counter(sample.bucket for batch in first_epoch for sample in batch)
    batches = Counter(batch[0].bucket for batch in first_epoch)
    short = {}
    for batch in first_epoch:
        if len(batch) < batch_size:
            short.setdefault(batch[0].bucket, []).append(len(batch))
    lines = [f"  buckets at resolution {resolution} (epoch 1; batch_size {batch_size}):",
             "    bucket      images  samples  batches  leftovers"]
    for bucket in sorted(images, key=lambda wh: (wh[0] / wh[1], wh[0])):
        sizes = short.get(bucket, [])
        leftover = "none" if not sizes else (f"{', '.join(str(s) for s in sizes)} image(s) train in a smaller batch "
                                             "(nothing dropped or repeated)")
        lines.append(f"    {bucket[0]:>4}x{bucket[1]:<5} {images[bucket]:>7}  {samples[bucket]:>7}  "
                     f"{batches[bucket]:>7}  {leftover}")
    return lines


def _caption_lines(long_captions: list[tuple[str, int]] | None, token_limit: int | None) -> list[str]:
    if long_captions is None:
        return ["  caption length: not checked (the model's tokenizer is not available without downloading it)"]
    lines = [f"  captions longer than the text encoder's {token_limit} tokens: {len(long_captions)}"
             + (" (they are truncated to the first tokens; put what matters first)" if long_captions else "")]
    lines += [f"    {path}: {count} tokens" for path, count in long_captions[:SHOWN]]
    if len(long_captions) > SHOWN:
        lines.append(f"    ... and {len(long_captions) - SHOWN} more")
    return lines


def _epoch_lines(items, options: PlanOptions, first_epoch: list[list[Sample]],
                 batches_per_epoch: list[int]) -> list[str]:
    samples = sum(len(batch) for batch in first_epoch)
    steps = [math.ceil(count / options.grad_accum) for count in batches_per_epoch]  # counts are per process
    lines = [f"  images per epoch after multipliers: {samples} (from {len(items)} images)"]
    if options.rated_dataset:
        lines.append(f"  rated_dataset: epochs after the first draw images by rating, from 100% down to "
                     f"{options.rated_dataset_target_dropout_percent:g}% of the images in the last epoch")
    if len(set(batches_per_epoch)) > 1:
        lines.append(f"  batches per epoch: {min(batches_per_epoch)} to {max(batches_per_epoch)} (fractional "
                     "multipliers or rated_dataset change the epoch's images)")
    else:
        lines.append(f"  batches (steps) per epoch: {batches_per_epoch[0]}"
                     + (f" on each of {options.processes} processes" if options.processes > 1 else ""))
    lines.append(f"  optimizer steps: {sum(steps)} in {len(steps)} epoch(s) (grad_accum {options.grad_accum}); "
                 f"batches in all: {sum(batches_per_epoch)}")
    return lines


def schedule_lines(batches: list[list[Sample]], items, first_step: int,
                   positions: list[tuple[int, int]] | None = None) -> list[str]:
    """ep<N>_batch_schedule.txt: one JSON object per sample, in the epoch plan's order, with the step that
    trains it and, with several processes, which process does (`positions`, data.plan.batch_positions).
    `first_step` is the step of the epoch's first batch."""
    positions = positions or [(0, offset) for offset in range(len(batches))]
    lines = []
    for batch, (process, offset) in zip(batches, positions, strict=True):
        for sample in batch:
            lines.append(json.dumps({
                "step": first_step + offset, "process": process, "bucket": list(sample.bucket),
                "path": items[sample.index].path, "caption": sample.caption, "flip": sample.flip,
                "copy": sample.copy, "crop": [round(sample.crop_x, 4), round(sample.crop_y, 4)],
                "loss_scale": sample.loss_scale, "batch_size": len(batch)}, ensure_ascii=False))
    return lines


def undersized_lines(items) -> list[str]:
    """undersized_images.txt: path, size and bucket of each image smaller than its bucket, tab-separated."""
    return [f"{item.path}\t{item.size[0]}x{item.size[1]}\tbucket {item.bucket[0]}x{item.bucket[1]}"
            for item in items if item.undersized]
