"""Facet assembly: pretrained vectors land in the right ranker rows, by raw id."""

import dataclasses
import re

import numpy as np
import pytest

from jax_recsys.ranking import facets as F


@dataclasses.dataclass
class _Ckpt:
    tables: dict
    vocabs: dict


def test_match_rows_int_and_str_ids():
    np.testing.assert_array_equal(F.match_rows(np.array([10, 20, 30]), np.array([30, 10])), [1, -1, 0])
    # A string facet vocabulary (e.g. raw ids read from a text KG) matches integer ranker ids.
    np.testing.assert_array_equal(F.match_rows(np.array([10, 20, 30]), np.array(["30", "7"])), [-1, -1, 0])
    np.testing.assert_array_equal(F.match_rows(np.array(["a", "b"]), np.array([], dtype=np.int64)), [-1, -1])
    with pytest.raises(ValueError, match="duplicate"):
        F.match_rows(np.array([1]), np.array([3, 3]))


def test_align_puts_the_facet_vector_in_the_row_of_the_same_raw_id():
    ranker_ids = np.array([10, 20, 30, 40])
    facet_ids = np.array([40, 5, 10])
    facet_table = np.array([[4.0, 4.0], [5.0, 5.0], [1.0, -1.0]], np.float32)
    table, stats = F.align_facet_table(
        entity="user", facet="cl", ranker_ids=ranker_ids, facet_ids=facet_ids,
        facet_table=facet_table, seed=0, target_norm=None,
    )
    np.testing.assert_array_equal(table[0], [1.0, -1.0])  # raw id 10
    np.testing.assert_array_equal(table[3], [4.0, 4.0])  # raw id 40
    assert (stats.found, stats.missing, stats.rows, stats.facet_rows) == (2, 2, 4, 3)
    # Missing ids (20, 30) get fresh random rows, not copies and not zeros.
    assert not np.allclose(table[1], table[2]) and np.all(table[1:3] != 0)
    # Deterministic by seed.
    again, _ = F.align_facet_table(
        entity="user", facet="cl", ranker_ids=ranker_ids, facet_ids=facet_ids,
        facet_table=facet_table, seed=0, target_norm=None,
    )
    np.testing.assert_array_equal(table, again)


def test_align_rescales_to_the_target_mean_norm():
    facet_table = np.array([[3.0, 4.0], [0.0, 10.0]], np.float32)  # norms 5 and 10: mean 7.5
    table, stats = F.align_facet_table(
        entity="pin", facet="kg", ranker_ids=np.array([1, 2]), facet_ids=np.array([2, 1]),
        facet_table=facet_table, seed=0, target_norm=1.5,
    )
    np.testing.assert_allclose(stats.scale, 0.2)
    np.testing.assert_allclose(table, [[0.0, 2.0], [0.6, 0.8]], rtol=1e-6)


def test_facet_spec_rejects_scales_that_wipe_or_flip_the_table():
    for bad in (0.0, -1.0, float("nan"), True):
        with pytest.raises(ValueError, match=r"FacetSpec\('cl'\).target_norm must be None or"):
            F.FacetSpec(source="cl", target_norm=bad)
    with pytest.raises(ValueError, match=r"init_scale must be None or a finite number >= 0"):
        F.FacetSpec(source="scratch", init_scale=-0.1)
    assert F.FacetSpec(source="scratch", init_scale=0.0).init_scale == 0.0


def test_align_rejects_table_vocab_mismatch():
    with pytest.raises(ValueError, match="vocabulary has 2 ids"):
        F.align_facet_table(entity="user", facet="cl", ranker_ids=np.array([1]), facet_ids=np.array([1, 2]),
                            facet_table=np.zeros((3, 2)), seed=0)


def test_resolve_facets_learning_rates_modes_and_layout():
    ckpt = _Ckpt(tables={"user": np.eye(3, dtype=np.float32)}, vocabs={"user": np.array([7, 8, 9])})
    ents = (
        F.EntitySpec(name="user", column="user_id", facets=(
            F.FacetSpec(source="scratch", dim=4),
            F.FacetSpec(source="cl", mode="freeze", target_norm=None),
        )),
        F.EntitySpec(name="pin", column="item_id", facets=(F.FacetSpec(source="scratch", dim=2, learning_rate=0.3),)),
    )
    out = F.resolve_facets(
        ents, vocabs={"user": np.array([9, 1]), "pin": np.array([0, 1, 2])}, facets={"cl": ckpt},
        table_learning_rate=0.05, finetune_lr_scale=0.1, seed=0,
    )
    assert [t.name for t in out] == ["user__scratch", "user__cl", "pin__scratch"]
    assert [t.learning_rate for t in out] == pytest.approx([0.05, 0.005, 0.3])
    assert [t.trainable for t in out] == [True, False, True]
    np.testing.assert_array_equal(out[1].values[0], [0.0, 0.0, 1.0])  # raw id 9 = facet row 2
    assert out[1].stats.missing == 1
    assert F.entity_dims(out) == (("user", 7), ("pin", 2))


def test_resolve_facets_errors_name_entity_and_facet():
    ents = (F.EntitySpec(name="user", column="user_id", facets=(F.FacetSpec(source="kg"),)),)
    with pytest.raises(ValueError, match="'kg'"):
        F.resolve_facets(ents, vocabs={"user": np.array([1])}, facets={}, table_learning_rate=0.1,
                         finetune_lr_scale=0.1, seed=0)
    ckpt = _Ckpt(tables={"pin": np.zeros((1, 2))}, vocabs={"pin": np.array([1])})
    with pytest.raises(ValueError, match="no table 'user'"):
        F.resolve_facets(ents, vocabs={"user": np.array([1])}, facets={"kg": ckpt}, table_learning_rate=0.1,
                         finetune_lr_scale=0.1, seed=0)
    with pytest.raises(ValueError, match="mode"):
        F.FacetSpec(source="cl", mode="thaw")
    with pytest.raises(ValueError, match="twice"):
        F.EntitySpec(name="u", column="c", facets=(F.FacetSpec(source="cl"), F.FacetSpec(source="cl")))


def test_align_rejects_a_facet_sharing_no_id_with_the_ranker():
    # Another id space (e.g. the facet of another dataset): found == 0 of 10 rows.
    with pytest.raises(ValueError, match="facet 'cl' table 'user' shares no raw id"):
        F.align_facet_table(entity="user", facet="cl", ranker_ids=np.arange(100, 110),
                            facet_ids=np.array(["u1", "u2"]), facet_table=np.ones((2, 4)),
                            seed=0, target_norm=1.0)
    # One shared id is enough (the rest are reported as missing, not an error).
    _, stats = F.align_facet_table(entity="user", facet="cl", ranker_ids=np.arange(100, 110),
                                   facet_ids=np.array(["u1", "105"]), facet_table=np.ones((2, 4)),
                                   seed=0)
    assert (stats.found, stats.missing) == (1, 9)


def test_build_entities_attaches_facets_by_entity_name():
    ents = F.build_entities(scratch_dim=4, pretrained=("cl", "kg"),
                            available={"cl": ["user", "pin"], "kg": ["pin", "advertiser", "board"]})
    got = [(e.name, [f.source for f in e.facets]) for e in ents]
    assert got == [("user", ["scratch", "cl"]), ("pin", ["scratch", "cl", "kg"]),
                   ("advertiser", ["scratch", "kg"])]
    # scratch_dim=0 without pretrained facets: the "no large tables" ranker.
    assert F.build_entities(scratch_dim=0, pretrained=()) == ()


def test_build_entities_rejects_a_facet_covering_no_entity():
    # A KG whose entity types are item/brand: it used to train scratch-only, silently.
    with pytest.raises(ValueError, match=r"facet 'kg' was requested but covers none of the "
                       r"ranker's entities \['user', 'pin', 'advertiser'\]: its checkpoint has "
                       r"tables \['brand', 'item'\]"):
        F.build_entities(scratch_dim=4, pretrained=("kg",), available={"kg": ["item", "brand"]})
    with pytest.raises(ValueError, match="facet 'kg' was requested"):
        F.build_entities(scratch_dim=0, pretrained=("cl", "kg"),
                         available={"cl": ["user"], "kg": ["item"]})


def test_a_kg_facet_of_one_untyped_entity_table_says_where_types_come_from():
    # A KG folder of "user:12" names without entity_types.tsv trains one table "entity";
    # the message said to rename "the facet's entity types" but not how.
    with pytest.raises(ValueError, match=re.escape(
            "its checkpoint has tables ['entity']; a facet is attached by entity name, so "
            "rename the facet's entity types or the entities; a knowledge graph without "
            "entity_types.tsv has the one type 'entity': give its kg/entity_types.tsv "
            "(entity<TAB>type, types named as the entities)")):
        F.build_entities(scratch_dim=4, pretrained=("kg",), available={"kg": ["entity"]})


# ------------------------------------------------------------- rows of ids missing from a facet

_IDS, _FACET_IDS = np.array([10, 20, 30, 40]), np.array([40, 5, 10])
_FACET_TABLE = np.array([[3.0, 4.0], [5.0, 5.0], [0.0, 10.0]], np.float32)  # norms 5, 7.07, 10


def _align(**kw):
    return F.align_facet_table(entity="user", facet="cl", ranker_ids=_IDS, facet_ids=_FACET_IDS,
                               facet_table=_FACET_TABLE, seed=0, **kw)


def test_align_random_missing_rows_are_those_before_the_option():
    """The default ("random") is byte-identical to the table built before `missing` existed
    (values pinned from that code), so existing runs train on the same initial rows."""
    before = np.array([[0.0, 2.0], [-0.3522418439388275, 0.26989227533340454],
                       [-0.48027902841567993, -0.15413792431354523],
                       [0.6000000238418579, 0.800000011920929]], np.float32)
    table, stats = _align(target_norm=1.5)
    np.testing.assert_array_equal(table, before)
    np.testing.assert_array_equal(_align(target_norm=1.5, missing="random")[0], before)
    assert stats == F.AlignStats(entity="user", facet="cl", rows=4, found=2, missing=2,
                                 facet_rows=3, scale=0.2)


def test_align_zeros_gives_missing_ids_zero_rows_and_keeps_found_rows():
    # Found: raw id 10 = [0, 10], raw id 40 = [3, 4]; mean norm 7.5, target 1.5: scale 0.2.
    table, stats = _align(target_norm=1.5, missing="zeros")
    np.testing.assert_array_equal(table, np.array([[0.0, 2.0], [0.0, 0.0], [0.0, 0.0], [0.6, 0.8]],
                                                  np.float32))
    assert table.dtype == np.float32
    # Found rows and the scale are exactly those of "random" (the fresh rows do not enter
    # the scale), and so are the stats.
    random_table, random_stats = _align(target_norm=1.5)
    np.testing.assert_array_equal(table[[0, 3]], random_table[[0, 3]])
    assert stats == random_stats
    raw, raw_stats = _align(target_norm=None, missing="zeros")
    np.testing.assert_array_equal(raw, [[0.0, 10.0], [0.0, 0.0], [0.0, 0.0], [3.0, 4.0]])
    assert raw_stats.scale == 1.0 and (raw_stats.found, raw_stats.missing) == (2, 2)


def test_missing_rows_option_is_checked():
    with pytest.raises(ValueError, match=r"FacetSpec\('kg'\)\.missing must be one of "
                       r"\('random', 'zeros'\), got 'zero'"):
        F.FacetSpec(source="kg", missing="zero")
    with pytest.raises(ValueError, match=r"missing must be one of \('random', 'zeros'\), got 'nan'"):
        _align(missing="nan")
    with pytest.raises(ValueError, match=r"missing must be one of"):
        F.build_entities(scratch_dim=4, pretrained=("cl",), missing="ones")
    assert F.FacetSpec(source="cl").missing == "random"


def test_missing_rows_option_reaches_the_pretrained_tables():
    ckpt = _Ckpt(tables={"user": _FACET_TABLE}, vocabs={"user": _FACET_IDS})
    ents = F.build_entities(entities=(("user", "user_id"),), scratch_dim=4, pretrained=("cl",),
                            mode="freeze", missing="zeros")
    # Only the pretrained facet takes it: a scratch facet has no missing ids.
    assert [(f.source, f.missing) for f in ents[0].facets] == [("scratch", "random"), ("cl", "zeros")]
    out = F.resolve_facets(ents, vocabs={"user": _IDS}, facets={"cl": ckpt},
                           table_learning_rate=0.05, finetune_lr_scale=0.1, seed=0)
    np.testing.assert_array_equal(out[1].values[1:3], np.zeros((2, 2)))
    assert not out[1].trainable and out[1].stats.missing == 2


@pytest.mark.parametrize("facets", ["", "cl"])
def test_ranker_config_refuses_an_unknown_facet_mode(facets):
    # Without pretrained facets the mode went unused and a misspelt one ran silently;
    # with them, FacetSpec's message named neither the config key nor the flag.
    from launch import pipeline_stages, train_ranker

    cfg = pipeline_stages.load_config("configs/ranker.py:smoke")
    cfg.facets, cfg.facet_mode = facets, "frozn"
    with pytest.raises(ValueError, match=r"^config\.facet_mode must be one of finetune, freeze, "
                                         r"got 'frozn'$"):
        train_ranker.train_config(cfg, data_path="/data")
    with pytest.raises(ValueError, match=r"^config\.ranker\.facet_mode must be one of"):
        train_ranker.facet_mode(cfg, key="ranker.facet_mode")
    cfg.facet_mode = "freeze"
    assert train_ranker.facet_mode(cfg) == "freeze"


def test_ranker_config_facet_missing_reaches_the_facet_specs():
    from launch import pipeline_stages, train_ranker

    cfg = pipeline_stages.load_config("configs/ranker.py:smoke")
    cfg.facets = "cl,kg"
    assert cfg.facet_missing == "random"
    tc = train_ranker.train_config(cfg, data_path="/data", mode="freeze")
    assert {f.missing for e in tc.entities for f in e.facets} == {"random"}
    cfg.facet_missing = "zeros"
    tc = train_ranker.train_config(cfg, data_path="/data", mode="freeze")
    assert {(f.source, f.missing) for e in tc.entities for f in e.facets} == {
        ("scratch", "random"), ("cl", "zeros"), ("kg", "zeros")}
    # The ablation's variants take it from AblationConfig.facet_missing (run_ablation sets it
    # from config.ranker.facet_missing).
    from jax_recsys.ranking import ablation

    loaded = {(f, "fresh"): _Ckpt(tables={"user": None, "pin": None}, vocabs={}) for f in ("cl", "kg")}
    for missing in ("random", "zeros"):
        ac = ablation.AblationConfig(base=tc, facet_missing=missing)
        frozen = ablation._variant_config(ac, ablation.VARIANTS["cl_kg_frozen"], 0, loaded)
        assert {f.missing for e in frozen.entities for f in e.facets if f.source != "scratch"} == {missing}
