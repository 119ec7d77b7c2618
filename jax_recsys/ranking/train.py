"""Training and evaluation of the CTR/CVR ranker on a dataset folder's impressions.

`train_and_evaluate(config, workdir)` is the whole job:

1. `prepare_data`: reads the impressions table, builds each entity's vocabulary (every
   raw id that occurs in the impressions table, sorted: ids seen only in valid/test keep
   their initial vector -- random for scratch facets, the pretrained one otherwise), maps
   id columns to rows and splits by the day windows of dataset.json.
2. resolves every entity's facets (`facets.resolve_facets`: scratch, or pretrained
   tables mapped by raw id) and builds one engine table per (entity, facet)
   (`jax_recsys.embedding`, row-wise Adagrad with a per-facet learning rate; frozen
   facets are passed to the step as frozen tables and stay bit-identical);
3. trains with the engine's one step shape (`make_train_step`, ESMM loss) for
   `num_epochs` over the training window, logging the loss every `log_every` steps;
4. saves the trained ranker (`model.save_ranker`: tables per entity as .npy, vocabs,
   dense params, config JSON) to WORKDIR/ranker;
5. evaluates the *saved* ranker on the validation and test windows with
   `evaluate_ranker` -- host-side row gather + the pure serving score function, the
   same path the INT4 export and the serving ranker use (pass `tables=` to evaluate
   with substituted, e.g. dequantized, tables) -- and returns/writes metrics.

Metrics per task (`evaluate_predictions`): CTR over all impressions (pCTR vs click);
CVR on clicked impressions only (pCVR vs conversion: the post-click conversion rate
the CVR head estimates); CTCVR over all impressions (pCTR * pCVR vs click AND
conversion). Each has AUC, log loss, normalized entropy and calibration
(sum predicted / sum observed).

Several processes (`jax.distributed` initialised by the launcher): the mesh spans every
process's devices, each process reads only its B / process_count slice of each global
batch (assembled with `jax.make_array_from_process_local_data`), the trained tables
are gathered to every host, every process evaluates (identical metrics) and only
process 0 writes files.

Checkpoints (`checkpoint_dir`, `TrainConfig.checkpoint_every`): tables, sparse optimizer
slots, dense params, optax state and step, plus the data position, the loss EMA/curve,
the vocabularies and the storage layout of the tables. A run started on a folder that
holds checkpoints resumes from the newest one -- on any device count, process count
or table sharding (`restore_train_state`) -- and ends as an uninterrupted run would.

The "no large tables" ranker is a config with no entities: the engine is skipped and a
dense-only optax step of the same shape trains the coarse-feature model.

Dimension legend: B batch, R rows of an entity's vocabulary, D_e entity width,
N examples of a split.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import pathlib
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jax_recsys import fsutil
from jax_recsys.ranking import facets as facets_lib, model as model_lib

LABEL_COLUMNS = ("click", "conversion")
_NOT_COARSE = ("day", "timestamp", "click", "conversion", "user_id", "item_id", "advertiser_id")
# A coarse feature is embedded in a table of max value + 1 rows: a column of ids or times
# (1.7e12 for a time in ms) would be a table of terabytes.
MAX_COARSE_VALUES = 1 << 20


# ----------------------------------------------------------------------------- configs


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where the ranker's data comes from.

    Attributes:
      path: dataset folder (see docs/ARCHITECTURE.md).
      table: impressions table name.
      train_window, valid_window, test_window: day-window names in dataset.json
        (``ranker_train`` ...) or explicit half-open ``(start_day, end_day)`` pairs,
        also as ``"START,END"`` strings (`DatasetFolder.window_days`).
        An empty valid window name ("") skips validation; `train_and_evaluate` needs
        the train and test windows. Neither the valid nor the test window may overlap
        the train window (their metrics would be measured on training impressions);
        a valid window overlapping the test window is only warned about.
      click_column, conversion_column: label columns (binary: every value 0 or 1).
      day_column: the day of an impression (the windows' days); when the table lacks
        it, days are `timestamp_column` // 86400.
      timestamp_column: seconds; used only when there is no day column.
      coarse_features: coarse categorical columns (non-negative ints; neither a label
        nor an entity's id column, each once, values below `MAX_COARSE_VALUES`); None
        picks every integer column that is not an id, label (`click_column` and
        `conversion_column` included), day or timestamp column (`day_column`,
        `timestamp_column` and the default names).
      max_train_examples: keep only the first N training impressions (0: all; >= 0).
    """

    path: str
    table: str = "impressions"
    train_window: str | tuple[int, int] = "ranker_train"
    valid_window: str | tuple[int, int] = "ranker_valid"
    test_window: str | tuple[int, int] = "ranker_test"
    click_column: str = "click"
    conversion_column: str = "conversion"
    day_column: str = "day"
    timestamp_column: str = "timestamp"
    coarse_features: tuple[str, ...] | None = None
    max_train_examples: int = 0

    def __post_init__(self):
        n = self.max_train_examples
        if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 0:
            raise ValueError(f"max_train_examples must be an integer >= 0 (0: all), got {n!r}")
        coarse = list(self.coarse_features or ())
        twice = sorted({c for c in coarse if coarse.count(c) > 1})
        if twice:
            raise ValueError(f"coarse_features lists {', '.join(map(repr, twice))} more than once")
        for c in coarse:  # a label as a feature: the model would see what it predicts
            what = ("the click label (click_column)" if c == self.click_column
                    else "the conversion label (conversion_column)" if c == self.conversion_column
                    else "a name the ranker gives its labels" if c in ("click", "conversion")
                    else None)
            if what:
                raise ValueError(f"coarse_features lists {c!r}, {what}: a label cannot be a feature")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """One ranker training run.

    Attributes:
      data: the data.
      entities: ID entities and their facets; empty = the "no large tables" ranker.
      facet_paths: (facet name, facet checkpoint dir) pairs for pretrained facets.
      model: dense architecture; its entity_dims and coarse_vocab_sizes are filled in
        from the resolved facets and the data.
      batch_size: global batch B (a multiple of the device count).
      num_epochs: passes over the training window (fractions allowed).
      dense_learning_rate: Adam learning rate of the dense part.
      dense_weight_decay: AdamW decoupled weight decay of the dense part.
      warmup_steps: linear warm-up of the dense learning rate.
      table_learning_rate: row-wise Adagrad learning rate of scratch tables.
      table_initial_accumulator: Adagrad's starting accumulator per row.
      finetune_lr_scale: default learning rate of fine-tuned pretrained facets as a
        fraction of table_learning_rate (~1/10 is common practice).
      cvr_weight: weight of the CTCVR term of the ESMM loss.
      seed: seeds initialisation and the data order.
      log_every: print the training loss every N steps (0: never).
      eval_batch_size: batch size of the evaluation.
      checkpoint_every: save a training checkpoint every N steps and at the end, and
        resume from the newest one (0: never, and checkpoints already there are not
        read; only used when `train_and_evaluate` gets a checkpoint_dir).
      keep_checkpoints: how many recent checkpoints to keep.
      table_sharding: force one sharding type on every table ("row_wise", "replicated",
        "table_wise", "column_wise"); "" lets the planner choose by size.
    """

    data: DataConfig
    entities: tuple[facets_lib.EntitySpec, ...] = ()
    facet_paths: tuple[tuple[str, str], ...] = ()
    model: model_lib.RankerConfig = model_lib.RankerConfig()
    batch_size: int = 4096
    num_epochs: float = 1.0
    dense_learning_rate: float = 1e-3
    dense_weight_decay: float = 0.0
    warmup_steps: int = 0
    table_learning_rate: float = 0.05
    table_initial_accumulator: float = 1e-6
    finetune_lr_scale: float = 0.1
    cvr_weight: float = 1.0
    seed: int = 0
    log_every: int = 50
    eval_batch_size: int = 16384
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    table_sharding: str = ""

    def __post_init__(self):
        if not (math.isfinite(self.num_epochs) and self.num_epochs > 0):
            raise ValueError(f"num_epochs must be a finite number > 0, got {self.num_epochs}")
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError(f"batch_size and eval_batch_size must be >= 1, got "
                             f"{self.batch_size}, {self.eval_batch_size}")
        if self.log_every < 0 or self.warmup_steps < 0:
            raise ValueError(f"log_every and warmup_steps must be >= 0 (0: never / no warm-up), "
                             f"got {self.log_every}, {self.warmup_steps}")
        from jax_recsys import checkpoint as checkpoint_lib

        checkpoint_lib.check_settings(checkpoint_every=self.checkpoint_every,
                                      keep_checkpoints=self.keep_checkpoints)
        if self.seed < 0:  # NumPy's generators take none (was "expected non-negative integer")
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        for name in ("dense_learning_rate", "dense_weight_decay", "table_learning_rate",
                     "table_initial_accumulator", "finetune_lr_scale", "cvr_weight"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")


# ----------------------------------------------------------------------------- data


@dataclasses.dataclass(frozen=True, kw_only=True)
class RankerData:
    """Impressions mapped to rows, split by day windows (reusable across runs).

    Attributes:
      vocabs: entity column -> [R] raw ids in row order.
      coarse_sizes: (coarse feature, number of values) pairs.
      splits: split name ("train", "valid", "test") -> column -> [N] arrays, with id
        columns already mapped to int32 rows and labels as float32.
      windows: split name -> (start_day, end_day).
    """

    vocabs: dict[str, np.ndarray]
    coarse_sizes: tuple[tuple[str, int], ...]
    splits: dict[str, dict[str, np.ndarray]]
    windows: dict[str, tuple[int, int]]


def _check_windows(
    named: Mapping[str, Any], wins: Mapping[str, tuple[int, int]], *, log_warning: Callable
) -> None:
    """Refuses valid/test windows that overlap the train window; warns on valid/test.

    Args:
      named: split -> the window as configured (a name or a pair), for the message.
      wins: split -> resolved half-open (start_day, end_day).
      log_warning: called with the message when the valid and test windows overlap.

    Raises:
      ValueError: the valid or test window shares days with the train window.
    """

    def overlap(a: tuple[int, int], b: tuple[int, int]) -> bool:
        return max(a[0], b[0]) < min(a[1], b[1])

    def show(split: str) -> str:
        start, end = wins[split]
        w = named[split]
        label = repr(w) if isinstance(w, str) else "(explicit)"
        return f"{split} window {label} = days [{start}, {end})"

    for split in ("valid", "test"):
        if split in wins and "train" in wins and overlap(wins[split], wins["train"]):
            raise ValueError(
                f"the {show(split)} overlaps the {show('train')}: its metrics would be "
                f"measured on training impressions; choose a {split} window of other days"
            )
    if "valid" in wins and "test" in wins and overlap(wins["valid"], wins["test"]):
        log_warning(f"the {show('valid')} overlaps the {show('test')}: validation and test "
                    "metrics share impressions")


_ROW = "\0row"  # a window's rows' positions in the table (not a column name a file can have)


def _check_labels(folder, table: str, cols: Mapping[str, np.ndarray], columns,
                  rows: np.ndarray) -> None:
    """Every label is exactly 0 or 1 (a CTR/CVR ranker's labels are binary).

    Args:
      folder: the open DatasetFolder.
      table: the impressions table's name.
      cols: label columns of some of its rows.
      columns: the label columns.
      rows: [n] those rows' positions in the table (for the error's line or row).

    Raises:
      DataError: naming the file, column and the first bad line (npy: row).
    """
    for c in dict.fromkeys(columns):
        v = np.asarray(cols[c])
        if v.dtype.kind not in "biuf":
            raise folder.error(table, f"label column must hold 0/1 numbers, got dtype {v.dtype}",
                               column=c)
        bad = ~((v == 0) | (v == 1))  # NaN compares unequal to both
        if bad.any():
            i = int(np.argmax(bad))
            why = "click and conversion labels are binary"
            if np.isnan(v[i]):
                text = not folder.table_path(table).is_dir()
                why += (f"; an {'empty or ' if text else ''}NaN label, one not known yet, may "
                        "only be on rows outside the train/valid/test windows")
            raise folder.error(table, f"label {v[i].item()!r} is not 0 or 1 ({why})",
                               column=c, row=int(rows[i]))


def prepare_data(data: DataConfig, *, id_columns: tuple[str, ...]) -> RankerData:
    """Reads impressions, builds vocabularies for `id_columns`, splits by day windows.

    Args:
      data: the DataConfig.
      id_columns: impression columns holding entity raw ids (e.g. user_id, item_id).

    Returns:
      RankerData.

    Raises:
      jax_recsys.data.folder.DataError: naming the table's file, the column and (for a
        bad value) the line: a missing column, a label that is not 0 or 1 (NaN or an
        empty CSV/TSV cell included) in a row a window uses, a negative or non-integer coarse feature, a column that is not 1-D,
        a day/timestamp that is not finite, an unknown or empty day window.
      ValueError: the valid or test window overlaps the train window; a coarse feature
        is one of `id_columns`.
    """
    import warnings

    from jax_recsys.data import folder as folder_lib

    folder = folder_lib.DatasetFolder(data.path)
    named = {"train": data.train_window, "valid": data.valid_window, "test": data.test_window}
    named = {k: w for k, w in named.items() if not (w == "" or w is None)}
    wins = {split: folder.window_days(w) for split, w in named.items()}
    _check_windows(named, wins, log_warning=lambda m: warnings.warn(m, stacklevel=3))
    # An empty label cell (a label not known yet) reads as NaN: checked below, in the rows used.
    cols = folder.table(data.table, kinds=dict.fromkeys(
        (data.click_column, data.conversion_column), "label"))
    where = f"{folder.table_path(data.table)}"
    for c in (data.click_column, data.conversion_column, *id_columns):
        if c not in cols:
            raise folder_lib.DataError(
                f"impressions table lacks column {c!r} (has {sorted(cols)})", file=where, column=c
            )
    if data.coarse_features is None:
        coarse = tuple(
            c
            for c in cols
            if c not in _NOT_COARSE and c not in id_columns and np.asarray(cols[c]).dtype.kind in "iu"
            and c not in (data.click_column, data.conversion_column)  # labels: never features
            and c not in (data.day_column, data.timestamp_column)
        )
    else:
        coarse = tuple(data.coarse_features)
    for c in coarse:
        if c in id_columns:  # its raw values would replace the entity table's row indices
            raise ValueError(f"coarse_features lists {c!r}, the id column of an entity table "
                             "(the entity's ID table already embeds it)")
        if c not in cols:
            raise folder_lib.DataError(f"coarse feature {c!r} not in the table", file=where, column=c)
    for c in dict.fromkeys((data.click_column, data.conversion_column, *id_columns, *coarse)):
        shape = np.shape(cols[c])
        if len(shape) != 1:
            raise folder.error(
                data.table, f"column must be 1-D (one value per impression), got shape {shape}",
                column=c,
            )
    sizes = []
    for c in coarse:
        v = np.asarray(cols[c])
        if v.dtype.kind not in "iu":
            raise folder.error(
                data.table, f"coarse feature {c!r} must be integer, got {v.dtype}", column=c
            )
        if v.size and v.min() < 0:
            i = int(np.argmin(v))
            raise folder.error(
                data.table, f"coarse feature {c!r} has negative value {v[i]}", column=c, row=i
            )
        top = int(v.max()) if v.size else 0  # an empty column: a table of 1 row
        if top >= MAX_COARSE_VALUES:
            i = int(np.argmax(v))
            raise folder.error(
                data.table, f"coarse feature {c!r} has value {v[i]}: a coarse feature is a small "
                f"categorical embedded in a table of max value + 1 rows (below {MAX_COARSE_VALUES});"
                " list the coarse features (data.coarse_features) or make an id column an "
                "entity (entities)", column=c, row=i)
        sizes.append((c, top + 1))
    vocabs = {c: np.unique(np.asarray(cols[c])) for c in id_columns}
    splits = {}
    # Each window's rows carry their table row, so a bad label names its line; only the
    # rows used are checked (e.g. pending labels on days after the test window are fine).
    labels = (data.click_column, data.conversion_column)
    indexed = {**cols, _ROW: np.arange(len(cols[data.click_column]))}
    unclicked = []  # table rows with a conversion and no click (a row may be in 2 windows)
    for split, (start, end) in wins.items():
        sel = folder_lib.select_days(indexed, start, end, day_column=data.day_column,
                                     timestamp_column=data.timestamp_column, file=where)
        n = len(sel[data.click_column])
        if split == "train" and data.max_train_examples:
            n = min(n, data.max_train_examples)
        used = {c: np.asarray(sel[c][:n]) for c in labels}
        _check_labels(folder, data.table, used, labels, rows=sel[_ROW][:n])
        unclicked.append(sel[_ROW][:n][(used[data.conversion_column] == 1)
                                       & (used[data.click_column] == 0)])
        out = {}
        for c in id_columns:
            out[c] = np.searchsorted(vocabs[c], np.asarray(sel[c][:n])).astype(np.int32)
        for c in coarse:
            out[c] = np.asarray(sel[c][:n]).astype(np.int32)
        out["click"] = np.asarray(sel[data.click_column][:n]).astype(np.float32)
        out["conversion"] = np.asarray(sel[data.conversion_column][:n]).astype(np.float32)
        splits[split] = out
    unclicked = np.unique(np.concatenate(unclicked)).size if unclicked else 0
    if unclicked:  # post-view conversions: the ESMM labels see click AND conversion
        warnings.warn(
            f"{data.path}: {unclicked} impressions of the windows have "
            f"{data.conversion_column}=1 with {data.click_column}=0; the ranker models "
            "conversions after a click (CTCVR label = click AND conversion), so they count "
            "as no conversion", stacklevel=2)
    tr = splits.get("train")
    if tr is not None and len(tr["click"]):  # e.g. a data set without conversions
        positives = {(data.click_column, "CTR", ""): tr["click"].sum(),
                     (data.conversion_column, "CVR", " after a click"):
                         (tr["click"] * tr["conversion"]).sum()}
        for (col, task, after), n in positives.items():
            if n == 0:
                warnings.warn(
                    f"{data.path}: no impression of the train window (days "
                    f"[{wins['train'][0]}, {wins['train'][1]})) has {col}=1{after}: the {task} "
                    "head has nothing to learn", stacklevel=2)
    return RankerData(vocabs=vocabs, coarse_sizes=tuple(sizes), splits=splits, windows=wins)


# ----------------------------------------------------------------------------- metrics


def evaluate_predictions(
    *, click: np.ndarray, conversion: np.ndarray, p_ctr: np.ndarray, p_cvr: np.ndarray
) -> dict[str, float]:
    """Per-task ranking metrics of CTR, CVR (clicked only) and CTCVR predictions.

    Args:
      click: [N] 0/1 click labels.
      conversion: [N] 0/1 conversion labels (conversions after a click).
      p_ctr: [N] predicted P(click).
      p_cvr: [N] predicted P(conversion | click).

    Returns:
      {"ctr_auc", "ctr_log_loss", "ctr_ne", "ctr_calibration", same for "cvr_" (on
      clicked impressions) and "ctcvr_" (pCTR * pCVR vs click AND conversion), plus
      "num_examples", "num_clicks", "num_conversions"}. A task whose labels are all
      equal gets NaN AUC.
    """
    from jax_recsys import metrics as m

    click = np.asarray(click, np.float64)
    conv = np.asarray(conversion, np.float64) * click
    p_ctr = np.asarray(p_ctr, np.float64)
    p_cvr = np.asarray(p_cvr, np.float64)
    clicked = click > 0
    tasks = {
        "ctr": (click, p_ctr),
        "cvr": (conv[clicked], p_cvr[clicked]),
        "ctcvr": (conv, p_ctr * p_cvr),
    }
    out: dict[str, float] = {
        "num_examples": int(click.size),
        "num_clicks": int(clicked.sum()),
        "num_conversions": int(conv.sum()),
    }
    for name, (y, p) in tasks.items():
        if y.size == 0:
            for k in ("auc", "log_loss", "ne", "calibration"):
                out[f"{name}_{k}"] = float("nan")
            continue
        both = 0 < y.sum() < y.size
        out[f"{name}_auc"] = float(m.auc(y, p)) if both else float("nan")
        out[f"{name}_log_loss"] = float(m.log_loss(y, p))
        out[f"{name}_ne"] = float(m.normalized_entropy(y, p)) if both else float("nan")
        out[f"{name}_calibration"] = float(m.calibration(y, p)) if y.sum() > 0 else float("nan")
    return out


# ----------------------------------------------------------------------------- evaluation


def predict(
    ranker: model_lib.TrainedRanker,
    columns: Mapping[str, np.ndarray],
    *,
    tables: Mapping[str, np.ndarray] | None = None,
    batch_size: int = 16384,
) -> tuple[np.ndarray, np.ndarray]:
    """pCTR and pCVR of a trained ranker on impressions given as entity *rows*.

    Rows are gathered on the host from the ranker's (or the substituted) tables and
    scored with the pure serving score function, so this is exactly what a serving
    ranker computes from embeddings fetched from the embedding servers.

    Args:
      ranker: a TrainedRanker (from `train_and_evaluate` or `model.load_ranker`).
      columns: entity id column -> int [N] rows of the ranker's vocabulary (-1 = unknown:
        zero embedding), coarse feature -> int [N].
      tables: optional entity -> [R, D_e] replacement tables (e.g. INT4-dequantized).
      batch_size: scoring batch size.

    Returns:
      (p_ctr [N], p_cvr [N]) float32.
    """
    tables = dict(ranker.tables if tables is None else tables)
    for ent, dim in ranker.config.entity_dims:
        if ent not in tables:
            raise ValueError(f"predict: no table for entity {ent!r}")
        # Rows are clipped into the table below: one of fewer rows scored silently wrong.
        want = (len(ranker.vocabs[ent]), dim)
        if tuple(np.shape(tables[ent])) != want:
            raise ValueError(f"predict: the {ent!r} table has shape {tuple(np.shape(tables[ent]))}, "
                             f"the ranker's is {want} (vocabulary rows, width)")
    score = _jitted_score_fn(ranker.config)
    params = {k: jnp.asarray(v) for k, v in ranker.params.items()}
    coarse_names = [n for n, _ in ranker.config.coarse_vocab_sizes]
    n = len(next(iter(columns.values())))
    p_ctr = np.empty(n, np.float32)
    p_cvr = np.empty(n, np.float32)
    bs = max(1, min(batch_size, n))
    for lo in range(0, n, bs):
        hi = min(lo + bs, n)
        pad = bs - (hi - lo)
        emb = {}
        for ent, _dim in ranker.config.entity_dims:
            rows = np.asarray(columns[ranker.entity_columns[ent]][lo:hi], np.int64)
            tab = tables[ent]
            vals = np.asarray(tab[np.clip(rows, 0, len(tab) - 1)], np.float32)
            vals[rows < 0] = 0.0
            emb[ent] = np.pad(vals, ((0, pad), (0, 0)))
        coarse = {c: np.pad(np.asarray(columns[c][lo:hi], np.int32), (0, pad)) for c in coarse_names}
        ctr_l, cvr_l = score(params, entity_emb=emb, coarse_ids=coarse)
        p_ctr[lo:hi] = np.asarray(jax.nn.sigmoid(ctr_l))[: hi - lo]
        p_cvr[lo:hi] = np.asarray(jax.nn.sigmoid(cvr_l))[: hi - lo]
    return p_ctr, p_cvr


@functools.lru_cache(maxsize=16)
def _jitted_score_fn(config: model_lib.RankerConfig):
    # One compiled scorer per architecture, shared by every evaluation in the process.
    return jax.jit(model_lib.make_score_fn(config))


def evaluate_ranker(
    ranker: model_lib.TrainedRanker,
    columns: Mapping[str, np.ndarray],
    *,
    tables: Mapping[str, np.ndarray] | None = None,
    batch_size: int = 16384,
) -> dict[str, float]:
    """Evaluates a trained ranker (optionally with substituted tables) on one split.

    This is the hook the INT4 export uses: pass the dequantized tables as `tables`.

    Args:
      ranker: the trained ranker.
      columns: a split of `RankerData.splits` (rows, coarse features, click, conversion).
      tables: optional entity -> [R, D_e] replacement tables.
      batch_size: scoring batch size.

    Returns:
      `evaluate_predictions` metrics.
    """
    p_ctr, p_cvr = predict(ranker, columns, tables=tables, batch_size=batch_size)
    return evaluate_predictions(
        click=columns["click"], conversion=columns["conversion"], p_ctr=p_ctr, p_cvr=p_cvr
    )


def raw_to_rows(ranker: model_lib.TrainedRanker, raw: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Maps raw-id impression columns onto a trained ranker's rows (-1 for unknown ids).

    Args:
      ranker: the trained ranker.
      raw: column -> [N] (entity id columns hold raw ids; others pass through).

    Returns:
      The same columns with entity id columns as int64 rows.
    """
    out = dict(raw)
    for ent, col in ranker.entity_columns.items():
        out[col] = facets_lib.match_rows(np.asarray(raw[col]), ranker.vocabs[ent])
    return out


# ----------------------------------------------------------------------------- checkpoints


def _to_host(x) -> np.ndarray:
    """A whole array on this host, gathering the shards other processes hold."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def embedding_layout(ec, emb) -> dict[str, Any]:
    """Where each table's rows sit in `emb`'s storages: JSON saved as checkpoint meta.

    Args:
      ec: the EmbeddingCollection.
      emb: its EmbeddingState (arrays or ShapeDtypeStructs).

    Returns:
      {"storages": {key: {"shape", "dtype", "slots": {name: {"shape", "dtype"}}}},
       "placements": {table: {"storage", "row_base"}}}; `restore_train_state` reads it
      as meta["emb_layout"].
    """
    return {
        "storages": {
            key: {
                "shape": list(emb.tables[key].shape),
                "dtype": str(emb.tables[key].dtype),
                "slots": {
                    n: {"shape": list(v.shape), "dtype": str(v.dtype)}
                    for n, v in emb.slots[key].items()
                },
            }
            for key in emb.tables
        },
        "placements": {
            name: {"storage": pl.storage, "row_base": int(pl.row_base)}
            for name, pl in ec.plan.placements.items()
        },
    }



def _saved_target(layout: Mapping[str, Any], mesh: jax.sharding.Mesh, axis: str):
    """Abstract EmbeddingState of a saved layout, row-sharded on `mesh` where rows divide."""
    from jax_recsys import checkpoint as checkpoint_lib
    from jax_recsys.embedding import collection as collection_lib

    def sds(d):
        return jax.ShapeDtypeStruct(tuple(d["shape"]), jnp.dtype(d["dtype"]))

    st = layout["storages"]
    tree = collection_lib.EmbeddingState(
        tables={k: sds(v) for k, v in st.items()},
        slots={k: {n: sds(s) for n, s in v["slots"].items()} for k, v in st.items()},
    )
    # abstract_like falls back to replicated for leaves whose rows the mesh does not divide.
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axis))
    return checkpoint_lib.abstract_like(tree, rows)


def relayout_embedding_state(old_emb, old_layout: Mapping[str, Any], collection):
    """Moves tables and optimizer slots saved under another sharding plan onto `collection`'s.

    Plans differ when the device count changes (row padding to a multiple of the shard
    count) or the sharding type does (row-wise -> replicated, packed table-wise groups).
    Every table's [R, D] values and its slots' [R] / [R, D] rows are copied from the old
    storage (at the old row base) into the new storage (at the new row base); padding
    rows get the optimizer's initial slot values, as after `init`.

    Args:
      old_emb: EmbeddingState as saved (any sharding on the new mesh).
      old_layout: the `emb_layout` recorded at save time (storages and row bases).
      collection: the EmbeddingCollection to restore into.

    Returns:
      EmbeddingState in `collection`'s layout and shardings.
    """
    from jax_recsys.embedding import collection as collection_lib, optimizers as opt_lib

    shapes = collection.state_shapes()
    placements = old_layout["placements"]
    missing = sorted(set(collection.tables) - set(placements))
    if missing:
        raise ValueError(f"checkpoint has no tables {missing}; it has {sorted(placements)}")

    def build(old):
        tables, slots = {}, {}
        for key, st in collection.plan.storages.items():
            tab = jnp.zeros(shapes.tables[key].shape, shapes.tables[key].dtype)
            layout = opt_lib.slot_layout(st.optimizer)
            sl = {
                n: jnp.full(shapes.slots[key][n].shape, layout[n][1], shapes.slots[key][n].dtype)
                for n in layout
            }
            for name in st.tables:
                t = collection.tables[name]
                new_base = collection.plan.placements[name].row_base
                src = placements[name]
                ok, ob = src["storage"], int(src["row_base"])
                tab = tab.at[new_base : new_base + t.rows, : t.dim].set(
                    old.tables[ok][ob : ob + t.rows, : t.dim]
                )
                for n in sl:
                    if n not in old.slots[ok]:
                        raise ValueError(f"checkpoint of table {name!r} lacks optimizer slot {n!r}")
                    v = old.slots[ok][n]
                    if sl[n].ndim == 1:
                        sl[n] = sl[n].at[new_base : new_base + t.rows].set(v[ob : ob + t.rows])
                    else:
                        sl[n] = sl[n].at[new_base : new_base + t.rows, : t.dim].set(
                            v[ob : ob + t.rows, : t.dim]
                        )
            tables[key], slots[key] = tab, sl
        return collection_lib.EmbeddingState(tables=tables, slots=slots)

    out_shardings = jax.tree.map(lambda s: s.sharding, shapes)
    return jax.jit(build, out_shardings=out_shardings)(old_emb)


def _host_dense(state):
    """The state to save: dense params, optax state and step as host NumPy arrays.

    They are replicated; saved as jax.Arrays Orbax would slice every replica of every
    small leaf with one eager (compiled) op each: seconds per save on CPU.
    """
    if not hasattr(state, "emb"):  # the dense-only (params, opt_state, step) tuple
        return jax.tree.map(_to_host, state)
    return dataclasses.replace(
        state,
        params=jax.tree.map(_to_host, state.params),
        opt_state=jax.tree.map(_to_host, state.opt_state),
        step=_to_host(state.step),
    )


def _host_like(tree):
    """Host zeros shaped like `tree`'s leaves: an Orbax target that restores NumPy."""
    return jax.tree.map(lambda x: np.zeros(np.shape(x), getattr(x, "dtype", None)), tree)


def _device_like(host_tree, like):
    """Host leaves placed like the leaves of `like` (same shardings)."""
    return jax.tree.map(
        lambda h, x: jax.device_put(np.asarray(h, x.dtype), x.sharding)
        if isinstance(x, jax.Array) else h,
        host_tree, like)


def restore_train_state(ckpt, *, fresh_state, collection=None, step: int | None = None):
    """Restores a ranker training state onto this run's mesh and sharding plan.

    Works across device counts (8 -> 4 -> 1), process counts and sharding types
    (row-wise -> replicated): when the saved storage shapes equal this plan's, Orbax
    places every shard straight into the new shardings; otherwise the saved storages
    are read row-sharded (or replicated where rows do not divide) and moved with
    `relayout_embedding_state`.

    Args:
      ckpt: a `jax_recsys.checkpoint.Checkpointer`.
      fresh_state: a freshly initialised state of this run (the engine's TrainState,
        or the dense-only (params, opt_state, step) tuple): structure, dtypes and
        shardings of the target.
      collection: the EmbeddingCollection of a TrainState (None for dense-only).
      step: which checkpoint (None: the newest).

    Returns:
      (state, meta) with meta the JSON saved alongside.
    """
    step = ckpt.latest_step() if step is None else int(step)
    if step is None:
        raise FileNotFoundError(f"{ckpt.directory}: no checkpoint to restore")
    meta = ckpt.restore_meta(step)
    if collection is None:
        host, meta = ckpt.restore(step, target=_host_like(fresh_state))
        return _device_like(host, fresh_state), meta
    from jax_recsys.embedding import train_step as ts

    layout = meta.get("emb_layout")
    if layout is None:
        raise ValueError(f"{ckpt.directory}/{step}: checkpoint has no embedding layout")
    new_shapes = collection.state_shapes()
    same = set(layout["storages"]) == set(new_shapes.tables) and all(
        tuple(layout["storages"][k]["shape"]) == tuple(new_shapes.tables[k].shape)
        and {n: tuple(s["shape"]) for n, s in layout["storages"][k]["slots"].items()}
        == {n: tuple(s.shape) for n, s in new_shapes.slots[k].items()}
        for k in new_shapes.tables
    ) and all(  # equal shapes can still pack tables at other row bases
        layout["placements"].get(name) == {"storage": pl.storage, "row_base": int(pl.row_base)}
        for name, pl in collection.plan.placements.items()
    )
    emb_target = new_shapes if same else _saved_target(layout, collection.mesh, collection.axis)
    target = ts.TrainState(
        emb=emb_target,
        params=_host_like(fresh_state.params),
        opt_state=_host_like(fresh_state.opt_state),
        step=_host_like(fresh_state.step),
    )
    state, meta = ckpt.restore(step, target=target)
    emb = state.emb if same else relayout_embedding_state(state.emb, layout, collection)
    state = ts.TrainState(
        emb=emb,
        params=_device_like(state.params, fresh_state.params),
        opt_state=_device_like(state.opt_state, fresh_state.opt_state),
        step=_device_like(state.step, fresh_state.step),
    )
    return state, meta


# TrainConfig fields a resumed run may change: they do not change what is trained
# (logging, checkpointing, evaluation batching, table sharding: restore reshards).
# num_epochs is checked as the total step count; facet_paths as the used facets only.
_RESUMABLE_FIELDS = frozenset({
    "log_every", "checkpoint_every", "keep_checkpoints", "eval_batch_size", "table_sharding",
    "num_epochs", "facet_paths",
})


def _facet_digest(name: str, facet, path: str | None) -> str:
    """sha256 (16 hex) of the facet's facet.json, or of its content when it has no path."""
    digest = None if path is None else fsutil.file_digest(pathlib.Path(path) / "facet.json")
    if digest is not None:
        return digest
    content = {
        "facet": getattr(facet, "facet", name),
        "metrics": getattr(facet, "metrics", None),
        "tables": {k: [list(np.shape(t)), str(getattr(t, "dtype", ""))]
                   for k, t in sorted(getattr(facet, "tables", {}).items())},
    }
    text = json.dumps(content, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# DataConfig fields added after run fingerprints were first saved, with the value every
# run before them had: left out of `fingerprint_dict` at that value (as
# `facets._FINGERPRINT_OMITTED_DEFAULTS`), so finished runs and checkpoints are reused.
_DATA_FINGERPRINT_OMITTED_DEFAULTS = {"day_column": "day", "timestamp_column": "timestamp"}


def fingerprint_dict(config: TrainConfig) -> dict[str, Any]:
    """`dataclasses.asdict(config)` in the form run fingerprints hash.

    Each facet is its `FacetSpec.fingerprint_dict()`: a field added to FacetSpec after
    fingerprints were first saved is left out while it holds its default, so the runs and
    checkpoints of configs that do not set it keep their fingerprints; so are the
    DataConfig fields of `_DATA_FINGERPRINT_OMITTED_DEFAULTS`.

    Args:
      config: the run's config.

    Returns:
      The nested dict (entities and their facets as tuples of dicts).
    """
    out = dataclasses.asdict(config)
    out["data"] = {k: v for k, v in out["data"].items()
                   if not (k in _DATA_FINGERPRINT_OMITTED_DEFAULTS
                           and v == _DATA_FINGERPRINT_OMITTED_DEFAULTS[k])}
    out["entities"] = tuple({**dataclasses.asdict(e), "facets": tuple(f.fingerprint_dict() for f in e.facets)}
                            for e in config.entities)
    return out


def run_fingerprint(config: TrainConfig, facets: Mapping[str, Any]) -> dict[str, Any]:
    """What defines a ranker run, as a flat JSON dict saved with its checkpoints.

    Keys are the TrainConfig fields (nested dataclasses dotted: "model.mlp_dims"; in the
    form of `fingerprint_dict`) except `_RESUMABLE_FIELDS`, plus "facets.<name>.path"
    and "facets.<name>.digest" (of its facet.json) for every pretrained facet the run uses.
    """
    out: dict[str, Any] = {}

    def flatten(prefix: str, d: Mapping[str, Any]) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                flatten(f"{prefix}{k}.", v)
            else:
                out[prefix + k] = v

    flatten("", {k: v for k, v in fingerprint_dict(config).items()
                 if k not in _RESUMABLE_FIELDS})
    paths = dict(config.facet_paths)
    used = {f.source for e in config.entities for f in e.facets} - {facets_lib.SCRATCH}
    for name in sorted(used):
        out[f"facets.{name}.path"] = paths.get(name)
        out[f"facets.{name}.digest"] = _facet_digest(name, facets.get(name), paths.get(name))
    return json.loads(json.dumps(out, default=str))  # tuples -> lists, as saved


def _leaf_diffs(a, b, path: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted path, a's value, b's value) where the JSON values `a` and `b` differ: down
    to the field (`entities[user].facets[scratch].dim`) rather than two whole lists of
    entities; a list of plain values (`model.mlp_dims`) is one value."""
    missing = "<unset>"
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b), key=str)
                for d in _leaf_diffs(a.get(k, missing), b.get(k, missing),
                                     f"{path}.{k}" if path else str(k))]
    if isinstance(a, list) and isinstance(b, list) and a and b:
        la, lb = _labels(a), _labels(b)  # entities by name, facets by source
        if la is not None and lb is not None:
            out = [] if [k for k in la if k in lb] == [k for k in lb if k in la] else [
                (f"{path} order", list(la), list(lb))]
            return out + [d for k in [*la, *(k for k in lb if k not in la)]
                          for d in _leaf_diffs(la.get(k, missing), lb.get(k, missing),
                                               f"{path}[{k}]")]
    return [] if a == b else [(path, a, b)]


def _labels(items: list) -> dict[str, Any] | None:
    """A list of dicts keyed by their "name" (or else "source"), in order, when every item
    has one and no two share it; else None."""
    for key in ("name", "source"):
        if all(isinstance(x, dict) and isinstance(x.get(key), str) for x in items):
            out = {x[key]: x for x in items}
            return out if len(out) == len(items) else None
    return None


def _check_resume(meta, ckpt, *, config: TrainConfig, vocabs, total_steps: int,
                  fingerprint: Mapping[str, Any] | None = None,
                  log: Callable[[str], None] = print) -> None:
    """Refuses to resume a checkpoint of another run (names what differs). (One of
    another trainer is refused before, by the Checkpointer's `restore_meta`.)

    Args:
      meta: the checkpoint's meta.
      ckpt: its Checkpointer.
      config: this run's config.
      vocabs: this run's entity column -> raw ids.
      total_steps: this run's step count.
      fingerprint: this run's `run_fingerprint` (None: not checked), compared with the
        one saved as meta["run"]; a checkpoint saved without one resumes with a warning.
      log: where the warning goes.
    """
    where = f"{ckpt.directory}/{meta.get('step')}"
    if int(meta.get("seed", config.seed)) != config.seed:
        raise ValueError(f"{where}: checkpoint seed {meta['seed']} != config seed {config.seed}")
    if fingerprint is not None:
        saved_fp = meta.get("run")
        if saved_fp is None:
            log(f"ranker: WARNING: {where} was saved without a run fingerprint; resuming it "
                "without checking that its settings and facets are this run's")
        else:
            diffs = [f"{k} was {a!r}, now {b!r}" for k, a, b in _leaf_diffs(saved_fp, fingerprint)]
            if diffs:
                raise ValueError(f"{where}: the checkpoint belongs to another run: "
                                 f"{'; '.join(diffs)}; use a fresh workdir")
    saved = ckpt.restore_vocabs(int(meta["step"]))
    for col, ids in vocabs.items():
        if col in saved and not np.array_equal(np.asarray(saved[col]), np.asarray(ids)):
            raise ValueError(
                f"{where}: the {col!r} vocabulary differs from this run's data "
                f"({len(saved[col])} vs {len(ids)} ids): another data set or window?"
            )
    if int(meta["step"]) > total_steps:
        raise ValueError(
            f"{where}: checkpoint is at step {meta['step']}, past this run's {total_steps} steps"
        )


# ----------------------------------------------------------------------------- training


def _dense_tx(config: TrainConfig, total_steps: int) -> optax.GradientTransformation:
    if config.warmup_steps > 0:
        lr = optax.linear_schedule(0.0, config.dense_learning_rate, config.warmup_steps)
    else:
        lr = config.dense_learning_rate
    return optax.adamw(lr, weight_decay=config.dense_weight_decay)


def _make_loss_fn(config: TrainConfig, tables: list[facets_lib.FacetTable], coarse_names):
    by_entity: dict[str, list[str]] = {}
    for t in tables:
        by_entity.setdefault(t.entity, []).append(t.name)

    def loss_fn(*, rows, params, batch):
        emb = {
            ent: jnp.concatenate([rows[n] for n in names], axis=-1) if len(names) > 1 else rows[names[0]]
            for ent, names in by_entity.items()
        }
        coarse = {c: batch.ids[c] for c in coarse_names}
        ctr_logit, cvr_logit = params(entity_emb=emb, coarse_ids=coarse)
        return model_lib.esmm_loss(
            ctr_logit=ctr_logit,
            cvr_logit=cvr_logit,
            click=batch.labels["click"],
            conversion=batch.labels["conversion"],
            mask=batch.mask,
            cvr_weight=config.cvr_weight,
        )

    return loss_fn


def _init_dense(rcfg: model_lib.RankerConfig, *, seed: int):
    """`model_lib.init_dense` as one program compiled without backend optimisation.

    Eagerly every initializer compiles its own small program, and the optimised XLA
    CPU compile of the whole threefry-heavy init takes ~8 s: ~3x that of this unoptimised
    one, which runs once. (The values are deterministic, though not bit-equal to eager.)
    """
    graphdef = None

    def init():
        nonlocal graphdef
        graphdef, params = model_lib.init_dense(rcfg, seed=seed)
        return params

    lowered = jax.jit(init).lower()
    params = lowered.compile(compiler_options={"xla_backend_optimization_level": 0})()
    return graphdef, params


def _dense_only_step(loss_fn, graphdef, tx):
    """The same step shape as the engine's, for a ranker without ID tables."""

    def step(state, batch):
        params, opt_state, n = state

        def objective(p):
            return loss_fn(rows={}, params=nnx.merge(graphdef, p), batch=batch)

        (loss, aux), g = jax.value_and_grad(objective, has_aux=True)(params)
        updates, opt_state = tx.update(g, opt_state, params)
        params = optax.apply_updates(params, updates)
        return (params, opt_state, n + 1), {"loss": loss, **aux}

    return jax.jit(step, donate_argnums=(0,))


def train_and_evaluate(
    config: TrainConfig,
    workdir: str | pathlib.Path | None,
    *,
    data: RankerData | None = None,
    facets: Mapping[str, Any] | None = None,
    log: Callable[[str], None] = print,
    mesh: jax.sharding.Mesh | None = None,
    checkpoint_dir: str | pathlib.Path | None = None,
) -> dict[str, Any]:
    """Trains a ranker, saves it to WORKDIR/ranker, evaluates it, writes metrics.json.

    In a multi-process run every process calls this with the same arguments: the mesh
    spans every process's devices, each process reads its slice of each global batch,
    every process evaluates the gathered ranker (identical metrics everywhere) and only
    process 0 writes files.

    Args:
      config: the run's TrainConfig.
      workdir: output folder (None: nothing is written; the ranker is returned in the
        result under "ranker").
      data: prepared data to reuse across runs (None: `prepare_data(config.data, ...)`).
      facets: facet name -> loaded facet checkpoint to reuse (None: load
        `config.facet_paths` with `jax_recsys.checkpoint.load_facet`).
      log: progress printer.
      mesh: device mesh for the tables and the batch (None: all devices of all
        processes, axis "data").
      checkpoint_dir: Orbax checkpoint folder, used with `config.checkpoint_every > 0`:
        if it holds a checkpoint the run resumes from the newest one (any mesh, any
        process count), and the state is saved every that many steps and at the end.
        None or `checkpoint_every` 0: no checkpoints (the folder is neither read nor
        created, as in the pretrainers).

    Returns:
      metrics dict: "test" and "valid" task metrics, "facets" (found/missing ids per
      pretrained facet), "train" (steps, final loss, loss curve, examples/s), plus
      "ranker": the TrainedRanker object (not written to JSON).

    Raises:
      ValueError: (before any training) an empty train or test window, besides the
        errors of `prepare_data`.
    """
    from jax_recsys import distributed
    from jax_recsys.data.batching import BatchIterator

    t0 = time.time()
    id_columns = tuple(dict.fromkeys(e.column for e in config.entities))
    for split in ("train", "test"):
        w = getattr(config.data, f"{split}_window")
        if (split not in data.splits) if data is not None else (w == "" or w is None):
            raise ValueError(
                f"data.{split}_window is empty: the ranker needs a {split} window (a window "
                f"name of dataset.json such as 'ranker_{split}', or 'START,END' days); only "
                "valid_window may be empty (no validation)"
            )
    if data is None:
        data = prepare_data(config.data, id_columns=id_columns)
    missing_cols = [c for c in id_columns if c not in data.vocabs]
    if missing_cols:
        raise ValueError(f"prepared data lacks id columns {missing_cols}")
    if facets is None:
        needed = {f.source for e in config.entities for f in e.facets if f.source != facets_lib.SCRATCH}
        paths = dict(config.facet_paths)
        facets = {}
        for name in sorted(needed):
            if name not in paths:
                raise ValueError(f"facet {name!r} is used but config.facet_paths has no path for it")
            from jax_recsys import checkpoint

            facets[name] = checkpoint.load_facet(paths[name], expected=name)
    tables = facets_lib.resolve_facets(
        config.entities,
        vocabs={e.name: data.vocabs[e.column] for e in config.entities},
        facets=facets,
        table_learning_rate=config.table_learning_rate,
        finetune_lr_scale=config.finetune_lr_scale,
        seed=config.seed,
    )
    coarse_names = tuple(n for n, _ in data.coarse_sizes)
    rcfg = dataclasses.replace(
        config.model,
        entity_dims=facets_lib.entity_dims(tables),
        coarse_vocab_sizes=data.coarse_sizes,
    )
    graphdef, params = _init_dense(rcfg, seed=config.seed)
    train_cols = data.splits["train"]
    clicks = float(train_cols["click"].sum())
    model_lib.set_head_biases(
        params,
        ctr_rate=clicks / max(len(train_cols["click"]), 1),
        cvr_rate=float((train_cols["click"] * train_cols["conversion"]).sum()) / max(clicks, 1.0),
    )
    n_train = len(train_cols["click"])
    mesh = mesh or distributed.global_mesh()
    n_dev = int(np.prod(list(mesh.shape.values())))
    n_proc = jax.process_count()
    bs = max(n_dev, (config.batch_size // n_dev) * n_dev)
    if n_train < bs:  # was BatchIterator's "320 examples make no full batch of 512"
        fix = (f"lower batch_size to {n_train} or less" if n_train >= n_dev else
               f"it needs at least one impression per device ({n_dev})")
        raise ValueError(f"the train window has {n_train} impressions, fewer than one batch "
                         f"of {bs} (batch_size, batches are full): {fix}, or widen the "
                         "train window")
    steps_per_epoch = max(1, n_train // bs)
    total_steps = max(1, int(round(config.num_epochs * steps_per_epoch)))
    tx = _dense_tx(config, total_steps)
    loss_fn = _make_loss_fn(config, tables, coarse_names)

    feature_cols: dict[str, np.ndarray] = {}
    for t in tables:
        feature_cols[t.name] = train_cols[config_entity_column(config, t.entity)]
    for c in coarse_names:
        feature_cols[c] = train_cols[c]
    feature_cols["click"] = train_cols["click"]
    feature_cols["conversion"] = train_cols["conversion"]
    # batch_size is the global batch; each process reads only its B / n_proc slice.
    it = BatchIterator(
        feature_cols,
        batch_size=bs,
        id_features=[t.name for t in tables] + list(coarse_names),
        label_features=["click", "conversion"],
        shuffle=True,
        seed=config.seed,
        drop_remainder=True,
        process_index=jax.process_index(),
        process_count=n_proc,
    )

    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    ec = None
    if tables:
        from jax_recsys.embedding import collection as collection_lib, specs, train_step as ts

        tspecs = [
            specs.TableSpec(
                name=t.name,
                rows=len(data.vocabs[config_entity_column(config, t.entity)]),
                dim=t.dim,
                init_scale=t.init_scale,
                optimizer=specs.RowAdagrad(
                    learning_rate=t.learning_rate,
                    initial_accumulator=config.table_initial_accumulator,
                ),
            )
            for t in tables
        ]
        fspecs = [specs.FeatureSpec(name=t.name, table=t.name) for t in tables]
        overrides = {t.name: config.table_sharding for t in tables} if config.table_sharding else None
        ec = collection_lib.EmbeddingCollection(
            tables=tspecs, features=fspecs, mesh=mesh, overrides=overrides
        )
        frozen = [t.name for t in tables if not t.trainable]
        # The dense state comes back committed replicated on the mesh (one compilation).
        state = ts.init_train_state(
            collection=ec,
            key=jax.random.key(config.seed),
            params=params,
            dense_tx=tx,
            initial_values={t.name: t.values for t in tables if t.values is not None},
        )
        step_fn = ts.make_train_step(
            collection=ec, loss_fn=loss_fn, dense_tx=tx, model_graphdef=graphdef, frozen_tables=frozen
        )

        def put(batch):
            return ts.shard_batch(batch, mesh=mesh)
    else:
        # One process: the dense-only model lives on one device. Several processes: it is
        # replicated over the global mesh and the batch is assembled from every process.
        place = jax.devices()[0] if n_proc == 1 else replicated
        state = jax.device_put((params, tx.init(params), jnp.zeros((), jnp.int32)), place)
        step_fn = _dense_only_step(loss_fn, graphdef, tx)

        def put(batch):
            if n_proc == 1:
                return jax.tree.map(jnp.asarray, batch)
            return distributed.host_to_global(batch, mesh)

    curve: list = []
    loss_ema = None
    step = 0
    ckpt = None
    vocabs = {c: data.vocabs[c] for c in id_columns}
    fingerprint = run_fingerprint(config, facets)
    if checkpoint_dir is not None and config.checkpoint_every > 0:  # 0: no checkpoints at
        from jax_recsys import checkpoint as checkpoint_lib  # all, as in the pretrainers

        ckpt = checkpoint_lib.Checkpointer(checkpoint_dir, keep=config.keep_checkpoints,
                                           trainer="train_ranker")

    def save(force: bool):
        meta = {
            "step": step,
            "data": it.state(),
            "loss_ema": loss_ema,
            "loss_curve": [list(x) for x in curve],
            "total_steps": total_steps,
            "seed": config.seed,
            "batch_size": bs,
            "run": fingerprint,
            "emb_layout": embedding_layout(ec, state.emb) if ec is not None else None,
        }
        ckpt.save(step, _host_dense(state), meta, vocabs=vocabs, force=force)

    # Closed also when training raises (Checkpointer.__exit__): a save still being
    # written is finished before the error reaches the caller.
    with ckpt if ckpt is not None else contextlib.nullcontext():
        if ckpt is not None and ckpt.latest_step() is not None:
            # Checked before the state is read: another model would fail there less clearly.
            _check_resume(ckpt.restore_meta(), ckpt, config=config, vocabs=vocabs,
                          total_steps=total_steps, fingerprint=fingerprint, log=log)
            state, meta = restore_train_state(ckpt, fresh_state=state, collection=ec)
            it.restore(meta["data"])
            step = int(meta["step"])
            loss_ema = meta["loss_ema"]
            curve = [tuple(x) for x in meta["loss_curve"]]
            log(f"ranker: resumed from {ckpt.directory}/{step} ({step}/{total_steps} steps done)")
        log(
            f"ranker: {n_train} train impressions, batch {bs} over {n_dev} devices / {n_proc} "
            f"processes, {total_steps} steps, "
            f"tables {[(t.name, t.dim, 'ft' if t.trainable else 'frozen', t.learning_rate) for t in tables]}"
        )
        saving = ckpt is not None
        t_train = time.time()
        first_step = step
        t_first = t_train
        while step < total_steps:
            # next() only when a step will use the batch: the iterator position saved with
            # the state is then exactly the next step's batch.
            batch = next(it)
            state, metrics = step_fn(state, put(batch))
            loss = float(metrics["loss"])  # blocks on the step: keeps few programs in flight
            if step == first_step:
                t_first = time.time()  # the first step compiles: not throughput
            if not np.isfinite(loss):
                raise FloatingPointError(f"ranker loss is {loss} at step {step}")
            loss_ema = loss if loss_ema is None else 0.9 * loss_ema + 0.1 * loss
            step += 1
            if config.log_every and (step % config.log_every == 0 or step == total_steps):
                curve.append((step, loss_ema))
                log(
                    f"  step {step}/{total_steps} loss {loss:.4f} (ema {loss_ema:.4f}) "
                    f"ctr {float(metrics['bce_ctr']):.4f} ctcvr {float(metrics['bce_ctcvr']):.4f} "
                    f"{(step - 1 - first_step) * bs / max(time.time() - t_first, 1e-9):.0f} ex/s"
                )
            if saving and step % config.checkpoint_every == 0 and step < total_steps:
                save(force=False)
        if saving and ckpt.latest_step() != step:
            save(force=True)  # the final state: a run killed during evaluation skips training
    train_s = time.time() - t_train
    done = step - first_step
    steady_s = time.time() - t_first if done > 1 else float("nan")

    if ec is not None:
        # export_tables needs whole tables in this process: gather the shards first.
        host_emb = collection_lib.EmbeddingState(
            tables={k: _to_host(v) for k, v in state.emb.tables.items()}, slots={}
        )
        flat_tables = ec.export_tables(host_emb)
        dense_params = state.params
    else:
        flat_tables = {}
        dense_params = state[0]
    ranker = model_lib.TrainedRanker(
        config=rcfg,
        params=model_lib.flatten_params(jax.tree.map(_to_host, dense_params)),
        tables={
            ent: np.concatenate([flat_tables[t.name] for t in tables if t.entity == ent], axis=1)
            for ent, _ in rcfg.entity_dims
        },
        vocabs={e.name: data.vocabs[e.column] for e in config.entities},
        entity_columns={e.name: e.column for e in config.entities},
        facet_layout={
            ent: [(t.source, t.dim, t.trainable) for t in tables if t.entity == ent]
            for ent, _ in rcfg.entity_dims
        },
    )
    result: dict[str, Any] = {
        "train": {
            "steps": step,
            "batch_size": bs,
            "examples": step * bs,
            "final_loss_ema": loss_ema,
            "loss_curve": curve,
            "seconds": train_s,
            "examples_per_s": (done - 1) * bs / steady_s if done > 1 else float("nan"),
            "resumed_from_step": first_step,
        },
        "facets": [t.stats.as_dict() for t in tables if t.stats is not None],
        "windows": {k: list(v) for k, v in data.windows.items()},
    }
    for split in ("valid", "test"):
        if split in data.splits:
            result[split] = evaluate_ranker(
                ranker, data.splits[split], batch_size=config.eval_batch_size
            )
    result["seconds"] = time.time() - t0
    if "test" in result:
        te = result["test"]
        log(
            f"ranker test: CTR AUC {te['ctr_auc']:.4f}  CVR AUC {te['cvr_auc']:.4f}  "
            f"CTCVR AUC {te['ctcvr_auc']:.4f}  CTR NE {te['ctr_ne']:.4f}  ({result['seconds']:.0f}s)"
        )
    if workdir is not None and jax.process_index() == 0:
        workdir = pathlib.Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        model_lib.save_ranker(workdir / "ranker", ranker)
        (workdir / "metrics.json").write_text(
            json.dumps(result, indent=2, sort_keys=True, default=_json_default) + "\n"
        )
    result["ranker"] = ranker
    return result


def config_entity_column(config: TrainConfig, entity: str) -> str:
    """The impressions column of `entity` in `config`."""
    for e in config.entities:
        if e.name == entity:
            return e.column
    raise ValueError(f"no entity {entity!r} in the config")


def _json_default(x):
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)
