"""The journal survives a torn write; id lists parse; the report escapes and marks verdicts."""

from __future__ import annotations

import pytest

from mgpt4.curate import records
from mgpt4.curate.report import render_report
from mgpt4.errors import DataError


def test_torn_last_line_is_cut_and_appends_start_clean(tmp_path):
    records.append_records(tmp_path, [{"image_id": "a"}, {"image_id": "b"}])
    with open(tmp_path / records.JOURNAL, "a") as handle:
        handle.write('{"image_id": "c", "ans')  # killed mid-write
    assert [r["image_id"] for r in records.read_journal(tmp_path)] == ["a", "b"]
    records.append_records(tmp_path, [{"image_id": "c"}])
    assert [r["image_id"] for r in records.read_journal(tmp_path)] == ["a", "b", "c"]


def test_corrupt_middle_line_names_file_and_line(tmp_path):
    (tmp_path / records.JOURNAL).write_text('{"image_id": "a"}\nnot json\n{"image_id": "b"}\n')
    with pytest.raises(DataError, match=r"curate.jsonl:2"):
        records.read_journal(tmp_path)


def test_read_ids_skips_comments_and_suffixes(tmp_path):
    file = tmp_path / "ids.txt"
    file.write_text("12\n\n# looks wrong\n13.jpg  # blurry\n abc \n")
    assert records.read_ids(file) == ["12", "13", "abc"]
    with pytest.raises(DataError, match="cannot read"):
        records.read_ids(tmp_path / "missing.txt")


def test_place_image_moves_between_folders(tmp_path):
    records.store_image(tmp_path, "x", True, b"\xff\xd8\xffdata")
    assert records.place_image(tmp_path, "x", False)
    assert (tmp_path / "rejected" / "x.jpg").read_bytes() == b"\xff\xd8\xffdata"
    assert not (tmp_path / "image" / "x.jpg").exists()
    assert not records.place_image(tmp_path, "y", True)


def test_report_marks_rejections_and_escapes_text():
    rows = [
        {"image_id": "ok1", "accepted": True, "caption": "A <b>red</b> circle.", "answer": "raw",
         "continued": True, "tokens": {"first": 12, "continue": 30}, "verdicts": []},
        {"image_id": "bad2", "accepted": False, "caption": "sorry", "answer": "sorry", "continued": False,
         "tokens": {"first": 90, "continue": 0},
         "verdicts": [{"name": "refusal", "passed": False, "reason": "refusal phrase 'sorry'"}]},
    ]  # fmt: skip
    page = render_report(rows, {"images": 2, "accepted": 1, "rejected": 1, "rejected_by": {"refusal": 1}})
    assert "A &lt;b&gt;red&lt;/b&gt; circle." in page and "<b>red</b>" not in page
    assert 'src="image/ok1.jpg"' in page and 'src="rejected/bad2.jpg"' in page
    assert "refusal: refusal phrase &#x27;sorry&#x27;" in page
    assert "12 + 30 after Continue" in page
    assert page.count('class="pick"') == 1  # only accepted images can be ticked for rejection
