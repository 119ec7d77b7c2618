r"""Knowledge-graph pretraining: writes WORKDIR/facet_kg and WORKDIR/metrics.json.

  python -m launch.pretrain_kg --config=configs/kg.py[:smoke] --workdir=DIR \
      --config.data.path=DATASET_DIR      # a dataset folder (reads its kg/)
  python -m launch.pretrain_kg --config=configs/kg_triples.py --workdir=DIR \
      --config.data.path=TRIPLE_DIR       # any train/valid/test.txt folder

Several processes (hosts): run the same command once per process with
--coordinator_address=HOST:PORT --num_processes=N --process_id=I (or the JAX_*
variables); the mesh spans every process's devices. With
config.train.checkpoint_every > 0, training checkpoints go to WORKDIR/checkpoints and
rerunning the same command resumes from the newest one.
"""

from __future__ import annotations

import pathlib

from absl import flags, logging
from ml_collections import config_flags

from launch import common

with common.flagfile_errors():
    _CONFIG = config_flags.DEFINE_config_file("config", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder.", required=True)


def _unset(v):
    return None if v in (-1, -1.0, "") else v


def main(argv):
    del argv
    common.setup(_WORKDIR.value)
    from jax_recsys.pretrain import kg_eval, kg_train

    cfg, workdir = _CONFIG.value, pathlib.Path(_WORKDIR.value)
    m, t, e = cfg.model, cfg.train, cfg.eval
    # Every config is checked before the data path, which may generate the world.
    model = kg_train.KGModelConfig(model=m.model, dim=m.dim, gamma=m.gamma,
                                   rel_dim=_unset(m.rel_dim), init_scale=_unset(m.init_scale))
    train_config = kg_train.KGTrainConfig(
        chunk_size=t.chunk_size, uniform_negatives=t.uniform_negatives,
        chunks_per_batch=t.chunks_per_batch, corrupt=t.corrupt, loss=t.loss, margin=t.margin,
        adversarial_temperature=t.adversarial_temperature, regularization=t.regularization,
        entity_learning_rate=t.entity_learning_rate,
        entity_initial_accumulator=t.entity_initial_accumulator,
        relation_learning_rate=t.relation_learning_rate, num_epochs=t.num_epochs,
        max_steps=_unset(t.max_steps), seed=t.seed, log_every=t.log_every,
        eval_every_epochs=t.eval_every_epochs,
        checkpoint_every=t.get("checkpoint_every", 0),
        keep_checkpoints=t.get("keep_checkpoints", 2))
    eval_config = kg_eval.KGEvalConfig(block_size=e.block_size,
                                       max_triples=_unset(e.max_triples), sides=tuple(e.sides))
    metrics = kg_train.train_and_evaluate(
        data=kg_train.KGDataConfig(path=common.dataset_path(cfg, workdir), unseen=cfg.data.unseen),
        model=model,
        train_config=train_config,
        eval_config=eval_config,
        workdir=workdir,
        log_fn=lambda d: logging.info("%s", d),
    )
    common.write_json(workdir / "metrics.json", metrics)
    split = "test" if "test_mrr" in metrics else "valid"
    if f"{split}_mrr" not in metrics:  # no valid or test triples (kg_train warned)
        logging.info("not evaluated (no valid or test triples); %.0f positive triples/s",
                     metrics["positives_per_s"])
        return
    logging.info("%s filtered MRR %.4f, Hits@10 %.4f; %.0f positive triples/s", split,
                 metrics[f"{split}_mrr"], metrics[f"{split}_hits@10"], metrics["positives_per_s"])


if __name__ == "__main__":
    common.run(main, resume_hint=common.checkpoint_resume_hint(_CONFIG))
