"""URL lists in every format the image-caption corpora ship in → a stream of (url, caption) rows.

Formats (chosen by suffix; a ``.gz`` suffix or gzip magic bytes are decompressed on the fly):

- ``.json``: a list of objects, as BLIP's "synthetic filtered" caption files are (``url``/``caption``);
- ``.jsonl`` / ``.ndjson``: one object per line;
- ``.csv`` / ``.tsv``: a header row names the columns;
- ``.parquet``: LAION's metadata files (``URL``/``TEXT``);
- ``.txt``: one URL per line, no captions.

An input is a local path or any fsspec URL (``s3://bucket/laion/part-0.parquet``, ``gs://``, ``hdfs://``,
``https://``, ``file://``); local paths use plain file I/O.

Rows are yielded lazily (except json, which the format forces us to parse whole) so a 5M-row list never
sits in memory twice. A row that cannot be read (bad JSON line, missing field) is still yielded, with
``url=None``, so every input line keeps its place and its failure is recorded instead of dropped.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import io
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NamedTuple

from mgpt4.errors import DataError, UsageError

FORMATS = ("json", "jsonl", "csv", "tsv", "parquet", "txt")
_SUFFIX_FORMAT = {
    ".json": "json",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
    ".txt": "txt",
}
_GZIP_MAGIC = b"\x1f\x8b"


class UrlRow(NamedTuple):
    """One input row. ``url`` is None when the row had no usable URL field."""

    url: str | None
    caption: str | None


@dataclass(frozen=True)
class Columns:
    """Candidate column names, tried in order; the first one a file has is used."""

    url: tuple[str, ...]
    caption: tuple[str, ...]


# laion: LAION-400M/5B metadata parquet has URL/TEXT; the official MiniGPT-4 recipe instead feeds BLIP's
# laion_synthetic_filtered_large.json (url/caption), so both spellings are accepted.
# cc_sbu: BLIP's ccs_synthetic_filtered_large.json is a list of {"url", "caption"} objects.
PRESETS: dict[str, Columns] = {
    "laion": Columns(url=("URL", "url"), caption=("TEXT", "caption")),
    "cc_sbu": Columns(url=("url",), caption=("caption",)),
}
_DEFAULT_COLUMNS = Columns(url=("url", "URL"), caption=("caption", "TEXT", "text"))


def resolve_columns(url_col: str | None, caption_col: str | None, preset: str | None) -> Columns:
    """Explicit column names win over a preset, which wins over the defaults (url/URL, caption/TEXT/text).

    Raises:
        UsageError: unknown preset.
    """
    if preset is not None and preset not in PRESETS:
        raise UsageError(f"unknown preset '{preset}': choose one of {', '.join(PRESETS)}")
    base = PRESETS[preset] if preset else _DEFAULT_COLUMNS
    return Columns(
        url=(url_col,) if url_col else base.url, caption=(caption_col,) if caption_col else base.caption
    )


def detect_format(path: str | Path) -> str:
    """The list format from the file name (``.gz`` stripped), e.g. ``data.jsonl.gz`` → ``jsonl``.

    Raises:
        UsageError: an unrecognised suffix.
    """
    name = Path(path).name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    fmt = _SUFFIX_FORMAT.get(Path(name).suffix)
    if fmt is None:
        raise UsageError(f"{path}: unknown URL list format; use one of {', '.join(FORMATS)} (optionally .gz)")
    return fmt


def check_inputs(paths: Sequence[str | Path]) -> list[Path | str]:
    """Check that every input exists and has a known format; return local ones as paths, URLs as strings.

    Raises:
        UsageError: no inputs, a missing file, or an unknown format (naming the file).
    """
    if not paths:
        raise UsageError("no input URL list given: pass one or more json/jsonl/csv/tsv/parquet/txt files")
    out = []
    for p in paths:
        path = _source(p)
        if not _is_file(path):
            raise UsageError(f"{path}: no such input file")
        detect_format(path)
        out.append(path)
    return out


def check_columns(paths: Sequence[str | Path], columns: Columns) -> None:
    """Read the first row of each input, so a missing URL column is reported before anything is written.

    A ``.json`` list is skipped: the format makes reading its first row cost a parse of the whole file,
    which ``iter_rows`` does anyway when it reaches it.

    Raises:
        UsageError: a file lacks the URL column.
        DataError: a file is unreadable as its format.
    """
    for path in paths:
        if detect_format(path) != "json":
            with contextlib.closing(iter_rows([path], columns)) as rows:
                next(rows, None)


def iter_rows(paths: Sequence[str | Path], columns: Columns) -> Iterator[UrlRow]:
    """Yield every row of every input file, in order.

    Raises:
        UsageError: a file lacks the URL column (the message lists the columns it has).
        DataError: a file is unreadable as its format (corrupt gzip, not a JSON list, bad parquet).
    """
    for path in paths:
        path = _source(path)
        reader = _READERS[detect_format(path)]
        try:
            yield from reader(path, columns)
        except (OSError, EOFError, UnicodeDecodeError, csv.Error, ValueError) as exc:
            if isinstance(exc, FileNotFoundError):
                raise UsageError(f"{path}: no such input file") from exc
            raise DataError(f"{path}: cannot read as {detect_format(path)} ({exc})") from exc


def count_rows(path: str | Path) -> int | None:
    """A cheap row count for progress totals: exact for parquet, line-based (approximate) for text formats.

    json is None: counting it means parsing it whole, which ``iter_rows`` does anyway.
    """
    path = _source(path)
    fmt = detect_format(path)
    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            return pq.ParquetFile(_parquet_source(path)).metadata.num_rows
        if fmt == "json":
            return None
        with _open_binary(path) as f:
            lines = sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
        return max(lines - (1 if fmt in ("csv", "tsv") else 0), 0)
    except (OSError, EOFError, ValueError):
        return None


def _source(path: str | Path) -> Path | str:
    """A local path as a ``Path``; an fsspec URL stays a string."""
    return str(path) if "://" in str(path) else Path(path)


def _is_file(path: Path | str) -> bool:
    if isinstance(path, Path):
        return path.is_file()
    import fsspec

    try:
        fs, inner = fsspec.core.url_to_fs(path)
    except (ImportError, ValueError) as exc:  # an unknown protocol, or its package is not installed
        raise UsageError(f"{path}: {exc}") from exc
    try:
        return fs.isfile(inner)
    except OSError:
        return False


def _open_raw(path: Path | str) -> IO[bytes]:
    if isinstance(path, Path):
        return open(path, "rb")
    import fsspec

    return fsspec.open(path, "rb").open()


def _is_gzip(path: Path | str) -> bool:
    with _open_raw(path) as probe:
        return probe.read(2) == _GZIP_MAGIC


def _open_binary(path: Path | str) -> IO[bytes]:
    if not _is_gzip(path):
        return _open_raw(path)
    return gzip.open(path, "rb") if isinstance(path, Path) else gzip.open(_open_raw(path), "rb")


def _parquet_source(path: Path | str) -> Any:
    # A plain path lets pyarrow memory-map the file; gzip needs a (seekable) decompressing stream.
    if _is_gzip(path):
        return gzip.open(path, "rb") if isinstance(path, Path) else gzip.open(_open_raw(path), "rb")
    return str(path) if isinstance(path, Path) else _open_raw(path)


def _open_text(path: Path | str) -> IO[str]:
    # newline="" lets the csv module see embedded newlines in quoted fields.
    return io.TextIOWrapper(_open_binary(path), encoding="utf-8", errors="replace", newline="")


def _pick(available: Sequence[str], candidates: Sequence[str]) -> str | None:
    for name in candidates:
        if name in available:
            return name
    return None


def _missing_url_column(path: Path | str, columns: Columns, available: Sequence[str]) -> UsageError:
    shown = ", ".join(list(available)[:20]) or "(none)"
    return UsageError(
        f"{path}: no URL column {' / '.join(columns.url)}; it has: {shown} "
        "(choose one with --url-col, or --preset laion|cc_sbu)"
    )


def _text(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return value if isinstance(value, str) else str(value)


def _url(value: Any) -> str | None:
    text = _text(value)
    return text.strip() or None if text is not None else None


def _rows_from_objects(path: Path | str, objects: Iterator[Any], columns: Columns) -> Iterator[UrlRow]:
    """Rows from JSON objects; the URL column is fixed by the first object that has any candidate."""
    url_key = cap_key = None
    for obj in objects:
        if not isinstance(obj, dict):
            yield UrlRow(None, None)
            continue
        if url_key is None:
            url_key = _pick(obj, columns.url)
            cap_key = _pick(obj, columns.caption)
            if url_key is None:
                raise _missing_url_column(path, columns, list(obj))
        yield UrlRow(_url(obj.get(url_key)), _text(obj.get(cap_key)) if cap_key else None)


def _read_json(path: Path | str, columns: Columns) -> Iterator[UrlRow]:
    with _open_binary(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: not valid JSON ({exc}); a .json URL list is a list of objects") from exc
    if not isinstance(data, list):
        raise DataError(f"{path}: a .json URL list must be a list of objects (use .jsonl for one per line)")
    yield from _rows_from_objects(path, iter(data), columns)


def _read_jsonl(path: Path | str, columns: Columns) -> Iterator[UrlRow]:
    def objects() -> Iterator[Any]:
        with _open_text(path) as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    yield None  # keeps the row's place; recorded as "missing URL"

    yield from _rows_from_objects(path, objects(), columns)


def _read_delimited(path: Path | str, columns: Columns, delimiter: str) -> Iterator[UrlRow]:
    with _open_text(path) as f:
        reader = csv.reader(f, delimiter=delimiter)
        header = next(reader, None)
        if header is None:
            return
        header = [h.strip() for h in header]
        url_key = _pick(header, columns.url)
        if url_key is None:
            raise _missing_url_column(path, columns, header)
        cap_key = _pick(header, columns.caption)
        url_i = header.index(url_key)
        cap_i = header.index(cap_key) if cap_key else None
        for record in reader:
            if not record:
                continue
            url = record[url_i] if url_i < len(record) else None
            caption = record[cap_i] if cap_i is not None and cap_i < len(record) else None
            yield UrlRow(_url(url), caption)


def _read_csv(path: Path | str, columns: Columns) -> Iterator[UrlRow]:
    yield from _read_delimited(path, columns, ",")


def _read_tsv(path: Path | str, columns: Columns) -> Iterator[UrlRow]:
    yield from _read_delimited(path, columns, "\t")


def _read_parquet(path: Path | str, columns: Columns) -> Iterator[UrlRow]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        file = pq.ParquetFile(_parquet_source(path))
    except pa.ArrowException as exc:
        raise DataError(f"{path}: not a readable parquet file ({exc})") from exc
    names = file.schema_arrow.names
    url_key = _pick(names, columns.url)
    if url_key is None:
        raise _missing_url_column(path, columns, names)
    cap_key = _pick(names, columns.caption)
    wanted = [url_key] + ([cap_key] if cap_key else [])
    for batch in file.iter_batches(batch_size=65536, columns=wanted):
        urls = batch.column(0).to_pylist()
        caps = batch.column(1).to_pylist() if cap_key else [None] * len(urls)
        for url, caption in zip(urls, caps, strict=True):
            yield UrlRow(_url(url), _text(caption))


def _read_txt(path: Path | str, columns: Columns) -> Iterator[UrlRow]:
    del columns  # a txt list has URLs only
    with _open_text(path) as f:
        for line in f:
            if line.strip():
                yield UrlRow(line.strip(), None)


_READERS = {
    "json": _read_json,
    "jsonl": _read_jsonl,
    "csv": _read_csv,
    "tsv": _read_tsv,
    "parquet": _read_parquet,
    "txt": _read_txt,
}
