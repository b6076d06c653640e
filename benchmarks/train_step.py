"""Training-step throughput: OpenCLIP's own step against this project's CLIP and ProtoCLIP steps.

Three variants run one after another in the same process, on the same synthetic in-memory batches
(random uint8 images normalised on the device, random tokens), so the ratios compare like with like:

- ``openclip``: ``open_clip.create_model(arch)`` + ``open_clip.ClipLoss()`` + AdamW grouped as
  open_clip_train does (no decay on gains, biases and temperatures), loss under autocast,
  ``logit_scale`` clamped after the step;
- ``clip``: this project's CLIP baseline (``ProtoCLIP`` without heads, ``ProtoCLIPLoss`` with the
  CLIP term only), stepped the way ``training.loop.Trainer`` steps (fused AdamW on CUDA, losses in
  float32, gradient clipping, both temperatures clamped);
- ``protoclip``: the same with projection heads and the clip + proto + ext losses against random
  prototypes (``--k`` clusters) and random labels.

On CUDA every variant uses bf16 autocast and channels_last for convolutional towers; ``--compile``
wraps each model in ``torch.compile``. Every step is timed between two ``torch.cuda.synchronize``
calls after ``--warmup-steps`` untimed steps.

    .venv/bin/python benchmarks/train_step.py --device cuda --arch RN50 --batch 256
    .venv/bin/python benchmarks/train_step.py --device cpu --arch protoclip-tiny --batch 16 --steps 2 --warmup-steps 1

Prints a table and writes JSON (default ``benchmarks/results/train_step-<device>.json``).

The script is longer than this project's modules usually are, on purpose: it is run as a file and
read next to the numbers it produced, so the three variants, their inputs and the timing stay in
one place where their differences can be compared line by line.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

VARIANTS = ("openclip", "clip", "protoclip")
VARIANT_TITLES = {
    "openclip": "OpenCLIP's own step",
    "clip": "CLIP baseline (no heads)",
    "protoclip": "ProtoCLIP, clip + proto + ext",
}
MAX_LOGIT_SCALE = math.log(100)
# Distinct input batches cycled through the steps: enough that no step reuses the previous one's
# inputs, few enough to stay cheap to generate.
INPUT_POOL = 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    parser.add_argument("--arch", default="RN50", help="open_clip architecture or protoclip-tiny")
    parser.add_argument("--batch", type=int, default=256, help="images per step")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    parser.add_argument("--warmup-steps", type=int, default=5, help="untimed steps before timing (compilation, autotuning)")
    parser.add_argument("--compile", action="store_true", help="torch.compile every variant's model")
    parser.add_argument("--k", type=int, default=20000, help="prototypes per modality for the ProtoCLIP variant")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="output file (default benchmarks/results/train_step-<device>.json)")
    args = parser.parse_args(argv)
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    for name in ("batch", "steps", "k"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.warmup_steps < 0:
        parser.error("--warmup-steps must be at least 0")
    return args


# -- machine and measurement helpers -------------------------------------------------------------


def machine_info(device: torch.device) -> dict:
    """What the numbers were measured on."""
    import open_clip

    info = {
        "device": device.type,
        "torch": torch.__version__,
        "open_clip": getattr(open_clip, "__version__", "unknown"),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_cuda_build": torch.version.cuda,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["device_name"] = props.name
        info["device_memory_gib"] = round(props.total_memory / 2**30, 1)
    else:
        info["device_name"] = cpu_name()
    return info


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resident_bytes() -> int | None:
    """Current resident set size (Linux ``/proc``), None where unavailable."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")


def release_memory(device: torch.device) -> None:
    """Free what the previous variant left, so each variant's memory is measured from a clean base."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    elif sys.platform.startswith("linux"):
        # glibc keeps freed heap pages; without trimming, a later variant's RSS growth is understated.
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


class MemoryMeter:
    """Peak memory of one variant: ``max_memory_allocated`` on CUDA, sampled RSS growth on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "rss_delta"
        self.base = resident_bytes() if device.type != "cuda" else 0
        self.high = self.base

    def sample(self) -> None:
        if self.device.type != "cuda" and self.base is not None:
            self.high = max(self.high, resident_bytes() or 0)

    def peak_mib(self) -> float | None:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        if self.base is None:
            return None
        return (self.high - self.base) / 2**20


def time_steps(step: Callable[[], None], warmup: int, steps: int, device: torch.device, meter: MemoryMeter) -> list[float]:
    """Run ``warmup`` untimed steps, then ``steps`` steps each timed between two synchronisations."""
    for _ in range(warmup):
        step()
        meter.sample()
    synchronize(device)
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
        meter.sample()
    return seconds


def is_convolutional(arch: str) -> bool:
    lowered = arch.lower()
    return lowered.startswith("rn") or "convnext" in lowered


# -- synthetic inputs ----------------------------------------------------------------------------


@dataclass
class Inputs:
    """A few batches kept in host memory as a data loader would hand them over (uint8, pinned on CUDA)."""

    images: list[torch.Tensor]
    tokens: list[torch.Tensor]
    labels: list[dict[str, torch.Tensor]]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        slot = index % len(self.images)
        return self.images[slot], self.tokens[slot], self.labels[slot]


def make_inputs(arch: str, batch: int, k: int, device: torch.device, seed: int) -> Inputs:
    import open_clip

    from protoclip_cli.core.model import register_tiny_configs

    register_tiny_configs()
    config = open_clip.get_model_config(arch)
    if config is None:
        raise SystemExit(f"--arch {arch}: not an open_clip architecture; try RN50, ViT-B-32 or protoclip-tiny.")
    size = config["vision_cfg"]["image_size"]
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    text_cfg = config["text_cfg"]
    context, vocab = text_cfg.get("context_length", 77), text_cfg.get("vocab_size", 49408)
    preprocess = config.get("preprocess_cfg", {})
    mean = tuple(preprocess.get("mean", open_clip.OPENAI_DATASET_MEAN))
    std = tuple(preprocess.get("std", open_clip.OPENAI_DATASET_STD))
    generator = torch.Generator().manual_seed(seed)
    images, tokens, labels = [], [], []
    for _ in range(INPUT_POOL):
        pixels = torch.randint(0, 256, (batch, 3, height, width), dtype=torch.uint8, generator=generator)
        images.append(pixels.pin_memory() if device.type == "cuda" else pixels)
        # Token 0 is padding; open_clip pools the text at the highest id, which any random row has.
        tokens.append(torch.randint(1, vocab, (batch, context), generator=generator))
        labels.append({name: torch.randint(0, k, (batch,), generator=generator).to(device) for name in ("img", "txt", "ext")})
    return Inputs(images, tokens, labels, mean, std)


def random_prototypes(k: int, dim: int, device: torch.device, seed: int):
    from protoclip_cli.core.losses import Prototypes

    generator = torch.Generator().manual_seed(seed + 1)

    def centroids() -> torch.Tensor:
        return torch.nn.functional.normalize(torch.randn(k, dim, generator=generator), dim=1)

    return Prototypes(
        img_centroids=centroids(), txt_centroids=centroids(), img_in_txt=centroids(), txt_in_img=centroids(),
        ext_in_img=centroids(), ext_in_txt=centroids(),
    ).to(device)


# -- the three steps -----------------------------------------------------------------------------


@dataclass
class Variant:
    """A ready-to-run training step and what it trains."""

    step: Callable[[], float | None]
    parameters: int
    first_losses: dict[str, float]


def autocast_for(device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    if device.type == "cuda":
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


def openclip_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with open_clip_train's parameter split (its defaults: plain AdamW, not fused)."""

    def exclude(name: str, parameter: torch.nn.Parameter) -> bool:
        return parameter.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return torch.optim.AdamW(
        [
            {"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
            {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": weight_decay},
        ],
        lr=lr, betas=(0.9, 0.98), eps=1e-6,
    )


def build_openclip(args: argparse.Namespace, device: torch.device, inputs: Inputs) -> Variant:
    import open_clip

    from protoclip_cli.data.transforms import normalize

    torch.manual_seed(args.seed)
    model = open_clip.create_model(args.arch, output_dict=True).to(device)
    channels_last = device.type == "cuda" and is_convolutional(args.arch)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    model.train()
    train_model = torch.compile(model) if args.compile else model
    optimizer = openclip_optimizer(model, lr=5e-4, weight_decay=0.2)
    loss_fn = open_clip.ClipLoss()
    autocast = autocast_for(device)
    counter = [0]
    first: dict[str, float] = {}

    def step() -> None:
        pixels, tokens, _ = inputs.batch(counter[0])
        images = normalize(pixels, inputs.mean, inputs.std, device, channels_last)
        tokens = tokens.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            outputs = train_model(images, tokens)
            losses = loss_fn(**outputs, output_dict=True)
            total = sum(losses.values())
        total.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        if counter[0] == 0:
            first.update(total=float(total.detach()), clip=float(losses["contrastive_loss"].detach()))
        counter[0] += 1

    return Variant(step, sum(p.numel() for p in model.parameters()), first)


def build_project(args: argparse.Namespace, device: torch.device, inputs: Inputs, prototypes: bool) -> Variant:
    from protoclip_cli.core.losses import ProtoCLIPLoss
    from protoclip_cli.core.model import build_model
    from protoclip_cli.core.optim import build_optimizer, parameter_groups
    from protoclip_cli.data.transforms import normalize
    from protoclip_cli.configs.train import LossConfig, ModelConfig, OptimConfig

    model_cfg, optim_cfg, loss_cfg = ModelConfig(arch=args.arch, heads=prototypes), OptimConfig(), LossConfig()
    # The same seed as the OpenCLIP variant: identical tower weights, so the first CLIP losses agree.
    torch.manual_seed(args.seed)
    model = build_model(model_cfg).to(device)
    channels_last = device.type == "cuda" and model_cfg.channels_last and is_convolutional(args.arch)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    model.train()
    train_model = torch.compile(model) if args.compile else model
    optimizer = build_optimizer(parameter_groups(model, optim_cfg.weight_decay), optim_cfg, fused=device.type == "cuda")
    loss_fn = ProtoCLIPLoss(loss_cfg.w_clip, loss_cfg.w_proto, loss_cfg.w_ext, loss_cfg.target_temperature, loss_cfg.pbt)
    protos = random_prototypes(args.k, model_cfg.projection_dim, device, args.seed) if prototypes else None
    autocast = autocast_for(device)
    counter = [0]
    first: dict[str, float] = {}

    def step() -> None:
        pixels, tokens, labels = inputs.batch(counter[0])
        images = normalize(pixels, model.image_mean, model.image_std, device, channels_last)
        tokens = tokens.to(device, non_blocking=True)
        with autocast():
            outputs = train_model(images, tokens)
        terms = loss_fn(
            outputs, labels=labels if prototypes else None, protos=protos, use_proto=prototypes, use_ext=prototypes
        )
        optimizer.zero_grad(set_to_none=True)
        terms["total"].backward()
        if optim_cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), optim_cfg.grad_clip)
        optimizer.step()
        model.clamp_temperatures()
        if counter[0] == 0:
            first.update({name: float(terms[name].detach()) for name in ("total", "clip", "proto", "ext")})
        counter[0] += 1

    return Variant(step, sum(p.numel() for p in model.parameters()), first)


def run_variant(name: str, args: argparse.Namespace, device: torch.device, inputs: Inputs) -> dict:
    release_memory(device)
    meter = MemoryMeter(device)
    if name == "openclip":
        variant = build_openclip(args, device, inputs)
    else:
        variant = build_project(args, device, inputs, prototypes=name == "protoclip")
    seconds = time_steps(variant.step, args.warmup_steps, args.steps, device, meter)
    mean = statistics.fmean(seconds)
    result = {
        "variant": name,
        "title": VARIANT_TITLES[name],
        "parameters": variant.parameters,
        "img_per_s": args.batch / mean,
        "step_ms_mean": 1000 * mean,
        "step_ms_std": 1000 * statistics.pstdev(seconds),
        "step_ms_median": 1000 * statistics.median(seconds),
        "step_ms": [1000 * s for s in seconds],
        "peak_memory_mib": meter.peak_mib(),
        "memory_kind": meter.kind,
        "first_step_loss": variant.first_losses,
    }
    del variant
    return result


# -- report --------------------------------------------------------------------------------------


def add_ratios(results: list[dict]) -> None:
    """``ratio_to_openclip``: each variant's img/s over the OpenCLIP step's (None without that variant)."""
    reference = next((r["img_per_s"] for r in results if r["variant"] == "openclip"), None)
    for result in results:
        result["ratio_to_openclip"] = result["img_per_s"] / reference if reference else None


def print_table(record: dict) -> None:
    from rich.table import Table

    from protoclip_cli.console import out

    config, machine = record["config"], record["machine"]
    title = (
        f"train step, {config['arch']} batch {config['batch']} on {machine['device_name']} "
        f"({config['precision']}{', compiled' if config['compile'] else ''})"
    )
    table = Table(title=title, caption=", ".join(f"{name}: {text}" for name, text in VARIANT_TITLES.items()))
    for column in ("variant", "img/s", "step ms", "peak memory MiB", "vs OpenCLIP", "first loss"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for r in record["results"]:
        memory = "n/a" if r["peak_memory_mib"] is None else f"{r['peak_memory_mib']:,.0f}"
        ratio = "n/a" if r["ratio_to_openclip"] is None else f"{r['ratio_to_openclip']:.2f}x"
        table.add_row(
            r["variant"], f"{r['img_per_s']:,.1f}", f"{r['step_ms_mean']:,.1f} ± {r['step_ms_std']:,.1f}",
            memory, ratio, f"{r['first_step_loss']['total']:.4f}",
        )
    out.print(table)
    kind = "torch.cuda.max_memory_allocated" if machine["device"] == "cuda" else "resident-memory growth (RSS delta)"
    out.print(f"peak memory: {kind}; timed {config['steps']} steps after {config['warmup_steps']} warm-up steps")


def prepare_device(args: argparse.Namespace) -> torch.device:
    """Threads and device as the trainer sets them: on CUDA, TF32 matmuls and cuDNN autotuning
    (open_clip_train's settings too), for every variant of the process alike."""
    from protoclip_cli.core.distributed import resolve_device
    from protoclip_cli.errors import ProtoclipError

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = resolve_device(args.device)
    except ProtoclipError as error:
        raise SystemExit(f"--device {args.device}: {error}") from None
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    return device


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = prepare_device(args)
    from protoclip_cli.artifacts import write_json
    from protoclip_cli.console import info

    inputs = make_inputs(args.arch, args.batch, args.k, device, args.seed)
    results = []
    for name in args.variants.split(","):
        info(f"timing {VARIANT_TITLES[name]}: {args.warmup_steps} warm-up + {args.steps} timed steps")
        results.append(run_variant(name, args, device, inputs))
    add_ratios(results)
    record = {
        "benchmark": "train_step",
        "machine": machine_info(device),
        "config": {
            "arch": args.arch, "batch": args.batch, "steps": args.steps, "warmup_steps": args.warmup_steps,
            "compile": args.compile, "k": args.k, "precision": "bf16" if device.type == "cuda" else "fp32",
            "channels_last": device.type == "cuda" and is_convolutional(args.arch),
            "tf32": device.type == "cuda", "seed": args.seed,
        },
        "results": results,
    }
    print_table(record)
    path = args.json or Path("benchmarks/results") / f"train_step-{device.type}.json"
    write_json(path, record)
    info(f"wrote {path}")
    return record


if __name__ == "__main__":
    main()
