"""Synthetic world: determinism, schema, long tail, label logic, KG typing, day windows."""

import dataclasses
import hashlib
import json
import pathlib
import re
import subprocess
import sys
import time

import numpy as np
import pytest

from jax_recsys import sysmem
from jax_recsys.data import folder, world

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _tiny(**kw) -> world.WorldConfig:
    cfg = world.scale_config(
        "smoke", engagements_per_day=3_000, conversions_per_day=300, impressions_per_day=1_000
    )
    return dataclasses.replace(world.days_override(cfg, 6), **kw)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke_world")
    t0 = time.perf_counter()
    summary = world.generate_world(world.scale_config("smoke"), out, progress=False)
    return out, summary, time.perf_counter() - t0


def _digest(root: pathlib.Path) -> dict[str, str]:
    files = sorted(
        p for p in root.rglob("*") if p.is_file() and p.suffix in (".npy", ".txt", ".tsv")
    )
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_smoke_world_is_fast(smoke):
    _, summary, seconds = smoke
    assert seconds < 10.0, f"smoke world took {seconds:.1f}s"
    assert summary["events"] == sum(
        summary["rows"][t] for t in ("engagements", "conversions", "impressions")
    )


def test_deterministic_by_seed(tmp_path):
    # Small chunks so that several are generated ahead by the worker threads.
    world.generate_world(_tiny(chunk_events=700), tmp_path / "a", progress=False, workers=1)
    world.generate_world(_tiny(chunk_events=700), tmp_path / "b", progress=False, workers=3)
    a, b = _digest(tmp_path / "a"), _digest(tmp_path / "b")
    assert len(a) > 20 and a == b  # same files for any number of workers
    world.generate_world(_tiny(), tmp_path / "a", progress=False)
    a = _digest(tmp_path / "a")
    world.generate_world(_tiny(seed=1), tmp_path / "c", progress=False)
    c = _digest(tmp_path / "c")
    assert c["engagements/item_id.npy"] != a["engagements/item_id.npy"]
    assert c["kg/train.txt"] != a["kg/train.txt"]


def test_a_failed_run_over_an_old_world_leaves_it_whole(tmp_path, monkeypatch):
    """A run stopped half-way used to leave new tables beside the old dataset.json
    (later runs trained on the mix): the new world is renamed into place only once
    complete."""
    world.generate_world(_tiny(), tmp_path / "a", progress=False)
    before = _digest(tmp_path / "a")

    def boom(*args, **kwargs):
        raise KeyboardInterrupt  # as Ctrl-C after the event tables were written

    monkeypatch.setattr(world, "_build_kg", boom)
    with pytest.raises(KeyboardInterrupt):
        world.generate_world(_tiny(seed=1), tmp_path / "a", progress=False)
    assert _digest(tmp_path / "a") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no partial folder left
    monkeypatch.undo()
    world.generate_world(_tiny(seed=1), tmp_path / "a", progress=False)  # replaced whole
    assert _digest(tmp_path / "a")["kg/train.txt"] != before["kg/train.txt"]
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError, match="exists and is not a folder"):
        world.generate_world(_tiny(), tmp_path / "f", progress=False)


def _forbid_work(monkeypatch):
    """Makes generating a world fail the test: the folder is to be refused before."""

    def generated(*args, **kwargs):
        raise AssertionError("the folder should have been refused before any work")

    monkeypatch.setattr(world, "_generate_into", generated)


def test_a_folder_without_a_world_is_refused_not_replaced(tmp_path, monkeypatch):
    """An existing folder used to be swapped for the new world whole (`--workdir=.`
    deleted the current directory): only an empty folder or a previous world is replaced."""
    mine = tmp_path / "mine"
    (mine / "src").mkdir(parents=True)
    (mine / "notes.txt").write_text("my notes")
    (mine / "src" / "a.py").write_text("print(1)")
    other = tmp_path / "other"  # a dataset folder of another maker
    other.mkdir()
    (other / "dataset.json").write_text(json.dumps({"name": "mine", "tables": {}}))
    _forbid_work(monkeypatch)
    with pytest.raises(FileExistsError, match=re.escape(
            f"{mine} is not empty and holds no generated world (no dataset.json of "
            "jax_recsys.data.world): it holds notes.txt, src/; refusing to replace it")):
        world.generate_world(_tiny(), mine, progress=False)
    with pytest.raises(FileExistsError, match="holds no generated world.*it holds dataset.json;"):
        world.generate_world(_tiny(), other, progress=False)
    monkeypatch.undo()
    assert (mine / "notes.txt").read_text() == "my notes"
    assert (mine / "src" / "a.py").read_text() == "print(1)"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "other"]  # nothing staged
    # An empty folder is filled; a previous world (with launch.generate_data's
    # metrics.json beside it, as the pipeline leaves WORKDIR/world) is replaced whole.
    (tmp_path / "w").mkdir()
    world.generate_world(_tiny(), tmp_path / "w", progress=False)
    (tmp_path / "w" / "metrics.json").write_text("{}")
    world.generate_world(_tiny(seed=1), tmp_path / "w", progress=False)
    assert json.loads((tmp_path / "w" / "dataset.json").read_text())["world_config"]["seed"] == 1
    assert not (tmp_path / "w" / "metrics.json").exists()


def test_a_world_with_other_files_beside_it_is_refused_not_replaced(tmp_path, monkeypatch):
    """A previous world used to be replaced whole with whatever else was put in its
    folder (a user's notes, a subfolder): such a folder is refused before any work and
    left as it is; the world's own entries (and metrics.json) alone are replaced."""
    w = tmp_path / "w"
    world.generate_world(_tiny(), w, progress=False)
    (w / "metrics.json").write_text("{}")  # launch.generate_data's, beside the world
    (w / "notes.txt").write_text("my notes")
    (w / "drafts").mkdir()
    (w / "drafts" / "a.py").write_text("print(1)")
    before = _digest(w)
    _forbid_work(monkeypatch)
    with pytest.raises(FileExistsError, match=re.escape(
            f"{w} holds a generated world but also drafts/, notes.txt, which replacing "
            "it would delete: move them out of the folder first")):
        world.generate_world(_tiny(seed=1), w, progress=False)
    for i in range(7):  # a long list is cut short
        (w / f"x{i}.txt").write_text("x")
    with pytest.raises(FileExistsError,
                       match=r"but also drafts/, notes.txt, x0.txt, x1.txt, x2.txt, x3.txt "
                             r"and 3 more, which"):
        world.generate_world(_tiny(seed=1), w, progress=False)
    monkeypatch.undo()
    after = _digest(w)
    assert {k: after[k] for k in before} == before and len(after) == len(before) + 7
    assert (w / "notes.txt").read_text() == "my notes"
    assert (w / "drafts" / "a.py").read_text() == "print(1)"
    assert (w / "metrics.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w"]  # nothing staged
    # Without them the world is replaced, also one whose world_summary.json is gone
    # (run_pipeline removes it before it reruns the world stage).
    for p in [w / "notes.txt", *w.glob("x*.txt")]:
        p.unlink()
    (w / "drafts" / "a.py").unlink()
    (w / "drafts").rmdir()
    (w / "world_summary.json").unlink()
    world.generate_world(_tiny(seed=1), w, progress=False)
    assert json.loads((w / "dataset.json").read_text())["world_config"]["seed"] == 1
    assert sorted(p.name for p in w.iterdir()) == [
        "advertisers", "conversions", "dataset.json", "engagements", "impressions", "items",
        "kg", "users", "world_summary.json"]


def test_a_symlink_world_folder_is_refused_and_left_a_link(tmp_path, monkeypatch):
    """A --workdir that is a symlink to a previous world used to become a real folder
    (the link's target untouched, a stray link left beside it): refused before any work."""
    w = tmp_path / "w"
    world.generate_world(_tiny(), w, progress=False)
    before = _digest(w)
    (tmp_path / "LINK").symlink_to(w)
    (tmp_path / "dangling").symlink_to(tmp_path / "none")
    _forbid_work(monkeypatch)
    for link, target in [("LINK", w), ("dangling", tmp_path / "none")]:
        with pytest.raises(FileExistsError, match=re.escape(
                f"{tmp_path / link} is a symlink to {target}: writing the world would "
                f"replace the link with a folder; write to a new folder, then point the "
                f"link at it: ln -sfn NEW {tmp_path / link}")):
            world.generate_world(_tiny(seed=1), tmp_path / link, progress=False)
        assert (tmp_path / link).is_symlink()
    assert _digest(w) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LINK", "dangling", "w"]


def test_chunk_size_changes_nothing_but_chunking(tmp_path):
    # Chunks have their own random streams; the *statistics* must not depend on them.
    s1 = world.generate_world(_tiny(), tmp_path / "a", progress=False)
    s2 = world.generate_world(_tiny(chunk_events=700), tmp_path / "b", progress=False)
    for t in ("engagements", "impressions", "users", "items"):
        assert s1["rows"][t] == s2["rows"][t]
    assert abs(s1["click_rate"] - s2["click_rate"]) < 0.03


SCHEMA = {
    "engagements": {
        "user_id": np.int64,
        "item_id": np.int64,
        "day": np.int32,
        "timestamp": np.int64,
        "engagement_type": np.int8,
    },
    "conversions": {
        "user_id": np.int64,
        "advertiser_id": np.int64,
        "day": np.int32,
        "timestamp": np.int64,
        "source": np.int8,
    },
    "impressions": {
        "user_id": np.int64,
        "item_id": np.int64,
        "advertiser_id": np.int64,
        "day": np.int32,
        "timestamp": np.int64,
        "click": np.int8,
        "conversion": np.int8,
        "pin_category": np.int32,
        "hour": np.int32,
        "device": np.int32,
        "country": np.int32,
        "position": np.int32,
    },
    "users": {"user_id": np.int64, "country": np.int32, "device": np.int32},
    "items": {
        "item_id": np.int64,
        "advertiser_id": np.int64,
        "board_id": np.int64,
        "topic": np.int32,
        "keyword_id": np.int64,
        "created_day": np.int32,
        "is_ad": np.int8,
    },
    "advertisers": {"advertiser_id": np.int64, "category": np.int32},
}


def test_schema_of_every_table(smoke):
    out, summary, _ = smoke
    ds = folder.DatasetFolder(out)
    assert sorted(ds.table_names) == sorted(SCHEMA)
    cfg = world.scale_config("smoke")
    for name, cols in SCHEMA.items():
        t = ds.table(name)
        assert set(t) == set(cols), name
        assert ds.meta["tables"][name]["columns"] == list(cols)
        for c, dt in cols.items():
            assert t[c].dtype == dt, (name, c, t[c].dtype)
            assert len(t[c]) == summary["rows"][name] == ds.num_rows(name)
    assert ds.meta["num_days"] == cfg.num_days
    assert ds.meta["world_config"]["seed"] == cfg.seed
    assert ds.kg_path == out / "kg"
    e = ds.table("engagements")
    assert e["user_id"].max() < cfg.num_users and e["item_id"].max() < cfg.num_pins
    assert set(np.unique(e["engagement_type"])) == {0, 1, 2}
    items = ds.table("items")
    np.testing.assert_array_equal(items["item_id"], np.arange(cfg.num_pins))
    ad = items["is_ad"] == 1
    assert (items["advertiser_id"][ad] >= 0).all() and (items["advertiser_id"][~ad] == -1).all()
    # An ad pin's advertiser is in the pin's topic (category); boards/keywords too.
    adv = ds.table("advertisers")
    np.testing.assert_array_equal(adv["category"][items["advertiser_id"][ad]], items["topic"][ad])
    np.testing.assert_array_equal(items["board_id"] % cfg.num_topics, items["topic"])
    np.testing.assert_array_equal(items["keyword_id"] % cfg.num_topics, items["topic"])
    imp = ds.table("impressions")
    np.testing.assert_array_equal(imp["advertiser_id"], items["advertiser_id"][imp["item_id"]])
    assert (items["is_ad"][imp["item_id"]] == 1).all()
    np.testing.assert_array_equal(
        imp["pin_category"], items["topic"][imp["item_id"]] // cfg.topics_per_category
    )


def test_long_tail_and_volumes(smoke):
    out, summary, _ = smoke
    ds = folder.DatasetFolder(out)
    e, imp = ds.table("engagements"), ds.table("impressions")
    cfg = world.scale_config("smoke")
    counts = np.sort(np.bincount(e["item_id"], minlength=cfg.num_pins))
    share = counts[: int(0.8 * len(counts))].sum() / counts.sum()
    assert share == pytest.approx(
        summary["tail"]["engagement_share_least_popular_80pct_pins"], abs=1e-4
    )
    assert share < 0.4  # a uniform world would give 0.8
    user_imp = np.bincount(imp["user_id"], minlength=cfg.num_users)
    seen = user_imp > 0
    assert (user_imp[seen] < 5).mean() > 0.3  # most impressed users are rare in ad labels
    assert len(e["user_id"]) >= 5 * len(imp["user_id"])  # engagements >> impressions
    assert summary["engagement_impression_ratio"] == pytest.approx(
        len(e["user_id"]) / len(imp["user_id"]), rel=1e-3
    )


def test_candidate_pools_group_members_by_topic():
    cfg = world.scale_config("smoke")
    st = world._Static(cfg)
    for pool, is_member in ((st.pins, np.ones(cfg.num_pins, bool)), (st.ads, st.pin_adv >= 0)):
        assert sorted(pool.members.tolist()) == np.flatnonzero(is_member).tolist()
        for t in range(cfg.num_topics):
            block = pool.members[pool.offsets[t] : pool.offsets[t + 1]]
            assert (st.pin_topic[block] == t).all()  # topic t's members, and only them
        np.testing.assert_array_equal(pool.slot[pool.members], np.arange(len(pool.members)))
        np.testing.assert_array_equal(pool.created, st.created[pool.members])
        assert (np.diff(pool.created_sorted) >= 0).all()


def test_ad_impressions_follow_topics_not_one_pin(smoke):
    # Ads are drawn within the user's topic (explored or not); no single ad pin
    # may soak up the impressions (a wrong ad offset table once sent 68% to one pin).
    out, _, _ = smoke
    imp = folder.DatasetFolder(out).table("impressions", ["item_id"])
    counts = np.bincount(imp["item_id"])
    assert counts.max() / counts.sum() < 0.02
    cfg = world.scale_config("smoke")
    st = world._Static(cfg)
    topic_share = np.bincount(st.pin_topic[imp["item_id"]], minlength=cfg.num_topics)
    assert topic_share.min() > 0  # every topic's ads are shown


def test_labels_conversions_only_after_clicks(smoke):
    out, summary, _ = smoke
    imp = folder.DatasetFolder(out).table("impressions")
    click, conv = imp["click"], imp["conversion"]
    assert set(np.unique(click)) == {0, 1}
    assert (conv <= click).all()
    assert 0.005 < click.mean() < 0.2
    assert conv.sum() > 0
    assert summary["click_rate"] == pytest.approx(click.mean(), abs=1e-5)
    # The world has signal beyond the coarse features, and coarse features have some.
    o = summary["oracle"]
    assert o["click_auc_true_logit"] > o["click_auc_coarse_effects_only"] > 0.55
    # Ad conversions are also in the conversion log.
    convs = folder.DatasetFolder(out).table("conversions")
    assert int((convs["source"] == 1).sum()) == int(conv.sum())


def test_day_windows_respected(smoke):
    out, _, _ = smoke
    ds = folder.DatasetFolder(out)
    cfg = world.scale_config("smoke")
    assert ds.splits == {k: tuple(v) for k, v in cfg.windows().items()}
    for name in ("engagements", "conversions", "impressions"):
        t = ds.table(name)
        assert (np.diff(t["day"]) >= 0).all()  # written in day order
        np.testing.assert_array_equal(t["timestamp"] // 86400, t["day"])
        assert t["day"].max() < cfg.num_days
    e = ds.table("engagements")
    assert set(np.unique(e["day"])) == set(range(cfg.num_days))  # logs on every day
    imp = ds.table("impressions")
    assert imp["day"].min() == cfg.impression_start_day
    items = ds.table("items")
    assert (items["created_day"][e["item_id"]] <= e["day"]).all()  # no pin before creation
    assert (items["created_day"][imp["item_id"]] <= imp["day"]).all()
    train = folder.select_days(imp, *ds.day_window("train"))
    assert set(np.unique(train["day"])) == set(range(*cfg.ranker_train_days))


def test_interests_concentrate_and_drift(smoke):
    out, _, _ = smoke
    ds = folder.DatasetFolder(out)
    cfg = world.scale_config("smoke")
    e, topic = ds.table("engagements"), ds.table("items")["topic"]
    heavy = np.argsort(np.bincount(e["user_id"], minlength=cfg.num_users))[-200:]

    def hist(lo, hi):
        sel = (e["day"] >= lo) & (e["day"] < hi) & np.isin(e["user_id"], heavy)
        key = np.searchsorted(np.sort(heavy), e["user_id"][sel]) * cfg.num_topics
        h = np.bincount(key + topic[e["item_id"][sel]], minlength=200 * cfg.num_topics)
        h = h.reshape(200, cfg.num_topics).astype(float)
        return h / np.maximum(h.sum(1, keepdims=True), 1)

    early, mid, late = hist(0, 4), hist(5, 9), hist(10, 14)
    assert early.max(1).mean() > 3.0 / cfg.num_topics  # far from uniform over topics
    # Interests drift: the share of each user's early favourite topic falls over time.
    fav = early.argmax(1)
    rows = np.arange(len(fav))
    shares = [h[rows, fav].mean() for h in (early, mid, late)]
    assert shares[0] > shares[1] > shares[2] and shares[0] - shares[2] > 0.1, shares


def _read_kg(path: pathlib.Path, split: str):
    rows = [ln.split("\t") for ln in (path / f"{split}.txt").read_text().splitlines()]
    assert all(len(r) == 3 for r in rows)
    return rows


def test_kg_entities_typed_consistently(smoke):
    out, summary, _ = smoke
    ds = folder.DatasetFolder(out)
    cfg = world.scale_config("smoke")
    types = dict(
        ln.split("\t") for ln in (ds.kg_path / "entity_types.tsv").read_text().splitlines()
    )
    assert set(types.values()) == {"user", "pin", "advertiser", "board", "keyword"}
    assert all(k.split(":")[0] == v for k, v in types.items())
    rel_types = {}
    train_entities = set()
    per_split = {}
    for split in ("train", "valid", "test"):
        rows = _read_kg(ds.kg_path, split)
        per_split[split] = rows
        for h, r, t in rows:
            assert h in types and t in types, (split, h, r, t)
            rel_types.setdefault(r, set()).add((types[h], types[t]))
            if split == "train":
                train_entities.update((h, t))
    assert {r: next(iter(v)) for r, v in rel_types.items()} == {
        r: tuple(v) for r, v in summary["kg"]["relations"].items()
    }
    assert all(len(v) == 1 for v in rel_types.values())
    assert len(per_split["valid"]) > 0 and len(per_split["test"]) > 0
    for split in ("valid", "test"):
        assert all(h in train_entities and t in train_entities for h, _, t in per_split[split])
    for rel, c in summary["kg"]["triples"].items():
        assert sum(1 for s in per_split.values() for _, r, _ in s if r == rel) == sum(c.values())
    # "engaged" edges are exactly the window's save/click pairs; "converted" the window's.
    e = folder.select_days(ds.table("engagements"), *cfg.kg_days)
    sel = np.isin(e["engagement_type"], cfg.kg_engagement_types)
    want = set(zip(e["user_id"][sel].tolist(), e["item_id"][sel].tolist(), strict=True))
    got = {(int(h[5:]), int(t[4:])) for s in per_split.values() for h, r, t in s if r == "engaged"}
    assert got == want
    c = folder.select_days(ds.table("conversions"), *cfg.kg_days)
    want = set(zip(c["user_id"].tolist(), c["advertiser_id"].tolist(), strict=True))
    got = {
        (int(h[5:]), int(t[11:])) for s in per_split.values() for h, r, t in s if r == "converted"
    }
    assert got == want


def test_kg_spill_partitions_give_same_graph(tmp_path):
    # Several spill partitions (bounded memory) give the same triples; only the
    # random train/valid/test assignment depends on the partitioning.
    world.generate_world(_tiny(), tmp_path / "a", progress=False)
    world.generate_world(_tiny(kg_partition_rows=2_000), tmp_path / "b", progress=False)

    def triples(root):
        return sorted(
            ln
            for s in ("train", "valid", "test")
            for ln in (root / "kg" / f"{s}.txt").read_text().splitlines()
        )

    a, b = triples(tmp_path / "a"), triples(tmp_path / "b")
    assert len(a) > 1000 and a == b
    assert not (tmp_path / "b" / "_kg_spill").exists()


def test_config_errors_and_days_override():
    with pytest.raises(ValueError, match="unknown world scale"):
        world.scale_config("huge")
    with pytest.raises(ValueError, match="ranker_test"):
        world.WorldConfig(ranker_test_days=(27, 29)).validate()
    cfg = world.days_override(world.scale_config("default"), 8)
    cfg.validate()
    w = cfg.windows()
    assert w["stale_pretrain"][0] == 0 and w["ranker_test"][1] == 8
    order = ["stale_pretrain", "fresh_pretrain", "ranker_train", "ranker_valid", "ranker_test"]
    for a, b in zip(order, order[1:], strict=False):
        assert w[a][1] == w[b][0] and w[a][0] < w[a][1]
    assert cfg.impression_start_day == w["ranker_train"][0]


def test_launch_generate_data(tmp_path):
    out = tmp_path / "ds"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "launch.generate_data",
            "--config=configs/world.py:smoke",
            f"--workdir={out}",
            "--config.num_days=6",
            "--config.world.seed=3",
            "--config.progress=False",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["seed"] == 3 and metrics["rows"]["impressions"] > 0
    ds = folder.DatasetFolder(out)
    assert ds.meta["num_days"] == 6 and ds.has_table("engagements")


def test_zero_exploration_generates_and_stays_on_user_topics(tmp_path):
    cfg = _tiny(explore_prob=0.0, ad_explore_prob=0.0)
    summary = world.generate_world(cfg, tmp_path, progress=False)
    assert summary["rows"]["engagements"] == 6 * 3_000
    assert summary["rows"]["impressions"] == cfg.impressions_per_day * (
        cfg.num_days - cfg.impression_start_day
    )
    # No random topics: every candidate, hence every event, is on the user's home
    # or drift topic.
    st = world._Static(cfg)
    ds = folder.DatasetFolder(tmp_path)
    pin_topic = ds.table("items")["topic"]
    for name, col in (
        ("engagements", "item_id"),
        ("impressions", "item_id"),
        ("conversions", "advertiser_id"),
    ):
        t = ds.table(name)
        uid, ids = np.asarray(t["user_id"]), np.asarray(t[col])
        topic = pin_topic[ids] if col == "item_id" else ids % cfg.num_topics
        on_topic = (topic == st.home_topic[uid]) | (topic == st.drift_topic[uid])
        assert on_topic.all(), name


def test_config_validate_catches_settings_that_fail_later():
    base = world.scale_config("smoke")
    for scale in ("smoke", "default", "large"):
        world.scale_config(scale).validate()
    bad = {
        "explore_prob": 1.5,
        "ad_explore_prob": -0.1,
        "ad_pin_fraction": 2.0,
        "new_pin_fraction": -1.0,
        "country_topic_prob": 1.01,
        "kg_valid_fraction": 1.2,
        "engagement_type_probs": (1.2, -0.1, -0.1),
        "kg_engagement_types": (0, 3),
        "impression_start_day": base.ranker_train_days[0] + 1,
        "impressions_per_day": 0,
        "engagements_per_day": 0,
        "click_bias": float("nan"),
        "user_zipf": float("nan"),
        "drift_per_day": float("inf"),
        "topics_per_category": 0,
        "hidden_dim": 0,
        "latent_dim": 0,
        "num_countries": 0,
        "num_devices": 0,
        "kg_partition_rows": 0,
    }
    for name, value in bad.items():
        with pytest.raises(ValueError, match=name):
            dataclasses.replace(base, **{name: value}).validate()
    # NaN passed the sum check (abs(nan - 1) > 1e-6 is False).
    with pytest.raises(ValueError, match=r"engagement_type_probs=\(nan, 0.5, 0.5\) must be finite"):
        dataclasses.replace(base, engagement_type_probs=(float("nan"), 0.5, 0.5)).validate()
    with pytest.raises(ValueError, match="kg_valid_fraction \\+ kg_test_fraction"):
        dataclasses.replace(base, kg_valid_fraction=0.5, kg_test_fraction=0.5).validate()
    with pytest.raises(ValueError, match="impression_start_day"):
        dataclasses.replace(base, impression_start_day=-1).validate()
    # Leakage: overlapping or out-of-order ranker windows, pretraining on test days.
    tr, va, te = base.ranker_train_days, base.ranker_valid_days, base.ranker_test_days
    with pytest.raises(ValueError, match="ranker windows must not overlap"):
        dataclasses.replace(base, ranker_train_days=(tr[0], te[1])).validate()
    with pytest.raises(ValueError, match="ranker windows must not overlap"):
        dataclasses.replace(base, ranker_valid_days=te, ranker_test_days=va).validate()
    with pytest.raises(ValueError, match="kg_days=.* reaches into the ranker test window"):
        dataclasses.replace(base, kg_days=(base.kg_days[0], te[1])).validate()
    with pytest.raises(ValueError, match="fresh_pretrain_days=.* reaches into the ranker test"):
        dataclasses.replace(base, fresh_pretrain_days=(base.fresh_pretrain_days[0], te[1])
                            ).validate()
    for n in (5, 9, 40):
        world.days_override(base, n).validate()
    # Edge values that do work.
    dataclasses.replace(
        base,
        explore_prob=0.0,
        ad_explore_prob=1.0,
        kg_valid_fraction=0.0,
        kg_test_fraction=0.0,
        impression_start_day=0,
    ).validate()


def test_a_world_too_big_for_memory_is_refused_before_any_work(tmp_path, monkeypatch):
    # num_candidates=10**6 was killed by the OS part-way, without a message.
    cfg = _tiny(latent_dim=4, hidden_dim=2)
    # Users 4(4+2)+20 = 44 B, pins 4*4+30 = 46 B; 2 chunks of 3000 events with 6
    # candidates of 4(4+2)+32 = 56 B.
    assert world.memory_estimate(cfg, 2) == 1_500 * 44 + 2_000 * 46 + 2 * 3_000 * 6 * 56
    monkeypatch.setattr(sysmem, "physical_memory", lambda: 2**30)
    monkeypatch.setattr(sysmem, "CGROUP_MOUNTS", ())
    big = dataclasses.replace(cfg, num_candidates=10**6)
    out = tmp_path / "w"
    with pytest.raises(ValueError, match=(
        r"needs about 312.9 GiB of memory but this machine has 1.0 GiB of RAM: "
        r"num_candidates=1000000 candidates for each of the 3000 events of a chunk "
        r"\(chunk_events=65536\), 2 chunk\(s\) at once; lower num_candidates or chunk_events")):
        world.generate_world(big, out, progress=False, workers=2)
    assert list(tmp_path.iterdir()) == []
    # Fewer events per chunk fit (the check passes; generation itself is not run here).
    world._check_memory(dataclasses.replace(big, chunk_events=4), 2)


def test_the_memory_check_uses_a_smaller_cgroup_limit(tmp_path, monkeypatch):
    # In a container (or a Slurm job) with a cgroup memory limit below the machine's
    # RAM, a world that fit in RAM but not in the limit was killed by the OOM killer
    # part-way, without a message.
    cfg = dataclasses.replace(_tiny(latent_dim=4, hidden_dim=2), num_candidates=10**6)
    assert world.memory_estimate(cfg, 2) > 300 * 2**30  # 312.9 GiB
    monkeypatch.setattr(sysmem, "physical_memory", lambda: 2**40)  # 1 TiB
    v2, v1 = tmp_path / "cgroup", tmp_path / "cgroup" / "memory"
    (v1 / "job").mkdir(parents=True)
    (tmp_path / "proc_cgroup").write_text("4:memory:/job\n0::/\n")
    monkeypatch.setattr(sysmem, "CGROUP_MOUNTS", (
        (str(v2), "memory.max"), (str(v1), "memory.limit_in_bytes")))
    monkeypatch.setattr(sysmem, "PROC_CGROUP", str(tmp_path / "proc_cgroup"))
    # No limit, "max", v1's "no limit" value, or a limit above RAM: RAM counts.
    world._check_memory(cfg, 2)
    (v2 / "memory.max").write_text("max\n")
    (v1 / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    world._check_memory(cfg, 2)
    (v1 / "job" / "memory.limit_in_bytes").write_text(f"{2**41}\n")
    world._check_memory(cfg, 2)
    # A limit below the need: refused, naming the limit and its file.
    f = v1 / "job" / "memory.limit_in_bytes"
    f.write_text(f"{2 * 2**30}\n")
    with pytest.raises(ValueError, match=(
            rf"needs about 312.9 GiB of memory but the cgroup memory limit "
            rf"\({re.escape(str(f))}\) is 2.0 GiB: num_candidates=1000000 candidates")):
        world._check_memory(cfg, 2)
    f.write_text(f"{400 * 2**30}\n")  # above the need
    world._check_memory(cfg, 2)
