"""Knowledge-graph scoring functions: TransE, DistMult, ComplEx, RotatE and TransR.

Every model is written once as three pieces, and everything else (the pure score
functions, the chunked matmul scoring used in training, the all-entity scoring used in
evaluation) is built from them:

  * `tail_query(head, rel)`: the vector a true tail should match (TransE: h + r),
  * `head_query(tail, rel)`: the vector a true head should match (TransE: t - r),
  * `project(ent, rel)`: what an entity looks like to the relation (identity except
    TransR, which multiplies by the relation's projection matrix M_r),

and a comparator: `"dot"` (score = <q, c>: DistMult, ComplEx) or `"l2"` (score =
gamma - ||q - c||_2: TransE, RotatE, TransR). Because the comparator is a dot product
or a Euclidean distance, scoring C queries against N shared candidates is one matmul:
for distances we use ||q - c||^2 = ||q||^2 + ||c||^2 - 2 <q, c> (PyTorch-BigGraph).

Complex-valued models (ComplEx, RotatE) store an entity of real dim D as
[real part (D/2) | imaginary part (D/2)]. Definitions used (k indexes complex dims):

  TransE    s = gamma - || h + r - t ||_2
  DistMult  s = sum_d h_d r_d t_d
  ComplEx   s = Re( sum_k h_k r_k conj(t_k) )
  RotatE    s = gamma - || h o r - t ||_2, r_k = exp(i theta_k), |r_k| = 1
            (Euclidean norm over all real coordinates, i.e. the complex L2 norm;
             the RotatE paper uses the L1 norm of moduli; L2 gives the matmul form)
  TransR    s = gamma - || h M_r + r - t M_r ||_2, M_r: [D, D_r]

Relation parameters are small dense arrays `{name: [NR, ...]}` trained with optax;
entity rows come from the (sparse, row-sharded) embedding tables.

Legend: B batch (triples), D entity dim, D' query/comparison dim (D, or D_r for
TransR), N candidates per query, K chunks, C triples per chunk, NR relations.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp

RelParams = Mapping[str, jax.Array]

# Added under the square root so the gradient of ||q - c|| stays finite at q == c.
_DIST_EPS = 1e-9


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScoringFunction:
    """One KG embedding model (see the module docstring for the formulas).

    Attributes:
      name: "transe", "distmult", "complex", "rotate" or "transr".
      gamma: margin added to distance scores (score = gamma - distance); ignored by
        the dot-product models.
      rel_dim: TransR relation space dim D_r (None: same as the entity dim).
    """

    name: str
    gamma: float = 0.0
    rel_dim: int | None = None

    def __post_init__(self):
        if self.name not in _MODELS:
            raise ValueError(f"unknown KG model {self.name!r}; choose one of {sorted(_MODELS)}")
        if self.rel_dim is not None and self.rel_dim <= 0:
            raise ValueError(f"rel_dim must be positive, got {self.rel_dim}")
        if not math.isfinite(self.gamma):  # NaN scores: training stopped at its first step
            raise ValueError(f"gamma must be a finite number, got {self.gamma}")

    @property
    def comparator(self) -> str:
        """"dot" or "l2"."""
        return _MODELS[self.name]

    @property
    def is_complex(self) -> bool:
        return self.name in ("complex", "rotate")

    @property
    def needs_projection(self) -> bool:
        """True when candidates must be transformed per relation (TransR)."""
        return self.name == "transr"

    def check_dim(self, dim: int) -> None:
        """Raises ValueError when `dim` is not a valid entity dim for this model."""
        if dim <= 0:
            raise ValueError(f"entity dim must be positive, got {dim}")
        if self.is_complex and dim % 2:
            raise ValueError(f"{self.name} stores [re | im]: entity dim must be even, got {dim}")

    def init_relations(self, key: jax.Array, *, num_relations: int, dim: int) -> dict:
        """Initial relation parameters.

        Args:
          key: PRNG key.
          num_relations: NR.
          dim: entity dim D.

        Returns:
          {name: float32 [NR, ...]}: "vec" [NR, D] (TransE, DistMult, ComplEx),
          "phase" [NR, D/2] (RotatE), "vec" [NR, D_r] + "proj" [NR, D, D_r] (TransR).
        """
        self.check_dim(dim)
        k1, k2 = jax.random.split(key)
        if self.name == "rotate":
            return {"phase": jax.random.uniform(k1, (num_relations, dim // 2), jnp.float32,
                                                -math.pi, math.pi)}
        if self.name == "transr":
            dr = self.rel_dim or dim
            # Identity-like start (TransR initialises from TransE, i.e. M_r = I).
            eye = jnp.eye(dim, dr, dtype=jnp.float32)
            noise = 0.01 * jax.random.normal(k2, (num_relations, dim, dr), jnp.float32)
            return {"vec": 0.1 * jax.random.normal(k1, (num_relations, dr), jnp.float32) / math.sqrt(dr),
                    "proj": eye[None] + noise}
        if self.name in ("distmult", "complex"):
            # Start near the all-ones relation so h*r*t is informative from step one.
            return {"vec": 1.0 + 0.1 * jax.random.normal(k1, (num_relations, dim), jnp.float32)}
        return {"vec": 0.1 * jax.random.normal(k1, (num_relations, dim), jnp.float32) / math.sqrt(dim)}

    # -- the three building blocks ------------------------------------------------------

    def tail_query(self, *, head: jax.Array, rel: RelParams) -> jax.Array:
        """[..., D] heads, rel params with the same leading dims -> [..., D'] queries."""
        n = self.name
        if n == "transe":
            return head + rel["vec"]
        if n == "distmult":
            return head * rel["vec"]
        if n == "complex":
            hr, hi = _split(head)
            rr, ri = _split(rel["vec"])
            return jnp.concatenate([hr * rr - hi * ri, hr * ri + hi * rr], axis=-1)
        if n == "rotate":
            hr, hi = _split(head)
            c, s = jnp.cos(rel["phase"]), jnp.sin(rel["phase"])
            return jnp.concatenate([hr * c - hi * s, hr * s + hi * c], axis=-1)
        return _matvec(head, rel["proj"]) + rel["vec"]  # transr

    def head_query(self, *, tail: jax.Array, rel: RelParams) -> jax.Array:
        """[..., D] tails, rel params with the same leading dims -> [..., D'] queries."""
        n = self.name
        if n == "transe":
            return tail - rel["vec"]
        if n == "distmult":
            return tail * rel["vec"]
        if n == "complex":
            # Re(sum h a) with a = r * conj(t), written as a real dot <h, [Re a, -Im a]>.
            tr, ti = _split(tail)
            rr, ri = _split(rel["vec"])
            a_re = rr * tr + ri * ti
            a_im = ri * tr - rr * ti
            return jnp.concatenate([a_re, -a_im], axis=-1)
        if n == "rotate":
            # |h o r - t| = |h - t o conj(r)| since |r| = 1.
            tr, ti = _split(tail)
            c, s = jnp.cos(rel["phase"]), jnp.sin(rel["phase"])
            return jnp.concatenate([tr * c + ti * s, ti * c - tr * s], axis=-1)
        return _matvec(tail, rel["proj"]) - rel["vec"]  # transr

    def project(self, *, ent: jax.Array, rel: RelParams, candidates: bool = False) -> jax.Array:
        """Entities as seen by the relation (identity except TransR).

        Args:
          ent: [..., D] (one entity per relation) or, with `candidates`, [..., N, D]
            (N entities per relation).
          rel: relation params with leading dims `...`.
          candidates: whether `ent` has the extra N axis.

        Returns:
          [..., D'] or [..., N, D'].
        """
        if self.name != "transr":
            return ent
        if candidates:
            return jnp.matmul(ent, rel["proj"])
        return _matvec(ent, rel["proj"])

    # -- comparisons --------------------------------------------------------------------

    def compare(self, *, query: jax.Array, cand: jax.Array) -> jax.Array:
        """Elementwise score of [..., D'] queries against [..., D'] candidates -> [...]."""
        if self.comparator == "dot":
            return jnp.sum(query * cand, axis=-1)
        return self.gamma - jnp.sqrt(jnp.sum(jnp.square(query - cand), axis=-1) + _DIST_EPS)

    def compare_all(self, *, query_cd: jax.Array, cand_nd: jax.Array) -> jax.Array:
        """Every query against every candidate with one matmul.

        Args:
          query_cd: [..., C, D'] queries.
          cand_nd: [..., N, D'] candidates (leading dims broadcast with the queries').

        Returns:
          [..., C, N] scores.
        """
        dots = jnp.einsum("...cd,...nd->...cn", query_cd, cand_nd)
        if self.comparator == "dot":
            return dots
        q2 = jnp.sum(jnp.square(query_cd), axis=-1)[..., :, None]
        c2 = jnp.sum(jnp.square(cand_nd), axis=-1)[..., None, :]
        d2 = jnp.maximum(q2 + c2 - 2.0 * dots, 0.0)
        return self.gamma - jnp.sqrt(d2 + _DIST_EPS)

    # -- the pure score function -----------------------------------------------------------

    def score(self, *, head: jax.Array, rel: RelParams, tail: jax.Array) -> jax.Array:
        """Scores of triples, or of each head against its own candidate tails.

        Args:
          head: [B, D] (any leading dims instead of B).
          rel: relation params gathered per triple, leading dims B.
          tail: [B, D] (one tail per head) or [B, N, D] (N candidate tails per head).

        Returns:
          [B] or [B, N] float32 scores (higher = more plausible).
        """
        query = self.tail_query(head=head, rel=rel)
        if tail.ndim == head.ndim:
            return self.compare(query=query, cand=self.project(ent=tail, rel=rel))
        if tail.ndim != head.ndim + 1:
            raise ValueError(f"tail must be [..., D] or [..., N, D]; got head {head.shape}, "
                             f"tail {tail.shape}")
        cand = self.project(ent=tail, rel=rel, candidates=True)
        return self.compare(query=query[..., None, :], cand=cand)


_MODELS = {"transe": "l2", "distmult": "dot", "complex": "dot", "rotate": "l2", "transr": "l2"}
MODEL_NAMES = tuple(sorted(_MODELS))


def _split(x):
    half = x.shape[-1] // 2
    return x[..., :half], x[..., half:]


def _matvec(x_d, m_de):
    """[..., D] x [..., D, E] -> [..., E]."""
    return jnp.einsum("...d,...de->...e", x_d, m_de)


def gather_relations(rel_params: RelParams, rel_ids: jax.Array) -> dict:
    """Per-triple (or per-chunk) relation parameters: {name: [NR, ...]} -> {name: [..., ...]}."""
    return {k: jnp.take(v, rel_ids, axis=0) for k, v in rel_params.items()}


def _score_fn(name):
    def fn(*, head, rel, tail, gamma: float = 0.0):
        return ScoringFunction(name=name, gamma=gamma).score(head=head, rel=rel, tail=tail)

    fn.__name__ = f"{name}_score"
    fn.__doc__ = (f"{name} score (see module docstring). head [B, D], rel per-triple params, "
                  f"tail [B, D] or [B, N, D] -> [B] or [B, N].")
    return fn


transe_score = _score_fn("transe")
distmult_score = _score_fn("distmult")
complex_score = _score_fn("complex")
rotate_score = _score_fn("rotate")
transr_score = _score_fn("transr")
