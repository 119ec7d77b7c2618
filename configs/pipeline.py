"""End-to-end pipeline: world → contrastive + KG pretraining (fresh and stale) → ranker
ablation over seeds → INT4 export with quality gate → live hybrid serving check → report.

Command (the README's main job):
  python -m launch.run_pipeline --config=configs/pipeline.py --workdir=runs/main
  python -m launch.run_pipeline --config=configs/pipeline.py:smoke --workdir=runs/smoke

Run time on a 2-core box: smoke about 2 minutes (the test suite runs it); default
about 20 minutes (measured 19.5: four pretraining runs 7 min, 7 variants × 3 seeds
of the ranker 11.5 min, the rest about a minute).
Stages whose outputs in WORKDIR are complete and current are skipped, so an
interrupted run resumes where it stopped.

Expected result: WORKDIR/report.md with the ablation table (mean ± std over seeds,
relative AUC gains over the no-large-tables baseline), the INT4 size and quality
deltas, serving latency and plots; WORKDIR/metrics.jsonl with one line per stage.
"""

import ml_collections


def get_config(arg=None):
    """Returns the pipeline config; arg None (default world) or "smoke"."""
    if arg not in (None, "", "smoke"):
        raise ValueError(f"unknown config arg {arg!r}; use nothing or 'smoke'")
    smoke = arg == "smoke"
    suffix = ":smoke" if smoke else ""
    c = ml_collections.ConfigDict()
    # Config files: relative to the folder the pipeline is started from, or, when not
    # there, to the checkout (these defaults); the stages run in that folder.
    c.world_config = "configs/world.py" + suffix
    c.ablation_config = "configs/ablation.py" + suffix
    # Extra `--config.*` overrides passed to run_ablation, space-separated.
    # Smoke: one seed and four of the seven variants, so the whole smoke pipeline stays
    # near 2 minutes. The pipeline is a plumbing check there: the baseline, both facets
    # fine-tuned and frozen, and the stale window still use every pretraining run and
    # facet mode; seeds and the left-out variants (fewer facets) are tested in
    # tests/test_ablation.py and tests/test_ranking_facets.py.
    c.ablation_flags = (
        "--config.seeds=0 --config.variants=no_large_tables,cl_kg,cl_kg_frozen,cl_kg_stale"
        if smoke else ""
    )
    c.export = ml_collections.ConfigDict()
    c.export.variant = "cl_kg"  # which ablation variant's ranker is exported and served
    c.export.seed = 0
    c.export.bits = 4
    c.export.max_auc_drop = 0.001  # the gate: largest allowed test AUC drop of any task
    # Let a drop within this many standard errors of the paired AUC difference pass
    # (0: strict). The smoke world's test set is tiny, so its AUC moves by more than
    # 0.001 from quantization noise alone.
    c.export.auc_noise_z = 2.0 if smoke else 0.0
    c.serving = ml_collections.ConfigDict()
    c.serving.enabled = True
    c.serving.num_shards = 2
    c.serving.num_requests = 20 if smoke else 200
    c.serving.candidates = 100 if smoke else 500
    c.serving.concurrency = 4  # client threads of the throughput phase
    c.serving.deadline_s = 5.0
    c.stage_timeout_s = 3600 * 2
    return c
