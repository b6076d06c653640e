"""teacher-embed: real all-MiniLM-L6-v2 features of the embedded data set's captions in HDF5."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from protoclip_cli.artifacts import file_sha256, write_json
from protoclip_cli.data.shards import iter_samples
from protoclip_cli.errors import ProtoclipError
from protoclip_cli.data.teacher_file import check_teacher_covers, load_teacher
from protoclip_cli.data.teacher_writer import partial_path
from protoclip_cli.stages import teacher_embed
from protoclip_cli.configs.teacher import TeacherConfig
from protoclip_cli.stages.teacher_embed import MINILM_NAME, resolve_model, run
from protoclip_cli.workspace import Workspace

MINILM_DIM = 384


@pytest.fixture(scope="module", autouse=True)
def _few_threads():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def train_samples(synthetic_workspace) -> dict[int, object]:
    """key -> Sample (caption and ground-truth metadata) of the train split."""
    return {s.key: s for s in iter_samples(synthetic_workspace.shards("synthetic"), images=False)}


@pytest.fixture(scope="module")
def encoder(minilm_path):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(minilm_path, device="cpu")


def copy_dataset(workspace: Workspace, root: Path, shards: int | None = None) -> Workspace:
    """A private copy of the downloaded data set (no teacher files), optionally its first ``shards`` only."""
    destination = root / "datasets" / "synthetic"
    shutil.copytree(workspace.dataset_dir("synthetic"), destination, ignore=shutil.ignore_patterns("teacher"))
    copy = Workspace.at(root)
    if shards is not None:
        manifest = json.loads((destination / "manifest.json").read_text())
        train = manifest["splits"]["train"]
        train["shards"] = train["shards"][:shards]
        train["count_ok"] = sum(1 for _ in iter_samples(copy.shards("synthetic")[:shards], images=False, meta=False))
        write_json(destination / "manifest.json", manifest)
    return copy


@pytest.fixture
def workspace_copy(synthetic_workspace, tmp_path) -> Workspace:
    return copy_dataset(synthetic_workspace, tmp_path)


@pytest.fixture
def small_copy(synthetic_workspace, tmp_path) -> Workspace:
    """The first two shards (256 samples): half the encoding time for tests that run the stage."""
    return copy_dataset(synthetic_workspace, tmp_path, shards=2)


def rows_of(keys: np.ndarray, embeddings: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    return embeddings[np.searchsorted(keys, wanted)]


def encode(encoder, captions: list[str]) -> np.ndarray:
    return encoder.encode(captions, batch_size=64, normalize_embeddings=True, convert_to_numpy=True)


def test_teacher_file_matches_shards_and_documented_layout(
    synthetic_teacher, synthetic_workspace, train_samples, encoder
):
    keys, embeddings, attrs = load_teacher(synthetic_teacher)

    assert keys.dtype == np.int64 and embeddings.dtype == np.float32
    np.testing.assert_array_equal(keys, np.array(sorted(train_samples), dtype=np.int64))
    assert embeddings.shape == (len(train_samples), MINILM_DIM)
    np.testing.assert_allclose(np.linalg.norm(embeddings.astype(np.float64), axis=1), 1.0, atol=1e-5)

    manifest_path = synthetic_workspace.dataset_dir("synthetic") / "manifest.json"
    assert attrs["model"] == MINILM_NAME
    assert attrs["dimension"] == attrs["source_dimension"] == MINILM_DIM
    assert attrs["normalisation"] == "l2" and attrs["pca_dim"] == 0
    assert attrs["count"] == len(train_samples)
    assert attrs["dataset"] == "synthetic"
    assert attrs["dataset_manifest"] == str(manifest_path)
    assert attrs["dataset_manifest_sha256"] == file_sha256(manifest_path)
    manifest = json.loads(attrs["manifest"])
    assert manifest["teacher_file"] == str(synthetic_teacher)
    assert manifest["encoded_rows"] == len(train_samples) and manifest["resumed_rows"] == 0
    # No partial or temporary (dot-named) files left next to the finished one.
    assert not [p.name for p in synthetic_teacher.parent.iterdir() if p.name.startswith(".")]

    # Rows are aligned with keys: a fresh encoding of some captions, looked up by key, matches.
    chosen = keys[np.random.default_rng(0).choice(len(keys), size=24, replace=False)]
    fresh = encode(encoder, [train_samples[int(k)].caption for k in chosen])
    np.testing.assert_allclose(rows_of(keys, embeddings, chosen), fresh, atol=1e-4)


def test_paraphrases_of_a_class_are_closer_than_other_classes(synthetic_teacher, train_samples):
    keys, embeddings, _ = load_teacher(synthetic_teacher)
    labels = np.array([train_samples[int(k)].meta["label"] for k in keys])
    similarity = embeddings.astype(np.float64) @ embeddings.T.astype(np.float64)
    same = labels[:, None] == labels[None, :]
    others = ~np.eye(len(keys), dtype=bool)

    # Measured on this data set: same-class 0.49, other-class 0.34 (margin 0.16); each class >= 0.08.
    margin = similarity[same & others].mean() - similarity[~same].mean()
    assert margin > 0.08
    per_class = [
        similarity[np.outer(labels == c, labels == c) & others].mean()
        - similarity[np.outer(labels == c, labels != c)].mean()
        for c in np.unique(labels)
    ]
    assert min(per_class) > 0.0
    # Nearest caption shares the class far above chance (1/36); measured 0.62.
    np.fill_diagonal(similarity, -np.inf)
    assert (labels[similarity.argmax(axis=1)] == labels).mean() > 0.3


def test_pca_is_reproducible_and_force_replaces_a_file(
    synthetic_teacher, small_copy, minilm_path, encoder, train_samples
):
    target = small_copy.teacher_file("synthetic", minilm_path)
    target.parent.mkdir(parents=True)
    shutil.copy(synthetic_teacher, target)

    # A finished file made with other settings is not silently replaced...
    with pytest.raises(ProtoclipError, match=r"different .*pca_dim.*--force"):
        run(TeacherConfig(dataset="synthetic", model=minilm_path, pca_dim=16), small_copy)
    # ... but is with --force.
    manifest = run(
        TeacherConfig(dataset="synthetic", model=minilm_path, pca_dim=16, batch_size=128, force=True), small_copy
    )
    keys, reduced, attrs = load_teacher(target)
    assert manifest["dimension"] == 16 and manifest["encoded_rows"] == len(keys) == 256
    assert reduced.shape == (256, 16) and attrs["dimension"] == 16 and attrs["pca_dim"] == 16
    assert attrs["source_dimension"] == MINILM_DIM and attrs["normalisation"] == "l2-pca"
    # As the reference: PCA's output is kept as it is, so the rows are not unit-norm.
    assert np.linalg.norm(reduced, axis=1).max() < 0.99
    with h5py.File(target, "r") as handle:
        mean = handle["pca_mean"][:].astype(np.float64)
        components = handle["pca_components"][:].astype(np.float64)
    assert mean.shape == (MINILM_DIM,) and components.shape == (16, MINILM_DIM)

    # PCA against a float64 recomputation on the full-dimensional features of the same samples.
    full_keys, full, _ = load_teacher(synthetic_teacher)
    full64 = rows_of(full_keys, full, keys).astype(np.float64)
    np.testing.assert_allclose(mean, full64.mean(axis=0), atol=1e-6)
    np.testing.assert_allclose(components @ components.T, np.eye(16), atol=1e-5)
    covariance = np.cov(full64, rowvar=False)
    top_eigenvalues = np.sort(np.linalg.eigvalsh(covariance))[::-1][:16]
    np.testing.assert_allclose(np.diag(components @ covariance @ components.T), top_eigenvalues, rtol=1e-3)

    # Re-applying the stored mean and components to fresh encodings gives the stored rows.
    chosen = keys[:: len(keys) // 16]
    fresh = encode(encoder, [train_samples[int(k)].caption for k in chosen]).astype(np.float64)
    projected = (fresh - mean) @ components.T
    np.testing.assert_allclose(rows_of(keys, reduced, chosen), projected, atol=1e-4)

    # Same settings again: the finished file is reused, not recomputed.
    before = target.stat().st_mtime_ns
    again = run(TeacherConfig(dataset="synthetic", model=minilm_path, pca_dim=16), small_copy)
    assert again["reused"] is True and target.stat().st_mtime_ns == before

    # --pca-normalise is another file: refused without --force, then the same rows at unit length.
    with pytest.raises(ProtoclipError, match=r"different normalisation.*--force"):
        run(TeacherConfig(dataset="synthetic", model=minilm_path, pca_dim=16, pca_normalise=True), small_copy)
    run(TeacherConfig(dataset="synthetic", model=minilm_path, pca_dim=16, pca_normalise=True, force=True), small_copy)
    _, renormalised, attrs = load_teacher(target)
    assert attrs["normalisation"] == "l2-pca-l2"
    np.testing.assert_allclose(renormalised, reduced / np.linalg.norm(reduced, axis=1, keepdims=True), atol=1e-6)


KILLED_RUN = """
import os, signal, torch
torch.set_num_threads(2)
from protoclip_cli.configs.teacher import TeacherConfig
from protoclip_cli.stages.teacher_embed import run
from protoclip_cli.workspace import Workspace

def die_after_two_chunks(rows_done, rows_encoded):
    if rows_done >= 128:
        os.kill(os.getpid(), signal.SIGKILL)

run(TeacherConfig(dataset="synthetic", model={model!r}, batch_size=64, chunk_size=64),
    Workspace.at({root!r}), on_chunk=die_after_two_chunks)
"""


def test_killed_run_resumes_without_re_encoding(synthetic_teacher, small_copy, minilm_path, monkeypatch):
    target = small_copy.teacher_file("synthetic", minilm_path)
    script = KILLED_RUN.format(model=minilm_path, root=str(small_copy.root))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr

    assert not target.exists()
    with h5py.File(partial_path(target), "r") as handle:
        assert int(handle.attrs["complete_rows"]) == 128

    # Count what the real encoder is asked to encode in the resumed run.
    from sentence_transformers import SentenceTransformer

    encoded_captions: list[str] = []
    real_encode = SentenceTransformer.encode

    def counting_encode(self, inputs, *args, **kwargs):
        encoded_captions.extend(inputs)
        return real_encode(self, inputs, *args, **kwargs)

    monkeypatch.setattr(SentenceTransformer, "encode", counting_encode)
    chunks_seen: list[tuple[int, int]] = []
    manifest = run(
        TeacherConfig(dataset="synthetic", model=minilm_path, batch_size=64, chunk_size=64),
        small_copy,
        on_chunk=lambda done, encoded: chunks_seen.append((done, encoded)),
    )

    keys, embeddings, _ = load_teacher(target)
    shard_keys = [s.key for s in iter_samples(small_copy.shards("synthetic"), images=False, meta=False)]
    np.testing.assert_array_equal(keys, np.sort(shard_keys))
    assert len(encoded_captions) == 128 and chunks_seen == [(192, 64), (256, 128)]
    assert manifest["resumed_rows"] == 128 and manifest["encoded_rows"] == 128
    # Equal to the run that was never interrupted (the session's teacher file, same samples).
    full_keys, full, _ = load_teacher(synthetic_teacher)
    np.testing.assert_allclose(embeddings, rows_of(full_keys, full, keys), atol=1e-5)
    assert not partial_path(target).exists()


def test_unreadable_partial_file_is_discarded(synthetic_teacher, synthetic_workspace, tmp_path, minilm_path, capsys):
    """A partial file that a crash left unreadable is replaced by a fresh run, with a notice."""
    one_shard = copy_dataset(synthetic_workspace, tmp_path, shards=1)
    target = one_shard.teacher_file("synthetic", minilm_path)
    target.parent.mkdir(parents=True)
    partial_path(target).write_bytes(b"\x89HDF\r\n\x1a\n truncated by a crash")

    manifest = run(TeacherConfig(dataset="synthetic", model=minilm_path, batch_size=128), one_shard)
    assert "cannot be read" in " ".join(capsys.readouterr().err.split())
    assert manifest["resumed_rows"] == 0 and manifest["encoded_rows"] == 128
    keys, embeddings, _ = load_teacher(target)
    full_keys, full, _ = load_teacher(synthetic_teacher)
    np.testing.assert_allclose(embeddings, rows_of(full_keys, full, keys), atol=1e-5)
    assert not partial_path(target).exists()


def test_unknown_model_offline_fails_in_one_sentence(workspace_copy, monkeypatch, capsys):
    from protoclip_cli.cli import main

    monkeypatch.setattr(
        sys,
        "argv",
        ["protoclip", "teacher-embed", "synthetic", "--model", "no-such-org/no-such-model",
         "-w", str(workspace_copy.root)],  # fmt: skip
    )
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 1
    stderr = " ".join(capsys.readouterr().err.split())
    assert "'no-such-org/no-such-model' is not a local folder, not in the Hugging Face cache" in stderr
    assert "--model PATH" in stderr and "Traceback" not in stderr
    assert not workspace_copy.teacher_dir("synthetic").exists()


def test_cli_reuses_a_finished_file(synthetic_teacher, workspace_copy, minilm_path, monkeypatch, capsys):
    from protoclip_cli.cli import main

    target = workspace_copy.teacher_file("synthetic", minilm_path)
    target.parent.mkdir(parents=True)
    shutil.copy(synthetic_teacher, target)
    # The copied file records the same data set manifest (same bytes), so it is reused as is.
    monkeypatch.setattr(
        sys, "argv", ["protoclip", "teacher-embed", "--model", minilm_path, "-w", str(workspace_copy.root)]
    )
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 0
    captured = capsys.readouterr()
    assert "reusing them (pass --force to recompute)" in " ".join(captured.err.split())
    assert str(target) in captured.out and f"512 captions x {MINILM_DIM} dims" in captured.out


def test_minilm_names_resolve_to_the_offline_copy(minilm_path, workspace_copy):
    for name in ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2", minilm_path):
        resolved = resolve_model(name)
        assert (resolved.name, resolved.source, resolved.local) == (MINILM_NAME, str(Path(minilm_path).resolve()), True)
    slug_file = workspace_copy.teacher_file("synthetic", "sentence-transformers/all-MiniLM-L6-v2")
    assert slug_file.name == "all-MiniLM-L6-v2.h5"
    assert teacher_embed.default_model_name() == "all-MiniLM-L6-v2"
    other = resolve_model("all-mpnet-base-v2")
    assert (other.name, other.source, other.local) == ("all-mpnet-base-v2", "all-mpnet-base-v2", False)


def test_check_teacher_covers_names_both_files(synthetic_teacher, synthetic_workspace, tmp_path):
    keys, embeddings, _ = load_teacher(synthetic_teacher)
    manifest_path = synthetic_workspace.dataset_dir("synthetic") / "manifest.json"
    check_teacher_covers(synthetic_teacher, keys, manifest_path)  # complete: no error

    partial_teacher = tmp_path / "partial-teacher.h5"
    with h5py.File(partial_teacher, "w") as handle:
        handle["keys"] = keys[5:]
        handle["embeddings"] = embeddings[5:]
    with pytest.raises(ProtoclipError) as error:
        check_teacher_covers(partial_teacher, keys, manifest_path)
    message = str(error.value)
    assert str(partial_teacher) in message and str(manifest_path) in message
    assert f"lack 5 of the {len(keys)} samples" in message and f"key {int(keys[0])}" in message


@pytest.mark.slow
def test_multi_process_pool_matches_single_process(synthetic_teacher, small_copy, minilm_path):
    """Two CPU worker processes through sentence-transformers' pool (the --device cuda:0,cuda:1 path).

    Slow: each worker is a fresh spawned interpreter that imports torch and transformers."""
    manifest = run(
        TeacherConfig(dataset="synthetic", model=minilm_path, batch_size=64, chunk_size=128, device="cpu,cpu"),
        small_copy,
    )
    keys, embeddings, _ = load_teacher(manifest["teacher_file"])
    full_keys, full, _ = load_teacher(synthetic_teacher)
    assert manifest["encoded_rows"] == len(keys) == 256
    np.testing.assert_allclose(embeddings, rows_of(full_keys, full, keys), atol=1e-5)


def _file_size_limit(limit: int):
    def apply() -> None:
        import resource

        # Python ignores SIGXFSZ: a write past the limit fails with EFBIG, as a write to a full disk
        # fails with ENOSPC; both once crashed HDF5 (a segmentation fault after pages of errors).
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def _embed_in_child(workspace: Workspace, model: str, limit: int | None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "protoclip_cli", "teacher-embed", "synthetic", "--model", model, "--chunk-size", "64",
         "--batch-size", "64", "-w", str(workspace.root)],
        capture_output=True, text=True, timeout=600, preexec_fn=_file_size_limit(limit) if limit else None,
        cwd=Path(__file__).resolve().parents[1],
    )


def test_a_partial_file_that_does_not_fit_is_one_sentence_before_any_encoding(small_copy, minilm_path):
    target = small_copy.teacher_file("synthetic", minilm_path)
    done = _embed_in_child(small_copy, minilm_path, 300_000)  # 256 rows of 384 float32: 0.4 MB of features
    assert done.returncode == 1, done.stderr[-3000:]  # not -11: no segmentation fault
    said = " ".join(done.stderr.split())
    assert (f"error: Cannot write {partial_path(target)} (1.4 MB): the file is larger than this system allows; raise "
            "the file size limit or choose another folder.") in said
    assert "Traceback" not in done.stderr and "HDF5" not in done.stderr and "errno" not in done.stderr
    assert "teacher-embed" not in done.stderr  # refused before the progress bar: nothing was encoded
    assert list(target.parent.iterdir()) == []


def test_a_teacher_file_that_does_not_fit_keeps_the_partial_file_resumable(small_copy, minilm_path, monkeypatch):
    """The partial file fits, the final one does not: the partial stays whole and the next run
    finishes from it without encoding a caption again."""
    from protoclip_cli.data import teacher_writer

    def stop(*args, **kwargs):
        raise KeyboardInterrupt  # as a kill after the last chunk was committed

    target = small_copy.teacher_file("synthetic", minilm_path)
    monkeypatch.setattr(teacher_writer, "finalise", stop)
    with pytest.raises(KeyboardInterrupt):
        run(TeacherConfig(dataset="synthetic", model=minilm_path, batch_size=64, chunk_size=64), small_copy)
    monkeypatch.undo()
    with h5py.File(partial_path(target), "r") as handle:
        assert int(handle.attrs["complete_rows"]) == 256
    partial_size = partial_path(target).stat().st_size
    assert partial_size < 600_000

    done = _embed_in_child(small_copy, minilm_path, 600_000)  # the partial file's size, not the final one's
    assert done.returncode == 1, done.stderr[-3000:]
    said = " ".join(done.stderr.split())
    assert (f"error: Cannot write {target}: the file is larger than this system allows; raise the file size limit "
            "or choose another folder.") in said
    assert "Traceback" not in done.stderr and "HDF5" not in done.stderr
    assert sorted(p.name for p in target.parent.iterdir()) == [partial_path(target).name]
    assert partial_path(target).stat().st_size == partial_size

    manifest = run(TeacherConfig(dataset="synthetic", model=minilm_path, batch_size=64, chunk_size=64), small_copy)
    assert manifest["resumed_rows"] == 256 and manifest["encoded_rows"] == 0
    assert load_teacher(target)[1].shape == (256, MINILM_DIM)
    assert not partial_path(target).exists()


def test_a_full_disk_is_one_sentence_naming_the_file(small_copy, minilm_path, small_disk):
    """The issue's case: the teacher folder on a small tmpfs (ENOSPC, not a file size limit)."""
    target = small_copy.teacher_file("synthetic", minilm_path)
    small_disk(target.parent, "1m")
    done = _embed_in_child(small_copy, minilm_path, None)
    assert done.returncode == 1, done.stderr[-3000:]
    said = " ".join(done.stderr.split())
    assert f"error: Cannot write {partial_path(target)} (1.4 MB): the disk is full; free some space" in said
    assert "Traceback" not in done.stderr and "HDF5" not in done.stderr
    assert list(target.parent.iterdir()) == []
