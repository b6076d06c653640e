"""Memory and time of the training options for big batches: gradient accumulation, gradient
checkpointing, both, and the sigmoid loss, against the plain ProtoCLIP step at the same batch.

Every variant is the trainer's own step (``training.step.Stepper``: forward, clip + proto + ext losses
against random prototypes, backward, clipping, fused AdamW on CUDA) on the same synthetic batches of
``--batch`` samples (random uint8 images normalised on the device, random tokens), one after another
in one process:

- ``base``: one batch of ``--batch``;
- ``accum``: ``--accum`` micro-batches of ``--batch / --accum`` per step (``optim.accum_freq``), the
  losses over the whole batch (same global batch as ``base``);
- ``ckpt``: one batch with ``model.grad_checkpointing``;
- ``accum+ckpt``: both;
- ``sigmoid``: one batch with ``loss.contrastive = "sigmoid"``.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` over the timed steps (model, optimiser state
and activations); on CPU the growth of the resident set's high-water mark (Linux ``VmHWM``, reset
before the timed steps through ``/proc/self/clear_refs``) above the resident memory at their start,
i.e. what a step needs beyond the model and optimiser state.

    .venv/bin/python benchmarks/train_options.py --device cuda --arch ViT-B-32 --batch 512 --accum 4
    .venv/bin/python benchmarks/train_options.py --device cpu --arch protoclip-tiny --batch 256 --accum 4 --steps 3

Prints a table and writes JSON (default ``benchmarks/results/train_options-<device>.json``), with
the machine's load average before and after. On a CPU, run each variant in its own process
(``--variants base``, then ``--variants accum``, ...) for the cleanest memory figures: freed heap
is trimmed between variants, but a fresh process has no history at all.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import statistics
import time
from pathlib import Path

import torch

# Run from benchmarks/ (Python puts the script's folder first on sys.path): shared helpers.
from train_step import (
    autocast_for,
    is_convolutional,
    machine_info,
    make_inputs,
    prepare_device,
    random_prototypes,
    release_memory,
    synchronize,
)

VARIANTS = {
    "base": {"accum": False, "checkpointing": False, "contrastive": "infonce"},
    "accum": {"accum": True, "checkpointing": False, "contrastive": "infonce"},
    "ckpt": {"accum": False, "checkpointing": True, "contrastive": "infonce"},
    "accum+ckpt": {"accum": True, "checkpointing": True, "contrastive": "infonce"},
    "sigmoid": {"accum": False, "checkpointing": False, "contrastive": "sigmoid"},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    parser.add_argument("--arch", default="ViT-B-32", help="open_clip architecture or protoclip-tiny")
    parser.add_argument("--batch", type=int, default=256, help="samples per optimiser step (the global batch of one process)")
    parser.add_argument("--accum", type=int, default=4, help="micro-batches per step in the accumulation variants")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    parser.add_argument("--warmup-steps", type=int, default=2, help="untimed steps first (optimiser state, autotuning)")
    parser.add_argument("--k", type=int, default=20000, help="prototypes per modality")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="output file (default benchmarks/results/train_options-<device>.json)")
    args = parser.parse_args(argv)
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    if args.batch < 1 or args.steps < 1 or args.accum < 1 or args.warmup_steps < 0:
        parser.error("--batch, --steps and --accum must be at least 1, --warmup-steps at least 0")
    if args.batch % args.accum:
        parser.error(f"--batch {args.batch} is not a multiple of --accum {args.accum}")
    return args


class PeakMeter:
    """Peak memory of the timed steps: CUDA's allocator peak, or the growth of the CPU high-water mark."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "rss_high_water_growth"
        self.base = 0

    @staticmethod
    def _status(field: str) -> int:
        match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
        return int(match.group(1)) * 1024 if match else 0

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
        self.base = self._status("VmRSS")

    def peak_mib(self) -> float | None:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        high = self._status("VmHWM")
        return (high - self.base) / 2**20 if high else None


def build_variant(name: str, args: argparse.Namespace, device: torch.device, inputs, protos):
    """The trainer's step for one variant; returns (step function, first-step losses)."""
    from protoclip_cli.core.losses import ProtoCLIPLoss
    from protoclip_cli.core.model import build_model
    from protoclip_cli.core.optim import build_optimizer, parameter_groups
    from protoclip_cli.data.transforms import normalize
    from protoclip_cli.configs.train import ModelConfig, OptimConfig
    from protoclip_cli.training.episodes import Phase
    from protoclip_cli.training.step import Stepper

    options = VARIANTS[name]
    model_cfg = ModelConfig(arch=args.arch, grad_checkpointing=options["checkpointing"])
    optim_cfg = OptimConfig()
    torch.manual_seed(args.seed)  # the same initial weights in every variant
    model = build_model(model_cfg, contrastive=options["contrastive"]).to(device)
    channels_last = device.type == "cuda" and is_convolutional(args.arch)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    model.train()
    optimizer = build_optimizer(parameter_groups(model, optim_cfg.weight_decay), optim_cfg, fused=device.type == "cuda")
    loss_fn = ProtoCLIPLoss(contrastive=options["contrastive"])

    def model_input(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        images = normalize(batch["images"], model.image_mean, model.image_std, device, channels_last)
        return images, batch["tokens"].to(device, non_blocking=True)

    stepper = Stepper(model, model, optimizer, loss_fn, autocast_for(device), model_input, grad_clip=optim_cfg.grad_clip)
    phase = Phase("proto", use_proto=True, use_ext=True, lock_visual=False)
    micro = args.batch // args.accum if options["accum"] else args.batch
    counter = [0]
    first: dict[str, float] = {}

    def step() -> None:
        pixels, tokens, labels = inputs.batch(counter[0])
        batches = [{"images": pixels[s : s + micro], "tokens": tokens[s : s + micro]} for s in range(0, args.batch, micro)]
        terms, _ = stepper.step(batches, phase, lambda outputs, step_batches: labels, protos)
        if counter[0] == 0:
            first.update({term: float(terms[term].detach()) for term in ("total", "clip", "proto", "ext")})
        counter[0] += 1

    return step, first, micro, sum(p.numel() for p in model.parameters())


def run_variant(name: str, args: argparse.Namespace, device: torch.device, inputs, protos) -> dict:
    release_memory(device)
    step, first, micro, parameters = build_variant(name, args, device, inputs, protos)
    for _ in range(args.warmup_steps):
        step()
    synchronize(device)
    meter = PeakMeter(device)
    meter.start()
    seconds = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    mean = statistics.fmean(seconds)
    result = {
        "variant": name, **VARIANTS[name], "micro_batch": micro, "batch": args.batch, "parameters": parameters,
        "img_per_s": args.batch / mean, "step_ms_mean": 1000 * mean, "step_ms_std": 1000 * statistics.pstdev(seconds),
        "step_ms": [1000 * s for s in seconds], "peak_memory_mib": meter.peak_mib(), "memory_kind": meter.kind,
        "first_step_loss": first,
    }
    del step
    return result


def add_ratios(results: list[dict]) -> None:
    """Time and memory of each variant relative to ``base`` (None without it)."""
    base = next((r for r in results if r["variant"] == "base"), None)
    for r in results:
        r["time_ratio_to_base"] = r["step_ms_mean"] / base["step_ms_mean"] if base else None
        usable = base and base["peak_memory_mib"] and r["peak_memory_mib"] is not None
        r["memory_ratio_to_base"] = r["peak_memory_mib"] / base["peak_memory_mib"] if usable else None


def print_table(record: dict) -> None:
    from rich.table import Table

    from protoclip_cli.console import out

    config, machine = record["config"], record["machine"]
    table = Table(title=f"training options, {config['arch']} batch {config['batch']} on {machine['device_name']} ({config['precision']})")
    for column in ("variant", "micro-batch", "img/s", "step ms", "peak MiB", "time x base", "memory x base", "first loss"):
        table.add_column(column, justify="left" if column == "variant" else "right")

    def ratio(value):
        return "n/a" if value is None else f"{value:.2f}"

    for r in record["results"]:
        memory = "n/a" if r["peak_memory_mib"] is None else f"{r['peak_memory_mib']:,.0f}"
        table.add_row(r["variant"], str(r["micro_batch"]), f"{r['img_per_s']:,.1f}",
                      f"{r['step_ms_mean']:,.1f} ± {r['step_ms_std']:,.1f}", memory, ratio(r["time_ratio_to_base"]),
                      ratio(r["memory_ratio_to_base"]), f"{r['first_step_loss']['total']:.4f}")
    out.print(table)
    load = machine["load_average_1_5_15_min"]
    out.print(f"peak memory: {record['results'][0]['memory_kind'] if record['results'] else ''}; "
              f"timed {config['steps']} steps after {config['warmup_steps']} warm-up steps; load average "
              f"{load['before'][0]:.1f} before, {load['after'][0]:.1f} after on {machine['cpu_count']} CPUs")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = prepare_device(args)
    from protoclip_cli.artifacts import write_json
    from protoclip_cli.console import info
    from protoclip_cli.configs.train import ModelConfig

    load_before = os.getloadavg()  # the machine may be shared: the load says how much the times mean
    inputs = make_inputs(args.arch, args.batch, args.k, device, args.seed)
    protos = random_prototypes(args.k, ModelConfig().projection_dim, device, args.seed)
    results = []
    for name in args.variants.split(","):
        info(f"timing {name}: {args.warmup_steps} warm-up + {args.steps} timed steps")
        results.append(run_variant(name, args, device, inputs, protos))
    add_ratios(results)
    record = {
        "benchmark": "train_options",
        "machine": {**machine_info(device), "load_average_1_5_15_min": {"before": load_before, "after": os.getloadavg()}},
        "config": {"arch": args.arch, "batch": args.batch, "accum": args.accum, "steps": args.steps,
                   "warmup_steps": args.warmup_steps, "k": args.k,
                   "precision": "bf16" if device.type == "cuda" else "fp32", "seed": args.seed},
        "results": results,
    }
    print_table(record)
    path = args.json or Path("benchmarks/results") / f"train_options-{device.type}.json"
    write_json(path, record)
    info(f"wrote {path}")
    return record


if __name__ == "__main__":
    main()
