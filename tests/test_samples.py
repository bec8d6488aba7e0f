"""Sample images: the prompts file (utils/sample_prompts.py) and generation on the tiny model (utils/samples.py)."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from utils.model_family import SD1
from utils.sample_prompts import (DEFAULT_CFGS, SCHEDULERS, SamplePrompt, SamplePromptsError, default_settings,
                                  read_sample_prompts, reload_sample_prompts, sample_seed, scheduler_problem,
                                  scheduler_spec, size_for_aspect_ratio, with_random_captions)
from utils.samples import (build_scheduler, cfg_label, compose_panels, generate_samples, sample_stem, sample_tag,
                           slug)
from utils.tiny_model import build_tiny_components, tiny_scheduler

DEFAULTS = default_settings(resolution=512, train_batch_size=4, seed=555, sample_steps=250)


def write(tmp_path, name: str, content) -> str:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return str(path)


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_prompts_file_is_read_without_torch():
    """So a broken file can be reported with the config, before any model loads."""
    code = "import sys, utils.sample_prompts; sys.exit(1 if 'torch' in sys.modules else 0)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, "utils/sample_prompts.py imported torch\n" + result.stderr


# --- the .txt format ------------------------------------------------------------------------------

def test_txt_has_one_prompt_per_line_and_skips_blank_lines_and_comments(tmp_path):
    path = write(tmp_path, "prompts.txt", "# my prompts\n\na red circle\n   \n  a blue sky, #1 at dusk  \n# the end\n")
    loaded = read_sample_prompts(path, DEFAULTS)
    assert [p.prompt for p in loaded.prompts] == ["a red circle", "a blue sky, #1 at dusk"]
    assert loaded.settings == DEFAULTS and loaded.notes == ()
    first = loaded.prompts[0]
    assert (first.seed, first.width, first.height, first.cfgs) == (555, 512, 512, DEFAULT_CFGS)
    assert first.negative_prompt == "" and not first.random_caption


def test_a_byte_order_mark_is_not_part_of_the_first_prompt(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes("\ufeffa red circle\n".encode("utf-8"))
    assert read_sample_prompts(str(path), DEFAULTS).prompts[0].prompt == "a red circle"


def test_defaults_are_everydream2s():
    assert DEFAULTS.batch_size == 2  # half the training batch
    assert DEFAULTS.cfgs == (7.0, 4.0, 1.01) and DEFAULTS.scheduler == "ddim" and DEFAULTS.num_inference_steps == 30
    assert not DEFAULTS.show_progress_bars and not DEFAULTS.generate_pretrain_samples
    assert default_settings(resolution=512, train_batch_size=1, seed=1, sample_steps=5).batch_size == 1


def test_a_file_without_prompts_samples_random_training_captions(tmp_path):
    loaded = read_sample_prompts(write(tmp_path, "prompts.txt", "# nothing yet\n"), DEFAULTS)
    assert len(loaded.prompts) == 2 and all(p.random_caption for p in loaded.prompts)  # min(4, batch_size)
    assert "random training caption" in loaded.notes[0]


# --- the .json format -----------------------------------------------------------------------------

def test_json_reads_everydream2s_keys(tmp_path):
    path = write(tmp_path, "prompts.json", {
        "batch_size": 3, "seed": 42, "cfgs": [7, 1.5], "scheduler": "dpm++_2m_k", "num_inference_steps": 15,
        "show_progress_bars": True, "generate_pretrain_samples": True, "generate_samples_every_n_steps": 100,
        "resolution": 768,
        "samples": [
            {"prompt": "a red circle", "negative_prompt": "blurry"},
            {"prompt": "a tall tower", "seed": -1, "size": [512, 1024]},
            {"prompt": "a wide sea", "aspect_ratio": "16:9", "cfgs": [3]},
            {"random_caption": True, "seed": 7},
        ]})
    loaded = read_sample_prompts(path, DEFAULTS)
    s = loaded.settings
    assert (s.batch_size, s.seed, s.cfgs, s.scheduler, s.num_inference_steps) == (3, 42, (7.0, 1.5), "dpm++_2m_k", 15)
    assert s.show_progress_bars and s.generate_pretrain_samples and s.sample_steps == 100 and s.resolution == 768
    red, tower, sea, random_one = loaded.prompts
    assert (red.negative_prompt, red.seed, red.width, red.height, red.cfgs) == ("blurry", 42, 768, 768, (7.0, 1.5))
    assert (tower.seed, tower.width, tower.height) == (-1, 512, 1024)
    assert sea.cfgs == (3.0,) and sea.width > sea.height  # a sample's own cfgs are used (EveryDream2 ignored them)
    assert random_one.random_caption and random_one.prompt == "" and random_one.seed == 7
    assert loaded.notes == ()


def test_json_keys_left_out_take_the_defaults(tmp_path):
    loaded = read_sample_prompts(write(tmp_path, "p.json", {"samples": [{"prompt": "a cat"}]}), DEFAULTS)
    assert loaded.settings == DEFAULTS and loaded.prompts == (SamplePrompt("a cat", seed=555),)


def test_unknown_keys_are_notes_naming_them_not_errors(tmp_path):
    path = write(tmp_path, "p.json", {"cfg": [7], "scheduler": "ddim",
                                      "samples": [{"prompt": "a cat", "negativ_prompt": "dog", "steps": 3}]})
    loaded = read_sample_prompts(path, DEFAULTS)
    assert len(loaded.notes) == 3 and all(path in note for note in loaded.notes)
    assert "'cfg'" in loaded.notes[0] and "did you mean 'cfgs'" in loaded.notes[0]
    assert "samples[0]: unknown key 'negativ_prompt'" in loaded.notes[1] and "'negative_prompt'?" in loaded.notes[1]
    assert "'steps'" in loaded.notes[2]


def test_broken_json_is_an_error_naming_the_file_and_the_place(tmp_path):
    path = write(tmp_path, "p.json", '{\n  "batch_size": 3,   # lower this on out of memory\n  "samples": []\n}')
    with pytest.raises(SamplePromptsError) as error:
        read_sample_prompts(path, DEFAULTS)
    message = str(error.value)
    assert path in message and "line 2" in message and "no comments" in message


def test_wrong_values_are_all_reported_together_with_their_keys(tmp_path):
    path = write(tmp_path, "p.json", {"batch_size": 0, "cfgs": "7", "scheduler": "eulr_a", "show_progress_bars": "yes",
                                      "samples": [{"prompt": 3, "size": [512]}, "a bare string"]})
    with pytest.raises(SamplePromptsError) as error:
        read_sample_prompts(path, DEFAULTS)
    problems = error.value.problems
    assert str(error.value).startswith(path)
    for expected in ("batch_size", "cfgs", "did you mean 'euler_a'", "show_progress_bars", "samples[0].prompt",
                     "samples[0].size", "samples[1]"):
        assert any(expected in p for p in problems), (expected, problems)


def test_missing_file_and_wrong_extension_are_errors(tmp_path):
    with pytest.raises(SamplePromptsError, match="does not exist"):
        read_sample_prompts(str(tmp_path / "nope.txt"), DEFAULTS)
    with pytest.raises(SamplePromptsError, match=r"\.txt file .* or a \.json file"):
        read_sample_prompts(write(tmp_path, "prompts.yaml", "a: b"), DEFAULTS)


def test_reload_keeps_the_previous_prompts_when_the_file_breaks(tmp_path):
    path = write(tmp_path, "p.json", {"samples": [{"prompt": "a cat"}]})
    first, warning = reload_sample_prompts(path, DEFAULTS, None)
    assert warning is None and first.prompts[0].prompt == "a cat"
    write(tmp_path, "p.json", '{"samples": [')
    kept, warning = reload_sample_prompts(path, DEFAULTS, first)
    assert kept is first and "keeping the previous prompts" in warning and path in warning


# --- sizes, seeds and random captions -------------------------------------------------------------

def test_sizes_are_multiples_of_64(tmp_path):
    path = write(tmp_path, "p.json", {"resolution": 500, "samples": [{"prompt": "a", "size": [500, 700]},
                                                                      {"prompt": "b"}]})
    loaded = read_sample_prompts(path, DEFAULTS)
    assert [(p.width, p.height) for p in loaded.prompts] == [(512, 704), (512, 512)]
    assert any("resolution 500" in n for n in loaded.notes) and any("[500, 700]" in n for n in loaded.notes)


@pytest.mark.parametrize("resolution", [256, 512, 768, 1024, 1536])
def test_aspect_ratio_gives_a_training_bucket_at_any_resolution(resolution):
    assert size_for_aspect_ratio(1.0, resolution) == (resolution, resolution)
    wide = size_for_aspect_ratio(16 / 9, resolution)
    assert wide[0] % 64 == 0 and wide[1] % 64 == 0 and wide[0] > wide[1]
    assert wide[0] * wide[1] <= resolution**2 and abs(np.log(wide[0] / wide[1]) - np.log(16 / 9)) < 0.25
    assert size_for_aspect_ratio(9 / 16, resolution) == wide[::-1]
    assert size_for_aspect_ratio(10.0, resolution) == size_for_aspect_ratio(4.0, resolution)  # 4:1 at most


def test_aspect_ratio_accepts_a_number_or_a_w_h_string(tmp_path):
    path = write(tmp_path, "p.json", {"samples": [{"prompt": "a", "aspect_ratio": 1.5},
                                                  {"prompt": "b", "aspect_ratio": "3:2"}]})
    a, b = read_sample_prompts(path, DEFAULTS).prompts
    assert (a.width, a.height) == (b.width, b.height) == size_for_aspect_ratio(1.5, 512)


def test_a_fixed_seed_is_kept_and_minus_one_is_derived_deterministically():
    assert sample_seed(1234, 555, 100, 0) == 1234
    derived = sample_seed(-1, 555, 100, 0)
    assert derived == sample_seed(-1, 555, 100, 0) and 0 <= derived < 2**31
    assert len({derived, sample_seed(-1, 555, 200, 0), sample_seed(-1, 555, 100, 1), sample_seed(-1, 556, 100, 0)}) == 4


def test_random_captions_are_deterministic_distinct_and_independent_of_caption_order():
    prompts = (SamplePrompt("fixed"), SamplePrompt("", random_caption=True), SamplePrompt("", random_caption=True))
    captions = [f"caption {i}" for i in range(20)]
    state = random.getstate()
    first = with_random_captions(prompts, captions, seed=555)
    assert random.getstate() == state  # no global randomness
    assert first == with_random_captions(prompts, list(reversed(captions)) + captions[:3], seed=555)
    assert first[0].prompt == "fixed" and first[1].random_caption
    assert first[1].prompt in captions and first[2].prompt in captions and first[1].prompt != first[2].prompt
    draws = {tuple(p.prompt for p in with_random_captions(prompts, captions, seed)) for seed in range(10)}
    assert len(draws) > 1
    assert with_random_captions(prompts, ["only one"], 1)[1:] == (SamplePrompt("only one", random_caption=True),) * 2
    assert with_random_captions(prompts, [], 1) == prompts


# --- schedulers -----------------------------------------------------------------------------------

def test_everydream2s_scheduler_names_are_all_known():
    for name in ("ddim", "pndm", "ddpm", "lms", "euler", "euler_a", "kdpm2", "dpm++", "dpm++_2s", "dpm++_2m",
                 "dpm++_sde", "dpm++_2m_sde", "dpm++_2s_k", "dpm++_2m_k", "dpm++_sde_k", "dpm++_2m_sde_k"):
        assert name in SCHEDULERS
    assert scheduler_spec("dpm++").kwargs == {"algorithm_type": "dpmsolver++", "use_karras_sigmas": False}
    assert scheduler_spec("dpm++_2m_karras") == scheduler_spec("DPM++_2M_K") == SCHEDULERS["dpm++_2m_k"]
    assert scheduler_spec("dpm++_2m_sde_k").kwargs == {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True}
    with pytest.raises(ValueError, match="unknown scheduler 'dddim'.*'ddim'"):
        scheduler_spec("dddim")


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_every_scheduler_builds_from_the_models_scheduler_config(name):
    spec = SCHEDULERS[name]
    if scheduler_problem(name):  # its extra package (scipy, torchsde) is not installed: a clear message
        assert spec.needs and f"pip install {spec.needs}" in scheduler_problem(name)
        pytest.skip(f"{spec.needs} is not installed")
    model_scheduler = tiny_scheduler()
    scheduler = build_scheduler(name, model_scheduler)
    assert type(scheduler).__name__ == spec.class_name
    assert scheduler.config.beta_schedule == model_scheduler.config.beta_schedule  # the model's own betas
    assert getattr(scheduler.config, "use_karras_sigmas", False) == name.endswith("_k")
    scheduler.set_timesteps(max(3, spec.min_steps))
    assert len(scheduler.timesteps) > 0


def test_too_few_steps_for_pndm_is_an_error(tmp_path):
    with pytest.raises(SamplePromptsError, match="pndm needs at least 4 steps"):
        read_sample_prompts(write(tmp_path, "p.json", {"scheduler": "pndm", "num_inference_steps": 2}), DEFAULTS)


# --- file names and pictures ----------------------------------------------------------------------

def test_names_and_tags():
    prompt = SamplePrompt("A photo of Ted, 35mm! Café scene")
    assert slug(prompt.prompt) == "a-photo-of-ted-35mm-cafe-scene" and slug("") == "empty-prompt"
    assert len(slug("word " * 40)) <= 40
    assert sample_stem(250, 3, prompt) == "gs00250_03_a-photo-of-ted-35mm-cafe-scene"
    assert sample_stem(250, 3, prompt, "ema") == "gs00250_03_ema_a-photo-of-ted-35mm-cafe-scene"
    assert sample_tag(3, prompt, "ema") == "samples/03_a-photo-of-ted-35mm-cafe-scene_ema"
    assert sample_tag(0, SamplePrompt("a cat", random_caption=True)) == "samples/00_random-caption"
    assert (cfg_label(7), cfg_label(1.01), cfg_label(4.5)) == ("cfg 7.0", "cfg 1.01", "cfg 4.5")


def test_compose_panels_puts_labelled_panels_side_by_side():
    panels = [Image.new("RGB", (64, 32), color) for color in ("red", "green", "blue")]
    picture = compose_panels(panels, ["cfg 7.0", "cfg 4.0", "cfg 1.01"])
    assert picture.size == (192, 32)
    pixels = np.asarray(picture)
    for i, color in enumerate(([255, 0, 0], [0, 128, 0], [0, 0, 255])):
        assert (pixels[-1, 64 * i + 60] == color).all()  # away from the label: the panel itself
        assert (pixels[:12, 64 * i:64 * i + 30] == 255).all(axis=-1).any()  # the label's white box


# --- generation on the tiny model -----------------------------------------------------------------
# Two inference steps at 64 px: the pictures are noise, but every code path is the real one.

FAST = dataclasses.replace(default_settings(resolution=64, train_batch_size=4, seed=555, sample_steps=10),
                           num_inference_steps=2, cfgs=(7.0, 1.5))
ONE_CFG = dataclasses.replace(FAST, cfgs=(7.0,))


def tiny_prompts():
    return (SamplePrompt("a red circle", seed=1, width=64, height=64, cfgs=FAST.cfgs),
            SamplePrompt("a blue sky", "dark", seed=-1, width=128, height=64, cfgs=FAST.cfgs),
            SamplePrompt("a green tree", seed=3, width=64, height=64, cfgs=(5.0,)))  # its own cfgs


def one_prompt(seed: int = 1, prompt: str = "a red circle") -> tuple[SamplePrompt]:
    return (SamplePrompt(prompt, seed=seed, width=64, height=64, cfgs=ONE_CFG.cfgs),)


def pixels(samples):
    return [np.asarray(s.image) for s in samples]


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_components()


@pytest.fixture(scope="module")
def generated(tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("samples")
    return generate_samples(tiny, SD1, FAST, tiny_prompts(), str(folder), 100, label="ema"), folder


def test_generation_writes_one_jpeg_per_prompt_with_a_panel_per_cfg_and_a_txt(generated):
    samples, folder = generated
    assert [s.tag for s in samples] == ["samples/00_a-red-circle_ema", "samples/01_a-blue-sky_ema",
                                        "samples/02_a-green-tree_ema"]
    assert sorted(os.listdir(folder)) == sorted(
        f"gs00100_0{i}_ema_{name}.{ext}" for i, name in enumerate(("a-red-circle", "a-blue-sky", "a-green-tree"))
        for ext in ("jpg", "txt"))
    sizes = [(2 * 64, 64), (2 * 128, 64), (64, 64)]  # width = number of cfgs x image width
    for sample, size in zip(samples, sizes):
        with Image.open(sample.path) as image:
            assert image.format == "JPEG" and image.size == size
        assert sample.image.size == size and np.asarray(sample.image).dtype == np.uint8
    text = open(samples[1].path[:-4] + ".txt", encoding="utf-8").read()
    seed = sample_seed(-1, FAST.seed, 100, 1)
    assert samples[1].prompt.seed == seed
    for line in ("prompt: a blue sky", "negative prompt: dark", f"seed: {seed}", "cfgs: 7, 1.5", "steps: 2",
                 "scheduler: ddim", "size: 128x64", "global step: 100", "model: ema"):
        assert line in text, (line, text)


def test_the_same_seed_gives_the_same_pictures_and_another_seed_does_not(tiny, generated, tmp_path):
    first = pixels(generated[0])
    again = pixels(generate_samples(tiny, SD1, FAST, tiny_prompts(), str(tmp_path / "a"), 100, label="ema"))
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    other = pixels(generate_samples(tiny, SD1, dataclasses.replace(FAST, seed=556), tiny_prompts()[:2],
                                    str(tmp_path / "b"), 100))
    assert np.array_equal(first[0], other[0])  # a fixed seed stays fixed
    assert not np.array_equal(first[1], other[1])  # seed -1 is derived from the settings seed and the step


def test_generation_leaves_every_global_rng_stream_as_it_was(tiny, tmp_path):
    torch.manual_seed(1)
    random.seed(2)
    np.random.seed(3)
    before = (torch.get_rng_state(), random.getstate(), np.random.get_state())
    generate_samples(tiny, SD1, dataclasses.replace(ONE_CFG, scheduler="euler_a"), one_prompt(), str(tmp_path), 1)
    after = (torch.get_rng_state(), random.getstate(), np.random.get_state())
    assert torch.equal(before[0], after[0]) and before[1] == after[1]
    assert all(np.array_equal(a, b) for a, b in zip(before[2], after[2]))


def test_batching_does_not_change_the_pictures(tiny, tmp_path):
    prompts = one_prompt(1) + one_prompt(2, "a blue sky")
    batched = pixels(generate_samples(tiny, SD1, dataclasses.replace(ONE_CFG, batch_size=2), prompts,
                                      str(tmp_path / "a"), 1))
    single = pixels(generate_samples(tiny, SD1, dataclasses.replace(ONE_CFG, batch_size=1), prompts,
                                     str(tmp_path / "b"), 1))
    for a, b in zip(batched, single):  # the same noise; float rounding differs by batch size at most
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 2


def test_clip_skip_reaches_the_text_encoder(tiny, tmp_path):
    base, plain, skip = (pixels(generate_samples(tiny, SD1, ONE_CFG, one_prompt(), str(tmp_path / str(k)), 1,
                                                 clip_skip=k))[0] for k in (0, 1, 2))
    assert np.array_equal(plain, base) and not np.array_equal(skip, base)  # 0 and 1 both mean the last layer


def test_modes_and_requires_grad_are_restored_and_no_gradient_is_recorded(tiny, tmp_path):
    unet, vae, text_encoder = tiny["unet"], tiny["vae"], tiny["text_encoder"]
    parts = (unet, vae, text_encoder)
    unet.train()
    unet.conv_in.eval()  # a mixed module: each submodule gets its own mode back
    vae.eval()
    text_encoder.train()
    vae.requires_grad_(False)
    text_encoder.embeddings.requires_grad_(False)
    modes = {name: m.training for part in parts for name, m in part.named_modules()}
    grads = {name: p.requires_grad for part in parts for name, p in part.named_parameters()}
    try:
        generate_samples(tiny, SD1, ONE_CFG, one_prompt(), str(tmp_path), 1)
        assert modes == {name: m.training for part in parts for name, m in part.named_modules()}
        assert grads == {name: p.requires_grad for part in parts for name, p in part.named_parameters()}
        assert all(p.grad is None for part in parts for p in part.parameters())
        assert unet.training and not unet.conv_in.training and not vae.training and text_encoder.training
    finally:
        for part in parts:
            part.requires_grad_(True)


def test_random_caption_prompts_generate_under_a_stable_tag(tiny, tmp_path):
    prompts = with_random_captions((dataclasses.replace(one_prompt(5)[0], prompt="", random_caption=True),),
                                   ["a red circle", "a blue sky"], seed=555)
    (sample,) = generate_samples(tiny, SD1, ONE_CFG, prompts, str(tmp_path), 3)
    assert sample.tag == "samples/00_random-caption" and sample.prompt.prompt in ("a red circle", "a blue sky")
    assert "random caption: yes" in open(sample.path[:-4] + ".txt", encoding="utf-8").read()


def test_no_prompts_generate_nothing(tiny, tmp_path):
    assert generate_samples(tiny, SD1, FAST, (), str(tmp_path / "none"), 1) == []
    assert not os.path.exists(tmp_path / "none")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: checks fp16 autocast and the CUDA RNG")
def test_cuda_sampling_under_autocast_leaves_the_cuda_rng_alone(tmp_path):
    parts = build_tiny_components()
    for name in ("unet", "vae", "text_encoder"):
        parts[name].to("cuda")
    torch.cuda.manual_seed(4)
    before = torch.cuda.get_rng_state()
    (sample,) = generate_samples(parts, SD1, ONE_CFG, one_prompt(), str(tmp_path), 1, autocast_dtype=torch.float16)
    assert torch.equal(torch.cuda.get_rng_state(), before)
    cpu_result = pixels(generate_samples(build_tiny_components(), SD1, ONE_CFG, one_prompt(), str(tmp_path / "cpu"), 1))
    # The same CPU-generated noise: the GPU picture differs from the CPU one only by fp16 rounding.
    assert np.abs(np.asarray(sample.image).astype(int) - cpu_result[0].astype(int)).mean() < 8
