"""Loaders, leave-one-out split, synthetic generator and per-device partitions."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import pytest

import shared.data.bundled as bundled
import shared.data.formats as formats
import shared.data.partition as partition
from shared.data.bundled import load_bundled_ml100k, resolve_cache_dir
from shared.data.datasets import load_interactions
from shared.data.formats import find_grouplens_files, load_grouplens, read_recbole_atomic
from shared.data.partition import (
    DeviceIndexError,
    item_popularity,
    load_device,
    load_titles,
    prepare_partitions,
    read_partition_info,
    write_partitions,
)
from shared.data.split import leave_one_out
from shared.data.synthetic import generate_synthetic
from shared.data.types import DataError, DeviceData, InteractionLog
from shared.metrics import popularity_baseline

if TYPE_CHECKING:
    from shared.config import DataConfig


@dataclass(frozen=True)
class _Cfg:
    """Duck-typed stand-in for shared.config.DataConfig, which would reject bad values itself."""

    dataset: str = "ml-100k"
    data_path: str = ""
    cache_dir: str = ""
    max_devices: int = 0
    duplicates: str = "drop"
    synthetic_users: int = 60
    synthetic_items: int = 40
    synthetic_interactions: int = 8
    synthetic_seed: int = 0


def make_cfg(**fields: Any) -> DataConfig:
    return cast("DataConfig", _Cfg(**fields))


# ----------------------------------------------------------------------------- split


def _tie_log() -> InteractionLog:
    # (user, item, timestamp) in file order. User 0 has three items at t=5 in file
    # order 13, 10, 11: a stable sort keeps that order; sorting ties by item id would not.
    rows = [
        (0, 13, 5.0),
        (1, 1, 3.0),
        (0, 10, 5.0),
        (0, 12, 1.0),
        (1, 2, 3.0),
        (0, 11, 5.0),
        (1, 3, 2.0),
        (2, 4, 1.0),
        (2, 5, 2.0),
        (1, 0, 9.0),
    ]
    users, items, times = zip(*rows, strict=True)
    return InteractionLog(
        user_ids=np.array(users, dtype=np.int64),
        item_ids=np.array(items, dtype=np.int64),
        timestamps=np.array(times),
        num_users=3,
        num_items=14,
        item_titles=None,
        source="hand-made",
    )


def test_leave_one_out_stable_ties_hand_computed() -> None:
    devices = leave_one_out(_tie_log())
    assert [d.device_id for d in devices] == [0, 1]  # user 2 has only two interactions
    user0, user1 = devices
    assert user0.train_items.tolist() == [12, 13]
    assert (user0.valid_item, user0.test_item) == (10, 11)
    assert user1.train_items.tolist() == [3, 1]
    assert (user1.valid_item, user1.test_item) == (2, 0)
    assert user0.train_items.dtype == np.int64


def test_leave_one_out_min_interactions() -> None:
    assert [d.device_id for d in leave_one_out(_tie_log(), min_interactions=4)] == [0, 1]
    assert leave_one_out(_tie_log(), min_interactions=5) == []
    with pytest.raises(ValueError, match="min_interactions"):
        leave_one_out(_tie_log(), min_interactions=2)


def test_leave_one_out_rejects_inconsistent_log() -> None:
    log = replace(_tie_log(), timestamps=np.zeros(3))
    with pytest.raises(DataError, match="differ in length"):
        leave_one_out(log)


# ------------------------------------------------------------------------- GroupLens


def _write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode(encoding))
    return path


def test_grouplens_ml100k_format(tmp_path: Path) -> None:
    # Users 196, 186, 22 -> dense 2, 1, 0 (numeric order; "186" < "196" < "22" as text).
    # Items 242, 302, 1000 -> dense 0, 1, 2 ("1000" would sort first as text).
    _write(
        tmp_path / "u.data",
        "196\t242\t3\t881250949\n186\t302\t3\t891717742\n22\t1000\t1\t878887116\n196\t302\t4\t881250949\n",
    )
    _write(
        tmp_path / "u.item",
        "242|Kolya (1996)|24-Jan-1997||http://x|0|0\n"
        "302|L.A. Confidential (1997)|01-Jan-1997||http://x|0|0\n"
        "1000|Café Society (1995)|01-Jan-1995||http://x|0|0\n",
        encoding="latin-1",
    )
    log = load_grouplens(tmp_path)
    assert log.user_ids.tolist() == [2, 1, 0, 2]
    assert log.item_ids.tolist() == [0, 1, 2, 1]
    assert log.timestamps.tolist() == [881250949.0, 891717742.0, 878887116.0, 881250949.0]
    assert (log.num_users, log.num_items) == (3, 3)
    assert log.item_titles == ("Kolya (1996)", "L.A. Confidential (1997)", "Café Society (1995)")
    assert "u.data" in log.source
    # The ratings file itself works as well.
    assert load_grouplens(tmp_path / "u.data").item_ids.tolist() == [0, 1, 2, 1]


def test_grouplens_ml1m_format(tmp_path: Path) -> None:
    _write(tmp_path / "ratings.dat", "1::1193::5::978300760\n1::661::3::978302109\n2::1193::4::978298413\n")
    _write(
        tmp_path / "movies.dat",
        "661::James and the Giant Peach (1996)::Animation|Children's|Musical\n"
        "1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n",
        encoding="latin-1",
    )
    log = load_grouplens(tmp_path)
    assert log.user_ids.tolist() == [0, 0, 1]
    assert log.item_ids.tolist() == [1, 0, 1]
    assert log.timestamps.tolist() == [978300760.0, 978302109.0, 978298413.0]
    assert log.item_titles == ("James and the Giant Peach (1996)", "One Flew Over the Cuckoo's Nest (1975)")


def test_grouplens_csv_format(tmp_path: Path) -> None:
    _write(
        tmp_path / "ratings.csv",
        "userId,movieId,rating,timestamp\n1,31,2.5,1260759144\n1,1029,3.0,1260759179\n7,31,4.0,851866703\n",
    )
    _write(
        tmp_path / "movies.csv",
        "movieId,title,genres\n"
        '31,"Dangerous Minds, The (1995)",Drama\n'
        '1029,"Dumbo ""The Flying Elephant"" (1941)",Animation|Children\n',
    )
    log = load_grouplens(tmp_path / "ratings.csv")
    assert log.user_ids.tolist() == [0, 0, 1]
    assert log.item_ids.tolist() == [0, 1, 0]
    assert log.item_titles == ("Dangerous Minds, The (1995)", 'Dumbo "The Flying Elephant" (1941)')


def test_grouplens_titles_optional_and_unofficial_name(tmp_path: Path) -> None:
    _write(tmp_path / "mine.tsv", "5\t7\t1\t10\n5\t8\t1\t11\n")
    files = find_grouplens_files(tmp_path / "mine.tsv")
    assert files.kind == "ml-100k" and files.titles is None
    log = load_grouplens(tmp_path / "mine.tsv")
    assert log.item_titles is None
    assert log.item_ids.tolist() == [0, 1]


def test_grouplens_blank_lines_are_skipped(tmp_path: Path) -> None:
    log = load_grouplens(_write(tmp_path / "u.data", "1\t2\t3\t4\n\n1\t3\t3\t5\n"))
    assert log.item_ids.tolist() == [0, 1]


MALFORMED = [
    # (file name, content, line, phrases the message must contain)
    ("u.data", "1\t2\t3\t4\n1\t3\t3\t5\n1\t4\t3\n", 3, ["expected 4 fields", "found 3"]),
    ("u.data", "1\t2\t3\t4\n1\t3\t3\t5\t9\n", 2, ["expected 4 fields", "found 5"]),
    ("u.data", "1\t2\t3\t4\nx\t3\t3\t5\n", 2, ["integer user id", "'x'"]),
    ("u.data", "1\t2.5\t3\t4\n", 1, ["integer item id", "'2.5'"]),
    ("u.data", "1\t2\t3\t4\n1\t3\t3\tabc\n", 2, ["numeric timestamp", "'abc'"]),
    ("u.data", "1\t2\t3\tnan\n", 1, ["numeric timestamp", "'nan'"]),
    ("u.data", "1\t2\t3\t4\n\n1\t3\t3\n", 3, ["expected 4 fields"]),
    ("ratings.dat", "1::2::3::4\n1,2,3,4\n", 2, ["expected 4 fields", "'::'", "found 1"]),
    ("ratings.dat", "1\t2::3::4::5\n", 1, ["integer UserID"]),
    ("ratings.csv", "user,movie,rating,timestamp\n1,2,3,4\n", 1, ["expected the header"]),
    ("ratings.csv", "userId,movieId,rating,timestamp\n1,2,3.5,100\n1,3,x,101\n", 3, ["numeric rating", "'x'"]),
]


@pytest.mark.parametrize(("name", "content", "line", "phrases"), MALFORMED)
def test_grouplens_malformed_line(tmp_path: Path, name: str, content: str, line: int, phrases: list[str]) -> None:
    path = _write(tmp_path / name, content)
    with pytest.raises(DataError) as info:
        load_grouplens(path)
    message = str(info.value)
    assert name in message
    assert f"line {line}:" in message
    for phrase in phrases:
        assert phrase in message


@pytest.mark.parametrize(
    ("name", "content", "phrase"),
    [
        ("u.data", "", "empty"),
        ("ratings.dat", "\n\n", "empty"),
        ("ratings.csv", "userId,movieId,rating,timestamp\n", "no data lines after the header"),
    ],
)
def test_grouplens_empty_file(tmp_path: Path, name: str, content: str, phrase: str) -> None:
    path = _write(tmp_path / name, content)
    with pytest.raises(DataError, match=re.escape(phrase)) as info:
        load_grouplens(path)
    assert name in str(info.value)


def test_grouplens_missing_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nope.dat.*file not found"):
        load_grouplens(tmp_path / "nope.dat")
    with pytest.raises(DataError, match="no GroupLens ratings file"):
        load_grouplens(tmp_path)


@pytest.mark.parametrize(
    ("ratings", "titles_name", "titles", "line", "phrase"),
    [
        ("u.data", "u.item", "242|Kolya (1996)|x\n302\n", 2, "at least 2 fields"),
        ("ratings.dat", "movies.dat", "1::A (1990)::Drama\nB::B (1991)::Drama\n", 2, "integer item id"),
        ("ratings.csv", "movies.csv", "movieId,title,genres\n1,A,Drama\nz,B,Drama\n", 3, "integer item id"),
    ],
)
def test_grouplens_malformed_titles(
    tmp_path: Path, ratings: str, titles_name: str, titles: str, line: int, phrase: str
) -> None:
    content = {
        "u.data": "1\t2\t3\t4\n",
        "ratings.dat": "1::2::3::4\n",
        "ratings.csv": "userId,movieId,rating,timestamp\n1,2,3,4\n",
    }[ratings]
    _write(tmp_path / ratings, content)
    _write(tmp_path / titles_name, titles)
    with pytest.raises(DataError) as info:
        load_grouplens(tmp_path)
    message = str(info.value)
    assert titles_name in message and f"line {line}:" in message and phrase in message


def test_line_numbers_across_parse_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(formats, "_CHUNK_LINES", 2)
    good = "".join(f"{u}\t{i}\t1\t{100 + i}\n" for u, i in [(1, 1), (1, 2), (2, 1), (2, 3), (3, 2)])
    log = load_grouplens(_write(tmp_path / "ok" / "u.data", good))
    assert log.item_ids.tolist() == [0, 1, 0, 2, 1]
    bad = good + "4\t4\t1\n"  # line 6, in the third chunk
    with pytest.raises(DataError, match=r"u\.data: line 6: expected 4 fields"):
        load_grouplens(_write(tmp_path / "bad" / "u.data", bad))


def test_recbole_atomic_reader(tmp_path: Path) -> None:
    inter = _write(
        tmp_path / "x.inter",
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n10\t5\t3\t100\n2\t5\t4\t99\n",
    )
    item = _write(tmp_path / "x.item", "item_id:token\tmovie_title:token_seq\tclass:token_seq\n5\tHeat\tAction Crime\n")
    log = read_recbole_atomic(inter, item)
    assert log.user_ids.tolist() == [1, 0]
    assert log.item_titles == ("Heat",)
    bad = _write(tmp_path / "bad.inter", "user_id:token\titem_id:token\ttimestamp:float\n1\t2\t3\n1\t2\n")
    with pytest.raises(DataError, match=r"bad\.inter: line 3: expected 3 fields"):
        read_recbole_atomic(bad)
    no_time = _write(tmp_path / "nt.inter", "user_id:token\titem_id:token\n1\t2\n")
    with pytest.raises(DataError, match=r"nt\.inter: line 1: expected a RecBole header"):
        read_recbole_atomic(no_time)


# ---------------------------------------------------------------------- configuration


def test_resolve_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FEDREC_CACHE_DIR", str(tmp_path / "env"))
    assert resolve_cache_dir("") == tmp_path / "env"
    assert resolve_cache_dir(str(tmp_path / "set")) == tmp_path / "set"
    monkeypatch.delenv("FEDREC_CACHE_DIR")
    assert resolve_cache_dir("") == Path.home() / ".cache" / "fedrec"


@pytest.mark.parametrize(
    ("cfg", "key"),
    [
        (make_cfg(dataset="grouplens"), "data-path"),
        (make_cfg(dataset="ml-100k", data_path="/somewhere"), "data-path"),
        (make_cfg(dataset="synthetic", data_path="/somewhere"), "data-path"),
        (make_cfg(dataset="ml-1m"), "dataset"),
        (make_cfg(dataset="synthetic", synthetic_interactions=4), "synthetic-interactions"),
        (make_cfg(dataset="synthetic", synthetic_items=3), "synthetic-items"),
        (make_cfg(dataset="synthetic", synthetic_users=0), "synthetic-users"),
    ],
)
def test_invalid_configuration_names_the_key(cfg: DataConfig, key: str) -> None:
    with pytest.raises(DataError, match=f"^{key}:"):
        load_interactions(cfg)


def test_load_interactions_dispatch(tmp_path: Path) -> None:
    _write(tmp_path / "u.data", "1\t2\t3\t4\n")
    assert load_interactions(make_cfg(dataset="grouplens", data_path=str(tmp_path))).num_items == 1
    log = load_interactions(make_cfg(dataset="synthetic"))
    assert log.num_users == 60 and "seed=0" in log.source


# -------------------------------------------------------------------------- synthetic


def _arrays(log: InteractionLog) -> list[np.ndarray]:
    return [log.user_ids, log.item_ids, log.timestamps]


def test_synthetic_deterministic() -> None:
    first = generate_synthetic(300, 80, 12, seed=5)
    second = generate_synthetic(300, 80, 12, seed=5)
    other = generate_synthetic(300, 80, 12, seed=6)
    assert all(np.array_equal(a, b) for a, b in zip(_arrays(first), _arrays(second), strict=True))
    assert first.source == second.source
    assert not np.array_equal(first.item_ids[:200], other.item_ids[:200])


def test_synthetic_shape_and_invariants() -> None:
    log = generate_synthetic(500, 200, 15, seed=1)
    counts = np.bincount(log.user_ids, minlength=500)
    assert counts.min() >= 5
    assert abs(counts.mean() - 15) < 1.5
    assert len({(u, i) for u, i in zip(log.user_ids.tolist(), log.item_ids.tolist(), strict=True)}) == len(log.item_ids)
    same_user = np.diff(log.user_ids) == 0
    assert np.all(np.diff(log.timestamps)[same_user] > 0)
    assert log.item_ids.min() >= 0 and log.item_ids.max() < 200
    for text in ("users=500", "items=200", "mean_interactions=15", "seed=1", "zipf_exponent=1.0", "latent_dim=16"):
        assert text in log.source


def test_synthetic_long_tail() -> None:
    log = generate_synthetic(2000, 1000, 20, seed=0)
    counts = np.sort(np.bincount(log.item_ids, minlength=1000))[::-1]
    assert counts[:100].sum() / counts.sum() > 0.40


def test_synthetic_tastes_matter() -> None:
    # Without tastes every user draws from one popularity law; with tastes users
    # disagree, so the item sets of pairs of users overlap less.
    def mean_pair_jaccard(strength: float) -> float:
        log = generate_synthetic(200, 300, 30, seed=3, taste_strength=strength)
        per_user = [set(log.item_ids[log.user_ids == u].tolist()) for u in range(200)]
        pairs = zip(per_user[::2], per_user[1::2], strict=True)
        return float(np.mean([len(a & b) / len(a | b) for a, b in pairs]))

    assert mean_pair_jaccard(3.0) < 0.8 * mean_pair_jaccard(0.0)


# ------------------------------------------------------------------------- partitions


def _split_devices() -> list[DeviceData]:
    return leave_one_out(_tie_log())


def _assert_same(a: DeviceData, b: DeviceData) -> None:
    assert a.device_id == b.device_id
    assert a.train_items.tolist() == b.train_items.tolist()
    assert (a.valid_item, a.test_item) == (b.valid_item, b.test_item)


def test_partition_round_trip(tmp_path: Path) -> None:
    devices = _split_devices()
    titles = tuple(f"t{i}" for i in range(14))
    info = write_partitions(devices, 14, "hand-made", titles, tmp_path / "p")
    assert (info.num_devices, info.num_items, info.source) == (2, 14, "hand-made")
    assert read_partition_info(tmp_path / "p") == info
    for index, device in enumerate(devices):
        loaded = load_device(info.path, index)
        _assert_same(loaded, device)
        assert type(loaded.train_items) is np.ndarray and loaded.train_items.dtype == np.int64
    assert load_titles(info.path) == titles
    expected = np.zeros(14, dtype=np.int64)
    expected[[12, 13, 3, 1]] = 1
    assert item_popularity(info).tolist() == expected.tolist()
    assert [p.name for p in tmp_path.iterdir()] == ["p"]  # no temporary directory left


def test_load_device_reads_only_its_slice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    devices = _split_devices()
    info = write_partitions(devices, 14, "hand-made", None, tmp_path / "p")
    accessed: dict[str, list[object]] = {}
    real_load = np.load

    class Spy:
        def __init__(self, name: str, array: np.ndarray) -> None:
            self._name, self._array = name, array

        def __len__(self) -> int:
            return len(self._array)

        def __getitem__(self, key: Any) -> np.ndarray:
            accessed.setdefault(self._name, []).append(key)
            return self._array[key]

        def __array__(self, *args: object, **kwargs: object) -> np.ndarray:
            raise AssertionError(f"whole array {self._name} read")

    def spy_load(file: Path, *args: Any, **kwargs: Any) -> Spy:
        assert kwargs.get("mmap_mode") == "r"
        return Spy(Path(file).stem, real_load(file, *args, **kwargs))

    monkeypatch.setattr(np, "load", spy_load)
    loaded = load_device(info.path, 1)
    _assert_same(loaded, devices[1])
    assert accessed["items"] == [slice(2, 4)]  # device 0 holds items[0:2]
    assert all(key in (1, 2) for name in ("offsets", "device_ids", "valid", "test") for key in accessed[name])
    assert load_titles(info.path) is None


def test_load_device_index_out_of_range(tmp_path: Path) -> None:
    info = write_partitions(_split_devices(), 14, "hand-made", None, tmp_path / "p")
    for index in (2, -1):
        with pytest.raises(DeviceIndexError, match="outside"):
            load_device(info.path, index)
    assert issubclass(DeviceIndexError, IndexError) and issubclass(DeviceIndexError, DataError)


def test_write_partitions_refuses_existing_and_bad_items(tmp_path: Path) -> None:
    write_partitions(_split_devices(), 14, "hand-made", None, tmp_path / "p")
    with pytest.raises(FileExistsError):
        write_partitions(_split_devices(), 14, "hand-made", None, tmp_path / "p")
    with pytest.raises(DataError, match="outside"):
        write_partitions(_split_devices(), 12, "hand-made", None, tmp_path / "q")
    assert not (tmp_path / "q").exists()


def test_read_partition_info_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no meta.json"):
        read_partition_info(tmp_path / "missing")
    info = write_partitions(_split_devices(), 14, "hand-made", None, tmp_path / "p")
    meta_path = info.path / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "version": 999}))
    with pytest.raises(DataError, match="version 999"):
        read_partition_info(info.path)
    meta_path.write_text("{not json")
    with pytest.raises(DataError, match="corrupt"):
        read_partition_info(info.path)
    meta_path.write_text(json.dumps(meta))
    (info.path / "valid.npy").unlink()
    with pytest.raises(DataError, match="valid.npy"):
        read_partition_info(info.path)
    with pytest.raises(DataError, match="valid.npy"):
        load_device(info.path, 0)


def test_prepare_partitions_reuses_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = make_cfg(dataset="synthetic", synthetic_users=50)
    info = prepare_partitions(cfg, tmp_path)
    assert info.num_devices == 50 and info.num_items == 40
    assert info.path.parent == tmp_path / "partitions"
    devices = leave_one_out(load_interactions(cfg))
    _assert_same(load_device(info.path, 7), devices[7])

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("partition rebuilt although cached")

    monkeypatch.setattr(partition, "write_partitions", fail)
    assert prepare_partitions(cfg, tmp_path) == info
    monkeypatch.undo()

    limited = prepare_partitions(replace(cfg, max_devices=10), tmp_path)
    assert limited.path != info.path
    assert limited.num_devices == 10
    assert [load_device(limited.path, i).device_id for i in range(10)] == list(range(10))
    with pytest.raises(DataError, match="^max-devices:"):
        prepare_partitions(replace(cfg, max_devices=-1), tmp_path)


def test_prepare_partitions_grouplens_content_hash(tmp_path: Path) -> None:
    data = _write(tmp_path / "data" / "u.data", "1\t1\t1\t1\n1\t2\t1\t2\n1\t3\t1\t3\n")
    cfg = make_cfg(dataset="grouplens", data_path=str(data.parent))
    first = prepare_partitions(cfg, tmp_path / "cache")
    assert prepare_partitions(cfg, tmp_path / "cache").path == first.path
    _write(data, "1\t1\t1\t1\n1\t2\t1\t2\n1\t3\t1\t3\n1\t4\t1\t4\n")
    second = prepare_partitions(cfg, tmp_path / "cache")
    assert second.path != first.path
    assert load_device(second.path, 0).train_items.tolist() == [0, 1]


# -------------------------------------------------------------------- bundled ML-100K


@pytest.fixture(scope="module")
def ml100k() -> InteractionLog:
    """The real bundled data set, from fedrec's cache (pip-downloaded on first use)."""
    return load_bundled_ml100k(resolve_cache_dir(""))


def test_bundled_ml100k_shape(ml100k: InteractionLog) -> None:
    assert (ml100k.num_users, ml100k.num_items, len(ml100k.user_ids)) == (943, 1682, 100000)
    assert ml100k.item_titles is not None and ml100k.item_titles[:2] == ("Toy Story", "GoldenEye")
    # First row of ml-100k.inter is "196 242 3 881250949"; ids 1..n map to 0..n-1.
    assert (ml100k.user_ids[0], ml100k.item_ids[0], ml100k.timestamps[0]) == (195, 241, 881250949.0)


def test_bundled_ml100k_popularity_matches_data_md(ml100k: InteractionLog) -> None:
    devices = leave_one_out(ml100k)
    assert len(devices) == 943
    counts = np.bincount(np.concatenate([d.train_items for d in devices]), minlength=ml100k.num_items)
    figures = popularity_baseline(counts, devices)
    assert figures["hr@10"] == pytest.approx(0.086, abs=0.01)
    assert figures["ndcg@10"] == pytest.approx(0.045, abs=0.01)


def test_bundled_ml100k_partitions_from_cached_files(ml100k: InteractionLog, tmp_path: Path) -> None:
    # A cache already holding the files is used as is (lookup step (a), no download).
    shutil.copytree(resolve_cache_dir("") / "ml-100k", tmp_path / "ml-100k")
    info = prepare_partitions(make_cfg(dataset="ml-100k"), tmp_path)
    assert (info.num_devices, info.num_items) == (943, 1682)
    devices = [load_device(info.path, i) for i in range(info.num_devices)]
    figures = popularity_baseline(item_popularity(info), devices)
    assert figures["hr@10"] == pytest.approx(0.086, abs=0.01)
    assert load_titles(info.path) == ml100k.item_titles


def test_bundled_cache_with_wrong_content_is_replaced(
    ml100k: InteractionLog, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shutil.copytree(resolve_cache_dir("") / "ml-100k", tmp_path / "ml-100k")
    inter = tmp_path / "ml-100k" / "ml-100k.inter"
    good = inter.read_bytes()
    inter.write_bytes(good[: len(good) // 2])  # a damaged cache file
    monkeypatch.setattr(bundled, "_bundled_from_installed", lambda: None)
    monkeypatch.setattr(
        bundled, "_bundled_from_pip", lambda: {"ml-100k.inter": good, "ml-100k.item": b"item_id:token\n"}
    )
    with pytest.raises(DataError, match="unexpected SHA-256"):
        load_bundled_ml100k(tmp_path)
    item = (tmp_path / "ml-100k" / "ml-100k.item").read_bytes()
    monkeypatch.setattr(bundled, "_bundled_from_pip", lambda: {"ml-100k.inter": good, "ml-100k.item": item})
    assert len(load_bundled_ml100k(tmp_path).user_ids) == 100000
    assert inter.read_bytes() == good


def test_bundled_ml100k_from_installed_distribution(
    ml100k: InteractionLog, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An installed recbole 1.2.1 (data files only) is used before any download.
    site = tmp_path / "site"
    shutil.copytree(resolve_cache_dir("") / "ml-100k", site / "recbole" / "dataset_example" / "ml-100k")

    class FakeDistribution:
        version = "1.2.1"

        def locate_file(self, path: str) -> Path:
            return site / path

    def no_pip() -> dict[str, bytes]:
        raise AssertionError("downloaded although recbole is installed")

    monkeypatch.setattr(bundled.importlib.metadata, "distribution", lambda name: FakeDistribution())
    monkeypatch.setattr(bundled, "_bundled_from_pip", no_pip)
    log = load_bundled_ml100k(tmp_path / "cache")
    assert np.array_equal(log.item_ids, ml100k.item_ids)
    assert (tmp_path / "cache" / "ml-100k" / "ml-100k.item").is_file()


# ---------------------------------------------------------------------- data hygiene

_FOUR_USERS = "1\t1\t1\t1\n1\t2\t1\t2\n1\t3\t1\t3\n2\t1\t1\t1\n2\t4\t1\t2\n2\t5\t1\t3\n2\t6\t1\t4\n3\t2\t1\t9\n"


def test_a_file_concatenated_with_itself_is_deduplicated_with_a_count(tmp_path: Path) -> None:
    data = _write(tmp_path / "data" / "u.data", _FOUR_USERS * 2)
    cfg = make_cfg(dataset="grouplens", data_path=str(data.parent))
    log = load_interactions(cfg)
    single = load_grouplens(_write(tmp_path / "single" / "u.data", _FOUR_USERS))
    assert len(log.user_ids) == len(single.user_ids) == 8
    assert log.item_ids.tolist() == single.item_ids.tolist()
    assert "8 exact duplicate interactions removed" in log.source
    # Every device's test item stays out of its training history, as in the single file.
    info = prepare_partitions(cfg, tmp_path / "cache")
    assert "8 exact duplicate interactions removed" in info.source
    for d in range(info.num_devices):
        device = load_device(info.path, d)
        assert device.test_item not in device.train_items.tolist()
    # Same user and item at another time is a new interaction, not a duplicate.
    again = _write(tmp_path / "again" / "u.data", _FOUR_USERS + "3\t2\t1\t10\n")
    assert len(load_interactions(make_cfg(dataset="grouplens", data_path=str(again.parent))).user_ids) == 9


def test_duplicates_can_be_refused(tmp_path: Path) -> None:
    data = _write(tmp_path / "data" / "u.data", _FOUR_USERS + "1\t2\t1\t2\n")
    with pytest.raises(DataError, match="1 exact duplicate interactions .*duplicates = 'drop'"):
        load_interactions(make_cfg(dataset="grouplens", data_path=str(data.parent), duplicates="refuse"))


@pytest.mark.parametrize("name", ["u.data", "ratings.csv"])
def test_a_file_cut_inside_its_last_line_is_an_error(tmp_path: Path, name: str) -> None:
    whole = _FOUR_USERS if name == "u.data" else "userId,movieId,rating,timestamp\n" + _FOUR_USERS.replace("\t", ",")
    lines = whole.count("\n")
    path = _write(tmp_path / name, whole[:-1])  # cut just before the final line break
    with pytest.raises(DataError, match=f"line {lines}: the file ends inside this line"):
        load_grouplens(path)
    path = _write(tmp_path / name, whole[:-3])  # cut inside the last line's separators
    with pytest.raises(DataError, match=f"line {lines}: "):
        load_grouplens(path)
    # A last timestamp cut to its first digits would parse: still refused.
    path = _write(tmp_path / name, whole.rstrip("\n") + "0")
    with pytest.raises(DataError, match="truncated"):
        load_grouplens(path)
    assert len(load_grouplens(_write(tmp_path / name, whole)).user_ids) == 8


def test_users_left_out_by_the_split_are_counted(tmp_path: Path) -> None:
    data = _write(tmp_path / "data" / "u.data", _FOUR_USERS)
    info = prepare_partitions(make_cfg(dataset="grouplens", data_path=str(data.parent)), tmp_path / "cache")
    assert info.num_devices == 2
    assert "1 users with fewer than 3 interactions left out" in info.source


def test_the_data_sets_own_ids_and_titles_reach_the_top_k_export(tmp_path: Path) -> None:
    from server.reporting import Catalogue, export_top_k
    from shared.data.partition import load_original_ids, load_titles

    # Users 196, 22, 186 and items 242, 302, 1000, 51 (dense ids follow numeric order).
    ratings = "".join(
        f"{u}\t{i}\t3\t{t}\n"
        for t, (u, i) in enumerate(
            [
                (196, 242),
                (196, 302),
                (196, 1000),
                (22, 302),
                (22, 51),
                (22, 242),
                (186, 51),
                (186, 1000),
                (186, 302),
                (186, 242),
            ]
        )  # fmt: skip
    )
    data = _write(tmp_path / "data" / "u.data", ratings)
    _write(
        tmp_path / "data" / "u.item",
        "51|Legends of the Fall (1994)|x||x|0\n242|Kolya (1996)|x||x|0\n302|L.A. Confidential (1997)|x||x|0\n"
        "1000|Café Society (1995)|x||x|0\n",
        encoding="latin-1",
    )
    info = prepare_partitions(make_cfg(dataset="grouplens", data_path=str(data.parent)), tmp_path / "cache")
    users, items = load_original_ids(info.path)
    assert users is not None and items is not None
    assert users.tolist() == [22, 186, 196] and items.tolist() == [51, 242, 302, 1000]
    path = export_top_k(tmp_path, {0: [3, 0], 2: [1]}, "csv", "test", Catalogue(users, items, load_titles(info.path)))
    assert path is not None
    assert path.read_text(encoding="utf-8").splitlines() == [
        "device_id,rank,item_id,user,item,title",
        "0,1,3,22,1000,Café Society (1995)",
        "0,2,0,22,51,Legends of the Fall (1994)",
        "2,1,1,196,242,Kolya (1996)",
    ]
