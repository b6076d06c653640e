"""`cluster`: the prototype report of a trained run, and k-means of a stored feature file."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch

from helpers import RUN

torch.set_num_threads(2)


def _cli(*args: str):
    from typer.testing import CliRunner

    from protoclip_cli.cli import app

    return CliRunner().invoke(app, list(args))


def test_report_of_the_last_episode(trained_run, synthetic_workspace):
    from sklearn.metrics import adjusted_mutual_info_score

    from protoclip_cli.data.shards import iter_samples

    result = _cli("cluster", RUN, "--episode", "last", "--tsne-points", "120", "--device", "cpu",
                  "-w", str(synthetic_workspace.root))
    assert result.exit_code == 0, result.output
    last = max(int(p.name) for p in (trained_run / "episodes").iterdir() if p.name.isdigit())
    folder = trained_run / "cluster" / f"episode-{last}"
    for name in ("report.json", "grid-image.png", "grid-text.png", "tsne.png"):
        assert str(folder / name) in result.stdout
        assert (folder / name).stat().st_size > 0
    assert (folder / "tsne.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((folder / "report.json").read_text())

    with h5py.File(trained_run / "episodes" / str(last) / "prototypes.h5", "r") as f:
        keys = f["keys"][:]
        labels = {m: f[m]["labels"][:] for m in ("image", "text", "teacher") if m in f}
    assert set(report["modalities"]) == set(labels) == {"image", "text", "teacher"}
    truth_by_key = {s.key: s.meta["label"] for s in iter_samples(synthetic_workspace.shards("synthetic"), images=False)}
    truth = np.array([truth_by_key[int(k)] for k in keys])
    for modality, stats in report["modalities"].items():
        assert sum(stats["sizes"]) == stats["n"] == len(keys) == report["samples"]
        assert stats["empty"] == stats["sizes"].count(0)
        assert sum(b["clusters"] for b in stats["histogram"]) == stats["k"]
        purity = sum(np.bincount(truth[labels[modality] == c]).max() for c in np.unique(labels[modality])) / len(keys)
        assert report["ground_truth"][modality]["purity"] == pytest.approx(purity)
        assert -1 <= report["ground_truth"][modality]["ami"] <= 1
    assert report["agreement"]["image-text"]["ami"] == pytest.approx(
        adjusted_mutual_info_score(labels["image"], labels["text"])
    )
    assert set(report["agreement"]) == {"image-text", "image-teacher", "text-teacher"}


def test_report_of_a_missing_episode_is_an_error(trained_run, synthetic_workspace):
    result = _cli("cluster", RUN, "--episode", "999", "-w", str(synthetic_workspace.root))
    assert result.exit_code == 1 and "has no episode 999" in result.output


def test_features_mode_writes_labels_and_centroids(synthetic_teacher, tmp_path):
    out = tmp_path / "teacher-k8.h5"
    result = _cli("cluster", "--features", str(synthetic_teacher), "--k", "8", "--backend", "torch", "--out", str(out))
    assert result.exit_code == 0, result.output
    with h5py.File(synthetic_teacher, "r") as f:
        keys, embeddings = f["keys"][:], f["embeddings"][:]
    with h5py.File(out, "r") as f:
        assert f["labels"].shape == (len(keys),) and f["labels"].dtype == np.int64
        assert f["centroids"].shape == (8, embeddings.shape[1])
        np.testing.assert_array_equal(f["keys"][:], keys)
        labels, centroids = f["labels"][:], f["centroids"][:]
    assert labels.min() >= 0 and labels.max() < 8
    # Each point is assigned to its nearest centroid (Lloyd's fixed point after the last step).
    distances = ((embeddings[:, None, :] - centroids[None]) ** 2).sum(-1)
    assert np.mean(distances.argmin(1) == labels) > 0.95
    assert str(out) in result.stdout


@pytest.mark.parametrize("k", ["0", "-1"])
def test_features_mode_needs_k(synthetic_teacher, k):
    result = _cli("cluster", "--features", str(synthetic_teacher), "--k", k)
    assert result.exit_code == 1 and "--features needs --k" in result.output


@pytest.mark.parametrize("k", ["-1", "8"])
def test_k_without_features_is_refused(k, tmp_path):
    """A run's prototypes are reported with the recipe's k: a --k there would be silently ignored."""
    result = _cli("cluster", "--k", k, "--workspace", str(tmp_path))
    assert result.exit_code == 1
    assert f"--k {k} is read only with --features" in " ".join(result.output.split())


def test_report_from_a_checkpoint_file(trained_run, tmp_path):
    """A checkpoint path names its run (and brings the run's workspace along)."""
    from protoclip_cli.runs import RunDir

    out = tmp_path / "report"
    result = _cli("cluster", str(RunDir(trained_run).latest_checkpoint()), "--tsne-points", "0", "--out", str(out),
                  "-w", str(tmp_path / "elsewhere"))
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["run"] == RUN and set(report["modalities"]) == {"image", "text", "teacher"}
    assert sorted(p.name for p in out.iterdir()) == ["grid-image.png", "grid-text.png", "report.json"]
