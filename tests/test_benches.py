"""Every other launch.bench_* at smoke size, as a real process: it runs and its lines make sense.

The benchmarks are how speed and memory targets are checked (README, closing
notes), so CI runs each once, tiny. Timings are not asserted (shared, noisy
machines); which lines come out, and the values that do not depend on timing,
are. ``bench_serving`` has its own test (test_bench_serving.py).
"""

import mp_util
import pytest


def _ids(lines: list[dict], *keys: str) -> list[tuple]:
    return sorted(tuple(str(x.get(k, "")) for k in ("bench", *keys)) for x in lines)


pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


def test_bench_embedding_smoke():
    lines = mp_util.json_lines(
        "launch.bench_embedding",
        ["--rows=1e4", "--devices=2", "--steps=2", "--warmup=1", "--batch=256"],
    )
    assert _ids(lines, "kind", "devices") == sorted(
        [("embedding", k, "2") for k in ("sparse", "dense", "ratios")]
        + [("embedding", "opt_state_bytes_per_row", "")]
    )
    for x in lines:
        if x["kind"] in ("sparse", "dense"):
            assert x["rows"] == 10_000 and x["batch"] == 256 and x["step_ms"] > 0
    # One size: no large-over-small ratio, and no target named for 1e5 / 4e6 rows.
    (ratios,) = [x for x in lines if x["kind"] == "ratios"]
    assert not any("4m" in k or "100k" in k or "large_over_small" in k for k in ratios)
    assert ratios["dense_over_sparse_large"] > 0


def test_bench_kg_smoke():
    lines = mp_util.json_lines(
        "launch.bench_kg",
        ["--steps=3", "--entities=500", "--triples=3000", "--relations=10", "--dim=16",
         "--mrr_epochs=1", "--devices=1", "--models=rotate"],
    )
    assert _ids(lines, "model") == [("kg_eval", "distmult"), ("kg_train", "rotate")]
    (ev,) = [x for x in lines if x["bench"] == "kg_eval"]
    assert ev["num_entities"] == 500 and ev["ranked_queries"] == 2 * ev["num_test_triples"]
    assert 0 < ev["test_mrr"] <= 1 and 0 <= ev["test_hits@1"] <= ev["test_hits@10"] <= 1


def test_bench_contrastive_smoke():
    lines = mp_util.json_lines(
        "launch.bench_contrastive",
        ["--rows=2000", "--batch_size=64", "--steps=2", "--eval_pins=500",
         "--eval_queries=100", "--devices=1", "--eval_devices=1"],
    )
    assert _ids(lines) == [("contrastive_eval",), ("contrastive_train",)]
    train = next(x for x in lines if x["bench"] == "contrastive_train")
    assert train["batch"] == 64 and train["examples_per_sec"] > 0 and train["loss"] > 0
    ev = next(x for x in lines if x["bench"] == "contrastive_eval")
    assert ev["pins"] == 500 and ev["queries"] == 100 and ev["queries_per_sec"] > 0


def test_bench_quant_smoke():
    lines = mp_util.json_lines("launch.bench_quant", ["--rows=20000"])
    assert _ids(lines, "kind", "impl") == [
        ("quant", "check", ""), ("quant", "gather_dequant", "jax"),
        ("quant", "gather_dequant", "numpy"), ("quant", "gather_dequant", "numpy_fp32_gather"),
        ("quant", "quantize", ""), ("quant", "size", ""),
    ]
    size = next(x for x in lines if x["kind"] == "size")
    # INT4 row of dim 64: 32 bytes of codes + fp16 scale and bias = 36 of 256 fp32 bytes.
    assert size["bytes_per_row"] == 36 and size["ratio_vs_fp32"] == pytest.approx(36 / 256, 1e-4)
    check = next(x for x in lines if x["kind"] == "check")
    assert check["jax_equals_numpy"] is True and check["max_err_over_half_step"] <= 1.0


def test_bench_data_smoke():
    lines = mp_util.json_lines("launch.bench_data", ["--configs=smoke"])
    assert _ids(lines) == [("batch_iterator",), ("vocab_build_lookup",), ("world_generation",)]
    gen = next(x for x in lines if x["bench"] == "world_generation")
    assert gen["config"] == "smoke" and gen["events"] > 0


def test_bench_scorer_smoke():
    lines = mp_util.json_lines("launch.bench_scorer", ["--padded=64,128", "--iters=5", "--warmup=2"])
    assert [x["padded"] for x in lines] == [64, 128]
    for x in lines:
        assert x["device"].startswith("cpu") and x["highest_ms"] > 0
        # On CPU XLA's default float32 matmul is full precision: the same scores.
        assert x["max_rel_diff_ctr"] == 0.0 and x["max_rel_diff_cvr"] == 0.0
        # One array per entity in and per output out scores as the packed service does.
        assert x["unpacked_ms"] > 0 and x["unpacked_max_rel_diff"] <= 1e-6


def test_bench_scorer_on_an_artifact_ranker_without_coarse_features(tmp_path):
    import numpy as np

    from jax_recsys.quant import artifact
    from jax_recsys.ranking import model as model_lib

    config = model_lib.RankerConfig(entity_dims=(("user", 8), ("pin", 8)), coarse_vocab_sizes=())
    _, params = model_lib.init_dense(config, seed=0)
    rng = np.random.default_rng(0)
    artifact.write_artifact(
        str(tmp_path / "art"),
        tables={t: rng.normal(size=(10, 8)).astype(np.float32) for t in ("user", "pin")},
        vocabs={t: np.arange(10, dtype=np.int64) for t in ("user", "pin")},
        bits=4,
        ranker_config=config.to_dict(),
        ranker_params=model_lib.flatten_params(params),
    )
    args = [f"--artifact={tmp_path / 'art'}", "--padded=64", "--iters=3", "--warmup=1"]
    (x,) = mp_util.json_lines("launch.bench_scorer", args)
    # No coarse ids: the service's scorer gets an int32 [P, 0] array and scores as unpacked.
    assert x["padded"] == 64 and x["unpacked_max_rel_diff"] <= 1e-6


def test_bench_data_iterator_reads_empty_label_cells_as_nan(tmp_path):
    """The iterator bench reads the impressions table as the ranker's training does: an
    empty click/conversion cell of a text table is a label not known yet (NaN), not an
    error. In a child: importing launch.bench_data here would define its flags beside
    other benches' (--workdir)."""
    import json

    ids = "user_id,item_id,advertiser_id,pin_category,hour,device,country,position"
    (tmp_path / "impressions.csv").write_text(
        f"{ids},click,conversion,day\n"
        "1,10,5,0,1,0,0,0,1,0,0\n2,11,5,1,2,1,0,1,,,0\n3,12,6,2,3,0,1,2,0,,1\n")
    (tmp_path / "dataset.json").write_text(json.dumps({
        "format_version": 1, "name": "csv", "tables": {"impressions": {"path": "impressions.csv"}},
        "splits": {"ranker_train": [0, 1]}}))
    cols = mp_util.child_columns(
        "from launch import bench_data\ncols = bench_data._iterator_columns(sys.argv[1], 1)",
        str(tmp_path))
    # Fewer than 4 batches of 1 in ranker_train: every row, day dropped.
    assert cols["click"] == [1.0, None, 0.0] and cols["conversion"] == [0.0, None, None]
    assert cols["user_id"] == [1, 2, 3] and "day" not in cols


def test_bench_data_checks_its_flags_before_any_world(tmp_path):
    """One 'bench_data: error:' line before any world is written (a bad --configs or
    --days was a traceback of the world's child process, after the worlds before it)."""
    import subprocess
    import sys

    for arg, message in (
        ("--configs=smoke,huge",
         "--configs: unknown world scale 'huge' (want smoke, default or large)"),
        ("--days=3", "--days must list integers >= 5, got ['3']"),
        ("--days=abc", "--days must list integers, got ['abc']"),
        ("--batch_size=0", "--batch_size must be >= 1, got 0"),
        ("--iterator_batches=0", "--iterator_batches must be >= 1, got 0"),
        ("--vocab_ids=-1", "--vocab_ids must be >= 0, got -1"),
    ):
        out = subprocess.run(
            [sys.executable, "-m", "launch.bench_data", "--configs=smoke",
             f"--workdir={tmp_path}", arg],
            cwd=mp_util.REPO, env=mp_util.child_env(1, {"JAX_RECSYS_TRACEBACK": ""}),
            capture_output=True, text=True, timeout=120)
        assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
        assert out.stderr.strip().splitlines()[-1] == f"bench_data: error: {message}", arg
        assert not any(tmp_path.iterdir()), arg  # no world generated
