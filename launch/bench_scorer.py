r"""Ranker scorer benchmark: the serving score function's latency and precision per device.

  python -m launch.bench_scorer                          # default device (the GPU if any)
  python -m launch.bench_scorer --padded=64,512 --iters=50   # smoke (a few seconds on CPU)
  python -m launch.bench_scorer --artifact=ART           # that artifact's ranker

Times ``serving.ranker_service.jitted_scorer`` -- the jitted function the ranker
service calls once per batch, NumPy rows in, NumPy probabilities out (host to
device and back included) -- at each padded batch size of ``--padded``, with
float32 matmuls at the service's precision (``SCORER_PRECISION``, "highest")
and at XLA's default, interleaved call by call. On CPU the two are the same
computation; on Ampere and later GPUs the default multiplies in TF32. The
same call with the rows packed (``packed``, at the service's precision) is
timed with them: one float32 [P, sum of D] array for all entity rows, one int32
[P, K] for the coarse ids, one [2, P] array back, so 2 host-to-device transfers
and 1 back per call where the service makes one per entity and coarse feature
and 2 back (the last GPU host's scorer was dominated by host work: this says
whether packing is worth moving into the service; on CPU it made no difference,
0.98-1.03x). The ranker is the artifact's (``--artifact``) or a DCN-v2 over
user / pin / advertiser rows of ``--dim`` / ``--dim`` / ``--dim // 2`` with
random weights.
Inputs are standard normal rows. One JSON line per batch size:

  {"bench": "scorer", "device", "padded", "highest_ms", "default_ms",
   "highest_over_default", "max_rel_diff_ctr", "max_rel_diff_cvr",
   "packed_ms", "packed_over_highest", "packed_max_rel_diff"}

``max_rel_diff_*``: the largest |highest - default| / |highest| over the batch;
``packed_max_rel_diff`` the same for packed against highest (pCTR and pCVR).
Measured on an H200 (2026-11-26, with a one-off script doing the same):
0.25 / 0.30 / 0.35 ms at 64 / 512 / 2048 rows in full float32 against
0.27 / 0.27 / 0.33 ms in TF32, which moved pCTR by up to 7.6e-4 relative.
This benchmark on another H200 host (2026-11-27): 1.12 / 1.60 / 1.03 ms at
64 / 512 / 2048 rows with XLA_PYTHON_CLIENT_PREALLOCATE=false, 0.77 / 0.99 ms
at 64 / 512 with the default preallocation; TF32 took the same time there.
"""

from __future__ import annotations

import json
import time

import numpy as np
from absl import app, flags

_ARTIFACT = flags.DEFINE_string("artifact", None, "Serving artifact whose ranker to time.")
_DIM = flags.DEFINE_integer("dim", 64, "User and pin dim of the synthetic ranker.")
_PADDED = flags.DEFINE_list(
    "padded", ["64", "256", "512", "1024", "2048"], "Padded batch sizes (the service's buckets)."
)
_ITERS = flags.DEFINE_integer("iters", 300, "Timed calls per batch size and variant.")
_WARMUP = flags.DEFINE_integer("warmup", 20, "Untimed calls first (compile).")


def _ranker():
    """(config dict, flat params) of the artifact's ranker or a synthetic one."""
    from jax_recsys.ranking import model as model_lib

    if _ARTIFACT.value:
        from jax_recsys.quant import artifact

        art = artifact.load_artifact(_ARTIFACT.value)
        if art.ranker_config is None:
            raise app.UsageError(f"{_ARTIFACT.value}: the artifact has no ranker")
        return dict(art.ranker_config), dict(art.ranker_params)
    dim = _DIM.value
    config = model_lib.RankerConfig(
        entity_dims=(("user", dim), ("pin", dim), ("advertiser", max(dim // 2, 1))),
        coarse_vocab_sizes=(("hour", 24),),
    )
    _, params = model_lib.init_dense(config, seed=0)
    return config.to_dict(), model_lib.flatten_params(params)


def _packed_scorer(config, precision: str):
    """``scorer(params, rows_pe, coarse_pk) -> [2, P]`` (pCTR, pCVR): the service's
    scorer with every entity's rows in one array and every coarse id in another."""
    import jax
    import jax.numpy as jnp

    from jax_recsys.ranking import model as model_lib

    score_fn = model_lib.make_score_fn(config)
    names = [c for c, _ in config.coarse_vocab_sizes]

    def probs(params, rows_pe, coarse_pk):
        emb, lo = {}, 0
        for ent, dim in config.entity_dims:
            emb[ent], lo = rows_pe[:, lo : lo + dim], lo + dim
        coarse = {c: coarse_pk[:, k] for k, c in enumerate(names)}
        ctr, cvr = score_fn(params, entity_emb=emb, coarse_ids=coarse)
        return jnp.stack([jax.nn.sigmoid(ctr), jax.nn.sigmoid(cvr)])

    jitted = jax.jit(probs)

    def scorer(params, rows_pe, coarse_pk):
        with jax.default_matmul_precision(precision):
            return jitted(params, rows_pe, coarse_pk)

    return scorer


def _max_rel_diff(ref, other) -> float:
    return float(np.max(np.abs(ref - other) / np.maximum(np.abs(ref), 1e-30)))


def main(argv):
    del argv
    import jax

    from jax_recsys.ranking import model as model_lib
    from serving import ranker_service as rs

    try:
        sizes = [int(p) for p in _PADDED.value]
    except ValueError:
        raise app.UsageError(f"--padded: integers expected, got {_PADDED.value}") from None
    if not sizes or min(sizes) < 1 or _ITERS.value < 1:
        raise app.UsageError("--padded needs positive sizes and --iters >= 1")
    config_dict, flat = _ranker()
    config = model_lib.RankerConfig.from_dict(config_dict)
    key = json.dumps(config.to_dict(), sort_keys=True)
    device = jax.devices()[0]
    params = {k: jax.device_put(np.asarray(v), device) for k, v in flat.items()}
    scorers = {
        "highest": rs.jitted_scorer(key, rs.SCORER_PRECISION),
        "default": rs.jitted_scorer(key, "default"),
    }
    packed = _packed_scorer(config, rs.SCORER_PRECISION)
    rng = np.random.default_rng(0)
    for p in sizes:
        emb = {e: rng.normal(size=(p, d)).astype(np.float32) for e, d in config.entity_dims}
        coarse = {
            c: rng.integers(0, v, p).astype(np.int32) for c, v in config.coarse_vocab_sizes
        }
        rows_pe = np.concatenate([emb[e] for e, _ in config.entity_dims], axis=1)
        coarse_pk = np.zeros((p, len(config.coarse_vocab_sizes)), np.int32)  # K = 0 too
        for k, (c, _) in enumerate(config.coarse_vocab_sizes):
            coarse_pk[:, k] = coarse[c]
        out, times = {}, {k: [] for k in (*scorers, "packed")}
        for name, fn in scorers.items():
            for _ in range(_WARMUP.value):
                jax.block_until_ready(fn(params, emb, coarse))
            out[name] = [np.asarray(a, np.float64) for a in fn(params, emb, coarse)]
        for _ in range(_WARMUP.value):
            jax.block_until_ready(packed(params, rows_pe, coarse_pk))
        out["packed"] = np.asarray(packed(params, rows_pe, coarse_pk), np.float64)
        for _ in range(_ITERS.value):  # interleaved: all see the same machine state
            for name, fn in scorers.items():
                t0 = time.perf_counter()
                ctr, cvr = fn(params, emb, coarse)
                np.asarray(ctr), np.asarray(cvr)
                times[name].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            np.asarray(packed(params, rows_pe, coarse_pk))
            times["packed"].append(time.perf_counter() - t0)
        med = {k: float(np.median(v) * 1e3) for k, v in times.items()}
        rel = [
            _max_rel_diff(h, d) for h, d in zip(out["highest"], out["default"], strict=True)
        ]
        packed_rel = max(
            _max_rel_diff(h, q) for h, q in zip(out["highest"], out["packed"], strict=True)
        )
        print(
            json.dumps(
                {
                    "bench": "scorer",
                    "device": str(device),
                    "padded": p,
                    "highest_ms": round(med["highest"], 4),
                    "default_ms": round(med["default"], 4),
                    "highest_over_default": round(med["highest"] / med["default"], 3),
                    "max_rel_diff_ctr": rel[0],
                    "max_rel_diff_cvr": rel[1],
                    "packed_ms": round(med["packed"], 4),
                    "packed_over_highest": round(med["packed"] / med["highest"], 3),
                    "packed_max_rel_diff": packed_rel,
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    app.run(main)
