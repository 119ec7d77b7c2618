"""The ranker ablation: which ID tables and which pretrained facets help, over seeds.

Variants (`DEFAULT_VARIANTS`), all on the same data, architecture and budget:

  no_large_tables   coarse features only (the baseline)
  scratch           + user/pin/advertiser ID tables trained from scratch
  cl                + the contrastive facet (user, pin), fine-tuned
  kg                + the knowledge-graph facet (user, pin, advertiser), fine-tuned
  cl_kg             + both facets, fine-tuned
  cl_kg_frozen      + both facets, frozen (scratch tables still train)
  cl_kg_stale       + both facets pretrained on the stale window, fine-tuned

Every pretrained variant keeps the scratch table and adds the facets (concatenated),
so "scratch" isolates the effect of ID capacity and the facet rows isolate the
effect of pretraining.

Pretraining runs are shared: each needed (facet, window) pair is pretrained once, by
a caller-supplied `pretrainers[facet](window, out_dir) -> facet_dir` function (the
launch script wires in `jax_recsys.pretrain`), or taken from `facet_dirs`; a facet
dir that already holds a checkpoint is reused, and so are finished ranker runs
(their metrics.json), so an interrupted ablation resumes.

Reported per variant: mean and standard deviation over seeds of the test AUC of CTR
(all impressions), CVR (clicked impressions) and CTCVR (all impressions), and the
relative AUC gain over the no-large-tables baseline of the same seed,

    RelaImpr = (AUC_variant - AUC_base) / (AUC_base - 0.5)

(Yan et al. 2014; the usual "relative AUC gain" of the CTR literature: the share of
the baseline's lift over random that the variant adds), averaged over seeds.

`evaluate_with_tables` is the hook for rows computed after training (e.g. "INT4
served"): it re-scores saved rankers with substituted tables and adds the row.

Dimension legend: R rows of an entity table, D_e entity width.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import pathlib
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from jax_recsys import fsutil, history as history_lib, report
from jax_recsys.ranking import facets as facets_lib, model as model_lib, train as train_lib

TASKS = ("ctr", "cvr", "ctcvr")
BASELINE = "no_large_tables"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Variant:
    """One row of the ablation table.

    Attributes:
      name: short id (folder names, JSON keys).
      label: the row label in ablation.md.
      large_tables: False for the coarse-features-only baseline.
      facets: pretrained facets added to the scratch tables.
      mode: "finetune" or "freeze" for the pretrained facets.
      window: pretraining window of the facets: "fresh" or "stale".
    """

    name: str
    label: str
    large_tables: bool = True
    facets: tuple[str, ...] = ()
    mode: str = "finetune"
    window: str = "fresh"


DEFAULT_VARIANTS = (
    Variant(name=BASELINE, label="no large tables (baseline)", large_tables=False),
    Variant(name="scratch", label="large tables from scratch"),
    Variant(name="cl", label="+ contrastive facet", facets=("cl",)),
    Variant(name="kg", label="+ knowledge-graph facet", facets=("kg",)),
    Variant(name="cl_kg", label="+ both facets (fine-tuned)", facets=("cl", "kg")),
    Variant(name="cl_kg_frozen", label="+ both facets, frozen", facets=("cl", "kg"), mode="freeze"),
    Variant(
        name="cl_kg_stale", label="+ both facets, stale pretraining window", facets=("cl", "kg"),
        window="stale",
    ),
)
VARIANTS = {v.name: v for v in DEFAULT_VARIANTS}


@dataclasses.dataclass(frozen=True, kw_only=True)
class AblationConfig:
    """The ablation.

    Attributes:
      base: data, architecture and optimisation shared by every run; its `entities`
        and `seed` are replaced per variant and seed.
      entities: (entity, impressions column) pairs that get ID tables.
      scratch_dim: width of each entity's scratch facet.
      scratch_init_scale: scratch init stddev (None: 1/sqrt(dim)).
      facet_target_norm: mean row norm the pretrained tables are rescaled to (None: keep).
      facet_learning_rate: row LR of fine-tuned facets (None: base.table_learning_rate *
        base.finetune_lr_scale).
      facet_missing: rows of ids missing from a pretrained facet, "random" or "zeros"
        (`FacetSpec.missing`), in every variant with facets.
      variants: names from `VARIANTS`, in table order (must include the baseline).
      seeds: seeds; each variant runs once per seed.
      facet_dirs: ("cl/fresh", dir) style pairs of existing facet checkpoints.
      save_ranker_variants: variants whose trained rankers are kept (for export and
        `evaluate_with_tables`); other runs keep only their metrics.
    """

    base: train_lib.TrainConfig
    entities: tuple[tuple[str, str], ...] = facets_lib.STANDARD_ENTITIES
    scratch_dim: int = 32
    scratch_init_scale: float | None = None
    facet_target_norm: float | None = 1.0
    facet_learning_rate: float | None = None
    facet_missing: str = "random"
    variants: tuple[str, ...] = tuple(VARIANTS)
    seeds: tuple[int, ...] = (0, 1, 2)
    facet_dirs: tuple[tuple[str, str], ...] = ()
    save_ranker_variants: tuple[str, ...] = ("cl_kg",)

    def __post_init__(self):
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown:
            raise ValueError(f"unknown ablation variants {unknown}; known: {list(VARIANTS)}")
        unknown = [v for v in self.save_ranker_variants if v not in VARIANTS]
        if unknown:  # a misspelt name kept no ranker, found missing only by the export after it
            raise ValueError(f"unknown save_ranker_variants {unknown}; known: {list(VARIANTS)}")
        if BASELINE not in self.variants:
            raise ValueError(f"the variants must include the baseline {BASELINE!r}")
        if not self.seeds:
            raise ValueError("AblationConfig.seeds is empty")
        if min(self.seeds) < 0:  # each run's TrainConfig would refuse it, after the pretraining
            raise ValueError(f"AblationConfig.seeds must be >= 0, got {list(self.seeds)}")
        if len(set(self.seeds)) < len(self.seeds):
            raise ValueError(f"AblationConfig.seeds lists a seed twice: {list(self.seeds)} "
                             "(a repeated seed repeats the same run)")
        if self.facet_missing not in facets_lib.MISSING_ROWS:
            raise ValueError(f"AblationConfig.facet_missing must be one of "
                             f"{facets_lib.MISSING_ROWS}, got {self.facet_missing!r}")


Pretrainer = Callable[[str, pathlib.Path], str | pathlib.Path]


_PRETRAIN_KEY = "pretrain_key.json"


def _read_json(path: pathlib.Path) -> dict | None:
    """``path``'s JSON object, or None when it is missing or cut short (a run stopped
    while writing it, before writes were atomic): that run or facet is not finished."""
    try:
        obj = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


# What the table takes from a finished run's metrics.json: test metrics (a number or
# null each) and, for the coverage lines, the facets' counts.
_TEST_KEYS = tuple(f"{t}_{k}" for t in TASKS for k in ("auc", "ne", "log_loss"))
_FACET_KEYS = ("facet", "entity", "found", "rows", "missing", "facet_rows")


def _run_damage(metrics: Mapping, path: pathlib.Path) -> str | None:
    """Why finished-run ``metrics`` (read from ``path``) cannot be summarized, or None:
    a key the table reads is missing or not a number (e.g. edited, or written by
    another tool with "NaN" strings). Such a run is retrained, not reused."""
    test = metrics.get("test")
    if not isinstance(test, Mapping):
        return f"{path} is damaged: it has no test metrics"
    missing = [k for k in _TEST_KEYS if k not in test]
    if missing:
        return f"{path} is damaged: its test metrics lack {', '.join(missing)}"
    bad = [k for k in _TEST_KEYS if test[k] is not None and (
        isinstance(test[k], bool) or not isinstance(test[k], int | float))]
    if bad:
        return (f"{path} is damaged: its test metrics "
                f"{', '.join(f'{k}={test[k]!r}' for k in bad)} are not numbers")
    facets = metrics.get("facets", [])
    if not (isinstance(facets, list) and all(
            isinstance(f, Mapping) and all(k in f for k in _FACET_KEYS) for f in facets)):
        return f"{path} is damaged: its facets are not a list of facet counts"
    return None


def _write_json(path: pathlib.Path, obj) -> None:
    """Writes ``path`` atomically: a run stopped meanwhile leaves the old file or none."""
    fsutil.write_text_atomic(
        path, json.dumps(obj, indent=2, sort_keys=True, default=train_lib._json_default) + "\n")


def _digest(obj) -> str:
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def old_key_data_paths(data_path: str | pathlib.Path, workdir: str | pathlib.Path) -> list[str]:
    """The data folder paths that keys made until 2026-11-27 in ablation folder
    ``workdir`` may hold (`run_fingerprints`, run_ablation's pretraining keys): this
    run's ``data_path``, and the one the report of the last finished ablation records
    (where the data was then, e.g. before the folder was moved): WORKDIR/ablation.json,
    or its copy WORKDIR/metrics.json (`write_report`), which stays when run_pipeline
    removes ablation.json, the stage's done file, before rerunning the stage."""
    paths = [str(data_path)]
    for name in ("ablation.json", "metrics.json"):
        try:
            result = json.loads((pathlib.Path(workdir) / name).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(result, dict):
            data = result.get("data")
            paths += [data.get("path") if isinstance(data, dict) else None, result.get("data_path")]
    return list(dict.fromkeys(p for p in paths if p and isinstance(p, str)))


def run_fingerprints(tc: train_lib.TrainConfig, *, facets: Mapping[str, str | None], data: str,
                     saved_ranker: bool, data_paths: Sequence[str] = ()) -> list[str]:
    """A finished run's fingerprint, then its older forms still accepted.

    The fingerprint hashes the run's TrainConfig (`train.fingerprint_dict`) without
    ``data.path``, the digests of its facets' facet.json (``facets``), the data
    folder's `folder_digest` (``data``) and whether its ranker is saved. The data is
    identified by its content alone: the same folder moved or copied (with its
    mtimes: ``mv``, ``cp -a``, `shutil.copytree`), or named another way (relative,
    through a link), is the same data, and its runs are reused.

    Until 2026-11-27 the fingerprint held ``data.path`` as given, so a moved folder
    retrained every run. That form is returned for each of ``data_paths`` (this run's
    path and the one the last finished ablation's report records:
    `old_key_data_paths`): a run made under it is the same run, since its data digest
    matches too.
    """
    def digest(train_config: dict) -> str:
        return _digest({"train_config": train_config, "facets": dict(facets), "data": data,
                        "saved_ranker": saved_ranker})

    d = train_lib.fingerprint_dict(tc)
    forms = [digest({**d, "data": {k: v for k, v in d["data"].items() if k != "path"}})]
    for path in data_paths:
        old = dataclasses.replace(tc, data=dataclasses.replace(tc.data, path=path))
        forms.append(digest(train_lib.fingerprint_dict(old)))
    return list(dict.fromkeys(forms))


def folder_digest(path: str | pathlib.Path) -> str:
    """Digest of a data folder: its dataset.json bytes and every file's (path, size,
    mtime): a regenerated or edited table changes it; reading does not.

    Files in linked folders count too (a table folder that is a symlink: repointing
    the link changes the digest). File bytes are not read: two folders whose files
    have the same names, sizes and mtimes (a copy that keeps mtimes) count as the same
    data, which is how a moved or copied dataset keeps its runs (`run_fingerprints`).
    """
    root = pathlib.Path(path)
    h = hashlib.sha256((fsutil.file_digest(root / "dataset.json") or "missing").encode())
    if root.is_dir():
        files, seen = [], set()
        for top, dirs, names in os.walk(root, followlinks=True):
            real = os.path.realpath(top)
            if real in seen:  # a link back up the tree
                dirs[:] = []
                continue
            seen.add(real)
            files += [q for q in (pathlib.Path(top) / n for n in names) if q.is_file()]
        for f in sorted(files):
            st = f.stat()
            h.update(f"\0{f.relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def obtain_facets(
    config: AblationConfig,
    workdir: pathlib.Path,
    *,
    pretrainers: Mapping[str, Pretrainer],
    log: Callable[[str], None] = print,
    pretrain_keys: Mapping[str, Callable[[str], str | Sequence[str]]] | None = None,
    fresh: bool = False,
) -> tuple[dict[tuple[str, str], Any], dict[str, Any]]:
    """Loads (pretraining first if needed) every (facet, window) the variants use.

    Args:
      config: the ablation config.
      workdir: the ablation folder; pretraining goes to WORKDIR/pretrain/<facet>_<window>.
      pretrainers: facet -> fn(window, out_dir) returning the facet checkpoint dir.
      log: progress printer.
      pretrain_keys: facet -> fn(window) -> a key of everything the pretraining
        depends on (command, configs, data), or a sequence of keys: the first is the
        current one (recorded with a new pretraining), the others older forms of the
        same key that are still accepted (a facet reused under one of them gets the
        current key). A facet in WORKDIR/pretrain is reused only when it was made
        under one of them; without a key function any finished facet there is reused.
      fresh: pretrain again even when a finished facet with the same key exists.

    Returns:
      ({(facet, window): loaded Facet}, {"facet/window": {"path", "seconds", "metrics"}}).
    """
    from jax_recsys import checkpoint

    given = dict(config.facet_dirs)
    needed = []
    for name in config.variants:
        v = VARIANTS[name]
        for f in v.facets:
            if (f, v.window) not in needed:
                needed.append((f, v.window))
    loaded, info = {}, {}
    for facet, window in needed:
        key = f"{facet}/{window}"
        t0 = time.time()
        if key in given and given[key]:
            path = pathlib.Path(given[key])
        else:
            out = workdir / "pretrain" / f"{facet}_{window}"
            path = out / f"facet_{facet}"
            want = (pretrain_keys or {}).get(facet)
            want = want(window) if want is not None else None
            accepted = [want] if want is None or isinstance(want, str) else list(want)
            want = accepted[0]
            have = (_read_json(out / _PRETRAIN_KEY) or {}).get("key")
            done = (path / "facet.json").exists()
            if done and not fresh and (want is None or have in accepted):
                log(f"ablation: reusing pretrained {key} at {path}")
                if want is not None and have != want:  # made under an older form of the key
                    _write_json(out / _PRETRAIN_KEY, {"key": want})
            elif facet in pretrainers:
                why = ("--fresh" if fresh else "its settings or data changed") if done else "none yet"
                log(f"ablation: pretraining {key} into {out} ({why})")
                (out / _PRETRAIN_KEY).unlink(missing_ok=True)
                history_lib.clear_run_history(out)  # the report must not draw the old curves
                path = pathlib.Path(pretrainers[facet](window, out))
                if want is not None:
                    out.mkdir(parents=True, exist_ok=True)
                    _write_json(out / _PRETRAIN_KEY, {"key": want})
            elif done:
                raise ValueError(
                    f"pretrained {key} at {path} was made with other settings or data (or "
                    f"--fresh was asked) and there is no pretrainer for {facet!r} to redo it"
                )
            else:
                raise ValueError(
                    f"variant needs facet {key!r}: give facet_dirs[{key!r}] or a pretrainer for {facet!r}"
                )
        loaded[(facet, window)] = checkpoint.load_facet(path, expected=facet)
        info[key] = {
            "path": str(path),
            "seconds": time.time() - t0,
            "metrics": _scalars(loaded[(facet, window)].metrics),
        }
    return loaded, info


def _scalars(d: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in (d or {}).items() if isinstance(v, int | float | str | bool)}


def _variant_config(config: AblationConfig, variant: Variant, seed: int, loaded) -> train_lib.TrainConfig:
    if variant.large_tables:
        available = {f: list(loaded[(f, variant.window)].tables) for f in variant.facets}
        entities = facets_lib.build_entities(
            entities=config.entities,
            scratch_dim=config.scratch_dim,
            pretrained=variant.facets,
            mode=variant.mode,
            available=available,
            learning_rate=config.facet_learning_rate,
            target_norm=config.facet_target_norm,
            scratch_init_scale=config.scratch_init_scale,
            missing=config.facet_missing,
        )
    else:
        entities = ()
    return dataclasses.replace(config.base, entities=entities, seed=seed, facet_paths=())


def run_ablation(
    config: AblationConfig,
    workdir: str | pathlib.Path,
    *,
    pretrainers: Mapping[str, Pretrainer] | None = None,
    log: Callable[[str], None] = print,
    pretrain_keys: Mapping[str, Callable[[str], str | Sequence[str]]] | None = None,
    fresh: bool = False,
) -> dict[str, Any]:
    """Runs every variant for every seed and writes ablation.json / ablation.md.

    A finished run (runs/<variant>_s<seed>/metrics.json) is reused only when its
    fingerprint matches (`run_fingerprints`): the run's full TrainConfig
    (`train.fingerprint_dict`) but for the data folder's path, the content of its
    facets' facet.json, and the data folder's content (`folder_digest`: dataset.json
    and every file's size and mtime), so a moved ablation or data folder keeps its
    runs. A run made with other settings or data is retrained (and logged as such),
    never silently reused.

    Args:
      config: the ablation config.
      workdir: output folder: pretrain/, runs/<variant>_s<seed>/ (metrics.json, and
        ranker/ for `save_ranker_variants`), ablation.json, ablation.md.
      pretrainers: facet -> fn(window, out_dir) -> facet dir, for facets not in
        `config.facet_dirs`.
      log: progress printer.
      pretrain_keys: see `obtain_facets`.
      fresh: retrain every run and pretrain every facet, reusing nothing.

    Returns:
      The ablation.json content.
    """
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    loaded, pretrain_info = obtain_facets(
        config, workdir, pretrainers=pretrainers or {}, log=log, pretrain_keys=pretrain_keys,
        fresh=fresh,
    )
    facet_digests = {k: fsutil.file_digest(pathlib.Path(v["path"]) / "facet.json")
                     for k, v in pretrain_info.items()}
    data_digest = folder_digest(config.base.data.path)
    old_paths = old_key_data_paths(config.base.data.path, workdir)
    id_columns = tuple(dict.fromkeys(c for _, c in config.entities))
    data = train_lib.prepare_data(config.base.data, id_columns=id_columns)
    runs: dict[str, dict[int, dict]] = {}
    facet_stats: dict[str, list] = {}
    for name in config.variants:
        variant = VARIANTS[name]
        runs[name] = {}
        for seed in config.seeds:
            rdir = workdir / "runs" / f"{name}_s{seed}"
            mpath = rdir / "metrics.json"
            tc = _variant_config(config, variant, seed, loaded)
            accepted = run_fingerprints(
                tc, facets={f"{f}/{variant.window}": facet_digests[f"{f}/{variant.window}"]
                            for f in variant.facets},
                data=data_digest, saved_ranker=name in config.save_ranker_variants,
                data_paths=old_paths)
            fingerprint = accepted[0]
            old = _read_json(mpath)
            damaged = (f"{mpath} is cut short or not a JSON object" if old is None
                       else _run_damage(old, mpath))
            if old is not None and not fresh and old.get("fingerprint") in accepted \
                    and damaged is None:
                res = old
                log(f"ablation: reusing {rdir}")
                if old["fingerprint"] != fingerprint:  # the older form, with the data's path
                    res = {**old, "fingerprint": fingerprint}
                    _write_json(mpath, res)
            else:
                why = (" (--fresh)" if fresh else
                       f" ({damaged}; retrained)" if damaged and mpath.exists() else
                       "" if old is None else " (the finished run had other settings or data)")
                log(f"ablation: {variant.label} (seed {seed}){why}")
                mpath.unlink(missing_ok=True)
                shutil.rmtree(rdir / "ranker", ignore_errors=True)  # never an old run's ranker
                history_lib.clear_run_history(rdir)  # nor its training curves
                facets = {f: loaded[(f, variant.window)] for f in variant.facets}
                res = train_lib.train_and_evaluate(tc, None, data=data, facets=facets, log=log)
                ranker = res.pop("ranker")
                rdir.mkdir(parents=True, exist_ok=True)
                if name in config.save_ranker_variants:
                    model_lib.save_ranker(rdir / "ranker", ranker)
                res["fingerprint"] = fingerprint
                _write_json(mpath, res)
            runs[name][seed] = res["test"]
            if seed == config.seeds[0]:
                facet_stats[name] = res.get("facets", [])
    result = {
        "relative_gain": "RelaImpr = (AUC - AUC_base) / (AUC_base - 0.5), per seed against the "
        "no-large-tables run of the same seed, then mean and std over seeds",
        "seeds": list(config.seeds),
        "data_path": str(config.base.data.path),
        "data": dataclasses.asdict(config.base.data),
        "windows": {k: list(v) for k, v in data.windows.items()},
        "pretraining": pretrain_info,
        "facet_coverage": facet_stats,
        "facet_missing": config.facet_missing,
        "variants": {},
        "order": list(config.variants),
        "seconds": time.time() - t0,
    }
    for name in config.variants:
        result["variants"][name] = summarize_variant(
            label=VARIANTS[name].label, per_seed=runs[name], baseline=runs[BASELINE]
        )
    write_report(workdir, result)
    return result


def _mean_std(xs: Sequence[float]) -> tuple[float, float, int]:
    """Mean, sample std and count of the values of ``xs`` that are not None or NaN."""
    a = np.asarray([x for x in xs if x is not None and not math.isnan(x)], np.float64)
    if a.size == 0:
        return float("nan"), float("nan"), 0
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0, int(a.size)


def summarize_variant(
    *, label: str, per_seed: Mapping[int, Mapping[str, float]], baseline: Mapping[int, Mapping[str, float]]
) -> dict[str, Any]:
    """Mean/std over seeds of each task's AUC, log loss, NE and RelaImpr vs the baseline.

    Args:
      label: row label.
      per_seed: seed -> test metrics (`train.evaluate_predictions` keys) of the variant.
      baseline: seed -> test metrics of the no-large-tables baseline.

    Returns:
      {"label", "per_seed", and per task "<task>_auc_mean"/"_std"/"_n",
      "<task>_relaimpr_mean"/"_std"/"_n", "<task>_ne_mean", "<task>_log_loss_mean"}.
      "_n" counts the seeds the mean is over: the seeds with a value (an AUC of a test
      set with one class, or a RelaImpr whose baseline is near random, is NaN; a seed
      without a baseline run has no RelaImpr), which may be fewer than were run.
    """
    out: dict[str, Any] = {"label": label, "per_seed": {str(s): dict(m) for s, m in per_seed.items()}}
    for task in TASKS:
        aucs = [m[f"{task}_auc"] for m in per_seed.values()]
        out[f"{task}_auc_mean"], out[f"{task}_auc_std"], out[f"{task}_auc_n"] = _mean_std(aucs)
        gains = []
        for s, m in per_seed.items():
            b = baseline.get(s) or baseline.get(str(s))
            if b is None:
                continue
            gains.append(relaimpr(m[f"{task}_auc"], b[f"{task}_auc"]))
        (out[f"{task}_relaimpr_mean"], out[f"{task}_relaimpr_std"],
         out[f"{task}_relaimpr_n"]) = _mean_std(gains)
        out[f"{task}_ne_mean"] = _mean_std([m[f"{task}_ne"] for m in per_seed.values()])[0]
        out[f"{task}_log_loss_mean"] = _mean_std([m[f"{task}_log_loss"] for m in per_seed.values()])[0]
    return out


RELAIMPR_MIN_BASE_MARGIN = 0.01


def relaimpr(auc: float, auc_base: float) -> float:
    """Relative AUC gain (AUC - AUC_base) / (AUC_base - 0.5).

    NaN (reported as n/a) when the baseline is within `RELAIMPR_MIN_BASE_MARGIN` of a
    random ranker: the ratio is then dominated by noise in the denominator (e.g. the
    smoke world's CVR test set, a few dozen conversions).
    """
    if auc_base is None or auc is None or auc_base < 0.5 + RELAIMPR_MIN_BASE_MARGIN:
        return float("nan")
    return (auc - auc_base) / (auc_base - 0.5)


def _fmt(mean: float, std: float, pct: bool = False) -> str:
    if math.isnan(mean):
        return "n/a"
    if pct:
        return f"{100 * mean:+.1f}% ± {100 * std:.1f}"
    return f"{mean:.4f} ± {std:.4f}"


def render_markdown(result: Mapping[str, Any]) -> str:
    """The ablation table as Markdown."""
    lines = [
        "# Ranker ablation",
        "",
        f"Seeds: {result['seeds']}. Test window: days {result['windows'].get('test')}. "
        "AUC: mean ± std over seeds. Gain: relative AUC gain over the no-large-tables "
        "baseline, RelaImpr = (AUC − AUC_base) / (AUC_base − 0.5), per seed, mean ± std. "
        "CVR AUC is on clicked impressions (pCVR vs conversion); CTCVR AUC is on all "
        "impressions (pCTR·pCVR vs click∧conversion).",
        "",
        "| variant | CTR AUC | CTR gain | CVR AUC | CVR gain | CTCVR AUC | CTCVR gain |",
        "|---|---|---|---|---|---|---|",
    ]
    fewer = False
    for name in result["order"]:
        r = result["variants"][name]
        cells = [r["label"]]
        for task in TASKS:
            # A mean over fewer seeds than were run (NaN values left out) says so.
            notes = [report.seeds_note(r.get(f"{task}_{m}_n"), len(result["seeds"]))
                     for m in ("auc", "relaimpr")]
            fewer = fewer or any(notes)
            cells.append(_fmt(r[f"{task}_auc_mean"], r[f"{task}_auc_std"]) + notes[0])
            if name == BASELINE:
                cells.append("—")
            else:
                cells.append(_fmt(r[f"{task}_relaimpr_mean"], r[f"{task}_relaimpr_std"], pct=True)
                             + notes[1])
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if fewer:
        lines += [report.FEWER_SEEDS_NOTE, ""]
    cov = result.get("facet_coverage") or {}
    # Rows of ids a facet lacks: fresh random ones, or zeros (AblationConfig.facet_missing).
    fresh = "zero" if result.get("facet_missing") == "zeros" else "fresh"
    seen = set()
    cov_lines = []
    for name in result["order"]:
        window = VARIANTS[name].window if name in VARIANTS else "?"
        for s in cov.get(name, []):
            key = (s["facet"], window, s["entity"])
            if key in seen:
                continue
            seen.add(key)
            cov_lines.append(
                f"- {s['facet']}/{s['entity']} ({window} window): {s['found']} of {s['rows']} ranker "
                f"ids found, {s['missing']} {fresh} rows; facet table {s['facet_rows']} rows"
            )
    if cov_lines:
        lines += ["Pretrained ids found in the ranker's vocabulary (first seed):", "", *cov_lines, ""]
    pre = result.get("pretraining") or {}
    if pre:
        lines += ["Pretraining runs (shared across variants):", ""]
        for key, p in pre.items():
            lines.append(f"- {key}: {p['path']} ({p['seconds']:.0f} s)")
        lines.append("")
    lines.append(f"Total time: {result.get('seconds', float('nan')):.0f} s.")
    return "\n".join(lines) + "\n"


def write_report(workdir: str | pathlib.Path, result: Mapping[str, Any]) -> None:
    """Writes ablation.json, ablation.md and metrics.json into `workdir`."""
    workdir = pathlib.Path(workdir)
    # Atomic: the export rewrites ablation.json (its INT4 row) after the ablation stage
    # has finished; cut short, it would stop every later export.
    _write_json(workdir / "ablation.json", result)
    _write_json(workdir / "metrics.json", result)
    fsutil.write_text_atomic(workdir / "ablation.md", render_markdown(result))


def evaluate_with_tables(
    workdir: str | pathlib.Path,
    *,
    transform: Callable[[model_lib.TrainedRanker], Mapping[str, np.ndarray]],
    name: str,
    label: str,
    source_variant: str = "cl_kg",
    data_path: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Adds a row computed from saved rankers with substituted tables (e.g. INT4 served).

    For every seed of `source_variant` whose ranker was saved, the ranker is re-scored
    on the test window with `transform(ranker)` as its tables; the row is added to
    ablation.json/ablation.md (after the existing rows).

    Args:
      workdir: a finished ablation folder.
      transform: ranker -> {entity: [R, D_e] table} to evaluate with (e.g. quantize and
        dequantize each of `ranker.tables`).
      name: the new row's id.
      label: the new row's label.
      source_variant: the variant whose rankers are re-scored.
      data_path: dataset folder (None: the one recorded in the first run's config).
      extra: entries added to the row as they are (e.g. {"bits": 8}).

    Returns:
      The new row's summary (with `extra`).
    """
    workdir = pathlib.Path(workdir)
    result = json.loads((workdir / "ablation.json").read_text())
    per_seed: dict[int, dict] = {}
    data = None
    for seed in result["seeds"]:
        rdir = workdir / "runs" / f"{source_variant}_s{seed}" / "ranker"
        if not rdir.exists():
            continue
        ranker = model_lib.load_ranker(rdir)
        if data is None:
            recorded = dict(result.get("data") or {"path": result.get("data_path")})
            if data_path:
                recorded["path"] = data_path
            if not recorded.get("path"):
                raise ValueError("evaluate_with_tables: pass data_path (not recorded in ablation.json)")
            if not data_path and not pathlib.Path(recorded["path"]).is_dir():
                raise ValueError(
                    f"the dataset {workdir / 'ablation.json'} records, {recorded['path']}, is "
                    "gone (moved?): pass its folder as data_path (export_int4 --data=DATASET)"
                )
            for k, v in recorded.items():
                if isinstance(v, list):
                    recorded[k] = tuple(v)
            dcfg = dataclasses.replace(train_lib.DataConfig(**recorded), valid_window="")
            cols = tuple(ranker.entity_columns[e] for e in ranker.entity_columns)
            data = train_lib.prepare_data(dcfg, id_columns=cols)
        if not all(np.array_equal(np.asarray(data.vocabs[ranker.entity_columns[e]]), np.asarray(v))
                   for e, v in ranker.vocabs.items()):
            raise ValueError(f"{rdir}: vocabulary differs from the data's; wrong data_path?")
        per_seed[seed] = train_lib.evaluate_ranker(ranker, data.splits["test"], tables=transform(ranker))
    if not per_seed:
        raise ValueError(f"no saved rankers of variant {source_variant!r} under {workdir / 'runs'}")
    base = {int(k): v for k, v in result["variants"][BASELINE]["per_seed"].items()}
    row = {**summarize_variant(label=label, per_seed=per_seed, baseline=base), **(extra or {})}
    result["variants"][name] = row
    if name not in result["order"]:
        result["order"].append(name)
    write_report(workdir, result)
    return row
