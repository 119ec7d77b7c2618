r"""Benchmark: KG embedding training throughput and full filtered evaluation.

  python -m launch.bench_kg                       # the full run (lead, quiet machine)
  python -m launch.bench_kg --steps=30 --entities=3000 --triples=30000 \
      --mrr_epochs=1 --devices=1                  # a quick check

Prints one JSON line per measurement. Each device count runs in its own subprocess
with XLA_FLAGS=--xla_force_host_platform_device_count=N set before JAX is imported.

Graph: synthetic, FB15k-237-sized by default (15k entities, 240 relations, 270k
triples, one entity type), with planted structure so that MRR means something:
entities fall into clusters of ~300, relation r links cluster c to cluster pi_r(c),
where pi_r is one of four shared cluster maps (the identity or a random pairing of
clusters; relations sharing a map are like near-synonyms), and a triple's tail is drawn from the
target cluster with Zipf popularity. Split 90/5/5. The achievable MRR is modest
(the tail is one of ~300 cluster members); compare with `random_mrr`.

Settings match the PyKEEN reference (torch CPU, 2 threads, sLCWA, 64 negatives per
positive, cross-entropy loss, batch 256): dim 128 (ComplEx/RotatE: 64 complex dims),
chunks of C=16 with U=17 uniform negatives per side, i.e. 2 x (15 + 17) = 64
negatives per positive, K=16 chunks = 256 positives per batch, softmax loss.
Reference throughput on this box: DistMult 13.5k positive triples/s (0.88M scored/s),
ComplEx and RotatE 7.2k positive triples/s; target >= 3x (the ratios printed).

Lines:
  {"bench": "kg_train", "model", "devices", "positives_per_s", "scored_per_s",
   "ratio_vs_pykeen", ...}
  {"bench": "kg_eval", "model", "devices", "test_mrr", "random_mrr", "eval_seconds",
   "num_test_triples", "num_entities", ...}
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from absl import flags

from launch import common

_MODELS = flags.DEFINE_list("models", ["distmult", "complex", "rotate"], "Models to time.")
_DEVICES = flags.DEFINE_list("devices", ["1", "8"], "Simulated device counts.")
_STEPS = flags.DEFINE_integer("steps", 300, "Timed training steps per model.")
_ENTITIES = flags.DEFINE_integer("entities", 15_000, "Entities.")
_RELATIONS = flags.DEFINE_integer("relations", 240, "Relations.")
_TRIPLES = flags.DEFINE_integer("triples", 270_000, "Triples (all splits).")
_DIM = flags.DEFINE_integer("dim", 128, "Entity dim (real numbers).")
_MRR_MODEL = flags.DEFINE_string("mrr_model", "distmult", "Model trained for the MRR line.")
_MRR_EPOCHS = flags.DEFINE_integer("mrr_epochs", 10, "Epochs before the full evaluation (0: skip).")
_WORKER = flags.DEFINE_integer("worker", 0, "Internal: run the measurements on N devices.")

PYKEEN_POS_PER_S = {"distmult": 13_500.0, "complex": 7_200.0, "rotate": 7_200.0}
CHUNK, UNIFORM, CHUNKS = 16, 17, 16


def _involution(rng, n):
    """A random symmetric cluster map (pairs swapped): pi(pi(c)) = c."""
    import numpy as np

    perm = rng.permutation(n)
    out = np.arange(n)
    out[perm[0:-1:2]], out[perm[1::2]] = perm[1::2], perm[0:-1:2]
    return out


def synthetic_graph(*, entities: int, relations: int, triples: int, seed: int = 0):
    """A one-type graph with planted cluster structure (see the module docstring)."""
    import numpy as np

    from jax_recsys.data.kg import KnowledgeGraph
    from jax_recsys.data.vocab import Vocab

    rng = np.random.default_rng(seed)
    n_clusters = max(entities // 300, 2)
    cluster = rng.integers(0, n_clusters, entities)
    members = [np.flatnonzero(cluster == c) for c in range(n_clusters)]
    # Relations share a few cluster maps (identity + involutions), as near-synonymous
    # relations do in real graphs; pi_r is one of them.
    maps = np.stack([np.arange(n_clusters)] + [_involution(rng, n_clusters) for _ in range(3)])
    target = maps[rng.integers(0, len(maps), relations)]  # pi_r
    r = rng.integers(0, relations, triples)
    h = rng.integers(0, entities, triples)
    tc = target[r, cluster[h]]
    # Zipf-like popularity inside each cluster: rank k has weight 1/(k+1).
    u = rng.random(triples)
    sizes = np.array([len(m) for m in members])
    k = np.minimum((np.exp(u * np.log(sizes[tc] + 1.0)) - 1).astype(np.int64), sizes[tc] - 1)
    t = np.array([members[c][i] for c, i in zip(tc.tolist(), k.tolist(), strict=True)])
    trip = np.unique(np.stack([h, r, t], 1), axis=0)
    trip = trip[rng.permutation(len(trip))]
    n_eval = len(trip) // 20
    test, valid, train = trip[:n_eval], trip[n_eval:2 * n_eval], trip[2 * n_eval:]
    return KnowledgeGraph(
        entity_types=("entity",), vocabs={"entity": Vocab(np.arange(entities))},
        relations=tuple(str(i) for i in range(relations)),
        rel_head_type=("entity",) * relations, rel_tail_type=("entity",) * relations,
        splits={"train": train, "valid": valid, "test": test})


def _worker(n_dev: int) -> None:
    import jax
    import numpy as np

    from jax_recsys.pretrain import kg_eval, kg_train

    assert len(jax.devices()) >= n_dev, jax.devices()
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:n_dev]), ("data",))
    graph = synthetic_graph(entities=_ENTITIES.value, relations=_RELATIONS.value,
                            triples=_TRIPLES.value)

    def emit(d):
        print(json.dumps(d), flush=True)

    for model in _MODELS.value:
        cfg = kg_train.KGTrainConfig(chunk_size=CHUNK, uniform_negatives=UNIFORM,
                                     chunks_per_batch=CHUNKS, loss="softmax", num_epochs=100,
                                     max_steps=_STEPS.value, log_every=10**9)
        res = kg_train.train(graph, model=kg_train.KGModelConfig(model=model, dim=_DIM.value),
                             train_config=cfg, mesh=mesh, log_fn=lambda d: None)
        m = res.metrics
        ref = PYKEEN_POS_PER_S.get(model)
        emit({"bench": "kg_train", "model": model, "devices": n_dev, "dim": _DIM.value,
              "negatives_per_positive": m["negatives_per_positive"],
              "batch_positives": m["batch_positives"], "steps": m["steps"],
              "positives_per_s": round(m["positives_per_s"], 1),
              "scored_per_s": round(m["scored_per_s"], 1),
              "compile_seconds": round(m["compile_seconds"], 2),
              "pykeen_positives_per_s": ref,
              "ratio_vs_pykeen": round(m["positives_per_s"] / ref, 3) if ref else None})

    if _MRR_EPOCHS.value > 0:
        model = kg_train.KGModelConfig(model=_MRR_MODEL.value, dim=_DIM.value)
        cfg = kg_train.KGTrainConfig(chunk_size=CHUNK, uniform_negatives=UNIFORM,
                                     chunks_per_batch=CHUNKS, loss="softmax",
                                     num_epochs=_MRR_EPOCHS.value, log_every=10**9)
        t0 = time.perf_counter()
        res = kg_train.train(graph, model=model, train_config=cfg, mesh=mesh,
                             log_fn=lambda d: None)
        train_s = time.perf_counter() - t0
        fidx = graph.filter_index()
        # Warm-up compile on a few triples, then the timed full evaluation.
        kg_train.evaluate_state(graph, state=res.state, collection=res.collection, model=model,
                                filter_index=fidx, config=kg_eval.KGEvalConfig(max_triples=8))
        t0 = time.perf_counter()
        ev = kg_train.evaluate_state(graph, state=res.state, collection=res.collection,
                                     model=model, filter_index=fidx)
        eval_s = time.perf_counter() - t0
        n = _ENTITIES.value
        emit({"bench": "kg_eval", "model": model.model, "devices": n_dev, "epochs": _MRR_EPOCHS.value,
              "train_seconds": round(train_s, 1),
              "positives_per_s": round(res.metrics["positives_per_s"], 1),
              "test_mrr": round(ev["mrr"], 4), "test_hits@1": round(ev["hits@1"], 4),
              "test_hits@10": round(ev["hits@10"], 4),
              "random_mrr": round(float(np.mean(1.0 / np.arange(1, n + 1))), 5),
              "eval_seconds": round(eval_s, 2), "num_test_triples": ev["num_triples"],
              "ranked_queries": 2 * ev["num_triples"], "num_entities": n})


def main(argv):
    del argv
    if _WORKER.value:
        if _WORKER.value < 1:
            raise ValueError(f"--worker must be >= 1 (internal), got {_WORKER.value}")
        _worker(_WORKER.value)
        return
    # Checked here: a worker for 0 devices would run this loop again (without end).
    devices = common.int_list(_DEVICES)
    passthrough = [a for a in sys.argv[1:] if not a.startswith("--devices")]
    for n in devices:
        env = dict(os.environ)
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "")
                            + f" --xla_force_host_platform_device_count={int(n)}").strip()
        env.setdefault("JAX_PLATFORMS", "cpu")
        subprocess.run([sys.executable, "-m", "launch.bench_kg", f"--worker={int(n)}",
                        *passthrough], env=env, check=True)


if __name__ == "__main__":
    common.run(main)
