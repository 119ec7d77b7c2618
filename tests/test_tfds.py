"""Tests for jax_recsys.data.tfds_builders: build ArrayRecord datasets from a tiny
dataset folder written here, and read back the exact records with as_data_source
(no TensorFlow)."""

import json
import os

import numpy as np
import pytest

from jax_recsys.data import folder, tfds_builders


@pytest.fixture()
def world(tmp_path):
    d = tmp_path / "world"
    impressions = {
        "user_id": np.array([1, 2, 3, 1, 2, 3, 4], np.int64),
        "item_id": np.array([10, 11, 12, 13, 14, 15, 16], np.int64),
        "advertiser_id": np.array([5, 5, 6, 6, 5, 6, 7], np.int64),
        "day": np.array([0, 0, 1, 2, 2, 3, 4], np.int32),
        "click": np.array([1, 0, 0, 1, 1, 0, 1], np.int8),
        "conversion": np.array([1, 0, 0, 0, 1, 0, 0], np.int8),
        "device": np.array([0, 1, 2, 0, 1, 2, 0], np.int64),
        "bid": np.array([0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5], np.float32),
    }
    engagements = {
        "user_id": np.array([1, 1, 2, 3, 4], np.int64),
        "item_id": np.array([10, 12, 11, 13, 14], np.int64),
        "day": np.array([0, 1, 1, 2, 3], np.int32),
        "engagement_type": np.array([0, 1, 2, 0, 1], np.int64),
    }
    tables = {"impressions": folder.write_table(d, "impressions", impressions),
              "engagements": folder.write_table(d, "engagements", engagements)}
    folder.write_dataset_json(d, name="tiny", tables=tables, num_days=5, splits={
        "ranker_train": [0, 2], "ranker_valid": [2, 3], "ranker_test": [3, 5],
        "fresh_pretrain": [0, 3], "stale_pretrain": [0, 1]})
    return d, impressions, engagements


def test_ads_impressions_exact_records(world, tmp_path):
    d, imp, _ = world
    b = tfds_builders.AdsImpressions(source_dir=d, data_dir=tmp_path / "tfds")
    b.download_and_prepare()
    assert {k: v.num_examples for k, v in b.info.splits.items()} == {
        "train": 3, "valid": 2, "test": 2}
    train = b.as_data_source("train")
    assert len(train) == 3
    # Order kept; every column read back exactly with its type.
    assert [int(train[i]["item_id"]) for i in range(3)] == [10, 11, 12]
    rec = train[0]
    assert set(rec) == set(imp)
    assert int(rec["click"]) == 1 and int(rec["conversion"]) == 1 and int(rec["device"]) == 0
    assert float(rec["bid"]) == pytest.approx(0.5)
    cols = tfds_builders.read_columns(b.as_data_source("test"))
    np.testing.assert_array_equal(cols["user_id"], [3, 4])
    np.testing.assert_array_equal(cols["advertiser_id"], [6, 7])
    np.testing.assert_array_equal(cols["day"], [3, 4])
    np.testing.assert_allclose(cols["bid"], [3.0, 3.5])
    # Re-opening with the same folder reuses the prepared files (same config name).
    again = tfds_builders.AdsImpressions(source_dir=d, data_dir=tmp_path / "tfds")
    assert again.info.config_name == b.info.config_name
    assert again.data_dir == b.data_dir
    np.testing.assert_array_equal(
        tfds_builders.read_columns(again.as_data_source("valid"))["item_id"], [13, 14])


def test_engagements_window_and_holdout(world, tmp_path):
    d, _, eng = world
    b = tfds_builders.Engagements(source_dir=d, data_dir=tmp_path / "tfds", holdout_days=1)
    b.download_and_prepare()
    train = tfds_builders.read_columns(b.as_data_source("train"))
    valid = tfds_builders.read_columns(b.as_data_source("valid"))
    np.testing.assert_array_equal(train["user_id"], [1, 1, 2])   # days 0-1
    np.testing.assert_array_equal(train["item_id"], [10, 12, 11])
    np.testing.assert_array_equal(valid["item_id"], [13])         # day 2
    stale = tfds_builders.Engagements(source_dir=d, data_dir=tmp_path / "tfds", window="stale")
    assert stale.info.config_name != b.info.config_name
    stale.download_and_prepare()
    np.testing.assert_array_equal(
        tfds_builders.read_columns(stale.as_data_source("train"))["item_id"], [10])


def test_string_ids_and_errors(tmp_path):
    d = tmp_path / "strs"
    t = folder.write_table(d, "impressions", {
        "user_id": np.array(["alice", "bob"]), "item_id": np.array([1, 2]),
        "click": np.array([1, 0]), "conversion": np.array([0, 0]), "day": np.array([0, 1])})
    folder.write_dataset_json(d, name="s", tables={"impressions": t})
    b = tfds_builders.AdsImpressions(source_dir=d, data_dir=tmp_path / "tfds",
                                     windows={"train": (0, 2)})
    b.download_and_prepare()
    cols = tfds_builders.read_columns(b.as_data_source("train"))
    assert cols["user_id"].tolist() == ["alice", "bob"]
    # No ranker windows in dataset.json: the error names the file.
    with pytest.raises(folder.DataError, match="dataset.json"):
        tfds_builders.AdsImpressions(source_dir=d, data_dir=tmp_path / "t2").download_and_prepare()
    with pytest.raises(folder.DataError, match="no table 'engagements'"):
        tfds_builders.Engagements(source_dir=d, data_dir=tmp_path / "t3")
    # As the folder's reader: a compressed table beside it is named.
    (d / "engagements.csv.gz").write_bytes(b"")
    with pytest.raises(folder.DataError) as e:
        tfds_builders.Engagements(source_dir=d, data_dir=tmp_path / "t3")
    assert str(e.value) == (f"{d}: no table 'engagements' (have ['impressions']); "
                            "engagements.csv.gz is not read: a table is a .csv or .tsv file "
                            "(uncompressed) or a folder of .npy columns")


def test_edited_table_gives_new_records_not_stale_ones(tmp_path):
    src = tmp_path / "csvds"
    src.mkdir()

    def write(clicks):
        (src / "impressions.csv").write_text(
            "user_id,item_id,click,conversion,day\n"
            + "".join(f"{u},{u + 10},{c},0,0\n" for u, c in enumerate(clicks))
        )

    def read():
        b = tfds_builders.AdsImpressions(source_dir=src, data_dir=tmp_path / "tfds",
                                         windows={"train": (0, 1)})
        b.download_and_prepare()
        cols = tfds_builders.read_columns(b.as_data_source("train"))
        return b.info.config_name, cols["click"].tolist(), cols["item_id"].tolist()

    write([1, 0, 0])
    name1, click, item = read()
    assert (click, item) == ([1, 0, 0], [10, 11, 12])
    write([0, 0, 0, 1, 1])
    name2, click, item = read()
    assert name2 != name1
    assert (click, item) == ([0, 0, 0, 1, 1], [10, 11, 12, 13, 14])
    # Unchanged files reuse the prepared records (same name).
    assert read()[0] == name2


def test_edited_npy_column_changes_config_name(world, tmp_path):
    d, imp, _ = world
    name = tfds_builders.AdsImpressions(source_dir=d, data_dir=tmp_path / "t").info.config_name
    p = d / "impressions" / "click.npy"
    np.save(p, np.zeros(7, np.int8))  # same size, new content
    st = p.stat()
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    again = tfds_builders.AdsImpressions(source_dir=d, data_dir=tmp_path / "t").info.config_name
    assert again != name


def test_an_upper_case_npy_column_is_part_of_the_config_name(tmp_path):
    """The table's files were found by '*.npy' only: an edit to a user_id.NPY column
    (which the folder reads, in any case) kept the config name, and so stale records;
    a hidden ._x.npy (no column) changed it."""
    d = tmp_path / "upper"
    folder.write_table(d, "impressions", {"user_id": np.array([1, 2]), "item_id": np.array([3, 4]),
                                          "click": np.array([1, 0]), "conversion": np.array([0, 0]),
                                          "day": np.array([0, 0])})
    p = d / "impressions" / "click.NPY"
    (d / "impressions" / "click.npy").rename(p)
    ds = folder.DatasetFolder(d)
    assert [f.name for f in ds.table_files("impressions")] == [
        "click.NPY", "conversion.npy", "day.npy", "item_id.npy", "user_id.npy"]

    def name():
        return tfds_builders.AdsImpressions(source_dir=d, data_dir=tmp_path / "t",
                                            windows={"train": (0, 1)}).info.config_name

    before = name()
    (d / "impressions" / "._click.npy").write_bytes(b"resource fork")
    assert name() == before
    np.save(p, np.array([0, 1]))  # same size, new content
    st = p.stat()
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert name() != before


def test_empty_label_cells_are_nan_as_in_the_folder_reader(tmp_path):
    """An empty click/conversion cell of a text impressions table is a label not known
    yet (folder kinds "label"): NaN, as the ranker's training reads it, not an error."""
    src = tmp_path / "csvds"
    src.mkdir()
    (src / "impressions.csv").write_text(
        "user_id,item_id,click,conversion,day\n1,10,1,0,0\n2,11,,,0\n3,12,0, ,0\n")
    b = tfds_builders.AdsImpressions(source_dir=src, data_dir=tmp_path / "tfds",
                                     windows={"train": (0, 1)})
    b.download_and_prepare()
    cols = tfds_builders.read_columns(b.as_data_source("train"))
    np.testing.assert_array_equal(cols["click"], np.array([1, np.nan, 0], np.float32))
    np.testing.assert_array_equal(cols["conversion"], np.array([0, np.nan, np.nan], np.float32))
    np.testing.assert_array_equal(cols["item_id"], [10, 11, 12])
    # Only the labels: an empty cell of another numeric column is still an error.
    (src / "engagements.csv").write_text(
        "user_id,item_id,engagement_type,day\n1,10,,0\n")
    with pytest.raises(folder.DataError, match=r"engagements.csv:2, column 'engagement_type'"):
        tfds_builders.Engagements(source_dir=src, data_dir=tmp_path / "tfds", window=(0, 1))


def test_a_table_linked_in_from_outside_the_folder(tmp_path):
    """A symlinked table file outside the dataset folder (large data linked in) was a
    ValueError ('... is not in the subpath of ...') when the config name was made;
    repointing the link gives new records."""
    src, ext = tmp_path / "ds", tmp_path / "elsewhere"
    src.mkdir()
    ext.mkdir()
    for name, item in (("a.csv", 10), ("b.csv", 20)):
        (ext / name).write_text(f"user_id,item_id,click,conversion,day\n1,{item},1,0,0\n")
    (src / "impressions.csv").symlink_to(ext / "a.csv")

    def read():
        b = tfds_builders.AdsImpressions(source_dir=src, data_dir=tmp_path / "tfds",
                                         windows={"train": (0, 1)})
        b.download_and_prepare()
        return b.info.config_name, tfds_builders.read_columns(b.as_data_source("train"))

    name_a, cols = read()
    assert cols["item_id"].tolist() == [10]
    (src / "impressions.csv").unlink()
    (src / "impressions.csv").symlink_to(ext / "b.csv")
    name_b, cols = read()
    assert name_b != name_a and cols["item_id"].tolist() == [20]


def test_uint64_ids_beyond_int64_are_a_data_error(world, tmp_path):
    d, imp, _ = world
    big = np.array([2**64 - 1, 1, 2, 3, 4, 5, 6], np.uint64)
    np.save(d / "impressions" / "item_id.npy", big)  # was an OverflowError traceback
    b = tfds_builders.AdsImpressions(source_dir=d, data_dir=tmp_path / "tfds")
    with pytest.raises(folder.DataError, match=r"impressions, column 'item_id': uint64 value "
                       r"18446744073709551615 beyond the int64 range"):
        b.download_and_prepare()
    np.save(d / "impressions" / "item_id.npy", big >> np.uint64(1))  # fits: kept exactly
    b = tfds_builders.AdsImpressions(source_dir=d, data_dir=tmp_path / "tfds")
    b.download_and_prepare()
    cols = tfds_builders.read_columns(b.as_data_source("train"))
    assert cols["item_id"].tolist() == [2**63 - 1, 0, 1]


def test_ads_impressions_take_the_rankers_column_names(tmp_path):
    """The builder read days from `day` or `timestamp` and labels from `click` and
    `conversion` only: a folder the ranker trains on with `--config.data.timestamp_column
    =seen_at --config.data.click_column=clicked ...` was "lacks required columns"."""
    src = tmp_path / "own"
    src.mkdir()
    t0 = 20454 * 86400
    (src / "impressions.csv").write_text(
        "uid,pin_id,seen_at,clicked,converted\n"
        f"u1,p1,{t0 + 5},1,0\nu2,p2,{t0 + 86400},0,\nu1,p3,{t0 + 2 * 86400 + 7},1,1\n")
    with pytest.raises(folder.DataError, match=r"lacks required columns \['user_id'"):
        tfds_builders.AdsImpressions(source_dir=src, data_dir=tmp_path / "t0",
                                     windows={"train": (20454, 20456)})
    b = tfds_builders.AdsImpressions(
        source_dir=src, data_dir=tmp_path / "tfds",
        windows={"train": (20454, 20456), "test": (20456, 20457)}, id_columns=("uid", "pin_id"),
        click_column="clicked", conversion_column="converted", timestamp_column="seen_at")
    b.download_and_prepare()
    train = tfds_builders.read_columns(b.as_data_source("train"))
    test = tfds_builders.read_columns(b.as_data_source("test"))
    assert train["pin_id"].tolist() == ["p1", "p2"]
    np.testing.assert_array_equal(train["clicked"], [1, 0])
    np.testing.assert_array_equal(train["converted"], [0, np.nan])  # empty label: NaN
    np.testing.assert_array_equal(test["seen_at"], [t0 + 2 * 86400 + 7])
    with pytest.raises(folder.DataError) as e:
        tfds_builders.AdsImpressions(
            source_dir=src, data_dir=tmp_path / "t1", windows={"train": (20454, 20456)},
            id_columns=("uid",), click_column="clicked", conversion_column="converted",
            day_column="date", timestamp_column="seen_on").download_and_prepare()
    assert str(e.value) == (f"{src / 'impressions.csv'}, column 'date': no 'date' or "
                            "'seen_on' column to select days by")
    # Default names keep the config name records were prepared under before.
    std = tmp_path / "std"
    std.mkdir()
    (std / "impressions.csv").write_text("user_id,item_id,day,click,conversion\n1,2,0,1,0\n")
    d = tfds_builders.AdsImpressions(source_dir=std, data_dir=tmp_path / "t2",
                                     windows={"train": (0, 1)})
    assert json.loads(d.builder_config.options) == {"table": "impressions",
                                                    "windows": {"train": [0, 1]}}


def test_engagements_take_the_contrastive_column_names(tmp_path):
    """As AdsImpressions: the pairs' and time columns were `user_id`, `item_id`, `day` or
    `timestamp` only."""
    src = tmp_path / "own"
    src.mkdir()
    (src / "engagements.csv").write_text("uid,pin,date\nu1,p1,3\nu2,p2,4\nu1,p3,5\n")
    b = tfds_builders.Engagements(source_dir=src, data_dir=tmp_path / "tfds", window=(3, 6),
                                  holdout_days=1, user_column="uid", item_column="pin",
                                  day_column="date")
    b.download_and_prepare()
    assert tfds_builders.read_columns(b.as_data_source("train"))["pin"].tolist() == ["p1", "p2"]
    assert tfds_builders.read_columns(b.as_data_source("valid"))["date"].tolist() == [5]
    assert json.loads(b.builder_config.options) == {
        "table": "engagements", "window": [3, 6], "holdout_days": 1, "user_column": "uid",
        "item_column": "pin", "day_column": "date"}


def test_windows_as_start_end_days_as_the_ranker_takes_them(tmp_path):
    """A "START,END" window (the ranker's --config.data.*_window, serving_check's
    --window) was taken for a window name: "no day window '0,2'", so a folder without
    dataset.json could not be split by days given as text. The builders now read
    windows as the ranker does, with its error messages."""
    src = tmp_path / "csvds"
    src.mkdir()
    (src / "impressions.csv").write_text(
        "user_id,item_id,click,conversion,day\n"
        "u_a,p_1,1,0,0\nu_b,p_2,0,0,1\nu_a,p_3,1,1,2\nu_c,p_1,0,0,3\n")
    (src / "engagements.csv").write_text(
        "user_id,item_id,day\nu_a,p_1,0\nu_b,p_2,1\nu_c,p_3,2\nu_a,p_2,3\n")
    b = tfds_builders.AdsImpressions(source_dir=src, data_dir=tmp_path / "tfds",
                                     windows={"train": "0,2", "test": " 2 , 4 "})
    b.download_and_prepare()
    train = tfds_builders.read_columns(b.as_data_source("train"))
    test = tfds_builders.read_columns(b.as_data_source("test"))
    assert (train["user_id"].tolist(), train["item_id"].tolist()) == (["u_a", "u_b"],
                                                                      ["p_1", "p_2"])
    assert (test["user_id"].tolist(), test["click"].tolist()) == (["u_a", "u_c"], [1, 0])
    assert b.info.metadata["windows"] == {"train": [0, 2], "test": [2, 4]}
    e = tfds_builders.Engagements(source_dir=src, data_dir=tmp_path / "tfds", window="1,4",
                                  holdout_days=1)
    e.download_and_prepare()
    assert tfds_builders.read_columns(e.as_data_source("train"))["item_id"].tolist() == [
        "p_2", "p_3"]
    assert tfds_builders.read_columns(e.as_data_source("valid"))["item_id"].tolist() == ["p_2"]
    # The same messages as the ranker's (DatasetFolder.window_days).
    ds = folder.DatasetFolder(src)
    for bad in ("2,2", "train"):
        with pytest.raises(folder.DataError) as want:
            ds.window_days(bad)
        for cls, kw in ((tfds_builders.AdsImpressions, {"windows": {"train": bad}}),
                        (tfds_builders.Engagements, {"window": bad})):
            with pytest.raises(folder.DataError) as got:
                cls(source_dir=src, data_dir=tmp_path / "t2", **kw).download_and_prepare()
            assert str(got.value) == str(want.value)
    assert str(want.value) == (f"{src}: no day window 'train' (the folder has no "
                               "dataset.json to name windows); or give days as START,END "
                               "(END exclusive)")
