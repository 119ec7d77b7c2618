"""The serving artifact: quantized tables + vocabularies + ranker params, versioned.

Layout (the contract in docs/ARCHITECTURE.md, "Serving artifact"):

    ART/
      manifest.json            format_version, version, tables, ranker, files, sizes, report
      tables/<name>.codes.npy  uint8 [R, ceil(D/2)] (int4) | uint8 [R, D] (int8) | float32 [R, D]
      tables/<name>.scale.npy  [R] (float16 by default); absent for float32 tables
      tables/<name>.bias.npy   [R]
      vocab/<name>.npy         raw ids in row order (int64 or unicode; never object)
      ranker/config.json       the ranker's config (JSON)
      ranker/params/<leaf>.npy dense parameters, one file per leaf path
                               (named by `fsutil.param_file_stems`)

A table whose name is not a plain file name (Freebase-style ``/people/person``, or
one of two names that differ only in case) is stored as ``_<index>`` instead of
``<name>`` (`fsutil.file_stems`); the manifest's "files" entry of each table names
its files, so readers never build a path from a name.

`manifest["files"]` maps every file (relative path) except manifest.json to
its sha256; `manifest["sizes"]` to its size in bytes. Every path the manifest
names is relative and inside the folder: a reader refuses an absolute path or
one with a '..' part (a hand-edited manifest) before it opens any file. The
version id is the first 16 hex digits of sha256 over the sorted lines
"<relpath>\\0<sha256>\\n"
followed (format 2) by the canonical JSON of the manifest's "tables" and
"ranker" entries (`compute_version`), so equal content gives an equal version,
and any changed byte, or any change to what the manifest says the files are
(a table's dim, which file holds which parameter), gives a new one. Only the
free-form "report" is outside the version. Format 1 artifacts (version over the
file lines only) still load. Servers and the ranker compare versions and refuse
to pair different ones.

Writing is atomic: everything goes into a hidden temporary sibling folder,
every file and folder is fsync'ed, then the folder is renamed into place. A
failure removes the temporary folder, so a half-written artifact is never
visible under the final name. The folder it replaces must be empty or an
artifact (`check_replaceable`): a training run, a dataset or any other folder
given as the output is refused, never deleted; so is a symlink (the rename would
replace the link, not its target: write a new folder and repoint the link).

This module imports only NumPy and the standard library (the embedding server
uses it).

Dimension legend: R table rows, D embedding dim.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import uuid

import numpy as np

from jax_recsys import fsutil
from jax_recsys.quant import rowwise

FORMAT_VERSION = 2
_READABLE_FORMATS = (1, 2)  # 1: the version covers the file hashes only
MANIFEST = "manifest.json"
_DTYPE_OF_BITS = {4: "int4", 8: "int8", 32: "float32"}
_BITS_OF_DTYPE = {v: k for k, v in _DTYPE_OF_BITS.items()}


class ArtifactError(ValueError):
    """A serving artifact is missing, damaged, inconsistent or of the wrong version."""


class Manifest(dict):
    """The parsed manifest.json: a plain dict with attribute shortcuts."""

    @property
    def version(self) -> str:
        return self["version"]

    @property
    def format_version(self) -> int:
        return self["format_version"]

    @property
    def tables(self) -> dict:
        return self["tables"]

    @property
    def ranker(self) -> dict | None:
        return self.get("ranker")

    @property
    def files(self) -> dict[str, str]:
        return self["files"]

    @property
    def sizes(self) -> dict[str, int]:
        return self.get("sizes", {})

    @property
    def report(self) -> dict:
        return self.get("report") or {}


@dataclasses.dataclass(frozen=True)
class Artifact:
    """A loaded serving artifact; table arrays are read-only memmaps.

    Attributes:
      path: the artifact folder.
      version: the content version id (16 hex digits).
      manifest: the parsed manifest.
      tables: name -> QuantizedTable (mmap'd).
      vocabs: name -> raw ids in row order (mmap'd).
      ranker_config: the ranker's JSON config, or None.
      ranker_params: leaf path -> array, or {}.
    """

    path: pathlib.Path
    version: str
    manifest: Manifest
    tables: dict[str, rowwise.QuantizedTable]
    vocabs: dict[str, np.ndarray]
    ranker_config: dict | None
    ranker_params: dict[str, np.ndarray]

    def lookup(self, table: str, rows) -> np.ndarray:
        """Dequantized float32 rows.shape + (D,) of `table` (see `dequantize_rows`)."""
        if table not in self.tables:
            raise KeyError(f"artifact {self.path} has no table {table!r}; has {sorted(self.tables)}")
        return rowwise.dequantize_rows(self.tables[table], rows)


# ----------------------------------------------------------------------------- helpers


def compute_version(files: dict[str, str], *, tables=None, ranker=None) -> str:
    """Version id: first 16 hex of sha256 over sorted (relpath, sha256) pairs.

    Args:
      files: relative path -> hex sha256 of the file.
      tables, ranker: the manifest's "tables" and "ranker" entries (format 2);
        both None gives the format 1 id, over the files only.

    Returns:
      16 hex characters.
    """
    h = hashlib.sha256()
    for rel, digest in sorted(files.items()):
        h.update(f"{rel}\0{digest}\n".encode())
    if tables is not None or ranker is not None:
        meta = json.dumps({"ranker": ranker, "tables": tables}, sort_keys=True,
                          separators=(",", ":"), default=_json_default)
        h.update(f"manifest\0{meta}\n".encode())
    return h.hexdigest()[:16]


def _manifest_version(manifest: Manifest) -> str:
    """The version id the manifest's content gives, by its format."""
    if manifest["format_version"] == 1:
        return compute_version(manifest["files"])
    return compute_version(
        manifest["files"], tables=manifest["tables"], ranker=manifest.get("ranker")
    )


def _sha256_file(path: pathlib.Path, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def _fsync_file(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: pathlib.Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _replace_atomically(path: pathlib.Path, data: bytes) -> None:
    """Writes ``data`` to a sibling temporary file, fsyncs it and renames it over ``path``."""
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.write_bytes(data)
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _json_default(x):
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def _dump_json(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n"


def _save_npy(path: pathlib.Path, arr: np.ndarray, what: str) -> None:
    arr = np.asarray(arr)
    if arr.dtype.hasobject:
        raise ValueError(
            f"{what}: object arrays cannot be stored without pickle; convert to int64 or str"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, arr, allow_pickle=False)


def _expected_arrays(name: str, entry: dict) -> dict[str, tuple[tuple, np.dtype]]:
    """kind -> (shape, dtype) expected from a manifest table entry."""
    rows, dim, dtype = int(entry["rows"]), int(entry["dim"]), entry["dtype"]
    if dtype not in _BITS_OF_DTYPE:
        raise ArtifactError(f"{MANIFEST}: table {name!r} has unknown dtype {dtype!r}")
    bits = _BITS_OF_DTYPE[dtype]
    if bits == 32:
        return {"codes": ((rows, dim), np.dtype(np.float32))}
    sdt = np.dtype(entry["scale_dtype"])
    return {
        "codes": ((rows, rowwise.packed_dim(dim, bits)), np.dtype(np.uint8)),
        "scale": ((rows,), sdt),
        "bias": ((rows,), sdt),
    }


# ----------------------------------------------------------------------------- write


def check_not_symlink(out_dir: str | os.PathLike) -> None:
    """Refuses an artifact folder that is a symlink (to anything, or dangling).

    Writing an artifact replaces its folder whole: at a symlink it would put a folder
    in the link's place and leave the link's target as it was, breaking the rollout
    of a link that servers follow (`ln -sfn NEW ART`).

    Raises:
      ArtifactError: `out_dir` is a symlink (the message names its target and says
        what to do instead).
    """
    refusal = fsutil.symlink_refusal(out_dir, "the artifact")
    if refusal:
        raise ArtifactError(refusal)


# What an artifact folder holds (`write_artifact`).
_ARTIFACT_ENTRIES = frozenset({MANIFEST, "tables", "vocab", "ranker"})


def check_replaceable(out_dir: str | os.PathLike, *, swap: bool = True) -> Manifest | None:
    """Checks that an artifact written to `out_dir` may take the place of what is there.

    Writing an artifact replaces its folder whole, so it may only land on nothing, on
    an empty folder, or on a serving artifact: a folder whose manifest.json reads as
    an artifact's (its files may be damaged: they are rewritten), or a damaged one (a
    manifest.json that does not read), in either case holding nothing but an
    artifact's entries (manifest.json, tables/, vocab/, ranker/). Any other folder (a
    training run, a dataset, a user's files, an artifact with files put beside its
    own) is refused, with or without overwrite, and so is a symlink
    (`check_not_symlink`).

    Args:
      out_dir: the artifact folder to write.
      swap: the folder is about to be replaced. False (a check before any work, when
        the new version is not known yet: the same version leaves the folder as it is)
        lets an artifact with other files beside its own pass.

    Returns:
      The manifest of the artifact at `out_dir` (not verified against its files), or
      None when `out_dir` does not exist, is an empty folder or a damaged artifact.

    Raises:
      ArtifactError: `out_dir` is a symlink or not a folder (or lies below a file), or a
        non-empty folder that is not a serving artifact or holds other entries beside one
        (the message names the folder and what it holds).
    """
    out = pathlib.Path(out_dir)
    check_not_symlink(out)
    if not out.exists():
        above = next((d for d in out.absolute().parents if d.exists()), None)
        if above is not None and not above.is_dir():
            raise ArtifactError(f"{out} cannot be created: {above} exists and is not a folder")
        return None
    if not out.is_dir():
        raise ArtifactError(f"{out} exists and is not a folder; an artifact is a folder")
    names = fsutil.folder_names(out)  # one listing for the checks and the messages
    if not names:
        return None
    others = sorted(n for n in names if n.rstrip("/") not in _ARTIFACT_ENTRIES
                    and not n.startswith(f".{MANIFEST}.tmp-"))
    try:
        manifest = _read_manifest(out)
    except ArtifactError as e:
        if (out / MANIFEST).exists() and not others:
            return None  # a damaged artifact (its manifest unreadable): nothing else there
        why = "no manifest.json" if not (out / MANIFEST).exists() else str(e)
        raise ArtifactError(
            f"{out} is not a serving artifact ({why}) and not empty: it holds "
            f"{fsutil.list_names(names)}; refusing to replace it (overwrite replaces only an "
            "earlier artifact or an empty folder): choose another artifact folder"
        ) from None
    if others and swap:  # replacing the folder would delete them
        raise ArtifactError(
            f"{out} is a serving artifact but also holds {', '.join(others[:6])}"
            f"{' ...' if len(others) > 6 else ''}, which replacing it would delete: move "
            "them out of the artifact folder first"
        )
    return manifest


def write_artifact(
    out_dir: str | os.PathLike,
    *,
    tables: dict[str, np.ndarray | rowwise.QuantizedTable],
    vocabs: dict[str, np.ndarray],
    bits: int = 4,
    ranker_config: dict | None = None,
    ranker_params: dict[str, np.ndarray] | None = None,
    report: dict | None = None,
    chunk_rows: int = 65536,
    scale_dtype=np.float16,
    overwrite: bool = False,
) -> Manifest:
    """Writes a serving artifact atomically.

    Args:
      out_dir: the artifact folder to create.
      tables: name -> float [R, D] table (ndarray or memmap; quantized chunk by
        chunk at `bits`) or an already quantized QuantizedTable (kept as is).
      vocabs: name -> raw ids in row order ([R], int or unicode). Every table
        needs one; vocabularies without a table are refused.
      bits: 4 (default), 8, or 32 (store float32 rows unquantized).
      ranker_config: JSON-serialisable ranker config, stored as ranker/config.json.
      ranker_params: leaf path (e.g. "mlp/layers/0/kernel") -> array.
      report: free-form JSON-serialisable report (quality/size deltas) kept in
        the manifest.
      chunk_rows: rows per quantization chunk (bounds memory).
      scale_dtype: storage dtype of per-row scale and bias.
      overwrite: replace an existing artifact of a different version at `out_dir`
        (only an artifact: see `check_replaceable`).

    Returns:
      The written Manifest. When `out_dir` already holds this version, intact
      (every byte checked), its files are left in place and only a changed
      report is written into its manifest; with damaged files it is replaced
      like any other content.

    Raises:
      ArtifactError: `out_dir` holds another artifact version (or a damaged one) and
        overwrite is False; or it is a symlink, a file or a non-empty folder that is no
        serving artifact (refused even with overwrite: `check_replaceable`).
      ValueError: bad table, vocab or parameter input (nothing is left behind).
    """
    out = pathlib.Path(out_dir).absolute()
    if set(vocabs) - set(tables):
        raise ValueError(f"vocabs without a table: {sorted(set(vocabs) - set(tables))}")
    if set(tables) - set(vocabs):
        raise ValueError(f"tables without a vocab: {sorted(set(tables) - set(vocabs))}")
    check_replaceable(out, swap=False)  # before any work; again just before the swap
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        manifest = _write_into(
            tmp,
            tables=tables,
            vocabs=vocabs,
            bits=bits,
            ranker_config=ranker_config,
            ranker_params=ranker_params,
            report=report,
            chunk_rows=chunk_rows,
            scale_dtype=scale_dtype,
        )
        if out.exists():
            try:
                existing = verify_artifact(out, mode="sizes")
            except ArtifactError:
                existing = None  # not an artifact, or a damaged one: never 'equal'
            if existing is not None and existing.get("version") == manifest.version:
                # The same files: leave them in place (a server may have them
                # mapped), once every byte is checked. Only the free-form report
                # may differ; the new one replaces the old, atomically.
                try:
                    verify_artifact(out, mode="full")
                except ArtifactError:
                    existing = None  # same version, damaged files: replace them
                else:
                    if existing.report != manifest.report:
                        _replace_atomically(out / MANIFEST, (tmp / MANIFEST).read_bytes())
                    shutil.rmtree(tmp)
                    return manifest
            if not overwrite and not (out.is_dir() and not any(out.iterdir())):
                what = f"artifact version {existing.version}" if existing else "other or damaged files"
                raise ArtifactError(
                    f"{out} already holds {what}; new version is {manifest.version} "
                    "(pass overwrite=True, or --overwrite on the command line, to replace it)"
                )
            check_replaceable(out)  # still an artifact or empty (nothing put there meanwhile)
        fsutil.swap_dir(tmp, out)
        _fsync_dir(out.parent)
        return manifest
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_into(
    root: pathlib.Path,
    *,
    tables,
    vocabs,
    bits,
    ranker_config,
    ranker_params,
    report,
    chunk_rows,
    scale_dtype,
) -> Manifest:
    if bits not in rowwise.SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {rowwise.SUPPORTED_BITS}, got {bits}")
    table_entries = {}
    stems = fsutil.file_stems(sorted(tables))  # table names may hold '/' or '..'
    for name in sorted(tables):
        src = tables[name]
        tdir = root / "tables"
        if isinstance(src, rowwise.QuantizedTable):
            q = src
            # What the manifest will say of the files, as load_artifact checks it.
            if q.bits == 32 and q.codes.dtype != np.float32:
                raise ValueError(f"table {name!r}: an unquantized (bits=32) table's rows must be "
                                 f"float32, got {q.codes.dtype}")
            if q.bits != 32 and q.scale.dtype != q.bias.dtype:
                raise ValueError(f"table {name!r}: scale ({q.scale.dtype}) and bias "
                                 f"({q.bias.dtype}) must have one dtype")
            names = rowwise.table_file_names(stems[name], q.bits)
            arrays = {"codes": q.codes, "scale": q.scale, "bias": q.bias}
            for kind, fname in names.items():
                _save_npy(tdir / fname, arrays[kind], f"table {name!r} {kind}")
            rows, dim, tbits = q.num_rows, q.dim, q.bits
            sdt = None if q.bits == 32 else np.dtype(q.scale.dtype).name
        else:
            if getattr(src, "ndim", None) != 2:
                raise ValueError(f"table {name!r}: expected [R, D], got shape {getattr(src, 'shape', None)}")
            try:
                rowwise.quantize_table_chunked(
                    src, tdir, stems[name], bits=bits, chunk_rows=chunk_rows,
                    scale_dtype=scale_dtype,
                )
            except ValueError as e:  # a non-finite row, or one a float16 bias cannot hold
                raise ValueError(f"table {name!r}: {e}") from None
            names = rowwise.table_file_names(stems[name], bits)
            rows, dim, tbits = int(src.shape[0]), int(src.shape[1]), bits
            sdt = None if bits == 32 else np.dtype(scale_dtype).name
        vocab = np.asarray(vocabs[name])
        if vocab.shape != (rows,):
            raise ValueError(f"vocab {name!r}: shape {vocab.shape} does not match table rows {rows}")
        if vocab.dtype.kind not in "iuU":
            raise ValueError(f"vocab {name!r}: dtype {vocab.dtype} must be integer or unicode str")
        _save_npy(root / "vocab" / f"{stems[name]}.npy", vocab, f"vocab {name!r}")
        files = {k: f"tables/{v}" for k, v in names.items()}
        files["vocab"] = f"vocab/{stems[name]}.npy"
        table_entries[name] = {
            "rows": rows,
            "dim": dim,
            "dtype": _DTYPE_OF_BITS[tbits],
            "scale_dtype": sdt,
            "files": files,
        }
    ranker = None
    if ranker_config is not None or ranker_params:
        ranker = {"config": None, "params": {}}
        if ranker_config is not None:
            (root / "ranker").mkdir(exist_ok=True)
            (root / "ranker" / "config.json").write_text(_dump_json(ranker_config))
            ranker["config"] = "ranker/config.json"
        stems = fsutil.param_file_stems(ranker_params or {})
        for leaf in sorted(ranker_params or {}):
            rel = f"ranker/params/{stems[leaf]}.npy"
            _save_npy(root / rel, ranker_params[leaf], f"ranker param {leaf!r}")
            ranker["params"][leaf] = rel
    files, sizes = {}, {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        _fsync_file(path)
        files[rel] = _sha256_file(path)
        sizes[rel] = path.stat().st_size
    manifest = Manifest(
        format_version=FORMAT_VERSION,
        version=compute_version(files, tables=table_entries, ranker=ranker),
        tables=table_entries,
        ranker=ranker,
        files=files,
        sizes=sizes,
        report=report or {},
    )
    (root / MANIFEST).write_text(_dump_json(manifest))
    _fsync_file(root / MANIFEST)
    for d in sorted({p.parent for p in root.rglob("*")}, key=lambda p: -len(p.parts)):
        _fsync_dir(d)
    # Round-trip through JSON so the returned manifest equals what load reads.
    return Manifest(json.loads((root / MANIFEST).read_text()))


# ----------------------------------------------------------------------------- read


def _read_manifest(path: pathlib.Path) -> Manifest:
    mpath = path / MANIFEST
    try:
        data = json.loads(mpath.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{mpath}: missing; {path} is not a serving artifact") from None
    except NotADirectoryError:  # a file given for the folder: not '[Errno 20] ...manifest.json'
        raise ArtifactError(f"{path}: not a folder; a serving artifact is a folder holding "
                            f"{MANIFEST}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{mpath}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ArtifactError(f"{mpath}: expected a JSON object")
    for key in ("format_version", "version", "tables", "files"):
        if key not in data:
            raise ArtifactError(f"{mpath}: missing key {key!r}")
    if data["format_version"] not in _READABLE_FORMATS:
        raise ArtifactError(
            f"{mpath}: format_version {data['format_version']} is not supported "
            f"(this version reads {list(_READABLE_FORMATS)})"
        )
    # The shapes of the entries (their values are checked where they are used),
    # so a damaged manifest gives an ArtifactError, never a TypeError deep inside.
    if not isinstance(data["version"], str):
        raise ArtifactError(f"{mpath}: 'version' must be a string")
    for key in ("files", "sizes"):
        entry = data.get(key, {})
        if not isinstance(entry, dict) or not all(
            isinstance(k, str) and isinstance(v, str if key == "files" else int)
            for k, v in entry.items()
        ):
            kind = "sha256 string" if key == "files" else "byte count"
            raise ArtifactError(f"{mpath}: {key!r} must map relative paths to a {kind}")
    tables = data["tables"]
    if not isinstance(tables, dict) or not all(
        isinstance(t, dict) and isinstance(t.get("files"), dict) for t in tables.values()
    ):
        raise ArtifactError(f"{mpath}: 'tables' must map names to entries with 'files'")
    ranker = data.get("ranker")
    if ranker is not None and not (
        isinstance(ranker, dict) and isinstance(ranker.get("params") or {}, dict)
    ):
        raise ArtifactError(f"{mpath}: 'ranker' must be null or an entry with 'params'")
    # Every path it names lies inside the artifact folder: a hand-edited "../x.npy" or
    # "/abs/x.npy" was hashed and loaded from outside it (with a recomputed version,
    # by every verify mode).
    named = [("'files'", rel) for rel in data["files"]]
    named += [("'sizes'", rel) for rel in data.get("sizes", {})]
    named += [(f"table {name!r}", rel) for name, t in tables.items() for rel in t["files"].values()]
    if ranker is not None:
        if ranker.get("config") is not None:
            named.append(("the ranker's config", ranker["config"]))
        named += [(f"ranker param {leaf!r}", rel)
                  for leaf, rel in (ranker.get("params") or {}).items()]
    for where, rel in named:
        if not fsutil.is_inner_path(rel) or rel == MANIFEST:
            raise ArtifactError(
                f"{mpath}: {where} names {rel!r}, not a relative path of a file inside the "
                "artifact folder; the manifest was edited or damaged"
            )
        outside = fsutil.link_outside(path, rel)
        if outside is not None:  # the text is inside, a symlink on the way leads out
            raise ArtifactError(
                f"{mpath}: {where} names {rel!r}, which a symlink leads outside the artifact "
                f"folder (to {outside}); an artifact holds its own files: put the file "
                "itself there, or export the artifact again"
            )
    return Manifest(data)


def _referenced_files(manifest: Manifest) -> list[str]:
    refs = [rel for t in manifest.tables.values() for rel in t["files"].values()]
    ranker = manifest.ranker or {}
    if ranker.get("config"):
        refs.append(ranker["config"])
    refs.extend((ranker.get("params") or {}).values())
    return refs


def _check_version(manifest: Manifest, mpath: pathlib.Path) -> None:
    """The manifest's version is the one its own entries give (reads no data file)."""
    if _manifest_version(manifest) != manifest.version:
        raise ArtifactError(
            f"{mpath}: version {manifest.version} does not match the recorded file hashes "
            f"and tables ({_manifest_version(manifest)}); the manifest was edited"
        )


def verify_artifact(path: str | os.PathLike, *, mode: str = "full") -> Manifest:
    """Checks an artifact's files against its manifest.

    Modes:
      "full": every file exists, has the recorded size and sha256, and the
        version id matches the recorded hashes (reads every byte: use before
        deployment or in tests).
      "sizes": every file exists with the recorded size and the version id
        matches the recorded hashes; no hashing of file contents. This is
        cheap (stat calls only) and is what the embedding server runs at
        start-up; it catches truncated and missing files, not bit flips.

    Args:
      path: the artifact folder.
      mode: "full" or "sizes".

    Returns:
      The manifest.

    Raises:
      ArtifactError: naming the first offending file.
    """
    if mode not in ("full", "sizes"):
        raise ValueError(f"mode must be 'full' or 'sizes', got {mode!r}")
    root = pathlib.Path(path)
    manifest = _read_manifest(root)
    mpath = root / MANIFEST
    _check_version(manifest, mpath)
    for rel in sorted(_referenced_files(manifest)):
        if rel not in manifest.files:
            raise ArtifactError(f"{mpath}: references {rel} which has no checksum entry")
    for rel, digest in sorted(manifest.files.items()):
        fpath = root / rel
        if not fpath.is_file():
            raise ArtifactError(f"{fpath}: missing (listed in {mpath})")
        want = manifest.sizes.get(rel)
        size = fpath.stat().st_size
        if want is not None and size != want:
            raise ArtifactError(
                f"{fpath}: size {size} bytes, manifest says {want} (truncated or replaced)"
            )
        if mode == "full" and _sha256_file(fpath) != digest:
            raise ArtifactError(f"{fpath}: sha256 mismatch (file changed since export)")
    return manifest


def _load_npy(root: pathlib.Path, rel: str, *, mmap: bool, shape=None, dtype=None) -> np.ndarray:
    fpath = root / rel
    if not fpath.is_file():
        raise ArtifactError(f"{fpath}: missing (listed in {root / MANIFEST})")
    try:
        arr = np.load(fpath, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ArtifactError(f"{fpath}: unreadable or truncated .npy ({e})") from None
    if shape is not None and tuple(arr.shape) != tuple(shape):
        raise ArtifactError(f"{fpath}: shape {arr.shape}, manifest says {tuple(shape)}")
    if dtype is not None and arr.dtype != dtype:
        raise ArtifactError(f"{fpath}: dtype {arr.dtype}, manifest says {dtype}")
    return arr


def load_artifact(
    path: str | os.PathLike,
    *,
    verify: bool | str = True,
    expected_version: str | None = None,
) -> Artifact:
    """Opens a serving artifact; tables and vocabularies are mmap'd read-only.

    Args:
      path: the artifact folder.
      verify: True or "full" = full checksum pass (`verify_artifact`), "sizes" =
        sizes only (fast start-up), False = no file-level check (the manifest's
        version is still checked against its own entries, which reads no data
        file, and shapes and dtypes against the manifest).
      expected_version: refuse the artifact unless its version equals this.

    Returns:
      The Artifact.

    Raises:
      ArtifactError: naming the offending file; or the folder was replaced
        by another version on every one of three tries while it was opened.
    """
    root = pathlib.Path(path)
    # Files are opened by path, one by one: if `write_artifact(overwrite=True)`
    # swaps the folder meanwhile, the arrays could come from another version
    # than the manifest read first. Reading the version again after opening
    # everything catches that; the load then starts over on the new version.
    for _ in range(3):
        art = _load_once(root, verify=verify, expected_version=expected_version)
        try:
            now = _read_manifest(root).version
        except ArtifactError:
            now = None
        if art is not None and now == art.version:
            return art
    raise ArtifactError(
        f"{root}: replaced by another version while it was being opened, three times "
        "in a row; retry once the deployment has finished"
    )


def _load_once(root: pathlib.Path, *, verify, expected_version) -> Artifact | None:
    """One try of `load_artifact`; None when the folder changed version during it."""
    manifest = _read_manifest(root)
    if expected_version is not None and manifest.version != expected_version:
        raise ArtifactError(
            f"{root / MANIFEST}: version {manifest.version} does not match the expected "
            f"version {expected_version}; refusing to pair different versions"
        )
    if verify:
        verified = verify_artifact(root, mode="full" if verify is True else verify)
        if verified.version != manifest.version:  # swapped in between: not verified
            return None
    else:  # no file check, but a hand-edited manifest never loads under its old version
        _check_version(manifest, root / MANIFEST)
    tables, vocabs = {}, {}
    for name, entry in manifest.tables.items():
        try:
            expected = _expected_arrays(name, entry)
            files = entry["files"]
            arrays = {}
            for kind, (shape, dtype) in expected.items():
                if kind not in files:
                    raise ArtifactError(f"{root / MANIFEST}: table {name!r} lists no {kind} file")
                arrays[kind] = _load_npy(root, files[kind], mmap=True, shape=shape, dtype=dtype)
            bits = _BITS_OF_DTYPE[entry["dtype"]]
            tables[name] = rowwise.QuantizedTable(
                codes=arrays["codes"],
                scale=arrays.get("scale"),
                bias=arrays.get("bias"),
                dim=int(entry["dim"]),
                bits=bits,
            )
            if "vocab" in files:
                vocabs[name] = _load_npy(root, files["vocab"], mmap=True, shape=(int(entry["rows"]),))
        except KeyError as e:
            raise ArtifactError(f"{root / MANIFEST}: table {name!r} lacks key {e}") from None
        except (TypeError, ValueError, AttributeError, OverflowError) as e:  # rows: 1e999
            if isinstance(e, ArtifactError):
                raise
            raise ArtifactError(
                f"{root / MANIFEST}: table {name!r} has a malformed entry ({e})"
            ) from None
    ranker = manifest.ranker or {}
    ranker_config = None
    if ranker.get("config"):
        cpath = root / ranker["config"]
        try:
            ranker_config = json.loads(cpath.read_text())
        except FileNotFoundError:
            raise ArtifactError(f"{cpath}: missing (listed in {root / MANIFEST})") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ArtifactError(f"{cpath}: not valid JSON ({e})") from None
        except OSError as e:  # a folder, unreadable
            raise ArtifactError(f"{cpath}: unreadable ({e})") from None
    ranker_params = {
        leaf: _load_npy(root, rel, mmap=False) for leaf, rel in (ranker.get("params") or {}).items()
    }
    return Artifact(
        path=root,
        version=manifest.version,
        manifest=manifest,
        tables=tables,
        vocabs=vocabs,
        ranker_config=ranker_config,
        ranker_params=ranker_params,
    )


def table_size_report(manifest: dict) -> dict:
    """Bytes per table against float32 and float16 storage of the same rows.

    Args:
      manifest: a Manifest (or the dict from manifest.json).

    Returns:
      {"tables": {name: {"rows", "dim", "dtype", "bytes", "fp32_bytes",
      "fp16_bytes", "ratio_vs_fp32", "ratio_vs_fp16"}}, "total": {...}}; bytes
      count codes + scale + bias payload (no .npy headers, no vocab).
    """
    out, tot = {}, {"bytes": 0, "fp32_bytes": 0, "fp16_bytes": 0}
    for name, e in sorted(manifest["tables"].items()):
        rows, dim = int(e["rows"]), int(e["dim"])
        bits = _BITS_OF_DTYPE[e["dtype"]]
        per_row = rowwise.bytes_per_row(dim, bits, e.get("scale_dtype") or np.float16)
        row = {
            "rows": rows,
            "dim": dim,
            "dtype": e["dtype"],
            "bytes": rows * per_row,
            "fp32_bytes": rows * dim * 4,
            "fp16_bytes": rows * dim * 2,
        }
        for k in tot:
            tot[k] += row[k]
        out[name] = row
    for row in [*out.values(), tot]:
        row["ratio_vs_fp32"] = row["bytes"] / row["fp32_bytes"] if row["fp32_bytes"] else 0.0
        row["ratio_vs_fp16"] = row["bytes"] / row["fp16_bytes"] if row["fp16_bytes"] else 0.0
    return {"tables": out, "total": tot}
