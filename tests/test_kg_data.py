"""Tests for jax_recsys.data.kg: exact integer triples and vocabularies from tiny typed
and untyped folders, every error with its file:line, the unseen policy, and the
filter index (answers, masks, membership) against hand-computed sets."""

import pathlib

import numpy as np
import pytest

from jax_recsys import metrics
from jax_recsys.data.folder import DataError
from jax_recsys.data.kg import KnowledgeGraph, TripleIndex, read_triples


def _write(d: pathlib.Path, **files: str) -> pathlib.Path:
    d.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (d / name.replace("_txt", ".txt").replace("_tsv", ".tsv")).write_text(text)
    return d


def _err(fn) -> DataError:
    with pytest.raises(DataError) as e:
        fn()
    return e.value


TYPED_TRAIN = (
    "user:2\tengaged\tpin:10\n"
    "user:1\tengaged\tpin:7\n"
    "user:2\tengaged\tpin:7\n"
    "pin:7\towned_by\tadvertiser:3\n"
    "pin:10\towned_by\tadvertiser:3\n"
)
TYPES = ("user:1\tuser\nuser:2\tuser\npin:7\tpin\npin:10\tpin\nadvertiser:3\tadvertiser\n"
         "user:9\tuser\n")


def _typed(tmp_path, **extra):
    files = dict(train_txt=TYPED_TRAIN, valid_txt="user:1\tengaged\tpin:10\n",
                 test_txt="pin:10\towned_by\tadvertiser:3\n", entity_types_tsv=TYPES)
    files.update(extra)
    return _write(tmp_path / "kg", **files)


def test_typed_folder_exact(tmp_path):
    kg = read_triples(_typed(tmp_path))
    assert isinstance(kg, KnowledgeGraph)
    assert kg.entity_types == ("advertiser", "pin", "user")
    # Prefixes stripped, integer raw ids, numeric order; user:9 has no train triple.
    assert kg.vocabs["user"].ids.tolist() == [1, 2]
    assert kg.vocabs["pin"].ids.tolist() == [7, 10]
    assert kg.vocabs["advertiser"].ids.tolist() == [3]
    assert kg.vocabs["pin"].dtype == np.int64
    assert kg.num_rows == {"advertiser": 1, "pin": 2, "user": 2}
    assert kg.relations == ("engaged", "owned_by")
    assert kg.relation_types == {"engaged": ("user", "pin"), "owned_by": ("pin", "advertiser")}
    np.testing.assert_array_equal(kg.splits["train"], [[1, 0, 1], [0, 0, 0], [1, 0, 0],
                                                       [0, 1, 0], [1, 1, 0]])
    np.testing.assert_array_equal(kg.splits["valid"], [[0, 0, 1]])
    np.testing.assert_array_equal(kg.splits["test"], [[1, 1, 0]])
    assert kg.splits["train"].dtype == np.int64
    paths = kg.save_vocabs(tmp_path / "vocab")
    assert np.load(paths["pin"], allow_pickle=False).tolist() == [7, 10]


def test_untyped_folder_string_ids(tmp_path):
    d = _write(tmp_path / "u", train_txt="b\tr1\ta\r\na\tr2\tc\n\nc\tr1\tb\n",
               test_txt="a\tr1\tb\n")
    kg = read_triples(d)
    assert kg.entity_types == ("entity",)
    assert kg.vocabs["entity"].ids.tolist() == ["a", "b", "c"]
    assert kg.relation_types == {"r1": ("entity", "entity"), "r2": ("entity", "entity")}
    np.testing.assert_array_equal(kg.splits["train"], [[1, 0, 0], [0, 1, 2], [2, 0, 1]])
    assert set(kg.splits) == {"train", "test"}
    # normalize_ids=False keeps prefixed strings as they are.
    kg2 = read_triples(_typed(tmp_path), normalize_ids=False)
    assert kg2.vocabs["pin"].ids.tolist() == ["pin:10", "pin:7"]


@pytest.mark.parametrize("files,match,line", [
    (dict(train_txt="a\tr\tb\na\tr\n"), "expected 3 tab-separated fields, got 2", 2),
    (dict(train_txt="a r b\n"), "separated by tabs", 1),
    (dict(train_txt=""), "empty file", None),
    (dict(train_txt="a\tr\tb\n", valid_txt="\n"), "empty file", None),
    (dict(train_txt="a\tr\t\n"), "empty field", 1),
    # Whitespace-only fields: refused whether or not the file has a blank line.
    (dict(train_txt="a\t \tb\nc\tr\td\n"), "empty field", 1),
    (dict(train_txt="a\tr\tb\nc\tr\t  \n"), "empty field", 2),
    (dict(train_txt="a\tr\tb\n", test_txt="a\tr\tb\nz\tr\tb\n"), "'z' does not occur", 2),
    (dict(train_txt="a\tr\tb\n", valid_txt="a\tq\tb\n"), "relation 'q' does not occur", 1),
])
def test_errors_name_file_and_line(tmp_path, files, match, line):
    d = _write(tmp_path / "bad", **files)
    with pytest.raises(DataError, match=match) as e:
        read_triples(d)
    assert e.value.line == line
    assert e.value.file is not None


def test_type_errors(tmp_path):
    bad_rel = TYPED_TRAIN + "pin:7\tengaged\tpin:10\n"
    with pytest.raises(DataError, match="head type 'pin' here but 'user' on line 1") as e:
        read_triples(_typed(tmp_path / "a", train_txt=bad_rel))
    assert e.value.line == 6 and e.value.file.endswith("train.txt")
    with pytest.raises(DataError, match="'user:5' has no type") as e:
        read_triples(_typed(tmp_path / "b", train_txt=TYPED_TRAIN + "user:5\tengaged\tpin:7\n"))
    assert e.value.line == 6
    with pytest.raises(DataError, match="type 'pin' here but 'user' on line 1") as e:
        read_triples(_typed(tmp_path / "c", entity_types_tsv=TYPES + "user:1\tpin\n"))
    assert e.value.file.endswith("entity_types.tsv") and e.value.line == 7
    # A valid triple whose types contradict train's relation types.
    with pytest.raises(DataError, match="tail type 'advertiser' here") as e:
        read_triples(_typed(tmp_path / "d", valid_txt="user:1\tengaged\tadvertiser:3\n"))
    assert e.value.file.endswith("valid.txt") and e.value.line == 1


def test_a_type_with_no_train_entity_gets_no_table(tmp_path):
    """entity_types.tsv (or valid/test) may name a type train.txt never uses: it gets no
    zero-row table (training failed on TableSpec rows=0); its triples are unseen."""
    types = TYPES + "board:4\tboard\n"
    d = _typed(tmp_path, entity_types_tsv=types,
               test_txt="pin:10\towned_by\tadvertiser:3\nuser:1\tsaved_to\tboard:4\n")
    with pytest.warns(UserWarning) as caught:
        kg = read_triples(d, unseen="skip")
    messages = " | ".join(str(w.message) for w in caught)
    assert "type(s) ['board'] have no entity in train" in messages
    assert "skipped 1 triples" in messages
    assert kg.entity_types == ("advertiser", "pin", "user") and "board" not in kg.vocabs
    assert kg.skipped == {"test": 1}
    np.testing.assert_array_equal(kg.splits["test"], [[1, 1, 0]])


def test_unseen_skip_reports_count(tmp_path):
    d = _write(tmp_path / "s", train_txt="a\tr\tb\nb\tr\tc\n",
               valid_txt="a\tr\tc\nz\tr\ta\na\tq\tb\n")
    with pytest.warns(UserWarning, match="skipped 2 triples"):
        kg = read_triples(d, unseen="skip")
    assert kg.skipped == {"valid": 2}
    np.testing.assert_array_equal(kg.splits["valid"], [[0, 0, 2]])


def test_filter_index_exact(tmp_path):
    d = _write(tmp_path / "f", train_txt="a\tr\tb\na\tr\tc\nb\tr\tc\nb\ts\ta\n",
               test_txt="a\tr\ta\n")
    kg = read_triples(d)  # rows: a=0 b=1 c=2; relations r=0 s=1
    idx = kg.filter_index()
    assert isinstance(idx, TripleIndex) and idx.num_triples == 5
    # Tail queries (a, r, ?) -> {a, b, c}; (b, r, ?) -> {c}; (c, s, ?) -> {}.
    ans = idx.answers(side="tail", anchor=[0, 1, 2], rel=[0, 0, 1])
    assert [sorted(x for x in row if x >= 0) for row in ans.tolist()] == [[0, 1, 2], [2], []]
    ans_t = idx.answers(side="tail", anchor=[0], rel=[0], target=[1])
    assert sorted(x for x in ans_t[0].tolist() if x >= 0) == [0, 2]
    # Head queries (?, r, c) -> {a, b}; (?, s, a) -> {b}.
    q, a = idx.answer_pairs(side="head", anchor=[2, 0], rel=[0, 1])
    assert q.tolist() == [0, 0, 1] and a.tolist() == [0, 1, 1]
    mask = idx.mask(side="tail", anchor=[1], rel=[0], num_rows=3)
    np.testing.assert_array_equal(mask, [[False, False, True]])
    np.testing.assert_array_equal(idx.contains([0, 0, 2], [0, 1, 0], [1, 1, 0]),
                                  [True, False, False])
    # Filtered rank of (b, r, c): scores over all 3 tails, target c masked with the rest.
    scores = np.array([[0.9, 0.1, 0.5]])
    raw = metrics.realistic_rank(scores[:, 2], scores, np.eye(3, dtype=bool)[[2]])
    filt = metrics.realistic_rank(scores[:, 2], scores, mask)
    assert raw.tolist() == [2.0] and filt.tolist() == [2.0]
    mask_a = idx.mask(side="tail", anchor=[0], rel=[0], num_rows=3)  # (a, r, b)
    assert metrics.realistic_rank(np.array([0.1]), scores, mask_a).tolist() == [1.0]
    train_only = kg.filter_index(["train"])
    assert not train_only.contains([0], [0], [0])[0]


def test_triple_index_random_against_sets():
    rng = np.random.default_rng(0)
    t3 = np.stack([rng.integers(0, 20, 300), rng.integers(0, 4, 300),
                   rng.integers(0, 20, 300)], axis=1)
    idx = TripleIndex(t3, max_rows=20)
    truth = {}
    for h, r, t in t3.tolist():
        truth.setdefault((h, r), set()).add(t)
    anchor, rel = rng.integers(0, 20, 50), rng.integers(0, 4, 50)
    mask = idx.mask(side="tail", anchor=anchor, rel=rel, num_rows=20)
    for i, (h, r) in enumerate(zip(anchor.tolist(), rel.tolist(), strict=True)):
        assert set(np.flatnonzero(mask[i]).tolist()) == truth.get((h, r), set())


def test_a_byte_order_mark_is_not_part_of_the_first_entity(tmp_path):
    d = tmp_path / "kg"
    d.mkdir()
    (d / "train.txt").write_bytes("e98\tr\te1\ne1\tr\te98\n".encode("utf-8-sig"))
    (d / "test.txt").write_bytes("e1\tr\te98\n".encode("utf-8-sig"))
    (d / "entity_types.tsv").write_bytes("e98\tthing\ne1\tthing\n".encode("utf-8-sig"))
    kg = read_triples(d)
    assert kg.vocabs["thing"].ids.tolist() == ["e1", "e98"]
    np.testing.assert_array_equal(kg.splits["test"], [[0, 0, 1]])


def test_two_byte_order_marks_are_not_part_of_the_first_entity(tmp_path):
    """A file re-saved by two tools that each add a mark: the first entity was '\\ufeffe98'."""
    d = _write(tmp_path / "kg", train_txt="\ufeff\ufeffe98\tr\te1\ne1\tr\te98\n",
               entity_types_tsv="\ufeff\ufeffe98\tthing\ne1\tthing\n")
    kg = read_triples(d)
    assert kg.vocabs["thing"].ids.tolist() == ["e1", "e98"]
    np.testing.assert_array_equal(kg.splits["train"], [[1, 0, 0], [0, 0, 1]])


@pytest.mark.parametrize("blank", ["", "\n"])  # vectorised path, line-by-line path
def test_a_header_line_is_skipped_and_lines_keep_their_numbers(tmp_path, blank):
    """A first line 'head relation tail' (an export with column names) was read as a
    triple: a relation 'relation' between entities 'head' and 'tail'."""
    d = _write(tmp_path / "kg", train_txt=f"{blank}head\trelation\ttail\na\tr\tb\nb\tr\thead\n",
               valid_txt="Subject\tPredicate\tObject\na\tr\tb\n",
               test_txt=f"HEAD\tRelation\tTail\n{blank}a\tr\tzz\n",
               entity_types_tsv="entity\ttype\na\tx\nb\tx\nhead\tx\nzz\tx\n")
    e = _err(lambda: read_triples(d))  # the error after the header names the file's line
    assert str(e) == (f"{d / 'test.txt'}:{2 + len(blank)}: entity 'zz' does not occur in "
                      "train.txt (pass unseen='skip' to drop such triples)")
    with pytest.warns(UserWarning, match="skipped 1 triples"):
        kg = read_triples(d, unseen="skip")
    assert kg.relations == ("r",) and kg.vocabs["x"].ids.tolist() == ["a", "b", "head"]
    np.testing.assert_array_equal(kg.splits["train"], [[0, 0, 1], [1, 0, 2]])
    np.testing.assert_array_equal(kg.splits["valid"], [[0, 0, 1]])
    _write(d, valid_txt="head\trelation\ttail\n\n")
    e = _err(lambda: read_triples(d, unseen="skip"))
    assert str(e) == f"{d / 'valid.txt'}:1: empty file: a header line 'head\\trelation\\ttail' and no line after it"


@pytest.mark.parametrize("blank", ["", "\n"])  # vectorised path, line-by-line path
def test_whitespace_around_a_field_is_not_part_of_it(tmp_path, blank):
    # "a " and "a" were two entities (and "user:12 " kept the user type's ids strings).
    d = _write(tmp_path / "kg", train_txt=f"user:12 \tengaged\tpin:1\n{blank}"
               "user:12\t engaged\tpin:2\xa0\nuser:3\tengaged \tpin:1\n",
               test_txt="user:3\tengaged\t pin:2\n",
               entity_types_tsv="user:12 \tuser\nuser:3\t user\npin:1\tpin\npin:2\tpin\n")
    kg = read_triples(d)
    assert kg.relations == ("engaged",)
    assert kg.vocabs["user"].ids.tolist() == [3, 12]
    assert kg.vocabs["pin"].ids.tolist() == [1, 2]
    np.testing.assert_array_equal(kg.splits["train"], [[1, 0, 0], [1, 0, 1], [0, 0, 0]])
    np.testing.assert_array_equal(kg.splits["test"], [[0, 0, 1]])


@pytest.mark.parametrize("pad", [" ", "\x0b", "\x0c", "\x1f"])
def test_ascii_padding_is_found_without_the_regex_pass(tmp_path, pad):
    """The fast path skips the padding regexes when the text holds no whitespace but
    tabs and newlines (kg._may_pad); every ASCII character strip() removes must count."""
    from jax_recsys.data import kg as kg_lib

    assert set(kg_lib._ASCII_SPACES) == {
        chr(i) for i in range(128) if chr(i).isspace() and chr(i) not in "\t\n\r"}
    kg = read_triples(_write(tmp_path / "kg", train_txt=f"a{pad}\tr\tb\nb\tr\ta\n"))
    assert kg.vocabs["entity"].ids.tolist() == ["a", "b"]
    np.testing.assert_array_equal(kg.splits["train"], [[0, 0, 1], [1, 0, 0]])


@pytest.mark.parametrize("files,bad", [
    (dict(train_txt="a\tr\tb\r\na\tr\tb\x00\n"), "train.txt"),
    (dict(train_txt="a\tr\tb\n", entity_types_tsv="a\tt\nb\x00\tt\n"), "entity_types.tsv"),
])
def test_a_nul_character_names_the_line(tmp_path, files, bad):
    # NumPy strings drop trailing NULs: "b\x00" and "b" were one entity.
    with pytest.raises(DataError, match="NUL character") as e:
        read_triples(_write(tmp_path / "kg", **files))
    assert e.value.line == 2 and e.value.file == str(tmp_path / "kg" / bad)


def test_an_unreadable_triple_file_names_the_file_and_line(tmp_path):
    # Not UTF-8: was "train.txt: not UTF-8 text: invalid start byte", without the line.
    d = _write(tmp_path / "kg", train_txt="a\tr\tb\n")
    (d / "valid.txt").write_bytes("a\tr\tb\nM\xfcnchen\tr\ta\n".encode("latin-1"))
    with pytest.raises(DataError) as e:
        read_triples(d)
    assert (e.value.file, e.value.line) == (str(d / "valid.txt"), 2)
    assert str(e.value).endswith(": not UTF-8 text: invalid start byte (byte 7)")
    # UTF-16 (a spreadsheet's "Unicode text"): said so.
    (d / "valid.txt").write_bytes("a\tr\tb\n".encode("utf-16"))
    with pytest.raises(DataError, match=r"valid.txt:1: UTF-16 text .*: save it as UTF-8"):
        read_triples(d)
    # A folder named test.txt: was an IsADirectoryError traceback.
    (d / "valid.txt").unlink()
    (d / "test.txt").mkdir()
    with pytest.raises(DataError, match=r"test.txt: cannot read: Is a directory"):
        read_triples(d)
