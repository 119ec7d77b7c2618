"""Training and held-out (user, pin) pairs for contrastive pretraining, from a dataset folder.

Positives come from an interactions table (the world's `engagements`, or any
user-brought table with `user_id`, `item_id` and `day` or `timestamp` columns) in
a day window [window_start, window_end), or a named window of the folder's
`dataset.json` splits (e.g. `fresh_pretrain`, `stale_pretrain`). Days come from
the `day` column, or, when the table has none, from `timestamp` as
timestamp // 86400 (the dataset folder's convention).
Each pair is weighted by its engagement type (`type_weights[t]`, configurable;
weight 1 when the table has no type column).

Conversions. The world's offsite `conversions` are (user, advertiser) events. Each
conversion in the window becomes ONE (user, pin) pair with weight
`conversion_weight`, the pin drawn uniformly (seeded, once at load) from that
advertiser's pins in the `items` table (item_id -> advertiser_id). Conversions of
advertisers with no pins are skipped (counted). So the user tower learns
user–advertiser affinity through the advertiser's pins.

Vocabularies: every user and pin in the training pairs gets a row, in ascending
raw-id order. Held-out pairs come from the later days [eval_start, eval_end)
(default: the `eval_days` days after the window), deduplicated; pairs whose user
or pin has no row are dropped (counted): they cannot be scored.

The pin sampling probabilities for the logQ correction are counted up front over
the training window (`pin_freq`, sums to 1 over the pin rows).

Batch order (`PairSchedule`): which pairs global step s reads is a pure function of
(seed, s): a per-epoch permutation seeded by (seed, epoch). A checkpoint's data
position is therefore just its step, and each process of a multi-process run reads
only its contiguous B / process_count slice of every batch.

Legend: P pairs, R pin rows, B global batch.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np


@dataclasses.dataclass(frozen=True, kw_only=True)
class ContrastiveDataConfig:
    """Where the positives come from.

    Attributes:
      path: dataset folder.
      table: interactions table name.
      user_column, item_column: id columns of that table.
      day_column: day column; when the table lacks it, days are derived from
        `timestamp_column`.
      timestamp_column: seconds; used only when there is no day column.
      type_column: engagement type column (absent -> every weight 1).
      type_weights: weight of engagement type t (t indexes the tuple; the world
        uses 0=save, 1=click, 2=closeup).
      window: a named day window of the folder (dataset.json "splits", aliases
        "fresh"/"stale" allowed) or "START,END" days (END exclusive, as the ranker's
        windows: `DatasetFolder.window_days`); a window and window_start/window_end
        together are refused. "auto": the folder's `fresh_pretrain` window when it
        has one and neither window_start nor window_end is given, else none.
      window_start, window_end: training days [start, end); None (and no
        `window`) = first day / the day `eval_days` before the last.
      eval_start, eval_end: held-out days [start, end); None = window_end /
        eval_start + eval_days.
      eval_days: default length of the held-out window.
      use_conversions: add conversion pairs when the folder has the tables.
      conversions_table, advertiser_column: the conversion log and its column.
      items_table: maps pins to advertisers (and side features).
      conversion_weight: weight of a conversion pair.
      pin_side_features: columns of the items table used as pin side features.
      max_eval_pairs: cap on held-out pairs (uniform sample, seeded).
      seed: for the conversion pin draw and the held-out sample.
    """

    path: str
    table: str = "engagements"
    user_column: str = "user_id"
    item_column: str = "item_id"
    day_column: str = "day"
    timestamp_column: str = "timestamp"
    type_column: str = "engagement_type"
    type_weights: tuple[float, ...] = (1.0, 1.0, 1.0)
    window: str | None = "auto"
    window_start: int | None = None
    window_end: int | None = None
    eval_start: int | None = None
    eval_end: int | None = None
    eval_days: int = 1
    use_conversions: bool = True
    conversions_table: str = "conversions"
    advertiser_column: str = "advertiser_id"
    items_table: str = "items"
    conversion_weight: float = 2.0
    pin_side_features: tuple[str, ...] = ()
    max_eval_pairs: int = 20000
    seed: int = 0

    def __post_init__(self):
        # A negative weight turns a positive pair's loss into one the training maximises.
        weights = {**{f"type_weights[{i}]": w for i, w in enumerate(self.type_weights)},
                   "conversion_weight": self.conversion_weight}
        for name, w in weights.items():
            if not (isinstance(w, int | float) and math.isfinite(w) and w >= 0):
                raise ValueError(f"{name} must be a finite number >= 0 (a pair's weight), "
                                 f"got {w!r}")
        # No held-out pairs: Recall@K and the popularity baseline would read 0.
        if self.eval_days < 1 or self.max_eval_pairs < 1:
            raise ValueError(f"eval_days and max_eval_pairs must be >= 1, got "
                             f"{self.eval_days}, {self.max_eval_pairs}")
        if self.seed < 0:  # NumPy's generators take none (was "expected non-negative integer")
            raise ValueError(f"data seed must be >= 0, got {self.seed}")
        # Was silently combined: window "stale" [0, 2) with window_end=4 trained on [0, 4).
        days = {k: v for k, v in (("window_start", self.window_start),
                                  ("window_end", self.window_end)) if v is not None}
        if self.window not in (None, "", "auto") and days:
            raise ValueError(
                f"give a named window or window_start/window_end, not both: window "
                f"{self.window!r} with {', '.join(f'{k}={v}' for k, v in days.items())} "
                f"(set window to '' to use the days)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ContrastivePairs:
    """Pairs as table rows, plus the vocabularies (raw ids in row order).

    Attributes:
      user_ids, pin_ids: raw ids of the user and pin rows ([R_user], [R]).
      train_user, train_pin: [P] int32 rows of the training pairs.
      train_weight: [P] float32 pair weights.
      eval_user, eval_pin: [Q] int32 rows of the held-out pairs.
      pin_freq: [R] float64 training frequency of each pin row (sums to 1).
      pin_side: side feature -> [R] int32 compact ids (-1 = missing).
      side_vocab_sizes: side feature -> number of values.
      stats: counts for the report (window, pairs, dropped held-out pairs...).
    """

    user_ids: np.ndarray
    pin_ids: np.ndarray
    train_user: np.ndarray
    train_pin: np.ndarray
    train_weight: np.ndarray
    eval_user: np.ndarray
    eval_pin: np.ndarray
    pin_freq: np.ndarray
    pin_side: dict[str, np.ndarray]
    side_vocab_sizes: dict[str, int]
    stats: dict


def _join_ids(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a`` then ``b`` as one id array, never narrowing either: strings keep their full
    width (a cast to ``a``'s fixed-width dtype cut "u1000" to "u1"), integers widen,
    and integer ids next to string ids become their decimal strings."""
    if a.dtype.kind in "iu" and b.dtype.kind in "iu" or a.dtype.kind == b.dtype.kind:
        return np.concatenate([a, b])
    return np.concatenate([a.astype(np.str_), b.astype(np.str_)])


def _days(cols: dict[str, np.ndarray], cfg: ContrastiveDataConfig, folder, table: str
          ) -> np.ndarray:
    """Each row's day by the folder's rule (`folder.row_days`), errors naming the file."""
    from jax_recsys.data import folder as folder_lib

    return folder_lib.row_days(cols, day_column=cfg.day_column,
                               timestamp_column=cfg.timestamp_column,
                               file=folder.table_path(table))[0]


def _columns(folder, table: str, wanted: list[str], path: str) -> dict[str, np.ndarray]:
    # A missing table is the folder's DataError (it names a table.csv.gz beside it).
    cols = folder.table(table)
    missing = [c for c in wanted if c not in cols]
    if missing:
        raise ValueError(
            f"{path}: table {table!r} lacks column(s) {missing}; it has {sorted(cols)}"
        )
    for c in wanted:  # one value per row (a reader keeps other columns' extra dimensions)
        shape = np.shape(cols[c])
        if len(shape) != 1:
            raise folder.error(table, f"column must be 1-D (one value per row), got shape "
                               f"{shape}", column=c)
    return cols


def _lookup(vocab_sorted: np.ndarray, raw: np.ndarray) -> np.ndarray:
    """Rows of `raw` in a sorted vocabulary, -1 where absent."""
    if vocab_sorted.size == 0:
        return np.full(raw.shape, -1, np.int64)
    pos = np.searchsorted(vocab_sorted, raw)
    pos_c = np.minimum(pos, vocab_sorted.size - 1)
    return np.where(vocab_sorted[pos_c] == raw, pos_c, -1)


def load_pairs(cfg: ContrastiveDataConfig, folder=None) -> ContrastivePairs:
    """Reads training and held-out pairs from a dataset folder.

    Args:
      cfg: what to read.
      folder: an open DatasetFolder (default: opened from `cfg.path`).

    Returns:
      The pairs, vocabularies and logQ frequencies.

    Raises:
      ValueError: naming the folder, table and column when something is missing,
        or when the training window holds no pairs.
    """
    if folder is None:
        from jax_recsys.data.folder import DatasetFolder

        folder = DatasetFolder(cfg.path)
    rng = np.random.default_rng(cfg.seed)
    cols = _columns(folder, cfg.table, [cfg.user_column, cfg.item_column], cfg.path)
    users = np.asarray(cols[cfg.user_column])
    items = np.asarray(cols[cfg.item_column])
    days = _days(cols, cfg, folder, cfg.table)
    if cfg.type_column in cols:
        types = np.asarray(cols[cfg.type_column]).astype(np.int64)
        tw = np.asarray(cfg.type_weights, np.float32)
        bad = (types < 0) | (types >= tw.size)
        if bad.any():
            raise ValueError(
                f"{cfg.path}: table {cfg.table!r} column {cfg.type_column!r} has value "
                f"{int(types[bad][0])} outside [0, {tw.size}) of type_weights {cfg.type_weights}"
            )
        weights = tw[types]
    else:
        weights = np.ones(users.shape, np.float32)

    last_day = int(days.max()) if days.size else 0
    first_day = int(days.min()) if days.size else 0  # min(initial=0) read 0 for days 20454..
    window = cfg.window
    if window == "auto":  # explicit days override it
        explicit = (cfg.window_start, cfg.window_end) != (None, None)
        window = "fresh_pretrain" if "fresh_pretrain" in folder.splits and not explicit else None
    named = folder.window_days(window) if window else None
    w_end = (cfg.window_end if cfg.window_end is not None
             else named[1] if named else last_day + 1 - cfg.eval_days)
    w_start = (cfg.window_start if cfg.window_start is not None
               else named[0] if named else first_day)
    e_start = cfg.eval_start if cfg.eval_start is not None else w_end
    e_end = cfg.eval_end if cfg.eval_end is not None else e_start + cfg.eval_days
    in_train = (days >= w_start) & (days < w_end)
    in_eval = (days >= e_start) & (days < e_end)
    tr_u, tr_p, tr_w = users[in_train], items[in_train], weights[in_train]
    stats = {
        "window": window or "",
        "window_start": int(w_start), "window_end": int(w_end),
        "eval_start": int(e_start), "eval_end": int(e_end),
        "engagement_pairs": int(tr_u.size),
    }

    conv_pairs = 0
    use_conversions = cfg.use_conversions and folder.has_table(cfg.conversions_table)
    if use_conversions and not folder.has_table(cfg.items_table):  # were left out without a word
        logging.warning("contrastive data: table %r is not used: conversions become pairs "
                        "through the %r table (%s -> %s), which %s lacks", cfg.conversions_table,
                        cfg.items_table, cfg.advertiser_column, cfg.item_column, cfg.path)
        use_conversions = False
    if use_conversions:
        conv = _columns(folder, cfg.conversions_table,
                        [cfg.user_column, cfg.advertiser_column], cfg.path)
        it = _columns(folder, cfg.items_table, [cfg.item_column, cfg.advertiser_column],
                      cfg.path)
        cdays = _days(conv, cfg, folder, cfg.conversions_table)
        keep = (cdays >= w_start) & (cdays < w_end)
        c_user = np.asarray(conv[cfg.user_column])[keep]
        c_adv = np.asarray(conv[cfg.advertiser_column])[keep]
        it_pin = np.asarray(it[cfg.item_column])
        it_adv = np.asarray(it[cfg.advertiser_column])
        order = np.argsort(it_adv, kind="stable")
        adv_sorted, pin_by_adv = it_adv[order], it_pin[order]
        lo = np.searchsorted(adv_sorted, c_adv, "left")
        hi = np.searchsorted(adv_sorted, c_adv, "right")
        has = hi > lo
        pick = lo[has] + (rng.random(int(has.sum())) * (hi - lo)[has]).astype(np.int64)
        c_pin = pin_by_adv[pick]
        conv_pairs = int(has.sum())
        stats["conversions_without_pins"] = int((~has).sum())
        tr_u = _join_ids(tr_u, c_user[has])
        tr_p = _join_ids(tr_p, c_pin)
        tr_w = np.concatenate([tr_w, np.full(conv_pairs, cfg.conversion_weight, np.float32)])
    stats["conversion_pairs"] = conv_pairs
    if tr_u.size == 0:
        raise ValueError(
            f"{cfg.path}: no training pairs in table {cfg.table!r} for days "
            f"[{w_start}, {w_end}) (data has days {first_day}..{last_day})"
        )

    user_ids, train_user = np.unique(tr_u, return_inverse=True)
    pin_ids, train_pin = np.unique(tr_p, return_inverse=True)
    counts = np.bincount(train_pin, minlength=pin_ids.size).astype(np.float64)

    ev_u = _lookup(user_ids, users[in_eval])
    ev_p = _lookup(pin_ids, items[in_eval])
    ok = (ev_u >= 0) & (ev_p >= 0)
    pairs = np.unique(np.stack([ev_u[ok], ev_p[ok]], axis=1), axis=0)
    stats["eval_pairs_total"] = int(in_eval.sum())
    stats["eval_pairs_unseen_dropped"] = int((~ok).sum())
    if pairs.shape[0] > cfg.max_eval_pairs:
        pairs = pairs[np.sort(rng.choice(pairs.shape[0], cfg.max_eval_pairs, replace=False))]
    stats["eval_pairs"] = int(pairs.shape[0])
    if not stats["eval_pairs"]:
        logging.warning("contrastive data: no held-out pairs in days [%d, %d) (%d there, %d of "
                        "users or pins not in training): Recall@K and NDCG@K will be NaN",
                        e_start, e_end, stats["eval_pairs_total"],
                        stats["eval_pairs_unseen_dropped"])

    pin_side, side_sizes = {}, {}
    if cfg.pin_side_features:
        it = _columns(folder, cfg.items_table, [cfg.item_column, *cfg.pin_side_features],
                      cfg.path)
        row = _lookup(pin_ids, np.asarray(it[cfg.item_column]))
        found = row >= 0
        for name in cfg.pin_side_features:
            values, compact = np.unique(np.asarray(it[name])[found], return_inverse=True)
            side = np.full(pin_ids.size, -1, np.int32)
            side[row[found]] = compact
            pin_side[name], side_sizes[name] = side, int(max(values.size, 1))
    stats.update(users=int(user_ids.size), pins=int(pin_ids.size), train_pairs=int(tr_u.size))
    logging.info("contrastive data: %s", stats)
    return ContrastivePairs(
        user_ids=user_ids, pin_ids=pin_ids,
        train_user=train_user.astype(np.int32), train_pin=train_pin.astype(np.int32),
        train_weight=tr_w.astype(np.float32),
        eval_user=pairs[:, 0].astype(np.int32), eval_pin=pairs[:, 1].astype(np.int32),
        pin_freq=counts / counts.sum(), pin_side=pin_side, side_vocab_sizes=side_sizes,
        stats=stats,
    )


# ----------------------------------------------------------------------------- batch schedule


@dataclasses.dataclass(frozen=True, kw_only=True)
class PairSchedule:
    """Which training pairs each global step reads: a pure function of (seed, step).

    Epoch e visits the P pairs in the order `permutation(P)` drawn from
    `default_rng([seed, e])`, B at a time; the last P mod B pairs of each epoch are
    skipped (fixed batch shapes). With P < B every epoch is one padded batch. So the
    data position of a checkpoint is just the step count, stored as
    (epoch, step_in_epoch) for readability, and a resumed run reads the same
    batches as an uninterrupted one, on any number of processes.

    Attributes:
      num_pairs: P.
      batch_size: B (global).
      seed: permutation seed.
    """

    num_pairs: int
    batch_size: int
    seed: int

    def __post_init__(self):
        if self.num_pairs < 1 or self.batch_size < 1:
            raise ValueError(f"num_pairs and batch_size must be >= 1, got "
                             f"{self.num_pairs}, {self.batch_size}")

    @property
    def steps_per_epoch(self) -> int:
        return max(self.num_pairs // self.batch_size, 1)

    def position(self, step: int) -> dict[str, int]:
        """{"epoch", "step_in_epoch"} of 0-based global `step` (what a checkpoint stores)."""
        epoch, i = divmod(int(step), self.steps_per_epoch)
        return {"epoch": epoch, "step_in_epoch": i}

    def permutation(self, epoch: int) -> np.ndarray:
        """[P] the pair order of `epoch`."""
        return np.random.default_rng([self.seed, int(epoch)]).permutation(self.num_pairs)

    def indices(self, step: int, *, perm: np.ndarray | None = None, process_index: int = 0,
                process_count: int = 1) -> np.ndarray:
        """Pair indices of 0-based global `step`, padded with -1 to B, this process's part.

        Args:
          step: 0-based global step.
          perm: `permutation(epoch)` of the step's epoch, if the caller caches it.
          process_index, process_count: which contiguous B / process_count slice to return.

        Returns:
          int64 [B / process_count] pair indices (-1 = padding).
        """
        b = self.batch_size
        if b % process_count:
            raise ValueError(f"batch_size {b} must divide by the {process_count} processes")
        pos = self.position(step)
        if perm is None:
            perm = self.permutation(pos["epoch"])
        i = pos["step_in_epoch"]
        idx = perm[i * b : (i + 1) * b]
        idx = np.concatenate([idx, np.full(b - idx.size, -1, idx.dtype)])
        b_p = b // process_count
        return idx[process_index * b_p : (process_index + 1) * b_p]
