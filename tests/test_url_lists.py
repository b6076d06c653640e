"""What real URL lists hold: bytes that are not UTF-8, repeated URLs, a folder passed as the list,
and failures whose raw reason is an OpenCV assertion. Each is counted or said in one sentence."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from protoclip_cli.data import synthetic
from protoclip_cli.data.downloader import readable_reason
from protoclip_cli.data.shards import iter_samples
from protoclip_cli.data.url_lists import read_url_list
from protoclip_cli.errors import ProtoclipError
from protoclip_cli.workspace import Workspace

REPO = Path(__file__).resolve().parents[1]


def test_non_utf8_bytes_are_replaced_and_counted(tmp_path, capsys):
    tsv = tmp_path / "list.tsv"
    tsv.write_bytes(b"url\tcaption\nhttp://x/1.jpg\tcaf\xe9 au lait\nhttp://x/2.jpg\tplain\nhttp://x/\xff.jpg\tok\n")
    checked = read_url_list(tsv, "tsv")
    assert checked.table.column("caption").to_pylist() == ["caf\ufffd au lait", "plain", "ok"]
    assert checked.table.column("url").to_pylist()[2] == "http://x/\ufffd.jpg"
    assert checked.report() == {"rows": 3, "duplicate_urls": 0, "non_utf8_captions": 1, "non_utf8_urls": 1}
    assert "1 caption(s) and 1 URL(s) of" in " ".join(capsys.readouterr().err.split())


def test_binary_parquet_columns_are_decoded_the_same_way(tmp_path):
    path = tmp_path / "list.parquet"
    pq.write_table(pa.table({"url": pa.array([b"http://x/1.jpg", b"http://x/2.jpg"], pa.binary()),
                             "caption": pa.array([b"ok", b"\xc3\x28 broken"], pa.binary())}), path)
    checked = read_url_list(path, "parquet")
    assert checked.table.column("caption").to_pylist() == ["ok", "\ufffd( broken"]
    assert (checked.repaired_captions, checked.repaired_urls) == (1, 0)


def test_duplicate_urls_are_counted_and_kept(tmp_path, capsys):
    csv = tmp_path / "list.csv"
    csv.write_text("url,caption\nhttp://x/1.jpg,a\nhttp://x/2.jpg,b\nhttp://x/1.jpg,c\nhttp://x/1.jpg,d\n")
    checked = read_url_list(csv, "csv")
    assert checked.rows == 4 and checked.duplicate_urls == 2
    message = " ".join(capsys.readouterr().err.split())
    assert "2 row(s) of" in message and "repeat the URL of an earlier row; they are kept" in message


def test_a_folder_as_the_list_says_so(tmp_path):
    with pytest.raises(ProtoclipError, match=r"URL list .* is a folder; pass the list file itself"):
        read_url_list(tmp_path, "tsv")


def test_opencv_empty_buffer_reads_empty_body():
    raw = ("OpenCV(4.14.0) /io/opencv/modules/imgcodecs/src/loadsave.cpp:1310: error: (-215:Assertion failed) "
           "!buf.empty() in function 'imdecode_'\n")
    assert readable_reason(raw) == "empty body"
    assert readable_reason("HTTP Error 404: Not Found\n") == "HTTP Error 404: Not Found"


@pytest.mark.integration  # starts processes
def test_a_download_counts_duplicates_repairs_captions_and_names_empty_bodies(tmp_path):
    good = tmp_path / "good.jpg"
    good.write_bytes(synthetic.jpeg_bytes(synthetic.render(synthetic.scene(0), 48)))
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    rows = [(good, b"a red circle"), (good, b"the same picture again"), (empty, b"nothing"),
            (good, b"caf\xe9 au lait")]  # fmt: skip
    url_list = tmp_path / "list.tsv"
    url_list.write_bytes(b"url\tcaption\n" + b"".join(p.as_uri().encode() + b"\t" + c + b"\n" for p, c in rows))
    workspace = Workspace.at(tmp_path / "ws")
    result = subprocess.run(
        [sys.executable, "-m", "protoclip_cli", "download", "mine", "--url-list", str(url_list), "--image-size", "32",
         "--processes", "1", "--threads", "1", "-w", str(workspace.root)],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    train = workspace.dataset_manifest("mine")["splits"]["train"]
    assert train["failures"] == {"empty body": 1} and train["count_ok"] == 3
    assert train["url_list"] == {"rows": 4, "duplicate_urls": 2, "non_utf8_captions": 1, "non_utf8_urls": 0}
    captions = sorted(sample.caption for sample in iter_samples(workspace.shards("mine")))
    assert captions == ["a red circle", "caf\ufffd au lait", "the same picture again"]
    message = " ".join(result.stderr.split())
    assert "2 row(s) of" in message and "1 caption(s) and 0 URL(s) of" in message
    assert "empty body (1)" in " ".join(result.stdout.split())
