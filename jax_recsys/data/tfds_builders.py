"""TFDS builders over a dataset folder, stored as ArrayRecord (no TensorFlow needed).

Two ``tfds.core.GeneratorBasedBuilder`` subclasses turn tables of a dataset folder
(see :mod:`jax_recsys.data.folder`) into ``array_record`` files with random access:

* :class:`AdsImpressions` -- the ``impressions`` table, split into ``train`` /
  ``valid`` / ``test`` by the day windows of ``dataset.json`` (``ranker_train``,
  ``ranker_valid``, ``ranker_test``), every column a scalar feature (user_id,
  item_id, advertiser_id, day, timestamp, click, conversion and the coarse features).
  An empty click/conversion cell of a text table is a label not known yet: NaN (the
  column is then float32), as the ranker's training reads it. Other column names
  (``id_columns``, ``click_column``, ``conversion_column``, ``day_column``,
  ``timestamp_column``) are given as the ranker's ``DataConfig`` gives them.
* :class:`Engagements` -- user-pin pretraining pairs: the ``engagements`` table in one
  day window (default ``fresh_pretrain``); ``train`` is the window, and with
  ``holdout_days > 0`` its last days form a ``valid`` split.

A window is a name of ``dataset.json``'s ``splits`` (or its alias), ``"START,END"``
days (END exclusive; what a folder without ``dataset.json`` needs) or a pair, read by
``DatasetFolder.window_days`` as the ranker and ``serving_check`` read theirs.

Usage (never ``tfds.load``/``as_dataset``, which need TensorFlow)::

    b = AdsImpressions(source_dir="data/world", data_dir="data/tfds")
    b.download_and_prepare()
    ds = b.as_data_source("train")        # random access: ds[i] -> dict of NumPy scalars
    cols = read_columns(ds)               # column arrays for BatchIterator

Feature types follow the column dtypes: integers -> int64, floats -> float32, strings
-> ``Text`` (read back as bytes). Examples keep the table's (day) order
(``disable_shuffling=True``); shuffle in :class:`~jax_recsys.data.batching.BatchIterator`.
The config name encodes the source folder's ``dataset.json``, the builder options and
the size and modification time of the table's files, so two folders (or two windows,
or a table before and after an edit) never share prepared files in one ``data_dir``.

Dimension legend: N examples in a split.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import os
import pathlib
import re
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds

from jax_recsys.data.folder import DataError, DatasetFolder, select_days

_CHUNK = 65536


@dataclasses.dataclass
class FolderConfig(tfds.core.BuilderConfig):
    """A builder config tied to one dataset folder.

    Attributes:
      source_dir: the dataset folder (absolute path).
      options: JSON of the builder options (windows, table, ...).
    """

    source_dir: str = ""
    options: str = "{}"


def _feature_for(name: str, col: np.ndarray) -> tfds.features.FeatureConnector:
    kind = col.dtype.kind
    if col.ndim != 1:
        raise DataError(f"only 1-D columns are supported, got shape {col.shape}", column=name)
    if kind in "iub":
        return tfds.features.Scalar(np.int64)
    if kind == "f":
        return tfds.features.Scalar(np.float32)
    if kind in "US":
        return tfds.features.Text()
    raise DataError(f"unsupported column dtype {col.dtype}", column=name)


def _config_name(folder: DatasetFolder, options: Mapping, table: str) -> str:
    """``<dataset name>_<hash>``; the hash covers the folder path, ``dataset.json``,
    the options and (relative path, size, mtime_ns) of every file of ``table``, so
    editing the table gives a new name instead of stale prepared records."""
    meta = folder.path / "dataset.json"
    h = hashlib.sha1()
    h.update(str(folder.path.resolve()).encode())
    h.update(meta.read_bytes() if meta.exists() else b"")
    h.update(json.dumps(options, sort_keys=True).encode())
    for f in folder.table_files(table):
        st = f.stat()
        # relpath: a table linked in from outside the folder is "../...", not a ValueError.
        rel = pathlib.Path(os.path.relpath(f.resolve(), folder.path.resolve())).as_posix()
        h.update(json.dumps([rel, st.st_size, st.st_mtime_ns]).encode())
    base = re.sub(r"[^a-z0-9_]+", "_", str(folder.meta.get("name") or folder.path.name).lower())
    return f"{base.strip('_') or 'folder'}_{h.hexdigest()[:10]}"


class _FolderBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Common part: one table of a dataset folder, split by day windows."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    TABLE = ""
    REQUIRED: tuple[str, ...] = ()
    # Label columns: an empty cell of a text table is a label not known yet (NaN), as
    # the trainer reads it (folder kinds "label").
    LABELS: tuple[str, ...] = ()

    def __init__(self, *, source_dir: str | os.PathLike, data_dir: str | os.PathLike | None,
                 options: Mapping, config_name: str | None = None, day_column: str = "day",
                 timestamp_column: str = "timestamp"):
        self._day_column, self._timestamp_column = day_column, timestamp_column
        self._folder = DatasetFolder(source_dir)
        self._folder.table_path(self.TABLE)  # a DataError naming a table.csv.gz beside it
        self._options = dict(options)
        config = FolderConfig(
            name=config_name or _config_name(self._folder, self._options, self.TABLE),
            version=self.VERSION,
            source_dir=str(self._folder.path.resolve()),
            options=json.dumps(self._options, sort_keys=True),
            description=f"{self.TABLE} of {self._folder.path}",
        )
        super().__init__(data_dir=None if data_dir is None else str(data_dir), config=config,
                         file_format="array_record")

    # -- subclasses say which windows become which splits
    def _windows(self) -> dict[str, tuple[int, int]]:
        raise NotImplementedError

    def _columns(self) -> dict[str, np.ndarray]:
        cols = self._folder.table(self.TABLE, kinds=dict.fromkeys(self.LABELS, "label"))
        missing = [c for c in self.REQUIRED if c not in cols]
        if missing:
            raise DataError(f"table {self.TABLE!r} lacks required columns {missing} "
                            f"(has {sorted(cols)})", file=self._folder.table_path(self.TABLE))
        return cols

    def _info(self) -> tfds.core.DatasetInfo:
        cols = self._columns()
        features = {name: _feature_for(name, np.asarray(col[:1])) for name, col in cols.items()}
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.__doc__,
            features=tfds.features.FeaturesDict(features),
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(source_dir=str(self._folder.path),
                                            windows={k: list(v) for k, v in
                                                     self._windows().items()}),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        cols = self._columns()
        return {split: self._generate_examples(cols=cols, window=window)
                for split, window in self._windows().items()}

    def _generate_examples(self, *, cols: Mapping[str, np.ndarray],
                           window: tuple[int, int]) -> Iterator[tuple[int, dict]]:
        part = select_days(cols, window[0], window[1], day_column=self._day_column,
                           timestamp_column=self._timestamp_column,
                           file=self._folder.table_path(self.TABLE))
        names = list(part)
        for k in names:
            col = part[k]
            if col.dtype.kind == "u" and len(col) and col.max() > np.iinfo(np.int64).max:
                # The int64 feature's encoder would fail with an OverflowError traceback.
                raise DataError(f"uint64 value {col.max()} beyond the int64 range of the "
                                "integer feature", file=self._folder.table_path(self.TABLE),
                                column=k)
        n = len(part[names[0]])
        for c0 in range(0, n, _CHUNK):
            chunk = {k: np.asarray(part[k][c0:c0 + _CHUNK]).tolist() for k in names}
            for i in range(len(chunk[names[0]])):
                yield c0 + i, {k: chunk[k][i] for k in names}


class AdsImpressions(_FolderBuilder):
    """Ad impressions with click/conversion labels, split by the ranker day windows.

    Args:
      source_dir: the dataset folder.
      data_dir: where TFDS writes the prepared files (TFDS default if None).
      windows: split -> window name, ``"START,END"`` days (END exclusive, as the
        ranker's ``--config.data.*_window``) or (start_day, end_day); default
        ``{"train": "train", "valid": "valid", "test": "test"}`` (aliases of the
        ``ranker_*`` windows in dataset.json).
      table: the impressions table's name.
      config_name: override the derived config name.
      id_columns: columns the table must have besides the labels (the ranker's entity
        columns, ``--config.entities``).
      click_column, conversion_column: the label columns (an empty text cell: NaN).
      day_column, timestamp_column: an impression's day, or, when the table has no
        day column, its seconds (day = seconds // 86400), as the ranker's
        ``DataConfig`` reads them.
    """

    TABLE = "impressions"
    REQUIRED = ("user_id", "item_id", "click", "conversion")
    LABELS = ("click", "conversion")

    def __init__(self, *, source_dir: str | os.PathLike, data_dir=None,
                 windows: Mapping[str, str | Sequence[int]] | None = None,
                 table: str = "impressions", config_name: str | None = None,
                 id_columns: Sequence[str] = ("user_id", "item_id"),
                 click_column: str = "click", conversion_column: str = "conversion",
                 day_column: str = "day", timestamp_column: str = "timestamp"):
        self.TABLE = table
        self.REQUIRED = (*id_columns, click_column, conversion_column)
        self.LABELS = (click_column, conversion_column)
        windows = dict(windows or {"train": "train", "valid": "valid", "test": "test"})
        self._window_spec = windows
        options = {"table": table, "windows": windows, **_renamed(
            AdsImpressions.__init__, id_columns=tuple(id_columns), click_column=click_column,
            conversion_column=conversion_column, day_column=day_column,
            timestamp_column=timestamp_column)}
        super().__init__(source_dir=source_dir, data_dir=data_dir, config_name=config_name,
                         options=options, day_column=day_column,
                         timestamp_column=timestamp_column)

    def _windows(self) -> dict[str, tuple[int, int]]:
        return {split: self._folder.window_days(w) for split, w in self._window_spec.items()}


class Engagements(_FolderBuilder):
    """Organic user-pin engagements in one day window: contrastive pretraining pairs.

    Args:
      source_dir: the dataset folder.
      data_dir: where TFDS writes the prepared files.
      window: window name in dataset.json (default "pretrain" = ``fresh_pretrain``;
        "stale" for the stale window), ``"START,END"`` days (END exclusive) or
        (start_day, end_day).
      holdout_days: the window's last days form a ``valid`` split (0: no valid split).
      table: the engagements table's name.
      config_name: override the derived config name.
      user_column, item_column: the pair's columns.
      day_column, timestamp_column: an engagement's day, or, when the table has no day
        column, its seconds (day = seconds // 86400), as ``pretrain_contrastive``'s
        ``--config.data.*`` names them.
    """

    TABLE = "engagements"
    REQUIRED = ("user_id", "item_id")

    def __init__(self, *, source_dir: str | os.PathLike, data_dir=None,
                 window: str | Sequence[int] = "pretrain", holdout_days: int = 0,
                 table: str = "engagements", config_name: str | None = None,
                 user_column: str = "user_id", item_column: str = "item_id",
                 day_column: str = "day", timestamp_column: str = "timestamp"):
        self.TABLE = table
        self.REQUIRED = (user_column, item_column)
        if holdout_days < 0:
            raise ValueError(f"holdout_days must be >= 0, got {holdout_days}")
        self._window_spec = window if isinstance(window, str) else [int(x) for x in window]
        self._holdout_days = int(holdout_days)
        options = {"table": table, "window": self._window_spec,
                   "holdout_days": self._holdout_days, **_renamed(
                       Engagements.__init__, user_column=user_column, item_column=item_column,
                       day_column=day_column, timestamp_column=timestamp_column)}
        super().__init__(source_dir=source_dir, data_dir=data_dir, config_name=config_name,
                         options=options, day_column=day_column,
                         timestamp_column=timestamp_column)

    def _windows(self) -> dict[str, tuple[int, int]]:
        start, end = self._folder.window_days(self._window_spec)
        if self._holdout_days == 0:
            return {"train": (start, end)}
        cut = end - self._holdout_days
        if cut <= start:
            raise DataError(f"holdout_days={self._holdout_days} leaves no training days in "
                            f"[{start}, {end})", file=self._folder.path / "dataset.json")
        return {"train": (start, cut), "valid": (cut, end)}


def _renamed(init, **names) -> dict:
    """The column names of ``names`` that differ from ``init``'s defaults: only those
    enter a builder's options (its config name), so records prepared before the
    builders took column names keep their name."""
    defaults = inspect.signature(init).parameters
    return {k: v for k, v in names.items() if v != defaults[k].default}


def read_columns(data_source, *, columns: Sequence[str] | None = None,
                 chunk: int = _CHUNK) -> dict[str, np.ndarray]:
    """Reads a whole split of ``builder.as_data_source(split)`` into column arrays.

    Args:
      data_source: a TFDS data source (random access, ``len``).
      columns: features to keep (default all).
      chunk: records read per batch of indices.

    Returns:
      column -> [N] array (ints int64, floats float32, text as ``np.str_``).
    """
    n = len(data_source)
    if n == 0:
        raise DataError("empty split")
    parts: dict[str, list] = {}
    for c0 in range(0, n, chunk):
        idx = list(range(c0, min(c0 + chunk, n)))
        getitems = getattr(data_source, "__getitems__", None)
        records = getitems(idx) if getitems else [data_source[i] for i in idx]
        names = columns or list(records[0])
        for k in names:
            parts.setdefault(k, []).extend(r[k] for r in records)
    out = {}
    for k, vals in parts.items():
        arr = np.asarray(vals)
        if arr.dtype.kind == "S":
            arr = np.char.decode(arr, "utf-8")
        out[k] = arr
    return out


def prepare(builder: tfds.core.DatasetBuilder) -> tfds.core.DatasetBuilder:
    """Runs ``download_and_prepare`` (no-op when already prepared) and returns the builder."""
    builder.download_and_prepare()
    return builder


__all__ = ["AdsImpressions", "Engagements", "FolderConfig", "prepare", "read_columns"]
