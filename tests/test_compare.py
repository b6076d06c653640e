"""`protoclip compare`: the table's statistics, the noise rule, reuse of finished runs, errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from conftest import linked_workspace
from protoclip_cli.evaluation import comparison

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "synthetic.toml"


def test_mean_and_std_are_the_sample_statistics():
    rng = np.random.default_rng(0)
    values = rng.normal(size=5).tolist()
    mean, std = comparison.mean_std(values)
    assert mean == pytest.approx(np.mean(values)) and std == pytest.approx(np.std(values, ddof=1))
    assert comparison.mean_std([2.5]) [0] == 2.5 and math.isnan(comparison.mean_std([2.5])[1])


@pytest.mark.parametrize(
    "variant, baseline, exceeds",
    [
        ([10.0, 11.0, 12.0], [5.0, 6.0, 7.0], True),  # d = 5, se = sqrt(1/3 + 1/3) = 0.816: 5 > 1.63
        ([10.0, 11.0, 12.0], [9.0, 10.0, 11.0], False),  # d = 1 < 1.63
        ([1.0, 1.0], [1.0, 1.0], False),  # no spread and no difference
    ],
)
def test_noise_rule_is_two_standard_errors_of_the_difference(variant, baseline, exceeds):
    diff, se, verdict = comparison.difference(variant, baseline)
    expected_se = math.sqrt(np.var(variant, ddof=1) / len(variant) + np.var(baseline, ddof=1) / len(baseline))
    assert diff == pytest.approx(np.mean(variant) - np.mean(baseline))
    assert se == pytest.approx(expected_se)
    assert verdict is exceeds and verdict == (abs(diff) > 2 * expected_se)


def test_one_seed_gives_no_verdict_and_the_table_says_so():
    assert comparison.difference([3.0], [1.0, 2.0]) == (pytest.approx(1.5), None, None)
    cells = comparison.table({"clip": {"m (%)": [1.0]}, "protoclip": {"m (%)": [3.0]}}, "clip")
    text = comparison.markdown(cells, "clip")
    assert "| clip (baseline) | 1.00 |" in text and "| protoclip | 3.00 (+2.00?) |" in text


def _eval_value(run: Path, task: str, key: str) -> float:
    return json.loads((run / "eval" / f"{task}.json").read_text())["metrics"][key]


@pytest.fixture(scope="module")
def compare_workspace(synthetic_teacher, synthetic_workspace, tmp_path_factory):
    """The comparison's runs live in a workspace of their own (the data set and its teacher linked)."""
    return linked_workspace(synthetic_workspace, tmp_path_factory.mktemp("compare") / "ws")


@pytest.fixture(scope="module")
def compared(compare_workspace):
    """2 variants x 2 seeds, 3 episodes of 256 samples (4 steps of 64) each: the smallest comparison
    with one prototype episode between the warm-up and the LiT finish."""
    from protoclip_cli.stages.compare import CompareConfig, run

    config = CompareConfig(
        name="t-compare", variants=("clip", "protoclip"), seeds=2, episodes=3, curves=("protoclip",), curve_every=2,
        recipe_set=("data.episode_size=256", "data.workers=1", "logging.checkpoint_every_steps=0"),
        device="cpu", eval_workers=0,
    )
    return config, run(config, compare_workspace, RECIPE)


def test_table_numbers_are_the_statistics_of_the_runs_eval_files(compared, compare_workspace):
    config, result = compared
    assert result["runs_finished"] == result["runs_planned"] == 4
    assert result["samples_seen"] == 3 * 4 * 64
    for variant in ("clip", "protoclip"):
        runs = [compare_workspace.run_dir(f"t-compare-{variant}-s{seed}") for seed in (0, 1)]
        for metric in comparison.METRICS:
            cell = result["table"][variant][metric.label]
            values = [_eval_value(run, metric.task, metric.key) for run in runs]
            assert cell["values"] == values
            assert cell["mean"] == pytest.approx(np.mean(values))
            assert cell["std"] == pytest.approx(np.std(values, ddof=1))
            if variant == "protoclip":
                base = [_eval_value(r.parent / r.name.replace("protoclip", "clip"), metric.task, metric.key) for r in runs]
                diff, se, exceeds = comparison.difference(values, base)
                assert (cell["diff"], cell["se"], cell["exceeds_noise"]) == (pytest.approx(diff), pytest.approx(se), exceeds)
                assert cell["diff"] == pytest.approx(np.mean(values) - np.mean(base))
    # The runs' evaluations draw no plots of their own by default (--eval-plots): the comparison draws its curves.
    assert not list(compare_workspace.runs_dir.glob("t-compare-*/eval/*.png"))
    # The seeds are different runs: the CLIP runs of seed 0 and 1 differ.
    assert len(set(result["table"]["clip"]["zero-shot top-1 (%)"]["values"])) == 2
    out = compare_workspace.compare_dir("t-compare")
    text = (out / "compare.md").read_text()
    proto = result["table"]["protoclip"]["zero-shot top-1 (%)"]
    assert comparison.format_cell(comparison.Cell.from_json(proto), 2) in text
    assert comparison.NOISE_RULE in text
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "compare.json").read_text())["table"] == result["table"]


def test_curves_score_the_episode_checkpoints(compared, compare_workspace):
    from protoclip_cli.runs import RunDir
    from protoclip_cli.stages.compare import _score_checkpoint

    config, result = compared
    # curve_every = 2 of 3 episodes: after episode 1 (step 8) and the last (step 12).
    assert set(result["curves"]["zero-shot top-1 (%)"]) == {"protoclip"}
    points = result["curves"]["linear probe top-1 (%)"]["protoclip"]
    assert set(points) == {str(8 * 64), str(12 * 64)}
    folder = compare_workspace.compare_dir("t-compare") / "curves"
    for seed in (0, 1):
        run = compare_workspace.run_dir(f"t-compare-protoclip-s{seed}")
        middle = json.loads((folder / run.name / "step-00000008.json").read_text())
        assert (middle["step"], middle["samples_seen"], Path(middle["checkpoint"]).name) == (8, 8 * 64, "step-00000008.pt")
        assert points[str(8 * 64)][seed] == middle["metrics"]["linear-probe"]["top1"]
        # The last point is the final checkpoint's own evaluation.
        assert points[str(12 * 64)][seed] == _eval_value(run, "linear-probe", "top1")
        # Scored checkpoints are pruned to the recipe's newest two once the curve is written.
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000008.pt", "step-00000012.pt"]
    # The scorer follows evaluate's protocol: on the final checkpoint it gives evaluate's numbers.
    run = RunDir(compare_workspace.run_dir("t-compare-protoclip-s0"))
    scored = _score_checkpoint(config, run, compare_workspace, run.checkpoint())
    for task in ("zeroshot", "linear-probe"):
        assert scored[task] == json.loads((run.eval_dir / f"{task}.json").read_text())["metrics"]


def test_rerun_reuses_finished_runs_and_evaluations(compared, compare_workspace, monkeypatch):
    from protoclip_cli.stages import compare, evaluate, train

    config, first = compared

    def refuse(*args, **kwargs):
        raise AssertionError("a finished run or evaluation was redone")

    monkeypatch.setattr(train, "run", refuse)
    monkeypatch.setattr(evaluate, "run", refuse)
    monkeypatch.setattr(compare, "_score_checkpoint", refuse)
    again = compare.run(config, compare_workspace, RECIPE)
    assert again["table"] == first["table"] and again["curves"] == first["curves"]


def test_a_run_folder_of_another_configuration_is_refused_before_any_training(compared, compare_workspace, monkeypatch):
    from dataclasses import replace

    from protoclip_cli.errors import ProtoclipError
    from protoclip_cli.stages import compare, train

    config, _ = compared
    monkeypatch.setattr(train, "run", lambda *a, **k: (_ for _ in ()).throw(AssertionError("trained")))
    changed = replace(config, recipe_set=(*config.recipe_set, "optim.lr=2e-3"))
    with pytest.raises(ProtoclipError) as error:
        compare.run(changed, compare_workspace, RECIPE)
    message = " ".join(str(error.value).split())
    assert "t-compare-clip-s0 holds a run with another configuration (differs in optim.lr)" in message
    assert "pick another run name with compare --name NEW, or delete the folder." in message


@pytest.mark.parametrize(
    "args, message",
    [
        (["--variants", "clip,protoclip,no-cake"], "Unknown variant 'no-cake'; choose from clip, protoclip, no-pbt, no-teacher, hard-targets, single-pass."),
        (["--variants", "protoclip"], "--variants must include the baseline 'clip': the table's differences are to it."),
        (["--seeds", "0"], "--seeds is 0; train at least one seed (3 for a spread)."),
    ],
)
def test_bad_options_are_one_sentence(args, message, tmp_path):
    from typer.testing import CliRunner

    from protoclip_cli.cli import app

    result = CliRunner().invoke(app, ["compare", *args, "--workspace", str(tmp_path)])
    assert result.exit_code == 1, result.output
    assert message in " ".join(result.output.split())
    assert not (tmp_path / "runs").exists() and not (tmp_path / "compare").exists()


def test_a_missing_data_set_is_named_before_any_run(tmp_path):
    from typer.testing import CliRunner

    from protoclip_cli.cli import app

    result = CliRunner().invoke(app, ["compare", "--workspace", str(tmp_path)])
    assert result.exit_code == 1
    assert "protoclip download synthetic" in " ".join(result.output.split())
    assert not (tmp_path / "runs").exists()


def test_prototype_quality_reads_each_prototype_episode(compared, compare_workspace, tmp_path):
    """benchmarks/prototype_quality.py on a compared ProtoCLIP run: its one prototype episode (1),
    AMI against the classes in [0, 1], and the episode's mean prototype accuracy from metrics.jsonl."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("prototype_quality", RECIPE.parents[1] / "benchmarks" / "prototype_quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "quality.json"
    assert module.main(["--workspace", str(compare_workspace.root), "t-compare-protoclip-s0", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["t-compare-protoclip-s0"]
    assert row["episode"] == 1 and row["samples"] == 256
    assert all(0.0 <= row[f"{m}_ami_label"] <= 1.0 for m in ("image", "text", "teacher"))
    assert 1 <= row["image_k_used"] <= 32
    run = compare_workspace.run_dir("t-compare-protoclip-s0")
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    accuracies = [s["acc_img2txt"] for s in steps if s.get("kind") == "step" and s["episode"] == 1]
    assert row["acc_img2txt"] == pytest.approx(np.mean(accuracies), abs=1e-4)
