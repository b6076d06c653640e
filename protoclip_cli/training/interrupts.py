"""Ctrl-C that training cannot lose.

Python turns SIGINT into a KeyboardInterrupt raised wherever the main thread happens to be. Raised
inside a finaliser (a generator being closed, a ``__del__``: the data pipeline has both), it is
printed as "Exception ignored" and dropped, and training would go on as if nothing had happened.
:func:`catching_sigint` records every SIGINT before raising it as usual, and the trainer calls
:func:`raise_if_interrupted` between steps, so a dropped one is raised again there.
"""

from __future__ import annotations

import contextlib
import signal
from typing import Iterator

_received = False


def _on_sigint(signum: int, frame) -> None:
    global _received
    _received = True
    signal.default_int_handler(signum, frame)  # KeyboardInterrupt, as Python's own handler


@contextlib.contextmanager
def catching_sigint() -> Iterator[None]:
    """Record SIGINTs while the block runs (main thread only; elsewhere Python delivers none)."""
    global _received
    _received = False
    try:
        previous = signal.signal(signal.SIGINT, _on_sigint)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _received = False


def raise_if_interrupted() -> None:
    """Raise KeyboardInterrupt if a SIGINT arrived (one a finaliser swallowed included)."""
    if _received:
        raise KeyboardInterrupt
