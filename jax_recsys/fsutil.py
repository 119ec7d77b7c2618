"""Small file-system helpers shared by the writers and the reuse checks (stdlib only:
the NumPy-only serving artifact code imports it too)."""

from __future__ import annotations

import hashlib
import os
import pathlib
import re
import shutil
import uuid


def swap_dir(staged: str | os.PathLike, final: str | os.PathLike) -> None:
    """Renames the complete folder ``staged`` to ``final``.

    An existing ``final`` is renamed away first and removed after, so ``final`` is
    always either the old folder or the new one, never a half-written mix.
    """
    staged, final = pathlib.Path(staged), pathlib.Path(final)
    if not final.exists():
        os.rename(staged, final)
        return
    trash = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(final, trash)
    os.rename(staged, final)
    shutil.rmtree(trash, ignore_errors=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Writes ``path`` through a hidden sibling temporary file renamed over it: a process
    stopped meanwhile leaves the old file or none, never part of the new one."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def file_stems(names: list[str]) -> dict[str, str]:
    """Table name -> file name stem inside a folder of tables: the name itself when it
    is a plain file name, unique also on case-insensitive file systems; else ``_<index>``.

    Names are entity types, which a knowledge graph's entity_types.tsv may spell like
    Freebase's ``/people/person``: as a path it is absolute (or leaves the folder). The
    writers (facets, saved rankers, serving artifacts) record each name's files, so
    readers never rebuild a path from a name.
    """
    seen = {n.casefold() for n in names if _PLAIN_NAME.fullmatch(n)}
    counts = {k: sum(n.casefold() == k for n in names) for k in seen}
    return {n: n if _PLAIN_NAME.fullmatch(n) and counts[n.casefold()] == 1 else f"_{i}"
            for i, n in enumerate(names)}


_NOT_FILE_CHAR = re.compile(r"[^A-Za-z0-9_.-]")


def param_file_stems(leaves) -> dict[str, str]:
    """Parameter leaf path -> file name stem inside a folder of parameters.

    A leaf path ("trunk/0/kernel", "norms//people/person/scale" for an entity named like
    a Freebase type) becomes the stem with every character outside [A-Za-z0-9_.-]
    replaced by '_' ("trunk_0_kernel"), leading and trailing dots dropped (no hidden or
    relative names; "param" when nothing is left) and cut to 120 characters. Leaves are
    taken in sorted order; one whose stem is taken already, also on a case-insensitive
    file system, gets "<stem>_1", "<stem>_2", ... The saved ranker and the serving
    artifact name their parameter files this way and record each leaf's file, so
    readers never rebuild a path from a leaf (and read files named otherwise before).
    """
    stems, taken = {}, set()
    for leaf in sorted(leaves):
        base = _NOT_FILE_CHAR.sub("_", leaf).strip(".")[:120] or "param"
        stem, i = base, 1
        while stem.casefold() in taken:
            stem, i = f"{base}_{i}", i + 1
        taken.add(stem.casefold())
        stems[leaf] = stem
    return stems


def is_inner_path(rel) -> bool:
    """Whether ``rel``, a path a writer recorded in its folder's metadata
    ("tables/user.npy"), names a file inside that folder: a string, relative, with no
    '..', '.' or empty part and no NUL. A hand-edited "../x.npy" or "/abs/x.npy" is
    not (joined to the folder, an absolute path replaces it). Symlinks: ``link_outside``."""
    return (
        isinstance(rel, str)
        and "\0" not in rel
        and not rel.startswith("/")
        and all(part not in ("", ".", "..") for part in rel.split("/"))
    )


def link_outside(folder: str | os.PathLike, rel: str) -> str | None:
    """Where ``folder/rel`` leads when a symlink takes it outside ``folder``, else None.

    ``is_inner_path`` reads only the text of ``rel``: "tables/user.npy" passes it even
    when that file (or the folder "tables") is a symlink to a file elsewhere, which a
    reader would then hash and load. Both ``folder`` (itself often a link to the current
    version) and ``folder/rel`` are resolved (``os.path.realpath``); a link that stays
    inside the folder is fine, and so is a file that does not exist (reading it says so).

    Args:
      folder: the folder whose metadata names ``rel``.
      rel: a path that passed ``is_inner_path``.

    Returns:
      The resolved path outside ``folder``, or None.
    """
    root = os.path.realpath(folder)
    real = os.path.realpath(os.path.join(folder, rel))
    return None if os.path.commonpath([root, real]) == root else real


def symlink_refusal(path: str | os.PathLike, what: str) -> str | None:
    """Why a folder written by replacing it whole may not be at ``path``, or None.

    Swapping a complete folder into place (``swap_dir``) at a symlink would put a
    folder in the link's place and leave the link's target as it was, breaking a
    link that readers follow (``ln -sfn NEW LINK``). Dangling links count too.

    Args:
      path: the folder to be written.
      what: what is written, for the message ("the artifact", "the world").
    """
    path = pathlib.Path(path)
    if not path.is_symlink():
        return None
    return (
        f"{path} is a symlink to {os.readlink(path)}: writing {what} would replace the "
        f"link with a folder; write to a new folder, then point the link at it: "
        f"ln -sfn NEW {path}"
    )


def list_names(names, limit: int = 6) -> str:
    """``names`` sorted and joined for a message, cut after ``limit``: "a, b/ and 3 more"."""
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def folder_names(path: str | os.PathLike) -> list[str]:
    """The names in folder ``path``, folders with a trailing '/'."""
    return [p.name + ("/" if p.is_dir() else "") for p in pathlib.Path(path).iterdir()]


def check_file_target(path: str | os.PathLike, what: str) -> None:
    """Checks, before any work, that a file can be written at ``path`` later.

    Args:
      path: the file to be written (it and its folders may not exist yet).
      what: how the message names it, e.g. "--workdir's metrics.json".

    Raises:
      IsADirectoryError: ``path`` is a folder.
      NotADirectoryError: a folder above ``path`` exists as something else (a file).
    """
    path = pathlib.Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{what} {path} cannot be written: it is a folder")
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise NotADirectoryError(
                    f"{what} {path} cannot be written: {parent} exists and is not a folder")
            return


def file_digest(path: str | os.PathLike) -> str | None:
    """sha256 (16 hex) of a file's bytes; None when it cannot be read."""
    try:
        return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()[:16]
    except OSError:
        return None
