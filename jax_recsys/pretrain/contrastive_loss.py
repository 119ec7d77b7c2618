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

Legend: B batch, D embedding dim, N extra (uniformly sampled) negatives.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

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
      examples whose positive has the highest logit.
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

    logits_bb = jnp.dot(user_bd, pin_bd.T, preferred_element_type=f32) / temperature
    if pin_log_q_b is not None:
        logits_bb = logits_bb - pin_log_q_b.astype(f32)[None, :]
    eye_bb = jnp.eye(b, dtype=bool)
    drop_bb = (mask_b[None, :] == 0) & ~eye_bb
    if remove_accidental_hits:
        if user_ids_b is None or pin_ids_b is None:
            raise ValueError("remove_accidental_hits needs user_ids_b and pin_ids_b")
        same_pin = pin_ids_b[:, None] == pin_ids_b[None, :]
        same_user = user_ids_b[:, None] == user_ids_b[None, :]
        drop_bb = drop_bb | ((same_pin | same_user) & ~eye_bb)
    logits_bb = jnp.where(drop_bb, MASKED_LOGIT, logits_bb)
    logits = logits_bb

    if neg_pin_nd is not None:
        n = neg_pin_nd.shape[0]
        logits_bn = jnp.dot(user_bd, neg_pin_nd.T, preferred_element_type=f32) / temperature
        if pin_log_q_b is not None:
            if neg_log_q_n is None:
                raise ValueError("logQ correction with extra negatives needs neg_log_q_n")
            logits_bn = logits_bn - neg_log_q_n.astype(f32)[None, :]
        drop_bn = jnp.zeros((b, n), bool)
        if neg_mask_n is not None:
            drop_bn = drop_bn | (neg_mask_n[None, :] == 0)
        if neg_ids_n is not None:
            if pin_ids_b is None:
                raise ValueError("neg_ids_n needs pin_ids_b to find accidental hits")
            drop_bn = drop_bn | (pin_ids_b[:, None] == neg_ids_n[None, :])
        logits_bn = jnp.where(drop_bn, MASKED_LOGIT, logits_bn)
        logits = jnp.concatenate([logits_bb, logits_bn], axis=1)

    pos_b = jnp.diagonal(logits_bb)
    ce_b = jax.nn.logsumexp(logits, axis=1) - pos_b
    w_b = weights_b * mask_b
    denom = jnp.maximum(jnp.sum(w_b), 1e-12)
    loss = jnp.sum(w_b * ce_b) / denom
    acc = jnp.sum(w_b * (jnp.argmax(logits, axis=1) == jnp.arange(b))) / denom
    return loss, {"ce_b": ce_b * mask_b, "logits": logits, "acc": acc}
