"""Training-curve logging: JSON lines (always) and TensorBoard events (if tensorboardX is installed).

Every trainer appends one record per logged step to `WORKDIR/history.jsonl`
(`{"step": int, "name": value, ...}`); the pipeline report draws its curves from
these files. Only process 0 writes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import pathlib
import shutil
from collections.abc import Mapping


class MetricWriter:
    """Appends scalar metrics to `<workdir>/history.jsonl` (and TensorBoard if available).

    Args:
      workdir: run folder; None disables writing (e.g. on processes other than 0).
      tensorboard: also write TensorBoard event files under `<workdir>/tb` when the
        optional `tensorboardX` package is importable.
    """

    def __init__(self, workdir: str | os.PathLike | None, *, tensorboard: bool = True):
        self._path = None
        self._tb = None
        if workdir is None:
            return
        wd = pathlib.Path(workdir)
        wd.mkdir(parents=True, exist_ok=True)
        self._path = wd / "history.jsonl"
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter  # optional dependency
            except ImportError:
                SummaryWriter = None
            if SummaryWriter is not None:
                self._tb = SummaryWriter(str(wd / "tb"))

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        """Records `metrics` at `step` (non-finite values are kept as null)."""
        if self._path is None:
            return
        rec = {"step": int(step)}
        for k, v in metrics.items():
            v = float(v)
            rec[k] = v if math.isfinite(v) else None
        with open(self._path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self._tb is not None:
            for k, v in rec.items():
                if k != "step" and v is not None:
                    self._tb.add_scalar(k, v, int(step))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_history(path: str | os.PathLike) -> list[dict]:
    """Reads a history.jsonl file (missing file: empty list).

    A line that is not JSON (a killed trainer's half-written last line, a damaged
    file) is skipped with a warning naming the file and line: a report still draws
    the rest of the curve.
    """
    path = pathlib.Path(path)
    if path.is_dir():
        path = path / "history.jsonl"
    if not path.exists():
        return []
    out = []
    for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            logging.warning("%s:%d: not a JSON line, skipped: %s", path, i, e)
    return out


def _is_num(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def records_from_metrics(metrics: Mapping) -> list[dict]:
    """Training-curve records from a run's metrics.json.

    Trainers keep their logged progress in metrics.json: pretraining runs as a
    `history` list of `{"step": ..., name: value}` dicts, the ranker as
    `train.loss_curve` pairs `(step, loss_ema)`. Non-numeric values are dropped.

    Args:
      metrics: a parsed metrics.json.

    Returns:
      Records sorted by step (empty when the run logged nothing).

    Raises:
      ValueError: ``metrics`` is not an object, or its curves are not of that shape
        (an entry without a numeric step); the message says which entry.
    """
    if not isinstance(metrics, Mapping):
        raise ValueError(f"not a JSON object but {type(metrics).__name__}")
    recs = []
    hist = metrics.get("history") or []
    if not isinstance(hist, list):
        raise ValueError(f"history is {type(hist).__name__}, not a list of records")
    for i, r in enumerate(hist):
        if not (isinstance(r, Mapping) and _is_num(r.get("step"))):
            raise ValueError(f"history[{i}] is not a record with a numeric step: {r!r:.80}")
        recs.append({k: v for k, v in r.items() if _is_num(v)})
    train = metrics.get("train")
    curve = (train.get("loss_curve") if isinstance(train, Mapping) else None) or []
    if not isinstance(curve, list):
        raise ValueError(f"train.loss_curve is {type(curve).__name__}, not a list of pairs")
    for i, pair in enumerate(curve):
        if not (isinstance(pair, list) and len(pair) == 2 and _is_num(pair[0])):
            raise ValueError(f"train.loss_curve[{i}] is not a [step, loss] pair: {pair!r:.80}")
        recs.append({"step": pair[0], **({"loss_ema": pair[1]} if _is_num(pair[1]) else {})})
    return sorted(recs, key=lambda r: r["step"])


_SOURCE = "history.source.json"


def clear_run_history(run_dir: str | os.PathLike) -> None:
    """Removes an exported history of `run_dir` (history.jsonl, its source stamp, tb/).

    Callers that retrain a run into an existing folder call this so that no report
    draws the previous run's curves.
    """
    run_dir = pathlib.Path(run_dir)
    (run_dir / "history.jsonl").unlink(missing_ok=True)
    (run_dir / _SOURCE).unlink(missing_ok=True)
    shutil.rmtree(run_dir / "tb", ignore_errors=True)


def export_run_history(run_dir: str | os.PathLike, *, tensorboard: bool = True) -> list[dict]:
    """Writes `run_dir/history.jsonl` (and TensorBoard events) from its metrics.json.

    The export records a SHA-256 of the metrics.json it came from
    (`history.source.json`). An existing history.jsonl is kept when that digest
    matches the current metrics.json, or, for a history without a stamp (written by
    a trainer itself), when it is not older than metrics.json; otherwise the run
    was retrained and the history is rebuilt. Without a metrics.json the existing
    history (if any) is returned as it is. Returns the records.

    Raises:
      ValueError: metrics.json is damaged (not JSON, not an object, curves of another
        shape: `records_from_metrics`); the message names it. Nothing is changed then.
    """
    run_dir = pathlib.Path(run_dir)
    existing = read_history(run_dir)
    mpath = run_dir / "metrics.json"
    if not mpath.exists():
        return existing
    raw = mpath.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if existing:
        spath = run_dir / _SOURCE
        if spath.exists():
            try:
                stamp = json.loads(spath.read_text()).get("metrics_sha256")
            except (json.JSONDecodeError, AttributeError):
                stamp = None
            if stamp == digest:
                return existing
        elif (run_dir / "history.jsonl").stat().st_mtime_ns >= mpath.stat().st_mtime_ns:
            return existing
    try:
        recs = records_from_metrics(json.loads(raw))
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{mpath} is damaged: {e}") from None
    clear_run_history(run_dir)
    if recs:
        w = MetricWriter(run_dir, tensorboard=tensorboard)
        for r in recs:
            w.write(r["step"], {k: v for k, v in r.items() if k != "step"})
        w.close()
        (run_dir / _SOURCE).write_text(json.dumps({"metrics_sha256": digest}) + "\n")
    return recs
