"""INT4 export: gate, artifact round trip, exact size arithmetic, the ablation's INT4 row."""

import dataclasses
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import types
import warnings

import jax
import numpy as np
import pytest

from jax_recsys import metrics
from jax_recsys.data import folder
from jax_recsys.quant import artifact as AR, export as X, rowwise
from jax_recsys.ranking import ablation as A, facets as F, model as M, train as T

REPO = pathlib.Path(__file__).resolve().parents[1]
NUM_USERS, NUM_PINS, DIM = 48, 40, 5  # odd dim: exercises the INT4 pad nibble


def _write_world(path, n=6144, seed=0):
    """Impressions whose click depends on a planted user x pin parity affinity."""
    rng = np.random.default_rng(seed)
    user_raw = 1000 + np.arange(NUM_USERS) * 3
    pin_raw = 50 + np.arange(NUM_PINS) * 7
    u = rng.integers(0, NUM_USERS, n)
    p = rng.integers(0, NUM_PINS, n)
    hour = rng.integers(0, 4, n)
    logit = -2.0 + 3.0 * ((u % 2) == (p % 2)) + 0.3 * hour
    click = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.int8)
    conversion = (click * (rng.random(n) < np.where(u % 3 == 0, 0.7, 0.1))).astype(np.int8)
    day = np.repeat(np.arange(6), n // 6).astype(np.int32)
    t = folder.write_table(
        path,
        "impressions",
        {
            "user_id": user_raw[u].astype(np.int64),
            "item_id": pin_raw[p].astype(np.int64),
            "day": day,
            "timestamp": day.astype(np.int64) * 86400,
            "click": click,
            "conversion": conversion,
            "hour": hour.astype(np.int64),
        },
    )
    folder.write_dataset_json(
        path,
        name="tiny",
        tables={"impressions": t},
        num_days=6,
        splits={"ranker_train": [0, 4], "ranker_valid": [4, 5], "ranker_test": [5, 6]},
    )


@dataclasses.dataclass
class Trained:
    data: pathlib.Path
    run: pathlib.Path
    ranker_dir: pathlib.Path
    test_metrics: dict


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny trained ranker (user + pin scratch tables), saved as launch.train_ranker does."""
    root = tmp_path_factory.mktemp("export")
    _write_world(root / "data")
    ents = tuple(
        F.EntitySpec(name=n, column=c, facets=(F.FacetSpec(source="scratch", dim=DIM),))
        for n, c in (("user", "user_id"), ("pin", "item_id"))
    )
    cfg = T.TrainConfig(
        data=T.DataConfig(path=str(root / "data")),
        entities=ents,
        batch_size=256,
        num_epochs=4.0,
        log_every=0,
        dense_learning_rate=1e-2,
        table_learning_rate=0.3,
        model=M.RankerConfig(mlp_dims=(16,), head_dims=(8,), num_cross_layers=1),
    )
    # One device: the export does not care how the ranker was trained; compiles faster.
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    res = T.train_and_evaluate(cfg, root / "run", log=lambda s: None, mesh=mesh)
    # Record the data the way launch.train_ranker does (metrics.json "config").
    meta = json.loads((root / "run" / "metrics.json").read_text())
    meta["config"] = {
        "data": {
            "path": str(root / "data"),
            "world_config": "smoke",
            "table": "impressions",
            "train_window": "ranker_train",
            "valid_window": "ranker_valid",
            "test_window": "ranker_test",
            "click_column": "click",
            "conversion_column": "conversion",
            "coarse_features": "",
            "max_train_examples": 0,
        }
    }
    (root / "run" / "metrics.json").write_text(json.dumps(meta))
    return Trained(
        data=root / "data",
        run=root / "run",
        ranker_dir=root / "run" / "ranker",
        test_metrics=res["test"],
    )


def _leftovers(parent: pathlib.Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_export_passes_the_gate_and_the_artifact_serves_the_evaluated_tables(trained, tmp_path):
    out = tmp_path / "art"
    rep = X.export_ranker(
        X.ExportConfig(ranker_dir=str(trained.ranker_dir), out_dir=str(out)), log=lambda s: None
    )
    assert rep["gate"]["passed"] and rep["gate"]["failed_tasks"] == []
    art = AR.load_artifact(out, verify=True)  # full sha256 pass
    assert art.version == rep["version"] and len(art.version) == 16
    ranker = M.load_ranker(trained.ranker_dir)
    assert sorted(art.tables) == ["pin", "user"]
    for ent, t in ranker.tables.items():
        q = art.tables[ent]
        assert (q.bits, q.num_rows, q.dim) == (4, t.shape[0], DIM)
        assert q.codes.shape == (t.shape[0], 3) and q.scale.dtype == np.float16
        want = rowwise.quantize_rows(np.asarray(t), bits=4)
        np.testing.assert_array_equal(q.codes, want.codes)
        np.testing.assert_array_equal(art.vocabs[ent], ranker.vocabs[ent])
        # Every element within half a quantization step of the trained value.
        err = np.abs(rowwise.dequantize_rows(q) - np.asarray(t))
        assert np.all(err <= q.scale.astype(np.float32)[:, None] / 2 + 1e-6)
        assert rep["quant_error"][ent]["max_abs_error"] == pytest.approx(float(err.max()), rel=1e-6)
        assert rep["quant_error"][ent]["max_error_in_half_steps"] <= 1.0 + 1e-4
    # Ranker config and params round-trip; the config is RankerConfig.to_dict() plus extras.
    assert M.RankerConfig.from_dict(art.ranker_config) == ranker.config
    assert art.ranker_config["entity_columns"] == {"user": "user_id", "pin": "item_id"}
    assert set(art.ranker_params) == set(ranker.params)
    for k, v in ranker.params.items():
        np.testing.assert_array_equal(art.ranker_params[k], v)
    # The full-precision numbers equal the trainer's own test evaluation; the quantized
    # ones are what the served artifact gives.
    q = rep["quality"]
    for task in X.TASKS:
        assert q[task]["auc_full"] == pytest.approx(trained.test_metrics[f"{task}_auc"], abs=1e-9)
        assert q[task]["auc_delta"] == pytest.approx(q[task]["auc_quant"] - q[task]["auc_full"])
        assert rep["gate"]["auc_drop"][task] == pytest.approx(-q[task]["auc_delta"])
        assert rep["gate"]["auc_drop"][task] <= 1e-3
        assert 0 <= q[task]["auc_delta_se"] < 0.05
    split, window = X.load_test_split(ranker, X.resolve_data_config(trained.ranker_dir, ranker))
    assert window == (5, 6) and rep["num_test_examples"] == len(split["click"]) == 1024
    served = T.evaluate_ranker(
        ranker, split, tables={e: art.lookup(e, np.arange(len(v))) for e, v in art.vocabs.items()}
    )
    assert served["ctr_auc"] == pytest.approx(q["ctr"]["auc_quant"], abs=1e-9)
    assert served["cvr_log_loss"] == pytest.approx(q["cvr"]["log_loss_quant"], rel=1e-6)
    # The report is next to the artifact and in the manifest; nothing else is left behind.
    on_disk = json.loads((tmp_path / X.REPORT_NAME).read_text())
    assert on_disk["version"] == art.version and on_disk["quality"] == json.loads(json.dumps(q))
    assert art.manifest.report["gate"]["passed"] is True
    assert on_disk["artifact_bytes"] == sum(
        f.stat().st_size for f in out.rglob("*") if f.is_file() and f.name != "manifest.json"
    )
    assert _leftovers(tmp_path) == []
    text = X.format_report(rep)
    assert "gate: PASSED" in text and "user" in text and art.version in text
    # Exporting the same ranker again gives the same version (content-derived).
    again = X.export_ranker(
        X.ExportConfig(ranker_dir=str(trained.ranker_dir), out_dir=str(out)), log=lambda s: None
    )
    assert again["version"] == rep["version"]


def test_size_report_arithmetic_is_exact(trained, tmp_path):
    rep = X.export_ranker(
        X.ExportConfig(
            ranker_dir=str(trained.ranker_dir), out_dir=str(tmp_path / "a"), max_auc_drop=1.0
        ),
        log=lambda s: None,
    )
    users = len(M.load_ranker(trained.ranker_dir).vocabs["user"])
    assert users == NUM_USERS
    u = rep["sizes"]["tables"]["user"]
    # dim 5 -> 3 packed bytes + fp16 scale (2) + fp16 bias (2) = 7 bytes per row.
    assert (u["bytes"], u["fp32_bytes"], u["fp16_bytes"]) == (48 * 7, 48 * 20, 48 * 10)
    assert u["ratio_vs_fp32"] == pytest.approx(7 / 20) and u["ratio_vs_fp16"] == pytest.approx(0.7)
    tot = rep["sizes"]["total"]
    assert tot["bytes"] == (48 + 40) * 7 and tot["ratio_vs_fp32"] == pytest.approx(0.35)
    # Payload on disk: codes/scale/bias files are the payload plus one .npy header each.
    art = AR.load_artifact(tmp_path / "a")
    assert art.tables["user"].nbytes == u["bytes"]


def test_export_of_an_entity_named_like_a_graph_entity_type(trained, tmp_path):
    """An entity named like a Freebase type ('/people/person') could not be saved by
    save_ranker (FileNotFoundError), staged by the export (its files were built from the
    name) nor written by write_artifact (refused as 'not a safe file name')."""
    r = M.load_ranker(trained.ranker_dir, mmap=False)
    ent = "/people/person"
    ren = lambda k: ent if k == "user" else k  # noqa: E731
    renamed = M.TrainedRanker(
        config=dataclasses.replace(
            r.config, entity_dims=tuple((ren(n), d) for n, d in r.config.entity_dims)),
        params={k.replace("norms/user/", f"norms/{ent}/"): v for k, v in r.params.items()},
        tables={ren(k): v for k, v in r.tables.items()},
        vocabs={ren(k): v for k, v in r.vocabs.items()},
        entity_columns={ren(k): v for k, v in r.entity_columns.items()},
        facet_layout={ren(k): v for k, v in r.facet_layout.items()},
    )
    (tmp_path / "run").mkdir()
    shutil.copy(trained.run / "metrics.json", tmp_path / "run" / "metrics.json")
    M.save_ranker(tmp_path / "run" / "ranker", renamed)
    rep = X.export_ranker(
        X.ExportConfig(ranker_dir=str(tmp_path / "run" / "ranker"), out_dir=str(tmp_path / "art")),
        log=lambda s: None,
    )
    assert rep["gate"]["passed"] and sorted(rep["sizes"]["tables"]) == [ent, "pin"]
    art = AR.load_artifact(tmp_path / "art")
    want = rowwise.quantize_rows(np.asarray(r.tables["user"]), bits=4)
    np.testing.assert_array_equal(art.tables[ent].codes, want.codes)
    np.testing.assert_array_equal(art.vocabs[ent], r.vocabs["user"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art", X.REPORT_NAME, "run"]


def test_a_table_float16_cannot_hold_is_named_and_exports_with_a_float32_scale(
        trained, tmp_path):
    """A ranker value beyond +-65504 stopped the export with 'row 3 has |x| > 65504.0
    which float16 bias cannot hold; use scale_dtype=np.float32', naming no table (nor
    the NaN row of 'row 7 holds a non-finite value'), and export_int4 had no flag for it."""
    run = tmp_path / "run"
    shutil.copytree(trained.run, run)
    user = np.load(run / "ranker" / "tables" / "user.npy")
    user[3, 1] = 1e5
    np.save(run / "ranker" / "tables" / "user.npy", user)
    cfg = X.ExportConfig(ranker_dir=str(run / "ranker"), out_dir=str(tmp_path / "art"),
                         max_auc_drop=1.0)
    with pytest.raises(ValueError, match=re.escape(
            f"{run / 'ranker'}: table 'user': row 3 has |x| > 65504.0 which float16 bias "
            "cannot hold; use scale_dtype float32")):
        X.export_ranker(cfg, log=lambda s: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    X.export_ranker(dataclasses.replace(cfg, scale_dtype="float32"), log=lambda s: None)
    q = AR.load_artifact(tmp_path / "art").tables["user"]
    assert q.scale.dtype == np.float32
    assert abs(float(rowwise.dequantize_rows(q, np.array([3]))[0, 1]) - 1e5) <= q.scale[3] / 2
    proc = subprocess.run(
        [sys.executable, "-m", "launch.export_int4", f"--ranker={run / 'ranker'}",
         f"--out={tmp_path / 'art'}", "--max_auc_drop=1", "--scale_dtype=float32"],
        cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True,
        timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]  # the same version: left as it was


def test_gate_failure_writes_nothing_and_keeps_the_previous_artifact(trained, tmp_path):
    out = tmp_path / "art"
    good = X.export_ranker(
        X.ExportConfig(ranker_dir=str(trained.ranker_dir), out_dir=str(out), bits=8),
        log=lambda s: None,
    )
    cfg = X.ExportConfig(
        ranker_dir=str(trained.ranker_dir), out_dir=str(out), max_auc_drop=-1.0, overwrite=True
    )
    said = []
    with pytest.raises(X.ExportGateError, match="failed the quality gate") as e:
        X.export_ranker(cfg, log=said.append)
    assert not [s for s in said if "another artifact" in s]  # its own report
    assert e.value.report["gate"]["passed"] is False
    assert e.value.report["gate"]["failed_tasks"] == list(X.TASKS)
    assert AR.verify_artifact(out).version == good["version"]  # untouched (still the INT8 one)
    assert AR.load_artifact(out).tables["user"].bits == 8
    assert _leftovers(tmp_path) == []
    assert json.loads((tmp_path / X.REPORT_NAME).read_text())["gate"]["passed"] is False
    # A fresh output folder is not created at all. Its report replaces the sibling
    # artifact's at the shared default path, and the export says so.
    said = []
    with pytest.raises(X.ExportGateError):
        X.export_ranker(dataclasses.replace(cfg, out_dir=str(tmp_path / "new")), log=said.append)
    assert not (tmp_path / "new").exists() and _leftovers(tmp_path) == []
    assert [s for s in said if "another artifact" in s] == [
        f"export: {tmp_path / X.REPORT_NAME} holds the report of another artifact "
        f"({out.absolute()}); it will be replaced (give --report to keep both)"]


def test_export_never_replaces_the_run_the_ranker_the_data_or_other_files(
        trained, tmp_path, monkeypatch):
    """`--overwrite` used to delete whatever --out named once the gate passed: RUN (its
    checkpoints, metrics.json and float32 ranker), the ranker, the dataset, a folder of
    a user's notes. Such an output is refused before the evaluation; nothing is touched."""

    def files():
        return sorted((str(p), p.stat().st_size) for root in (trained.run, trained.data)
                      for p in root.rglob("*"))

    def evaluated(*args, **kwargs):
        raise AssertionError("the output should have been refused before the evaluation")

    before = files()
    monkeypatch.setattr(X, "load_test_split", evaluated)
    ranker, data = trained.ranker_dir, trained.data
    cases = [
        (trained.run, f"contains the ranker folder {ranker}", None),
        (ranker, f"is the ranker folder {ranker}", None),
        (data, f"is the dataset folder {data}", None),  # the dataset recorded by the run
        (data, f"is the dataset folder {data}", str(data)),
        # Inside the data: the dataset folder would change, and an ablation made from
        # it would redo every run.
        (data / "artifacts" / "v1", f"is inside the dataset folder {data}", str(data)),
        (tmp_path, f"contains the dataset folder {tmp_path / 'd'}", str(tmp_path / "d")),
    ]
    for out, relation, data_path in cases:
        cfg = X.ExportConfig(ranker_dir=str(ranker), out_dir=str(out), data_path=data_path,
                             overwrite=True, auc_noise_z=2)
        with warnings.catch_warnings(), pytest.raises(ValueError) as e:
            warnings.simplefilter("ignore")  # tmp_path/d is not the ranker's dataset
            X.export_ranker(cfg, log=lambda s: None)
        assert str(e.value).startswith(f"the artifact folder {out} {relation}: "), e.value
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    with pytest.raises(AR.ArtifactError,
                       match=r"mine is not a serving artifact \(no manifest.json\) and not empty: "
                             r"it holds notes.txt; refusing to replace it"):
        X.export_ranker(X.ExportConfig(ranker_dir=str(ranker), out_dir=str(mine), overwrite=True),
                        log=lambda s: None)
    assert (mine / "notes.txt").read_text() == "my notes"
    assert files() == before
    assert not (ranker / "art").exists() and not (data / "art").exists()
    # A folder inside the ranker's is fine: writing it replaces and changes nothing used.
    assert X._check_apart(ranker / "art", ranker, "ranker folder") is None
    # A report inside the artifact folder would block the next export: refused.
    with pytest.raises(ValueError, match="would be inside the artifact folder"):
        X.export_ranker(X.ExportConfig(ranker_dir=str(ranker), out_dir=str(tmp_path / "o"),
                                       report_path=str(tmp_path / "o" / "r.json")),
                        log=lambda s: None)
    assert not (tmp_path / "o").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]
    assert _leftovers(trained.run) == [] and _leftovers(trained.run.parent) == []


def test_a_symlink_out_is_refused_before_the_evaluation(trained, tmp_path, monkeypatch):
    """An export with overwrite replaced a symlink --out with a folder (the README's
    rollout is `ln -sfn NEW ART`): refused whatever the link points at."""

    def evaluated(*args, **kwargs):
        raise AssertionError("the symlink should have been refused before the evaluation")

    monkeypatch.setattr(X, "load_test_split", evaluated)
    (tmp_path / "v1").mkdir()
    (tmp_path / "ART").symlink_to(tmp_path / "v1")
    (tmp_path / "dangling").symlink_to(tmp_path / "none")
    for link, overwrite in (("ART", True), ("ART", False), ("dangling", False)):
        cfg = X.ExportConfig(ranker_dir=str(trained.ranker_dir),
                             out_dir=str(tmp_path / link), overwrite=overwrite)
        with pytest.raises(AR.ArtifactError, match=re.escape(
                f"{tmp_path / link} is a symlink to {os.readlink(tmp_path / link)}: ")):
            X.export_ranker(cfg, log=lambda s: None)
    assert os.readlink(tmp_path / "ART") == str(tmp_path / "v1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ART", "dangling", "v1"]


def test_a_report_path_that_cannot_be_written_is_refused_before_the_evaluation(
        trained, tmp_path, monkeypatch):
    """It used to fail only after the artifact was written."""

    def evaluated(*args, **kwargs):
        raise AssertionError("the report path should have been refused before the evaluation")

    monkeypatch.setattr(X, "load_test_split", evaluated)
    (tmp_path / "rep").mkdir()
    (tmp_path / "f").write_text("x")
    for report, error, message in (
            (tmp_path / "rep", IsADirectoryError, "cannot be written: it is a folder"),
            (tmp_path / "f" / "r.json", NotADirectoryError,
             f"cannot be written: {tmp_path / 'f'} exists and is not a folder")):
        cfg = X.ExportConfig(ranker_dir=str(trained.ranker_dir), out_dir=str(tmp_path / "art"),
                             report_path=str(report))
        with pytest.raises(error, match=re.escape(f"the report {report} {message}")):
            X.export_ranker(cfg, log=lambda s: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f", "rep"]


def test_gate_catches_a_broken_quantizer(trained, tmp_path, monkeypatch):
    real = rowwise.quantize_table_chunked

    def broken(src, out_dir, name, **kw):
        paths = real(src, out_dir, name, **kw)
        scale = np.load(paths["scale"], mmap_mode="r+")
        scale[:] = 0  # every row collapses to its minimum
        scale.flush()
        return paths

    monkeypatch.setattr(rowwise, "quantize_table_chunked", broken)
    with pytest.raises(X.ExportGateError) as e:
        X.export_ranker(
            X.ExportConfig(ranker_dir=str(trained.ranker_dir), out_dir=str(tmp_path / "art")),
            log=lambda s: None,
        )
    rep = e.value.report
    # The planted signal lives in the user x pin tables: CTR AUC collapses.
    assert "ctr" in rep["gate"]["failed_tasks"] and rep["gate"]["auc_drop"]["ctr"] > 0.05
    assert not (tmp_path / "art").exists() and _leftovers(tmp_path) == []


def test_gate_that_checked_no_task_fails(trained, tmp_path, monkeypatch):
    """A test window without a click leaves every task without an AUC: all three were
    skipped and the gate 'PASSED' (even with max_auc_drop=-1, documented to always fail),
    writing an artifact that nothing had checked."""
    real = X.load_test_split

    def no_clicks(ranker, dcfg):
        split, window = real(ranker, dcfg)
        zeros = np.zeros_like(split["click"])
        return dict(split, click=zeros, conversion=zeros), window

    monkeypatch.setattr(X, "load_test_split", no_clicks)
    with pytest.raises(X.ExportGateError, match=re.escape(
            "no task has a test AUC to compare (the labels of ctr, cvr, ctcvr are all equal "
            "in the test days [5, 6)), so nothing was checked; no artifact written")) as e:
        X.export_ranker(
            X.ExportConfig(ranker_dir=str(trained.ranker_dir), out_dir=str(tmp_path / "art")),
            log=lambda s: None,
        )
    gate = e.value.report["gate"]
    assert (gate["passed"], gate["failed_tasks"], gate["skipped_tasks"]) == (False, [], list(X.TASKS))
    assert "gate: FAILED (no task has a test AUC)" in X.format_report(e.value.report)
    assert not (tmp_path / "art").exists() and _leftovers(tmp_path) == []


def test_paired_auc_delta_by_hand_and_against_the_pairwise_definition():
    # a: 0.9 beats both negatives, 0.4 beats one -> 0.75; b ranks both positives first.
    auc_a, auc_b, se = X.paired_auc_delta([1, 1, 0, 0], [0.9, 0.4, 0.5, 0.1], [0.9, 0.6, 0.5, 0.1])
    assert (auc_a, auc_b) == (0.75, 1.0)
    # Placements: positives a [1, .5] b [1, 1]; negatives a [.5, 1] b [1, 1]:
    # var = var([0, .5]) / 2 + var([.5, 0]) / 2 = .125 / 2 + .125 / 2.
    assert se == pytest.approx(np.sqrt(0.125))
    rng = np.random.default_rng(3)
    y = rng.random(60) < 0.3
    a = np.round(rng.normal(size=60), 1)  # ties, counted 1/2
    b = np.round(a + 0.5 * rng.normal(size=60), 1)
    psi = [
        (s[y][:, None] > s[~y][None, :]) + 0.5 * (s[y][:, None] == s[~y][None, :]) for s in (a, b)
    ]
    d10 = psi[1].mean(1) - psi[0].mean(1)
    d01 = psi[1].mean(0) - psi[0].mean(0)
    want = np.sqrt(np.var(d10, ddof=1) / y.sum() + np.var(d01, ddof=1) / (~y).sum())
    got = X.paired_auc_delta(y, a, b)
    assert got[0] == pytest.approx(metrics.auc(y, a)) and got[1] == pytest.approx(metrics.auc(y, b))
    assert got[2] == pytest.approx(want)
    assert X.paired_auc_delta(y, a, a)[2] == 0.0
    assert all(np.isnan(X.paired_auc_delta([0, 0], [1, 2], [1, 2])))


def test_gate_with_noise_z_passes_drops_within_the_paired_error():
    def quality(drop, se):
        return {"auc_full": 0.7, "auc_quant": 0.7 - drop, "auc_delta_se": se}

    q = {"ctr": quality(0.002, 0.0005), "cvr": quality(0.004, 0.003), "ctcvr": quality(-0.01, 0.01)}
    strict = X._gate(q, 0.001)
    assert strict["failed_tasks"] == ["ctr", "cvr"] and not strict["passed"]
    assert strict["auc_drop"]["ctcvr"] == pytest.approx(-0.01)
    lenient = X._gate(q, 0.001, noise_z=2.0)  # cvr: 0.004 <= 2 * 0.003; ctr: 0.002 > 0.001
    assert lenient["failed_tasks"] == ["ctr"] and lenient["within_noise_tasks"] == ["cvr"]
    q["ctr"] = quality(0.002, 0.0011)
    assert X._gate(q, 0.001, noise_z=2.0)["passed"]
    q["cvr"] = {"auc_full": float("nan"), "auc_quant": float("nan"), "auc_delta_se": None}
    assert X._gate(q, 0.001)["skipped_tasks"] == ["cvr"]
    # A negative gate always fails (documented, for testing the failure path); the
    # noise allowance used to pass drops within z standard errors of it.
    negative = X._gate(q, -1.0, noise_z=2.0)
    assert negative["failed_tasks"] == ["ctr", "ctcvr"] and not negative["passed"]


def test_dequantized_table_gathers_like_dequantize_rows():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(37, 6)).astype(np.float32)
    q = X.quantize_in_memory(x, bits=4, chunk_rows=8)
    whole = rowwise.quantize_rows(x, bits=4)
    np.testing.assert_array_equal(q.codes, whole.codes)
    np.testing.assert_array_equal(q.scale, whole.scale)
    np.testing.assert_array_equal(q.bias, whole.bias)
    view = X.DequantizedTable(q)
    full = rowwise.dequantize_rows(whole)
    assert view.shape == (37, 6) and len(view) == 37
    np.testing.assert_array_equal(view[np.array([[3, 0], [36, 3]])], full[[[3, 0], [36, 3]]])
    np.testing.assert_array_equal(view[2:5], full[2:5])
    np.testing.assert_array_equal(view[-1], full[-1])
    np.testing.assert_array_equal(np.asarray(view), full)


def test_recorded_data_is_found_or_the_error_says_where_it_looked(trained, tmp_path):
    ranker = M.load_ranker(trained.ranker_dir)
    d = X.resolve_data_config(trained.ranker_dir, ranker)
    assert d.path == str(trained.data) and d.test_window == "ranker_test"
    assert (d.train_window, d.valid_window, d.coarse_features) == ("", "", ("hour",))
    # An ablation run's ranker: ABL/runs/<variant>_s<seed>/ranker with ABL/ablation.json.
    abl_ranker = tmp_path / "abl" / "runs" / "cl_kg_s0" / "ranker"
    shutil.copytree(trained.ranker_dir, abl_ranker)
    with pytest.raises(ValueError, match="--data=DATASET") as e:
        X.resolve_data_config(abl_ranker, ranker)
    assert "ablation.json" in str(e.value)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "dataset.json").write_text('{"name": "elsewhere"}\n')
    (tmp_path / "abl" / "ablation.json").write_text(json.dumps(
        {"data": {"path": str(elsewhere), "test_window": [5, 6], "coarse_features": None}}))
    d = X.resolve_data_config(abl_ranker, ranker)
    assert (d.path, d.test_window) == (str(elsewhere), (5, 6))
    # Other data than the recorded one: scored, with a warning naming both.
    with pytest.warns(UserWarning, match="not the dataset the ranker was trained on.*differ"):
        other = X.resolve_data_config(abl_ranker, ranker, data_path=str(trained.data))
    assert other.path == str(trained.data)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the recorded data itself: no warning
        assert X.resolve_data_config(trained.ranker_dir, ranker,
                                     data_path=str(trained.data)).path == str(trained.data)


def test_a_recorded_dataset_that_is_gone_is_said_to_be_gone_not_to_differ(tmp_path):
    """A moved pipeline folder: ablation.json records the world where it was; the
    export is given the world where it is now."""
    ranker = types.SimpleNamespace(config=types.SimpleNamespace(coarse_vocab_sizes=(("hour", 3),)))
    ranker_dir = tmp_path / "new" / "ablation" / "runs" / "cl_kg_s0" / "ranker"
    ranker_dir.mkdir(parents=True)
    world = tmp_path / "new" / "world"
    world.mkdir()
    (world / "dataset.json").write_text('{"name": "world"}\n')
    recorded = tmp_path / "old" / "world"  # no longer there
    abl_json = tmp_path / "new" / "ablation" / "ablation.json"
    abl_json.write_text(json.dumps({"data": {"path": str(recorded)}}))
    with pytest.warns(UserWarning) as caught:
        d = X.resolve_data_config(ranker_dir, ranker, data_path=str(world))
    assert d.path == str(world) and len(caught) == 1
    msg = str(caught[0].message)
    assert f"the dataset the ranker was trained on, {recorded} (recorded in {abl_json}), is gone" in msg
    assert f"scoring on the given {world}" in msg and "differ" not in msg, msg
    # Without --data there is nothing to score on: said before any work.
    with pytest.raises(ValueError, match=f"{re.escape(str(recorded))} .*is gone.*--data=DATASET"):
        X.resolve_data_config(ranker_dir, ranker)
    # Both there: "differ" only when their dataset.json do.
    recorded.mkdir(parents=True)
    shutil.copy(world / "dataset.json", recorded / "dataset.json")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert X.resolve_data_config(ranker_dir, ranker, data_path=str(world)).path == str(world)
    (recorded / "dataset.json").write_text('{"name": "another world"}\n')
    with pytest.warns(UserWarning, match=f"scoring on {re.escape(str(world))}, not the dataset "
                      "the ranker was trained on .*: their dataset.json differ"):
        X.resolve_data_config(ranker_dir, ranker, data_path=str(world))
    # A folder without dataset.json (its tables are found by name) is there, not gone:
    # scored without --data, and without a warning as --data; another folder without one
    # cannot be compared with it, which the warning says.
    (recorded / "dataset.json").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert X.resolve_data_config(ranker_dir, ranker).path == str(recorded)
        assert X.resolve_data_config(ranker_dir, ranker,
                                     data_path=str(recorded)).path == str(recorded)
    with pytest.warns(UserWarning, match=f"scoring on {re.escape(str(world))}, not the dataset "
                      "the ranker was trained on .*: one has no dataset.json to compare"):
        X.resolve_data_config(ranker_dir, ranker, data_path=str(world))


def test_int4_row_is_added_to_the_ablation(trained, tmp_path):
    ranker = M.load_ranker(trained.ranker_dir)
    abl = tmp_path / "abl"
    shutil.copytree(trained.ranker_dir, abl / "runs" / "cl_kg_s0" / "ranker")
    # Use the full-precision ranker itself as the "baseline": the row's gain is then
    # exactly the INT4 AUC change relative to its lift over random.
    full = trained.test_metrics
    result = {
        "seeds": [0],
        "data": dataclasses.asdict(T.DataConfig(path=str(trained.data))),
        "windows": {"test": [5, 6]},
        "order": [A.BASELINE],
        "seconds": 0.0,
        "variants": {
            A.BASELINE: A.summarize_variant(label="fp32", per_seed={0: full}, baseline={0: full})
        },
    }
    (abl / "ablation.json").write_text(json.dumps(result, default=T._json_default))
    row = X.add_int4_row(abl)
    split, _ = X.load_test_split(ranker, X.resolve_data_config(trained.ranker_dir, ranker))
    quant = T.evaluate_ranker(ranker, split, tables=X.int4_transform(ranker))
    for task in X.TASKS:
        assert row[f"{task}_auc_mean"] == pytest.approx(quant[f"{task}_auc"], abs=1e-12)
        gain = (quant[f"{task}_auc"] - full[f"{task}_auc"]) / (full[f"{task}_auc"] - 0.5)
        assert row[f"{task}_relaimpr_mean"] == pytest.approx(gain, abs=1e-9)
    md = (abl / "ablation.md").read_text()
    assert X.INT4_LABEL in md
    assert json.loads((abl / "ablation.json").read_text())["order"] == [A.BASELINE, X.INT4_ROW]
    assert row["bits"] == 4


def test_an_int8_or_float32_served_row_says_its_width_and_records_its_bits(trained, tmp_path):
    """--bits=8 / 32 rows used to be labelled "+ both facets, INT4 served" (and replace the
    INT4 row), with no record of their bit width."""
    abl = tmp_path / "abl"
    shutil.copytree(trained.ranker_dir, abl / "runs" / "cl_kg_s0" / "ranker")
    full = trained.test_metrics
    (abl / "ablation.json").write_text(json.dumps({
        "seeds": [0], "data": dataclasses.asdict(T.DataConfig(path=str(trained.data))),
        "windows": {"test": [5, 6]}, "order": [A.BASELINE], "variants": {
            A.BASELINE: A.summarize_variant(label="fp32", per_seed={0: full}, baseline={0: full})},
    }, default=T._json_default))
    for bits, name, label in ((8, "cl_kg_int8", "+ both facets, INT8 served"),
                              (32, "cl_kg_fp32", "+ both facets, float32 served")):
        assert X.int4_row_name("cl_kg", bits=bits) == (name, label)
        row = X.add_int4_row(abl, bits=bits)
        assert row["label"] == label and row["bits"] == bits
    result = json.loads((abl / "ablation.json").read_text())
    assert result["order"] == [A.BASELINE, "cl_kg_int8", "cl_kg_fp32"]
    assert result["variants"]["cl_kg_int8"]["bits"] == 8
    # float32 rows served as they are: the full-precision ranker's AUC.
    assert result["variants"]["cl_kg_fp32"]["ctr_auc_mean"] == pytest.approx(full["ctr_auc"], abs=1e-6)
    md = (abl / "ablation.md").read_text()
    assert "INT8 served" in md and "float32 served" in md and "INT4" not in md
    assert X.int4_row_name("scratch", bits=8) == ("scratch_int8", "scratch, INT8 served")
    with pytest.raises(ValueError, match="bits must be one of"):
        X.int4_row_name("cl_kg", bits=2)


@pytest.mark.slow
def test_launch_exports_and_fails_the_gate_with_a_nonzero_exit(trained, tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    base = [sys.executable, "-m", "launch.export_int4", f"--checkpoint={trained.ranker_dir}"]
    bad = subprocess.run(
        [*base, f"--out={tmp_path / 'bad'}", "--max_auc_drop=-1"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2, bad.stderr[-2000:]
    assert "failed the quality gate" in bad.stderr and "gate: FAILED" in bad.stdout
    assert not (tmp_path / "bad").exists()
    ok = subprocess.run(
        [
            *base,
            f"--out={tmp_path / 'art'}",
            f"--data={trained.data}",
            f"--workdir={tmp_path / 'wd'}",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ok.returncode == 0, ok.stderr[-2000:]
    metrics = json.loads((tmp_path / "wd" / "metrics.json").read_text())
    assert metrics["version"] == AR.verify_artifact(tmp_path / "art").version
    assert "gate: PASSED" in ok.stdout


def test_a_relative_data_path_of_train_ranker_is_found_from_another_folder(tmp_path,
                                                                           monkeypatch):
    # launch.train_ranker recorded --config.data.path=data as given, and export_int4 run
    # from another folder read it against its own: "the dataset the ranker was trained
    # on, data (recorded in ...metrics.json), is gone (moved or deleted?)".
    import mp_util

    _write_world(tmp_path / "data", n=1200)
    proc = subprocess.run(
        [sys.executable, "-m", "launch.train_ranker", f"--config={REPO}/configs/ranker.py:smoke",
         "--config.data.path=data", "--workdir=run", "--config.entities=user:user_id,pin:item_id",
         "--config.train.num_epochs=1"],
        cwd=tmp_path, env=mp_util.child_env(1), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recorded = json.loads((tmp_path / "run" / "metrics.json").read_text())["config"]["data"]
    assert recorded["path"] == str(tmp_path / "data")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    ranker = M.load_ranker(tmp_path / "run" / "ranker")
    got = X.resolve_data_config(tmp_path / "run" / "ranker", ranker)
    assert got.path == str(tmp_path / "data") and got.test_window == "ranker_test"
    split, window = X.load_test_split(ranker, got)
    assert window == (5, 6) and len(split["click"]) == 200
