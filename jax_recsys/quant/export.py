"""INT4 export: a trained ranker -> a versioned serving artifact, behind a quality gate.

`export_ranker(config)` is the whole job behind `launch/export_int4.py`:

1. loads the trained ranker (`jax_recsys.ranking.model.load_ranker`: one float32
   table per entity with its facets concatenated, vocabularies, dense params,
   `RankerConfig`), tables memory-mapped;
2. quantizes every table row-wise (`jax_recsys.quant.rowwise.quantize_table_chunked`,
   chunk by chunk, float16 scale/bias) into a hidden staging folder next to the output,
   so memory stays bounded by the chunk, not the table;
3. scores the ranker's test window twice (`train.predict` + `train.evaluate_predictions`,
   i.e. `train.evaluate_ranker`): with the full-precision tables and with the *staged*
   quantized tables, dequantized row by row on gather (`DequantizedTable`) -- exactly
   the bytes that will be served -- and computes per task the standard error of the
   paired AUC difference (DeLong; `paired_auc_delta`);
4. the quality gate: if the test AUC of any task (CTR, CVR, CTCVR) drops by more than
   `max_auc_drop`, the export fails with `ExportGateError`; no artifact is written and
   the staging folder is removed (an existing artifact at the output is left as it was).
   With `auc_noise_z = z > 0` a drop within z standard errors does not fail (meant for
   smoke-sized test windows, where rank jitter alone moves CVR AUC by +-0.005);
5. otherwise writes the artifact atomically (`jax_recsys.quant.artifact.write_artifact`:
   manifest with the content version id, per-file sha256, table names/rows/dims/dtypes,
   vocabularies, ranker config JSON + dense params as .npy) with the report in the
   manifest's "report". It replaces only an empty folder or an artifact (with
   `overwrite` when of another version; `artifact.check_replaceable`), never a run, a
   dataset, other files or a symlink, and the output may not be or contain the ranker
   or the dataset folder, nor lie inside the dataset folder (it would change the folder
   an ablation fingerprints): checked before step 2.

The report (`export_report.json`, next to the artifact by default: OUT/../export_report.json,
written on success *and* on a failed gate, with "gate": {"passed": ...}) holds per-table
bytes against float32 and float16 rows (`artifact.table_size_report`: payload bytes of
codes + scale + bias, no .npy headers or vocabularies), the on-disk bytes of the
artifact, the per-table dequantization error, and per task the test AUC, log loss and NE
with full-precision and with quantized tables and their difference (quantized - full).

The data to score on is the dataset the ranker was trained on, found from what the
trainer recorded next to the ranker (`resolve_data_config`): DIR/metrics.json "config"
(written by `launch.train_ranker` for DIR/ranker) or ABL/ablation.json "data" (an
ablation run's ABL/runs/<variant>_s<seed>/ranker); `ExportConfig.data_path` overrides the
folder (a warning when its dataset.json differs from the recorded one's, or says the
recorded folder is gone, e.g. moved with the runs; without it a gone folder is refused).
The test rows are mapped onto the ranker's vocabulary by raw id.

`int4_transform(ranker)` and `add_int4_row(ablation_workdir)` add the "+ both facets,
INT4 served" row to a finished ablation through `ablation.evaluate_with_tables` (at 8
or 32 bits: "INT8 served" / "float32 served"; the row records its "bits").

Unlike the rest of `jax_recsys.quant` this module imports JAX (through the ranker); the
embedding server never imports it. Its setting rules and the row names above are in
`jax_recsys.quant.export_rules` (no JAX), for run_pipeline's own process.

Dimension legend: R table rows, D embedding dim (D_e of an entity: its facets
concatenated), n requested rows, N test examples.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import pathlib
import shutil
import time
import uuid
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from jax_recsys import fsutil
from jax_recsys.quant import artifact as artifact_lib, rowwise
from jax_recsys.quant.export_rules import (  # noqa: F401 (re-exported: export's API)
    INT4_LABEL,
    INT4_ROW,
    SETTING_RULES,
    int4_row_name,
    served_width,
    setting_violations,
)
from jax_recsys.ranking import facets as facets_lib, model as model_lib, train as train_lib

TASKS = ("ctr", "cvr", "ctcvr")
REPORT_NAME = "export_report.json"
_METRIC_KEYS = ("auc", "log_loss", "ne", "calibration")


class ExportGateError(RuntimeError):
    """The quantized ranker lost more test AUC than allowed; nothing was exported.

    Attributes:
      report: the export report (with "gate": {"passed": False, ...}).
    """

    def __init__(self, message: str, report: dict[str, Any]):
        super().__init__(message)
        self.report = report


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExportConfig:
    """One export of a trained ranker to a serving artifact.

    Attributes:
      ranker_dir: a saved ranker (`model.save_ranker`), e.g. WORKDIR/ranker of
        `launch.train_ranker` or ABL/runs/cl_kg_s0/ranker of an ablation.
      out_dir: the artifact folder to create.
      data_path: dataset folder to score on; None: the one recorded next to the ranker.
      bits: 4 (default), 8, or 32 (float32 rows: no quantization).
      max_auc_drop: the gate: fail when full-precision AUC minus quantized AUC exceeds
        this for any task (tasks whose test labels are all equal have no AUC and are
        skipped; with every task skipped the gate checked nothing and fails). A negative
        value always fails, whatever `auc_noise_z` (for testing the failure path).
      auc_noise_z: 0 (default): the gate is exactly `max_auc_drop`. z > 0: a task also
        needs its drop to exceed z standard errors of the paired AUC difference
        (DeLong, same test examples scored both ways) to fail, so that a tiny test
        window (a smoke world's few dozen conversions) cannot fail the export on rank
        jitter alone; large test windows have small standard errors and are unaffected.
      chunk_rows: rows per quantization chunk (bounds memory).
      scale_dtype: storage dtype of the per-row scale and bias ("float16" or "float32").
      report_path: where to write the report; None: OUT/../export_report.json.
      overwrite: replace an existing artifact of a different version at `out_dir`
        (never any other folder: `artifact.check_replaceable`).
      eval_batch_size: scoring batch size of the evaluation.
    """

    ranker_dir: str
    out_dir: str
    data_path: str | None = None
    bits: int = 4
    max_auc_drop: float = 0.001
    auc_noise_z: float = 0.0
    chunk_rows: int = 65536
    scale_dtype: str = "float16"
    report_path: str | None = None
    overwrite: bool = False
    eval_batch_size: int = 16384

    def __post_init__(self):
        bad = setting_violations(bits=self.bits, scale_dtype=self.scale_dtype,
                                 chunk_rows=self.chunk_rows, max_auc_drop=self.max_auc_drop,
                                 auc_noise_z=self.auc_noise_z)
        if bad:
            name, value, rule = bad[0]
            raise ValueError(f"ExportConfig.{name} must be {rule}, got {value!r}")


# ----------------------------------------------------------------------------- tables


class DequantizedTable:
    """A float32 [R, D] array-like over a QuantizedTable that dequantizes on gather.

    `table[rows]` dequantizes only the requested rows (`rowwise.dequantize_rows`), so
    scoring with an INT4 table never materialises the float table; `np.asarray(table)`
    gives the whole float32 table.
    """

    def __init__(self, q: rowwise.QuantizedTable):
        self.q = q
        self.shape = (q.num_rows, q.dim)
        self.dtype = np.dtype(np.float32)
        self.ndim = 2

    def __len__(self) -> int:
        return self.q.num_rows

    def __getitem__(self, rows) -> np.ndarray:
        if isinstance(rows, slice):
            return rowwise.dequantize_rows(self.q, np.arange(self.q.num_rows)[rows])
        if isinstance(rows, (int, np.integer)):
            r = int(rows) + (self.q.num_rows if int(rows) < 0 else 0)
            return rowwise.dequantize_rows(self.q, np.array([r]))[0]
        return rowwise.dequantize_rows(self.q, np.asarray(rows))

    def __array__(self, dtype=None, copy=None):
        out = rowwise.dequantize_rows(self.q)
        return out if dtype is None else out.astype(dtype)


def quantize_in_memory(
    table, *, bits: int = 4, chunk_rows: int = 65536, scale_dtype=np.float16
) -> rowwise.QuantizedTable:
    """Quantizes a (possibly memory-mapped) [R, D] table chunk by chunk into memory.

    Equal to `rowwise.quantize_rows(table)` (quantization is per row); the float table
    is read `chunk_rows` rows at a time and never copied whole.

    Args:
      table: float [R, D] array-like.
      bits: 4, 8 or 32.
      chunk_rows: rows per chunk.
      scale_dtype: storage dtype of scale and bias.

    Returns:
      The QuantizedTable.
    """
    rows, dim = (int(s) for s in table.shape)
    if bits == 32:
        return rowwise.quantize_rows(np.asarray(table), bits=32)
    codes = np.empty((rows, rowwise.packed_dim(dim, bits)), np.uint8)
    scale = np.empty(rows, scale_dtype)
    bias = np.empty(rows, scale_dtype)
    for a in range(0, rows, chunk_rows):
        b = min(rows, a + chunk_rows)
        q = rowwise.quantize_rows(np.asarray(table[a:b]), bits=bits, scale_dtype=scale_dtype)
        codes[a:b], scale[a:b], bias[a:b] = q.codes, q.scale, q.bias
    return rowwise.QuantizedTable(codes=codes, scale=scale, bias=bias, dim=dim, bits=bits)


def int4_transform(
    ranker: model_lib.TrainedRanker, *, bits: int = 4, chunk_rows: int = 65536
) -> dict[str, DequantizedTable]:
    """The ranker's tables as served: quantized row-wise, dequantized on gather.

    The `transform` of `ablation.evaluate_with_tables` for the "INT4 served" row.

    Args:
      ranker: a trained ranker.
      bits: 4 (default), 8 or 32.
      chunk_rows: rows per quantization chunk.

    Returns:
      entity -> DequantizedTable [R, D_e] (array-like; `np.asarray` gives the floats).
    """
    return {
        ent: DequantizedTable(quantize_in_memory(t, bits=bits, chunk_rows=chunk_rows))
        for ent, t in ranker.tables.items()
    }


def add_int4_row(
    ablation_workdir: str | os.PathLike,
    *,
    bits: int = 4,
    name: str | None = None,
    label: str | None = None,
    source_variant: str = "cl_kg",
    data_path: str | None = None,
) -> dict[str, Any]:
    """Adds the "+ both facets, INT4 served" row (or INT8 / float32) to a finished ablation.

    Every saved ranker of `source_variant` (one per seed) is re-scored on the test
    window with its tables quantized to `bits` and dequantized on gather; the row
    lands in ablation.json / ablation.md (see `ablation.evaluate_with_tables`) and
    records `bits`.

    Args:
      ablation_workdir: the ablation folder (ablation.json, runs/<variant>_s<seed>/ranker).
      bits: 4 (default), 8 or 32 (float32 rows: no quantization).
      name: the row's id (default: `int4_row_name(source_variant, bits)`).
      label: the row's label (default: `int4_row_name(source_variant, bits)`).
      source_variant: the variant whose rankers are quantized.
      data_path: dataset folder (None: the one recorded in ablation.json).

    Returns:
      The row's summary (per task AUC mean/std over seeds, RelaImpr vs the baseline,
      and "bits").

    Raises:
      ValueError: `bits` is not 4, 8 or 32 (and see `ablation.evaluate_with_tables`).
    """
    from jax_recsys.ranking import ablation

    default_name, default_label = int4_row_name(source_variant, bits)
    return ablation.evaluate_with_tables(
        ablation_workdir,
        transform=functools.partial(int4_transform, bits=bits),
        name=default_name if name is None else name,
        label=default_label if label is None else label,
        source_variant=source_variant,
        data_path=data_path,
        extra={"bits": bits},
    )


# ----------------------------------------------------------------------------- data


def _recorded_data(ranker_dir: pathlib.Path) -> tuple[dict | None, list[str]]:
    """The DataConfig fields recorded next to a saved ranker, and where it looked."""
    looked = []
    mpath = ranker_dir.parent / "metrics.json"
    looked.append(str(mpath))
    if mpath.is_file():
        meta = json.loads(mpath.read_text())
        data = (meta.get("config") or {}).get("data")
        if isinstance(data, dict):
            data = dict(data)
            if not data.get("path"):
                # launch.train_ranker with an empty data.path generated WORKDIR/world.
                data["path"] = str(ranker_dir.parent / "world")
            return data, looked
    if ranker_dir.parent.parent.name == "runs":
        apath = ranker_dir.parent.parent.parent / "ablation.json"
        looked.append(str(apath))
        if apath.is_file():
            meta = json.loads(apath.read_text())
            data = meta.get("data") or (
                {"path": meta["data_path"]} if meta.get("data_path") else None
            )
            if isinstance(data, dict):
                return dict(data), looked
    return None, looked


def resolve_data_config(
    ranker_dir: str | os.PathLike,
    ranker: model_lib.TrainedRanker,
    *,
    data_path: str | None = None,
) -> train_lib.DataConfig:
    """The test-window DataConfig of a saved ranker (train and valid windows skipped).

    Args:
      ranker_dir: the saved ranker's folder.
      ranker: the loaded ranker (its coarse features are the ones scored).
      data_path: dataset folder overriding the recorded one.

    Returns:
      DataConfig with empty train/valid windows and the ranker's coarse features.

    Warns (UserWarning) when `data_path` is given, is another folder than the recorded
    dataset, and their dataset.json differ (or one has none), or when the recorded
    dataset's folder is gone (e.g. the runs were moved: nothing to compare with).

    Raises:
      ValueError: nothing recorded and no `data_path` (names the files looked at), or
        the recorded dataset is gone and no `data_path` is given.
    """
    ranker_dir = pathlib.Path(ranker_dir)
    recorded, looked = _recorded_data(ranker_dir)
    if recorded is None and not data_path:
        raise ValueError(
            f"{ranker_dir}: no recorded dataset next to the ranker (looked at {', '.join(looked)}); "
            "pass the dataset folder (--data=DATASET)"
        )
    fields = {f.name for f in dataclasses.fields(train_lib.DataConfig)}
    kw = {}
    for k, v in (recorded or {}).items():
        if k in fields:
            kw[k] = tuple(v) if isinstance(v, list) else v
    rec_path = (recorded or {}).get("path")
    digest = lambda p: fsutil.file_digest(pathlib.Path(p) / "dataset.json")  # noqa: E731
    gone = bool(rec_path) and not pathlib.Path(rec_path).is_dir()
    trained_on = f"the dataset the ranker was trained on, {rec_path} (recorded in {looked[-1]})"
    if gone and not data_path:
        raise ValueError(f"{ranker_dir}: {trained_on}, is gone (moved or deleted?); pass the "
                         "dataset folder (--data=DATASET)")
    if data_path:
        if gone:
            warnings.warn(
                f"{trained_on}, is gone (moved or deleted?): scoring on the given "
                f"{data_path}, which cannot be checked against it", stacklevel=2)
        elif rec_path and pathlib.Path(data_path).resolve() != pathlib.Path(rec_path).resolve():
            mine, theirs = digest(data_path), digest(rec_path)
            if mine is None or theirs is None:
                why = "one has no dataset.json to compare"
            elif mine != theirs:
                why = "their dataset.json differ"
            else:
                why = None  # a copy of it
            if why:
                warnings.warn(
                    f"scoring on {data_path}, not the dataset the ranker was trained on "
                    f"({rec_path}): {why}, so the AUC gate may compare full precision and "
                    "INT4 on other data than the ranker's", stacklevel=2)
        kw["path"] = str(data_path)
    kw.update(
        train_window="",
        valid_window="",
        coarse_features=tuple(n for n, _ in ranker.config.coarse_vocab_sizes),
        max_train_examples=0,
    )
    return train_lib.DataConfig(**kw)


def load_test_split(
    ranker: model_lib.TrainedRanker, data_config: train_lib.DataConfig
) -> tuple[dict[str, np.ndarray], tuple[int, int]]:
    """The test window's columns with entity ids as rows of the *ranker's* vocabulary.

    Args:
      ranker: the trained ranker.
      data_config: from `resolve_data_config`.

    Returns:
      (columns for `train.evaluate_ranker` ([N] each; -1 = id unknown to the ranker),
      (start_day, end_day) of the test window).
    """
    cols = tuple(dict.fromkeys(ranker.entity_columns.values()))
    data = train_lib.prepare_data(data_config, id_columns=cols)
    split = dict(data.splits["test"])
    for ent, col in ranker.entity_columns.items():
        mine, theirs = np.asarray(ranker.vocabs[ent]), np.asarray(data.vocabs[col])
        if mine.shape == theirs.shape and np.array_equal(mine, theirs):
            continue
        # Different vocabularies (e.g. another dataset folder): map by raw id.
        raw = theirs[split[col]]
        split[col] = facets_lib.match_rows(raw, mine)
    return split, data.windows["test"]


# ----------------------------------------------------------------------------- report


def _midranks(x_n: np.ndarray) -> np.ndarray:
    """1-based ranks of x with ties given their average rank."""
    _, inv, counts = np.unique(x_n, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return ((ends - counts + 1 + ends) / 2.0)[inv]


def paired_auc_delta(labels, scores_a, scores_b) -> tuple[float, float, float]:
    """AUC of two scorings of the same examples, and the standard error of their difference.

    DeLong, DeLong & Clarke-Pearson (1988): each AUC is a Mann-Whitney statistic whose
    per-positive and per-negative components ("placements") give the covariance of the
    two AUCs on the same examples. Ties count 1/2, as in `jax_recsys.metrics.auc`.

    Args:
      labels: [N] 0/1 labels.
      scores_a: [N] scores of model a (e.g. full precision).
      scores_b: [N] scores of model b (e.g. INT4 tables).

    Returns:
      (auc_a, auc_b, standard error of auc_b - auc_a); all NaN without a positive and a
      negative, and the error NaN with fewer than two of either.
    """
    y = np.asarray(labels, np.float64) > 0.5
    m, n = int(y.sum()), int((~y).sum())
    if m == 0 or n == 0:
        return float("nan"), float("nan"), float("nan")
    aucs, v10, v01 = [], [], []
    for s in (np.asarray(scores_a, np.float64), np.asarray(scores_b, np.float64)):
        rank_all = _midranks(s)
        rank_pos, rank_neg = _midranks(s[y]), _midranks(s[~y])
        # Per positive: the fraction of negatives it beats; per negative: of positives
        # that beat it (ties 1/2).
        v10.append((rank_all[y] - rank_pos) / n)
        v01.append(1.0 - (rank_all[~y] - rank_neg) / m)
        aucs.append(float(v10[-1].mean()))
    if m < 2 or n < 2:
        return aucs[0], aucs[1], float("nan")
    d10, d01 = v10[1] - v10[0], v01[1] - v01[0]
    var = float(np.var(d10, ddof=1)) / m + float(np.var(d01, ddof=1)) / n
    return aucs[0], aucs[1], math.sqrt(max(var, 0.0))


def _task_arrays(split: Mapping[str, np.ndarray], p_ctr, p_cvr) -> dict[str, tuple]:
    """(labels, scores) per task, as `train.evaluate_predictions` defines the tasks."""
    click = np.asarray(split["click"], np.float64)
    conv = np.asarray(split["conversion"], np.float64) * click
    p_ctr, p_cvr = np.asarray(p_ctr, np.float64), np.asarray(p_cvr, np.float64)
    clicked = click > 0
    return {
        "ctr": (click, p_ctr),
        "cvr": (conv[clicked], p_cvr[clicked]),
        "ctcvr": (conv, p_ctr * p_cvr),
    }


def _task_quality(
    full: Mapping[str, float], quant: Mapping[str, float], auc_se: Mapping[str, float]
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for task in TASKS:
        row = {}
        for k in _METRIC_KEYS:
            f, q = full.get(f"{task}_{k}"), quant.get(f"{task}_{k}")
            row[f"{k}_full"] = f
            row[f"{k}_quant"] = q
            row[f"{k}_delta"] = (q - f) if f is not None and q is not None else None
        row["auc_delta_se"] = auc_se.get(task)
        out[task] = row
    return out


def _gate(quality: Mapping[str, Any], max_auc_drop: float, noise_z: float = 0.0) -> dict[str, Any]:
    drops, failed, skipped, within_noise = {}, [], [], []
    for task in TASKS:
        f, q = quality[task]["auc_full"], quality[task]["auc_quant"]
        if f is None or q is None or math.isnan(f) or math.isnan(q):
            skipped.append(task)
            continue
        drops[task] = f - q
        if drops[task] > max_auc_drop:
            se = quality[task].get("auc_delta_se")
            if (
                noise_z > 0
                and max_auc_drop >= 0  # a negative gate always fails, noise or not
                and se is not None
                and not math.isnan(se)
                and drops[task] <= noise_z * se
            ):
                within_noise.append(task)
            else:
                failed.append(task)
    return {
        "max_auc_drop": max_auc_drop,
        "noise_z": noise_z,
        "auc_drop": drops,
        "failed_tasks": failed,
        "within_noise_tasks": within_noise,
        "skipped_tasks": skipped,
        "passed": bool(drops) and not failed,  # every task skipped: nothing was checked
    }


def _quant_error(src, q: rowwise.QuantizedTable, chunk_rows: int) -> dict[str, float]:
    """Max |x - x_hat|, RMSE, and the max error in half quantization steps (<= 1)."""
    rows = q.num_rows
    max_abs, sq, max_steps = 0.0, 0.0, 0.0
    for a in range(0, rows, chunk_rows):
        b = min(rows, a + chunk_rows)
        x = np.asarray(src[a:b], np.float32)
        err = np.abs(x - rowwise.dequantize_rows(q, np.arange(a, b)))
        if err.size:
            max_abs = max(max_abs, float(err.max()))
            sq += float(np.square(err, dtype=np.float64).sum())
            if q.scale is not None:
                half = np.asarray(q.scale[a:b], np.float32)[:, None] / 2
                ok = half > 0
                if ok.any():
                    max_steps = max(
                        max_steps, float((err / np.where(ok, half, 1)).max(initial=0.0))
                    )
    n = rows * q.dim
    return {
        "max_abs_error": max_abs,
        "rmse": math.sqrt(sq / n) if n else 0.0,
        "max_error_in_half_steps": max_steps,
    }


def format_report(report: Mapping[str, Any]) -> str:
    """A short plain-text summary: sizes per table, AUC per task, the gate's verdict."""
    lines = [
        f"{'table':<14}{'rows':>12}{'dim':>6}{'dtype':>8}{'bytes':>14}{'vs fp32':>9}{'vs fp16':>9}"
    ]
    sizes = report["sizes"]
    for name, r in [
        *sizes["tables"].items(),
        ("total", {**sizes["total"], "rows": "", "dim": "", "dtype": ""}),
    ]:
        lines.append(
            f"{name:<14}{r['rows']!s:>12}{r['dim']!s:>6}{r['dtype']:>8}{r['bytes']:>14,}"
            f"{100 * r['ratio_vs_fp32']:>8.2f}%{100 * r['ratio_vs_fp16']:>8.2f}%"
        )
    lines.append("")
    tag = {4: "int4", 8: "int8", 32: "fp32"}[report["bits"]]
    lines.append(
        f"{'task':<7}{'AUC fp32':>10}{'AUC ' + tag:>10}{'delta':>10}{'+/- se':>9}"
        f"{'logloss fp32':>14}{'logloss ' + tag:>14}"
    )
    for task in TASKS:
        r = report["quality"][task]

        def f(x, spec=".4f"):
            return (
                "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)
            )

        lines.append(
            f"{task:<7}{f(r['auc_full']):>10}{f(r['auc_quant']):>10}{f(r['auc_delta'], '+.5f'):>10}"
            f"{f(r.get('auc_delta_se'), '.5f'):>9}"
            f"{f(r['log_loss_full']):>14}{f(r['log_loss_quant']):>14}"
        )
    g = report["gate"]
    worst = max(g["auc_drop"].items(), key=lambda kv: kv[1], default=("-", float("nan")))
    verdict = "PASSED" if g["passed"] else (
        f"FAILED ({', '.join(g['failed_tasks']) or 'no task has a test AUC'})")
    noise = ""
    if g.get("noise_z"):
        noise = f" unless within {g['noise_z']:g} se"
        if g.get("within_noise_tasks"):
            noise += f" (within noise: {', '.join(g['within_noise_tasks'])})"
    lines.append(
        f"gate: {verdict}: max allowed AUC drop {g['max_auc_drop']:g}{noise}, "
        f"largest drop {worst[1]:+.5f} ({worst[0]})"
    )
    if report.get("version"):
        lines.append(f"artifact {report['artifact']} version {report['version']}")
    return "\n".join(lines)


def _write_json(path: pathlib.Path, obj) -> None:
    fsutil.write_text_atomic(
        path, json.dumps(obj, indent=2, sort_keys=True, default=train_lib._json_default) + "\n")


# ----------------------------------------------------------------------------- export


def _check_apart(out: pathlib.Path, other: str | os.PathLike, what: str,
                 inside_ok: bool = True) -> None:
    """Raises ValueError when the artifact folder `out` is or holds `other` (writing the
    artifact would replace it) or, unless `inside_ok`, lies inside it."""
    a, b = out.resolve(), pathlib.Path(other).resolve()
    if b.is_relative_to(a):
        relation = "is" if a == b else "contains"
        why = f"writing the artifact would replace the {what}"
    elif a.is_relative_to(b) and not inside_ok:
        relation = "is inside"
        why = (f"the artifact (and its report beside it) would change the {what}, and a "
               "changed dataset folder makes an ablation redo every run and facet made from it")
    else:
        return
    raise ValueError(
        f"the artifact folder {out} {relation} the {what} {other}: {why}; choose an output "
        "folder apart from the ranker and the data"
    )


def check_export(config: ExportConfig) -> None:
    """Runs `export_ranker`'s checks of the ranker, data and output, and nothing else.

    For callers with other work to do first (``launch.export_int4 --ablation``): a bad
    output is refused before that work, not after it. Raises what `export_ranker`
    raises before its evaluation.
    """
    _prepare(config, lambda _: None)


def _prepare(config: ExportConfig, log: Callable[[str], None]):
    """`export_ranker`'s checks before any work: ``(out, ranker_dir, report_path,
    ranker, data config)``."""
    ranker_dir = pathlib.Path(config.ranker_dir)
    out = pathlib.Path(config.out_dir).absolute()
    _check_apart(out, ranker_dir, "ranker folder")
    report_path = (
        pathlib.Path(config.report_path) if config.report_path else out.parent / REPORT_NAME
    )
    fsutil.check_file_target(report_path, "the report")  # not after the evaluation
    if out.resolve() in report_path.resolve().parents:
        raise ValueError(f"the report {report_path} would be inside the artifact folder {out}, "
                         "whose next export would have to delete it: write it elsewhere")
    if not config.report_path:  # sibling artifacts share the default report path
        try:
            other = json.loads(report_path.read_text()).get("artifact")
        except (OSError, ValueError, AttributeError):
            other = None
        if other and other != str(out):
            log(f"export: {report_path} holds the report of another artifact ({other}); "
                "it will be replaced (give --report to keep both)")
    ranker = model_lib.load_ranker(ranker_dir, mmap=True)
    if not ranker.tables:
        raise ValueError(f"{ranker_dir}: the ranker has no ID tables; nothing to quantize")
    dcfg = resolve_data_config(ranker_dir, ranker, data_path=config.data_path)
    _check_apart(out, dcfg.path, "dataset folder", inside_ok=False)
    artifact_lib.check_replaceable(out, swap=False)  # now, not after the evaluation
    return out, ranker_dir, report_path, ranker, dcfg


def export_ranker(config: ExportConfig, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Quantizes a trained ranker's tables, gates on test AUC, writes the serving artifact.

    Args:
      config: the ExportConfig.
      log: progress printer.

    Returns:
      The report (also written to `config.report_path` and into the manifest's "report"):
      {"artifact", "version", "ranker", "bits", "data", "test_window", "num_test_examples",
      "sizes" (`artifact.table_size_report`), "artifact_bytes" (every file on disk),
      "quant_error" per table, "quality" per task {auc,log_loss,ne,calibration}_{full,
      quant,delta} and "auc_delta_se", "gate" {"passed", "max_auc_drop", "noise_z",
      "auc_drop", "failed_tasks", "within_noise_tasks", "skipped_tasks"}, "seconds"}.

    Raises:
      ExportGateError: the AUC of a task dropped by more than `max_auc_drop`; no
        artifact is written (the report, with "passed": false, is).
      ValueError / FileNotFoundError: bad ranker, data or output (naming the file),
        checked before the evaluation: among them an output folder that is or contains
        the ranker or the dataset folder or lies inside the dataset folder, a report
        inside the output folder, and an output folder that is a symlink or
        neither empty nor a serving artifact (`artifact.check_replaceable`).
    """
    t0 = time.time()
    out, ranker_dir, report_path, ranker, dcfg = _prepare(config, log)
    split, window = load_test_split(ranker, dcfg)
    sdt = np.dtype(config.scale_dtype)

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.export-{uuid.uuid4().hex[:8]}"
    try:
        tdir = staging / "tables"
        qtables: dict[str, rowwise.QuantizedTable] = {}
        errors = {}
        stems = fsutil.file_stems(sorted(ranker.tables))  # entity names may hold '/'
        for ent in sorted(ranker.tables):
            src = ranker.tables[ent]
            try:
                paths = rowwise.quantize_table_chunked(
                    src, tdir, stems[ent], bits=config.bits, chunk_rows=config.chunk_rows,
                    scale_dtype=sdt,
                )
            except ValueError as e:  # a non-finite row, or one a float16 bias cannot hold
                raise ValueError(f"{ranker_dir}: table {ent!r}: {e}") from None
            arrays = {k: np.load(p, mmap_mode="r", allow_pickle=False) for k, p in paths.items()}
            qtables[ent] = rowwise.QuantizedTable(
                codes=arrays["codes"],
                scale=arrays.get("scale"),
                bias=arrays.get("bias"),
                dim=int(src.shape[1]),
                bits=config.bits,
            )
            errors[ent] = _quant_error(src, qtables[ent], config.chunk_rows)
        log(
            f"export: quantized {len(qtables)} tables to {config.bits} bits in {time.time() - t0:.1f}s"
        )

        # = train.evaluate_ranker(ranker, split, tables=...), keeping the per-example
        # scores for the paired standard error of the AUC difference.
        scores = {}
        for kind, tables in (
            ("full", None),
            ("quant", {e: DequantizedTable(q) for e, q in qtables.items()}),
        ):
            scores[kind] = train_lib.predict(
                ranker, split, tables=tables, batch_size=config.eval_batch_size
            )
        full, quant = (
            train_lib.evaluate_predictions(
                click=split["click"], conversion=split["conversion"], p_ctr=p[0], p_cvr=p[1]
            )
            for p in (scores["full"], scores["quant"])
        )
        tasks_full = _task_arrays(split, *scores["full"])
        tasks_quant = _task_arrays(split, *scores["quant"])
        auc_se = {
            t: paired_auc_delta(tasks_full[t][0], tasks_full[t][1], tasks_quant[t][1])[2]
            for t in TASKS
        }
        quality = _task_quality(full, quant, auc_se)
        gate = _gate(quality, config.max_auc_drop, config.auc_noise_z)
        entries = {
            ent: {
                "rows": q.num_rows,
                "dim": q.dim,
                "dtype": {4: "int4", 8: "int8", 32: "float32"}[q.bits],
                "scale_dtype": None if q.bits == 32 else sdt.name,
            }
            for ent, q in qtables.items()
        }
        report: dict[str, Any] = {
            "artifact": str(out),
            "version": None,
            "ranker": str(ranker_dir.absolute()),
            "bits": config.bits,
            "scale_dtype": sdt.name,
            "data": dataclasses.asdict(dcfg),
            "test_window": list(window),
            "num_test_examples": int(full["num_examples"]),
            "sizes": artifact_lib.table_size_report({"tables": entries}),
            "quant_error": errors,
            "quality": quality,
            "gate": gate,
        }
        if not gate["passed"]:
            report["seconds"] = time.time() - t0
            _write_json(report_path, report)
            drops = ", ".join(
                f"{t} {gate['auc_drop'][t]:+.5f} (se {quality[t]['auc_delta_se']:.5f})"
                for t in gate["failed_tasks"]
            )
            why = (
                f"test AUC dropped by more than {config.max_auc_drop:g} with {config.bits}-bit "
                f"tables ({drops})" if drops else
                f"no task has a test AUC to compare (the labels of {', '.join(gate['skipped_tasks'])} "
                f"are all equal in the test days [{window[0]}, {window[1]})), so nothing was checked"
            )
            raise ExportGateError(
                f"export of {ranker_dir} failed the quality gate: {why}; no artifact "
                f"written to {out} (report: {report_path})",
                report,
            )
        manifest = artifact_lib.write_artifact(
            out,
            tables=qtables,
            vocabs={e: np.asarray(ranker.vocabs[e]) for e in qtables},
            bits=config.bits,
            ranker_config={
                **ranker.config.to_dict(),
                "entity_columns": dict(ranker.entity_columns),
                "facet_layout": {
                    e: [list(x) for x in lay] for e, lay in ranker.facet_layout.items()
                },
            },
            ranker_params={k: np.asarray(v) for k, v in ranker.params.items()},
            report=report,
            chunk_rows=config.chunk_rows,
            scale_dtype=sdt,
            overwrite=config.overwrite,
        )
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    report = dict(manifest.report)
    report["version"] = manifest.version
    report["artifact_bytes"] = int(sum(manifest.sizes.values()))
    report["seconds"] = time.time() - t0
    _write_json(report_path, report)
    log(f"export: wrote {out} version {manifest.version} ({report['seconds']:.1f}s)")
    return report
