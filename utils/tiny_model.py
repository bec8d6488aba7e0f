"""The embedded tiny model (`resume_ckpt: builtin:tiny`): a real Stable Diffusion 1.5 pipeline, only small.

It has SD 1.5's topology (the same block types, four levels, two layers per down block, three per up
block, twelve text-encoder layers, a VAE with the real 8x downscale) with small channel counts, so the
single-file key layout, the bucket maths and every code path are the ones a real model takes. It is
built from a fixed seed with no download, so the demo and the tests run offline and repeatably.

Like SD 1.x its UNet has the same number of attention heads at every level, but 2 rather than 8: with a
tenth of the channels, 8 heads would be 4 to 16 wide (SD 1.5's are 40 to 160), and attention in such narrow
heads took over half of a training step on a CPU. With 2 heads (16 to 64 wide) the UNet's forward and
backward pass runs 2.6 times as fast there, and the demo's sample pictures take half as long. The head
count changes neither the weights nor their names, only how attention splits them.
"""

from __future__ import annotations

from collections import Counter

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from tokenizers import pre_tokenizers
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

TINY_SEED = 20240601
TEXT_HIDDEN_SIZE = 64  # also the UNet's cross-attention width
MAX_TOKENS = 77  # CLIP's context length, as in every SD 1.x/2.x model
BOS, EOS = "<|startoftext|>", "<|endoftext|>"

# Words that become single tokens: enough for the bundled example captions and simple sample prompts.
# Any other text still tokenizes, letter by letter.
VOCABULARY_WORDS = (
    "a an the of and with on in at by to from for or is are photo picture painting drawing image render "
    "illustration sketch art style portrait landscape close up view top side front back small large big "
    "tiny huge tall wide long short round square circle circles triangle triangles stripe stripes striped "
    "dot dots dotted grid checker checkered pattern shape shapes line lines wave waves ring rings star stars "
    "cube box sphere ball sun moon sky cloud clouds sea ocean water river lake mountain mountains hill "
    "hills tree trees forest grass field flower flowers road city house building tower bridge night day "
    "sunset sunrise dawn dusk light dark bright dim soft hard smooth sharp blurry red orange yellow green "
    "blue purple violet pink brown black white gray grey gold silver cyan magenta teal navy beige colorful "
    "background foreground centre center left right middle corner edge border frame over under above "
    "below behind beside between near far one two three four five six seven eight many several some "
    "gradient horizon banner panorama poster tile tiles abstract geometric simple plain minimal flat "
    "shiny glowing man woman person cat dog bird horse car boat train plane face eyes hair smile sitting "
    "standing running walking holding wearing hat shirt dress"
).split()


def learn_bpe_merges(words: list[str]) -> list[tuple[str, str]]:
    """Byte-pair merges learnt from `words` until each word is a single symbol.

    Written by hand because the `tokenizers` BPE trainer breaks frequency ties differently from run to
    run; here ties go to the alphabetically first pair, so the vocabulary is the same on every build.
    Applying these merges in order re-creates each training word as one token.
    """
    spelled = [list(w[:-1]) + [w[-1] + "</w>"] for w in sorted(set(words))]
    merges: list[tuple[str, str]] = []
    while True:
        counts = Counter(pair for symbols in spelled for pair in zip(symbols, symbols[1:]))
        if not counts:
            return merges
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        for symbols in spelled:
            i = 0
            while i < len(symbols) - 1:
                if (symbols[i], symbols[i + 1]) == best:
                    symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
                i += 1


def build_tiny_tokenizer() -> CLIPTokenizer:
    """A CLIP byte-level BPE tokenizer in which every word of VOCABULARY_WORDS is one token.

    CLIP's layout: the 256 byte-level symbols, the same with the end-of-word mark, one entry per merge,
    then the start and end tokens. Built in memory: no download, no vocabulary file in the repo.
    """
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # the byte-level symbols CLIP uses
    vocab: dict[str, int] = {}
    for symbol in alphabet + [s + "</w>" for s in alphabet]:
        vocab[symbol] = len(vocab)
    merges = learn_bpe_merges(VOCABULARY_WORDS)
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_TOKENS)


def _text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_HIDDEN_SIZE, intermediate_size=4 * TEXT_HIDDEN_SIZE,
        num_hidden_layers=12, num_attention_heads=8, max_position_embeddings=MAX_TOKENS,
        hidden_act="quick_gelu", projection_dim=TEXT_HIDDEN_SIZE,  # quick_gelu: OpenAI CLIP, as SD 1.x
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    return CLIPTextModel(config)


def _unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=32,  # latent px: the pipeline's default image is 32 x 8 = 256 px
        in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(32, 64, 128, 128),  # SD 1.5: (320, 640, 1280, 1280), the same ratios
        layers_per_block=2,
        attention_head_dim=2,  # the heads at every level, as SD 1.x's 8 (diffusers' name); see above
        cross_attention_dim=TEXT_HIDDEN_SIZE,
        norm_num_groups=32)


def _vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4,  # three downsamples: the real 8x
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 64, 64),  # SD: (128, 256, 512, 512), the same ratios
        layers_per_block=2, norm_num_groups=16, sample_size=256,
        scaling_factor=0.18215)  # SD 1.x's latent scale


def tiny_scheduler() -> DDPMScheduler:
    """SD 1.x's training noise schedule."""
    return DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, steps_offset=1, prediction_type="epsilon")


def build_tiny_components() -> dict:
    """The tiny pipeline's components, named as StableDiffusionPipeline names them.

    Weights come from a fixed seed inside a forked RNG, so building leaves the caller's RNG untouched and
    gives bit-identical weights every time on the same PyTorch version.
    """
    tokenizer = build_tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        unet, vae, text_encoder = _unet(), _vae(), _text_encoder(tokenizer)
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=tiny_scheduler())
