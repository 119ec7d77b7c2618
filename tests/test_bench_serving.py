"""launch.bench_serving end to end at smoke size: every part runs and prints sane JSON lines.

The benchmark is how the serving targets are checked (README, issue closing
notes), so CI runs it once, tiny, as a real process: shard, ranker and echo
servers, client processes, all three parts. Latencies are not asserted (shared,
noisy machines); the lines' presence, shape and internal consistency are.
"""

import json
import os
import subprocess
import sys
import time

import mp_util
import numpy as np
import pytest


@pytest.fixture
def rank_workdir(tmp_path):
    """A new --workdir whose jax_cache (the rankers' --compilation_cache_dir) is the test
    run's XLA compilation cache (conftest.py): the rankers of these tests serve artifacts
    of the same sizes (5,000 rows, 100 candidates), so the first ranker of the run
    compiles the bucket programs and the later ones load them, as the later rankers of
    one benchmark run do."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "jax_cache").symlink_to(os.environ["JAX_COMPILATION_CACHE_DIR"],
                                    target_is_directory=True)
    return work


@pytest.mark.slow  # ~40-60 s on a busy 2-core box: rankers import JAX and compile
@pytest.mark.multiprocess
def test_bench_serving_smoke_prints_every_kind(rank_workdir):
    args = [
        "--parts=lookup,rank,idle",
        "--rows=5000",
        "--shards=1,2",
        "--clients=1",
        "--duration_s=0.4",
        "--warmup=3",
        "--rank_rows=5000",
        "--rank_candidates=100",
        "--rank_shards=1",
        "--rank_wires=quantized,float32",
        "--rank_clients=1",
        "--idle_calls=10",
        "--idle_gaps_ms=0,1",
        f"--workdir={rank_workdir}",
    ]
    lines = mp_util.json_lines("launch.bench_serving", args, timeout_s=400)
    by_kind = {}
    for line in lines:
        assert line["bench"] == "serving"
        by_kind.setdefault(line["kind"], []).append(line)

    idle = by_kind["idle_rtt"]
    assert sorted((x["transport"], x["gap_ms"]) for x in idle) == [
        ("grpc", 0.0), ("grpc", 1.0), ("tcp", 0.0), ("tcp", 1.0)
    ]
    compute = by_kind["idle_compute"]
    assert sorted(x["gap_ms"] for x in compute) == [0.0, 1.0]
    for x in idle + compute:
        assert x["requests"] == 10 and 0 < x["p50_ms"] <= x["p99_ms"]
        if x["gap_ms"] == 0.0:
            assert x["p50_added_ms"] == 0.0 and x["p50_vs_no_gap"] == 1.0
        assert x["p50_vs_no_gap"] == pytest.approx(
            x["p50_ms"] / (x["p50_ms"] - x["p50_added_ms"]), rel=1e-2
        )

    lookups = by_kind["lookup"]
    assert sorted((x["shards"], x["transport"]) for x in lookups) == [
        (1, "stream"), (1, "unary"), (2, "stream"), (2, "unary")
    ]
    sliced = {
        (x["shards"], x["transport"]): x for x in by_kind["echo"] if x["setting"] == "sliced"
    }
    assert sorted(sliced) == sorted((x["shards"], x["transport"]) for x in lookups)
    # Two shards also get the fan-out floor: two echo servers in parallel.
    fanout = {
        (x["shards"], x["transport"]): x for x in by_kind["echo"] if x["setting"] == "fanout"
    }
    assert sorted(fanout) == [(2, "stream"), (2, "unary")]
    for x in lookups:  # each compared to the echo floors of its own transport and run
        assert x["clients"] == 1 and x["requests"] > 0 and 0 < x["p50_ms"] <= x["p99_ms"]
        floor = sliced[x["shards"], x["transport"]]
        assert x["p50_vs_echo"] == pytest.approx(x["p50_ms"] / floor["p50_ms"], abs=1e-3)
        fan = fanout.get((x["shards"], x["transport"]), floor)  # one shard: the same floor
        assert fan["requests"] > 0 and 0 < fan["p50_ms"] <= fan["p99_ms"]
        assert x["p50_vs_fanout_echo"] == pytest.approx(x["p50_ms"] / fan["p50_ms"], abs=1e-3)
    alone = [x for x in by_kind["echo"] if x["setting"] == "alone"]
    assert sorted(x["transport"] for x in alone) == ["stream", "unary"]

    ranks = by_kind["rank"]
    mono = [x for x in ranks if x["mode"] == "monolithic"]
    hybrid = [x for x in ranks if x["mode"] == "hybrid"]
    assert len(mono) == 1 and sorted(x["wire"] for x in hybrid) == ["float32", "quantized"]
    for x in hybrid:
        assert x["candidates"] == 100 and x["fetch_ahead"] == 1 and x["transport"] == "stream"
        assert x["p50_vs_monolithic"] == pytest.approx(x["p50_ms"] / mono[0]["p50_ms"], abs=1e-3)
    (floor,) = by_kind["rank_serial_floor"]
    assert floor["wire"] == "quantized" and floor["fetch_response_bytes"] > 0
    assert floor["transport"] == "stream"
    assert floor["p50_vs_monolithic"] == pytest.approx(
        floor["p50_ms"] / mono[0]["p50_ms"], abs=1e-3
    )
    services = by_kind["rank_service"]
    assert len(services) == 3
    for x in services:  # every Rank call the clients made was answered
        assert set(x["by_code"]) == {"OK"}
        # One client: one request per batch, so each call outlasts its batch's stages.
        assert 0 < x["fetch_p50_ms"] < x["server_p50_ms"]
        assert 0 < x["score_p50_ms"] < x["server_p50_ms"]


@pytest.mark.slow  # ~10-20 s: two shard processes, one client process
@pytest.mark.multiprocess
def test_bench_serving_hedge_part_compares_failover_and_hedged_lookups(tmp_path):
    args = ["--parts=hedge", "--rows=5000", "--hedge_clients=1", "--duration_s=0.4",
            "--warmup=3", "--hedge_after_ms=1,3,auto", "--hedge_budget=0.5", "--hedge_stall_ms=10",
            "--hedge_stall_every_ms=40", f"--workdir={tmp_path / 'work'}"]
    lines = mp_util.json_lines("launch.bench_serving", args, timeout_s=300)
    hedge = [x for x in lines if x["kind"] == "hedge"]
    assert sorted((x["stalls"] > 0, x["mode"], str(x["hedge_after_ms"])) for x in hedge) == [
        (False, "failover", "None"), (False, "hedged", "1.0"), (False, "hedged", "3.0"),
        (False, "hedged", "auto"), (True, "failover", "None"), (True, "hedged", "1.0"),
        (True, "hedged", "3.0"), (True, "hedged", "auto"),
    ]
    for x in hedge:
        assert x["clients"] == 1 and x["transport"] == "stream"
        assert x["hedge_budget"] == (None if x["mode"] == "failover" else 0.5)
        assert x["requests"] > 0 and 0 < x["p50_ms"] <= x["p99_ms"] <= x["p999_ms"] <= x["max_ms"]
        assert (x["stall_ms"], x["stall_every_ms"]) == ((10.0, 40.0) if x["stalls"] else (0, 0))
        failover = next(y for y in hedge if y["mode"] == "failover"
                        and y["stalls"] == x["stalls"])
        for q in ("p50", "p99", "p999"):
            assert x[f"{q}_vs_failover"] == pytest.approx(
                x[f"{q}_ms"] / failover[f"{q}_ms"], abs=1e-3)
        if x["mode"] == "failover":
            assert x["hedges_per_request"] == x["throttled_per_request"] == 0.0
        if x["hedge_after_ms"] == "auto":  # one client, one shard: its delay (or none yet)
            assert x["hedge_quantile"] == 0.99
            ((delay,),) = x["final_hedge_delay_ms"]
            assert delay is None or delay >= 1.0
        else:
            assert "final_hedge_delay_ms" not in x


@pytest.mark.multiprocess
def test_a_server_that_does_not_start_fails_with_the_end_of_its_log(tmp_path):
    from launch import bench_serving

    with pytest.raises(ChildProcessError) as err:  # an OSError: common.run prints one line
        bench_serving._spawn_ranker(str(tmp_path / "no_artifact"), [])
    # The ranker's own one-line reason, read back from its log beside the artifact.
    (log,) = tmp_path.glob("serve_ranker_*.log")
    line = str(err.value)
    assert line.startswith("ranker shards=0 wire=quantized exited with status 1 before it "
                           f"served: serve_ranker: cannot start: {tmp_path / 'no_artifact'}")
    assert "\n" not in line and line.endswith(f" (log: {log})")
    assert "serve_ranker: cannot start" in err.value.log_text
    err.value.log_kept = False  # a temporary work folder: the log is removed with it
    assert str(err.value).endswith(" (--workdir=DIR keeps its log)")


def test_rankers_sharing_a_gpu_get_a_share_of_its_memory_unless_told(monkeypatch):
    from launch import bench_serving

    for var in ("XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_PREALLOCATE"):
        monkeypatch.delenv(var, raising=False)
    assert bench_serving._ranker_env(1) == {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.750"}
    assert bench_serving._ranker_env(3) == {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.300"}
    monkeypatch.setenv("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    assert bench_serving._ranker_env(3) == {}


# A child that runs bench_serving on an "accelerator" that takes one process: a
# ranker started while another is alive fails as on the lent H200 hosts.
_ONE_PROCESS_DEVICE = """
import os, sys
from launch import bench_serving as b, common

real, alive = b._spawn_ranker, []


def spawn(*args, **kwargs):
    if any(p.poll() is None for p in alive):
        log = os.path.join(os.path.dirname(args[0]), "failed_ranker.log")  # beside the artifact
        with open(log, "w") as f:
            f.write("RuntimeError: Unable to initialize backend 'cuda': INTERNAL: no supported "
                    "devices found for platform CUDA\\n")
        raise b._StartError("ranker", 1, log)
    proc, info = real(*args, **kwargs)
    alive.append(proc)
    return proc, info


if __name__ == "__main__":  # the client processes (spawned) import this file too
    b._spawn_ranker = spawn
    sys.argv = ["bench_serving", *sys.argv[1:]]
    common.run(b.main)
"""


@pytest.mark.slow  # ~25 s: a failed side-by-side start, then two rankers in turn
@pytest.mark.multiprocess
def test_rankers_fall_back_to_one_at_a_time_when_a_second_finds_no_device(tmp_path, rank_workdir):
    script = tmp_path / "one_process_device.py"
    script.write_text(_ONE_PROCESS_DEVICE)
    args = ["--parts=rank", "--duration_s=0.4", "--warmup=3", "--rank_rows=5000",
            "--rank_candidates=100", "--rank_shards=1", "--rank_wires=quantized",
            "--rank_clients=1", f"--workdir={rank_workdir}"]
    out = subprocess.run(
        [sys.executable, str(script), *args], cwd=mp_util.REPO, capture_output=True,
        text=True, timeout=300,
        env=dict(os.environ, PYTHONPATH=mp_util.pythonpath(), JAX_PLATFORMS="cpu"),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "running the rankers one at a time (--rank_one_at_a_time)" in out.stderr
    lines = [json.loads(x) for x in out.stdout.splitlines() if x.startswith("{")]
    # No counters of the failed side-by-side turn; then each ranker alone, as with the flag.
    assert [x["kind"] for x in lines] == ["rank_artifact", "rank_service", "rank_service",
                                          "rank_serial_floor", "rank", "rank"]
    services = [x for x in lines if x["kind"] == "rank_service"]
    assert [x["mode"] for x in services] == ["monolithic", "hybrid"]
    assert all(set(x["by_code"]) == {"OK"} for x in services)
    ranks = [x for x in lines if x["kind"] == "rank"]
    assert all(x["one_at_a_time"] and x["requests"] > 0 for x in ranks)


# One run (its rankers start once: ~35 s on a 2-core box) for three things: the rankers
# one at a time (--rank_one_at_a_time), a row cache with an ads inventory of 200 pins,
# and Prefetch. One uncached and one cached hybrid (the cache holds every row) beside
# the monolithic ranker, 1 and 2 clients.
@pytest.mark.slow
@pytest.mark.multiprocess
def test_rank_part_one_at_a_time_with_a_row_cache_an_ads_inventory_and_prefetch(rank_workdir):
    args = ["--parts=rank", "--duration_s=0.4", "--rank_rows=5000", "--rank_candidates=100",
            "--rank_shards=1", "--rank_wires=quantized", "--rank_clients=1,2",
            "--rank_cache_rows=0,6000", "--rank_ad_pool=200", "--warmup=20", "--rank_prefetch",
            "--rank_one_at_a_time", f"--workdir={rank_workdir}"]
    lines = mp_util.json_lines("launch.bench_serving", args, timeout_s=300)
    kinds = [x["kind"] for x in lines]
    # Each ranker's counters are printed when its turn ends, before the comparisons.
    assert kinds == ["rank_artifact"] + ["rank_service"] * 3 + [
        "rank_serial_floor", "rank", "rank", "rank"
    ] * 2
    services = {(x["mode"], x["cache_rows"]): x for x in lines if x["kind"] == "rank_service"}
    assert list(services) == [("monolithic", 0), ("hybrid", 0), ("hybrid", 6000)]
    assert all(set(x["by_code"]) == {"OK"} for x in services.values())
    assert services["hybrid", 0]["cache_hit_rate"] is None
    cached = services["hybrid", 6000]
    # 100 of an inventory of 200 pins and 100 of a few advertisers per call, and the
    # (random) user prefetched: after the first calls hardly a row misses.
    assert cached["cache_hit_rate"] > 0.9
    # Every Rank call's user was prefetched first: fetched then, unless a random user
    # of the 5,000 came back while still cached.
    assert 0.8 * cached["by_code"]["OK"] <= cached["prefetch_rows"] <= cached["by_code"]["OK"]
    assert services["hybrid", 0]["prefetch_rows"] is None  # no cache: no Prefetch sent
    for c in (1, 2):
        ranks = {(x["mode"], x["cache_rows"]): x for x in lines
                 if x["kind"] == "rank" and x["clients"] == c}
        assert list(ranks) == list(services)
        (floor,) = (x for x in lines if x["kind"] == "rank_serial_floor" and x["clients"] == c)
        mono = ranks["monolithic", 0]
        for x in ranks.values():
            assert x["one_at_a_time"] and x["prefetch"] and x["ad_pool"] == 200
            assert x["requests"] > 0
        for x in (floor, ranks["hybrid", 0], ranks["hybrid", 6000]):
            assert x["p50_vs_monolithic"] == pytest.approx(x["p50_ms"] / mono["p50_ms"],
                                                           abs=1e-3)


def test_rank_payloads_are_fresh_and_drawn_from_the_ads_inventory():
    from launch import bench_serving as bs
    from serving import codec
    from serving.protos import embedding_pb2 as pb

    rng = np.random.default_rng(0)
    task = {"candidates": 50, "rows": 10_000, "advertisers": 7, "ad_pool": 60}
    reqs = [pb.RankRequest.FromString(bs._rank_payload(rng, task)) for _ in range(20)]
    for req in reqs:
        cands = codec.decode_ids(req.candidate_ids)
        assert cands.size == 50 and np.unique(cands).size == 50 and cands.max() < 60
    assert len({req.user_row for req in reqs}) > 15  # a fresh random user each time
    uniform = pb.RankRequest.FromString(bs._rank_payload(rng, dict(task, ad_pool=0)))
    assert codec.decode_ids(uniform.candidate_ids).max() >= 60  # over all 10k rows


def test_every_client_of_every_run_gets_its_own_seed():
    """The rankers (and their row caches) live across the client counts of a run: a
    later run must not replay an earlier one's requests (it did, with seed = client)."""
    import queue

    from launch import bench_serving as bs

    pool = bs._ClientPool.__new__(bs._ClientPool)  # no processes: queues only
    pool.task_q, pool.result_q, pool.start_q, pool._runs, pool._broken = (
        queue.Queue(), queue.Queue(), queue.Queue(), 0, "")
    seeds = []
    for clients in (1, 4, 4):
        for _ in range(clients):
            pool.result_q.put({"ready": True})
        for _ in range(clients):
            pool.result_q.put({"latencies": [[0.001]], "extras": [{}], "finals": [{}]})
        pool.run({"duration_s": 0.1}, clients)
        seeds += [tuple(pool.task_q.get_nowait()["seed"]) for _ in range(clients)]
    assert len(set(seeds)) == len(seeds) == 9
    rngs = [np.random.default_rng(list(s)).integers(0, 2**62) for s in seeds]
    assert len(set(rngs)) == 9


def test_clients_start_measuring_together_after_a_warm_up_of_any_length(monkeypatch):
    """Each client warms up (here 3 calls of 0.4 s: longer than the 1 s the pool used
    to allow before its fixed start, which left nothing measured), says it is ready,
    and all start at the one time the pool sets once the last is ready; a client that
    fails in its warm-up fails the run instead of hanging it."""
    import queue
    import threading

    from launch import bench_serving as bs

    calls = []

    def caller(task, rng):
        def one(i):
            calls.append((task["seed"][1], time.time()))
            time.sleep(0.4 if len(calls) <= 6 else 0.01)  # the warm-up is slow
            if task.get("fail"):
                raise RuntimeError("no server")

        return one, lambda: None

    monkeypatch.setattr(bs, "_caller", caller)
    pool = bs._ClientPool.__new__(bs._ClientPool)  # threads instead of processes
    pool.task_q, pool.result_q, pool.start_q, pool._runs, pool._broken = (
        queue.Queue(), queue.Queue(), queue.Queue(), 0, "")
    workers = [threading.Thread(target=bs._worker, args=(pool.task_q, pool.result_q,
                                                         pool.start_q), daemon=True)
               for _ in range(2)]
    for w in workers:
        w.start()
    (lat,) = pool.run({"duration_s": 0.3, "warmup": 3}, 2)
    assert lat.size > 10  # both measured their 0.3 s after the 1.2 s warm-up
    firsts = {}
    for client, t in calls[6:]:
        firsts.setdefault(client, t)
    assert len(firsts) == 2 and abs(firsts[0] - firsts[1]) < 0.05  # the same start
    with pytest.raises(RuntimeError, match="client failed: RuntimeError\\('no server'"):
        pool.run({"duration_s": 0.3, "warmup": 1, "fail": True}, 2)
    # A warm-up past the limit fails the run, and the pool refuses later runs (a client
    # still warming up would answer them with this run's messages).
    monkeypatch.setattr(bs, "_WARMUP_TIMEOUT_S", 0.2)
    calls.clear()
    with pytest.raises(RuntimeError, match="clients did not warm up in 0.2 s"):
        pool.run({"duration_s": 0.3, "warmup": 3}, 2)
    with pytest.raises(RuntimeError, match="the client pool is unusable"):
        pool.run({"duration_s": 0.3, "warmup": 1}, 1)
    for _ in workers:  # let the stranded clients finish
        pool.start_q.put(time.time())
    for _ in workers:
        pool.task_q.put(None)
    for w in workers:
        w.join(5)



def test_a_server_that_never_says_it_is_up_is_killed_and_reported(tmp_path, monkeypatch):
    """_spawn_service waited without limit for a server's first line: a server that
    hangs while starting (a stuck compile, a lock) hung the whole benchmark."""
    from launch import bench_serving as bs

    monkeypatch.setattr(bs, "_START_TIMEOUT_S", 1.0)
    t0 = time.monotonic()
    with pytest.raises(bs._StartError) as e:  # silent for 60 s, as a stuck start
        bs._spawn_service("timeit", ["-n", "1", "-r", "1", "import time; time.sleep(60)"],
                          "shard 0/1", str(tmp_path))
    assert time.monotonic() - t0 < 30
    assert str(e.value).startswith("shard 0/1 did not start within 1 s (killed): ")
    assert e.value.returncode == -9
