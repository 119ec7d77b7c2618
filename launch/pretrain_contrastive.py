r"""User–pin contrastive pretraining: writes WORKDIR/facet_cl and WORKDIR/metrics.json.

  python -m launch.pretrain_contrastive --config=configs/contrastive.py[:smoke] \
      --workdir=DIR --config.data.path=DATASET_DIR \
      [--config.data.window_start=0 --config.data.window_end=20]

Several processes (hosts): run the same command once per process with
--coordinator_address=HOST:PORT --num_processes=N --process_id=I (or the JAX_*
variables); the mesh spans every process's devices. With
config.train.checkpoint_every > 0, training checkpoints go to WORKDIR/checkpoints and
rerunning the same command resumes from the newest one.
"""

from __future__ import annotations

import dataclasses
import pathlib

from absl import flags, logging
from ml_collections import config_flags

from launch import common

with common.flagfile_errors():
    _CONFIG = config_flags.DEFINE_config_file("config", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder.", required=True)


def _unset(v):
    return None if v in (-1, "") else v


def _table_optimizer(t):
    from jax_recsys.embedding import specs

    kinds = {"row_adagrad": lambda: specs.RowAdagrad(
                 learning_rate=t.table_learning_rate,
                 initial_accumulator=t.table_initial_accumulator),
             "sgd": lambda: specs.SGD(learning_rate=t.table_learning_rate),
             "lazy_adam": lambda: specs.LazyAdam(learning_rate=t.table_learning_rate)}
    if t.table_optimizer not in kinds:
        raise ValueError(f"train.table_optimizer must be one of {sorted(kinds)}, "
                         f"got {t.table_optimizer!r}")
    return kinds[t.table_optimizer]()


def main(argv):
    del argv
    common.setup(_WORKDIR.value)
    from jax_recsys.pretrain import contrastive_data, contrastive_train

    cfg, workdir = _CONFIG.value, pathlib.Path(_WORKDIR.value)
    d, m, t = cfg.data, cfg.model, cfg.train
    # Every setting is checked before the data path, which may generate the world.
    data = contrastive_data.ContrastiveDataConfig(
        path=d.path, table=d.table, user_column=d.user_column,
        item_column=d.item_column, day_column=d.day_column,
        timestamp_column=d.timestamp_column, type_column=d.type_column,
        type_weights=tuple(d.type_weights), window=_unset(d.window),
        window_start=_unset(d.window_start), window_end=_unset(d.window_end),
        eval_days=d.eval_days, use_conversions=d.use_conversions,
        **{k: d[k] for k in ("conversions_table", "items_table", "advertiser_column") if k in d},
        conversion_weight=d.conversion_weight, pin_side_features=tuple(d.pin_side_features),
        max_eval_pairs=d.max_eval_pairs, seed=d.seed,
    )
    config = contrastive_train.ContrastiveConfig(
        dim=m.dim, project=m.project, temperature=m.temperature, use_logq=m.use_logq,
        remove_accidental_hits=m.remove_accidental_hits, uniform_negatives=m.uniform_negatives,
        export=m.export, batch_size=t.batch_size, num_epochs=t.num_epochs,
        max_steps=_unset(t.max_steps), table_optimizer=_table_optimizer(t),
        dense_learning_rate=t.dense_learning_rate, eval_every=t.eval_every,
        eval_ks=tuple(t.eval_ks), eval_loss_batches=t.eval_loss_batches,
        log_every=t.log_every, seed=t.seed,
        checkpoint_every=t.get("checkpoint_every", 0), keep_checkpoints=t.get("keep_checkpoints", 2),
    )
    data = dataclasses.replace(data, path=common.dataset_path(cfg, workdir))
    metrics = contrastive_train.train_and_evaluate(
        pairs=contrastive_data.load_pairs(data), config=config, workdir=workdir)
    common.write_json(workdir / "metrics.json", metrics)
    logging.info("%s", summary_line(metrics, config.eval_ks))


def summary_line(metrics: dict, ks) -> str:
    """The final log line: Recall@K (popularity baseline) for each K of `ks` that
    `metrics` has, and the held-out loss."""
    parts = [f"recall@{k} {metrics[f'recall@{k}']:.4f} (popularity "
             f"{metrics.get(f'pop_recall@{k}', float('nan')):.4f})"
             for k in dict.fromkeys(ks) if f"recall@{k}" in metrics]
    return ", ".join([*parts, f"held-out loss {metrics.get('heldout_loss', float('nan')):.4f}"])


if __name__ == "__main__":
    common.run(main, resume_hint=common.checkpoint_resume_hint(_CONFIG))
