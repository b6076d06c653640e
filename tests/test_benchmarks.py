"""The benchmark scripts run tiny on CPU and write JSON whose numbers hang together."""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"

pytestmark = pytest.mark.integration  # runs the benchmark scripts as processes


def start_script(name: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, str(BENCHMARKS / name), *args, "--threads", "1"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def positive_finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def start_gpu_sh(command: str, results: Path, **env: str) -> subprocess.Popen:
    """``bash benchmarks/gpu.sh COMMAND --tiny RESULTS``: the GPU run's rehearsal on the CPU, one torch thread per
    process, with this environment's packages (no wheels from .whl/)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable, "WHEELS": "", **env}
    return subprocess.Popen(["bash", str(BENCHMARKS / "gpu.sh"), command, "--tiny", str(results)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> dict[str, tuple[dict, str]]:
    """Both commands of benchmarks/gpu.sh rehearsed with --tiny, and train_options.py, side by side.

    Their records are the benchmarks' own JSON (train_step, extract_kmeans, e2e: from the summaries
    the rehearsals write) with the text they printed (the command's log)."""
    folder = tmp_path_factory.mktemp("bench")
    running = {command: start_gpu_sh(command, folder / command) for command in ("step", "trainer")}
    try:
        options = start_script("train_options.py", "--device", "cpu", "--arch", "protoclip-tiny", "--batch", "16", "--accum",
                               "2", "--steps", "1", "--warmup-steps", "1", "--k", "50", "--json", str(folder / "train_options.json"))
        stdout, stderr = options.communicate(timeout=300)
        assert options.returncode == 0, stderr
        found = {"train_options": (json.loads((folder / "train_options.json").read_text()), stdout)}
        for command, process in running.items():
            stdout, _ = process.communicate(timeout=1500)
            assert process.returncode == 0, stdout[-4000:]
            results = folder / command
            summary = json.loads((results / f"{command}.json").read_text())
            log = (results / f"{command}.log").read_text()
            found[f"gpu.sh {command}"] = (summary, stdout, results)
            for name, record in summary["records"].items():
                found[name] = (record, log)
    finally:
        for process in running.values():  # a failure above leaves no rehearsal running (gpu.sh stops its step)
            if process.poll() is None:
                process.terminate()
                process.communicate(timeout=60)
    return found


@pytest.fixture(scope="module")
def train_step_record(records):
    return records["train_step-eager"]


@pytest.fixture(scope="module")
def extract_kmeans_record(records):
    return records["extract_kmeans"]


def test_train_step_reports_every_variant_with_consistent_throughput(train_step_record):
    import torch

    record, stdout = train_step_record
    assert record["benchmark"] == "train_step"
    assert record["machine"]["device"] == "cpu" and record["machine"]["device_name"]
    assert record["machine"]["torch"] == torch.__version__
    assert record["config"] == {
        "arch": "protoclip-tiny", "batch": 16, "steps": 2, "warmup_steps": 1, "compile": False, "k": 20000,
        "precision": "fp32", "channels_last": False, "tf32": False, "seed": 0,
    }
    results = {r["variant"]: r for r in record["results"]}
    assert [r["variant"] for r in record["results"]] == ["openclip", "clip", "protoclip"]
    for r in results.values():
        assert len(r["step_ms"]) == 2 and all(positive_finite(ms) for ms in r["step_ms"])
        assert r["step_ms_mean"] == pytest.approx(sum(r["step_ms"]) / 2)
        assert positive_finite(r["img_per_s"])
        assert r["img_per_s"] == pytest.approx(16 / (r["step_ms_mean"] / 1000))
        assert r["ratio_to_openclip"] == pytest.approx(r["img_per_s"] / results["openclip"]["img_per_s"])
        assert r["memory_kind"] == "rss_delta"
        assert r["peak_memory_mib"] is None or math.isfinite(r["peak_memory_mib"])
    assert results["openclip"]["ratio_to_openclip"] == 1.0
    for name in ("openclip", "clip", "protoclip"):
        assert name in stdout


def test_train_step_variants_train_the_same_towers_on_the_same_batch(train_step_record):
    record, _ = train_step_record
    results = {r["variant"]: r for r in record["results"]}
    # Same seed, same architecture, same first batch, fp32 on CPU: the InfoNCE terms must agree,
    # which shows the three variants time the same model on the same inputs.
    openclip_loss = results["openclip"]["first_step_loss"]["clip"]
    assert results["clip"]["first_step_loss"]["clip"] == pytest.approx(openclip_loss, rel=1e-4)
    assert results["protoclip"]["first_step_loss"]["clip"] == pytest.approx(openclip_loss, rel=1e-4)
    assert results["clip"]["first_step_loss"]["proto"] == 0 and results["clip"]["first_step_loss"]["ext"] == 0
    proto = results["protoclip"]["first_step_loss"]
    assert proto["proto"] > 0 and proto["ext"] > 0
    assert proto["total"] == pytest.approx(proto["clip"] + proto["proto"] + proto["ext"], rel=1e-5)
    # The heads (and their temperature) are the only extra parameters.
    assert results["clip"]["parameters"] == results["openclip"]["parameters"]
    assert results["protoclip"]["parameters"] > results["clip"]["parameters"]


def test_train_options_time_every_option_on_the_same_model_and_batch(records):
    record, stdout = records["train_options"]
    assert record["benchmark"] == "train_options" and record["config"]["accum"] == 2
    results = {r["variant"]: r for r in record["results"]}
    assert list(results) == ["base", "accum", "ckpt", "accum+ckpt", "sigmoid"]
    assert {name: r["micro_batch"] for name, r in results.items()} == {
        "base": 16, "accum": 8, "ckpt": 16, "accum+ckpt": 8, "sigmoid": 16}
    for r in results.values():
        assert r["batch"] == 16 and positive_finite(r["step_ms_mean"]) and r["memory_kind"] == "rss_high_water_growth"
        assert r["img_per_s"] == pytest.approx(16 / (r["step_ms_mean"] / 1000))
        assert r["time_ratio_to_base"] == pytest.approx(r["step_ms_mean"] / results["base"]["step_ms_mean"])
    # The same initial weights and batch: the InfoNCE term of the whole batch is the same with
    # accumulation and checkpointing (the heads' BatchNorm normalises per micro-batch, so the
    # prototype terms may differ with accumulation, not with checkpointing).
    clip = results["base"]["first_step_loss"]["clip"]
    for name in ("accum", "ckpt", "accum+ckpt"):
        assert results[name]["first_step_loss"]["clip"] == pytest.approx(clip, rel=1e-4), name
    assert results["ckpt"]["first_step_loss"]["total"] == pytest.approx(results["base"]["first_step_loss"]["total"], rel=1e-4)
    assert results["sigmoid"]["first_step_loss"]["clip"] != pytest.approx(clip, rel=1e-2)
    assert "sigmoid" in stdout and "peak memory" in stdout


def test_extract_kmeans_reports_extraction_kmeans_pbt_and_episode(extract_kmeans_record):
    record, stdout = extract_kmeans_record
    n, k = 2000, 50
    assert record["benchmark"] == "extract_kmeans"
    assert record["config"]["n"] == n and record["config"]["k"] == k and record["config"]["iterations"] == 20
    extraction = record["extraction"]
    assert extraction["samples"] == 64 * 3
    assert positive_finite(extraction["samples_per_s"])
    assert extraction["samples_per_s"] == pytest.approx(64 / (extraction["batch_ms_mean"] / 1000))

    rows = {row["backend"]: row for row in record["kmeans"]}
    assert set(rows) == {"torch", "faiss"}
    for row in rows.values():
        assert row["runs_on"] == "cpu"
        assert positive_finite(row["seconds"])
        assert row["ms_per_iteration"] == pytest.approx(1000 * row["seconds"] / 20)
        # Unit vectors: a cluster of m points has sum ||x - mean||^2 = m (1 - ||mean||^2) < m.
        assert 0 < row["objective"] < n
        assert row["empty_clusters"] == 0
    assert rows["torch"]["objective"] == pytest.approx(rows["faiss"]["objective"], rel=0.05)

    assert positive_finite(record["pbt"]["seconds"])
    assert record["pbt"]["nonzero_means"] == k
    episode = record["episode"]
    assert (episode["clusterings"], episode["restarts"], episode["pbt_means"]) == (3, 1, 4)
    assert episode["backend"] == "torch"  # the recipe default (auto) on CPU
    assert episode["extraction_seconds"] == pytest.approx(n / extraction["samples_per_s"])
    assert episode["overhead_seconds"] == pytest.approx(episode["extraction_seconds"] + episode["seconds"])
    assert "k-means torch" in stdout and "episode overhead" in stdout


def _run(script: str, *args: str) -> str:
    process = start_script(script, *args)
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-3000:]
    return stdout


@pytest.mark.parametrize("loader", ["dataloader-rrc", "dataloader-light", "dataloader-extract"])
def test_dataloader_reports_what_the_workers_deliver_and_the_device_share(records, loader):
    record, log = records[loader]  # 1 worker, 2 timed batches of 32 (gpu.sh trainer --tiny)
    assert record["benchmark"] == "dataloader" and record["samples"] == 2 * 32
    assert positive_finite(record["samples_per_s"]) and positive_finite(record["first_batch_seconds"])
    assert record["samples_per_s"] == pytest.approx(record["samples"] / record["seconds"])
    if loader == "dataloader-rrc":
        assert "device_augment_ms_per_batch" not in record
    else:  # light's flip, jitter, grayscale and blur run on the device, for the extraction pass's training views too
        assert positive_finite(record["device_augment_ms_per_batch"]) and record["device_batches"] == 1
    assert "device augmentation" in log


def test_dataloader_eval_extract_pass_leaves_the_resize_to_the_device(synthetic_workspace, tmp_path):
    out = tmp_path / "extract.json"
    _run("dataloader.py", "--workspace", str(synthetic_workspace.root), "--pass", "extract", "--extraction-transform", "eval",
         "--image-size", "48",
         "--workers", "0", "--batch", "64", "--batches", "3", "--device-batches", "2", "--json", str(out))
    record = json.loads(out.read_text())
    # Stored at 64 px, square: the workers only decode; the device resizes 64 -> 48.
    assert record["samples"] == 3 * 64 and positive_finite(record["device_augment_ms_per_batch"])


def test_e2e_runs_the_real_trainer_and_open_clip_train_on_the_same_samples(records):
    record, log = records["e2e"]
    results = {r["variant"]: r for r in record["results"]}
    assert list(results) == ["clip", "open_clip_train", "protoclip", "protoclip-single-pass"]
    # The same samples seen by each trainer: 2 x 128 (two epochs, or two episodes of 128).
    assert {r["samples_trained"] for r in results.values()} == {256}
    peer = results["open_clip_train"]
    argument = lambda name: peer["arguments"][peer["arguments"].index(name) + 1]  # noqa: E731
    assert (argument("--train-num-samples"), argument("--epochs"), argument("--workers")) == ("128", "2", "1")
    assert argument("--model") == "protoclip-tiny" and argument("--batch-size") == "32"
    for name in ("clip", "open_clip_train"):
        assert results[name]["extract_seconds"] == 0 and results[name]["cluster_seconds"] == 0
    # Both prototype recipes extract training views in the episode after the warm-up: single-pass's first prototype
    # episode clusters the model the warm-up left (its later ones cluster a recording: test_single_pass.py).
    extracts = {v: [e["seconds"]["extract"] > 0 for e in results[v]["episodes"]] for v in ("protoclip", "protoclip-single-pass")}
    assert extracts == {"protoclip": [False, True], "protoclip-single-pass": [False, True]}
    for v in ("protoclip", "protoclip-single-pass"):
        assert results[v]["cluster_seconds"] > 0
        assert results[v]["recipe"]["proto"]["extraction_transform"] == "train"
        assert results[v]["recipe"]["proto"]["single_pass_start"] == "extract"
    steps = record["step_benchmark"]
    for name, r in results.items():
        assert r["wall_ratio_to_clip"] == pytest.approx(r["wall_seconds"] / results["clip"]["wall_seconds"])
        assert r["train_samples_per_s"] == pytest.approx(r["samples_trained"] / r["train_seconds"])
        step = steps[{"clip": "clip", "open_clip_train": "openclip"}.get(name, "protoclip")]
        assert r["ratio_to_step_benchmark"] == pytest.approx(r["train_samples_per_s"] / step)
        assert 0 < r["other_seconds"] < r["wall_seconds"]  # start-up, model build, checkpoints
    assert results["protoclip"]["recipe"]["proto"]["k"] == 12  # episode size / 10, as the reference's 200K / 20K
    assert "protoclip-single-pass" in log


@pytest.mark.parametrize("command", ["step", "trainer"])
def test_gpu_sh_rehearses_each_command_into_one_summary_and_one_log(records, command):
    summary, stdout, results = records[f"gpu.sh {command}"]
    assert sorted(p.name for p in results.iterdir()) == [f"{command}.json", f"{command}.log"]
    statuses = {s["step"]: s["status"] for s in summary["steps"]}
    if command == "step":
        assert statuses == {"preflight": "ok", "train_step-eager": "ok", "extract_kmeans": "ok",
                            "gpu-tests": "skipped: no CUDA (rehearsal)", "torchrun-data": "ok", "torchrun": "ok",
                            "train_step-compiled": "skipped: no CUDA (rehearsal)"}
        assert set(summary["records"]) == {"train_step-eager", "extract_kmeans"}
    else:
        assert statuses == dict.fromkeys(["preflight", "e2e-data", "dataloader-rrc", "dataloader-light", "e2e",
                                          "dataloader-extract"], "ok")
        assert set(summary["records"]) == {"dataloader-rrc", "dataloader-light", "dataloader-extract", "e2e"}
        measured = {a["what"]: a["measured"] for a in summary["aims"]}
        assert measured["this project's CLIP / open_clip_train wall time"] > 0
        assert measured["ProtoCLIP / CLIP wall time, single-pass"] > 0
    assert summary["commands"][command] > 0
    # The trap printed the tables last; the preflight named every package's version.
    assert stdout.rstrip().endswith(summary["table"].rstrip())
    assert "\ntorch " in (results / f"{command}.log").read_text().split("===== preflight: ok")[1]


def test_gpu_sh_names_what_is_missing_and_skips_what_needs_it(tmp_path):
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "tomli_w.py").write_text("raise ModuleNotFoundError(\"No module named 'tomli_w'\", name='tomli_w')\n")
    process = start_gpu_sh("trainer", tmp_path / "out", PYTHONPATH=str(shadow))
    stdout, _ = process.communicate(timeout=300)
    assert process.returncode == 1
    assert "preflight: missing or broken: tomli_w (ModuleNotFoundError: No module named 'tomli_w')" in stdout
    summary = json.loads((tmp_path / "out" / "trainer.json").read_text())
    assert [s["status"] for s in summary["steps"]] == ["failed (exit 1)"] + ["skipped: preflight failed (exit 1)"] * 5
    assert stdout.rstrip().endswith(summary["table"].rstrip())


def test_gpu_sh_prints_its_summary_when_it_is_stopped(tmp_path):
    process = start_gpu_sh("step", tmp_path / "out")
    for line in process.stdout:
        if line.startswith("== preflight (at most"):
            process.terminate()  # as a time limit around the whole command would
            break
    stdout, _ = process.communicate(timeout=120)
    assert process.returncode == 143  # 128 + SIGTERM
    summary = json.loads((tmp_path / "out" / "step.json").read_text())
    assert [(s["step"], s["status"]) for s in summary["steps"]] == [("preflight", "stopped: the command was ended")]
    assert "===== preflight: stopped" in (tmp_path / "out" / "step.log").read_text()
    assert stdout.rstrip().endswith(summary["table"].rstrip())


def test_gpu_summary_of_both_commands_gives_the_aims_that_need_both(records, capsys):
    step, _, step_results = records["gpu.sh step"]
    trainer, _, trainer_results = records["gpu.sh trainer"]
    gpu_summary = load_benchmark("gpu_summary")
    merged = gpu_summary.main([str(step_results / "step.json"), str(trainer_results / "trainer.json")])
    measured = {what: value for what, _, value, _ in gpu_summary.aims(merged["records"])}
    # Every aim has its figure but the compiled step's, which needs CUDA.
    assert [what for what, value in measured.items() if value is None] == [
        "train step vs OpenCLIP (compiled), clip", "train step vs OpenCLIP (compiled), protoclip"]
    faithful = next(r for r in trainer["records"]["e2e"]["results"] if r["variant"] == "protoclip")
    in_trainer = 128 / faithful["extract_seconds"]  # one extraction pass over the second episode's 128 samples
    extract_kmeans = step["records"]["extract_kmeans"]
    in_memory = extract_kmeans["extraction"]["samples_per_s"]
    assert measured["extraction pass in the trainer / in-memory benchmark"] == pytest.approx(in_trainer / in_memory)
    overhead = (2000 / in_trainer + extract_kmeans["episode"]["seconds"]) / (2000 / faithful["train_samples_per_s"])
    assert measured["episode overhead at reference scale / training pass, faithful"] == pytest.approx(overhead)
    assert set(merged["commands"]) == {"step", "trainer"} and len(merged["steps"]) == 7 + 6
    assert "| protoclip-single-pass | 1 | proto |" in capsys.readouterr().out


def load_benchmark(name: str):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.mark.parametrize(
    ("script", "argv", "message"),
    [
        ("train_step", ["--variants", "openclip,fast"], "unknown variant(s) fast"),
        ("train_step", ["--batch", "0"], "--batch must be at least 1"),
        ("extract_kmeans", ["--n", "10", "--k", "20"], "--k 20 is larger than --n 10"),
        ("extract_kmeans", ["--backends", "sklearn"], "unknown k-means backend(s) sklearn"),
        ("e2e", ["--variants", "clip,fast"], "unknown variant(s) fast"),
        ("dataloader", ["--workspace", "w", "--batches", "0"], "--batches and --batch must be at least 1"),
    ],
)
def test_bad_options_are_refused_with_a_reason(script, argv, message, capsys):
    module = load_benchmark(script)
    with pytest.raises(SystemExit) as exited:
        module.parse_args(argv)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err
