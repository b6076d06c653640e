"""Episodes over shards: which shards each episode reads, and how many steps that makes.

Webdataset shards are read sequentially, so an episode is a random subset of whole shards totalling
about ``episode_size`` samples. Shards are drawn from a seeded permutation so every shard is used
once before any is reused; ``episode_size = 0`` makes every episode the whole data set (the CLIP
baseline's epochs). The plan is saved in the run folder, so a resumed run reads the same shards.

Steps per episode follow from the per-shard sample counts: shards are split over ranks
(``shards[rank::world]``) and then over data-loader workers (``data/pipeline.py``), each worker
drops its last partial batch (so every rank's batches have the same size for the all-gathers), and
every rank runs the same number of steps (the smallest rank's). The phase of each episode (warm-up,
prototypes, plain CLIP, LiT finish) follows from the recipe alone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from protoclip_cli.artifacts import write_json
from protoclip_cli.configs.train import TrainConfig
from protoclip_cli.core.checkpoint import TrainState
from protoclip_cli.data.pipeline import split_for_rank, worker_batches


@dataclass(frozen=True)
class EpisodePlan:
    """Shard ids of every episode (in reading order), the per-shard sample counts and, for several
    data sets, each shard's upsampling weight."""

    episodes: list[list[str]]
    counts: dict[str, int]
    seed: int
    episode_size: int
    weights: dict[str, float] | None = None

    def samples(self, episode: int) -> int:
        return sum(self.counts[s] for s in self.episodes[episode])

    def to_json(self) -> dict:
        data = {"seed": self.seed, "episode_size": self.episode_size, "counts": self.counts, "episodes": self.episodes}
        if self.weights is not None:
            data["weights"] = self.weights
        return data

    @classmethod
    def from_json(cls, data: dict) -> "EpisodePlan":
        weights = {k: float(v) for k, v in data["weights"].items()} if "weights" in data else None
        return cls(data["episodes"], {k: int(v) for k, v in data["counts"].items()}, data["seed"], data["episode_size"], weights)

    def save(self, path: Path) -> None:
        write_json(path, self.to_json())

    @classmethod
    def load(cls, path: Path) -> "EpisodePlan":
        return cls.from_json(json.loads(Path(path).read_text()))


def plan_episodes(counts: dict[str, int], episodes: int, episode_size: int, seed: int,
                  weights: dict[str, float] | None = None) -> EpisodePlan:
    """Draw ``episodes`` shard subsets of about ``episode_size`` samples each.

    A shard is added while that brings the episode's total closer to ``episode_size`` (at least one
    shard per episode). Shards come from a queue refilled with a fresh seeded permutation of a round
    when no queued shard is left that the episode does not already hold; shards already in the
    current episode go to the back of the new round, so an episode never reads a shard twice.

    Without ``weights`` a round holds every shard once, so every shard is used once before any is
    reused. ``weights`` (shard -> upsampling factor, OpenCLIP's ``::`` weights) make a round hold a
    shard ``w / min(w)`` times, the fractional part drawn: a shard of weight 2 is read twice as often
    as one of weight 1. Equal weights plan exactly as none.
    """
    names = sorted(counts)
    rng = np.random.default_rng(seed)
    total = sum(counts.values())
    repeats = _repeats(names, weights)
    plan: list[list[str]] = []
    queue: list[str] = []
    for _ in range(episodes):
        if episode_size <= 0 or episode_size >= total:
            plan.append([names[i] for i in rng.permutation(len(names))])
            continue
        chosen: list[str] = []
        size = 0
        while len(chosen) < len(names):
            pick = next((i for i, s in enumerate(queue) if s not in chosen), None)
            if pick is None:
                fresh = _round(names, repeats, rng)
                queue += [s for s in fresh if s not in chosen] + [s for s in fresh if s in chosen]
                continue
            candidate = queue[pick]
            if chosen and abs(size + counts[candidate] - episode_size) >= abs(size - episode_size):
                break
            chosen.append(queue.pop(pick))
            size += counts[candidate]
        plan.append(chosen)
    return EpisodePlan(plan, dict(counts), seed, episode_size, dict(weights) if weights is not None else None)


def _repeats(names: list[str], weights: dict[str, float] | None) -> "np.ndarray | None":
    """Each shard's weight relative to the smallest (>= 1), or None when all are equal."""
    if weights is None:
        return None
    values = np.array([float(weights[n]) for n in names])
    if values.min() <= 0:
        raise ValueError("shard weights must be positive")
    relative = values / values.min()
    return None if np.all(relative == 1.0) else relative


def _round(names: list[str], repeats: "np.ndarray | None", rng: np.random.Generator) -> list[str]:
    """One round of the queue: every shard ``floor(r)`` times plus once more with probability ``r - floor(r)``, shuffled."""
    if repeats is None:
        return [names[i] for i in rng.permutation(len(names))]
    whole = np.floor(repeats).astype(int)
    fraction = repeats - whole
    if np.any(fraction > 0):
        whole = whole + (rng.random(len(names)) < fraction)
    pool = [name for name, n in zip(names, whole) for _ in range(n)]
    return [pool[i] for i in rng.permutation(len(pool))]


def steps_in_episode(plan: EpisodePlan, episode: int, world_size: int, workers: int, batch_size: int) -> int:
    """Training steps of an episode: the fewest full batches any rank has."""
    shards = plan.episodes[episode]
    return min(
        sum(worker_batches(plan.counts, split_for_rank(shards, r, world_size), workers, batch_size))
        for r in range(world_size)
    )


# -- what each episode trains with ----------------------------------------------------------------


@dataclass(frozen=True)
class Phase:
    """What an episode trains with."""

    name: str  # "warmup", "proto", "clip" (no prototypes in the recipe) or "lit"
    use_proto: bool
    use_ext: bool
    lock_visual: bool


@dataclass
class RunLayout:
    """Steps per episode and the schedule boundaries of a run (known before the first step).

    The learning-rate schedules are laid out on the steps of the run's first launch
    (``schedule_steps``; None: ``steps`` themselves). A run resumed on another number of ranks has
    other steps in its remaining episodes; each episode then keeps its span of the schedule, spread
    evenly over its steps (:meth:`schedule_positions`), so the learning rate follows the episodes,
    not the step count, and the LiT start stays at its episode.
    """

    steps: list[int]
    lit_start: int | None  # first LiT episode, None without a LiT finish
    schedule_steps: list[int] | None = None

    @property
    def total_steps(self) -> int:
        return int(sum(self.steps))

    def first_step(self, episode: int) -> int:
        return int(sum(self.steps[:episode]))

    @property
    def schedule(self) -> list[int]:
        return list(self.schedule_steps if self.schedule_steps is not None else self.steps)

    def schedule_first_step(self, episode: int) -> int:
        return int(sum(self.schedule[:episode]))

    def schedule_positions(self) -> np.ndarray:
        """Each step's position on the schedule's step axis: step ``i`` of an episode of ``n`` steps
        whose schedule span is ``m`` steps sits at its span's start plus ``i * m / n`` (exactly
        ``0, 1, 2, ...`` when the run keeps its first layout)."""
        positions = [self.schedule_first_step(e) + (i * span) / n
                     for e, (n, span) in enumerate(zip(self.steps, self.schedule)) for i in range(n)]
        return np.asarray(positions, dtype=np.float64)


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
    """Optimiser steps per episode: its batches per rank, in whole steps of ``optim.accum_freq`` micro-batches."""
    steps = [
        steps_in_episode(plan, e, world_size, config.data.workers, config.data.batch_size) // config.optim.accum_freq
        for e in range(config.schedule.episodes)
    ]
    return RunLayout(steps, lit_start_episode(config))


@dataclass(frozen=True)
class ResumePoint:
    """Where a checkpoint stands, and the layout of the launch that wrote it."""

    episode: int
    batches_done: int  # steps done in that episode
    world_size: int
    steps: list[int]  # steps per episode of the run so far
    schedule_steps: list[int]

    @property
    def next_episode(self) -> tuple[int, int]:
        """(episode, steps done in it) where training continues: past the episode when it is finished."""
        if self.batches_done >= self.steps[self.episode]:
            return self.episode + 1, 0
        return self.episode, self.batches_done

    def restarts_episode(self, world_size: int) -> bool:
        """Resumed on another number of ranks inside an episode: its training pass starts again (the
        ranks' shards and data-loader positions of the old launch do not map onto the new one)."""
        return world_size != self.world_size and self.next_episode[1] > 0


def resume_point(state: TrainState, config: TrainConfig, plan: EpisodePlan) -> ResumePoint:
    """Where ``state`` stands; a checkpoint of an older version (no layout in it) had its plan's layout."""
    steps = state.steps_per_episode or run_layout(config, plan, state.world_size).steps
    return ResumePoint(state.episode, state.batches_done, state.world_size, list(steps),
                       list(state.schedule_steps or steps))


def resumed_layout(config: TrainConfig, plan: EpisodePlan, world_size: int, point: ResumePoint) -> RunLayout:
    """The layout of a run resumed at ``point`` on ``world_size`` ranks.

    On the same number of ranks it is the layout the checkpoint was written with. On another, the
    episodes already trained keep their steps and the remaining ones are re-split over the new ranks
    (the same plan, the same shards); an episode the resume restarts keeps the steps it did and gets a
    whole training pass of the new launch on top. The schedule stays laid out on the first launch's steps.
    """
    if world_size == point.world_size:
        return RunLayout(list(point.steps), lit_start_episode(config), list(point.schedule_steps))
    episode, done = point.next_episode
    fresh = run_layout(config, plan, world_size).steps
    steps = list(point.steps[:episode]) + fresh[episode:]
    if done and episode < len(steps):
        steps[episode] += done
    return RunLayout(steps, lit_start_episode(config), list(point.schedule_steps))
