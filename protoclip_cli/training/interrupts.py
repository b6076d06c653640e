"""Stopping training from outside: Ctrl-C, SIGTERM and SLURM's ``--signal=USR1@N``, one path.

SIGINT (Ctrl-C), SIGTERM (what SLURM sends at the time limit and Kubernetes on preemption; Python
would otherwise die at once, printing nothing and leaving the manifest ``running``) and SIGUSR1
(SLURM's warning ``--signal=USR1@SECONDS`` before the time limit) all stop training the same way:

- inside a training pass or a checkpoint save (:func:`deferred`), the signal is only recorded;
  the trainer asks :func:`stop_requested` at every step boundary, writes a checkpoint of the step
  just done and stops, so a requeued job loses no step;
- elsewhere (extraction, clustering, loading) it raises :class:`StopSignal` at once: the newest
  checkpoint is then the end of the previous episode, which is where a resume starts anyway;
- a second signal raises at once even while deferred (a second Ctrl-C means now).

Each signal ends the command with its own exit status (:data:`EXIT_CODES`): 130 and 143, as a
shell reports a process ended by SIGINT or SIGTERM, and 138 (128 + SIGUSR1) for SLURM's warning,
so a batch script can tell "requeue me" from a failure.

A KeyboardInterrupt that Python drops (raised inside a finaliser: "Exception ignored") is not
lost either: the signal was recorded, and :func:`stop_requested` reports it at the next step boundary.
"""

from __future__ import annotations

import contextlib
import os
import signal
from typing import Iterator

import torch

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGUSR1: 138}
NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM", signal.SIGUSR1: "SIGUSR1"}

_received: int | None = None  # the first stop signal of the block, if any
_deferring = 0  # depth of deferred() blocks


class StopSignal(KeyboardInterrupt):
    """Training stopped by a stop signal (a KeyboardInterrupt, so every cleanup that handles Ctrl-C
    handles it); ``signum`` is the signal."""

    def __init__(self, signum: int):
        super().__init__(NAMES.get(signum, signal.Signals(signum).name))
        self.signum = signum


def _on_signal(signum: int, frame) -> None:
    global _received
    first = _received is None
    if first:
        _received = signum
    if _deferring and first:
        return  # acted on at the next step boundary
    raise StopSignal(_received if first else signum)


@contextlib.contextmanager
def catching_stop_signals() -> Iterator[None]:
    """Handle SIGINT, SIGTERM and SIGUSR1 as above while the block runs (main thread only; elsewhere
    Python delivers none), and restore the previous handlers after it."""
    global _received
    _received = None
    try:
        previous = {signum: signal.signal(signum, _on_signal) for signum in STOP_SIGNALS}
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _received = None


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """A stop signal inside the block is recorded only, to be acted on at a step boundary."""
    global _deferring
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1


def stop_requested() -> int | None:
    """The stop signal received (one a finaliser swallowed included), or None."""
    return _received


def worker_signals(*_: object) -> None:
    """A data-loader worker's start (``worker_init_fn``). A terminal's Ctrl-C and SLURM's signals
    reach every process, workers included. SIGINT and SIGUSR1 are the training process's to act on,
    so workers ignore them and keep serving batches until it stops. SIGTERM ends a worker with exit
    status 0: it must stay able to end one (it is what the loader's own shutdown sends), and a
    worker killed by a signal would make the loader's SIGCHLD handler raise in the training process
    wherever it is, in the middle of a step; a clean exit only fails the next fetch, a step boundary."""
    for signum in (signal.SIGINT, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _end_worker)


def _end_worker(signum: int, frame) -> None:
    os._exit(0)


class StopAgreement:
    """The ranks' agreement on a stop signal at each step boundary: the signal any rank received, so
    that all stop at the same step. Over a CPU group of its own, so the question never waits for the
    GPU (with NCCL, reading a device flag would each step)."""

    def __init__(self, world_size: int) -> None:
        self.group = torch.distributed.new_group(backend="gloo") if world_size > 1 else None

    def signal(self) -> int | None:
        signum = stop_requested() or 0
        if self.group is not None:
            flag = torch.tensor([signum], dtype=torch.int64)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self.group)
            signum = int(flag)
        return signum or None
