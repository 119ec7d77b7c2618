"""Synthetic ads world: users, pins, advertisers, boards and keywords over days.

The world is a stated simulation, not a table of wished-for numbers. It models
the point of the Pinterest paper: ID tables trained only on scarce ad labels
under-fit the long tail, while the much larger organic engagement and offsite
conversion logs, and the graph that joins them, carry what the ranker lacks.
The mechanism below is fixed; its constants are the ``WorldConfig`` defaults
and are not tuned to make any experiment look good.

Mechanism
---------
Latent space. ``T`` topic centres ``c_t`` are random unit vectors in R^k.
Every entity has a topic:

* pin ``p``: topic uniform (organic pins) or its advertiser's topic (ad pins,
  a fraction ``ad_pin_fraction``); vector ``v_p = normalize(c_t + pin_noise * n / sqrt(k))``
  (``n ~ N(0, I_k)``); a hidden quality ``q_p ~ N(0, 1)``; a creation day
  (a fraction ``new_pin_fraction`` of pins appears on a uniform day in
  ``[1, num_days)``, the rest exist from day 0); board and keyword drawn among
  the boards/keywords of its topic (board ``b`` and keyword ``w`` have topic
  ``b mod T`` / ``w mod T``).
* advertiser ``a``: topic ``a mod T`` (its category); vector
  ``normalize(c_t + advertiser_noise * n / sqrt(k))``; hidden taste vector
  ``y_a ~ N(0, I_h)``; targets up to ``advertiser_keywords`` keywords of its topic.
* user ``u``: a home topic and a different drift topic; stable interest
  ``s_u = normalize(c_home + user_noise * n / sqrt(k))``; drift speed
  ``r_u ~ U(0, 2)``; hidden taste ``x_u ~ N(0, I_h)``; ad click propensity
  ``b_u ~ N(0, user_click_bias_std)``; a country (``home mod C`` with
  probability ``country_topic_prob``, else uniform) and a primary device.

Drift. On day ``d`` the user's interest is
``u_d = normalize(cos(phi) s_u + sin(phi) c_drift)`` with
``phi = min(drift_per_day * d * r_u, pi/2)``: interests move steadily from the
home topic towards the drift topic. Any day can be generated on its own
(no day-to-day state), so days are independent given the seed.

Long tail. User activity and pin popularity are power laws: an event's user
has activity rank ``r`` with probability proportional to
``integral_r^{r+1} (x+1)^-user_zipf dx`` (ranks are a random permutation of
user ids); candidates within a topic are drawn the same way by pin rank
(``pin_zipf``), advertisers within a topic by ``advertiser_zipf`` and ad pins
within a topic by ``ad_pin_zipf``. Most ids are rare.

Per day (a ``np.random.Generator`` seeded from ``(seed, day, stream, chunk)``):

1. Organic engagements (``engagements_per_day``): user by activity; ``M``
   candidate pins, each from the home topic (prob. ``(1-eps) cos^2 phi``), the
   drift topic (``(1-eps) sin^2 phi``) or a uniform topic (``eps =
   explore_prob``), by popularity among pins created by day ``d``; the user
   engages the candidate maximising
   ``engagement_sharpness * <u_d, v_p> + engagement_quality_weight * q_p + Gumbel``.
   Type save/click/closeup with ``engagement_type_probs``.
2. Offsite conversions (``conversions_per_day``): user by activity; ``M``
   candidate advertisers (topics as above, popularity within topic); the user
   converts with the one maximising ``conversion_sharpness * affinity + Gumbel``,
   where ``affinity(u, a, d) = <u_d, v_a> + hidden_weight * <x_u, y_a> / sqrt(h)``.
   The hidden term is what onsite behaviour does not show: pins carry no
   hidden taste, so engagements reveal nothing of it and clicks only a little.
3. Ad impressions (``impressions_per_day``, only on days
   ``>= impression_start_day``): user by activity; ``M`` candidate ad pins
   (topics as above with ``ad_explore_prob``: targeting is imperfect) and the
   ad system shows the one maximising ``ad_sharpness * <u_d, v_p> + Gumbel``.
   Coarse, non-ID features: ``pin_category = topic // topics_per_category``,
   ``hour`` (diurnal), ``device`` (the user's primary one w.p. 0.8),
   ``country`` (the user's), ``position`` (uniform slot 0..4). Each has a fixed
   random effect ``~ N(0, coarse_effect_std)`` (position: ``-position_effect``
   per slot). Labels::

     click ~ Bernoulli(sigmoid(click_bias + click_interest_weight * <u_d, v_p>
                        + click_hidden_weight * <x_u, y_a>/sqrt(h)
                        + click_quality_weight * q_p + b_u + coarse effects))
     conversion = click * Bernoulli(sigmoid(conversion_bias
                        + conversion_affinity_weight * affinity(u, a, d)
                        + conversion coarse effects (country, device)))

   Conversions exist only after clicks (ESMM); every ad conversion is also
   appended to the offsite conversion log (``source = 1``).

Volumes: engagement and conversion logs cover every day; ad impressions
only the ranker days (from ``impression_start_day``). With the defaults the
world has 10 engagements per impression overall (2.5 per impression on a
ranker day), and a user seen a few times in the ad labels is seen many more
times in the engagement logs.

Knowledge graph (from the ``kg_days`` window and metadata), entity names
type-prefixed (``user:12``, ``pin:7``, ``advertiser:3``, ``board:5``,
``keyword:9``): ``user engaged pin`` (engagement types in
``kg_engagement_types``), ``user converted advertiser``, ``user follows board``
(at least ``kg_follow_min_engagements`` engagements with the board's pins),
``pin owned_by advertiser``, ``pin on_board board``, ``pin has_keyword keyword``,
``advertiser targets keyword``. Log relations are split at random into
train/valid/test (``kg_valid_fraction``, ``kg_test_fraction``); a valid/test
triple whose head or tail has no train triple moves to train. Metadata
relations cover pins created before the window ends, all in train.

Output (a dataset folder, see ``folder.py``): tables ``engagements``
(user_id, item_id, day, timestamp, engagement_type 0=save 1=click 2=closeup),
``conversions`` (user_id, advertiser_id, day, timestamp, source 0=offsite
1=ad), ``impressions`` (user_id, item_id, advertiser_id, day, timestamp,
click, conversion, pin_category, hour, device, country, position), ``users``
(user_id, country, device), ``items`` (item_id, advertiser_id (-1 for organic
pins), board_id, topic, keyword_id, created_day, is_ad), ``advertisers``
(advertiser_id, category); ``kg/`` triples; ``dataset.json`` with the day
windows; ``world_summary.json``. Rows are in day order; within a day they are
not sorted by timestamp. Ids are int64, days int32, labels int8.

Memory: the per-entity state (about ``4(k + h) + 20`` bytes per user and
``4k + 30`` per pin, float32) plus the ``M`` candidates of each chunk of events
being generated (about ``4(k + h) + 32`` bytes per candidate); the graph is
spilled to partition files by user, so peak memory does not grow with the
number of days. ``generate_world`` refuses, before any work, a world whose
:func:`memory_estimate` exceeds the machine's RAM or, where smaller, the memory limit
of its cgroup (a container, a Slurm job).

Dimension legend: k latent dim, h hidden taste dim, T topics, M candidates,
n events in a chunk.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import pathlib
import shutil
import sys
import time
import uuid
from concurrent import futures

import numpy as np

from jax_recsys import fsutil, sysmem
from jax_recsys.data import folder

_STATIC = 1_000_003  # stream id for the static (day-independent) world
_ENG, _CONV, _IMP, _KG = 1, 2, 3, 4
_ROW_CHUNK = 1 << 20  # static entity arrays are drawn in chunks of this many rows
_POSITIONS = 5
_F32 = np.float32


@dataclasses.dataclass(frozen=True, kw_only=True)
class WorldConfig:
    """Parameters of the synthetic world (see the module docstring for their role).

    Attributes:
      name: dataset name written to dataset.json.
      seed: master seed; the world is a deterministic function of the config.
      num_users: users.
      num_pins: pins (organic and ad pins).
      num_advertisers: advertisers (advertiser ``a`` has category/topic ``a mod T``).
      num_boards: boards (board ``b`` has topic ``b mod T``); must be >= num_topics.
      num_keywords: keywords (keyword ``w`` has topic ``w mod T``); >= num_topics.
      num_topics: T latent topics.
      topics_per_category: coarse ``pin_category = topic // topics_per_category``.
      latent_dim: k, dimension of interest/pin/advertiser vectors.
      hidden_dim: h, dimension of the hidden user x advertiser taste.
      ad_pin_fraction: share of pins that are ads (owned by an advertiser).
      new_pin_fraction: share of pins created after day 0 (uniform day in [1, num_days)).
      num_countries: coarse user country buckets C.
      num_devices: device buckets.
      country_topic_prob: probability that a user's country is ``home_topic mod C``.
      num_days: days simulated.
      stale_pretrain_days: half-open day window for stale pretraining.
      fresh_pretrain_days: half-open day window for fresh pretraining.
      ranker_train_days: ranker training window.
      ranker_valid_days: ranker validation window.
      ranker_test_days: ranker test window.
      kg_days: window whose logs build the knowledge graph.
      impression_start_day: ad impressions are logged from this day on.
      engagements_per_day: organic engagement events per day.
      conversions_per_day: organic offsite conversion events per day.
      impressions_per_day: ad impressions per day (from impression_start_day).
      user_zipf: power-law exponent of user activity.
      pin_zipf: power-law exponent of pin popularity within a topic.
      advertiser_zipf: power-law exponent of advertiser popularity within a topic.
      ad_pin_zipf: power-law exponent of ad pin delivery within a topic.
      user_noise: spread of a user's stable interest around its home topic.
      pin_noise: spread of a pin vector around its topic centre.
      advertiser_noise: spread of an advertiser vector around its topic centre.
      drift_per_day: interest rotation (radians per day at drift speed 1).
      num_candidates: M candidates per engagement/conversion/impression choice.
      explore_prob: share of engagement/conversion candidates from a random topic
        (0: none).
      ad_explore_prob: share of ad candidates from a random topic (0: none).
      engagement_sharpness: weight of <u_d, v_p> in the engagement choice.
      engagement_quality_weight: weight of pin quality in the engagement choice.
      conversion_sharpness: weight of the affinity in the offsite conversion choice.
      hidden_weight: weight of the hidden taste term inside the affinity.
      ad_sharpness: weight of <u_d, v_p> in the ad system's choice.
      engagement_type_probs: probabilities of save, click, closeup.
      click_bias: click logit intercept.
      click_interest_weight: click weight of <u_d, v_p>.
      click_hidden_weight: click weight of the hidden taste term (clicks reveal it partly).
      click_quality_weight: click weight of pin quality.
      user_click_bias_std: std of the per-user click propensity b_u.
      coarse_effect_std: std of the random effects of the coarse features.
      position_effect: click logit decrease per ad slot.
      conversion_bias: conversion-after-click logit intercept.
      conversion_affinity_weight: conversion weight of the affinity.
      kg_engagement_types: engagement types that make ``user engaged pin`` edges.
      kg_follow_min_engagements: engagements with a board's pins for ``follows``.
      kg_valid_fraction: share of log triples in kg/valid.txt.
      kg_test_fraction: share of log triples in kg/test.txt.
      advertiser_keywords: keywords each advertiser targets.
      chunk_events: events generated per chunk (bounds memory).
      kg_partition_rows: log events per KG spill partition (bounds memory).
      summary_sample_per_day: impressions per day kept for the oracle AUCs in the summary.
    """

    name: str = "synthetic_ads_world"
    seed: int = 0
    num_users: int = 80_000
    num_pins: int = 100_000
    num_advertisers: int = 1_500
    num_boards: int = 5_000
    num_keywords: int = 2_000
    num_topics: int = 32
    topics_per_category: int = 4
    latent_dim: int = 16
    hidden_dim: int = 4
    ad_pin_fraction: float = 0.3
    new_pin_fraction: float = 0.3
    num_countries: int = 10
    num_devices: int = 3
    country_topic_prob: float = 0.6
    num_days: int = 28
    stale_pretrain_days: tuple[int, int] = (0, 10)
    fresh_pretrain_days: tuple[int, int] = (10, 21)
    ranker_train_days: tuple[int, int] = (21, 26)
    ranker_valid_days: tuple[int, int] = (26, 27)
    ranker_test_days: tuple[int, int] = (27, 28)
    kg_days: tuple[int, int] = (10, 21)
    impression_start_day: int = 21
    engagements_per_day: int = 300_000
    conversions_per_day: int = 20_000
    impressions_per_day: int = 120_000
    user_zipf: float = 0.8
    pin_zipf: float = 1.0
    advertiser_zipf: float = 1.0
    ad_pin_zipf: float = 0.8
    user_noise: float = 0.8
    pin_noise: float = 0.7
    advertiser_noise: float = 0.5
    drift_per_day: float = 0.03
    num_candidates: int = 6
    explore_prob: float = 0.1
    ad_explore_prob: float = 0.4
    engagement_sharpness: float = 4.0
    engagement_quality_weight: float = 0.5
    conversion_sharpness: float = 3.0
    hidden_weight: float = 0.5
    ad_sharpness: float = 2.0
    engagement_type_probs: tuple[float, float, float] = (0.3, 0.3, 0.4)
    click_bias: float = -3.7
    click_interest_weight: float = 3.0
    click_hidden_weight: float = 0.3
    click_quality_weight: float = 0.5
    user_click_bias_std: float = 0.5
    coarse_effect_std: float = 0.25
    position_effect: float = 0.2
    conversion_bias: float = -2.0
    conversion_affinity_weight: float = 2.0
    kg_engagement_types: tuple[int, ...] = (0, 1)
    kg_follow_min_engagements: int = 2
    kg_valid_fraction: float = 0.05
    kg_test_fraction: float = 0.05
    advertiser_keywords: int = 3
    chunk_events: int = 1 << 16
    kg_partition_rows: int = 8_000_000
    summary_sample_per_day: int = 100_000

    def windows(self) -> dict[str, tuple[int, int]]:
        """Named half-open day windows as written to dataset.json ``splits``."""
        return {
            "stale_pretrain": tuple(self.stale_pretrain_days),
            "fresh_pretrain": tuple(self.fresh_pretrain_days),
            "ranker_train": tuple(self.ranker_train_days),
            "ranker_valid": tuple(self.ranker_valid_days),
            "ranker_test": tuple(self.ranker_test_days),
            "kg": tuple(self.kg_days),
        }

    def validate(self) -> None:
        """Raises ValueError for an inconsistent config (before any generation work)."""
        # A NaN or infinite float generated a world without a word (click_bias=nan: no
        # click at all; user_zipf=nan: ids from NaN casts).
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if any(isinstance(x, float) and not math.isfinite(x)
                   for x in (v if isinstance(v, tuple | list) else (v,))):
                raise ValueError(f"{f.name}={v} must be finite")
        T = self.num_topics
        if min(self.num_users, self.num_pins, self.num_advertisers) < 1:
            raise ValueError("num_users, num_pins and num_advertisers must be >= 1")
        if self.num_boards < T or self.num_keywords < T or self.num_advertisers < T:
            raise ValueError("num_boards, num_keywords and num_advertisers must be >= num_topics")
        if T < 2:
            raise ValueError("num_topics must be >= 2")
        for name, (s, e) in self.windows().items():
            if not 0 <= s < e <= self.num_days:
                raise ValueError(f"day window {name}=[{s}, {e}) outside [0, {self.num_days})")
        # No leakage: the ranker's windows follow one another, and nothing the facets
        # are pretrained on (interactions, KG) reaches into the ranker's test window.
        train, valid, test = self.ranker_train_days, self.ranker_valid_days, self.ranker_test_days
        if not (train[1] <= valid[0] and valid[1] <= test[0]):
            raise ValueError(
                f"ranker windows must not overlap and must come in order: train={tuple(train)}, "
                f"valid={tuple(valid)}, test={tuple(test)}"
            )
        for name in ("stale_pretrain_days", "fresh_pretrain_days", "kg_days"):
            if getattr(self, name)[1] > test[0]:
                raise ValueError(
                    f"{name}={tuple(getattr(self, name))} reaches into the ranker test window "
                    f"{tuple(test)}: pretrained facets would have seen test days"
                )
        if abs(sum(self.engagement_type_probs) - 1.0) > 1e-6:
            raise ValueError("engagement_type_probs must sum to 1")
        if self.num_candidates < 1 or self.chunk_events < 1:
            raise ValueError("num_candidates and chunk_events must be >= 1")
        if self.seed < 0:
            raise ValueError("seed must be >= 0")
        for name in (
            "ad_pin_fraction",
            "new_pin_fraction",
            "country_topic_prob",
            "explore_prob",
            "ad_explore_prob",
            "kg_valid_fraction",
            "kg_test_fraction",
        ):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name}={v} must lie in [0, 1]")
        if min(self.engagement_type_probs) < 0:
            raise ValueError(f"engagement_type_probs={self.engagement_type_probs} must be >= 0")
        if self.kg_valid_fraction + self.kg_test_fraction >= 1.0:
            raise ValueError(
                f"kg_valid_fraction + kg_test_fraction = "
                f"{self.kg_valid_fraction + self.kg_test_fraction} must be < 1 (kg/train.txt "
                "would be empty)"
            )
        if not set(self.kg_engagement_types) <= {0, 1, 2}:
            raise ValueError(
                f"kg_engagement_types={self.kg_engagement_types} must be engagement types "
                "0 (save), 1 (click) or 2 (closeup)"
            )
        ranker_start = min(
            self.ranker_train_days[0], self.ranker_valid_days[0], self.ranker_test_days[0]
        )
        if not 0 <= self.impression_start_day <= ranker_start:
            raise ValueError(
                f"impression_start_day={self.impression_start_day} must lie in "
                f"[0, {ranker_start}] (the first ranker day) so that every ranker window "
                "has impressions"
            )
        if self.impressions_per_day < 1:
            raise ValueError("impressions_per_day must be >= 1 (the ranker windows need them)")
        if self.engagements_per_day < 1:
            # 0 failed after the static state and every day's conversions and
            # impressions, naming a hidden partial folder ("empty table").
            raise ValueError(
                f"engagements_per_day={self.engagements_per_day} must be >= 1 (the "
                "engagements table needs rows)"
            )
        if min(self.engagements_per_day, self.conversions_per_day, self.summary_sample_per_day) < 0:
            raise ValueError(
                "engagements_per_day, conversions_per_day and summary_sample_per_day "
                "must be >= 0"
            )
        for name in (
            "topics_per_category",
            "latent_dim",
            "hidden_dim",
            "num_countries",
            "num_devices",
            "kg_partition_rows",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")


def _rng(cfg: WorldConfig, *stream: int) -> np.random.Generator:
    return np.random.default_rng([cfg.seed, *stream])


def _take(a: np.ndarray, indices, axis: int | None = None) -> np.ndarray:
    """np.take for indices valid by construction: mode="clip" skips numpy's
    bounds-checked (buffered) path, ~3x faster for the generator's row gathers."""
    return np.take(a, indices, axis=axis, mode="clip")


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class _Zipf:
    """Power-law ranks within groups of given sizes (inverse CDF of (x+1)^-a)."""

    def __init__(self, sizes: np.ndarray, a: float):
        self.sizes = np.asarray(sizes, np.int64)
        self.has_empty = bool((self.sizes == 0).any())
        self.a = float(a)
        n1 = self.sizes.astype(np.float64) + 1.0
        # float32 keeps sampling fast; the rank error at 1e7 rows is below one rank.
        if abs(self.a - 1.0) < 1e-9:
            self.const = np.log(n1).astype(_F32)
        else:
            self.const = (n1 ** (1.0 - self.a) - 1.0).astype(_F32)

    def sample(self, u: np.ndarray, group: np.ndarray | int = 0) -> np.ndarray:
        c = _take(self.const, group)
        if abs(self.a - 1.0) < 1e-9:
            x = np.exp(u * c) - 1.0
        else:
            b = 1.0 - self.a
            x = (1.0 + u * c) ** _F32(1.0 / b) - 1.0
        r = x.astype(np.int64)
        return np.minimum(r, np.maximum(_take(self.sizes, group) - 1, 0))


class _Pool:
    """Pins grouped by topic, in popularity order within each topic.

    Attributes:
      members: int32 pin ids by (topic, popularity rank).
      offsets: int64 [T + 1] start of each topic in ``members``.
      zipf: rank sampler over the topics' sizes.
      created: int16 creation day of each member (``members`` order).
      slot: int32 [P] position of each pin in ``members`` (-1: not a member).
      by_created, created_sorted: members sorted by (creation day, id), and their days.
    """

    def __init__(self, keys: np.ndarray, num_groups: int, order: np.ndarray,
                 created: np.ndarray, zipf_a: float):
        # Members sorted by group (ties in ``order``'s order).
        self.members = order[np.argsort(keys[order], kind="stable")].astype(np.int32)
        sizes = np.bincount(keys[order], minlength=num_groups)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.zipf = _Zipf(sizes, zipf_a)
        self.created = created[self.members]
        self.slot = np.full(len(created), -1, np.int32)
        self.slot[self.members] = np.arange(len(self.members), dtype=np.int32)
        by_id = np.sort(self.members)  # ties in creation day stay in id order
        self.by_created = by_id[np.argsort(created[by_id], kind="stable")]
        self.created_sorted = created[self.by_created]


class _Static:
    """Per-entity state of the world (day-independent), drawn in row chunks."""

    def __init__(self, cfg: WorldConfig):
        T, k, h = cfg.num_topics, cfg.latent_dim, cfg.hidden_dim
        U, P, A = cfg.num_users, cfg.num_pins, cfg.num_advertisers
        rng = _rng(cfg, _STATIC, 0)
        self.topic_vec = _normalize(rng.standard_normal((T, k))).astype(_F32)
        ncat = -(-T // cfg.topics_per_category)
        eff = cfg.coarse_effect_std
        self.cat_eff = (eff * rng.standard_normal(ncat)).astype(_F32)
        self.hour_eff = (eff * rng.standard_normal(24)).astype(_F32)
        self.device_eff = (eff * rng.standard_normal(cfg.num_devices)).astype(_F32)
        self.country_eff = (eff * rng.standard_normal(cfg.num_countries)).astype(_F32)
        self.conv_device_eff = (eff * rng.standard_normal(cfg.num_devices)).astype(_F32)
        self.conv_country_eff = (eff * rng.standard_normal(cfg.num_countries)).astype(_F32)
        hours = np.arange(24)
        hp = 1.0 + 0.6 * np.sin(2 * np.pi * (hours - 14 + 6) / 24)  # evening peak
        self.hour_cdf = np.cumsum(hp / hp.sum())
        self.device_probs = np.cumsum(
            np.linspace(2.0, 1.0, cfg.num_devices) / np.linspace(2.0, 1.0, cfg.num_devices).sum()
        )

        # Advertisers.
        self.adv_topic = (np.arange(A) % T).astype(np.int32)
        self.adv_vec = _normalize(
            self.topic_vec[self.adv_topic]
            + cfg.advertiser_noise * rng.standard_normal((A, k)) / math.sqrt(k)
        ).astype(_F32)
        self.adv_hidden = rng.standard_normal((A, h)).astype(_F32)
        # Within a topic, advertiser a = t + T*rank: rank order is popularity order.
        self.adv_per_topic = np.bincount(self.adv_topic, minlength=T)
        self.adv_zipf = _Zipf(self.adv_per_topic, cfg.advertiser_zipf)
        boards_per_topic = np.bincount(np.arange(cfg.num_boards) % T, minlength=T)
        kw_per_topic = np.bincount(np.arange(cfg.num_keywords) % T, minlength=T)
        kw_rank = rng.integers(
            0, kw_per_topic[self.adv_topic][:, None], size=(A, cfg.advertiser_keywords)
        )
        self.adv_keywords = self.adv_topic[:, None] + T * kw_rank

        # Users (chunked so that large worlds never hold float64 temporaries).
        self.home_topic = np.empty(U, np.int16)
        self.drift_topic = np.empty(U, np.int16)
        self.user_vec = np.empty((U, k), _F32)
        self.drift_rate = np.empty(U, _F32)
        self.user_hidden = np.empty((U, h), _F32)
        self.user_bias = np.empty(U, _F32)
        self.country = np.empty(U, np.int16)
        self.device = np.empty(U, np.int8)
        for c0 in range(0, U, _ROW_CHUNK):
            c1 = min(U, c0 + _ROW_CHUNK)
            n = c1 - c0
            r = _rng(cfg, _STATIC, 1, c0 // _ROW_CHUNK)
            home = r.integers(0, T, n)
            drift = (home + 1 + r.integers(0, T - 1, n)) % T
            self.home_topic[c0:c1] = home
            self.drift_topic[c0:c1] = drift
            noise = r.standard_normal((n, k), dtype=_F32) * (cfg.user_noise / math.sqrt(k))
            self.user_vec[c0:c1] = _normalize(self.topic_vec[home] + noise)
            self.drift_rate[c0:c1] = 2.0 * r.random(n, dtype=_F32)
            self.user_hidden[c0:c1] = r.standard_normal((n, h), dtype=_F32)
            self.user_bias[c0:c1] = cfg.user_click_bias_std * r.standard_normal(n, dtype=_F32)
            country = np.where(
                r.random(n) < cfg.country_topic_prob,
                home % cfg.num_countries,
                r.integers(0, cfg.num_countries, n),
            )
            self.country[c0:c1] = country
            self.device[c0:c1] = np.searchsorted(self.device_probs, r.random(n), side="right")
        self.device = np.minimum(self.device, cfg.num_devices - 1)
        self.user_by_rank = _rng(cfg, _STATIC, 2).permutation(U).astype(np.int32)
        self.user_zipf = _Zipf(np.array([U]), cfg.user_zipf)

        # Pins.
        self.pin_topic = np.empty(P, np.int16)
        self.pin_vec = np.empty((P, k), _F32)
        self.quality = np.empty(P, _F32)
        self.created = np.empty(P, np.int16)
        self.pin_adv = np.empty(P, np.int32)
        self.board = np.empty(P, np.int32)
        self.keyword = np.empty(P, np.int32)
        for c0 in range(0, P, _ROW_CHUNK):
            c1 = min(P, c0 + _ROW_CHUNK)
            n = c1 - c0
            r = _rng(cfg, _STATIC, 3, c0 // _ROW_CHUNK)
            is_ad = r.random(n) < cfg.ad_pin_fraction
            topic = r.integers(0, T, n)
            adv = topic + T * self.adv_zipf.sample(r.random(n), topic)
            self.pin_adv[c0:c1] = np.where(is_ad, adv, -1)
            self.pin_topic[c0:c1] = topic
            noise = r.standard_normal((n, k), dtype=_F32) * (cfg.pin_noise / math.sqrt(k))
            self.pin_vec[c0:c1] = _normalize(self.topic_vec[topic] + noise)
            self.quality[c0:c1] = r.standard_normal(n, dtype=_F32)
            new = r.random(n) < cfg.new_pin_fraction
            day = r.integers(1, max(cfg.num_days, 2), n)
            self.created[c0:c1] = np.where(new, day, 0)
            self.board[c0:c1] = topic + T * r.integers(0, boards_per_topic[topic])
            self.keyword[c0:c1] = topic + T * r.integers(0, kw_per_topic[topic])
        topic = self.pin_topic.astype(np.int64)
        # Popularity rank within a topic = position in a random order.
        order = _rng(cfg, _STATIC, 4).permutation(P)
        self.pins = _Pool(topic, T, order, self.created, cfg.pin_zipf)
        ad_ids = np.flatnonzero(self.pin_adv >= 0)
        ad_order = ad_ids[_rng(cfg, _STATIC, 5).permutation(len(ad_ids))]
        self.ads = _Pool(topic, T, ad_order, self.created, cfg.ad_pin_zipf)
        self.num_ad_pins = len(ad_ids)


class _Day:
    """Generates one chunk of one day's events (pure function of rng and static state)."""

    def __init__(self, cfg: WorldConfig, st: _Static, day: int, rng: np.random.Generator):
        self.cfg, self.st, self.day, self.rng = cfg, st, day, rng

    def users(self, n: int):
        st, cfg = self.st, self.cfg
        rank = st.user_zipf.sample(self.rng.random(n, dtype=_F32))
        uid = _take(st.user_by_rank, rank).astype(np.int64)
        phi = np.minimum(_F32(cfg.drift_per_day * self.day) * st.drift_rate[uid], _F32(np.pi / 2))
        cos, sin = np.cos(phi), np.sin(phi)
        u = cos[:, None] * _take(st.user_vec, uid, axis=0) + sin[:, None] * _take(
            st.topic_vec, _take(st.drift_topic, uid), axis=0
        )
        u /= np.sqrt(np.einsum("nk,nk->n", u, u))[:, None]
        return uid, u, cos * cos

    def topics(self, uid, home_prob, n: int, explore: float):
        """Candidate topics [n, M]: a random topic with probability ``explore``
        (0: never), else the home topic with probability ``home_prob``, else the
        drift topic."""
        st, M = self.st, self.cfg.num_candidates
        w = self.rng.random((n, M), dtype=_F32)
        home = (w - explore) < (1.0 - explore) * home_prob[:, None]
        t = np.where(
            home, _take(st.home_topic, uid)[:, None], _take(st.drift_topic, uid)[:, None]
        ).astype(np.int64)
        if explore <= 0.0:
            return t  # no exploration (w >= 0 never lies below it)
        # For w < explore, w / explore is itself uniform: it picks the random topic.
        explored = np.flatnonzero(w.reshape(-1) < explore)
        t.reshape(-1)[explored] = (
            (w.reshape(-1)[explored] * _F32(self.cfg.num_topics / explore))
            .astype(np.int64)
            .clip(0, self.cfg.num_topics - 1)
        )
        return t

    def _pick_existing(self, topic, pool: _Pool):
        """Popularity-ranked member of each topic among those created by today (pin ids)."""
        day, rng = self.day, self.rng
        zipf = pool.zipf
        last = len(pool.members) - 1
        rank = zipf.sample(rng.random(topic.shape, dtype=_F32), topic)
        pos = np.minimum(_take(pool.offsets, topic) + rank, last)
        flat_topic, flat_pos = topic.reshape(-1), pos.reshape(-1)
        bad = _take(pool.created, flat_pos) > day
        if zipf.has_empty:
            bad |= _take(zipf.sizes, flat_topic) == 0
        bad = np.flatnonzero(bad)
        for _ in range(8):
            if not len(bad):
                break
            t = flat_topic[bad]
            r = zipf.sample(rng.random(t.shape, dtype=_F32), t)
            new = np.minimum(_take(pool.offsets, t) + r, last)
            flat_pos[bad] = new
            still = _take(pool.created, new) > day
            if zipf.has_empty:
                still |= _take(zipf.sizes, t) == 0
            bad = bad[still]
        if len(bad):  # tiny or not-yet-populated topics: any existing member
            # day as the array's dtype: a Python int would convert the whole array.
            n_born = int(np.searchsorted(pool.created_sorted,
                                         pool.created_sorted.dtype.type(day), side="right"))
            ids = pool.by_created[rng.integers(0, max(n_born, 1), len(bad))]
            flat_pos[bad] = _take(pool.slot, ids)
        return _take(pool.members, pos).astype(np.int64)

    def _choose(self, scores):
        expo = self.rng.standard_exponential(scores.shape, dtype=_F32)
        gumbel = -np.log(np.maximum(expo, _F32(1e-30)))
        return np.argmax(scores + gumbel, axis=1)

    def timestamps(self, n: int):
        hour = np.searchsorted(self.st.hour_cdf, self.rng.random(n), side="right")
        hour = np.minimum(hour, 23)
        ts = self.day * 86400 + hour * 3600 + self.rng.integers(0, 3600, n)
        return ts.astype(np.int64), hour

    def hidden(self, uid, adv):
        h = np.einsum(
            "nh,nh->n",
            _take(self.st.user_hidden, uid, axis=0),
            _take(self.st.adv_hidden, adv, axis=0),
        )
        return h / math.sqrt(self.cfg.hidden_dim)

    def engagements(self, n: int) -> dict[str, np.ndarray]:
        cfg, st = self.cfg, self.st
        uid, u, home_prob = self.users(n)
        topic = self.topics(uid, home_prob, n, cfg.explore_prob)
        pins = self._pick_existing(topic, st.pins)
        sim = np.einsum("nk,nmk->nm", u, _take(st.pin_vec, pins, axis=0))
        scores = sim * _F32(cfg.engagement_sharpness)
        scores += _F32(cfg.engagement_quality_weight) * _take(st.quality, pins)
        item = _pick_row(pins, self._choose(scores))
        ts, _ = self.timestamps(n)
        etype = np.searchsorted(
            np.cumsum(cfg.engagement_type_probs), self.rng.random(n), side="right"
        )
        return {
            "user_id": uid,
            "item_id": item,
            "day": np.full(n, self.day, np.int32),
            "timestamp": ts,
            "engagement_type": np.minimum(etype, 2).astype(np.int8),
        }

    def conversions(self, n: int) -> dict[str, np.ndarray]:
        cfg, st = self.cfg, self.st
        uid, u, home_prob = self.users(n)
        topic = self.topics(uid, home_prob, n, cfg.explore_prob)
        adv = topic + cfg.num_topics * st.adv_zipf.sample(
            self.rng.random(topic.shape, dtype=_F32), topic
        )
        sim = np.einsum("nk,nmk->nm", u, _take(st.adv_vec, adv, axis=0))
        hid = np.einsum(
            "nh,nmh->nm", _take(st.user_hidden, uid, axis=0), _take(st.adv_hidden, adv, axis=0)
        )
        affinity = sim + cfg.hidden_weight * hid / math.sqrt(cfg.hidden_dim)
        chosen = _pick_row(adv, self._choose(cfg.conversion_sharpness * affinity))
        ts, _ = self.timestamps(n)
        return {
            "user_id": uid,
            "advertiser_id": chosen.astype(np.int64),
            "day": np.full(n, self.day, np.int32),
            "timestamp": ts,
            "source": np.zeros(n, np.int8),
        }

    def impressions(self, n: int):
        """Returns (impression columns, oracle logits for the summary)."""
        cfg, st = self.cfg, self.st
        uid, u, home_prob = self.users(n)
        topic = self.topics(uid, home_prob, n, cfg.ad_explore_prob)
        pins = self._pick_existing(topic, st.ads)
        sim = np.einsum("nk,nmk->nm", u, _take(st.pin_vec, pins, axis=0))
        pick = self._choose(cfg.ad_sharpness * sim)
        rows = np.arange(n)
        item, interest = pins[rows, pick], sim[rows, pick]
        adv = st.pin_adv[item].astype(np.int64)
        ts, hour = self.timestamps(n)
        category = (st.pin_topic[item] // cfg.topics_per_category).astype(np.int32)
        device = np.where(
            self.rng.random(n) < 0.8, st.device[uid], self.rng.integers(0, cfg.num_devices, n)
        ).astype(np.int32)
        country = st.country[uid].astype(np.int32)
        position = self.rng.integers(0, _POSITIONS, n).astype(np.int32)
        coarse = (
            st.cat_eff[category]
            + st.hour_eff[hour]
            + st.device_eff[device]
            + st.country_eff[country]
            - cfg.position_effect * position
        )
        hid = self.hidden(uid, adv)
        click_logit = (
            cfg.click_bias
            + cfg.click_interest_weight * interest
            + cfg.click_hidden_weight * hid
            + cfg.click_quality_weight * st.quality[item]
            + st.user_bias[uid]
            + coarse
        )
        click = self.rng.random(n) < _sigmoid(click_logit)
        affinity = (
            np.einsum("nk,nk->n", u, _take(st.adv_vec, adv, axis=0)) + cfg.hidden_weight * hid
        )
        conv_coarse = st.conv_country_eff[country] + st.conv_device_eff[device]
        conv_logit = cfg.conversion_bias + cfg.conversion_affinity_weight * affinity + conv_coarse
        conversion = click & (self.rng.random(n) < _sigmoid(conv_logit))
        cols = {
            "user_id": uid,
            "item_id": item,
            "advertiser_id": adv,
            "day": np.full(n, self.day, np.int32),
            "timestamp": ts,
            "click": click.astype(np.int8),
            "conversion": conversion.astype(np.int8),
            "pin_category": category,
            "hour": hour.astype(np.int32),
            "device": device,
            "country": country,
            "position": position,
        }
        oracle = {
            "click_logit": click_logit,
            "click_coarse": coarse,
            "conv_logit": conv_logit,
            "conv_coarse": conv_coarse,
        }
        return cols, oracle


def _pick_row(x: np.ndarray, col: np.ndarray) -> np.ndarray:
    """x[i, col[i]] for a 2-D array (flat take: faster than fancy indexing)."""
    return _take(x.reshape(-1), np.arange(len(col)) * x.shape[1] + col)


def _unique(keys: np.ndarray, *, counts: bool = False):
    """Sorted unique values (and counts) by sort + diff.

    Faster than ``np.unique`` on large int64 arrays (NumPy 2.4's hash path is slow).
    """
    s = np.sort(keys.reshape(-1))
    first = np.ones(len(s), bool)
    np.not_equal(s[1:], s[:-1], out=first[1:])
    if not counts:
        return s[first]
    starts = np.flatnonzero(first)
    return s[starts], np.diff(np.append(starts, len(s)))


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _auc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Rank-based ROC AUC with ties averaged (None if one class is missing)."""
    labels = np.asarray(labels).astype(bool)
    pos = int(labels.sum())
    neg = len(labels) - pos
    if pos == 0 or neg == 0:
        return None
    order = np.argsort(scores, kind="stable")
    s = np.asarray(scores)[order]
    ranks = np.empty(len(s), np.float64)
    _, first, counts = np.unique(s, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[labels].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


# ----------------------------------------------------------------------- KG spill


class _Spill:
    """Append-only int64 key files per (relation, partition), deleted after use."""

    def __init__(self, directory: pathlib.Path, num_parts: int):
        self.dir = directory
        self.num_parts = num_parts
        if self.dir.exists():
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True)

    def add(self, rel: str, user: np.ndarray, key: np.ndarray) -> None:
        part = user % self.num_parts
        for p in range(self.num_parts):
            sel = key[part == p] if self.num_parts > 1 else key
            if len(sel):
                with open(self.dir / f"{rel}.{p}.bin", "ab") as f:
                    f.write(memoryview(np.ascontiguousarray(sel, np.int64)).cast("B"))

    def read(self, rel: str, p: int) -> np.ndarray:
        f = self.dir / f"{rel}.{p}.bin"
        return np.fromfile(f, dtype=np.int64) if f.exists() else np.zeros(0, np.int64)

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


_REL_TYPES = {  # relation -> (head type, tail type)
    "engaged": ("user", "pin"),
    "converted": ("user", "advertiser"),
    "follows": ("user", "board"),
    "owned_by": ("pin", "advertiser"),
    "on_board": ("pin", "board"),
    "has_keyword": ("pin", "keyword"),
    "targets": ("advertiser", "keyword"),
}


def _write_triples(f, rel: str, head: np.ndarray, tail: np.ndarray) -> None:
    ht, tt = _REL_TYPES[rel]
    fmt = f"{ht}:%d\t{rel}\t{tt}:%d\n"
    step = 1 << 20
    for i in range(0, len(head), step):
        pairs = zip(head[i : i + step].tolist(), tail[i : i + step].tolist(), strict=True)
        f.write("".join([fmt % p for p in pairs]))


def _build_kg(cfg: WorldConfig, st: _Static, spill: _Spill, kg_dir: pathlib.Path) -> dict:
    """Turns spilled log keys and metadata into kg/{train,valid,test}.txt + entity_types.tsv."""
    kg_dir.mkdir(parents=True, exist_ok=True)
    sizes = {
        "user": cfg.num_users,
        "pin": cfg.num_pins,
        "advertiser": cfg.num_advertisers,
        "board": cfg.num_boards,
        "keyword": cfg.num_keywords,
    }
    train_deg = {t: np.zeros(n, np.int64) for t, n in sizes.items()}
    kg_end = cfg.kg_days[1]

    # Metadata relations (all train).
    meta_triples = {}
    exists = st.created < kg_end
    pins = np.flatnonzero(exists)
    ad = pins[st.pin_adv[pins] >= 0]
    meta_triples["owned_by"] = (ad, st.pin_adv[ad].astype(np.int64))
    meta_triples["on_board"] = (pins, st.board[pins].astype(np.int64))
    meta_triples["has_keyword"] = (pins, st.keyword[pins].astype(np.int64))
    adv_kw = _unique(np.arange(cfg.num_advertisers)[:, None] * cfg.num_keywords + st.adv_keywords)
    meta_triples["targets"] = (adv_kw // cfg.num_keywords, adv_kw % cfg.num_keywords)
    for rel, (h, t) in meta_triples.items():
        ht, tt = _REL_TYPES[rel]
        train_deg[ht] += np.bincount(h, minlength=sizes[ht])
        train_deg[tt] += np.bincount(t, minlength=sizes[tt])

    # Log relations: unique pairs per partition, random split.
    counts = {rel: {"train": 0, "valid": 0, "test": 0} for rel in _REL_TYPES}
    for rel, (h, _) in meta_triples.items():
        counts[rel]["train"] = len(h)
    tails = {"engaged": cfg.num_pins, "converted": cfg.num_advertisers, "follows": cfg.num_boards}
    parts_dir = spill.dir
    for p in range(spill.num_parts):
        for rel, ntail in tails.items():
            keys = spill.read(rel, p)
            if rel == "follows":
                keys, c = _unique(keys, counts=True)
                keys = keys[c >= cfg.kg_follow_min_engagements]
            else:
                keys = _unique(keys)
            r = _rng(cfg, _KG, list(tails).index(rel), p).random(len(keys))
            split = np.where(
                r < cfg.kg_valid_fraction,
                1,
                np.where(r < cfg.kg_valid_fraction + cfg.kg_test_fraction, 2, 0),
            )
            head, tail = keys // ntail, keys % ntail
            ht, tt = _REL_TYPES[rel]
            tr = split == 0
            train_deg[ht] += np.bincount(head[tr], minlength=sizes[ht])
            train_deg[tt] += np.bincount(tail[tr], minlength=sizes[tt])
            np.save(parts_dir / f"{rel}.{p}.split.npy", np.stack([head, tail, split]))

    # Second pass: valid/test triples need both entities seen in train.
    files = {s: open(kg_dir / f"{s}.txt", "w") for s in ("train", "valid", "test")}  # noqa: SIM115
    try:
        for rel, (h, t) in meta_triples.items():
            _write_triples(files["train"], rel, h, t)
        for p in range(spill.num_parts):
            for rel in tails:
                head, tail, split = np.load(parts_dir / f"{rel}.{p}.split.npy")
                ht, tt = _REL_TYPES[rel]
                held = split > 0
                unseen = held & ((train_deg[ht][head] == 0) | (train_deg[tt][tail] == 0))
                split = np.where(unseen, 0, split)
                train_deg[ht] += np.bincount(head[unseen], minlength=sizes[ht])
                train_deg[tt] += np.bincount(tail[unseen], minlength=sizes[tt])
                for s_id, s_name in enumerate(("train", "valid", "test")):
                    sel = split == s_id
                    _write_triples(files[s_name], rel, head[sel], tail[sel])
                    counts[rel][s_name] += int(sel.sum())
    finally:
        for f in files.values():
            f.close()
    with open(kg_dir / "entity_types.tsv", "w") as f:
        for etype, deg in train_deg.items():
            ids = np.flatnonzero(deg > 0)
            fmt = f"{etype}:%d\t{etype}\n"
            for i in range(0, len(ids), 1 << 20):
                f.write("".join([fmt % j for j in ids[i : i + (1 << 20)].tolist()]))
    entities = {t: int((d > 0).sum()) for t, d in train_deg.items()}
    return {
        "triples": counts,
        "entities": entities,
        "relations": {r: list(v) for r, v in _REL_TYPES.items()},
    }


# ----------------------------------------------------------------------- main entry


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(msg, file=sys.stderr, flush=True)


def _in_order(pool, fn, items, *, ahead: int):
    """Yields (item, fn(*item)) in the order of ``items``, at most ``ahead`` computed
    ahead on ``pool`` (None: inline)."""
    if pool is None:
        for item in items:
            yield item, fn(*item)
        return
    pending = collections.deque()
    for item in items:
        pending.append((item, pool.submit(fn, *item)))
        if len(pending) > ahead:
            done, fut = pending.popleft()
            yield done, fut.result()
    while pending:
        done, fut = pending.popleft()
        yield done, fut.result()


def _chunks(total: int, size: int):
    for i, c0 in enumerate(range(0, total, size)):
        yield i, min(size, total - c0)


def _num_workers(workers: int | None) -> int:
    return max(1, workers if workers is not None else min(2, os.cpu_count() or 1))


def memory_estimate(cfg: WorldConfig, workers: int = 1) -> int:
    """Bytes the generator holds at its peak, about (see "Memory" in the module docstring).

    The per-entity state plus, for each of ``workers`` chunks generated at once, the
    [n, M] candidates of a chunk of ``n = chunk_events`` events (fewer if no day has
    that many): at most ``4(k + h) + 32`` bytes per candidate (a gathered latent
    vector and a few per-candidate numbers).

    Args:
      cfg: the world parameters.
      workers: chunks generated at once.

    Returns:
      The estimate in bytes.
    """
    k, h = cfg.latent_dim, cfg.hidden_dim
    static = cfg.num_users * (4 * (k + h) + 20) + cfg.num_pins * (4 * k + 30)
    return static + workers * _chunk_rows(cfg) * cfg.num_candidates * (4 * (k + h) + 32)


def _chunk_rows(cfg: WorldConfig) -> int:
    """Events in the largest chunk."""
    return min(cfg.chunk_events,
               max(cfg.engagements_per_day, cfg.conversions_per_day, cfg.impressions_per_day))


def _check_memory(cfg: WorldConfig, workers: int) -> None:
    """Refuses a world whose :func:`memory_estimate` exceeds the memory this process can
    use (RAM, or its cgroup's memory limit where smaller): it would be killed by the OS
    part-way, without a message (num_candidates=10**6 did)."""
    need, limit = memory_estimate(cfg, workers), sysmem.memory_limit()
    if limit is not None and need > limit[0]:
        raise ValueError(
            f"the world needs about {need / 2**30:.1f} GiB of memory but {limit[1]}: "
            f"num_candidates={cfg.num_candidates} candidates for "
            f"each of the {_chunk_rows(cfg)} events of a chunk (chunk_events="
            f"{cfg.chunk_events}), {workers} chunk(s) at once; lower num_candidates or "
            "chunk_events"
        )


GENERATOR = "jax_recsys.data.world"  # dataset.json "generator" of every generated world


# What a world folder holds besides its tables and kg/ (which its dataset.json names):
# launch.generate_data writes metrics.json beside the world.
_WORLD_FILES = frozenset({"dataset.json", "world_summary.json", "metrics.json"})


def _world_entries(meta: dict) -> set[str]:
    """The names a world folder of dataset.json ``meta`` may hold at its top."""
    tables = meta.get("tables") if isinstance(meta.get("tables"), dict) else {}
    rels = [t.get("path") for t in tables.values() if isinstance(t, dict)] + [meta.get("kg")]
    parts = [pathlib.PurePath(r).parts for r in rels if isinstance(r, str)]
    return {p[0] for p in parts if p} | _WORLD_FILES


def check_replaceable(out_dir: str | os.PathLike) -> None:
    """Checks that a world may be written to ``out_dir``, replacing what is there.

    The new world replaces the folder whole, so it may only land on nothing, on an
    empty folder, or on a world of this generator (its dataset.json says
    ``"generator": "jax_recsys.data.world"``) holding nothing but a world's entries
    (dataset.json, world_summary.json, launch.generate_data's metrics.json, the tables
    and kg/ its dataset.json names); any other folder is refused, so that
    ``--workdir=.``, a folder of one's own files, or files put beside a world (notes,
    a subfolder) are never deleted. A symlink (to anything, or dangling) is refused
    too: the swap would put a folder in the link's place.

    Args:
      out_dir: the dataset folder to write.

    Raises:
      NotADirectoryError: ``out_dir`` exists and is not a folder.
      FileExistsError: ``out_dir`` is a non-empty folder without a generated world, a
        world's folder that also holds other files (the message names the folder and
        what it holds), or a symlink.
    """
    final = pathlib.Path(out_dir)
    refusal = fsutil.symlink_refusal(final, "the world")
    if refusal:
        raise FileExistsError(refusal)
    if not final.exists():
        return
    if not final.is_dir():
        raise NotADirectoryError(f"{final} exists and is not a folder")
    names = fsutil.folder_names(final)
    if not names:
        return
    try:
        meta = json.loads((final / "dataset.json").read_text())
    except (OSError, ValueError):
        meta = None
    if not (isinstance(meta, dict) and meta.get("generator") == GENERATOR):
        raise FileExistsError(
            f"{final} is not empty and holds no generated world (no dataset.json of "
            f"{GENERATOR}): it holds {fsutil.list_names(names)}; refusing to replace it: "
            "give a new or empty folder (or a previous world's)"
        )
    own = _world_entries(meta)
    others = [n for n in names if n.rstrip("/") not in own]
    if others:
        raise FileExistsError(
            f"{final} holds a generated world but also {fsutil.list_names(others)}, which "
            "replacing it would delete: move them out of the folder first (or write the "
            "world to another folder)"
        )


def generate_world(cfg: WorldConfig, out_dir: str | os.PathLike, *, progress: bool = True,
                   workers: int | None = None) -> dict:
    """Generates the synthetic world as a dataset folder.

    The world is written into a hidden sibling folder and renamed into place once
    complete, so a failed or interrupted run leaves an existing ``out_dir`` as it
    was (a run stopped half-way over an old world used to leave new tables next to
    the old dataset.json, which later runs accepted).

    Args:
      cfg: the world parameters.
      out_dir: the dataset folder to write: new, empty, or a world written here
        before, which is replaced whole when the new world is complete (any other
        folder, or a world with other files beside its own, is refused before any
        work: `check_replaceable`).
      progress: print one line per day (to stderr).
      workers: threads generating event chunks (default: min(2, CPUs)); the
        files are identical for any number.

    Returns:
      The summary (also written to ``out_dir/world_summary.json``): rows per
      table, long-tail shares, engagement/impression ratio, click and
      conversion rates, oracle AUCs, KG triple counts, events/s.

    Raises:
      ValueError: an invalid config, or one whose :func:`memory_estimate` exceeds this
        machine's RAM or cgroup memory limit (checked before any work).
      NotADirectoryError: ``out_dir`` is a file.
      FileExistsError: ``out_dir`` is a non-empty folder that holds no generated world,
        or other files beside one.
    """
    cfg.validate()
    _check_memory(cfg, _num_workers(workers))
    final = pathlib.Path(out_dir).absolute()
    check_replaceable(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    out = final.parent / f".{final.name}.partial-{uuid.uuid4().hex[:8]}"
    out.mkdir()
    try:
        summary = _generate_into(cfg, out, progress=progress, workers=workers)
        check_replaceable(final)  # still: nothing else was put there meanwhile
        fsutil.swap_dir(out, final)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return summary


def _generate_into(cfg: WorldConfig, out: pathlib.Path, *, progress: bool,
                   workers: int | None) -> dict:
    """`generate_world`'s work, into the (new, empty) folder ``out``."""
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    st = _Static(cfg)
    t_static = time.perf_counter() - t0
    _log(
        progress,
        f"world {cfg.name}: static state for {cfg.num_users} users, "
        f"{cfg.num_pins} pins, {cfg.num_advertisers} advertisers in {t_static:.1f}s",
    )

    kg_lo, kg_hi = cfg.kg_days
    kg_events = (kg_hi - kg_lo) * cfg.engagements_per_day
    spill = _Spill(out / "_kg_spill", max(1, -(-kg_events // cfg.kg_partition_rows)))
    writers = {n: folder.TableWriter(out, n) for n in ("engagements", "conversions", "impressions")}
    user_eng = np.zeros(cfg.num_users, np.int64)
    pin_eng = np.zeros(cfg.num_pins, np.int64)
    user_imp = np.zeros(cfg.num_users, np.int64)
    clicks = conversions = impressions = 0
    oracle: dict[str, list] = {
        k: [] for k in ("click", "click_logit", "click_coarse", "conv", "conv_logit", "conv_coarse")
    }
    events = 0
    t_days = time.perf_counter()
    cpu_days = time.process_time()
    n_workers = _num_workers(workers)

    def tasks():  # (kind, day, chunk, rows) in the order their results are written
        for day in range(cfg.num_days):
            for ci, n in _chunks(cfg.engagements_per_day, cfg.chunk_events):
                yield "eng", day, ci, n
            for ci, n in _chunks(cfg.conversions_per_day, cfg.chunk_events):
                yield "conv", day, ci, n
            n_imp_day = cfg.impressions_per_day if day >= cfg.impression_start_day else 0
            for ci, n in _chunks(n_imp_day, cfg.chunk_events):
                yield "imp", day, ci, n
            yield "end", day, 0, n_imp_day

    def generate(kind, day, ci, n):
        if kind == "eng":
            return _Day(cfg, st, day, _rng(cfg, day, _ENG, ci)).engagements(n)
        if kind == "conv":
            return _Day(cfg, st, day, _rng(cfg, day, _CONV, ci)).conversions(n)
        if kind == "imp":
            return _Day(cfg, st, day, _rng(cfg, day, _IMP, ci)).impressions(n)
        return None

    # Chunks are pure functions of (day, chunk): worker threads generate them
    # ahead (NumPy releases the GIL in the heavy parts), and the results are
    # consumed strictly in task order, so the files do not depend on the workers.
    pool = futures.ThreadPoolExecutor(n_workers) if n_workers > 1 else None
    n_day, conv_parts, keep, td = 0, [], cfg.summary_sample_per_day, time.perf_counter()
    try:
        for (kind, day, _, n), out_c in _in_order(pool, generate, tasks(), ahead=n_workers):
            in_kg = kg_lo <= day < kg_hi
            if kind == "eng":
                cols = out_c
                writers["engagements"].append(cols)
                # add.at, not bincount: O(chunk) work even with 10M users.
                np.add.at(user_eng, cols["user_id"], 1)
                np.add.at(pin_eng, cols["item_id"], 1)
                if in_kg:
                    uid, item = cols["user_id"], cols["item_id"]
                    sel = np.isin(cols["engagement_type"], cfg.kg_engagement_types)
                    spill.add("engaged", uid[sel], uid[sel] * cfg.num_pins + item[sel])
                    spill.add("follows", uid, uid * cfg.num_boards + st.board[item])
                n_day += n
            elif kind == "conv":
                conv_parts.append(out_c)
            elif kind == "imp":
                cols, orc = out_c
                writers["impressions"].append(cols)
                np.add.at(user_imp, cols["user_id"], 1)
                clk, cv = cols["click"].astype(bool), cols["conversion"].astype(bool)
                clicks += int(clk.sum())
                conversions += int(cv.sum())
                impressions += n
                if keep > 0:
                    m = min(keep, n)
                    keep -= m
                    oracle["click"].append(clk[:m])
                    oracle["click_logit"].append(orc["click_logit"][:m])
                    oracle["click_coarse"].append(orc["click_coarse"][:m])
                    c = clk[:m]
                    oracle["conv"].append(cv[:m][c])
                    oracle["conv_logit"].append(orc["conv_logit"][:m][c])
                    oracle["conv_coarse"].append(orc["conv_coarse"][:m][c])
                if cv.any():  # ad conversions join the offsite conversion log
                    conv_parts.append(
                        {
                            "user_id": cols["user_id"][cv],
                            "advertiser_id": cols["advertiser_id"][cv],
                            "day": cols["day"][cv],
                            "timestamp": cols["timestamp"][cv],
                            "source": np.ones(int(cv.sum()), np.int8),
                        }
                    )
                n_day += n
            else:  # end of the day: its conversion log, then the progress line
                for part in conv_parts:
                    writers["conversions"].append(part)
                    if in_kg:
                        spill.add(
                            "converted",
                            part["user_id"],
                            part["user_id"] * cfg.num_advertisers + part["advertiser_id"],
                        )
                    n_day += len(part["user_id"])
                events += n_day
                dt = time.perf_counter() - td
                _log(
                    progress,
                    f"day {day + 1}/{cfg.num_days}: {n_day} events "
                    f"({n} impressions) in {dt:.2f}s, {n_day / max(dt, 1e-9):,.0f} ev/s",
                )
                n_day, conv_parts, keep, td = 0, [], cfg.summary_sample_per_day, time.perf_counter()
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    gen_seconds = time.perf_counter() - t_days
    gen_cpu = time.process_time() - cpu_days

    tables = {name: w.close() for name, w in writers.items()}
    tables.update(_write_static_tables(cfg, st, out))
    t_kg = time.perf_counter()
    kg_info = _build_kg(cfg, st, spill, out / "kg")
    spill.close()
    t_kg = time.perf_counter() - t_kg
    _log(
        progress,
        f"knowledge graph in {t_kg:.1f}s: "
        + ", ".join(f"{r} {sum(c.values())}" for r, c in kg_info["triples"].items()),
    )

    o = {k: np.concatenate(v) if v else np.zeros(0) for k, v in oracle.items()}
    summary = {
        "name": cfg.name,
        "seed": cfg.seed,
        "num_days": cfg.num_days,
        "rows": {name: t["rows"] for name, t in tables.items()},
        "events": int(events),
        "seconds_total": round(time.perf_counter() - t0, 3),
        "seconds_static": round(t_static, 3),
        "seconds_days": round(gen_seconds, 3),
        "seconds_kg": round(t_kg, 3),
        "events_per_second": round(events / max(gen_seconds, 1e-9), 1),
        # CPU time of this process: comparable on a shared box where wall time is not.
        "events_per_cpu_second": round(events / max(gen_cpu, 1e-9), 1),
        "cpu_seconds_total": round(time.process_time() - cpu0, 3),
        "tail": _tail_stats(user_eng, pin_eng, user_imp),
        "engagement_impression_ratio": round(
            tables["engagements"]["rows"] / max(impressions, 1), 3
        ),
        "impressions": impressions,
        "click_rate": round(clicks / max(impressions, 1), 5),
        "conversion_rate": round(conversions / max(impressions, 1), 5),
        "conversion_rate_given_click": round(conversions / max(clicks, 1), 5),
        "oracle": {
            "click_auc_true_logit": _auc(o["click_logit"], o["click"]),
            "click_auc_coarse_effects_only": _auc(o["click_coarse"], o["click"]),
            "cvr_auc_true_logit_on_clicks": _auc(o["conv_logit"], o["conv"]),
            "cvr_auc_coarse_effects_only_on_clicks": _auc(o["conv_coarse"], o["conv"]),
        },
        "kg": kg_info,
        "windows": {k: list(v) for k, v in cfg.windows().items()},
    }
    folder.write_dataset_json(
        out,
        name=cfg.name,
        tables=tables,
        num_days=cfg.num_days,
        kg="kg",
        splits=cfg.windows(),
        extra={
            "generator": GENERATOR,
            "world_config": dataclasses.asdict(cfg),
            "entity_types": ["user", "pin", "advertiser", "board", "keyword"],
        },
    )
    (out / "world_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    _log(
        progress,
        f"world written to {out} in {summary['seconds_total']:.1f}s "
        f"({summary['events_per_second']:,.0f} events/s)",
    )
    return summary


def _write_static_tables(cfg: WorldConfig, st: _Static, out: pathlib.Path) -> dict:
    tables = {}
    with folder.TableWriter(out, "users") as w:
        for c0 in range(0, cfg.num_users, _ROW_CHUNK):
            s = slice(c0, min(cfg.num_users, c0 + _ROW_CHUNK))
            w.append(
                {
                    "user_id": np.arange(s.start, s.stop, dtype=np.int64),
                    "country": st.country[s].astype(np.int32),
                    "device": st.device[s].astype(np.int32),
                }
            )
    tables["users"] = w.close()
    with folder.TableWriter(out, "items") as w:
        for c0 in range(0, cfg.num_pins, _ROW_CHUNK):
            s = slice(c0, min(cfg.num_pins, c0 + _ROW_CHUNK))
            w.append(
                {
                    "item_id": np.arange(s.start, s.stop, dtype=np.int64),
                    "advertiser_id": st.pin_adv[s].astype(np.int64),
                    "board_id": st.board[s].astype(np.int64),
                    "topic": st.pin_topic[s].astype(np.int32),
                    "keyword_id": st.keyword[s].astype(np.int64),
                    "created_day": st.created[s].astype(np.int32),
                    "is_ad": (st.pin_adv[s] >= 0).astype(np.int8),
                }
            )
    tables["items"] = w.close()
    tables["advertisers"] = folder.write_table(
        out,
        "advertisers",
        {
            "advertiser_id": np.arange(cfg.num_advertisers, dtype=np.int64),
            "category": st.adv_topic.astype(np.int32),
        },
    )
    return tables


def _tail_stats(user_eng: np.ndarray, pin_eng: np.ndarray, user_imp: np.ndarray) -> dict:
    total = max(int(pin_eng.sum()), 1)
    s = np.sort(pin_eng)
    k80 = int(0.8 * len(s))
    imp_users = user_imp > 0
    u_sorted = np.sort(user_eng)[::-1]
    top1 = max(1, len(u_sorted) // 100)
    return {
        "engagement_share_least_popular_80pct_pins": round(float(s[:k80].sum()) / total, 4),
        "engagement_share_top_1pct_users": round(float(u_sorted[:top1].sum()) / total, 4),
        "share_users_lt5_engagements": round(float((user_eng < 5).mean()), 4),
        "share_pins_without_engagement": round(float((pin_eng == 0).mean()), 4),
        "share_users_with_impressions": round(float(imp_users.mean()), 4),
        "share_impressed_users_lt5_impressions": round(
            float((user_imp[imp_users] < 5).mean()) if imp_users.any() else 0.0, 4
        ),
        "engagements_per_user_median": float(np.median(user_eng)),
    }


def scale_config(scale: str, **overrides) -> WorldConfig:
    """The named scales: "smoke" (seconds), "default" (about a minute), "large" (>= 10M ids).

    Args:
      scale: "smoke", "default" or "large".
      **overrides: WorldConfig fields to replace.

    Returns:
      the WorldConfig.
    """
    if scale == "default":
        base = WorldConfig()
    elif scale == "smoke":
        base = WorldConfig(
            name="synthetic_ads_world_smoke",
            num_users=1_500,
            num_pins=2_000,
            num_advertisers=64,
            num_boards=200,
            num_keywords=100,
            num_topics=8,
            topics_per_category=2,
            latent_dim=8,
            num_days=14,
            stale_pretrain_days=(0, 4),
            fresh_pretrain_days=(4, 10),
            ranker_train_days=(10, 12),
            ranker_valid_days=(12, 13),
            ranker_test_days=(13, 14),
            kg_days=(4, 10),
            impression_start_day=10,
            engagements_per_day=10_000,
            drift_per_day=0.06,  # 28 days of drift compressed into 14
            conversions_per_day=800,
            impressions_per_day=4_000,
        )
    elif scale == "large":
        base = WorldConfig(
            name="synthetic_ads_world_large",
            num_users=10_000_000,
            num_pins=10_000_000,
            num_advertisers=100_000,
            num_boards=500_000,
            num_keywords=100_000,
            num_topics=64,
            topics_per_category=8,
            engagements_per_day=10_000_000,
            conversions_per_day=500_000,
            impressions_per_day=1_000_000,
            summary_sample_per_day=200_000,
        )
    else:
        raise ValueError(f"unknown world scale {scale!r} (want smoke, default or large)")
    return dataclasses.replace(base, **overrides)


# The fields `days_override` rewrites.
DAY_FIELDS = (
    "num_days",
    "stale_pretrain_days",
    "fresh_pretrain_days",
    "ranker_train_days",
    "ranker_valid_days",
    "ranker_test_days",
    "kg_days",
    "impression_start_day",
)


def days_override(cfg: WorldConfig, num_days: int) -> WorldConfig:
    """Shrinks or stretches the time axis to ``num_days`` keeping the windows' proportions.

    Args:
      cfg: a config.
      num_days: new number of days (>= 5).

    Returns:
      a config whose windows are scaled to ``num_days`` (each at least one day);
      every field in ``DAY_FIELDS`` is rewritten (``kg_days`` becomes the fresh
      pretraining window, ``impression_start_day`` the ranker train start).
    """
    if num_days < 5:
        raise ValueError("num_days must be >= 5 (five day windows)")
    if num_days > 3650:
        raise ValueError(f"num_days must be <= 3650 (ten years of events), got {num_days}")
    if num_days == cfg.num_days:
        return cfg
    # Cumulative boundaries stale | fresh | train | valid | test, each window >= 1 day.
    bounds = [
        cfg.stale_pretrain_days[1],
        cfg.fresh_pretrain_days[1],
        cfg.ranker_train_days[1],
        cfg.ranker_valid_days[1],
    ]
    new = []
    for i, b in enumerate(bounds):
        v = round(b * num_days / cfg.num_days)
        lo = (new[-1] if new else 0) + 1
        hi = num_days - (len(bounds) - i)
        new.append(min(max(v, lo), hi))
    b0, b1, b2, b3 = new
    return dataclasses.replace(
        cfg,
        num_days=num_days,
        stale_pretrain_days=(0, b0),
        fresh_pretrain_days=(b0, b1),
        ranker_train_days=(b1, b2),
        ranker_valid_days=(b2, b3),
        ranker_test_days=(b3, num_days),
        kg_days=(b0, b1),
        impression_start_day=b1,
    )
