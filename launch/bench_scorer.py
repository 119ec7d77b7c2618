r"""Ranker scorer benchmark: the serving score function's latency and precision per device.

  python -m launch.bench_scorer                          # default device (the GPU if any)
  python -m launch.bench_scorer --padded=64,512 --iters=50   # smoke (a few seconds on CPU)
  python -m launch.bench_scorer --artifact=ART           # that artifact's ranker

Times ``serving.ranker_service.jitted_scorer`` -- the jitted function the ranker
service calls once per batch, packed NumPy rows in (one float32 [P, sum of D]
array of every entity's rows, one int32 [P, K] of the coarse ids), one NumPy
[2, P] array of probabilities out, host to device and back included -- at each
padded batch size of ``--padded``, with float32 matmuls at the service's
precision (``SCORER_PRECISION``, "highest") and at XLA's default, interleaved
call by call. On CPU the two are the same computation; on Ampere and later
GPUs the default multiplies in TF32. The scorer the service had before it
packed (``unpacked``: one array per entity and coarse feature in, one per
output back, so 5 host-to-device transfers and 2 back for the synthetic ranker
where the packed one makes 2 and 1) is timed with them, at the service's
precision. The ranker is the artifact's (``--artifact``) or a DCN-v2 over
user / pin / advertiser rows of ``--dim`` / ``--dim`` / ``--dim // 2`` and
one coarse feature, with random weights.
Inputs are standard normal rows. One JSON line per batch size:

  {"bench": "scorer", "device", "padded", "highest_ms", "default_ms",
   "highest_over_default", "max_rel_diff_ctr", "max_rel_diff_cvr",
   "unpacked_ms", "highest_over_unpacked", "unpacked_max_rel_diff"}

``max_rel_diff_*``: the largest |highest - default| / |highest| over the batch;
``unpacked_max_rel_diff`` the same for unpacked against highest (pCTR and pCVR
together).

Measured on an H200 (2026-11-27, the packed scorer then timed as a variant
beside the unpacked service): 0.41 / 0.48 / 0.61 ms at 64 / 512 / 2048 rows
packed against 0.64 / 0.74 / 0.85 ms unpacked (0.64-0.71x), scores equal to
1.2e-7 relative; TF32 took the same time as full float32 and moved pCTR by up
to 1.1e-3 relative. On this project's 2-core CPU box packing made no
difference (0.98-1.03x). Earlier H200 readings of the unpacked scorer: 0.25 /
0.30 / 0.35 ms (2026-11-26, a one-off script on another host), and 1.12 /
1.60 / 1.03 ms with XLA_PYTHON_CLIENT_PREALLOCATE=false: host work dominates
there, and varies with the host.
"""

from __future__ import annotations

import json
import time

import numpy as np
from absl import app, flags

from launch import common

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


def _unpacked_scorer(config, precision: str):
    """``scorer(params, entity_emb, coarse_ids) -> (pCTR [P], pCVR [P])``: the
    service's scorer before packing, one array per entity and coarse feature in
    and one per output back."""
    import jax

    from jax_recsys.ranking import model as model_lib
    from serving import ranker_service as rs

    score_fn = model_lib.make_score_fn(config)

    def probs(params, entity_emb, coarse_ids):
        ctr, cvr = score_fn(params, entity_emb=entity_emb, coarse_ids=coarse_ids)
        return jax.nn.sigmoid(ctr), jax.nn.sigmoid(cvr)

    return rs.with_precision(jax.jit(probs), precision)


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
    unpacked = _unpacked_scorer(config, rs.SCORER_PRECISION)
    cols = rs.entity_columns(config)
    names = [c for c, _ in config.coarse_vocab_sizes]
    rng = np.random.default_rng(0)
    for p in sizes:
        rows = rng.normal(size=(p, sum(d for _, d in config.entity_dims))).astype(np.float32)
        coarse = np.zeros((p, len(config.coarse_vocab_sizes)), np.int32)  # K = 0 too
        for k, (_, v) in enumerate(config.coarse_vocab_sizes):
            coarse[:, k] = rng.integers(0, v, p)
        emb = {e: np.ascontiguousarray(rows[:, s]) for e, s in cols.items()}
        coarse_by_name = {c: coarse[:, k].copy() for k, c in enumerate(names)}
        out, times = {}, {k: [] for k in (*scorers, "unpacked")}
        for name, fn in scorers.items():
            for _ in range(_WARMUP.value):
                jax.block_until_ready(fn(params, rows, coarse))
            out[name] = np.asarray(fn(params, rows, coarse), np.float64)
        for _ in range(_WARMUP.value):
            jax.block_until_ready(unpacked(params, emb, coarse_by_name))
        out["unpacked"] = np.stack(
            [np.asarray(a, np.float64) for a in unpacked(params, emb, coarse_by_name)]
        )
        for _ in range(_ITERS.value):  # interleaved: all see the same machine state
            for name, fn in scorers.items():
                t0 = time.perf_counter()
                np.asarray(fn(params, rows, coarse))
                times[name].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            ctr, cvr = unpacked(params, emb, coarse_by_name)
            np.asarray(ctr), np.asarray(cvr)
            times["unpacked"].append(time.perf_counter() - t0)
        med = {k: float(np.median(v) * 1e3) for k, v in times.items()}
        rel = [_max_rel_diff(h, d) for h, d in zip(out["highest"], out["default"], strict=True)]
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
                    "unpacked_ms": round(med["unpacked"], 4),
                    "highest_over_unpacked": round(med["highest"] / med["unpacked"], 3),
                    "unpacked_max_rel_diff": _max_rel_diff(out["highest"], out["unpacked"]),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    common.run(main)
