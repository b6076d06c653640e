"""Several data sets in one run (``data.datasets``, ``data.weights``): episodes drawn over the union
with OpenCLIP's upsampling weights, keys unique across data sets, a teacher file per data set, and
the recipe checks. The end-to-end run on two embedded sets is in test_train_options.py."""

from __future__ import annotations

import json
from collections import Counter

import h5py
import numpy as np
import pytest
import torch

from protoclip_cli.config import ConfigError
from protoclip_cli.data.sources import KEY_STRIDE, RunDatasets, run_datasets, split_keys
from protoclip_cli.errors import ProtoclipError
from protoclip_cli.configs.train import DataConfig, TrainConfig
from protoclip_cli.training.episodes import plan_episodes


def _union(a_shards: int, b_shards: int, samples: int = 100) -> dict[str, int]:
    return {**{f"a/{i:05d}.tar": samples for i in range(a_shards)}, **{f"b/{i:05d}.tar": samples for i in range(b_shards)}}


def test_weights_are_upsampling_factors_over_the_union():
    counts = _union(10, 5)
    weights = {s: (2.0 if s.startswith("b/") else 1.0) for s in counts}
    plan = plan_episodes(counts, episodes=40, episode_size=400, seed=1, weights=weights)
    assert all(len(e) == len(set(e)) == 4 for e in plan.episodes)  # never a shard twice in an episode
    used = Counter(s for e in plan.episodes for s in e)
    # 40 episodes x 4 shards = 160 = 8 rounds of (10 shards x 1 + 5 shards x 2): each a-shard about 8
    # times, each b-shard about 16 (twice as often), so b gives half the samples although it is a third.
    assert all(abs(used[s] - 8) <= 1 for s in counts if s.startswith("a/"))
    assert all(abs(used[s] - 16) <= 1 for s in counts if s.startswith("b/"))
    assert plan.weights == weights and plan_episodes(counts, 40, 400, seed=1, weights=weights).episodes == plan.episodes


def test_weights_are_relative_and_fractions_are_drawn():
    counts = _union(8, 8)
    double = {s: (2.0 if s.startswith("b/") else 1.0) for s in counts}
    halves = {s: (1.0 if s.startswith("b/") else 0.5) for s in counts}
    assert plan_episodes(counts, 12, 300, 0, weights=double).episodes == plan_episodes(counts, 12, 300, 0, weights=halves).episodes
    uneven = {s: (1.5 if s.startswith("b/") else 1.0) for s in counts}
    used = Counter(s[0] for e in plan_episodes(counts, 200, 400, 3, weights=uneven).episodes for s in e)
    assert used["b"] / used["a"] == pytest.approx(1.5, rel=0.1)


def test_equal_weights_plan_exactly_as_one_data_set():
    counts = _union(6, 3)
    ones = {s: 1.0 for s in counts}
    assert plan_episodes(counts, 9, 300, 2, weights=ones).episodes == plan_episodes(counts, 9, 300, 2).episodes


def test_keys_carry_the_data_set_in_their_high_digits():
    datasets = run_datasets(DataConfig(datasets=("cc3m", "cc12m"), weights=(1, 2)))
    assert datasets == RunDatasets(("cc3m", "cc12m"), (1.0, 2.0)) and not datasets.uniform
    assert datasets.shard_id(1, "00003.tar") == "cc12m/00003.tar" and datasets.key_offset(1) == KEY_STRIDE
    keys = np.array([5, 120_000_007, KEY_STRIDE + 5, 3 * KEY_STRIDE + 999_999_999_999])
    index, local = split_keys(keys)
    assert index.tolist() == [0, 0, 1, 3] and local.tolist() == [5, 120_000_007, 5, 999_999_999_999]
    one = run_datasets(DataConfig(dataset="synthetic"))
    assert one == RunDatasets(("synthetic",), (1.0,)) and one.shard_id(0, "00003.tar") == "00003.tar"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (DataConfig(datasets=("a", "b"), weights=(1,)), "data.weights has 1 value for 2 data sets"),
        (DataConfig(weights=(1, 2)), "data.weights has 2 values for 1 data set"),
        (DataConfig(datasets=("a", "b"), weights=(1, 0)), "data.weights must be positive"),
        (DataConfig(datasets=("a", "a")), "data.datasets names 'a' twice"),
        (DataConfig(datasets=("a", "")), "data.datasets holds an empty name"),
        (DataConfig(datasets=("a", "b"), weights=(1, 2), episode_size=0), "data.weights need episodes of part of the"),
    ],
)
def test_recipe_refuses_inconsistent_data_sets(data, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(data=data)


def test_recipe_with_several_data_sets_loads(tmp_path):
    from protoclip_cli import config

    path = tmp_path / "mix.toml"
    path.write_text('[data]\ndatasets = ["cc3m", "cc12m"]\nweights = [1, 2.5]\n')
    loaded = config.load(TrainConfig, path)
    assert loaded.data.datasets == ("cc3m", "cc12m") and loaded.data.weights == (1.0, 2.5)
    assert TrainConfig().data.datasets == () and TrainConfig().data.weights == ()
    copy = tmp_path / "copy.toml"
    copy.write_text(config.dumps(loaded))
    assert config.load(TrainConfig, copy) == loaded


def _teacher_file(path, keys, dim: int = 4, pca_components=None):
    with h5py.File(path, "w") as f:
        f.create_dataset("keys", data=np.asarray(keys, dtype=np.int64))
        rows = np.arange(len(keys) * dim, dtype=np.float32).reshape(len(keys), dim) + (100 if "b" in path.name else 0)
        f.create_dataset("embeddings", data=rows)
        f.attrs.update({"model": "m", "dimension": dim, "pca_dim": 0 if pca_components is None else dim})
        if pca_components is not None:
            f.create_dataset("pca_components", data=pca_components)
    return path


def test_teacher_rows_come_from_each_keys_data_set(tmp_path):
    from protoclip_cli.data.teacher_file import run_teacher_rows

    a = _teacher_file(tmp_path / "a.h5", [1, 2, 3])
    b = _teacher_file(tmp_path / "b.h5", [1, 2])
    keys = torch.tensor([KEY_STRIDE + 2, 3, 1, KEY_STRIDE + 1])
    rows = run_teacher_rows([a, b], keys)
    with h5py.File(a) as fa, h5py.File(b) as fb:
        expected = np.stack([fb["embeddings"][1], fa["embeddings"][2], fa["embeddings"][0], fb["embeddings"][0]])
    assert torch.equal(rows, torch.from_numpy(expected))
    with pytest.raises(ProtoclipError, match="has no row for sample 7"):
        run_teacher_rows([a, b], torch.tensor([KEY_STRIDE + 7]))


def test_a_workers_teacher_lookup_keeps_its_files_open_and_serves_repeated_keys(tmp_path):
    """The data loader's lookup: a topped-up batch may hold a sample twice, in any order."""
    from protoclip_cli.data.teacher_file import TeacherRows

    a = _teacher_file(tmp_path / "a.h5", [2, 5, 9])
    b = _teacher_file(tmp_path / "b.h5", [4])
    with h5py.File(a) as fa, h5py.File(b) as fb:
        ea, eb = fa["embeddings"][:], fb["embeddings"][:]
    lookup = TeacherRows((str(a), str(b)))
    rows = lookup.rows(torch.tensor([9, KEY_STRIDE + 4, 2, 9, KEY_STRIDE + 4]))
    assert torch.equal(rows, torch.from_numpy(np.stack([ea[2], eb[0], ea[0], ea[2], eb[0]])))
    assert sorted(lookup._open) == [0, 1]  # both files stay open for the next batch
    assert torch.equal(lookup.rows(torch.tensor([5])), torch.from_numpy(ea[1:2]))
    assert lookup.rows(torch.tensor([], dtype=torch.int64)).shape == (0, 4)
    lookup.close()
    assert not lookup._open


def test_teacher_files_of_several_data_sets_must_share_one_space(tmp_path):
    from protoclip_cli.data.teacher_file import check_same_space

    plain = [_teacher_file(tmp_path / "a.h5", [1]), _teacher_file(tmp_path / "b.h5", [1])]
    check_same_space(plain)
    reduced = [_teacher_file(tmp_path / "pa.h5", [1], pca_components=np.eye(4, dtype=np.float32)),
               _teacher_file(tmp_path / "pb.h5", [1], pca_components=2 * np.eye(4, dtype=np.float32))]
    with pytest.raises(ProtoclipError, match="pca-dim 0"):
        check_same_space(reduced)
    wider = _teacher_file(tmp_path / "wide.h5", [1], dim=6)
    with pytest.raises(ProtoclipError, match="4 and 6 dimensions"):
        check_same_space([plain[0], wider])



# -- end to end: two embedded data sets of different seeds, weights 1 and 2 ----------------------

MIX = ["data.datasets=['mix-a', 'mix-b']", "data.weights=[1, 2]", "data.episode_size=256", "schedule.episodes=2",
       "schedule.lit_start_episode=99", "logging.checkpoint_every_steps=3", "logging.keep_checkpoints=10"]


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory, synthetic_teacher, synthetic_workspace):
    """Two embedded data sets trained together, each with its own teacher file: `mix-a` is the
    session's embedded set (512 samples, 4 shards of 128, generator seed 0), `mix-b` another one
    (256 samples, 4 shards of 64, seed 1); a warm-up and a prototype episode with the teacher."""
    import shutil

    from protoclip_cli.stages import download, teacher_embed
    from protoclip_cli.stages.train import run
    from protoclip_cli.workspace import Workspace
    from helpers import small_config

    torch.set_num_threads(2)
    workspace = Workspace.at(tmp_path_factory.mktemp("mixed"))
    shutil.copytree(synthetic_workspace.dataset_dir("synthetic"), workspace.dataset_dir("mix-a"))  # with its teacher
    download.run(download.DownloadConfig(name="mix-b", source="synthetic", synthetic_train_size=256,
                                         synthetic_heldout_size=32, samples_per_shard=64, seed=1), workspace)
    teacher_embed.run(teacher_embed.TeacherConfig(dataset="mix-b", model="all-MiniLM-L6-v2", batch_size=128), workspace)
    config = small_config("name='mixed'", *MIX, teacher="all-MiniLM-L6-v2")
    manifest = run(config, workspace)
    return config, workspace, manifest


def _dataset_keys(workspace, name: str) -> dict[str, list[int]]:
    from protoclip_cli.data.shards import shard_keys

    return {f"{name}/{p.name}": shard_keys(p) for p in workspace.shards(name)}


def test_several_data_sets_train_over_the_union_with_unique_keys(mixed_run):
    from protoclip_cli.evaluation.reports.prototype_report import read_episode
    from protoclip_cli.runs import RunDir
    from protoclip_cli.training.episodes import EpisodePlan

    config, workspace, manifest = mixed_run
    run_dir = RunDir(workspace.run_dir("mixed"))
    assert set(manifest["inputs"]) == {"dataset:mix-a", "dataset:mix-b"}
    assert manifest["teacher_files"] == [str(workspace.teacher_file(n, "all-MiniLM-L6-v2")) for n in ("mix-a", "mix-b")]
    plan = EpisodePlan.load(run_dir.plan_file)
    keys = {**_dataset_keys(workspace, "mix-a"), **_dataset_keys(workspace, "mix-b")}
    assert plan.counts == {shard: len(k) for shard, k in keys.items()} and len(keys) == 8
    assert plan.weights == {s: (1.0 if s.startswith("mix-a/") else 2.0) for s in keys}
    # img2dataset numbers both data sets' samples alike: their own keys collide.
    assert set(keys["mix-b/00000.tar"]) <= set(keys["mix-a/00000.tar"])
    # The prototype episode clustered exactly the samples of its shards, mix-b's keys moved by KEY_STRIDE.
    shards = plan.episodes[1]
    assert {s.split("/")[0] for s in shards} == {"mix-a", "mix-b"}
    expected = sorted(k + (KEY_STRIDE if s.startswith("mix-b/") else 0) for s in shards for k in keys[s])
    episode = read_episode(run_dir.prototypes_file(1))
    assert sorted(episode.keys.tolist()) == expected and len(set(expected)) == len(expected) == plan.samples(1)
    assert set(episode.labels) == {"image", "text", "teacher"}
    steps = [json.loads(line) for line in run_dir.metrics_file.read_text().splitlines()]
    proto = [s for s in steps if s.get("kind") == "step" and s["phase"] == "proto"]
    assert len(proto) == plan.samples(1) // 32 and all(np.isfinite(s["ext"]) and s["ext"] > 0 for s in proto)


def test_teacher_clusters_use_each_data_sets_own_teacher_rows(mixed_run):
    """The teacher k-means of the prototype episode ran on each key's row of its own data set's file
    (its labels are the nearest centroids of those rows), and a sample of mix-b whose img2dataset key
    mix-a also has got mix-b's row, not mix-a's."""
    from protoclip_cli.data.teacher_file import load_teacher, run_teacher_rows, teacher_rows
    from protoclip_cli.evaluation.reports.prototype_report import read_episode
    from protoclip_cli.runs import RunDir

    _, workspace, _ = mixed_run
    run_dir = RunDir(workspace.run_dir("mixed"))
    episode = read_episode(run_dir.prototypes_file(1))
    paths = [workspace.teacher_file(n, "all-MiniLM-L6-v2") for n in ("mix-a", "mix-b")]
    rows = run_teacher_rows(paths, torch.from_numpy(episode.keys))
    with h5py.File(run_dir.prototypes_file(1)) as f:
        centroids = torch.from_numpy(f["teacher"]["centroids"][:]).float()
    nearest = torch.cdist(rows, centroids).argmin(dim=1).numpy()
    assert (nearest == episode.labels["teacher"]).mean() > 0.95
    index, local = split_keys(episode.keys)
    a_keys = load_teacher(paths[0], embeddings=False)[0]
    shared = np.flatnonzero((index == 1) & np.isin(local, a_keys))
    assert shared.size  # mix-b samples whose own key is also one of mix-a's
    b_rows = teacher_rows(paths[1], torch.from_numpy(local[shared]))
    a_rows = teacher_rows(paths[0], torch.from_numpy(local[shared]))
    assert torch.equal(rows[shared], b_rows) and not torch.allclose(rows[shared], a_rows)


def test_a_run_over_several_data_sets_resumes_to_the_same_weights(mixed_run):
    from protoclip_cli.runs import RunDir
    from protoclip_cli.stages.train import run
    from protoclip_cli.core.checkpoint import load_checkpoint
    from protoclip_cli.training.episodes import EpisodePlan

    config, workspace, _ = mixed_run
    run_dir = RunDir(workspace.run_dir("mixed"))
    final = run_dir.latest_checkpoint()
    expected = load_checkpoint(final, map_location="cpu").model
    plan = EpisodePlan.load(run_dir.plan_file)
    first, total = plan.samples(0) // 32, (plan.samples(0) // 32) + (plan.samples(1) // 32)
    checkpoints = sorted(run_dir.checkpoints_dir.glob("*.pt"))
    steps = {int(p.stem.split("-")[1]): p for p in checkpoints}
    inside = [step for step in steps if first < step < total]  # inside the prototype episode
    assert inside, [p.name for p in checkpoints]
    for step, path in steps.items():
        if step > inside[0]:
            path.unlink()  # as if killed after that step
    run(config, workspace, resume=True)
    resumed = load_checkpoint(run_dir.latest_checkpoint(), map_location="cpu").model
    assert resumed.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(resumed[name], value), name


def test_the_cluster_report_reads_every_data_set_of_the_run(mixed_run):
    from protoclip_cli.configs.cluster import ClusterConfig
    from protoclip_cli.stages.cluster import report_episode

    _, workspace, _ = mixed_run
    report = report_episode(ClusterConfig(run="mixed", episode="1", grid_clusters=1, grid_samples=2, tsne_points=0),
                            workspace)
    assert report["samples"] > 0 and set(report["ground_truth"]) == {"image", "text", "teacher"}


def test_evaluate_says_which_data_set_of_the_run_it_reads(mixed_run):
    """No --dataset: the run's first data set, and the console says so; --dataset picks another."""
    from typer.testing import CliRunner

    from protoclip_cli.cli import app

    _, workspace, _ = mixed_run
    common = ["evaluate", "mixed", "--task", "modality-gap", "--workers", "0", "--device", "cpu", "--no-plots",
              "--workspace", str(workspace.root)]
    first = CliRunner().invoke(app, common)
    assert first.exit_code == 0, first.output
    said = " ".join(first.output.split())
    assert "Run mixed was trained on mix-a, mix-b; evaluating on the first, mix-a (pass --dataset NAME for another)." in said
    record = json.loads((workspace.run_dir("mixed") / "eval" / "modality-gap.json").read_text())
    assert record["data"] == "mix-a-heldout"
    other = CliRunner().invoke(app, [*common, "--dataset", "mix-b"])
    assert other.exit_code == 0, other.output
    assert "evaluating on the first" not in other.output
    record = json.loads((workspace.run_dir("mixed") / "eval" / "modality-gap-mix-b.json").read_text())
    assert record["data"] == "mix-b-heldout"

