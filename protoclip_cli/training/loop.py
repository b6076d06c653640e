"""The episodic training loop (method.md section 3): per episode extract, cluster, back-translate,
then one training pass with the labels fixed; warm-up episodes and the LiT finish use the CLIP loss
only. With ``proto.single_pass`` the prototypes come from features recorded during the previous
training pass instead (``training/single_pass.py``). Checkpoints after every episode and every
``logging.checkpoint_every_steps`` steps; a resumed run continues inside an episode with the same
shards, the same prototypes and the batches already done skipped.

Every pass of the run is served by one persistent data loader (``data/pipeline.py``). A pass is
started as soon as the trainer knows it comes next, so its first batches are decoded while the
trainer clusters or writes a checkpoint.

The :class:`Trainer`'s passes share its state (model, optimiser, step counters, stream, recorder)
and its order of operations is what resume depends on, so they stay together here; what stands
alone lives beside it (``setup.py``: the device and the model as training uses it; ``episodes.py``,
``step.py``, ``prototypes.py``, ``single_pass.py``, ``metrics.py``; the checkpoint's contents are
``core/checkpoint.py``'s ``TrainState``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from protoclip_cli import config as config_io
from protoclip_cli.configs.train import TrainConfig
from protoclip_cli.console import info, progress
from protoclip_cli.core import distributed as dist_utils
from protoclip_cli.core.checkpoint import (
    TrainState, load_checkpoint, restore_training_state, rng_state, save_checkpoint,
)
from protoclip_cli.core.losses import ProtoCLIPLoss
from protoclip_cli.core.model import preprocess_config
from protoclip_cli.core.optim import build_optimizer, cosine_schedule, parameter_groups, set_learning_rates
from protoclip_cli.data.pipeline import Position, batches_to_skip, split_for_rank
from protoclip_cli.data.teacher_file import run_teacher_rows
from protoclip_cli.data.transforms import device_augmentation, to_model_input
from protoclip_cli.errors import ProtoclipError
from protoclip_cli.runs import RunDir
from protoclip_cli.training import interrupts
from protoclip_cli.training.data_losses import DataLosses
from protoclip_cli.training.episodes import EpisodePlan, Phase, RunLayout, episode_phase, resume_point
from protoclip_cli.training.extraction import extract_features
from protoclip_cli.training.metrics import MetricsLog, batch_diagnostics
from protoclip_cli.training.prototypes import EpisodePrototypes, build_prototypes, load_prototypes, save_prototypes
from protoclip_cli.training.setup import TrainingDevice, build_training_model, episode_stream
from protoclip_cli.training.single_pass import FeatureRecorder, OnlineLabels
from protoclip_cli.training.step import Stepper, micro_batches


@dataclass
class Trainer:
    """One training run in one process (one rank of a torchrun launch)."""

    config: TrainConfig
    run_dir: Path
    plan: EpisodePlan
    layout: RunLayout  # steps per episode and the LiT start, computed once by the stage
    shard_paths: dict[str, Path]  # shard id (the plan's) -> path
    teacher_paths: list[Path]  # one per data set of the run (data.datasets order); empty: no external teacher
    resume_from: Path | None = None
    key_offsets: dict[str, int] = field(default_factory=dict)  # shard id -> offset of its keys (several data sets)

    def __post_init__(self) -> None:
        cfg = self.config
        self.run = RunDir(self.run_dir)
        self.rank = dist_utils.rank()
        self.world_size = dist_utils.world_size()
        self.runtime = TrainingDevice.for_recipe(cfg)
        self.device, self.autocast, self.channels_last = self.runtime.device, self.runtime.autocast, self.runtime.channels_last
        torch.manual_seed(cfg.seed)
        resumed = load_checkpoint(self.resume_from, map_location=self.device) if self.resume_from is not None else None
        # A resumed run's towers come from its checkpoint: the starting weights are not needed (nor their cache).
        self.model, self.train_model, self.extract_forward = build_training_model(
            cfg, self.runtime, self.world_size, weights=resumed is None,
            preprocess=resumed.preprocess if resumed is not None else None,
        )
        self._setup_optimizer()
        self.augmentation = device_augmentation(cfg.data.augmentation, self.model.image_size)
        self.stepper = Stepper(
            self.model, self.train_model, self.optimizer,
            ProtoCLIPLoss(cfg.loss.w_clip, cfg.loss.w_proto, cfg.loss.w_ext, cfg.loss.target_temperature, cfg.loss.pbt,
                          contrastive=cfg.loss.contrastive),
            self.autocast, self._model_input, world_size=self.world_size, ddp_gradients=cfg.optim.ddp_gradients,
            grad_clip=cfg.optim.grad_clip, no_sync=getattr(self.train_model, "no_sync", None),
        )
        self.single_pass = cfg.proto.enabled and cfg.proto.single_pass
        self.stream = episode_stream(
            cfg, [[self.shard_paths[s] for s in self._rank_shards(e)] for e in range(cfg.schedule.episodes)],
            self.plan.counts, self.shard_paths, self.key_offsets, self.teacher_paths if self.single_pass else [],
            self.rank, self.model.image_size, pin_memory=self.device.type == "cuda",
        )
        self.stop_agreement = interrupts.StopAgreement(self.world_size)
        self.recorder = FeatureRecorder()
        self.losses = DataLosses()
        self.metrics = MetricsLog.for_run(self.run_dir, cfg, enabled=self.rank == 0)
        self.global_step = 0
        self._saved_step: int | None = None  # the global step of the newest checkpoint this trainer wrote or read
        self.start_episode = 0
        self.start_batches = 0
        self.position = Position.start(cfg.data.workers)
        self._started: tuple[int, str, Iterator[dict]] | None = None
        if resumed is not None:
            self._restore(self.resume_from, resumed)

    def _setup_optimizer(self) -> None:
        """AdamW over the parameter groups, and the per-step learning rates (the visual ones end at LiT),
        on the schedule's steps (those of the run's first launch, :class:`RunLayout`)."""
        cfg, layout = self.config, self.layout
        groups = parameter_groups(self.model, cfg.optim.weight_decay)
        self.optimizer = build_optimizer(groups, cfg.optim, fused=self.device.type in ("cuda", "cpu"))
        lit_step = layout.schedule_first_step(layout.lit_start) if layout.lit_start is not None else None
        total, positions = sum(layout.schedule), layout.schedule_positions()
        self.schedules = {
            "rest": cosine_schedule(cfg.optim.lr, cfg.schedule.warmup_steps, total, positions=positions),
            "visual": cosine_schedule(cfg.optim.lr, cfg.schedule.warmup_steps, total, end_step=lit_step, positions=positions),
        }

    def close(self) -> None:
        """Stop the data-loader workers; the stage calls it however training ends."""
        self._started = None
        self.stream.close()

    # -- state ------------------------------------------------------------------------------------
    def _restore(self, path: Path, state: TrainState) -> None:
        restore_training_state(path, state, self.model, self.optimizer, self.config.data.workers)
        self.global_step = self._saved_step = state.global_step
        point = resume_point(state, self.config, self.plan)
        episode, done = point.next_episode
        if point.restarts_episode(self.world_size):
            info(
                f"Checkpoint {path.name} was written by {state.world_size} process(es) inside episode {episode} "
                f"({done} of its {point.steps[episode]} steps done), whose data cannot be continued exactly on "
                f"{self.world_size}, so the episode's training pass restarts from its first batch with the "
                f"checkpoint's weights ({self.layout.steps[episode] - done} more steps)."
            )
        elif done and state.loader is not None:
            self.position = Position.from_json(state.loader[self.rank])
        elif done:  # a checkpoint of an older version: batches only, no record counts
            given = batches_to_skip(self.stream.config.owed(episode), done * self.config.optim.accum_freq)
            self.position = Position(tuple(g * self.config.data.batch_size for g in given), tuple(given))
        if state.recorded is not None and done > 0 and not point.restarts_episode(self.world_size):
            self.recorder.restore(state.recorded, self.device)
        self.start_episode, self.start_batches = episode, done
        self.metrics.truncate_after(self.global_step, episode)
        info(f"Resuming from {path.name}: episode {episode}, {done} of its batches done, step {self.global_step}.")

    def _save(self, episode: int, batches_done: int) -> Path | None:
        # Collectives first: every rank takes part, rank 0 writes.
        positions = self._all_ranks(self.position.to_json())
        recorded = self.recorder.gathered_state() if batches_done < self.layout.steps[episode] else None
        path = None
        if self.rank == 0:
            state = TrainState(
                model=self.model.state_dict(), optimizer=self.optimizer.state_dict(), episode=episode,
                batches_done=batches_done, steps_in_episode=self.layout.steps[episode], global_step=self.global_step,
                total_steps=self.layout.total_steps, world_size=self.world_size, workers=self.config.data.workers,
                config=config_io.to_dict(self.config), rng=rng_state(), loader=positions, recorded=recorded,
                steps_per_episode=list(self.layout.steps), schedule_steps=self.layout.schedule,
                preprocess=preprocess_config(self.model),
            )
            path = save_checkpoint(self.run, state, self.config.logging.keep_checkpoints)
        self._barrier()
        self._saved_step = self.global_step
        return path

    def _all_ranks(self, value: Any) -> list[Any]:
        if not dist_utils.is_distributed():
            return [value]
        values: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(values, value)
        return values

    def _barrier(self) -> None:
        if dist_utils.is_distributed():
            torch.distributed.barrier()

    def _stop(self, episode: int, batches_done: int, signum: int, total: torch.Tensor | None) -> None:
        """Stop training for a stop signal at this step boundary, with a checkpoint of the step just
        done (unless one holds it already): a rerun, or a requeued job, continues from it."""
        if self._saved_step != self.global_step:
            if total is not None:
                self._check_finite(total)
            self._save(episode, batches_done)
        raise interrupts.StopSignal(signum)

    # -- passes -----------------------------------------------------------------------------------
    def _rank_shards(self, episode: int) -> list[str]:
        return split_for_rank(self.plan.episodes[episode], self.rank, self.world_size)

    def _prototype_path(self, episode: int) -> Path:
        return self.run.prototypes_file(episode)

    def _first_pass(self, episode: int) -> str:
        """'extract' when the episode clusters its own samples before training, else 'train'."""
        phase = episode_phase(self.config, episode, bool(self.teacher_paths))
        if phase.use_proto and not self._prototype_path(episode).is_file():
            return "extract"
        return "train"

    def _start(self, episode: int, kind: str) -> None:
        """Start the loader on a pass now (its batches are prefetched until the trainer takes them)."""
        if self._started is not None and self._started[:2] == (episode, kind):
            return
        if kind == "extract":
            batches = self.stream.extraction(episode)
        else:
            position = self.position if episode == self.start_episode else None
            batches = self.stream.training(episode, position)
        self._started = (episode, kind, batches)

    def _take(self, episode: int, kind: str) -> Iterator[dict]:
        self._start(episode, kind)
        batches = self._started[2]
        self._started = None
        return batches

    def _prototypes(self, episode: int, phase: Phase, bar) -> tuple[EpisodePrototypes, dict[str, float]]:
        """Load the episode's prototypes (made already) or extract, cluster and save them."""
        path = self._prototype_path(episode)
        if path.is_file():
            self._start(episode, "train")
            return load_prototypes(path), {"extract": 0.0, "cluster": 0.0}
        start = time.perf_counter()
        expected = sum(self.plan.counts[s] for s in self._rank_shards(episode))
        task = bar.add_task(f"episode {episode}: extract", total=expected, rate="")
        done = [0, 0.0]

        def on_batch(samples: int, seconds: float) -> None:
            done[0] += samples
            done[1] += seconds
            bar.update(task, advance=samples, rate=f"{done[0] / max(time.perf_counter() - start, 1e-9):.0f} samples/s")

        compiled = self.extract_forward is not self.model
        keys, features, broken = extract_features(
            self.model, self.losses.noting_short_shards(episode, self._take(episode, "extract")), self.device, self.autocast,
            channels_last=self.channels_last, on_batch=on_batch, forward=self.extract_forward,
            pad_to=self.config.data.extract_batch_size if compiled else None,
            augmentation=self.augmentation if self.config.proto.extraction_transform == "train" else None,
        )
        self.losses.count_broken(episode, broken)
        # The training pass's first batches decode while this rank clusters.
        self._start(episode, "train")
        extract_seconds = time.perf_counter() - start
        bar.update(task, description=f"episode {episode}: cluster")
        start = time.perf_counter()
        prototypes = self._cluster(episode, keys, features, phase.use_ext)
        bar.remove_task(task)
        return prototypes, {"extract": extract_seconds, "cluster": time.perf_counter() - start}

    def _cluster(self, episode: int, keys: torch.Tensor, features: dict[str, torch.Tensor], use_ext: bool,
                 source_episode: int | None = None) -> EpisodePrototypes:
        """k-means and PBT of ``features`` (this rank's rows of ``keys``), saved as the episode's prototypes."""
        cfg = self.config
        if use_ext and self.teacher_paths:
            features = {**features, "teacher": run_teacher_rows(self.teacher_paths, keys).to(self.device)}
        prototypes = build_prototypes(episode, keys, features, cfg.proto, cfg.seed)
        prototypes.source_episode = source_episode
        if self.rank == 0:
            save_prototypes(self._prototype_path(episode), prototypes)
        self._barrier()
        return prototypes

    def _records_for(self, episode: int) -> bool:
        """Whether this training pass records features for the prototypes of ``episode`` (single-pass)."""
        if not self.single_pass or episode >= self.config.schedule.episodes:
            return False
        use_teacher = bool(self.teacher_paths)
        if self.config.proto.single_pass_start == "extract" and not episode_phase(self.config, episode - 1, use_teacher).use_proto:
            return False  # the first prototype episode extracts: the warm-up pass began at random weights
        phase = episode_phase(self.config, episode, use_teacher)
        return phase.use_proto and not self._prototype_path(episode).is_file()

    def _check_finite(self, total: torch.Tensor) -> None:
        # The total is the weighted sum of every term: finite exactly when all of them are.
        if not math.isfinite(float(total.detach())):
            raise ProtoclipError(
                f"The loss became non-finite at step {self.global_step}; lower optim.lr or raise schedule.warmup_steps."
            )

    def _lock_visual(self, locked: bool) -> None:
        self.train_model.train()
        if locked:
            # LiT: the image tower is frozen, BatchNorm statistics included.
            self.model.clip.visual.eval()

    def _model_input(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch's images (augmented and normalised on the device) and tokens."""
        images = to_model_input(
            batch["images"], self.model.image_mean, self.model.image_std, self.device,
            self.augmentation, batch.get("augment"), self.channels_last,
        )
        return images, batch["tokens"].to(self.device, non_blocking=True)

    def _step(self, batches: list[dict], phase: Phase, prototypes: EpisodePrototypes | None, protos, online) -> tuple[dict, dict, dict]:
        """One optimiser step on ``batches`` (its micro-batches); returns the loss terms, the outputs
        of the whole step and the learning rates."""
        lrs = set_learning_rates(self.optimizer, self.global_step, self.schedules)

        def labeller(outputs: dict, step_batches: list[dict]) -> dict | None:
            if protos is None:
                return None
            if online is not None:
                teacher = [b["teacher"] for b in step_batches if "teacher" in b]
                return online(outputs, torch.cat(teacher) if teacher else None)
            return prototypes.lookup(torch.cat([b["keys"] for b in step_batches]).to(self.device))

        terms, outputs = self.stepper.step(batches, phase, labeller, protos)
        return terms, outputs, lrs

    def _train_episode(self, episode: int, phase: Phase, prototypes: EpisodePrototypes | None, bar) -> float:
        cfg = self.config
        steps = self.layout.steps[episode]
        done = self.start_batches if episode == self.start_episode else 0
        if episode != self.start_episode:
            self.position = Position.start(cfg.data.workers)
        use_prototypes = prototypes is not None and phase.use_proto
        protos = prototypes.for_loss(self.device) if use_prototypes else None
        online = OnlineLabels(prototypes, self.device) if (use_prototypes and self.single_pass) else None
        record = self._records_for(episode + 1)
        if done == 0 or not record:
            self.recorder.clear()  # a resumed pass keeps what its checkpoint recorded
        batches = self._take(episode, "train")
        self._lock_visual(phase.lock_visual)
        task = bar.add_task(f"episode {episode}: train ({phase.name})", total=steps, completed=done, rate="")
        start = time.perf_counter()
        window_start, window_samples = time.perf_counter(), 0
        global_batch = cfg.data.batch_size * self.world_size * cfg.optim.accum_freq
        steps_of_batches = micro_batches(batches, cfg.optim.accum_freq)
        total = None  # the last step's loss
        while done < steps:
            if (signum := self.stop_agreement.signal()) is not None:
                self._stop(episode, done, signum, total)
            try:
                step_batches = next(steps_of_batches)
            except StopIteration:
                break
            except RuntimeError:
                # A SIGTERM sent to every process ends the loader's workers too (interrupts.py), and
                # the batch they owed never comes: this is still a step boundary. (With several
                # ranks, the others may have their batch: they cannot stop at this step together.)
                if (signum := interrupts.stop_requested()) is not None and self.world_size == 1:
                    self._stop(episode, done, signum, total)
                raise
            for batch in step_batches:
                self.losses.note(episode, batch)
            terms, outputs, lrs = self._step(step_batches, phase, prototypes, protos, online)
            total = terms["total"]
            for batch in step_batches:
                self.position = self.position.advanced(batch)
            if record:
                keys = torch.cat([batch["keys"] for batch in step_batches])
                self.recorder.add(keys, outputs["image_proj"], outputs["text_proj"])
            self.global_step += 1
            done += 1
            window_samples += global_batch
            log_now = done % cfg.logging.log_every_steps == 0 or done == steps
            every = cfg.logging.checkpoint_every_steps
            save_now = every > 0 and self.global_step % every == 0 and done < steps
            if log_now or save_now:
                # Reading the loss waits for the device, so it is checked only where it is read
                # anyway and before any checkpoint (which must never hold non-finite weights).
                self._check_finite(terms["total"])
            if log_now:
                elapsed = time.perf_counter() - window_start
                rate = window_samples / max(elapsed, 1e-9)
                metrics = {"kind": "step", "step": self.global_step, "episode": episode, "phase": phase.name,
                           "lr": lrs.get("rest", 0.0), "lr_visual": lrs.get("visual", 0.0), "samples_per_s": rate}
                unused = {"proto"} if not phase.use_proto else set()
                unused |= {"ext"} if not phase.use_ext else set()
                metrics.update({k: float(v.detach()) for k, v in terms.items() if k not in unused})
                metrics.update(batch_diagnostics(outputs))
                self.metrics.write(metrics)
                bar.update(task, completed=done, rate=f"{rate:.0f} samples/s loss {float(terms['total'].detach()):.3f}")
                window_start, window_samples = time.perf_counter(), 0
            else:
                bar.update(task, completed=done)
            if save_now:
                self._save(episode, done)
        if done < steps:
            raise ProtoclipError(
                f"Episode {episode} gave {done} of its {steps} batches: some of its shards hold no decodable sample "
                f"({self.losses.broken_by_episode.get(episode, 0)} broken samples skipped); repair the data "
                f"set with `protoclip download {cfg.data.dataset} --verify`."
            )
        bar.remove_task(task)
        return time.perf_counter() - start

    def _prototypes_from_recording(self, episode: int) -> float:
        """Single-pass: cluster this pass's recording into the prototypes of ``episode`` (the next one)."""
        start = time.perf_counter()
        keys, features = self.recorder.tensors()
        self.recorder.clear()
        phase = episode_phase(self.config, episode, bool(self.teacher_paths))
        self._cluster(episode, keys, features, phase.use_ext, source_episode=episode - 1)
        return time.perf_counter() - start

    def fit(self) -> dict[str, Any]:
        """Train from ``start_episode`` to the end; returns a summary for the run manifest."""
        cfg = self.config
        use_teacher = bool(self.teacher_paths)
        with progress() as bar:
            if self.start_episode < cfg.schedule.episodes:
                self._start(self.start_episode, self._first_pass(self.start_episode))
            for episode in range(self.start_episode, cfg.schedule.episodes):
                phase = episode_phase(cfg, episode, use_teacher)
                prototypes, seconds = None, {"extract": 0.0, "cluster": 0.0}
                if phase.use_proto:
                    # A stop signal here ends training at once: the newest checkpoint is the end of
                    # the previous episode, where a resume extracts this episode's features again.
                    prototypes, seconds = self._prototypes(episode, phase, bar)
                with interrupts.deferred():  # from the first step to the episode's checkpoint
                    self._train_and_close_episode(episode, phase, prototypes, seconds, bar)
                if episode + 1 < cfg.schedule.episodes and (signum := self.stop_agreement.signal()) is not None:
                    raise interrupts.StopSignal(signum)  # received at the episode's end: its checkpoint is written
        self.metrics.close()
        return {"global_step": self.global_step, "total_steps": self.layout.total_steps, "steps_per_episode": self.layout.steps}

    def _train_and_close_episode(self, episode: int, phase: Phase, prototypes: EpisodePrototypes | None,
                                 seconds: dict[str, float], bar) -> None:
        """The episode's training pass, the next episode's prototypes in single-pass mode, its metrics
        line and its checkpoint."""
        cfg = self.config
        recorded = self._records_for(episode + 1)
        seconds["train"] = self._train_episode(episode, phase, prototypes, bar)
        if episode + 1 < cfg.schedule.episodes:
            # The next pass decodes its first batches during the clustering and the checkpoint.
            self._start(episode + 1, "train" if recorded else self._first_pass(episode + 1))
        if recorded:
            seconds["cluster_next"] = self._prototypes_from_recording(episode + 1)
        record = {
            "kind": "episode", "episode": episode, "step": self.global_step, "phase": phase.name,
            "samples": self.plan.samples(episode), "steps": self.layout.steps[episode],
            "seconds": seconds, **self.losses.episode_record(episode),
        }
        if prototypes is not None:
            record["clusters"] = prototypes.cluster_stats()
        self.metrics.write(record)
        self._save(episode, self.layout.steps[episode])
        info(
            f"episode {episode} ({phase.name}): {self.layout.steps[episode]} steps, "
            f"extract {seconds['extract']:.1f}s, cluster {seconds['cluster'] + seconds.get('cluster_next', 0.0):.1f}s, "
            f"train {seconds['train']:.1f}s"
            + self.losses.episode_words(episode)
        )
