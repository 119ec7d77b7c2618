"""Trainer for user–pin contrastive pretraining (facet `cl`).

`ContrastiveTrainer` ties the pieces together: the `user` and `pin` tables live in
the embedding engine (row-wise sharded, updated sparsely by a row optimizer at a
large learning rate), the two-tower dense part is an nnx module trained by optax
at a small learning rate, and one jitted train step (the engine's step shape)
applies the pure sampled-softmax loss. `train_and_evaluate` runs the loop with
progress lines, evaluates Recall@K/NDCG@K against all pins every `eval_every`
steps (and at the end) next to the popularity baseline and the held-out loss,
and writes the facet checkpoint and metrics.json.

Multi-process runs: every process runs the same code on a global mesh; each builds
only its B / process_count rows of every batch (`PairSchedule`, negatives seeded by
(seed, step)), metrics come out identical on every process and only process 0
writes the facet. Training checkpoints (`checkpoint_every`) hold the TrainState and
the step; `restore_train_state` puts them onto a mesh of any size, and a resumed
run reads exactly the batches an uninterrupted one reads.

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

import contextlib
import dataclasses
import json
import logging
import math
import pathlib
import time
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jax_recsys import distributed
from jax_recsys.data.batching import Batch
from jax_recsys.embedding import collection as collection_lib, specs, train_step as train_step_lib
from jax_recsys.embedding.train_step import TrainState
from jax_recsys.pretrain import (
    contrastive_data,
    contrastive_loss,
    contrastive_model,
    retrieval_eval,
)
from jax_recsys.pretrain.contrastive_data import ContrastivePairs

FACET = "cl"
_HELDOUT_STEP = 1 << 40  # negative-sampling seeds of held-out batches (never a train step)


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
      log_every: progress line (and `history` entry) every N steps and at the last
        step (0: never).
      export: "tower" saves the tower outputs (projected, unit-norm rows; what
        retrieval scores) as the facet tables, "raw" the table rows.
      seed: init, shuffling and negative sampling.
      checkpoint_every: save a training checkpoint every N steps and at the end, and
        resume from the newest one on start (0: no training checkpoints).
      keep_checkpoints: how many training checkpoints to keep.
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
    checkpoint_every: int = 0
    keep_checkpoints: int = 2

    def __post_init__(self):
        if self.dim < 1:
            raise ValueError(f"ContrastiveConfig.dim (the table and tower width) must be >= 1, got "
                             f"{self.dim}")
        if not self.eval_ks or min(self.eval_ks) < 1:
            raise ValueError(f"ContrastiveConfig.eval_ks must list cut-offs >= 1, got "
                             f"{tuple(self.eval_ks)}")
        if self.export not in ("tower", "raw"):
            raise ValueError(f"export must be 'tower' or 'raw', got {self.export!r}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2, got {self.batch_size}")
        # NaN stopped training with a FloatingPointError; a negative rate ascends the loss.
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature}")
        if not (math.isfinite(self.dense_learning_rate) and self.dense_learning_rate >= 0):
            raise ValueError(f"dense_learning_rate must be a finite number >= 0, got "
                             f"{self.dense_learning_rate}")
        if self.uniform_negatives < 0:
            raise ValueError(f"uniform_negatives must be >= 0, got {self.uniform_negatives}")
        if not (math.isfinite(self.num_epochs) and self.num_epochs > 0):
            raise ValueError(f"num_epochs must be a finite number > 0, got {self.num_epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 or None (from num_epochs), got "
                             f"{self.max_steps}")
        if self.log_every < 0 or self.eval_every < 0:
            raise ValueError(f"log_every and eval_every must be >= 0 (0: never / only at the "
                             f"end), got {self.log_every}, {self.eval_every}")
        from jax_recsys import checkpoint

        checkpoint.check_settings(checkpoint_every=self.checkpoint_every,
                                  keep_checkpoints=self.keep_checkpoints)
        if self.seed < 0:  # NumPy's generators take none (was "expected non-negative integer")
            raise ValueError(f"seed must be >= 0, got {self.seed}")


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
        # Params, optax state and step replicated on the mesh as the step returns them:
        # one compilation, and global arrays that multi-process jit and Orbax accept.
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
        args = dict(
            user_bd=user_bd, pin_bd=pin_bd, temperature=cfg.temperature,
            pin_log_q_b=batch.dense["pin_log_q"] if cfg.use_logq else None,
            user_ids_b=batch.ids["user_id"], pin_ids_b=batch.ids["pin_id"],
            remove_accidental_hits=cfg.remove_accidental_hits,
            weights_b=batch.labels["weight"], mask_b=batch.mask, **neg,
        )
        if self.mesh.shape[self.axis] > 1:
            # Same loss, each device scoring its own rows (no collectives in the loop).
            loss, acc = contrastive_loss.sharded_loss_and_acc(
                mesh=self.mesh, axis=self.axis, **args)
            return loss, {"acc": acc}
        loss, aux = contrastive_loss.sampled_softmax_loss(**args)
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
        self, user_rows: np.ndarray, pin_rows: np.ndarray, weights: np.ndarray | None = None,
        *, step: int | None = None, local: bool = False,
    ) -> Batch:
        """Host batch of B pairs (padded with -1 / mask 0 when fewer are given).

        Args:
          user_rows, pin_rows: [n <= B] table rows.
          weights: [n] pair weights (default 1).
          step: global step; seeds the uniform negatives (None: the trainer's own
            stream, not reproducible across restarts).
          local: return only this process's contiguous B / process_count slice.

        Returns:
          The Batch (NumPy leaves), with logQ, side features and uniform negatives.
        """
        b = self.config.batch_size
        n = len(user_rows)
        if n > b:
            raise ValueError(f"{n} pairs do not fit a batch of {b}")
        pad = b - n

        def padded(x, fill, dtype):
            return np.concatenate([np.asarray(x, dtype), np.full(pad, fill, dtype)])

        cols = (padded(user_rows, -1, np.int32), padded(pin_rows, -1, np.int32),
                padded(np.ones(n) if weights is None else weights, 0.0, np.float32),
                padded(np.ones(n), 0.0, np.float32))
        neg = self._negatives(step)
        if local:
            sl = self._process_slice()
            cols = tuple(c[sl] for c in cols)
            neg = None if neg is None else neg[sl]
        return self._build(*cols, neg)

    def step_batch(self, pairs: ContrastivePairs, schedule: contrastive_data.PairSchedule,
                   step: int, perm: np.ndarray | None = None) -> Batch:
        """This process's part of the training batch of 0-based global `step`.

        Reads only the process's B / process_count pairs (see `PairSchedule`).

        Args:
          pairs: the training pairs.
          schedule: the batch schedule over them.
          step: 0-based global step (also seeds the uniform negatives).
          perm: the step's epoch permutation, if cached.

        Returns:
          The process-local Batch (NumPy leaves, [B / process_count] rows).
        """
        idx = schedule.indices(step, perm=perm, process_index=jax.process_index(),
                               process_count=jax.process_count())
        ok = idx >= 0
        j = np.where(ok, idx, 0)
        neg = self._negatives(step)
        return self._build(
            np.where(ok, pairs.train_user[j], -1).astype(np.int32),
            np.where(ok, pairs.train_pin[j], -1).astype(np.int32),
            np.where(ok, pairs.train_weight[j], 0.0).astype(np.float32),
            ok.astype(np.float32),
            None if neg is None else neg[self._process_slice()],
        )

    def _process_slice(self) -> slice:
        b_p = self.config.batch_size // jax.process_count()
        return slice(jax.process_index() * b_p, (jax.process_index() + 1) * b_p)

    def _negatives(self, step: int | None) -> np.ndarray | None:
        """[B, M] uniform negative pin rows of the global batch (None when M = 0)."""
        b, m = self.config.batch_size, self.config.uniform_negatives
        if not m:
            return None
        rng = self._rng if step is None else np.random.default_rng([self.config.seed, 1, step])
        return rng.integers(0, self.num_pins, size=(b, m), dtype=np.int32)

    def _build(self, u, p, w, mask, neg) -> Batch:
        pc = np.maximum(p, 0)
        ids = {"user_id": u, "pin_id": p}
        dense = {"pin_log_q": self.pin_log_q[pc]}
        dense.update({f"pin_side/{k}": v[pc].astype(np.float32) for k, v in self.pin_side.items()})
        if neg is not None:
            ids["neg_pin_id"] = neg
            dense["neg_log_q"] = self.pin_log_q[neg]
            dense.update({f"neg_side/{k}": v[neg].astype(np.float32)
                          for k, v in self.pin_side.items()})
        return Batch(ids=ids, dense=dense, labels={"weight": w}, mask=mask)

    def to_device(self, batch: Batch) -> Batch:
        """Assembles the global batch on the mesh, sharded on the batch axis.

        Each process passes its own B / process_count rows (`local=True` batches,
        `step_batch`); a full global host batch is cut to this process's slice first.
        """
        if jax.process_count() > 1 and batch.mask.shape[0] == self.config.batch_size:
            batch = jax.tree.map(lambda x: x[self._process_slice()], batch)
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
        for i, start in enumerate(range(0, min(len(user_rows), b * max_batches), b)):
            sl = slice(start, start + b)
            # Fixed negative seeds, no training step's: the same loss at every evaluation.
            batch = self.make_batch(user_rows[sl], pin_rows[sl], step=_HELDOUT_STEP + i,
                                    local=True)
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

    Multi-process: every process calls this with the same pairs and config; each
    builds only its B / process_count slice of every batch, metrics are identical on
    every process, and only process 0 writes the facet.

    With `config.checkpoint_every` > 0 the TrainState and the data position are saved
    to workdir/checkpoints every that many steps and at the end, and a restarted run
    resumes from the newest checkpoint (on any mesh): it reads the same batches and
    negatives as an uninterrupted run, so it ends with the same metrics.

    Args:
      pairs: training/held-out pairs and vocabularies (see contrastive_data).
      config: model and optimisation settings.
      workdir: output folder; the facet goes to workdir/facet_cl, training
        checkpoints to workdir/checkpoints.
      mesh: 1-D mesh (default: every device of every process on axis "data").
      save: write the facet checkpoint.

    Returns:
      Final metrics (train loss, examples/s, Recall@K, NDCG@K, popularity
      baseline, held-out loss, data stats, `history` of logged steps and evals,
      `resumed_from_step`).
    """
    mesh = mesh or distributed.global_mesh()
    cfg = config
    trainer = ContrastiveTrainer(
        config=cfg, num_users=pairs.user_ids.size, num_pins=pairs.pin_ids.size, mesh=mesh,
        pin_freq=pairs.pin_freq, pin_side=pairs.pin_side,
        side_vocab_sizes=pairs.side_vocab_sizes,
    )
    n, b = pairs.train_user.size, cfg.batch_size
    schedule = contrastive_data.PairSchedule(num_pairs=n, batch_size=b, seed=cfg.seed)
    total = cfg.max_steps if cfg.max_steps is not None else max(
        int(round(cfg.num_epochs * schedule.steps_per_epoch)), 1)
    logging.info("contrastive: %d pairs, %d users, %d pins, %d steps of %d on %d devices "
                 "(%d processes)", n, pairs.user_ids.size, pairs.pin_ids.size, total, b,
                 mesh.size, jax.process_count())
    # What decides the batches and the state's layout: a checkpoint of another run
    # (other data, seed or shapes) is refused instead of being cut to fit.
    identity = {"num_pairs": n, "batch_size": b, "seed": cfg.seed,
                "num_users": int(pairs.user_ids.size), "num_pins": int(pairs.pin_ids.size),
                "dim": cfg.dim, "project": cfg.project,
                "uniform_negatives": cfg.uniform_negatives,
                "pin_side": {k: int(v) for k, v in pairs.side_vocab_sizes.items()},
                **training_settings(cfg, pairs)}
    history, ema, m, start = [], None, {}, 0
    ckpt = None
    if cfg.checkpoint_every:
        from jax_recsys import checkpoint

        ckpt = checkpoint.Checkpointer(pathlib.Path(workdir) / "checkpoints",
                                       keep=cfg.keep_checkpoints,
                                       trainer="pretrain_contrastive")
    # Closed also when training raises (Checkpointer.__exit__): a save still being
    # written is finished before the error reaches the caller.
    with ckpt if ckpt is not None else contextlib.nullcontext():
        if ckpt is not None and ckpt.latest_step() is not None:
            trainer.state, meta = restore_train_state(ckpt, fresh=trainer.state, expected=identity)
            start, history, ema, m = meta["step"], meta["history"], meta["ema"], meta["last"]
            logging.info("resumed from %s at step %d (epoch %d, step %d of it)",
                         ckpt.directory, start, meta["epoch"], meta["step_in_epoch"])
        t_start, train_time, seen = time.perf_counter(), 0.0, 0
        perm_epoch, perm = None, None
        for step in range(start + 1, total + 1):
            epoch = schedule.position(step - 1)["epoch"]
            if epoch != perm_epoch:
                perm_epoch, perm = epoch, schedule.permutation(epoch)
            t0 = time.perf_counter()
            m = trainer.train_step(trainer.step_batch(pairs, schedule, step - 1, perm))
            if not np.isfinite(m["loss"]):
                raise FloatingPointError(f"contrastive loss is {m['loss']} at step {step}")
            if step > start + 1:  # the first step compiles: not throughput
                train_time += time.perf_counter() - t0
                seen += b
            ema = m["loss"] if ema is None else 0.9 * ema + 0.1 * m["loss"]
            if cfg.log_every and (step % cfg.log_every == 0 or step == total):
                logging.info("step %d/%d loss %.4f (ema %.4f) acc %.3f %.0f examples/s",
                             step, total, m["loss"], ema, m["acc"], seen / max(train_time, 1e-9))
                history.append({"step": step, "loss": m["loss"], "acc": m["acc"]})
            if cfg.eval_every and step % cfg.eval_every == 0 and step != total:
                ev = trainer.evaluate(pairs, heldout_loss=True)
                history.append({"step": step, **ev})
                logging.info("eval step %d: %s", step, _fmt(ev))
            if ckpt is not None and (step % cfg.checkpoint_every == 0 or step == total):
                save_train_state(ckpt, step, trainer.state, {
                    **identity, "step": step, **schedule.position(step), "ema": ema,
                    "last": m, "history": history})
    if start > total:
        logging.warning("the checkpoint is at step %d, past the %d steps asked for", start, total)
    train_seconds = time.perf_counter() - t_start
    ev = trainer.evaluate(pairs, heldout_loss=True)
    logging.info("final eval: %s", _fmt(ev))
    metrics = {
        "train_loss": m.get("loss", float("nan")), "train_loss_ema": ema,
        "steps": max(total, start), "resumed_from_step": start,
        "examples_per_sec": seen / train_time if seen else float("nan"),
        "train_seconds": train_seconds, **ev, "data": pairs.stats, "history": history,
        "facet": FACET,
    }
    if save:
        _save(trainer, pairs, pathlib.Path(workdir) / f"facet_{FACET}", metrics)
    return metrics


# ------------------------------------------------------------------ training checkpoints


def save_train_state(ckpt, step: int, state: TrainState, meta: dict, *,
                     force: bool = True) -> bool:
    """Saves a TrainState and JSON `meta`, recording every leaf's shape in the meta.

    The shapes let `restore_train_state` restore onto a mesh of another size, where
    the tables are padded to a different number of rows. Every process must call it.

    Args:
      ckpt: a `jax_recsys.checkpoint.Checkpointer`.
      step: checkpoint id (the training step).
      state: the TrainState (tables, sparse slots, dense params, optax state, step).
      meta: JSON-serialisable data position and bookkeeping.
      force: save even off the checkpointer's save interval.

    Returns:
      True if a checkpoint was started.
    """
    shapes = {jax.tree_util.keystr(p): list(np.shape(x))
              for p, x in jax.tree_util.tree_flatten_with_path(state)[0]}
    return ckpt.save(step, state, {**meta, "state_shapes": shapes}, force=force)


def restore_train_state(ckpt, *, fresh: TrainState, step: int | None = None,
                        expected: dict | None = None) -> tuple[TrainState, dict]:
    """Restores a `save_train_state` checkpoint onto the mesh and layout of `fresh`.

    Works across mesh sizes (8 -> 4 -> 1 devices, 2 processes -> 1): each leaf is
    read with its saved shape, sharded like `fresh`'s leaf where that fits (else
    replicated), then cut or zero-padded to `fresh`'s shape (the row padding of
    row-sharded tables and slots, and the column padding of column-wise ones, depends
    on the device count; padding is never looked up). Not for table-wise stacked
    storage, whose row offsets move with the mesh; the pretrainers use row-wise
    tables. Pass `expected` so that a checkpoint of another run (whose leaves would
    be cut to fit) is refused before anything is read.

    Args:
      ckpt: a `jax_recsys.checkpoint.Checkpointer`.
      fresh: a freshly initialised TrainState on the target mesh (structure,
        dtypes, shapes and shardings of the result).
      step: which checkpoint (None: the newest).
      expected: meta keys that must match (see `check_resume_meta`).

    Returns:
      (state, meta).

    Raises:
      ValueError: the meta disagrees with `expected` (names the checkpoint folder).
    """
    from jax_recsys import checkpoint

    step = ckpt.latest_step() if step is None else int(step)
    if step is None:
        raise FileNotFoundError(f"{ckpt.directory}: no checkpoint to restore")
    saved_meta = ckpt.restore_meta(int(step))
    if expected is not None:
        check_resume_meta(saved_meta, expected, ckpt.directory / str(step))
    saved = saved_meta.get("state_shapes", {})
    leaves, treedef = jax.tree_util.tree_flatten_with_path(fresh)
    targets = []
    for path, x in leaves:
        shape = tuple(saved.get(jax.tree_util.keystr(path), np.shape(x)))
        targets.append(checkpoint.abstract_like(
            jax.ShapeDtypeStruct(shape, x.dtype), getattr(x, "sharding", None)))
    state, meta = ckpt.restore(step, target=jax.tree.unflatten(treedef, targets))
    out = []
    for (_, x), y in zip(leaves, jax.tree.leaves(state), strict=True):
        if tuple(y.shape) != tuple(x.shape) or y.sharding != x.sharding:
            y = _fit_shape(y, tuple(x.shape), x.sharding)
        out.append(y)
    return jax.tree.unflatten(treedef, out), meta


def _fit_shape(x: jax.Array, shape: tuple[int, ...], sharding) -> jax.Array:
    def fit(a):
        a = a[tuple(slice(0, min(o, t)) for o, t in zip(a.shape, shape, strict=True))]
        return jnp.pad(a, [(0, t - o) for o, t in zip(a.shape, shape, strict=True)])

    return jax.jit(fit, out_shardings=sharding)(x)



def training_settings(cfg: ContrastiveConfig, pairs: ContrastivePairs) -> dict:
    """The settings besides the shapes that decide what a run trains (loss, optimizers,
    pair weights), as checkpoint meta: a rerun in the same workdir with other ones is
    refused instead of resuming (a finished run's checkpoint skipped all training)."""
    import hashlib

    digest = hashlib.sha256()
    for a in (pairs.train_user, pairs.train_pin, pairs.train_weight):
        digest.update(np.ascontiguousarray(a).tobytes())
    opt = cfg.table_optimizer
    settings = {"temperature": cfg.temperature, "use_logq": cfg.use_logq,
                "remove_accidental_hits": cfg.remove_accidental_hits,
                "dense_learning_rate": cfg.dense_learning_rate, "init_scale": cfg.init_scale,
                "table_optimizer": {"kind": type(opt).__name__, **dataclasses.asdict(opt)},
                "train_pairs_digest": digest.hexdigest()[:16]}
    return json.loads(json.dumps(settings))  # as the meta comes back


# Keys of `expected` added after checkpoints were first saved: a checkpoint without them
# resumes with a warning (`check_resume_meta`); one that has them must match.
RESUME_KEYS_ADDED = frozenset({
    "temperature", "use_logq", "remove_accidental_hits", "dense_learning_rate", "init_scale",
    "table_optimizer", "train_pairs_digest", "loss", "margin", "adversarial_temperature",
    "regularization", "corrupt", "entity_learning_rate", "entity_initial_accumulator",
    "relation_learning_rate", "gamma"})


def check_resume_meta(meta: dict, expected: dict, where) -> None:
    """Raises ValueError naming `where` if a checkpoint's meta disagrees with `expected`.

    (A checkpoint of another trainer is refused before, by the Checkpointer's
    `restore_meta`: `checkpoint.check_trainer`.)

    Args:
      meta: the restored checkpoint meta.
      expected: keys that must match (seed, batch size, data sizes...); those of
        `RESUME_KEYS_ADDED` only when the meta has them.
      where: the checkpoint folder (for the message).
    """
    unchecked = sorted(k for k in expected if k in RESUME_KEYS_ADDED and k not in meta)
    if unchecked:
        logging.warning("%s was saved without %s; resuming it without checking them", where,
                        ", ".join(unchecked))
    diff = {k: (meta.get(k), v) for k, v in expected.items()
            if meta.get(k) != v and k not in unchecked}
    if diff:
        raise ValueError(
            f"{where}: the checkpoint belongs to another run (saved vs now: {diff}); "
            "use a fresh workdir or delete its checkpoints folder")


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
