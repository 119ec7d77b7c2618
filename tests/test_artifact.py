"""Tests for jax_recsys.quant.artifact: write/load round trip and refusal of bad artifacts."""

import hashlib
import json
import os
import re

import numpy as np
import pytest

from jax_recsys.quant import artifact, rowwise


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    tables = {
        "user": rng.standard_normal((20, 8)).astype(np.float32),
        "pin": rng.standard_normal((11, 5)).astype(np.float32),
    }
    vocabs = {"user": np.arange(100, 120, dtype=np.int64), "pin": np.array([f"p{i}" for i in range(11)])}
    params = {"mlp/layers/0/kernel": rng.standard_normal((4, 3)).astype(np.float32),
              "mlp/layers/0/bias": np.zeros(3, np.float32)}
    return tables, vocabs, params


def _write(path, seed=0, **kw):
    tables, vocabs, params = _inputs(seed)
    return artifact.write_artifact(
        path, tables=tables, vocabs=vocabs, ranker_config={"hidden": [4, 3]},
        ranker_params=params, report={"auc_delta": -0.0001}, chunk_rows=7, **kw,
    )


def test_roundtrip(tmp_path):
    tables, vocabs, params = _inputs()
    m = _write(tmp_path / "art")
    assert len(m.version) == 16 and int(m.version, 16) >= 0
    assert m["tables"]["user"] == {
        "rows": 20, "dim": 8, "dtype": "int4", "scale_dtype": "float16",
        "files": {"codes": "tables/user.codes.npy", "scale": "tables/user.scale.npy",
                  "bias": "tables/user.bias.npy", "vocab": "vocab/user.npy"},
    }
    assert m.format_version == 2
    assert m.version == artifact.compute_version(m.files, tables=m.tables, ranker=m.ranker)
    art = artifact.load_artifact(tmp_path / "art", expected_version=m.version)
    assert art.version == m.version and art.manifest == m
    # Tables are mmap'd, read-only, and equal to one-shot quantization.
    assert isinstance(art.tables["user"].codes, np.memmap)
    ref = rowwise.quantize_rows(tables["user"], bits=4)
    np.testing.assert_array_equal(art.tables["user"].codes, ref.codes)
    rows = np.array([19, 0, 3])
    np.testing.assert_array_equal(art.lookup("user", rows), rowwise.dequantize_rows(ref, rows))
    np.testing.assert_allclose(art.lookup("pin", np.arange(11)), tables["pin"], atol=0.35)
    np.testing.assert_array_equal(art.vocabs["pin"], vocabs["pin"])
    np.testing.assert_array_equal(art.vocabs["user"], vocabs["user"])
    assert art.ranker_config == {"hidden": [4, 3]}
    for k, v in params.items():
        np.testing.assert_array_equal(art.ranker_params[k], v)
    assert art.manifest.report == {"auc_delta": -0.0001}
    # Plain numpy can read every file without pickle.
    for rel in m.files:
        if rel.endswith(".npy"):
            np.load(tmp_path / "art" / rel, mmap_mode="r", allow_pickle=False)


def test_table_names_that_are_not_file_names(tmp_path):
    """Table names are the ranker's entities, which may be a graph's entity types
    ('/people/person'): write_artifact refused every name that was not a plain file
    name, so such a ranker could not be exported. They are stored as _<index> now and
    load under their names."""
    names = ["/people/person", "a/b", "../../x", "User", "user", "pin"]
    tables = {n: np.full((2, 3), i, np.float32) for i, n in enumerate(names)}
    vocabs = {n: np.array([10 * i, 10 * i + 1]) for i, n in enumerate(names)}
    m = artifact.write_artifact(tmp_path / "wd" / "art", tables=tables, vocabs=vocabs)
    assert sorted(p.name for p in (tmp_path / "wd").iterdir()) == ["art"]
    assert m.tables["/people/person"]["files"] == {
        "codes": "tables/_1.codes.npy", "scale": "tables/_1.scale.npy",
        "bias": "tables/_1.bias.npy", "vocab": "vocab/_1.npy"}  # sorted: after "../../x"
    assert sorted(p.name for p in (tmp_path / "wd" / "art" / "vocab").iterdir()) == [
        "_0.npy", "_1.npy", "_2.npy", "_3.npy", "_5.npy", "pin.npy"]
    art = artifact.load_artifact(tmp_path / "wd" / "art")
    for i, n in enumerate(names):
        np.testing.assert_array_equal(art.lookup(n, np.array([1, 0])), np.full((2, 3), i))
        np.testing.assert_array_equal(art.vocabs[n], [10 * i, 10 * i + 1])


def test_parameters_differing_only_in_case_get_their_own_files(tmp_path):
    # The LayerNorm leaves of entities 'User' and 'user' were stored as
    # norms_User_scale.npy and norms_user_scale.npy: one file on macOS, the second
    # written over the first.
    params = {"norms/User/scale": np.ones(2, np.float32), "norms/user/scale": np.zeros(2, np.float32)}
    m = artifact.write_artifact(tmp_path / "art", tables={}, vocabs={}, ranker_params=params)
    assert m.ranker["params"] == {"norms/User/scale": "ranker/params/norms_User_scale.npy",
                                  "norms/user/scale": "ranker/params/norms_user_scale_1.npy"}
    art = artifact.load_artifact(tmp_path / "art")
    for k, v in params.items():
        np.testing.assert_array_equal(art.ranker_params[k], v)


def test_version_is_content_derived_and_write_is_idempotent(tmp_path):
    m1 = _write(tmp_path / "a")
    m2 = _write(tmp_path / "b")
    assert m1.version == m2.version
    assert _write(tmp_path / "a").version == m1.version  # same content: no error
    m3 = _write(tmp_path / "c", seed=1)
    assert m3.version != m1.version
    with pytest.raises(artifact.ArtifactError, match=f"already holds artifact version {m1.version}"):
        _write(tmp_path / "a", seed=1)
    assert artifact.load_artifact(tmp_path / "a").version == m1.version
    m4 = _write(tmp_path / "a", seed=1, overwrite=True)
    assert artifact.load_artifact(tmp_path / "a").version == m4.version == m3.version
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]


def test_overwrite_replaces_only_an_artifact_or_an_empty_folder(tmp_path):
    """overwrite=True used to swap away whatever folder it was given (a training run,
    a dataset, a user's files) and delete it."""
    mine = tmp_path / "mine"
    (mine / "src").mkdir(parents=True)
    (mine / "notes.txt").write_text("my notes")
    (mine / "src" / "a.py").write_text("print(1)")
    for overwrite in (False, True):
        with pytest.raises(artifact.ArtifactError, match=re.escape(
                f"{mine} is not a serving artifact (no manifest.json) and not empty: it holds "
                "notes.txt, src/; refusing to replace it")):
            _write(mine, overwrite=overwrite)
    (mine / "manifest.json").write_text("{}")  # a manifest.json that is no artifact's
    with pytest.raises(artifact.ArtifactError, match="missing key 'format_version'.*notes.txt"):
        _write(mine, overwrite=True)
    assert (mine / "notes.txt").read_text() == "my notes"
    assert (mine / "src" / "a.py").read_text() == "print(1)"
    (tmp_path / "file").write_text("x")
    with pytest.raises(artifact.ArtifactError, match="exists and is not a folder"):
        _write(tmp_path / "file", overwrite=True)
    assert (tmp_path / "file").read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "mine"]  # nothing staged left
    # An empty folder, and an artifact of another version (even a damaged one), are replaced.
    (tmp_path / "empty").mkdir()
    m = _write(tmp_path / "empty", overwrite=True)
    assert artifact.check_replaceable(tmp_path / "empty").version == m.version
    (tmp_path / "empty" / "tables" / "user.codes.npy").write_bytes(b"")
    assert _write(tmp_path / "empty", seed=1, overwrite=True).version != m.version
    m2 = _write(tmp_path / "seed2", seed=2)
    artifact.verify_artifact(tmp_path / "empty")
    assert artifact.check_replaceable(tmp_path / "nothing") is None
    # A damaged manifest (truncated, or a format this version does not read) in a
    # folder holding only an artifact's entries: a damaged artifact, replaced too.
    art = tmp_path / "empty"
    text = (art / "manifest.json").read_text()
    for damaged in (text[: len(text) // 2],
                    json.dumps({**json.loads(text), "format_version": 99})):
        (art / "manifest.json").write_text(damaged)
        assert artifact.check_replaceable(art) is None
        assert _write(art, seed=2, overwrite=True).version == m2.version
        artifact.verify_artifact(art)
    # ... but not with anything else beside it, nor a sound artifact with files put
    # beside its own (e.g. metrics.json of `export_int4 --workdir=ART`).
    (art / "notes.txt").write_text("mine")
    with pytest.raises(artifact.ArtifactError, match=re.escape(
            f"{art} is a serving artifact but also holds notes.txt, which replacing it "
            "would delete")):
        _write(art, seed=3, overwrite=True)
    assert _write(art, seed=2, overwrite=True).version == m2.version  # the same: kept as is
    assert (art / "notes.txt").read_text() == "mine"
    (art / "manifest.json").write_text("{")
    with pytest.raises(artifact.ArtifactError, match="not valid JSON.*notes.txt"):
        _write(art, overwrite=True)
    assert (art / "notes.txt").read_text() == "mine"


def test_an_output_below_a_file_is_refused_before_any_work(tmp_path):
    # check_replaceable let it pass: export_int4 (with --report elsewhere) loaded the
    # ranker and the test data, then stopped with "[Errno 17] File exists: '.../afile'".
    (tmp_path / "afile").write_text("x")
    for out in (tmp_path / "afile" / "art", tmp_path / "afile" / "x" / "art"):
        with pytest.raises(artifact.ArtifactError, match=re.escape(
                f"{out} cannot be created: {tmp_path / 'afile'} exists and is not a folder")):
            artifact.check_replaceable(out, swap=False)
    assert artifact.check_replaceable(tmp_path / "new" / "art", swap=False) is None


def test_a_symlink_output_is_refused_and_left_a_link(tmp_path):
    """Writing to a symlink ART (the README's rollout scheme: `ln -sfn NEW ART`) used to
    replace the link with a folder: refused, whatever it points at, with or without
    overwrite."""
    a = _write(tmp_path / "a")
    (tmp_path / "ART").symlink_to(tmp_path / "a")
    (tmp_path / "dangling").symlink_to(tmp_path / "none")
    for link, seed, overwrite in (("ART", 0, False), ("ART", 1, False), ("ART", 1, True),
                                  ("dangling", 0, True)):
        target = os.readlink(tmp_path / link)
        with pytest.raises(artifact.ArtifactError, match=re.escape(
                f"{tmp_path / link} is a symlink to {target}: writing the artifact would "
                "replace the link with a folder; write to a new folder, then point the link "
                f"at it: ln -sfn NEW {tmp_path / link}")):
            _write(tmp_path / link, seed=seed, overwrite=overwrite)
        with pytest.raises(artifact.ArtifactError, match="is a symlink to"):
            artifact.check_replaceable(tmp_path / link, swap=False)
    assert os.readlink(tmp_path / "ART") == str(tmp_path / "a")
    assert artifact.verify_artifact(tmp_path / "a", mode="full").version == a.version
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ART", "a", "dangling"]


def test_prequantized_int8_and_fp32_tables(tmp_path):
    tables, vocabs, _ = _inputs()
    q8 = rowwise.quantize_rows(tables["user"], bits=8)
    m = artifact.write_artifact(tmp_path / "x", tables={"user": q8, "pin": tables["pin"]},
                                vocabs=vocabs, bits=32)
    assert m.tables["user"]["dtype"] == "int8" and m.tables["pin"]["dtype"] == "float32"
    art = artifact.load_artifact(tmp_path / "x")
    np.testing.assert_array_equal(art.lookup("pin", np.arange(11)), tables["pin"])
    np.testing.assert_array_equal(art.lookup("user", np.arange(20)), rowwise.dequantize_rows(q8))
    assert art.ranker_config is None and art.ranker_params == {}


def test_prequantized_tables_the_manifest_could_not_describe_are_refused(tmp_path):
    # Both were written, and the artifact then failed to load: 't.codes.npy: dtype
    # float64, manifest says float32' and 't.bias.npy: dtype float16, manifest says float64'.
    fp64 = rowwise.QuantizedTable(codes=np.zeros((2, 3)), scale=None, bias=None, dim=3, bits=32)
    mixed = rowwise.QuantizedTable(codes=np.zeros((2, 2), np.uint8), scale=np.ones(2),
                                   bias=np.zeros(2, np.float16), dim=3, bits=4)
    for q, message in ((fp64, "table 't': an unquantized (bits=32) table's rows must be "
                        "float32, got float64"),
                       (mixed, "table 't': scale (float64) and bias (float16) must have one dtype")):
        with pytest.raises(ValueError, match=re.escape(message)):
            artifact.write_artifact(tmp_path / "art", tables={"t": q}, vocabs={"t": np.arange(2)})
        assert list(tmp_path.iterdir()) == []


def test_truncated_file_refused(tmp_path):
    _write(tmp_path / "art")
    f = tmp_path / "art" / "tables" / "user.codes.npy"
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size - 10)
    for verify in (True, "sizes"):
        with pytest.raises(artifact.ArtifactError, match=r"user\.codes\.npy.*(size|truncated)"):
            artifact.load_artifact(tmp_path / "art", verify=verify)
    with pytest.raises(artifact.ArtifactError, match=r"user\.codes\.npy.*truncated"):
        artifact.load_artifact(tmp_path / "art", verify=False)


def test_checksum_mismatch_refused(tmp_path):
    _write(tmp_path / "art")
    f = tmp_path / "art" / "tables" / "pin.scale.npy"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    artifact.verify_artifact(tmp_path / "art", mode="sizes")  # same size: the fast mode passes
    with pytest.raises(artifact.ArtifactError, match=r"pin\.scale\.npy: sha256 mismatch"):
        artifact.verify_artifact(tmp_path / "art")
    with pytest.raises(artifact.ArtifactError, match=r"pin\.scale\.npy: sha256 mismatch"):
        artifact.load_artifact(tmp_path / "art")


def test_missing_table_file_refused(tmp_path):
    _write(tmp_path / "art")
    os.remove(tmp_path / "art" / "tables" / "pin.bias.npy")
    for verify in (True, "sizes", False):
        with pytest.raises(artifact.ArtifactError, match=r"pin\.bias\.npy: missing"):
            artifact.load_artifact(tmp_path / "art", verify=verify)


def test_manifest_edits_refused(tmp_path):
    m = _write(tmp_path / "art")
    mpath = tmp_path / "art" / "manifest.json"
    edited = json.loads(mpath.read_text())
    edited["tables"]["ghost"] = dict(edited["tables"]["pin"])
    edited["tables"]["ghost"]["files"] = {k: v.replace("pin", "ghost") for k, v in edited["tables"]["pin"]["files"].items()}
    mpath.write_text(json.dumps(edited))
    with pytest.raises(artifact.ArtifactError, match="version .* was edited"):
        artifact.load_artifact(tmp_path / "art")
    # ... and with the version recomputed, the files it names are not in the list.
    edited["version"] = artifact.compute_version(
        edited["files"], tables=edited["tables"], ranker=edited["ranker"])
    mpath.write_text(json.dumps(edited))
    with pytest.raises(artifact.ArtifactError, match=r"ghost\.(codes|scale|bias)\.npy which has no checksum entry"):
        artifact.load_artifact(tmp_path / "art")
    with pytest.raises(artifact.ArtifactError, match=r"ghost\.codes\.npy: missing"):
        artifact.load_artifact(tmp_path / "art", verify=False)
    # Declared shape differs from the file (the version recomputed: checked without
    # any file check too).
    mpath.write_text(json.dumps(m))
    _forge(tmp_path / "art", lambda d: d["tables"]["pin"].update(rows=12))
    with pytest.raises(artifact.ArtifactError, match=r"pin\.codes\.npy: shape \(11, 3\), manifest says \(12, 3\)"):
        artifact.load_artifact(tmp_path / "art", verify=False)
    # Changed hash list without a new version id.
    edited = json.loads(json.dumps(m))
    edited["files"]["vocab/pin.npy"] = "0" * 64
    mpath.write_text(json.dumps(edited))
    with pytest.raises(artifact.ArtifactError, match="manifest.json: version .* was edited"):
        artifact.verify_artifact(tmp_path / "art", mode="sizes")


def test_version_covers_what_the_manifest_says_of_the_files(tmp_path):
    """A table's dim (odd and even INT4 dims pack alike) or which file holds which
    parameter are part of the version: editing them is refused like a hash edit."""
    m = _write(tmp_path / "art")
    mpath = tmp_path / "art" / "manifest.json"
    for edit in ("dim", "params"):
        edited = json.loads(json.dumps(m))
        if edit == "dim":
            edited["tables"]["pin"]["dim"] = 6  # 5 and 6 both pack into 3 bytes a row
        else:
            p = edited["ranker"]["params"]
            p["mlp/layers/0/kernel"], p["mlp/layers/0/bias"] = (
                p["mlp/layers/0/bias"], p["mlp/layers/0/kernel"])
        mpath.write_text(json.dumps(edited))
        for mode in ("sizes", "full"):
            with pytest.raises(artifact.ArtifactError, match="version .* was edited"):
                artifact.verify_artifact(tmp_path / "art", mode=mode)
        # Without any file check too (serve_* --verify=none): a dim 6 table loaded under
        # the version of the dim 5 one. The check reads the manifest only.
        for verify in (False, "sizes", True):
            with pytest.raises(artifact.ArtifactError, match=f"version {m.version} does not "
                               "match the recorded file hashes and tables .*; the manifest was edited"):
                artifact.load_artifact(tmp_path / "art", verify=verify)
    # Format 1 artifacts (version over the file hashes only) still load.
    old = json.loads(json.dumps(m))
    old["format_version"] = 1
    old["version"] = artifact.compute_version(old["files"])
    mpath.write_text(json.dumps(old))
    art = artifact.load_artifact(tmp_path / "art")
    assert art.version == old["version"] != m.version
    np.testing.assert_array_equal(art.lookup("user", [3]), artifact.load_artifact(
        tmp_path / "art", verify=False).lookup("user", [3]))
    old["format_version"] = 3
    mpath.write_text(json.dumps(old))
    with pytest.raises(artifact.ArtifactError, match=r"format_version 3 is not supported"):
        artifact.load_artifact(tmp_path / "art")


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.update(tables=[1, 2]), "'tables' must map names"),
        (lambda d: d.update(files={"a": 1}), "'files' must map relative paths"),
        (lambda d: d.update(sizes=[3]), "'sizes' must map relative paths"),
        (lambda d: d.update(ranker=7), "'ranker' must be null"),
        (lambda d: d["tables"]["pin"].update(scale_dtype="flaot16"), "table 'pin' has a malformed"),
        (lambda d: d["tables"]["pin"].update(rows=None), "table 'pin' has a malformed"),
        # JSON's 1e999 reads as infinity: an OverflowError traceback (int(inf))
        (lambda d: d["tables"]["pin"].update(rows=float("inf")), "table 'pin' has a malformed"),
    ],
)
def test_malformed_manifest_entries_give_artifact_errors(tmp_path, edit, message):
    _write(tmp_path / "art")
    _forge(tmp_path / "art", edit)  # the version recomputed: the entry itself is refused
    with pytest.raises(artifact.ArtifactError, match=message):
        artifact.load_artifact(tmp_path / "art", verify=False)


def _forge(path, edit):
    """Edits the manifest at `path` and records the version its new content gives, as
    a hand-edited (or forged) manifest would: the version check cannot see the edit."""
    mpath = path / "manifest.json"
    m = json.loads(mpath.read_text())
    edit(m)
    m["version"] = artifact.compute_version(m["files"], tables=m["tables"], ranker=m["ranker"])
    mpath.write_text(json.dumps(m))


def _name_outside(where, rel, digest, size):
    def edit(m):
        if where == "vocab":
            m["tables"]["pin"]["files"]["vocab"] = rel
        else:
            m["ranker"]["params"]["mlp/layers/0/bias"] = rel
        m["files"][rel], m["sizes"][rel] = digest, size
    return edit


@pytest.mark.parametrize("where", ["vocab", "param"])
@pytest.mark.parametrize("absolute", [False, True])
def test_a_manifest_naming_a_file_outside_the_artifact_is_refused(tmp_path, where, absolute):
    """A manifest path is joined to the artifact folder: "../x.npy" and an absolute
    "/abs/x.npy" (which replaces the folder in the join) were hashed and loaded from
    outside the folder by every verify mode: the servers served those ids/params."""
    _write(tmp_path / "art")
    outside = tmp_path / "outside.npy"
    np.save(outside, np.arange(11) + 1000 if where == "vocab" else np.ones(3, np.float32))
    rel = str(outside) if absolute else "../outside.npy"
    digest = hashlib.sha256(outside.read_bytes()).hexdigest()
    _forge(tmp_path / "art", _name_outside(where, rel, digest, outside.stat().st_size))
    for verify in (True, "sizes", False):
        with pytest.raises(artifact.ArtifactError,
                           match=rf"'files' names '{re.escape(rel)}', not a relative path of a "
                                 "file inside the artifact folder"):
            artifact.load_artifact(tmp_path / "art", verify=verify)


@pytest.mark.parametrize("link", ["vocab/pin.npy", "vocab"])
def test_a_symlink_in_the_artifact_that_leads_outside_it_is_refused(tmp_path, link):
    """The check read only the manifest's text: vocab/pin.npy (or the folder vocab) made
    a symlink to a copy outside the folder passed every verify mode (same bytes, same
    hashes), and the servers then read whatever that outside file came to hold."""
    art = tmp_path / "art"
    _write(art)
    outside = tmp_path / "elsewhere"
    os.rename(art / link, outside)
    os.symlink(outside, art / link)
    target = outside if link == "vocab/pin.npy" else outside / "pin.npy"
    current = tmp_path / "current"  # the folder given through a link, as deployed: fine
    current.symlink_to(art)
    for verify in (True, "sizes", False):
        with pytest.raises(artifact.ArtifactError, match=re.escape(
                f"{current / 'manifest.json'}: 'files' names 'vocab/pin.npy', which a symlink "
                f"leads outside the artifact folder (to {os.path.realpath(target)}); an artifact holds its own files: put the file itself "
                "there, or export the artifact again")):
            artifact.load_artifact(current, verify=verify)


def test_symlinks_that_stay_inside_the_artifact_are_read(tmp_path):
    art = tmp_path / "art"
    m = _write(art)
    os.rename(art / "vocab" / "pin.npy", art / "pin_vocab.npy")
    os.symlink("../pin_vocab.npy", art / "vocab" / "pin.npy")  # relative, inside
    current = tmp_path / "current"
    current.symlink_to(art)
    loaded = artifact.load_artifact(current, verify=True)
    assert loaded.version == m.version
    np.testing.assert_array_equal(loaded.vocabs["pin"], _inputs(0)[1]["pin"])


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["ranker"].update(config=7), "the ranker's config names 7"),
    (lambda m: m["ranker"]["params"].update({"mlp/layers/0/bias": 7}),
     "ranker param 'mlp/layers/0/bias' names 7"),
    (lambda m: m["tables"]["pin"]["files"].update(vocab=["vocab/pin.npy"]),
     r"table 'pin' names \['vocab/pin\.npy'\]"),
])
def test_a_manifest_path_that_is_not_a_string_is_an_artifact_error(tmp_path, edit, message):
    # verify's sorted() of the paths, or the join of folder and path, raised a TypeError
    # ('<' not supported between instances of 'int' and 'str'): a traceback from
    # serve_embeddings / serve_ranker instead of their one-line start-up error.
    _write(tmp_path / "art")
    _forge(tmp_path / "art", edit)
    for verify in (True, "sizes", False):
        with pytest.raises(artifact.ArtifactError, match=message):
            artifact.load_artifact(tmp_path / "art", verify=verify)


def test_parameter_files_named_otherwise_load_by_the_manifest(tmp_path):
    """Readers take each file from the manifest, never from a name: an artifact whose
    parameter files are named another way (as the saved ranker named them before,
    <leaf with / -> .>.npy) loads with the right values."""
    tables, vocabs, params = _inputs()
    m = _write(tmp_path / "art")
    root = tmp_path / "art"
    moved = {}
    for leaf, rel in m.ranker["params"].items():
        moved[leaf] = "ranker/params/" + leaf.replace("/", ".") + ".npy"
        os.rename(root / rel, root / moved[leaf])

    def edit(d):
        for leaf, rel in d["ranker"]["params"].items():
            d["files"][moved[leaf]] = d["files"].pop(rel)
            d["sizes"][moved[leaf]] = d["sizes"].pop(rel)
        d["ranker"]["params"] = moved
    _forge(root, edit)
    art = artifact.load_artifact(root)
    assert art.manifest.ranker["params"]["mlp/layers/0/kernel"] == "ranker/params/mlp.layers.0.kernel.npy"
    for k, v in params.items():
        np.testing.assert_array_equal(art.ranker_params[k], v)


@pytest.mark.parametrize("verify", ["sizes", False])
def test_a_damaged_ranker_config_of_the_same_size_is_an_artifact_error(tmp_path, verify):
    # The servers start with verify="sizes", which cannot see a same-size change: bytes
    # that are not UTF-8 ended in a UnicodeDecodeError traceback naming no file.
    _write(tmp_path / "art")
    f = tmp_path / "art" / "ranker" / "config.json"
    f.write_bytes(b"\xff" * f.stat().st_size)
    with pytest.raises(artifact.ArtifactError, match=r"ranker/config\.json: not valid JSON"):
        artifact.load_artifact(tmp_path / "art", verify=verify)


def test_rewrite_repairs_damaged_files_and_keeps_the_new_report(tmp_path):
    m = _write(tmp_path / "art")
    f = tmp_path / "art" / "tables" / "user.codes.npy"
    good = f.read_bytes()
    f.write_bytes(good[:-1] + bytes([good[-1] ^ 0xFF]))  # same size: only a full check sees it
    with pytest.raises(artifact.ArtifactError, match="other or damaged files"):
        _write(tmp_path / "art")
    assert _write(tmp_path / "art", overwrite=True).version == m.version
    assert f.read_bytes() == good
    artifact.verify_artifact(tmp_path / "art")
    # Same tables, new report: the files stay (same inode), the report is the new one.
    inode = f.stat().st_ino
    tables, vocabs, params = _inputs()
    m2 = artifact.write_artifact(
        tmp_path / "art", tables=tables, vocabs=vocabs, ranker_config={"hidden": [4, 3]},
        ranker_params=params, report={"auc_delta": -0.0002, "data": "/new"}, chunk_rows=7)
    assert m2.version == m.version and m2.report == {"auc_delta": -0.0002, "data": "/new"}
    assert artifact.load_artifact(tmp_path / "art").manifest.report == m2.report
    assert f.stat().st_ino == inode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_load_retries_when_the_folder_is_swapped_while_opening(tmp_path, monkeypatch):
    """A deploy that replaces the folder between the manifest read and the file
    opens must not give one version's manifest with the other's arrays."""
    m1 = _write(tmp_path / "art")
    m2 = _write(tmp_path / "next", seed=1)
    real = artifact._load_npy
    swapped = []

    def load_npy(root, rel, **kw):
        if not swapped:  # first file of the first try: the deploy lands now
            swapped.append(True)
            os.rename(tmp_path / "art", tmp_path / "old")
            os.rename(tmp_path / "next", tmp_path / "art")
        return real(root, rel, **kw)

    monkeypatch.setattr(artifact, "_load_npy", load_npy)
    art = artifact.load_artifact(tmp_path / "art", verify=False)
    assert swapped and art.version == m2.version != m1.version
    tables, _, _ = _inputs(seed=1)
    ref = rowwise.quantize_rows(tables["user"], bits=4)
    np.testing.assert_array_equal(art.tables["user"].codes, ref.codes)

    def always_swapping(root, rel, **kw):  # a folder that never settles
        if not rel.endswith("pin.codes.npy"):  # once per try (the first file opened)
            return real(root, rel, **kw)
        nxt = tmp_path / ("old" if (tmp_path / "old").exists() else "next")
        os.rename(tmp_path / "art", tmp_path / "tmp")
        os.rename(nxt, tmp_path / "art")
        os.rename(tmp_path / "tmp", tmp_path / ("next" if nxt.name == "old" else "old"))
        return real(root, rel, **kw)

    monkeypatch.setattr(artifact, "_load_npy", always_swapping)
    with pytest.raises(artifact.ArtifactError, match="replaced by another version"):
        artifact.load_artifact(tmp_path / "art", verify=False)


def test_version_mismatch_refused(tmp_path):
    m = _write(tmp_path / "art")
    with pytest.raises(artifact.ArtifactError, match=f"manifest.json: version {m.version} does not match the expected version 0123456789abcdef"):
        artifact.load_artifact(tmp_path / "art", expected_version="0123456789abcdef")
    with pytest.raises(artifact.ArtifactError, match="manifest.json: missing"):
        artifact.load_artifact(tmp_path / "nothing")


def test_failed_write_leaves_nothing(tmp_path):
    tables, vocabs, params = _inputs()
    tables["pin"][4, 2] = np.nan
    with pytest.raises(ValueError, match="table 'pin': row 4 holds a non-finite"):  # named the row only
        artifact.write_artifact(tmp_path / "art", tables=tables, vocabs=vocabs, ranker_params=params)
    assert list(tmp_path.iterdir()) == []
    tables, vocabs, _ = _inputs()
    with pytest.raises(ValueError, match="vocab 'pin'.*rows 11"):
        artifact.write_artifact(tmp_path / "art", tables=tables, vocabs={**vocabs, "pin": np.arange(3)})
    with pytest.raises(ValueError, match="object arrays"):
        artifact.write_artifact(tmp_path / "art", tables=tables, vocabs=vocabs,
                                ranker_params={"p": np.array([None])})
    assert list(tmp_path.iterdir()) == []
    # A failure while replacing keeps the old artifact intact.
    m = _write(tmp_path / "art")
    bad = dict(tables, pin=np.full((11, 5), np.inf, np.float32))
    with pytest.raises(ValueError, match="row 0"):
        artifact.write_artifact(tmp_path / "art", tables=bad, vocabs=vocabs, overwrite=True)
    assert artifact.load_artifact(tmp_path / "art").version == m.version
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_size_report(tmp_path):
    rng = np.random.default_rng(0)
    m = artifact.write_artifact(tmp_path / "art", tables={"user": rng.standard_normal((1000, 64)).astype(np.float32)},
                                vocabs={"user": np.arange(1000)})
    rep = artifact.table_size_report(m)
    u = rep["tables"]["user"]
    assert u["bytes"] == 36_000 and u["fp32_bytes"] == 256_000 and u["fp16_bytes"] == 128_000
    assert u["ratio_vs_fp32"] == pytest.approx(0.140625) and u["ratio_vs_fp32"] <= 0.141
    assert u["ratio_vs_fp16"] == pytest.approx(0.28125)
    assert rep["total"]["bytes"] == 36_000
    # The payload arithmetic matches the files on disk up to .npy headers.
    on_disk = sum(m.sizes[f"tables/user.{k}.npy"] for k in ("codes", "scale", "bias"))
    assert 36_000 < on_disk <= 36_000 + 3 * 128
