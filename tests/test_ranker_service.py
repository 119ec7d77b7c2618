"""Ranker service: hybrid == monolithic exactly, batching, bad input (and a randomized stream
of it), dead shard, live swap.

Real embedding shard servers and ranker services on loopback, ports bound at
run time (port 0); the serving artifact is built here from a tiny ranker.
"""

import dataclasses
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent import futures

import grpc
import jax
import mp_util
import numpy as np
import pytest
from flax import nnx
from grpc_health.v1 import health_pb2, health_pb2_grpc

from jax_recsys.quant import artifact
from jax_recsys.ranking import model as model_lib
from serving import (
    client as client_lib,
    codec,
    embedding_server as es,
    grpc_util,
    ranker_service as rs,
    row_cache,
)
from serving.protos import embedding_pb2 as pb

CFG = model_lib.RankerConfig(
    entity_dims=(("user", 8), ("pin", 6), ("advertiser", 4)),
    coarse_vocab_sizes=(("hour", 3),),
    coarse_dim=2,
    num_cross_layers=1,
    mlp_dims=(8,),
    head_dims=(4,),
)
ROWS = {"user": 50, "pin": 40, "advertiser": 7}
USER_IDS = np.random.default_rng(123).permutation(50).astype(np.int64) + 1000  # unsorted vocab
BAD = grpc.StatusCode.INVALID_ARGUMENT
_REF_SCORE = jax.jit(model_lib.make_score_fn(CFG))


def _params(seed, cfg=CFG):
    """Dense params of cfg filled from NumPy (init_dense's eager ops take ~20 s on a busy box)."""
    model = nnx.eval_shape(lambda: model_lib.DenseRanker(cfg, rngs=nnx.Rngs(0)))
    pure = nnx.to_pure_dict(nnx.split(model, nnx.Param)[1])
    rng = np.random.default_rng(seed)
    flat = {
        "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): rng.normal(
            0.0, 0.4, leaf.shape
        ).astype(np.float32)
        for path, leaf in jax.tree_util.tree_flatten_with_path(pure)[0]
    }
    model_lib.unflatten_params(cfg, flat)  # same leaf names and shapes as flatten_params
    return flat


def _write(path, seed, cfg=CFG):
    rng = np.random.default_rng(seed)
    tables = {name: rng.normal(size=(ROWS[name], dim)).astype(np.float32)
              for name, dim in cfg.entity_dims}
    vocabs = {"user": USER_IDS, "pin": np.arange(40) + 5000, "advertiser": np.arange(7) + 9000}
    artifact.write_artifact(
        path,
        tables=tables,
        vocabs={name: vocabs[name] for name in tables},
        ranker_config=cfg.to_dict(),
        ranker_params=_params(seed, cfg),
    )
    return artifact.load_artifact(path)


def _reference(art, *, user_row, cands, adv, hour):
    """pCTR, pCVR computed independently: dequantized rows -> unjitted score function."""
    c = len(cands)
    user = (
        np.zeros((c, 8), np.float32)
        if user_row < 0
        else np.repeat(art.lookup("user", [user_row]), c, 0)
    )
    adv = np.broadcast_to(np.asarray(adv), (c,))
    adv_emb = np.where((adv >= 0)[:, None], art.lookup("advertiser", np.maximum(adv, 0)), 0.0)
    emb = {"user": user, "pin": art.lookup("pin", np.asarray(cands)), "advertiser": adv_emb}
    coarse = {"hour": np.broadcast_to(np.asarray(hour), (c,)).astype(np.int32)}
    # Padded to one shape so the reference compiles once.
    emb = {k: np.pad(v, ((0, 64 - c), (0, 0))) for k, v in emb.items()}
    coarse = {k: np.pad(v, (0, 64 - c)) for k, v in coarse.items()}
    with jax.default_matmul_precision("highest"):  # as the service: full float32 on any device
        ctr, cvr = _REF_SCORE(art.ranker_params, entity_emb=emb, coarse_ids=coarse)
    ctr, cvr = np.asarray(ctr, np.float64)[:c], np.asarray(cvr, np.float64)[:c]
    return 1 / (1 + np.exp(-ctr)), 1 / (1 + np.exp(-cvr))


def _svc(art, shards=(), **kw):
    cfg = rs.RankerServiceConfig(
        artifact=str(art.path),
        shards=tuple(f"127.0.0.1:{s.port}" for s in shards),
        max_candidates=48,
        max_batch_candidates=64,
        min_bucket=32,
        **kw,
    )
    return rs.serve(cfg)


def _shards(art, n=2, **kw):
    return [
        es.serve(
            es.ServerConfig(artifact=str(art.path), shard=i, num_shards=n, log_every_s=0, **kw)
        )
        for i in range(n)
    ]


def _call(port):
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = channel.unary_unary(rs.RANK_METHOD)
    return channel, lambda req, timeout=10: rs.decode_response(
        stub(req if isinstance(req, bytes) else req.SerializeToString(), timeout=timeout)
    )


@pytest.fixture(scope="module")
def arts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ranker_art")
    return {"a": _write(str(root / "a"), 0), "b": _write(str(root / "b"), 1)}


@pytest.fixture(scope="module")
def stack(arts):
    """2 shards of artifact a, hybrid rankers (quantized and float32 wire) and a monolithic one."""
    shards = _shards(arts["a"])
    hybrid = _svc(arts["a"], shards)
    hybrid_f32 = _svc(arts["a"], shards, wire="float32")
    # A row cache smaller than the pin table: hashed slots, evictions. On the quantized
    # wire it holds the INT4 codes, on the float32 wire float32 rows.
    cached = _svc(arts["a"], shards, cache_rows=16)
    cached_f32 = _svc(arts["a"], shards, cache_rows=16, wire="float32")
    mono = _svc(arts["a"])
    yield {"shards": shards, "hybrid": hybrid, "hybrid_f32": hybrid_f32, "cached": cached,
           "cached_f32": cached_f32, "mono": mono}
    for svc in (hybrid, hybrid_f32, cached, cached_f32, mono):
        svc.stop(grace=0)
    for s in shards:
        s.stop(grace=0).wait()


CASES = [
    # (user, candidates, advertiser context, hour context)
    ({"user_raw_id": "1007"}, [0, 39, 5, 5, 21], [0, 6, 1, 1, 3], [0, 1, 2, 2, 1]),
    ({"user_row": 49}, list(range(40)), 3, 2),  # context broadcast from one value
    ({"user_raw_id": "no-such-user"}, [17, 18], [-1, 2], 0),  # cold user, unknown advertiser
    ({"user_row": 0}, [1] * 48, list(range(7)) * 6 + [0] * 6, 1),  # max_candidates, repeats
]


def _row(user):
    """The user table row a case names (-1 for an id outside the vocabulary)."""
    if "user_row" in user:
        return user["user_row"]
    hit = np.flatnonzero(USER_IDS.astype(str) == user["user_raw_id"])
    return int(hit[0]) if hit.size else -1


def test_hybrid_equals_monolithic_exactly_and_matches_reference(arts, stack):
    ch_h, hybrid = _call(stack["hybrid"].port)
    ch_f, hybrid_f32 = _call(stack["hybrid_f32"].port)
    ch_m, mono = _call(stack["mono"].port)
    assert stack["hybrid"].config.wire == "quantized"  # the default
    version = arts["a"].version
    for user, cands, adv, hour in CASES:
        req = rs.rank_request(candidates=cands, context={"advertiser": adv, "hour": hour}, **user)
        ctr_h, cvr_h, v_h = hybrid(req)
        ctr_f, cvr_f, v_f = hybrid_f32(req)
        ctr_m, cvr_m, v_m = mono(req)
        assert v_h == v_f == v_m == version
        assert ctr_h.shape == (len(cands),)
        assert np.array_equal(ctr_h, ctr_m) and np.array_equal(cvr_h, cvr_m)
        assert np.array_equal(ctr_f, ctr_m) and np.array_equal(cvr_f, cvr_m)
        ref_ctr, ref_cvr = _reference(
            arts["a"], user_row=_row(user), cands=cands, adv=adv, hour=hour
        )
        np.testing.assert_allclose(ctr_h, ref_ctr, rtol=2e-5, atol=1e-6)
        np.testing.assert_allclose(cvr_h, ref_cvr, rtol=2e-5, atol=1e-6)
        assert np.all((ctr_h > 0) & (ctr_h < 1))
    # A cold-start user is scored as the zero user row, not as any real user.
    cold, _, _ = hybrid(
        rs.rank_request(candidates=[3], user_raw_id="x", context={"advertiser": 0, "hour": 0})
    )
    real, _, _ = hybrid(
        rs.rank_request(candidates=[3], user_row=0, context={"advertiser": 0, "hour": 0})
    )
    assert cold[0] != real[0]
    ch_h.close()
    ch_f.close()
    ch_m.close()


@pytest.mark.parametrize("wire", ["quantized", "float32"])
def test_a_hybrid_ranker_with_a_row_cache_scores_exactly_as_monolithic(arts, stack, wire):
    svc, mono = stack["cached" if wire == "quantized" else "cached_f32"], stack["mono"]
    cache = svc._versions.snapshot.versions[arts["a"].version].fetcher
    assert isinstance(cache, row_cache.RowCache) and cache.client.wire == wire
    # The quantized wire's cache holds the INT4 codes (+ float32 scale, bias, int64 tag):
    # 16 slots of pin and user (hashed), advertiser's 7 rows whole.
    per_row = {t: (d + 1) // 2 + 16 if wire == "quantized" else 4 * d + 8
               for t, d in CFG.entity_dims}
    assert cache.nbytes == 16 * per_row["user"] + 16 * per_row["pin"] + 7 * per_row["advertiser"]
    assert all((c.held[0].dtype == np.uint8) == (wire == "quantized")
               for c in cache._caches.values())
    before = svc.stats()
    assert before["cache_bytes"] == cache.nbytes
    for _ in range(2):  # the second pass finds most rows in the cache
        for user, cands, adv, hour in CASES:
            req = rs.rank_request(candidates=cands, context={"advertiser": adv, "hour": hour},
                                  **user)
            for got, want in zip(rs.decode_response(svc.rank(req)),
                                 rs.decode_response(mono.rank(req)), strict=True):
                np.testing.assert_array_equal(got, want)
    stats = svc.stats()
    hits = stats["cache_hits"] - before["cache_hits"]
    misses = stats["cache_misses"] - before["cache_misses"]
    # Every user, candidate and known advertiser row of both passes went through it.
    rows = sum(len(c) + (_row(u) >= 0) + int(np.sum(np.broadcast_to(a, (len(c),)) >= 0))
               for u, c, a, _ in CASES)
    assert hits + misses == 2 * rows and hits > rows // 2
    assert 0 < stats["cache_hit_rate"] < 1
    assert "cache_hits" not in stack["hybrid"].stats()
    with pytest.raises(ValueError, match="cache_rows must be >= 0"):
        rs.RankerServiceConfig(artifact=str(arts["a"].path), shards=("a",), cache_rows=-1)


def test_cache_tables_caches_only_the_tables_named(arts, stack):
    """cache_tables=(pin, advertiser): no user table in the cache (its rows all go to
    the shards), scores still exactly monolithic; bad settings are refused."""
    svc = _svc(arts["a"], stack["shards"], cache_rows=16, cache_tables=("pin", "advertiser"))
    try:
        cache = svc._versions.snapshot.versions[arts["a"].version].fetcher
        assert sorted(cache._caches) == ["advertiser", "pin"]
        for _ in range(2):
            for user, cands, adv, hour in CASES:
                req = rs.rank_request(candidates=cands,
                                      context={"advertiser": adv, "hour": hour}, **user)
                for got, want in zip(rs.decode_response(svc.rank(req)),
                                     rs.decode_response(stack["mono"].rank(req)), strict=True):
                    np.testing.assert_array_equal(got, want)
        stats = svc.stats()
        # Only candidate and known advertiser rows are counted: the users bypass it.
        rows = sum(len(c) + int(np.sum(np.broadcast_to(a, (len(c),)) >= 0))
                   for _, c, a, _ in CASES)
        assert stats["cache_hits"] + stats["cache_misses"] == 2 * rows
    finally:
        svc.stop(grace=0)
    base = dict(artifact=str(arts["a"].path), shards=("a",))
    with pytest.raises(ValueError, match="cache_tables needs cache_rows"):
        rs.RankerServiceConfig(**base, cache_tables=("pin",))
    with pytest.raises(ValueError, match="lists a table twice"):
        rs.RankerServiceConfig(**base, cache_rows=8, cache_tables=("pin", "pin"))
    with pytest.raises(ValueError, match=r"cache_tables \['item'\]: not tables this ranker "
                                         r"fetches; it fetches \['user', 'pin', 'advertiser'\]"):
        _svc(arts["a"], stack["shards"], cache_rows=8, cache_tables=("pin", "item"))


def test_a_swap_to_a_model_without_a_cached_table_is_not_refused(arts, tmp_path):
    """cache_tables names a table the next model no longer uses: refused at start (a
    typo), but a swap goes ahead (warned), caching the tables it still fetches."""
    cfg2 = model_lib.RankerConfig(entity_dims=(("user", 8), ("pin", 6)),
                                  coarse_vocab_sizes=(("hour", 3),), coarse_dim=2,
                                  num_cross_layers=1, mlp_dims=(8,), head_dims=(4,))
    art2 = _write(str(tmp_path / "no_adv"), 2, cfg2)
    (shard,) = _shards(arts["a"], n=1)
    svc = _svc(arts["a"], [shard], cache_rows=16, cache_tables=("pin", "advertiser"))
    try:
        shard.swap(str(art2.path), window_s=60.0)
        assert svc.swap(str(art2.path)) == art2.version
        cache = svc._versions.snapshot.versions[art2.version].fetcher
        assert cache.cached_tables == ["pin"]
        req = rs.rank_request(candidates=[1, 2], user_row=0, context={"hour": 0})
        assert rs.decode_response(svc.rank(req))[2] == art2.version
        with pytest.raises(ValueError, match="not tables this ranker fetches"):
            _svc(art2, [shard], cache_rows=16, cache_tables=("pin", "advertiser"))
    finally:
        svc.stop(grace=0)
        shard.stop(grace=0).wait()


def test_prefetch_puts_the_user_row_in_the_cache_so_rank_needs_no_round_trip(arts, stack):
    """Prefetch(user) fetches the user's row into the row cache: with the candidates'
    rows cached by an earlier call, the Rank call is then answered with the shards
    stopped, exactly as monolithic; a second Prefetch finds the row cached."""
    shards = _shards(arts["a"])
    svc = _svc(arts["a"], shards, cache_rows=64)  # every table whole: no evictions
    ch = grpc.insecure_channel(f"127.0.0.1:{svc.port}")
    prefetch = ch.unary_unary(rs.PREFETCH_METHOD)
    try:
        cands, ctx = [3, 9, 27], {"advertiser": [0, 1, 2], "hour": 1}
        svc.rank(rs.rank_request(candidates=cands, context=ctx, user_row=1))  # rows cached
        got = pb.PrefetchResponse.FromString(prefetch(
            rs.prefetch_request(user_raw_id=str(USER_IDS[7])).SerializeToString(), timeout=10))
        assert (got.version, got.rows_fetched) == (arts["a"].version, 1)
        assert svc.prefetch(rs.prefetch_request(user_row=7)).rows_fetched == 0  # cached now
        for s in shards:
            s.stop(grace=0).wait()
        req = rs.rank_request(candidates=cands, context=ctx, user_row=7)
        for got, want in zip(rs.decode_response(svc.rank(req)),
                             rs.decode_response(stack["mono"].rank(req)), strict=True):
            np.testing.assert_array_equal(got, want)
        with pytest.raises(rs.RankError) as e:  # another user's row needs the shards
            svc.rank(rs.rank_request(candidates=cands, context=ctx, user_row=8))
        assert e.value.code == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(rs.RankError) as e:
            svc.prefetch(rs.prefetch_request(user_row=8))
        assert e.value.code == grpc.StatusCode.UNAVAILABLE
        stats = svc.stats()
        assert (stats["prefetches"], stats["prefetch_rows"]) == (2, 1)
        # A cold-start raw id has nothing to fetch; bad input is INVALID_ARGUMENT.
        assert svc.prefetch(rs.prefetch_request(user_raw_id="no-such-user")).rows_fetched == 0
        for bad, match in ((pb.PrefetchRequest(), "no user"),
                           (rs.prefetch_request(user_row=50), "outside table 'user'")):
            with pytest.raises(rs.RankError, match=match) as e:
                svc.prefetch(bad)
            assert e.value.code == BAD
        with pytest.raises(grpc.RpcError) as e:
            prefetch(b"\xff\xff", timeout=10)
        assert e.value.code() == BAD and "not a PrefetchRequest" in e.value.details()
        # The RPCs by code (the in-process calls above are not RPCs); Rank's count apart.
        assert svc.stats()["prefetch_by_code"] == {"OK": 1, "INVALID_ARGUMENT": 1}
        with pytest.raises(rs.RankError) as e:
            svc.prefetch(rs.prefetch_request(user_row=1, expected_version="nope"))
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        ch.close()
        svc.stop(grace=0)
        for s in shards:
            s.stop(grace=0).wait()


def test_prefetch_needs_a_cache_of_the_user_table_and_is_a_no_op_monolithic(arts, stack):
    req = rs.prefetch_request(user_row=3)
    assert stack["mono"].prefetch(req).rows_fetched == 0  # tables in process
    with pytest.raises(rs.RankError, match="user_row -1 outside table"):  # checked there too
        stack["mono"].prefetch(rs.prefetch_request(user_row=-1))
    svc = _svc(arts["a"], stack["shards"], cache_rows=16, cache_tables=("pin",))
    try:
        for hybrid in (stack["hybrid"], svc):  # no cache; a cache without the user table
            with pytest.raises(rs.RankError, match="Prefetch needs a row cache holding the "
                                                   "'user' table") as e:
                hybrid.prefetch(req)
            assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        svc.stop(grace=0)
    with pytest.raises(ValueError, match="give user_raw_id or user_row"):
        rs.prefetch_request()


def test_concurrent_requests_are_batched_and_scored_like_single_ones(arts, stack):
    svc = stack["mono"]
    reqs = [
        rs.rank_request(candidates=cands, context={"advertiser": adv, "hour": hour}, **user)
        for user, cands, adv, hour in CASES
    ]
    singles = [svc.rank(r) for r in reqs]
    # Stop the pipeline threads of a fresh service, queue the requests, batch by hand.
    fresh = _svc(arts["a"])
    fresh._stopping.set()
    for t in fresh._threads:
        t.join(5)
    for r in reqs:
        fresh._queue.put(fresh._validate(r, deadline=time.monotonic() + 10))
    batches = []
    while (b := fresh._next_batch()) is not None:
        batches.append(b)
    # 5 + 40 + 2 fit in 64 candidates; the 48-candidate request starts a second batch.
    assert [len(b) for b in batches] == [3, 1]
    for b in batches:
        for job in b:
            job.future.set_running_or_notify_cancel()
        fresh._score(b, *fresh._fetch(b))
    got = [j.future.result() for b in batches for j in b]
    for single, (ctr, cvr) in zip(singles, got, strict=True):
        np.testing.assert_allclose(ctr, rs.decode_response(single)[0], rtol=2e-5, atol=1e-6)
        np.testing.assert_allclose(cvr, rs.decode_response(single)[1], rtol=2e-5, atol=1e-6)
    fresh.stop(grace=0)


def test_stats_time_each_batch_s_fetch_and_scoring_inside_the_rank_call(arts, stack):
    svc = _svc(arts["a"], stack["shards"])  # fresh counters
    channel, call = _call(svc.port)
    n = 0
    for _ in range(5):
        for user, cands, adv, hour in CASES:
            ctx = {"advertiser": adv, "hour": hour}
            call(rs.rank_request(candidates=cands, context=ctx, **user))
            n += 1
    stats = svc.stats()
    # One request at a time: one batch each, fetched and scored inside its Rank call,
    # so each call outlasts its batch's fetch and its scoring (and so do the medians).
    assert stats["requests"] == stats["batches"] == n
    assert len(svc._stats.stage_s["fetch"]) == len(svc._stats.stage_s["score"]) == n
    assert 0 < stats["fetch_p50_ms"] <= stats["fetch_p99_ms"]
    assert 0 < stats["score_p50_ms"] <= stats["score_p99_ms"]
    assert stats["rank_p50_ms"] > max(stats["fetch_p50_ms"], stats["score_p50_ms"])
    channel.close()
    svc.stop(grace=0)


def test_fetch_thread_runs_one_batch_ahead_so_requests_queued_meanwhile_merge(arts, stack):
    with pytest.raises(ValueError, match="fetch_ahead"):
        rs.RankerServiceConfig(artifact="unused", fetch_ahead=0)
    user, cands, adv, hour = CASES[0]  # 5 candidates: five requests fit one batch of 64
    req = rs.rank_request(candidates=cands, context={"advertiser": adv, "hour": hour}, **user)
    want = rs.decode_response(stack["mono"].rank(req))
    svc = _svc(arts["a"], fetch_ahead=1, deadline_s=30)
    gate, scored, score = threading.Event(), [], svc._score

    def gated_score(jobs, emb, coarse):  # the compute thread holds the first batch
        scored.append(len(jobs))
        if len(scored) == 1:
            gate.wait(20)
        score(jobs, emb, coarse)

    svc._score = gated_score

    def wait_for(cond):
        end = time.monotonic() + 20
        while not cond():
            assert time.monotonic() < end, "pipeline did not get there"
            time.sleep(0.005)

    with futures.ThreadPoolExecutor(5) as pool:
        outs = [pool.submit(svc.rank, req)]
        wait_for(lambda: scored == [1])  # A is being scored
        outs.append(pool.submit(svc.rank, req))
        wait_for(lambda: svc._compute_q.qsize() == 1)  # B fetched, waits for the scorer
        outs += [pool.submit(svc.rank, req) for _ in range(3)]
        wait_for(lambda: svc._queue.qsize() == 3)
        time.sleep(0.2)  # the fetch thread may not form a batch while B waits
        assert svc._queue.qsize() == 3 and svc._compute_q.qsize() == 1
        gate.set()
        got = [rs.decode_response(f.result(timeout=30)) for f in outs]
    assert scored == [1, 1, 3]
    for ctr, cvr, version in got:
        np.testing.assert_allclose(ctr, want[0], rtol=2e-5, atol=1e-6)
        np.testing.assert_allclose(cvr, want[1], rtol=2e-5, atol=1e-6)
        assert version == want[2]
    assert svc.stats()["batches"] == 3
    svc.stop(grace=0)


def test_bad_inputs_get_their_codes_and_service_keeps_answering(arts, stack):
    ch, call = _call(stack["hybrid"].port)
    ctx = {"advertiser": 1, "hour": 0}
    good = rs.rank_request(candidates=[1, 2], user_row=3, context=ctx)
    bad = {"garbage bytes": b"\xff\xff\xff"}
    malformed = rs.rank_request(candidates=[1], user_row=3, context=ctx)
    malformed.candidate_ids = b"\x01\x02\x03"
    bad["candidate bytes not a multiple of 8"] = malformed
    bad["empty candidates"] = rs.rank_request(candidates=[], user_row=3, context=ctx)
    bad["too many candidates"] = rs.rank_request(candidates=[0] * 49, user_row=3, context=ctx)
    bad["candidate row out of range"] = rs.rank_request(candidates=[40], user_row=3, context=ctx)
    bad["negative candidate"] = rs.rank_request(candidates=[-1], user_row=3, context=ctx)
    bad["user row out of range"] = rs.rank_request(candidates=[1], user_row=50, context=ctx)
    bad["no user"] = rs.rank_request(candidates=[1], context=ctx)
    bad["missing context"] = rs.rank_request(candidates=[1], user_row=3, context={"hour": 0})
    bad["unknown context"] = rs.rank_request(candidates=[1], user_row=3, context={**ctx, "huor": 1})
    bad["context wrong length"] = rs.rank_request(
        candidates=[1, 2, 3], user_row=3, context={"advertiser": [1, 2], "hour": 0}
    )
    bad["advertiser out of range"] = rs.rank_request(
        candidates=[1], user_row=3, context={"advertiser": 7, "hour": 0}
    )
    bad["negative coarse"] = rs.rank_request(
        candidates=[1], user_row=3, context={"advertiser": 1, "hour": -2}
    )
    bad["coarse value past its vocabulary"] = rs.rank_request(  # hour has 3 values
        candidates=[1, 2], user_row=3, context={"advertiser": 1, "hour": [0, 3]}
    )
    bad["coarse value that wraps in int32"] = rs.rank_request(
        candidates=[1], user_row=3, context={"advertiser": 1, "hour": 2**32 + 1}
    )
    for what, req in bad.items():
        with pytest.raises(grpc.RpcError) as e:
            call(req)
        assert e.value.code() == BAD, what
        assert e.value.details(), what
    # Every input it takes, not only the first one missing (a client of its own data
    # learnt them one call at a time).
    with pytest.raises(grpc.RpcError) as e:
        call(bad["missing context"])
    assert e.value.details() == ("context 'advertiser' missing (int64 [C] or [1] expected); "
                                 "the ranker takes ['advertiser', 'hour']")
    wrong = rs.rank_request(candidates=[1], user_row=3, context=ctx, expected_version="0" * 16)
    with pytest.raises(grpc.RpcError) as e:
        call(wrong)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert arts["a"].version in e.value.details()
    pinned = rs.rank_request(
        candidates=[1, 2], user_row=3, context=ctx, expected_version=arts["a"].version
    )
    assert np.array_equal(call(pinned)[0], call(good)[0])
    assert stack["hybrid"].stats()["by_code"]["INVALID_ARGUMENT"] >= len(bad)
    ch.close()


def _random_rank_request(rng, arts_version: str) -> bytes:
    """A Rank request that is usually wrong somewhere: bad bytes, values or fields."""
    kind = int(rng.integers(6))  # 4, 5: only the values and fields may be wrong
    if kind == 0:  # random bytes (most are not a protobuf)
        return rng.bytes(int(rng.integers(0, 64)))
    c = int(rng.integers(0, 52))  # max_candidates is 48
    extreme = np.array([-(2**63), -2, -1, 0, 39, 40, 49, 50, 2**31, 2**63 - 1], np.int64)

    def ints(n, lo, hi):  # in [lo, hi), or now and then one extreme value
        v = rng.integers(lo, hi, n).astype(np.int64)
        if n and rng.random() < 0.2:
            v[rng.integers(n)] = rng.choice(extreme)
        return v

    user = [{"user_row": int(rng.choice(extreme))}, {"user_row": int(rng.integers(50))},
            {"user_raw_id": str(rng.integers(990, 1060))}, {}][int(rng.integers(4))]
    ctx = {"advertiser": ints(c if rng.random() < 0.8 else 1, -1, 7),
           "hour": ints(c if rng.random() < 0.8 else int(rng.integers(3)), 0, 3)}
    if rng.random() < 0.1:
        ctx["huor"] = ints(1, 0, 3)
    if rng.random() < 0.1:
        del ctx["hour"]
    version = ["", "", "", "0" * 16, arts_version][int(rng.integers(5))]
    req = rs.rank_request(candidates=ints(c, 0, 40), context=ctx, expected_version=version, **user)
    if kind == 1:  # a field's bytes cut short
        req.candidate_ids = req.candidate_ids[: int(rng.integers(len(req.candidate_ids) + 1))]
        req.context["advertiser"] = req.context["advertiser"][: int(rng.integers(1, 16))]
    raw = req.SerializeToString()
    if kind == 2 and raw:  # the message cut short
        raw = raw[: int(rng.integers(len(raw)))]
    if kind == 3 and raw:  # a few flipped bytes
        buf = bytearray(raw)
        for at in rng.integers(0, len(buf), 3):
            buf[at] ^= int(rng.integers(1, 256))
        raw = bytes(buf)
    return raw


def test_randomized_malformed_stream_leaves_the_ranker_healthy(arts, stack):
    """2000 mostly malformed Rank calls, 50 in flight at a time: documented codes only."""
    svc = stack["hybrid"]
    ch = grpc.insecure_channel(f"127.0.0.1:{svc.port}")
    stub = ch.unary_unary(rs.RANK_METHOD)
    ctx = {"advertiser": [0, 6, 1, 1, 3], "hour": [0, 1, 2, 2, 1]}
    good = rs.rank_request(candidates=[0, 39, 5, 5, 21], user_row=7, context=ctx)
    before = rs.decode_response(stub(good.SerializeToString(), timeout=10))
    rng = np.random.default_rng(0)
    codes = {}
    for _ in range(40):
        payloads = [_random_rank_request(rng, arts["a"].version) for _ in range(50)]
        futs = [stub.future(p, timeout=10) for p in payloads]
        for p, f in zip(payloads, futs, strict=True):
            try:
                ctr, cvr, version = rs.decode_response(f.result())
                assert version == arts["a"].version
                assert ctr.size == cvr.size == len(pb.RankRequest.FromString(p).candidate_ids) // 8
                assert np.all((ctr > 0) & (ctr < 1) & (cvr > 0) & (cvr < 1))
                code = grpc.StatusCode.OK
            except grpc.RpcError as e:
                code = e.code()
                assert e.details(), code
            codes[code] = codes.get(code, 0) + 1
    allowed = {grpc.StatusCode.OK, BAD, grpc.StatusCode.FAILED_PRECONDITION}
    assert set(codes) <= allowed, codes
    assert codes[BAD] > 800 and codes.get(grpc.StatusCode.OK, 0) > 50, codes
    assert sum(codes.values()) == 2000
    after = rs.decode_response(stub(good.SerializeToString(), timeout=10))
    for x, y in zip(before, after, strict=True):
        np.testing.assert_array_equal(x, y)
    ch.close()


def test_max_concurrent_rpcs_sheds_load_and_shards_that_shed_make_it_unavailable(arts, stack):
    with pytest.raises(ValueError, match="max_concurrent_rpcs"):
        rs.RankerServiceConfig(artifact="unused", max_concurrent_rpcs=0)
    user, cands, adv, hour = CASES[0]
    req = rs.rank_request(candidates=cands, context={"advertiser": adv, "hour": hour}, **user)
    want = rs.decode_response(stack["mono"].rank(req))
    svc = _svc(arts["a"], max_concurrent_rpcs=1, deadline_s=30)
    entered, release = mp_util.hold_first_call(svc, "_score")  # the first batch waits
    ch = grpc.insecure_channel(f"127.0.0.1:{svc.port}")
    stub = ch.unary_unary(rs.RANK_METHOD)
    first = stub.future(req.SerializeToString(), timeout=30)
    assert entered.wait(20)
    with pytest.raises(grpc.RpcError) as e:  # one call in the service: the next is shed
        stub(req.SerializeToString(), timeout=10)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert svc.stats()["in_flight"] == 1
    # Health checks do not count toward the limit: a saturated ranker still says SERVING.
    check = health_pb2_grpc.HealthStub(ch).Check
    status = check(health_pb2.HealthCheckRequest(service=rs.SERVICE_NAME), timeout=5).status
    assert status == health_pb2.HealthCheckResponse.SERVING
    release.set()
    # Back to back: the first call stopped counting when its handler returned.
    for raw in (first.result(), stub(req.SerializeToString(), timeout=10)):
        for got, expected in zip(rs.decode_response(raw), want, strict=True):
            np.testing.assert_array_equal(got, expected)
    ch.close()
    svc.stop(grace=0)

    # A shard that sheds load (and has no replica) makes the call UNAVAILABLE, not INTERNAL.
    (shard,) = _shards(arts["a"], n=1, max_concurrent_rpcs=1)
    hybrid = _svc(arts["a"], [shard], deadline_s=5)
    entered, release = mp_util.hold_first_call(shard, "_handle_lookup")
    sch = grpc.insecure_channel(f"127.0.0.1:{shard.port}")
    lookup = sch.unary_unary(codec.LOOKUP_METHOD)
    held = lookup.future(codec.encode_lookup_request([("pin", np.arange(3))]), timeout=30)
    assert entered.wait(20)
    with pytest.raises(rs.RankError) as e:
        hybrid.rank(req)
    assert e.value.code == grpc.StatusCode.UNAVAILABLE and "RESOURCE_EXHAUSTED" in e.value.message
    release.set()
    held.result()
    for got, expected in zip(rs.decode_response(hybrid.rank(req)), want, strict=True):
        np.testing.assert_array_equal(got, expected)
    sch.close()
    hybrid.stop(grace=0)
    shard.stop(grace=0).wait()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")
def test_tls_shards_and_a_tls_ranker_score_like_plaintext(arts, stack, tmp_path):
    key, cert = mp_util.self_signed_cert(tmp_path)
    with pytest.raises(ValueError, match="together"):
        rs.RankerServiceConfig(artifact="unused", tls_cert=str(cert))
    user, cands, adv, hour = CASES[0]
    req = rs.rank_request(candidates=cands, context={"advertiser": adv, "hour": hour}, **user)
    want = rs.decode_response(stack["mono"].rank(req))
    shards = _shards(arts["a"], tls_cert=str(cert), tls_key=str(key))
    addresses = tuple(f"localhost:{s.port}" for s in shards)
    with pytest.raises(client_lib.ServingError, match="did not answer Info"):  # plaintext
        rs.serve(rs.RankerServiceConfig(artifact=str(arts["a"].path), shards=addresses,
                                        deadline_s=0.5, max_candidates=48,
                                        max_batch_candidates=64, min_bucket=32))
    # A CA file that failed to mount (empty) or is not PEM: refused, never plaintext.
    for content, what in ((b"", "empty"), (b"not a cert\n", "not PEM")):
        bad = tmp_path / "bad_ca.pem"
        bad.write_bytes(content)
        with pytest.raises(ValueError, match=f"shard_ca_cert .*bad_ca.pem: {what}"):
            rs.serve(rs.RankerServiceConfig(
                artifact=str(arts["a"].path), shards=addresses, shard_ca_cert=str(bad),
                deadline_s=0.5, max_candidates=48, max_batch_candidates=64, min_bucket=32))
    with pytest.raises(ValueError, match="root_certificates: empty"):
        grpc_util.channel("localhost:1", root_certificates=b"")
    svc = rs.serve(rs.RankerServiceConfig(
        artifact=str(arts["a"].path), shards=addresses, shard_ca_cert=str(cert), deadline_s=5.0,
        tls_cert=str(cert), tls_key=str(key), max_candidates=48, max_batch_candidates=64,
        min_bucket=32))
    creds = grpc.ssl_channel_credentials(cert.read_bytes())
    with grpc.secure_channel(f"localhost:{svc.port}", creds) as ch:
        got = rs.decode_response(ch.unary_unary(rs.RANK_METHOD)(req.SerializeToString(),
                                                                timeout=10))
    for x, y in zip(got, want, strict=True):
        np.testing.assert_array_equal(x, y)
    with grpc.insecure_channel(f"127.0.0.1:{svc.port}") as ch:  # TLS only
        with pytest.raises(grpc.RpcError) as e:
            ch.unary_unary(rs.RANK_METHOD)(req.SerializeToString(), timeout=2)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    svc.stop(grace=0)
    for s in shards:
        s.stop(grace=0).wait()


def test_health_is_not_serving_while_the_shards_are_down_and_serving_after_restart(arts, stack):
    user, cands, adv, hour = CASES[0]
    req = rs.rank_request(candidates=cands, context={"advertiser": adv, "hour": hour}, **user)
    want = rs.decode_response(stack["mono"].rank(req))
    (shard,) = _shards(arts["a"], n=1)
    port = shard.port
    svc = _svc(arts["a"], [shard], deadline_s=3.0, unhealthy_after=2, probe_every_s=0.05)
    ch = grpc.insecure_channel(f"127.0.0.1:{svc.port}")
    health = health_pb2_grpc.HealthStub(ch)
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING

    def status():
        return health.Check(health_pb2.HealthCheckRequest(service=rs.SERVICE_NAME), timeout=5).status

    assert status() == serving and svc.stats()["health"] == "SERVING"
    svc.rank(req)
    shard.stop(grace=0).wait()
    with pytest.raises(rs.RankError) as e:  # one failed fetch is not enough
        svc.rank(req)
    assert e.value.code == grpc.StatusCode.UNAVAILABLE
    assert status() == serving
    with pytest.raises(rs.RankError):
        svc.rank(req)
    assert status() == not_serving and svc.stats()["health"] == "NOT_SERVING"
    time.sleep(0.3)  # the probe keeps finding the shard down
    assert status() == not_serving
    back = es.serve(
        es.ServerConfig(artifact=str(arts["a"].path), shard=0, num_shards=1, port=port,
                        log_every_s=0)
    )
    end = time.monotonic() + 10  # the probe, not a Rank call, brings it back
    while status() != serving:
        assert time.monotonic() < end, "health did not come back"
        time.sleep(0.02)
    for got, expected in zip(rs.decode_response(svc.rank(req)), want, strict=True):
        np.testing.assert_array_equal(got, expected)
    ch.close()
    svc.stop(grace=0)
    back.stop(grace=0).wait()


def test_cached_rows_are_served_while_the_shards_are_down_but_say_nothing_of_health(arts,
                                                                                  stack):
    """A batch whose rows all hit the cache needs no shard: it is answered during an
    outage, and it neither counts as a failed fetch nor brings health back."""
    (user, cands, adv, hour), other = CASES[0], CASES[2]
    req = rs.rank_request(candidates=cands, context={"advertiser": adv, "hour": hour}, **user)
    req_b = rs.rank_request(candidates=other[1], context={"advertiser": other[2],
                                                          "hour": other[3]}, **other[0])
    want = rs.decode_response(stack["mono"].rank(req))
    (shard,) = _shards(arts["a"], n=1)
    svc = _svc(arts["a"], [shard], deadline_s=3.0, unhealthy_after=2, probe_every_s=0.05,
               cache_rows=1000)
    try:
        svc.rank(req)  # fills the cache
        shard.stop(grace=0).wait()
        for got, expected in zip(rs.decode_response(svc.rank(req)), want, strict=True):
            np.testing.assert_array_equal(got, expected)
        for _ in range(2):  # rows not cached: the outage shows
            with pytest.raises(rs.RankError) as e:
                svc.rank(req_b)
            assert e.value.code == grpc.StatusCode.UNAVAILABLE
        assert svc.stats()["health"] == "NOT_SERVING"
        svc.rank(req)  # all from the cache: still answered, health unchanged
        time.sleep(0.2)  # the probe goes past the cache and still finds the shard down
        assert svc.stats()["health"] == "NOT_SERVING"
    finally:
        svc.stop(grace=0)


def test_dead_shard_is_unavailable_within_deadline_and_refusals_at_start(arts):
    shards = _shards(arts["a"])
    svc = _svc(arts["a"], shards, deadline_s=0.5)
    ch, call = _call(svc.port)
    ctx = {"advertiser": 0, "hour": 0}
    call(rs.rank_request(candidates=[0, 39], user_row=0, context=ctx))
    shards[1].stop(grace=0).wait()
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as e:
        call(
            rs.rank_request(candidates=[0, 39], user_row=0, context=ctx)
        )  # row 39 lives on shard 1
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - t0 < 0.5 + 0.5
    assert "shard 1" in e.value.details()
    ch.close()
    svc.stop(grace=0)
    # The ranker refuses shards that are down or serve another version.
    with pytest.raises(Exception, match="shard 1"):
        _svc(arts["a"], shards, deadline_s=0.5)
    other = _shards(arts["b"])
    with pytest.raises(Exception, match="swap the shards first"):
        _svc(arts["a"], other)
    with pytest.raises(ValueError, match="wire must be one of"):
        _svc(arts["a"], other, wire="int4")
    for s in [shards[0], *other]:
        s.stop(grace=0).wait()


def test_a_loaded_version_is_connected_to_the_shards_before_it_serves(arts, caplog):
    """At start and at a swap, the new version's client makes one fetch (a row of each
    shard) before it serves, so the first Rank call after a swap does not pay for the
    connections and streams (on loopback a fresh client's first lookup took 1-5 ms
    against 0.4 ms); shards that are down hold a load at most 1 s."""
    a, b = arts["a"], arts["b"]
    shards = _shards(a, swap_window_s=30)
    svc = _svc(a, shards, deadline_s=5.0, swap_window_s=30)

    def open_streams(version):
        client = svc._versions.snapshot.versions[version].fetcher
        return [client._streams[f"127.0.0.1:{s.port}"].open_streams for s in shards]

    try:
        assert open_streams(a.version) == [1, 1]
        assert [s.stats()["requests"] for s in shards] == [1, 1]  # before any Rank call
        for s in shards:
            s.swap(str(b.path))
        svc.swap(str(b.path))
        assert open_streams(b.version) == [1, 1]
        assert [s.stats()["requests"] for s in shards] == [2, 2]
        # Shards down (a version loaded without the shard check): the load warns and
        # goes on (within 1 s for shards that hang rather than refuse).
        for s in shards:
            s.stop(grace=0).wait()
        svc.config = dataclasses.replace(svc.config, check_shards=False)
        with caplog.at_level(logging.WARNING, logger="serving.ranker_service"):
            ver = svc._load(str(a.path))
        ver.fetcher.close()
        assert f"version {a.version}: first fetch from the shards failed" in caplog.text
    finally:
        svc.stop(grace=0)
        for s in shards:
            s.stop(grace=0).wait()


def test_swap_under_concurrent_load_fails_no_request(arts):
    a, b = arts["a"], arts["b"]
    shards = _shards(a, swap_window_s=30)
    svc = _svc(a, shards, deadline_s=5.0, swap_window_s=30)
    ch, call = _call(svc.port)
    rng = np.random.default_rng(0)
    cases = []
    for _ in range(6):
        c = int(rng.integers(1, 20))
        cases.append(
            (
                int(rng.integers(0, 50)),
                rng.integers(0, 40, c),
                rng.integers(-1, 7, c),
                rng.integers(0, 3, c),
            )
        )
    expect = {
        art.version: [
            _reference(art, user_row=u, cands=cd, adv=ad, hour=h) for u, cd, ad, h in cases
        ]
        for art in (a, b)
    }
    results, errors = [], []
    stop = threading.Event()

    def client(k):
        i = k
        while not stop.is_set():
            u, cd, ad, h = cases[i % len(cases)]
            req = rs.rank_request(candidates=cd, user_row=u, context={"advertiser": ad, "hour": h})
            sent = time.monotonic()
            try:
                ctr, cvr, version = call(req)
                results.append((i % len(cases), ctr, cvr, version, sent))
            except grpc.RpcError as e:
                errors.append(f"{e.code().name}: {e.details()}")
            i += 1

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    for s in shards:  # the shards first (they keep serving a for the window) ...
        s.swap(str(b.path))
    new = svc.swap(str(b.path))  # ... then the ranker
    t_swap = time.monotonic()
    assert new == b.version and svc.version == b.version
    time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join(30)
    assert errors == []
    seen = {r[3] for r in results}
    assert seen == {a.version, b.version}
    for i, ctr, cvr, version, _ in results:
        np.testing.assert_allclose(ctr, expect[version][i][0], rtol=2e-5, atol=1e-6)
        np.testing.assert_allclose(cvr, expect[version][i][1], rtol=2e-5, atol=1e-6)
    # A request sent after the swap returned is scored on the new version.
    after = [r[3] for r in results if r[4] > t_swap]
    assert after and set(after) == {b.version}
    # The old version stays pinnable during the window; retiring it makes it a precondition failure.
    pinned = rs.rank_request(
        candidates=[1], user_row=0, context={"advertiser": 0, "hour": 0}, expected_version=a.version
    )
    assert call(pinned)[2] == a.version
    assert svc.retire(a.version)
    with pytest.raises(grpc.RpcError) as e:
        call(pinned)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert svc.stats()["by_code"].get("OK", 0) == len(results) + 1
    ch.close()
    svc.stop(grace=0)
    for s in shards:
        s.stop(grace=0).wait()


@pytest.mark.slow  # a fresh process imports JAX: ~5 s
def test_serve_ranker_launch_refuses_a_dead_shard_in_one_line(arts, dead_address):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    dead = dead_address()
    out = subprocess.run(
        [sys.executable, "-m", "launch.serve_ranker", f"--artifact={arts['a'].path}",
         f"--shards={dead}", "--deadline_s=0.5"],
        cwd=root,
        env=dict(os.environ, PYTHONPATH=mp_util.pythonpath(root), JAX_PLATFORMS="cpu"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1 and out.stdout == ""
    assert f"serve_ranker: cannot start: embedding shard 0 ({dead}) did not answer" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.slow  # a fresh process imports JAX and compiles: ~10 s on a busy 2-core box
def test_serve_ranker_launch_prints_port_answers_swaps_on_sighup_and_stops(arts, tmp_path):
    """launch.serve_ranker as a real process: JSON port line, compile cache, Rank, SIGHUP swap,
    SIGTERM stats."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    link = tmp_path / "current"
    os.symlink(arts["a"].path, link)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "launch.serve_ranker",
            f"--artifact={link}",
            "--port=0",
            "--max_candidates=48",
            "--max_batch_candidates=64",
            "--min_bucket=64",
            "--log_every_s=0",
            "--max_concurrent_rpcs=8",
            f"--compilation_cache_dir={tmp_path / 'xla_cache'}",
        ],
        cwd=root,
        env=dict(os.environ, PYTHONPATH=mp_util.pythonpath(root), JAX_PLATFORMS="cpu"),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        info = json.loads(proc.stdout.readline())
        assert info["event"] == "serving" and info["mode"] == "monolithic"
        assert info["version"] == arts["a"].version and info["start_s"] > 0
        # The bucket's programs went to the persistent cache (a restart loads them).
        assert os.listdir(tmp_path / "xla_cache")
        ch, call = _call(info["port"])
        req = rs.rank_request(candidates=[4, 5], user_row=1, context={"advertiser": 2, "hour": 1})
        ctr, cvr, version = call(req)
        ref_ctr, ref_cvr = _reference(arts["a"], user_row=1, cands=[4, 5], adv=2, hour=1)
        np.testing.assert_allclose(ctr, ref_ctr, rtol=2e-5, atol=1e-6)
        assert version == arts["a"].version
        os.remove(link)
        os.symlink(arts["b"].path, link)
        proc.send_signal(signal.SIGHUP)
        assert json.loads(proc.stdout.readline()) == {
            "event": "swapped",
            "version": arts["b"].version,
        }
        assert call(req)[2] == arts["b"].version
        ch.close()
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
        stopped = json.loads(out.strip().splitlines()[-1])
        assert stopped["event"] == "stopped" and stopped["stats"]["by_code"] == {"OK": 2}
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_raw_user_ids_match_only_their_canonical_spelling():
    idx = rs._VocabIndex(np.array([5, 1007, 42, -3], np.int64))
    assert [idx.row(s) for s in ("1007", "5", "42", "-3", "6")] == [1, 0, 2, 3, -1]
    # Other spellings are other (unknown, cold-start) users, not aliases of 1007.
    for alias in ("01007", "+1007", "1_007", "١٠٠٧", "1007.0", "", " "):
        assert idx.row(alias) == -1, alias
    # Whitespace around an id is not part of it, as the data folder and KG reader read
    # ids (" 1007" in an impressions CSV trains user 1007; served, it was a cold start).
    assert [idx.row(s) for s in (" 1007", "1007\n", "\t-3 ")] == [1, 1, 3]
    strs = rs._VocabIndex(np.array(["b", "a", "007"]))
    assert [strs.row(s) for s in ("a", "b", "007", "7", " a", "b\n")] == [1, 0, 2, -1, 1, 0]


def test_a_batch_that_could_exceed_the_shards_id_limit_is_refused_at_start(arts):
    """max_batch_candidates=64 with a user, a candidate and an advertiser row per
    candidate can send one shard 192 ids: shards taking 100 would fail every request
    merged into such a batch, though each alone passes."""
    shards = _shards(arts["a"], n=1, max_ids_per_request=100)
    try:
        addresses = (f"127.0.0.1:{shards[0].port}",)
        cfg = dict(artifact=str(arts["a"].path), shards=addresses, deadline_s=2.0,
                   max_candidates=32, min_bucket=32)
        with pytest.raises(ValueError, match=r"at most 100 ids per request, but a batch of "
                                             r"max_batch_candidates can send it 192"):
            rs.serve(rs.RankerServiceConfig(max_batch_candidates=64, **cfg))
        svc = rs.serve(rs.RankerServiceConfig(max_batch_candidates=32, **cfg))  # 96 ids: fits
        svc.stop(grace=0)
    finally:
        shards[0].stop(grace=0).wait()


def test_shards_that_dropped_the_rankers_version_are_an_outage_not_a_bad_request(arts):
    """Shards swapped to the next artifact and retired the ranker's: UNAVAILABLE (and
    counted toward NOT_SERVING), not FAILED_PRECONDITION, which tells a caller that
    pinned nothing to change its request."""
    (shard,) = _shards(arts["a"], n=1)
    svc = rs.serve(rs.RankerServiceConfig(
        artifact=str(arts["a"].path), shards=(f"127.0.0.1:{shard.port}",), deadline_s=2.0,
        max_candidates=48, max_batch_candidates=64, min_bucket=32, unhealthy_after=1,
        cache_rows=64))
    ch, call = _call(svc.port)
    req = rs.rank_request(candidates=[1, 2], user_row=0, context={"advertiser": 0, "hour": 0})
    try:
        assert call(req)[2] == arts["a"].version
        shard.swap(str(arts["b"].path), window_s=60.0)
        assert shard.retire(arts["a"].version)
        with pytest.raises(grpc.RpcError) as e:  # another user: not in the row cache
            call(rs.rank_request(candidates=[1, 2], user_row=1,
                                 context={"advertiser": 0, "hour": 0}))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "do not serve this ranker's version" in e.value.details()
        assert svc.stats()["health"] == "NOT_SERVING"
        with pytest.raises(rs.RankError) as e:  # a Prefetch is answered as a Rank call
            svc.prefetch(rs.prefetch_request(user_row=5))
        assert e.value.code == grpc.StatusCode.UNAVAILABLE
        # The ranker follows; a caller that pinned the old version must change its
        # request (FAILED_PRECONDITION), Prefetch and Rank alike.
        svc.swap(str(arts["b"].path), window_s=60.0)
        assert svc.prefetch(rs.prefetch_request(user_row=5)).rows_fetched == 1
        for pinned in (
            lambda: svc.prefetch(rs.prefetch_request(user_row=6,
                                                     expected_version=arts["a"].version)),
            lambda: svc.rank(rs.rank_request(candidates=[1, 2], user_row=6,
                                             context={"advertiser": 0, "hour": 0},
                                             expected_version=arts["a"].version)),
        ):
            with pytest.raises(rs.RankError) as e:
                pinned()
            assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        ch.close()
        svc.stop(grace=0)
        shard.stop(grace=0).wait()


@pytest.mark.parametrize("hedge", [None, 0.01, "auto"])
def test_a_shard_given_with_a_replica_fails_over_in_the_ranker(arts, hedge, dead_address):
    """--shards=DEAD|LIVE: the ranker starts (the dead replica is logged) and scores
    through the live one, exactly as monolithic (failover, or hedged fetches)."""
    (shard,) = _shards(arts["a"], n=1)
    dead, dead2 = dead_address(), dead_address()
    cfg = dict(artifact=str(arts["a"].path), deadline_s=2.0, max_candidates=48,
               max_batch_candidates=64, min_bucket=32, hedge_after_s=hedge)
    with pytest.raises(ValueError, match="must be 'host:port' or"):
        rs.RankerServiceConfig(shards=("a|",), **cfg)
    with pytest.raises(ValueError, match="lists an address twice"):
        rs.RankerServiceConfig(shards=("a|b|a",), **cfg)
    for bad in (-1.0, float("inf"), False):  # False: not a 0 ms delay
        with pytest.raises(ValueError, match="hedge_after_s must be None, 'auto' or a finite"):
            rs.RankerServiceConfig(shards=("a",), **{**cfg, "hedge_after_s": bad})
    with pytest.raises(ValueError, match="hedge_budget must be in"):
        rs.RankerServiceConfig(shards=("a",), **{**cfg, "hedge_budget": 2.0})
    with pytest.raises(ValueError, match="hedge_quantile must be in"):
        rs.RankerServiceConfig(shards=("a",), **{**cfg, "hedge_quantile": 0.0})
    with pytest.raises(ValueError, match="hedge_min_s must be a finite"):
        rs.RankerServiceConfig(shards=("a",), **{**cfg, "hedge_min_s": float("nan")})
    if hedge != "auto":  # ignored by a fixed delay: refused
        with pytest.raises(ValueError, match="need hedge_after_s='auto'"):
            rs.RankerServiceConfig(shards=("a",), **{**cfg, "hedge_quantile": 0.9})
    for extra in ({"hedge_after_s": 0.01}, {"cache_rows": 10}):  # monolithic: nothing to do
        with pytest.raises(ValueError, match="need shards"):
            rs.RankerServiceConfig(**{**cfg, **extra})
    svc = rs.serve(rs.RankerServiceConfig(shards=(f"{dead}|127.0.0.1:{shard.port}",), **cfg))
    mono = rs.serve(rs.RankerServiceConfig(**{**cfg, "hedge_after_s": None}))
    ch, call = _call(svc.port)
    ch_m, call_m = _call(mono.port)
    req = rs.rank_request(candidates=[1, 2, 3], user_row=4, context={"advertiser": 1, "hour": 0})
    try:
        for _ in range(3):
            got, want = call(req), call_m(req)
            assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
        stats = svc.stats()
        if hedge is None:
            assert "hedges_sent" not in stats
        else:  # the dead primary fails at once (a handover); at most a hedge per fetch
            assert 0 <= stats["hedges_sent"] <= 3 and stats["hedges_throttled"] == 0
            # The delay per shard: fixed, or "auto" still warming up (3 fetches of 100).
            assert stats["hedge_delay_ms"] == ([10.0] if hedge == 0.01 else [None])
            if hedge == "auto":  # the hedged shard's delay, once it has one, in ms
                est = svc._versions.snapshot.versions[svc.version].fetcher._delays[0]
                for _ in range(100):
                    est.record(0.004)
                assert svc.stats()["hedge_delay_ms"] == [round(est.delay_s * 1e3, 3)]
                assert est.delay_s >= 0.004
                # A swap's new version continues the delay (the same replicas answer).
                nxt = svc._load(str(arts["a"].path))
                try:
                    assert nxt.fetcher._delays[0] is est
                finally:
                    nxt.fetcher.close()
        with pytest.raises(client_lib.ServingError, match="none of its replicas"):
            rs.serve(rs.RankerServiceConfig(shards=(f"{dead}|{dead2}",), **cfg))
    finally:
        ch.close()
        ch_m.close()
        svc.stop(grace=0)
        mono.stop(grace=0)
        shard.stop(grace=0).wait()


def test_the_fetch_gives_up_with_the_requests_not_a_fresh_deadline(arts):
    """A Rank call with a 0.3 s budget against a hung shard: the fetch is cancelled
    near 0.3 s (the batch's own deadline), not after the ranker's deadline_s of 5 s,
    so a hung shard does not hold the fetch thread for every request behind it."""
    cancelled = []
    release = threading.Event()

    def lookup(raw, ctx):
        t0 = time.monotonic()
        while ctx.is_active() and not release.is_set():
            time.sleep(0.01)
        cancelled.append(time.monotonic() - t0)
        ctx.abort(grpc.StatusCode.UNAVAILABLE, "released")

    hung = grpc.server(futures.ThreadPoolExecutor(4))
    hung.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        codec.SERVICE_NAME, {"Lookup": grpc.unary_unary_rpc_method_handler(lookup)}),))
    port = hung.add_insecure_port("127.0.0.1:0")
    hung.start()
    svc = rs.serve(rs.RankerServiceConfig(
        artifact=str(arts["a"].path), shards=(f"127.0.0.1:{port}",), check_shards=False,
        transport="unary", deadline_s=5.0, max_candidates=48, max_batch_candidates=64,
        min_bucket=32))
    req = rs.rank_request(candidates=[1, 2], user_row=0, context={"advertiser": 0, "hour": 0})
    try:
        with pytest.raises(rs.RankError) as e:
            svc.rank(req, timeout_s=0.3)
        assert e.value.code == grpc.StatusCode.UNAVAILABLE
        for _ in range(300):
            if cancelled:
                break
            time.sleep(0.01)
        assert cancelled and cancelled[0] < 2.0, cancelled
    finally:
        release.set()
        svc.stop(grace=0)
        hung.stop(0)


@pytest.mark.parametrize("field, bad", [
    ("deadline_s", float("inf")), ("deadline_s", float("nan")), ("deadline_s", 1e10),
    ("deadline_s", 0.0), ("probe_every_s", float("nan")), ("probe_every_s", 0.0),
    ("batch_wait_s", float("nan")), ("batch_wait_s", float("inf")), ("batch_wait_s", -0.001),
    ("swap_window_s", float("inf")), ("swap_window_s", float("nan")), ("swap_window_s", -1.0),
    ("swap_window_s", True),
])
def test_config_refuses_durations_that_would_wedge_or_crash_the_service(field, bad):
    """inf/1e10 overflowed gRPC deadlines, queue waits and timers (a Rank call without a
    client deadline failed INTERNAL, the fetch or retirement thread died), nan made the
    batcher spin, a negative window or wait acted as 0: all refused when the config is made."""
    sign = ">" if field in ("deadline_s", "probe_every_s") else ">="
    with pytest.raises(ValueError, match=rf"^{field} must be a finite number of seconds {sign} 0 "
                                         r"and at most 86400 \(1 day\), got "):
        rs.RankerServiceConfig(artifact="unused", **{field: bad})
    rs.RankerServiceConfig(artifact="unused", **{field: grpc_util.MAX_SECONDS})  # the bound


@pytest.mark.parametrize("field, bad, message", [
    ("workers", 0, "workers must be >= 1, got 0"),
    ("min_bucket", 0, "min_bucket must be >= 1, got 0"),
    ("unhealthy_after", -1, r"unhealthy_after must be >= 0 \(0: never\), got -1"),
])
def test_config_names_the_bad_count(field, bad, message):
    with pytest.raises(ValueError, match=message):
        rs.RankerServiceConfig(artifact="unused", **{field: bad})


def test_stop_checks_grace_before_stopping_anything(stack):
    """stop(grace=nan/inf/-1) reached gRPC's stop only after the server had begun to
    shut down (health NOT_SERVING): refused first, and both keep serving."""
    hybrid, shard = stack["hybrid"], stack["shards"][0]
    for bad in (float("inf"), float("nan"), -1.0):
        for server in (hybrid, shard):
            with pytest.raises(ValueError, match="grace must be a finite number of seconds >= 0"):
                server.stop(grace=bad)
    ch, rank = _call(hybrid.port)  # through the shards
    ctr, _, version = rank(rs.rank_request(user_row=1, candidates=[2, 3],
                                           context={"advertiser": 0, "hour": 1}))
    assert version == hybrid.version and ctr.shape == (2,)
    ch.close()


def test_swap_checks_its_window_before_loading(stack):
    svc = stack["mono"]
    for bad in (float("inf"), float("nan"), -1.0):
        with pytest.raises(ValueError, match="window_s must be a finite number of seconds"):
            svc.swap("/nonexistent/artifact", window_s=bad)  # not a load error
    assert len(svc.versions) == 1


@pytest.mark.parametrize("kw, message", [
    (dict(user_row=3.9, candidates=[1, 2]), "user_row must be an integer, got float 3.9"),
    (dict(user_row=True, candidates=[1, 2]), "user_row must be an integer, got bool True"),
    (dict(user_row=3, candidates=[1.7, 2.2]),
     r"candidates must be a 1-D integer array, got float64 \(2,\)"),
    (dict(user_row=3, candidates=[[1, 2], [3, 4]]),
     r"candidates must be a 1-D integer array, got int64 \(2, 2\)"),
    (dict(user_row=3, candidates=[True, False]), "candidates must be a 1-D integer array"),
    (dict(user_row=3, candidates=[2**63]),  # uint64: was sent wrapped, as -2**63
     "candidates: 9223372036854775808 does not fit in int64"),
    (dict(user_row=3, candidates=[1], context={"hour": 1.9}),
     r"context\['hour'\] must be an integer or a 1-D integer array, got float64 \(\)"),
    (dict(user_row=3, candidates=[1], context={"advertiser": [[0]]}),
     r"context\['advertiser'\] must be an integer or a 1-D integer array, got int64 \(1, 1\)"),
])
def test_rank_request_refuses_floats_and_shapes_instead_of_truncating(kw, message):
    with pytest.raises(ValueError, match=message):
        rs.rank_request(**kw)
    with pytest.raises(ValueError, match="user_row must be an integer"):
        rs.prefetch_request(user_row=2.5)


def test_rank_request_takes_numpy_integers_and_scalar_context():
    req = rs.rank_request(user_row=np.int32(3), candidates=np.array([4, 5], np.uint16),
                          context={"hour": np.int8(2), "advertiser": [0, 1]})
    assert req.user_row == 3
    np.testing.assert_array_equal(codec.decode_ids(req.candidate_ids), [4, 5])
    np.testing.assert_array_equal(codec.decode_ids(req.context["hour"]), [2])
    np.testing.assert_array_equal(codec.decode_ids(req.context["advertiser"]), [0, 1])
    assert rs.prefetch_request(user_row=np.int64(7)).user_row == 7


def test_a_ranker_started_with_its_shards_waits_for_them_with_wait_for_shards_s(
        arts, dead_address):
    """A ranker refused to start at once when a shard did not answer yet (shards and
    ranker started together, a shard still loading); with wait_for_shards_s it asks
    again until the shard answers, and names the wait when it never does."""
    with socket.socket() as probe:  # a port free now, for a shard that starts later
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    waiting, started = threading.Event(), []

    class Seen(logging.Handler):
        def emit(self, record):
            if "does not answer yet" in record.getMessage():
                waiting.set()

    def start_late():  # once the ranker says it waits
        if waiting.wait(60):
            started.append(es.serve(es.ServerConfig(
                artifact=str(arts["a"].path), port=port, log_every_s=0)))

    seen, logger = Seen(), logging.getLogger("serving")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(seen)
    late = threading.Thread(target=start_late)
    late.start()
    try:
        svc = rs.serve(rs.RankerServiceConfig(
            artifact=str(arts["a"].path), shards=(f"127.0.0.1:{port}",), deadline_s=2.0,
            wait_for_shards_s=60.0, max_candidates=48, max_batch_candidates=64,
            min_bucket=32))
        assert waiting.is_set() and started
        ch, call = _call(svc.port)
        req = rs.rank_request(candidates=[4, 5], user_row=1, context={"advertiser": 2, "hour": 1})
        ctr, _, version = call(req)
        ref_ctr, _ = _reference(arts["a"], user_row=1, cands=[4, 5], adv=2, hour=1)
        np.testing.assert_allclose(ctr, ref_ctr, rtol=2e-5, atol=1e-6)
        assert version == arts["a"].version
        ch.close()
        svc.stop(grace=0)
    finally:
        waiting.set()
        late.join(60)
        logger.removeHandler(seen)
        logger.setLevel(level)
        for s in started:
            s.stop(grace=0).wait()
    dead = dead_address()
    t0 = time.monotonic()
    with pytest.raises(client_lib.ServingError,
                       match=rf"shard 0 \({dead}\) did not answer Info.*after waiting 1 s"):
        rs.serve(rs.RankerServiceConfig(
            artifact=str(arts["a"].path), shards=(dead,), deadline_s=0.5,
            wait_for_shards_s=1.0, max_candidates=48, max_batch_candidates=64, min_bucket=32))
    assert time.monotonic() - t0 >= 1.0


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")
def test_a_tls_mismatch_with_the_shards_is_named_in_flags(arts, tmp_path):
    """A plaintext ranker of TLS shards was refused with gRPC's 'Socket closed', a TLS
    ranker of plaintext shards with 'WRONG_VERSION_NUMBER': neither said which flag."""
    key, cert = mp_util.self_signed_cert(tmp_path)
    (tls,) = _shards(arts["a"], n=1, tls_cert=str(cert), tls_key=str(key))
    (plain,) = _shards(arts["a"], n=1)
    try:
        for shard, ca, hint in [
            (tls, None, "(a TLS shard, serve_embeddings --tls_cert? give --shard_ca_cert)"),
            (plain, str(cert), "(a plaintext shard? --shard_ca_cert talks TLS to the shards)"),
        ]:
            with pytest.raises(client_lib.ServingError) as e:
                rs.serve(rs.RankerServiceConfig(
                    artifact=str(arts["a"].path), shards=(f"127.0.0.1:{shard.port}",),
                    shard_ca_cert=ca, deadline_s=2.0, max_candidates=48,
                    max_batch_candidates=64, min_bucket=32))
            assert "did not answer Info" in str(e.value) and str(e.value).endswith(hint)
    finally:
        tls.stop(grace=0).wait()
        plain.stop(grace=0).wait()


def test_the_serving_log_line_brackets_an_ipv6_host(arts, caplog):
    """It said 'ranker (monolithic) serving version V on ::1:P', no address to paste."""
    if not mp_util.has_ipv6_loopback():
        pytest.skip("no IPv6 loopback here")
    with caplog.at_level(logging.INFO, logger="serving.ranker_service"):
        svc = _svc(arts["a"], host="::1")
    try:
        assert (f"ranker (monolithic) serving version {arts['a'].version} on [::1]:{svc.port}"
                in [r.getMessage() for r in caplog.records])
    finally:
        svc.stop(grace=0)


def test_serve_ranker_logs_stats_on_a_fixed_cadence_through_a_slow_swap(capsys):
    """The stats period counted the 0.2 s polls of serve_ranker's loop, so a SIGHUP swap
    of 2.5 s moved every later stats line 2.3 s later (here: 3.5, 4.5, 5.5 instead of
    one late line and then 3.0, 4.0, 5.0, 6.0)."""
    now = [0.0]
    swap = threading.Event()

    class Stop:  # waits on the fake clock; a SIGHUP at 0.4
        def wait(self, timeout):
            now[0] += timeout
            if round(now[0], 6) == 0.4:
                swap.set()
            return now[0] >= 6.05

    class Service:
        version = "v1"
        stats_at = []

        def swap(self, path):
            now[0] += 2.5
            return "v2"

        def stats(self):
            self.stats_at.append(round(now[0], 6))
            return {"requests": 0}

    # (grpc_util, not launch.serve_ranker: importing a launcher defines its absl flags,
    # which clash with another launcher's imported by a test in the same worker.)
    grpc_util.serve_until_stopped(Service(), artifact="art", stop=Stop(), swap=swap,
                                  log_every_s=1.0, clock=lambda: now[0])
    assert Service.stats_at == [2.9, 3.0, 4.0, 5.0, 6.0]
    assert json.loads(capsys.readouterr().out) == {"event": "swapped", "version": "v2"}


def test_latencies_are_null_until_a_call_or_batch_is_counted(arts):
    """Before any Rank call the stats said rank/fetch/score_p50_ms 0.0."""
    svc = _svc(arts["a"])
    channel, rank = _call(svc.port)
    try:
        stats = svc.stats()
        keys = [f"{stage}_p{q}_ms" for stage in ("rank", "fetch", "score") for q in (50, 99)]
        assert {k: stats[k] for k in keys} == dict.fromkeys(keys)
        rank(rs.rank_request(user_row=1, candidates=[0, 1],
                             context={"advertiser": 0, "hour": 1}))
        stats = svc.stats()
        assert all(isinstance(stats[k], float) and stats[k] > 0 for k in keys), stats
    finally:
        channel.close()
        svc.stop(grace=0)
