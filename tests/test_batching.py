"""Tests for jax_recsys.data.batching: exact batch contents, padding, multi-hot,
epoch permutations, exact resume from state(), per-process slices, and Batch as a pytree."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_recsys.data.batching import Batch, BatchIterator, pad_batch
from jax_recsys.data.vocab import Vocab
from jax_recsys.embedding import lookup, specs


def _columns(n=10):
    return {
        "user": np.arange(n, dtype=np.int64),
        "item": np.arange(n, dtype=np.int64) * 10,
        "price": np.arange(n, dtype=np.float64) / 2,
        "click": (np.arange(n) % 2).astype(np.int64),
    }


def _it(cols, **kw):
    base = dict(batch_size=4, id_features=["user", "item"], dense_features=["price"],
                label_features=["click"])
    base.update(kw)
    return BatchIterator(cols, **base)


def test_unshuffled_batches_exact_and_padded_remainder():
    it = _it(_columns(), shuffle=False, drop_remainder=False, num_epochs=1)
    assert len(it) == 3
    batches = list(it)
    assert len(batches) == 3
    b0, b2 = batches[0], batches[2]
    np.testing.assert_array_equal(b0.ids["user"], [0, 1, 2, 3])
    np.testing.assert_array_equal(b0.ids["item"], [0, 10, 20, 30])
    assert b0.ids["user"].dtype == np.int32 and b0.dense["price"].dtype == np.float32
    np.testing.assert_array_equal(b0.labels["click"], [0, 1, 0, 1])
    # Last batch: 2 real rows, 2 padding rows.
    np.testing.assert_array_equal(b2.ids["user"], [8, 9, -1, -1])
    np.testing.assert_array_equal(b2.dense["price"], [4.0, 4.5, 0, 0])
    np.testing.assert_array_equal(b2.labels["click"], [0, 1, 0, 0])
    np.testing.assert_array_equal(b2.mask, [1, 1, 0, 0])
    assert b2.num_valid() == 2


def test_drop_remainder_and_epochs_cover_each_example_once():
    it = _it(_columns(10), shuffle=True, seed=3, num_epochs=2)
    assert len(it) == 2
    batches = list(it)
    assert len(batches) == 4
    e0 = np.concatenate([b.ids["user"] for b in batches[:2]])
    e1 = np.concatenate([b.ids["user"] for b in batches[2:]])
    assert len(set(e0.tolist())) == 8 and len(set(e1.tolist())) == 8
    assert not np.array_equal(e0, e1)  # a new permutation each epoch
    # Rows stay aligned across columns after shuffling.
    for b in batches:
        np.testing.assert_array_equal(b.ids["item"], b.ids["user"] * 10)
        np.testing.assert_array_equal(b.labels["click"], b.ids["user"] % 2)
    # Same seed -> same stream.
    again = list(_it(_columns(10), shuffle=True, seed=3, num_epochs=2))
    for a, b in zip(batches, again, strict=True):
        np.testing.assert_array_equal(a.ids["user"], b.ids["user"])


def test_resume_equals_uninterrupted_stream():
    cols = _columns(23)
    full = _it(cols, seed=7, num_epochs=3, drop_remainder=False)
    want = [b.ids["user"].copy() for b in full]
    assert len(want) == 18
    for cut in (1, 5, 6, 11):
        first = _it(cols, seed=7, num_epochs=3, drop_remainder=False)
        got = [next(first).ids["user"] for _ in range(cut)]
        state = first.state()
        resumed = _it(cols, seed=7, num_epochs=3, drop_remainder=False)
        resumed.restore(state)
        got += [b.ids["user"] for b in resumed]
        assert len(got) == len(want)
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="seed"):
        _it(cols, seed=8).restore(state)


def test_process_slices_concatenate_to_global_batch():
    cols = _columns(22)
    single = list(_it(cols, batch_size=8, seed=1, num_epochs=1, drop_remainder=False))
    per_proc = [list(_it(cols, batch_size=8, seed=1, num_epochs=1, drop_remainder=False,
                         process_index=p, process_count=4)) for p in range(4)]
    assert all(len(x) == len(single) == 3 for x in per_proc)
    for i, b in enumerate(single):
        parts = [per_proc[p][i] for p in range(4)]
        assert all(x.ids["user"].shape == (2,) for x in parts)
        np.testing.assert_array_equal(np.concatenate([x.ids["user"] for x in parts]),
                                      b.ids["user"])
        np.testing.assert_array_equal(np.concatenate([x.mask for x in parts]), b.mask)
    with pytest.raises(ValueError, match="divisible"):
        _it(cols, batch_size=6, process_count=4)


def test_multi_hot_ragged_padding_and_truncation():
    # Example 0: [5, 6]; 1: []; 2: [7, 8, 9, 1] (truncated to 3).
    values = np.array([5, 6, 7, 8, 9, 1])
    offsets = np.array([0, 2, 2, 6])
    cols = {"user": np.arange(3), "topics": (values, offsets)}
    it = BatchIterator(cols, batch_size=3, id_features=["user", "topics"],
                       multi_hot={"topics": 3}, shuffle=False, num_epochs=1)
    b = next(it)
    np.testing.assert_array_equal(b.ids["topics"], [[5, 6, -1], [-1, -1, -1], [7, 8, 9]])
    assert b.ids["topics"].dtype == np.int32
    # [6, 1] values gave [3, 3, 1] batches; float offsets were truncated (2.5 -> 2).
    for bad in ((values[:, None], offsets), (values, np.array([0, 2.5, 2, 6]))):
        with pytest.raises(ValueError, match="'topics': values must be 1-D and offsets integers"):
            BatchIterator({**cols, "topics": bad}, batch_size=3, id_features=["user", "topics"],
                          multi_hot={"topics": 3})


def test_pad_batch_and_pytree():
    b = Batch(ids={"u": np.array([3, 4], np.int32)}, dense={"x": np.ones((2, 2), np.float32)},
              labels={"y": np.array([1.0, 0.0], np.float32)}, mask=np.ones(2, np.float32))
    p = pad_batch(b, 4)
    np.testing.assert_array_equal(p.ids["u"], [3, 4, -1, -1])
    np.testing.assert_array_equal(p.dense["x"], [[1, 1], [1, 1], [0, 0], [0, 0]])
    np.testing.assert_array_equal(p.mask, [1, 1, 0, 0])
    leaves = jax.tree_util.tree_leaves(p)
    assert len(leaves) == 4

    @jax.jit
    def masked_label_sum(batch):
        return jnp.sum(batch.labels["y"] * batch.mask) + jnp.sum(batch.ids["u"] >= 0)

    assert float(masked_label_sum(p)) == 3.0
    with pytest.raises(ValueError, match="more than batch_size"):
        pad_batch(p, 3)


def test_bad_inputs_name_the_column():
    cols = _columns(10)
    with pytest.raises(ValueError, match="'nope' not found"):
        _it(cols, id_features=["nope"])
    with pytest.raises(ValueError, match="'item' has 9 rows"):
        _it({**cols, "item": cols["item"][:9]})
    with pytest.raises(ValueError, match="'user' must hold integer"):
        _it({**cols, "user": cols["user"].astype(np.float32)})
    with pytest.raises(ValueError, match="outside"):
        _it({**cols, "user": cols["user"] + 2**31})
    with pytest.raises(ValueError, match="no full batch"):
        _it(cols, batch_size=11)
    for seed in (-1, 1.5, True):
        with pytest.raises(ValueError, match=f"seed must be an integer >= 0, got {seed}"):
            _it(cols, seed=seed)
    # 1.5 epochs ran 2 whole epochs (the iterator stops only at an epoch boundary).
    for n in (1.5, 0, True):
        with pytest.raises(ValueError, match=rf"num_epochs must be a whole number >= 1 or None, "
                                             rf"got {n}$"):
            _it(cols, num_epochs=n)
    assert len(list(_it(cols, num_epochs=np.int64(2)))) == 4  # 2 batches of 4 from 10 rows, twice


def test_ids_below_minus_one_are_oov_not_an_error():
    # Vocab.lookup(..., unknown=-2) routes unknown ids to an id_mode="oov" OOV row.
    v = Vocab.build(["a", "b", "c"])
    rows = v.lookup(np.array(["a", "zz", "c", "b"]), unknown=-2)
    np.testing.assert_array_equal(rows, [0, -2, 2, 1])
    tags = (np.array([-2, 1, -5, 0]), np.array([0, 2, 4, 4, 4]))  # ragged, also < -1
    it = BatchIterator({"item": rows, "tags": tags, "click": np.ones(4)}, batch_size=2,
                       id_features=["item", "tags"], multi_hot={"tags": 3},
                       label_features=["click"], shuffle=False, num_epochs=1)
    b0, b1 = list(it)
    np.testing.assert_array_equal(b0.ids["item"], [0, -2])
    np.testing.assert_array_equal(b1.ids["item"], [2, 1])
    np.testing.assert_array_equal(b0.ids["tags"], [[-2, 1, -1], [-5, 0, -1]])
    assert b0.ids["item"].dtype == np.int32
    feat = specs.FeatureSpec(name="item", table="t", id_mode="oov")
    got = lookup.map_ids(np.concatenate([b0.ids["item"], b1.ids["item"]]), feature=feat, rows=4)
    np.testing.assert_array_equal(np.asarray(got), [0, 3, 2, 1])  # -2 -> OOV row R-1 = 3
    with pytest.raises(ValueError, match="outside int32"):
        _it({**_columns(10), "user": _columns(10)["user"] - 2**31 - 1})
