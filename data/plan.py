"""The epoch plan: which images train in an epoch, in which batches, and every random decision about each.

A pure function of (images, seed, epoch, batch size, grad_accum, processes, data options): the same
inputs give the same plan whatever the number of data-loader workers, and a resumed run can rebuild any
epoch. Data-loader workers only carry out the decisions recorded here; they draw no random numbers.

Random streams, each derived from the seed, never global:
- `random.Random(seed + epoch)`: the order of images within buckets and of the batches (seed + N for
  epoch N, as EveryDream2);
- `select/{seed}/{epoch}`: which images get the extra copy of a fractional `multiply`, and the images of
  a rated-dataset epoch;
- `sample/{seed}/{epoch}/{index}/{copy}`: crop, jitter, flip, caption dropout and tag order of one copy
  of one image, so they do not depend on where it lands in the epoch;
- `crop/{seed}/{image key}`: with `fixed_crops` (latent caching), the crop and jitter of an image for the
  whole run, so each image has at most two variants (flipped or not) to encode once. The key is the image's
  path within its data root (data.items.item_key), so adding, removing or moving images keeps every other
  image's crop, and its cached latents.
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass

from data.captions import compose_caption
from data.items import ImageItem, relative_key


@dataclass(frozen=True)
class PlanOptions:
    """The config values the plan depends on (see doc/CONFIG.md for each)."""

    seed: int
    batch_size: int
    grad_accum: int = 1
    processes: int = 1
    max_epochs: int = 1
    flip_p: float = 0.0  # for images that do not set their own
    cond_dropout: float = 0.0  # likewise
    shuffle_tags: bool = False  # for every image; an image may also turn it on for itself
    keep_tags: int = 0
    rated_dataset: bool = False
    rated_dataset_target_dropout_percent: float = 50.0
    fixed_crops: bool = False  # one crop per image for the whole run (cache_latents); flips still vary
    data_roots: tuple[str, ...] = ()  # the data roots' folders (data.items.root_folders), for the fixed crops

    @property
    def batches_per_step(self) -> int:
        """Batches that make one optimizer step: grad_accum on each process."""
        return self.grad_accum * self.processes


@dataclass(frozen=True)
class Sample:
    """One copy of one image as it is trained in one epoch."""

    index: int  # into the list of images
    copy: int  # 0 for the first copy of the image this epoch, 1 for the second (multiply >= 2) ...
    bucket: tuple[int, int]  # (width, height) px the image is cropped and resized to
    crop_x: float  # 0..1: where the crop window sits along the surplus width (0.5 = centred)
    crop_y: float  # 0..1: the same along the surplus height
    jitter: tuple[float, float, float, float]  # 0..1 each: how much of the allowed jitter to trim per side
    flip: bool  # mirror left-right
    caption: str  # exactly the text given to the tokenizer: shuffled, or "" when dropped
    loss_scale: float  # multiplies this sample's loss
    stand_in: bool = False  # fills a process's share at an epoch's end (process_share): loads and trains nothing

    @property
    def variant(self) -> Variant:
        """How this sample's pixels are prepared, without its caption and loss weight."""
        return Variant(self.index, self.bucket, self.crop_x, self.crop_y, self.jitter, self.flip)


@dataclass(frozen=True)
class Variant:
    """One way an image is cropped, resized and flipped: what decides its pixels, and so its VAE latents."""

    index: int  # into the list of images
    bucket: tuple[int, int]  # (width, height) px
    crop_x: float
    crop_y: float
    jitter: tuple[float, float, float, float]
    flip: bool


def sample_rng(seed: int, epoch: int, index: int, copy: int = 0) -> random.Random:
    """The random stream for one copy of one image in one epoch, independent of order, workers and processes."""
    return random.Random(f"sample/{seed}/{epoch}/{index}/{copy}")


def plan_sample(items: list[ImageItem], index: int, copy: int, epoch: int, options: PlanOptions) -> Sample:
    """Decide crop, jitter, flip, caption dropout and tag order for one copy of one image in one epoch."""
    item = items[index]
    rng = sample_rng(options.seed, epoch, index, copy)
    crop_x, crop_y, jitter = draw_crop(rng)
    if options.fixed_crops:  # the crop draws above are still made, so flips and dropouts match a run without
        crop_x, crop_y, jitter = fixed_crop(options.seed, relative_key(item.path, options.data_roots))
    flip = rng.random() < flip_probability(item, options)
    dropped = rng.random() < (options.cond_dropout if item.cond_dropout is None else item.cond_dropout)
    shuffled = options.shuffle_tags or item.shuffle_tags
    caption = "" if dropped else compose_caption(item.main_prompt, item.tags, rng if shuffled else None,
                                                 keep_tags=options.keep_tags, max_length=item.max_caption_length)
    return Sample(index, copy, item.bucket, crop_x, crop_y, jitter, flip, caption, item.loss_scale)


def draw_crop(rng: random.Random) -> tuple[float, float, tuple[float, float, float, float]]:
    """crop_x, crop_y and the four jitter fractions. The offsets are centre-biased (triangular, as
    EveryDream2): most crops keep the middle of the image."""
    crop_x, crop_y = rng.triangular(0.0, 1.0, 0.5), rng.triangular(0.0, 1.0, 0.5)
    return crop_x, crop_y, (rng.random(), rng.random(), rng.random(), rng.random())


def fixed_crop(seed: int, key: str) -> tuple[float, float, tuple[float, float, float, float]]:
    """crop_x, crop_y and jitter of an image for the whole run (fixed_crops), from its key (item_key)."""
    return draw_crop(random.Random(f"crop/{seed}/{key}"))


def flip_probability(item: ImageItem, options: PlanOptions) -> float:
    """The image's own flip_p, else the config's."""
    return options.flip_p if item.flip_p is None else item.flip_p


def image_variants(items: list[ImageItem], options: PlanOptions) -> list[Variant]:
    """Every variant that can train in a run with fixed_crops, in image order: the fixed crop unflipped and,
    where the flip probability allows, flipped (`random() < p` is never true for p <= 0, always for p >= 1).

    Images with multiply 0 never train and are left out; every other image is listed even if a fractional
    multiply or a rated dataset leaves it out of every epoch of this run, a superset computed without
    planning every epoch.
    """
    variants = []
    for index, item in enumerate(items):
        if item.multiply <= 0:
            continue
        crop_x, crop_y, jitter = fixed_crop(options.seed, relative_key(item.path, options.data_roots))
        p = flip_probability(item, options)
        flips = [False] * (p < 1.0) + [True] * (p > 0.0)
        variants += [Variant(index, item.bucket, crop_x, crop_y, jitter, flip) for flip in flips]
    return variants


# =================================================================================================
# Which images train this epoch
# =================================================================================================

def rated_fraction(epoch: int, options: PlanOptions) -> float:
    """With rated_dataset: the share of images in an epoch, from 1 at epoch 0 down to the target at the last."""
    if options.max_epochs <= 1:
        return 1.0
    final = options.rated_dataset_target_dropout_percent / 100
    return 1.0 - (1.0 - final) * epoch / (options.max_epochs - 1)


def epoch_selection(items: list[ImageItem], epoch: int, options: PlanOptions) -> list[tuple[int, int]]:
    """The (image index, copy) pairs that train in an epoch, in image order."""
    rng = random.Random(f"select/{options.seed}/{epoch}")
    if options.rated_dataset and epoch > 0:
        return [(index, 0) for index in _rated_selection(items, rated_fraction(epoch, options), rng)]
    return _multiplied_selection(items, rng)


def _multiplied_selection(items: list[ImageItem], rng: random.Random) -> list[tuple[int, int]]:
    """Each image floor(multiply) times; the fractional parts fill the epoch to floor(sum of multiply).

    Which images get the extra copy is drawn each epoch by systematic sampling over a shuffled order, with
    inclusion probabilities proportional to the fractional parts; they sum to exactly the free slots, so
    the epoch has exactly floor(sum) samples and no image gets two extra copies.
    """
    whole = [int(math.floor(item.multiply)) for item in items]
    fractions = [item.multiply - count for item, count in zip(items, whole)]
    free_slots = int(math.floor(sum(item.multiply for item in items) + 1e-9)) - sum(whole)
    extra = set()
    total_fraction = sum(fractions)
    if free_slots > 0 and total_fraction > 0:
        order = [i for i, f in enumerate(fractions) if f > 0]
        rng.shuffle(order)
        point, cumulative = rng.random(), 0.0  # pick where the running sum crosses point, point + 1, ...
        for index in order:
            cumulative += fractions[index] * free_slots / total_fraction
            while point < cumulative and len(extra) < free_slots:
                extra.add(index)
                point += 1.0
    return [(index, copy) for index, count in enumerate(whole) for copy in range(count + (index in extra))]


def _rated_selection(items: list[ImageItem], fraction: float, rng: random.Random) -> list[int]:
    """ceil(fraction x images) images, drawn without replacement with probability proportional to rating
    (Efraimidis & Spirakis 2006: keep the largest u^(1/rating), u uniform). Images with multiply 0 never train."""
    candidates = [index for index, item in enumerate(items) if item.multiply > 0]
    count = math.ceil(len(candidates) * fraction - 1e-9)
    keys = [(rng.random() ** (1.0 / items[index].rating) if items[index].rating > 0 else 0.0, index)
            for index in candidates]
    return sorted(index for _, index in sorted(keys, reverse=True)[:count])


# =================================================================================================
# Batches
# =================================================================================================

def epoch_batches(items: list[ImageItem], epoch: int, options: PlanOptions) -> list[list[tuple[int, int]]]:
    """The epoch's batches of (image index, copy), in training order, without the per-sample decisions.

    - Each batch holds one bucket and one batch_id. Images of a batch_id that do not fill a whole batch
      join the default batches of their bucket.
    - A bucket's images are shuffled; its last batch is smaller when its count is not a multiple of
      batch_size. Nothing is dropped or repeated to fill it.
    - Batches are laid out in runs of grad_accum x processes (one optimizer step). A batch_id's batches
      fill whole runs together where there are enough of them; the runs are shuffled, and a last, shorter
      run stays at the end.
    """
    rng = random.Random(options.seed + epoch)
    named: dict[tuple[str, tuple[int, int]], list[tuple[int, int]]] = {}
    default: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for index, copy in epoch_selection(items, epoch, options):
        item = items[index]
        if item.batch_id:
            named.setdefault((item.batch_id, item.bucket), []).append((index, copy))
        else:
            default.setdefault(item.bucket, []).append((index, copy))
    by_id: dict[str, list[list[tuple[int, int]]]] = {}
    for (batch_id, bucket), members in sorted(named.items()):
        rng.shuffle(members)
        full = len(members) - len(members) % options.batch_size
        by_id.setdefault(batch_id, []).extend(_chunks(members[:full], options.batch_size))
        default.setdefault(bucket, []).extend(members[full:])
    for _, members in sorted(default.items()):
        rng.shuffle(members)
        by_id.setdefault("", []).extend(_chunks(members, options.batch_size))
    return _lay_out_steps(by_id, options.batches_per_step, rng)


def _chunks(values: list, size: int) -> list[list]:
    """Consecutive pieces of `size`; the last may be shorter."""
    return [values[start:start + size] for start in range(0, len(values), size)]


def _lay_out_steps(by_id: dict[str, list[list]], per_step: int, rng: random.Random) -> list[list]:
    """Batches in runs of `per_step`; a batch_id's runs hold only its batches where possible."""
    runs, rest = [], []
    for batch_id in sorted(by_id):
        batches = by_id[batch_id]
        rng.shuffle(batches)
        whole = len(batches) - len(batches) % per_step
        runs += _chunks(batches[:whole], per_step)
        rest += batches[whole:]
    rng.shuffle(rest)
    runs += _chunks(rest, per_step)
    last = [run for run in runs if len(run) < per_step]
    runs = [run for run in runs if len(run) == per_step]
    rng.shuffle(runs)
    return [batch for run in runs + last for batch in run]


def plan_epoch(items: list[ImageItem], epoch: int, options: PlanOptions) -> list[list[Sample]]:
    """The epoch's batches of Samples, with every random decision made."""
    return [[plan_sample(items, index, copy, epoch, options) for index, copy in batch]
            for batch in epoch_batches(items, epoch, options)]


def batches_per_epoch(items: list[ImageItem], options: PlanOptions) -> list[int]:
    """The number of batches of every epoch, on each process. Fixed unless multipliers are fractional or the
    dataset is rated."""
    varies = options.rated_dataset or any(item.multiply != math.floor(item.multiply) for item in items)
    if not varies:
        return [process_batch_count(len(epoch_batches(items, 0, options)), options)] * options.max_epochs
    return [process_batch_count(len(epoch_batches(items, epoch, options)), options)
            for epoch in range(options.max_epochs)]


def process_batch_count(batches: int, options: PlanOptions) -> int:
    """How many batches each process trains in an epoch of `batches` (process_share): all of them with one."""
    whole_runs, rest = divmod(batches, options.batches_per_step)
    return whole_runs * options.grad_accum + math.ceil(rest / options.processes)


# =================================================================================================
# Several processes
# =================================================================================================

def process_share(batches: list[list[Sample]], process: int, options: PlanOptions) -> list[list[Sample]]:
    """The batches one process trains, out of the epoch's: from each optimizer step's run of grad_accum x
    processes batches, every processes-th one starting at `process`, so each sample trains once per epoch
    on one process and every batch keeps its bucket.

    The epoch's last run may be shorter: processes left short get stand-in batches (a copy of one of the
    run's batches, marked stand_in, which loads and trains nothing) so that every process has as many
    batches and steps at the same time.
    """
    if options.processes == 1:
        return batches
    share = []
    for start in range(0, len(batches), options.batches_per_step):
        run = batches[start:start + options.batches_per_step]
        mine = run[process::options.processes]
        short = math.ceil(len(run) / options.processes) - len(mine)
        share += mine + [[dataclasses.replace(sample, stand_in=True) for sample in run[0]]] * short
    return share


def batch_positions(batch_count: int, options: PlanOptions) -> list[tuple[int, int]]:
    """(process, position in that process's share) of each of an epoch's `batch_count` batches, as
    process_share hands them out: which process trains the batch, and at which of its steps of the epoch."""
    positions = []
    for index in range(batch_count):
        run, place = divmod(index, options.batches_per_step)
        positions.append((place % options.processes, run * options.grad_accum + place // options.processes))
    return positions
