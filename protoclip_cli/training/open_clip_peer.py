"""OpenCLIP's own trainer (``open_clip_train``, shipped with open_clip_torch) on a recipe's shards:
the peer that ``protoclip compare`` trains beside this project's CLIP baseline.

:func:`train_peer` runs ``python -m protoclip_cli.training.open_clip_peer ARGS`` in a child process
with the arguments :func:`peer_arguments` derives from a CLIP recipe: the same shards, architecture,
samples seen, batch, learning rate, warm-up, weight decay, AdamW betas and epsilon, gradient clipping,
data-loader workers and seed, as ``--dataset-type webdataset`` over the data set's whole train split
(``--train-num-samples`` its size, ``--epochs`` the passes that make the budget). The child:

- registers this package's tiny architectures with ``open_clip.add_model_config``, so
  ``--model protoclip-tiny`` builds the model this project trains;
- works around open_clip_train 3.3 failing on webdataset >= 0.2.96 with ``KeyError: 'fname'``
  (mlfoundations/open_clip#935): webdataset's ``tar_file_expander`` now yields an end-of-shard marker
  (``eof_value={}``) that open_clip_train's ``group_by_keys_nothrow`` does not expect, so the child
  binds ``eof_value=None`` (no marker, webdataset's behaviour before 0.2.96) in
  ``open_clip_train.data`` before calling ``open_clip_train.main.main``.

What stays different, by design of each trainer: open_clip_train decodes with PIL and shuffles with
webdataset's buffers (shards, then up to 5,000 samples), this project with ``torchvision.io`` on
uint8 tensors over its episode plan; both crop with RandomResizedCrop(scale 0.9-1), bicubic.
"""

from __future__ import annotations

import functools
import inspect
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from protoclip_cli.artifacts import write_json
from protoclip_cli.configs.train import TrainConfig
from protoclip_cli.core.model import register_tiny_configs
from protoclip_cli.errors import ProtoclipError

RECORD = "peer.json"  # written last: a peer folder without it is an unfinished run, trained again
# The child's seconds inside open_clip_train's main (imports and start-up excluded) and in its training passes
# (train_one_epoch: data loading and steps; no model build, no checkpoints).
SECONDS = "train_seconds.json"


def peer_arguments(config: TrainConfig, shards: list[Path], dataset_size: int, samples_seen: int, out_dir: Path,
                   device: str) -> list[str]:
    """open_clip_train's command line for the CLIP recipe ``config`` over ``shards`` (``dataset_size``
    samples), ``samples_seen`` samples in whole passes, logs and checkpoints under ``out_dir``."""
    epochs = max(1, round(samples_seen / dataset_size))
    if epochs * dataset_size != samples_seen:
        raise ProtoclipError(
            f"open_clip_train trains whole passes over the {dataset_size} samples of the data set; the budget of "
            f"{samples_seen} samples is not a multiple of it: choose --episodes so that it is."
        )
    workers = max(1, config.data.workers)
    if len(shards) % workers or (dataset_size // workers) % config.data.batch_size:
        raise ProtoclipError(
            f"open_clip_train gives each of its {workers} loader workers whole shards and the same number of batches, "
            f"so over {len(shards)} shards of {dataset_size} samples it would train fewer samples than this project; "
            "set data.workers to a number that divides the shards (and their samples into whole batches)."
        )
    o = config.optim
    cuda = device.startswith("cuda")
    precision = "amp_bf16" if cuda and config.precision in ("auto", "bf16") else "fp32"
    return [
        "--dataset-type", "webdataset", "--train-data", "::".join(str(p) for p in shards),
        "--train-num-samples", str(dataset_size), "--epochs", str(epochs),
        "--batch-size", str(config.data.batch_size), "--workers", str(config.data.workers),
        "--model", config.model.arch, "--lr", repr(o.lr), "--wd", repr(o.weight_decay),
        "--beta1", repr(o.beta1), "--beta2", repr(o.beta2), "--eps", repr(o.eps),
        "--warmup", str(config.schedule.warmup_steps), "--grad-clip-norm", repr(o.grad_clip),
        "--seed", str(config.seed), "--precision", precision, "--device", "cuda" if cuda else "cpu",
        "--logs", str(out_dir), "--name", "train", "--save-frequency", "0", "--log-every-n-steps", "16",
        "--report-to", "",
    ]


def train_peer(config: TrainConfig, shards: list[Path], dataset_size: int, samples_seen: int, out_dir: Path,
               device: str) -> dict:
    """Train open_clip_train in a child process (reused when ``out_dir`` holds a finished one); returns
    its record: ``checkpoint``, ``seconds`` spent in open_clip_train's ``main`` (model, data and
    training, as this project's train stage counts them), ``train_seconds`` in its training passes,
    ``process_seconds`` of the whole child (Python and torch imports too), ``epochs``, ``arguments``."""
    record_file = out_dir / RECORD
    if record_file.is_file():
        return {**json.loads(record_file.read_text()), "reused": True}
    shutil.rmtree(out_dir, ignore_errors=True)  # an unfinished run starts over: open_clip_train refuses a used name
    out_dir.mkdir(parents=True)
    arguments = peer_arguments(config, shards, dataset_size, samples_seen, out_dir, device)
    log = out_dir / "open_clip_train.log"
    started = time.perf_counter()
    with log.open("w") as stream:
        finished = subprocess.run([sys.executable, "-m", __name__, *arguments], stdout=stream, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - started
    epochs = int(arguments[arguments.index("--epochs") + 1])
    checkpoint = out_dir / "train" / "checkpoints" / f"epoch_{epochs}.pt"
    if finished.returncode != 0 or not checkpoint.is_file():
        tail = " / ".join(log.read_text(errors="replace").strip().splitlines()[-3:])
        raise ProtoclipError(f"open_clip_train failed (exit {finished.returncode}; log {log}): {tail}")
    inside = json.loads((out_dir / SECONDS).read_text())
    record = {"checkpoint": str(checkpoint), "seconds": inside["seconds"], "train_seconds": inside["train_seconds"],
              "process_seconds": round(seconds, 2), "epochs": epochs,
              "samples_seen": samples_seen, "arguments": arguments, "log": str(log)}
    write_json(record_file, record)
    return record


def _without_end_of_shard_marker() -> None:
    """open_clip_train 3.3 with webdataset >= 0.2.96: bind ``eof_value=None`` (mlfoundations/open_clip#935)."""
    import open_clip_train.data as peer_data
    from webdataset import tariterators

    if "eof_value" in inspect.signature(tariterators.tar_file_expander).parameters:
        peer_data.tar_file_expander = functools.partial(tariterators.tar_file_expander, eof_value=None)


def _timed_epochs(seconds: list[float]) -> None:
    """Append the wall time of each of open_clip_train's training passes to ``seconds``."""
    import open_clip_train.main as peer_main

    train_one_epoch = peer_main.train_one_epoch

    def timed(*args, **kwargs):
        started = time.perf_counter()
        try:
            return train_one_epoch(*args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - started)

    peer_main.train_one_epoch = timed


def main(argv: list[str]) -> None:
    from open_clip_train.main import main as open_clip_train_main

    register_tiny_configs()
    _without_end_of_shard_marker()
    epochs: list[float] = []
    _timed_epochs(epochs)
    started = time.perf_counter()
    open_clip_train_main(argv)
    write_json(Path(argv[argv.index("--logs") + 1]) / SECONDS,
               {"seconds": round(time.perf_counter() - started, 2), "train_seconds": round(sum(epochs), 2)})


if __name__ == "__main__":
    main(sys.argv[1:])
