"""Dataset folder format: the on-disk contract between data producers and trainers.

A dataset folder holds tables (interactions, impressions, feature tables), an
optional knowledge graph and an optional ``dataset.json`` describing them:

```
DIR/
  dataset.json                 optional (see below); absent -> tables are discovered
  <table>.csv | <table>.tsv    header row, one example per line
  <table>/<column>.npy         one .npy per column, all of the same length
  kg/train.txt valid.txt test.txt [entity_types.tsv]
```

``dataset.json``::

    {"format_version": 1, "name": str, "num_days": int | null,
     "tables": {name: {"path": rel, "columns": [...], "rows": int}},
     "kg": "kg" | null,
     "splits": {window_name: [start_day, end_day]}}     # half-open day windows

Left out, "tables" and "kg" are found as without ``dataset.json`` (one written only
for its "splits"); ``"kg": null`` means no graph.

Writers: :func:`write_table` (one shot), :class:`TableWriter` (streaming: chunks
are appended to the ``.npy`` column files and the npy header is fixed at
``close()``, so producers never hold a whole table in memory) and
:func:`write_dataset_json`. Reader: :class:`DatasetFolder`; ``.npy`` columns
are memory-mapped, CSV/TSV columns are parsed with their header (integers ->
int64, other numbers -> float64, anything else -> ``np.str_`` ids; ``*_id``
columns are int64 only if every spelling is canonical, else ``np.str_``, and
whitespace around an id is not part of it; an
empty cell is an error unless the reader is told the column holds labels, where it
is a label not known yet: NaN). Text files are UTF-8 (anything else is a DataError naming
the line of the first byte that is not) and may start with byte-order marks (one, or
more where tools re-saved the file: they are not part of the first column's name); a
first line ``sep=X`` (Excel's) names the separator; a NUL character in a value is a
DataError (NumPy strings drop trailing NULs: ``"a\\x00"`` would become the id ``"a"``). Labels and
times (:data:`NUMERIC_COLUMNS`) must be 1-D numbers in ``.npy`` tables (other columns
may have trailing dimensions: e.g. a list of ids per row; a consumer checks the columns
it uses); ``timestamp`` and ``day``
values must be finite and within int64 range (a NaN day would fall outside every
window and drop its row).

Bad input raises :class:`DataError` (a ``ValueError``) naming the file, the
column and the line. Nothing is dropped silently: ``on_bad_lines="skip"``
skips ragged or unparsable lines and reports how many (a warning and
``DatasetFolder.skipped``).

Dimension legend: R rows of a table.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import pathlib
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

FORMAT_VERSION = 1

# Columns that must hold numbers wherever they appear (a string there is an error).
NUMERIC_COLUMNS = frozenset(
    {"timestamp", "day", "click", "conversion", "engagement_type", "label", "weight"}
)

# Columns that give a row's time; a float value must be finite and fit in int64.
TIME_COLUMNS = ("timestamp", "day")
_INT64_BOUND = 2.0**63

# Day-window aliases accepted by DatasetFolder.day_window.
WINDOW_ALIASES = {
    "train": "ranker_train",
    "valid": "ranker_valid",
    "test": "ranker_test",
    "pretrain": "fresh_pretrain",
    "stale": "stale_pretrain",
    "fresh": "fresh_pretrain",
}

_NPY_HEADER_BYTES = 256  # fixed-size header so TableWriter can rewrite it in place


class DataError(ValueError):
    """Bad input data; the message names the file, column and line where known.

    Attributes:
      file: the offending file (str) or None.
      column: the offending column or None.
      line: 1-based line number in the file (header = line 1) or None.
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | os.PathLike | None = None,
        column: str | None = None,
        line: int | None = None,
    ):
        self.file = None if file is None else str(file)
        self.column = column
        self.line = line
        where = []
        if self.file is not None:
            where.append(self.file + (f":{line}" if line is not None else ""))
        elif line is not None:
            where.append(f"line {line}")
        if column is not None:
            where.append(f"column {column!r}")
        prefix = ", ".join(where)
        super().__init__(f"{prefix}: {message}" if prefix else message)


# --------------------------------------------------------------------------- writers


def _check_columns(columns: Mapping[str, np.ndarray], where: str) -> int:
    if not columns:
        raise DataError("a table needs at least one column", file=where)
    rows = None
    for name, col in columns.items():
        col = np.asarray(col)
        if col.dtype == object:
            raise DataError(
                "object arrays are not allowed; use np.str_ or numbers", file=where, column=name
            )
        if col.ndim < 1:
            raise DataError("columns must be at least 1-D", file=where, column=name)
        if rows is None:
            rows = col.shape[0]
        elif col.shape[0] != rows:
            raise DataError(
                f"columns of different lengths: {col.shape[0]} rows, expected {rows}",
                file=where,
                column=name,
            )
    return int(rows)


def _npy_files(tdir: pathlib.Path) -> dict[str, pathlib.Path]:
    """Column name -> file of the ``<column>.npy`` files in a table folder, by name; the
    suffix in any case (``.NPY``, as ``.CSV`` tables); hidden files (macOS
    ``._<column>.npy`` resource forks) are not columns.

    Raises:
      DataError: two files of one column (``a.npy`` and ``a.NPY``).
    """
    files: dict[str, pathlib.Path] = {}
    if not tdir.is_dir():
        return files
    for p in sorted(tdir.iterdir()):
        if p.suffix.lower() != ".npy" or p.name.startswith(".") or not p.is_file():
            continue
        if p.stem in files:
            raise DataError(f"two files of column {p.stem!r}: {files[p.stem].name!r} and "
                            f"{p.name!r}; keep one", file=tdir, column=p.stem)
        files[p.stem] = p
    return dict(sorted(files.items()))


def _npy_columns(tdir: pathlib.Path) -> list[str]:
    """Column names of the ``<column>.npy`` files in a table folder, sorted (`_npy_files`)."""
    return list(_npy_files(tdir))


def _check_no_other_columns(tdir: pathlib.Path, columns: Iterable[str]) -> None:
    """Refuses to write into a table folder that holds ``.npy`` columns this table lacks:
    a reader would take those leftovers of an earlier table for columns of this one."""
    columns = set(columns)
    # "a.NPY" beside the "a.npy" written now would be a second file of column "a".
    others = sorted(p.name if c in columns else c for c, p in _npy_files(tdir).items()
                    if c not in columns or p.name != f"{c}.npy")
    if others:
        raise DataError(
            f"the table folder already holds columns {others} that this table does not have "
            "(a reader would read them as its own); remove them or the folder first",
            file=tdir,
        )


def write_table(directory: str | os.PathLike, name: str, columns: Mapping[str, np.ndarray]) -> dict:
    """Writes a table as ``directory/name/<column>.npy`` (one shot).

    Args:
      directory: the dataset folder.
      name: table name (the sub-folder).
      columns: column name -> array with R rows (numbers or ``np.str_``).

    Returns:
      The table's ``dataset.json`` entry ``{"path", "columns", "rows"}``.

    Raises:
      DataError: bad columns, or the table folder already holds ``.npy`` columns that
        ``columns`` lacks (an earlier table's: rewriting the same columns is fine).
    """
    tdir = pathlib.Path(directory) / name
    rows = _check_columns(columns, str(tdir))
    _check_no_other_columns(tdir, columns)
    tdir.mkdir(parents=True, exist_ok=True)
    for col, arr in columns.items():
        np.save(tdir / f"{col}.npy", np.ascontiguousarray(arr), allow_pickle=False)
    return {"path": name, "columns": list(columns), "rows": rows}


def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    descr = np.lib.format.dtype_to_descr(dtype)
    header = f"{{'descr': {descr!r}, 'fortran_order': False, 'shape': {tuple(shape)!r}, }}"
    body_len = _NPY_HEADER_BYTES - 10
    if len(header) + 1 > body_len:
        raise DataError(f"npy header too long for shape {shape}")
    header = header.ljust(body_len - 1) + "\n"
    return b"\x93NUMPY\x01\x00" + body_len.to_bytes(2, "little") + header.encode("latin1")


# dtype kinds that may share a column: bool; integers (signed or not); floats;
# complex; str; bytes.
_KIND_FAMILY = {"b": "b", "i": "i", "u": "i", "f": "f", "c": "c", "U": "U", "S": "S"}


def _safe_chunk_cast(src: np.dtype, dst: np.dtype) -> bool:
    """Whether values of ``src`` survive a cast to ``dst`` unchanged and keep their kind."""
    if src == dst:
        return True
    family = _KIND_FAMILY.get(src.kind)
    if family is None or family != _KIND_FAMILY.get(dst.kind):
        return False
    if family in "US":
        return True  # same kind; the width is checked separately
    return bool(np.can_cast(src, dst, "safe"))


class TableWriter:
    """Streams a table to ``directory/name/<column>.npy`` chunk by chunk.

    The first ``append`` fixes the columns; the first chunk with rows fixes the dtypes
    and trailing shapes (an empty chunk has no values to fix them by: ``np.array([])``
    is float64); the npy headers carry the final row count after ``close()``. Usable as
    a context manager. Memory use is one chunk. As :func:`write_table`, it refuses a
    table folder that holds ``.npy`` columns the first chunk lacks.

    Args:
      directory: the dataset folder.
      name: table name (the sub-folder).
    """

    def __init__(self, directory: str | os.PathLike, name: str):
        self.directory = pathlib.Path(directory)
        self.name = name
        self.path = self.directory / name
        self.rows = 0
        self._files: dict[str, object] = {}
        self._spec: dict[str, tuple[np.dtype, tuple[int, ...]]] = {}
        self._closed = False

    def append(self, columns: Mapping[str, np.ndarray]) -> None:
        """Appends one chunk (same columns, dtypes and trailing shapes every time).

        A later chunk may use a narrower dtype of the same family (int32 into an
        int64 column, float32 into float64, shorter strings); anything that could
        change a value (wider ints, floats into ints, bytes into str, longer strings)
        is a DataError naming the column. Empty chunks are not checked (only their
        column names).
        """
        if self._closed:
            raise DataError("append after close", file=self.path)
        n = _check_columns(columns, str(self.path))
        if not self._spec:
            _check_no_other_columns(self.path, columns)
            self.path.mkdir(parents=True, exist_ok=True)
            for col, arr in columns.items():
                arr = np.asarray(arr)
                self._spec[col] = (arr.dtype, arr.shape[1:])
                f = open(self.path / f"{col}.npy", "wb")  # noqa: SIM115 (closed in close())
                f.write(_npy_header(arr.dtype, (0,) + arr.shape[1:]))
                self._files[col] = f
        if set(columns) != set(self._spec):
            raise DataError(
                f"chunk columns {sorted(columns)} differ from the first chunk's "
                f"{sorted(self._spec)}",
                file=self.path,
            )
        if not n:
            return
        # Check every column before writing any, so a bad chunk leaves no partial rows.
        chunk = {col: np.asarray(arr) for col, arr in columns.items()}
        if not self.rows:  # the first rows fix the dtypes (nothing is written yet)
            self._spec = {col: (chunk[col].dtype, chunk[col].shape[1:]) for col in self._spec}
        for col, arr in chunk.items():
            dtype, trailing = self._spec[col]
            if not _safe_chunk_cast(arr.dtype, dtype):
                raise DataError(
                    f"chunk dtype {arr.dtype} cannot be stored safely in the column's "
                    f"{dtype} (values would wrap, truncate or change kind; the first chunk "
                    "with rows fixes the dtype); append that chunk with the widest dtype",
                    file=self.path,
                    column=col,
                )
            if (
                arr.dtype.kind in "US"
                and arr.dtype.kind == dtype.kind
                and arr.dtype.itemsize > dtype.itemsize
            ):
                raise DataError(
                    f"strings wider than the column's {dtype} (the first chunk with "
                    "rows fixes the dtype); append that chunk with the widest dtype",
                    file=self.path,
                    column=col,
                )
            if arr.shape[1:] != trailing:
                raise DataError(
                    f"trailing shape {arr.shape[1:]} != {trailing}", file=self.path, column=col
                )
        for col, arr in chunk.items():
            dtype = self._spec[col][0]
            # memoryview of a contiguous array: no extra copy of the chunk.
            self._files[col].write(memoryview(np.ascontiguousarray(arr, dtype=dtype)).cast("B"))
        self.rows += n

    def close(self) -> dict:
        """Fixes the npy headers; returns the table's ``dataset.json`` entry."""
        if not self._closed:
            if not self._spec:
                raise DataError("empty table: nothing was appended", file=self.path)
            for col, f in self._files.items():
                dtype, trailing = self._spec[col]
                f.seek(0)
                f.write(_npy_header(dtype, (self.rows,) + trailing))
                f.close()
            self._closed = True
        return {"path": self.name, "columns": list(self._spec), "rows": self.rows}

    def __enter__(self) -> TableWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            for f in self._files.values():
                f.close()
            self._closed = True


def write_dataset_json(
    directory: str | os.PathLike,
    *,
    name: str,
    tables: Mapping[str, dict],
    num_days: int | None = None,
    kg: str | None = None,
    splits: Mapping[str, Sequence[int]] | None = None,
    extra: Mapping[str, object] | None = None,
) -> dict:
    """Writes ``directory/dataset.json``.

    Args:
      directory: the dataset folder.
      name: dataset name.
      tables: table name -> ``{"path", "columns", "rows"}`` (as returned by the writers).
      num_days: number of days covered, or None.
      kg: relative path of the knowledge-graph folder, or None.
      splits: window name -> ``[start_day, end_day)``.
      extra: further JSON-serialisable keys (e.g. the generator config).

    Returns:
      The written dictionary.
    """
    meta = {
        "format_version": FORMAT_VERSION,
        "name": name,
        "num_days": num_days,
        "tables": {k: dict(v) for k, v in tables.items()},
        "kg": kg,
        "splits": {k: [int(v[0]), int(v[1])] for k, v in (splits or {}).items()},
    }
    if extra:
        meta.update(extra)
    path = pathlib.Path(directory) / "dataset.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(meta, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return meta


# --------------------------------------------------------------------------- readers


def _first_bad_time(values: np.ndarray) -> int | None:
    """Index of the first time value that is not finite or beyond int64, or None."""
    values = np.asarray(values)
    if values.dtype.kind == "u":  # uint64 beyond int64 (a -1 written unsigned)
        bad = values > np.iinfo(np.int64).max
    elif values.dtype.kind != "f":
        return None  # other integers are finite and in range by construction
    else:
        bad = ~(np.isfinite(values) & (values >= -_INT64_BOUND) & (values < _INT64_BOUND))
    return int(np.argmax(bad)) if bad.any() else None


_BOM = "\ufeff"


def _skip_boms(f) -> None:
    """Moves text file ``f``, just opened, past every byte-order mark at its start.

    A file re-saved by tools that each add a mark (an editor, then a spreadsheet)
    starts with two; ``utf-8-sig`` drops only one, and the other was read into the
    first column's (or entity's) name."""
    while True:
        pos = f.tell()
        if f.read(1) != _BOM:
            f.seek(pos)
            return


def read_utf8(path: str | os.PathLike) -> str:
    """The text of UTF-8 file ``path`` without the byte-order marks at its start (any
    number); line ends as in the file.

    Raises:
      UnicodeDecodeError: not UTF-8 (`_not_utf8` says where); OSError.
    """
    with open(path, encoding="utf-8", newline="") as f:
        _skip_boms(f)
        return f.read()


def _not_utf8(path: str | os.PathLike) -> DataError:
    """A DataError naming the file and line of the first byte of ``path`` that is not
    UTF-8 (found again on the raw bytes: a text reader's error does not say where)."""
    data = pathlib.Path(path).read_bytes()
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):  # spreadsheets' "Unicode text" export
        return DataError("UTF-16 text (it starts with a UTF-16 byte-order mark), not "
                         "UTF-8: save it as UTF-8", file=path, line=1)
    try:
        data.decode("utf-8")  # a byte-order mark is valid UTF-8: offsets stay exact
    except UnicodeDecodeError as e:
        return DataError(
            f"not UTF-8 text: {e.reason} (byte {e.start})",
            file=path,
            line=data.count(b"\n", 0, e.start) + 1,
        )
    return DataError("not UTF-8 text", file=path)


def _time_message(column: str, value) -> str:
    return (
        f"{column} {value!r} is not a finite number within int64 range (rows with such "
        "a time would fall outside every day window)"
    )


def _parse_column(
    values: list[str], lines: np.ndarray, *, file: str, column: str, kind: str | None
) -> np.ndarray:
    """Parses one text column (see :func:`_parse_column_values`); ``timestamp`` and
    ``day`` values must be finite and within int64 range; no value may hold a NUL."""
    if "\x00" in "".join(values):  # one C-speed scan; NumPy strings drop trailing NULs
        i = next(i for i, v in enumerate(values) if "\x00" in v)
        raise DataError(
            f"NUL character in {values[i]!r} (NumPy strings drop trailing NULs, so "
            "'a\\x00' would become 'a')",
            file=file,
            column=column,
            line=int(lines[i]),
        )
    try:
        out = _parse_column_values(values, lines, file=file, column=column, kind=kind)
    except MemoryError:  # NumPy's own says neither file nor column, nor why so big
        i = max(range(len(values)), key=lambda k: len(values[k]))
        need = 4 * len(values[i]) * len(values)
        size = f"{need / 2**30:.1f} GiB" if need >= 2**30 else f"{need / 2**20:.1f} MiB"
        raise DataError(
            f"too big for memory: {len(values)} values as wide as the longest "
            f"({len(values[i])} characters, line {int(lines[i])}) need {size} "
            "(a text column is stored as wide as its longest value in every row; keep "
            "long text out of the table)",
            file=file,
            column=column,
            line=int(lines[i]),
        ) from None
    if column in TIME_COLUMNS:
        i = _first_bad_time(out)
        if i is not None:
            raise DataError(
                _time_message(column, float(out[i])), file=file, column=column, line=int(lines[i])
            )
    return out


def _parse_column_values(
    values: list[str], lines: np.ndarray, *, file: str, column: str, kind: str | None
) -> np.ndarray:
    """Turns one text column into int64, float64 or np.str_ (see module docstring)."""
    arr = np.asarray(values, dtype=np.str_)
    if kind is None and column in NUMERIC_COLUMNS:
        kind = "number"
    is_id = kind is None and column.endswith("_id")
    if is_id:  # spaces around an id are not part of it: "a " is the id "a" (as in kg.py)
        arr = np.char.strip(arr)
    if kind == "str":
        return arr
    if kind == "label":
        missing = np.char.strip(arr) == ""
        if not missing.any():
            kind = "number"
        else:  # a label not known yet: NaN, as in an .npy column (float64)
            out = np.full(arr.shape, np.nan)
            out[~missing] = _parse_column_values(
                arr[~missing], lines[~missing], file=file, column=column, kind="float"
            )
            return out
    # Python's int() and float() read "1_0" as 10: in a data file that is text,
    # never a number.
    underscore = np.char.find(arr, "_") >= 0
    if underscore.any():
        if kind is None:
            return arr
        i = int(np.argmax(underscore))
        what = "an integer" if kind == "int" else "a number"
        raise DataError(
            f"cannot parse {str(arr[i])!r} as {what}", file=file, column=column, line=int(lines[i])
        )
    empty = arr == ""
    if is_id and empty.any():
        i = int(np.argmax(empty))
        raise DataError("empty id", file=file, column=column, line=int(lines[i]))
    if kind in ("int", "number", None):
        try:
            as_int = arr.astype(np.int64)
        except (ValueError, OverflowError):
            if kind == "int":
                _raise_first_bad(arr, lines, np.int64, file, column, "an integer")
            if is_id:
                return arr  # ids that are not all int64 stay strings, never floats
        else:
            # Ids become int64 only if every spelling is canonical ("12", not "012" or
            # "+12"; spaces around the value, as in "a, b" files, were stripped above), so
            # distinct ids never merge (as in kg._normalize).
            if not is_id or np.array_equal(as_int.astype(np.str_), arr):
                return as_int
            return arr
    if kind in ("float", "number", None):
        try:
            return arr.astype(np.float64)
        except ValueError:
            if kind is not None:
                _raise_first_bad(arr, lines, np.float64, file, column, "a number")
    if kind is not None:
        raise DataError(f"unknown column kind {kind!r}", file=file, column=column)
    return arr


def _raise_first_bad(arr, lines, dtype, file, column, what):
    for i, v in enumerate(arr):
        try:
            dtype(v)
        except (ValueError, OverflowError):
            raise DataError(
                f"cannot parse {str(v)!r} as {what}", file=file, column=column, line=int(lines[i])
            ) from None
    raise DataError(f"cannot parse column as {what}", file=file, column=column)


# Separators a first line "sep=X" (as Excel writes and reads it) may name.
_SEPARATORS = {",": "commas", ";": "semicolons", "\t": "tabs", "|": "bars"}


def _separator_line(line: str, file: str) -> str | None:
    """The separator a file's first line ``sep=X`` names, or None for any other line.

    Raises:
      DataError: ``sep=`` names none of `_SEPARATORS`.
    """
    line = line.rstrip("\r\n")
    if not line.startswith("sep="):
        return None
    sep = line[len("sep="):]
    if sep not in _SEPARATORS:
        raise DataError(f"first line {line!r} names no separator: a separator line is 'sep=' "
                        "and one of ',', ';', '|' or a tab", file=file, line=1)
    return sep


def _is_field_limit(e: csv.Error) -> bool:
    return "field limit" in str(e)


def _csv_error(what: str, e: csv.Error, file: str, start: int, end: int) -> DataError:
    """A DataError for the csv module's error ``e`` in the record from line ``start``
    (the reader stopped on line ``end``). Its "field larger than field limit (131072)"
    does not say why: a '"' left open (the field runs on over the lines after it), or
    a value over the limit, which this format does not take (a text column is stored
    as wide as its longest value in every row: 131072 characters x 1M rows = 524 GB)."""
    if not _is_field_limit(e):
        return DataError(f"{what}: {e}", file=file, line=start)
    limit = csv.field_size_limit()
    if end > start:
        msg = (f"a quoted field runs from line {start} past line {end} without its closing "
               f"'\"', over the CSV reader's limit of {limit} characters: a '\"' is unmatched")
    else:
        msg = (f"a field longer than the CSV reader's limit of {limit} characters (a "
               "column's values are stored as wide as its longest one; keep long text out "
               "of the table)")
    return DataError(msg, file=file, line=start)


def read_text_table(
    path: str | os.PathLike,
    *,
    columns: Sequence[str] | None = None,
    kinds: Mapping[str, str] | None = None,
    on_bad_lines: str = "error",
) -> tuple[dict[str, np.ndarray], int]:
    """Reads a CSV (``,``) or TSV (tab) file with a header row.

    Args:
      path: a ``.csv`` or ``.tsv`` file.
      columns: columns to return (default all); a missing one is a DataError.
      kinds: optional column -> "int" | "float" | "number" | "str" | "label" to force a
        type; otherwise integers -> int64, other numbers -> float64, the rest -> np.str_,
        and NUMERIC_COLUMNS must be numbers. "label" is "number" where an empty cell
        is a label not known yet: NaN (the column is then float64), kept by
        ``on_bad_lines="skip"``; whoever uses the labels checks the rows it reads. ``*_id`` columns are int64 only when
        every value is a canonical int64 spelling (``str(int(v)) == v``: not "007",
        "+7" or beyond int64); otherwise they stay np.str_ (never float64), so
        distinct spellings stay distinct ids. Whitespace around an id is not part of it
        (``"a "`` and ``" a"`` are the id ``"a"``, as in knowledge-graph folders).
      on_bad_lines: "error" (default) or "skip" (ragged/unparsable lines, and lines
        whose ``timestamp``/``day`` is not finite, are skipped and counted). A CSV record spanning several physical lines (a quoted field
        holding a line break, or an unmatched ``"`` swallowing the lines after it) is
        bad too; skipping it counts every physical line it spans. So is a line with a field
        longer than the csv module's limit (131072 characters): a column is stored as
        wide as its longest value in every row, so such a value has no place in a
        table. A quoted field that runs over several lines past that limit (an
        unmatched ``"`` in a large file) is an error even with "skip": where its record
        ends is not known.

    Quoting: ``.csv`` follows the usual ``"`` quoting (``"u,3"`` is one field); ``.tsv``
    has no quoting (a ``"`` is an ordinary character). The name says the separator: a
    header of one column that holds tabs or semicolons (``.csv``) or commas (``.tsv``)
    is a DataError saying so. A first line ``sep=X`` (as Excel writes: ``sep=,``,
    ``sep=;``; X one of ``,`` ``;`` ``|`` or a tab) names the separator and is not a row;
    the quoting still follows the name. Blank lines (or of spaces only) are skipped,
    before the header too.

    Returns:
      (column name -> array, number of skipped lines).
    """
    out, skipped, _ = _read_text_table(
        path, columns=columns, kinds=kinds, on_bad_lines=on_bad_lines
    )
    return out, skipped


def _read_text_table(
    path: str | os.PathLike,
    *,
    columns: Sequence[str] | None,
    kinds: Mapping[str, str] | None,
    on_bad_lines: str,
) -> tuple[dict[str, np.ndarray], int, np.ndarray]:
    """:func:`read_text_table`, plus the 1-based file line of each returned row."""
    path = pathlib.Path(path)
    file = str(path)
    if on_bad_lines not in ("error", "skip"):
        raise ValueError(f"on_bad_lines must be 'error' or 'skip', got {on_bad_lines!r}")
    kinds = dict(kinds or {})
    tsv = path.suffix.lower() == ".tsv"
    with open(path, newline="", encoding="utf-8") as f:
        # Byte-order marks (as some editors and spreadsheets write) are dropped, not
        # read as part of the first column's name.
        try:
            _skip_boms(f)
            first = f.readline()
        except UnicodeDecodeError:
            raise _not_utf8(path) from None
        sep = _separator_line(first, file)
        delimiter = sep or ("\t" if tsv else ",")
        # The separator line reads as a blank line: line numbers stay the file's.
        source = itertools.chain(["\n" if sep else first] if first else [], f)
        if tsv:
            # TSV has no quoting: a '"' is an ordinary character.
            reader = csv.reader(source, delimiter=delimiter, quoting=csv.QUOTE_NONE)
        else:
            reader = csv.reader(source, delimiter=delimiter)
        header: list[str] = []
        hline = 1  # the header's line: blank lines before it are skipped, as after it
        try:
            while not header or (len(header) == 1 and not header[0].strip()):
                hline = reader.line_num + 1
                header = next(reader)
        except StopIteration:
            what = "blank lines only" if reader.line_num else "empty file"
            raise DataError(f"{what}: no header row", file=file, line=1) from None
        except csv.Error as e:
            raise _csv_error("unreadable header", e, file, hline, reader.line_num) from None
        except UnicodeDecodeError:
            raise _not_utf8(path) from None
        if reader.line_num > hline:
            raise DataError(
                f"header spans lines {hline}-{reader.line_num} (a quoted field holds a line "
                "break, or a '\"' is unmatched)",
                file=file,
                line=hline,
            )
        header = [h.strip() for h in header]
        if len(header) == 1:
            # A file of another separator reads as one column with every name in it.
            seps = ({s: n for s, n in _SEPARATORS.items() if s != sep} if sep
                    else {",": "commas"} if tsv else {"\t": "tabs", ";": "semicolons"})
            held = [name for s, name in seps.items() if s in header[0]]
            if held:
                fix = (f"line 1 {first.rstrip(chr(13) + chr(10))!r} names another separator; "
                       "correct or remove that line" if sep
                       else "fields of a .csv file are separated by commas (or by the one a "
                       "first line 'sep=;' names)" if held[0] == "semicolons"
                       else f"a {'comma' if tsv else 'tab'}-separated file must be named "
                       f"{'.csv' if tsv else '.tsv'}")
                raise DataError(f"the header is one column {header[0]!r} holding {held[0]}: "
                                f"{fix}", file=file, line=hline)
        seen = set()
        for h in header:
            if not h:
                raise DataError("empty column name in header", file=file, line=hline)
            if h in seen:
                raise DataError("duplicate column in header", file=file, column=h, line=hline)
            seen.add(h)
        wanted = list(header) if columns is None else list(columns)
        for c in wanted:
            if c not in seen:
                raise DataError(
                    f"missing required column (header has {header})", file=file, column=c,
                    line=hline,
                )
        idx = [header.index(c) for c in wanted]
        ncol = len(header)
        values: list[list[str]] = [[] for _ in wanted]
        lines: list[int] = []
        skipped = 0
        line_no = reader.line_num
        while True:
            start_line = line_no + 1
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as e:
                # The reader drops the rest of the physical line it failed on and reads
                # on from the next one: with "skip" a line that long is a bad line. A
                # quoted field over several lines is not skipped: where it ends (where
                # the next row starts) is not known.
                if on_bad_lines == "skip" and _is_field_limit(e) and reader.line_num == start_line:
                    skipped += 1
                    line_no = reader.line_num
                    continue
                raise _csv_error("unreadable line", e, file, start_line, reader.line_num) from None
            except UnicodeDecodeError:
                raise _not_utf8(path) from None
            line_no = reader.line_num
            if not row:  # blank line
                continue
            if ncol > 1 and len(row) == 1 and not row[0].strip() and line_no == start_line:
                continue  # a line of spaces only is blank too (as in knowledge-graph files)
            if line_no > start_line:
                # One record over several physical lines: a quoted field holds a line
                # break, or an unmatched '"' swallowed the following lines.
                if on_bad_lines == "skip":
                    skipped += line_no - start_line + 1
                    continue
                raise DataError(
                    f"record spans lines {start_line}-{line_no} (a quoted field holds a "
                    "line break, or a '\"' is unmatched)",
                    file=file,
                    line=start_line,
                )
            if len(row) != ncol:
                if on_bad_lines == "skip":
                    skipped += 1
                    continue
                raise DataError(
                    f"ragged row: {len(row)} fields, header has {ncol}", file=file, line=start_line
                )
            for j, i in enumerate(idx):
                values[j].append(row[i])
            lines.append(start_line)
    if not lines:
        raise DataError("empty table: header but no rows", file=file, line=hline)
    lines_arr = np.asarray(lines, dtype=np.int64)
    if on_bad_lines == "skip":
        # Drop rows whose forced/numeric columns do not parse, counting them.
        keep = np.ones(len(lines_arr), dtype=bool)
        for j, c in enumerate(wanted):
            kind = kinds.get(c, "number" if c in NUMERIC_COLUMNS else None)
            if kind in ("int", "float", "number", "label"):
                caster = np.int64 if kind == "int" else float
                for i, v in enumerate(values[j]):
                    if kind == "label" and not v.strip():
                        continue  # a label not known yet (NaN), not a bad line
                    try:
                        x = caster(v)
                    except (ValueError, OverflowError):
                        keep[i] = False
                    else:
                        if c in TIME_COLUMNS and not -_INT64_BOUND <= x < _INT64_BOUND:
                            keep[i] = False  # NaN, inf or beyond int64 (see _parse_column)
                    if "_" in v:  # "1_0" is text, never 10 (see _parse_column)
                        keep[i] = False
        if not keep.all():
            skipped += int((~keep).sum())
            values = [[v for v, k in zip(col, keep, strict=True) if k] for col in values]
            lines_arr = lines_arr[keep]
            if not len(lines_arr):
                raise DataError("empty table: every row was bad", file=file)
    out = {
        c: _parse_column(values[j], lines_arr, file=file, column=c, kind=kinds.get(c))
        for j, c in enumerate(wanted)
    }
    if skipped:
        warnings.warn(f"{file}: skipped {skipped} bad lines (on_bad_lines='skip')", stacklevel=3)
    return out, skipped, lines_arr


def read_npy_table(
    path: str | os.PathLike, *, columns: Sequence[str] | None = None, mmap: bool = True
) -> dict[str, np.ndarray]:
    """Reads a column folder ``path/<column>.npy`` (memory-mapped by default).

    Args:
      path: the table folder.
      columns: columns to return (default all, sorted by name; hidden files such as
        macOS ``._<column>.npy`` are not columns).
      mmap: memory-map the columns (``mmap_mode="r"``).

    Returns:
      column name -> array; all columns have the same length.

    Raises:
      DataError: naming the file and column for an unreadable, empty or truncated
        ``.npy`` file, a scalar, a :data:`NUMERIC_COLUMNS` column that is not 1-D or not
        numbers (bool, int, float), a ``timestamp``/``day`` value that is not finite or beyond int64
        (the row is named), or columns of different lengths.
    """
    path = pathlib.Path(path)
    files = _npy_files(path)
    available = list(files)
    if not available:
        raise DataError("no <column>.npy files in table folder", file=path)
    wanted = available if columns is None else list(columns)
    out = {}
    rows = None
    for c in wanted:
        f = files.get(c, path / f"{c}.npy")
        if not f.exists():
            raise DataError(f"missing required column (have {available})", file=f, column=c)
        try:
            arr = np.load(f, mmap_mode="r" if mmap else None, allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            # EOFError: a 0-byte file; OSError / ValueError: a bad header, a truncated
            # file, pickled objects.
            raise DataError(
                f"unreadable npy column: {e or type(e).__name__}", file=f, column=c
            ) from None
        if arr.ndim < 1:
            raise DataError("column is a scalar", file=f, column=c)
        if arr.ndim > 1 and c in NUMERIC_COLUMNS:
            raise DataError(
                f"column must be 1-D (one value per row), got shape {arr.shape}",
                file=f,
                column=c,
            )
        if c in NUMERIC_COLUMNS and arr.dtype.kind not in "biuf":
            raise DataError(f"column must hold numbers, got dtype {arr.dtype}", file=f, column=c)
        if c in TIME_COLUMNS:
            i = _first_bad_time(arr)
            if i is not None:
                raise DataError(f"row {i}: {_time_message(c, arr[i].item())}", file=f, column=c)
        if rows is None:
            rows = arr.shape[0]
        elif arr.shape[0] != rows:
            raise DataError(
                f"columns of different lengths: {arr.shape[0]} rows, expected "
                f"{rows} (from {wanted[0]!r})",
                file=f,
                column=c,
            )
        out[c] = arr
    if rows == 0:
        raise DataError("empty table: 0 rows", file=path)
    return out


def read_table(
    path: str | os.PathLike,
    *,
    columns: Sequence[str] | None = None,
    kinds: Mapping[str, str] | None = None,
    on_bad_lines: str = "error",
) -> dict[str, np.ndarray]:
    """Reads a table given as a ``.csv``/``.tsv`` file or an npy column folder.

    Args:
      path: the file or folder.
      columns: columns to return (default all).
      kinds: forced column types for text tables (see :func:`read_text_table`).
      on_bad_lines: "error" or "skip" (text tables only).

    Returns:
      column name -> array.
    """
    path = pathlib.Path(path)
    if path.is_dir():
        return read_npy_table(path, columns=columns)
    if path.suffix.lower() in (".csv", ".tsv"):
        return read_text_table(path, columns=columns, kinds=kinds, on_bad_lines=on_bad_lines)[0]
    if not path.exists():
        raise DataError("table not found", file=path)
    raise DataError("unknown table format (want .csv, .tsv or a folder of .npy)", file=path)


def row_days(
    cols: Mapping[str, np.ndarray],
    *,
    day_column: str = "day",
    timestamp_column: str = "timestamp",
    file: str | os.PathLike | None = None,
) -> tuple[np.ndarray, str]:
    """The day of every row: the ``day_column``, or, when the table has none,
    ``timestamp_column`` (seconds) // 86400.

    Args:
      cols: column name -> array (R rows).
      day_column: the day column's name.
      timestamp_column: the name of the column of seconds, read when there is no
        ``day_column``.
      file: the table's file or folder (``DatasetFolder.table_path``), named in every
        error.

    Returns:
      (days, time column): the days as int64 [R] (a fractional day or timestamp is
      floored, as a window's ``start <= day < end`` counts it), and the column they
      came from.

    Raises:
      DataError: no day or timestamp column, one that does not hold numbers, or a day
        or timestamp that is not finite or beyond int64 (it would drop its row silently).
    """
    if day_column in cols:
        time_column = day_column
    elif timestamp_column in cols:
        time_column = timestamp_column
    else:
        raise DataError(
            f"no {day_column!r} or {timestamp_column!r} column to select days by", file=file,
            column=day_column,
        )
    times = np.asarray(cols[time_column])
    if times.dtype.kind not in "biuf":
        raise DataError(f"column must hold numbers, got dtype {times.dtype}", file=file,
                        column=time_column)
    i = _first_bad_time(times)
    if i is not None:
        raise DataError(
            f"row {i}: {_time_message(time_column, times[i].item())}", file=file,
            column=time_column,
        )
    if time_column != day_column:
        times = times // 86400
    if times.dtype.kind == "f":
        times = np.floor(times)
    return times.astype(np.int64, copy=False), time_column


def check_day_window(
    start: int,
    end: int,
    *,
    name: object = None,
    file: str | os.PathLike | None = None,
    note: str = "",
) -> tuple[int, int]:
    """The one check that a half-open day window ``[start, end)`` holds a day.

    Args:
      start: first day (inclusive).
      end: last day (exclusive).
      name: how the window was given (a name or "START,END"), quoted in the message.
      file: named in the error.
      note: appended to the message (what the caller's input syntax means).

    Returns:
      (start, end).

    Raises:
      DataError: ``end <= start``.
    """
    if end <= start:
        given = "" if name is None else f"{name!r}: "
        raise DataError(f"empty day window {given}[{start}, {end}){note}", file=file)
    return start, end


def select_days(
    cols: Mapping[str, np.ndarray],
    start: int,
    end: int,
    *,
    day_column: str = "day",
    timestamp_column: str = "timestamp",
    allow_empty: bool = False,
    file: str | os.PathLike | None = None,
) -> dict[str, np.ndarray]:
    """Rows whose day (:func:`row_days`) lies in the half-open window ``[start, end)``.

    Args:
      cols: column name -> array (R rows).
      start: first day (inclusive).
      end: last day (exclusive).
      day_column: the day column's name.
      timestamp_column: the name of the column of seconds, read when there is no
        ``day_column``.
      allow_empty: return an empty selection instead of raising.
      file: the table's file or folder (``DatasetFolder.table_path``), named in every
        error.

    Returns:
      the selected rows, column name -> array.

    Raises:
      DataError: as :func:`row_days`; an empty window, or (unless ``allow_empty``) no
        rows in the window.
    """
    day, time_column = row_days(cols, day_column=day_column,
                                timestamp_column=timestamp_column, file=file)
    check_day_window(start, end, file=file)
    mask = (day >= start) & (day < end)
    if not allow_empty and not mask.any():
        what = day_column if time_column == day_column else f"{time_column} // 86400"
        raise DataError(
            f"empty split: no rows with {what} in [{start}, {end})", file=file,
            column=time_column,
        )
    # Contiguous windows (the world writes days in order) avoid a full-table copy.
    idx = np.flatnonzero(mask)
    if len(idx) and idx[-1] - idx[0] + 1 == len(idx):
        return {k: v[idx[0] : idx[-1] + 1] for k, v in cols.items()}
    return {k: np.asarray(v)[mask] for k, v in cols.items()}


_DAYS = re.compile(r"\s*(-?\d+)\s*,\s*(-?\d+)\s*")  # "START,END" (`window_days`)


class DatasetFolder:
    """Reader for a dataset folder (see the module docstring).

    Args:
      path: the folder. ``dataset.json`` is optional: without it, ``*.csv``,
        ``*.tsv`` and sub-folders of ``*.npy`` (any case: ``.CSV``, ``.NPY``) are tables, names
        starting with ``.`` are not (hidden files, macOS ``._x.csv``), and ``kg/`` (if
        it holds ``train.txt``) is the knowledge graph.
      on_bad_lines: "error" or "skip" for CSV/TSV tables.

    Attributes:
      found_by_name: the entries of ("tables", "kg") that dataset.json leaves out (all
        without one), found in the folder as above; "kg" not in it and `kg_path` None
        means an explicit ``"kg": null``.
    """

    def __init__(self, path: str | os.PathLike, *, on_bad_lines: str = "error"):
        self.path = pathlib.Path(path)
        self.on_bad_lines = on_bad_lines
        self.skipped: dict[str, int] = {}
        # Text table -> 1-based file line of each row of its last read (for `error`).
        self._lines: dict[str, np.ndarray] = {}
        if self.path.is_file():
            raise DataError(
                f"a file, not a dataset folder: give the folder that holds it ({self.path.parent})",
                file=self.path,
            )
        if not self.path.is_dir():
            raise DataError("dataset folder not found", file=self.path)
        meta_path = self.path / "dataset.json"
        if meta_path.exists():
            try:
                meta = json.loads(read_utf8(meta_path))
            except json.JSONDecodeError as e:
                raise DataError(f"invalid JSON: {e.msg}", file=meta_path, line=e.lineno) from None
            except UnicodeDecodeError:
                raise _not_utf8(meta_path) from None
            if not isinstance(meta, dict):
                raise DataError("expected a JSON object", file=meta_path)
            if meta.get("format_version") != FORMAT_VERSION:
                raise DataError(
                    f"unsupported format_version {meta.get('format_version')!r}", file=meta_path
                )
            found = None  # what the folder holds, for the entries dataset.json leaves out
            self.found_by_name = tuple(k for k in ("tables", "kg") if k not in meta)
            if self.found_by_name:  # (one written for its "splits")
                found = self._discover()
            tables = meta.setdefault("tables", found and found["tables"])
            if not isinstance(tables, dict) or not all(isinstance(t, dict) for t in tables.values()):
                raise DataError("'tables' must map table names to {\"path\": ...}", file=meta_path)
            for name, t in tables.items():
                if "path" not in t:
                    raise DataError(f"table {name!r} has no 'path'", file=meta_path)
                if not isinstance(t["path"], str):
                    raise DataError(
                        f"table {name!r} 'path' must be a string, got {t['path']!r}",
                        file=meta_path,
                    )
                if not (self.path / t["path"]).exists():
                    raise DataError(
                        f"table {name!r} path {t['path']!r} does not exist", file=meta_path
                    )
            meta.setdefault("splits", {})
            splits = meta["splits"]
            if not isinstance(splits, dict) or not all(
                isinstance(v, list | tuple) and len(v) == 2
                and all(isinstance(d, int) and not isinstance(d, bool) for d in v)
                and v[0] <= v[1]
                for v in splits.values()
            ):
                raise DataError(
                    "'splits' must map window names to [start_day, end_day] (integers, "
                    f"start <= end), got {splits!r}",
                    file=meta_path,
                )
            meta.setdefault("kg", found and found["kg"])  # an explicit null: no graph
            if not (meta["kg"] is None or isinstance(meta["kg"], str)):
                raise DataError(
                    f"'kg' must be a folder name or null, got {meta['kg']!r}", file=meta_path
                )
            meta.setdefault("num_days", None)
            self.meta = meta
        else:
            self.meta = self._discover()
            self.found_by_name = ("tables", "kg")

    def _discover(self) -> dict:
        tables: dict[str, dict] = {}
        for p in sorted(self.path.iterdir()):
            if p.name.startswith("."):
                continue  # hidden: macOS "._x.csv" resource forks, editor and VCS files
            if p.is_file() and p.suffix.lower() in (".csv", ".tsv"):
                name = p.stem
            elif p.is_dir() and _npy_columns(p):
                name = p.name
            else:
                continue
            if name in tables:
                raise DataError(
                    f"two tables named {name!r}: {tables[name]['path']!r} and {p.name!r}", file=p
                )
            tables[name] = {"path": p.name}
        kg = "kg" if (self.path / "kg" / "train.txt").exists() else None
        return {
            "format_version": FORMAT_VERSION,
            "name": self.path.name,
            "num_days": None,
            "tables": tables,
            "kg": kg,
            "splits": {},
        }

    @property
    def table_names(self) -> list[str]:
        """Names of the tables in the folder."""
        return list(self.meta["tables"])

    def has_table(self, name: str) -> bool:
        """Whether the folder has a table called ``name``."""
        return name in self.meta["tables"]

    def table_path(self, name: str) -> pathlib.Path:
        """Path of table ``name`` (a file or a column folder)."""
        if not self.has_table(name):
            # impressions.csv.gz or .parquet is no table, but looks like one: say so.
            packed = sorted(p.name for p in self.path.iterdir() if p.name.startswith(f"{name}.")
                            and p.is_file() and p.suffix.lower() not in (".csv", ".tsv"))
            hint = (f"; {', '.join(packed)} is not read: a table is a .csv or .tsv file "
                    "(uncompressed) or a folder of .npy columns") if packed else ""
            raise DataError(f"no table {name!r} (have {self.table_names}){hint}",
                            file=self.path)
        return self.path / self.meta["tables"][name]["path"]

    def table_files(self, name: str) -> list[pathlib.Path]:
        """The files holding table ``name``: its CSV/TSV file, or the ``.npy`` column files
        of its folder as :meth:`table` reads them (any case, hidden files left out),
        sorted by column."""
        path = self.table_path(name)
        return list(_npy_files(path).values()) if path.is_dir() else [path]

    def table(
        self,
        name: str,
        columns: Iterable[str] | None = None,
        *,
        kinds: Mapping[str, str] | None = None,
    ) -> dict[str, np.ndarray]:
        """Reads a table.

        Args:
          name: table name.
          columns: columns to return (all by default); a missing one is a DataError.
          kinds: forced column types for text tables ("int", "float", "number", "str",
            "label"; see :func:`read_text_table`).

        Returns:
          column name -> array (npy columns memory-mapped).
        """
        path = self.table_path(name)
        cols = None if columns is None else list(columns)
        if path.is_dir():
            return read_npy_table(path, columns=cols)
        out, skipped, lines = _read_text_table(
            path, columns=cols, kinds=kinds, on_bad_lines=self.on_bad_lines
        )
        self._lines[name] = lines
        if skipped:
            self.skipped[name] = skipped
        return out

    def error(
        self, name: str, message: str, *, column: str | None = None, row: int | None = None
    ) -> DataError:
        """A DataError about table ``name`` that names the file, column and line.

        Args:
          name: table name.
          message: what is wrong.
          column: the offending column, or None.
          row: 0-based row of the table as last returned by :meth:`table`, or None.
            A text table names its file line (header = line 1); an npy table names
            ``<table>/<column>.npy`` and the row.

        Returns:
          The DataError (to raise).
        """
        path = self.table_path(name)
        if path.is_dir():
            file = (_npy_files(path).get(column, path / f"{column}.npy")
                    if column is not None else path)
            if row is not None:
                message = f"row {row}: {message}"
            return DataError(message, file=file, column=column)
        lines = self._lines.get(name)
        line = None
        if row is not None:
            if lines is not None and 0 <= row < len(lines):
                line = int(lines[row])
            else:
                message = f"row {row}: {message}"
        return DataError(message, file=path, column=column, line=line)

    def num_rows(self, name: str) -> int:
        """Row count of a table (from dataset.json if recorded, else by reading it)."""
        t = self.meta["tables"].get(name, {})
        if "rows" in t:
            return int(t["rows"])
        return len(next(iter(self.table(name).values())))

    @property
    def kg_path(self) -> pathlib.Path | None:
        """The knowledge-graph folder (train/valid/test.txt), or None."""
        kg = self.meta.get("kg")
        return None if kg is None else self.path / kg

    @property
    def splits(self) -> dict[str, tuple[int, int]]:
        """Window name -> (start_day, end_day), half-open."""
        return {k: (int(v[0]), int(v[1])) for k, v in self.meta.get("splits", {}).items()}

    def window_days(self, window) -> tuple[int, int]:
        """The half-open (start_day, end_day) of ``window``: a window name (`day_window`),
        a ``"START,END"`` string of days (what a ``--config.data.*_window`` override or
        a flag can hold: a folder without dataset.json has no named window) or a pair.

        Raises:
          DataError: an unknown name, or an empty window.
        """
        m = _DAYS.fullmatch(window) if isinstance(window, str) else None
        if isinstance(window, str) and m is None:
            return self.day_window(window, hint="; or give days as START,END (END exclusive)")
        start, end = (int(x) for x in (m.groups() if m else window))
        return check_day_window(
            start, end, name=window,
            note=" (START,END: END is exclusive and must be above START)")

    def day_window(self, name: str, *, hint: str = "") -> tuple[int, int]:
        """The half-open day window ``name`` (aliases: train, valid, test, pretrain,
        stale, fresh -> ranker_train, ranker_valid, ranker_test, fresh_pretrain,
        stale_pretrain, fresh_pretrain).

        Args:
          name: window name.
          hint: appended to the message of a window not found (what else the caller
            takes, e.g. days).

        Returns:
          (start_day, end_day).
        """
        splits = self.splits
        key = name if name in splits else WINDOW_ALIASES.get(name, name)
        if key not in splits:
            meta = self.path / "dataset.json"
            # A folder without dataset.json was named as "DIR/dataset.json: ... (have [])".
            where, have = ((meta, f"have {sorted(splits)}") if meta.exists()
                           else (self.path, "the folder has no dataset.json to name windows"))
            raise DataError(f"no day window {name!r} ({have}){hint}", file=where)
        return check_day_window(*splits[key], name=name, file=self.path / "dataset.json")
