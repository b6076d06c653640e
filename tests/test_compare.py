"""`protoclip compare`: the table's statistics, the noise rule, reuse of finished runs, errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import linked_workspace
from helpers import REPO

from protoclip_cli.configs import recipes
from protoclip_cli.evaluation.reports import comparison

RECIPE = recipes.path("synthetic")


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
    """2 variants x 2 seeds, 4 episodes of 256 samples (4 steps of 64) each: two prototype episodes
    between the warm-up and the LiT finish, two passes over the 512 samples; and one seed of
    OpenCLIP's own trainer with the CLIP variant's settings."""
    from protoclip_cli.configs.compare import CompareConfig
    from protoclip_cli.stages.compare import run

    config = CompareConfig(
        name="t-compare", variants=("clip", "open_clip_train", "protoclip"), seeds=2,
        variant_seeds=("open_clip_train=1",), episodes=4, curves=("protoclip",), curve_every=2,
        recipe_set=("data.episode_size=256", "data.workers=1", "logging.checkpoint_every_steps=0"),
        device="cpu", eval_workers=0,
    )
    return config, run(config, compare_workspace)


def test_table_numbers_are_the_statistics_of_the_runs_eval_files(compared, compare_workspace):
    config, result = compared
    assert result["runs_finished"] == result["runs_planned"] == 5
    assert result["samples_seen"] == 4 * 4 * 64
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
    # curve_every = 2 of 4 episodes: after episode 1 (step 8) and the last (step 16).
    assert set(result["curves"]["zero-shot top-1 (%)"]) == {"protoclip"}
    points = result["curves"]["linear probe top-1 (%)"]["protoclip"]
    assert set(points) == {str(8 * 64), str(16 * 64)}
    folder = compare_workspace.compare_dir("t-compare") / "curves"
    for seed in (0, 1):
        run = compare_workspace.run_dir(f"t-compare-protoclip-s{seed}")
        middle = json.loads((folder / run.name / "step-00000008.json").read_text())
        assert (middle["step"], middle["samples_seen"], Path(middle["checkpoint"]).name) == (8, 8 * 64, "step-00000008.pt")
        assert points[str(8 * 64)][seed] == middle["metrics"]["linear-probe"]["top1"]
        # The last point is the final checkpoint's own evaluation.
        assert points[str(16 * 64)][seed] == _eval_value(run, "linear-probe", "top1")
        # Scored checkpoints are pruned to the recipe's newest two once the curve is written.
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000012.pt", "step-00000016.pt"]
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
    again = compare.run(config, compare_workspace)
    assert again["table"] == first["table"] and again["curves"] == first["curves"]


def test_a_run_folder_of_another_configuration_is_refused_before_any_training(compared, compare_workspace, monkeypatch):
    from dataclasses import replace

    from protoclip_cli.errors import ProtoclipError
    from protoclip_cli.stages import compare, train

    config, _ = compared
    monkeypatch.setattr(train, "run", lambda *a, **k: (_ for _ in ()).throw(AssertionError("trained")))
    changed = replace(config, recipe_set=(*config.recipe_set, "optim.lr=2e-3"))
    with pytest.raises(ProtoclipError) as error:
        compare.run(changed, compare_workspace)
    message = " ".join(str(error.value).split())
    assert "t-compare-clip-s0 holds a run with another configuration (differs in optim.lr)" in message
    assert "pick another run name with compare --name NEW, or delete the folder." in message


@pytest.mark.parametrize(
    "args, message",
    [
        (["--variants", "clip,protoclip,no-cake"], "Unknown variant 'no-cake'; choose from clip, open_clip_train, protoclip, eval-extraction,"),
        (["--variant-seeds", "clip"], "--variant-seeds 'clip' is not VARIANT=N with a known variant and N >= 1 (e.g. clip=5)."),
        (["--curves", "clip,open_clip_train"], "--curves cannot score open_clip_train"),
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

    spec = importlib.util.spec_from_file_location("prototype_quality", REPO / "benchmarks" / "prototype_quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "quality.json"
    assert module.main(["--workspace", str(compare_workspace.root), "t-compare-protoclip-s0", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["t-compare-protoclip-s0"]
    assert [r["episode"] for r in rows] == [1, 2]  # the prototype episodes between the warm-up and the LiT finish
    row = rows[0]
    assert row["samples"] == 256
    assert all(0.0 <= row[f"{m}_ami_label"] <= 1.0 for m in ("image", "text", "teacher"))
    assert 1 <= row["image_k_used"] <= 32
    run = compare_workspace.run_dir("t-compare-protoclip-s0")
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    accuracies = [s["acc_img2txt"] for s in steps if s.get("kind") == "step" and s["episode"] == 1]
    assert row["acc_img2txt"] == pytest.approx(np.mean(accuracies), abs=1e-4)


def test_the_peer_is_open_clip_train_with_the_clip_settings_on_the_same_shards(compared, compare_workspace):
    """The open_clip_train row: its command line carries the CLIP variant's settings, it saw the same
    samples, and its checkpoint was scored by the same evaluation as the runs."""
    config, result = compared
    (peer,) = [r for r in result["runs"].values() if r["variant"] == "open_clip_train"]
    clip = compare_workspace.run_dir("t-compare-clip-s0")
    recipe = json.loads((clip / "manifest.json").read_text())["config"]
    arguments = peer["arguments"]

    def argument(flag):
        return arguments[arguments.index(flag) + 1]

    assert argument("--model") == recipe["model"]["arch"] and argument("--seed") == "0"
    assert float(argument("--lr")) == recipe["optim"]["lr"] and float(argument("--wd")) == recipe["optim"]["weight_decay"]
    assert int(argument("--warmup")) == recipe["schedule"]["warmup_steps"]
    assert int(argument("--batch-size")) == recipe["data"]["batch_size"]
    shards = sorted(compare_workspace.split_dir("synthetic").glob("*.tar"))
    assert argument("--train-data").split("::") == [str(p) for p in shards]
    # two passes over the 512 samples = the runs' 4 episodes of 256
    assert (argument("--train-num-samples"), argument("--epochs")) == ("512", "2")
    assert peer["samples_seen"] == result["samples_seen"] and peer["wall_seconds"] > 0
    zeroshot = json.loads((Path(peer["run"]) / "eval" / "zeroshot-synthetic.json").read_text())
    assert zeroshot["model"]["path"] == peer["checkpoint"] and zeroshot["metrics"] == peer["metrics"]["zeroshot"]
    assert result["table"]["open_clip_train"]["zero-shot top-1 (%)"]["values"] == [zeroshot["metrics"]["top1"]]
    assert result["cost"]["open_clip_train"]["values"] == [peer["wall_seconds"]]


def test_open_clip_train_reads_webdataset_shards_with_the_end_of_shard_workaround(synthetic_workspace):
    """open_clip_train 3.3's reader fails on webdataset's end-of-shard marker (KeyError: 'fname');
    the peer binds eof_value=None and reads every sample."""
    import open_clip_train.data as peer_data

    from protoclip_cli.training import open_clip_peer

    shard = str(sorted(synthetic_workspace.split_dir("synthetic").glob("*.tar"))[0])
    original = peer_data.tar_file_expander
    try:
        with pytest.raises(KeyError, match="fname"):
            list(peer_data.tarfile_to_samples_nothrow([{"url": shard}]))
        open_clip_peer._without_end_of_shard_marker()
        samples = list(peer_data.tarfile_to_samples_nothrow([{"url": shard}]))
    finally:
        peer_data.tar_file_expander = original
    assert len(samples) == 128 and all({"jpg", "txt"} <= set(s) for s in samples)


def test_a_budget_that_is_not_whole_passes_is_refused_for_the_peer(tmp_path):
    from protoclip_cli import config as config_io
    from protoclip_cli.configs.train import TrainConfig
    from protoclip_cli.errors import ProtoclipError
    from protoclip_cli.training.open_clip_peer import peer_arguments

    recipe = config_io.load(TrainConfig, RECIPE, [])
    with pytest.raises(ProtoclipError, match="not a multiple of it: choose --episodes"):
        peer_arguments(recipe, [tmp_path / "a.tar"], 512, 768, tmp_path, "cpu")
    # 3 shards over 2 loader workers: open_clip_train would read 2 shards' batches per epoch, not 3.
    two_workers = config_io.load(TrainConfig, RECIPE, ["data.workers=2"])
    with pytest.raises(ProtoclipError, match="it would train fewer samples than this project"):
        peer_arguments(two_workers, [tmp_path / f"{i}.tar" for i in range(3)], 768, 1536, tmp_path, "cpu")


def test_the_peer_refuses_shards_on_s3_in_one_sentence(tmp_path):
    """open_clip_train opens shards with webdataset's gopen, which has no s3:// opener: the peer row says
    so before starting it, where open_clip_train would fail in its data-loader workers."""
    from helpers import small_config, write_tiny_dataset
    from protoclip_cli.configs.compare import CompareConfig
    from protoclip_cli.errors import ProtoclipError
    from protoclip_cli.stages import compare
    from protoclip_cli.workspace import Workspace

    workspace = Workspace.at(tmp_path / "ws")
    write_tiny_dataset(workspace, train=64, heldout=32, per_shard=32)
    workspace.record_shards_at("synthetic", "s3://bucket/synthetic", {"train": {"00000.tar": 32, "00001.tar": 32}})
    with pytest.raises(ProtoclipError, match=r"cannot read the s3:// shards of 'synthetic' .* --shards-at 'pipe:aws s3 cp"):
        compare._train_and_evaluate_peer(CompareConfig(), small_config(), 0, workspace, tmp_path / "out", 64)
    assert not (tmp_path / "out").exists()


def test_curve_points_follow_samples_whatever_the_episode_size():
    from protoclip_cli.stages.compare import curve_episodes

    assert curve_episodes([1024 * (e + 1) for e in range(12)], 2048) == [1, 3, 5, 7, 9, 11]
    assert curve_episodes([2048 * (e + 1) for e in range(6)], 2048) == [0, 1, 2, 3, 4, 5]
    assert curve_episodes([4096, 8192, 12288], 2048) == [0, 1, 2]
    assert curve_episodes([1000, 2100, 3000], 2048) == [1, 2]


def test_episode_size_variants_keep_the_budget(compare_workspace):
    from protoclip_cli.configs.compare import CompareConfig
    from protoclip_cli.stages.compare import variant_overrides, variant_recipe

    config = CompareConfig(episodes=12, variants=("clip", "episode-2048", "episode-all"), curves=("clip",))
    for variant, size, episodes in (("episode-2048", 2048, 6), ("episode-all", 0, 3)):
        recipe = variant_recipe(config, RECIPE, variant, 0, 4096)
        assert (recipe.data.episode_size, recipe.schedule.episodes) == (size, episodes)
        assert variant_overrides(config, RECIPE, variant, 4096)[-2:] == [f"data.episode_size={size}", f"schedule.episodes={episodes}"]
    from protoclip_cli.errors import ProtoclipError

    with pytest.raises(ProtoclipError, match="whole number of its episodes of 2048"):
        variant_recipe(CompareConfig(episodes=11, variants=("clip", "episode-2048"), curves=()), RECIPE, "episode-2048", 0, 4096)


def test_samples_to_reach_interpolates_the_mean_curve_to_the_baseline_final_mean():
    rng = np.random.default_rng(3)
    label = "linear probe top-1 (%)"
    clip_final = rng.uniform(30, 35, size=3).tolist()
    cells = comparison.table({"clip": {label: clip_final}, "protoclip": {label: clip_final}}, "clip")
    target = float(np.mean(clip_final))
    below, above = target - rng.uniform(1, 3), target + rng.uniform(0.5, 2)
    curves = {label: {
        "protoclip": {2048: [below - 5] * 3, 4096: [below - 0.3, below, below + 0.3], 6144: [above - 1, above, above + 1]},
        "never": {2048: [target - 4] * 3, 4096: [target - 1] * 3},
        "early": {2048: [target + 1] * 3},
    }}
    found = comparison.samples_to_reach(curves, cells, "clip")
    entry = found["protoclip"][label]
    assert entry["target"] == pytest.approx(target)
    assert entry["samples"] == pytest.approx(4096 + (target - below) / (above - below) * 2048)
    assert entry["points"] == [[4096, pytest.approx(below)], [6144, pytest.approx(above)]]
    assert found["never"][label]["samples"] is None and "n/a" in comparison.format_reach(found["never"][label], 12288)
    assert found["early"][label]["samples"] == 2048 and comparison.format_reach(found["early"][label], 12288).startswith("<= 2,048")
