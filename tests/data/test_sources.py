"""URL lists in every format → (url, caption) rows; presets; errors that name the file."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mgpt4.data.sources import UrlRow, check_inputs, count_rows, detect_format, iter_rows, resolve_columns
from mgpt4.errors import DataError, UsageError

ROWS = [("http://a/1.jpg", "a cat"), ("http://a/2.jpg", "a dog, sitting"), ("http://a/3.jpg", 'say "hi"')]


def _write(path: Path, fmt: str, url_col: str = "url", cap_col: str = "caption", gz: bool = False) -> Path:
    objs = [{url_col: u, cap_col: c, "extra": 1} for u, c in ROWS]
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(objs), path)
        return path
    if fmt == "json":
        text = json.dumps(objs)
    elif fmt == "jsonl":
        text = "".join(json.dumps(o) + "\n" for o in objs)
    elif fmt in ("csv", "tsv"):
        import csv
        import io

        buf = io.StringIO()
        writer = csv.writer(buf, delimiter="," if fmt == "csv" else "\t")
        writer.writerow([url_col, cap_col, "extra"])
        writer.writerows([u, c, 1] for u, c in ROWS)
        text = buf.getvalue()
    else:
        text = "".join(u + "\n" for u, _ in ROWS)
    data = text.encode()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


@pytest.mark.parametrize(
    ("fmt", "gz"),
    [(f, gz) for f in ("json", "jsonl", "csv", "tsv") for gz in (False, True)] + [("parquet", False)],
)
def test_every_format_reads_urls_and_captions(tmp_path: Path, fmt: str, gz: bool) -> None:
    path = _write(tmp_path / (f"list.{fmt}" + (".gz" if gz else "")), fmt, gz=gz)
    rows = list(iter_rows([path], resolve_columns(None, None, None)))
    assert rows == [UrlRow(u, c) for u, c in ROWS]


def test_txt_has_urls_only_and_skips_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "urls.txt"
    path.write_text("http://a/1.jpg\n\n  http://a/2.jpg  \n")
    assert list(iter_rows([path], resolve_columns(None, None, None))) == [
        UrlRow("http://a/1.jpg", None),
        UrlRow("http://a/2.jpg", None),
    ]


def test_gzip_is_detected_by_magic_bytes_too(tmp_path: Path) -> None:
    path = tmp_path / "list.jsonl"  # gzipped but named without .gz
    path.write_bytes(gzip.compress(b'{"url": "http://a/1.jpg", "caption": "x"}\n'))
    assert list(iter_rows([path], resolve_columns(None, None, None))) == [UrlRow("http://a/1.jpg", "x")]


def test_laion_preset_reads_url_text_parquet(tmp_path: Path) -> None:
    path = _write(tmp_path / "laion.parquet", "parquet", url_col="URL", cap_col="TEXT")
    rows = list(iter_rows([path], resolve_columns(None, None, "laion")))
    assert rows == [UrlRow(u, c) for u, c in ROWS]


def test_laion_preset_also_reads_blip_json(tmp_path: Path) -> None:
    # The official recipe feeds BLIP's laion_synthetic_filtered_large.json (url/caption) to the laion set.
    path = _write(tmp_path / "laion_synthetic_filtered_large.json", "json")
    assert list(iter_rows([path], resolve_columns(None, None, "laion")))[0] == UrlRow(*ROWS[0])


def test_cc_sbu_preset_reads_blip_filtered_json(tmp_path: Path) -> None:
    path = _write(tmp_path / "ccs_synthetic_filtered_large.json", "json")
    assert len(list(iter_rows([path], resolve_columns(None, None, "cc_sbu")))) == 3


def test_explicit_columns_win_over_preset(tmp_path: Path) -> None:
    path = _write(tmp_path / "list.csv", "csv", url_col="link", cap_col="alt")
    rows = list(iter_rows([path], resolve_columns("link", "alt", "laion")))
    assert rows[1] == UrlRow(*ROWS[1])


def test_several_files_are_read_in_order(tmp_path: Path) -> None:
    a = _write(tmp_path / "a.jsonl", "jsonl")
    b = _write(tmp_path / "b.txt", "txt")
    rows = list(iter_rows([a, b], resolve_columns(None, None, None)))
    assert len(rows) == 6 and rows[3] == UrlRow(ROWS[0][0], None)


def test_missing_url_column_names_the_file_and_its_columns(tmp_path: Path) -> None:
    path = _write(tmp_path / "list.parquet", "parquet", url_col="link")
    with pytest.raises(UsageError, match=r"list\.parquet.*no URL column.*link"):
        list(iter_rows([path], resolve_columns(None, None, None)))


def test_bad_rows_keep_their_place(tmp_path: Path) -> None:
    path = tmp_path / "list.jsonl"
    path.write_text('{"url": "http://a/1.jpg"}\n{not json\n{"caption": "no url"}\n[1, 2]\n{"url": "  "}\n')
    rows = list(iter_rows([path], resolve_columns(None, None, None)))
    assert [r.url for r in rows] == ["http://a/1.jpg", None, None, None, None]


def test_null_values_in_parquet_become_none(tmp_path: Path) -> None:
    path = tmp_path / "list.parquet"
    pq.write_table(pa.table({"url": ["http://a/1.jpg", None], "caption": [None, "x"]}), path)
    assert list(iter_rows([path], resolve_columns(None, None, None))) == [
        UrlRow("http://a/1.jpg", None),
        UrlRow(None, "x"),
    ]


def test_input_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="nope.jsonl: no such input file"):
        check_inputs([tmp_path / "nope.jsonl"])
    (tmp_path / "list.xml").write_text("<x/>")
    with pytest.raises(UsageError, match="list.xml: unknown URL list format"):
        check_inputs([tmp_path / "list.xml"])
    with pytest.raises(UsageError, match="no input"):
        check_inputs([])
    with pytest.raises(UsageError, match="unknown preset"):
        resolve_columns(None, None, "coco")


def test_unreadable_inputs_are_data_errors(tmp_path: Path) -> None:
    obj = tmp_path / "obj.json"
    obj.write_text('{"url": "http://a/1.jpg"}')
    with pytest.raises(DataError, match="must be a list"):
        list(iter_rows([obj], resolve_columns(None, None, None)))
    broken = tmp_path / "broken.jsonl.gz"
    broken.write_bytes(gzip.compress(b'{"url": "http://a/1.jpg"}\n' * 100)[:40])
    with pytest.raises(DataError, match="broken.jsonl.gz"):
        list(iter_rows([broken], resolve_columns(None, None, None)))
    bad_parquet = tmp_path / "bad.parquet"
    bad_parquet.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match="bad.parquet"):
        list(iter_rows([bad_parquet], resolve_columns(None, None, None)))


def test_formats_and_counts(tmp_path: Path) -> None:
    assert detect_format("x/laion.parquet") == "parquet"
    assert detect_format("a.JSONL.gz") == "jsonl"
    assert count_rows(_write(tmp_path / "a.csv", "csv")) == 3
    assert count_rows(_write(tmp_path / "a.parquet", "parquet")) == 3
    assert count_rows(_write(tmp_path / "a.jsonl.gz", "jsonl", gz=True)) == 3
    assert count_rows(_write(tmp_path / "a.json", "json")) is None
