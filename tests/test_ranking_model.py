"""Ranker dense model, ESMM loss, param (de)serialisation and the serving score function."""

import dataclasses
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_recsys.quant import artifact
from jax_recsys.ranking import model as M


def _cfg(**kw):
    base = dict(
        entity_dims=(("user", 4), ("pin", 6)),
        coarse_vocab_sizes=(("hour", 3), ("device", 2)),
        coarse_dim=2,
        num_cross_layers=2,
        mlp_dims=(8,),
        head_dims=(4,),
    )
    base.update(kw)
    return M.RankerConfig(**base)


def _inputs(b=5):
    rng = np.random.default_rng(0)
    emb = {"user": rng.normal(size=(b, 4)).astype(np.float32), "pin": rng.normal(size=(b, 6)).astype(np.float32)}
    coarse = {"hour": np.array([0, 1, 2, 0, 1][:b]), "device": np.array([0, 1, 0, 1, 0][:b])}
    return emb, coarse


def test_esmm_loss_hand_computed():
    # pCTR = [0.5, 0.75], pCVR = [0.5, 0.5] -> pCTCVR = [0.25, 0.375]; ctcvr labels [1, 0].
    ctr_logit = jnp.array([0.0, math.log(3.0)])
    cvr_logit = jnp.array([0.0, 0.0])
    loss, aux = M.esmm_loss(
        ctr_logit=ctr_logit, cvr_logit=cvr_logit, click=jnp.array([1.0, 0.0]), conversion=jnp.array([1.0, 1.0])
    )
    bce_ctr = (-math.log(0.5) - math.log(0.25)) / 2
    bce_ctcvr = (-math.log(0.25) - math.log(1 - 0.375)) / 2
    np.testing.assert_allclose(float(aux["bce_ctr"]), bce_ctr, rtol=1e-5)
    np.testing.assert_allclose(float(aux["bce_ctcvr"]), bce_ctcvr, rtol=1e-5)
    np.testing.assert_allclose(float(loss), bce_ctr + bce_ctcvr, rtol=1e-5)
    # cvr_weight scales the second term; a masked example does not count.
    loss2, _ = M.esmm_loss(
        ctr_logit=ctr_logit, cvr_logit=cvr_logit, click=jnp.array([1.0, 0.0]),
        conversion=jnp.array([1.0, 1.0]), mask=jnp.array([1.0, 0.0]), cvr_weight=0.5,
    )
    np.testing.assert_allclose(float(loss2), -math.log(0.5) + 0.5 * -math.log(0.25), rtol=1e-5)


def test_esmm_loss_is_finite_for_extreme_logits():
    big = jnp.array([-80.0, 80.0, 80.0, -80.0])
    loss, aux = M.esmm_loss(
        ctr_logit=big, cvr_logit=-big, click=jnp.array([1.0, 0.0, 1.0, 0.0]),
        conversion=jnp.array([1.0, 0.0, 1.0, 1.0]),
    )
    assert np.isfinite(float(loss))
    g = jax.grad(lambda a: M.esmm_loss(ctr_logit=a, cvr_logit=-big, click=jnp.ones(4), conversion=jnp.ones(4))[0])(big)
    assert np.all(np.isfinite(np.asarray(g)))


def test_ctcvr_loss_keeps_its_gradient_when_both_heads_are_confident():
    """A click without conversion scored with ctr_logit 20 and cvr_logit 18..25: the
    loss is -log(1 - s(a) s(b)) exactly (a clamp at 1 - 1e-7 capped it at 16.12 with
    a zero gradient, so a saturated head could never recover)."""
    a = 20.0
    for b in (16.0, 18.0, 25.0):
        f = lambda cvr: M.esmm_log_probs(  # noqa: E731
            ctr_logit=jnp.float32(a), cvr_logit=cvr)["log_1m_ctcvr"]
        sa, sb = 1 / (1 + math.exp(-a)), 1 / (1 + math.exp(-b))
        exact = math.log((1 - sa) + sa * (1 - sb))  # log(1 - sa sb) without cancellation
        exact_grad = -sa * sb * (1 - sb) / math.exp(exact)
        np.testing.assert_allclose(float(f(jnp.float32(b))), exact, rtol=1e-5)
        np.testing.assert_allclose(float(jax.grad(f)(jnp.float32(b))), exact_grad, rtol=1e-4)


def test_cross_layer_hand_computed():
    layer = M.CrossLayer(2, 0, rngs=nnx.Rngs(0))
    layer.full.kernel[...] = jnp.eye(2)
    layer.full.bias[...] = jnp.array([1.0, 0.0])
    x0 = jnp.array([[1.0, 2.0]])
    x = jnp.array([[3.0, 4.0]])
    # x0 * (W x + b) + x = [1*(3+1), 2*4] + [3, 4] = [7, 12]
    np.testing.assert_allclose(np.asarray(layer(x0, x)), [[7.0, 12.0]])


def test_low_rank_cross_layer_shapes_and_value():
    layer = M.CrossLayer(3, 1, rngs=nnx.Rngs(0))
    layer.down.kernel[...] = jnp.ones((3, 1))
    layer.up.kernel[...] = jnp.ones((1, 3))
    layer.up.bias[...] = jnp.zeros(3)
    x = jnp.array([[1.0, 2.0, 3.0]])
    # U V^T x = 6 per coordinate -> x * 6 + x
    np.testing.assert_allclose(np.asarray(layer(x, x)), [[7.0, 14.0, 21.0]])


def test_model_outputs_and_config_json_round_trip():
    cfg = _cfg()
    assert M.RankerConfig.from_dict(cfg.to_dict()) == cfg
    graphdef, params = M.init_dense(cfg, seed=1)
    emb, coarse = _inputs()
    ctr, cvr = M.make_apply_fn(graphdef)(params, entity_emb=emb, coarse_ids=coarse)
    assert ctr.shape == (5,) and cvr.shape == (5,)
    assert not np.allclose(np.asarray(ctr), np.asarray(cvr))


def test_flatten_unflatten_and_score_fn_equal_the_model():
    cfg = _cfg(cross_rank=2, entity_norm="none")
    graphdef, params = M.init_dense(cfg, seed=3)
    flat = M.flatten_params(params)
    assert "trunk/0/kernel" in flat and all(isinstance(v, np.ndarray) for v in flat.values())
    emb, coarse = _inputs()
    # Full float32 matmuls: XLA's default is TF32 on GPUs, where the eager model
    # and the jitted score fn then differ by ~6e-4 relative (seen on an H200).
    with jax.default_matmul_precision("highest"):
        ref = M.make_apply_fn(graphdef)(params, entity_emb=emb, coarse_ids=coarse)
        unflat = M.unflatten_params(cfg, flat)
        back = M.make_apply_fn(graphdef)(unflat, entity_emb=emb, coarse_ids=coarse)
        score = jax.jit(M.make_score_fn(cfg.to_dict()))
        got = score(flat, entity_emb=emb, coarse_ids=coarse)
    for a, b, c in zip(ref, back, got, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-5, atol=1e-6)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="dim"):
        M.RankerConfig(entity_dims=(("user", 0),))
    with pytest.raises(ValueError, match="entity_norm"):
        M.RankerConfig(entity_dims=(("user", 2),), entity_norm="batchnorm")
    with pytest.raises(ValueError, match="at least one"):
        M.init_dense(M.RankerConfig())
    cfg = _cfg()
    graphdef, params = M.init_dense(cfg)
    emb, coarse = _inputs()
    with pytest.raises(KeyError, match="pin"):
        M.make_apply_fn(graphdef)(params, entity_emb={"user": emb["user"]}, coarse_ids=coarse)
    with pytest.raises(ValueError, match="width"):
        M.make_apply_fn(graphdef)(params, entity_emb={**emb, "pin": emb["user"]}, coarse_ids=coarse)
    flat = M.flatten_params(params)
    flat.pop("trunk/0/bias")
    with pytest.raises(ValueError, match="trunk/0/bias"):
        M.unflatten_params(cfg, flat)


@pytest.mark.parametrize("field", ["mlp_dims", "head_dims"])
@pytest.mark.parametrize("dims", [(0,), (-4,), (16, 0)])
def test_layer_widths_must_be_positive(field, dims):
    # (0,) used to end in ZeroDivisionError at init, (-4,) in a JAX TypeError.
    with pytest.raises(ValueError, match=rf"RankerConfig\.{field}: every layer width must be > 0"):
        M.RankerConfig(**{field: dims})
    M.RankerConfig(**{field: ()})  # no hidden layer is allowed


def test_save_and_load_ranker_round_trip(tmp_path):
    cfg = _cfg()
    _, params = M.init_dense(cfg)
    tables = {"user": np.arange(12, dtype=np.float32).reshape(3, 4),
              "pin": np.ones((2, 6), np.float32)}
    r = M.TrainedRanker(
        config=cfg, params=M.flatten_params(params), tables=tables,
        vocabs={"user": np.array([5, 7, 9]), "pin": np.array(["a", "b"])},
        entity_columns={"user": "user_id", "pin": "item_id"},
        facet_layout={"user": [("scratch", 4, True)], "pin": [("cl", 6, False)]},
    )
    M.save_ranker(tmp_path / "ranker", r)
    back = M.load_ranker(tmp_path / "ranker")
    assert back.config == cfg
    np.testing.assert_array_equal(back.tables["user"], tables["user"])
    np.testing.assert_array_equal(back.vocabs["pin"], ["a", "b"])
    assert back.facet_layout["pin"] == [("cl", 6, False)]
    for k, v in r.params.items():
        np.testing.assert_array_equal(back.params[k], v)


def test_save_ranker_replaces_the_folder_whole_or_not_at_all(tmp_path):
    """save_ranker wrote into PATH in place: a save that failed half-way left a mix of
    the old and the new ranker, a new save kept an old ranker's other files, and saving
    a ranker over the folder its tables are memory-mapped from truncated them."""
    cfg = _cfg()
    _, params = M.init_dense(cfg)
    r = M.TrainedRanker(
        config=cfg, params=M.flatten_params(params),
        tables={"user": np.arange(12, dtype=np.float32).reshape(3, 4)},
        vocabs={"user": np.array([5, 7, 9])}, entity_columns={"user": "user_id"},
        facet_layout={"user": [("scratch", 4, True)]})
    path = M.save_ranker(tmp_path / "ranker", r)
    (path / "tables" / "old_entity.npy").write_bytes(b"leftover")
    back = M.load_ranker(path)  # memory-mapped from path
    back.tables["user"] = back.tables["user"] * 2  # a new table to write over it
    M.save_ranker(path, back)
    assert not (path / "tables" / "old_entity.npy").exists()
    np.testing.assert_array_equal(M.load_ranker(path).tables["user"],
                                  np.arange(12, dtype=np.float32).reshape(3, 4) * 2)
    broken = dataclasses.replace(r, vocabs={})  # fails after the params are written
    with pytest.raises(KeyError):
        M.save_ranker(path, broken)
    np.testing.assert_array_equal(M.load_ranker(path).tables["user"],
                                  np.arange(12, dtype=np.float32).reshape(3, 4) * 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ranker"]  # no staging left


def test_save_ranker_of_entity_names_that_are_not_file_names(tmp_path):
    """Entity names may be a graph's entity types ('/people/person'). save_ranker built
    tables/<entity>.npy: '/people/person' and 'a/b' failed (FileNotFoundError), and
    '../../x' wrote its table outside the ranker folder, then its vocabulary over it."""
    names = ["/people/person", "a/b", "../../x", "User", "user", "pin"]
    cfg = M.RankerConfig(entity_dims=tuple((n, 2) for n in names), mlp_dims=(4,), head_dims=())
    _, params = M.init_dense(cfg)
    r = M.TrainedRanker(
        config=cfg, params=M.flatten_params(params),
        tables={n: np.full((2, 2), i, np.float32) for i, n in enumerate(names)},
        vocabs={n: np.array([10 * i, 10 * i + 1]) for i, n in enumerate(names)},
        entity_columns={n: f"c{i}" for i, n in enumerate(names)},
        facet_layout={n: [("scratch", 2, True)] for n in names},
    )
    path = M.save_ranker(tmp_path / "wd" / "ranker", r)
    back = M.load_ranker(path)
    for i, n in enumerate(names):
        np.testing.assert_array_equal(back.tables[n], np.full((2, 2), i))
        np.testing.assert_array_equal(back.vocabs[n], [10 * i, 10 * i + 1])
    assert sorted(p.name for p in (tmp_path / "wd").iterdir()) == ["ranker"]
    # _<index in insertion order>; 'User' and 'user' would share a file on macOS
    assert sorted(p.name for p in (path / "tables").iterdir()) == [
        "_0.npy", "_1.npy", "_2.npy", "_3.npy", "_4.npy", "pin.npy"]


def test_save_ranker_keeps_parameters_whose_file_names_would_coincide(tmp_path):
    """Leaf 'norms/a/b/scale' (entity 'a/b') and 'norms/a.b/scale' (entity 'a.b') were
    both saved as params/norms.a.b.scale.npy: the second overwrote the first and both
    loaded with its values, without a word; 'User' and 'user' share a file on macOS."""
    names = ["a/b", "a.b", "User", "user"]
    cfg = M.RankerConfig(entity_dims=tuple((n, 2) for n in names), mlp_dims=(4,), head_dims=())
    _, params = M.init_dense(cfg)
    flat = {k: np.asarray(v) for k, v in M.flatten_params(params).items()}
    for i, n in enumerate(names):
        flat[f"norms/{n}/scale"] = np.full(2, i, np.float32)
    r = M.TrainedRanker(
        config=cfg, params=flat, tables={n: np.zeros((2, 2), np.float32) for n in names},
        vocabs={n: np.arange(2) for n in names}, entity_columns={n: "c" for n in names},
        facet_layout={n: [("scratch", 2, True)] for n in names},
    )
    back = M.load_ranker(M.save_ranker(tmp_path / "ranker", r))
    for i, n in enumerate(names):
        np.testing.assert_array_equal(back.params[f"norms/{n}/scale"], [i, i])
    files = [p.name.casefold() for p in (tmp_path / "ranker" / "params").iterdir()]
    assert len(files) == len(set(files)) == len(flat)


def _saved_ranker(path):
    cfg = M.RankerConfig(entity_dims=(("user", 4),), mlp_dims=(4,), head_dims=())
    _, params = M.init_dense(cfg)
    return M.save_ranker(path, M.TrainedRanker(
        config=cfg, params=M.flatten_params(params), tables={"user": np.zeros((3, 4), np.float32)},
        vocabs={"user": np.arange(3)}, entity_columns={"user": "user_id"},
        facet_layout={"user": [("scratch", 4, True)]}))


@pytest.mark.parametrize("damage, message", [
    (lambda p: (p / "config.json").write_text("{"), r"config\.json: not valid JSON"),
    (lambda p: (p / "config.json").write_bytes(b"\xff"), r"config\.json: not valid JSON"),
    (lambda p: (p / "config.json").write_text('{"ranker": {}}'),
     r"config\.json: damaged, not a saved ranker's config \(KeyError: 'params'\)"),
    (lambda p: (p / "config.json").write_text("[]"), r"config\.json: damaged"),
    (lambda p: os.truncate(p / "tables" / "user.npy", 100), r"tables/user\.npy: unreadable or truncated"),
    (lambda p: os.truncate(p / "params" / "trunk_0_kernel.npy", 140),
     r"params/trunk_0_kernel\.npy: unreadable or truncated"),
    (lambda p: (p / "vocab" / "user.npy").write_bytes(b"\0" * 8), r"vocab/user\.npy: unreadable"),
])
def test_load_ranker_names_a_damaged_file(tmp_path, damage, message):
    """A damaged config.json was a JSONDecodeError ('Expecting property name ...'), a
    KeyError traceback or a UnicodeDecodeError, and a truncated table or parameter
    NumPy's 'mmap length is greater than file size' / 'Failed to read all data for
    array': none named the file (export_int4 printed them as its one error line)."""
    path = _saved_ranker(tmp_path / "ranker")
    damage(path)
    with pytest.raises(ValueError, match=message):
        M.load_ranker(path)


def test_saved_ranker_and_artifact_name_parameter_files_alike(tmp_path):
    """save_ranker named a leaf's file <leaf with / -> .>.npy (_<index>.npy on a clash)
    and the artifact <leaf, other characters -> _>.npy (_1, _2 on a clash): two schemes
    for one job. Both use fsutil.param_file_stems now."""
    names = ["/people/person", "a.b", "User", "user"]
    cfg = M.RankerConfig(entity_dims=tuple((n, 2) for n in names), mlp_dims=(4,),
                         head_dims=(), entity_norm="layernorm")
    _, params = M.init_dense(cfg)
    r = M.TrainedRanker(
        config=cfg, params=M.flatten_params(params),
        tables={n: np.zeros((2, 2), np.float32) for n in names},
        vocabs={n: np.arange(2) for n in names}, entity_columns={n: "c" for n in names},
        facet_layout={n: [("scratch", 2, True)] for n in names},
    )
    path = M.save_ranker(tmp_path / "ranker", r)
    saved = json.loads((path / "config.json").read_text())["params"]
    m = artifact.write_artifact(tmp_path / "art", tables={}, vocabs={}, ranker_params=r.params)
    assert {k: v.removeprefix("params/") for k, v in saved.items()} == {
        k: v.removeprefix("ranker/params/") for k, v in m.ranker["params"].items()}
    assert saved["trunk/0/kernel"] == "params/trunk_0_kernel.npy"
    assert saved["norms//people/person/scale"] == "params/norms__people_person_scale.npy"
    assert saved["norms/user/scale"] == "params/norms_user_scale_1.npy"  # User's, casefolded


def test_a_parameter_of_an_entity_with_a_long_name_is_saved(tmp_path):
    """A leaf holds its entity's name ('norms/<entity>/scale'): one of 300 characters
    made a file name over the file system's 255 bytes (OSError: File name too long)
    in save_ranker and write_artifact; the stem is cut to 120 characters now."""
    name = "e" * 300
    cfg = M.RankerConfig(entity_dims=((name, 2),), mlp_dims=(4,), head_dims=(),
                         entity_norm="layernorm")
    _, params = M.init_dense(cfg)
    flat = M.flatten_params(params)
    flat[f"norms/{name}/scale"] = np.full(2, 3.0, np.float32)
    r = M.TrainedRanker(
        config=cfg, params=flat, tables={name: np.zeros((2, 2), np.float32)},
        vocabs={name: np.arange(2)}, entity_columns={name: "c"},
        facet_layout={name: [("scratch", 2, True)]},
    )
    back = M.load_ranker(M.save_ranker(tmp_path / "ranker", r))
    np.testing.assert_array_equal(back.params[f"norms/{name}/scale"], [3.0, 3.0])
    m = artifact.write_artifact(tmp_path / "art", tables={}, vocabs={}, ranker_params=flat)
    stem = f"ranker/params/norms_{'e' * 114}"  # cut alike: the first leaf in sorted order keeps it
    assert m.ranker["params"][f"norms/{name}/bias"] == f"{stem}.npy"
    assert m.ranker["params"][f"norms/{name}/scale"] == f"{stem}_1.npy"
    art = artifact.load_artifact(tmp_path / "art")
    np.testing.assert_array_equal(art.ranker_params[f"norms/{name}/scale"], [3.0, 3.0])


def test_a_ranker_saved_with_the_old_parameter_file_names_still_loads(tmp_path):
    """Rankers saved before param_file_stems have <leaf with / -> .>.npy files (and
    _<index>.npy on a clash): load_ranker reads the file config.json records."""
    path = _saved_ranker(tmp_path / "ranker")
    want = {k: np.array(v) for k, v in M.load_ranker(path).params.items()}
    meta = json.loads((path / "config.json").read_text())
    for i, (leaf, rel) in enumerate(sorted(meta["params"].items())):
        old = f"params/_{i}.npy" if i == 0 else f"params/{leaf.replace('/', '.')}.npy"
        os.rename(path / rel, path / old)
        meta["params"][leaf] = old
    (path / "config.json").write_text(json.dumps(meta))
    assert sorted(p.name for p in (path / "params").iterdir())[:2] == [
        "_0.npy", "cross.0.full.kernel.npy"]
    back = M.load_ranker(path)
    assert back.params.keys() == want.keys()
    for k, v in want.items():
        np.testing.assert_array_equal(back.params[k], v)


@pytest.mark.parametrize("ids, dtype", [
    (np.array([5, 7, 2**40], dtype=object), np.int64),
    (np.array([np.int32(5), 7, 9], dtype=object), np.int64),
    (np.array(["u5", "u7", "u9"], dtype=object), np.str_),
])
def test_an_object_vocabulary_round_trips_exactly(tmp_path, ids, dtype):
    """An object vocabulary (a TrainedRanker built by hand) was saved with
    astype(np.str_): Python ints came back as '5', '7', ..., no longer equal to the
    data's int64 ids (raw-id lookups found none of them)."""
    path = _saved_ranker(tmp_path / "ranker")
    r = dataclasses.replace(M.load_ranker(path), vocabs={"user": ids})
    back = M.load_ranker(M.save_ranker(tmp_path / "again", r))
    assert back.vocabs["user"].dtype.kind == np.dtype(dtype).kind
    assert back.vocabs["user"].tolist() == ids.tolist()


@pytest.mark.parametrize("ids, message", [
    (np.array([5, "a", 9], dtype=object), "an object array holding int, str"),
    (np.array([5, 7, None], dtype=object), "an object array holding NoneType, int"),
    (np.array([5, 7, 2**70], dtype=object), "an id is beyond the int64 range"),
])
def test_a_vocabulary_that_cannot_round_trip_is_refused_at_save(tmp_path, ids, message):
    """A mixed object vocabulary was saved as strings ([5, 'a', 9] -> ['5', 'a', '9']),
    silently: its ints no longer matched the data's ids. It is refused now, and the
    ranker saved at the path before is left as it was."""
    path = _saved_ranker(tmp_path / "ranker")
    r = dataclasses.replace(M.load_ranker(path, mmap=False), vocabs={"user": ids})
    with pytest.raises(ValueError, match=f"ranker vocabulary of entity 'user': {message}"):
        M.save_ranker(path, r)
    np.testing.assert_array_equal(M.load_ranker(path).vocabs["user"], np.arange(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ranker"]  # no staging left


def test_load_ranker_refuses_a_symlink_that_leads_outside_its_folder(tmp_path):
    """config.json's paths were checked as text only: a file of the ranker replaced by a
    symlink to a file elsewhere was loaded from there."""
    path = _saved_ranker(tmp_path / "ranker")
    rel = json.loads((path / "config.json").read_text())["params"]["trunk/0/kernel"]
    os.rename(path / rel, tmp_path / "x.npy")
    os.symlink(tmp_path / "x.npy", path / rel)
    with pytest.raises(ValueError) as e:
        M.load_ranker(path)
    assert str(e.value) == (
        f"{path / 'config.json'}: names {rel!r}, which a symlink leads outside {path} (to "
        f"{os.path.realpath(tmp_path / 'x.npy')}); a saved ranker holds its own files: put the file itself "
        "there, or save the ranker again")


@pytest.mark.parametrize("rel", ["../x.npy", "ABS", 5])
def test_load_ranker_reads_only_files_inside_its_folder(tmp_path, rel):
    """config.json's paths were joined to the folder as they were: an edited '../x.npy'
    or an absolute path loaded that file from outside the ranker, and a path that is
    not a string was a TypeError traceback ('unsupported operand type(s) for /')."""
    path = _saved_ranker(tmp_path / "ranker")
    meta = json.loads((path / "config.json").read_text())
    np.save(tmp_path / "x.npy", np.load(path / meta["params"]["trunk/0/kernel"]))
    meta["params"]["trunk/0/kernel"] = str(tmp_path / "x.npy") if rel == "ABS" else rel
    (path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"config\.json: names .*, not a relative path of a "
                                         "file inside"):
        M.load_ranker(path)
