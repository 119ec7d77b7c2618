r"""Live hybrid serving check: shard servers + ranker service on loopback, real gRPC.

  python -m launch.serving_check --artifact=ART --ranker=RANKER_DIR [--data=WORLD] \
      --out=DIR/serving_check.json [--num_shards=2] [--num_requests=200] [--candidates=500]

Starts `--num_shards` `launch.serve_embeddings` processes and one
`launch.serve_ranker` process over them (ports picked at run time), builds
held-out requests from the dataset's test window (the dataset the ranker was trained
on, as recorded next to it, unless `--data` names another; one user, their test-window
impressions plus other test-window candidates up to `--candidates`; the impressions
table and label columns the ranker was trained with, as `launch.export_int4` finds
them next to the ranker), sends them
one at a time through real gRPC, and checks that the served pCTR/pCVR equal the
offline scores of the same INT4 tables (the artifact's tables dequantized in this
process and scored with the ranker's pure score function, `ranking.train.predict`,
on this host's CPU: the accelerator is left to the ranker under test, since on
hosts where one process holds a GPU a second JAX process cannot use it; see
`OFFLINE_PLATFORM`).
Measures per-request latency (p50/p99) and, with `--concurrency` > 1, throughput
under concurrent load, where the ranker merges requests into batches: those scores
are checked against the offline ones too. Every process is stopped on exit, also
on failure.

Exit status 1 (and `"ok": false` in the JSON) when any request fails or a served
score differs from the offline score by more than `--tolerance`. The shards are
started with a `--max_ids_per_request` large enough for one batch of the ranker
(`--candidates` × `--concurrency` × (2 + the artifact's tables), at least the default), so
any `--candidates` can be checked. A server that exits before it serves ends the
check with one `serving_check: error: ...` line that repeats the server's own error line; its log is in `serving_logs/` beside `--out`.

Dimension legend: C candidates of a request, N test impressions.
"""

from __future__ import annotations

import json
import os
import pathlib
import queue
import signal
import subprocess
import sys
import threading
import time
from concurrent import futures

import numpy as np
from absl import flags, logging

from jax_recsys import fsutil
from launch import common
from serving import check_rules

_ARTIFACT = flags.DEFINE_string("artifact", None, "Serving artifact folder.", required=True)
_RANKER = flags.DEFINE_string("ranker", None, "The saved ranker the artifact was exported from.",
                              required=True)
_DATA = flags.DEFINE_string(
    "data", None, "Dataset folder (held-out requests); default: the one recorded next to the "
    "ranker (its trainer's metrics.json or ablation.json).")
_OUT = flags.DEFINE_string("out", None, "Where to write the JSON report.", required=True)
_WINDOW = flags.DEFINE_string(
    "window", "", "Day window of the held-out requests: a window name of the dataset's "
    "dataset.json or 'START,END' days; empty: the ranker's test window.")
_NUM_SHARDS = flags.DEFINE_integer("num_shards", 2, "Embedding shard servers to start.")
_NUM_REQUESTS = flags.DEFINE_integer("num_requests", 200, "Requests (one user each).")
_CANDIDATES = flags.DEFINE_integer("candidates", 500, "Candidates per request.")
_CONCURRENCY = flags.DEFINE_integer("concurrency", 4, "Client threads of the throughput phase "
                                    "(0 or 1: skip it).")
_DEADLINE = flags.DEFINE_float("deadline_s", 5.0, "Per-request deadline.")
_TOLERANCE = flags.DEFINE_float("tolerance", 1e-5, "Max |served - offline| probability.")
_START_TIMEOUT = flags.DEFINE_float("start_timeout_s", 180.0, "Time a server may take to start.")
_SEED = flags.DEFINE_integer("seed", 0, "Which users and candidates are drawn.")

_REPO = pathlib.Path(__file__).resolve().parents[1]
# Where this process computes the offline reference scores. Not the accelerator: the
# ranker under test (a child process) serves there, and on some GPU hosts a second
# JAX process finds no device while one holds it ("no supported devices found for
# platform CUDA"; launch.bench_serving). The served scores use full float32 matmuls
# on every device (serving.ranker_service.jitted_scorer), so they are checked
# against CPU float32 scores at --tolerance.
OFFLINE_PLATFORM = "cpu"


class _Proc:
    """A child server process whose stdout JSON lines are read by a thread."""

    def __init__(self, name: str, args: list[str], log_path: pathlib.Path):
        self.name = name
        self.log = open(log_path, "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", *args], cwd=_REPO, stdout=subprocess.PIPE,
            stderr=self.log, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.log.write(line)
            line = line.strip()
            if line.startswith("{"):
                try:
                    self.lines.put(json.loads(line))
                except json.JSONDecodeError:
                    pass
        self.lines.put(None)

    def wait_event(self, event: str, timeout_s: float) -> dict:
        """The child's next JSON line whose "event" is `event`.

        Raises:
          ChildProcessError: the child exited first (e.g. a flag or artifact it
            refused); the message carries its log's error line and the log's path.
          TimeoutError: it did not report `event` within `timeout_s`.
        """
        end = time.time() + timeout_s
        while True:
            left = end - time.time()
            if left <= 0:
                raise TimeoutError(f"{self.name} did not report {event!r} within {timeout_s:.0f} s"
                                   f"{self._said()} (log: {self.log.name})")
            try:
                msg = self.lines.get(timeout=min(left, 1.0))
            except queue.Empty:
                continue
            if msg is None:
                rc = self.proc.wait()
                raise ChildProcessError(f"{self.name} exited with code {rc} before {event!r}"
                                        f"{self._said()} (log: {self.log.name})")
            if msg.get("event") == event:
                return msg

    def _said(self) -> str:
        """': <the log's last error line>', or '' when it has none."""
        self.log.flush()
        tail = common.log_tail(self.log.name)
        return f": {tail}" if tail else ""

    def stop(self, timeout_s: float = 15.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


def build_requests(ranker, columns: dict[str, np.ndarray], *, num_requests: int,
                   candidates: int, seed: int) -> list[dict]:
    """Held-out requests: a user's test impressions, filled up with other test candidates.

    Args:
      ranker: the TrainedRanker (entity columns, coarse features).
      columns: test split as ranker rows (`ranking.train.raw_to_rows`), [N] each.
      num_requests: how many users (the most active known users first, then random).
      candidates: C per request.
      seed: RNG seed for the fill-up candidates.

    Returns:
      [{"user_row": int, "columns": {column: int64 [C]}}], every column of the ranker.
    """
    rng = np.random.default_rng(seed)
    ucol = ranker.entity_columns["user"]
    users = np.asarray(columns[ucol])
    known = np.flatnonzero(users >= 0)
    if known.size == 0:
        raise ValueError("no test impression has a user known to the ranker")
    uniq, counts = np.unique(users[known], return_counts=True)
    order = uniq[np.argsort(-counts, kind="stable")][:num_requests]
    names = [ranker.entity_columns[e] for e, _ in ranker.config.entity_dims if e != "user"]
    names += [n for n, _ in ranker.config.coarse_vocab_sizes]
    n = users.size
    out = []
    for u in order:
        own = np.flatnonzero(users == u)[:candidates]
        fill = rng.integers(0, n, size=candidates - own.size)
        idx = np.concatenate([own, fill])
        cols = {c: np.asarray(columns[c])[idx].astype(np.int64) for c in names}
        cols[ucol] = np.full(candidates, int(u), np.int64)
        out.append({"user_row": int(u), "columns": cols})
    return out


def _rank_fn(port: int):
    import grpc

    from serving import ranker_service

    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    call = channel.unary_unary(ranker_service.RANK_METHOD)
    return channel, call


def check_flags() -> None:
    """Rejects bad flag values before anything is loaded or started (ValueError), by
    `serving.check_rules` (run_pipeline checks its serving section with them too)."""
    bad = check_rules.violations(
        num_shards=_NUM_SHARDS.value, num_requests=_NUM_REQUESTS.value,
        candidates=_CANDIDATES.value, concurrency=_CONCURRENCY.value,
        deadline_s=_DEADLINE.value, tolerance=_TOLERANCE.value,
        start_timeout_s=_START_TIMEOUT.value, seed=_SEED.value)
    if bad:
        raise ValueError("bad flags: " + ", ".join(
            f"--{flag}={value} (must be {rule})" for flag, value, rule in bad))


def check_pair(art, ranker) -> None:
    """Refuses (ValueError) an artifact that was not exported from the ranker: one that
    lacks a table of the ranker's, or has one of another width or row count (the offline
    scores would fail with a width error of the model, or differ)."""
    missing = [e for e, _ in ranker.config.entity_dims if e not in art.tables]
    problems = [f"it lacks tables {missing} of the ranker"] if missing else []
    for ent, dim in ranker.config.entity_dims:
        table, own = art.tables.get(ent), ranker.tables.get(ent)
        if table is None:
            continue
        rows = table.codes.shape[0]
        if table.dim != dim:
            problems.append(f"its table {ent!r} is {table.dim} wide, the ranker's {dim}")
        elif own is not None and rows != own.shape[0]:
            problems.append(f"its table {ent!r} has {rows} rows, the ranker's {own.shape[0]}")
    if problems:
        raise ValueError(f"artifact {_ARTIFACT.value} does not match ranker {_RANKER.value}: "
                         f"{'; '.join(problems)} (give the ranker it was exported from, or "
                         "export it from this one: launch.export_int4)")


def held_out(data: str, window: str, *, table: str = "impressions",
             labels: tuple[str, ...] = ("click", "conversion"), day_column: str = "day",
             timestamp_column: str = "timestamp") -> dict[str, np.ndarray]:
    """The rows of ``table`` in day window ``window`` of dataset folder ``data``, raw columns;
    days from ``day_column``, else ``timestamp_column`` // 86400 (`folder.select_days`).

    An empty cell of a ``labels`` column of a text table (a label not known yet, which the
    ranker's training reads as NaN outside its windows) reads as NaN here too: the
    labels are not used.
    """
    from jax_recsys.data import folder as folder_lib

    folder = folder_lib.DatasetFolder(data)
    start, end = folder.window_days(window)
    cols = folder.table(table, kinds=dict.fromkeys(labels, "label"))
    return folder_lib.select_days(cols, start, end, day_column=day_column,
                                  timestamp_column=timestamp_column, file=folder.table_path(table))


def ranker_held_out(ranker_dir: str, ranker, data: str | None,
                    window: str) -> dict[str, np.ndarray]:
    """`held_out` from the table, label and time columns the ranker was trained with, as
    recorded next to it (`export.resolve_data_config`; the defaults when nothing is), of
    dataset folder ``data``, or (None or "") of the recorded one (an error naming it
    when it is gone)."""
    from jax_recsys.quant import export

    dcfg = export.resolve_data_config(ranker_dir, ranker, data_path=data or None)
    return held_out(dcfg.path, window or dcfg.test_window, table=dcfg.table,
                    labels=(dcfg.click_column, dcfg.conversion_column),
                    day_column=dcfg.day_column, timestamp_column=dcfg.timestamp_column)


def main(argv):
    del argv
    check_flags()
    import jax

    jax.config.update("jax_platforms", OFFLINE_PLATFORM)  # before any array is made

    from jax_recsys.quant import artifact as artifact_lib
    from jax_recsys.ranking import model as model_lib, train as train_lib
    from serving import ranker_service

    art = artifact_lib.load_artifact(_ARTIFACT.value)
    ranker = model_lib.load_ranker(_RANKER.value)
    check_pair(art, ranker)
    # Held-out requests and their offline INT4 scores (the data first: a dataset that is
    # gone is an error before anything is written).
    columns = train_lib.raw_to_rows(
        ranker, ranker_held_out(_RANKER.value, ranker, _DATA.value, _WINDOW.value))
    out_path = pathlib.Path(_OUT.value).resolve()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    logdir = out_path.parent / "serving_logs"
    logdir.mkdir(exist_ok=True)

    reqs = build_requests(ranker, columns, num_requests=_NUM_REQUESTS.value,
                          candidates=_CANDIDATES.value, seed=_SEED.value)
    deq = {e: art.lookup(e, np.arange(art.tables[e].codes.shape[0])) for e, _ in ranker.config.entity_dims}
    cand_col = ranker.entity_columns["pin"]
    others = [(e, ranker.entity_columns[e]) for e, _ in ranker.config.entity_dims
              if e not in ("user", "pin")]
    coarse = [n for n, _ in ranker.config.coarse_vocab_sizes]
    for r in reqs:
        r["offline"] = train_lib.predict(ranker, r["columns"], tables=deq)
    logging.info("%d requests × %d candidates from window %s; offline INT4 scores done",
                 len(reqs), _CANDIDATES.value, _WINDOW.value or "(the ranker's test window)")

    procs: list[_Proc] = []
    report: dict = {"num_shards": _NUM_SHARDS.value, "num_requests": len(reqs),
                    "candidates": _CANDIDATES.value, "version": art.version,
                    "ranker_device": None, "ok": False}
    try:
        t0 = time.time()
        # The most ids one batch of the ranker can send a shard: a user, a candidate and
        # a row of each other table per candidate (the ranker refuses shards that take
        # fewer); never below the servers' default.
        batch = _CANDIDATES.value * max(1, _CONCURRENCY.value)
        max_ids = max(1 << 16, batch * (2 + len(art.tables)))
        # The servers run in the checkout (_Proc): a relative --artifact=art was "art is
        # not a serving artifact" there.
        art_path = os.path.abspath(_ARTIFACT.value)
        for i in range(_NUM_SHARDS.value):
            procs.append(_Proc(f"embedding shard {i}", [
                "launch.serve_embeddings", f"--artifact={art_path}", f"--shard={i}",
                f"--num_shards={_NUM_SHARDS.value}", "--port=0", "--log_every_s=0",
                f"--max_ids_per_request={max_ids}"],
                logdir / f"shard{i}.log"))
        ports = [p.wait_event("serving", _START_TIMEOUT.value)["port"] for p in procs]
        shards = ",".join(f"127.0.0.1:{p}" for p in ports)
        rk = _Proc("ranker service", [
            "launch.serve_ranker", f"--artifact={art_path}", f"--shards={shards}",
            "--port=0", f"--deadline_s={_DEADLINE.value}",
            f"--max_candidates={_CANDIDATES.value}",
            f"--max_batch_candidates={batch}",
            "--log_every_s=0"],
            logdir / "ranker.log")
        procs.append(rk)
        msg = rk.wait_event("serving", _START_TIMEOUT.value)
        report["ranker_device"] = msg.get("device")
        report["startup_s"] = time.time() - t0
        print(f"[serving] {len(ports)} shard servers + ranker ({msg.get('mode')}, "
              f"{msg.get('device')}) up in {report['startup_s']:.1f} s", flush=True)
        channel, call = _rank_fn(msg["port"])

        def request_bytes(r, use_raw: bool) -> bytes:
            ctx = {e: r["columns"][c] for e, c in others}
            ctx.update({c: r["columns"][c] for c in coarse})
            if use_raw:
                uid = ranker.vocabs["user"][r["user_row"]]
                req = ranker_service.rank_request(candidates=r["columns"][cand_col],
                                                  user_raw_id=str(uid), context=ctx,
                                                  expected_version=art.version)
            else:
                req = ranker_service.rank_request(candidates=r["columns"][cand_col],
                                                  user_row=r["user_row"], context=ctx,
                                                  expected_version=art.version)
            return req.SerializeToString()

        # Warm-up, then one request at a time: latency and equality.
        call(request_bytes(reqs[0], False), timeout=_DEADLINE.value * 4)
        lat, diffs_ctr, diffs_cvr, failures = [], [], [], []
        for i, r in enumerate(reqs):
            payload = request_bytes(r, use_raw=bool(i % 2))
            t = time.perf_counter()
            try:
                resp = call(payload, timeout=_DEADLINE.value)
            except Exception as e:  # grpc.RpcError: recorded, reported, fails the check
                code = e.code() if hasattr(e, "code") else repr(e)
                failures.append(f"request {i}: {code}")
                continue
            lat.append(time.perf_counter() - t)
            ctr, cvr, version = ranker_service.decode_response(resp)
            if version != art.version:
                failures.append(f"request {i}: served version {version} != {art.version}")
            diffs_ctr.append(float(np.max(np.abs(ctr - r["offline"][0]))))
            diffs_cvr.append(float(np.max(np.abs(cvr - r["offline"][1]))))
        lat_ms = np.asarray(lat) * 1e3
        report.update({
            "latency_ms_p50": float(np.percentile(lat_ms, 50)) if lat else None,
            "latency_ms_p99": float(np.percentile(lat_ms, 99)) if lat else None,
            "latency_ms_mean": float(lat_ms.mean()) if lat else None,
            "max_abs_diff_ctr": max(diffs_ctr, default=None),
            "max_abs_diff_cvr": max(diffs_cvr, default=None),
            "failed_requests": len(failures),
            "failures": failures[:10],
        })
        # Throughput under concurrent load (same requests, several client threads).
        if _CONCURRENCY.value > 1:
            payloads = [request_bytes(r, False) for r in reqs]
            t = time.perf_counter()
            with futures.ThreadPoolExecutor(_CONCURRENCY.value) as ex:
                results = list(ex.map(lambda p: _safe_call(call, p, _DEADLINE.value), payloads))
            dt = time.perf_counter() - t
            bad = sum(r is None for r in results)
            # Concurrent requests are merged into batches: their scores must still
            # equal the offline ones, request by request.
            conc_ctr, conc_cvr = [], []
            for r, resp in zip(reqs, results, strict=True):
                if resp is not None:
                    ctr, cvr, _ = ranker_service.decode_response(resp)
                    conc_ctr.append(float(np.max(np.abs(ctr - r["offline"][0]))))
                    conc_cvr.append(float(np.max(np.abs(cvr - r["offline"][1]))))
            diffs_ctr += conc_ctr
            diffs_cvr += conc_cvr
            report.update({"concurrency": _CONCURRENCY.value,
                           "concurrent_max_abs_diff_ctr": max(conc_ctr, default=None),
                           "concurrent_max_abs_diff_cvr": max(conc_cvr, default=None),
                           "concurrent_requests_per_s": len(payloads) / dt,
                           "concurrent_candidates_per_s": len(payloads) * _CANDIDATES.value / dt,
                           "concurrent_failed_requests": bad})
            report["failed_requests"] += bad
        channel.close()
        report["tolerance"] = _TOLERANCE.value
        report["scores_match_offline_int4"] = bool(
            diffs_ctr and max(diffs_ctr) <= _TOLERANCE.value and max(diffs_cvr) <= _TOLERANCE.value)
        report["ok"] = report["scores_match_offline_int4"] and report["failed_requests"] == 0
    finally:
        codes = [p.stop() for p in reversed(procs)]
        report["server_exit_codes"] = codes[::-1]
        write_report(out_path, report)
    print(json.dumps({"serving_check": report}), flush=True)
    del jax
    if not report["ok"]:
        raise SystemExit(f"serving check failed: {json.dumps(report)}")


def write_report(out_path: pathlib.Path, report: dict) -> None:
    """Writes serving_check.json atomically: it is the pipeline's serving stage's done
    file, and a check stopped while writing it must leave the old file or none (the
    stage then runs again), never a part of it."""
    fsutil.write_text_atomic(out_path, json.dumps(report, indent=2))


def _safe_call(call, payload: bytes, deadline_s: float):
    try:
        return call(payload, timeout=deadline_s)
    except Exception:  # grpc.RpcError
        return None


if __name__ == "__main__":
    common.run(main)
