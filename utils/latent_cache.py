"""Caching what the frozen encoders compute: VAE latents on disk (cache_latents), text embeddings in memory
(cache_text_embeddings).

The latent cache stores the VAE posterior's parameters (mean and log-variance, fp32), not a sample: training
still draws a fresh latent each step with `DiagonalGaussianDistribution(params).sample(generator)`, which is
what `vae.encode(pixels).latent_dist.sample(generator)` does with the same parameters.

An entry is keyed by the image's content (size and digest of the file's ends, data/fingerprint.py), its
variant (bucket, crop, jitter, flip: data/plan.py), a digest of the VAE's weights and the precision it
encodes in (fp32, or the fp16/bf16 autocast of mixed_precision), so runs and processes can share a folder:
another crop, another base model, another precision or an edited image (a re-saved file changes its size
or its ends; an edit in place of a middle byte of an uncompressed file would go unseen) gets new entries. One
safetensors file per entry, in subfolders named by the key's first two hex digits, each written under a
temporary name, flushed to the disk and renamed, so a reader never sees half a file and two writers of one
entry do no harm. An entry damaged all the same (a disk error, a bad copy of the folder) is encoded again by
the next fill when its size disagrees with its header, and otherwise skipped, reported and deleted when
training reads it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import safetensors.torch
import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from safetensors.torch import load_file

from data.dataset import load_pixels
from data.fingerprint import dataset_fingerprint
from data.image_io import UNREADABLE
from data.items import ImageItem
from data.plan import Variant

CACHE_FORMAT = 1  # part of every key: bump it when image loading or what an entry holds changes
ENTRY_SUFFIX = ".safetensors"
FAILED_SUFFIX = ".failed"  # beside a missing entry: why its image could not be read when the cache was filled
PARAMS = "params"  # the tensor's name in an entry file
IO_THREADS = 8  # image reads, decodes and resizes: Pillow releases the GIL for most of them
PREFETCH_BATCHES = 2  # batches loaded ahead while the VAE encodes one
WRITE_THREADS = 4  # entries written and flushed to the disk while the VAE encodes the next batches
MAX_PENDING_WRITES = 256  # entries encoded but not yet written (about 33 MB at 512 px) before the VAE waits


class MissingLatents(LookupError):
    """No entry for a sample: fill_latent_cache did not run for these images, crops or this VAE."""


class LatentCacheError(Exception):
    """The latent cache could not be filled (train.py); the message says why and what to do."""


class UnreadableImage(OSError):
    """The image could not be read when the cache was filled; an OSError, so the dataset reports and skips it."""


# =================================================================================================
# Keys and entries
# =================================================================================================

def weights_digest(module: torch.nn.Module) -> str:
    """A digest of every tensor of the module's state_dict (names, dtypes, shapes and bytes)."""
    digest = hashlib.sha1()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())  # raw bytes, bf16 included
    return digest.hexdigest()


def content_key(size: int, digest: str) -> str | None:
    """An image's content as the cache keys it: the file's size and the digest of its ends
    (data/fingerprint.py); None for a file that could not be read."""
    return None if size < 0 else f"{size}:{digest}"


@dataclass(frozen=True)
class LatentCache:
    """A folder of VAE posterior parameters, one file per image variant, for one VAE and one set of images.

    Pickled into the data-loader workers: it holds plain values only.
    """

    folder: str
    vae_digest: str  # weights_digest of the VAE
    precision: str  # the autocast the VAE encodes under: "no", "fp16", "bf16" (accelerate's mixed_precision)
    image_digests: dict[str, str | None] = field(repr=False)  # image path -> content_key, read once

    @classmethod
    def open(cls, folder: str, vae: torch.nn.Module, items: list[ImageItem], fingerprint: dict | None = None,
             precision: str = "no"):
        """The cache in `folder` for this VAE, encoding under `precision`, and these images: digests the VAE,
        and every image file unless `fingerprint` (data.fingerprint.dataset_fingerprint of them, as train.py
        reads at start-up) has them."""
        fingerprint = fingerprint or dataset_fingerprint(items)
        digests = {item.path: content_key(*fingerprint[item.path][:2]) for item in items}
        return cls(os.path.abspath(folder), weights_digest(vae), precision, digests)

    def key(self, path: str, variant: Variant) -> str | None:
        """The entry's hex key; None when the image could not be read when the cache was opened."""
        content = self.image_digests[path]
        if content is None:
            return None
        fields = (CACHE_FORMAT, content, tuple(variant.bucket), variant.crop_x, variant.crop_y,
                  tuple(variant.jitter), bool(variant.flip), self.vae_digest, self.precision)
        return hashlib.sha1(repr(fields).encode()).hexdigest()  # repr keeps every float exactly

    def entry_path(self, path: str, variant: Variant) -> str | None:
        """Where the entry's file is (whether written yet or not); None for an image that could not be read."""
        key = self.key(path, variant)
        return None if key is None else os.path.join(self.folder, key[:2], key + ENTRY_SUFFIX)

    def load(self, path: str, variant: Variant) -> torch.Tensor:
        """The posterior parameters (2 x latent channels, h, w), fp32 on the CPU.

        Raises UnreadableImage for an image that could not be read when the cache was opened or filled, and
        MissingLatents for an entry that was never filled.
        """
        entry = self.entry_path(path, variant)
        if entry is None:
            raise UnreadableImage("the file could not be opened when the latent cache was opened")
        if os.path.exists(entry):
            try:
                return load_file(entry)[PARAMS]
            except FileNotFoundError:
                pass  # another worker found it damaged and deleted it just now, its failure recorded first (below)
            except OSError as error:  # the disk or the network file system failed to read it: left for next time
                raise UnreadableImage(f"its latent cache entry {entry} could not be read ({error})") from error
            except Exception as error:  # not our partial write (rename is atomic): a damaged disk or copy
                reason = (f"its latent cache entry {entry} is damaged ({error}); it was deleted, and the next run "
                          "encodes the image again")
                # The failure first: this variant is met again (next epoch, multiply, another worker), and
                # must then read as the unreadable image it is, not as an entry that was never filled.
                self.record_failure(path, variant, reason)
                with contextlib.suppress(FileNotFoundError):
                    os.remove(entry)
                raise UnreadableImage(reason) from error
        failure = _read_text(entry + FAILED_SUFFIX)
        if failure is not None:
            raise UnreadableImage(failure)
        raise MissingLatents(f"{path}: no cached latents for {variant} in {self.folder}; fill_latent_cache must "
                             "run over image_variants() of this plan, with this VAE, before training")

    def save(self, path: str, variant: Variant, params: torch.Tensor) -> None:
        """Write one entry atomically and drop any failure recorded for it."""
        entry = self.entry_path(path, variant)

        def write(temporary: str) -> None:
            # Written here rather than by safetensors' save_file, so a full disk is an OSError, not a SafetensorError.
            with open(temporary, "wb") as handle:
                handle.write(safetensors.torch.save({PARAMS: params.detach().float().cpu().contiguous()}))
                handle.flush()
                os.fsync(handle.fileno())  # the bytes before the name: a power cut leaves no named empty file

        _write_atomically(entry, write)
        with contextlib.suppress(FileNotFoundError):
            os.remove(entry + FAILED_SUFFIX)

    def record_failure(self, path: str, variant: Variant, reason: str) -> None:
        """Note why an image could not be encoded, for the dataset to report it rather than stop."""
        failure = self.entry_path(path, variant) + FAILED_SUFFIX

        def write(temporary: str) -> None:
            with open(temporary, "w", encoding="utf-8") as handle:
                handle.write(reason)

        _write_atomically(failure, write)


def _write_atomically(final: str, write: Callable[[str], None]) -> None:
    """write(temporary) then rename onto `final`; the temporary name is unique to this process and call."""
    os.makedirs(os.path.dirname(final), exist_ok=True)
    temporary = f"{final}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
    try:
        write(temporary)
        os.replace(temporary, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)


def entry_intact(entry: str) -> bool:
    """Whether the file is there and as long as its safetensors header says; a cheap check (one small read)
    that finds an empty or cut-short entry without loading it."""
    try:
        with open(entry, "rb") as handle:
            (header_length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(header_length))
            size = os.fstat(handle.fileno()).st_size
        data_length = max(tensor["data_offsets"][1] for name, tensor in header.items() if name != "__metadata__")
    except (OSError, struct.error, ValueError, AttributeError, KeyError, TypeError, IndexError):
        return False  # ValueError: JSON, UTF-8 or max() of nothing
    return size == 8 + header_length + data_length


def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except FileNotFoundError:
        return None


def posterior_from(params: torch.Tensor) -> DiagonalGaussianDistribution:
    """The VAE posterior from its parameters, fresh from the encoder or cached, in fp32.

    vae.encode(pixels).latent_dist draws its sample in the dtype of its parameters, half precision under
    autocast, while the cache keeps them in fp32: both paths go through here so that one generator draws the
    same latents from either."""
    return DiagonalGaussianDistribution(params.float())


# =================================================================================================
# Filling
# =================================================================================================

@dataclass
class FillResult:
    """What fill_latent_cache did with this process's share of the variants."""

    encoded: int = 0
    reused: int = 0  # already in the cache
    failed: list[tuple[str, str]] = field(default_factory=list)  # (image path, reason), one per image


def fill_latent_cache(cache: LatentCache, items: list[ImageItem], variants: list[Variant], vae, device,
                      batch_size: int, autocast: Callable = contextlib.nullcontext, share: tuple[int, int] = (0, 1),
                      progress: bool = True, keep_pace: Callable[[bool], bool] | None = None) -> FillResult:
    """Encode the variants that have no entry yet, in batches of one bucket, and write their entries.

    Images are loaded as the dataset loads them (data/dataset.load_pixels); one that cannot be read is
    skipped, recorded in the cache and reported in the result. `share` = (process index, processes): each
    process takes every processes-th variant of the list, so the shares are disjoint and together complete
    whatever each process finds already cached (an entry cut short counts as missing); wait for every process
    before training reads the cache.
    `autocast` is the training's (accelerator.autocast), so latents are computed in the same precision; the
    cache must have been opened with that precision, which keys its entries.
    `keep_pace(encoding)`, with several processes, tells whether any process is still encoding (train.py: an
    all-reduce). It is called with True after each batch, then, once this process's entries are all written,
    with False until it returns False. So a process with little or nothing to encode (its machine's copy of
    the cache full) waits for the others one batch at a time, never for a whole fill in one collective.
    Raises what stopped this process's encoding (an OSError for an entry that could not be written, the disk
    full; out of memory), after keeping pace with the others until none is encoding.
    """
    process_index, processes = share
    result, failed = FillResult(), {}
    missing: dict[tuple[int, int], list[Variant]] = {}  # bucket -> variants, in list order
    for variant in variants[process_index::processes]:
        path = items[variant.index].path
        entry = cache.entry_path(path, variant)
        if entry is None:
            failed.setdefault(path, "cannot be read: the file could not be opened")
        elif entry_intact(entry):
            result.reused += 1
        else:
            missing.setdefault(tuple(variant.bucket), []).append(variant)
    batches = [group[start:start + batch_size] for _, group in sorted(missing.items())
               for start in range(0, len(group), batch_size)]
    encoding, stopped_by = _encode_and_write(cache, items, batches, vae, device, autocast, progress, failed), None
    while True:
        try:
            next(encoding)  # one batch
        except StopIteration as finished:
            result.encoded = finished.value
            break
        except Exception as error:  # the disk full, out of memory: this process stops encoding, and the others
            stopped_by = error  # must not wait for it in keep_pace for ever
            break
        if keep_pace:
            keep_pace(True)
    while keep_pace and keep_pace(False):
        pass  # another process is still encoding
    if stopped_by is not None:
        raise stopped_by  # now that no process waits for this one in keep_pace
    result.failed = sorted(failed.items())
    return result


def _encode_and_write(cache: LatentCache, items: list[ImageItem], batches: list[list[Variant]], vae, device,
                      autocast: Callable, progress: bool, failed: dict[str, str]):
    """Encode each batch and write its entries, the next batches loading and the entries being written
    meanwhile, yielding after each batch. Images that cannot be read go into `failed`. Returns how many
    variants were encoded; raises a write's OSError."""
    from tqdm import tqdm

    encoded, writes = 0, deque()  # entries being written (each flushed to the disk: the writer threads wait on it)
    with ThreadPoolExecutor(IO_THREADS) as pool, ThreadPoolExecutor(WRITE_THREADS) as writer, \
            tqdm(total=sum(map(len, batches)), desc="caching latents", unit="image", dynamic_ncols=True,
                 disable=None if progress else True) as bar:
        for batch, loaded in _prefetched(pool, items, batches):
            good = []
            for variant, pixels in zip(batch, loaded):
                path = items[variant.index].path
                if isinstance(pixels, torch.Tensor):
                    good.append((path, variant, pixels))
                else:
                    failed.setdefault(path, f"cannot be read: {pixels}")
                    cache.record_failure(path, variant, f"{pixels} (when the latent cache was filled)")
            if good:
                params = encode_posterior(vae, torch.stack([pixels for _, _, pixels in good]), device, autocast)
                for (path, variant, _), row in zip(good, params):
                    writes.append(writer.submit(cache.save, path, variant, row))
                while len(writes) > MAX_PENDING_WRITES:
                    writes.popleft().result()
                encoded += len(good)
            bar.update(len(batch))
            yield
        for write in writes:
            write.result()  # each entry is on the disk before the cache is used; raises a write's error
    return encoded


def encode_posterior(vae, pixels: torch.Tensor, device, autocast=contextlib.nullcontext) -> torch.Tensor:
    """The VAE posterior's parameters for a batch of pixels in [-1, 1], fp32 on the CPU, as train_step encodes."""
    with autocast(), torch.no_grad():
        return vae.encode(pixels.to(device, non_blocking=True)).latent_dist.parameters.float().cpu()


def _prefetched(pool: ThreadPoolExecutor, items: list[ImageItem], batches: list[list[Variant]]):
    """(batch, [pixels, or the error that stopped an image]) for each batch, the next ones loading meanwhile."""
    pending = deque()
    for batch in batches:
        pending.append((batch, [pool.submit(_try_load_pixels, items[v.index].path, v) for v in batch]))
        if len(pending) > PREFETCH_BATCHES:
            batch, futures = pending.popleft()
            yield batch, [future.result() for future in futures]
    while pending:
        batch, futures = pending.popleft()
        yield batch, [future.result() for future in futures]


def _try_load_pixels(path: str, variant: Variant) -> torch.Tensor | Exception:
    try:
        return load_pixels(path, variant)
    except UNREADABLE as error:
        return error


# =================================================================================================
# Text embeddings
# =================================================================================================

class TextEmbeddingCache:
    """Text-encoder hidden states by caption, for a frozen text encoder: each distinct row of token ids is
    encoded once per run, then reused.

    Keyed by the row's token ids and clip_skip; kept on the device `encode` returns them on, so a batch of
    known captions costs one torch.stack. Memory grows with the number of distinct captions (77 x 768 fp32
    is 236 KB each for SD 1.x).
    """

    def __init__(self, encode: Callable[[torch.Tensor, int], torch.Tensor]):
        self.encode = encode  # (input_ids (rows, tokens), clip_skip) -> (rows, tokens, width)
        self.rows: dict[tuple[bytes, int], torch.Tensor] = {}
        self.encoded = 0  # rows passed to encode so far

    def __call__(self, input_ids: torch.Tensor, clip_skip: int = 0) -> torch.Tensor:
        """The hidden states of a batch (batch, tokens, width); `encode` sees only the rows not cached yet."""
        keys = [(row.numpy().tobytes(), clip_skip) for row in input_ids.cpu()]
        first: dict[tuple[bytes, int], int] = {}  # each key's first row in the batch
        for i, key in enumerate(keys):
            first.setdefault(key, i)
        new = [key for key in first if key not in self.rows]
        if new:
            with torch.no_grad():  # a frozen encoder: the cached tensors must not hold a graph
                outputs = self.encode(input_ids[[first[key] for key in new]], clip_skip)
            self.rows.update(zip(new, outputs.detach()))
            self.encoded += len(new)
        return torch.stack([self.rows[key] for key in keys])
