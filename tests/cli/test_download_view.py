"""The terminal side of ``mgpt4 download``: the rich progress bar fed by the library's counts."""

from __future__ import annotations

import logging

import pytest

from mgpt4.cli.download import ProgressBar
from mgpt4.download.progress import DownloadProgress


def test_progress_bar_and_log_lines(capsys: pytest.CaptureFixture[str]) -> None:
    with ProgressBar() as bar, DownloadProgress(total=10, callback=bar) as progress:
        progress.skip(4)
        progress.advance(ok=5, failed=1)
    err = capsys.readouterr().err
    assert "10/10" in err and "img/s" in err and "ok  83.3%" in err

    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("mgpt4.download")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        with DownloadProgress(total=100, log_every=0.0) as progress:
            progress.advance(ok=30, failed=10)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    assert lines and lines[0].startswith("40/100 rows done, 30 ok (75.0%)") and "ETA" in lines[0]
