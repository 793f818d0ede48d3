"""Pretrained DarkNet-53 weights for the 'visual' encoder.

Where the files come from:
- ImageNet-trained backbone (52 convs, 162,482,580 bytes):
  https://pjreddie.com/media/files/darknet53.conv.74
- COCO-trained YOLOv3 (backbone + detection head, 248,007,048 bytes):
  https://pjreddie.com/media/files/yolov3.weights
- MCN-family work (MCN, LTS, SimREC) starts from a YOLOv3 trained on COCO with the
  images of RefCOCO/RefCOCO+/RefCOCOg val/test removed, so that no evaluation image
  was seen in pre-training; use that copy for comparable numbers. It is a Darknet
  ``.weights`` file of the same layout (any class count is accepted).

Darknet binary format: int32 major, minor, revision; ``seen`` as int64 if
major*10 + minor >= 2 (and both < 1000) else int32; then float32 per conv layer in
network order: BN beta, gamma, running mean, running variance, then the conv
weights (OIHW). The first 52 convs are the DarkNet-53 backbone; anything after
them (the YOLOv3 head) is ignored. Only full-width, full-depth DarkNet-53 can take
these weights. PyTorch-style state dicts in .npz/.safetensors are read by
``lts_jax.models.state_dict_import`` (key layout documented there).

Converted weights are stored as flax msgpack of {'params', 'batch_stats'} of the
'visual' subtree:

    python -m lts_jax.models.darknet_weights --weights darknet53.conv.74 --out darknet53.msgpack

and loaded in training with ``load_visual_variables`` + ``merge_visual_variables``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import serialization

from lts_jax.models.darknet import (
    FULL_STAGE_BLOCKS,
    darknet_conv_specs,
    is_full_darknet53,
    stage_blocks_for_depth,
)
from lts_jax.models.state_dict_import import (
    ConvBNArrays,
    layers_to_variables,
    load_state_dict,
    state_dict_to_variables,
)

DARKNET53_CONV_LAYERS = 52
DARKNET53_FLOATS = 40_620_640  # sum over the 52 convs of 4*out + out*in*k*k


def require_full_darknet53(model_cfg: ml_collections.ConfigDict) -> None:
    """Raises ValueError unless the model config's visual encoder is full DarkNet-53."""
    blocks = stage_blocks_for_depth(model_cfg.visual.depth_mult)
    if not is_full_darknet53(model_cfg.visual.width_mult, blocks):
        raise ValueError(
            "pretrained DarkNet-53 weights need visual.width_mult=1.0 and visual.depth_mult=1.0 "
            f"(blocks {FULL_STAGE_BLOCKS}); this config has width {model_cfg.visual.width_mult} "
            f"and blocks {blocks}"
        )


def read_header(path: str | os.PathLike[str]) -> tuple[tuple[int, int, int, int], int]:
    """((major, minor, revision, seen), header size in bytes) of a Darknet .weights file."""
    with open(path, "rb") as f:
        head = np.fromfile(f, dtype="<i4", count=3)
        if head.size != 3:
            raise ValueError(f"{os.fspath(path)}: too short to be a Darknet .weights file")
        major, minor, revision = (int(v) for v in head)
        wide_seen = major * 10 + minor >= 2 and major < 1000 and minor < 1000
        seen = np.fromfile(f, dtype="<i8" if wide_seen else "<i4", count=1)
        if seen.size != 1:
            raise ValueError(f"{os.fspath(path)}: too short to be a Darknet .weights file")
    return (major, minor, revision, int(seen[0])), 12 + (8 if wide_seen else 4)


def yolov3_head_floats(num_classes: int) -> int:
    """Floats of the YOLOv3 detection head that follows the backbone in yolov3.weights."""
    out = 3 * (5 + num_classes)

    def bn(cin: int, cout: int, k: int) -> int:
        return 4 * cout + cin * cout * k * k

    def scale(cin: int, width: int) -> int:  # 5 alternating 1x1/3x3 convs, a 3x3, detector
        return (bn(cin, width, 1) + 2 * bn(width, 2 * width, 3) + 2 * bn(2 * width, width, 1)
                + bn(width, 2 * width, 3) + out + 2 * width * out)

    return (scale(1024, 512) + bn(512, 256, 1) + scale(768, 256) + bn(256, 128, 1)
            + scale(384, 128))


def _yolov3_classes(trailing: int) -> int | None:
    """The class count whose YOLOv3 head has exactly ``trailing`` floats, if any."""
    base = yolov3_head_floats(0)
    per_class = yolov3_head_floats(1) - base
    if trailing <= base or (trailing - base) % per_class:
        return None
    return (trailing - base) // per_class


def read_darknet_weights(
    path: str | os.PathLike[str],
    *,
    model_cfg: ml_collections.ConfigDict | None = None,
    allow_trailing: bool = False,
) -> dict[str, dict[str, Any]]:
    """DarkNet-53 {'params', 'batch_stats'} (numpy) from a Darknet .weights file.

    Accepts a backbone file (exactly the 52 convs) or a YOLOv3 file (backbone +
    a YOLOv3 head of any class count, recognised by its size); other trailing data
    is an error unless ``allow_trailing``. ``model_cfg``, if given, must describe
    full DarkNet-53.
    """
    if model_cfg is not None:
        require_full_darknet53(model_cfg)
    name = os.fspath(path)
    _, header_bytes = read_header(path)
    payload = os.path.getsize(path) - header_bytes
    found = payload // 4
    if payload % 4 or found < DARKNET53_FLOATS:
        raise ValueError(
            f"{name}: size does not match DarkNet-53: expected {DARKNET53_FLOATS} float32 "
            f"values after the {header_bytes}-byte header, found {payload / 4:g}"
        )
    trailing = found - DARKNET53_FLOATS
    if trailing and _yolov3_classes(trailing) is None and not allow_trailing:
        raise ValueError(
            f"{name}: size does not match DarkNet-53: expected {DARKNET53_FLOATS} float32 "
            f"values (backbone) or that plus a YOLOv3 head ({DARKNET53_FLOATS} + "
            f"{yolov3_head_floats(80)} for 80 classes), found {found}; pass allow_trailing "
            "(--allow-trailing) to take the first 52 convs anyway"
        )
    data = np.fromfile(path, dtype="<f4", count=DARKNET53_FLOATS, offset=header_bytes)

    specs = darknet_conv_specs(1.0, FULL_STAGE_BLOCKS)
    layers, offset = [], 0

    def take(n: int) -> np.ndarray:
        nonlocal offset
        offset += n
        return data[offset - n : offset]

    for spec in specs:
        c_out = spec.out_channels
        beta, gamma, mean, var = take(c_out), take(c_out), take(c_out), take(c_out)
        shape = (c_out, spec.in_channels, spec.kernel_size, spec.kernel_size)
        weight = take(int(np.prod(shape))).reshape(shape)
        layers.append(ConvBNArrays(weight=weight, gamma=gamma, beta=beta, mean=mean, var=var))
    assert offset == DARKNET53_FLOATS, offset
    return layers_to_variables(specs, layers, name)


def load_visual_variables(
    path: str | os.PathLike[str], *, allow_trailing: bool = False
) -> dict[str, dict[str, Any]]:
    """{'params', 'batch_stats'} for the 'visual' subtree from any supported file.

    .msgpack (written by this module's CLI), .weights (Darknet), .npz or
    .safetensors (state dict, see ``lts_jax.models.state_dict_import``).
    """
    name = os.fspath(path)
    if name.endswith(".msgpack"):
        with open(name, "rb") as f:
            restored = serialization.msgpack_restore(f.read())
        if set(restored) != {"params", "batch_stats"}:
            raise ValueError(f"{name}: expected keys params, batch_stats; got {sorted(restored)}")
        return restored
    if name.endswith(".weights") or name.endswith(".74"):
        return read_darknet_weights(name, allow_trailing=allow_trailing)
    if name.endswith(".npz") or name.endswith(".safetensors"):
        return state_dict_to_variables(load_state_dict(name), source=name)
    raise ValueError(f"{name}: unknown weights format (.msgpack, .weights, .npz, .safetensors)")


def save_visual_variables(path: str | os.PathLike[str], variables: Mapping[str, Any]) -> None:
    """Writes {'params', 'batch_stats'} as flax msgpack."""
    tree = {k: jax.tree_util.tree_map(np.asarray, dict(variables[k]))
            for k in ("params", "batch_stats")}
    with open(path, "wb") as f:
        f.write(serialization.msgpack_serialize(tree))


def merge_visual_variables(
    variables: Mapping[str, Any], visual: Mapping[str, Any]
) -> dict[str, Any]:
    """Model variables with 'visual' params/batch_stats replaced by ``visual``.

    Structures and shapes must match exactly (a clear error names the first
    mismatches, e.g. when the model is not full DarkNet-53).
    """
    out = dict(variables)
    for col in ("params", "batch_stats"):
        target = variables[col]["visual"]
        want = jax.tree_util.tree_flatten_with_path(target)[0]
        got = dict(jax.tree_util.tree_flatten_with_path(visual[col])[0])
        problems = []
        for key, leaf in want:
            if key not in got:
                problems.append(f"missing {jax.tree_util.keystr(key)}")
            elif tuple(np.shape(got[key])) != tuple(leaf.shape):
                problems.append(
                    f"{jax.tree_util.keystr(key)}: {np.shape(got[key])} vs model {leaf.shape}"
                )
        if len(got) != len(want):
            problems.append(f"{len(got)} leaves vs model {len(want)}")
        if problems:
            raise ValueError(f"visual {col} do not fit the model: " + "; ".join(problems[:5]))
        new = jax.tree_util.tree_map(
            lambda ref, v: np.asarray(v, dtype=ref.dtype), target, visual[col]
        )
        out[col] = {**variables[col], "visual": new}
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", required=True,
                        help=".weights (Darknet), .npz or .safetensors (state dict)")
    parser.add_argument("--out", required=True, help="output .msgpack")
    parser.add_argument("--allow-trailing", action="store_true",
                        help="accept extra data after the 52 backbone convs")
    args = parser.parse_args(argv)
    variables = load_visual_variables(args.weights, allow_trailing=args.allow_trailing)
    save_visual_variables(args.out, variables)
    n = sum(np.size(x) for x in jax.tree_util.tree_leaves(variables))
    print(f"wrote {args.out}: {len(darknet_conv_specs())} conv layers, {n} values")


if __name__ == "__main__":
    main()
