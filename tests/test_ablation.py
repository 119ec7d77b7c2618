"""Ablation runner: shared pretraining, every variant x seed, report arithmetic, the INT4 hook."""

import dataclasses
import json
import math
import pathlib
import re
import shutil
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from jax_recsys import checkpoint, fsutil, history
from jax_recsys.data import folder
from jax_recsys.ranking import ablation as A, model as M, train as T

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_relaimpr_and_summary_hand_computed():
    assert A.relaimpr(0.66, 0.6) == pytest.approx(0.6)
    assert math.isnan(A.relaimpr(0.7, 0.5))
    assert math.isnan(A.relaimpr(0.7, 0.505))  # baseline ~random: undefined, not +4000%
    assert A.relaimpr(0.53, 0.52) == pytest.approx(0.5)
    m = lambda ctr, cvr: {"ctr_auc": ctr, "cvr_auc": cvr, "ctcvr_auc": ctr, "ctr_ne": 0.9,  # noqa: E731
                          "cvr_ne": 0.9, "ctcvr_ne": 0.9, "ctr_log_loss": 0.1, "cvr_log_loss": 0.2,
                          "ctcvr_log_loss": 0.05}
    base = {0: m(0.60, 0.70), 1: m(0.62, 0.70)}
    var = {0: m(0.62, 0.74), 1: m(0.62, 0.72)}
    s = A.summarize_variant(label="x", per_seed=var, baseline=base)
    assert s["ctr_auc_mean"] == pytest.approx(0.62) and s["ctr_auc_std"] == pytest.approx(0.0)
    # CTR gains per seed: 0.02/0.10 = 0.2 and 0/0.12 = 0 -> mean 0.1, sample std 0.1414.
    assert s["ctr_relaimpr_mean"] == pytest.approx(0.1)
    assert s["ctr_relaimpr_std"] == pytest.approx(math.sqrt(0.02))
    assert s["cvr_relaimpr_mean"] == pytest.approx((0.2 + 0.1) / 2)
    b = A.summarize_variant(label="b", per_seed=base, baseline=base)
    assert b["ctr_relaimpr_mean"] == 0.0
    md = A.render_markdown({"seeds": [0, 1], "windows": {"test": [5, 6]}, "order": ["no_large_tables", "cl"],
                            "variants": {"no_large_tables": b, "cl": s}, "seconds": 1.0})
    assert "| x | 0.6200 ± 0.0000 | +10.0% ± 14.1 |" in md
    # The coverage lines say what the rows of ids a facet lacks are.
    cov = {"cl": [{"facet": "kg", "entity": "pin", "found": 7, "rows": 9, "missing": 2,
                   "facet_rows": 12}]}
    base_result = {"seeds": [0, 1], "windows": {"test": [5, 6]}, "order": ["no_large_tables", "cl"],
                   "variants": {"no_large_tables": b, "cl": s}, "facet_coverage": cov}
    line = "- kg/pin (fresh window): 7 of 9 ranker ids found, 2 {} rows; facet table 12 rows"
    assert line.format("fresh") in A.render_markdown(base_result)  # before facet_missing
    assert line.format("fresh") in A.render_markdown({**base_result, "facet_missing": "random"})
    assert line.format("zero") in A.render_markdown({**base_result, "facet_missing": "zeros"})


def test_a_mean_over_fewer_seeds_says_so():
    # Seed 0's CVR baseline is near random: its CVR RelaImpr is NaN and left out of the
    # mean, which was shown as a mean over all 3 seeds.
    m = lambda ctr, cvr: {"ctr_auc": ctr, "cvr_auc": cvr, "ctcvr_auc": ctr, "ctr_ne": 0.9,  # noqa: E731
                          "cvr_ne": 0.9, "ctcvr_ne": 0.9, "ctr_log_loss": 0.1, "cvr_log_loss": 0.2,
                          "ctcvr_log_loss": 0.05}
    base = {0: m(0.6, 0.505), 1: m(0.6, 0.7), 2: m(0.6, 0.7)}
    var = {0: m(0.62, 0.9), 1: m(0.62, 0.72), 2: m(0.62, 0.74)}
    s = A.summarize_variant(label="x", per_seed=var, baseline=base)
    assert s["cvr_relaimpr_mean"] == pytest.approx(0.15) and s["cvr_relaimpr_n"] == 2
    assert s["ctr_relaimpr_n"] == 3 and s["cvr_auc_n"] == 3
    b = A.summarize_variant(label="b", per_seed=base, baseline=base)
    md = A.render_markdown({"seeds": [0, 1, 2], "windows": {"test": [5, 6]},
                            "order": ["no_large_tables", "cl"],
                            "variants": {"no_large_tables": b, "cl": s}, "seconds": 1.0})
    assert ("| x | 0.6200 ± 0.0000 | +20.0% ± 0.0 | 0.7867 ± 0.0987 | +15.0% ± 7.1 (n=2 of 3) "
            "| 0.6200 ± 0.0000 | +20.0% ± 0.0 |") in md
    assert "(n=K of N): mean ± std over the K of the N seeds that have a value" in md
    full = A.summarize_variant(label="x", per_seed={1: var[1], 2: var[2]}, baseline=base)
    md = A.render_markdown({"seeds": [1, 2], "windows": {"test": [5, 6]}, "order": ["cl"],
                            "variants": {"cl": full}, "seconds": 1.0})
    assert "(n=" not in md


def test_a_stale_kg_of_a_dataset_that_is_not_generated_is_a_value_error(tmp_path):
    # Was an absl UsageError: run_ablation printed its whole usage text before the message.
    from launch import run_ablation

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "dataset.json").write_text('{"name": "by hand"}')
    with pytest.raises(ValueError, match=r"is not a generated world: give "
                                         r"--config\.facet_dirs\.kg_stale=DIR"):
        run_ablation._stale_kg_world(str(tmp_path / "data"), tmp_path / "stale")


def test_config_rejects_unknown_variants():
    base = T.TrainConfig(data=T.DataConfig(path="nowhere"))
    with pytest.raises(ValueError, match="unknown ablation variants"):
        A.AblationConfig(base=base, variants=("no_large_tables", "magic"))
    with pytest.raises(ValueError, match="baseline"):
        A.AblationConfig(base=base, variants=("scratch",))
    # Was accepted: no run kept its ranker, and the export asking for it failed after the
    # whole ablation.
    with pytest.raises(ValueError, match=r"unknown save_ranker_variants \['cl_kgg'\]; known: "):
        A.AblationConfig(base=base, save_ranker_variants=("cl_kg", "cl_kgg"))
    assert A.AblationConfig(base=base, save_ranker_variants=()).save_ranker_variants == ()


def test_config_rejects_a_repeated_seed():
    # seeds=(3, 3, 3) used to train one run and report its "± 0.0000" over three seeds.
    base = T.TrainConfig(data=T.DataConfig(path="nowhere"))
    with pytest.raises(ValueError, match=r"seeds lists a seed twice: \[3, 3, 3\]"):
        A.AblationConfig(base=base, seeds=(3, 3, 3))
    assert A.AblationConfig(base=base, seeds=(3, 1)).seeds == (3, 1)
    # Was accepted; the first run of seed -1 failed after the pretraining.
    with pytest.raises(ValueError, match=r"seeds must be >= 0, got \[0, -1\]"):
        A.AblationConfig(base=base, seeds=(0, -1))


def _write_data(path, n=2048, seed=0):
    rng = np.random.default_rng(seed)
    u = rng.integers(0, 32, n)
    p = rng.integers(0, 24, n)
    logit = -2.0 + 3.0 * ((u % 2) == (p % 2))
    click = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.int8)
    conv = (click * (rng.random(n) < 0.3)).astype(np.int8)
    day = np.repeat(np.arange(4), n // 4).astype(np.int32)
    t = folder.write_table(path, "impressions", {
        "user_id": (100 + u).astype(np.int64), "item_id": (500 + p).astype(np.int64),
        "advertiser_id": (p % 3).astype(np.int64), "day": day, "timestamp": day.astype(np.int64),
        "click": click, "conversion": conv, "hour": rng.integers(0, 3, n).astype(np.int64),
    })
    folder.write_dataset_json(path, name="tiny", tables={"impressions": t}, num_days=4,
                              splits={"ranker_train": [0, 2], "ranker_valid": [2, 3], "ranker_test": [3, 4]})


def _fake_pretrainer(facet, calls):
    """A pretrainer of `run_ablation`'s shape that appends (facet, window) to ``calls``."""
    def run(window, out):
        calls.append((facet, window))
        rng = np.random.default_rng(len(calls))
        ents = {"cl": ("user", "pin"), "kg": ("user", "pin", "advertiser")}[facet]
        ids = {"user": 100 + np.arange(30), "pin": 500 + np.arange(24), "advertiser": np.arange(3)}
        checkpoint.save_facet(out / f"facet_{facet}", facet=facet,
                              tables={e: rng.normal(size=(len(ids[e]), 4)).astype(np.float32) for e in ents},
                              vocabs={e: ids[e] for e in ents})
        return out / f"facet_{facet}"
    return run


@pytest.mark.slow
def test_ablation_runs_every_variant_and_shares_pretraining(tmp_path):
    _write_data(tmp_path / "data")
    calls = []

    def fake_pretrainer(facet):
        return _fake_pretrainer(facet, calls)

    base = T.TrainConfig(
        data=T.DataConfig(path=str(tmp_path / "data")), batch_size=256, num_epochs=1.0, log_every=0,
        model=M.RankerConfig(mlp_dims=(8,), head_dims=(4,), num_cross_layers=1),
    )
    variants = ("no_large_tables", "scratch", "cl_kg", "cl_kg_stale")
    cfg = A.AblationConfig(base=base, scratch_dim=4, seeds=(0, 1), variants=variants)
    res = A.run_ablation(cfg, tmp_path / "abl", pretrainers={"cl": fake_pretrainer("cl"), "kg": fake_pretrainer("kg")},
                         log=lambda s: None)
    # One pretraining per (facet, window), shared by all variants and seeds.
    assert sorted(calls) == [("cl", "fresh"), ("cl", "stale"), ("kg", "fresh"), ("kg", "stale")]
    assert list(res["variants"]) == list(variants)
    for name, row in res["variants"].items():
        assert set(row["per_seed"]) == {"0", "1"}, name
        assert 0.0 <= row["ctr_auc_mean"] <= 1.0
    assert res["variants"]["no_large_tables"]["ctr_relaimpr_mean"] == 0.0
    cov = {(s["facet"], s["entity"]): s for s in res["facet_coverage"]["cl_kg"]}
    assert cov[("cl", "user")]["found"] == 30 and cov[("cl", "user")]["missing"] == 2
    md = (tmp_path / "abl" / "ablation.md").read_text()
    assert "+ both facets, stale pretraining window" in md and "RelaImpr" in md
    on_disk = json.loads((tmp_path / "abl" / "ablation.json").read_text())
    assert on_disk["variants"]["cl_kg"]["ctr_auc_mean"] == pytest.approx(res["variants"]["cl_kg"]["ctr_auc_mean"])
    assert (tmp_path / "abl" / "runs" / "cl_kg_s1" / "ranker" / "config.json").exists()
    assert not (tmp_path / "abl" / "runs" / "scratch_s0" / "ranker").exists()

    # The INT4 hook: identity tables reproduce the variant's row; zeroed tables change it.
    same = A.evaluate_with_tables(tmp_path / "abl", transform=lambda r: dict(r.tables), name="same", label="same")
    assert same["ctr_auc_mean"] == pytest.approx(res["variants"]["cl_kg"]["ctr_auc_mean"], abs=1e-6)
    A.evaluate_with_tables(tmp_path / "abl", name="zero", label="+ both facets, zero tables",
                           transform=lambda r: {e: np.zeros_like(t) for e, t in r.tables.items()})
    md = (tmp_path / "abl" / "ablation.md").read_text()
    assert "+ both facets, zero tables" in md

    # Re-running reuses the finished runs and pretraining (no new pretrainer calls).
    again = A.run_ablation(cfg, tmp_path / "abl", pretrainers={}, log=lambda s: None)
    assert len(calls) == 4
    assert again["variants"]["scratch"]["ctr_auc_mean"] == res["variants"]["scratch"]["ctr_auc_mean"]

    # The data moved away: a row without data_path names the recorded folder (it was a
    # FileNotFoundError of a file inside it); with data_path it is scored as before.
    (tmp_path / "data").rename(tmp_path / "moved")
    with pytest.raises(ValueError, match=re.escape(
            f"the dataset {tmp_path / 'abl' / 'ablation.json'} records, {tmp_path / 'data'}, "
            "is gone (moved?): pass its folder as data_path")):
        A.evaluate_with_tables(tmp_path / "abl", transform=lambda r: dict(r.tables), name="same",
                               label="same")
    moved = A.evaluate_with_tables(tmp_path / "abl", transform=lambda r: dict(r.tables),
                                   name="same", label="same", data_path=str(tmp_path / "moved"))
    assert moved["ctr_auc_mean"] == same["ctr_auc_mean"]


def _old_folder_digest(root):
    """folder_digest as it was until 2026-11-27 (rglob: linked folders not entered)."""
    import hashlib

    h = hashlib.sha256((fsutil.file_digest(root / "dataset.json") or "missing").encode())
    for f in sorted(q for q in root.rglob("*") if q.is_file()):
        st = f.stat()
        h.update(f"\0{f.relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def test_folder_digest_enters_linked_folders_and_keeps_plain_digests(tmp_path):
    """Runs are keyed by the data's digest, not its path: a table folder that is a
    symlink was not entered, so repointing it kept the digest (and reused runs trained
    on the old table). A folder without links keeps its digest (no retraining)."""
    data = tmp_path / "data"
    _write_data(data)
    (data / "sub").mkdir()
    (data / "sub" / "x.npy").write_bytes(b"x" * 10)
    assert A.folder_digest(data) == _old_folder_digest(data)
    for name, size in (("t1", 100), ("t2", 7)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "part.npy").write_bytes(b"0" * size)
    (data / "linked").symlink_to(tmp_path / "t1")
    (data / "linked" / "loop").symlink_to(data)  # a cycle is walked once
    one, old_one = A.folder_digest(data), _old_folder_digest(data)
    (data / "linked").unlink()
    (data / "linked").symlink_to(tmp_path / "t2")
    assert A.folder_digest(data) != one
    assert _old_folder_digest(data) == old_one  # the old digest did not see the change


def test_finished_runs_are_reused_only_with_the_same_settings_and_data(tmp_path):
    """A rerun after a config or data change retrains instead of relabelling old numbers."""
    _write_data(tmp_path / "data")
    base = T.TrainConfig(
        data=T.DataConfig(path=str(tmp_path / "data")), batch_size=256, num_epochs=1.0, log_every=0,
        model=M.RankerConfig(mlp_dims=(8,), head_dims=(4,), num_cross_layers=1),
    )
    cfg = A.AblationConfig(base=base, seeds=(0,), variants=("no_large_tables",))
    logs = []

    def run(c, **kw):
        logs.clear()
        return A.run_ablation(c, tmp_path / "abl", pretrainers={}, log=logs.append, **kw)

    first = run(cfg)["variants"]["no_large_tables"]["ctr_auc_mean"]
    rdir = tmp_path / "abl" / "runs" / "no_large_tables_s0"
    (rdir / "history.jsonl").write_text('{"step": 1, "loss_ema": 9.0}\n')  # the report's export
    assert run(cfg)["variants"]["no_large_tables"]["ctr_auc_mean"] == first
    assert any("reusing" in s for s in logs)
    assert history.read_history(rdir) == [{"step": 1, "loss_ema": 9.0}]  # reused: kept
    # Other settings: retrained, and the numbers are the new run's.
    more = A.AblationConfig(base=dataclasses.replace(base, dense_learning_rate=0.05), seeds=(0,),
                            variants=("no_large_tables",))
    second = run(more)["variants"]["no_large_tables"]["ctr_auc_mean"]
    assert not any("reusing" in s for s in logs)
    assert any("had other settings or data" in s for s in logs)
    assert second != first
    assert not (rdir / "history.jsonl").exists()  # the retrained run's old curves are gone
    # Other data under the same path (a regenerated world): retrained.
    _write_data(tmp_path / "data", seed=1)
    run(more)
    assert not any("reusing" in s for s in logs)
    run(more)
    assert any("reusing" in s for s in logs)
    run(more, fresh=True)
    assert not any("reusing" in s for s in logs) and any("--fresh" in s for s in logs)
    # A metrics.json cut short (a run stopped while writing it): the run is not finished,
    # and is trained again. Was "Expecting property name enclosed in double quotes" on
    # every rerun, --fresh included.
    text = (rdir / "metrics.json").read_text()
    (rdir / "metrics.json").write_text(text[:100])
    again = run(more)["variants"]["no_large_tables"]["ctr_auc_mean"]
    assert not any("reusing" in s for s in logs) and logs[-1].startswith("ranker test:")
    assert json.loads((rdir / "metrics.json").read_text())["fingerprint"] == json.loads(text)["fingerprint"]
    assert not [p for p in rdir.iterdir() if ".tmp" in p.name] and again == pytest.approx(
        json.loads(text)["test"]["ctr_auc"], abs=1e-6)


def test_pretrained_facets_are_reused_only_under_the_same_key(tmp_path):
    calls = []

    def pretrain(window, out):
        calls.append(window)
        ids = {"user": 100 + np.arange(4), "pin": 500 + np.arange(3)}
        checkpoint.save_facet(out / "facet_cl", facet="cl", vocabs=ids,
                              tables={e: np.ones((len(v), 2), np.float32) for e, v in ids.items()})
        return out / "facet_cl"

    base = T.TrainConfig(data=T.DataConfig(path=str(tmp_path / "data")))
    cfg = A.AblationConfig(base=base, seeds=(0,), variants=("no_large_tables", "cl"))
    key = {"v": "a"}

    def obtain(**kw):
        kw.setdefault("pretrainers", {"cl": pretrain})
        return A.obtain_facets(cfg, tmp_path, log=lambda s: None,
                               pretrain_keys={"cl": lambda w: key["v"] + w}, **kw)

    obtain()
    obtain()
    assert calls == ["fresh"]  # same key: reused
    out = tmp_path / "pretrain" / "cl_fresh"
    (out / "history.jsonl").write_text('{"step": 1, "loss": 9.0}\n')  # the report's export
    obtain()
    assert (out / "history.jsonl").exists()
    key["v"] = "b"
    obtain()
    assert calls == ["fresh", "fresh"]  # changed key (command, config or data): redone
    assert not (out / "history.jsonl").exists()  # no curves of the previous pretraining
    obtain(fresh=True)
    assert len(calls) == 3
    # A key function may give older forms of the key after the current one: a facet
    # made under one of them is reused, and a new pretraining records the current one.
    A.obtain_facets(cfg, tmp_path, log=lambda s: None, pretrainers={"cl": pretrain},
                    pretrain_keys={"cl": lambda w: ("new" + w, "b" + w)})
    assert len(calls) == 3
    assert json.loads((out / "pretrain_key.json").read_text()) == {"key": "newfresh"}
    A.obtain_facets(cfg, tmp_path, log=lambda s: None, pretrainers={"cl": pretrain},
                    pretrain_keys={"cl": lambda w: ("newer" + w, "older" + w)})
    assert len(calls) == 4
    assert json.loads((out / "pretrain_key.json").read_text()) == {"key": "newerfresh"}
    key["v"] = "c"
    with pytest.raises(ValueError, match="made with other settings.*no pretrainer"):
        obtain(pretrainers={})
    # A pretrain_key.json cut short (stopped while writing it): redone, not an error.
    (out / "pretrain_key.json").write_text('{"key": ')
    obtain()
    assert len(calls) == 5 and json.loads((out / "pretrain_key.json").read_text()) == {"key": "cfresh"}


def test_a_given_facet_dir_of_another_facet_is_refused(tmp_path):
    """facet_dirs cl/fresh pointing at a KG facet must not be trained as "+ contrastive"."""
    ids = {"user": 100 + np.arange(4)}
    checkpoint.save_facet(tmp_path / "facet_kg", facet="kg", vocabs=ids,
                          tables={"user": np.ones((4, 2), np.float32)})
    base = T.TrainConfig(data=T.DataConfig(path=str(tmp_path / "data")))
    cfg = A.AblationConfig(base=base, seeds=(0,), variants=("no_large_tables", "cl"),
                           facet_dirs=(("cl/fresh", str(tmp_path / "facet_kg")),))
    with pytest.raises(ValueError, match=r"facet_kg is a 'kg' facet checkpoint, but a 'cl' "
                       r"facet was expected"):
        A.obtain_facets(cfg, tmp_path, pretrainers={}, log=lambda s: None)
    cfg = dataclasses.replace(cfg, facet_dirs=(("kg/fresh", str(tmp_path / "facet_kg")),),
                              variants=("no_large_tables", "kg"))
    loaded, _ = A.obtain_facets(cfg, tmp_path, pretrainers={}, log=lambda s: None)
    assert loaded[("kg", "fresh")].facet == "kg"


def _golden_config(**kw):
    """The run whose fingerprints are pinned below."""
    from jax_recsys.ranking import facets as F

    ents = F.build_entities(entities=(("user", "user_id"), ("pin", "item_id")), scratch_dim=4,
                            pretrained=("cl", "kg"), mode="freeze", **kw)
    return T.TrainConfig(data=T.DataConfig(path="/data/world"), entities=ents,
                         model=M.RankerConfig(mlp_dims=(16,)), batch_size=256, seed=3)


def test_fingerprints_leave_out_the_missing_rows_option_at_its_default():
    """Finished ablation runs and ranker checkpoints made before `FacetSpec.missing` existed
    keep their fingerprints when it is left at "random"; "zeros" is another run."""
    import hashlib

    config = _golden_config

    def digests(tc):
        run = json.dumps(T.run_fingerprint(tc, {}), sort_keys=True)
        return (A._digest({"train_config": T.fingerprint_dict(tc)}),
                hashlib.sha256(run.encode()).hexdigest()[:16])

    # Computed with the code before the option (ablation.py hashed dataclasses.asdict(tc)).
    # A change here means every finished run and checkpoint is retrained, not reused.
    before = ("8b040e8be588494d", "9bac4099cbc1bf00")
    assert digests(config()) == before
    assert digests(config(missing="random")) == before
    zeros = digests(config(missing="zeros"))
    assert zeros[0] != before[0] and zeros[1] != before[1]
    spec = config(missing="zeros").entities[0].facets[1]
    assert spec.fingerprint_dict()["missing"] == "zeros"
    assert "missing" not in dataclasses.replace(spec, missing="random").fingerprint_dict()


def test_fingerprints_leave_out_the_rankers_time_columns_at_their_defaults():
    """DataConfig.day_column / timestamp_column (added so a user's own time column can be
    named) keep the fingerprints pinned above at "day" / "timestamp"; another is another run."""
    import hashlib

    def digests(**data):
        tc = _golden_config()
        tc = dataclasses.replace(tc, data=dataclasses.replace(tc.data, **data))
        run = json.dumps(T.run_fingerprint(tc, {}), sort_keys=True)
        return (A._digest({"train_config": T.fingerprint_dict(tc)}),
                hashlib.sha256(run.encode()).hexdigest()[:16])

    before = ("8b040e8be588494d", "9bac4099cbc1bf00")
    assert digests(day_column="day", timestamp_column="timestamp") == before
    for other in ({"day_column": "date"}, {"timestamp_column": "ts"}):
        got = digests(**other)
        assert got[0] != before[0] and got[1] != before[1], other


def test_run_fingerprints_hold_the_data_by_content_and_accept_the_form_with_its_path():
    tc = _golden_config()
    facets = {"cl/fresh": "0123456789abcdef", "kg/fresh": "fedcba9876543210"}
    forms = A.run_fingerprints(tc, facets=facets, data="00aa11bb22cc33dd", saved_ranker=True,
                               data_paths=["/data/world", "/old/world"])
    # A change of either value means finished runs are retrained, not reused.
    assert forms[0] == "819e6e13a302bb67"
    # The fingerprint until 2026-11-27 (the whole TrainConfig, its data.path as given),
    # for each path: still accepted. The pinned value is the code's of then.
    until_2026_11_27 = [A._digest({"train_config": T.fingerprint_dict(dataclasses.replace(
        tc, data=dataclasses.replace(tc.data, path=p))), "facets": facets,
        "data": "00aa11bb22cc33dd", "saved_ranker": True}) for p in ("/data/world", "/old/world")]
    assert forms[1:] == until_2026_11_27 and forms[1] == "242a6968c89318b6"
    # The new form does not depend on where the data is, only on what it is.
    for path in ("/elsewhere/world", "world"):
        moved = dataclasses.replace(tc, data=dataclasses.replace(tc.data, path=path))
        assert A.run_fingerprints(moved, facets=facets, data="00aa11bb22cc33dd",
                                  saved_ranker=True) == [forms[0]]
    assert A.run_fingerprints(tc, facets=facets, data="00aa11bb22cc33de", saved_ranker=True) != [forms[0]]
    assert A.run_fingerprints(dataclasses.replace(tc, seed=4), facets=facets,
                              data="00aa11bb22cc33dd", saved_ranker=True) != [forms[0]]


# ----------------------------------------------------------------------------- moved folders

_PRETRAIN = {"cl_config": "configs/contrastive.py:smoke", "kg_config": "configs/kg.py:smoke",
             "cl_flags": "--config.train.eval_every=100", "kg_flags": "--config.model.model=transe"}


class _Pipeline:
    """A pipeline folder ROOT (ROOT/world, ROOT/ablation) ablated the way `launch.run_ablation`
    wires it (its pretraining keys), with fake pretraining and training that count calls."""

    def __init__(self, monkeypatch):
        self.pretrained, self.trained, self.logs = [], [], []
        monkeypatch.setattr(A.train_lib, "train_and_evaluate", self._train)

    def _train(self, tc, workdir, *, data, facets, log):
        self.trained.append(tc)
        m = {f"{t}_{k}": 0.6 + 0.01 * (len(self.trained) % 7) for t in A.TASKS
             for k in ("auc", "ne", "log_loss")}
        return {"test": m, "facets": [], "ranker": None}

    def run(self, root, **kw):
        from launch import run_ablation

        data, abl = str(root / "world"), root / "ablation"
        self.logs.clear()
        base = T.TrainConfig(data=T.DataConfig(path=data), batch_size=256, log_every=0)
        cfg = A.AblationConfig(base=base, scratch_dim=4, seeds=(0,), save_ranker_variants=())
        keys = run_ablation.pretrain_keys(ml_collections.ConfigDict(_PRETRAIN), data, abl)
        pretrainers = {f: _fake_pretrainer(f, self.pretrained) for f in ("cl", "kg")}
        return A.run_ablation(cfg, abl, pretrainers=pretrainers, log=self.logs.append,
                              pretrain_keys=keys, **kw)

    def counts(self):
        return len(self.pretrained), len(self.trained)

    def retrained(self):
        return [s for s in self.logs if "had other settings or data" in s or "pretraining" in s]


def _keys(abl):
    """Every pretraining key and run fingerprint in ablation folder ``abl``."""
    return ({p.parent.name: json.loads(p.read_text())["key"] for p in abl.glob("pretrain/*/pretrain_key.json")},
            {p.parent.name: json.loads(p.read_text())["fingerprint"] for p in abl.glob("runs/*/metrics.json")})


def test_a_moved_ablation_folder_reuses_its_pretraining_and_runs(tmp_path, monkeypatch):
    pipe = _Pipeline(monkeypatch)
    _write_data(tmp_path / "a" / "world")
    pipe.run(tmp_path / "a")
    assert pipe.counts() == (4, 7)
    keys = _keys(tmp_path / "a" / "ablation")
    assert len(keys[0]) == 4 and len(keys[1]) == 7
    assert str(tmp_path) not in json.dumps(keys)  # the data's path is not in them
    # `mv runs/a runs/b` (world and ablation together): nothing is redone.
    shutil.move(tmp_path / "a", tmp_path / "b")
    res = pipe.run(tmp_path / "b")
    assert pipe.counts() == (4, 7) and pipe.retrained() == [], pipe.logs
    assert sum("reusing" in s for s in pipe.logs) == 4 + 7
    assert _keys(tmp_path / "b" / "ablation") == keys
    assert res["data_path"] == str(tmp_path / "b" / "world")
    # The data really changed (regenerated in place): everything is redone.
    _write_data(tmp_path / "b" / "world", seed=1)
    pipe.run(tmp_path / "b")
    assert pipe.counts() == (8, 14)
    assert sum("its settings or data changed" in s for s in pipe.logs) == 4
    assert sum("had other settings or data" in s for s in pipe.logs) == 7


def _key_forms_until_2026_11_27(pipe, abl, path, data=None):
    """The pretraining keys and run fingerprints the ablation in ``abl`` got until
    2026-11-27, with the data (``data``, default ``path``) given as ``path`` (held in
    the keys): the CL pretraining's command held --config.data.path, a run's
    fingerprint the whole TrainConfig."""
    from launch import pipeline_stages

    digest = A.folder_digest(data or path)
    flags = _PRETRAIN["cl_flags"].split()
    config = {"resolved_config": pipeline_stages.config_fingerprint(_PRETRAIN["cl_config"])}
    keys = {f"cl_{w}": json.dumps(["launch.pretrain_contrastive", _PRETRAIN["cl_config"],
                                   [f"--config.data.path={path}", f"--config.data.window={w}", *flags],
                                   config, digest]) for w in ("fresh", "stale")}
    # Before that, the config file's bytes instead of its resolved content.
    keys["cl_stale"] = keys["cl_stale"].replace(
        json.dumps(config), json.dumps(fsutil.file_digest(REPO / "configs" / "contrastive.py")))
    facet = lambda f, w: fsutil.file_digest(abl / "pretrain" / f"{f}_{w}" / f"facet_{f}" / "facet.json")  # noqa: E731
    runs = {}
    for tc, v in zip(pipe.trained[-7:], A.DEFAULT_VARIANTS, strict=True):
        tc = dataclasses.replace(tc, data=dataclasses.replace(tc.data, path=str(path)))
        runs[f"{v.name}_s0"] = A._digest({
            "train_config": T.fingerprint_dict(tc), "data": digest, "saved_ranker": False,
            "facets": {f"{f}/{v.window}": facet(f, v.window) for f in v.facets}})
    return keys, runs


def _write_keys(abl, keys, runs):
    for name, key in keys.items():
        (abl / "pretrain" / name / "pretrain_key.json").write_text(json.dumps({"key": key}))
    for name, fingerprint in runs.items():
        mpath = abl / "runs" / name / "metrics.json"
        mpath.write_text(json.dumps({**json.loads(mpath.read_text()), "fingerprint": fingerprint}))


def test_keys_holding_the_data_path_are_still_accepted_and_rewritten(tmp_path, monkeypatch):
    pipe = _Pipeline(monkeypatch)
    _write_data(tmp_path / "a" / "world")
    pipe.run(tmp_path / "a")
    abl = tmp_path / "a" / "ablation"
    new = _keys(abl)
    # The folder as the code until 2026-11-27 left it, then moved: the old path is in
    # its keys and in ablation.json only.
    old = _key_forms_until_2026_11_27(pipe, abl, tmp_path / "a" / "world")
    _write_keys(abl, *old)
    assert _keys(abl)[1] != new[1] and _keys(abl)[0]["cl_fresh"] != new[0]["cl_fresh"]
    shutil.move(tmp_path / "a", tmp_path / "b")
    abl = tmp_path / "b" / "ablation"
    (abl / "ablation.json").unlink()  # as run_pipeline does before it reruns the stage
    pipe.run(tmp_path / "b")
    assert pipe.counts() == (4, 7) and pipe.retrained() == [], pipe.logs
    assert _keys(abl) == new  # rewritten in the new form
    # Made in place and never finished (no report): this run's path is the old one.
    _write_keys(abl, *_key_forms_until_2026_11_27(pipe, abl, tmp_path / "b" / "world"))
    (abl / "ablation.json").unlink()
    (abl / "metrics.json").unlink()
    pipe.run(tmp_path / "b")
    assert pipe.counts() == (4, 7) and pipe.retrained() == [], pipe.logs
    assert _keys(abl) == new
    # Old keys of another path than either (the folder this was copied from is not
    # known): not taken for this data's, redone.
    _write_keys(abl, *_key_forms_until_2026_11_27(pipe, abl, tmp_path / "c" / "world",
                                                  data=tmp_path / "b" / "world"))
    pipe.run(tmp_path / "b")
    assert pipe.counts() == (6, 14)  # the two CL pretrainings (KG keys never held the path)
    # Old keys of this path, but the data changed since: redone.
    _write_keys(abl, *_key_forms_until_2026_11_27(pipe, abl, tmp_path / "b" / "world"))
    _write_data(tmp_path / "b" / "world", seed=1)
    pipe.run(tmp_path / "b")
    assert pipe.counts() == (10, 21)


def test_a_damaged_run_metrics_json_is_retrained_with_a_line_naming_it(tmp_path, monkeypatch):
    # A run whose metrics.json kept its fingerprint but lost a test metric (or holds
    # "NaN" strings) stopped the ablation (KeyError: 'ctr_auc'; TypeError: must be real
    # number, not str); a cut-short one was retrained without a word why.
    pipe = _Pipeline(monkeypatch)
    _write_data(tmp_path / "world")
    pipe.run(tmp_path)
    runs = tmp_path / "ablation" / "runs"
    m = json.loads((runs / "kg_s0" / "metrics.json").read_text())
    (runs / "cl_s0" / "metrics.json").write_text('{"test": {"ctr_auc": 0.6')
    (runs / "kg_s0" / "metrics.json").write_text(json.dumps(
        {**m, "test": {k: "NaN" if k == "cvr_auc" else v for k, v in m["test"].items()}}))
    (runs / "scratch_s0" / "metrics.json").write_text(json.dumps(
        {**m, "test": {k: v for k, v in m["test"].items() if k != "ctr_auc"}}))
    res = pipe.run(tmp_path)
    assert pipe.counts() == (4, 10)  # those three runs, nothing else
    assert sum("reusing" in s and "runs" in s for s in pipe.logs) == 4
    assert [s for s in pipe.logs if s.endswith("; retrained)")] == [
        f"ablation: large tables from scratch (seed 0) ({runs / 'scratch_s0' / 'metrics.json'} "
        "is damaged: its test metrics lack ctr_auc; retrained)",
        f"ablation: + contrastive facet (seed 0) ({runs / 'cl_s0' / 'metrics.json'} is cut "
        "short or not a JSON object; retrained)",
        f"ablation: + knowledge-graph facet (seed 0) ({runs / 'kg_s0' / 'metrics.json'} is "
        "damaged: its test metrics cvr_auc='NaN' are not numbers; retrained)"]
    assert all(math.isfinite(res["variants"][n]["cvr_auc_mean"]) for n in res["order"])
    assert json.loads((runs / "kg_s0" / "metrics.json").read_text())["test"]["cvr_auc"] != "NaN"


def test_pretrainers_run_in_the_current_folder_with_their_config_made_absolute(
        tmp_path, monkeypatch):
    # They ran in the checkout: --config.pretrain.cl_config=my_cl.py:smoke given in another
    # folder ended "No such file or directory: 'my_cl.py'", a changed copy of
    # configs/contrastive.py there was silently passed over for the checkout's, and
    # "--config.data.path=mydata" in cl_flags ended "mydata: dataset folder not found".
    from launch import run_ablation

    calls = []
    monkeypatch.setattr(run_ablation.subprocess, "run", lambda cmd, **kw: calls.append((cmd, kw)))
    monkeypatch.chdir(tmp_path)
    shutil.copy(REPO / "configs" / "contrastive.py", tmp_path / "my_cl.py")
    run_ablation._run("launch.pretrain_contrastive", "my_cl.py:smoke", pathlib.Path("out"),
                      ["--config.data.path=mydata"], 60)
    run_ablation._run("launch.pretrain_kg", "configs/kg.py:smoke", tmp_path / "kg", [], 60)
    assert calls == [
        ([sys.executable, "-m", "launch.pretrain_contrastive", f"--config={tmp_path}/my_cl.py:smoke",
          f"--workdir={tmp_path}/out", "--config.data.path=mydata"], {"check": True, "timeout": 60}),
        ([sys.executable, "-m", "launch.pretrain_kg", f"--config={REPO}/configs/kg.py:smoke",
          f"--workdir={tmp_path}/kg"], {"check": True, "timeout": 60})]


def test_pretrain_keys_hold_a_relative_config_as_given_and_its_content_from_the_current_folder(
        tmp_path, monkeypatch):
    # The key's resolved config of my_cl.py:smoke was that of the checkout's my_cl.py:
    # "missing", whatever the file given held.
    from launch import pipeline_stages, run_ablation

    _write_data(tmp_path / "a" / "world")
    shutil.copytree(tmp_path / "a" / "world", tmp_path / "b" / "world")  # mtimes kept
    for d in ("a", "b"):
        shutil.copy(REPO / "configs" / "contrastive.py", tmp_path / d / "my_cl.py")
    p = ml_collections.ConfigDict({**_PRETRAIN, "cl_config": "my_cl.py:smoke"})

    def key(root):
        monkeypatch.chdir(root)
        return run_ablation.pretrain_keys(p, str(root / "world"), root / "ablation")["cl"]("fresh")[0]

    a = key(tmp_path / "a")
    assert json.loads(a)[1:4] == ["my_cl.py:smoke", ["--config.data.window=fresh", *_PRETRAIN["cl_flags"].split()],
                                  {"resolved_config": pipeline_stages.config_fingerprint(
                                      f"{REPO}/configs/contrastive.py:smoke")}]
    assert key(tmp_path / "b") == a  # the folder moved, its config with it
    cl = tmp_path / "b" / "my_cl.py"
    cl.write_text(cl.read_text().replace("c.model.dim = 16 if smoke", "c.model.dim = 8 if smoke"))
    assert key(tmp_path / "b") != a


def test_missing_pretrain_configs_and_facet_dirs_are_named_before_anything_runs(
        tmp_path, monkeypatch):
    from launch import run_ablation

    monkeypatch.chdir(tmp_path)
    checkpoint.save_facet(tmp_path / "f", facet="cl", tables={"user": np.zeros((2, 4), np.float32)},
                          vocabs={"user": np.arange(2)})
    dirs = run_ablation._facet_dirs(ml_collections.ConfigDict(
        {"cl_fresh": "f", "cl_stale": "", "kg_fresh": "", "kg_stale": ""}))
    assert dirs == (("cl/fresh", str(tmp_path / "f")),)  # absolute, as ablation.json records it
    with pytest.raises(ValueError) as e:
        run_ablation._facet_dirs(ml_collections.ConfigDict({"kg_stale": "g"}))
    assert str(e.value) == f"facet_dirs.kg_stale=g: {tmp_path / 'g'} is not a facet checkpoint (no facet.json)"
    p = ml_collections.ConfigDict({**_PRETRAIN, "cl_config": "my_cl.py", "kg_config": "my_kg.py:smoke"})
    base = T.TrainConfig(data=T.DataConfig(path=""), batch_size=256)
    cfg = A.AblationConfig(base=base, variants=("no_large_tables", "cl", "kg"), facet_dirs=dirs)
    with pytest.raises(FileNotFoundError) as e:
        run_ablation._check_pretrain_configs(p, cfg)  # cl/fresh is given: its config is not read
    assert str(e.value) == (
        f"pretrain.kg_config='my_kg.py:smoke': config file my_kg.py not found in the current "
        f"folder ({tmp_path}) nor in the checkout ({REPO})")
    shutil.copy(REPO / "configs" / "kg.py", tmp_path / "my_kg.py")
    run_ablation._check_pretrain_configs(p, cfg)


@pytest.mark.slow  # ~30-60 s: one contrastive pretraining and two ranker runs, real processes
def test_run_ablation_with_relative_paths_from_another_folder(tmp_path):
    # Its pretrainers ran in the checkout: --workdir=abl from elsewhere put the facet into
    # the checkout's abl/ and ended "abl/pretrain/cl_fresh/facet_cl is not a facet
    # checkpoint"; --config.ranker.data.path=mydata was read against the checkout too,
    # and ablation.json recorded it relative, for export_int4 to read against its own;
    # --config.pretrain.cl_config=my_cl.py:smoke was not found there.
    import subprocess
    import sys

    import mp_util

    here = tmp_path / "elsewhere"
    _write_data(here / "mydata")
    rng = np.random.default_rng(1)
    t = folder.write_table(here / "mydata", "engagements", {
        "user_id": (100 + rng.integers(0, 32, 600)).astype(np.int64),
        "item_id": (500 + rng.integers(0, 24, 600)).astype(np.int64),
        "day": np.repeat(np.arange(3), 200).astype(np.int32)})
    meta = json.loads((here / "mydata" / "dataset.json").read_text())
    meta["tables"]["engagements"] = t
    meta["splits"]["fresh_pretrain"] = [0, 2]
    (here / "mydata" / "dataset.json").write_text(json.dumps(meta))
    cl = (REPO / "configs" / "contrastive.py").read_text()
    (here / "my_cl.py").write_text(cl.replace("c.model.dim = 16 if smoke", "c.model.dim = 8 if smoke"))
    proc = subprocess.run(
        [sys.executable, "-m", "launch.run_ablation",
         f"--config={mp_util.REPO}/configs/ablation.py:smoke", "--config.ranker.data.path=mydata",
         "--workdir=abl", "--config.variants=no_large_tables,cl", "--config.seeds=0",
         "--config.ranker.entities=user:user_id,pin:item_id",
         "--config.pretrain.cl_flags=--config.train.max_steps=1",
         "--config.pretrain.cl_config=my_cl.py:smoke"],
        cwd=here, env=mp_util.child_env(1), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    facet = json.loads((here / "abl" / "pretrain" / "cl_fresh" / "facet_cl" / "facet.json").read_text())
    assert {t: v["dim"] for t, v in facet["tables"].items()} == {"pin": 8, "user": 8}  # my_cl.py's
    assert not (mp_util.REPO / "abl").exists()
    result = json.loads((here / "abl" / "ablation.json").read_text())
    assert result["data"]["path"] == str(here / "mydata")
    assert set(result["variants"]) == {"no_large_tables", "cl"}


def test_the_stale_kg_world_leaves_jaxs_backend_unstarted(tmp_path):
    # run_ablation's own process makes the stale-KG world between its pretrainers, which
    # run as children: its stamp was written with common.write_json, whose process-0
    # check (jax.process_index()) started JAX's backend (on a GPU: 75% of its memory,
    # XLA's preallocation) just before the stale KG's pretrain_kg child needed the device.
    data, out = tmp_path / "data", tmp_path / "stale"
    code = (
        "import pathlib, sys\n"
        "from jax_recsys.data import world\n"
        "from launch import run_ablation\n"
        "cfg = world.days_override(world.scale_config(\n"
        "    'smoke', engagements_per_day=3_000, conversions_per_day=300,\n"
        "    impressions_per_day=1_000), 6)\n"
        f"data, out = pathlib.Path({str(data)!r}), pathlib.Path({str(out)!r})\n"
        "world.generate_world(cfg, data, progress=False)\n"
        "print(run_ablation._stale_kg_world(str(data), out) == str(out))\n"
        "from jax._src import xla_bridge\n"
        "print(xla_bridge.backends_are_initialized())\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines() == ["True", "False"]
    stamp = json.loads((out / "source_dataset.json").read_text())
    assert stamp["source"] == str(data) and len(stamp["digest"]) > 8


def test_run_ablation_generates_its_world_without_starting_jaxs_backend(tmp_path):
    # With an empty data path (configs/ablation.py:smoke as documented) run_ablation's own
    # process writes WORKDIR/world; common.generated_world asked jax.process_index()
    # whether it is process 0, which started JAX's backend (on a GPU: 75% of its memory)
    # before every pretrainer, each a child process that needs the device.
    code = (
        "from absl import flags\n"
        "from jax._src import xla_bridge\n"
        "from launch import run_ablation\n"
        "run_ablation._define_flags()\n"
        "def pretrainer(module, config, out, extra, timeout_s):\n"
        "    print(module, xla_bridge.backends_are_initialized(), flush=True)\n"
        "    raise SystemExit(0)\n"
        "run_ablation._run = pretrainer\n"
        "flags.FLAGS(['run_ablation', '--config=configs/ablation.py:smoke',\n"
        f"             '--workdir={tmp_path}'])\n"
        "run_ablation.main([])\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines() == ["launch.pretrain_contrastive False"]
    assert (tmp_path / "world" / "dataset.json").exists()
