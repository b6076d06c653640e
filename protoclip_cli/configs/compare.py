"""``protoclip compare``'s config and its variants: CLIP, ProtoCLIP, its ablations and levers, OpenCLIP's trainer."""

from __future__ import annotations

from dataclasses import dataclass

from protoclip_cli.config import option, require

BASELINE = "clip"


# The CLIP baseline: the same trainer without heads, prototypes or LiT finish (episodes only split the data).
_CLIP = ("proto.enabled=false", "model.heads=false", "proto.teacher=''", "schedule.lit_start_episode=1000000")


@dataclass(frozen=True)
class Variant:
    """A row of the table: the base recipe with ``overrides``, trained by this project or by the peer."""

    description: str
    overrides: tuple[str, ...] = ()
    # Samples per episode instead of the recipe's (0: the whole data set); the number of episodes
    # follows, so that every variant sees the same samples.
    episode_size: int | None = None
    peer: bool = False  # trained by OpenCLIP's own trainer (training/open_clip_peer.py)


VARIANTS: dict[str, Variant] = {
    "clip": Variant("the CLIP baseline: no heads, no prototypes, no LiT finish (episodes only split the data)", _CLIP),
    "open_clip_train": Variant(
        "OpenCLIP's own trainer (open_clip_train) with the clip variant's settings, on the same shards", _CLIP, peer=True),
    "protoclip": Variant("ProtoCLIP as the recipe: extraction pass of training views, k-means, PBT, external teacher, soft targets"),
    "eval-extraction": Variant("ProtoCLIP clustering centre crops (eval transforms) instead of training views",
                               ("proto.extraction_transform='eval'",)),
    # The external-teacher loss is defined with PBT only (method.md section 4): without PBT it goes too.
    "no-pbt": Variant("without Prototypical Back Translation (and so without the teacher loss)", ("loss.pbt=false", "proto.teacher=''")),
    "no-teacher": Variant("without the external teacher", ("proto.teacher=''",)),
    "hard-targets": Variant("one-hot prototype targets (tau = 0)", ("loss.target_temperature=0.0",)),
    "single-pass": Variant("single-pass mode: one extraction pass after the warm-up, then recorded features and online labels",
                           ("proto.single_pass=true",)),
    "single-pass-recorded": Variant("single-pass whose first prototypes cluster the warm-up pass's recording (no extraction at all)",
                                    ("proto.single_pass=true", "proto.single_pass_start='recorded'")),
    "k64": Variant("64 image, text and teacher prototypes per episode", ("proto.k=64", "proto.teacher_k=64")),
    "k128": Variant("128 image, text and teacher prototypes per episode", ("proto.k=128", "proto.teacher_k=128")),
    "warmup2": Variant("two InfoNCE warm-up episodes", ("schedule.infonce_warmup_episodes=2",)),
    "warmup3": Variant("three InfoNCE warm-up episodes", ("schedule.infonce_warmup_episodes=3",)),
    "lit2": Variant("a LiT finish of two episodes", ("schedule.lit_start_episode=-2",)),
    "no-lit": Variant("no LiT finish: the image tower trains to the end", ("schedule.lit_start_episode=1000000",)),
    "w-proto-0.5": Variant("prototype loss weight 0.5", ("loss.w_proto=0.5",)),
    "episode-2048": Variant("episodes of 2048 samples (half as many)", episode_size=2048),
    "episode-all": Variant("episodes of the whole data set", episode_size=0),
}


DEFAULT_VARIANTS = ("clip", "open_clip_train", "protoclip", "no-pbt", "no-teacher", "hard-targets", "single-pass")


CURVE_METRICS = ("zeroshot", "linear-probe")  # scored on intermediate checkpoints


def _variant_seeds(entries: tuple[str, ...]) -> dict[str, int]:
    """``--variant-seeds clip=5`` entries as a dict; a malformed entry is a ConfigError."""
    found: dict[str, int] = {}
    for entry in entries:
        name, _, count = entry.partition("=")
        require(name in VARIANTS and count.isdigit() and int(count) >= 1,
                f"--variant-seeds {entry!r} is not VARIANT=N with a known variant and N >= 1 (e.g. clip=5).")
        found[name] = int(count)
    return found


@dataclass(frozen=True)
class CompareConfig:
    name: str = option("compare", "Name of the comparison: runs are runs/<name>-<variant>-s<seed>, results compare/<name>/.")
    recipe: str = option("synthetic", "Base ProtoCLIP recipe every variant overrides: a file or a shipped recipe's name.")
    variants: tuple[str, ...] = option(DEFAULT_VARIANTS, f"Variants to train (the table's rows): {', '.join(VARIANTS)}.")
    seeds: int = option(3, "Seeds per variant (0 .. seeds-1); the table's spread and noise rule need at least 2.")
    variant_seeds: tuple[str, ...] = option(
        (), "Another number of seeds for a variant, VARIANT=N (e.g. --variant-seeds clip=5 --variant-seeds protoclip=5)."
    )
    episodes: int = option(
        12, "Episodes of every run (0 = the recipe's): with the recipe's data.episode_size and batch this fixes the samples seen."
    )
    recipe_set: tuple[str, ...] = option((), "Recipe override for every variant, e.g. --recipe-set optim.lr=2e-3.")
    curves: tuple[str, ...] = option(
        ("clip", "protoclip"),
        "Variants whose intermediate checkpoints are scored for the learning curves and the samples each needs to "
        "reach the baseline's final accuracy.",
    )
    curve_every: int = option(
        2, "Score a checkpoint every n episodes of the base recipe's size (the samples of n of them; the last always)."
    )
    device: str = option("auto", "auto, cpu, cuda or cuda:N (training and evaluation).")
    eval_workers: int = option(1, "Data-loader workers of the evaluations.")
    eval_plots: bool = option(
        False, "Also draw each run's evaluation plots (t-SNE maps, sample grids); the comparison draws its curves anyway."
    )

    def __post_init__(self) -> None:
        unknown = [v for v in (*self.variants, *self.curves) if v not in VARIANTS]
        require(not unknown, f"Unknown variant '{unknown[0] if unknown else ''}'; choose from {', '.join(VARIANTS)}.")
        require(BASELINE in self.variants, f"--variants must include the baseline '{BASELINE}': the table's differences are to it.")
        require(len(set(self.variants)) == len(self.variants), "--variants names a variant twice; name each once.")
        require(set(self.curves) <= set(self.variants), "--curves names a variant that --variants does not train.")
        peers = [v for v in self.curves if VARIANTS[v].peer]
        require(not peers, f"--curves cannot score {peers[0] if peers else ''}: open_clip_train keeps only its final checkpoint here.")
        require(self.seeds >= 1, f"--seeds is {self.seeds}; train at least one seed (3 for a spread).")
        extra = _variant_seeds(self.variant_seeds)
        require(set(extra) <= set(self.variants), "--variant-seeds names a variant that --variants does not train.")
        require(self.episodes >= 0, f"--episodes is {self.episodes}; use 0 (the recipe's) or more.")
        require(self.curve_every >= 1, f"--curve-every is {self.curve_every}; use 1 (every episode) or more.")
        require(self.eval_workers >= 0, f"--eval-workers is {self.eval_workers}; use 0 or more.")

    def seeds_of(self, variant: str) -> int:
        return _variant_seeds(self.variant_seeds).get(variant, self.seeds)
