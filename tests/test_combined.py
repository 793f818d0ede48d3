"""refcocox_combined: the no-leak rule, duplicates across datasets, determinism, counts, build."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import combined_fixture as cf
import pytest
import refer_fixture as rf

from tfds_refcoco import combined, records, refer

ROOT = Path(__file__).resolve().parents[1]
CONFIG = combined.CONFIG_NAME
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

# The fixture's numbers, as README "Combined training set (refcocox_combined)" quotes them.
FIXTURE_STATS = {
    "eval_images": 5,
    "sources": {
        "refcoco": {"train_objects": 8, "train_images": 4, "removed_objects": 3,
                    "removed_images": 2, "kept_objects": 5, "kept_images": 2},
        "refcocoplus": {"train_objects": 5, "train_images": 3, "removed_objects": 0,
                        "removed_images": 0, "kept_objects": 5, "kept_images": 3},
        "refcocog": {"train_objects": 7, "train_images": 4, "removed_objects": 2,
                     "removed_images": 1, "kept_objects": 5, "kept_images": 3},
    },
    "removed_objects": 5,
    "removed_images": 3,
    "kept_objects": 15,
    "kept_images": 3,
    "shared_ann_ids": 6,
}


@pytest.fixture(scope="module")
def raw_root(tmp_path_factory) -> Path:
    return cf.write_combined_fixture(tmp_path_factory.mktemp("combined_raw"))


@pytest.fixture(scope="module")
def sources(raw_root) -> dict[str, dict[str, list[refer.RefObject]]]:
    return combined.read_sources(raw_root)


def expected_counts() -> dict[str, dict[str, int]]:
    """Per-split counts from the fixture tables alone (not from combined.py)."""
    banned = cf.eval_images()
    groups: dict[str, list[dict]] = {}
    for source in cf.DATASETS:
        for r in cf.make_refs(source):
            if r["split"] == "train":
                if r["image_id"] not in banned:
                    groups.setdefault("train", []).append(r)
            else:
                split = f"{source}_{refer.SPLIT_NAMES[r['split']]}"
                groups.setdefault(split, []).append(r)
    return {
        split: {
            "objects": len(refs),
            "images": len({r["image_id"] for r in refs}),
            "expressions": sum(1 for r in refs for s in r["sentences"] if s["raw"].strip()),
        }
        for split, refs in groups.items()
    }


# --- the pure functions ------------------------------------------------------------------


def test_no_train_image_is_in_any_eval_split(sources):
    train, _ = combined.combine(sources)
    eval_images = {r["image_id"] for s in cf.DATASETS for r in cf.make_refs(s)
                   if r["split"] != "train"}
    assert eval_images == combined.eval_images(sources) == {2, 3, 4, 5, 8}
    assert train and {o.image_id for o in train}.isdisjoint(eval_images)


def test_every_non_leaking_train_object_of_each_dataset_is_kept(sources):
    train, _ = combined.combine(sources)
    assert {combined.record_key(o) for o in train} == cf.expected_train_keys()
    assert len(train) == len(cf.expected_train_keys()) == 15
    # Each kept object is that dataset's own ref: its expressions, not another dataset's.
    for o in train:
        ref = next(r for r in cf.make_refs(o.source) if r["ref_id"] == o.ref_id)
        assert (o.ann_id, o.image_id, o.split) == (ref["ann_id"], ref["image_id"], "train")
        assert list(o.expressions) == [s["raw"] for s in ref["sentences"] if s["raw"].strip()]
        assert all(e.startswith(f"[{o.source}] ") for e in o.expressions)


def test_same_object_in_several_datasets_stays_separate(sources):
    train, stats = combined.combine(sources)
    refs_to_101 = [o for o in train if o.ann_id == 101]
    assert sorted(o.source for o in refs_to_101) == ["refcoco", "refcocog", "refcocoplus"]
    # refcoco and refcoco+ number their refs alike: only (source, ref_id) tells them apart.
    assert {o.ref_id for o in refs_to_101} == {1101, 3101}
    keys = [combined.record_key(o) for o in train]
    assert len(keys) == len(set(keys)) and "refcoco/1101" in keys and "refcocoplus/1101" in keys
    assert stats["shared_ann_ids"] == 6  # 101, 102, 103, 601, 602, 701


def test_combine_is_deterministic_whatever_the_input_order(sources):
    train, stats = combined.combine(sources)
    rng = random.Random(0)
    shuffled = {}
    for source in reversed(list(sources)):
        splits = {}
        for split in reversed(list(sources[source])):
            objs = list(sources[source][split])
            rng.shuffle(objs)
            splits[split] = objs
        shuffled[source] = splits
    again, stats_again = combined.combine(shuffled)
    assert again == train and stats_again == stats
    assert [o.image_id for o in train] == sorted(o.image_id for o in train)  # grouped by image


def test_stats_are_the_fixture_counts(sources):
    _, stats = combined.combine(sources)
    assert stats == FIXTURE_STATS
    # Cross-check against the tables: per source, kept + removed = its train objects.
    for source, s in stats["sources"].items():
        n_train = sum(1 for r in cf.make_refs(source) if r["split"] == "train")
        assert s["train_objects"] == n_train == s["kept_objects"] + s["removed_objects"]


def test_combined_splits_copy_each_eval_split_unchanged(sources):
    splits, _ = combined.combined_splits(sources)
    assert list(splits) == ["train", *combined.eval_split_names()]
    assert combined.eval_split_names() == (
        "refcoco_validation", "refcoco_testA", "refcoco_testB", "refcocoplus_validation",
        "refcocoplus_testA", "refcocoplus_testB", "refcocog_validation", "refcocog_test")
    for source in cf.DATASETS:
        for split, objs in sources[source].items():
            if split != "train":
                got = splits[combined.eval_split_name(source, split)]
                assert [combined.tag(o, source) for o in objs] == got
    counts = {s: {"objects": len(o), "images": len({x.image_id for x in o}),
                  "expressions": sum(len(x.expressions) for x in o)} for s, o in splits.items()}
    assert counts == expected_counts()


def test_missing_source_or_eval_split_is_an_error(sources):
    with pytest.raises(ValueError, match="expected the sources"):
        combined.combine({k: v for k, v in sources.items() if k != "refcocog"})
    no_test = dict(sources, refcocog={k: v for k, v in sources["refcocog"].items()
                                      if k != "test"})
    with pytest.raises(refer.ReferFormatError, match=r"refcocog/refs\(umd\)\.p has no 'test'"):
        combined.combined_splits(no_test)


# --- the builder config -------------------------------------------------------------------


@pytest.fixture(scope="module")
def built(raw_root, tmp_path_factory) -> tuple[Path, dict]:
    data_dir = tmp_path_factory.mktemp("combined_data")
    return data_dir, records.prepare(CONFIG, data_dir, raw_root)


def test_builder_counts_splits_and_metadata(built):
    data_dir, counts = built
    assert counts == expected_counts()
    b = records.get_builder(CONFIG, data_dir)
    assert list(b.info.splits) and set(b.info.splits) == {"train", *combined.eval_split_names()}
    assert records.combined_stats(CONFIG, data_dir) == FIXTURE_STATS
    assert b.info.metadata["source"] == {"dataset": "refcocox", "partition": "combined"}


def test_built_records_keep_their_source_and_leak_nothing(built, sources):
    data_dir, _ = built
    by_split = {s: list(records.data_source(CONFIG, s, data_dir))
                for s in ["train", *combined.eval_split_names()]}
    train_keys = {f"{r['source'].decode()}/{int(r['ref_id'])}" for r in by_split["train"]}
    assert train_keys == cf.expected_train_keys()
    eval_ids = {int(r["image_id"]) for s, rs in by_split.items() if s != "train" for r in rs}
    assert eval_ids == cf.eval_images()
    assert eval_ids.isdisjoint(int(r["image_id"]) for r in by_split["train"])
    for split, rs in by_split.items():
        for r in rs:
            ex = records.decode_example(r)
            source = r["source"].decode()
            if split != "train":
                assert split.startswith(f"{source}_")
            ref = next(x for x in cf.make_refs(source) if x["ref_id"] == ex["ref_id"])
            assert ex["expressions"] == [s["raw"] for s in ref["sentences"] if s["raw"].strip()]
            assert ex["mask"].any()


def test_other_configs_have_no_source_feature(built, tmp_path):
    raw = rf.write_refer_fixture(tmp_path / "raw", datasets=("refcoco",))
    records.prepare("refcoco_unc", tmp_path / "data", raw.root)
    assert "source" not in records.data_source("refcoco_unc", "train", tmp_path / "data")[0]
    assert records.combined_stats("refcoco_unc", tmp_path / "data") is None


def test_skip_corrupt_tells_apart_refs_with_the_same_id(tmp_path):
    root = cf.write_combined_fixture(tmp_path / "raw")
    # refcoco+'s ref 1601 loses its expressions; refcoco's ref 1601 (same id) is fine.
    refs = cf.make_refs("refcocoplus")
    next(r for r in refs if r["ref_id"] == 1601)["sentences"] = [
        {"raw": " ", "sent_id": 1, "sent": "", "tokens": []}]
    rf.write_refs(root / "refcoco+" / "refs(unc).p", refs)
    with pytest.raises(refer.ReferFormatError, match="source=refcocoplus ref_id=1601 "):
        records.prepare(CONFIG, tmp_path / "data", root)
    counts = records.prepare(CONFIG, tmp_path / "data", root, skip_corrupt=True)
    assert counts["train"]["objects"] == expected_counts()["train"]["objects"] - 1
    skipped = records.skipped(CONFIG, tmp_path / "data")
    assert [(s["source"], s["ref_id"], s["split"]) for s in skipped] == [
        ("refcocoplus", 1601, "train")]
    keys = {f"{r['source'].decode()}/{int(r['ref_id'])}"
            for r in records.data_source(CONFIG, "train", tmp_path / "data")}
    assert "refcoco/1601" in keys and "refcocoplus/1601" not in keys


def test_build_cli_prints_what_the_rule_removed(built, raw_root):
    data_dir, _ = built  # already prepared: the CLI reports it without rebuilding
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "tfds_refcoco.build", "--config", CONFIG, "--manual_dir",
         str(raw_root), "--data_dir", str(data_dir)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "| refcoco_validation " in out and "| refcocog_test " in out
    assert out.index("| train ") < out.index("| refcoco_validation ") < out.index(
        "| refcocog_test ")
    assert "no-leak rule: 5 image(s) are in an evaluation split" in out
    assert "refcoco: 3 of 8 objects (2 of 4 images) removed; 5 kept" in out
    assert "total: 5 objects removed (3 distinct images); 15 objects on 3 images kept" in out
    assert json.loads(json.dumps(records.combined_stats(CONFIG, data_dir))) == FIXTURE_STATS


def test_training_config_trains_on_combined_and_evaluates_all_eight():
    from configs import refcocox_combined

    config = refcocox_combined.get_config()
    assert config.data.dataset == CONFIG and config.data.train_split == "train"
    assert tuple(config.data.eval_splits.split(",")) == combined.eval_split_names()
    assert CONFIG in records.CONFIG_NAMES
