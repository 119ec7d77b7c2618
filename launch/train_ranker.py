r"""CTR + CVR ranker: trains, saves WORKDIR/ranker, evaluates, writes WORKDIR/metrics.json.

  python -m launch.train_ranker --config=configs/ranker.py[:smoke] --workdir=DIR \
      --config.data.path=DATASET_DIR [--config.facets=cl,kg \
      --config.facet_paths.cl=... --config.facet_paths.kg=...]

Several processes (one per host, or several on one box), each with the same flags plus
  --coordinator_address=HOST:PORT --num_processes=N --process_id=i
(or the JAX_* environment variables): the tables and the batch are sharded over every
process's devices; process 0 writes the ranker and metrics.json.

With config.train.checkpoint_every > 0 the training state is saved to
WORKDIR/checkpoints; rerunning the same command resumes from the newest checkpoint
(also on another number of devices or processes).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib

from absl import flags, logging
from ml_collections import config_flags

from launch import common

# Flags are defined only when this module runs as the entry point, so run_ablation can
# import the config helpers below without a duplicate --config flag.
_CONFIG = None
_WORKDIR = None


def _define_flags():
    global _CONFIG, _WORKDIR
    with common.flagfile_errors():
        _CONFIG = config_flags.DEFINE_config_file("config", lock_config=True)
    _WORKDIR = flags.DEFINE_string("workdir", None, "Output folder.", required=True)


def _opt(v):
    return None if v is None or v == -1 or v == -1.0 else v


def _names(s) -> tuple[str, ...]:
    if isinstance(s, list | tuple):
        return tuple(str(x) for x in s if str(x))
    return tuple(x.strip() for x in str(s).split(",") if x.strip())


def entity_pairs(value, *, key: str = "entities") -> tuple[tuple[str, str], ...]:
    """config.entities ("user:user_id,pin:item_id") as (entity, column) pairs, checked:
    each a name:column pair, no entity twice (ValueError naming `key`)."""
    pairs = []
    for item in _names(value):
        name, sep, column = (x.strip() for x in item.partition(":"))
        if not (name and sep and column) or ":" in column:
            raise ValueError(f"config.{key} must list name:column pairs such as "
                             f"user:user_id, got {item!r}")
        pairs.append((name, column))
    twice = sorted({n for n, _ in pairs if [m for m, _ in pairs].count(n) > 1})
    if twice:
        raise ValueError(f"config.{key} lists the entity {', '.join(twice)} more than once: "
                         f"{value!r}")
    return tuple(pairs)


def facet_mode(cfg, *, key: str = "facet_mode") -> str:
    """cfg.facet_mode, checked (ValueError naming `key`) also when no facet is pretrained
    and the mode goes unused, so a misspelt mode is refused rather than ignored."""
    from jax_recsys.ranking import facets as facets_lib

    mode = cfg.facet_mode
    if mode not in facets_lib.MODES:
        raise ValueError(f"config.{key} must be one of {', '.join(facets_lib.MODES)}, got {mode!r}")
    return mode


def train_config(cfg, *, data_path: str, facets=None, pretrained=None, mode=None, seed=None):
    """Turns the ranker ConfigDict into a `jax_recsys.ranking.train.TrainConfig`.

    Args:
      cfg: the ConfigDict of configs/ranker.py.
      data_path: the dataset folder.
      facets: facet name -> loaded checkpoint (to know which entities each covers);
        None: every pretrained facet goes to every entity.
      pretrained, mode, seed: overrides of cfg.facets, cfg.facet_mode, cfg.train.seed.

    Returns:
      The TrainConfig (facet_paths from cfg.facet_paths).
    """
    from jax_recsys.ranking import facets as facets_lib, model, train

    d, m, t = cfg.data, cfg.model, cfg.train
    coarse = _names(d.coarse_features)
    data = train.DataConfig(
        path=data_path, table=d.table, train_window=d.train_window,
        valid_window=d.valid_window, test_window=d.test_window, click_column=d.click_column,
        conversion_column=d.conversion_column, day_column=d.get("day_column", "day"),
        timestamp_column=d.get("timestamp_column", "timestamp"), coarse_features=coarse or None,
        max_train_examples=d.max_train_examples,
    )
    pretrained = _names(cfg.facets) if pretrained is None else tuple(pretrained)
    entities = facets_lib.build_entities(
        entities=entity_pairs(cfg.entities),
        scratch_dim=cfg.scratch_dim,
        pretrained=pretrained,
        mode=mode or facet_mode(cfg),
        available=None if facets is None else {k: list(f.tables) for k, f in facets.items()},
        learning_rate=_opt(cfg.facet_learning_rate),
        target_norm=_opt(cfg.facet_target_norm),
        scratch_init_scale=_opt(cfg.scratch_init_scale),
        missing=cfg.get("facet_missing", "random"),
    )
    return train.TrainConfig(
        data=data,
        entities=entities,
        facet_paths=tuple((k, v) for k, v in cfg.facet_paths.items() if v),
        model=model.RankerConfig(
            coarse_dim=m.coarse_dim, num_cross_layers=m.num_cross_layers, cross_rank=m.cross_rank,
            mlp_dims=tuple(m.mlp_dims), head_dims=tuple(m.head_dims), entity_norm=m.entity_norm,
        ),
        batch_size=t.batch_size, num_epochs=t.num_epochs,
        dense_learning_rate=t.dense_learning_rate, dense_weight_decay=t.dense_weight_decay,
        warmup_steps=t.warmup_steps, table_learning_rate=t.table_learning_rate,
        table_initial_accumulator=t.table_initial_accumulator,
        finetune_lr_scale=t.finetune_lr_scale, cvr_weight=t.cvr_weight,
        seed=t.seed if seed is None else seed, log_every=t.log_every,
        eval_batch_size=t.eval_batch_size,
        checkpoint_every=t.get("checkpoint_every", 0),
        keep_checkpoints=t.get("keep_checkpoints", 2),
        table_sharding=t.get("table_sharding", ""),
    )


def with_data_path(tc, path: str):
    """`tc` (a TrainConfig) reading the dataset folder `path`. The launchers make their
    TrainConfig, which checks every setting, with the config's own data path, and only
    then resolve it (`common.dataset_path` may generate WORKDIR/world: minutes)."""
    return dataclasses.replace(tc, data=dataclasses.replace(tc.data, path=path))


def recorded_config(cfg) -> dict:
    """The config as metrics.json records it, its data path absolute: `export_int4` and
    `serving_check` find the dataset by it, from whatever folder they run in (a relative
    ``--config.data.path=../data`` was read against theirs: "is gone (moved or deleted?)")."""
    out = cfg.to_dict()
    if out["data"].get("path"):
        out["data"]["path"] = os.path.abspath(out["data"]["path"])
    return out


def main(argv):
    del argv
    common.setup(_WORKDIR.value)
    from jax_recsys import checkpoint
    from jax_recsys.ranking import train

    cfg, workdir = _CONFIG.value, pathlib.Path(_WORKDIR.value)
    facet_mode(cfg)  # before any data is generated
    paths = {k: v for k, v in cfg.facet_paths.items() if v}
    missing = [f for f in _names(cfg.facets) if f not in paths]
    if missing:  # one error line (a UsageError printed the whole usage text before it)
        raise ValueError(f"--config.facets={cfg.facets} needs a facet folder for each facet: "
                         f"give {' '.join(f'--config.facet_paths.{f}=DIR' for f in missing)}")
    facets = {k: checkpoint.load_facet(v, expected=k)
              for k, v in paths.items() if k in _names(cfg.facets)}
    # Every setting is checked before the data path, which may generate WORKDIR/world.
    tc = train_config(cfg, data_path=cfg.data.path, facets=facets)
    tc = with_data_path(tc, common.dataset_path(cfg, workdir))
    metrics = train.train_and_evaluate(
        tc, None, facets=facets, log=logging.info, checkpoint_dir=workdir / "checkpoints"
    )
    ranker = metrics.pop("ranker")
    from jax_recsys import distributed
    from jax_recsys.ranking import model

    if distributed.is_chief():
        model.save_ranker(workdir / "ranker", ranker)
    metrics["config"] = recorded_config(cfg)
    common.write_json(workdir / "metrics.json", metrics)
    te = metrics["test"]
    logging.info("test CTR AUC %.4f, CVR AUC %.4f, CTCVR AUC %.4f", te["ctr_auc"], te["cvr_auc"],
                 te["ctcvr_auc"])


if __name__ == "__main__":
    _define_flags()
    common.run(main, resume_hint=common.checkpoint_resume_hint(_CONFIG))
