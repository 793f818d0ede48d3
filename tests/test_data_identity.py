"""Which prepared data a config reads: one dataset (and tokenizer) per RefShapes size, no TFDS
download noise from a generated build, and unknown split names refused up front."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import ml_collections
import pytest

from tfds_refcoco import build, records, refshapes

# pycocotools 2.0.x trips numpy 2's __array__(copy=...) deprecation in the reference masks.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SMALL, LARGER = 8, 12  # two RefShapes sizes sharing one data_dir


@pytest.fixture(scope="module")
def two_sizes(tmp_path_factory) -> tuple[Path, dict, dict]:
    data_dir = tmp_path_factory.mktemp("data")
    small = records.prepare("refshapes", data_dir, None, refshapes_num_images=SMALL,
                            num_workers=1)
    larger = records.prepare("refshapes", data_dir, None, refshapes_num_images=LARGER,
                             num_workers=1)
    return data_dir, small, larger


def _images(counts: dict) -> int:
    return sum(c["images"] for c in counts.values())


def _config(data_dir: Path, num_images: int, **data: object) -> ml_collections.ConfigDict:
    from configs.refshapes import get_config

    config = get_config("tiny")
    config.data.data_dir = str(data_dir)
    config.data.refshapes_num_images = num_images
    config.data.update(data)
    return config


def test_each_refshapes_size_is_its_own_dataset(two_sizes):
    data_dir, small, larger = two_sizes
    assert (_images(small), _images(larger)) == (SMALL, LARGER)  # not the first one reused
    for size, counts in ((SMALL, small), (LARGER, larger)):
        source = records.data_source("refshapes", "train", data_dir, refshapes_num_images=size)
        assert len(source) == counts["train"]["objects"]
        name = records.dataset_name("refshapes", size)
        assert name == f"refshapes_n{size}"
        assert len(records.data_source(name, "train", data_dir)) == counts["train"]["objects"]
        assert records.skipped("refshapes", data_dir, refshapes_num_images=size) == []
    # The default size was never built: reading it must not find a resized one.
    with pytest.raises(FileNotFoundError, match="refshapes is not prepared"):
        records.data_source("refshapes", "train", data_dir)
    # Preparing again reuses each size's own dataset.
    assert records.prepare("refshapes", data_dir, refshapes_num_images=SMALL) == small


def test_default_refshapes_keeps_its_path_and_name(tmp_path):
    default_total = sum(n for _, n in refshapes.DEFAULT_SPLIT_IMAGES)
    for size in (None, 0, default_total):  # all name the generator's default RefShapes
        assert records.dataset_name("refshapes", size) == "refshapes"
        path = records.get_builder("refshapes", tmp_path, refshapes_num_images=size).data_path
        assert Path(path) == tmp_path / records.BUILDER_NAME / "refshapes" / "1.0.0"
    # The RefCOCO configs ignore the RefShapes size, as before.
    assert records.dataset_name("refcoco_unc", 24) == "refcoco_unc"
    data = ml_collections.ConfigDict({"dataset": "refshapes", "refshapes_num_images": 24})
    assert records.configured_dataset(data) == "refshapes_n24"


@pytest.mark.parametrize("size", [-1, 2])
def test_bad_refshapes_num_images_is_refused_before_writing(tmp_path, size):
    with pytest.raises(ValueError, match="refshapes_num_images"):
        records.prepare("refshapes", tmp_path, refshapes_num_images=size)
    assert not (tmp_path / records.BUILDER_NAME).exists()


def test_refshapes_size_with_a_manual_dir_is_refused(tmp_path):
    with pytest.raises(ValueError, match="refshapes_num_images.*manual"):
        records.prepare("refshapes", tmp_path / "data", tmp_path / "raw", refshapes_num_images=8)


def test_legacy_resized_refshapes_at_the_default_path_is_refused(tmp_path):
    """Before each size had its own dataset, the first size built took the default path."""
    records.prepare("refshapes", tmp_path, refshapes_num_images=SMALL, num_workers=1)
    built = Path(records.get_builder("refshapes", tmp_path,
                                     refshapes_num_images=SMALL).data_path)
    default = Path(records.get_builder("refshapes", tmp_path).data_path)
    if built != default:
        default.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(built, default)
    meta = json.loads((default / "metadata.json").read_text())
    meta.pop("refshapes_num_images", None)  # what an old build wrote
    (default / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(RuntimeError, match=f"refshapes_num_images={SMALL}.*delete"):
        records.data_source("refshapes", "train", tmp_path)
    with pytest.raises(RuntimeError, match=f"refshapes_num_images={SMALL}"):
        records.prepare("refshapes", tmp_path)


def test_tokenizer_is_per_refshapes_size(two_sizes):
    from lts_jax.tokenizer import load_tokenizer, tokenizer_path

    data_dir, _, _ = two_sizes
    paths = {size: tokenizer_path(data_dir, "refshapes", 128, refshapes_num_images=size)
             for size in (None, SMALL, LARGER)}
    assert len(set(paths.values())) == 3
    assert paths[None] == tokenizer_path(data_dir, "refshapes", 128)  # the default keeps its path
    for size in (SMALL, LARGER):
        tok = load_tokenizer(_config(data_dir, size))
        assert paths[size].read_bytes() == tok.model_proto
    assert not paths[None].exists()
    # Each was trained on its own size's expressions.
    assert paths[SMALL].read_bytes() != paths[LARGER].read_bytes()


def test_build_prints_no_tfds_download_noise(tmp_path, capsys):
    argv = ["--config", "refshapes", "--data_dir", str(tmp_path), "--refshapes_num_images", "4",
            "--num_workers", "1"]
    assert build.main(argv) == 0
    out = capsys.readouterr().out
    assert "Downloading and preparing" not in out and "downloaded and prepared" not in out
    assert out.splitlines()[0] == f"{records.BUILDER_NAME}/refshapes_n4 in {tmp_path}"
    assert out.splitlines()[1].startswith("| split")


def test_unknown_split_names_the_available_ones(two_sizes):
    from lts_jax import evaluate

    data_dir, _, _ = two_sizes
    expected = ("unknown split 'valdation' for refshapes_n8; "
                "available: train, validation, testA, testB")
    with pytest.raises(ValueError) as err:
        records.data_source("refshapes", "valdation", data_dir, refshapes_num_images=SMALL)
    assert str(err.value) == expected
    config = _config(data_dir, SMALL)
    assert evaluate.split_names("validation, testA[:2],", config) == ["validation", "testA[:2]"]
    with pytest.raises(ValueError) as err:
        evaluate.split_names("validation,valdation", config)
    assert str(err.value) == expected
    assert evaluate.split_names("anything,else") == ["anything", "else"]  # no config: no check


def test_evaluator_refuses_an_unknown_eval_split_before_compiling(two_sizes):
    from lts_jax import evaluate
    from lts_jax.mesh import make_mesh

    data_dir, _, _ = two_sizes
    config = _config(data_dir, SMALL, eval_splits="validation,tstA")
    with pytest.raises(ValueError, match=r"config.data.eval_splits: unknown split 'tstA' for "
                                         r"refshapes_n8; available: train, validation"):
        evaluate.Evaluator(config, None, make_mesh(), tokenizer=object())
    # Without a tokenizer (batches given by the caller) the data is not consulted.
    evaluate.Evaluator(config, None, make_mesh())
