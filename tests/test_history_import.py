"""History files: everything is validated first; every error names the file, the line or index, and the problem."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from client.history_import import HistoryImportError, parse_history


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_csv_with_and_without_ratings(tmp_path: Path) -> None:
    path = _write(tmp_path, "h.csv", "timestamp,item_id,rating\n100,3,4\n\n2024-01-01T00:00:00Z,7,\n50.5,0,2.5\n")
    records = parse_history(path, 10)
    assert [(r.item_id, r.timestamp, r.rating) for r in records] == [
        (3, 100.0, 4.0),
        (7, 1704067200.0, None),
        (0, 50.5, 2.5),
    ]
    plain = parse_history(_write(tmp_path, "p.csv", "item_id,timestamp\n1,10\n"), 10)
    assert plain[0].rating is None


def test_json_list_of_objects(tmp_path: Path) -> None:
    rows = [
        {"item_id": 1, "timestamp": 10},
        {"item_id": 2, "timestamp": "1970-01-01T00:00:20+00:00", "rating": None},
        {"item_id": 3, "timestamp": 30.0, "rating": 5},
    ]
    records = parse_history(_write(tmp_path, "h.json", json.dumps(rows)), 4)
    assert [(r.item_id, r.timestamp, r.rating) for r in records] == [(1, 10.0, None), (2, 20.0, None), (3, 30.0, 5.0)]
    # No suffix: sniffed from the content.
    assert len(parse_history(_write(tmp_path, "history", json.dumps(rows)), 4)) == 3


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("item_id,timestamp\n1,10\n99,20\n", "line 3: item_id 99 is not in the catalogue (ids 0 to 9)"),
        ("item_id,timestamp\n1,10\n2.5,20\n", "line 3: item_id must be an integer, found '2.5'"),
        ("item_id,timestamp\nabc,10\n", "line 2: item_id must be an integer"),
        ("item_id,timestamp\n1,yesterday\n", "line 2: timestamp must be Unix seconds or an ISO 8601"),
        ("item_id,timestamp\n1,-5\n", "line 2: timestamp '-5' is before 1970"),
        ("item_id,timestamp\n1,nan\n", "line 2: timestamp must be Unix seconds"),
        ("item_id,rating\n1,3\n", "line 1: bad header 'item_id,rating': missing column(s) timestamp"),
        ("item_id,timestamp,genre\n1,3,x\n", "unknown column(s) 'genre'"),
        ("item_id,timestamp\n1,10,5\n", "line 2: expected 2 fields (item_id,timestamp), found 3"),
        ("item_id,timestamp\n1,10\n2,11\n1,10\n", "line 4: duplicate of line 2 (item_id 1, timestamp 10)"),
        ("item_id,timestamp,rating\n1,10,great\n", "line 2: rating must be a number, found 'great'"),
        ("item_id,timestamp\n", "no interactions after the header"),
    ],
)
def test_csv_errors_name_file_line_and_problem(tmp_path: Path, text: str, expected: str) -> None:
    path = _write(tmp_path, "history.csv", text)
    with pytest.raises(HistoryImportError) as info:
        parse_history(path, 10)
    message = str(info.value)
    assert str(path) in message and "nothing imported" in message
    assert expected in message


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ([{"item_id": 1, "timestamp": 1}, {"item_id": 1.5, "timestamp": 2}], "index 1: item_id must be an integer"),
        ([{"item_id": 1, "timestamp": 1}, {"item_id": "7", "timestamp": 2}], "index 1: item_id must be a JSON integer"),
        ([{"item_id": 1}], "index 0: missing key(s) timestamp"),
        ([{"item_id": True, "timestamp": 1}], "index 0: item_id must be an integer"),
        ([{"item_id": 1, "timestamp": 1, "score": 2}], "index 0: unknown key(s) 'score'"),
        ([{"item_id": 1, "timestamp": 1}, {"item_id": 1, "timestamp": 1.0}], "index 1: duplicate of index 0"),
        ([[1, 2]], "index 0: expected an object"),
        ([], "the list is empty"),
        ({"item_id": 1}, "expected a JSON list"),
        ([{"item_id": 1, "timestamp": 10**400}], "index 0: timestamp"),
        ([{"item_id": 1, "timestamp": 1, "rating": 10**400}], "index 0: rating"),
    ],
)
def test_json_errors_name_file_index_and_problem(tmp_path: Path, payload: object, expected: str) -> None:
    path = _write(tmp_path, "history.json", json.dumps(payload))
    with pytest.raises(HistoryImportError) as info:
        parse_history(path, 10)
    assert str(path) in str(info.value) and expected in str(info.value)


def test_empty_missing_and_broken_files(tmp_path: Path) -> None:
    with pytest.raises(HistoryImportError, match="the file is empty"):
        parse_history(_write(tmp_path, "empty.csv", "  \n"), 10)
    with pytest.raises(HistoryImportError, match="file not found"):
        parse_history(tmp_path / "missing.csv", 10)
    with pytest.raises(HistoryImportError, match="line 2: not valid JSON"):
        parse_history(_write(tmp_path, "broken.json", '[\n{"item_id": 1,,}]'), 10)
    latin = tmp_path / "latin.csv"
    latin.write_bytes(b"item_id,timestamp\n1,\xe9\n")
    with pytest.raises(HistoryImportError, match="not UTF-8"):
        parse_history(latin, 10)


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    path = _write(tmp_path, "h.csv", "item_id,timestamp\n1,10\n50,x\n2,20\n-1,30\n")
    with pytest.raises(HistoryImportError) as info:
        parse_history(path, 10)
    assert info.value.problems == [
        "line 3: item_id 50 is not in the catalogue (ids 0 to 9)",
        "line 3: timestamp must be Unix seconds or an ISO 8601 date-time, found 'x'",
        "line 5: item_id -1 is not in the catalogue (ids 0 to 9)",
    ]
    assert "3 problems" in str(info.value)
