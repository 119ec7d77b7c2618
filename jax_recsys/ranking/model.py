"""CTR/CVR ranker: DCN-v2 cross layers + MLP trunk + two task heads, and the ESMM loss.

The ranker follows the split industrial rankers use (TorchRec's sparse / dense /
interaction / over parts):

- sparse part: large ID tables (user, pin, advertiser, ...), one table per facet, live in
  the embedding engine (`jax_recsys.embedding`) and arrive here already looked up and
  concatenated per entity (`entity_emb[e]`, [B, D_e]);
- dense part (`DenseRanker`, flax nnx): small tables for coarse categorical features
  (replicated, trained with the dense optimizer), an optional per-entity LayerNorm,
  DCN-v2 cross layers (x_{l+1} = x_0 * (W_l x_l + b_l) + x_l) on the concatenated
  input, an MLP trunk, and one small tower per task giving the CTR and CVR logits.

The model returns logits only. `esmm_loss` is the pure training loss: the CVR head is
trained without sample-selection bias over *all* impressions through
pCTCVR = pCTR * pCVR (ESMM, Ma et al. 2018):

    loss = BCE(click, pCTR) + BCE(click AND conversion, pCTCVR)

computed in log space (log pCTCVR = log sigmoid(a) + log sigmoid(b)) so it never takes
the log of a rounded-to-zero probability.

For export and serving, `RankerConfig` is JSON-able, `flatten_params` /
`unflatten_params` turn the dense parameters into `{leaf_path: np.ndarray}` and back, and
`make_score_fn(config)` builds a pure jittable
`score_fn(params, *, entity_emb, coarse_ids) -> (ctr_logit, cvr_logit)` that runs on
embeddings fetched from the embedding servers.

Dimension legend: B batch, D_e embedding width of entity e (sum of its facet dims),
F width of the concatenated input x_0, C number of coarse features, H hidden width,
Q cross-layer rank.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_recsys import fsutil

_NORMS = ("none", "layernorm")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RankerConfig:
    """Shape of the dense part of the ranker (JSON-able: see `to_dict` / `from_dict`).

    Attributes:
      entity_dims: (entity, D_e) pairs in input order; D_e is the width of the entity's
        concatenated facets. Empty for the "no large tables" ranker.
      coarse_vocab_sizes: (feature, number of values) pairs for coarse categorical
        features; values are ints in [0, size). Out-of-range ids are clipped.
      coarse_dim: embedding width of every coarse feature table.
      num_cross_layers: number of DCN-v2 cross layers (0 disables the cross network).
      cross_rank: 0 for full-rank cross weights W [F, F]; Q > 0 for the low-rank
        mixture W = U V^T with U, V [F, Q] (DCN-v2 "DCN-Mix"-style cost saving).
      mlp_dims: widths of the shared MLP trunk after the cross network.
      head_dims: widths of each task tower before its 1-unit output.
      entity_norm: "layernorm" applies a learnable LayerNorm to each entity embedding
        before concatenation (pretrained facets come at very different scales than
        freshly initialised rows); "none" feeds them as they are.
    """

    entity_dims: tuple[tuple[str, int], ...] = ()
    coarse_vocab_sizes: tuple[tuple[str, int], ...] = ()
    coarse_dim: int = 8
    num_cross_layers: int = 2
    cross_rank: int = 0
    mlp_dims: tuple[int, ...] = (256, 128)
    head_dims: tuple[int, ...] = (64,)
    entity_norm: str = "layernorm"

    def __post_init__(self):
        for name, dim in self.entity_dims:
            if int(dim) <= 0:
                raise ValueError(f"RankerConfig.entity_dims: {name!r} has dim {dim} <= 0")
        for name, size in self.coarse_vocab_sizes:
            if int(size) <= 0:
                raise ValueError(f"RankerConfig.coarse_vocab_sizes: {name!r} has size {size}")
        if self.coarse_dim <= 0 or self.num_cross_layers < 0 or self.cross_rank < 0:
            raise ValueError(
                f"RankerConfig: bad coarse_dim={self.coarse_dim}, "
                f"num_cross_layers={self.num_cross_layers} or cross_rank={self.cross_rank}"
            )
        for field in ("mlp_dims", "head_dims"):
            dims = getattr(self, field)
            if any(int(d) <= 0 for d in dims):
                raise ValueError(f"RankerConfig.{field}: every layer width must be > 0, got "
                                 f"{tuple(dims)}")
        if self.entity_norm not in _NORMS:
            raise ValueError(f"RankerConfig.entity_norm must be one of {_NORMS}")

    @property
    def input_width(self) -> int:
        """F: width of the concatenated input x_0."""
        return sum(d for _, d in self.entity_dims) + self.coarse_dim * len(
            self.coarse_vocab_sizes
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (lists instead of tuples)."""
        return {
            "entity_dims": [[n, int(d)] for n, d in self.entity_dims],
            "coarse_vocab_sizes": [[n, int(s)] for n, s in self.coarse_vocab_sizes],
            "coarse_dim": self.coarse_dim,
            "num_cross_layers": self.num_cross_layers,
            "cross_rank": self.cross_rank,
            "mlp_dims": list(self.mlp_dims),
            "head_dims": list(self.head_dims),
            "entity_norm": self.entity_norm,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RankerConfig:
        """Inverse of `to_dict` (also accepts a JSON string)."""
        if isinstance(d, str):
            d = json.loads(d)
        return cls(
            entity_dims=tuple((str(n), int(v)) for n, v in d.get("entity_dims", ())),
            coarse_vocab_sizes=tuple(
                (str(n), int(v)) for n, v in d.get("coarse_vocab_sizes", ())
            ),
            coarse_dim=int(d.get("coarse_dim", 8)),
            num_cross_layers=int(d.get("num_cross_layers", 2)),
            cross_rank=int(d.get("cross_rank", 0)),
            mlp_dims=tuple(int(x) for x in d.get("mlp_dims", (256, 128))),
            head_dims=tuple(int(x) for x in d.get("head_dims", (64,))),
            entity_norm=str(d.get("entity_norm", "layernorm")),
        )


class CrossLayer(nnx.Module):
    """One DCN-v2 cross layer: x_{l+1} = x_0 * (W x_l + b) + x_l (W full or U V^T)."""

    def __init__(self, width: int, rank: int, *, rngs: nnx.Rngs):
        if rank:
            self.down = nnx.Linear(width, rank, use_bias=False, rngs=rngs)
            self.up = nnx.Linear(rank, width, rngs=rngs)
            self.full = None
        else:
            self.down = None
            self.up = None
            self.full = nnx.Linear(width, width, rngs=rngs)

    def __call__(self, x0_bf: jax.Array, x_bf: jax.Array) -> jax.Array:
        if self.full is not None:
            mixed_bf = self.full(x_bf)
        else:
            mixed_bf = self.up(self.down(x_bf))
        return x0_bf * mixed_bf + x_bf


class _Tower(nnx.Module):
    """ReLU MLP with a final 1-unit linear output (a task head)."""

    def __init__(self, width: int, dims: Sequence[int], *, rngs: nnx.Rngs):
        layers = []
        for d in dims:
            layers.append(nnx.Linear(width, d, rngs=rngs))
            width = d
        self.layers = nnx.List(layers)
        self.out = nnx.Linear(width, 1, rngs=rngs)

    def __call__(self, x_bh: jax.Array) -> jax.Array:
        for layer in self.layers:
            x_bh = jax.nn.relu(layer(x_bh))
        return self.out(x_bh)[..., 0]


class DenseRanker(nnx.Module):
    """Dense part of the ranker: coarse tables, cross network, MLP trunk, CTR/CVR heads."""

    def __init__(self, config: RankerConfig, *, rngs: nnx.Rngs):
        if not config.entity_dims and not config.coarse_vocab_sizes:
            raise ValueError("DenseRanker needs at least one entity or coarse feature")
        self.config = config
        self.coarse = nnx.Dict(
            {
                name: nnx.Embed(
                    size,
                    config.coarse_dim,
                    embedding_init=nnx.initializers.normal(0.05),
                    rngs=rngs,
                )
                for name, size in config.coarse_vocab_sizes
            }
        )
        if config.entity_norm == "layernorm":
            self.norms = nnx.Dict(
                {name: nnx.LayerNorm(dim, rngs=rngs) for name, dim in config.entity_dims}
            )
        else:
            self.norms = nnx.Dict({})
        width = config.input_width
        self.cross = nnx.List(
            [CrossLayer(width, config.cross_rank, rngs=rngs) for _ in range(config.num_cross_layers)]
        )
        trunk = []
        for d in config.mlp_dims:
            trunk.append(nnx.Linear(width, d, rngs=rngs))
            width = d
        self.trunk = nnx.List(trunk)
        self.ctr_head = _Tower(width, config.head_dims, rngs=rngs)
        self.cvr_head = _Tower(width, config.head_dims, rngs=rngs)

    def __call__(
        self,
        *,
        entity_emb: Mapping[str, jax.Array],
        coarse_ids: Mapping[str, jax.Array],
    ) -> tuple[jax.Array, jax.Array]:
        """Scores a batch.

        Args:
          entity_emb: entity -> [B, D_e] float embeddings (concatenated facets), one per
            entry of `config.entity_dims`.
          coarse_ids: coarse feature -> int [B] values, one per `config.coarse_vocab_sizes`.

        Returns:
          (ctr_logit [B], cvr_logit [B]).
        """
        parts = []
        for name, dim in self.config.entity_dims:
            if name not in entity_emb:
                raise KeyError(f"DenseRanker: missing embedding for entity {name!r}")
            e_bd = jnp.asarray(entity_emb[name], jnp.float32)
            if e_bd.shape[-1] != dim:
                raise ValueError(
                    f"DenseRanker: entity {name!r} embedding has width {e_bd.shape[-1]}, "
                    f"config says {dim}"
                )
            if name in self.norms:
                e_bd = self.norms[name](e_bd)
            parts.append(e_bd)
        for name, size in self.config.coarse_vocab_sizes:
            if name not in coarse_ids:
                raise KeyError(f"DenseRanker: missing coarse feature {name!r}")
            ids_b = jnp.clip(jnp.asarray(coarse_ids[name], jnp.int32), 0, size - 1)
            parts.append(self.coarse[name](ids_b))
        x0_bf = jnp.concatenate(parts, axis=-1)
        x_bf = x0_bf
        for layer in self.cross:
            x_bf = layer(x0_bf, x_bf)
        h_bh = x_bf
        for layer in self.trunk:
            h_bh = jax.nn.relu(layer(h_bh))
        return self.ctr_head(h_bh), self.cvr_head(h_bh)


# ----------------------------------------------------------------------------- losses


def esmm_log_probs(
    *, ctr_logit: jax.Array, cvr_logit: jax.Array
) -> dict[str, jax.Array]:
    """Log-probabilities of the ESMM events, computed stably.

    Args:
      ctr_logit: [B] logit of pCTR = P(click | impression).
      cvr_logit: [B] logit of pCVR = P(conversion | click).

    Returns:
      dict with log_ctr, log_1m_ctr, log_ctcvr, log_1m_ctcvr (each [B]).
    """
    log_ctr = jax.nn.log_sigmoid(ctr_logit)
    log_1m_ctr = jax.nn.log_sigmoid(-ctr_logit)
    log_ctcvr = log_ctr + jax.nn.log_sigmoid(cvr_logit)
    # 1 - s(a) s(b) = (1 - s(a)) + s(a) (1 - s(b)): exact in log space with no clamp,
    # so a confidently wrong negative (both logits large) keeps its loss and gradient.
    log_1m_ctcvr = jnp.logaddexp(log_1m_ctr, log_ctr + jax.nn.log_sigmoid(-cvr_logit))
    return {
        "log_ctr": log_ctr,
        "log_1m_ctr": log_1m_ctr,
        "log_ctcvr": log_ctcvr,
        "log_1m_ctcvr": log_1m_ctcvr,
    }


def esmm_loss(
    *,
    ctr_logit: jax.Array,
    cvr_logit: jax.Array,
    click: jax.Array,
    conversion: jax.Array,
    mask: jax.Array | None = None,
    cvr_weight: float = 1.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """ESMM loss over all impressions: BCE(click, pCTR) + w * BCE(click*conv, pCTCVR).

    Args:
      ctr_logit: [B] CTR logits.
      cvr_logit: [B] CVR logits (post-click conversion).
      click: [B] 0/1 click labels.
      conversion: [B] 0/1 conversion labels (multiplied by click, so a conversion
        without a click counts as a negative for CTCVR).
      mask: optional [B] weights, 0 for padding examples.
      cvr_weight: weight w of the CTCVR term.

    Returns:
      (scalar loss = masked mean of the per-example sum, aux dict with the ctr and
      ctcvr mean BCEs).
    """
    click = jnp.asarray(click, jnp.float32)
    ctcvr = click * jnp.asarray(conversion, jnp.float32)
    if mask is None:
        mask = jnp.ones_like(click)
    mask = jnp.asarray(mask, jnp.float32)
    lp = esmm_log_probs(ctr_logit=ctr_logit, cvr_logit=cvr_logit)
    bce_ctr = -(click * lp["log_ctr"] + (1.0 - click) * lp["log_1m_ctr"])
    bce_ctcvr = -(ctcvr * lp["log_ctcvr"] + (1.0 - ctcvr) * lp["log_1m_ctcvr"])
    denom = jnp.maximum(mask.sum(), 1.0)
    ctr_term = (bce_ctr * mask).sum() / denom
    ctcvr_term = (bce_ctcvr * mask).sum() / denom
    return ctr_term + cvr_weight * ctcvr_term, {"bce_ctr": ctr_term, "bce_ctcvr": ctcvr_term}


# -------------------------------------------------------------- params / serving helpers


def init_dense(config: RankerConfig, *, seed: int = 0) -> tuple[nnx.GraphDef, nnx.State]:
    """Builds the dense model and splits it into (graphdef, params state)."""
    model = DenseRanker(config, rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(model, nnx.Param)
    return graphdef, params


def set_head_biases(params: nnx.State, *, ctr_rate: float, cvr_rate: float) -> nnx.State:
    """Sets the CTR/CVR output biases to the base rates' log-odds (in place; returned).

    Starting at the base rate instead of p = 0.5 removes the first phase of training
    that only learns the intercept (clicks and conversions are rare).

    Args:
      params: dense params of a DenseRanker.
      ctr_rate: training click rate.
      cvr_rate: training conversion rate among clicks.

    Returns:
      `params`.
    """
    pure = nnx.to_pure_dict(params)
    for head, rate in (("ctr_head", ctr_rate), ("cvr_head", cvr_rate)):
        r = float(np.clip(rate, 1e-6, 1 - 1e-6))
        pure[head]["out"]["bias"] = jnp.full_like(pure[head]["out"]["bias"], np.log(r / (1 - r)))
    nnx.replace_by_pure_dict(params, pure)
    return params


def _path_str(path) -> str:
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def flatten_params(params) -> dict[str, np.ndarray]:
    """Dense params (nnx.State or pure dict) -> {"trunk/0/kernel": np.ndarray, ...}."""
    if isinstance(params, nnx.State):
        params = nnx.to_pure_dict(params)
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    return {_path_str(p): np.asarray(jax.device_get(v)) for p, v in leaves}


def unflatten_params(config: RankerConfig, flat: Mapping[str, Any]) -> nnx.State:
    """Inverse of `flatten_params`: rebuilds the params nnx.State for `config`.

    Raises:
      ValueError: when a leaf is missing or has the wrong shape (names the leaf).
    """
    _, abstract = nnx.split(
        nnx.eval_shape(lambda: DenseRanker(config, rngs=nnx.Rngs(0))), nnx.Param
    )
    pure = nnx.to_pure_dict(abstract)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(pure)
    values = []
    for path, leaf in leaves:
        key = _path_str(path)
        if key not in flat:
            raise ValueError(f"ranker params: missing leaf {key!r}")
        v = flat[key]
        if tuple(np.shape(v)) != tuple(leaf.shape):
            raise ValueError(
                f"ranker params: leaf {key!r} has shape {np.shape(v)}, expected {leaf.shape}"
            )
        values.append(jnp.asarray(v, leaf.dtype))
    extra = set(flat) - {_path_str(p) for p, _ in leaves}
    if extra:
        raise ValueError(f"ranker params: unexpected leaves {sorted(extra)[:5]}")
    nnx.replace_by_pure_dict(abstract, jax.tree_util.tree_unflatten(treedef, values))
    return abstract


def make_apply_fn(graphdef: nnx.GraphDef) -> Callable:
    """`apply(params, *, entity_emb, coarse_ids) -> (ctr_logit, cvr_logit)` (pure)."""

    def apply(params, *, entity_emb, coarse_ids):
        model = nnx.merge(graphdef, params)
        return model(entity_emb=entity_emb, coarse_ids=coarse_ids)

    return apply


def make_score_fn(config: RankerConfig | Mapping[str, Any]) -> Callable:
    """Builds the pure serving score function from a (JSON-able) ranker config.

    Args:
      config: a RankerConfig or its `to_dict()` form (e.g. read from ranker/config.json).

    Returns:
      `score_fn(params, *, entity_emb, coarse_ids) -> (ctr_logit [B], cvr_logit [B])`,
      jittable, where `params` is the flat `{leaf_path: array}` dict written by
      `flatten_params` (or an nnx.State), `entity_emb` maps entity -> [B, D_e] (e.g.
      rows fetched from embedding servers) and `coarse_ids` maps coarse feature -> [B].
    """
    if not isinstance(config, RankerConfig):
        config = RankerConfig.from_dict(config)
    graphdef, abstract = nnx.split(
        nnx.eval_shape(lambda: DenseRanker(config, rngs=nnx.Rngs(0))), nnx.Param
    )
    pure = nnx.to_pure_dict(abstract)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(pure)
    keys = [_path_str(p) for p, _ in leaves]

    def score_fn(params, *, entity_emb, coarse_ids):
        if not isinstance(params, nnx.State):
            missing = [k for k in keys if k not in params]
            if missing:
                raise ValueError(f"score_fn: params miss leaves {missing[:5]}")
            # A fresh copy of the abstract state per call, filled with this call's leaves.
            state = jax.tree_util.tree_map(lambda x: x, abstract)
            pure = jax.tree_util.tree_unflatten(treedef, [jnp.asarray(params[k]) for k in keys])
            nnx.replace_by_pure_dict(state, pure)
            params = state
        model = nnx.merge(graphdef, params)
        return model(entity_emb=entity_emb, coarse_ids=coarse_ids)

    return score_fn


# ----------------------------------------------------------------------------- trained ranker


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainedRanker:
    """A trained ranker as plain NumPy: what export and serving need.

    Attributes:
      config: the dense architecture (`RankerConfig`, JSON-able).
      params: dense parameters, {leaf_path: np.ndarray} (`flatten_params`).
      tables: entity -> float32 [R, D_e], the entity's facets concatenated in order.
      vocabs: entity -> [R] raw ids in row order.
      entity_columns: entity -> its id column in the impressions table.
      facet_layout: entity -> [(facet source, width, trainable)] in column order.
    """

    config: RankerConfig
    params: dict[str, np.ndarray]
    tables: dict[str, np.ndarray]
    vocabs: dict[str, np.ndarray]
    entity_columns: dict[str, str]
    facet_layout: dict[str, list]

    def score_fn(self) -> Callable:
        """The pure serving score function for this ranker (see `make_score_fn`)."""
        return make_score_fn(self.config)


def save_ranker(path: str | os.PathLike, ranker: TrainedRanker) -> pathlib.Path:
    """Writes a TrainedRanker as plain files (no pickle).

    Layout::

      PATH/config.json          {"ranker": RankerConfig.to_dict(), "entity_columns",
                                 "facet_layout", "params": {leaf: rel}, "tables": {...}}
      PATH/params/<leaf>.npy    one file per parameter leaf (`fsutil.param_file_stems`)
      PATH/tables/<entity>.npy  float32 [R, D_e]
      PATH/vocab/<entity>.npy   raw ids in row order

    An entity whose name is not a plain file name (Freebase-style ``/people/person``)
    is stored as ``_<index>.npy`` (`fsutil.file_stems`); config.json names each file.

    Written atomically: into a hidden sibling folder that then replaces PATH whole
    (`fsutil.swap_dir`), so PATH is always the old ranker or the new one, never a
    half-written mix or the new files beside an old ranker's leftovers (also when the
    ranker's tables are memory-mapped from PATH itself).

    Args:
      path: output folder (created, or replaced whole).
      ranker: the ranker.

    Returns:
      The folder.

    Raises:
      ValueError: a vocabulary that would not load back equal: an object array that is
        not all integers (saved as int64) or all strings (saved as unicode).
    """
    final = pathlib.Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    path = final.parent / f".{final.name}.tmp-{os.urandom(4).hex()}"
    try:
        _write_ranker(path, ranker)
        fsutil.swap_dir(path, final)
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise
    return final


def _storable_vocab(entity: str, vocab) -> np.ndarray:
    """``vocab`` as an array .npy stores without pickle and loads back equal: an object
    array of Python ints becomes int64, one of str fixed-width unicode.

    Raises:
      ValueError: an object vocabulary that is not all integers or all strings (saved
        as strings, its ints would no longer equal the data's raw ids), or an integer
        beyond int64.
    """
    vocab = np.asarray(vocab)
    if vocab.dtype.kind != "O":
        return vocab
    ids = vocab.ravel()
    if all(isinstance(x, str) for x in ids):
        return vocab.astype(np.str_)
    if all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in ids):
        try:
            return vocab.astype(np.int64)
        except OverflowError:
            raise ValueError(f"ranker vocabulary of entity {entity!r}: an id is beyond "
                             "the int64 range") from None
    kinds = ", ".join(sorted({type(x).__name__ for x in ids}))
    raise ValueError(
        f"ranker vocabulary of entity {entity!r}: an object array holding {kinds}; raw ids "
        "must be all integers or all strings (convert it first, e.g. "
        "np.asarray(ids, np.int64) or np.asarray(ids, str))")


def _write_ranker(path: pathlib.Path, ranker: TrainedRanker) -> None:
    vocabs = {ent: _storable_vocab(ent, ranker.vocabs[ent]) for ent in ranker.tables}
    for sub in ("params", "tables", "vocab"):
        (path / sub).mkdir(parents=True)
    params = {}
    stems = fsutil.param_file_stems(ranker.params)  # entity names in leaves may hold '/'
    for leaf, v in ranker.params.items():
        rel = f"params/{stems[leaf]}.npy"
        np.save(path / rel, np.asarray(v), allow_pickle=False)
        params[leaf] = rel
    tables = {}
    stems = fsutil.file_stems(list(ranker.tables))  # entity names may hold '/' or '..'
    for ent, t in ranker.tables.items():
        np.save(path / f"tables/{stems[ent]}.npy", np.asarray(t, np.float32), allow_pickle=False)
        np.save(path / f"vocab/{stems[ent]}.npy", vocabs[ent], allow_pickle=False)
        tables[ent] = {
            "table": f"tables/{stems[ent]}.npy",
            "vocab": f"vocab/{stems[ent]}.npy",
            "rows": int(t.shape[0]),
            "dim": int(t.shape[1]),
        }
    meta = {
        "format_version": 1,
        "ranker": ranker.config.to_dict(),
        "entity_columns": dict(ranker.entity_columns),
        "facet_layout": {
            e: [[s, int(d), bool(tr)] for s, d, tr in lay] for e, lay in ranker.facet_layout.items()
        },
        "params": params,
        "tables": tables,
    }
    (path / "config.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def load_ranker(path: str | os.PathLike, *, mmap: bool = True) -> TrainedRanker:
    """Reads a ranker written by `save_ranker`.

    Args:
      path: the folder.
      mmap: memory-map the tables (read-only) instead of reading them.

    Returns:
      The TrainedRanker.

    Raises:
      FileNotFoundError / ValueError naming the missing or inconsistent file.
    """
    path = pathlib.Path(path)
    cpath = path / "config.json"
    if not cpath.exists():
        raise FileNotFoundError(f"{cpath}: missing; {path} is not a saved ranker")
    try:
        meta = json.loads(cpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cpath}: not valid JSON ({e})") from None
    try:
        config = RankerConfig.from_dict(meta["ranker"])
        param_files = dict(meta["params"])
        entries = {ent: (e["table"], e["vocab"], (int(e["rows"]), int(e["dim"])))
                   for ent, e in meta["tables"].items()}
        entity_columns = dict(meta["entity_columns"])
        facet_layout = {e: [tuple(x) for x in lay] for e, lay in meta["facet_layout"].items()}
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise ValueError(f"{cpath}: damaged, not a saved ranker's config "
                         f"({type(e).__name__}: {e})") from None
    # Only files inside the folder: an edited "../x.npy" or "/abs/x.npy" was read from
    # outside it, and a path that is not a string was a TypeError traceback.
    for rel in [*param_files.values(), *(f for t, v, _ in entries.values() for f in (t, v))]:
        if not fsutil.is_inner_path(rel):
            raise ValueError(f"{cpath}: names {rel!r}, not a relative path of a file inside "
                             f"{path}; the config was edited or damaged")
        outside = fsutil.link_outside(path, rel)
        if outside is not None:  # the text is inside, a symlink on the way leads out
            raise ValueError(f"{cpath}: names {rel!r}, which a symlink leads outside {path} "
                             f"(to {outside}); a saved ranker holds its own files: put the "
                             "file itself there, or save the ranker again")

    def load(rel, mmap_mode=None):
        try:
            return np.load(path / rel, mmap_mode=mmap_mode, allow_pickle=False)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path / rel}: missing (listed in {cpath})") from None
        except (ValueError, OSError, EOFError) as e:
            raise ValueError(f"{path / rel}: unreadable or truncated .npy ({e})") from None

    params = {leaf: load(rel) for leaf, rel in param_files.items()}
    tables, vocabs = {}, {}
    for ent, (table, vocab, shape) in entries.items():
        t = load(table, "r" if mmap else None)
        if t.shape != shape:
            raise ValueError(f"{path / table}: shape {t.shape}, config.json says {shape}")
        tables[ent] = t
        vocabs[ent] = load(vocab)
    unflatten_params(config, params)  # validates every leaf's presence and shape
    return TrainedRanker(
        config=config,
        params=params,
        tables=tables,
        vocabs=vocabs,
        entity_columns=entity_columns,
        facet_layout=facet_layout,
    )
