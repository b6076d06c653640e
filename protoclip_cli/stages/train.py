"""`protoclip train`: episodic ProtoCLIP (and the CLIP baseline, a recipe of the same trainer).

``run(config, workspace)`` checks every input before any heavy work (the data set's manifest and
shards, the teacher file and its coverage of the data, the recipe's consistency), prepares
``runs/<name>/`` (resolved ``config.toml``, ``manifest.json``, the episode plan) and trains,
resuming from the latest checkpoint of the same configuration. Under torchrun (``WORLD_SIZE`` > 1)
it joins the process group itself: NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from protoclip_cli import config as config_io
from protoclip_cli.artifacts import MANIFEST, write_manifest, write_text
from protoclip_cli.configs.train import TrainConfig
from protoclip_cli.console import info, warn
from protoclip_cli.core import distributed as dist_utils
from protoclip_cli.data import teacher_file
from protoclip_cli.data.remote import check_reachable, is_remote
from protoclip_cli.data.shards import shard_keys, split_counts
from protoclip_cli.data.sources import run_datasets
from protoclip_cli.errors import Interrupted, MissingInputError, ProtoclipError, Refused
from protoclip_cli.runs import RunDir
from protoclip_cli.core.checkpoint import load_checkpoint
from protoclip_cli.core.pretrained import fetch_pretrained
from protoclip_cli.training.episodes import (
    EpisodePlan,
    RunLayout,
    episode_phase,
    plan_episodes,
    resume_point,
    resumed_layout,
    run_layout,
)
from protoclip_cli.training import interrupts
from protoclip_cli.training.loop import Trainer
from protoclip_cli.workspace import Workspace

# Fields that may change between a run and its resumption: they do not change what is computed
# (gradient checkpointing recomputes the same activations; it only trades memory for time).
RESUMABLE_CHANGES = ("device", "model.compile", "model.grad_checkpointing", "data.extract_batch_size", "logging.")


@dataclass
class TrainInputs:
    dataset_dirs: list[Path]  # one per data set of the run, in data.datasets order
    shard_paths: dict[str, Path | str]  # shard id -> path, or URL where the shards live elsewhere
    counts: dict[str, int]  # shard id -> samples
    teacher_paths: list[Path]  # one per data set, or none without an external teacher
    key_offsets: dict[str, int]  # shard id -> offset added to its img2dataset keys (0 with one data set)
    weights: dict[str, float] | None  # shard id -> upsampling weight; None when all data sets weigh the same
    teacher_trusted: bool = False  # of another version of a data set, accepted by --trust-teacher


def use_teacher(config: TrainConfig) -> bool:
    """The external teacher is used when the recipe names one, prototypes are on and PBT is on."""
    return bool(config.proto.enabled and config.proto.teacher and config.loss.pbt)


def warn_about_recipe(config: TrainConfig) -> None:
    """Settings that are valid (TrainConfig checks itself) but do less than they seem to."""
    if config.proto.teacher and config.proto.enabled and not config.loss.pbt:
        warn("proto.teacher is set but loss.pbt = false: the external-teacher loss needs PBT and is skipped.")
    if config.proto.enabled:
        phases = [episode_phase(config, e, use_teacher(config)).name for e in range(config.schedule.episodes)]
        if "proto" not in phases:
            warn(
                f"proto.enabled is on, but none of the {len(phases)} episodes trains with prototypes "
                f"({phases.count('warmup')} InfoNCE warm-up by schedule.infonce_warmup_episodes, {phases.count('lit')} "
                "LiT by schedule.lit_start_episode): the run is CLIP training; raise schedule.episodes or lower "
                "those, or set proto.enabled = false to say so."
            )


def check_inputs(config: TrainConfig, workspace: Workspace, trust_teacher: bool = False) -> TrainInputs:
    """The data sets, their shards and teacher files, checked before anything heavy is built.

    A teacher file must come from this version of its data set (the manifest hash it recorded);
    ``trust_teacher`` accepts one of another version whose captions the user knows are the same,
    after checking that it covers every sample.
    """

    warn_about_recipe(config)
    if config.logging.wandb:
        if importlib.util.find_spec("wandb") is None:
            raise ProtoclipError("logging.wandb is on but wandb is not installed; `pip install wandb`, or set logging.wandb = false.")
    datasets = run_datasets(config.data)
    inputs = TrainInputs([], {}, {}, [], {}, None)
    weights: dict[str, float] = {}
    for index, name in enumerate(datasets.names):
        files = workspace.shard_files(name, config.data.split)  # raises, naming `protoclip download`
        if not files:
            raise ProtoclipError(f"Data set '{name}' lists no shards for split '{config.data.split}'; rerun `protoclip download {name}`.")
        shards = list(files.values())
        missing = [p for p in shards if not is_remote(p) and not Path(p).is_file()]
        if missing:
            raise MissingInputError(f"Shard {missing[0]} of data set '{name}' is missing; rerun `protoclip download {name}`.")
        if is_remote(shards[0]):
            check_reachable(shards[0])  # a wrong address or credential stops here, not in the first episode
        datasets.check_key_digits(index, shards[0])
        inputs.dataset_dirs.append(workspace.dataset_dir(name))
        counts = split_counts(workspace, name, config.data.split)
        samples = 0
        for file, path in files.items():
            shard = datasets.shard_id(index, file)
            inputs.shard_paths[shard] = path
            inputs.counts[shard] = counts[file]
            inputs.key_offsets[shard] = datasets.key_offset(index)
            weights[shard] = datasets.weights[index]
            samples += inputs.counts[shard]
        if use_teacher(config):
            path, trusted = _check_teacher(config, workspace, name, shards, samples, trust_teacher)
            inputs.teacher_paths.append(path)
            inputs.teacher_trusted |= trusted
    if not datasets.uniform:
        inputs.weights = weights
        if config.data.episode_size >= sum(inputs.counts.values()):
            raise ProtoclipError(
                f"data.weights need episodes of part of the union, but data.episode_size = {config.data.episode_size} "
                f"covers all {sum(inputs.counts.values())} samples; lower data.episode_size."
            )
    if len(inputs.teacher_paths) > 1:
        teacher_file.check_same_space(inputs.teacher_paths)
    return inputs


def _check_teacher(config: TrainConfig, workspace: Workspace, name: str, shards: list[Path], samples: int,
                   trust_teacher: bool) -> tuple[Path, bool]:
    """The teacher file of data set ``name``, checked to cover its shards, and whether it was trusted."""

    teacher_path = workspace.teacher_file(name, config.proto.teacher)
    if not teacher_path.is_file():
        raise MissingInputError(
            f"No teacher features at {teacher_path}; run `protoclip teacher-embed {name} --model "
            f"{config.proto.teacher}` first, or set proto.teacher = '' to train without a teacher."
        )
    manifest_path = workspace.dataset_dir(name) / MANIFEST
    trusted = False
    if not teacher_file.same_dataset_version(teacher_path, manifest_path):
        trusted = True
        if not trust_teacher:
            raise ProtoclipError(
                f"Teacher features {teacher_path} were embedded from another version of data set '{name}' (its "
                f"manifest.json changed since); run `protoclip teacher-embed {name} --model {config.proto.teacher} "
                "--force`, or pass --trust-teacher if you know its captions are unchanged."
            )
        warn(f"--trust-teacher: using {teacher_path}, embedded from another version of data set '{name}'.")
    if not teacher_file.embedded_from(teacher_path, manifest_path, config.data.split, samples):
        keys = [key for p in shards for key in shard_keys(p)]  # reads every shard's tar headers
        teacher_file.check_teacher_covers(teacher_path, keys, manifest_path)
    return teacher_path, trusted


def check_plan(config: TrainConfig, plan: EpisodePlan, layout: RunLayout, world_size: int, first_episode: int = 0) -> None:
    """Every episode (from ``first_episode``, where a resumed run continues) must give each rank a
    shard and a full batch, and hold at least k samples."""
    for episode, shards in enumerate(plan.episodes):
        if episode < first_episode:
            continue
        if len(shards) < world_size:
            raise ProtoclipError(
                f"Episode {episode} has {len(shards)} shard(s) for {world_size} processes; raise data.episode_size "
                "or launch fewer processes."
            )
        if layout.steps[episode] < 1:
            accumulated = config.optim.accum_freq > 1
            raise ProtoclipError(
                f"Episode {episode} ({plan.samples(episode)} samples) gives no full batch of {config.data.batch_size}"
                + (f" x {config.optim.accum_freq} micro-batches" if accumulated else "")
                + " per data worker; lower data.batch_size" + (", optim.accum_freq" if accumulated else "")
                + " or data.workers, or raise data.episode_size."
            )
        phase = episode_phase(config, episode, use_teacher(config))
        k_needed = max(config.proto.k, config.proto.teacher_k if phase.use_ext else 0)
        if phase.use_proto and plan.samples(episode) < k_needed:
            raise ProtoclipError(
                f"proto.k = {k_needed} exceeds the {plan.samples(episode)} samples of episode {episode}; lower "
                "proto.k (and proto.teacher_k) or raise data.episode_size."
            )


def note_episode_size(config: TrainConfig, plan, world_size: int) -> None:
    """Say so when the episodes are larger than asked because ``episode_size`` is under one batch."""
    size, batch = config.data.episode_size, config.data.batch_size * world_size
    if 0 < size < batch:
        smallest = min(plan.samples(e) for e in range(len(plan.episodes)))
        warn(
            f"data.episode_size = {size} is smaller than one global batch ({batch}); episodes are made of whole "
            f"shards, so each holds at least {smallest} samples (raise data.episode_size or lower data.batch_size)."
        )


def _config_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(old) | set(new))
    found = []
    for key in keys:
        path = prefix + key
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found += _config_differences(a, b, path + ".")
        elif a != b and not any(path == f or (f.endswith(".") and path.startswith(f)) for f in RESUMABLE_CHANGES):
            found.append(path)
    return found


def check_run_config(config: TrainConfig, run_dir: RunDir, rename: str = "--set name=NEW_NAME") -> None:
    """Refuse a run folder that holds a run of another configuration (resumable changes aside)."""
    if not run_dir.exists():
        return
    differences = _config_differences(config_io.to_dict(run_dir.config()), config_io.to_dict(config))
    if differences:
        raise ProtoclipError(
            f"Run folder {run_dir.path} holds a run with another configuration (differs in {', '.join(differences[:4])}); "
            f"pick another run name with {rename}, or delete the folder."
        )


def prepare_run_dir(config: TrainConfig, run_dir: RunDir, resume: bool | None) -> Path | None:
    """Check the run folder against ``config``; return the checkpoint to resume from, if any.

    A folder of another configuration is refused; ``resume=False`` clears this configuration's
    checkpoints, episodes and metrics; ``resume=None`` resumes when a checkpoint exists.
    """
    check_run_config(config, run_dir)
    checkpoint = run_dir.latest_checkpoint()
    if resume is False or checkpoint is None:
        for stale in run_dir.training_state():
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)
        return None
    return checkpoint


def _layout(config: TrainConfig, plan: EpisodePlan, world_size: int, resume_from: Path | None) -> tuple[RunLayout, int]:
    """The run's layout on ``world_size`` ranks and the first episode still to train: a resumed run
    keeps the steps it trained, on another number of ranks too (:func:`resumed_layout`)."""
    if resume_from is None:
        return run_layout(config, plan, world_size), 0
    point = resume_point(load_checkpoint(resume_from, mmap=True), config, plan)
    return resumed_layout(config, plan, world_size, point), point.next_episode[0]


def run(config: TrainConfig, workspace: Workspace, resume: bool | None = None, trust_teacher: bool = False) -> dict[str, Any]:
    """Train the recipe ``config`` in ``workspace``; returns the run's manifest. ``trust_teacher``:
    see :func:`check_inputs`.

    Rank 0 holds the run's lock (:meth:`RunDir.lock`) from before the folder is touched to the end,
    so a second ``train`` of the same run is refused instead of interleaving with this one.
    """
    started = time.perf_counter()
    try:
        inputs = check_inputs(config, workspace, trust_teacher)
    except Refused:
        raise
    except ProtoclipError as exc:
        raise Refused(str(exc)) from exc
    run_dir = RunDir(workspace.run_dir(config.name))
    if resume is False or run_dir.latest_checkpoint() is None:
        fetch_pretrained(config.model)  # a resumed run starts from its checkpoint instead
    if resume is True and not run_dir.exists():
        info(f"Nothing to resume in {run_dir.path}; starting the run.")
    created_group = dist_utils.init_distributed(config.device)
    lock = None
    try:
        rank, world_size = dist_utils.rank(), dist_utils.world_size()
        decision: list[Any] = [None, None, None]  # the checkpoint to resume from, an error, the run's layout
        if rank == 0:
            try:
                lock = run_dir.lock("train")
                # Only the lock holder may delete temporaries: a live writer's look the same.
                run_dir.remove_stale_temporaries()
                resume_from = prepare_run_dir(config, run_dir, resume)
                if resume_from is not None and run_dir.plan_file.is_file():
                    plan = EpisodePlan.load(run_dir.plan_file)
                else:
                    plan = plan_episodes(inputs.counts, config.schedule.episodes, config.data.episode_size, config.seed,
                                         weights=inputs.weights)
                layout, first_episode = _layout(config, plan, world_size, resume_from)
                check_plan(config, plan, layout, world_size, first_episode)
                note_episode_size(config, plan, world_size)
                write_text(run_dir.config_file, config_io.dumps(config))
                plan.save(run_dir.plan_file)
                decision = [str(resume_from) if resume_from else None, None, layout]
            except ProtoclipError as exc:
                decision = [None, str(exc), None]
        decision = dist_utils.broadcast_object(decision)
        if decision[1] is not None:
            raise Refused(decision[1])
        resume_from = Path(decision[0]) if decision[0] else None
        plan = EpisodePlan.load(run_dir.plan_file)
        layout = decision[2]
        if config.device == "cpu" or not torch.cuda.is_available():
            torch.set_num_threads(max(1, torch.get_num_threads() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))))
        trainer = None
        try:
            # Ctrl-C, SIGTERM and SIGUSR1 stop training at the next step boundary, with a checkpoint
            # of that step (training/interrupts.py).
            with interrupts.catching_stop_signals():
                # Resuming checks the checkpoint against the run (its shapes, its launch): a refusal
                # there leaves the manifest as it was, since nothing of the run has changed.
                try:
                    trainer = Trainer(config, run_dir.path, plan, layout, inputs.shard_paths, inputs.teacher_paths,
                                      resume_from, key_offsets=inputs.key_offsets)
                except ProtoclipError as exc:
                    raise Refused(str(exc)) from exc
                if rank == 0:
                    _write_run_manifest(config, run_dir, inputs, world_size, "running", {})
                info(
                    f"Training run '{config.name}': {config.schedule.episodes} episodes, {layout.total_steps} "
                    f"steps, {world_size} process(es) on {trainer.device}, global batch "
                    f"{config.data.batch_size * world_size}."
                )
                summary = trainer.fit()
        except BaseException as exc:
            if rank == 0 and trainer is not None:
                status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
                _record_stop(config, run_dir, inputs, world_size, status, trainer)
            if isinstance(exc, KeyboardInterrupt):
                signum = getattr(exc, "signum", signal.SIGINT)
                raise Interrupted(_where_it_stopped(run_dir, trainer, signum), interrupts.EXIT_CODES[signum]) from None
            raise
        finally:
            if trainer is not None:
                trainer.close()  # no data-loader worker outlives the stage
        summary.update(trainer.losses.run_summary())
        summary["seconds"] = round(time.perf_counter() - started, 2)  # this call's: inputs, model, data, training
        manifest = {}
        if rank == 0:
            summary["final_checkpoint"] = str(run_dir.latest_checkpoint())
            manifest = _write_run_manifest(config, run_dir, inputs, world_size, "complete", summary)
        return dist_utils.broadcast_object(manifest)
    finally:
        if lock is not None:
            lock.release()
        if created_group:
            torch.distributed.destroy_process_group()


def _where_it_stopped(run_dir: RunDir, trainer, signum: int) -> str:
    """The sentence for a stop signal: the step reached, and the checkpoint a rerun resumes from."""
    checkpoint = run_dir.latest_checkpoint()
    if checkpoint is None:
        resume = "no checkpoint was written yet, so rerunning the same command starts the run again"
    else:
        resume = f"rerunning the same command resumes from {checkpoint.name} (step {int(checkpoint.stem.split('-')[1])})"
    if trainer is None:
        return f"Training stopped by {interrupts.NAMES[signum]} before its first step; {resume}."
    layout = trainer.layout
    step = trainer.global_step
    episode = next((e for e in range(len(layout.steps)) if layout.first_step(e + 1) > step), len(layout.steps) - 1)
    return f"Training stopped by {interrupts.NAMES[signum]} at step {step} of {layout.total_steps} (episode {episode}); {resume}."


def _record_stop(config: TrainConfig, run_dir: RunDir, inputs: TrainInputs, world_size: int, status: str, trainer) -> None:
    """Mark the run manifest ``interrupted`` or ``failed`` (best effort: the disk may be what failed)."""
    checkpoint = run_dir.latest_checkpoint()
    summary = {"global_step": trainer.global_step, "total_steps": trainer.layout.total_steps,
               "last_checkpoint": str(checkpoint) if checkpoint else None,
               **trainer.losses.run_summary()}  # fmt: skip
    try:
        _write_run_manifest(config, run_dir, inputs, world_size, status, summary)
    except (OSError, ProtoclipError):
        pass


def _write_run_manifest(config: TrainConfig, run_dir: RunDir, inputs: TrainInputs, world_size: int, status: str, summary: dict) -> dict:
    # The teacher file is recorded by path: hashing a multi-gigabyte HDF5 on every start costs too much.
    return write_manifest(
        run_dir.path, "train", config=config_io.to_dict(config), inputs=_input_records(inputs),
        **_teacher_fields(inputs), **({"teacher_trusted": True} if inputs.teacher_trusted else {}), status=status,
        world_size=world_size, command=" ".join(sys.argv), **summary,
    )


def _input_records(inputs: TrainInputs) -> dict[str, Path]:
    """The manifest's inputs: ``dataset`` with one data set (as before), ``dataset:<name>`` for each of several."""
    if len(inputs.dataset_dirs) == 1:
        return {"dataset": inputs.dataset_dirs[0]}
    return {f"dataset:{d.name}": d for d in inputs.dataset_dirs}


def _teacher_fields(inputs: TrainInputs) -> dict[str, Any]:
    """``teacher_file`` (one data set, or none: null), or ``teacher_files`` in data.datasets order."""
    if len(inputs.teacher_paths) > 1:
        return {"teacher_files": [str(p) for p in inputs.teacher_paths]}
    return {"teacher_file": str(inputs.teacher_paths[0]) if inputs.teacher_paths else None}
