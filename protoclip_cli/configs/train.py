"""The training recipe: one frozen dataclass per concern, mapped one to one onto TOML tables.

``recipes/*.toml`` are instances of :class:`TrainConfig`. A plain CLIP baseline is the same
recipe with ``proto.enabled = false``, ``model.heads = false`` and ``data.episode_size = 0``.
Field help texts are the documentation of each key (``protoclip train --explain`` prints them).
:meth:`TrainConfig.__post_init__` checks what types cannot (a recipe that needs heads has them, ...),
so an inconsistent recipe fails when it is loaded, naming the key to change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Literal

from protoclip_cli.config import check_choices, option, require
from protoclip_cli.names import is_valid_name, name_error


@dataclass(frozen=True)
class DataConfig:
    dataset: str = option("synthetic", "Data set name under <workspace>/datasets (made by `protoclip download`).")
    datasets: tuple[str, ...] = option(
        (),
        "Several data sets trained together (e.g. [\"cc3m\", \"cc12m\"]), each under <workspace>/datasets with "
        "its own teacher file; episodes are drawn over the union. Set, it replaces data.dataset; sample keys get "
        "the data set's position in their high digits (docs/training.md).",
    )
    weights: tuple[float, ...] = option(
        (),
        "Upsampling factors of data.datasets (OpenCLIP's '::' syntax): a data set of weight 2 gives its shards to "
        "episodes twice as often as one of weight 1; only ratios count. Empty: all 1.",
    )
    split: str = option("train", "Split of the data set(s) to train on.")
    episode_size: int = option(
        1024, "Samples per episode (rounded to whole shards). 0: one episode is the whole data set (CLIP baseline)."
    )
    batch_size: int = option(64, "Batch size per process (the global batch is this times the world size).")
    workers: int = option(2, "Data-loader worker processes per training process.")
    shuffle_buffer: int = option(1000, "Samples in the training shuffle buffer.")
    augmentation: Literal["none", "rrc", "light"] = option(
        "light",
        "Train transforms: 'rrc' = RandomResizedCrop(scale 0.9-1) (reference CLIP); 'light' = RRC(0.5-1), "
        "h-flip, colour jitter, grayscale, blur (reference ProtoCLIP); 'none' = resize and centre crop.",
    )
    extract_batch_size: int = option(256, "Batch size of the per-episode feature extraction pass.")


@dataclass(frozen=True)
class ModelConfig:
    arch: str = option("protoclip-tiny", "OpenCLIP architecture name (RN50, ViT-B-32, ...) or a tiny config of this package.")
    pretrained: str = option(
        "",
        "Starting weights of the towers, anything open_clip.create_model accepts: an OpenCLIP checkpoint file, a "
        "pretrained tag of model.arch (openai, laion2b_s34b_b79k, ...), hf-hub:ORG/NAME or local-dir:PATH (an "
        "OpenCLIP hub folder, e.g. from `protoclip export --format hf`); '' = random. The projection heads always "
        "start fresh.",
    )
    heads: bool = option(True, "Projection heads for the prototype losses (false for the CLIP baseline).")
    projection_dim: int = option(128, "Output size of the projection heads.")
    projection_hidden_dim: int = option(2048, "Hidden size of the projection heads.")
    projection_n_layers: int = option(1, "Hidden Linear-BatchNorm-ReLU blocks per head (0: one Linear).")
    compile: bool = option(False, "torch.compile the model (CUDA only).")
    channels_last: bool = option(True, "channels_last memory format for convolutional image towers on CUDA.")
    grad_checkpointing: bool = option(
        False,
        "Gradient checkpointing of both towers (open_clip's set_grad_checkpointing): activations of each "
        "block are recomputed in the backward pass instead of kept, less memory for about a third more compute.",
    )
    sync_batchnorm: Literal["none", "heads", "all"] = option(
        "none",
        "Under DDP on CUDA, which BatchNorm layers normalise over the global batch: 'none' (per GPU, as the "
        "reference), 'heads' (the projection heads'), 'all' (also the image tower's). CPU runs keep them per process.",
    )


@dataclass(frozen=True)
class ProtoConfig:
    enabled: bool = option(True, "Cluster every episode and train with the prototype losses (false: plain CLIP).")
    k: int = option(20000, "Prototypes (k-means clusters) per modality per episode.")
    iterations: int = option(20, "k-means iterations.")
    restarts: int = option(3, "k-means restarts; the lowest objective is kept.")
    init: Literal["random", "kmeans++"] = option(
        "random", "k-means initialisation: random points (reference) or k-means++ (better for small k, k sequential steps)."
    )
    backend: Literal["auto", "torch", "faiss"] = option(
        "auto", "k-means backend; auto = torch (CPU, CUDA, across ranks: seeded CPU runs repeat bit for bit); "
        "faiss: one process, its results vary with its BLAS threads and CPU kernels."
    )
    teacher: str = option(
        "",
        "External teacher: model slug of datasets/<dataset>/teacher/<slug>.h5, one file per data set of the run "
        "('' = no external teacher).",
    )
    teacher_k: int = option(0, "Clusters of the teacher features (0 = same as k).")
    extraction_transform: Literal["train", "eval"] = option(
        "train",
        "Images of the extraction pass: 'train' = one view of each sample through the run's training transform "
        "(data.augmentation), as the reference's extraction loop reads its training data; 'eval' = resize and "
        "centre crop (docs/training.md).",
    )
    single_pass: bool = option(
        False,
        "Single-pass mode: no extraction pass; an episode's prototypes are clustered from the features its "
        "previous training pass recorded, and samples are labelled online with their nearest prototypes "
        "(false: the reference's extraction pass; see docs/training.md).",
    )
    single_pass_start: Literal["extract", "recorded"] = option(
        "extract",
        "Single-pass mode's first prototype episode: 'extract' = clustered from one extraction pass of the model "
        "the warm-up left; 'recorded' = from the features the warm-up pass recorded while it trained from random "
        "weights.",
    )


@dataclass(frozen=True)
class LossConfig:
    contrastive: Literal["infonce", "sigmoid"] = option(
        "infonce",
        "Image-text loss: 'infonce' = CLIP's softmax InfoNCE (reference); 'sigmoid' = SigLIP's pairwise sigmoid "
        "loss with a learnable logit bias (scale 10 and bias -10 at the start), over the global batch.",
    )
    w_clip: float = option(1.0, "Weight of the image-text (CLIP) loss, InfoNCE or sigmoid.")
    w_proto: float = option(1.0, "Weight of the prototype loss.")
    w_ext: float = option(1.0, "Weight of the external-teacher loss.")
    target_temperature: float = option(0.01, "Soft-target temperature tau; 0 gives one-hot targets.")
    pbt: bool = option(True, "Prototypical Back Translation: targets built in the student's own space.")


@dataclass(frozen=True)
class OptimConfig:
    lr: float = option(5e-5, "Peak learning rate (after warm-up).")
    weight_decay: float = option(0.5, "AdamW weight decay (not on gains, biases, norms, temperatures, heads).")
    beta1: float = option(0.9, "AdamW beta1.")
    beta2: float = option(0.999, "AdamW beta2.")
    eps: float = option(1e-8, "AdamW epsilon.")
    grad_clip: float = option(10.0, "Gradient-norm clipping (0 = off).")
    accum_freq: int = option(
        1,
        "Micro-batches of data.batch_size per optimiser step (OpenCLIP's --accum-freq): each is first run "
        "without gradients and its features cached, then recomputed with gradients, so every loss covers "
        "the whole accumulated batch (data.batch_size x accum_freq x world size) at one micro-batch's "
        "activation memory, for one extra forward pass. 1: off.",
    )
    ddp_gradients: Literal["reference", "global-batch"] = option(
        "reference",
        "Gradients under DDP: 'reference' = DDP's mean over ranks of each rank's gradient of the global-batch "
        "loss, as the reference (feature gradients 1/world size of the global-batch loss's); 'global-batch' = "
        "the gradient one process with the whole global batch would get, whatever the world size.",
    )


@dataclass(frozen=True)
class ScheduleConfig:
    episodes: int = option(100, "Episodes to train.")
    warmup_steps: int = option(2000, "Linear learning-rate warm-up steps.")
    infonce_warmup_episodes: int = option(1, "First episodes trained with the CLIP loss only.")
    lit_start_episode: int = option(
        -1,
        "Episode (0-based) from which the image tower is locked (lr 0) and only the CLIP loss is used. "
        "Negative counts from the end: -1 the last episode, -2 the last two (the reference's "
        "--lit-start-epoch 99 of 100); a value >= episodes turns the LiT finish off.",
    )


@dataclass(frozen=True)
class LoggingConfig:
    log_every_steps: int = option(10, "Steps between metrics.jsonl lines and progress updates.")
    checkpoint_every_steps: int = option(500, "Steps between mid-episode checkpoints (0 = only after episodes).")
    keep_checkpoints: int = option(2, "Checkpoints kept on disk (newest first).")
    tensorboard: bool = option(False, "Also write TensorBoard event files to runs/<run>/tensorboard.")
    wandb: bool = option(
        False,
        "Also log every metrics.jsonl record to Weights & Biases (step = global step); a resumed run continues "
        "the same wandb run. WANDB_MODE=offline logs to runs/<run>/wandb for a later `wandb sync`.",
    )
    wandb_project: str = option("protoclip", "wandb project of the run.")
    wandb_entity: str = option("", "wandb entity (user or team; '' = your default entity).")
    wandb_name: str = option("", "wandb display name of the run ('' = the run's name).")


@dataclass(frozen=True)
class TrainConfig:
    name: str = option("synthetic-protoclip", "Run name: outputs go to <workspace>/runs/<name>.")
    seed: int = option(0, "Random seed (data order, k-means, initialisation).")
    device: str = option("auto", "auto, cpu, cuda or cuda:N.")
    precision: Literal["auto", "fp32", "bf16"] = option("auto", "auto: bf16 autocast on CUDA, fp32 on CPU.")
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "Data"})
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "Model"})
    proto: ProtoConfig = field(default_factory=ProtoConfig, metadata={"help": "Prototypes"})
    loss: LossConfig = field(default_factory=LossConfig, metadata={"help": "Losses"})
    optim: OptimConfig = field(default_factory=OptimConfig, metadata={"help": "Optimisation"})
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig, metadata={"help": "Schedule"})
    logging: LoggingConfig = field(default_factory=LoggingConfig, metadata={"help": "Logging"})

    def __post_init__(self) -> None:
        """Consistency no type check catches; each error names the field to change."""
        check_choices(self, label=str)
        require(is_valid_name(self.name), name_error("Run name", self.name, "--set name=my-run"))
        require(
            is_valid_name(self.data.dataset),
            name_error("data.dataset", self.data.dataset, "--set data.dataset=synthetic"),
        )
        for section in ("data", "model", "proto", "loss", "optim", "schedule", "logging"):
            check_choices(getattr(self, section), label=lambda name, section=section: f"{section}.{name}")
        require(
            self.schedule.episodes >= 1,
            f"schedule.episodes is {self.schedule.episodes}; train at least one episode (--set schedule.episodes=1).",
        )
        require(
            self.data.batch_size >= 1 and self.data.extract_batch_size >= 1,
            "data.batch_size and data.extract_batch_size must be at least 1.",
        )
        require(
            self.optim.accum_freq >= 1,
            f"optim.accum_freq is {self.optim.accum_freq}; use 1 (no accumulation) or more micro-batches per step.",
        )
        self._check_datasets()
        require(self.data.workers >= 0, f"data.workers is {self.data.workers}; use 0 (load in the training process) or more.")
        require(
            not self.proto.enabled or self.model.heads,
            "proto.enabled needs projection heads; set model.heads = true, or proto.enabled = false for plain CLIP.",
        )
        require(
            self.logging.log_every_steps >= 1 and self.logging.keep_checkpoints >= 1,
            "logging.log_every_steps and logging.keep_checkpoints must be at least 1.",
        )
        for key, value, rule in self._ranges():
            require(rule(value), f"{key} is {value!r}; it must be {RULES[rule]} (change it with --set {key}=...).")

    def _ranges(self) -> list[tuple[str, float, "Rule"]]:
        """(key, value, rule) of every numeric field a type cannot bound; checked before any work so
        that a bad value fails in one sentence rather than inside torch after a warm-up episode."""
        d, m, p, l, o, s, g = self.data, self.model, self.proto, self.loss, self.optim, self.schedule, self.logging
        checks = [
            ("data.episode_size", d.episode_size, _non_negative), ("data.shuffle_buffer", d.shuffle_buffer, _non_negative),
            ("model.projection_dim", m.projection_dim, _positive),
            ("model.projection_hidden_dim", m.projection_hidden_dim, _positive),
            ("model.projection_n_layers", m.projection_n_layers, _non_negative),
            ("loss.w_clip", l.w_clip, _non_negative), ("loss.w_proto", l.w_proto, _non_negative),
            ("loss.w_ext", l.w_ext, _non_negative), ("loss.target_temperature", l.target_temperature, _non_negative),
            ("optim.lr", o.lr, _positive), ("optim.weight_decay", o.weight_decay, _non_negative),
            ("optim.beta1", o.beta1, _unit), ("optim.beta2", o.beta2, _unit), ("optim.eps", o.eps, _non_negative),
            ("optim.grad_clip", o.grad_clip, _non_negative),
            ("schedule.warmup_steps", s.warmup_steps, _non_negative),
            ("schedule.infonce_warmup_episodes", s.infonce_warmup_episodes, _non_negative),
            ("logging.checkpoint_every_steps", g.checkpoint_every_steps, _non_negative),
        ]  # fmt: skip
        if p.enabled:
            checks += [("proto.k", p.k, _positive), ("proto.teacher_k", p.teacher_k, _non_negative),
                       ("proto.iterations", p.iterations, _positive), ("proto.restarts", p.restarts, _positive)]  # fmt: skip
        return checks

    def _check_datasets(self) -> None:
        data = self.data
        names = data.datasets or (data.dataset,)
        require(all(names), "data.datasets holds an empty name; list the data sets under <workspace>/datasets by name.")
        twice = [name for name in names if names.count(name) > 1]
        require(not twice, f"data.datasets names '{twice[0] if twice else ''}' twice; list each data set once and "
                "give it a larger data.weights value instead.")
        if data.weights:
            count = len(data.weights)
            require(count == len(names), f"data.weights has {count} value{'s' if count != 1 else ''} for "
                    f"{len(names)} data set{'s' if len(names) != 1 else ''}; give one weight per entry of data.datasets.")
            require(all(w > 0 for w in data.weights), "data.weights must be positive; drop a data set from "
                    "data.datasets instead of giving it weight 0.")
            require(data.episode_size > 0 or len(set(data.weights)) == 1,
                    "data.weights need episodes of part of the union (data.episode_size > 0): an episode of every "
                    "shard reads each data set once whatever its weight.")


Rule = Callable[[float], bool]


def _positive(value: float) -> bool:
    return math.isfinite(value) and value > 0


def _non_negative(value: float) -> bool:
    return math.isfinite(value) and value >= 0


def _unit(value: float) -> bool:
    return 0 <= value < 1


RULES: dict[Rule, str] = {_positive: "positive", _non_negative: "0 or more", _unit: "in [0, 1)"}
