"""The refcoco_masks TFDS builder end to end on tiny refer-format fixtures, without TensorFlow."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import refer_fixture as rf
import tensorflow_datasets as tfds

from tfds_refcoco import build, builder, records, refer

ROOT = Path(__file__).resolve().parents[1]
# pycocotools 2.0.x trips numpy 2's __array__(copy=...) deprecation in the reference masks.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def expected_counts(dataset: str, partition: str) -> dict[str, dict[str, int]]:
    """Per-split counts derived from the fixture definition (not from the builder)."""
    counts: dict[str, dict[str, int]] = {}
    images: dict[str, set[int]] = {}
    for ref in rf.make_refs(dataset, partition):
        split = refer.SPLIT_NAMES[ref["split"]]
        c = counts.setdefault(split, {"objects": 0, "images": 0, "expressions": 0})
        c["objects"] += 1
        c["expressions"] += sum(1 for s in rf.SENTENCES[ref["ann_id"]] if s.strip())
        images.setdefault(split, set()).add(ref["image_id"])
    for split, ids in images.items():
        counts[split]["images"] = len(ids)
    return counts


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> rf.ReferFixture:
    return rf.write_refer_fixture(tmp_path_factory.mktemp("raw"))


@pytest.fixture(scope="module")
def unc(raw, tmp_path_factory) -> tuple[Path, dict]:
    data_dir = tmp_path_factory.mktemp("data")
    return data_dir, records.prepare("refcoco_unc", data_dir, raw.root)


def _all_examples(config: str, data_dir: Path) -> dict[str, list[dict]]:
    b = records.get_builder(config, data_dir)
    return {
        split: [records.decode_example(r) for r in records.data_source(config, split, data_dir)]
        for split in b.info.splits
    }


def test_counts_match_the_fixture(unc):
    data_dir, counts = unc
    assert counts == expected_counts("refcoco", "unc")
    for split, c in counts.items():
        src = records.data_source("refcoco_unc", split, data_dir)
        raws = [src[i] for i in range(len(src))]
        assert len(raws) == c["objects"]
        assert len({int(r["image_id"]) for r in raws}) == c["images"]
        assert sum(len(records.decode_expressions(r)) for r in raws) == c["expressions"]


def test_examples_match_the_raw_data(raw, unc):
    data_dir, _ = unc
    refs = {r["ref_id"]: r for r in rf.make_refs("refcoco", "unc")}
    anns = {a["id"]: a for a in rf.annotations()}
    seen = set()
    for split, examples in _all_examples("refcoco_unc", data_dir).items():
        for ex in examples:
            ref, ann = refs[ex["ref_id"]], anns[ex["ann_id"]]
            seen.add(ex["ref_id"])
            assert refer.SPLIT_NAMES[ref["split"]] == split
            assert (ex["ann_id"], ex["image_id"], ex["category_id"]) == (
                ref["ann_id"], ref["image_id"], ref["category_id"])
            _, w, h = rf.IMAGES[ex["image_id"]]
            assert (ex["height"], ex["width"]) == (h, w)
            assert ex["image"].shape == (h, w, 3) and ex["image"].dtype == np.uint8
            seg = rf.OUTSIDE_CLIPPED if ann["id"] == 103 else ann["segmentation"]
            assert ex["mask"].dtype == np.uint8 and ex["mask"].shape == (h, w)
            np.testing.assert_array_equal(ex["mask"], rf.expected_mask(seg, h, w))
            kept = [s for s in ref["sentences"] if s["raw"].strip()]
            assert ex["expressions"] == [s["raw"] for s in kept]
            np.testing.assert_array_equal(ex["sent_ids"], [s["sent_id"] for s in kept])
            assert ex["sent_ids"].dtype == np.int64
            np.testing.assert_array_equal(ex["bbox"], np.asarray(ann["bbox"], np.float32))
            assert ex["bbox"].dtype == np.float32
    assert seen == set(refs)


def test_data_source_split_arguments(unc):
    data_dir, counts = unc
    assert len(records.data_source("refcoco_unc", "train[:2]", data_dir)) == 2
    with pytest.raises(ValueError, match=r"^unknown split 'test' for refcoco_unc; available: "
                                         r"train, validation, testA, testB$"):
        records.data_source("refcoco_unc", "test", data_dir)
    with pytest.raises(ValueError, match="unknown config"):
        records.data_source("refcoco", "train", data_dir)


def test_original_image_bytes_are_stored(raw, unc):
    data_dir, _ = unc
    for split in ("train", "validation", "testA", "testB"):
        for r in records.data_source("refcoco_unc", split, data_dir):
            assert r["image"] == raw.image_path(int(r["image_id"])).read_bytes()
            assert r["mask"][:8] == b"\x89PNG\r\n\x1a\n"


def test_grayscale_and_cmyk_decode_to_rgb(unc):
    data_dir, _ = unc
    examples = _all_examples("refcoco_unc", data_dir)
    gray = next(e for e in examples["testA"] if e["image_id"] == 3)["image"]
    assert gray.shape == (36, 32, 3)
    np.testing.assert_array_equal(gray[..., 0], gray[..., 2])
    cmyk = next(e for e in examples["testB"] if e["image_id"] == 4)["image"]
    _, w, _ = rf.IMAGES[4]
    assert cmyk[:, : w // 2 - 2, 0].mean() > 180 and cmyk[:, w // 2 + 2 :, 2].mean() > 180


def test_non_ascii_expression_is_kept(unc):
    data_dir, _ = unc
    texts = [t for e in _all_examples("refcoco_unc", data_dir)["validation"]
             for t in e["expressions"]]
    assert "the café chair “on top”" in texts


def test_prepare_is_idempotent(raw, unc, monkeypatch):
    data_dir, counts = unc

    def must_not_build(*args, **kwargs):
        raise AssertionError("prepare rebuilt an already prepared dataset")

    monkeypatch.setattr(builder.RefcocoMasks, "_split_generators", must_not_build)
    assert records.prepare("refcoco_unc", data_dir, raw.root) == counts


def test_tfds_data_source_by_name_without_tensorflow(unc):
    data_dir, counts = unc
    src = tfds.data_source(
        f"{records.BUILDER_NAME}/refcoco_unc", split="train", data_dir=data_dir, download=False
    )
    assert len(src) == counts["train"]["objects"]
    assert "tensorflow" not in sys.modules


@pytest.mark.parametrize(
    "config,dataset,partition",
    [
        ("refcoco_google", "refcoco", "google"),
        ("refcocoplus_unc", "refcoco+", "unc"),
        ("refcocog_umd", "refcocog", "umd"),
        ("refcocog_google", "refcocog", "google"),
    ],
)
def test_other_configs_and_split_names(raw, tmp_path, config, dataset, partition):
    counts = records.prepare(config, tmp_path, raw.root)
    assert counts == expected_counts(dataset, partition)
    b = records.get_builder(config, tmp_path)
    assert set(b.info.splits) == set(counts)
    assert b.info.metadata["source"] == {"dataset": dataset, "partition": partition}


def test_refshapes_config_reads_a_manual_dir(tmp_path):
    raw = rf.write_refer_fixture(tmp_path / "raw", datasets=("refshapes",),
                                 image_subdir="images/train2014")
    counts = records.prepare("refshapes", tmp_path / "data", raw.root)
    assert counts == expected_counts("refshapes", "unc")
    # The manual dir was used: nothing was generated.
    assert not builder.raw_refshapes_dir(tmp_path / "data").exists()


def test_refshapes_is_generated_without_manual_dir(tmp_path):
    counts = records.prepare("refshapes", tmp_path, refshapes_num_images=8)
    raw_dir = builder.raw_refshapes_dir(tmp_path, 8)
    assert (raw_dir / "refshapes" / "refs(unc).p").is_file()
    assert set(counts) == {"train", "validation", "testA", "testB"}
    # The counts agree with the generated refs file, read independently.
    by_split = refer.read_refer(raw_dir, "refshapes", "unc")
    for split, objs in by_split.items():
        assert counts[split]["objects"] == len(objs)
        assert counts[split]["expressions"] == sum(len(o.expressions) for o in objs)
    ex = records.decode_example(
        records.data_source("refshapes", "train", tmp_path, refshapes_num_images=8)[0])
    assert ex["mask"].any() and ex["image"].shape == (ex["height"], ex["width"], 3)


# --- failures ----------------------------------------------------------------------------


def _assert_not_prepared(config: str, data_dir: Path) -> None:
    b = records.get_builder(config, data_dir)
    assert not b.data_path.exists()
    leftovers = list((data_dir / records.BUILDER_NAME).rglob("*incomplete*"))
    assert leftovers == []
    with pytest.raises(FileNotFoundError, match="not prepared"):
        records.data_source(config, "train", data_dir)
    with pytest.raises(KeyError, match="has not been generated"):
        tfds.data_source(f"{records.BUILDER_NAME}/{config}", split="train", data_dir=data_dir,
                         download=False)


def test_failure_mid_generation_leaves_nothing_and_rerun_succeeds(tmp_path, monkeypatch):
    raw = rf.write_refer_fixture(tmp_path / "raw", datasets=("refcoco",))
    data_dir = tmp_path / "data"
    shards_at_failure: list[Path] = []
    example = builder.RefcocoMasks._example

    def crash_in_testb(self, obj, *rest):  # e.g. the disk fills up
        if obj.split == "testB":
            shards_at_failure.extend(data_dir.rglob("*.array_record-*"))
            raise OSError("No space left on device")
        return example(self, obj, *rest)

    monkeypatch.setattr(builder.RefcocoMasks, "_example", crash_in_testb)
    with pytest.raises(OSError, match="No space left"):
        records.prepare("refcoco_unc", data_dir, raw.root)
    # testB is generated last: the other splits were on disk, in TFDS's temporary dir...
    assert {p.name.split("-")[1].split(".")[0] for p in shards_at_failure} == {
        "train", "validation", "testA"}
    assert all("incomplete" in p.parent.name for p in shards_at_failure)
    # ... and none of it is left, nor anything that reads as prepared.
    _assert_not_prepared("refcoco_unc", data_dir)

    monkeypatch.undo()
    assert records.prepare("refcoco_unc", data_dir, raw.root) == expected_counts("refcoco", "unc")


def test_corrupt_image_fails_before_writing_and_rerun_succeeds(tmp_path):
    raw = rf.write_refer_fixture(tmp_path / "raw", datasets=("refcoco",))
    good = raw.image_path(4).read_bytes()
    raw.image_path(4).write_bytes(good[: len(good) // 2])
    with pytest.raises(refer.ReferFormatError,
                       match=r"ref_id=1401 .*000000000004\.jpg: cannot decode image"):
        records.prepare("refcoco_unc", tmp_path / "data", raw.root)
    _assert_not_prepared("refcoco_unc", tmp_path / "data")
    raw.image_path(4).write_bytes(good)
    counts = records.prepare("refcoco_unc", tmp_path / "data", raw.root)
    assert counts == expected_counts("refcoco", "unc")


def test_missing_refs_file_fails_clearly(tmp_path):
    raw = rf.write_refer_fixture(tmp_path / "raw", datasets=("refcoco",))
    raw.refs_path("refcoco", "unc").unlink()
    with pytest.raises(refer.ReferFormatError, match=r"refs\(unc\)\.p(.|\n)*Expected layout"):
        records.prepare("refcoco_unc", tmp_path / "data", raw.root)
    _assert_not_prepared("refcoco_unc", tmp_path / "data")


def test_missing_manual_dir_fails_with_instructions(tmp_path):
    with pytest.raises(refer.ReferFormatError, match=r"does not exist(.|\n)*refcoco\.zip"):
        records.prepare("refcoco_unc", tmp_path / "data", tmp_path / "nowhere")


def test_malicious_refs_pickle_never_runs(tmp_path):
    raw = rf.write_refer_fixture(tmp_path / "raw", datasets=("refcoco",))
    target = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {target}",))

    rf.write_refs(raw.refs_path("refcoco", "unc"), [{"ref_id": 1, "payload": Payload()}])
    with pytest.raises(refer.ReferFormatError, match="not a plain-data pickle"):
        records.prepare("refcoco_unc", tmp_path / "data", raw.root)
    assert not target.exists()
    _assert_not_prepared("refcoco_unc", tmp_path / "data")


@pytest.fixture
def damaged(tmp_path) -> rf.ReferFixture:
    """refcoco unc with a truncated image (2: refs 1201, 1202), an object whose only polygon
    is outside its image (ann 302, ref 1302) and one with only empty sentences (ref 1101)."""
    raw = rf.write_refer_fixture(tmp_path / "raw", datasets=("refcoco",))
    data = raw.image_path(2).read_bytes()
    raw.image_path(2).write_bytes(data[: len(data) - 40])
    inst_path = raw.root / "refcoco" / "instances.json"
    inst = rf.instances()
    next(a for a in inst["annotations"] if a["id"] == 302)["segmentation"] = [
        [40, 40, 60, 40, 60, 60]]
    inst_path.write_text(json.dumps(inst))
    refs = rf.make_refs("refcoco", "unc")
    next(r for r in refs if r["ref_id"] == 1101)["sentences"] = [
        {"raw": "", "sent_id": 1, "sent": "", "tokens": []}]
    rf.write_refs(raw.refs_path("refcoco", "unc"), refs)
    return raw


def test_damaged_input_fails_naming_every_problem(damaged, tmp_path):
    with pytest.raises(refer.ReferFormatError) as info:
        records.prepare("refcoco_unc", tmp_path / "data", damaged.root)
    msg = str(info.value)
    assert msg.startswith("4 object(s) cannot be used (pass skip_corrupt")
    assert "ref_id=1101 ann_id=101 split=train: no non-empty expression" in msg
    for ref_id in (1201, 1202):
        assert re.search(rf"ref_id={ref_id} .*000000000002\.jpg: cannot decode", msg)
    assert "ref_id=1302 ann_id=302 split=testA: mask has zero area" in msg
    _assert_not_prepared("refcoco_unc", tmp_path / "data")


def test_skip_corrupt_skips_and_reports_every_ref(damaged, tmp_path):
    data_dir = tmp_path / "data"
    counts = records.prepare("refcoco_unc", data_dir, damaged.root, skip_corrupt=True)
    skipped = records.skipped("refcoco_unc", data_dir)
    assert sorted(s["ref_id"] for s in skipped) == [1101, 1201, 1202, 1302]
    assert {s["ref_id"]: s["split"] for s in skipped}[1302] == "testA"
    full = expected_counts("refcoco", "unc")
    assert counts["train"]["objects"] == full["train"]["objects"] - 1
    assert counts["validation"] == {"objects": 1, "images": 1, "expressions": 1}  # image 5
    assert counts["testA"]["objects"] == full["testA"]["objects"] - 1
    assert counts["testB"] == full["testB"]
    kept = {int(r["ref_id"]) for s in counts for r in records.data_source("refcoco_unc", s,
                                                                            data_dir)}
    assert kept.isdisjoint({1101, 1201, 1202, 1302})


def test_missing_image_fails_naming_it_or_is_skipped(tmp_path):
    raw = rf.write_refer_fixture(tmp_path / "raw", datasets=("refcoco",))
    gone = raw.image_path(5)  # ref 1501; its split (validation) keeps image 2
    gone.unlink()
    with pytest.raises(refer.ReferFormatError, match=r"^1 image\(s\) referred to by the refs not "
                       r"found:\n  .*000000000005\.jpg\nPass --skip_corrupt"):
        records.prepare("refcoco_unc", tmp_path / "data", raw.root)
    _assert_not_prepared("refcoco_unc", tmp_path / "data")

    counts = records.prepare("refcoco_unc", tmp_path / "data", raw.root, skip_corrupt=True)
    assert [(s["ref_id"], s["split"], s["reason"])
            for s in records.skipped("refcoco_unc", tmp_path / "data")] == [
        (1501, "validation", f"image file missing: {gone}")]
    full = expected_counts("refcoco", "unc")
    assert counts["validation"]["objects"] == full["validation"]["objects"] - 1
    assert counts["train"] == full["train"]


def test_latin1_refs_are_built_and_reported(tmp_path):
    raw = rf.write_refer_fixture(tmp_path / "raw", datasets=("refcoco",))
    refs = rf.make_refs("refcoco", "unc")
    ref = next(r for r in refs if r["ref_id"] == 1201)  # validation
    ref["sentences"][1]["raw"] = "the señor's crème"
    sent_id = ref["sentences"][1]["sent_id"]
    rf.write_py2_refs(raw.refs_path("refcoco", "unc"), refs, latin1_sent_ids=[sent_id])
    proc = _run_cli("--config", "refcoco_unc", "--manual_dir", str(raw.root),
                    "--data_dir", str(tmp_path / "data"), "--num_workers", "1")
    assert proc.returncode == 0, proc.stderr
    line = "1 expression(s) were not valid UTF-8; their other bytes were read as latin-1: "
    assert f"{line}ref_id=1201 sent_id={sent_id}" in proc.stdout
    assert f"ref_id=1201 sent_id={sent_id}" in proc.stderr  # the build's warning
    assert records.latin1_fallback("refcoco_unc", tmp_path / "data") == [
        {"ref_id": 1201, "sent_id": sent_id, "source": ""}]
    b = records.get_builder("refcoco_unc", tmp_path / "data")
    assert b.info.metadata["latin1_fallback"]["count"] == 1
    texts = [t for r in records.data_source("refcoco_unc", "validation", tmp_path / "data")
             for t in records.decode_expressions(r)]
    assert "the señor's crème" in texts


@pytest.mark.parametrize("damage", ["image", "expressions"])
def test_split_with_every_object_skipped_is_an_error(tmp_path, damage):
    raw = rf.write_refer_fixture(tmp_path / "raw", datasets=("refcoco",))
    if damage == "image":  # image 4 is all of testB
        raw.image_path(4).write_bytes(raw.image_path(4).read_bytes()[:100])
    else:
        refs = rf.make_refs("refcoco", "unc")
        for r in refs:
            if r["split"] == "testB":
                r["sentences"] = [dict(s, raw=" ") for s in r["sentences"]]
        rf.write_refs(raw.refs_path("refcoco", "unc"), refs)
    with pytest.raises(refer.ReferFormatError, match=r"every object of split\(s\) \['testB'\]"):
        records.prepare("refcoco_unc", tmp_path / "data", raw.root, skip_corrupt=True)
    _assert_not_prepared("refcoco_unc", tmp_path / "data")


# --- CLI ---------------------------------------------------------------------------------


def _parse_table(text: str) -> dict[str, dict[str, int]]:
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    out = {}
    for row in rows[1:]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        out[cells[0]] = {h: int(v.replace(",", "")) for h, v in zip(header[1:], cells[1:],
                                                                     strict=True)}
    return out


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "tfds_refcoco.build", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)


def test_build_cli_prints_the_counts_table(raw, tmp_path):
    proc = _run_cli("--config", "refcocog_umd", "--manual_dir", str(raw.root),
                    "--data_dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    table = _parse_table(proc.stdout)
    expected = expected_counts("refcocog", "umd")
    assert table.pop("total") == {
        k: sum(c[k] for c in expected.values()) for k in ("objects", "images", "expressions")}
    assert table == expected
    assert records.prepare("refcocog_umd", tmp_path) == expected  # really built there


def test_build_cli_reports_errors_and_skips(damaged, tmp_path):
    proc = _run_cli("--config", "refcoco_unc", "--manual_dir", str(damaged.root),
                    "--data_dir", str(tmp_path))
    assert proc.returncode == 1
    assert "error:" in proc.stderr and "ref_id=1101" in proc.stderr
    proc = _run_cli("--config", "refcoco_unc", "--manual_dir", str(damaged.root),
                    "--data_dir", str(tmp_path), "--skip_corrupt")
    assert proc.returncode == 0, proc.stderr
    assert "skipped 4 object(s)" in proc.stdout
    for ref_id in (1101, 1201, 1202, 1302):
        assert f"ref_id={ref_id} " in proc.stdout


def test_build_cli_missing_image_error_and_skip(raw, tmp_path):
    manual = tmp_path / "raw"
    shutil.copytree(raw.root, manual)
    (manual / "train2014" / rf.file_name(2)).unlink()
    args = ("--config", "refcoco_unc", "--manual_dir", str(manual), "--data_dir",
            str(tmp_path / "data"), "--num_workers", "1")
    proc = _run_cli(*args)
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: 1 image(s) referred to by the refs not found:\n")
    assert rf.file_name(2) in proc.stderr and "Pass --skip_corrupt" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = _run_cli(*args, "--skip_corrupt")
    assert proc.returncode == 0, proc.stderr
    assert "skipped 2 object(s)" in proc.stdout
    missing = manual / "train2014" / rf.file_name(2)
    assert f"ref_id=1201 ann_id=201 split=validation: image file missing: {missing}" in proc.stdout


def test_format_counts_orders_splits_and_totals():
    text = build.format_counts({"test": {"objects": 1, "images": 1, "expressions": 2},
                                "train": {"objects": 1200, "images": 3, "expressions": 4}})
    lines = text.splitlines()
    assert lines[2].startswith("| train") and "1,200" in lines[2]
    assert lines[3].startswith("| test") and lines[4].startswith("| total")
    assert _parse_table(text)["total"] == {"objects": 1201, "images": 4, "expressions": 6}


def test_no_tensorflow_imported(unc):
    assert "tensorflow" not in sys.modules
