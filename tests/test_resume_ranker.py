"""Ranker checkpoints: kill-and-resume of a real `launch.train_ranker` process, and
restoring a training state onto other meshes and sharding types.

- A run SIGKILLed after its first checkpoint and started again with the same command
  ends with the same loss curve and evaluation metrics as an uninterrupted run.
- `train.restore_train_state` puts tables, sparse optimizer slots (row [R] and matrix
  [R, D] kinds), dense params, optax state and step of a checkpoint saved on 8 devices
  onto 4 and then 1 device, and from row-wise onto replicated and table-wise storages,
  with every value equal.
"""

import dataclasses

import jax
import jax.numpy as jnp
import mp_util
import numpy as np
import optax
import pytest

# Smoke world: 8000 training impressions; 2560 kept -> 10 steps per epoch at batch 256.
BATCH, EXAMPLES, EVERY, EPOCHS = 256, 2560, 3, 2.0
EVAL_KEYS = ("ctr_auc", "cvr_auc", "ctcvr_auc", "ctr_log_loss", "ctr_ne", "cvr_log_loss")



# ----------------------------------------------------------------------------- kill + resume


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return mp_util.smoke_world(tmp_path_factory), "configs/ranker.py:smoke"


def _steps(ckpt_dir):
    if not ckpt_dir.exists():
        return []
    return sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit())


@pytest.mark.slow
@pytest.mark.multiprocess
def test_killed_run_resumes_to_the_uninterrupted_result(world, tmp_path):
    data, cfg_file = world

    def args(workdir, every):
        return [f"--config={cfg_file}", f"--workdir={workdir}", f"--config.data.path={data}",
                f"--config.train.num_epochs={EPOCHS}", f"--config.train.batch_size={BATCH}",
                f"--config.data.max_train_examples={EXAMPLES}", "--config.train.log_every=1",
                f"--config.train.checkpoint_every={every}", "--config.train.keep_checkpoints=2"]

    wd, ref_dir = tmp_path / "run", tmp_path / "uninterrupted"
    ckpts = wd / "checkpoints"
    # Later processes load the first one's compiled programs from disk (~3x less CPU).
    env = {"JAX_COMPILATION_CACHE_DIR": str(tmp_path / "xla_cache")}
    with mp_util.start("launch.train_ranker", args(wd, EVERY), env=env) as run:
        mp_util.wait_for(lambda: bool(_steps(ckpts)), timeout_s=300, group=run)
        run.kill()
        assert run.poll() == [-9], run.describe()
    killed_at = _steps(ckpts)
    assert killed_at and killed_at[-1] < 20, killed_at  # killed while training
    assert not (wd / "metrics.json").exists()

    # The same command again, and an uninterrupted run without checkpoints, side by side.
    with mp_util.start("launch.train_ranker", args(wd, EVERY), env=env) as rerun, \
            mp_util.start("launch.train_ranker", args(ref_dir, 0), env=env) as uninterrupted:
        for group in (rerun, uninterrupted):
            assert group.wait(timeout_s=300)[0].returncode == 0, group.describe()
        assert f"resumed from {ckpts}/{killed_at[-1]}" in rerun.output(0), rerun.describe()
    ref = mp_util.read_metrics(ref_dir)
    assert not (ref_dir / "checkpoints").exists() or not _steps(ref_dir / "checkpoints")
    got = mp_util.read_metrics(wd)
    assert ref["train"]["steps"] == got["train"]["steps"] == 20
    assert got["train"]["resumed_from_step"] == killed_at[-1] > 0
    np.testing.assert_allclose([x for _, x in got["train"]["loss_curve"]],
                               [x for _, x in ref["train"]["loss_curve"]], rtol=2e-5)
    for split in ("valid", "test"):
        for key in EVAL_KEYS:
            np.testing.assert_allclose(got[split][key], ref[split][key], rtol=1e-4,
                                       err_msg=f"{split} {key}")
    assert _steps(ckpts)[-1] == 20 and len(_steps(ckpts)) <= 2  # keep_checkpoints
    assert not list(ckpts.glob("*tmp*"))  # a save cut short by the kill is cleaned up


# ----------------------------------------------------------------------------- cross-mesh


def _mesh(n):
    from jax_recsys import distributed

    return distributed.global_mesh(devices=jax.devices()[:n])


def _collection(n_devices, sharding):
    from jax_recsys.embedding import collection, specs

    tables = [
        specs.TableSpec(name="user", rows=13, dim=4,
                        optimizer=specs.RowAdagrad(learning_rate=0.1)),
        specs.TableSpec(name="pin", rows=29, dim=3, optimizer=specs.LazyAdam(learning_rate=0.1)),
    ]
    feats = [specs.FeatureSpec(name=t.name, table=t.name) for t in tables]
    return collection.EmbeddingCollection(
        tables=tables, features=feats, mesh=_mesh(n_devices),
        overrides={t.name: sharding for t in tables})


def _values(rng, ec):
    """Random per-table values: table [R, D] and every slot ([R] or [R, D])."""
    from jax_recsys.embedding import optimizers

    out = {}
    for name, t in ec.tables.items():
        v = {"table": rng.normal(size=(t.rows, t.dim)).astype(np.float32)}
        for slot, (kind, _, dtype) in optimizers.slot_layout(t.optimizer).items():
            shape = (t.rows,) if kind == "row" else (t.rows, t.dim)
            v[slot] = (rng.uniform(1, 9, size=shape) if dtype == "float32"
                       else rng.integers(1, 9, size=shape)).astype(dtype)
        out[name] = v
    return out


def _place(ec, values):
    """EmbeddingState in `ec`'s layout and shardings holding `values` (padding: 0)."""
    from jax_recsys.embedding.collection import EmbeddingState

    shapes = ec.state_shapes()
    host = EmbeddingState(
        tables={k: np.zeros(s.shape, s.dtype) for k, s in shapes.tables.items()},
        slots={k: {n: np.zeros(s.shape, s.dtype) for n, s in d.items()}
               for k, d in shapes.slots.items()})
    for name, t in ec.tables.items():
        pl = ec.plan.placements[name]
        rows = slice(pl.row_base, pl.row_base + t.rows)
        host.tables[pl.storage][rows, : t.dim] = values[name]["table"]
        for slot, arr in host.slots[pl.storage].items():
            if arr.ndim == 1:
                arr[rows] = values[name][slot]
            else:
                arr[rows, : t.dim] = values[name][slot]
    return jax.tree.map(lambda x, s: jax.device_put(x, s.sharding), host, shapes)


def _read(ec, emb):
    """Per-table values of an EmbeddingState, as `_values` gives them."""
    out = {}
    host = jax.tree.map(np.asarray, emb)
    for name, t in ec.tables.items():
        pl = ec.plan.placements[name]
        rows = slice(pl.row_base, pl.row_base + t.rows)
        v = {"table": host.tables[pl.storage][rows, : t.dim]}
        for slot, arr in host.slots[pl.storage].items():
            v[slot] = arr[rows] if arr.ndim == 1 else arr[rows, : t.dim]
        out[name] = v
    return out


def _fresh_state(ec, params):
    from jax_recsys.embedding import train_step

    rep = jax.sharding.NamedSharding(ec.mesh, jax.sharding.PartitionSpec())
    tx = optax.adam(0.1)
    params = jax.device_put(params, rep)
    return train_step.TrainState(emb=ec.init(jax.random.key(0)), params=params,
                                 opt_state=jax.device_put(tx.init(params), rep),
                                 step=jax.device_put(jnp.zeros((), jnp.int32), rep))


def _save(path, ec, state):
    from jax_recsys import checkpoint
    from jax_recsys.ranking import train

    with checkpoint.Checkpointer(path) as ckpt:
        ckpt.save(int(state.step), state, {"emb_layout": train.embedding_layout(ec, state.emb)})


def _restore(path, ec):
    from jax_recsys import checkpoint
    from jax_recsys.ranking import train

    zeros = {"w": jnp.zeros((3,)), "b": jnp.zeros(())}
    with checkpoint.Checkpointer(path) as ckpt:
        state, _ = train.restore_train_state(ckpt, fresh_state=_fresh_state(ec, zeros),
                                             collection=ec)
    return state


def _assert_equal_state(ec, got, want_values, want_dense):
    got_values = _read(ec, got.emb)
    for name in want_values:
        for key, want in want_values[name].items():
            np.testing.assert_array_equal(got_values[name][key], want, err_msg=f"{name} {key}")
    want_sh = ec.state_shardings()
    for a, s in zip(jax.tree.leaves(got.emb), jax.tree.leaves(want_sh), strict=True):
        assert a.sharding.is_equivalent_to(s, a.ndim), (a.sharding, s)
    dense = (got.params, got.opt_state, got.step)
    for a, b in zip(jax.tree.leaves(dense), jax.tree.leaves(want_dense), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_restore_onto_other_meshes_and_sharding_types(tmp_path):
    rng = np.random.default_rng(0)
    ec8 = _collection(8, "row_wise")
    values = _values(rng, ec8)
    params = {"w": jnp.asarray([1.0, -2.0, 3.0]), "b": jnp.asarray(0.5)}
    state = _fresh_state(ec8, params)
    tx = optax.adam(0.1)  # one real optax update: non-trivial moments and count
    upd, opt_state = tx.update(jax.tree.map(jnp.ones_like, state.params), state.opt_state,
                               state.params)
    state = dataclasses.replace(
        state, emb=_place(ec8, values), params=optax.apply_updates(state.params, upd),
        opt_state=opt_state, step=state.step + 7)
    want_dense = jax.tree.map(np.asarray, (state.params, state.opt_state, state.step))
    # Row-wise pads 13 and 29 rows to multiples of 8, 4 and 1: three storage shapes.
    assert ec8.state_shapes().tables["pin"].shape[0] == 32
    _save(tmp_path / "on8", ec8, state)

    ec4 = _collection(4, "row_wise")
    on4 = _restore(tmp_path / "on8", ec4)
    assert ec4.state_shapes().tables["user"].shape[0] == 16
    _assert_equal_state(ec4, on4, values, want_dense)
    _save(tmp_path / "on4", ec4, on4)

    ec1 = _collection(1, "row_wise")
    on1 = _restore(tmp_path / "on4", ec1)
    assert on1.emb.tables["pin"].shape == (29, 3)
    _assert_equal_state(ec1, on1, values, want_dense)

    for kind in ("replicated", "table_wise"):
        ec = _collection(8, kind)
        got = _restore(tmp_path / "on8", ec)
        _assert_equal_state(ec, got, values, want_dense)


def test_restore_refuses_a_checkpoint_without_some_table(tmp_path):
    from jax_recsys.embedding import collection, specs

    ec = _collection(8, "row_wise")
    state = _fresh_state(ec, {"w": jnp.ones((3,)), "b": jnp.ones(())})
    _save(tmp_path / "c", ec, state)
    bigger = collection.EmbeddingCollection(
        tables=[*ec.tables.values(), specs.TableSpec(name="advertiser", rows=5, dim=2)],
        features=[*ec.features.values(), specs.FeatureSpec(name="advertiser", table="advertiser")],
        mesh=ec.mesh)
    with pytest.raises(ValueError, match="advertiser"):
        _restore(tmp_path / "c", bigger)


def test_restore_refuses_a_changed_dense_model(tmp_path):
    """A resumed run whose dense layers changed (mlp_dims (16,) -> (4,)) must not
    silently train the saved architecture."""
    from jax_recsys import checkpoint
    from jax_recsys.ranking import train

    ec = _collection(8, "row_wise")
    _save(tmp_path / "c", ec, _fresh_state(ec, {"w": jnp.ones((3,)), "b": jnp.ones(())}))
    changed = _fresh_state(ec, {"w": jnp.zeros((4,)), "b": jnp.zeros(())})
    with checkpoint.Checkpointer(tmp_path / "c") as ckpt, pytest.raises(
        ValueError, match=r"leaf .*'w'.* saved shape \(3,\) but this run expects \(4,\)"
    ):
        train.restore_train_state(ckpt, fresh_state=changed, collection=ec)
    dense = (changed.params, changed.opt_state, changed.step)
    with checkpoint.Checkpointer(tmp_path / "d") as ckpt:
        ckpt.save(1, jax.tree.map(np.asarray, (
            {"w": jnp.ones((3,)), "b": jnp.ones(())}, changed.opt_state, changed.step)))
        ckpt.wait()
        with pytest.raises(ValueError, match=r"saved shape \(3,\) but this run expects \(4,\)"):
            train.restore_train_state(ckpt, fresh_state=dense)


# ----------------------------------------------------------------------------- run fingerprint


def _fingerprint_config(facet_dir, **kw):
    from jax_recsys.ranking import facets, model, train

    ents = (facets.EntitySpec(name="user", column="user_id", facets=(
        facets.FacetSpec(source="cl"), facets.FacetSpec(source="scratch", dim=4))),)
    base = dict(data=train.DataConfig(path="/data/world"), entities=ents,
                facet_paths=(("cl", str(facet_dir)), ("kg", "/unused/kg")),
                model=model.RankerConfig(mlp_dims=(16,)), batch_size=256, seed=3)
    base.update(kw)
    return train.TrainConfig(**base)


def _save_facet(path, loss):
    from jax_recsys import checkpoint
    from jax_recsys.data.vocab import Vocab

    checkpoint.save_facet(path, facet="cl", tables={"user": np.ones((3, 2), np.float32)},
                          vocabs={"user": Vocab(np.arange(3))}, metrics={"loss": loss})


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path):
    """A rerun in the same workdir with other settings or facets must not silently resume
    the old run; settings that do not change the training (logging, checkpointing,
    evaluation, the step count) may change."""
    from jax_recsys import checkpoint
    from jax_recsys.ranking import train

    _save_facet(tmp_path / "cl", 1.0)
    cfg = _fingerprint_config(tmp_path / "cl")
    vocabs = {"user_id": np.arange(5)}
    facet = {"cl": checkpoint.load_facet(tmp_path / "cl")}
    run = train.run_fingerprint(cfg, facet)
    assert run["facets.cl.path"] == str(tmp_path / "cl") and "facets.kg.path" not in run

    def check(config, folder="ckpt", log=print):
        with checkpoint.Checkpointer(tmp_path / folder) as ckpt:
            train._check_resume(ckpt.restore_meta(), ckpt, config=config, vocabs=vocabs,
                                total_steps=10, fingerprint=train.run_fingerprint(config, facet),
                                log=log)

    with checkpoint.Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(4, {"x": np.zeros(2)}, {"step": 4, "seed": 3, "run": run}, vocabs=vocabs)
        ckpt.wait()
    check(cfg)  # unchanged
    check(dataclasses.replace(cfg, log_every=1, checkpoint_every=2, keep_checkpoints=5,
                              eval_batch_size=64, num_epochs=3.0, table_sharding="replicated",
                              facet_paths=(("cl", str(tmp_path / "cl")),)))
    with pytest.raises(ValueError, match=r"ckpt/4: the checkpoint belongs to another run: "
                       r"dense_learning_rate was 0\.001, now 0\.01; use a fresh workdir"):
        check(dataclasses.replace(cfg, dense_learning_rate=0.01))
    with pytest.raises(ValueError, match=r"model\.mlp_dims was \[16\], now \[8\]"):
        check(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, mlp_dims=(8,))))
    frozen = tuple(dataclasses.replace(e, facets=(dataclasses.replace(e.facets[0], mode="freeze"),
                                                  *e.facets[1:])) for e in cfg.entities)
    with pytest.raises(ValueError, match=r"belongs to another run: entities\[user\]\.facets"
                       r"\[cl\]\.mode was 'finetune', now 'freeze'; use a fresh workdir$"):
        check(dataclasses.replace(cfg, entities=frozen))
    wider = tuple(dataclasses.replace(e, facets=(e.facets[0], dataclasses.replace(
        e.facets[1], dim=8))) for e in cfg.entities)
    with pytest.raises(ValueError, match=r"another run: entities\[user\]\.facets\[scratch\]"
                       r"\.dim was 4, now 8; use"):
        check(dataclasses.replace(cfg, entities=wider))
    _save_facet(tmp_path / "cl2", 1.0)
    with pytest.raises(ValueError, match=r"facets\.cl\.path was '.*/cl', now '.*/cl2'"):
        check(dataclasses.replace(cfg, facet_paths=(("cl", str(tmp_path / "cl2")),)))
    _save_facet(tmp_path / "cl", 0.5)  # the same folder, pretrained again
    with pytest.raises(ValueError, match=r"facets\.cl\.digest was '\w+', now '\w+'"):
        check(cfg)
    # A checkpoint saved before fingerprints existed still resumes, with a warning.
    with checkpoint.Checkpointer(tmp_path / "old") as ckpt:
        ckpt.save(4, {"x": np.zeros(2)}, {"step": 4, "seed": 3}, vocabs=vocabs)
        ckpt.wait()
    logged = []
    check(dataclasses.replace(cfg, dense_learning_rate=0.01), folder="old", log=logged.append)
    assert len(logged) == 1 and "without a run fingerprint" in logged[0], logged


def test_resume_names_a_checkpoint_of_another_trainer(tmp_path):
    """train_ranker in the workdir of pretrain_contrastive said "checkpoint is at step 506,
    past this run's 30 steps" (or "has no embedding layout" for an earlier step)."""
    from jax_recsys import checkpoint
    from jax_recsys.ranking import train

    _save_facet(tmp_path / "cl", 1.0)
    cfg = _fingerprint_config(tmp_path / "cl")
    facet = {"cl": checkpoint.load_facet(tmp_path / "cl")}
    # Saved before the trainer was recorded: its keys say whose it is.
    with checkpoint.Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(506, {"x": np.zeros(2)}, {"num_pairs": 64800, "seed": 3, "dim": 16,
                                            "step": 506, "epoch": 2, "step_in_epoch": 0})
    with checkpoint.Checkpointer(tmp_path / "ckpt", trainer="train_ranker") as ckpt:
        with pytest.raises(ValueError, match=r"ckpt/506: a pretrain_contrastive checkpoint, "
                           r"not a train_ranker one .*give train_ranker its own workdir"):
            train._check_resume(ckpt.restore_meta(), ckpt, config=cfg,
                                vocabs={"user_id": np.arange(5)}, total_steps=30,
                                fingerprint=train.run_fingerprint(cfg, facet))
