"""Knowledge-graph embedding training: chunked negatives, losses, the trainer.

Negatives (PyTorch-BigGraph style). The training triples are cut into *chunks* of C
triples that share one relation (so one head type and one tail type). Inside a chunk
each positive (h, r, t) is scored, with one matmul per chunk, against

  * tail corruption: the other C - 1 tails of its chunk, plus U tails drawn uniformly
    from the tail type's table and shared by the chunk, and
  * head corruption: the other C - 1 heads of its chunk, plus U uniform heads of the
    head type,

so each positive sees 2 (C - 1 + U) negatives for the price of two [C, D] x [D, C + U]
matmuls. Negatives are TYPE-CONSTRAINED by construction: in-chunk candidates share
the relation, hence the type, and uniform negatives are drawn from the right type's
table only. Candidates equal to the positive's own answer (duplicates inside a chunk,
or a uniform draw that hits it) and padding triples are masked out.

Type-homogeneous batches. Entity types live in separate tables (one per type,
row-sharded), so a batch holds K chunks whose relations all have the same
(head type, tail type) pair; the jitted step is specialised (traced once) per pair.
Every training triple is used once per epoch: relations are chunked, the last chunk of
a relation is padded with masked repeats, chunks are grouped by type pair into batches
of K (padded with masked chunks), and the batch order is shuffled.

Batch layout (a `jax_recsys.data.batching.Batch`, chunk-major so that sharding the
leading dim over S devices keeps every chunk on one device; K must be a multiple of S):

  ids["<head type>/head"]  int32 [K * (C + U)]: per chunk C heads then U uniform heads
  ids["<tail type>/tail"]  int32 [K * (C + U)]: per chunk C tails then U uniform tails
  ids["rel"]               int32 [K]: the chunk's relation (not a table feature)
  mask                     float32 [K * C]: 0 for padding triples

Features "<type>/head" and "<type>/tail" both read the table "<type>", so entity
rows are looked up and sparsely updated (row-wise Adagrad) by the embedding engine;
relation parameters are dense and use optax.

Losses (pure, keyword-only; averaged over the real positives and over both sides):
logistic (-log s(pos) - sum_n w_n log s(-neg_n)), softmax (cross entropy of the
positive against its negatives), margin (sum_n w_n max(0, margin - pos + neg_n)).
The negative weights w_n are uniform over the valid negatives, or, with
`adversarial_temperature` a > 0, self-adversarial (RotatE): w = softmax(a * neg) over
the valid negatives, without gradient through w.

Multi-process runs and resuming: an epoch's batches are a pure function of (seed,
epoch), so every process samples the same global batch and keeps its contiguous
K / process_count chunks; training checkpoints hold the TrainState and the position
(epoch, batch of the epoch), and a resumed run (on any mesh) skips to it and reads the
batches an uninterrupted run reads.

Legend: K chunks per batch, C triples per chunk, U uniform negatives per chunk and side,
N = C + U candidates, D entity dim, T triples, NR relations, S devices.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import pathlib
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jax_recsys.data import kg as kg_data
from jax_recsys.data.batching import Batch
from jax_recsys.embedding import collection as collection_lib, specs, train_step as train_step_lib
from jax_recsys.pretrain import kg_eval, kg_scoring

LOSSES = ("logistic", "softmax", "margin")
_NEG_INF = -1e9  # finite, so fully masked rows never produce inf - inf


# ----------------------------------------------------------------------------- configs


@dataclasses.dataclass(frozen=True, kw_only=True)
class KGModelConfig:
    """The embedding model.

    Attributes:
      model: one of kg_scoring.MODEL_NAMES (transe, distmult, complex, rotate, transr).
      dim: entity dim D (real numbers; ComplEx/RotatE use D/2 complex dims).
      gamma: margin of distance scores (score = gamma - distance).
      rel_dim: TransR relation dim (None: D).
      init_scale: std of the normal entity init (None: 1/sqrt(D)).
    """

    model: str = "distmult"
    dim: int = 128
    gamma: float = 6.0
    rel_dim: int | None = None
    init_scale: float | None = None

    def __post_init__(self):
        if self.dim <= 0:
            raise ValueError(f"KGModelConfig.dim (the entity dim) must be > 0, got {self.dim}")
        self.scoring()  # ValueError for an unknown model, an odd complex dim, a bad rel_dim

    def scoring(self) -> kg_scoring.ScoringFunction:
        fn = kg_scoring.ScoringFunction(name=self.model, gamma=self.gamma, rel_dim=self.rel_dim)
        fn.check_dim(self.dim)
        return fn


@dataclasses.dataclass(frozen=True, kw_only=True)
class KGTrainConfig:
    """How to train.

    Attributes:
      chunk_size: C, positives per chunk (in-chunk negatives per positive: C - 1).
      uniform_negatives: U, type-constrained uniform negatives per chunk and side.
      chunks_per_batch: K (a multiple of the device count); batch = K * C positives.
      corrupt: "both", "tail" or "head".
      loss: "logistic", "softmax" or "margin".
      margin: margin of the margin loss.
      adversarial_temperature: > 0 turns on self-adversarial negative weights (logistic
        and margin losses only; the softmax loss has no per-negative weights, so > 0 with
        it is an error).
      regularization: weight of the mean squared norm of the positives' entity rows.
      entity_learning_rate: row-wise Adagrad rate of the entity tables.
      entity_initial_accumulator: starting Adagrad accumulator of every row. Keep it
        small: the loss is a mean over the batch, so row gradients are small and a large
        starting accumulator would shrink the first steps of every (rare) row.
      relation_learning_rate: Adam rate of the relation parameters.
      num_epochs: passes over the training triples.
      max_steps: stop after this many steps (None: no limit).
      seed: sampling and init seed.
      log_every: steps between progress logs (and `history` entries; 0: never).
      eval_every_epochs: evaluate on the validation split every this many epochs (0: never).
      checkpoint_every: save a training checkpoint (TrainState + data position) every N
        steps and at the end, and resume from the newest one on start (0: never).
      keep_checkpoints: how many training checkpoints to keep.
    """

    chunk_size: int = 32
    uniform_negatives: int = 32
    chunks_per_batch: int = 8
    corrupt: str = "both"
    loss: str = "softmax"
    margin: float = 1.0
    adversarial_temperature: float = 0.0
    regularization: float = 0.0
    entity_learning_rate: float = 0.1
    entity_initial_accumulator: float = 1e-6
    relation_learning_rate: float = 0.01
    num_epochs: int = 10
    max_steps: int | None = None
    seed: int = 0
    log_every: int = 100
    eval_every_epochs: int = 0
    checkpoint_every: int = 0
    keep_checkpoints: int = 2

    def __post_init__(self):
        if self.chunk_size < 1 or self.uniform_negatives < 0 or self.chunks_per_batch < 1:
            raise ValueError("chunk_size and chunks_per_batch must be >= 1, uniform_negatives >= 0; "
                             f"got {self.chunk_size}, {self.chunks_per_batch}, {self.uniform_negatives}")
        if self.chunk_size + self.uniform_negatives < 2:
            raise ValueError("need at least one negative: chunk_size + uniform_negatives >= 2")
        if self.corrupt not in ("both", "tail", "head"):
            raise ValueError(f"corrupt must be 'both', 'tail' or 'head', got {self.corrupt!r}")
        if self.num_epochs < 1:
            raise ValueError(f"num_epochs must be >= 1, got {self.num_epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 or None (no limit), got {self.max_steps}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        from jax_recsys import checkpoint

        checkpoint.check_settings(checkpoint_every=self.checkpoint_every,
                                  keep_checkpoints=self.keep_checkpoints)
        if self.seed < 0:  # NumPy's generators take none (was "expected non-negative integer")
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.log_every < 0 or self.eval_every_epochs < 0:
            raise ValueError(f"log_every and eval_every_epochs must be >= 0 (0: never), got "
                             f"{self.log_every}, {self.eval_every_epochs}")
        # NaN stopped training with a FloatingPointError; a negative value trained silently
        # (relations up the loss, norms rewarded, negatives kept above the positives).
        for name in ("margin", "regularization", "relation_learning_rate"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if self.adversarial_temperature < 0:
            raise ValueError(
                f"adversarial_temperature must be >= 0, got {self.adversarial_temperature}")
        if self.loss == "softmax" and self.adversarial_temperature > 0:
            raise ValueError(
                f"adversarial_temperature={self.adversarial_temperature} has no effect with "
                "loss='softmax' (it weights the negatives of the 'logistic' and 'margin' "
                "losses only); set it to 0 or pick one of those losses")

    @property
    def negatives_per_positive(self) -> int:
        sides = 2 if self.corrupt == "both" else 1
        return sides * (self.chunk_size - 1 + self.uniform_negatives)


# ----------------------------------------------------------------------------- losses


def _neg_weights(neg, mask, adversarial_temperature):
    if adversarial_temperature > 0:
        w = jax.nn.softmax(jnp.where(mask, adversarial_temperature * neg, _NEG_INF), axis=-1)
        return jax.lax.stop_gradient(w * mask)
    return mask / jnp.maximum(jnp.sum(mask, axis=-1, keepdims=True), 1.0)


def _weighted_mean(per_pos, weight):
    return jnp.sum(per_pos * weight) / jnp.maximum(jnp.sum(weight), 1.0)


def logistic_loss(*, pos: jax.Array, neg: jax.Array, neg_mask: jax.Array, weight: jax.Array,
                  adversarial_temperature: float = 0.0) -> jax.Array:
    """-log s(pos) - sum_n w_n log s(-neg_n), averaged over positives.

    Args:
      pos: [...] positive scores.
      neg: [..., N] negative scores.
      neg_mask: [..., N] 1 for valid negatives.
      weight: [...] weight of each positive (0 for padding).
      adversarial_temperature: > 0: self-adversarial negative weights.

    Returns:
      scalar loss.
    """
    mask = neg_mask.astype(neg.dtype)
    w = _neg_weights(neg, mask, adversarial_temperature)
    per = jax.nn.softplus(-pos) + jnp.sum(w * jax.nn.softplus(neg), axis=-1)
    return _weighted_mean(per, weight)


def softmax_loss(*, pos: jax.Array, neg: jax.Array, neg_mask: jax.Array,
                 weight: jax.Array) -> jax.Array:
    """Cross entropy of the positive among {positive} + valid negatives, averaged.

    Args:
      pos: [...] positive scores.
      neg: [..., N] negative scores.
      neg_mask: [..., N] 1 for valid negatives.
      weight: [...] weight of each positive (0 for padding).

    Returns:
      scalar loss.
    """
    logits = jnp.concatenate([pos[..., None], jnp.where(neg_mask > 0, neg, _NEG_INF)], axis=-1)
    per = jax.nn.logsumexp(logits, axis=-1) - pos
    return _weighted_mean(per, weight)


def margin_loss(*, pos: jax.Array, neg: jax.Array, neg_mask: jax.Array, weight: jax.Array,
                margin: float = 1.0, adversarial_temperature: float = 0.0) -> jax.Array:
    """sum_n w_n max(0, margin - pos + neg_n) (w uniform: the mean), averaged over positives.

    Args:
      pos: [...] positive scores.
      neg: [..., N] negative scores.
      neg_mask: [..., N] 1 for valid negatives.
      weight: [...] weight of each positive (0 for padding).
      margin: the margin.
      adversarial_temperature: > 0: self-adversarial negative weights.

    Returns:
      scalar loss.
    """
    mask = neg_mask.astype(neg.dtype)
    w = _neg_weights(neg, mask, adversarial_temperature)
    per = jnp.sum(w * jax.nn.relu(margin - pos[..., None] + neg), axis=-1)
    return _weighted_mean(per, weight)


def pair_loss(*, pos, neg, neg_mask, weight, config: KGTrainConfig) -> jax.Array:
    """The configured loss (see KGTrainConfig.loss)."""
    if config.loss == "logistic":
        return logistic_loss(pos=pos, neg=neg, neg_mask=neg_mask, weight=weight,
                             adversarial_temperature=config.adversarial_temperature)
    if config.loss == "softmax":
        return softmax_loss(pos=pos, neg=neg, neg_mask=neg_mask, weight=weight)
    return margin_loss(pos=pos, neg=neg, neg_mask=neg_mask, weight=weight, margin=config.margin,
                       adversarial_temperature=config.adversarial_temperature)


# ----------------------------------------------------------------------------- chunk scoring


def chunk_scores(
    fn: kg_scoring.ScoringFunction,
    *,
    head_kcd: jax.Array,
    tail_kcd: jax.Array,
    cand_knd: jax.Array,
    rel_k: Mapping[str, jax.Array],
    side: str,
) -> jax.Array:
    """Scores of every positive of a chunk against the chunk's candidates.

    Args:
      fn: the scoring function.
      head_kcd, tail_kcd: [K, C, D] positive heads and tails.
      cand_knd: [K, N, D] candidates (tails for side "tail", heads for side "head").
      rel_k: relation params of each chunk, leading dim K.
      side: which end is corrupted.

    Returns:
      [K, C, N] scores; entry (k, i, n) is the score of positive i with its `side`
      replaced by candidate n.
    """
    rel_kc = jax.tree.map(lambda x: x[:, None], rel_k)  # broadcast over the chunk
    if side == "tail":
        query = fn.tail_query(head=head_kcd, rel=rel_kc)
    else:
        query = fn.head_query(tail=tail_kcd, rel=rel_kc)
    cand = fn.project(ent=cand_knd, rel=rel_k, candidates=True)
    return fn.compare_all(query_cd=query, cand_nd=cand)


def make_loss_fn(fn: kg_scoring.ScoringFunction, config: KGTrainConfig) -> Callable:
    """The `loss_fn(*, rows, params, batch) -> (loss, aux)` of the engine's train step.

    Args:
      fn: the scoring function.
      config: chunk shape and loss settings.

    Returns:
      loss_fn; `params` are the relation parameters {name: [NR, ...]}.
    """
    c, u = config.chunk_size, config.uniform_negatives
    sides = ("tail", "head") if config.corrupt == "both" else (config.corrupt,)

    def loss_fn(*, rows, params, batch):
        (hkey,) = [k for k in rows if k.endswith("/head")]
        (tkey,) = [k for k in rows if k.endswith("/tail")]
        k = batch.ids["rel"].shape[0]
        hrows = rows[hkey].reshape(k, c + u, -1).astype(jnp.float32)
        trows = rows[tkey].reshape(k, c + u, -1).astype(jnp.float32)
        hids = batch.ids[hkey].reshape(k, c + u)
        tids = batch.ids[tkey].reshape(k, c + u)
        weight = batch.mask.reshape(k, c)
        # Padding positives are no candidates either; uniform columns are always valid.
        cand_ok = jnp.concatenate([weight > 0, jnp.ones((k, u), bool)], axis=1)
        rel_k = kg_scoring.gather_relations(params, batch.ids["rel"])
        heads, tails = hrows[:, :c], trows[:, :c]
        aux, total = {}, 0.0
        for side in sides:
            cand, cids, own = ((trows, tids, tids[:, :c]) if side == "tail"
                               else (hrows, hids, hids[:, :c]))
            s = chunk_scores(fn, head_kcd=heads, tail_kcd=tails, cand_knd=cand, rel_k=rel_k,
                             side=side)  # [K, C, C + U]
            pos = jnp.diagonal(s[:, :, :c], axis1=1, axis2=2)  # [K, C]
            neg_mask = cand_ok[:, None, :] & (cids[:, None, :] != own[:, :, None])
            side_loss = pair_loss(pos=pos, neg=s, neg_mask=neg_mask, weight=weight, config=config)
            aux[f"{side}_loss"] = side_loss
            total = total + side_loss / len(sides)
        if config.regularization:
            sq = jnp.sum(jnp.square(heads), -1) + jnp.sum(jnp.square(tails), -1)
            total = total + config.regularization * _weighted_mean(sq, weight)
        return total, aux

    return loss_fn


# ----------------------------------------------------------------------------- sampling


class ChunkSampler:
    """Host-side (NumPy) epoch sampler of type-homogeneous chunked batches.

    See the module docstring for the chunking scheme and the batch layout.
    """

    def __init__(
        self,
        triples: np.ndarray,
        *,
        rel_head_type: Sequence[str],
        rel_tail_type: Sequence[str],
        num_rows: Mapping[str, int],
        config: KGTrainConfig,
        seed: int | None = None,
    ):
        """Prepares the relation groups.

        Args:
          triples: int [T, 3] training triples (head_row, relation, tail_row).
          rel_head_type / rel_tail_type: entity type of each relation's head / tail.
          num_rows: entity type -> rows (uniform negatives are drawn from [0, rows)).
          config: chunk_size C, chunks_per_batch K, uniform_negatives U, seed.
          seed: overrides config.seed.
        """
        self.triples = np.asarray(triples, np.int64).reshape(-1, 3)
        if len(self.triples) == 0:
            raise ValueError("no training triples")
        self.c, self.k, self.u = config.chunk_size, config.chunks_per_batch, config.uniform_negatives
        self.seed = config.seed if seed is None else seed
        self.head_type = list(rel_head_type)
        self.tail_type = list(rel_tail_type)
        self.num_rows = dict(num_rows)
        nr = len(self.head_type)
        r = self.triples[:, 1]
        if r.min() < 0 or r.max() >= nr:
            raise ValueError(f"relation ids must be in [0, {nr})")
        for col, types in ((0, self.head_type), (2, self.tail_type)):
            limit = np.array([self.num_rows[t] for t in types])[r]
            bad = np.flatnonzero((self.triples[:, col] < 0) | (self.triples[:, col] >= limit))
            if bad.size:
                raise ValueError(f"triple {bad[0]} {self.triples[bad[0]].tolist()} has an entity row "
                                 "outside its type's table")
        self.counts = np.bincount(r, minlength=nr)
        pairs = sorted({(self.head_type[i], self.tail_type[i]) for i in np.flatnonzero(self.counts)})
        self.pairs = pairs
        pair_index = {p: i for i, p in enumerate(pairs)}
        self.rel_pair = np.array([pair_index.get((h, t), -1)
                                  for h, t in zip(self.head_type, self.tail_type, strict=True)])
        chunks_r = -(-self.counts // self.c)
        self.batch_positives = 0  # real positives of the last yielded global batch
        self._chunks_per_pair = np.bincount(self.rel_pair[np.flatnonzero(self.counts)],
                                            weights=chunks_r[self.counts > 0],
                                            minlength=len(pairs)).astype(int)

    def __len__(self) -> int:
        """Batches per epoch."""
        return int(np.sum(-(-self._chunks_per_pair // self.k)))

    def epoch(self, epoch: int, *, start: int = 0, process_index: int = 0,
              process_count: int = 1) -> Iterator[Batch]:
        """The batches of one epoch (deterministic in (seed, epoch)).

        Args:
          epoch: epoch number.
          start: skip the first `start` batches (resuming mid-epoch); the random
            draws are made and dropped, so the rest is what an uninterrupted epoch gives.
          process_index, process_count: yield only this process's contiguous
            K / process_count chunks of every batch (what it passes to
            `make_array_from_process_local_data`); K must divide by process_count.

        Yields:
          Batch (see the module docstring for the layout).
        """
        if self.k % process_count:
            raise ValueError(f"chunks_per_batch={self.k} must divide by the {process_count} "
                             "processes")
        rng = np.random.default_rng([self.seed, epoch])
        c, k, u = self.c, self.k, self.u
        h, r, t = self.triples.T
        order = rng.permutation(len(r))
        order = order[np.argsort(r[order], kind="stable")]  # grouped by relation, shuffled within
        n_r = self.counts
        rel_start = np.cumsum(n_r) - n_r
        chunks_r = -(-n_r // c)
        chunk_off = np.cumsum(chunks_r) - chunks_r
        chunk_rel = np.repeat(np.arange(len(n_r)), chunks_r)
        q = (np.arange(len(chunk_rel)) - chunk_off[chunk_rel])[:, None] * c + np.arange(c)
        n_of = n_r[chunk_rel][:, None]
        valid = q < n_of
        tri = order[rel_start[chunk_rel][:, None] + np.where(valid, q, q % n_of)]  # [chunks, C]

        chunk_perm = rng.permutation(len(chunk_rel))
        chunk_perm = chunk_perm[np.argsort(self.rel_pair[chunk_rel[chunk_perm]], kind="stable")]
        batches = []  # (pair, chunk indices [K], chunk valid [K])
        off = 0
        for p, m in enumerate(self._chunks_per_pair):
            sel = chunk_perm[off:off + m]
            off += m
            for b in range(0, m, k):
                idx = sel[b:b + k]
                ok = np.ones(k, bool)
                ok[len(idx):] = False
                idx = np.concatenate([idx, np.full(k - len(idx), idx[0])])
                batches.append((p, idx, ok))
        k_p = k // process_count
        mine = slice(process_index * k_p, (process_index + 1) * k_p)
        for i, bi in enumerate(rng.permutation(len(batches))):
            p, idx, ok = batches[bi]
            ht, tt = self.pairs[p]
            neg_h = rng.integers(0, self.num_rows[ht], size=(k, u))[mine]
            neg_t = rng.integers(0, self.num_rows[tt], size=(k, u))[mine]
            if i < start:
                continue
            # Positives of the whole (global) batch, for throughput counts.
            self.batch_positives = int((valid[idx] & ok[:, None]).sum())
            idx, ok = idx[mine], ok[mine]
            ti = tri[idx]  # [K_p, C]
            mask = (valid[idx] & ok[:, None]).astype(np.float32).reshape(-1)
            ids = {
                f"{ht}/head": np.concatenate([h[ti], neg_h], 1).astype(np.int32).reshape(-1),
                f"{tt}/tail": np.concatenate([t[ti], neg_t], 1).astype(np.int32).reshape(-1),
                "rel": chunk_rel[idx].astype(np.int32),
            }
            yield Batch(ids=ids, dense={}, labels={}, mask=mask)


# ----------------------------------------------------------------------------- trainer


@dataclasses.dataclass
class KGTrainResult:
    """What `train` returns.

    Attributes:
      state: the final TrainState (entity tables in state.emb, relations in state.params).
      collection: the EmbeddingCollection holding the entity tables.
      history: the progress dicts that were logged.
      metrics: summary: steps, train seconds, positives/s and scored triples/s (both
        measured over the steps that did not compile a new program), last loss.
    """

    state: train_step_lib.TrainState
    collection: collection_lib.EmbeddingCollection
    history: list
    metrics: dict


def build_collection(graph: kg_data.KnowledgeGraph, *, model: KGModelConfig,
                     train: KGTrainConfig, mesh: jax.sharding.Mesh,
                     axis: str = "data") -> collection_lib.EmbeddingCollection:
    """One row-sharded table per entity type, read by the features "<type>/head" and "<type>/tail".

    Args:
      graph: entity types and rows (`num_rows`).
      model: dim and init scale.
      train: the entity learning rate.
      mesh: the device mesh.
      axis: mesh axis for batch and table rows.

    Returns:
      The EmbeddingCollection.
    """
    tables, features = [], []
    for etype, rows in sorted(graph.num_rows.items()):
        tables.append(specs.TableSpec(
            name=etype, rows=int(rows), dim=model.dim, initializer="normal",
            init_scale=model.init_scale, sharding="row_wise",
            optimizer=specs.RowAdagrad(learning_rate=train.entity_learning_rate,
                                       initial_accumulator=train.entity_initial_accumulator)))
        features.append(specs.FeatureSpec(name=f"{etype}/head", table=etype))
        features.append(specs.FeatureSpec(name=f"{etype}/tail", table=etype))
    return collection_lib.EmbeddingCollection(tables=tables, features=features, mesh=mesh, axis=axis)


def train(
    graph: kg_data.KnowledgeGraph,
    *,
    model: KGModelConfig,
    train_config: KGTrainConfig,
    mesh: jax.sharding.Mesh,
    axis: str = "data",
    eval_config: kg_eval.KGEvalConfig | None = None,
    log_fn: Callable[[dict], None] | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
) -> KGTrainResult:
    """Trains entity tables and relation parameters on graph.splits["train"].

    Multi-process: every process calls this with the same graph and configs on a
    global mesh; each builds only its K / process_count chunks of every batch.

    Checkpoints (`train_config.checkpoint_every` > 0 and a `checkpoint_dir`): the
    TrainState, the data position (epoch, batch of the epoch) and the history are saved
    every that many steps and at the end; a restarted run resumes from the newest
    checkpoint, on any mesh, and reads the same batches as an uninterrupted run.

    Args:
      graph: the typed graph (`jax_recsys.data.kg.KnowledgeGraph`).
      model: model settings.
      train_config: training settings.
      mesh: device mesh (chunks_per_batch must be a multiple of its `axis` size).
      axis: mesh axis for batch and table rows.
      eval_config: settings of the periodic validation evaluation (when
        train_config.eval_every_epochs > 0).
      log_fn: called with each progress dict (default: print).
      checkpoint_dir: training checkpoint folder (None: no checkpoints).

    Returns:
      KGTrainResult.
    """
    from jax_recsys.pretrain import contrastive_train as ckpt_lib  # save/restore_train_state

    log_fn = log_fn or (lambda d: print(d, flush=True))
    n_dev = mesh.shape[axis]
    if train_config.chunks_per_batch % n_dev:
        raise ValueError(f"chunks_per_batch={train_config.chunks_per_batch} must be a multiple of "
                         f"the {n_dev} devices on mesh axis {axis!r}")
    fn = model.scoring()
    coll = build_collection(graph, model=model, train=train_config, mesh=mesh, axis=axis)
    k_rel, k_emb = jax.random.split(jax.random.key(train_config.seed))
    rel = fn.init_relations(k_rel, num_relations=len(graph.relations), dim=model.dim)
    tx = optax.adam(train_config.relation_learning_rate)
    # Relations, their optax state and the step come back replicated on the mesh.
    state = train_step_lib.init_train_state(collection=coll, key=k_emb, params=rel, dense_tx=tx)
    step_fn = train_step_lib.make_train_step(collection=coll, loss_fn=make_loss_fn(fn, train_config),
                                             dense_tx=tx)
    sampler = ChunkSampler(graph.splits["train"], rel_head_type=graph.rel_head_type,
                           rel_tail_type=graph.rel_tail_type, num_rows=graph.num_rows,
                           config=train_config)
    identity = {"model": model.model, "dim": model.dim, "rel_dim": model.rel_dim,
                "seed": train_config.seed, "chunk_size": train_config.chunk_size,
                "chunks_per_batch": train_config.chunks_per_batch,
                "uniform_negatives": train_config.uniform_negatives,
                "num_train_triples": int(len(graph.splits["train"])),
                "num_rows": {k: int(v) for k, v in sorted(graph.num_rows.items())},
                # What else decides the training: a rerun with other values is refused
                # (a finished run's checkpoint skipped all training).
                "gamma": model.gamma, "init_scale": model.init_scale,
                **{k: getattr(train_config, k) for k in (
                    "loss", "margin", "adversarial_temperature", "regularization", "corrupt",
                    "entity_learning_rate", "entity_initial_accumulator",
                    "relation_learning_rate")}}
    filter_index = None
    history, last = [], {}
    step = positives = steady_pos = 0
    start_epoch = start_batch = 0
    ckpt = None
    if train_config.checkpoint_every and checkpoint_dir is not None:
        from jax_recsys import checkpoint

        ckpt = checkpoint.Checkpointer(checkpoint_dir, keep=train_config.keep_checkpoints,
                                       trainer="pretrain_kg")
    # Closed also when training raises (Checkpointer.__exit__): a save still being
    # written is finished before the error reaches the caller.
    with ckpt if ckpt is not None else contextlib.nullcontext():
        if ckpt is not None and ckpt.latest_step() is not None:
            state, meta = ckpt_lib.restore_train_state(ckpt, fresh=state, expected=identity)
            step, positives = meta["step"], meta["positives"]
            start_epoch, start_batch = meta["epoch"], meta["batch_in_epoch"]
            history, last = meta["history"], meta["last"]
            log_fn({"resumed_from_step": step, "epoch": start_epoch, "batch": start_batch,
                    "checkpoints": str(ckpt.directory)})
        resumed_from = step

        saved = [step]

        def save(epoch, next_batch):
            saved[0] = step
            ckpt_lib.save_train_state(ckpt, step, state, {
                **identity, "step": step, "epoch": epoch, "batch_in_epoch": next_batch,
                "positives": positives, "history": history, "last": last})

        steady_s = compile_s = 0.0
        compiled = set()  # batch structures (type pairs) already traced
        window = [time.perf_counter(), 0]
        t_step = time.perf_counter()
        done = train_config.max_steps is not None and step >= train_config.max_steps
        epoch = start_epoch
        pid, nproc = jax.process_index(), jax.process_count()
        for epoch in range(start_epoch, train_config.num_epochs if not done else start_epoch):
            first = start_batch if epoch == start_epoch else 0
            for bi, batch in enumerate(sampler.epoch(epoch, start=first, process_index=pid,
                                                     process_count=nproc), start=first):
                n_pos = sampler.batch_positives  # of the global batch
                structure = tuple(sorted(batch.ids))
                state, m = step_fn(state, train_step_lib.shard_batch(batch, mesh=mesh, axis=axis))
                last = {k: float(v) for k, v in m.items()}  # blocks on every step (DEVELOPERS.md)
                # Wall time since the previous step finished: sampling + transfer + step.
                t_now = time.perf_counter()
                dt, t_step = t_now - t_step, t_now
                if structure in compiled:
                    steady_s, steady_pos = steady_s + dt, steady_pos + n_pos
                else:
                    compiled.add(structure)
                    compile_s += dt
                positives += n_pos
                window[1] += n_pos
                step += 1
                if not math.isfinite(last["loss"]):
                    raise FloatingPointError(f"loss is {last['loss']} at step {step}")
                if train_config.log_every and step % train_config.log_every == 0:
                    now = time.perf_counter()
                    rec = {"step": step, "epoch": epoch, **last,
                           "positives_per_s": window[1] / (now - window[0])}
                    window = [now, 0]
                    history.append(rec)
                    log_fn(rec)
                done = train_config.max_steps is not None and step >= train_config.max_steps
                if ckpt is not None and (step % train_config.checkpoint_every == 0 or done):
                    save(epoch, bi + 1)
                if done:
                    break
            if (not done and train_config.eval_every_epochs and "valid" in graph.splits
                    and (epoch + 1) % train_config.eval_every_epochs == 0):
                filter_index = filter_index or graph.filter_index()
                ev = evaluate_state(graph, state=state, collection=coll, model=model, split="valid",
                                    config=eval_config or kg_eval.KGEvalConfig(max_triples=2000),
                                    filter_index=filter_index)
                rec = {"step": step, "epoch": epoch, **{f"valid_{k}": v for k, v in ev.items()}}
                history.append(rec)
                log_fn(rec)
                window = [time.perf_counter(), 0]
                t_step = time.perf_counter()
            if done:
                break
        if ckpt is not None and saved[0] != step:  # the last step was off the save interval
            save(train_config.num_epochs, 0)
    pos_rate = steady_pos / steady_s if steady_s > 0 else float("nan")
    metrics = {
        "steps": step,
        "resumed_from_step": resumed_from,
        "epochs_run": min(epoch + 1, train_config.num_epochs),
        "positives": positives,
        "train_seconds": steady_s + compile_s,
        "compile_seconds": compile_s,
        "positives_per_s": pos_rate,
        "scored_per_s": pos_rate * (1 + train_config.negatives_per_positive),
        "negatives_per_positive": train_config.negatives_per_positive,
        "batch_positives": train_config.chunks_per_batch * train_config.chunk_size,
        "final_loss": last.get("loss", float("nan")),
    }
    return KGTrainResult(state=state, collection=coll, history=history, metrics=metrics)


def entity_tables(result: KGTrainResult) -> dict[str, np.ndarray]:
    """Host copies of the trained entity tables, unpadded: type -> float32 [R, D].

    Multi-process: every process must call it (the row shards are all-gathered) and
    every process gets the full tables.
    """
    coll, tables = result.collection, result.state.emb.tables
    if all(getattr(t, "is_fully_addressable", True) for t in tables.values()):
        return coll.export_tables(result.state.emb)
    from jax.experimental import multihost_utils

    out = {}
    for key in sorted(tables):
        host = np.asarray(multihost_utils.process_allgather(tables[key], tiled=True))
        for name, t in coll.tables.items():
            pl = coll.plan.placements[name]
            if pl.storage == key:
                out[name] = np.ascontiguousarray(host[pl.row_base:pl.row_base + t.rows, :t.dim])
    return out


def evaluate_state(
    graph: kg_data.KnowledgeGraph,
    *,
    state: train_step_lib.TrainState,
    collection: collection_lib.EmbeddingCollection,
    model: KGModelConfig,
    split: str = "test",
    config: kg_eval.KGEvalConfig = kg_eval.KGEvalConfig(),
    filter_index: kg_data.TripleIndex | None = None,
) -> dict[str, float]:
    """Filtered MRR/Hits of a training state on one split.

    Args:
      graph: the typed graph (all its splits form the filter).
      state: the TrainState.
      collection: its EmbeddingCollection.
      model: model settings.
      split: which split to rank.
      config: evaluation settings.
      filter_index: prebuilt `graph.filter_index()` (built if None).

    Returns:
      kg_eval.evaluate's metrics.
    """
    if split not in graph.splits or len(graph.splits[split]) == 0:
        raise ValueError(f"no {split!r} triples to evaluate (splits: {sorted(graph.splits)})")
    if filter_index is None:
        filter_index = graph.filter_index()
    tables = {t: state.emb.tables[collection.plan.placements[t].storage] for t in graph.num_rows}
    return kg_eval.evaluate(
        model.scoring(), tables=tables, num_rows=graph.num_rows, rel_params=state.params,
        triples=graph.splits[split], rel_head_type=graph.rel_head_type,
        rel_tail_type=graph.rel_tail_type, filter_index=filter_index, mesh=collection.mesh,
        axis=collection.axis, config=config)


# ----------------------------------------------------------------------------- end to end


@dataclasses.dataclass(frozen=True, kw_only=True)
class KGDataConfig:
    """Where the graph comes from.

    Attributes:
      path: a triple folder (train.txt, valid.txt, test.txt, optional
        entity_types.tsv) or a dataset folder whose knowledge graph is read
        (dataset.json's "kg" entry, else DIR/kg).
      unseen: "error" or "skip" for valid/test triples whose entity is not in train.
    """

    path: str
    unseen: str = "error"


def resolve_kg_path(path: str | os.PathLike) -> pathlib.Path:
    """The triple folder behind `path` (itself, the dataset's KG folder, or PATH/kg).

    Args:
      path: triple folder or dataset folder.

    Returns:
      The folder holding train.txt.
    """
    root = pathlib.Path(path)
    if (root / "train.txt").exists():
        return root
    if (root / "dataset.json").exists():
        from jax_recsys.data.folder import DatasetFolder

        folder = DatasetFolder(root)
        if folder.kg_path is None:  # (dataset.json left "kg" out: kg/ was looked for)
            raise ValueError(f"{root / 'dataset.json'} has no knowledge graph ("
                             + ('no "kg" entry, and no kg/train.txt'
                                if "kg" in folder.found_by_name else '"kg": null') + ")")
        return folder.kg_path
    if (root / "kg" / "train.txt").exists():
        return root / "kg"
    raise FileNotFoundError(f"{root}: no train.txt here nor in {root / 'kg'} (expected a triple "
                            "folder or a dataset folder with a knowledge graph)")


def train_and_evaluate(
    *,
    data: KGDataConfig,
    model: KGModelConfig,
    train_config: KGTrainConfig,
    eval_config: kg_eval.KGEvalConfig,
    workdir: str | os.PathLike,
    mesh: jax.sharding.Mesh | None = None,
    log_fn: Callable[[dict], None] | None = None,
) -> dict:
    """Reads the graph, trains, evaluates on test (filtered) and writes the facet.

    The facet checkpoint (`WORKDIR/facet_kg`, facet name "kg") holds one table per
    entity type, with the type's vocabulary as raw ids in row order. Raw ids follow
    `read_triples(normalize_ids=True)`: a type whose names all read "<type>:<id>"
    (the synthetic world's `user:12`) is stored without the prefix, as int64 when every
    id is a canonical integer, so the ranker maps its user/pin/advertiser ids onto it.

    Args:
      data: the graph folder.
      model: model settings.
      train_config: training settings.
      eval_config: evaluation settings.
      workdir: output folder.
      mesh: device mesh (default: every device on one "data" axis).
      log_fn: progress callback (default: print).

    Returns:
      metrics: test MRR/Hits (both sides and per side), training throughput, graph size,
      `resumed_from_step` and the logged progress `history` (including the steps a
      resumed run restored).
    """
    from jax_recsys import checkpoint

    log_fn = log_fn or (lambda d: print(d, flush=True))
    workdir = pathlib.Path(workdir)
    kg_path = resolve_kg_path(data.path)
    graph = kg_data.read_triples(kg_path, unseen=data.unseen)
    if mesh is None:
        from jax_recsys import distributed

        mesh = distributed.global_mesh()
    log_fn({"graph": str(kg_path), "entities": graph.num_rows, "relations": len(graph.relations),
            **{f"{k}_triples": len(v) for k, v in graph.splits.items()}})
    res = train(graph, model=model, train_config=train_config, mesh=mesh, eval_config=eval_config,
                log_fn=log_fn, checkpoint_dir=workdir / "checkpoints")
    split = "test" if len(graph.splits.get("test", ())) else "valid"
    t0 = time.perf_counter()
    if len(graph.splits.get(split, ())):
        ev = evaluate_state(graph, state=res.state, collection=res.collection, model=model,
                            split=split, config=eval_config)
        out = {f"{split}_{k}": v for k, v in ev.items()}
    else:
        # A graph of train.txt alone (or whose valid/test triples were all skipped as
        # unseen) trained in full, then failed here and saved no facet.
        warnings.warn(f"{kg_path}: no valid or test triples (splits: {sorted(graph.splits)}): "
                      "the facet is saved without an evaluation", stacklevel=2)
        out = {}
    out.update(res.metrics)
    out.update({"eval_seconds": time.perf_counter() - t0, "model": model.model, "dim": model.dim,
                "num_entities": int(sum(graph.num_rows.values())),
                "num_relations": len(graph.relations),
                "num_train_triples": len(graph.splits["train"])})
    checkpoint.save_facet(workdir / "facet_kg", facet="kg", tables=entity_tables(res),
                          vocabs={t: graph.vocabs[t].ids for t in graph.num_rows}, metrics=out)
    log_fn({"final": out})
    return {**out, "history": res.history}
