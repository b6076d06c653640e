"""What a run trains on: its device with the settings of that device, and the model as training and
the extraction pass use it (DDP, SyncBatchNorm, ``torch.compile``, channels_last)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.nn.parallel import DistributedDataParallel

from protoclip_cli.configs.train import TrainConfig
from protoclip_cli.core.distributed import resolve_device
from protoclip_cli.core.model import ProtoCLIP, build_model
from protoclip_cli.data.pipeline import EpisodeStream, StreamConfig
from protoclip_cli.training import interrupts


def _is_convolutional(arch: str) -> bool:
    lowered = arch.lower()
    return lowered.startswith("rn") or "convnext" in lowered


@dataclass(frozen=True)
class TrainingDevice:
    """The device of one rank, its mixed precision and memory format."""

    device: torch.device
    autocast: Callable[[], contextlib.AbstractContextManager]
    channels_last: bool

    @classmethod
    def for_recipe(cls, config: TrainConfig) -> "TrainingDevice":
        device = resolve_device(config.device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
            # As open_clip_train: TF32 matmuls and cuDNN autotuning (fixed input shapes).
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = True
        bf16 = config.precision == "bf16" or (config.precision == "auto" and device.type == "cuda")
        autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
        channels_last = device.type == "cuda" and config.model.channels_last and _is_convolutional(config.model.arch)
        return cls(device, autocast, channels_last)


def sync_batchnorm(model: torch.nn.Module, which: str) -> int:
    """Turn the BatchNorm layers ``which`` names ('none', 'heads', 'all') into SyncBatchNorm, in place;
    returns how many were converted. The reference keeps BatchNorm per GPU ('none')."""
    convert = torch.nn.SyncBatchNorm.convert_sync_batchnorm
    if which == "all":
        for name, child in list(model.named_children()):
            setattr(model, name, convert(child))
    elif which == "heads":
        for name in ("image_head", "text_head"):
            if getattr(model, name, None) is not None:
                setattr(model, name, convert(getattr(model, name)))
    return sum(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())


def build_training_model(config: TrainConfig, runtime: TrainingDevice, world_size: int, weights: bool = True,
                         preprocess: dict | None = None) -> tuple[ProtoCLIP, torch.nn.Module, Callable]:
    """``(model, train_model, extract_forward)``: the bare model (what checkpoints hold), the module
    training steps call (DDP over several ranks, compiled with ``model.compile`` on CUDA), and the
    extraction pass's forward (the bare model in eval mode, compiled for one batch shape when asked).
    ``weights`` and ``preprocess``: :func:`~protoclip_cli.core.model.build_model`'s (a resumed run
    takes its weights and preprocessing from its checkpoint)."""
    model = build_model(config.model, contrastive=config.loss.contrastive, weights=weights, preprocess=preprocess)
    if world_size > 1 and runtime.device.type == "cuda":
        sync_batchnorm(model, config.model.sync_batchnorm)
    model.to(runtime.device)
    if runtime.channels_last:
        model.to(memory_format=torch.channels_last)
    train_model: torch.nn.Module = model
    if world_size > 1:
        # Warm-up and LiT episodes leave the heads and the prototype temperature without gradients.
        train_model = DistributedDataParallel(
            model, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None,
            find_unused_parameters=model.has_heads,
        )
    if config.model.compile and runtime.device.type == "cuda":
        return model, torch.compile(train_model), torch.compile(model, dynamic=False)
    return model, train_model, model


def episode_stream(config: TrainConfig, episodes: list[list[Path]], counts: dict[str, int], shard_paths: dict[str, Path],
                   key_offsets: dict[str, int], teacher_paths: list[Path], rank: int, image_size,
                   pin_memory: bool) -> EpisodeStream:
    """One rank's data loader for every pass of the run: ``episodes`` are this rank's shards of each
    episode; ``teacher_paths`` given, training batches carry each sample's teacher features (the
    online teacher labels of single-pass mode)."""
    data = config.data
    return EpisodeStream(
        StreamConfig(
            episodes=episodes, counts=counts, batch_size=data.batch_size, extract_batch_size=data.extract_batch_size,
            image_size=image_size, tokenizer_arch=config.model.arch, augmentation=data.augmentation, seed=config.seed,
            rank=rank, shuffle_buffer=data.shuffle_buffer, workers=data.workers,
            teacher_paths=tuple(str(p) for p in teacher_paths),
            shard_ids={str(path): shard for shard, path in shard_paths.items()},
            key_offsets={str(shard_paths[shard]): offset for shard, offset in key_offsets.items() if offset},
            extraction_transform=config.proto.extraction_transform,
        ),
        pin_memory=pin_memory,
        worker_init=interrupts.worker_signals,
    )
