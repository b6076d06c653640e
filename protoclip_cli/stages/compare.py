"""`protoclip compare`: CLIP against ProtoCLIP and its ablations, over seeds, at equal samples seen.

Every variant is the same base recipe (``recipes/synthetic.toml`` by default) with a few overrides
(:data:`VARIANTS`), trained with the same episodes, episode size and batch (so the same samples
seen) for each seed, evaluated with every task on the held-out split, and summarised as the
paper's table: mean ± std over seeds, the difference to the CLIP baseline and whether it exceeds
the seed noise (``evaluation/comparison.py``). The checkpoints of the ``curves`` variants at the
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protoclip_cli import config as config_io
from protoclip_cli.artifacts import write_json, write_text
from protoclip_cli.config import option, require
from protoclip_cli.console import console, info
from protoclip_cli.errors import ProtoclipError
from protoclip_cli.recipes import TrainConfig
from protoclip_cli.workspace import Workspace

BASELINE = "clip"
# variant -> (what it is, recipe overrides of the base ProtoCLIP recipe)
VARIANTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "clip": (
        "the CLIP baseline: no heads, no prototypes, no LiT finish (episodes only split the data)",
        ("proto.enabled=false", "model.heads=false", "proto.teacher=''", "schedule.lit_start_episode=1000000"),
    ),
    "protoclip": ("ProtoCLIP as the recipe: extraction pass, k-means, PBT, external teacher, soft targets", ()),
    # The external-teacher loss is defined with PBT only (method.md section 4): without PBT it goes too.
    "no-pbt": ("without Prototypical Back Translation (and so without the teacher loss)", ("loss.pbt=false", "proto.teacher=''")),
    "no-teacher": ("without the external teacher", ("proto.teacher=''",)),
    "hard-targets": ("one-hot prototype targets (tau = 0)", ("loss.target_temperature=0.0",)),
    "single-pass": ("single-pass mode: no extraction pass, online labels", ("proto.single_pass=true",)),
}
CURVE_METRICS = ("zeroshot", "linear-probe")  # scored on intermediate checkpoints


@dataclass(frozen=True)
class CompareConfig:
    name: str = option("compare", "Name of the comparison: runs are runs/<name>-<variant>-s<seed>, results compare/<name>/.")
    recipe: str = option("", "Base ProtoCLIP recipe every variant overrides ('' = recipes/synthetic.toml of protoclip).")
    variants: tuple[str, ...] = option(tuple(VARIANTS), f"Variants to train (the table's rows): {', '.join(VARIANTS)}.")
    seeds: int = option(3, "Seeds per variant (0 .. seeds-1); the table's spread and noise rule need at least 2.")
    episodes: int = option(
        12, "Episodes of every run (0 = the recipe's): with the recipe's data.episode_size and batch this fixes the samples seen."
    )
    recipe_set: tuple[str, ...] = option((), "Recipe override for every variant, e.g. --recipe-set optim.lr=2e-3.")
    curves: tuple[str, ...] = option(
        ("clip", "protoclip"), "Variants whose intermediate checkpoints are scored for the learning-curve plot."
    )
    curve_every: int = option(2, "Score the checkpoint of every n-th episode for the curves (the last one always).")
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
        require(self.seeds >= 1, f"--seeds is {self.seeds}; train at least one seed (3 for a spread).")
        require(self.episodes >= 0, f"--episodes is {self.episodes}; use 0 (the recipe's) or more.")
        require(self.curve_every >= 1, f"--curve-every is {self.curve_every}; use 1 (every episode) or more.")
        require(self.eval_workers >= 0, f"--eval-workers is {self.eval_workers}; use 0 or more.")


def run_name(config: CompareConfig, variant: str, seed: int) -> str:
    return f"{config.name}-{variant}-s{seed}"


def variant_recipe(config: CompareConfig, recipe: Path, variant: str, seed: int) -> TrainConfig:
    """The base recipe with the comparison's and the variant's overrides, its seed and run name."""
    overrides = list(config.recipe_set)
    if config.episodes:
        overrides.append(f"schedule.episodes={config.episodes}")
    overrides += list(VARIANTS[variant][1])
    if variant in config.curves:  # every episode's checkpoint stays for the curves
        overrides.append("logging.keep_checkpoints=100000")
    overrides += [f"seed={seed}", f"name='{run_name(config, variant, seed)}'", f"device='{config.device}'"]
    return config_io.load(TrainConfig, recipe, overrides)


def run(config: CompareConfig, workspace: Workspace, default_recipe: Path) -> dict[str, Any]:
    """Train and evaluate every (variant, seed), reusing finished ones; returns compare.json's content."""
    from protoclip_cli.runs import RunDir
    from protoclip_cli.stages import train

    recipe = Path(config.recipe) if config.recipe else default_recipe
    if not recipe.is_file():
        raise ProtoclipError(f"Recipe {recipe} does not exist; pass --recipe FILE (a ProtoCLIP recipe such as recipes/synthetic.toml).")
    jobs = [(variant, seed) for seed in range(config.seeds) for variant in config.variants]  # seed-major: a full row set early
    recipes = {job: variant_recipe(config, recipe, *job) for job in jobs}
    for job in jobs:  # every input of every run checked before the first step
        train.check_inputs(recipes[job], workspace)
        train.check_run_config(recipes[job], RunDir(workspace.run_dir(recipes[job].name)), rename="compare --name NEW")
    out_dir = workspace.compare_dir(config.name)
    keep = config_io.load(TrainConfig, recipe, config.recipe_set).logging.keep_checkpoints  # after the curves
    started = time.perf_counter()
    records: dict[str, dict[str, Any]] = {}
    for index, (variant, seed) in enumerate(jobs):
        recipe_config = recipes[(variant, seed)]
        elapsed = time.perf_counter() - started
        console.rule(f"[bold]compare {index + 1}/{len(jobs)}: {variant}, seed {seed} ({elapsed / 60:.1f} min so far)")
        records[recipe_config.name] = _train_and_evaluate(config, recipe_config, variant, seed, workspace, out_dir, keep)
        result = _write_results(config, recipe, records, jobs, out_dir, time.perf_counter() - started)
    info(f"wrote {out_dir / 'compare.md'}, {out_dir / 'compare.json'} and {out_dir / 'curves.png'}")
    return result


def _is_complete(run) -> bool:
    return run.manifest_file.is_file() and json.loads(run.manifest_file.read_text()).get("status") == "complete"


def _train_and_evaluate(config: CompareConfig, recipe: TrainConfig, variant: str, seed: int, workspace: Workspace,
                        out_dir: Path, keep: int) -> dict[str, Any]:
    from protoclip_cli.runs import RunDir
    from protoclip_cli.stages import evaluate, train

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
        "train_seconds": _train_seconds(run), "metrics": results,
    }
    if variant in config.curves:
        record["curve"] = _curve(config, recipe, run, workspace, out_dir, manifest, keep, (final, results))
    return record


def _final_results(run, checkpoint: Path) -> dict[str, dict] | None:
    """The metrics of every task's ``eval/<task>.json`` when all were made from ``checkpoint``, else None."""
    from protoclip_cli.evaluation.results import checkpoint_results, read_results
    from protoclip_cli.stages.evaluate import BASE_TASKS

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


def _curve(config: CompareConfig, recipe: TrainConfig, run, workspace: Workspace, out_dir: Path, manifest: dict,
           keep: int, final: tuple[Path, dict]) -> dict[str, dict]:
    """Zero-shot and linear-probe top-1 of the checkpoints closing every ``curve_every``-th episode
    (the last one's are the final evaluation's, ``final`` = (checkpoint, metrics by task))."""
    from protoclip_cli.training.checkpoint import checkpoint_path

    steps = manifest["steps_per_episode"]
    batch = recipe.data.batch_size * int(manifest["world_size"])
    episodes = [e for e in range(len(steps)) if (e + 1) % config.curve_every == 0 or e == len(steps) - 1]
    points: dict[str, dict] = {}
    for episode in episodes:
        step = sum(steps[: episode + 1])
        target = out_dir / "curves" / run.name / f"step-{step:08d}.json"
        if target.is_file():
            points[str(step * batch)] = json.loads(target.read_text())["metrics"]
            continue
        checkpoint = checkpoint_path(run.path, step)
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
    from protoclip_cli.training.checkpoint import list_checkpoints

    for old in list_checkpoints(run.path)[: -max(1, keep)]:
        old.unlink(missing_ok=True)


def _score_checkpoint(config: CompareConfig, run, workspace: Workspace, checkpoint: Path) -> dict[str, dict]:
    """Zero-shot and linear probe of one checkpoint on the held-out split, features not cached."""
    from protoclip_cli.evaluation import datasets, models, tasks
    from protoclip_cli.stages.evaluate import EvaluateConfig

    defaults = EvaluateConfig()
    model = models.from_run(run, checkpoint, config.device)
    dataset = run.config().data.dataset
    test = datasets.embedded(workspace, dataset, defaults.heldout_split)
    common = dict(cache_dir=None, batch_size=defaults.batch_size, workers=config.eval_workers)
    return {
        "zeroshot": tasks.zeroshot(model, test, None, **common)["metrics"],
        "linear-probe": tasks.linear_probe(
            model, datasets.embedded(workspace, dataset, "train"), test, method=defaults.probe_method,
            weight_decays=defaults.probe_weight_decays, seed=defaults.seed, **common,
        )["metrics"],
    }


def _write_results(config: CompareConfig, recipe: Path, records: dict[str, dict], jobs: list, out_dir: Path,
                   seconds: float) -> dict[str, Any]:
    """compare.json, compare.md and curves.png from the runs finished so far."""
    from protoclip_cli.evaluation import comparison

    values: dict[str, dict[str, list[float]]] = {}
    for variant in config.variants:
        finished = [r for r in records.values() if r["variant"] == variant]
        if finished:
            values[variant] = {m.label: [float(r["metrics"][m.task][m.key]) for r in finished] for m in comparison.METRICS}
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
    text = "\n".join([
        f"# protoclip compare: {config.name}",
        "",
        f"{len(records)} of {len(jobs)} runs finished; recipe {recipe}, {samples} samples seen per run, "
        f"held-out split of the training data set.",
        "",
        comparison.markdown(cells, BASELINE),
        "Variants: " + "; ".join(f"{v}: {VARIANTS[v][0]}" for v in values) + ".",
    ])
    write_text(out_dir / "compare.md", text + "\n")
    if curves:
        comparison.plot_curves(curves, out_dir / "curves.png", f"{config.name}: held-out accuracy against samples seen")
    result = {
        "config": config_io.to_dict(config), "recipe": str(recipe), "baseline": BASELINE,
        "noise_rule": comparison.NOISE_RULE, "samples_seen": samples, "runs_finished": len(records),
        "runs_planned": len(jobs), "wall_seconds": round(seconds, 1),
        "variants": {v: {"description": VARIANTS[v][0], "overrides": list(VARIANTS[v][1])} for v in config.variants},
        "runs": records,
        "table": {v: {label: c.to_json() for label, c in row.items()} for v, row in cells.items()},
        "curves": {label: {v: {str(x): ys for x, ys in sorted(p.items())} for v, p in per.items()} for label, per in curves.items()},
    }
    write_json(out_dir / "compare.json", result)
    return result
