"""KG training: hand-computed losses, type-constrained chunk sampling, planted-graph MRR,
sharded == unsharded losses."""

import math

import jax
import numpy as np
import pytest

from jax_recsys.data.kg import KnowledgeGraph
from jax_recsys.data.vocab import Vocab
from jax_recsys.pretrain import kg_train


def _mesh(n):
    return jax.sharding.Mesh(np.array(jax.devices()[:n]), ("data",))


# ----------------------------------------------------------------------------- losses


def test_logistic_loss_hand_computed():
    got = kg_train.logistic_loss(pos=np.array([0.0, 7.0]), neg=np.array([[0.0, 0.0, 5.0]] * 2),
                                 neg_mask=np.array([[1, 1, 0]] * 2), weight=np.array([1.0, 0.0]))
    # Only the first positive counts: softplus(0) + mean(softplus(0), softplus(0)).
    np.testing.assert_allclose(got, 2 * math.log(2), rtol=1e-6)


def test_self_adversarial_weights():
    # neg = (0, ln 3), temperature 1 -> weights (1/4, 3/4).
    got = kg_train.logistic_loss(pos=np.array([0.0]), neg=np.array([[0.0, math.log(3)]]),
                                 neg_mask=np.array([[1, 1]]), weight=np.array([1.0]),
                                 adversarial_temperature=1.0)
    want = math.log(2) + 0.25 * math.log(2) + 0.75 * math.log(4)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_softmax_loss_hand_computed():
    got = kg_train.softmax_loss(pos=np.array([1.0]), neg=np.array([[0.0, 100.0]]),
                                neg_mask=np.array([[1, 0]]), weight=np.array([1.0]))
    np.testing.assert_allclose(got, math.log(1 + math.exp(-1)), rtol=1e-6)


def test_margin_loss_hand_computed():
    got = kg_train.margin_loss(pos=np.array([1.0]), neg=np.array([[0.5, 2.0, 9.0]]),
                               neg_mask=np.array([[1, 1, 0]]), weight=np.array([1.0]), margin=1.0)
    np.testing.assert_allclose(got, (0.5 + 2.0) / 2, rtol=1e-6)


# ----------------------------------------------------------------------------- planted graph


def planted_graph(seed=0, users=96, pins=96, boards=8, per_user=6):
    """Users like pins of "their" board cluster; pins sit on boards. Held-out likes are test."""
    rng = np.random.default_rng(seed)
    pin_board = np.arange(pins) % boards
    user_board = rng.integers(0, boards, users)
    likes = []
    for u in range(users):
        cand = np.flatnonzero(pin_board == user_board[u])
        for p in rng.choice(cand, per_user, replace=False):
            likes.append((u, 0, p))
    likes = np.array(likes)
    on_board = np.stack([np.arange(pins), np.ones(pins, int), pin_board], 1)
    perm = rng.permutation(len(likes))
    n_test = len(likes) // 6
    test, valid, train = likes[perm[:n_test]], likes[perm[n_test:2 * n_test]], likes[perm[2 * n_test:]]
    return make_graph({"user": users, "pin": pins, "board": boards}, ["likes", "on_board"],
                      ["user", "pin"], ["pin", "board"],
                      {"train": np.concatenate([train, on_board]), "valid": valid, "test": test})


def make_graph(num_rows, relations, head_types, tail_types, splits):
    return KnowledgeGraph(
        entity_types=tuple(sorted(num_rows)),
        vocabs={t: Vocab(np.arange(n)) for t, n in num_rows.items()},
        relations=tuple(relations), rel_head_type=tuple(head_types),
        rel_tail_type=tuple(tail_types), splits=splits)


def test_sampler_type_constraints_and_coverage():
    g = planted_graph()
    # Give the types very different sizes so a wrongly typed draw would show.
    g = make_graph({"user": 96, "pin": 1000, "board": 8}, g.relations, g.rel_head_type,
                   g.rel_tail_type, g.splits)
    cfg = kg_train.KGTrainConfig(chunk_size=5, uniform_negatives=7, chunks_per_batch=4)
    s = kg_train.ChunkSampler(g.splits["train"], rel_head_type=g.rel_head_type,
                              rel_tail_type=g.rel_tail_type, num_rows=g.num_rows, config=cfg)
    train = {tuple(x) for x in g.splits["train"].tolist()}
    for epoch in range(3):
        seen = []
        batches = list(s.epoch(epoch))
        assert len(batches) == len(s)
        max_neg = {"board": 0, "pin": 0}
        for b in batches:
            (hk,) = [k for k in b.ids if k.endswith("/head")]
            (tk,) = [k for k in b.ids if k.endswith("/tail")]
            rel = b.ids["rel"]
            # Relation-homogeneous chunks whose types match the batch's features.
            assert {(g.rel_head_type[r], g.rel_tail_type[r]) for r in rel} == {
                (hk.split("/")[0], tk.split("/")[0])}
            h = b.ids[hk].reshape(4, 12)
            t = b.ids[tk].reshape(4, 12)
            assert h.min() >= 0 and h.max() < g.num_rows[hk.split("/")[0]]
            assert t.min() >= 0 and t.max() < g.num_rows[tk.split("/")[0]]
            tt = tk.split("/")[0]
            max_neg[tt] = max(max_neg[tt], t[:, 5:].max())
            m = b.mask.reshape(4, 5) > 0
            for k in range(4):
                for i in np.flatnonzero(m[k]):
                    seen.append((h[k, i], rel[k], t[k, i]))
        assert all(x in train for x in seen)
        assert sorted(seen) == sorted(train)  # every triple exactly once per epoch
        # Uniform pin negatives really range over the 1000 pins; board ones stay below 8.
        assert max_neg["pin"] > 500 and max_neg["board"] < 8


def test_training_on_planted_graph_beats_random():
    g = planted_graph()
    cfg = kg_train.KGTrainConfig(chunk_size=16, uniform_negatives=16, chunks_per_batch=4,
                                 num_epochs=30, entity_learning_rate=0.05, log_every=10_000)
    res = kg_train.train(g, model=kg_train.KGModelConfig(model="distmult", dim=32),
                         train_config=cfg, mesh=_mesh(1), log_fn=lambda d: None)
    m = kg_train.evaluate_state(g, state=res.state, collection=res.collection,
                                model=kg_train.KGModelConfig(model="distmult", dim=32))
    # Random scores: realistic ranks are uniform over the ~90 unfiltered candidates.
    random_mrr = np.mean(1.0 / (1 + np.arange(90) * 1.0))
    assert m["tail_mrr"] > 0.3 > 5 * random_mrr, m
    assert m["mrr"] > 0.2, m


@pytest.mark.slow
@pytest.mark.parametrize("model", ["transe", "complex", "rotate", "transr"])
def test_each_model_trains(model):
    full = planted_graph()
    likes = full.splits["train"][full.splits["train"][:, 1] == 0]
    g = make_graph({"user": 96, "pin": 96}, ["likes"], ["user"], ["pin"], {"train": likes})
    cfg = kg_train.KGTrainConfig(chunk_size=8, uniform_negatives=8, chunks_per_batch=4,
                                 num_epochs=10, max_steps=60, log_every=1, loss="logistic",
                                 adversarial_temperature=0.5 if model == "rotate" else 0.0)
    hist = []
    kg_train.train(g, model=kg_train.KGModelConfig(model=model, dim=16, gamma=2.0),
                   train_config=cfg, mesh=_mesh(1), log_fn=hist.append)
    losses = [h["loss"] for h in hist]
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    assert last < 0.9 * first, (first, last)


@pytest.mark.slow
def test_sharded_equals_unsharded():
    """8 devices (row-sharded tables, chunk-sharded batch) == 1 device: losses, tables, MRR."""
    g = planted_graph()
    cfg = kg_train.KGTrainConfig(chunk_size=4, uniform_negatives=3, chunks_per_batch=8,
                                 num_epochs=1, max_steps=6, log_every=1)
    model = kg_train.KGModelConfig(model="complex", dim=8)
    out = {}
    for n in (1, 8):
        hist = []
        res = kg_train.train(g, model=model, train_config=cfg, mesh=_mesh(n), log_fn=hist.append)
        ev = kg_train.evaluate_state(g, state=res.state, collection=res.collection, model=model)
        out[n] = ([h["loss"] for h in hist], kg_train.entity_tables(res), ev)
    np.testing.assert_allclose(out[1][0], out[8][0], rtol=1e-5)
    assert out[1][0][-1] != out[1][0][0]  # it trained
    for t in out[1][1]:
        np.testing.assert_allclose(out[1][1][t], out[8][1][t], rtol=1e-4, atol=1e-6)
    assert out[1][2] == pytest.approx(out[8][2], abs=1e-6)


def test_chunks_must_divide_devices():
    g = planted_graph()
    cfg = kg_train.KGTrainConfig(chunks_per_batch=3)
    with pytest.raises(ValueError, match="multiple of the 8 devices"):
        kg_train.train(g, model=kg_train.KGModelConfig(dim=8), train_config=cfg, mesh=_mesh(8))


def _tiny_graph():
    rng = np.random.default_rng(0)
    tr = np.stack([rng.integers(0, 20, 64), np.zeros(64, int), rng.integers(0, 20, 64)], 1)
    return KnowledgeGraph(entity_types=("e",), vocabs={"e": Vocab(np.arange(20))},
                          relations=("r",), rel_head_type=("e",), rel_tail_type=("e",),
                          splits={"train": tr})


def test_log_every_zero_never_logs():
    # 64 triples, 2 chunks of 8 per batch: 4 steps, none logged (used to divide by 0).
    cfg = kg_train.KGTrainConfig(chunk_size=8, uniform_negatives=4, chunks_per_batch=2,
                                 num_epochs=1, log_every=0)
    hist = []
    res = kg_train.train(_tiny_graph(), model=kg_train.KGModelConfig(dim=8), train_config=cfg,
                         mesh=_mesh(1), log_fn=hist.append)
    assert int(res.state.step) == 4
    assert hist == []


def test_config_rejects_negative_intervals_and_unused_adversarial_temperature():
    with pytest.raises(ValueError, match="log_every and eval_every_epochs must be >= 0"):
        kg_train.KGTrainConfig(log_every=-1)
    with pytest.raises(ValueError, match="log_every and eval_every_epochs must be >= 0"):
        kg_train.KGTrainConfig(eval_every_epochs=-2)
    with pytest.raises(ValueError, match="adversarial_temperature must be >= 0"):
        kg_train.KGTrainConfig(loss="logistic", adversarial_temperature=-1.0)
    # The softmax loss has no negative weights: the temperature would be ignored.
    with pytest.raises(ValueError, match="no effect with loss='softmax'"):
        kg_train.KGTrainConfig(loss="softmax", adversarial_temperature=1.0)
    for loss in ("logistic", "margin"):
        assert kg_train.KGTrainConfig(loss=loss, adversarial_temperature=1.0).loss == loss


@pytest.mark.parametrize("field", ["margin", "regularization", "relation_learning_rate"])
@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf])
def test_config_rejects_negative_or_non_finite_rates_and_weights(field, bad):
    # Were accepted: NaN ended training with a FloatingPointError traceback, -1 trained to
    # the end (relation_learning_rate=-1: relations trained up the loss).
    with pytest.raises(ValueError, match=rf"^{field} must be a finite number >= 0, got {bad}$"):
        kg_train.KGTrainConfig(loss="margin", **{field: bad})
    assert getattr(kg_train.KGTrainConfig(loss="margin", **{field: 0.0}), field) == 0.0


def test_config_rejects_zero_steps():
    """max_steps=0 would write an untrained facet; None (not 0) means no limit."""
    for bad in (0, -2):
        with pytest.raises(ValueError, match=rf"max_steps must be >= 1 or None \(no limit\), got {bad}"):
            kg_train.KGTrainConfig(max_steps=bad)
    with pytest.raises(ValueError, match="num_epochs must be >= 1, got 0"):
        kg_train.KGTrainConfig(num_epochs=0)
    # Was NumPy's "expected non-negative integer" (no name) at the first training step.
    with pytest.raises(ValueError, match=r"^seed must be >= 0, got -1$"):
        kg_train.KGTrainConfig(seed=-1)
    assert kg_train.KGTrainConfig(max_steps=None).max_steps is None
    assert kg_train.KGTrainConfig(max_steps=1).max_steps == 1


def test_config_names_the_checkpoint_setting_that_is_out_of_range():
    """Was one message for both ('checkpoint_every must be >= 0 and keep_checkpoints >= 1,
    got 0, 0'); each is named alone now, in the ranker's words."""
    with pytest.raises(ValueError, match=r"^keep_checkpoints must be >= 1, got 0$"):
        kg_train.KGTrainConfig(keep_checkpoints=0)
    with pytest.raises(ValueError,
                       match=r"^checkpoint_every must be >= 0 \(0: no checkpoints\), got -1$"):
        kg_train.KGTrainConfig(checkpoint_every=-1)


def test_model_config_rejects_bad_dims_when_made():
    """Checked when the config is made, not first when training builds the tables."""
    for bad in (0, -4):
        with pytest.raises(ValueError, match=rf"KGModelConfig.dim .*must be > 0, got {bad}"):
            kg_train.KGModelConfig(dim=bad)
    with pytest.raises(ValueError, match="rel_dim must be positive"):
        kg_train.KGModelConfig(model="transr", dim=8, rel_dim=0)
    with pytest.raises(ValueError, match="must be even"):
        kg_train.KGModelConfig(model="rotate", dim=7)
    with pytest.raises(ValueError, match="unknown KG model"):
        kg_train.KGModelConfig(model="nope")
    for bad in (math.nan, math.inf):  # were NaN scores: a FloatingPointError at step 1
        with pytest.raises(ValueError, match=rf"gamma must be a finite number, got {bad}"):
            kg_train.KGModelConfig(model="transe", dim=8, gamma=bad)
    assert kg_train.KGModelConfig(model="transe", dim=8, gamma=-2.0).gamma == -2.0
