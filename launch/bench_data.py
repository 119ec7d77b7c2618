"""Data benchmarks: world generation speed and peak memory, batch iterator throughput.

  python -m launch.bench_data                               # smoke + default worlds
  python -m launch.bench_data --configs=smoke,default,large --days=5,10

Prints one JSON line per measurement:
  {"bench": "world_generation", "config", "days", "events", "seconds",
   "events_per_second", "events_per_cpu_second", "peak_rss_mb", "ratio_vs_target"}
     (each world is generated in its own child process; peak memory is that
     child's ru_maxrss; target 1M events/s)
  {"bench": "world_peak_memory_vs_days", "config", "days": [a, b], "rss_ratio"}
     (with --days: peak memory should not grow with the number of days)
  {"bench": "batch_iterator", "examples_per_second", "ratio_vs_target", ...}
     (BatchIterator over the ranker-train impressions of the default world,
     or the smoke world if default is not in --configs; target 500k examples/s)

Run time on a 2-core box: smoke + default about 1-2 minutes; large several
minutes per --days value (and about 1 GB of disk per large day).
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

from absl import flags

from launch import common

_CONFIGS = flags.DEFINE_list("configs", ["smoke", "default"], "World scales to generate.")
_DAYS = flags.DEFINE_list(
    "days",
    [],
    "Day counts (>= 5) to generate each scale with, e.g. "
    "5,10 (peak memory must not depend on them); empty = the scale's own.",
)
_WORKDIR = flags.DEFINE_string(
    "workdir", "", "Where worlds are written (default: a temp dir, deleted at the end)."
)
_BATCH = flags.DEFINE_integer("batch_size", 4096, "Batch size of the iterator benchmark.")
_VOCAB_IDS = flags.DEFINE_integer("vocab_ids", 10_000_000, "Raw ids of the vocabulary bench (0: skip).")
_BATCHES = flags.DEFINE_integer("iterator_batches", 300, "Batches timed in the iterator bench.")

_TARGET_EVENTS = 1e6
_TARGET_EXAMPLES = 5e5

_CHILD = """
import json, sys
from jax_recsys.data import world
cfg = world.scale_config(sys.argv[1])
if int(sys.argv[2]):
    cfg = world.days_override(cfg, int(sys.argv[2]))
s = world.generate_world(cfg, sys.argv[3], progress=False)
print(json.dumps(s))
"""


def _emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


def _generate(scale: str, days: int, out: pathlib.Path) -> dict:
    """Generates one world in a child process; returns its summary and peak RSS."""
    env = dict(os.environ)
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, scale, str(days), str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )
    t0 = time.perf_counter()
    stdout, stderr = proc.stdout.read(), proc.stderr.read()
    _, status, rusage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"world {scale} (days={days}) failed:\n{stderr[-3000:]}")
    summary = json.loads(stdout.strip().splitlines()[-1])
    return {"summary": summary, "peak_rss_mb": rusage.ru_maxrss / 1024.0, "wall": wall}


_IDS = ("user_id", "item_id", "advertiser_id", "pin_category", "hour", "device", "country",
        "position")
_LABELS = ("click", "conversion")


def _iterator_columns(path: pathlib.Path, batch_size: int) -> dict:
    """The iterator bench's columns: the ranker-train impressions of dataset folder
    ``path`` (all of them when those make fewer than 4 batches), without ``day``. An
    empty label cell of a text table is a label not known yet (NaN), as the ranker's
    training reads it (folder kinds "label")."""
    from jax_recsys.data import folder

    ds = folder.DatasetFolder(path)
    table = ds.table("impressions", [*_IDS, *_LABELS, "day"],
                     kinds=dict.fromkeys(_LABELS, "label"))
    cols = folder.select_days(table, *ds.day_window("ranker_train"),
                              file=ds.table_path("impressions"))
    if len(cols["day"]) < 4 * batch_size:  # tiny worlds: all impressions
        cols = table
    return {k: v for k, v in cols.items() if k != "day"}


def _bench_iterator(path: pathlib.Path, scale: str) -> None:
    try:
        from jax_recsys.data.batching import BatchIterator
    except ImportError as e:
        _emit(
            {
                "bench": "batch_iterator",
                "skipped": f"jax_recsys.data.batching.BatchIterator is not available yet ({e})",
            }
        )
        return
    cols = _iterator_columns(path, _BATCH.value)
    n = len(cols["user_id"])
    it = BatchIterator(
        cols,
        batch_size=_BATCH.value,
        id_features=_IDS,
        label_features=_LABELS,
        shuffle=True,
        seed=0,
        drop_remainder=True,
    )
    for _ in range(3):  # warm-up (page in the memory-mapped columns)
        next(it)
    t0 = time.perf_counter()
    seen = 0
    for _ in range(_BATCHES.value):
        b = next(it)
        seen += len(b.mask)
    dt = time.perf_counter() - t0
    eps = seen / dt
    _emit(
        {
            "bench": "batch_iterator",
            "world": scale,
            "rows": n,
            "batch_size": _BATCH.value,
            "id_features": len(_IDS),
            "label_features": len(_LABELS),
            "batches": _BATCHES.value,
            "examples_per_second": round(eps),
            "target_examples_per_second": _TARGET_EXAMPLES,
            "ratio_vs_target": round(eps / _TARGET_EXAMPLES, 3),
        }
    )


def _bench_vocab(n: int) -> None:
    """Vocabulary build + lookup of n Zipf-distributed raw ids (a large ID column)."""
    import time

    import numpy as np

    from jax_recsys.data.vocab import Vocab

    if n <= 0:
        return
    raw = np.random.default_rng(0).zipf(1.2, size=n).astype(np.int64)
    t0 = time.perf_counter()
    v = Vocab.build(raw)
    t1 = time.perf_counter()
    rows = v.lookup(raw)
    t2 = time.perf_counter()
    assert (rows >= 0).all()
    _emit({"bench": "vocab_build_lookup", "ids": n, "unique": len(v),
           "build_seconds": round(t1 - t0, 3), "lookup_seconds": round(t2 - t1, 3),
           "ids_per_second": round(n / (t2 - t0)), "target_seconds": 20.0,
           "ratio_vs_target": round((t2 - t0) / 20.0, 3)})


def _check_flags() -> list[int]:
    """Checks every flag before any world is generated (a bad --configs or --days was
    a traceback of the world's child process, after the worlds before it); returns the
    day counts ([0]: each scale's own)."""
    from jax_recsys.data import world

    for scale in _CONFIGS.value:
        try:
            world.scale_config(scale)
        except ValueError as e:
            raise ValueError(f"--configs: {e}") from None
    days = common.int_list(_DAYS, minimum=5) if _DAYS.value else [0]
    for flag, minimum in ((_BATCH, 1), (_BATCHES, 1), (_VOCAB_IDS, 0)):
        if flag.value < minimum:
            raise ValueError(f"--{flag.name} must be >= {minimum}, got {flag.value}")
    return days


def main(argv):
    del argv
    days_list = _check_flags()
    root = pathlib.Path(_WORKDIR.value or tempfile.mkdtemp(prefix="bench_data_"))
    root.mkdir(parents=True, exist_ok=True)
    iterator_world = None
    try:
        for scale in _CONFIGS.value:
            rss = {}
            for days in days_list:
                out = root / f"{scale}_d{days}"
                r = _generate(scale, days, out)
                s = r["summary"]
                rss[days] = r["peak_rss_mb"]
                _emit(
                    {
                        "bench": "world_generation",
                        "config": scale,
                        "days": s["num_days"],
                        "events": s["events"],
                        "seconds": s["seconds_total"],
                        "seconds_days": s["seconds_days"],
                        "seconds_kg": s["seconds_kg"],
                        "events_per_second": s["events_per_second"],
                        "events_per_cpu_second": s["events_per_cpu_second"],
                        "peak_rss_mb": round(r["peak_rss_mb"], 1),
                        "target_events_per_second": _TARGET_EVENTS,
                        "ratio_vs_target": round(s["events_per_second"] / _TARGET_EVENTS, 3),
                        "cpu_ratio_vs_target": round(
                            s["events_per_cpu_second"] / _TARGET_EVENTS, 3
                        ),
                    }
                )
                if scale in ("default", "smoke") and (iterator_world is None or scale == "default"):
                    iterator_world = (out, scale)
                elif not _WORKDIR.value:
                    shutil.rmtree(out, ignore_errors=True)
            if len(rss) > 1:
                lo, hi = min(rss), max(rss)
                _emit(
                    {
                        "bench": "world_peak_memory_vs_days",
                        "config": scale,
                        "days": [lo, hi],
                        "peak_rss_mb": [round(rss[lo], 1), round(rss[hi], 1)],
                        "rss_ratio": round(rss[hi] / rss[lo], 3),
                    }
                )
        if iterator_world is not None:
            _bench_iterator(*iterator_world)
        _bench_vocab(_VOCAB_IDS.value)
    finally:
        if not _WORKDIR.value:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    common.run(main)
