"""Shards that live elsewhere: object storage and HTTP through fsspec, ``pipe:`` through webdataset.

A shard is named by a local path or a URL: ``s3://`` and ``gs://`` (fsspec with s3fs or gcsfs),
``http(s)://`` (fsspec over aiohttp, streamed) or ``pipe:COMMAND`` (webdataset's opener: the
command's standard output, e.g. ``pipe:aws s3 cp s3://bucket/00000.tar -``). :func:`open_shard`
gives every reader (training, evaluation, teacher-embed, cluster) the same binary stream.

A remote read can fail half-way: the connection drops, the server stalls, the object is not there
yet. :class:`RetryingStream` opens the shard again and continues at the byte it had reached (a
seek where the store allows ranges, the bytes read again and dropped otherwise), waiting
``PROTOCLIP_SHARD_RETRY_WAIT`` seconds before the first retry and twice as long before each next,
``PROTOCLIP_SHARD_RETRIES`` times in a row; then it raises :class:`ShardUnavailable`, one sentence
naming the shard. A read that receives nothing for ``PROTOCLIP_SHARD_TIMEOUT`` seconds counts as a
failure, so a stalled server ends in that sentence too, never in a hang.
"""

from __future__ import annotations

import io
import os
import time
from pathlib import Path
from typing import Any, BinaryIO

from protoclip_cli.errors import ProtoclipError

RETRIES_ENV, RETRY_WAIT_ENV, TIMEOUT_ENV = "PROTOCLIP_SHARD_RETRIES", "PROTOCLIP_SHARD_RETRY_WAIT", "PROTOCLIP_SHARD_TIMEOUT"
DEFAULT_RETRIES, DEFAULT_RETRY_WAIT, DEFAULT_TIMEOUT = 5, 1.0, 60.0
_SKIP_CHUNK = 1 << 20
# Extras that bring fsspec's implementation of a scheme.
_PACKAGES = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "http": "aiohttp", "https": "aiohttp"}


class ShardUnavailable(ProtoclipError):
    """A shard that could not be read after the retries (the message says which and what to check)."""


def is_remote(location: str | Path) -> bool:
    """A URL that is no local file: ``s3://``, ``gs://``, ``http(s)://``, ``pipe:``, ..."""
    text = str(location)
    return isinstance(location, str) and (text.startswith("pipe:") or ("://" in text and not text.startswith("file://")))


def _setting(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        raise ProtoclipError(f"{name}={os.environ[name]!r} is not a number; set it to a number or unset it.") from None


def _scheme(url: str) -> str:
    return url.split("://", 1)[0].lower() if "://" in url else ""


def filesystem(url: str) -> tuple[Any, str]:
    """``(fsspec filesystem, path)`` of a folder or file URL, with timeouts for remote stores."""
    import fsspec

    timeout = _setting(TIMEOUT_ENV, DEFAULT_TIMEOUT)
    scheme = _scheme(url)
    options: dict[str, Any] = {}
    if scheme in ("http", "https"):
        import aiohttp

        options["client_kwargs"] = {"timeout": aiohttp.ClientTimeout(total=None, sock_connect=timeout, sock_read=timeout)}
    elif scheme == "s3":
        options["config_kwargs"] = {"connect_timeout": timeout, "read_timeout": timeout}
    try:
        return fsspec.core.url_to_fs(url, **options)
    except ImportError as error:
        package = _PACKAGES.get(scheme, f"the fsspec implementation of {scheme}://")
        raise ProtoclipError(
            f"Reading {scheme}:// needs {package}; install it (pip install 'protoclip[s3]' for s3://, pip install "
            f"{package} otherwise) ({error})."
        ) from error
    except ValueError as error:  # fsspec: unknown protocol
        raise ProtoclipError(f"{url} is no location fsspec can read ({error}); use a path, s3://, gs://, http(s):// or pipe:.") from error


def _open_raw(url: str) -> BinaryIO:
    if url.startswith("pipe:"):
        from webdataset.gopen import gopen

        return gopen(url, "rb")
    fs, path = filesystem(url)
    if _scheme(url) in ("http", "https"):
        # Streamed: one request per shard, no range requests (plain HTTP servers often have none).
        return fs.open(path, "rb", block_size=0)
    return fs.open(path, "rb")


def _close_quietly(stream) -> None:
    try:
        stream.close()
    except Exception:  # a pipe stopped early exits non-zero; a dropped connection fails to close
        pass


class RetryingStream(io.RawIOBase):
    """A remote shard read as one stream across failed reads (see the module's docstring)."""

    def __init__(self, url: str) -> None:
        super().__init__()
        self.url = url
        self.offset = 0
        self.retries = int(_setting(RETRIES_ENV, DEFAULT_RETRIES))
        self.wait = _setting(RETRY_WAIT_ENV, DEFAULT_RETRY_WAIT)
        self._stream: BinaryIO | None = None
        self._attempt(lambda: None)  # open it now: a missing shard fails here, not at its first read

    def readable(self) -> bool:
        return True

    def _drop(self) -> None:
        if self._stream is not None:
            _close_quietly(self._stream)
            self._stream = None

    def _reopen(self) -> None:
        """Open the shard and move to ``offset``, the bytes already given to the reader."""
        stream = _open_raw(self.url)
        try:
            if self.offset:
                try:
                    stream.seek(self.offset)
                except (ValueError, OSError, io.UnsupportedOperation):  # a pipe or a streamed response
                    left = self.offset
                    while left:
                        skipped = stream.read(min(left, _SKIP_CHUNK))
                        if not skipped:
                            raise EOFError(f"the stream ended at byte {self.offset - left} of the {self.offset} read before")
                        left -= len(skipped)
        except BaseException:
            _close_quietly(stream)
            raise
        self._stream = stream

    def _attempt(self, action):
        """``action()`` on an open stream, reopened after a failure, ``retries`` times in a row."""
        failures = 0
        while True:
            try:
                if self._stream is None:
                    self._reopen()
                return action()
            except ShardUnavailable:
                raise
            except Exception as error:  # connection, timeout, a missing object, a failed command
                failures += 1
                self._drop()
                if failures > self.retries:
                    raise ShardUnavailable(
                        f"Shard {self.url} could not be read ({_reason(error)}), {failures} attempts in a row; check "
                        "that it exists and that this machine reaches it (network, credentials, AWS_ENDPOINT_URL), "
                        "then rerun the same command."
                    ) from error
                time.sleep(self.wait * 2 ** (failures - 1))

    def readinto(self, buffer) -> int:
        def read() -> int:
            data = self._stream.read(len(buffer))
            buffer[: len(data)] = data
            return len(data)

        count = self._attempt(read)
        self.offset += count
        return count

    def close(self) -> None:
        self._drop()
        super().close()


def _reason(error: BaseException) -> str:
    if isinstance(error, FileNotFoundError):
        return "no such file or object"
    text = (str(error).strip().splitlines() or [""])[0] or type(error).__name__
    return text if len(text) <= 160 else text[:160].rsplit(" ", 1)[0] + " ..."


def open_shard(location: str | Path) -> BinaryIO:
    """A binary stream of a shard: a local file, or a remote one read through :class:`RetryingStream`."""
    if not is_remote(location):
        path = str(location)
        return open(path[len("file://"):] if path.startswith("file://") else path, "rb")
    return io.BufferedReader(RetryingStream(str(location)), buffer_size=_SKIP_CHUNK)


def check_reachable(url: str) -> None:
    """Read the first block of a remote shard (with the retries), so that a wrong address, a missing
    credential or a missing object stops a command before its work, in one sentence."""
    with open_shard(url) as stream:
        stream.read(512)
