"""Raw refer reading without TFDS: safe pickle, layout joins, masks, image checks."""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import refer_fixture as rf
from PIL import Image
from pycocotools import mask as mask_utils

from tfds_refcoco import images, masks, refer, safe_pickle, validate

# pycocotools 2.0.x trips numpy 2's __array__(copy=...) deprecation in the reference masks.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


# --- safe pickle -------------------------------------------------------------------------


class _SystemPayload:
    """Unpickling this runs a shell command (touch)."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


class _OpenPayload:
    """Unpickling this creates a file through builtins.open."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (open, (str(self.target), "w"))


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_plain_data_round_trips(protocol):
    data = [
        {"ref_id": 3, "split": "val", "sent_ids": [1, 2], "score": 0.5, "flag": True,
         "none": None, "pair": (1, "a"), "text": "café", "big": 2**70},
    ]
    if protocol >= 3:  # protocols 0-2 pickle bytes through _codecs.encode (a global): refused
        data[0]["raw"] = b"\x00bytes"
    assert safe_pickle.loads_plain(pickle.dumps(data, protocol=protocol)) == data


def test_python2_str_decodes_as_utf8():
    # A Python 2 `str` is pickled as SHORT_BINSTRING (bytes); the originals were written so.
    py2_pickle = b"\x80\x02]q\x00U\x05caf\xc3\xa9q\x01a."
    assert safe_pickle.loads_plain(py2_pickle) == ["café"]


def test_python2_str_not_utf8_falls_back_to_latin1_per_byte():
    # 'caf\xe9' is latin-1 (an old editor), 'caf\xc3\xa9' UTF-8, in one Python 2 pickle.
    py2_pickle = b"\x80\x02]q\x00(U\x04caf\xe9q\x01U\x05caf\xc3\xa9q\x02e."
    latin1, utf8 = safe_pickle.loads_plain(py2_pickle)
    assert latin1 == utf8 == "café"
    assert isinstance(latin1, safe_pickle.Latin1Text)
    assert not isinstance(utf8, safe_pickle.Latin1Text)
    # Valid UTF-8 sequences stay UTF-8; only the stray bytes are read as latin-1.
    assert safe_pickle.decode_py2_str(b"\xe9t\xe9 caf\xc3\xa9") == "été café"
    assert type(safe_pickle.decode_py2_str("café".encode())) is str


def test_python2_refs_file_reads_like_a_python3_one(tmp_path):
    rf.write_refer_fixture(tmp_path, datasets=("refcoco",))
    py3 = refer.read_refer(tmp_path, "refcoco", "unc")
    path = tmp_path / "refcoco" / "refs(unc).p"
    rf.write_py2_refs(path, rf.make_refs("refcoco", "unc"))
    assert b"X" not in path.read_bytes()[:3] and b"U\x06ref_id" in path.read_bytes()
    assert refer.read_refer(tmp_path, "refcoco", "unc") == py3


def test_latin1_sentence_is_kept_and_reported(tmp_path, caplog):
    fx = rf.write_refer_fixture(tmp_path, datasets=("refcoco",))
    refs = rf.make_refs("refcoco", "unc")
    refs[0]["sentences"][1]["raw"] = "the crème brûlée on the left"
    sent_id = refs[0]["sentences"][1]["sent_id"]
    rf.write_py2_refs(fx.refs_path("refcoco", "unc"), refs, latin1_sent_ids=[sent_id])
    assert "crème".encode("latin-1") in fx.refs_path("refcoco", "unc").read_bytes()
    with caplog.at_level(logging.WARNING):
        by_split = refer.read_refer(tmp_path, "refcoco", "unc")
    obj = next(o for o in by_split["train"] if o.ref_id == refs[0]["ref_id"])
    assert obj.expressions[1] == "the crème brûlée on the left"
    assert type(obj.expressions[1]) is str
    assert obj.latin1_sent_ids == (sent_id,)
    others = [o for objs in by_split.values() for o in objs if o is not obj]
    assert all(o.latin1_sent_ids == () for o in others)
    assert "1 sentence(s) are not valid UTF-8" in caplog.text
    assert f"ref_id={refs[0]['ref_id']} sent_id={sent_id}" in caplog.text


@pytest.mark.parametrize("payload_cls", [_SystemPayload, _OpenPayload])
def test_code_in_pickle_is_refused_and_never_runs(tmp_path, payload_cls):
    # Control: the payload is live under the ordinary unpickler.
    control = tmp_path / "control"
    result = pickle.loads(pickle.dumps(payload_cls(control), protocol=2))
    if hasattr(result, "close"):
        result.close()
    assert control.exists()

    target = tmp_path / "pwned"
    refs = [{"ref_id": 1, "sentences": [{"raw": "x", "extra": payload_cls(target)}]}]
    with pytest.raises(safe_pickle.UnsafePickleError, match="refusing to load the global"):
        safe_pickle.loads_plain(pickle.dumps(refs, protocol=2))
    assert not target.exists()


def test_refs_file_with_code_is_refused_naming_the_file(tmp_path):
    fx = rf.write_refer_fixture(tmp_path, datasets=("refcoco",))
    target = tmp_path / "pwned"
    refs = rf.make_refs("refcoco", "unc")
    refs[0]["sentences"][0]["raw"] = _SystemPayload(target)
    rf.write_refs(fx.refs_path("refcoco", "unc"), refs)
    with pytest.raises(refer.ReferFormatError, match=r"refs\(unc\)\.p.*not a plain-data pickle"):
        refer.read_refer(tmp_path, "refcoco", "unc")
    assert not target.exists()


def test_garbled_refs_file_names_the_file(tmp_path):
    fx = rf.write_refer_fixture(tmp_path, datasets=("refcoco",))
    path = fx.refs_path("refcoco", "unc")
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(refer.ReferFormatError, match=r"refs\(unc\)\.p: cannot read the pickle"):
        refer.read_refer(tmp_path, "refcoco", "unc")


# --- layout reading ----------------------------------------------------------------------


def _expected_texts(ann_id: int) -> list[str]:
    return [s for s in rf.SENTENCES[ann_id] if s.strip()]


def test_read_refer_joins_refs_instances_and_images(tmp_path):
    fx = rf.write_refer_fixture(tmp_path)
    by_split = refer.read_refer(tmp_path, "refcoco", "unc")
    assert set(by_split) == {"train", "validation", "testA", "testB"}
    raw_refs = {r["ref_id"]: r for r in rf.make_refs("refcoco", "unc")}
    inst = rf.instances()
    anns = {a["id"]: a for a in inst["annotations"]}
    n = 0
    for split, objs in by_split.items():
        for obj in objs:
            n += 1
            ref = raw_refs[obj.ref_id]
            assert refer.SPLIT_NAMES[ref["split"]] == split
            assert obj.ann_id == ref["ann_id"] and obj.image_id == ref["image_id"]
            # The image comes from instances.json via image_id, not the refs' fake file_name.
            assert obj.image_path == fx.image_path(obj.image_id) and obj.image_path.is_file()
            assert obj.image_path.name != ref["file_name"]
            assert list(obj.expressions) == _expected_texts(obj.ann_id)
            kept = [s["sent_id"] for s in ref["sentences"] if s["raw"].strip()]
            assert list(obj.sent_ids) == kept
            assert list(obj.bbox) == anns[obj.ann_id]["bbox"]
            assert obj.segmentation == anns[obj.ann_id]["segmentation"]
            mode, w, h = rf.IMAGES[obj.image_id]
            assert (obj.height, obj.width) == (h, w)
    assert n == len(raw_refs)
    # Non-ASCII text is kept verbatim.
    assert "the café chair “on top”" in [t for o in by_split["validation"] for t in o.expressions]


@pytest.mark.parametrize(
    "dataset,partition,splits",
    [
        ("refcoco", "google", {"train", "validation", "test"}),
        ("refcoco+", "unc", {"train", "validation", "testA", "testB"}),
        ("refcocog", "umd", {"train", "validation", "test"}),
        ("refcocog", "google", {"train", "validation"}),
    ],
)
def test_partition_split_names(tmp_path, dataset, partition, splits):
    rf.write_refer_fixture(tmp_path)
    by_split = refer.read_refer(tmp_path, dataset, partition)
    assert set(by_split) == splits


def test_images_subfolder_is_accepted(tmp_path):
    fx = rf.write_refer_fixture(tmp_path, datasets=("refcoco",), image_subdir="images/train2014")
    by_split = refer.read_refer(tmp_path, "refcoco", "unc")
    assert by_split["train"][0].image_path.parent == fx.image_dir == tmp_path / "images/train2014"


def test_missing_refs_file_names_file_and_layout(tmp_path):
    fx = rf.write_refer_fixture(tmp_path, datasets=("refcoco",))
    fx.refs_path("refcoco", "unc").unlink()
    with pytest.raises(refer.ReferFormatError, match=r"refs file not found: .*refs\(unc\)\.p"
                       r"(.|\n)*Expected layout(.|\n)*instances\.json"):
        refer.read_refer(tmp_path, "refcoco", "unc")


def test_missing_dataset_folder_and_instances(tmp_path):
    rf.write_refer_fixture(tmp_path, datasets=("refcoco",))
    with pytest.raises(refer.ReferFormatError, match=r"refcocog folder not found"):
        refer.read_refer(tmp_path, "refcocog", "umd")
    (tmp_path / "refcoco" / "instances.json").unlink()
    with pytest.raises(refer.ReferFormatError, match=r"instances file not found: .*instances"):
        refer.read_refer(tmp_path, "refcoco", "unc")


def test_missing_images_are_all_named(tmp_path):
    fx = rf.write_refer_fixture(tmp_path, datasets=("refcoco",))
    fx.image_path(3).unlink()
    fx.image_path(5).unlink()
    by_split = refer.read_refer(tmp_path, "refcoco", "unc")  # joining is not checking
    objects = [o for objs in by_split.values() for o in objs]
    assert refer.missing_images(objects) == [fx.image_path(3), fx.image_path(5)]
    with pytest.raises(refer.ReferFormatError, match=r"^2 image\(s\) referred to by the refs "
                       r"not found:\n.*000000000003\.jpg\n.*000000000005\.jpg\nPass "
                       r"--skip_corrupt \(skip_corrupt=True\) to leave out their 3 object\(s\) "
                       r"and list them(.|\n)*/train2014/COCO_train2014_\*\.jpg"):
        refer.check_images_exist(by_split)
    with pytest.raises(refer.ReferFormatError, match=r"000000000003\.jpg\n  \.\.\. and 1 more\n"):
        refer.check_images_exist(by_split, shown=1)
    # Validation (what skip_corrupt skips) names them per object.
    reasons = {p.ref_id: p.reason for p in validate.find_problems(by_split)}
    assert reasons == {1301: f"image file missing: {fx.image_path(3)}",
                       1302: f"image file missing: {fx.image_path(3)}",
                       1501: f"image file missing: {fx.image_path(5)}"}


def test_missing_image_folder(tmp_path):
    fx = rf.write_refer_fixture(tmp_path, datasets=("refcoco",))
    fx.image_dir.rename(tmp_path / "elsewhere")
    with pytest.raises(refer.ReferFormatError, match=r"train2014 image folder not found"):
        refer.read_refer(tmp_path, "refcoco", "unc")


def test_unknown_split_and_dangling_ids(tmp_path):
    fx = rf.write_refer_fixture(tmp_path, datasets=("refcoco",))
    path = fx.refs_path("refcoco", "unc")
    refs = rf.make_refs("refcoco", "unc")
    refs[2]["split"] = "test"  # a umd/google split value, not a unc one
    rf.write_refs(path, refs)
    with pytest.raises(refer.ReferFormatError, match=r"ref_id=1103.*unknown split 'test'; the "
                       r"unc partition defines \['train', 'val', 'testA', 'testB'\]"):
        refer.read_refer(tmp_path, "refcoco", "unc")
    refs = rf.make_refs("refcoco", "unc")
    refs[0]["ann_id"] = 999
    rf.write_refs(path, refs)
    with pytest.raises(refer.ReferFormatError, match=r"ann_id 999 is not in .*instances\.json"):
        refer.read_refer(tmp_path, "refcoco", "unc")


def test_object_without_expressions_is_a_problem(tmp_path):
    fx = rf.write_refer_fixture(tmp_path, datasets=("refcoco",))
    refs = rf.make_refs("refcoco", "unc")
    refs[1]["sentences"] = [dict(s, raw=" \t") for s in refs[1]["sentences"]]
    rf.write_refs(fx.refs_path("refcoco", "unc"), refs)
    by_split = refer.read_refer(tmp_path, "refcoco", "unc")
    obj = next(o for o in by_split["train"] if o.ref_id == 1102)
    assert obj.expressions == () and obj.sent_ids == ()
    assert validate.find_problems(by_split) == [
        validate.Problem(1102, 102, "train", "no non-empty expression")]


# --- validation --------------------------------------------------------------------------


def test_valid_fixture_has_no_problems(tmp_path):
    rf.write_refer_fixture(tmp_path)
    for dataset, partition in [("refcoco", "unc"), ("refcocog", "umd")]:
        assert validate.find_problems(refer.read_refer(tmp_path, dataset, partition)) == []


def test_every_problem_is_found_in_one_pass(tmp_path):
    fx = rf.write_refer_fixture(tmp_path, datasets=("refcoco",))
    data = fx.image_path(2).read_bytes()
    fx.image_path(2).write_bytes(data[: len(data) - 40])  # refs 1201, 1202
    inst = rf.instances()
    anns = {a["id"]: a for a in inst["annotations"]}
    anns[302]["segmentation"] = [[40, 40, 60, 40, 60, 60]]  # outside the 32x36 image
    anns[401]["segmentation"] = [[1, 2, 3]]  # odd number of coordinates
    (tmp_path / "refcoco" / "instances.json").write_text(json.dumps(inst))
    problems = validate.find_problems(refer.read_refer(tmp_path, "refcoco", "unc"))
    by_ref = {p.ref_id: p for p in problems}
    assert sorted(by_ref) == [1201, 1202, 1302, 1401]
    assert "000000000002.jpg: cannot decode" in by_ref[1201].reason
    assert by_ref[1302].reason == "mask has zero area inside the image"
    assert by_ref[1302].split == "testA"
    assert by_ref[1401].reason.startswith("bad segmentation: a polygon has an odd number")
    text = validate.format_problems(problems, limit=2)
    assert "ref_id=1201 ann_id=201 split=validation" in text and "and 2 more" in text


# --- masks -------------------------------------------------------------------------------


def _ann(ann_id: int) -> dict:
    return next(a for a in rf.annotations() if a["id"] == ann_id)


@pytest.mark.parametrize("ann_id", [101, 102, 201, 202, 301, 302, 401, 402])
def test_mask_matches_pycocotools(ann_id):
    ann = _ann(ann_id)
    _, w, h = rf.IMAGES[ann["image_id"]]
    mask = masks.segmentation_to_mask(ann["segmentation"], h, w)
    assert mask.dtype == np.uint8 and mask.shape == (h, w)
    np.testing.assert_array_equal(mask, rf.expected_mask(ann["segmentation"], h, w))
    assert mask.any()


def test_overlapping_polygons_give_the_union_not_the_sum():
    seg = _ann(102)["segmentation"]
    _, w, h = rf.IMAGES[1]
    mask = masks.segmentation_to_mask(seg, h, w)
    channels = mask_utils.decode(mask_utils.frPyObjects(seg, h, w))
    summed = channels.sum(axis=2)
    assert summed.max() == 2  # the parts really overlap
    np.testing.assert_array_equal(mask, (summed > 0).astype(np.uint8))
    # The refer API's sum, thresholded at == 1, would lose the overlap.
    assert mask.sum() > (summed == 1).sum()


def test_polygons_outside_the_image_are_clipped():
    _, w, h = rf.IMAGES[1]
    mask = masks.segmentation_to_mask(rf.OUTSIDE_POLYGONS, h, w)
    assert mask.shape == (h, w)
    np.testing.assert_array_equal(mask, rf.expected_mask(rf.OUTSIDE_CLIPPED, h, w))
    # Entirely outside: empty, still in bounds.
    far = [[100, 100, 120, 100, 120, 120]]
    assert masks.segmentation_to_mask(far, h, w).sum() == 0


def test_clip_polygon_geometry():
    # A triangle with one vertex beyond the right edge x=10 becomes a quadrilateral.
    clipped = masks.clip_polygon([0, 0, 20, 0, 0, 10], 10, 10)
    pts = np.asarray(clipped).reshape(-1, 2)
    assert pts[:, 0].max() == 10 and pts[:, 0].min() == 0 and pts[:, 1].max() == 10
    assert sorted(map(tuple, pts.tolist())) == [(0, 0), (0, 10), (10, 0), (10, 5)]
    inside = [1.5, 2.5, 8, 2, 5, 9]
    assert masks.clip_polygon(inside, 10, 10) == inside


def test_compressed_counts_match_pycocotools():
    rng = np.random.default_rng(1)
    mask = (rng.random((23, 19)) > 0.6).astype(np.uint8)
    rle = mask_utils.encode(np.asfortranarray(mask))
    assert masks.compressed_counts(rle["counts"]) == rf.uncompressed_rle(mask)["counts"]
    assert masks.mask_area(dict(rle, counts=rle["counts"].decode()), 23, 19) == mask.sum()


def test_corrupt_compressed_rle_is_refused_before_decoding():
    rle = mask_utils.encode(np.asfortranarray(np.ones((8, 8), np.uint8)))
    # Runs summing past the mask size would overrun pycocotools' decode buffer.
    too_long = mask_utils.encode(np.asfortranarray(np.ones((80, 80), np.uint8)))["counts"]
    with pytest.raises(masks.SegmentationError, match="sum to 6400, not 8\\*8"):
        masks.segmentation_to_mask({"size": [8, 8], "counts": too_long}, 8, 8)
    with pytest.raises(masks.SegmentationError, match="ends inside a number"):
        masks.segmentation_to_mask({"size": [8, 8], "counts": rle["counts"] + b"`"}, 8, 8)
    with pytest.raises(masks.SegmentationError, match="invalid character"):
        masks.segmentation_to_mask({"size": [8, 8], "counts": "\x01"}, 8, 8)


def test_bad_segmentations_raise():
    with pytest.raises(masks.SegmentationError, match="odd number"):
        masks.segmentation_to_mask([[1, 2, 3, 4, 5]], 10, 10)
    with pytest.raises(masks.SegmentationError, match="does not match the image"):
        masks.segmentation_to_mask({"size": [5, 5], "counts": [25]}, 10, 10)
    with pytest.raises(masks.SegmentationError, match="sum to"):
        masks.segmentation_to_mask({"size": [10, 10], "counts": [3, 4]}, 10, 10)


def test_mask_png_round_trip():
    rng = np.random.default_rng(0)
    mask = (rng.random((13, 17)) > 0.5).astype(np.uint8)
    data = masks.encode_mask_png(mask)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    decoded = masks.decode_mask_png(data)
    assert decoded.dtype == np.uint8 and decoded.shape == (13, 17)
    np.testing.assert_array_equal(decoded, mask)
    # A greyscale PNG (not what the builder writes) still decodes to {0, 1}.
    grey = io.BytesIO()
    Image.fromarray(mask * 200).save(grey, format="PNG")
    np.testing.assert_array_equal(masks.decode_mask_png(grey.getvalue()), mask)


# --- images ------------------------------------------------------------------------------


def test_check_image_rejects_truncated_and_wrong_size():
    data = rf.jpeg_bytes(rf.image_pixels(1))
    _, w, h = rf.IMAGES[1]
    images.check_image(data, "ok.jpg", h, w)
    with pytest.raises(images.CorruptImageError, match="cut.jpg: cannot decode"):
        images.check_image(data[: len(data) // 2], "cut.jpg", h, w)
    with pytest.raises(images.CorruptImageError, match="junk.jpg: cannot decode"):
        images.check_image(b"\xff\xd8\xff" + b"\x00" * 100, "junk.jpg", h, w)
    with pytest.raises(images.CorruptImageError, match="ok.jpg: image is 64x48"):
        images.check_image(data, "ok.jpg", w, h)


def test_decode_rgb_converts_grayscale_and_cmyk():
    gray = rf.jpeg_bytes(rf.image_pixels(3))
    assert Image.open(io.BytesIO(gray)).mode == "L"
    rgb = images.decode_rgb(gray)
    _, w, h = rf.IMAGES[3]
    assert rgb.shape == (h, w, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb[..., 0], rgb[..., 1])
    np.testing.assert_array_equal(rgb[..., 0], np.asarray(Image.open(io.BytesIO(gray))))

    cmyk = rf.jpeg_bytes(rf.image_pixels(4))
    assert Image.open(io.BytesIO(cmyk)).mode == "CMYK"
    rgb = images.decode_rgb(cmyk)
    _, w, h = rf.IMAGES[4]
    assert rgb.shape == (h, w, 3)
    left, right = rgb[:, : w // 2 - 2].mean(axis=(0, 1)), rgb[:, w // 2 + 2 :].mean(axis=(0, 1))
    assert left[0] > 180 and left[2] < 60  # red
    assert right[2] > 180 and right[0] < 60  # blue
