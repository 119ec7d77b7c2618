"""docs/FLAGS.md is generated from the flag definitions and must match them."""

import re

from launch import flags_doc


def test_flags_doc_is_up_to_date():
    text = flags_doc.render()
    committed = flags_doc.OUT.read_text(encoding="utf-8")
    stale = "docs/FLAGS.md is out of date: run python -m launch.flags_doc"
    if f"absl-py {flags_doc.absl_version()}," in committed:
        assert committed == text, stale
    else:  # another absl-py may word types differently: the flags themselves must match
        assert flags_doc.flag_names(committed) == flags_doc.flag_names(text), stale
    # Every entry point has its section, and a flag's row has its help text.
    for name in flags_doc.entry_points():
        assert f"\n## {name}\n" in text
    serve_ranker = text.split("\n## serve_ranker\n")[1].split("\n## ")[0]
    assert re.search(r"^\| `--hedge_budget` \| float \| `0.05` \| .*token bucket.* \|$",
                     serve_ranker, re.M)
    assert "| `--artifact` | string | (required) |" in serve_ranker
    assert "| `--verify` | string enum | `sizes` | <sizes\\|full\\|none>:" in serve_ranker
    assert "| `--[no]overwrite` | bool | `false` |" in text

def test_render_escapes_table_cells():
    rows = [{"name": "x", "type": "string", "boolean": False, "default": "'a|b'",
             "help": "one\n  two | three", "required": False},
            {"name": "flag", "type": "bool", "boolean": True, "default": "'true'",
             "help": "", "required": False}]
    assert flags_doc._table(rows)[2:] == [
        "| `--[no]flag` | bool | `true` |  |",
        "| `--x` | string | `a\\|b` | one two \\| three |",
    ]


def test_flag_names_reads_the_tables_of_each_section():
    text = "# t\n\n## a\n\nx\n\n| flag | type |\n|---|---|\n| `--one` | int |\n" \
           "| `--[no]two` | bool |\n\n## b\n\n(no flags of its own)\n"
    assert flags_doc.flag_names(text) == {"a": ["--one", "--[no]two"], "b": []}

