"""Multi-faceted entity embeddings: which facets each entity uses and how they are initialised.

An entity (user, pin, advertiser, ...) is represented in the ranker by the
concatenation of one or more *facets*, each its own embedding table so it can be
frozen or fine-tuned (with its own learning rate) independently:

- ``scratch``: a fresh table, randomly initialised and trained on the ranker's labels;
- ``cl``: the user/pin tables of the contrastive pretrainer (`jax_recsys.pretrain`);
- ``kg``: the entity tables of the knowledge-graph pretrainer;
- any other facet name: whatever facet checkpoint is registered under that name.

Pretrained facets are mapped onto the ranker's vocabulary *by raw id*: row r of the
ranker table for entity e receives the facet vector of the facet-vocabulary entry with
the same raw id. Ids the pretraining run never saw get a fresh random row (normal,
with the standard deviation of all the found rows' values), or an all-zero row
(`FacetSpec.missing`: "zeros" suits a frozen facet, whose random rows would stay noise
for good); how many were found and missing is counted and reported (`AlignStats`); a
facet table that shares no raw id with the ranker's vocabulary is an error (it would be
all random rows), and so is a requested facet whose checkpoint has no table for any
ranker entity. Raw ids compare as integers when both vocabularies are integer, as
strings otherwise (so "12" matches 12).

Pretrained tables may be rescaled by one scalar per table (`FacetSpec.target_norm`) so
their mean row L2 norm matches that of the scratch initialisation: facets come out of
different objectives at very different scales (unit-norm two-tower rows vs. unnormalised
KG rows), and the row-wise optimizer's step size is absolute, so the scale decides how
fast fine-tuning moves a row. A single scalar keeps the facet's geometry intact.

Dimension legend: R rows of the ranker's vocabulary for an entity, R_f rows of a facet
checkpoint's table, D facet width.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np

SCRATCH = "scratch"
MODES = ("finetune", "freeze")
MISSING_ROWS = ("random", "zeros")

# FacetSpec fields added after run fingerprints were first saved, with the value every
# run before them had. `FacetSpec.fingerprint_dict` leaves such a field out at that
# value, so finished runs and checkpoints of configs that do not set it keep their
# fingerprints (and are reused); any other value is in the fingerprint.
_FINGERPRINT_OMITTED_DEFAULTS = {"missing": "random"}


def _check_missing(missing: str, where: str) -> None:
    if missing not in MISSING_ROWS:
        raise ValueError(f"{where}missing must be one of {MISSING_ROWS}, got {missing!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class FacetSpec:
    """One facet of one entity's embedding.

    Attributes:
      source: ``"scratch"`` or the name of a pretrained facet (``"cl"``, ``"kg"``).
      dim: width of a scratch facet; ignored for pretrained facets (their width comes
        from the checkpoint).
      mode: ``"finetune"`` (trained by the ranker) or ``"freeze"`` (never updated;
        bit-identical after training).
      learning_rate: row learning rate of this facet's table; None means the ranker's
        `table_learning_rate` for scratch facets and `table_learning_rate *
        finetune_lr_scale` for pretrained ones.
      init_scale: stddev of a scratch facet's normal initialisation (None: 1/sqrt(dim)).
      target_norm: pretrained facets only: rescale the whole table by one scalar so its
        mean row L2 norm equals this value (None keeps the checkpoint's scale).
      missing: pretrained facets only: the row of a ranker id the facet lacks:
        ``"random"`` (normal, with the standard deviation of the found rows) or
        ``"zeros"`` (all zero, also after the target_norm rescaling). A frozen facet
        never trains its random rows, so "zeros" keeps them from feeding noise.
    """

    source: str
    dim: int = 32
    mode: str = "finetune"
    learning_rate: float | None = None
    init_scale: float | None = None
    target_norm: float | None = 1.0
    missing: str = "random"

    def __post_init__(self):
        if not self.source:
            raise ValueError("FacetSpec.source must be 'scratch' or a facet name like 'cl'")
        if self.mode not in MODES:
            raise ValueError(f"FacetSpec({self.source!r}).mode must be one of {MODES}, got {self.mode!r}")
        if self.source == SCRATCH and self.dim <= 0:
            raise ValueError(f"FacetSpec(scratch).dim must be > 0, got {self.dim}")
        if self.learning_rate is not None and self.learning_rate < 0:
            raise ValueError(f"FacetSpec({self.source!r}).learning_rate must be >= 0")
        for name, low in (("target_norm", "> 0"), ("init_scale", ">= 0")):
            v = getattr(self, name)
            ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
            if v is not None and not (ok and (v > 0 if low == "> 0" else v >= 0)):
                raise ValueError(
                    f"FacetSpec({self.source!r}).{name} must be None or a finite number {low}, "
                    f"got {v!r}" + (" (0 wipes the table, a negative value flips its sign)"
                                    if name == "target_norm" else "")
                )
        _check_missing(self.missing, f"FacetSpec({self.source!r}).")

    @property
    def trainable(self) -> bool:
        """Whether the ranker updates this facet's table."""
        return self.mode == "finetune"

    def fingerprint_dict(self) -> dict:
        """`dataclasses.asdict(self)` as run fingerprints hash it: without the fields of
        `_FINGERPRINT_OMITTED_DEFAULTS` that hold their default (a spec made before such a
        field existed hashes as it did then)."""
        return {k: v for k, v in dataclasses.asdict(self).items()
                if not (k in _FINGERPRINT_OMITTED_DEFAULTS and v == _FINGERPRINT_OMITTED_DEFAULTS[k])}


@dataclasses.dataclass(frozen=True, kw_only=True)
class EntitySpec:
    """One ID entity of the ranker and its facets.

    Attributes:
      name: entity type (``user``, ``pin``, ``advertiser``, ...); also the table name in
        facet checkpoints.
      column: the id column in the impressions table (``user_id``, ``item_id``, ...).
      facets: the facets concatenated (in this order) into the entity's embedding.
    """

    name: str
    column: str
    facets: tuple[FacetSpec, ...]

    def __post_init__(self):
        if not self.facets:
            raise ValueError(f"EntitySpec({self.name!r}) needs at least one facet")
        sources = [f.source for f in self.facets]
        if len(set(sources)) != len(sources):
            raise ValueError(f"EntitySpec({self.name!r}): facet listed twice in {sources}")


def table_name(entity: str, source: str) -> str:
    """Name of the embedding table (and feature) holding `source` facet of `entity`."""
    return f"{entity}__{source}"


@dataclasses.dataclass(frozen=True, kw_only=True)
class AlignStats:
    """How a pretrained facet table mapped onto the ranker's vocabulary."""

    entity: str
    facet: str
    rows: int
    found: int
    missing: int
    facet_rows: int
    scale: float

    def as_dict(self) -> dict:
        """Plain dict for metrics.json."""
        return dataclasses.asdict(self)


def _comparable(ids: np.ndarray) -> np.ndarray:
    ids = np.asarray(ids)
    if ids.dtype.kind in "iu":
        return ids.astype(np.int64)
    if ids.dtype.kind in "US":
        return ids.astype(np.str_)
    if ids.dtype.kind == "O":
        return np.asarray([str(x) for x in ids], dtype=np.str_)
    raise ValueError(f"vocabulary raw ids must be integers or strings, got dtype {ids.dtype}")


def match_rows(ranker_ids: np.ndarray, facet_ids: np.ndarray) -> np.ndarray:
    """For each ranker raw id, the row of the same raw id in the facet vocabulary.

    Args:
      ranker_ids: [R] raw ids in the ranker's row order.
      facet_ids: [R_f] raw ids in the facet checkpoint's row order (unique).

    Returns:
      int64 [R]: facet row, or -1 when the facet vocabulary lacks the id.
    """
    a, b = _comparable(ranker_ids), _comparable(facet_ids)
    if (a.dtype.kind == "i") != (b.dtype.kind == "i"):
        a, b = a.astype(np.str_), b.astype(np.str_)
    if b.size == 0:
        return np.full(a.shape, -1, np.int64)
    order = np.argsort(b, kind="stable")
    sorted_b = b[order]
    if sorted_b.size > 1 and np.any(sorted_b[1:] == sorted_b[:-1]):
        dup = sorted_b[1:][sorted_b[1:] == sorted_b[:-1]][0]
        raise ValueError(f"facet vocabulary has duplicate raw id {dup!r}")
    pos = np.searchsorted(sorted_b, a)
    pos_c = np.minimum(pos, sorted_b.size - 1)
    hit = sorted_b[pos_c] == a
    return np.where(hit, order[pos_c], -1).astype(np.int64)


def _examples(ids, n: int = 3) -> str:
    return ", ".join(repr(x) for x in np.asarray(ids)[:n].tolist()) or "none"


def align_facet_table(
    *,
    entity: str,
    facet: str,
    ranker_ids: np.ndarray,
    facet_ids: np.ndarray,
    facet_table: np.ndarray,
    seed: int,
    target_norm: float | None = None,
    missing: str = "random",
) -> tuple[np.ndarray, AlignStats]:
    """Builds the ranker-vocabulary table of one pretrained facet.

    Args:
      entity: entity name (for messages and stats).
      facet: facet name (for messages and stats).
      ranker_ids: [R] ranker raw ids in row order.
      facet_ids: [R_f] facet raw ids in the facet table's row order.
      facet_table: [R_f, D] facet vectors.
      seed: seeds the fresh rows of ids missing from the facet.
      target_norm: if set, the table (found and fresh rows) is multiplied by one scalar
        so the found rows' mean L2 norm equals it.
      missing: rows of ids missing from the facet: "random" (normal, std of the found
        rows, seeded by `seed`) or "zeros".

    Returns:
      (table float32 [R, D], AlignStats).

    Raises:
      ValueError: the table and vocabulary disagree, or the facet shares no raw id
        with the ranker's vocabulary (the "pretrained" table would be all random rows:
        usually a vocabulary of another dataset or id space), or `missing` is unknown.
    """
    _check_missing(missing, "")
    facet_table = np.asarray(facet_table, np.float32)
    if facet_table.ndim != 2 or facet_table.shape[0] != len(facet_ids):
        raise ValueError(
            f"facet {facet!r} table {entity!r} has shape {facet_table.shape} but its "
            f"vocabulary has {len(facet_ids)} ids"
        )
    src = match_rows(ranker_ids, facet_ids)
    found = src >= 0
    if len(ranker_ids) and not found.any():
        raise ValueError(
            f"facet {facet!r} table {entity!r} shares no raw id with the ranker's {entity!r} "
            f"vocabulary ({len(ranker_ids)} ranker ids, e.g. {_examples(ranker_ids)}; "
            f"{len(facet_ids)} facet ids, e.g. {_examples(facet_ids)}): it would be "
            "entirely random rows"
        )
    dim = facet_table.shape[1]
    if missing == "zeros":
        out = np.zeros((len(ranker_ids), dim), np.float32)
    else:
        rng = np.random.default_rng([seed, 7919, len(ranker_ids), dim])
        std = float(facet_table[src[found]].std()) if found.any() else 1.0 / np.sqrt(dim)
        std = std if std > 0 else 1.0 / np.sqrt(dim)
        out = rng.normal(0.0, std, size=(len(ranker_ids), dim)).astype(np.float32)
    out[found] = facet_table[src[found]]
    scale = 1.0
    if target_norm is not None and found.any():
        mean_norm = float(np.linalg.norm(out[found], axis=1).mean())
        if mean_norm > 0:
            scale = float(target_norm) / mean_norm
            out *= np.float32(scale)
    stats = AlignStats(
        entity=entity,
        facet=facet,
        rows=int(len(ranker_ids)),
        found=int(found.sum()),
        missing=int((~found).sum()),
        facet_rows=int(facet_table.shape[0]),
        scale=scale,
    )
    return out, stats


@dataclasses.dataclass(frozen=True, kw_only=True)
class FacetTable:
    """One resolved facet table of the ranker.

    Attributes:
      entity: entity name.
      source: facet source ("scratch", "cl", "kg", ...).
      name: table (and feature) name, `table_name(entity, source)`.
      dim: width D.
      trainable: False for frozen facets.
      learning_rate: resolved row learning rate.
      init_scale: scratch init stddev (None: 1/sqrt(D)).
      values: [R, D] initial values for pretrained facets, None for scratch facets.
      stats: AlignStats of a pretrained facet, None for scratch.
    """

    entity: str
    source: str
    name: str
    dim: int
    trainable: bool
    learning_rate: float
    init_scale: float | None = None
    values: np.ndarray | None = None
    stats: AlignStats | None = None


def resolve_facets(
    entities: Sequence[EntitySpec],
    *,
    vocabs: Mapping[str, np.ndarray],
    facets: Mapping[str, object],
    table_learning_rate: float,
    finetune_lr_scale: float,
    seed: int,
) -> list[FacetTable]:
    """Resolves every entity's facets into concrete tables with initial values.

    Args:
      entities: the ranker's entities and facet choices.
      vocabs: entity -> [R] ranker raw ids in row order.
      facets: facet name -> loaded facet checkpoint (anything with `.tables` and
        `.vocabs` dicts keyed by entity type, e.g. `jax_recsys.checkpoint.Facet`).
      table_learning_rate: row learning rate of scratch facets.
      finetune_lr_scale: default learning rate of pretrained facets, as a fraction of
        `table_learning_rate`.
      seed: seeds fresh rows of ids missing from a facet.

    Returns:
      FacetTable per (entity, facet), in entity then facet order.

    Raises:
      ValueError: naming the entity and facet when a checkpoint or table is missing.
    """
    out = []
    for ei, ent in enumerate(entities):
        if ent.name not in vocabs:
            raise ValueError(f"no ranker vocabulary for entity {ent.name!r}")
        for fi, spec in enumerate(ent.facets):
            name = table_name(ent.name, spec.source)
            if spec.source == SCRATCH:
                lr = table_learning_rate if spec.learning_rate is None else spec.learning_rate
                out.append(
                    FacetTable(
                        entity=ent.name,
                        source=SCRATCH,
                        name=name,
                        dim=spec.dim,
                        trainable=spec.trainable,
                        learning_rate=float(lr),
                        init_scale=spec.init_scale,
                    )
                )
                continue
            if spec.source not in facets:
                raise ValueError(
                    f"entity {ent.name!r} asks for facet {spec.source!r} but no checkpoint "
                    f"was given for it (have: {sorted(facets)})"
                )
            ckpt = facets[spec.source]
            if ent.name not in ckpt.tables or ent.name not in ckpt.vocabs:
                raise ValueError(
                    f"facet {spec.source!r} checkpoint has no table {ent.name!r} "
                    f"(tables: {sorted(ckpt.tables)})"
                )
            values, stats = align_facet_table(
                entity=ent.name,
                facet=spec.source,
                ranker_ids=vocabs[ent.name],
                facet_ids=np.asarray(ckpt.vocabs[ent.name]),
                facet_table=np.asarray(ckpt.tables[ent.name]),
                seed=seed * 1000 + ei * 10 + fi,
                target_norm=spec.target_norm,
                missing=spec.missing,
            )
            if spec.learning_rate is not None:
                lr = spec.learning_rate
            else:
                lr = table_learning_rate * finetune_lr_scale
            out.append(
                FacetTable(
                    entity=ent.name,
                    source=spec.source,
                    name=name,
                    dim=int(values.shape[1]),
                    trainable=spec.trainable,
                    learning_rate=float(lr),
                    values=values,
                    stats=stats,
                )
            )
    return out


def entity_dims(tables: Sequence[FacetTable]) -> tuple[tuple[str, int], ...]:
    """(entity, concatenated width) in first-appearance order."""
    dims: dict[str, int] = {}
    for t in tables:
        dims[t.entity] = dims.get(t.entity, 0) + t.dim
    return tuple(dims.items())


STANDARD_ENTITIES = (("user", "user_id"), ("pin", "item_id"), ("advertiser", "advertiser_id"))


def build_entities(
    *,
    entities: Sequence[tuple[str, str]] = STANDARD_ENTITIES,
    scratch_dim: int,
    pretrained: Sequence[str] = (),
    mode: str = "finetune",
    available: Mapping[str, Sequence[str]] | None = None,
    learning_rate: float | None = None,
    target_norm: float | None = 1.0,
    scratch_init_scale: float | None = None,
    missing: str = "random",
) -> tuple[EntitySpec, ...]:
    """The usual facet layout: a scratch facet plus every pretrained facet that covers the entity.

    Args:
      entities: (entity, impressions column) pairs.
      scratch_dim: width of each entity's scratch facet (0: no scratch facet).
      pretrained: pretrained facet names to add, in order (e.g. ("cl", "kg")).
      mode: "finetune" or "freeze" for the pretrained facets (scratch always trains).
      available: facet -> entity types its checkpoint has; a facet is added only to
        entities it covers (None: to every entity). A requested facet that covers none
        of `entities` is an error, not a silent scratch-only run.
      learning_rate: row learning rate of the pretrained facets (None: the trainer's
        default, table_learning_rate * finetune_lr_scale).
      target_norm: `FacetSpec.target_norm` of the pretrained facets.
      scratch_init_scale: init stddev of the scratch facets (None: 1/sqrt(dim)).
      missing: `FacetSpec.missing` of the pretrained facets ("random" or "zeros").

    Returns:
      EntitySpecs; entities left with no facet are dropped.

    Raises:
      ValueError: naming the facet, the entities and the facet's tables when a requested
        facet covers none of the entities. (No facet at all, scratch_dim=0 and no
        pretrained facets, is the valid "no large tables" ranker: an empty tuple.)
        Also for an unknown `missing`.
    """
    _check_missing(missing, "the pretrained facets' ")
    names = [name for name, _ in entities]
    if available is not None:
        for f in pretrained:
            tables = sorted(available.get(f, ()))
            if not set(tables) & set(names):
                # A KG folder without entity_types.tsv has the one type "entity", also
                # when its names read "user:12": say where the types come from.
                hint = ("; a knowledge graph without entity_types.tsv has the one type "
                        "'entity': give its kg/entity_types.tsv (entity<TAB>type, types "
                        "named as the entities)") if tables == ["entity"] else ""
                raise ValueError(
                    f"facet {f!r} was requested but covers none of the ranker's entities "
                    f"{names}: its checkpoint has tables {tables}; a facet is attached by "
                    f"entity name, so rename the facet's entity types or the entities{hint}"
                )
    out = []
    for name, column in entities:
        fs = []
        if scratch_dim:
            fs.append(FacetSpec(source=SCRATCH, dim=scratch_dim, init_scale=scratch_init_scale))
        for f in pretrained:
            if available is not None and name not in set(available.get(f, ())):
                continue
            fs.append(FacetSpec(source=f, mode=mode, learning_rate=learning_rate,
                                target_norm=target_norm, missing=missing))
        if fs:
            out.append(EntitySpec(name=name, column=column, facets=tuple(fs)))
    return tuple(out)
