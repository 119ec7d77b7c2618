"""KG pretraining end to end on a tiny typed triple folder: facet layout and raw ids,
folder resolution, and clear errors for bad triple files."""

import json

import jax
import numpy as np
import pytest

from jax_recsys import checkpoint
from jax_recsys.data.folder import DataError
from jax_recsys.pretrain import kg_eval, kg_train


def _write_folder(root, *, bad_line=None):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = []
    for u in range(24):
        for p in rng.choice(12, 3, replace=False):
            lines.append(f"user:{u}\tengaged\tpin:{(u % 3) * 4 + p % 4}")
    for p in range(12):
        lines.append(f"pin:{p}\ton_board\tboard:{p // 4}")
    lines = sorted(set(lines))
    rng.shuffle(lines)
    train, valid, test = lines[8:], lines[:4], lines[4:8]
    if bad_line is not None:
        train.insert(bad_line - 1, "user:1 engaged pin:2")  # spaces, not tabs
    for name, part in (("train", train), ("valid", valid), ("test", test)):
        (root / f"{name}.txt").write_text("\n".join(part) + "\n")
    types = [f"user:{u}\tuser" for u in range(24)] + [f"pin:{p}\tpin" for p in range(12)]
    types += [f"board:{b}\tboard" for b in range(3)]
    (root / "entity_types.tsv").write_text("\n".join(types) + "\n")


def _configs():
    return dict(
        model=kg_train.KGModelConfig(model="distmult", dim=8),
        train_config=kg_train.KGTrainConfig(chunk_size=4, uniform_negatives=4, chunks_per_batch=8,
                                            num_epochs=2, log_every=1000),
        eval_config=kg_eval.KGEvalConfig(),
    )


def test_train_and_evaluate_writes_kg_facet(tmp_path):
    _write_folder(tmp_path / "ds" / "kg")  # a dataset folder without dataset.json: DIR/kg
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    out = kg_train.train_and_evaluate(data=kg_train.KGDataConfig(path=str(tmp_path / "ds"),
                                                                 unseen="skip"),
                                      workdir=tmp_path / "run", mesh=mesh,
                                      log_fn=lambda d: None, **_configs())
    assert 0 < out["test_mrr"] <= 1 and out["test_num_triples"] >= 1
    json.dumps(out)  # metrics are JSON-serialisable
    facet = checkpoint.load_facet(tmp_path / "run" / "facet_kg")
    assert facet.facet == "kg"
    assert sorted(facet.tables) == ["board", "pin", "user"]
    # Raw ids lose the "type:" prefix and become integers, in row order.
    np.testing.assert_array_equal(np.asarray(facet.vocabs["board"]), [0, 1, 2])
    assert np.asarray(facet.vocabs["user"]).dtype == np.int64
    assert facet.tables["user"].shape == (len(facet.vocabs["user"]), 8)
    assert np.isfinite(facet.tables["pin"]).all()


def test_bad_triple_file_names_the_line(tmp_path):
    _write_folder(tmp_path / "kg", bad_line=5)
    with pytest.raises(DataError, match=r"train\.txt:5"):
        kg_train.train_and_evaluate(data=kg_train.KGDataConfig(path=str(tmp_path / "kg")),
                                    workdir=tmp_path / "run", log_fn=lambda d: None,
                                    **_configs())


def test_missing_graph_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no train.txt"):
        kg_train.resolve_kg_path(tmp_path)


def test_a_dataset_json_without_a_kg_entry_reads_the_kg_folder(tmp_path):
    # A dataset.json written for its "splits" that left "kg" out: its kg/ folder was
    # "dataset.json has no knowledge graph ("kg": null)", a key the file did not have.
    _write_folder(tmp_path / "kg")
    meta = {"format_version": 1, "tables": {}, "splits": {"ranker_train": [0, 1]}}
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    assert kg_train.resolve_kg_path(tmp_path) == tmp_path / "kg"
    # Said so: "kg": null is no graph, also beside a kg/ folder.
    (tmp_path / "dataset.json").write_text(json.dumps({**meta, "kg": None}))
    with pytest.raises(ValueError, match=r'dataset\.json has no knowledge graph \("kg": null\)$'):
        kg_train.resolve_kg_path(tmp_path)
    (tmp_path / "kg" / "train.txt").unlink()
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r'no knowledge graph \(no "kg" entry, and no '
                                         r'kg/train\.txt\)$'):
        kg_train.resolve_kg_path(tmp_path)


def test_a_graph_of_train_triples_only_saves_its_facet_unevaluated(tmp_path):
    # With train.txt alone (valid/test are optional files), training ran in full and
    # then ended with "no 'valid' triples to evaluate (splits: ['train'])": no facet.
    _write_folder(tmp_path / "kg")
    (tmp_path / "kg" / "valid.txt").unlink()
    (tmp_path / "kg" / "test.txt").unlink()
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    with pytest.warns(UserWarning, match=r"no valid or test triples \(splits: \['train'\]\): "
                                         "the facet is saved without an evaluation"):
        out = kg_train.train_and_evaluate(data=kg_train.KGDataConfig(path=str(tmp_path / "kg")),
                                          workdir=tmp_path / "run", mesh=mesh,
                                          log_fn=lambda d: None, **_configs())
    assert not any(k.endswith("_mrr") for k in out) and out["num_train_triples"] > 0
    facet = checkpoint.load_facet(tmp_path / "run" / "facet_kg")
    assert sorted(facet.tables) == ["board", "pin", "user"]
    assert facet.tables["user"].shape == (24, 8) and np.isfinite(facet.tables["user"]).all()


def test_pretrain_kg_on_train_triples_only_finishes(tmp_path):
    # Its summary line read metrics["valid_mrr"]: a KeyError traceback after the facet.
    import subprocess
    import sys

    import mp_util

    _write_folder(tmp_path / "kg")
    (tmp_path / "kg" / "valid.txt").unlink()
    (tmp_path / "kg" / "test.txt").unlink()
    proc = subprocess.run(
        [sys.executable, "-m", "launch.pretrain_kg", "--config=configs/kg_triples.py:smoke",
         f"--config.data.path={tmp_path / 'kg'}", f"--workdir={tmp_path / 'run'}",
         "--config.train.max_steps=2", "--config.train.chunks_per_batch=1"],
        cwd=mp_util.REPO, env=mp_util.child_env(1), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "not evaluated (no valid or test triples)" in proc.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["steps"] == 2 and "test_mrr" not in metrics
    assert (tmp_path / "run" / "facet_kg" / "facet.json").exists()
