"""RefShapes: a synthetic referring-segmentation dataset written in the raw refer layout.

``generate(root)`` writes, deterministically from a seed and in a few seconds,

    root/refshapes/instances.json   COCO style: images, annotations (polygons), categories
    root/refshapes/refs(unc).p      pickled list of refs (plain dicts/lists/str/int only)
    root/refshapes/generator.json   the parameters it was made with (written with the rest)
    root/train2014/refshapes_%012d.jpg

so the same builder code path that reads RefCOCO runs on a machine with no download.

Scenes: 3-5 shapes (circle, square, triangle, star) in 6 colours and two clearly different size
bands on a dark, lightly noisy background, never overlapping. 3-4 objects per image are referred
to, each by 1-3 expressions (the same count for every referent of an image, so a mask that
ignores the expression cannot score well). Expressions follow ``refshapes_grammar``; each is
*clear*: strictly true of its referent and strictly false of every other object under margins
of ``POS_MARGIN_FRAC * image_size`` pixels and a size ratio of ``exp(SIZE_MARGIN)``.

Masks: each shape is painted exactly where pycocotools rasterises its stored polygon
(decode(merge(frPyObjects(seg, h, w)))), so annotation and pixels agree up to JPEG noise.

Atomicity: images are written first (each through a temporary file and a rename), then
instances.json, refs(unc).p and generator.json are written into a temporary directory that is
renamed to root/refshapes in one step. generate() first deletes any root/refshapes it does not
accept, so root/refshapes exists only when the whole dataset is there. A complete dataset made
with the same parameters (generator.json matches and every image exists) is kept as is.

Splits: train/val/testA/testB are disjoint image sets from one distribution (RefCOCO's
people/objects distinction has no analogue here); all refs of an image share its split.
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from tfds_refcoco.refshapes_grammar import (
    COLORS,
    GENERIC_NOUN,
    POSITION_WORDS,
    RELATIONS,
    SHAPES,
    SIZE_WORDS,
    Description,
    Expression,
    SceneObject,
    evaluate,
)

FORMAT_VERSION = 1
DEFAULT_IMAGE_SIZE = 96
# Images per split at the defaults; about 3.3 referred objects and 2 expressions per referent
# per image, i.e. ~3000/300/150/150 objects.
DEFAULT_SPLIT_IMAGES: tuple[tuple[str, int], ...] = (
    ("train", 900),
    ("val", 90),
    ("testA", 45),
    ("testB", 45),
)
ANN_DIR = "refshapes"
IMAGE_DIR = "train2014"
INSTANCES_FILE = "instances.json"
REFS_FILE = "refs(unc).p"
MARKER_FILE = "generator.json"
IMAGE_PATTERN = "refshapes_%012d.jpg"

# Shape side as a fraction of the image side. The bands are >= 1.43x apart, so "small"/"big"
# always contrast two bands (same-band objects differ by < 1.25x = exp(SIZE_MARGIN)).
SMALL_BAND = (0.19, 0.23)
BIG_BAND = (0.33, 0.39)
MAX_BIG = 2  # more big shapes rarely fit without overlap at 5 shapes
GAP_FRAC = 0.04  # min gap between bounding boxes
EDGE_PX = 2.0
POS_MARGIN_FRAC = 0.10
SIZE_MARGIN = math.log(1.25)
CIRCLE_VERTICES = 32
STAR_INNER = 0.5  # inner/outer radius: a fat star is easy to segment at low resolution
# Chance that a new shape copies colour+shape / colour / shape of an earlier one, so that
# size and position words are often needed.
P_TWIN, P_SAME_COLOR, P_SAME_SHAPE = 0.15, 0.15, 0.15
P_BIG = 0.4
TYPE_WEIGHTS: dict[str, float] = {"attribute": 0.5, "size": 0.15, "position": 0.2, "relation": 0.15}
RELATION_TRIES = 24
CATEGORY_IDS: dict[str, int] = {s: i + 1 for i, s in enumerate(SHAPES)}


def margins(image_size: int) -> dict[str, float]:
    """The strict comparison margins the generator guarantees, as ``evaluate`` kwargs."""
    return {"pos_margin": POS_MARGIN_FRAC * image_size, "size_margin": SIZE_MARGIN}


def is_clear(expr: Expression, objects: list[SceneObject], referent: int, image_size: int) -> bool:
    """True iff ``expr`` strictly picks ``referent`` and leniently picks nothing else.

    With a relation, every object matching the head must also be clearly on one side of the
    landmark, even where the superlative would settle it anyway: a simpler rule to learn.
    """
    m = margins(image_size)
    lenient = {k: -v for k, v in m.items()}
    if evaluate(expr, objects, **m) != [referent] or evaluate(expr, objects, **lenient) != [
        referent
    ]:
        return False
    if expr.relation is not None and expr.superlative is not None:
        bare = Expression(expr.head, None, expr.relation, expr.landmark)
        return evaluate(bare, objects, **m) == evaluate(bare, objects, **lenient)
    return True


def split_sizes(num_images: int | None) -> list[tuple[str, int]]:
    """Images per split: the defaults, or ``num_images`` shared in the default proportions."""
    if num_images is None:
        return list(DEFAULT_SPLIT_IMAGES)
    if num_images < len(DEFAULT_SPLIT_IMAGES):
        raise ValueError(f"num_images must be >= {len(DEFAULT_SPLIT_IMAGES)}, got {num_images}")
    total = sum(n for _, n in DEFAULT_SPLIT_IMAGES)
    evals = [(s, max(1, round(num_images * n / total))) for s, n in DEFAULT_SPLIT_IMAGES[1:]]
    n_train = num_images - sum(n for _, n in evals)
    if n_train < 1:
        raise ValueError(f"num_images={num_images} leaves no training image")
    return [("train", n_train)] + evals


# ----------------------------------------------------------------------------- scenes


@dataclass(frozen=True)
class Shape:
    """One drawn shape: its stored polygon (flat, rounded) and what the grammar sees."""

    kind: str
    color: str
    polygon: list[float]
    bbox: list[float]

    @property
    def obj(self) -> SceneObject:
        return SceneObject.from_bbox(self.kind, self.color, self.bbox)


def shape_polygon(kind: str, x0: float, y0: float, d: float) -> list[float]:
    """Flat polygon [x1, y1, ...] of a shape whose bounding box is about (x0, y0, d, d)."""
    cx, cy = x0 + d / 2.0, y0 + d / 2.0
    if kind == "circle":
        t = 2 * np.pi * np.arange(CIRCLE_VERTICES) / CIRCLE_VERTICES
        pts = np.stack([cx + d / 2 * np.cos(t), cy + d / 2 * np.sin(t)], 1)
    elif kind == "square":
        pts = np.array([[x0, y0], [x0 + d, y0], [x0 + d, y0 + d], [x0, y0 + d]])
    elif kind == "triangle":  # pointing up, base d, height d
        pts = np.array([[cx, y0], [x0 + d, y0 + d], [x0, y0 + d]])
    elif kind == "star":  # 5 points, width exactly d; shifted so its box is centred
        r = d / (2 * np.sin(np.radians(72)))
        t = np.radians(-90 + 36 * np.arange(10))
        radius = np.where(np.arange(10) % 2 == 0, r, r * STAR_INNER)
        oy = cy + r * (1 - np.sin(np.radians(54))) / 2
        pts = np.stack([cx + radius * np.cos(t), oy + radius * np.sin(t)], 1)
    else:
        raise ValueError(f"unknown shape kind {kind!r}")
    return [round(float(v), 2) for v in pts.reshape(-1)]


def polygon_bbox(polygon: list[float]) -> list[float]:
    xs, ys = polygon[0::2], polygon[1::2]
    x, y = min(xs), min(ys)
    return [x, y, round(max(xs) - x, 2), round(max(ys) - y, 2)]


def polygon_mask(polygon: list[float], height: int, width: int) -> np.ndarray:
    """uint8[h, w] mask exactly as the builder decodes it (pycocotools)."""
    rle = mask_utils.merge(mask_utils.frPyObjects([polygon], height, width))
    return np.asarray(mask_utils.decode(rle), dtype=np.uint8)


def _pick_attributes(rng: np.random.Generator, n: int) -> list[tuple[str, str]]:
    colors, out = list(COLORS), []
    for i in range(n):
        shape, color = SHAPES[rng.integers(len(SHAPES))], colors[rng.integers(len(colors))]
        if i > 0:
            prev_shape, prev_color = out[int(rng.integers(i))]
            u = rng.random()
            if u < P_TWIN:
                shape, color = prev_shape, prev_color
            elif u < P_TWIN + P_SAME_COLOR:
                color = prev_color
            elif u < P_TWIN + P_SAME_COLOR + P_SAME_SHAPE:
                shape = prev_shape
        out.append((shape, color))
    return out


def sample_shapes(rng: np.random.Generator, image_size: int) -> list[Shape] | None:
    """3-5 non-overlapping shapes, or None when rejection sampling fails (caller retries)."""
    n = int(rng.integers(3, 6))
    attrs = _pick_attributes(rng, n)
    big = rng.random(n) < P_BIG
    big[np.flatnonzero(big)[MAX_BIG:]] = False
    gap = GAP_FRAC * image_size
    boxes: dict[int, tuple[float, float, float]] = {}
    for i in sorted(range(n), key=lambda j: not big[j]):  # big ones first: they fit worst
        lo, hi = BIG_BAND if big[i] else SMALL_BAND
        d = image_size * rng.uniform(lo, hi)
        for _ in range(60):
            x0, y0 = rng.uniform(EDGE_PX, image_size - EDGE_PX - d, size=2)
            if all(
                x0 + d + gap <= bx
                or bx + bd + gap <= x0
                or y0 + d + gap <= by
                or by + bd + gap <= y0
                for bx, by, bd in boxes.values()
            ):
                boxes[i] = (float(x0), float(y0), float(d))
                break
        else:
            return None
    shapes = []
    for i, (kind, color) in enumerate(attrs):
        poly = shape_polygon(kind, *boxes[i])
        shapes.append(Shape(kind, color, poly, polygon_bbox(poly)))
    return shapes


# ------------------------------------------------------------------------ expressions


def _head_descriptions(obj: SceneObject) -> list[Description]:
    return [
        Description(obj.color, obj.shape),
        Description(None, obj.shape),
        Description(obj.color, GENERIC_NOUN),
        Description(None, GENERIC_NOUN),
    ]


def _landmark_description(lm: int, objs: list[SceneObject]) -> Description | None:
    """The most natural description that names ``objs[lm]`` alone, if any."""
    for desc in _head_descriptions(objs[lm])[:3]:
        if sum(desc.matches(o) for o in objs) == 1:
            return desc
    return None


def candidate_expressions(
    rng: np.random.Generator, objs: list[SceneObject], r: int, image_size: int
) -> dict[str, list[Expression]]:
    """Clear expressions for ``objs[r]`` by type (relations are sampled, the rest exhaustive)."""
    heads = _head_descriptions(objs[r])
    pools: dict[str, list[Expression]] = {
        "attribute": [Expression(h) for h in heads[:3]],
        "size": [Expression(h, w) for w in SIZE_WORDS for h in heads],
        "position": [Expression(h, w) for w in POSITION_WORDS for h in heads],
        "relation": [],
    }
    others = [i for i in range(len(objs)) if i != r]
    for _ in range(RELATION_TRIES):
        lm = others[int(rng.integers(len(others)))]
        lm_desc = _landmark_description(lm, objs)
        if lm_desc is None:
            continue
        sup = SIZE_WORDS[int(rng.integers(2))] if rng.random() < 0.3 else None
        expr = Expression(
            heads[int(rng.integers(len(heads)))], sup, RELATIONS[int(rng.integers(4))], lm_desc
        )
        if expr not in pools["relation"]:
            pools["relation"].append(expr)
    return {t: [e for e in p if is_clear(e, objs, r, image_size)] for t, p in pools.items()}


def choose_expressions(
    rng: np.random.Generator, pools: dict[str, list[Expression]], k: int
) -> list[Expression]:
    """Up to ``k`` distinct expressions; each draw picks a type by ``TYPE_WEIGHTS``."""
    pools = {t: [pools[t][i] for i in rng.permutation(len(pools[t]))] for t in TYPE_WEIGHTS}
    chosen: list[Expression] = []
    while len(chosen) < k:
        avail = [t for t in TYPE_WEIGHTS if pools[t]]
        if not avail:
            break
        w = np.array([TYPE_WEIGHTS[t] for t in avail])
        chosen.append(pools[avail[int(rng.choice(len(avail), p=w / w.sum()))]].pop())
    return chosen


@dataclass(frozen=True)
class Scene:
    shapes: list[Shape]
    refs: list[tuple[int, list[Expression]]]  # (shape index, expressions)


def sample_scene(seed: int, index: int, image_size: int) -> Scene:
    """The scene of image ``index``; depends only on (seed, index, image_size)."""
    rng = np.random.default_rng([seed, index, image_size])
    while True:
        shapes = sample_shapes(rng, image_size)
        if shapes is None:
            continue
        objs = [s.obj for s in shapes]
        k = int(rng.integers(1, 4))  # expressions per referent, equal within an image
        pools = [candidate_expressions(rng, objs, r, image_size) for r in range(len(objs))]
        referable = [r for r, p in enumerate(pools) if any(p.values())]
        n_refs = min(len(referable), int(rng.integers(3, 5)))
        if n_refs < 3:
            continue
        chosen = sorted(int(r) for r in rng.choice(referable, n_refs, replace=False))
        return Scene(shapes, [(r, choose_expressions(rng, pools[r], k)) for r in chosen])


def render_scene(
    rng: np.random.Generator, shapes: list[Shape], image_size: int
) -> tuple[np.ndarray, list[np.ndarray]]:
    """uint8[S, S, 3] image and each shape's mask; pixels are painted from the masks."""
    s = image_size
    base = rng.uniform(25, 70) + rng.uniform(-8, 8, size=3)
    img = base + rng.normal(0.0, 3.0, size=(s, s, 3))
    masks = []
    for sh in shapes:
        m = polygon_mask(sh.polygon, s, s)
        color = np.array(COLORS[sh.color], np.float64) + rng.uniform(-10, 10, size=3)
        img[m.astype(bool)] = color + rng.normal(0.0, 2.0, size=(int(m.sum()), 3))
        masks.append(m)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), masks


# ----------------------------------------------------------------------------- writing


def _params(seed: int, num_images: int | None, image_size: int) -> dict[str, int]:
    total = sum(n for _, n in split_sizes(num_images))
    return {
        "format_version": FORMAT_VERSION,
        "seed": int(seed),
        "num_images": total,
        "image_size": int(image_size),
    }


def is_complete(
    root: str | os.PathLike,
    *,
    seed: int = 0,
    num_images: int | None = None,
    image_size: int = DEFAULT_IMAGE_SIZE,
) -> bool:
    """Whether ``root`` holds a finished RefShapes made with exactly these parameters."""
    root = Path(root)
    marker = root / ANN_DIR / MARKER_FILE
    try:
        if json.loads(marker.read_text()) != _params(seed, num_images, image_size):
            return False
    except (OSError, ValueError):
        return False
    total = _params(seed, num_images, image_size)["num_images"]
    return (
        (root / ANN_DIR / INSTANCES_FILE).is_file()
        and (root / ANN_DIR / REFS_FILE).is_file()
        and all((root / IMAGE_DIR / (IMAGE_PATTERN % (i + 1))).is_file() for i in range(total))
    )


def _write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def generate(
    root: str | os.PathLike,
    *,
    seed: int = 0,
    num_images: int | None = None,
    image_size: int = DEFAULT_IMAGE_SIZE,
) -> None:
    """Write RefShapes under ``root`` in the refer raw layout (see the module docstring)."""
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32, got {image_size}")
    root = Path(root)
    params = _params(seed, num_images, image_size)
    if is_complete(root, seed=seed, num_images=num_images, image_size=image_size):
        return
    ann_dir, img_dir = root / ANN_DIR, root / IMAGE_DIR
    if ann_dir.exists():  # stale or partial: must not look complete while images change
        shutil.rmtree(ann_dir)
    img_dir.mkdir(parents=True, exist_ok=True)

    images, annotations, refs = [], [], []
    ann_id = sent_id = ref_id = 0
    index = 0
    for split, count in split_sizes(num_images):
        for _ in range(count):
            image_id, file_name = index + 1, IMAGE_PATTERN % (index + 1)
            scene = sample_scene(seed, index, image_size)
            pixels, masks = render_scene(
                np.random.default_rng([seed, index, image_size, 1]), scene.shapes, image_size
            )
            buf = _jpeg_bytes(pixels)
            _write_bytes(img_dir / file_name, buf)
            images.append(
                {"id": image_id, "file_name": file_name, "height": image_size, "width": image_size}
            )
            ann_ids = []
            for sh, m in zip(scene.shapes, masks, strict=True):
                ann_id += 1
                ann_ids.append(ann_id)
                annotations.append(
                    {
                        "id": ann_id,
                        "image_id": image_id,
                        "category_id": CATEGORY_IDS[sh.kind],
                        "segmentation": [sh.polygon],
                        "area": float(m.sum()),
                        "bbox": sh.bbox,
                        "iscrowd": 0,
                        "color": sh.color,  # extra key (not COCO): the grammar's colour
                    }
                )
            for r, exprs in scene.refs:
                sentences = []
                for e in exprs:
                    raw = e.text()
                    sent = raw.lower()
                    sentences.append(
                        {"tokens": sent.split(), "raw": raw, "sent_id": sent_id, "sent": sent}
                    )
                    sent_id += 1
                refs.append(
                    {
                        "sent_ids": [s["sent_id"] for s in sentences],
                        # like RefCOCO: not a real file; the image is image_id's file_name
                        "file_name": f"refshapes_{image_id:012d}_{ann_ids[r]}.jpg",
                        "ann_id": ann_ids[r],
                        "ref_id": ref_id,
                        "image_id": image_id,
                        "split": split,
                        "sentences": sentences,
                        "category_id": CATEGORY_IDS[scene.shapes[r].kind],
                    }
                )
                ref_id += 1
            index += 1
    _remove_stale_images(img_dir, index)

    instances = {
        "info": {"description": "RefShapes synthetic referring segmentation", **params},
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": CATEGORY_IDS[s], "name": s, "supercategory": "shape"} for s in SHAPES
        ],
    }
    tmp = Path(tempfile.mkdtemp(prefix=".refshapes-", dir=root))
    try:
        (tmp / INSTANCES_FILE).write_text(json.dumps(instances, separators=(",", ":")))
        (tmp / REFS_FILE).write_bytes(pickle.dumps(refs, protocol=2))
        (tmp / MARKER_FILE).write_text(json.dumps(params, sort_keys=True))
        try:
            os.rename(tmp, ann_dir)  # the single step that makes the dataset visible
        except OSError:
            # another process finished the same dataset first: fine if it matches
            if not is_complete(root, seed=seed, num_images=num_images, image_size=image_size):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _jpeg_bytes(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    # 4:4:4 chroma keeps the colour edges of small shapes crisp
    Image.fromarray(pixels, "RGB").save(out, format="JPEG", quality=95, subsampling=0)
    return out.getvalue()


def _remove_stale_images(img_dir: Path, count: int) -> None:
    """Delete our own images beyond ``count`` left by an earlier, larger generation."""
    for p in img_dir.glob("refshapes_*.jpg"):
        stem = p.stem.removeprefix("refshapes_")
        if stem.isdigit() and len(stem) == 12 and int(stem) > count:
            p.unlink()
