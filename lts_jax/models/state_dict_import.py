"""DarkNet parameters <-> PyTorch-style state dicts stored as .npz or .safetensors.

No pickle is ever loaded: .npz goes through ``np.load(allow_pickle=False)`` and
.safetensors through ``safetensors.numpy``. PyTorch ``.pt``/``.pth`` files are
pickles; convert them yourself with trusted code, e.g.
``np.savez(out, **{k: v.numpy() for k, v in torch.load(p).items()})``.

Key layout (conv layers numbered 0..N-1 in Darknet network order, 52 for
DarkNet-53: stem, then per stage the stride-2 conv followed by each residual
block's 1x1 and 3x3 conv), optionally behind a common prefix such as
``backbone.`` or ``module.``::

    layers.{i}.conv.weight        f32[out, in, kh, kw]   (OIHW, PyTorch order)
    layers.{i}.bn.weight          f32[out]               (gamma)
    layers.{i}.bn.bias            f32[out]               (beta)
    layers.{i}.bn.running_mean    f32[out]
    layers.{i}.bn.running_var     f32[out]
    layers.{i}.bn.num_batches_tracked                    (ignored if present)

Most PyTorch DarkNet-53 ports (conv without bias + BatchNorm2d per layer) map
onto this by renumbering their conv layers in order.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from lts_jax.models.darknet import FULL_STAGE_BLOCKS, ConvSpec, darknet_conv_specs

_BN_KEYS = ("weight", "bias", "running_mean", "running_var")


class ConvBNArrays(NamedTuple):
    """One layer's pretrained arrays in PyTorch/Darknet conventions."""

    weight: np.ndarray  # OIHW
    gamma: np.ndarray
    beta: np.ndarray
    mean: np.ndarray
    var: np.ndarray


def _set_path(tree: dict[str, Any], path: Sequence[str], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get_path(tree: Mapping[str, Any], path: Sequence[str]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def layers_to_variables(
    specs: Sequence[ConvSpec], layers: Sequence[ConvBNArrays], source: str
) -> dict[str, dict[str, Any]]:
    """Flax {'params', 'batch_stats'} for a DarkNet from per-layer arrays (OIHW -> HWIO)."""
    if len(specs) != len(layers):
        raise ValueError(f"{source}: {len(layers)} conv layers, architecture has {len(specs)}")
    params: dict[str, Any] = {}
    stats: dict[str, Any] = {}
    for spec, layer in zip(specs, layers, strict=True):
        want = (spec.out_channels, spec.in_channels, spec.kernel_size, spec.kernel_size)
        name = "/".join(spec.path)
        if tuple(layer.weight.shape) != want:
            raise ValueError(f"{source}: {name} conv weight {layer.weight.shape}, expected {want}")
        for what, arr in (("gamma", layer.gamma), ("beta", layer.beta), ("mean", layer.mean),
                          ("var", layer.var)):
            if tuple(arr.shape) != (spec.out_channels,):
                raise ValueError(f"{source}: {name} BN {what} {arr.shape}, "
                                 f"expected ({spec.out_channels},)")
        f32 = np.float32
        kernel = np.ascontiguousarray(np.transpose(layer.weight, (2, 3, 1, 0))).astype(f32)
        _set_path(params, (*spec.path, "conv", "kernel"), kernel)
        _set_path(params, (*spec.path, "bn", "scale"), np.asarray(layer.gamma, f32))
        _set_path(params, (*spec.path, "bn", "bias"), np.asarray(layer.beta, f32))
        _set_path(stats, (*spec.path, "bn", "mean"), np.asarray(layer.mean, f32))
        _set_path(stats, (*spec.path, "bn", "var"), np.asarray(layer.var, f32))
    return {"params": params, "batch_stats": stats}


def variables_to_layers(
    variables: Mapping[str, Any], specs: Sequence[ConvSpec]
) -> list[ConvBNArrays]:
    """Inverse of ``layers_to_variables`` (HWIO -> OIHW)."""
    out = []
    for spec in specs:
        p = _get_path(variables["params"], spec.path)
        s = _get_path(variables["batch_stats"], spec.path)
        out.append(
            ConvBNArrays(
                weight=np.transpose(np.asarray(p["conv"]["kernel"]), (3, 2, 0, 1)),
                gamma=np.asarray(p["bn"]["scale"]),
                beta=np.asarray(p["bn"]["bias"]),
                mean=np.asarray(s["bn"]["mean"]),
                var=np.asarray(s["bn"]["var"]),
            )
        )
    return out


def load_state_dict(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Reads a flat {name: array} from .npz (no pickle) or .safetensors."""
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        return dict(load_file(path))
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    raise ValueError(f"{path}: expected a .npz or .safetensors state dict")


def save_state_dict(path: str | os.PathLike[str], state_dict: Mapping[str, np.ndarray]) -> None:
    """Writes a flat {name: array} as .npz or .safetensors (by extension)."""
    path = os.fspath(path)
    arrays = {k: np.ascontiguousarray(v) for k, v in state_dict.items()}
    if path.endswith(".safetensors"):
        from safetensors.numpy import save_file

        save_file(arrays, path)
    elif path.endswith(".npz"):
        np.savez(path, **arrays)
    else:
        raise ValueError(f"{path}: expected a .npz or .safetensors file name")


def _detect_prefix(state_dict: Mapping[str, np.ndarray]) -> str:
    marker = "layers.0.conv.weight"
    hits = [k[: -len(marker)] for k in state_dict if k.endswith(marker)]
    if len(hits) != 1:
        raise ValueError(f"state dict has {len(hits)} keys ending in {marker!r}; expected one "
                         "(see lts_jax.models.state_dict_import for the key layout)")
    return hits[0]


def state_dict_to_variables(
    state_dict: Mapping[str, np.ndarray],
    *,
    width_mult: float = 1.0,
    stage_blocks: Sequence[int] = FULL_STAGE_BLOCKS,
    prefix: str | None = None,
    source: str = "state dict",
) -> dict[str, dict[str, Any]]:
    """DarkNet {'params', 'batch_stats'} from a state dict in the documented layout.

    ``prefix`` defaults to whatever precedes ``layers.0.conv.weight``. Keys of other
    modules (a detection head, say) under other names are ignored; missing keys
    and wrong shapes are errors.
    """
    prefix = _detect_prefix(state_dict) if prefix is None else prefix
    specs = darknet_conv_specs(width_mult, stage_blocks)
    pattern = re.compile(re.escape(prefix) + r"layers\.(\d+)\.conv\.weight")
    found = sorted(int(m.group(1)) for k in state_dict if (m := pattern.fullmatch(k)))
    if found != list(range(len(specs))):
        raise ValueError(f"{source}: conv layers {found[:3]}...{found[-3:]} ({len(found)}), "
                         f"but this DarkNet has {len(specs)} conv layers (0..{len(specs) - 1})")
    layers = []
    for i in range(len(specs)):
        base = f"{prefix}layers.{i}."
        names = [base + "conv.weight"] + [base + "bn." + k for k in _BN_KEYS]
        missing = [n for n in names if n not in state_dict]
        if missing:
            raise KeyError(f"{source}: missing {missing}")
        w, g, b, m, v = (np.asarray(state_dict[n]) for n in names)
        layers.append(ConvBNArrays(weight=w, gamma=g, beta=b, mean=m, var=v))
    return layers_to_variables(specs, layers, source)


def variables_to_state_dict(
    variables: Mapping[str, Any],
    *,
    width_mult: float = 1.0,
    stage_blocks: Sequence[int] = FULL_STAGE_BLOCKS,
    prefix: str = "",
) -> dict[str, np.ndarray]:
    """State dict (documented layout) from DarkNet {'params', 'batch_stats'}."""
    specs = darknet_conv_specs(width_mult, stage_blocks)
    out: dict[str, np.ndarray] = {}
    for i, layer in enumerate(variables_to_layers(variables, specs)):
        base = f"{prefix}layers.{i}."
        out[base + "conv.weight"] = layer.weight
        out[base + "bn.weight"] = layer.gamma
        out[base + "bn.bias"] = layer.beta
        out[base + "bn.running_mean"] = layer.mean
        out[base + "bn.running_var"] = layer.var
    return out
