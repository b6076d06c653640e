"""The episodic training loop (method.md section 3): per episode extract, cluster, back-translate,
then one training pass with the labels fixed; warm-up episodes and the LiT finish use the CLIP loss
only. Checkpoints after every episode and every ``logging.checkpoint_every_steps`` steps; a resumed
run continues inside an episode with the same shards, the same prototypes and the batches already
done skipped."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from protoclip_cli import config as config_io
from protoclip_cli.console import info, progress
from protoclip_cli.core import distributed as dist_utils
from protoclip_cli.core.distributed import resolve_device
from protoclip_cli.data.pipeline import LoaderSpec, make_loader
from protoclip_cli.data.teacher_file import teacher_rows
from protoclip_cli.errors import ProtoclipError
from protoclip_cli.recipes import TrainConfig
from protoclip_cli.training import checkpoint as ckpt
from protoclip_cli.training.episodes import (
    EpisodePlan,
    batches_to_skip,
    split_for_rank,
    steps_in_episode,
    worker_batches,
)
from protoclip_cli.training.extraction import extract_features
from protoclip_cli.training.metrics import MetricsLog, batch_diagnostics
from protoclip_cli.training.prototypes import (
    EpisodePrototypes,
    build_prototypes,
    load_prototypes,
    save_prototypes,
)


@dataclass(frozen=True)
class Phase:
    """What an episode trains with."""

    name: str  # "warmup", "proto", "clip" (no prototypes in the recipe) or "lit"
    use_proto: bool
    use_ext: bool
    lock_visual: bool


@dataclass
class RunLayout:
    """Steps per episode and the schedule boundaries of a run (known before the first step)."""

    steps: list[int]
    lit_start: int | None  # first LiT episode, None without a LiT finish

    @property
    def total_steps(self) -> int:
        return int(sum(self.steps))

    def first_step(self, episode: int) -> int:
        return int(sum(self.steps[:episode]))


def lit_start_episode(config: TrainConfig) -> int | None:
    """The first LiT episode (``-1``: the last one), or None when the LiT finish is off."""
    episodes = config.schedule.episodes
    start = config.schedule.lit_start_episode
    if start < 0:
        start = episodes + start
    return start if 0 <= start < episodes else None


def episode_phase(config: TrainConfig, episode: int, use_teacher: bool) -> Phase:
    lit = lit_start_episode(config)
    if lit is not None and episode >= lit:
        return Phase("lit", False, False, True)
    if not config.proto.enabled:
        return Phase("clip", False, False, False)
    if episode < config.schedule.infonce_warmup_episodes:
        return Phase("warmup", False, False, False)
    return Phase("proto", True, use_teacher, False)


def run_layout(config: TrainConfig, plan: EpisodePlan, world_size: int) -> RunLayout:
    steps = [
        steps_in_episode(plan, e, world_size, config.data.workers, config.data.batch_size)
        for e in range(config.schedule.episodes)
    ]
    return RunLayout(steps, lit_start_episode(config))


def _autocast_factory(config: TrainConfig, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    bf16 = config.precision == "bf16" or (config.precision == "auto" and device.type == "cuda")
    if not bf16:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


def _is_convolutional(arch: str) -> bool:
    lowered = arch.lower()
    return lowered.startswith("rn") or "convnext" in lowered


@dataclass
class Trainer:
    """One training run in one process (one rank of a torchrun launch)."""

    config: TrainConfig
    run_dir: Path
    plan: EpisodePlan
    shard_paths: dict[str, Path]
    teacher_path: Path | None
    resume_from: Path | None = None
    stats: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from protoclip_cli.core.losses import ProtoCLIPLoss
        from protoclip_cli.core.model import build_model
        from protoclip_cli.core.optim import build_optimizer, cosine_schedule, parameter_groups

        cfg = self.config
        self.rank = dist_utils.rank()
        self.world_size = dist_utils.world_size()
        self.device = resolve_device(cfg.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            # As open_clip_train: TF32 matmuls and cuDNN autotuning (fixed input shapes).
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = True
        self.autocast = _autocast_factory(cfg, self.device)
        self.channels_last = self.device.type == "cuda" and cfg.model.channels_last and _is_convolutional(cfg.model.arch)
        self.layout = run_layout(cfg, self.plan, self.world_size)

        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model)
        if self.world_size > 1 and self.device.type == "cuda":
            # The heads' BatchNorm then normalises over the global batch, as one process would.
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model.to(self.device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self.model = model
        self.optimizer = build_optimizer(parameter_groups(model, cfg.optim.weight_decay), cfg.optim, fused=self.device.type in ("cuda", "cpu"))
        total = self.layout.total_steps
        lit_step = self.layout.first_step(self.layout.lit_start) if self.layout.lit_start is not None else None
        self.schedules = {
            "rest": cosine_schedule(cfg.optim.lr, cfg.schedule.warmup_steps, total),
            "visual": cosine_schedule(cfg.optim.lr, cfg.schedule.warmup_steps, total, end_step=lit_step),
        }
        self.loss_fn = ProtoCLIPLoss(
            cfg.loss.w_clip, cfg.loss.w_proto, cfg.loss.w_ext, cfg.loss.target_temperature, cfg.loss.pbt
        )
        self.train_model: torch.nn.Module = model
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            # Warm-up and LiT episodes leave the heads and the prototype temperature without gradients.
            self.train_model = DistributedDataParallel(
                model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=model.has_heads,
            )
        if cfg.model.compile and self.device.type == "cuda":
            self.train_model = torch.compile(self.train_model)
        self.metrics = MetricsLog(self.run_dir, enabled=self.rank == 0, tensorboard=cfg.logging.tensorboard)
        self.global_step = 0
        self.start_episode = 0
        self.start_batches = 0
        if self.resume_from is not None:
            self._restore(self.resume_from)

    # -- state ------------------------------------------------------------------------------------
    def _restore(self, path: Path) -> None:
        state = ckpt.load_checkpoint(path, map_location=self.device)
        if state["world_size"] != self.world_size or state["workers"] != self.config.data.workers:
            raise ProtoclipError(
                f"Checkpoint {path.name} was written by {state['world_size']} process(es) x {state['workers']} "
                f"data worker(s); resume with the same launch, or start over with --no-resume."
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        ckpt.restore_rng_state({k: (v.cpu() if isinstance(v, torch.Tensor) else [t.cpu() for t in v]) for k, v in state["rng"].items()})
        self.global_step = int(state["global_step"])
        episode, done = int(state["episode"]), int(state["batches_done"])
        if done >= self.layout.steps[episode]:
            episode, done = episode + 1, 0
        self.start_episode, self.start_batches = episode, done
        self.metrics.truncate_after(self.global_step, episode)
        info(f"Resuming from {path.name}: episode {episode}, {done} of its batches done, step {self.global_step}.")

    def _save(self, episode: int, batches_done: int) -> Path | None:
        path = None
        if self.rank == 0:
            state = {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "episode": episode,
                "batches_done": batches_done,
                "steps_in_episode": self.layout.steps[episode],
                "global_step": self.global_step,
                "total_steps": self.layout.total_steps,
                "world_size": self.world_size,
                "workers": self.config.data.workers,
                "config": config_io.to_dict(self.config),
                "rng": ckpt.rng_state(),
            }
            path = ckpt.save_checkpoint(self.run_dir, state, self.config.logging.keep_checkpoints)
        self._barrier()
        return path

    def _barrier(self) -> None:
        if dist_utils.is_distributed():
            torch.distributed.barrier()

    # -- episodes ---------------------------------------------------------------------------------
    def _rank_shards(self, episode: int) -> list[str]:
        return split_for_rank(self.plan.episodes[episode], self.rank, self.world_size)

    def _spec(self, episode: int, train: bool, skip: list[int] | None = None) -> LoaderSpec:
        cfg = self.config
        return LoaderSpec(
            shards=[self.shard_paths[s] for s in self._rank_shards(episode)],
            batch_size=cfg.data.batch_size if train else cfg.data.extract_batch_size,
            image_size=self.model.image_size,
            tokenizer_arch=cfg.model.arch,
            train=train,
            augmentation=cfg.data.augmentation,
            seed=cfg.seed,
            episode=episode,
            rank=self.rank,
            shuffle_buffer=cfg.data.shuffle_buffer,
            skip_batches=skip or [],
        )

    def _episode_dir(self, episode: int) -> Path:
        return self.run_dir / "episodes" / str(episode)

    def _prototypes(self, episode: int, phase: Phase, bar) -> tuple[EpisodePrototypes, dict[str, float]]:
        """Load the episode's prototypes (a resumed run) or extract, cluster and save them."""
        cfg = self.config
        path = self._episode_dir(episode) / "prototypes.h5"
        if path.is_file():
            return load_prototypes(path), {"extract": 0.0, "cluster": 0.0}
        start = time.perf_counter()
        expected = sum(self.plan.counts[s] for s in self._rank_shards(episode))
        task = bar.add_task(f"episode {episode}: extract", total=expected, rate="")
        done = [0, 0.0]

        def on_batch(samples: int, seconds: float) -> None:
            done[0] += samples
            done[1] += seconds
            bar.update(task, advance=samples, rate=f"{done[0] / max(done[1], 1e-9):.0f} samples/s")

        keys, features, broken = extract_features(
            self.model, self._spec(episode, train=False), cfg.data.workers, self.device, self.autocast,
            channels_last=self.channels_last, on_batch=on_batch,
        )
        self.stats["broken"] = self.stats.get("broken", 0) + broken
        if phase.use_ext and self.teacher_path is not None:
            features["teacher"] = teacher_rows(self.teacher_path, keys).to(self.device)
        extract_seconds = time.perf_counter() - start
        bar.update(task, description=f"episode {episode}: cluster")
        start = time.perf_counter()
        prototypes = build_prototypes(
            episode, keys, features, cfg.proto.k, cfg.proto.teacher_k or cfg.proto.k,
            cfg.proto.iterations, cfg.proto.restarts, cfg.seed, cfg.proto.backend,
        )
        if self.rank == 0:
            save_prototypes(path, prototypes)
        self._barrier()
        bar.remove_task(task)
        return prototypes, {"extract": extract_seconds, "cluster": time.perf_counter() - start}

    def _check_finite(self, total: torch.Tensor) -> None:
        # The total is the weighted sum of every term: finite exactly when all of them are.
        if not math.isfinite(float(total.detach())):
            raise ProtoclipError(
                f"The loss became non-finite at step {self.global_step}; lower optim.lr or raise schedule.warmup_steps."
            )

    def _undo_world_size_on_temperatures(self) -> None:
        # A temperature scales the logits of the whole global batch on every rank, so each rank's
        # gradient for it is already the global one: only the features needed the world-size factor.
        for scale in (self.model.logit_scale, self.model.logit_scale_proto):
            if scale is not None and scale.grad is not None:
                scale.grad.div_(self.world_size)

    def _lock_visual(self, locked: bool) -> None:
        self.train_model.train()
        if locked:
            # LiT: the image tower is frozen, BatchNorm statistics included.
            self.model.clip.visual.eval()

    def _train_episode(self, episode: int, phase: Phase, prototypes: EpisodePrototypes | None, bar) -> float:
        from protoclip_cli.core.optim import set_learning_rates
        from protoclip_cli.data.transforms import normalize

        cfg = self.config
        steps = self.layout.steps[episode]
        done = self.start_batches if episode == self.start_episode else 0
        per_worker = worker_batches(self.plan.counts, self._rank_shards(episode), cfg.data.workers, cfg.data.batch_size)
        spec = self._spec(episode, train=True, skip=batches_to_skip(per_worker, done))
        protos = prototypes.for_loss(self.device) if (prototypes is not None and phase.use_proto) else None
        self._lock_visual(phase.lock_visual)
        task = bar.add_task(f"episode {episode}: train ({phase.name})", total=steps, completed=done, rate="")
        start = time.perf_counter()
        window_start, window_samples = time.perf_counter(), 0
        global_batch = cfg.data.batch_size * self.world_size
        for batch in make_loader(spec, cfg.data.workers, pin_memory=self.device.type == "cuda"):
            if done >= steps:
                break
            self.stats["broken"] = self.stats.get("broken", 0) + int(batch["broken"])
            lrs = set_learning_rates(self.optimizer, self.global_step, self.schedules)
            images = normalize(batch["images"], self.model.image_mean, self.model.image_std, self.device, self.channels_last)
            tokens = batch["tokens"].to(self.device, non_blocking=True)
            labels = prototypes.lookup(batch["keys"].to(self.device)) if protos is not None else None
            with self.autocast():
                outputs = self.train_model(images, tokens)
            terms = self.loss_fn(outputs, labels=labels, protos=protos, use_proto=phase.use_proto, use_ext=phase.use_ext)
            self.optimizer.zero_grad(set_to_none=True)
            # Every term is a global-batch loss whose gradient reaches only this rank's features, and
            # DDP averages over ranks: scaling by the world size makes the update that of one process
            # seeing the whole global batch.
            (terms["total"] * self.world_size).backward()
            if self.world_size > 1:
                self._undo_world_size_on_temperatures()
            if cfg.optim.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
            self.optimizer.step()
            self.model.clamp_temperatures()
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
                record = {"kind": "step", "step": self.global_step, "episode": episode, "phase": phase.name,
                          "lr": lrs.get("rest", 0.0), "lr_visual": lrs.get("visual", 0.0), "samples_per_s": rate}
                unused = {"proto"} if not phase.use_proto else set()
                unused |= {"ext"} if not phase.use_ext else set()
                record.update({k: float(v.detach()) for k, v in terms.items() if k not in unused})
                record.update(batch_diagnostics(outputs))
                self.metrics.write(record)
                bar.update(task, completed=done, rate=f"{rate:.0f} samples/s loss {float(terms['total'].detach()):.3f}")
                window_start, window_samples = time.perf_counter(), 0
            else:
                bar.update(task, completed=done)
            if save_now:
                self._save(episode, done)
            if done >= steps:
                break
        if done < steps:
            raise ProtoclipError(
                f"Episode {episode} yielded {done} of its {steps} batches (undecodable samples?); "
                "rerun `protoclip download` for this data set."
            )
        bar.remove_task(task)
        return time.perf_counter() - start

    def fit(self) -> dict[str, Any]:
        """Train from ``start_episode`` to the end; returns a summary for the run manifest."""
        cfg = self.config
        use_teacher = self.teacher_path is not None
        with progress() as bar:
            for episode in range(self.start_episode, cfg.schedule.episodes):
                phase = episode_phase(cfg, episode, use_teacher)
                prototypes, seconds = None, {"extract": 0.0, "cluster": 0.0}
                if phase.use_proto:
                    prototypes, seconds = self._prototypes(episode, phase, bar)
                seconds["train"] = self._train_episode(episode, phase, prototypes, bar)
                record = {
                    "kind": "episode", "episode": episode, "step": self.global_step, "phase": phase.name,
                    "samples": self.plan.samples(episode), "steps": self.layout.steps[episode],
                    "seconds": seconds, "broken": self.stats.get("broken", 0),
                }
                if prototypes is not None:
                    record["clusters"] = prototypes.cluster_stats()
                self.metrics.write(record)
                self._save(episode, self.layout.steps[episode])
                info(
                    f"episode {episode} ({phase.name}): {self.layout.steps[episode]} steps, "
                    f"extract {seconds['extract']:.1f}s, cluster {seconds['cluster']:.1f}s, train {seconds['train']:.1f}s"
                )
        self.metrics.close()
        return {"global_step": self.global_step, "total_steps": self.layout.total_steps, "steps_per_episode": self.layout.steps}
