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


def test_latin1_captions_are_decoded_as_cp1252_urls_percent_encoded_and_both_counted(tmp_path, capsys):
    tsv = tmp_path / "list.tsv"
    tsv.write_bytes(b"url\tcaption\nhttp://x/1.jpg\tcaf\xe9 au lait\nhttp://x/2.jpg\tplain\n"
                    b"http://x/\xff.jpg\t\x93quoted\x94 \x80 5\n")
    checked = read_url_list(tsv, "tsv")
    assert checked.table.column("caption").to_pylist() == ["caf\u00e9 au lait", "plain", "\u201cquoted\u201d \u20ac 5"]
    assert checked.table.column("url").to_pylist()[2] == "http://x/%FF.jpg"  # the byte the server knows
    assert checked.report() == {"rows": 3, "duplicate_urls": 0, "non_utf8_captions": 2, "non_utf8_urls": 1}
    said = " ".join(capsys.readouterr().err.split())
    assert (f"2 caption(s) of {tsv} are not UTF-8 (the first in row 1); they were decoded as cp1252 (Windows "
            "Latin-1) instead, e.g. 'caf\u00e9 au lait'") in said
    assert "1 URL(s) of" in said and "(the first in row 3); those bytes were percent-encoded" in said


def test_binary_parquet_columns_are_decoded_the_same_way(tmp_path):
    path = tmp_path / "list.parquet"
    pq.write_table(pa.table({"url": pa.array([b"http://x/1.jpg", b"http://x/2.jpg"], pa.binary()),
                             "caption": pa.array([b"ok", b"\xc3\x28 broken"], pa.binary())}), path)
    checked = read_url_list(path, "parquet")
    assert checked.table.column("caption").to_pylist() == ["ok", "\u00c3( broken"]
    assert (checked.repaired_captions, checked.repaired_urls) == (1, 0)


def test_a_parquet_string_column_holding_latin1_bytes_is_not_passed_on_silently(tmp_path, capsys):
    """Some parquet writers store bytes that are not UTF-8 in a string column; pyarrow reads them
    without a check, and they became U+FFFD on the way to the shards without a word."""
    path = tmp_path / "list.parquet"
    captions = pa.array([b"caf\xe9 au lait", b"ok"], pa.binary()).view(pa.string())
    pq.write_table(pa.table({"url": ["http://x/1.jpg", "http://x/2.jpg"], "caption": captions}), path)
    checked = read_url_list(path, "parquet")
    assert checked.table.column("caption").to_pylist() == ["caf\u00e9 au lait", "ok"]
    assert checked.report()["non_utf8_captions"] == 1
    assert "1 caption(s) of" in " ".join(capsys.readouterr().err.split())


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


def bomb_png(path: Path, side: int) -> Path:
    """A black 1-bit PNG of side x side pixels: a few hundred KB that decode to side * side bytes."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    compressor, row = zlib.compressobj(9), b"\x00" * (1 + -(-side // 8))  # filter byte, then 1 bit per pixel
    pixels = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit greyscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b""))
    return path


def test_opencv_pixel_limit_reads_as_the_option():
    raw = ("OpenCV(4.14.0) /io/opencv/modules/imgcodecs/src/loadsave.cpp:79: error: (-215:Assertion failed) "
           "pixels <= CV_IO_MAX_IMAGE_PIXELS in function 'validateInputImageSize'\n")
    assert readable_reason(raw) == readable_reason("image area too large") == "more pixels than --max-pixels allows"


@pytest.mark.integration  # starts processes
def test_a_download_counts_duplicates_repairs_captions_names_empty_bodies_and_refuses_a_pixel_bomb(tmp_path):
    good = tmp_path / "good.jpg"
    good.write_bytes(synthetic.jpeg_bytes(synthetic.render(synthetic.scene(0), 48)))
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    bomb = bomb_png(tmp_path / "bomb.png", 20000)  # 4e8 pixels: over PIL's 89,478,485
    assert bomb.stat().st_size < 100_000
    rows = [(good, b"a red circle"), (good, b"the same picture again"), (empty, b"nothing"),
            (good, b"caf\xe9 au lait"), (bomb, b"a black square of 20000 pixels a side")]  # fmt: skip
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
    assert train["failures"] == {"empty body": 1, "more pixels than --max-pixels allows": 1}
    assert train["count_ok"] == 3 and train["count_failed"] == 2
    assert train["url_list"] == {"rows": 5, "duplicate_urls": 2, "non_utf8_captions": 1, "non_utf8_urls": 0}
    captions = sorted(sample.caption for sample in iter_samples(workspace.shards("mine")))
    assert captions == ["a red circle", "caf\u00e9 au lait", "the same picture again"]
    message = " ".join(result.stderr.split())
    assert "2 row(s) of" in message and "1 caption(s) of" in message and "decoded as cp1252" in message
    assert "empty body (1)" in " ".join(result.stdout.split())
