r"""INT4 export: a trained ranker -> a versioned serving artifact, behind an AUC gate.

  python -m launch.export_int4 --ranker=DIR/ranker --out=ART [--data=DATASET] \
      [--max_auc_drop=0.001] [--auc_noise_z=0] [--bits=4] [--scale_dtype=float16] \
      [--overwrite] [--workdir=DIR]
  (--checkpoint=DIR/ranker is an alias of --ranker.)

  python -m launch.export_int4 --ablation=ABL [--bits=4]
  adds the "+ both facets, INT4 served" row to a finished ablation (ABL/ablation.md;
  "INT8 served" / "float32 served" with --bits=8 / 32; the row records its bits).

Quantizes every table of the ranker row-wise (float16 scale/bias: --scale_dtype), scores
the test window with full-precision and with quantized tables, and writes ART only when no
task's test AUC drops by more than --max_auc_drop (otherwise exits with status 2 and
leaves ART as it was; a user mistake exits with status 1). The report goes to
ART/../export_report.json (and --workdir/metrics.json when given) and is summarised on
stdout. The dataset defaults to the one recorded next to the ranker (see
jax_recsys/quant/export.py).

Run time on a 2-core box: ~10 s for a smoke ranker; ~7 s for the default world's
ranker (108k rows, dims 96-160; process start included, measured 2026-11-27).
Expected result: INT4 tables at 13.1% of their float32 size (26.3% of fp16 rows:
dim 160 packs to 80 bytes plus 4 bytes of fp16 scale and bias) and test AUC deltas
of a few 1e-4 (default world, 3 seeds: CTR -0.00006 to -0.0008, all inside the 0.001
gate). A smoke world's test window has only ~60
conversions, where rank jitter alone moves CVR AUC by +-0.005 (paired standard error
~0.006): pass --auc_noise_z=2 there, or the strict gate fails on noise.
"""

from __future__ import annotations

import json
import pathlib
import sys

from absl import app, flags

from launch import common

_RANKER = flags.DEFINE_string(
    "ranker", None, "Saved ranker folder (WORKDIR/ranker of train_ranker)."
)
flags.DEFINE_alias("checkpoint", "ranker")
_OUT = flags.DEFINE_string(
    "out", None,
    "Artifact folder to create: new, empty, or an earlier artifact; never a symlink (export "
    "to a new folder, then `ln -sfn NEW LINK`), the ranker's or the data's folder, a folder "
    "around them, or a folder inside the data's.")
_DATA = flags.DEFINE_string("data", None, "Dataset folder (default: recorded next to the ranker).")
_MAX_DROP = flags.DEFINE_float("max_auc_drop", 0.001, "Largest allowed test AUC drop of any task.")
_NOISE_Z = flags.DEFINE_float(
    "auc_noise_z", 0.0, "Let a drop within this many standard errors pass (0: strict gate)."
)
_BITS = flags.DEFINE_enum("bits", "4", ["4", "8", "32"], "Bits per value (32: no quantization).")
_SCALE_DTYPE = flags.DEFINE_enum(
    "scale_dtype", "float16", ["float16", "float32"],
    "Storage of each row's scale and bias (float32: 4 more bytes per row, for tables "
    "holding values beyond float16's +-65504).")
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False,
    "Replace an artifact of another version at --out (only a serving artifact: any other "
    "non-empty folder is refused, never deleted).")
_REPORT = flags.DEFINE_string(
    "report", None,
    "Report path (default: OUT/../export_report.json, shared by the artifacts of one "
    "folder: a report of another artifact there is replaced, with a note).")
_WORKDIR = flags.DEFINE_string(
    "workdir", None,
    "Optional folder for metrics.json (the report); not one holding another metrics.json "
    "(a training run's).")
_ABLATION = flags.DEFINE_string(
    "ablation", None,
    "Finished ablation folder: add the row of its rankers served at --bits (INT4-served; "
    "INT8 / float32 with --bits=8 / 32)."
)
_INT4_SOURCE = flags.DEFINE_string(
    "int4_source", "cl_kg",
    "With --ablation: the variant whose saved rankers give the INT4-served row "
    "(row '<variant>_int4', '_int8' / '_fp32' with --bits=8 / 32; 'cl_kg' keeps the "
    "paper's '+ both facets, INT4 served').",
)


def main(argv):
    del argv
    from jax_recsys import fsutil
    from jax_recsys.quant import artifact  # NumPy only: the checks below answer at once

    if _OUT.value:  # before any work (the --ablation row too)
        artifact.check_not_symlink(_OUT.value)
    if _WORKDIR.value:  # now, not once the artifact is written
        fsutil.check_file_target(pathlib.Path(_WORKDIR.value) / "metrics.json",
                                 "--workdir's report")
        wd = pathlib.Path(_WORKDIR.value).resolve()
        if _OUT.value and wd.is_relative_to(pathlib.Path(_OUT.value).resolve()):
            raise ValueError(f"--workdir={_WORKDIR.value} is inside --out={_OUT.value}: its "
                             "metrics.json would sit in the artifact folder, which the next "
                             "export would have to delete; give another --workdir")
        held = pathlib.Path(_WORKDIR.value) / "metrics.json"
        if held.is_file():  # an earlier export's report is replaced; nothing else
            try:
                report = json.loads(held.read_text())
            except (OSError, ValueError):
                report = None
            if not (isinstance(report, dict) and {"artifact", "gate"} <= report.keys()):
                raise ValueError(f"--workdir={_WORKDIR.value} holds a metrics.json that is not "
                                 "an export report (a training run's?), which the report would "
                                 "replace; give another --workdir")
    from jax_recsys.quant import export  # JAX: seconds

    exporting = bool(_RANKER.value or _OUT.value) or not _ABLATION.value
    cfg = None
    if exporting:
        if not _RANKER.value or not _OUT.value:
            raise app.UsageError("--ranker (or --checkpoint) and --out are required")
        cfg = export.ExportConfig(
            ranker_dir=_RANKER.value,
            out_dir=_OUT.value,
            data_path=_DATA.value,
            bits=int(_BITS.value),
            scale_dtype=_SCALE_DTYPE.value,
            max_auc_drop=_MAX_DROP.value,
            auc_noise_z=_NOISE_Z.value,
            report_path=_REPORT.value,
            overwrite=_OVERWRITE.value,
        )
    if _ABLATION.value:
        if cfg is not None:  # a bad ranker, data or --out is refused before the row's work
            export.check_export(cfg)
        source = _INT4_SOURCE.value
        name, label = export.int4_row_name(source, bits=int(_BITS.value))
        row = export.add_int4_row(
            _ABLATION.value, bits=int(_BITS.value), data_path=_DATA.value,
            source_variant=source, name=name, label=label,
        )
        print(
            f"added {label!r}: CTR AUC {row['ctr_auc_mean']:.4f} "
            f"({100 * row['ctr_relaimpr_mean']:+.1f}%), CVR AUC {row['cvr_auc_mean']:.4f} "
            f"({100 * row['cvr_relaimpr_mean']:+.1f}%) -> {_ABLATION.value}/ablation.md"
        )
    if cfg is None:
        return
    try:
        report = export.export_ranker(cfg)
    except export.ExportGateError as e:
        print(export.format_report(e.report))
        if _WORKDIR.value:
            common.write_json(pathlib.Path(_WORKDIR.value) / "metrics.json", e.report)
        print(f"ERROR: {e}", file=sys.stderr)
        sys.exit(2)
    print(export.format_report(report))
    if _WORKDIR.value:
        common.write_json(pathlib.Path(_WORKDIR.value) / "metrics.json", report)


if __name__ == "__main__":
    common.run(main)
