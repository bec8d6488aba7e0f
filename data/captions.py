"""Caption text: from file names, from text files, and as given to the tokenizer. Pure and torch-free."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

DEFAULT_MAX_CAPTION_LENGTH = 2048  # characters; EveryDream2's default, only used by weighted tag shuffling


@dataclass(frozen=True)
class Tag:
    text: str
    weight: float = 1.0


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


def by_weight(tags: tuple[Tag, ...]) -> list[Tag]:
    """Tags from the heaviest to the lightest; equal weights keep their order."""
    return sorted(tags, key=lambda tag: -tag.weight)


def join_caption(main_prompt: str, tags: list[Tag]) -> str:
    """`main prompt, tag, tag`, leaving out empty parts."""
    return ", ".join(part for part in [main_prompt] + [tag.text for tag in tags] if part)


def compose_caption(main_prompt: str, tags: tuple[Tag, ...], rng: random.Random | None = None, *,
                    keep_tags: int = 0, max_length: int | None = None) -> str:
    """The caption as the tokenizer gets it. Without `rng` tags are in weight order; with it they are shuffled.

    The main prompt always comes first, then the first `keep_tags` tags in place. If all weights are equal
    the other tags are shuffled uniformly. Otherwise they are drawn without replacement with probability
    proportional to their weight, and drawing stops before a tag would make the caption longer than
    `max_length` characters (EveryDream2 stops one tag too late).
    """
    ordered = by_weight(tags)
    if rng is None:
        return join_caption(main_prompt, ordered)
    kept, rest = ordered[:keep_tags], ordered[keep_tags:]
    if len({tag.weight for tag in rest}) <= 1:
        rng.shuffle(rest)
        return join_caption(main_prompt, kept + rest)
    # Weighted sampling without replacement (Efraimidis & Spirakis 2006): sort by u^(1/w), u uniform.
    keys = [rng.random() ** (1.0 / tag.weight) if tag.weight > 0 else 0.0 for tag in rest]
    drawn = [tag for _, tag in sorted(zip(keys, rest), key=lambda pair: -pair[0])]
    limit = max_length or DEFAULT_MAX_CAPTION_LENGTH
    chosen = list(kept)
    for tag in drawn:
        if len(join_caption(main_prompt, chosen + [tag])) > limit:
            break
        chosen.append(tag)
    return join_caption(main_prompt, chosen)
