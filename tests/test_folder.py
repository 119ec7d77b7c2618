"""Dataset folder: CSV/TSV/npy round trips, streaming writer, and precise errors."""

import gzip
import json
import pathlib
import re

import numpy as np
import pytest

from jax_recsys.data import folder
from jax_recsys.data.folder import DataError, DatasetFolder


def _write(path: pathlib.Path, text: str) -> pathlib.Path:
    path.write_text(text)
    return path


def test_csv_round_trip_types(tmp_path):
    _write(
        tmp_path / "interactions.csv",
        "user_id,item_id,timestamp,click,score\n"
        "u1,10,86400,1,0.5\n"
        "u2,11,86401,0,1.25\n"
        '"u,3",10,172800,1,2\n',
    )
    ds = DatasetFolder(tmp_path)
    assert ds.table_names == ["interactions"]
    t = ds.table("interactions")
    assert t["user_id"].dtype.kind == "U"
    np.testing.assert_array_equal(t["user_id"], ["u1", "u2", "u,3"])
    assert t["item_id"].dtype == np.int64
    np.testing.assert_array_equal(t["item_id"], [10, 11, 10])
    assert t["timestamp"].dtype == np.int64
    assert t["score"].dtype == np.float64
    np.testing.assert_allclose(t["score"], [0.5, 1.25, 2.0])
    np.testing.assert_array_equal(t["click"], [1, 0, 1])
    sub = ds.table("interactions", columns=["item_id"])
    assert list(sub) == ["item_id"]


def test_tsv_and_npy_tables_discovered(tmp_path):
    _write(tmp_path / "users.tsv", "user_id\tcountry\n7\tFR\n8\tDE\n")
    folder.write_table(
        tmp_path, "items", {"item_id": np.array([3, 4, 5]), "name": np.array(["a", "bb", "c"])}
    )
    ds = DatasetFolder(tmp_path)
    assert sorted(ds.table_names) == ["items", "users"]
    u = ds.table("users")
    np.testing.assert_array_equal(u["user_id"], [7, 8])
    np.testing.assert_array_equal(u["country"], ["FR", "DE"])
    it = ds.table("items")
    assert isinstance(it["item_id"], np.memmap)  # npy columns are memory-mapped
    np.testing.assert_array_equal(it["item_id"], [3, 4, 5])
    np.testing.assert_array_equal(it["name"], ["a", "bb", "c"])
    assert ds.kg_path is None and not ds.has_table("nope")

def test_discovery_takes_upper_case_suffixes_and_skips_hidden_files(tmp_path):
    # Upper-case .CSV/.TSV were ignored (a table lost) and macOS "._x.csv" resource forks
    # (binary) were taken for a table "._x".
    _write(tmp_path / "Imp.CSV", "user_id,click\n1,0\n2,1\n")
    _write(tmp_path / "Users.TSV", "user_id\tcountry\n7\tFR\n")
    (tmp_path / "._Imp.CSV").write_bytes(b"\x00\x05\x16\x07\x00\x02")
    (tmp_path / ".hidden").mkdir()
    np.save(tmp_path / ".hidden" / "a.npy", np.arange(3))
    ds = DatasetFolder(tmp_path)
    assert ds.table_names == ["Imp", "Users"]
    np.testing.assert_array_equal(ds.table("Imp")["click"], [0, 1])
    u = ds.table("Users")  # tab-separated, not one column "user_id\tcountry"
    assert list(u) == ["user_id", "country"]
    np.testing.assert_array_equal(u["country"], ["FR"])
    assert list(folder.read_table(tmp_path / "Imp.CSV")) == ["user_id", "click"]
    folder.write_table(tmp_path, "items", {"item_id": np.array([3, 4])})
    (tmp_path / "items" / "._item_id.npy").write_bytes(b"\x00\x05\x16\x07\x00\x02")
    assert list(DatasetFolder(tmp_path).table("items")) == ["item_id"]


def test_npy_columns_in_upper_case_are_read_as_csv_tables_are(tmp_path):
    # A column folder of "user_id.NPY" files (as a .CSV table is found) was no table:
    # "no table 'clicks' (have [])", and read_table said "no <column>.npy files".
    t = tmp_path / "clicks"
    t.mkdir()
    np.save(t / "user_id.npy", np.array([3, 4, 5]))
    np.save(t / "label.npy", np.array([0.0, 1.0, 0.0]))
    (t / "user_id.npy").rename(t / "user_id.NPY")
    (t / "label.npy").rename(t / "label.Npy")
    ds = DatasetFolder(tmp_path)
    assert ds.table_names == ["clicks"]
    got = ds.table("clicks")
    assert list(got) == ["label", "user_id"]
    np.testing.assert_array_equal(got["user_id"], [3, 4, 5])
    np.testing.assert_array_equal(ds.table("clicks", ["user_id"])["user_id"], [3, 4, 5])
    np.testing.assert_array_equal(folder.read_table(t)["label"], [0.0, 1.0, 0.0])
    assert str(ds.error("clicks", "bad", column="user_id", row=1)).startswith(
        f"{t / 'user_id.NPY'}")
    # One column in two files (the same name, the suffix in two cases): which one?
    np.save(t / "user_id.npy", np.array([6, 7, 8]))
    with pytest.raises(DataError, match=r"two files of column 'user_id': 'user_id.NPY' and "
                       r"'user_id.npy'; keep one"):
        folder.read_table(t)
    # The writers leave no such pair: a table written over "user_id.NPY" is refused.
    (t / "user_id.npy").unlink()
    with pytest.raises(DataError, match=r"already holds columns \['label', 'user_id.NPY'\]"):
        folder.write_table(tmp_path, "clicks", {"user_id": np.array([1, 2])})
    assert sorted(p.name for p in t.iterdir()) == ["label.Npy", "user_id.NPY"]



def test_table_writer_chunks_equal_one_shot(tmp_path):
    rng = np.random.default_rng(0)
    cols = {
        "a": rng.integers(0, 100, 1000),
        "b": rng.standard_normal((1000, 3)).astype(np.float32),
        "c": rng.integers(0, 2, 1000).astype(np.int8),
    }
    one = folder.write_table(tmp_path / "one", "t", cols)
    with folder.TableWriter(tmp_path / "many", "t") as w:
        for s in (slice(0, 1), slice(1, 400), slice(400, 1000)):
            w.append({k: v[s] for k, v in cols.items()})
    many = w.close()
    assert one["rows"] == many["rows"] == 1000
    for c in cols:
        a = (tmp_path / "one" / "t" / f"{c}.npy").read_bytes()
        b = (tmp_path / "many" / "t" / f"{c}.npy").read_bytes()
        np.testing.assert_array_equal(np.load(tmp_path / "many" / "t" / f"{c}.npy"), cols[c])
        # Same data bytes (headers differ only by padding).
        assert a[-cols[c].nbytes :] == b[-cols[c].nbytes :]


def test_writers_refuse_a_folder_with_another_tables_columns(tmp_path):
    # A rewritten table without 'click' read the old table's click.npy as its own.
    folder.write_table(tmp_path, "t", {"user_id": np.arange(3), "click": np.ones(3)})
    folder.write_table(tmp_path, "t", {"user_id": np.array([7, 8, 9]), "click": np.zeros(3)})
    assert folder.read_npy_table(tmp_path / "t")["click"].tolist() == [0, 0, 0]
    e = _err(lambda: folder.write_table(tmp_path, "t", {"user_id": np.array([4, 5, 6])}))
    assert e.file == str(tmp_path / "t") and "already holds columns ['click']" in str(e)
    w = folder.TableWriter(tmp_path, "t")
    e = _err(lambda: w.append({"item_id": np.arange(3)}))
    assert "already holds columns ['click', 'user_id']" in str(e)
    # Nothing was overwritten.
    assert folder.read_npy_table(tmp_path / "t")["user_id"].tolist() == [7, 8, 9]


def test_table_writer_rejects_mismatched_chunks(tmp_path):
    w = folder.TableWriter(tmp_path, "t")
    w.append({"a": np.arange(3)})
    with pytest.raises(DataError, match="differ"):
        w.append({"b": np.arange(3)})
    with pytest.raises(DataError, match="wider"):
        w2 = folder.TableWriter(tmp_path, "s")
        w2.append({"s": np.array(["ab"])})
        w2.append({"s": np.array(["abcdef"])})
    with pytest.raises(DataError, match="empty table"):
        folder.TableWriter(tmp_path, "e").close()


def test_dataset_json_windows_and_select_days(tmp_path):
    t = folder.write_table(
        tmp_path,
        "imp",
        {"user_id": np.array([1, 2, 3, 4, 5]), "day": np.array([0, 0, 1, 2, 2], np.int32)},
    )
    folder.write_dataset_json(
        tmp_path,
        name="tiny",
        tables={"imp": t},
        num_days=3,
        splits={"ranker_train": (0, 2), "ranker_test": (2, 3)},
    )
    ds = DatasetFolder(tmp_path)
    assert ds.meta["num_days"] == 3 and ds.num_rows("imp") == 5
    assert ds.day_window("ranker_train") == (0, 2)
    assert ds.day_window("test") == (2, 3)  # alias
    sel = folder.select_days(ds.table("imp"), *ds.day_window("train"))
    np.testing.assert_array_equal(sel["user_id"], [1, 2, 3])
    sel = folder.select_days({"user_id": np.array([1, 2]), "timestamp": np.array([5, 90000])}, 1, 2)
    np.testing.assert_array_equal(sel["user_id"], [2])
    with pytest.raises(DataError, match="no day window 'valid'"):
        ds.day_window("valid")
    with pytest.raises(DataError, match="empty split"):
        folder.select_days(ds.table("imp"), 5, 7)
    # A window name, "START,END" days (a flag or config override) or a pair.
    assert [ds.window_days(w) for w in ("test", " 0 , 2 ", (1, 3))] == [(2, 3), (0, 2), (1, 3)]
    with pytest.raises(DataError, match=re.escape("empty day window '2,2': [2, 2) (START,END")):
        ds.window_days("2,2")


def test_select_days_errors_name_the_table_file(tmp_path):
    """Was "column 'day': no 'day' or 'timestamp' column to select days by", naming no
    table or file."""
    p = _write(tmp_path / "imp.csv", "user_id,date\n1,0\n")
    t = DatasetFolder(tmp_path).table("imp")
    e = _err(lambda: folder.select_days(t, 0, 1, file=p))
    assert str(e) == f"{p}, column 'day': no 'day' or 'timestamp' column to select days by"
    e = _err(lambda: folder.select_days(t, 5, 6, day_column="date", file=p))
    assert str(e) == f"{p}, column 'date': empty split: no rows with date in [5, 6)"
    e = _err(lambda: folder.select_days(t, 1, 1, day_column="date", file=p))
    assert str(e) == f"{p}: empty day window [1, 1)"
    # Days from seconds: the message names the column read (was "column 'day': ... day").
    e = _err(lambda: folder.select_days(t, 5, 6, timestamp_column="date", file=p))
    assert str(e) == f"{p}, column 'date': empty split: no rows with date // 86400 in [5, 6)"


def _err(fn) -> DataError:
    with pytest.raises(DataError) as e:
        fn()
    return e.value


def test_missing_required_column_names_file_and_column(tmp_path):
    p = _write(tmp_path / "x.csv", "user_id,item_id\n1,2\n")
    e = _err(lambda: DatasetFolder(tmp_path).table("x", columns=["user_id", "timestamp"]))
    assert e.file == str(p) and e.column == "timestamp" and e.line == 1
    assert "x.csv:1" in str(e) and "'timestamp'" in str(e)


def test_unparsable_value_names_line(tmp_path):
    p = _write(tmp_path / "x.csv", "user_id,timestamp\n1,10\n2,11\n3,noon\n4,12\n")
    e = _err(lambda: DatasetFolder(tmp_path).table("x"))
    assert (e.file, e.column, e.line) == (str(p), "timestamp", 4)
    assert "'noon'" in str(e)
    # A forced kind applies to any column.
    _write(tmp_path / "y.tsv", "item_id\tprice\n1\t2.5\n2\tcheap\n")
    e = _err(lambda: DatasetFolder(tmp_path).table("y", kinds={"price": "float"}))
    assert (e.column, e.line) == ("price", 3)


def test_duplicate_header_ragged_rows_empty_tables(tmp_path):
    _write(tmp_path / "dup.csv", "user_id,item_id,user_id\n1,2,3\n")
    e = _err(lambda: DatasetFolder(tmp_path).table("dup"))
    assert e.column == "user_id" and e.line == 1 and "duplicate" in str(e)
    _write(tmp_path / "rag.csv", "user_id,item_id\n1,2\n3\n4,5\n")
    e = _err(lambda: DatasetFolder(tmp_path).table("rag"))
    assert e.line == 3 and "ragged" in str(e)
    _write(tmp_path / "hdr.csv", "user_id,item_id\n")
    assert "empty table" in str(_err(lambda: DatasetFolder(tmp_path).table("hdr")))
    _write(tmp_path / "nothing.csv", "")
    assert "empty file" in str(_err(lambda: DatasetFolder(tmp_path).table("nothing")))
    _write(tmp_path / "ids.csv", "user_id,x\n1,a\n,b\n")
    e = _err(lambda: DatasetFolder(tmp_path).table("ids"))
    assert (e.column, e.line) == ("user_id", 3) and "empty id" in str(e)


def test_skip_bad_lines_reports_count(tmp_path):
    _write(tmp_path / "x.csv", "user_id,timestamp\n1,10\n2\n3,x\n4,12\n")
    ds = DatasetFolder(tmp_path, on_bad_lines="skip")
    with pytest.warns(UserWarning, match="skipped 2 bad lines"):
        t = ds.table("x")
    np.testing.assert_array_equal(t["user_id"], [1, 4])
    np.testing.assert_array_equal(t["timestamp"], [10, 12])
    assert ds.skipped == {"x": 2}


def test_npy_columns_of_different_lengths(tmp_path):
    d = tmp_path / "t"
    d.mkdir()
    np.save(d / "a.npy", np.arange(3))
    np.save(d / "b.npy", np.arange(4))
    e = _err(lambda: DatasetFolder(tmp_path).table("t"))
    assert e.column == "b" and "different lengths" in str(e)
    e = _err(lambda: folder.write_table(tmp_path, "w", {"a": np.arange(2), "b": np.arange(3)}))
    assert e.column == "b"


def test_bad_dataset_json(tmp_path):
    (tmp_path / "dataset.json").write_text(
        json.dumps({"format_version": 1, "name": "x", "tables": {"imp": {"path": "missing"}}})
    )
    assert "does not exist" in str(_err(lambda: DatasetFolder(tmp_path)))
    (tmp_path / "dataset.json").write_text("{not json")
    e = _err(lambda: DatasetFolder(tmp_path))
    assert e.line == 1 and "dataset.json" in e.file
    (tmp_path / "dataset.json").write_text(json.dumps({"format_version": 99}))
    assert "format_version" in str(_err(lambda: DatasetFolder(tmp_path)))
    # Malformed entries: a DataError naming dataset.json, not an IndexError later.
    for meta, message in (
        ([1], "expected a JSON object"),
        ({"format_version": 1, "tables": ["imp"]}, "'tables' must map"),
        ({"format_version": 1, "splits": {"ranker_train": [21]}}, "'splits' must map"),
        ({"format_version": 1, "splits": {"w": [5, 2]}}, "start <= end"),
        ({"format_version": 1, "tables": {"imp": {"path": None}}},
         "table 'imp' 'path' must be a string, got None"),
        ({"format_version": 1, "tables": {"imp": {"path": 3}}}, "'path' must be a string"),
        ({"format_version": 1, "kg": 5}, "'kg' must be a folder name or null, got 5"),
    ):
        (tmp_path / "dataset.json").write_text(json.dumps(meta))
        e = _err(lambda: DatasetFolder(tmp_path))
        assert message in str(e) and e.file.endswith("dataset.json"), (meta, str(e))


def test_a_dataset_json_for_its_splits_only_finds_tables_and_kg_by_name(tmp_path):
    # A user's dataset.json written for its day windows, without "tables" or "kg", was
    # KeyError: 'tables' (a traceback) in every entry point.
    _write(tmp_path / "impressions.csv", "user_id,item_id,timestamp,click\nu1,p1,86400,1\n")
    (tmp_path / "kg").mkdir()
    _write(tmp_path / "kg" / "train.txt", "a\tr\tb\n")
    meta = {"format_version": 1, "splits": {"ranker_train": [1, 2]}}
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    d = DatasetFolder(tmp_path)
    assert d.table_names == ["impressions"] and d.has_table("impressions")
    assert d.table("impressions")["user_id"].tolist() == ["u1"]
    assert d.kg_path == tmp_path / "kg" and d.day_window("ranker_train") == (1, 2)
    assert d.found_by_name == ("tables", "kg")
    # An explicit "kg": null is no graph; listed tables are the only ones.
    _write(tmp_path / "other.csv", "a\n1\n")
    meta.update(kg=None, tables={"impressions": {"path": "impressions.csv"}})
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    d = DatasetFolder(tmp_path)
    assert d.kg_path is None and d.table_names == ["impressions"] and d.found_by_name == ()


def test_a_file_given_as_the_dataset_folder_says_so(tmp_path):
    _write(tmp_path / "impressions.csv", "a\n1\n")
    e = _err(lambda: DatasetFolder(tmp_path / "impressions.csv"))
    assert "a file, not a dataset folder" in str(e) and str(tmp_path) in str(e)
    assert "not found" in str(_err(lambda: DatasetFolder(tmp_path / "nope")))


def test_kg_folder_discovered(tmp_path):
    (tmp_path / "kg").mkdir()
    _write(tmp_path / "kg" / "train.txt", "a\tr\tb\n")
    assert DatasetFolder(tmp_path).kg_path == tmp_path / "kg"
    assert DatasetFolder(tmp_path).found_by_name == ("tables", "kg")


def test_csv_record_over_several_lines_is_a_bad_line(tmp_path):
    # An unmatched '"' swallows the following lines into one field: never silently.
    p = _write(
        tmp_path / "q.csv",
        'user_id,item_id,title\n1,10,"a, b"\n2,20,"Best\n3,30,fine\n4,40,ok\n',
    )
    e = _err(lambda: folder.read_text_table(p))
    assert (e.file, e.line) == (str(p), 3) and "spans lines 3-5" in str(e)
    with pytest.warns(UserWarning, match="skipped 3 bad lines"):
        cols, skipped = folder.read_text_table(p, on_bad_lines="skip")
    assert skipped == 3
    np.testing.assert_array_equal(cols["user_id"], [1])
    np.testing.assert_array_equal(cols["title"], ["a, b"])  # quoted comma still works
    # A quoted line break is a bad line too; the header as well.
    p = _write(tmp_path / "nl.csv", 'user_id,title\n1,"x\ny"\n2,z\n')
    assert _err(lambda: folder.read_text_table(p)).line == 2
    p = _write(tmp_path / "hdr.csv", 'user_id,"ti\ntle"\n1,z\n')
    assert _err(lambda: folder.read_text_table(p)).line == 1


def test_tsv_has_no_quoting(tmp_path):
    p = _write(
        tmp_path / "q.tsv",
        'user_id\titem_id\ttitle\n1\t10\t"Best\n2\t20\tok\n3\t30\tsay "hi"\n4\t40\t"a"\n',
    )
    cols, skipped = folder.read_text_table(p)
    assert skipped == 0
    np.testing.assert_array_equal(cols["user_id"], [1, 2, 3, 4])
    np.testing.assert_array_equal(cols["title"], ['"Best', "ok", 'say "hi"', '"a"'])


def test_table_writer_refuses_unsafe_chunk_dtypes(tmp_path):
    big = np.array([3_000_000_000, 4], np.int64)  # wraps in int32
    cases = {
        "wide_int": (np.array([1, 2], np.int32), big),
        "float_to_int": (np.array([1, 2], np.int64), np.array([0.7, 2.9])),
        "float64_to_32": (np.array([1.0], np.float32), np.array([1e-50])),
        "bytes_to_str": (np.array(["ab"]), np.array([b"cd"])),
        "int_to_bool": (np.array([True]), np.array([2])),
    }
    for name, (first, later) in cases.items():
        with folder.TableWriter(tmp_path, name) as w:
            w.append({"x": first, "y": np.arange(len(first))})
            e = _err(lambda w=w, later=later: w.append({"x": later, "y": np.arange(len(later))}))
            assert e.column == "x" and "cannot be stored safely" in str(e), name
        # Nothing of the refused chunk was written (no partial rows in other columns).
        t = folder.read_npy_table(tmp_path / name, mmap=False)
        np.testing.assert_array_equal(t["x"], first)
        np.testing.assert_array_equal(t["y"], np.arange(len(first)))
    # Narrower dtypes of the same family are fine and keep their values.
    with folder.TableWriter(tmp_path, "ok") as w:
        w.append({"i": big, "f": np.array([0.5, 1.5]), "s": np.array(["abc", "d"])})
        w.append(
            {"i": np.array([-7], np.int8), "f": np.array([2.25], np.float32), "s": np.array(["e"])}
        )
        w.append({"i": np.array([255], np.uint8), "f": np.zeros(1), "s": np.array(["xy"])})
        w.append({"i": np.array([]), "f": np.array([], np.int64), "s": np.array([])})  # empty
    t = folder.read_npy_table(tmp_path / "ok", mmap=False)
    np.testing.assert_array_equal(t["i"], [3_000_000_000, 4, -7, 255])
    assert t["i"].dtype == np.int64 and t["s"].dtype == np.dtype("<U3")
    np.testing.assert_array_equal(t["f"], [0.5, 1.5, 2.25, 0.0])
    np.testing.assert_array_equal(t["s"], ["abc", "d", "e", "xy"])


def test_id_columns_keep_non_canonical_spellings(tmp_path):
    p = _write(
        tmp_path / "ids.csv",
        "user_id,item_id,board_id,click\n"
        "007,18446744073709551615,-3,1\n"
        "7,18446744073709551614,12,0\n"
        "012,5,0,1\n",
    )
    t, _ = folder.read_text_table(p)
    # "007" and "7" stay distinct; "012" is not 12.
    assert t["user_id"].dtype.kind == "U"
    np.testing.assert_array_equal(t["user_id"], ["007", "7", "012"])
    # Beyond int64: strings, not float64 (which would merge the two).
    assert t["item_id"].dtype.kind == "U"
    np.testing.assert_array_equal(
        t["item_id"], ["18446744073709551615", "18446744073709551614", "5"]
    )
    # Canonical integers (negative included) are still int64; other columns unchanged.
    assert t["board_id"].dtype == np.int64 and t["click"].dtype == np.int64
    np.testing.assert_array_equal(t["board_id"], [-3, 12, 0])
    # A forced kind still parses leniently.
    t, _ = folder.read_text_table(p, columns=["user_id"], kinds={"user_id": "int"})
    np.testing.assert_array_equal(t["user_id"], [7, 7, 12])
    p = _write(tmp_path / "pad.csv", "count,user_id\n007,1\n")
    t, _ = folder.read_text_table(p)
    assert t["count"].tolist() == [7] and t["user_id"].tolist() == [1]


def test_underscores_are_text_not_digit_separators(tmp_path):
    # Python's int("1_0") is 10; in a data file "1_0" is an id, not the number 10.
    p = _write(tmp_path / "u.csv", "user_id,count,click\n1_0,2_0,1\n10,3,0\n")
    t, _ = folder.read_text_table(p, columns=["user_id", "count"])
    np.testing.assert_array_equal(t["user_id"], ["1_0", "10"])
    np.testing.assert_array_equal(t["count"], ["2_0", "3"])
    with pytest.raises(folder.DataError, match=r"u.csv:2, column 'count': cannot parse '2_0' as an integer"):
        folder.read_text_table(p, kinds={"count": "int"})
    p = _write(tmp_path / "v.csv", "user_id,click\n1,1_0\n")
    with pytest.raises(folder.DataError, match=r"'1_0' as a number"):
        folder.read_text_table(p)  # click is one of the numeric columns
    # ... and with on_bad_lines="skip" such a row is skipped and counted, not an error.
    p = _write(tmp_path / "w.csv", "user_id,click\n1,1\n2,1_0\n3,0\n")
    with pytest.warns(UserWarning, match="skipped 1 bad lines"):
        t, skipped = folder.read_text_table(p, on_bad_lines="skip")
    assert skipped == 1 and t["user_id"].tolist() == [1, 3]


def test_an_empty_label_cell_is_nan_for_the_label_kind(tmp_path):
    """kinds={col: "label"}: an empty cell is a label not known yet (NaN, as in an npy
    label column), kept also with on_bad_lines="skip"; without it an empty cell of a
    numeric column stays unparsable. Other cells parse as "number" does."""
    p = _write(tmp_path / "x.csv", "user_id,click,conversion\n1,1,0\n2,0, \n3,,\n")
    t, _ = folder.read_text_table(p, kinds={"click": "label", "conversion": "label"})
    np.testing.assert_array_equal(t["click"], [1, 0, np.nan])
    np.testing.assert_array_equal(t["conversion"], [0, np.nan, np.nan])
    t, skipped = folder.read_text_table(p, kinds={"click": "label", "conversion": "label"},
                                        on_bad_lines="skip")
    assert skipped == 0 and t["user_id"].tolist() == [1, 2, 3]
    t, _ = folder.read_text_table(p, columns=["click"], kinds={"click": "label"})
    assert t["click"].dtype == np.float64
    full = _write(tmp_path / "y.csv", "click\n1\n0\n")
    assert folder.read_text_table(full, kinds={"click": "label"})[0]["click"].dtype == np.int64
    with pytest.raises(DataError, match=r"x.csv:4, column 'click': cannot parse '' as a number"):
        folder.read_text_table(p, columns=["click"])
    bad = _write(tmp_path / "z.csv", "click\n1\n\"\"\nyes\n")
    with pytest.raises(DataError, match=r"z.csv:4, column 'click': cannot parse 'yes' as a number"):
        folder.read_text_table(bad, kinds={"click": "label"})


def test_spaces_after_the_delimiter_keep_integer_ids(tmp_path):
    # "a, b" files: " 7" is the id 7 (as before the canonical-spelling rule), "007" is not.
    p = _write(tmp_path / "sp.csv", "user_id, pin_id,click\n1, 7,1\n2, 8,0\n")
    t, _ = folder.read_text_table(p)
    assert t["pin_id"].dtype == np.int64 and t["pin_id"].tolist() == [7, 8]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e30"])
def test_a_time_that_is_not_finite_names_the_line(tmp_path, value):
    # NaN/inf days fall outside every window: the row would be dropped silently.
    p = _write(tmp_path / "x.csv", f"user_id,timestamp,day\n1,10,0\n2,{value},0\n3,12,{value}\n")
    e = _err(lambda: DatasetFolder(tmp_path).table("x"))
    assert (e.file, e.column, e.line) == (str(p), "timestamp", 3)
    assert "not a finite number" in str(e)
    e = _err(lambda: DatasetFolder(tmp_path).table("x", columns=["day"]))
    assert (e.column, e.line) == ("day", 4)
    # Fractional seconds are fine.
    _write(tmp_path / "y.csv", "user_id,timestamp\n1,10.5\n2,86400.25\n")
    assert DatasetFolder(tmp_path).table("y")["timestamp"].tolist() == [10.5, 86400.25]


def test_skip_bad_lines_counts_times_that_are_not_finite(tmp_path):
    _write(tmp_path / "x.csv", "user_id,timestamp\n1,10\n2,nan\n3,-inf\n4,12\n")
    ds = DatasetFolder(tmp_path, on_bad_lines="skip")
    with pytest.warns(UserWarning, match="skipped 2 bad lines"):
        assert ds.table("x")["user_id"].tolist() == [1, 4]
    assert ds.skipped == {"x": 2}


def test_an_npy_time_that_is_not_finite_names_the_row(tmp_path):
    ts = np.array([10.0, 86400.0, np.nan, 5.0])
    folder.write_table(tmp_path, "t", {"user_id": np.arange(4), "timestamp": ts})
    e = _err(lambda: DatasetFolder(tmp_path).table("t"))
    assert e.file == str(tmp_path / "t" / "timestamp.npy") and e.column == "timestamp"
    assert "row 2" in str(e) and "nan" in str(e)
    # In-memory columns given to select_days directly: refused as well, not dropped.
    e = _err(lambda: folder.select_days({"user_id": np.arange(4), "timestamp": ts}, 0, 2))
    assert e.column == "timestamp" and "row 2" in str(e)
    e = _err(lambda: folder.select_days({"day": np.array([0.0, np.inf])}, 0, 2))
    assert e.column == "day" and "row 1" in str(e)
    # uint64 beyond int64 (a -1 written unsigned) fell outside every window: dropped.
    day = np.array([1, 2**64 - 1, 0], np.uint64)
    folder.write_table(tmp_path, "u", {"user_id": np.arange(3), "day": day})
    e = _err(lambda: DatasetFolder(tmp_path).table("u"))
    assert e.column == "day" and "row 1: day 18446744073709551615 is not" in str(e)
    e = _err(lambda: folder.select_days({"day": day}, 0, 5))
    assert e.column == "day" and "row 1" in str(e)
    np.testing.assert_array_equal(folder.select_days({"day": day[[0, 2]]}, 1, 5)["day"], [1])


def test_npy_labels_and_times_must_be_numbers(tmp_path):
    # A CSV refuses text in these columns; an npy table did not (a string day was
    # NumPy's UFuncTypeError in select_days, a string click passed).
    for c in ("day", "click", "timestamp"):
        folder.write_table(tmp_path, c, {"user_id": np.arange(2), c: np.array(["1", "2"])})
        e = _err(lambda c=c: DatasetFolder(tmp_path).table(c))
        assert (e.file, e.column) == (str(tmp_path / c / f"{c}.npy"), c)
        assert "column must hold numbers, got dtype <U1" in str(e)
    e = _err(lambda: folder.select_days({"day": np.array(["1", "2"])}, 0, 5))
    assert e.column == "day" and "must hold numbers" in str(e)
    folder.write_table(tmp_path, "b", {"click": np.array([True, False]), "day": np.arange(2)})
    assert DatasetFolder(tmp_path).table("b")["click"].tolist() == [True, False]


def test_malformed_npy_columns(tmp_path):
    def table(name, **cols):
        d = tmp_path / name
        d.mkdir()
        for c, a in cols.items():
            np.save(d / f"{c}.npy", a)
        return d

    d = table("empty", user_id=np.arange(3), click=np.zeros(3))
    (d / "click.npy").write_bytes(b"")  # 0 bytes: np.load raises EOFError
    e = _err(lambda: folder.read_npy_table(d))
    assert (e.file, e.column) == (str(d / "click.npy"), "click") and "unreadable" in str(e)
    d = table("junk", user_id=np.arange(3))
    (d / "user_id.npy").write_bytes(b"\x93NUMPY\x01\x00garbage")
    assert _err(lambda: folder.read_npy_table(d)).column == "user_id"
    # Labels and times hold one value per row.
    for c in ("click", "day"):
        d = table(f"twod_{c}", **{c: np.zeros((3, 1), np.int64)})
        e = _err(lambda d=d: folder.read_npy_table(d))
        assert e.column == c and "1-D" in str(e) and "(3, 1)" in str(e), c
    # Other columns may keep trailing dimensions (as TableWriter writes them).
    d = table("vec", user_id=np.arange(3), emb=np.zeros((3, 2), np.float32),
              hist_item_id=np.zeros((3, 5), np.int64))  # a list of ids per row
    t = folder.read_npy_table(d)
    assert t["emb"].shape == (3, 2) and t["hist_item_id"].shape == (3, 5)


def test_a_byte_order_mark_is_not_part_of_the_first_column(tmp_path):
    p = tmp_path / "x.csv"
    p.write_bytes("user_id,click\n1,0\n2,1\n".encode("utf-8-sig"))
    (tmp_path / "y.tsv").write_bytes("user_id\tclick\nu\t1\n".encode("utf-8-sig"))
    meta = {"format_version": 1, "name": "bom", "tables": {"x": {"path": "x.csv"},
                                                           "y": {"path": "y.tsv"}}}
    (tmp_path / "dataset.json").write_bytes(json.dumps(meta).encode("utf-8-sig"))
    ds = DatasetFolder(tmp_path)
    t = ds.table("x")
    assert list(t) == ["user_id", "click"] and t["user_id"].tolist() == [1, 2]
    assert list(ds.table("y")) == ["user_id", "click"]


def test_two_byte_order_marks_are_not_part_of_the_first_column(tmp_path):
    """A file re-saved by two tools that each add a mark: utf-8-sig dropped one and the
    first column was '\\ufeffuser_id' (its quoted name '\\ufeff"user_id"')."""
    bom2 = "\ufeff\ufeff"
    (tmp_path / "x.csv").write_text(bom2 + 'user_id,click\n1,0\n2,1\n', encoding="utf-8")
    (tmp_path / "q.csv").write_text(bom2 + '"user_id",click\n1,0\n', encoding="utf-8")
    (tmp_path / "y.tsv").write_text(bom2 + "user_id\tclick\nu\t1\n", encoding="utf-8")
    (tmp_path / "dataset.json").write_text(bom2 + json.dumps({"format_version": 1,
                                                             "name": "bom2"}), encoding="utf-8")
    ds = DatasetFolder(tmp_path)
    assert ds.meta["name"] == "bom2" and ds.table_names == ["q", "x", "y"]
    t = ds.table("x")
    assert list(t) == ["user_id", "click"] and t["user_id"].tolist() == [1, 2]
    assert list(ds.table("q")) == ["user_id", "click"]
    assert list(ds.table("y")) == ["user_id", "click"]
    assert folder.read_utf8(tmp_path / "y.tsv") == "user_id\tclick\nu\t1\n"


def test_text_that_is_not_utf8_names_the_file_and_line(tmp_path):
    # Latin-1 "café" on line 4 (after 3000 lines in the big file: another read chunk).
    for name, head in (("x.csv", b"user_id,name\n1,a\n2,b\n"),
                       ("y.tsv", b"user_id\tname\n" + b"".join(b"%d\ta\n" % i for i in range(3000)))):
        p = tmp_path / name
        p.write_bytes(head + b"3,caf\xe9\n")
        e = _err(lambda p=p: folder.read_text_table(p))
        assert (e.file, e.line) == (str(p), head.count(b"\n") + 1), str(e)
        assert "not UTF-8 text: invalid continuation byte" in str(e)
    p = tmp_path / "h.csv"
    p.write_bytes(b"user_id,n\xe9\n1,2\n")
    assert _err(lambda: folder.read_text_table(p)).line == 1
    (tmp_path / "dataset.json").write_bytes(b'{"format_version": 1,\n "name": "caf\xe9"}')
    e = _err(lambda: DatasetFolder(tmp_path))
    assert (e.file, e.line) == (str(tmp_path / "dataset.json"), 2) and "not UTF-8" in str(e)


def test_folder_error_names_the_line_or_the_npy_row(tmp_path):
    p = _write(tmp_path / "x.csv", "user_id,click\n1,0\n\n2,1\n3,0\n")  # a blank line 3
    ds = DatasetFolder(tmp_path)
    ds.table("x")
    e = ds.error("x", "bad", column="click", row=1)
    assert (e.file, e.column, e.line) == (str(p), "click", 4)
    folder.write_table(tmp_path, "n", {"click": np.zeros(3)})
    e = DatasetFolder(tmp_path).error("n", "bad", column="click", row=2)
    assert e.file == str(tmp_path / "n" / "click.npy") and str(e).endswith("row 2: bad")


def test_table_writer_empty_first_chunk_does_not_fix_the_dtypes(tmp_path):
    # np.array([]) is float64: an empty first chunk (a day with no rows) fixed every
    # column to float64 and the int chunks after it were refused.
    with folder.TableWriter(tmp_path, "t") as w:
        w.append({"i": np.array([]), "v": np.array([])})
        w.append({"i": np.array([3, 4]), "v": np.ones((2, 2), np.float32)})
        w.append({"i": np.array([5], np.int8), "v": np.zeros((1, 2), np.float32)})
        w.append({"i": np.array([]), "v": np.array([])})  # empty again: not checked
        e = _err(lambda: w.append({"i": np.array([0.5]), "v": np.zeros((1, 2), np.float32)}))
        assert e.column == "i" and "cannot be stored safely in the column's int64" in str(e)
    t = folder.read_npy_table(tmp_path / "t", mmap=False)
    assert t["i"].dtype == np.int64 and t["v"].dtype == np.float32
    np.testing.assert_array_equal(t["i"], [3, 4, 5])
    np.testing.assert_array_equal(t["v"], [[1, 1], [1, 1], [0, 0]])
    assert w.close() == {"path": "t", "columns": ["i", "v"], "rows": 3}


def test_whitespace_around_an_id_is_not_part_of_it(tmp_path):
    # "a " and "a" were two users (string ids kept the spaces; integer ids did not).
    p = _write(tmp_path / "x.csv", "user_id,pin_id,tag_id,note,click\n"
                                   "a ,a_b , 7,x ,1\n a,a_b,8 ,y,0\n")
    t, _ = folder.read_text_table(p)
    np.testing.assert_array_equal(t["user_id"], ["a", "a"])
    np.testing.assert_array_equal(t["pin_id"], ["a_b", "a_b"])
    assert t["tag_id"].tolist() == [7, 8]
    np.testing.assert_array_equal(t["note"], ["x ", "y"])  # not an id: kept as written
    # An id of spaces only is an empty id, not the id " ".
    _write(tmp_path / "y.csv", "user_id,click\nu1,1\n  ,0\n")
    e = _err(lambda: DatasetFolder(tmp_path).table("y"))
    assert (e.column, e.line) == ("user_id", 3) and "empty id" in str(e)


def test_a_nul_character_in_a_value_names_the_line(tmp_path):
    # NumPy strings drop trailing NULs: "a\x00" and "a" were one user.
    _write(tmp_path / "x.csv", "user_id,click\na,1\na\x00,0\n")
    e = _err(lambda: DatasetFolder(tmp_path).table("x"))
    assert (e.column, e.line) == ("user_id", 3) and "NUL character in 'a\\x00'" in str(e)


def test_a_field_over_the_csv_limit_says_why(tmp_path):
    # Was "unreadable line: field larger than field limit (131072)", also for a '"'
    # left open in a big file, and on_bad_lines="skip" did not skip either.
    long = "x" * 131_073
    p = _write(tmp_path / "long.csv", f"user_id,note\n1,a\n2,{long}\n3,b\n")
    e = _err(lambda: folder.read_text_table(p))
    assert (e.file, e.line) == (str(p), 3)
    assert str(e) == (f"{p}:3: a field longer than the CSV reader's limit of 131072 characters "
                      "(a column's values are stored as wide as its longest one; keep long "
                      "text out of the table)")
    with pytest.warns(UserWarning, match="skipped 1 bad lines"):
        t, skipped = folder.read_text_table(p, on_bad_lines="skip")
    assert skipped == 1 and t["user_id"].tolist() == [1, 3]
    np.testing.assert_array_equal(t["note"], ["a", "b"])
    p = _write(tmp_path / "long.tsv", f"user_id\tnote\n1\ta\n2\t{long}\n")
    assert _err(lambda: folder.read_text_table(p)).line == 3
    p = _write(tmp_path / "head.csv", f"user_id,{long}\n1,a\n")
    assert "longer than the CSV reader's limit" in str(_err(lambda: folder.read_text_table(p)))
    # An unmatched '"' in a file too big for the limit: the message names the quote.
    rows = "".join(f"{i},{i},1\n" for i in range(4, 20_000))
    p = _write(tmp_path / "quote.csv", f'user_id,pin_id,click\n1,2,0\n3,"4,1\n{rows}')
    e = _err(lambda: folder.read_text_table(p))
    assert e.line == 3 and re.search(
        r"quote.csv:3: a quoted field runs from line 3 past line \d+ without its closing '\"', "
        r"over the CSV reader's limit of 131072 characters: a '\"' is unmatched", str(e))
    # Not skipped: the reader gave up inside the quoted field, so where the rows start
    # again is not known (what follows could be the rest of a long quoted text).
    assert str(_err(lambda: folder.read_text_table(p, on_bad_lines="skip"))) == str(e)


def test_a_line_of_spaces_is_blank(tmp_path):
    # Was "x.csv:4: ragged row: 1 fields, header has 2" (kg files already skip it).
    p = _write(tmp_path / "x.csv", "  \nuser_id,click\n1,1\n \t \n2,0\n   \n")
    t, skipped = folder.read_text_table(p)
    assert skipped == 0 and t["user_id"].tolist() == [1, 2] and t["click"].tolist() == [1, 0]
    # In a table of one column it is a value: an empty id.
    p = _write(tmp_path / "one.csv", "user_id\n1\n  \n")
    e = _err(lambda: folder.read_text_table(p))
    assert e.line == 3 and "empty id" in str(e)


def test_blank_lines_before_the_header_are_skipped(tmp_path):
    # Was "x.csv:3: ragged row: 2 fields, header has 0": a blank first line was read as
    # a header of no columns.
    p = _write(tmp_path / "x.csv", "\n\r\nuser_id,click\n1,1\n2,x\n")
    e = _err(lambda: folder.read_text_table(p))
    assert (e.line, e.column) == (5, "click") and "cannot parse 'x' as a number" in str(e)
    p = _write(tmp_path / "y.tsv", "\nuser_id\tclick\n1\t1\n\n2\t0\n")
    t, _ = folder.read_text_table(p)
    assert t["user_id"].tolist() == [1, 2] and t["click"].tolist() == [1, 0]
    # Header errors name the header's own line.
    p = _write(tmp_path / "d.csv", "\nuser_id,click,click\n1,1,1\n")
    assert _err(lambda: folder.read_text_table(p)).line == 2
    p = _write(tmp_path / "h.csv", "\n\nuser_id,click\n")
    e = _err(lambda: folder.read_text_table(p))
    assert e.line == 3 and "empty table: header but no rows" in str(e)
    # Only blank lines: no header ("empty table: header but no rows" before).
    p = _write(tmp_path / "b.csv", "\n\n")
    e = _err(lambda: folder.read_text_table(p))
    assert str(e) == f"{p}:1: blank lines only: no header row"


@pytest.mark.parametrize("name, text, message", [
    ("t.csv", "user_id\tclick\n1\t1\n",
     "the header is one column 'user_id\\tclick' holding tabs: a tab-separated file must "
     "be named .tsv"),
    ("s.csv", "user_id;click\n1;1\n",
     "the header is one column 'user_id;click' holding semicolons: fields of a .csv file "
     "are separated by commas (or by the one a first line 'sep=;' names)"),
    ("p.csv", "sep=;\nuser_id,click\n1,1\n",
     "the header is one column 'user_id,click' holding commas: line 1 'sep=;' names another "
     "separator; correct or remove that line"),
    ("c.tsv", "user_id,click\n1,1\n",
     "the header is one column 'user_id,click' holding commas: a comma-separated file "
     "must be named .csv"),
])
def test_a_file_of_another_separator_is_named(tmp_path, name, text, message):
    # Was read as a table of one column named "user_id\tclick" (silently, for a caller
    # that asks for no columns by name).
    p = _write(tmp_path / name, text)
    e = _err(lambda: folder.read_text_table(p))
    assert str(e) == f"{p}:{text.count('sep=') + 1}: {message}"
    e = _err(lambda: DatasetFolder(tmp_path).table(p.stem))
    assert e.line == text.count("sep=") + 1 and "the header is one column" in str(e)
    # A table of one column is still fine.
    p = _write(tmp_path / f"one{p.suffix}", "user_id\n1\n2\n")
    assert folder.read_text_table(p)[0]["user_id"].tolist() == [1, 2]


@pytest.mark.parametrize("sep", [",", ";", "\t", "|"])
def test_an_excel_separator_line_names_the_separator(tmp_path, sep):
    """Excel's first line 'sep=,' was read as a header ['sep=', ''] ('empty column
    name'); it names the separator and line numbers stay the file's."""
    rows = [["user_id", "name", "click"], ["1", '"a,;|b"', "0"], ["2", "c", "1"]]
    text = f"sep={sep}\r\n" + "".join(sep.join(r) + "\r\n" for r in rows)
    p = _write(tmp_path / "x.csv", "\ufeff" + text)
    t, skipped = folder.read_text_table(p)
    assert list(t) == ["user_id", "name", "click"] and skipped == 0
    assert t["name"].tolist() == ["a,;|b", "c"] and t["click"].tolist() == [0, 1]
    p = _write(tmp_path / "y.csv", text + sep.join(["3", "d"]) + "\n")  # ragged: line 5
    e = _err(lambda: DatasetFolder(tmp_path).table("y"))
    assert str(e) == f"{p}:5: ragged row: 2 fields, header has 3"


def test_a_separator_line_naming_no_separator_is_refused(tmp_path):
    p = _write(tmp_path / "x.csv", "sep=:\nuser_id:click\n1:0\n")
    e = _err(lambda: folder.read_text_table(p))
    assert str(e) == (f"{p}:1: first line 'sep=:' names no separator: a separator line is "
                      "'sep=' and one of ',', ';', '|' or a tab")


def test_a_utf16_file_is_named_as_such(tmp_path):
    # A spreadsheet's "Unicode text" export: was "not UTF-8 text: invalid start byte
    # (byte 0)".
    p = tmp_path / "x.tsv"
    p.write_bytes("user_id\tclick\n1\t1\n".encode("utf-16"))
    e = _err(lambda: folder.read_text_table(p))
    assert str(e) == (f"{p}:1: UTF-16 text (it starts with a UTF-16 byte-order mark), not "
                      "UTF-8: save it as UTF-8")


def test_a_text_column_too_wide_for_memory_names_its_longest_value(tmp_path, monkeypatch):
    # One 100000-character note in a 300000-row CSV: NumPy's "MemoryError: Unable to
    # allocate 112. GiB for an array with shape (300000,) and data type <U100000", a
    # traceback naming neither file nor column. Here the allocation fails sooner.
    real = folder._parse_column_values

    def small_memory(values, *args, **kwargs):
        if 4 * max(map(len, values)) * len(values) > 10_000:
            raise MemoryError("Unable to allocate")
        return real(values, *args, **kwargs)

    monkeypatch.setattr(folder, "_parse_column_values", small_memory)
    p = _write(tmp_path / "x.csv", "user_id,note,click\n1,a,1\n2," + "y" * 100_000 + ",0\n3,b,1\n")
    e = _err(lambda: folder.read_text_table(p))
    assert (e.column, e.line) == ("note", 3)
    assert str(e) == (
        f"{p}:3, column 'note': too big for memory: 3 values as wide as the longest (100000 "
        "characters, line 3) need 1.1 MiB (a text column is stored as wide as its longest "
        "value in every row; keep long text out of the table)")


def test_a_compressed_table_is_named_when_the_table_is_missing(tmp_path):
    # Was "no table 'impressions' (have [])" beside impressions.csv.gz.
    (tmp_path / "impressions.csv.gz").write_bytes(gzip.compress(b"user_id,click\n1,1\n"))
    _write(tmp_path / "users.csv", "user_id\n1\n")
    e = _err(lambda: DatasetFolder(tmp_path).table("impressions"))
    assert str(e) == (
        f"{tmp_path}: no table 'impressions' (have ['users']); impressions.csv.gz is not "
        "read: a table is a .csv or .tsv file (uncompressed) or a folder of .npy columns")
    e = _err(lambda: DatasetFolder(tmp_path).table("clicks"))  # nothing like it: no hint
    assert str(e) == f"{tmp_path}: no table 'clicks' (have ['users'])"


def test_check_day_window_is_the_one_empty_window_check():
    """select_days, window_days, day_window and the TFDS builders each had their own."""
    assert folder.check_day_window(1, 3) == (1, 3)
    e = _err(lambda: folder.check_day_window(2, 2, name="w", file="d.json", note=" (why)"))
    assert str(e) == "d.json: empty day window 'w': [2, 2) (why)"
    assert str(_err(lambda: folder.check_day_window(3, 1))) == "empty day window [3, 1)"
