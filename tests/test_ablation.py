"""Ablation runner: shared pretraining, every variant x seed, report arithmetic, the INT4 hook."""

import dataclasses
import json
import math

import numpy as np
import pytest

from jax_recsys import checkpoint, history
from jax_recsys.data import folder
from jax_recsys.ranking import ablation as A, model as M, train as T


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


def test_config_rejects_unknown_variants():
    base = T.TrainConfig(data=T.DataConfig(path="nowhere"))
    with pytest.raises(ValueError, match="unknown ablation variants"):
        A.AblationConfig(base=base, variants=("no_large_tables", "magic"))
    with pytest.raises(ValueError, match="baseline"):
        A.AblationConfig(base=base, variants=("scratch",))


def test_config_rejects_a_repeated_seed():
    # seeds=(3, 3, 3) used to train one run and report its "± 0.0000" over three seeds.
    base = T.TrainConfig(data=T.DataConfig(path="nowhere"))
    with pytest.raises(ValueError, match=r"seeds lists a seed twice: \[3, 3, 3\]"):
        A.AblationConfig(base=base, seeds=(3, 3, 3))
    assert A.AblationConfig(base=base, seeds=(3, 1)).seeds == (3, 1)


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


@pytest.mark.slow
def test_ablation_runs_every_variant_and_shares_pretraining(tmp_path):
    _write_data(tmp_path / "data")
    calls = []

    def fake_pretrainer(facet):
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


def test_fingerprints_leave_out_the_missing_rows_option_at_its_default():
    """Finished ablation runs and ranker checkpoints made before `FacetSpec.missing` existed
    keep their fingerprints when it is left at "random"; "zeros" is another run."""
    import hashlib

    from jax_recsys.ranking import facets as F

    def config(**kw):
        ents = F.build_entities(entities=(("user", "user_id"), ("pin", "item_id")), scratch_dim=4,
                                pretrained=("cl", "kg"), mode="freeze", **kw)
        return T.TrainConfig(data=T.DataConfig(path="/data/world"), entities=ents,
                             model=M.RankerConfig(mlp_dims=(16,)), batch_size=256, seed=3)

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
