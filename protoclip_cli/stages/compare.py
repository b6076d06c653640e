"""`protoclip compare`: CLIP against ProtoCLIP and its ablations, over seeds, at equal samples seen.

Every variant is the same base recipe (``recipes/synthetic.toml`` by default) with a few overrides
(:data:`VARIANTS`), trained with the same episodes, episode size and batch (so the same samples
seen) for each seed, evaluated with every task on the held-out split, and summarised as the
paper's table: mean ± std over seeds, the difference to the CLIP baseline and whether it exceeds
the seed noise (``evaluation/reports/comparison.py``). The checkpoints of the ``curves`` variants at the
end of every ``curve_every``-th episode are also scored (zero-shot and linear probe) for a plot of
accuracy against samples seen.

This stage chains train and evaluate, which is its purpose (the import rule's second exception
after ``demo``, tests/test_architecture.py). Runs are ordinary runs (``runs/<name>-<variant>-s<seed>``,
evaluated into their ``eval/``), so a rerun reuses every finished run and evaluation and resumes
an unfinished one; the results (``<workspace>/compare/<name>/``) are rewritten after every run,
so an interrupted comparison leaves the table of what finished.

``compare/<name>/``: ``compare.json`` (config, budget, per-run values, the table with every cell's
values, mean, std, difference, standard error and verdict, the curves), ``compare.md`` (the
table), ``curves.png``, ``curves/<run>/step-<8 digits>.json`` (one intermediate evaluation each).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from protoclip_cli import config as config_io
from protoclip_cli.artifacts import write_json, write_text
from protoclip_cli.configs.compare import BASELINE, CURVE_METRICS, VARIANTS, CompareConfig
from protoclip_cli.configs import recipes
from protoclip_cli.configs.evaluate import BASE_TASKS, EvaluateConfig
from protoclip_cli.configs.train import TrainConfig
from protoclip_cli.console import console, info
from protoclip_cli.data.shards import split_counts
from protoclip_cli.errors import ProtoclipError
from protoclip_cli.evaluation.data import readers
from protoclip_cli.evaluation.reports import comparison
from protoclip_cli.evaluation.reports.results import checkpoint_results, read_results
from protoclip_cli.evaluation.tasks import linear_probe, zeroshot
from protoclip_cli.evaluation.tasks.model import from_run
from protoclip_cli.runs import RunDir
from protoclip_cli.stages import evaluate, train
from protoclip_cli.training.open_clip_peer import train_peer
from protoclip_cli.workspace import Workspace


def run_name(config: CompareConfig, variant: str, seed: int) -> str:
    return f"{config.name}-{variant}-s{seed}"


def variant_overrides(config: CompareConfig, recipe: Path, variant: str, dataset_size: int) -> list[str]:
    """The comparison's and the variant's overrides of the base recipe (compare.json keeps them).

    A variant with its own ``episode_size`` gets as many episodes as keep the samples seen of the
    base recipe (``dataset_size``: the samples of the data set, for ``episode_size = 0``)."""
    spec = VARIANTS[variant]
    overrides = list(config.recipe_set)
    if config.episodes:
        overrides.append(f"schedule.episodes={config.episodes}")
    overrides += list(spec.overrides)
    if spec.episode_size is not None:
        base = config_io.load(TrainConfig, recipe, overrides)
        budget = base.schedule.episodes * (base.data.episode_size or dataset_size)
        size = spec.episode_size or dataset_size
        if budget % size:
            raise ProtoclipError(
                f"Variant {variant} needs a budget ({budget} samples) that is a whole number of its episodes of {size}; "
                "choose --episodes so that it is."
            )
        overrides += [f"data.episode_size={spec.episode_size}", f"schedule.episodes={budget // size}"]
    return overrides


def variant_recipe(config: CompareConfig, recipe: Path, variant: str, seed: int, dataset_size: int) -> TrainConfig:
    """The base recipe with :func:`variant_overrides`, its seed, run name and device."""
    overrides = variant_overrides(config, recipe, variant, dataset_size)
    if variant in config.curves:  # every episode's checkpoint stays for the curves
        overrides.append("logging.keep_checkpoints=100000")
    overrides += [f"seed={seed}", f"name='{run_name(config, variant, seed)}'", f"device='{config.device}'"]
    return config_io.load(TrainConfig, recipe, overrides)


def _dataset_size(workspace: Workspace, recipe: Path, config: CompareConfig) -> int:
    """Samples of the base recipe's training split (img2dataset's count, as the episode plan counts them)."""
    base = config_io.load(TrainConfig, recipe, config.recipe_set)
    return sum(split_counts(workspace, base.data.dataset, base.data.split).values())


def run(config: CompareConfig, workspace: Workspace) -> dict[str, Any]:
    """Train and evaluate every (variant, seed), reusing finished ones; returns compare.json's content."""
    recipe = recipes.resolve(config.recipe)
    dataset_size = _dataset_size(workspace, recipe, config)  # raises, naming `protoclip download`
    seeds = max(config.seeds_of(v) for v in config.variants)
    # seed-major: a full set of rows early
    jobs = [(variant, seed) for seed in range(seeds) for variant in config.variants if seed < config.seeds_of(variant)]
    configs = {job: variant_recipe(config, recipe, *job, dataset_size) for job in jobs}
    for job in jobs:  # every input of every run checked before the first step
        train.check_inputs(configs[job], workspace)
        if not VARIANTS[job[0]].peer:
            train.check_run_config(configs[job], RunDir(workspace.run_dir(configs[job].name)), rename="compare --name NEW")
    out_dir = workspace.compare_dir(config.name)
    keep = config_io.load(TrainConfig, recipe, config.recipe_set).logging.keep_checkpoints  # after the curves
    started = time.perf_counter()
    records: dict[str, dict[str, Any]] = {}
    for index, (variant, seed) in enumerate(jobs):
        recipe_config = configs[(variant, seed)]
        elapsed = time.perf_counter() - started
        console.rule(f"[bold]compare {index + 1}/{len(jobs)}: {variant}, seed {seed} ({elapsed / 60:.1f} min so far)")
        if VARIANTS[variant].peer:
            record = _train_and_evaluate_peer(config, recipe_config, seed, workspace, out_dir, dataset_size)
        else:
            record = _train_and_evaluate(config, recipe_config, variant, seed, workspace, out_dir, keep)
        records[recipe_config.name] = record
        result = _write_results(config, recipe, records, jobs, out_dir, time.perf_counter() - started, dataset_size)
    info(f"wrote {out_dir / 'compare.md'}, {out_dir / 'compare.json'} and {out_dir / 'curves.png'}")
    return result


def _is_complete(run) -> bool:
    return run.manifest_file.is_file() and json.loads(run.manifest_file.read_text()).get("status") == "complete"


def _train_and_evaluate(config: CompareConfig, recipe: TrainConfig, variant: str, seed: int, workspace: Workspace,
                        out_dir: Path, keep: int) -> dict[str, Any]:
    run = RunDir(workspace.run_dir(recipe.name))
    if _is_complete(run):
        info(f"{recipe.name}: trained already, reused.")
    else:
        train.run(recipe, workspace)
    final = run.checkpoint()
    results = _final_results(run, final)
    if results is None:
        manifest = evaluate.run(
            evaluate.EvaluateConfig(task="all", model=str(run.path), device=config.device, workers=config.eval_workers,
                                    plots=config.eval_plots),
            workspace,
        )
        results = {name: record["metrics"] for name, record in manifest["written"].items()}
    else:
        info(f"{recipe.name}: evaluated already, reused.")
    manifest = json.loads(run.manifest_file.read_text())
    record = {
        "variant": variant, "seed": seed, "run": str(run.path), "checkpoint": str(final),
        "samples_seen": int(manifest["total_steps"]) * recipe.data.batch_size * int(manifest["world_size"]),
        "train_seconds": _train_seconds(run), "wall_seconds": manifest.get("seconds"), "metrics": results,
    }
    if variant in config.curves:
        record["curve"] = _curve(config, recipe, run, workspace, out_dir, manifest, keep, (final, results))
    return record


def _train_and_evaluate_peer(config: CompareConfig, recipe: TrainConfig, seed: int, workspace: Workspace,
                             out_dir: Path, dataset_size: int) -> dict[str, Any]:
    """open_clip_train with the recipe's settings on its shards, then the same evaluation as the runs'."""
    samples = recipe.schedule.episodes * (recipe.data.episode_size or dataset_size)
    folder = out_dir / "open_clip_train" / f"s{seed}"
    shards = workspace.shards(recipe.data.dataset, recipe.data.split)
    if any(str(shard).startswith("s3://") for shard in shards):
        # open_clip_train opens shards with webdataset's gopen, which has no s3:// opener (http, gs and pipe: it has).
        raise ProtoclipError(
            f"The open_clip_train variant cannot read the s3:// shards of '{recipe.data.dataset}' (webdataset, which it "
            f"reads them with, has no s3:// opener); record them as a pipe: command (`protoclip download {recipe.data.dataset} --shards-at "
            "'pipe:aws s3 cp s3://BUCKET/PREFIX/{folder}/{shard} -'`) or compare without that variant."
        )
    trained = train_peer(recipe, shards, dataset_size, samples, folder, config.device)
    if trained.get("reused"):
        info(f"open_clip_train seed {seed}: trained already, reused ({folder}).")
    results_file = folder / "results.json"
    if results_file.is_file() and json.loads(results_file.read_text()).get("checkpoint") == trained["checkpoint"]:
        results = json.loads(results_file.read_text())["metrics"]
    else:
        manifest = evaluate.run(
            evaluate.EvaluateConfig(task="all", open_clip=recipe.model.arch, pretrained=trained["checkpoint"],
                                    dataset=recipe.data.dataset, device=config.device, workers=config.eval_workers,
                                    plots=config.eval_plots, cache=False, out=str(folder / "eval")),
            workspace,
        )
        results = {record["task"]: record["metrics"] for record in manifest["written"].values()}
        write_json(results_file, {"checkpoint": trained["checkpoint"], "metrics": results})
    return {
        "variant": "open_clip_train", "seed": seed, "run": str(folder), "checkpoint": trained["checkpoint"],
        "samples_seen": samples, "wall_seconds": trained["seconds"], "process_seconds": trained["process_seconds"],
        "metrics": results, "arguments": trained["arguments"],
    }


def _final_results(run, checkpoint: Path) -> dict[str, dict] | None:
    """The metrics of every task's ``eval/<task>.json`` when all were made from ``checkpoint``, else None."""
    kept, _ = checkpoint_results(read_results(run.eval_dir), checkpoint)
    if not set(BASE_TASKS) <= set(kept):
        return None
    return {task: kept[task]["metrics"] for task in BASE_TASKS}


def _train_seconds(run) -> float:
    """Time spent in the run's episodes (extraction, clustering, training), from metrics.jsonl."""
    total = 0.0
    for line in run.metrics_file.read_text().splitlines():
        record = json.loads(line)
        if record.get("kind") == "episode":
            total += sum(float(v) for v in record.get("seconds", {}).values())
    return round(total, 2)


def curve_episodes(samples_after: list[int], stride: int) -> list[int]:
    """The episodes whose checkpoints are curve points: each one whose end (``samples_after[e]``, the
    samples seen after episode e) reaches the next multiple of ``stride``, and the last episode."""
    chosen = []
    for episode, seen in enumerate(samples_after):
        before = samples_after[episode - 1] if episode else 0
        if seen // stride > before // stride or episode == len(samples_after) - 1:
            chosen.append(episode)
    return chosen


def _curve(config: CompareConfig, recipe: TrainConfig, run, workspace: Workspace, out_dir: Path, manifest: dict,
           keep: int, final: tuple[Path, dict]) -> dict[str, dict]:
    """Zero-shot and linear-probe top-1 of the checkpoints closing the episodes that reach every
    ``curve_every`` base episodes' worth of samples (the last one's are the final evaluation's,
    ``final`` = (checkpoint, metrics by task))."""
    steps = manifest["steps_per_episode"]
    batch = recipe.data.batch_size * int(manifest["world_size"])
    ends = [sum(steps[: e + 1]) for e in range(len(steps))]
    base_episodes = config.episodes or len(steps)
    stride = max(1, config.curve_every * ends[-1] * batch // base_episodes)
    points: dict[str, dict] = {}
    for episode in curve_episodes([end * batch for end in ends], stride):
        step = ends[episode]
        target = out_dir / "curves" / run.name / f"step-{step:08d}.json"
        if target.is_file():
            points[str(step * batch)] = json.loads(target.read_text())["metrics"]
            continue
        checkpoint = run.checkpoint_file(step)
        if not checkpoint.is_file():
            raise ProtoclipError(
                f"Checkpoint {checkpoint} for the learning curve is missing (the run kept fewer checkpoints); "
                f"delete {run.path} to retrain it with every episode's checkpoint kept."
            )
        if checkpoint.resolve() == final[0].resolve():
            metrics = {task: final[1][task] for task in CURVE_METRICS}
        else:
            info(f"{run.name}: curve point at step {step} (episode {episode})")
            metrics = _score_checkpoint(config, run, workspace, checkpoint)
        write_json(target, {"run": run.name, "checkpoint": str(checkpoint), "episode": episode, "step": step,
                            "samples_seen": step * batch, "metrics": metrics})
        points[str(step * batch)] = metrics
    _prune(run, keep)
    return points


def _prune(run, keep: int) -> None:
    """Once the curve is scored (its points are files), keep only the base recipe's newest checkpoints."""
    for old in run.checkpoints()[: -max(1, keep)]:
        old.unlink(missing_ok=True)


def _score_checkpoint(config: CompareConfig, run, workspace: Workspace, checkpoint: Path) -> dict[str, dict]:
    """Zero-shot and linear probe of one checkpoint on the held-out split, features not cached."""
    defaults = EvaluateConfig()
    model = from_run(run, checkpoint, config.device)
    dataset = run.config().data.dataset
    test = readers.embedded(workspace, dataset, defaults.heldout_split)
    common = dict(cache_dir=None, batch_size=defaults.batch_size, workers=config.eval_workers)
    return {
        "zeroshot": zeroshot.evaluate(model, test, None, **common)["metrics"],
        "linear-probe": linear_probe.evaluate(
            model, readers.embedded(workspace, dataset, "train"), test, method=defaults.probe_method,
            weight_decays=defaults.probe_weight_decays, seed=defaults.seed, **common,
        )["metrics"],
    }


def _write_results(config: CompareConfig, recipe: Path, records: dict[str, dict], jobs: list, out_dir: Path,
                   seconds: float, dataset_size: int) -> dict[str, Any]:
    """compare.json, compare.md and curves.png from the runs finished so far."""
    values: dict[str, dict[str, list[float]]] = {}
    walls: dict[str, list[float]] = {}
    for variant in config.variants:
        finished = [r for r in records.values() if r["variant"] == variant]
        if finished:
            values[variant] = {m.label: [float(r["metrics"][m.task][m.key]) for r in finished] for m in comparison.METRICS}
            walls[variant] = [float(r["wall_seconds"]) for r in finished if r.get("wall_seconds") is not None]
    cells = comparison.table(values, BASELINE)
    budget = {r["samples_seen"] for r in records.values()}
    if len(budget) > 1:
        raise ProtoclipError(f"The runs saw different numbers of samples ({sorted(budget)}); the comparison needs one budget.")
    curves: dict[str, dict[str, dict[int, list[float]]]] = {}
    labels = {m.task: m.label for m in comparison.METRICS if m.key == "top1"}
    for task in CURVE_METRICS:
        for r in records.values():
            for samples, metrics in r.get("curve", {}).items():
                curves.setdefault(labels[task], {}).setdefault(r["variant"], {}).setdefault(int(samples), []).append(
                    float(metrics[task]["top1"]))
    samples = budget.pop()
    efficiency = comparison.samples_to_reach(curves, cells, BASELINE)
    cost = comparison.cost(walls, BASELINE)
    text = "\n".join([
        f"# protoclip compare: {config.name}",
        "",
        f"{len(records)} of {len(jobs)} runs finished; recipe {recipe}, {samples} samples seen per run, "
        f"held-out split of the training data set.",
        "",
        comparison.markdown(cells, BASELINE),
        comparison.cost_markdown(cost, efficiency, samples, BASELINE),
        "Variants: " + "; ".join(f"{v}: {VARIANTS[v].description}" for v in values) + ".",
    ])
    write_text(out_dir / "compare.md", text + "\n")
    if curves:
        comparison.plot_curves(curves, out_dir / "curves.png", f"{config.name}: held-out accuracy against samples seen")
    result = {
        "config": config_io.to_dict(config), "recipe": str(recipe), "baseline": BASELINE,
        "noise_rule": comparison.NOISE_RULE, "samples_seen": samples, "runs_finished": len(records),
        "runs_planned": len(jobs), "wall_seconds": round(seconds, 1),
        "variants": {v: {"description": VARIANTS[v].description, "peer": VARIANTS[v].peer,
                         "overrides": variant_overrides(config, recipe, v, dataset_size)} for v in config.variants},
        "runs": records,
        "table": {v: {label: c.to_json() for label, c in row.items()} for v, row in cells.items()},
        "cost": cost,
        "efficiency": efficiency,
        "curves": {label: {v: {str(x): ys for x, ys in sorted(p.items())} for v, p in per.items()} for label, per in curves.items()},
    }
    write_json(out_dir / "compare.json", result)
    return result
