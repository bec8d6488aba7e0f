"""Phase 1 of a run, the plan: the config, optimizer.json, the data scan, the validation sets, the schedule
and the resume check, resolved into one RunPlan. Torch-free, so every mistake in the settings or the data
is reported, all together, in a second and before any model loads.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import os
import random
from dataclasses import dataclass

from utils.config import (DEFAULT_CKPT_EVERY_N_MINUTES, FINDLAST, ConfigError, ConfigProblem, LoadedConfig,
                          TrainConfig, automatic_num_workers, to_json_dict)



@dataclass
class RunPlan:
    """The config plus every value derived from it and from the data, each with where it came from."""

    config: TrainConfig  # as resolved: seed, save cadence, findlast and num_workers filled in
    loaded: LoadedConfig  # as given, with the origin of each value and the notes about legacy keys
    optimizer_settings: object  # optimizer.optimizer_config.OptimizerSettings
    scan: object  # data.items.ScanResult: the usable images, the skipped files, notes about the data
    data_options: object  # data.plan.PlanOptions
    batches_per_epoch: list[int]  # of every epoch; they differ with fractional multipliers or rated_dataset
    schedule: dict  # part -> optimizer.optimizer_config.ScheduleSteps
    derived: list[str]  # "name = value (origin)" lines, printed and recorded
    ema_decay: float | None = None  # per EMA update; None: EMA off
    sample_file: object = None  # utils.sample_prompts.SampleFile: the prompts as read at the start; None: no samples
    validation: object = None  # data.validation.ValidationPlan; None: no validation
    session_key: str = ""  # digest of the settings as given: how `--resume_run auto` finds this run again
    resume: object = None  # utils.resume.ResumeTarget when continuing a run (--resume_run)
    plugins: list = dataclasses.field(default_factory=list)  # the instances of `plugins` (utils/plugins.py)

    @functools.cached_property
    def fingerprint(self) -> dict:
        """data/fingerprint.py's record of every scanned image, read once, when first needed: the resume
        check, the run folder's record (main process) and the latent cache's keys."""
        from data.fingerprint import dataset_fingerprint

        return dataset_fingerprint(self.scan.items)

    @property
    def model_source(self) -> str:
        """Where the weights come from: the checkpoint being resumed, else resume_ckpt."""
        return self.resume.checkpoint if self.resume else self.config.resume_ckpt

    @property
    def items(self) -> list:
        """The images that train: the scanned ones, less those held out for validation."""
        return self.validation.train_items if self.validation else self.scan.items

    @property
    def total_batches(self) -> int:
        return sum(self.batches_per_epoch)

    def epoch_plan(self, epoch: int) -> list:
        """The batches of Samples of one epoch (data/plan.py): a pure function of the data, seed and epoch."""
        from data.plan import plan_epoch

        return plan_epoch(self.items, epoch, self.data_options)

    def process_plan(self, epoch: int, process: int) -> list:
        """The batches of the epoch that one process trains (all of them with one process)."""
        from data.plan import process_share

        return process_share(self.epoch_plan(epoch), process, self.data_options)


def data_options(config: TrainConfig):
    from data.items import root_folders
    from data.plan import PlanOptions

    # WORLD_SIZE: the number of processes, set by accelerate launch, torchrun and MPI launchers.
    return PlanOptions(seed=config.seed, batch_size=config.batch_size, grad_accum=config.grad_accum,
                       processes=int(os.environ.get("WORLD_SIZE", "1")), fixed_crops=config.cache_latents,
                       data_roots=root_folders([config.data_root] if isinstance(config.data_root, str)
                                               else config.data_root),
                       max_epochs=config.max_epochs, flip_p=config.flip_p, cond_dropout=config.cond_dropout,
                       shuffle_tags=config.shuffle_tags, keep_tags=config.keep_tags,
                       rated_dataset=config.rated_dataset,
                       rated_dataset_target_dropout_percent=config.rated_dataset_target_dropout_percent)


def plan_run(argv: list[str], random_seed: int | None = None) -> RunPlan:
    """Everything decided before anything heavy loads. Raises ConfigError listing every problem, and
    NothingToResume. `random_seed`: what `seed: -1` becomes, instead of a fresh draw (the processes of a
    launch train with the main process's draw: utils.processes.share_random_seed)."""
    from data.items import ScanResult, scan_dataset
    from data.plan import batches_per_epoch
    from data.scan import DataRootError
    from optimizer.optimizer_config import OPTIMIZERS, load_optimizer_settings, schedule_steps
    from utils.checkpoint import NoCheckpointFound, find_last_checkpoint
    from utils.plugins import defines
    from utils.resume import ResumeError, load_settings, read_run_config, session_key

    loaded, resume = load_settings(argv)
    config, derived, problems = loaded.config, [], []

    def resolve(key: str, value, origin: str) -> None:
        nonlocal config
        config = dataclasses.replace(config, **{key: value})
        derived.append(f"{key} = {value} ({origin})")

    started_as = session_key(to_json_dict(config))  # before anything is resolved
    if resume:
        derived.append(f"resuming {resume.run_dir} from {os.path.basename(resume.checkpoint)} (step "
                       f"{resume.record['global_step']})")
        loaded.notes.extend(f"passed over a damaged checkpoint: {damage}" for damage in resume.damaged)
        try:
            started_with = read_run_config(resume.run_dir)
        except ResumeError as error:
            raise ConfigError([ConfigProblem("resume_run", loaded.origins["resume_run"], str(error))]) from None
        if config.seed == -1:
            resolve("seed", started_with["seed"], "the resumed run's")
        if config.resume_ckpt == FINDLAST:  # the weights come from the run's checkpoint; no search needed
            resolve("resume_ckpt", started_with["resume_ckpt"], "the resumed run's")
        if config.ema_resume_model == FINDLAST:
            resolve("ema_resume_model", None, "resumed from the run's own EMA")
    if config.seed == -1:
        drawn = random.SystemRandom().randint(0, 2**31 - 1) if random_seed is None else random_seed
        resolve("seed", drawn, "random, from seed: -1")
    if config.ckpt_every_n_minutes is None and not config.save_every_n_epochs:
        resolve("ckpt_every_n_minutes", DEFAULT_CKPT_EVERY_N_MINUTES, "default when no save cadence is set")
    if config.num_workers is None:
        resolve("num_workers", automatic_num_workers(), "automatic: CPU cores - 1, at most 8")
    if config.resume_ckpt == FINDLAST:
        try:
            resolve("resume_ckpt", find_last_checkpoint(config.logdir), f"findlast: newest finished checkpoint "
                    f"under {config.logdir}")
        except NoCheckpointFound as error:
            problems.append(ConfigProblem("resume_ckpt", loaded.origins["resume_ckpt"], str(error)))
    if config.ema_resume_model == FINDLAST:
        try:
            newest = find_last_checkpoint(config.logdir, containing="ema")
            resolve("ema_resume_model", newest, "findlast: newest finished checkpoint with EMA weights")
        except NoCheckpointFound as error:
            problems.append(ConfigProblem("ema_resume_model", loaded.origins["ema_resume_model"], str(error)))
    sample_file = read_prompts(config, loaded, problems)
    plugins = load_plugins(config, loaded, problems)
    transforming = [type(plugin).__name__ for plugin in plugins if defines(plugin, "transform_pil_image")]
    if config.cache_latents and transforming:
        problems.append(ConfigProblem("cache_latents", loaded.origins["cache_latents"], (
            f"cannot be used with plugins that transform images ({', '.join(transforming)}): the latents are "
            "computed once, so the transform would not apply anew at each epoch.")))
    if config.load_settings_every_epoch and not loaded.config_file:
        problems.append(ConfigProblem("load_settings_every_epoch", loaded.origins["load_settings_every_epoch"],
                                      "needs a config file to re-read: give --config."))
    optimizer_settings = load_optimizer_settings(config, loaded.origins)
    optimizer_package = OPTIMIZERS[optimizer_settings.unet.optimizer].package
    for needed, package, key in ((optimizer_package is not None, optimizer_package, "optimizer"),
                                 (config.attn_type == "xformers", "xformers", "attn_type"),
                                 (config.wandb, "wandb", "wandb")):
        if needed and importlib.util.find_spec(package) is None:
            problems.append(ConfigProblem(key, loaded.origins[key], f"needs the {package} package, which is not "
                                          f"installed: pip install {package}"))
    try:
        scan = scan_dataset(config.data_root, config.resolution)
    except DataRootError as error:
        problems.append(ConfigProblem("data_root", loaded.origins["data_root"], str(error)))
        scan = ScanResult([], [])
    if not scan.items and not any(p.key == "data_root" for p in problems):
        reasons = "".join(f"\n    {entry.path}: {entry.reason}" for entry in scan.skipped[:10])
        problems.append(ConfigProblem("data_root", loaded.origins["data_root"], f"{config.data_root!r} holds no "
                                      "usable images (.jpg, .jpeg, .png, .bmp, .webp, .jfif), searched "
                                      f"recursively.{reasons}"))
    shuffling = [item.path for item in scan.items if item.shuffle_tags]
    if config.cache_text_embeddings and shuffling and not config.shuffle_tags:  # config-wide: utils/config.py
        problems.append(ConfigProblem("cache_text_embeddings", loaded.origins["cache_text_embeddings"], (
            f"cannot be used with tag shuffling, which {len(shuffling)} images turn on for themselves "
            f"(shuffle_tags.txt in their folder, or their .yaml), e.g. {shuffling[0]}: their captions differ every "
            "epoch, so the cache would grow every epoch. Remove their shuffle_tags, or leave out "
            "cache_text_embeddings.")))
    validation = plan_validation(config, loaded, scan, problems) if scan.items else None
    if problems:
        raise ConfigError(problems)
    train_items = validation.train_items if validation else scan.items
    options = data_options(config)
    per_epoch = batches_per_epoch(train_items, options)
    if not sum(per_epoch):
        raise ConfigError([ConfigProblem("data_root", loaded.origins["data_root"], f"{len(scan.items)} usable "
                                         "images, but every one has multiply: 0, so nothing would train.")])
    total_steps = sum(math.ceil(count / config.grad_accum) for count in per_epoch)
    groups = (("unet", optimizer_settings.unet), ("text encoder", optimizer_settings.text_encoder))
    schedule = {part: schedule_steps(total_steps, group.lr_scheduler, group.lr_warmup_steps, group.lr_decay_steps)
                for part, group in groups}
    for part, group in groups:
        if group.lr_scheduler != "constant" and schedule[part].warmup >= schedule[part].decay:
            problems.append(ConfigProblem("lr_warmup_steps", loaded.origins["lr_warmup_steps"], (
                f"the {part}'s warmup ({schedule[part].warmup} steps) is not shorter than its decay "
                f"({schedule[part].decay} steps), so the {group.lr_scheduler} schedule would never decay.")))
    if problems:
        raise ConfigError(problems)
    derived += list(optimizer_settings.origins) + [f"{part}: {steps.origin}" for part, steps in schedule.items()]
    derived += validation.summary if validation else []
    ema_decay = None
    if config.ema_decay_rate is not None or config.ema_strength_target is not None:
        updates = total_steps // config.ema_update_interval
        ema_decay, origin = resolve_ema_decay(config.ema_decay_rate, config.ema_strength_target, updates)
        derived.append(f"ema decay = {ema_decay:.6g} ({origin}; {updates} updates in the run)")
        if not updates:
            loaded.notes.append(f"ema_update_interval: {config.ema_update_interval} optimizer steps is longer than "
                                f"the run ({total_steps} steps): the EMA will never be updated.")
    plan = RunPlan(config, loaded, optimizer_settings, scan, options, per_epoch, schedule, derived, ema_decay,
                   sample_file, validation, started_as, resume, plugins)
    if resume:
        check_resume(plan)
    return plan


def check_resume(plan: RunPlan) -> None:
    """Refuse (ConfigError) to resume a run whose settings, optimizer, data or number of processes differ
    from how it started, unless force_resume; then the differences are noted."""
    from utils.resume import optimizer_summary, resume_differences

    config, loaded, resume = plan.config, plan.loaded, plan.resume
    differences = resume_differences(resume, to_json_dict(config), optimizer_summary(plan.optimizer_settings),
                                     plan.fingerprint, plan.data_options.processes)
    if differences and not config.force_resume:
        raise ConfigError([ConfigProblem("resume_run", loaded.origins["resume_run"], (
            f"these differ from {resume.run_dir}, so the run would not continue as it started:\n      "
            + "\n      ".join(differences) + "\n    Undo them, or add --force_resume to continue anyway."))])
    if differences:
        loaded.notes.append("resumed with --force_resume despite: " + "; ".join(differences))


def plan_validation(config: TrainConfig, loaded: LoadedConfig, scan, problems: list):
    """The validation sets of validation_config (data/validation.py), or None; problems are added."""
    if not config.validation_config:
        return None
    from data.validation import build_validation_plan, read_validation_config

    try:
        settings, notes = read_validation_config(config.validation_config)
        loaded.notes.extend(notes)  # validate_training: false holds nothing out; the other sets still count
        validation = build_validation_plan(settings, scan.items, resolution=config.resolution,
                                           batch_size=config.batch_size, data_root=config.data_root)
    except ConfigError as error:
        problems.extend(error.problems)
        return None
    loaded.notes.extend(validation.notes)
    for key in ("early_stopping_patience", "save_best_val"):
        if getattr(config, key) and not validation.held_out:
            measured = " (only stabilize-train)" if validation.sets else ""
            problems.append(ConfigProblem(key, loaded.origins[key], f"needs a held-out validation set, and "
                                          f"{config.validation_config} holds out none{measured}."))
    return validation if validation.sets else None  # none: nothing to validate (noted)


def read_prompts(config: TrainConfig, loaded: LoadedConfig, problems: list):
    """The sample prompts file, read once before anything loads (a broken one given on purpose is a config
    problem); None when there is none: the default file name that does not exist means no samples."""
    from utils.sample_prompts import SamplePromptsError, read_sample_prompts, settings_for

    if config.sample_prompts is None:
        return None
    try:
        sample_file = read_sample_prompts(config.sample_prompts, settings_for(config))
    except SamplePromptsError as error:
        if loaded.origins["sample_prompts"] == "default" and not os.path.exists(config.sample_prompts):
            loaded.notes.append(f"no sample images: {config.sample_prompts} does not exist")
        else:
            problems.append(ConfigProblem("sample_prompts", loaded.origins["sample_prompts"], str(error)))
        return None
    loaded.notes.extend(f"{config.sample_prompts}: {note}" for note in sample_file.notes)
    return sample_file


def load_plugins(config: TrainConfig, loaded: LoadedConfig, problems: list) -> list:
    """The plugin instances (utils/plugins.py); one that cannot load is a config problem."""
    from utils.plugins import PluginError, load_plugins as load

    try:
        return load(config.plugins)
    except PluginError as error:
        problems.append(ConfigProblem("plugins", loaded.origins["plugins"], str(error)))
        return []


def resolve_ema_decay(decay_rate: float | None, strength_target: float | None, updates: int) -> tuple[float, str]:
    """The EMA decay per update, and where it came from. strength_target s is the share of the starting
    weights left after every update: decay = s^(1/updates), as EveryDream2 defines it."""
    if decay_rate is not None:
        return decay_rate, "ema_decay_rate"
    return strength_target ** (1.0 / max(1, updates)), f"ema_strength_target {strength_target}"
