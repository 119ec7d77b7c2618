"""The settings rules of the live serving check (`launch.serving_check`), without its
absl flags: serving_check applies them to its flags, and run_pipeline to its
``serving`` section before any stage runs (`launch.pipeline_stages.check`), so a
setting the check would refuse after an hour of ablation is refused at once, in
the same words.
"""

from __future__ import annotations

import math

from serving.limits import MAX_SECONDS

# name -> (accepts(value), the rule as messages state it: "must be <rule>").
RULES = {
    "num_shards": (lambda v: v >= 1, ">= 1"),
    "num_requests": (lambda v: v >= 1, ">= 1"),
    "candidates": (lambda v: v >= 1, ">= 1"),
    "concurrency": (lambda v: v >= 0, ">= 0"),
    "deadline_s": (lambda v: math.isfinite(v) and 0 < v <= MAX_SECONDS,
                   f"finite, > 0 and at most {MAX_SECONDS:g} (1 day), as the ranker's"),
    "tolerance": (lambda v: v >= 0, ">= 0"),
    "start_timeout_s": (lambda v: v > 0, "> 0"),
    "seed": (lambda v: v >= 0, ">= 0"),
}


def violations(**settings) -> list[tuple[str, object, str]]:
    """The settings (keywords named as in `RULES`) that break their rule.

    Returns:
      [(name, value, rule)] in the order given; empty when all are accepted.

    Raises:
      KeyError: a setting `RULES` does not know.
    """
    return [(name, value, RULES[name][1]) for name, value in settings.items()
            if not RULES[name][0](value)]
