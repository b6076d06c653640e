"""The download stage through the real img2dataset: the embedded set via file:// URLs, a URL list
served by a loopback HTTP server (good images and every kind of failure), and bad input."""

from __future__ import annotations

import io
import math
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from protoclip_cli.data import synthetic
from protoclip_cli.data.shards import iter_samples
from protoclip_cli.workspace import Workspace

TRAIN, HELDOUT, PER_SHARD = 200, 64, 64

pytestmark = pytest.mark.integration  # downloads through img2dataset in processes


def protoclip(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """The real console entry point (main() turns errors into one sentence and exit 1)."""
    return subprocess.run(
        [sys.executable, "-m", "protoclip_cli", "download", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# -- the embedded data set ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic_download(tmp_path_factory):
    workspace = Workspace.at(tmp_path_factory.mktemp("ws"))
    proc = protoclip(
        "synthetic", "-w", str(workspace.root), "--train-size", str(TRAIN), "--heldout-size", str(HELDOUT),
        "--samples-per-shard", str(PER_SHARD), "--seed", "5", "--processes", "1",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return workspace, proc


def test_synthetic_manifest_counts_and_ground_truth(synthetic_download):
    workspace, proc = synthetic_download
    manifest = workspace.dataset_manifest("synthetic")
    assert (manifest["name"], manifest["source"], manifest["stage"]) == ("synthetic", "synthetic", "download")
    assert manifest["count_ok"] == TRAIN + HELDOUT and manifest["count_failed"] == 0
    for split, size in (("train", TRAIN), ("heldout", HELDOUT)):
        info = manifest["splits"][split]
        assert info["count_ok"] == size and info["count_failed"] == 0
        assert info["shards"] == [f"{i:05d}.tar" for i in range(math.ceil(size / PER_SHARD))]
    assert workspace.shards("synthetic", "heldout")[0] == workspace.root / "datasets/synthetic/heldout/00000.tar"
    truth = manifest["ground_truth"]
    assert truth["attribute"] == "class_name"
    assert truth["classes"] == list(synthetic.CLASS_NAMES) and truth["templates"] == list(synthetic.TEMPLATES)
    # The summary table goes to stdout with the per-split counts.
    assert "train" in proc.stdout and "heldout" in proc.stdout and str(TRAIN) in proc.stdout


@pytest.mark.parametrize("split,size", [("train", TRAIN), ("heldout", HELDOUT)])
def test_synthetic_samples_match_the_generator(synthetic_download, split, size):
    workspace, _ = synthetic_download
    samples = list(iter_samples(workspace.shards("synthetic", split)))
    assert len(samples) == size
    keys = [s.key for s in samples]
    assert len(set(keys)) == size
    # img2dataset's key: shard number, then the index within the shard (2 digits for 64 per shard).
    for sample in samples:
        assert divmod(sample.key, 100) == divmod(sample.meta["index"], PER_SHARD)
    assert sorted(s.meta["index"] for s in samples) == list(range(size))

    for sample in samples:
        expected = synthetic.scene(sample.meta["index"], seed=5, split=split)
        assert sample.caption == expected.caption
        for attribute, value in expected.attributes().items():
            assert sample.meta[attribute] == value, attribute
        assert sample.meta["status"] == "success"
    for sample in samples[:: max(1, size // 12)]:
        expected = synthetic.scene(sample.meta["index"], seed=5, split=split)
        image = Image.open(io.BytesIO(sample.image))
        assert image.format == "JPEG" and image.size == (64, 64)
        # The stored pixels are the generator's rendering, up to JPEG re-encoding.
        difference = np.abs(np.asarray(image.convert("RGB"), float) - np.asarray(synthetic.render(expected), float))
        assert difference.mean() < 6, difference.mean()


def test_synthetic_rerun_is_incremental_and_keeps_the_data(synthetic_download):
    workspace, _ = synthetic_download
    tar = workspace.split_dir("synthetic") / "00000.tar"
    before = tar.stat().st_mtime_ns
    manifest = (workspace.dataset_dir("synthetic") / "manifest.json").read_bytes()
    proc = protoclip(
        "synthetic", "-w", str(workspace.root), "--train-size", str(TRAIN), "--heldout-size", str(HELDOUT),
        "--samples-per-shard", str(PER_SHARD), "--seed", "5", "--processes", "1",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert tar.stat().st_mtime_ns == before  # finished shards are not written again
    # The same data keeps the same manifest, byte for byte: its hash is the version teacher files record.
    assert (workspace.dataset_dir("synthetic") / "manifest.json").read_bytes() == manifest
    assert workspace.dataset_manifest("synthetic")["count_ok"] == TRAIN + HELDOUT

    # Other data settings cannot be mixed into the same shards.
    proc = protoclip("synthetic", "-w", str(workspace.root), "--train-size", "10", "--heldout-size", str(HELDOUT),
                     "--samples-per-shard", str(PER_SHARD), "--seed", "5")  # fmt: skip
    assert proc.returncode == 1
    assert "synthetic_train_size=200" in proc.stderr and "--overwrite" in proc.stderr
    assert workspace.dataset_manifest("synthetic")["count_ok"] == TRAIN + HELDOUT


# -- a URL list over HTTP ----------------------------------------------------------------------


class _Server:
    """A loopback HTTP server with good JPEGs, a 404, a non-image body, a truncated JPEG and a
    URL that answers too late; it counts the requests it gets."""

    def __init__(self, images: dict[str, bytes]):
        self.requests: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                server.requests.append(self.path)
                name = self.path.lstrip("/")
                if name == "slow.jpg":
                    time.sleep(3)  # past the client's 1 s timeout
                    body, kind = images["good0.jpg"], "image/jpeg"
                elif name == "text.jpg":
                    body, kind = b"<html>not an image</html>", "text/html"
                elif name == "truncated.jpg":
                    body, kind = images["good0.jpg"][: len(images["good0.jpg"]) // 3], "image/jpeg"
                elif name in images:
                    body, kind = images[name], "image/jpeg"
                else:
                    self.send_error(404)
                    return
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", kind)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def _jpeg(index: int, size: int) -> bytes:
    return synthetic.jpeg_bytes(synthetic.render(synthetic.scene(index), size))


def test_http_list_counts_each_failure_and_rerun_downloads_nothing(tmp_path):
    images = {f"good{i}.jpg": _jpeg(i, 40 + 4 * i) for i in range(6)}
    # Shard 0 (4 rows) fails entirely and must not be listed; shards 1 and 2 hold the 6 good images.
    rows = ["missing.jpg", "text.jpg", "truncated.jpg", "slow.jpg"] + list(images)
    with _Server(images) as server:
        url_list = tmp_path / "list.tsv"
        lines = ["image_url\ttext\tsource_id"]
        lines += [f"{server.url}/{name}\tcaption of {name}\t{i}" for i, name in enumerate(rows)]
        url_list.write_text("\n".join(lines) + "\n")
        args = ["web", "--url-list", str(url_list), "--url-col", "image_url", "--caption-col", "text",
                "--extra-col", "source_id", "--image-size", "32", "--samples-per-shard", "4", "--processes", "1",
                "--threads", "4", "--timeout", "1", "--retries", "0", "-w", str(tmp_path / "ws")]  # fmt: skip
        proc = protoclip(*args)
        assert proc.returncode == 0, proc.stderr
        first_requests = len(server.requests)
        assert sorted(set(server.requests)) == sorted(f"/{name}" for name in rows)

        workspace = Workspace.at(tmp_path / "ws")
        manifest = workspace.dataset_manifest("web")
        train = manifest["splits"]["train"]
        assert (manifest["count_ok"], manifest["count_failed"]) == (6, 4)
        assert (train["count_ok"], train["failed_to_download"], train["failed_to_resize"]) == (6, 2, 2)
        assert sum(train["failures"].values()) == 4
        assert any("404" in reason for reason in train["failures"])
        assert any("timed out" in reason for reason in train["failures"])
        assert train["shards"] == ["00001.tar", "00002.tar"]
        assert not (workspace.split_dir("web") / "00000.tar").exists()
        assert "ground_truth" not in manifest

        samples = list(iter_samples(workspace.shards("web")))
        assert sorted(s.caption for s in samples) == sorted(f"caption of {name}" for name in images)
        for sample in samples:
            assert rows[sample.meta["source_id"]] in sample.caption
            assert Image.open(io.BytesIO(sample.image)).size == (32, 32)

        # The rerun finds every shard finished and asks the server for nothing.
        proc = protoclip(*args)
        assert proc.returncode == 0, proc.stderr
        assert len(server.requests) == first_requests
        assert workspace.dataset_manifest("web")["splits"]["train"] == train


# -- bad input -----------------------------------------------------------------------------------


def _assert_fails(proc: subprocess.CompletedProcess, *phrases: str) -> None:
    message = " ".join(proc.stderr.split())  # rich wraps long lines
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    for phrase in phrases:
        assert phrase in message, message


def test_missing_empty_and_malformed_lists_fail_with_one_sentence(tmp_path):
    ws = str(tmp_path / "ws")
    _assert_fails(protoclip("mine", "--url-list", str(tmp_path / "nope.tsv"), "-w", ws), "nope.tsv does not exist")

    columns = tmp_path / "columns.csv"
    columns.write_text("link,title\nhttp://127.0.0.1:9/a.jpg,a\n")
    _assert_fails(
        protoclip("mine", "--url-list", str(columns), "--input-format", "csv", "-w", ws),
        "has no column 'url' (found: link, title)",
        "--url-col",
    )

    header_only = tmp_path / "empty.tsv"
    header_only.write_text("url\tcaption\n")
    _assert_fails(protoclip("mine", "--url-list", str(header_only), "-w", ws), "has no rows")

    blank = tmp_path / "blank.tsv"
    blank.write_text("")
    _assert_fails(protoclip("cc3m", "--tsv", str(blank), "-w", ws), "blank.tsv is empty")

    _assert_fails(protoclip("laion", "-w", ws), "Unknown data set 'laion'", "synthetic, cc3m, cc12m", "--url-list")
    _assert_fails(protoclip("cc12m", "-w", ws), "needs its URL file", "--tsv")
    assert not list((tmp_path / "ws").glob("datasets/*/manifest.json"))


def test_every_url_failing_is_an_error_and_leaves_no_manifest(tmp_path):
    url_list = tmp_path / "dead.tsv"
    # CC12M's raw layout: url <TAB> caption, no header.
    url_list.write_text("".join(f"file://{tmp_path}/gone{i}.jpg\ta caption {i}\n" for i in range(5)))
    ws = tmp_path / "ws"
    proc = protoclip("cc12m", "--tsv", str(url_list), "--processes", "1", "--threads", "2", "-w", str(ws))
    _assert_fails(proc, "Every one of the 5 URLs of cc12m/train failed", "No such file", "--overwrite")
    assert (ws / "datasets" / "cc12m").is_dir()
    assert not (ws / "datasets" / "cc12m" / "manifest.json").exists()


def test_cc3m_tsv_columns_are_caption_then_url(tmp_path):
    from protoclip_cli.data.url_lists import HEADERLESS_COLUMNS, read_url_list

    tsv = tmp_path / "cc3m.tsv"
    tsv.write_text('a "quoted" dog on grass\thttp://x/1.jpg\nsecond one\thttp://x/2.jpg\n')
    table = read_url_list(tsv, "tsv", header=HEADERLESS_COLUMNS["cc3m"]).table
    assert table.column_names == ["url", "caption"]
    assert table.to_pydict() == {
        "url": ["http://x/1.jpg", "http://x/2.jpg"],
        "caption": ['a "quoted" dog on grass', "second one"],
    }


# -- a full disk -----------------------------------------------------------------------------------


def test_a_rendering_that_does_not_fit_names_the_image_and_leaves_no_half_cache(tmp_path, small_disk):
    """The embedded set is rendered to JPEGs before img2dataset reads them; a write that fails there
    named no file ("a file: the disk is full") and left the rendered half in cache/."""
    workspace = Workspace.at(tmp_path / "ws")
    small_disk(workspace.root / "cache", "200k")  # room for about a hundred of the 512 JPEGs
    proc = protoclip("synthetic", "--train-size", "512", "--heldout-size", "4", "-w", str(workspace.root))
    _assert_fails(proc, f"error: Cannot write {workspace.root}/cache/synthetic/train/0",
                  ".jpg: the disk is full; free some space or choose another folder, then rerun.")
    assert not (workspace.root / "cache" / "synthetic" / "train").exists()
    assert not (workspace.dataset_dir("synthetic") / "manifest.json").exists()


def test_a_download_into_a_full_disk_is_one_sentence_and_resumes_once_there_is_room(tmp_path, small_disk):
    """img2dataset's workers hang forever when their log, on the full disk, cannot be written; the
    download is stopped instead, its unfinished shards removed, and a rerun continues."""
    workspace = Workspace.at(tmp_path / "ws")
    disk = small_disk(workspace.datasets_dir, "1500k")  # the rendered JPEGs fit elsewhere; a few shards do not
    args = ["synthetic", "--train-size", "512", "--heldout-size", "64", "--samples-per-shard", "128",
            "-w", str(workspace.root)]
    proc = protoclip(*args, timeout=240)  # no hang
    shards = workspace.split_dir("synthetic", "train")
    _assert_fails(proc, f"error: Cannot write {shards}: the disk is full; free some space or choose another folder, "
                        "then rerun.")
    assert not (workspace.dataset_dir("synthetic") / "manifest.json").exists()
    finished = {p.name.split("_")[0] for p in shards.glob("*_stats.json")}
    assert all(p.name.split(".")[0].split("_")[0] in finished for p in shards.iterdir() if p.is_file())

    subprocess.run(["mount", "-o", "remount,size=20m", str(disk)], check=True)
    again = protoclip(*args)
    assert again.returncode == 0, again.stderr
    assert workspace.dataset_manifest("synthetic")["splits"]["train"]["count_ok"] == 512


def test_watching_a_download_reads_each_shards_stats_once(tmp_path):
    """The progress watch lists the folder each time but reads a shard's stats only when it first
    appears (img2dataset writes them once, complete): on object storage each read is a request."""
    import json

    from protoclip_cli.data.downloader import read_stats

    (tmp_path / "00000_stats.json").write_text(json.dumps({"count": 10, "successes": 9}))
    known: dict = {}
    assert read_stats(tmp_path, known) == {0: {"count": 10, "successes": 9}}
    (tmp_path / "00000_stats.json").write_text(json.dumps({"count": 99, "successes": 99}))  # not read again
    (tmp_path / "00001_stats.json").write_text(json.dumps({"count": 5, "successes": 5}))
    assert read_stats(tmp_path, known) == {0: {"count": 10, "successes": 9}, 1: {"count": 5, "successes": 5}}
    assert known == read_stats(tmp_path, known)
    assert read_stats(tmp_path)[0] == {"count": 99, "successes": 99}  # without a cache: read afresh
