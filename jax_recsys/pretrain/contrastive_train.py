"""Trainer for user–pin contrastive pretraining (facet `cl`).

`ContrastiveTrainer` ties the pieces together: the `user` and `pin` tables live in
the embedding engine (row-wise sharded, updated sparsely by a row optimizer at a
large learning rate), the two-tower dense part is an nnx module trained by optax
at a small learning rate, and one jitted train step (the engine's step shape)
applies the pure sampled-softmax loss. `train_and_evaluate` runs the loop with
progress lines, evaluates Recall@K/NDCG@K against all pins every `eval_every`
steps (and at the end) next to the popularity baseline and the held-out loss,
and writes the facet checkpoint and metrics.json.

Batches (`Batch`): ids `user_id` [B], `pin_id` [B] (table rows; -1 = padding) and,
with mixed negative sampling, `neg_pin_id` [B, M] (uniform pin rows; the B*M of
them are shared negatives of the whole batch); dense `pin_log_q` [B] and
`neg_log_q` [B, M] (logQ of each candidate: log(p_j + M / R), with p_j the pin's
training frequency, since a pin is a candidate B*p_j times in-batch plus B*M/R
times as a uniform negative; the common factor B cancels in the softmax), and
`pin_side/<name>` [B] (side feature ids as float32); label `weight` [B].

Legend: B batch, M uniform negatives per example, D table dim, D' tower output
dim, R pin rows, Q held-out pairs, S devices.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import time
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jax_recsys import distributed
from jax_recsys.data.batching import Batch
from jax_recsys.embedding import collection as collection_lib
from jax_recsys.embedding import specs
from jax_recsys.embedding import train_step as train_step_lib
from jax_recsys.embedding.train_step import TrainState
from jax_recsys.pretrain import contrastive_loss, contrastive_model, retrieval_eval
from jax_recsys.pretrain.contrastive_data import ContrastivePairs

FACET = "cl"


@dataclasses.dataclass(frozen=True, kw_only=True)
class ContrastiveConfig:
    """Model, loss and optimisation settings.

    Attributes:
      dim: table dim D.
      project: a Linear(D, D) per tower after the ID row.
      temperature: softmax temperature.
      use_logq: apply the logQ correction (pin frequencies of the training window).
      remove_accidental_hits: mask in-batch columns that are the row's own pin or
        another positive of the same user.
      uniform_negatives: M, extra uniformly sampled pins per example (0 = in-batch only).
      batch_size: B (global; must divide by the device count).
      num_epochs: passes over the training pairs (ignored when max_steps is set).
      max_steps: exact number of steps, or None.
      table_optimizer: sparse row optimizer of both tables (its learning rate is
        the large table learning rate).
      dense_learning_rate: Adam learning rate of the tower dense parts.
      init_scale: stddev of the table init (None: 1/sqrt(D)).
      eval_every: evaluate retrieval every N steps (0: only at the end).
      eval_ks: Recall@K / NDCG@K cut-offs.
      eval_loss_batches: held-out batches for the held-out loss.
      log_every: progress line every N steps.
      export: "tower" saves the tower outputs (projected, unit-norm rows; what
        retrieval scores) as the facet tables, "raw" the table rows.
      seed: init, shuffling and negative sampling.
    """

    dim: int = 64
    project: bool = True
    temperature: float = 0.05
    use_logq: bool = True
    remove_accidental_hits: bool = True
    uniform_negatives: int = 0
    batch_size: int = 4096
    num_epochs: float = 1.0
    max_steps: int | None = None
    table_optimizer: specs.OptimizerSpec = dataclasses.field(
        default_factory=lambda: specs.RowAdagrad(learning_rate=0.05, initial_accumulator=1e-6)
    )
    dense_learning_rate: float = 1e-3
    init_scale: float | None = None
    eval_every: int = 0
    eval_ks: tuple[int, ...] = (10, 50, 100)
    eval_loss_batches: int = 4
    log_every: int = 50
    export: str = "tower"
    seed: int = 0

    def __post_init__(self):
        if self.export not in ("tower", "raw"):
            raise ValueError(f"export must be 'tower' or 'raw', got {self.export!r}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2, got {self.batch_size}")
        if self.uniform_negatives < 0:
            raise ValueError(f"uniform_negatives must be >= 0, got {self.uniform_negatives}")


def _to_host(x) -> np.ndarray:
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


class ContrastiveTrainer:
    """Builds the tables, towers and jitted steps for given vocabulary sizes.

    Args:
      config: model/optimisation settings.
      num_users: user table rows.
      num_pins: pin table rows R.
      pin_freq: [R] training frequency of each pin (logQ); None = uniform.
      pin_side: side feature -> [R] int ids (-1 missing) for the pin tower.
      side_vocab_sizes: side feature -> number of values.
      mesh: 1-D mesh; tables row-sharded and batches sharded on its axis.
      axis: the mesh axis name.
    """

    def __init__(
        self,
        *,
        config: ContrastiveConfig,
        num_users: int,
        num_pins: int,
        mesh: Mesh,
        pin_freq: np.ndarray | None = None,
        pin_side: Mapping[str, np.ndarray] | None = None,
        side_vocab_sizes: Mapping[str, int] | None = None,
        axis: str = "data",
    ):
        cfg = self.config = config
        self.mesh, self.axis = mesh, axis
        self.num_users, self.num_pins = int(num_users), int(num_pins)
        s = mesh.shape[axis]
        if cfg.batch_size % s:
            raise ValueError(f"batch_size {cfg.batch_size} must divide by the {s} devices")
        self.pin_side = {k: np.asarray(v, np.int32) for k, v in (pin_side or {}).items()}
        side_vocab_sizes = dict(side_vocab_sizes or {})
        if set(side_vocab_sizes) != set(self.pin_side):
            raise ValueError(
                f"pin side features {sorted(self.pin_side)} and their vocab sizes "
                f"{sorted(side_vocab_sizes)} disagree"
            )
        freq = (np.full(num_pins, 1.0 / num_pins) if pin_freq is None
                else np.asarray(pin_freq, np.float64))
        if freq.shape != (num_pins,):
            raise ValueError(f"pin_freq has shape {freq.shape}, expected ({num_pins},)")
        self.pin_log_q = np.log(freq + cfg.uniform_negatives / num_pins + 1e-12).astype(np.float32)

        table = dict(dim=cfg.dim, init_scale=cfg.init_scale, sharding="row_wise",
                     optimizer=cfg.table_optimizer)
        features = [specs.FeatureSpec(name="user_id", table="user"),
                    specs.FeatureSpec(name="pin_id", table="pin")]
        if cfg.uniform_negatives:
            features.append(specs.FeatureSpec(name="neg_pin_id", table="pin",
                                              max_ids=cfg.uniform_negatives))
        self.collection = collection_lib.EmbeddingCollection(
            tables=[specs.TableSpec(name="user", rows=self.num_users, **table),
                    specs.TableSpec(name="pin", rows=self.num_pins, **table)],
            features=features, mesh=mesh,
        )
        model = contrastive_model.TwoTower(
            dim=cfg.dim,
            user=contrastive_model.TowerConfig(project=cfg.project),
            pin=contrastive_model.TowerConfig(project=cfg.project,
                                              side_vocab_sizes=side_vocab_sizes),
            rngs=nnx.Rngs(cfg.seed),
        )
        self.graphdef, params = nnx.split(model, nnx.Param)
        self.tx = optax.adam(cfg.dense_learning_rate)
        params = jax.device_put(params, NamedSharding(mesh, P()))
        self.state = train_step_lib.init_train_state(
            collection=self.collection, key=jax.random.key(cfg.seed), params=params,
            dense_tx=self.tx)
        self._train_step = train_step_lib.make_train_step(
            collection=self.collection, loss_fn=self.loss_fn, dense_tx=self.tx,
            model_graphdef=self.graphdef)
        self._eval_loss = train_step_lib.make_eval_step(
            collection=self.collection, eval_fn=self.loss_fn, model_graphdef=self.graphdef)
        self._embed_pins = jax.jit(self._pins_tower)
        self._embed_users = jax.jit(self._users_tower)
        self._rng = np.random.default_rng(cfg.seed + 1)

    # ----------------------------------------------------------------- loss and steps

    def loss_fn(self, *, rows, params: contrastive_model.TwoTower, batch: Batch):
        """The engine's loss signature: looked-up rows + the merged towers + batch.

        Returns:
          (loss, {"acc": in-batch accuracy}).
        """
        cfg = self.config
        model = params
        side = {k: batch.dense[f"pin_side/{k}"].astype(jnp.int32) for k in self.pin_side}
        user_bd, pin_bd = model(user_rows_bd=rows["user_id"], pin_rows_bd=rows["pin_id"],
                                pin_side=side)
        neg = {}
        if cfg.uniform_negatives:
            b, m = batch.ids["neg_pin_id"].shape
            neg_side = {k: batch.dense[f"neg_side/{k}"].astype(jnp.int32).reshape(b * m)
                        for k in self.pin_side}
            neg = dict(
                neg_pin_nd=model.pin(rows["neg_pin_id"].reshape(b * m, cfg.dim), neg_side),
                neg_log_q_n=batch.dense["neg_log_q"].reshape(b * m) if cfg.use_logq else None,
                neg_ids_n=batch.ids["neg_pin_id"].reshape(b * m),
                neg_mask_n=jnp.repeat(batch.mask, m),
            )
        loss, aux = contrastive_loss.sampled_softmax_loss(
            user_bd=user_bd, pin_bd=pin_bd, temperature=cfg.temperature,
            pin_log_q_b=batch.dense["pin_log_q"] if cfg.use_logq else None,
            user_ids_b=batch.ids["user_id"], pin_ids_b=batch.ids["pin_id"],
            remove_accidental_hits=cfg.remove_accidental_hits,
            weights_b=batch.labels["weight"], mask_b=batch.mask, **neg,
        )
        return loss, {"acc": aux["acc"]}

    def _pins_tower(self, state: TrainState, side):
        table_rd = state.emb.tables["pin"]
        model = nnx.merge(self.graphdef, state.params)
        return model.pin(table_rd, side)

    def _users_tower(self, state: TrainState):
        model = nnx.merge(self.graphdef, state.params)
        return model.user(state.emb.tables["user"])

    # ----------------------------------------------------------------------- batches

    def make_batch(
        self, user_rows: np.ndarray, pin_rows: np.ndarray, weights: np.ndarray | None = None
    ) -> Batch:
        """Host batch of B pairs (padded with -1 / mask 0 when fewer are given).

        Args:
          user_rows, pin_rows: [n <= B] table rows.
          weights: [n] pair weights (default 1).

        Returns:
          The Batch (NumPy leaves), with logQ, side features and uniform negatives.
        """
        b, m = self.config.batch_size, self.config.uniform_negatives
        n = len(user_rows)
        if n > b:
            raise ValueError(f"{n} pairs do not fit a batch of {b}")
        pad = b - n

        def padded(x, fill, dtype):
            return np.concatenate([np.asarray(x, dtype), np.full(pad, fill, dtype)])

        u = padded(user_rows, -1, np.int32)
        p = padded(pin_rows, -1, np.int32)
        w = padded(np.ones(n) if weights is None else weights, 0.0, np.float32)
        mask = padded(np.ones(n), 0.0, np.float32)
        pc = np.maximum(p, 0)
        ids = {"user_id": u, "pin_id": p}
        dense = {"pin_log_q": self.pin_log_q[pc]}
        dense.update({f"pin_side/{k}": v[pc].astype(np.float32) for k, v in self.pin_side.items()})
        if m:
            neg = self._rng.integers(0, self.num_pins, size=(b, m), dtype=np.int32)
            ids["neg_pin_id"] = neg
            dense["neg_log_q"] = self.pin_log_q[neg]
            dense.update({f"neg_side/{k}": v[neg].astype(np.float32)
                          for k, v in self.pin_side.items()})
        return Batch(ids=ids, dense=dense, labels={"weight": w}, mask=mask)

    def to_device(self, batch: Batch) -> Batch:
        """Shards a global host batch over the mesh axis (each process sends its rows)."""
        n, pid = jax.process_count(), jax.process_index()
        if n > 1:  # every process builds the same global batch; keep this one's slice
            b_p = self.config.batch_size // n
            batch = jax.tree.map(lambda x: x[pid * b_p : (pid + 1) * b_p], batch)
        return train_step_lib.shard_batch(batch, mesh=self.mesh, axis=self.axis)

    # ------------------------------------------------------------------------- API

    def train_step(self, batch: Batch) -> dict[str, float]:
        """One update on a host batch; blocks and returns the metrics as floats."""
        self.state, metrics = self._train_step(self.state, self.to_device(batch))
        return {k: float(v) for k, v in metrics.items()}

    def heldout_loss(self, user_rows: np.ndarray, pin_rows: np.ndarray,
                     max_batches: int) -> float:
        """Mean loss over up to `max_batches` held-out batches (no update)."""
        b = self.config.batch_size
        losses, sizes = [], []
        for start in range(0, min(len(user_rows), b * max_batches), b):
            sl = slice(start, start + b)
            batch = self.make_batch(user_rows[sl], pin_rows[sl])
            out = self._eval_loss(self.state, self.to_device(batch))
            losses.append(float(out[0]))
            sizes.append(len(user_rows[sl]))
        if not losses:
            return float("nan")
        return float(np.average(losses, weights=sizes))

    def pin_embeddings(self) -> jax.Array:
        """[R_pad, D'] tower outputs of every pin row, row-sharded like the table."""
        r_pad = self.state.emb.tables["pin"].shape[0]
        side = {}
        for k, v in self.pin_side.items():
            full = np.concatenate([v, np.full(r_pad - v.size, -1, np.int32)])
            side[k] = jax.device_put(full, NamedSharding(self.mesh, P(self.axis)))
        return self._embed_pins(self.state, side)

    def user_embeddings(self) -> jax.Array:
        """[R_user_pad, D'] tower outputs of every user row, row-sharded."""
        return self._embed_users(self.state)

    def evaluate(self, pairs: ContrastivePairs, *, heldout_loss: bool = True) -> dict:
        """Recall@K / NDCG@K on the held-out pairs vs all pins, popularity baseline, loss."""
        cfg = self.config
        t0 = time.perf_counter()
        users = _to_host(self.user_embeddings())
        out = retrieval_eval.evaluate_retrieval(
            user_qd=users[pairs.eval_user], pin_rd=self.pin_embeddings(),
            pos_rows_q=pairs.eval_pin, mesh=self.mesh, ks=cfg.eval_ks, axis=self.axis,
            valid_rows=self.num_pins, train_pin_rows=pairs.train_pin,
        )
        out["eval_seconds"] = time.perf_counter() - t0
        if heldout_loss:
            out["heldout_loss"] = self.heldout_loss(pairs.eval_user, pairs.eval_pin,
                                                    cfg.eval_loss_batches)
        return out

    def export_tables(self) -> dict[str, np.ndarray]:
        """The facet tables {"user": [R_user, D'], "pin": [R, D']} as NumPy."""
        if self.config.export == "raw":
            t = self.state.emb.tables
            return {"user": _to_host(t["user"])[: self.num_users],
                    "pin": _to_host(t["pin"])[: self.num_pins]}
        return {"user": _to_host(self.user_embeddings())[: self.num_users],
                "pin": _to_host(self.pin_embeddings())[: self.num_pins]}


def train_and_evaluate(
    *, pairs: ContrastivePairs, config: ContrastiveConfig, workdir: str | pathlib.Path,
    mesh: Mesh | None = None, save: bool = True,
) -> dict:
    """Trains the towers on the pairs, evaluates, writes the facet checkpoint.

    Args:
      pairs: training/held-out pairs and vocabularies (see contrastive_data).
      config: model and optimisation settings.
      workdir: output folder; the facet goes to workdir/facet_cl.
      mesh: 1-D mesh (default: every device on axis "data").
      save: write the facet checkpoint.

    Returns:
      Final metrics (train loss, examples/s, Recall@K, NDCG@K, popularity
      baseline, held-out loss, data stats).
    """
    mesh = mesh or distributed.global_mesh()
    cfg = config
    trainer = ContrastiveTrainer(
        config=cfg, num_users=pairs.user_ids.size, num_pins=pairs.pin_ids.size, mesh=mesh,
        pin_freq=pairs.pin_freq, pin_side=pairs.pin_side,
        side_vocab_sizes=pairs.side_vocab_sizes,
    )
    n, b = pairs.train_user.size, cfg.batch_size
    steps_per_epoch = max(n // b, 1)
    total = cfg.max_steps if cfg.max_steps is not None else max(
        int(round(cfg.num_epochs * steps_per_epoch)), 1)
    logging.info("contrastive: %d pairs, %d users, %d pins, %d steps of %d",
                 n, pairs.user_ids.size, pairs.pin_ids.size, total, b)
    rng = np.random.default_rng(cfg.seed)
    perm, pos = rng.permutation(n), 0
    history, ema, t_start, train_time, seen = [], None, time.perf_counter(), 0.0, 0
    for step in range(1, total + 1):
        if pos + b > n and n >= b:
            perm, pos = rng.permutation(n), 0
        idx = perm[pos : pos + b]
        pos += b
        t0 = time.perf_counter()
        m = trainer.train_step(trainer.make_batch(
            pairs.train_user[idx], pairs.train_pin[idx], pairs.train_weight[idx]))
        if step > 1:  # step 1 compiles: not throughput
            train_time += time.perf_counter() - t0
            seen += len(idx)
        ema = m["loss"] if ema is None else 0.9 * ema + 0.1 * m["loss"]
        if step % cfg.log_every == 0 or step == total:
            logging.info("step %d/%d loss %.4f (ema %.4f) acc %.3f %.0f examples/s",
                         step, total, m["loss"], ema, m["acc"], seen / max(train_time, 1e-9))
        if cfg.eval_every and step % cfg.eval_every == 0 and step != total:
            ev = trainer.evaluate(pairs, heldout_loss=True)
            history.append({"step": step, **ev})
            logging.info("eval step %d: %s", step, _fmt(ev))
    train_seconds = time.perf_counter() - t_start
    ev = trainer.evaluate(pairs, heldout_loss=True)
    logging.info("final eval: %s", _fmt(ev))
    metrics = {
        "train_loss": m["loss"], "train_loss_ema": ema, "steps": total,
        "examples_per_sec": seen / train_time if seen else float("nan"),
        "train_seconds": train_seconds, **ev, "data": pairs.stats, "history": history,
        "facet": FACET,
    }
    if save:
        _save(trainer, pairs, pathlib.Path(workdir) / f"facet_{FACET}", metrics)
    return metrics


def _save(trainer: ContrastiveTrainer, pairs: ContrastivePairs, path: pathlib.Path,
          metrics: dict) -> None:
    from jax_recsys import checkpoint
    from jax_recsys.data.vocab import Vocab

    flat = {k: v for k, v in metrics.items() if isinstance(v, int | float | str)}
    # Every process calls this (collective gathers); only process 0 writes.
    checkpoint.save_facet(
        path, facet=FACET, tables=trainer.export_tables(),
        vocabs={"user": Vocab(pairs.user_ids), "pin": Vocab(pairs.pin_ids)},
        metrics={**flat, "data": pairs.stats},
    )


def _fmt(d: dict) -> str:
    return " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in sorted(d.items()))
