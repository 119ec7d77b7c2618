"""Sampled-softmax loss for user–pin contrastive pretraining (pure, keyword-only).

Each example i is a (user, positive pin) pair. Its candidates are every positive
pin in the batch (in-batch negatives) plus, optionally, extra uniformly sampled pins
shared by the whole batch (mixed negative sampling, Yang et al. 2020). The logit of
candidate j for example i is

    s_ij = <u_i, p_j> / temperature - log q_j

where `log q_j` is the logQ correction (Yi et al. 2019): the log of how often pin j
is expected to be a candidate, so popular pins are not over-penalised merely for
showing up as negatives often. The correction is applied after the temperature and
to every candidate, the positive included (as TF-Recommenders does).

Accidental hits are removed by pushing their logits to `MASKED_LOGIT`: for example
i, an in-batch column j != i is not a negative when it is the same pin as i's
positive (a duplicate positive) or when it belongs to the same user (it is one of
that user's positives). An extra negative equal to i's positive pin is masked too.
Padding examples (mask 0) are neither anchors nor candidates.

The loss is the weighted mean of per-example cross entropies,
sum_i w_i m_i CE_i / sum_i w_i m_i, so per-example weights (engagement type,
conversions) change how much a pair counts relative to the others.

The loss and accuracy are computed in row blocks that stay in cache, with the
gradients produced by the same pass (`_weighted_ce_sum`, a custom VJP): no
[B, B + N] array is written in the train step. `sharded_loss_and_acc` is the same
loss with each device scoring its own rows against the gathered candidates.

Legend: B batch, D embedding dim, N extra (uniformly sampled) negatives, C = B + N
candidate columns, T rows per block.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

# Finite, so masked rows never produce inf - inf; far below any real logit.
MASKED_LOGIT = -1e9


def sampled_softmax_loss(
    *,
    user_bd: jax.Array,
    pin_bd: jax.Array,
    temperature: float,
    pin_log_q_b: jax.Array | None = None,
    user_ids_b: jax.Array | None = None,
    pin_ids_b: jax.Array | None = None,
    remove_accidental_hits: bool = False,
    weights_b: jax.Array | None = None,
    mask_b: jax.Array | None = None,
    neg_pin_nd: jax.Array | None = None,
    neg_log_q_n: jax.Array | None = None,
    neg_ids_n: jax.Array | None = None,
    neg_mask_n: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """In-batch sampled softmax with logQ correction and accidental-hit removal.

    Args:
      user_bd: [B, D] user (query) embeddings; row i is example i's user.
      pin_bd: [B, D] positive pin embeddings; row i is example i's positive, and
        every row is a candidate (negative) for the other examples.
      temperature: logits are divided by it (smaller = sharper).
      pin_log_q_b: optional [B] log expected candidate frequency of each in-batch
        pin (logQ correction); None disables the correction.
      user_ids_b: [B] user ids (any consistent integer id), needed when
        `remove_accidental_hits` is set.
      pin_ids_b: [B] pin ids, needed when `remove_accidental_hits` is set or
        `neg_ids_n` is given.
      remove_accidental_hits: mask in-batch columns that are the same pin as the
        row's positive, or another positive of the same user.
      weights_b: optional [B] per-example weights (default 1).
      mask_b: optional [B] 1 for real examples, 0 for padding (default all 1).
      neg_pin_nd: optional [N] x [D] extra negative pin embeddings shared by the
        batch (mixed negative sampling).
      neg_log_q_n: optional [N] log expected candidate frequency of the extra
        negatives (needed when `pin_log_q_b` is given and negatives are used).
      neg_ids_n: optional [N] pin ids of the extra negatives; an extra negative
        equal to a row's positive pin is masked for that row.
      neg_mask_n: optional [N] 1 for real extra negatives, 0 for padding.

    Returns:
      (loss, aux): the scalar weighted mean cross entropy, and a dict with
      `ce_b` [B] per-example cross entropy (0 at padding), `logits` [B, B + N]
      (masked entries at MASKED_LOGIT) and `acc` the weighted fraction of
      examples whose positive has the highest logit (ties count as correct).
    """
    if user_bd.ndim != 2 or pin_bd.shape != user_bd.shape:
        raise ValueError(
            f"user_bd and pin_bd must both be [B, D]; got {user_bd.shape} and {pin_bd.shape}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    b = user_bd.shape[0]
    f32 = jnp.float32
    mask_b = jnp.ones((b,), f32) if mask_b is None else mask_b.astype(f32)
    weights_b = jnp.ones((b,), f32) if weights_b is None else weights_b.astype(f32)

    if remove_accidental_hits and (user_ids_b is None or pin_ids_b is None):
        raise ValueError("remove_accidental_hits needs user_ids_b and pin_ids_b")
    cand_cd, bias_c, rows, cols = _columns(
        pin_bd=pin_bd, mask_b=mask_b, pin_log_q_b=pin_log_q_b, user_ids_b=user_ids_b,
        pin_ids_b=pin_ids_b, remove_accidental_hits=remove_accidental_hits,
        neg_pin_nd=neg_pin_nd, neg_log_q_n=neg_log_q_n, neg_ids_n=neg_ids_n,
        neg_mask_n=neg_mask_n)
    idx_b = jnp.arange(b)
    w_b = weights_b * mask_b
    denom = jnp.maximum(jnp.sum(w_b), 1e-12)
    # The loss and accuracy come from the fused, row-blocked pass (no [B, B + N]
    # array in memory); ce_b and logits from the plain graph, which jit drops when
    # a caller (the train step) does not read them.
    wsum, correct_b = _weighted_ce_sum(temperature, user_bd, cand_cd, bias_c, w_b, idx_b,
                                       rows, cols)
    loss = wsum / denom
    acc = jnp.sum(w_b * correct_b) / denom
    ce_b, _, logits = _block_ce(temperature, user_bd, cand_cd, bias_c, idx_b, rows, cols)
    return loss, {"ce_b": ce_b * mask_b, "logits": logits, "acc": acc}


def _columns(*, pin_bd, mask_b, pin_log_q_b, user_ids_b, pin_ids_b, remove_accidental_hits,
             neg_pin_nd, neg_log_q_n, neg_ids_n, neg_mask_n):
    """Candidate columns and anchor-row ids of `sampled_softmax_loss`'s arguments.

    Returns:
      ([C, D] candidates, [C] logQ, ([B] pin ids, [B] user ids), `_Columns`).
    """
    b = pin_bd.shape[0]
    f32 = jnp.float32
    pin_ids = pin_ids_b
    # Candidate columns: the B in-batch pins, then the N extra negatives. Per column:
    # its logQ, whether it is a real candidate, and which accidental-hit checks apply.
    cand_cd = pin_bd
    bias_c = (jnp.zeros((b,), f32) if pin_log_q_b is None else pin_log_q_b.astype(f32))
    valid_c = mask_b != 0
    hits = jnp.full((b,), remove_accidental_hits)
    chk_pin_c, chk_user_c = hits, hits
    ids_dtype = jnp.int32
    if pin_ids is None:
        pin_ids = jnp.zeros((b,), ids_dtype)
    user_ids = jnp.zeros((b,), ids_dtype) if user_ids_b is None else user_ids_b
    col_pin_c, col_user_c = pin_ids, user_ids
    if neg_pin_nd is not None:
        n = neg_pin_nd.shape[0]
        if pin_log_q_b is not None:
            if neg_log_q_n is None:
                raise ValueError("logQ correction with extra negatives needs neg_log_q_n")
            neg_bias = neg_log_q_n.astype(f32)
        else:
            neg_bias = jnp.zeros((n,), f32)
        if neg_ids_n is not None and pin_ids_b is None:
            raise ValueError("neg_ids_n needs pin_ids_b to find accidental hits")
        cand_cd = jnp.concatenate([pin_bd, neg_pin_nd.astype(pin_bd.dtype)], axis=0)
        bias_c = jnp.concatenate([bias_c, neg_bias])
        valid_c = jnp.concatenate(
            [valid_c, jnp.ones((n,), bool) if neg_mask_n is None else neg_mask_n != 0])
        chk_pin_c = jnp.concatenate([chk_pin_c, jnp.full((n,), neg_ids_n is not None)])
        chk_user_c = jnp.concatenate([chk_user_c, jnp.zeros((n,), bool)])
        neg_ids = jnp.zeros((n,), ids_dtype) if neg_ids_n is None else neg_ids_n
        col_pin_c = jnp.concatenate([pin_ids.astype(ids_dtype), neg_ids.astype(ids_dtype)])
        col_user_c = jnp.concatenate([user_ids.astype(ids_dtype), jnp.zeros((n,), ids_dtype)])
    cols = _Columns(pin=col_pin_c, user=col_user_c, valid=valid_c, chk_pin=chk_pin_c,
                    chk_user=chk_user_c)
    rows = (pin_ids.astype(col_pin_c.dtype), user_ids.astype(col_user_c.dtype))
    return cand_cd, bias_c, rows, cols


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["pin", "user", "valid", "chk_pin", "chk_user"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class _Columns:
    """Per-candidate-column [C] data: pin id, user id, real candidate, hit checks."""

    pin: jax.Array
    user: jax.Array
    valid: jax.Array
    chk_pin: jax.Array
    chk_user: jax.Array


def _block_ce(temperature, q_td, c_cd, bias_c, idx_t, rows, cols):
    """Cross entropy of T anchor rows against all C candidate columns.

    Args:
      q_td: [T] x [D] anchor (user) embeddings.
      c_cd: [C, D] candidate pins (the B in-batch ones first).
      bias_c: [C] logQ of each column (subtracted after the temperature).
      idx_t: [T] batch index of each anchor (= the column of its positive).
      rows: ([T] pin ids, [T] user ids) of the anchors.
      cols: the columns' `_Columns`.

    Returns:
      ([T] cross entropy, [T] 1 where the positive is the argmax, [T, C] masked
      logits); the first two only read the logits, so jit keeps them in one pass.
    """
    logits = _masked_logits(1.0 / temperature, q_td, c_cd, bias_c, idx_t, rows, cols)
    pos_tc = idx_t[:, None] == jnp.arange(c_cd.shape[0])[None, :]
    ce_t = jax.nn.logsumexp(logits, axis=1) - jnp.sum(jnp.where(pos_tc, logits, 0.0), axis=1)
    correct_t = (jnp.argmax(logits, axis=1) == idx_t).astype(jnp.int32)
    return ce_t, correct_t, logits


def _masked_logits(inv_t, q_td, c_cd, bias_c, idx_t, rows, cols):
    """[T, C] logits <q, c> / temperature - logQ, accidental hits at MASKED_LOGIT."""
    logits = jnp.dot(q_td, c_cd.T, preferred_element_type=jnp.float32) * inv_t - bias_c[None, :]
    row_pin, row_user = rows
    hit = (~cols.valid[None, :]
           | (cols.chk_pin[None, :] & (row_pin[:, None] == cols.pin[None, :]))
           | (cols.chk_user[None, :] & (row_user[:, None] == cols.user[None, :])))
    not_pos = idx_t[:, None] != jnp.arange(c_cd.shape[0])[None, :]
    return jnp.where(hit & not_pos, MASKED_LOGIT, logits)


def _num_blocks(b: int, c: int, s_target: int = 1 << 20) -> int:
    """Row blocks of the fused pass: [B / n, C] blocks of about s_target floats."""
    want = max(1, (b * c) // s_target)
    return max(n for n in range(1, min(want, b) + 1) if b % n == 0)


def _blocked_pass(temperature, q_bd, c_cd, bias_c, a_b, idx_b, rows, cols, grads):
    """sum_i a_i CE_i, [B] correct and (if `grads`) its gradients, in row blocks.

    Block k holds the rows {t * n + k}: when B is sharded over S devices in
    contiguous slices, every block is too (each device keeps its own rows).
    Per block, the [T, C] logits are read three times (row max; exp and its row
    sum; the gradient matmuls), with p = e / s - onehot never written: the
    onehot part of every gradient is added once after the loop.
    Returns (wsum, correct_b, ce_b, g_q [B, D], g_c [C, D], g_bias [C]).
    """
    b, d = q_bd.shape
    c = c_cd.shape[0]
    n = _num_blocks(b, c)
    t = b // n

    def split(x):  # [B, ...] -> [n, T, ...], block k = rows {t * n + k}
        return jnp.swapaxes(x.reshape(t, n, *x.shape[1:]), 0, 1)

    def merge(x):  # inverse of split
        return jnp.swapaxes(x, 0, 1).reshape(b, *x.shape[2:])

    f32 = jnp.float32
    c32 = c_cd.astype(f32)
    inv_t = 1.0 / temperature

    def body(carry, xs):
        q_td, a_t, idx_t, rows_t = xs
        q32 = q_td.astype(f32)
        x_tc = _masked_logits(inv_t, q32, c32, bias_c, idx_t, rows_t, cols)
        m_t = jnp.max(x_tc, axis=1)
        e_tc = jnp.exp(x_tc - m_t[:, None])
        s_t = jnp.sum(e_tc, axis=1)
        pos_t = jnp.take_along_axis(x_tc, idx_t[:, None], axis=1)[:, 0]
        ce_t = m_t + jnp.log(s_t) - pos_t
        correct_t = (pos_t >= m_t).astype(jnp.int32)
        if not grads:
            return carry, (ce_t, correct_t)
        # d CE_i / d logit_ij = e_ij / s_i - [j is i's positive]; the second term
        # is added after the loop.
        r_t = a_t / s_t
        g_q = r_t[:, None] * jnp.dot(e_tc, c32, preferred_element_type=f32)
        g_c, g_bias = carry
        carry = (g_c + jnp.dot((r_t[:, None] * q32).T, e_tc, preferred_element_type=f32),
                 g_bias + jnp.dot(r_t, e_tc, preferred_element_type=f32))
        return carry, (ce_t, correct_t, g_q)

    xs = (split(q_bd), split(a_b), split(idx_b), jax.tree.map(split, rows))
    init = (jnp.zeros((d, c), f32), jnp.zeros((c,), f32)) if grads else ()
    carry, ys = jax.lax.scan(body, init, xs)
    ce_b, correct_b = merge(ys[0]), merge(ys[1])
    wsum = jnp.sum(a_b * ce_b)
    if not grads:
        return wsum, correct_b, ce_b, None, None, None
    # The onehot terms: row i's positive is column idx_i.
    a_b1 = a_b[:, None]
    g_q = (merge(ys[2]) - a_b1 * c32[idx_b]) * inv_t
    g_c = (carry[0].T.at[idx_b].add(-a_b1 * q_bd.astype(f32))) * inv_t
    g_bias = (-carry[1]).at[idx_b].add(a_b)
    return wsum, correct_b, ce_b, g_q, g_c, g_bias


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _weighted_ce_sum(temperature, q_bd, c_cd, bias_c, a_b, idx_b, rows, cols):
    """sum_i a_i CE_i of the masked softmax, and [B] int 1 where the positive wins.

    Same math as logsumexp(masked logits) - positive logit, but computed in row
    blocks that stay in cache, with the gradients produced by the forward pass
    (the backward only scales them): one matmul per direction, no [B, C] array.
    """
    return _blocked_pass(temperature, q_bd, c_cd, bias_c, a_b, idx_b, rows, cols, False)[:2]


def _weighted_ce_sum_fwd(temperature, q_bd, c_cd, bias_c, a_b, idx_b, rows, cols):
    wsum, correct_b, ce_b, g_q, g_c, g_bias = _blocked_pass(
        temperature, q_bd, c_cd, bias_c, a_b, idx_b, rows, cols, True)
    zeros = jax.tree.map(_zero_cotangent, (idx_b, rows, cols))
    res = (ce_b, g_q.astype(q_bd.dtype), g_c.astype(c_cd.dtype), g_bias, zeros)
    return (wsum, correct_b), res


def _weighted_ce_sum_bwd(temperature, res, g):
    del temperature
    ce_b, g_q, g_c, g_bias, zeros = res
    g_sum = g[0]
    return g_sum * g_q, g_sum * g_c, g_sum * g_bias, g_sum * ce_b, *zeros


def _zero_cotangent(x):
    if jnp.issubdtype(x.dtype, jnp.floating):
        return jnp.zeros_like(x)
    return np.zeros(x.shape, jax.dtypes.float0)


_weighted_ce_sum.defvjp(_weighted_ce_sum_fwd, _weighted_ce_sum_bwd)


def sharded_loss_and_acc(*, mesh, axis: str, user_bd, pin_bd, temperature: float,
                          pin_log_q_b=None, user_ids_b=None, pin_ids_b=None,
                          remove_accidental_hits: bool = False, weights_b=None, mask_b=None,
                          neg_pin_nd=None, neg_log_q_n=None, neg_ids_n=None,
                          neg_mask_n=None) -> tuple[jax.Array, jax.Array]:
    """`sampled_softmax_loss`'s (loss, acc) with the anchors split by device.

    Same arguments and math as `sampled_softmax_loss` (batch arrays sharded on
    `axis` of `mesh`, B and N divisible by its size). Each device gathers the
    candidate columns once and scores only its own anchor rows, so the row-blocked
    pass runs without collectives inside its loop; the candidate gradients go back
    to their devices through the all-gather's transpose (a reduce-scatter).
    """
    b = user_bd.shape[0]
    f32 = jnp.float32
    if remove_accidental_hits and (user_ids_b is None or pin_ids_b is None):
        raise ValueError("remove_accidental_hits needs user_ids_b and pin_ids_b")
    if neg_pin_nd is not None and pin_log_q_b is not None and neg_log_q_n is None:
        raise ValueError("logQ correction with extra negatives needs neg_log_q_n")
    if neg_ids_n is not None and pin_ids_b is None:
        raise ValueError("neg_ids_n needs pin_ids_b to find accidental hits")
    mask_b = jnp.ones((b,), f32) if mask_b is None else mask_b.astype(f32)
    weights_b = jnp.ones((b,), f32) if weights_b is None else weights_b.astype(f32)
    w_b = weights_b * mask_b
    cols_in = dict(pin_bd=pin_bd, mask_b=mask_b, pin_log_q_b=pin_log_q_b, user_ids_b=user_ids_b,
                   pin_ids_b=pin_ids_b, neg_pin_nd=neg_pin_nd, neg_log_q_n=neg_log_q_n,
                   neg_ids_n=neg_ids_n, neg_mask_n=neg_mask_n)
    cols_in = {k: v for k, v in cols_in.items() if v is not None}
    spec = P(axis)

    def local(user_ld, w_l, cols_l):
        full = {k: jax.lax.all_gather(v, axis, tiled=True) for k, v in cols_l.items()}
        cand_cd, bias_c, rows, cols = _columns(
            remove_accidental_hits=remove_accidental_hits,
            **{k: full.get(k) for k in ("pin_bd", "mask_b", "pin_log_q_b", "user_ids_b",
                                        "pin_ids_b", "neg_pin_nd", "neg_log_q_n",
                                        "neg_ids_n", "neg_mask_n")})
        bl = user_ld.shape[0]
        off = jax.lax.axis_index(axis) * bl
        rows_l = jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, off, bl), rows)
        idx_l = off + jnp.arange(bl)
        wsum, correct_l = _weighted_ce_sum(temperature, user_ld, cand_cd, bias_c, w_l, idx_l,
                                           rows_l, cols)
        return wsum[None], jnp.sum(w_l * correct_l)[None]

    wsum_s, correct_s = jax.shard_map(
        local, mesh=mesh, in_specs=(spec, spec, {k: spec for k in cols_in}),
        out_specs=(spec, spec), check_vma=False)(user_bd, w_b, cols_in)
    denom = jnp.maximum(jnp.sum(w_b), 1e-12)
    return jnp.sum(wsum_s) / denom, jnp.sum(correct_s) / denom
