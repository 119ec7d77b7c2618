"""Knowledge-graph triple folders -> a typed, integer :class:`KnowledgeGraph`.

Folder layout (the common link-prediction layout, plus optional types)::

    DIR/train.txt  valid.txt  test.txt   head<TAB>relation<TAB>tail, one triple per line
    DIR/entity_types.tsv                 entity<TAB>type, one entity per line (optional)

Without ``entity_types.tsv`` every entity has the one type ``"entity"``. ``train.txt``
is required; ``valid.txt``/``test.txt`` are optional (a missing file means no such
split), but a present file must hold at least one triple. A first line
``head<TAB>relation<TAB>tail`` or ``subject<TAB>predicate<TAB>object`` (any case;
``entity<TAB>type`` in ``entity_types.tsv``) is a header and skipped: a table exported
with its column names (:data:`TRIPLE_HEADERS`); any other line is data, so name the
columns so or drop the line. Blank lines are ignored;
``\\r\\n`` line ends and leading UTF-8 byte-order marks (one or more) are accepted. Whitespace
around a field is not part of it (``"a "`` is the entity ``"a"``), as for ids in CSV/TSV
tables (:mod:`jax_recsys.data.folder`). A NUL character is an error (NumPy strings drop
trailing NULs: ``"a\\x00"`` would be the entity ``"a"``).

Integer view: every entity type has its own table, so an entity is a row *within its
type's table*; rows come from a per-type :class:`~jax_recsys.data.vocab.Vocab` built
from the entities of ``train.txt`` in ascending raw-id order. Relations are numbered in
ascending name order. ``splits[name]`` is int64 [T, 3] ``(head_row, relation, tail_row)``.
Each relation has one head type and one tail type, inferred from the data; a relation
seen with two head (or tail) types is an error naming both lines.

Raw ids in the vocabularies (``normalize_ids=True``, the default): a type whose entity
names all carry the prefix ``"<type>:"`` (``user:12``, as the synthetic world writes
them) has the prefix removed, and names that are all canonical decimal integers become
int64. Pretrained facet tables then map onto the ranker's integer ids by raw id.

Errors are :class:`~jax_recsys.data.folder.DataError` with file and line: text that
is not UTF-8, wrong number of fields, empty file, entity without a type, conflicting
entity types, inconsistent relation types, and -- with ``unseen="error"`` (default) --
a valid/test triple whose entity or relation never occurs in train. ``unseen="skip"``
drops such triples and reports the count per split (``KnowledgeGraph.skipped`` and a
warning).

:meth:`KnowledgeGraph.filter_index` builds a :class:`TripleIndex` over all true
triples (train + valid + test) for filtered ranking evaluation.

Dimension legend: T triples, E entities (global, all types), B queries, F answers per
query, NR relations, M stride of the index keys (> every row id).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import pathlib
import re
import warnings
from collections.abc import Mapping, Sequence

import numpy as np

from jax_recsys.data.folder import DataError, _not_utf8, read_utf8
from jax_recsys.data.vocab import Vocab

SPLITS = ("train", "valid", "test")
UNTYPED = "entity"
# Column-name lines a triple file / entity_types.tsv may start with (compared without
# case): what a table exported with its header writes (pandas ``to_csv(sep="\\t",
# index=False)``, a spreadsheet). Skipped, never read as a triple of entities "head"
# and "tail".
TRIPLE_HEADERS = (("head", "relation", "tail"), ("subject", "predicate", "object"))
TYPE_HEADERS = (("entity", "type"),)


# --------------------------------------------------------------------------- parsing


# A field of whitespace only (spaces, \r, ...), between tabs / line ends.
_BLANK_FIELD = re.compile(r"(?:^|[\t\n])[^\S\t\n]+(?=[\t\n]|$)")
# A field that starts or ends with whitespace other than the tab / line end around it.
_PADDED_FIELD = re.compile(r"(?:^|[\t\n])[^\S\t\n]|[^\S\t\n](?=[\t\n]|$)")
# The ASCII characters str.strip() removes, other than tab, newline and \r (gone by then).
_ASCII_SPACES = (" ", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x1f")


def _may_pad(body: str) -> bool:
    """False when ``body`` holds no whitespace but tabs and newlines, so neither
    `_BLANK_FIELD` nor `_PADDED_FIELD` can match: a few C-speed scans instead of two
    regex passes (about 1.9 s for a 59 MB triple file)."""
    return not body.isascii() or any(c in body for c in _ASCII_SPACES)


def _read_fields(path: pathlib.Path, nfields: int,
                 headers: Sequence[tuple[str, ...]] = ()) -> tuple[list[list[str]], np.ndarray]:
    """Reads a tab-separated file of ``nfields`` columns.

    Args:
      path: the file.
      nfields: fields per line.
      headers: column-name lines the file may start with (lower case); its first
        line that is not blank is skipped when it is one of them (in any case).

    Returns:
      (one list of strings per field, int64 1-based line numbers); blank lines and a
      header skipped, whitespace around a field removed.
    """
    file = str(path)
    try:
        # Byte-order marks are dropped, not read into the first entity's name.
        text = read_utf8(path)
    except UnicodeDecodeError:
        raise _not_utf8(path) from None  # names the line of the first bad byte
    except OSError as e:  # a folder of that name, no permission
        raise DataError(f"cannot read: {e.strerror or e}", file=file) from None
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if "\x00" in text:  # NumPy strings drop trailing NULs: "a\x00" would be entity "a"
        raise DataError("NUL character in an entity or relation name",
                        file=file, line=text.count("\n", 0, text.index("\x00")) + 1)
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    first = next((i for i, line in enumerate(lines) if line.strip()), None)
    skip = 0  # lines before the first one read: blank ones and a header
    if first is not None and tuple(
            f.strip().lower() for f in lines[first].split("\t")) in headers:
        skip, header = first + 1, lines[first]
        lines = lines[skip:]
        if not any(line.strip() for line in lines):
            raise DataError(f"empty file: a header line {header!r} and no line after it",
                            file=file, line=skip)
    n = len(lines)
    # Fast path (vectorised): every line has exactly nfields-1 tabs (so no blank lines)
    # and no field is empty.
    if n > 0:
        body = "\n".join(lines)
        raw_b = np.frombuffer(body.encode("utf-8"), np.uint8)
        tab_line = np.searchsorted(np.flatnonzero(raw_b == 10), np.flatnonzero(raw_b == 9))
        tabs_per_line = np.bincount(tab_line, minlength=n)
        may_pad = _may_pad(body)
        empty_field = ("\t\t" in body or "\n\t" in body or "\t\n" in body
                       or body.startswith("\t") or body.endswith("\t")
                       or (may_pad and _BLANK_FIELD.search(body) is not None))
        if (tabs_per_line == nfields - 1).all() and not empty_field:
            flat = body.replace("\n", "\t").split("\t")
            if may_pad and _PADDED_FIELD.search(body) is not None:
                flat = [x.strip() for x in flat]
            return [flat[j::nfields] for j in range(nfields)], np.arange(1, n + 1) + skip
    cols: list[list[str]] = [[] for _ in range(nfields)]
    line_list: list[int] = []
    for i, line in enumerate(lines, start=1 + skip):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != nfields:
            hint = " (fields must be separated by tabs)" if len(line.split()) == nfields else ""
            raise DataError(f"expected {nfields} tab-separated fields, got {len(parts)}{hint}: "
                            f"{line[:80]!r}", file=file, line=i)
        if any(not p.strip() for p in parts):
            raise DataError("empty field", file=file, line=i)
        for j, p in enumerate(parts):
            cols[j].append(p.strip())
        line_list.append(i)
    if not line_list:
        raise DataError("empty file: no lines", file=file)
    return cols, np.asarray(line_list, dtype=np.int64)


def _factorize(columns: Sequence[list[str]]) -> tuple[list[np.ndarray], list[str]]:
    """Integer codes of string columns (codes in order of first appearance).

    A dict is far faster than sorting millions of strings, and ``map`` with the dict's
    own ``__getitem__`` keeps the per-item work in C (string hashes are cached).

    Returns:
      (int64 codes per column, the distinct strings in code order).
    """
    codes: dict[str, int] = dict.fromkeys(itertools.chain.from_iterable(columns))
    for i, key in enumerate(codes):
        codes[key] = i
    get = codes.__getitem__
    return [np.fromiter(map(get, c), np.int64, len(c)) for c in columns], list(codes)


def _normalize(names: np.ndarray, etype: str) -> np.ndarray:
    """Strips a shared ``"<etype>:"`` prefix and turns canonical integers into int64."""
    if len(names) == 0:
        return names
    prefix = etype + ":"
    if np.strings.startswith(names, prefix).all():
        names = np.strings.slice(names, len(prefix), None)
    try:
        as_int = names.astype(np.int64)
    except (ValueError, OverflowError):
        return names
    # Only canonical spellings ("12", not "012" or "+12"), so the mapping is one-to-one.
    if np.array_equal(as_int.astype(np.str_), names):
        return as_int
    return names


# --------------------------------------------------------------------------- index


class TripleIndex:
    """All true triples, sorted for vectorised "which answers are true" queries.

    Tail side: key ``r * M + h``, answers are tails; head side: key ``r * M + t``,
    answers are heads. Answers are stored sorted by (key, answer), so a query's answers
    are one contiguous range found with two ``searchsorted`` calls.

    Args:
      triples: int [T, 3] (head_row, relation, tail_row), or a list of such arrays.
      max_rows: M, larger than every row id (default: largest row + 1).
    """

    def __init__(self, triples: Sequence[np.ndarray] | np.ndarray, *,
                 max_rows: int | None = None):
        arrays = triples if isinstance(triples, (list, tuple)) else [triples]
        all_t3 = np.concatenate([np.asarray(t, np.int64).reshape(-1, 3) for t in arrays])
        if all_t3.size and all_t3.min() < 0:
            raise ValueError("triples must have non-negative rows and relations")
        top = int(all_t3[:, [0, 2]].max()) + 1 if all_t3.size else 1
        self.max_rows = top if max_rows is None else int(max_rows)
        if self.max_rows < top:
            raise ValueError(f"max_rows={self.max_rows} <= largest row {top - 1}")
        self.num_relations = int(all_t3[:, 1].max()) + 1 if all_t3.size else 0
        m = self.max_rows
        if (self.num_relations + 1) * m > np.iinfo(np.int64).max // m:
            raise ValueError("index keys would overflow int64")
        # (r * M + h) * M + t, unique and sorted: whole-triple membership, and (since the
        # order is by (r, h) then t) directly the tail-side answer ranges.
        keys_t = np.unique((all_t3[:, 1] * m + all_t3[:, 0]) * m + all_t3[:, 2])
        self._triple_keys = keys_t
        self.num_triples = len(keys_t)
        rh_t, t_t = np.divmod(keys_t, m)
        r_t, h_t = np.divmod(rh_t, m)
        self._tail = (rh_t, t_t)
        rt_t, h_sorted_t = np.divmod(np.sort((r_t * m + t_t) * m + h_t), m)
        self._head = (rt_t, h_sorted_t)

    def _ranges(self, side: str, anchor, rel):
        if side not in ("tail", "head"):
            raise ValueError(f"side must be 'tail' or 'head', got {side!r}")
        keys, vals = self._tail if side == "tail" else self._head
        q_b = np.asarray(rel, np.int64) * self.max_rows + np.asarray(anchor, np.int64)
        lo_b = np.searchsorted(keys, q_b, "left")
        hi_b = np.searchsorted(keys, q_b, "right")
        return vals, lo_b, hi_b

    def answer_pairs(self, *, side: str, anchor, rel) -> tuple[np.ndarray, np.ndarray]:
        """All true answers of each query as flat (query index, answer row) pairs.

        Args:
          side: "tail" (anchor = head rows, answers = tails) or "head" (anchor = tails).
          anchor: int [B] rows of the known entity.
          rel: int [B] relation ids.

        Returns:
          (int64 [P] query indices in 0..B-1, int64 [P] answer rows); use them to
          scatter ``-inf`` into a [B, num_rows] score matrix.
        """
        vals, lo_b, hi_b = self._ranges(side, anchor, rel)
        count_b = hi_b - lo_b
        query_p = np.repeat(np.arange(len(lo_b), dtype=np.int64), count_b)
        start_p = np.repeat(lo_b - np.cumsum(count_b) + count_b, count_b)
        return query_p, vals[start_p + np.arange(len(query_p))]

    def answers(self, *, side: str, anchor, rel, target=None) -> np.ndarray:
        """True answers per query as a -1 padded matrix.

        Args:
          side: "tail" or "head" (see :meth:`answer_pairs`).
          anchor: int [B] rows of the known entity.
          rel: int [B] relation ids.
          target: optional int [B]; each query's own answer is left out.

        Returns:
          int32 [B, F] answer rows, -1 padded; F >= 1 is the largest answer count.
        """
        vals, lo_b, hi_b = self._ranges(side, anchor, rel)
        width = max(int((hi_b - lo_b).max(initial=0)), 1)
        idx_bf = lo_b[:, None] + np.arange(width)[None, :]
        ok_bf = idx_bf < hi_b[:, None]
        out_bf = np.where(ok_bf, vals[np.minimum(idx_bf, max(len(vals) - 1, 0))]
                          if len(vals) else -1, -1)
        if target is not None:
            out_bf = np.where(out_bf == np.asarray(target)[:, None], -1, out_bf)
        return out_bf.astype(np.int32)

    def mask(self, *, side: str, anchor, rel, num_rows: int) -> np.ndarray:
        """Dense filter mask for :func:`jax_recsys.metrics.realistic_rank`.

        Args:
          side: "tail" or "head".
          anchor: int [B] rows of the known entity.
          rel: int [B] relation ids.
          num_rows: candidates per query (rows of the answer type's table).

        Returns:
          bool [B, num_rows]: True at every true answer, the query's own target
          included (so scores over all candidates can be ranked directly).
        """
        query_p, ans_p = self.answer_pairs(side=side, anchor=anchor, rel=rel)
        if len(ans_p) and ans_p.max() >= num_rows:
            raise ValueError(f"answer row {ans_p.max()} >= num_rows={num_rows}")
        out = np.zeros((len(np.asarray(anchor)), num_rows), dtype=bool)
        out[query_p, ans_p] = True
        return out

    def contains(self, heads, rels, tails) -> np.ndarray:
        """Whether each (head, relation, tail) is a true triple.

        Args:
          heads, rels, tails: int arrays of one shape.

        Returns:
          bool array of that shape.
        """
        h, r, t = (np.asarray(x, np.int64) for x in (heads, rels, tails))
        inside = (h >= 0) & (h < self.max_rows) & (t >= 0) & (t < self.max_rows) & (r >= 0)
        keys = (r * self.max_rows + h) * self.max_rows + t
        if not len(self._triple_keys):
            return np.zeros(keys.shape, bool)
        pos = np.minimum(np.searchsorted(self._triple_keys, keys), len(self._triple_keys) - 1)
        return inside & (self._triple_keys[pos] == keys)


# --------------------------------------------------------------------------- graph


@dataclasses.dataclass(frozen=True, kw_only=True)
class KnowledgeGraph:
    """A typed knowledge graph with integer triples.

    Attributes:
      entity_types: type names, sorted (``("entity",)`` for an untyped folder).
      vocabs: type -> Vocab of that type's raw ids (row order of its table).
      relations: relation names; index = relation id.
      rel_head_type: head type of each relation (index = relation id).
      rel_tail_type: tail type of each relation.
      splits: split name -> int64 [T, 3] (head_row, relation, tail_row).
      skipped: split name -> triples dropped by ``unseen="skip"``.
      path: the folder read.
    """

    entity_types: tuple[str, ...]
    vocabs: Mapping[str, Vocab]
    relations: tuple[str, ...]
    rel_head_type: tuple[str, ...]
    rel_tail_type: tuple[str, ...]
    splits: Mapping[str, np.ndarray]
    skipped: Mapping[str, int] = dataclasses.field(default_factory=dict)
    path: str = ""

    @property
    def num_rows(self) -> dict[str, int]:
        """Entity type -> rows of its table."""
        return {t: len(v) for t, v in self.vocabs.items()}

    @property
    def num_relations(self) -> int:
        """NR."""
        return len(self.relations)

    @property
    def relation_types(self) -> dict[str, tuple[str, str]]:
        """Relation name -> (head type, tail type)."""
        return {r: (h, t) for r, h, t in
                zip(self.relations, self.rel_head_type, self.rel_tail_type, strict=True)}

    def relation_id(self, name: str) -> int:
        """The id of relation ``name``."""
        try:
            return self.relations.index(name)
        except ValueError:
            raise KeyError(f"unknown relation {name!r} (have {list(self.relations)})") from None

    def filter_index(self, splits: Sequence[str] | None = None) -> TripleIndex:
        """Index of all true triples for filtered evaluation.

        Args:
          splits: splits to include (default all: train + valid + test).

        Returns:
          A TripleIndex with ``max_rows`` = the largest table's row count.
        """
        names = list(self.splits) if splits is None else list(splits)
        for n in names:
            if n not in self.splits:
                raise KeyError(f"no split {n!r} (have {list(self.splits)})")
        max_rows = max(max(self.num_rows.values()), 1)
        return TripleIndex([self.splits[n] for n in names], max_rows=max_rows)

    def save_vocabs(self, directory: str | os.PathLike) -> dict[str, pathlib.Path]:
        """Writes ``directory/<type>.npy`` for every entity type.

        Args:
          directory: target folder (created).

        Returns:
          type -> written path.
        """
        directory = pathlib.Path(directory)
        return {t: v.save(directory / f"{t}.npy") for t, v in self.vocabs.items()}


def read_triples(
    path: str | os.PathLike,
    *,
    unseen: str = "error",
    normalize_ids: bool = True,
) -> KnowledgeGraph:
    """Reads a triple folder (see the module docstring).

    Args:
      path: folder with train.txt [valid.txt test.txt entity_types.tsv].
      unseen: "error" (default) or "skip": what to do with a valid/test triple whose
        entity or relation does not occur in train.
      normalize_ids: strip ``"<type>:"`` prefixes and turn integer names into int64.

    Returns:
      The graph.
    """
    if unseen not in ("error", "skip"):
        raise ValueError(f"unseen must be 'error' or 'skip', got {unseen!r}")
    root = pathlib.Path(path)
    if not root.is_dir():
        raise DataError("knowledge-graph folder not found", file=root)
    if not (root / "train.txt").exists():
        raise DataError("missing train.txt", file=root / "train.txt")

    parsed = {}
    for split in SPLITS:
        f = root / f"{split}.txt"
        if f.exists():
            (h, r, t), lines = _read_fields(f, 3, TRIPLE_HEADERS)
            parsed[split] = (h, r, t, lines, str(f))

    # Global entity codes over every split (a dict: far faster than sorting strings).
    order = list(parsed)
    flat_codes, names_e = _factorize([c for s in order for c in (parsed[s][0], parsed[s][2])])
    ent_codes = {s: (flat_codes[2 * i], flat_codes[2 * i + 1]) for i, s in enumerate(order)}

    # Types.
    types_file = root / "entity_types.tsv"
    if types_file.exists():
        (ent, typ), tlines = _read_fields(types_file, 2, TYPE_HEADERS)
        type_names = tuple(sorted(set(typ)))
        type_code = {name: i for i, name in enumerate(type_names)}
        type_of: dict[str, int] = {}
        line_of: dict[str, int] = {}
        for e, ty, ln in zip(ent, typ, tlines.tolist(), strict=True):
            prev = type_of.setdefault(e, type_code[ty])
            if prev != type_code[ty]:
                raise DataError(f"entity {e!r} has type {ty!r} here but {type_names[prev]!r} "
                                f"on line {line_of[e]}", file=types_file, line=ln)
            line_of.setdefault(e, ln)
        type_e = np.fromiter((type_of.get(e, -1) for e in names_e), np.int64, len(names_e))
        if (type_e < 0).any():
            for split, (h, _, t, lines, file) in parsed.items():
                hi, ti = ent_codes[split]
                bad = (type_e[hi] < 0) | (type_e[ti] < 0)
                if bad.any():
                    k = int(np.argmax(bad))
                    name = h[k] if type_e[hi[k]] < 0 else t[k]
                    raise DataError(f"entity {name!r} has no type in {types_file.name}",
                                    file=file, line=int(lines[k]))
    else:
        type_names = (UNTYPED,)
        type_e = np.zeros(len(names_e), np.int64)

    # Relations (ascending name order) and their types, from train.
    _, r_names_tr, _, lines_tr, file_tr = parsed["train"]
    (rel_first,), rel_seen = _factorize([r_names_tr])
    relations = sorted(rel_seen)
    rel_id = {name: i for i, name in enumerate(relations)}
    remap = np.array([rel_id[name] for name in rel_seen], np.int64)
    rel_tr = remap[rel_first]
    hidx_tr, tidx_tr = ent_codes["train"]
    _, first_r = np.unique(rel_tr, return_index=True)
    rel_types = []
    for side, idx in (("head", hidx_tr), ("tail", tidx_tr)):
        ty_t = type_e[idx]
        want_r = ty_t[first_r]
        bad = ty_t != want_r[rel_tr]
        if bad.any():
            k = int(np.argmax(bad))
            r = rel_tr[k]
            raise DataError(
                f"relation {relations[r]!r} has {side} type {type_names[ty_t[k]]!r} here "
                f"but {type_names[want_r[r]]!r} on line {int(lines_tr[first_r[r]])}",
                file=file_tr, line=int(lines_tr[k]))
        rel_types.append(want_r)
    rel_head_r, rel_tail_r = rel_types

    # Per-type vocabularies from train entities; global entity -> row within its type.
    in_train = np.zeros(len(names_e), bool)
    in_train[hidx_tr] = True
    in_train[tidx_tr] = True
    row_e = np.full(len(names_e), -1, np.int64)
    vocabs = {}
    names_arr = np.asarray(names_e, dtype=np.str_)
    for ti, tname in enumerate(type_names):
        members = np.flatnonzero(in_train & (type_e == ti))
        raw = names_arr[members]
        if normalize_ids:
            raw = _normalize(raw, tname)
        vocab = Vocab.build(raw)
        row_e[members] = vocab.lookup(raw)
        vocabs[tname] = vocab

    splits, skipped = {}, {}
    for split, (h, r_names, t, lines, file) in parsed.items():
        hi, tix = ent_codes[split]
        if split == "train":
            rel = rel_tr
        else:
            rel = np.fromiter((rel_id.get(x, -1) for x in r_names), np.int64, len(r_names))
        hr, tr = row_e[hi], row_e[tix]
        unseen_t = (rel < 0) | (hr < 0) | (tr < 0)
        if unseen_t.any():
            if unseen == "error":
                k = int(np.argmax(unseen_t))
                what = (f"relation {r_names[k]!r}" if rel[k] < 0 else
                        f"entity {h[k] if hr[k] < 0 else t[k]!r}")
                raise DataError(f"{what} does not occur in train.txt (pass unseen='skip' to "
                                "drop such triples)", file=file, line=int(lines[k]))
            skipped[split] = int(unseen_t.sum())
            warnings.warn(f"{file}: skipped {skipped[split]} triples with an entity or "
                          "relation unseen in train.txt", stacklevel=2)
        keep = ~unseen_t
        if split != "train":
            rk = rel[keep]
            for side, idx, want in (("head", hi, rel_head_r), ("tail", tix, rel_tail_r)):
                bad = type_e[idx[keep]] != want[rk]
                if bad.any():
                    k = int(np.flatnonzero(keep)[np.argmax(bad)])
                    raise DataError(
                        f"relation {r_names[k]!r} has {side} type "
                        f"{type_names[type_e[idx[k]]]!r} here but "
                        f"{type_names[want[rel[k]]]!r} in train.txt", file=file,
                        line=int(lines[k]))
        splits[split] = np.stack([hr[keep], rel[keep], tr[keep]], axis=1).astype(np.int64)

    # A type with no entity in train.txt (only in entity_types.tsv, valid or test)
    # would be a table of 0 rows: dropped, with a warning (its valid/test triples
    # were handled as unseen above).
    empty = [name for name in type_names if len(vocabs[name]) == 0]
    if empty:
        warnings.warn(f"{root}: entity type(s) {empty} have no entity in train.txt; "
                      "they get no table", stacklevel=2)
        vocabs = {k: v for k, v in vocabs.items() if k not in empty}
    return KnowledgeGraph(
        entity_types=tuple(t for t in type_names if t not in empty),
        vocabs=vocabs,
        relations=tuple(relations),
        rel_head_type=tuple(type_names[i] for i in rel_head_r),
        rel_tail_type=tuple(type_names[i] for i in rel_tail_r),
        splits=splits,
        skipped=skipped,
        path=str(root),
    )
