"""Importing Darknet .weights files and PyTorch-style state dicts into DarkNet-53."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lts_jax.models.darknet import ConvBN, DarkNet, stage_blocks_for_depth
from lts_jax.models.darknet_weights import (
    DARKNET53_FLOATS,
    load_visual_variables,
    main,
    merge_visual_variables,
    read_darknet_weights,
    read_header,
    require_full_darknet53,
    yolov3_head_floats,
)
from lts_jax.models.model import create_model, init_variables, model_config
from lts_jax.models.state_dict_import import (
    load_state_dict,
    save_state_dict,
    state_dict_to_variables,
    variables_to_state_dict,
)


def reference_layers() -> list[tuple[str, tuple[str, ...], int, int, int]]:
    """DarkNet-53 conv layers written out independently of lts_jax: (label, path, in, out, k)."""
    layers = [("stem", ("stem",), 3, 32, 3)]
    cin = 32
    for i, (c, n) in enumerate(zip((64, 128, 256, 512, 1024), (1, 2, 8, 8, 4), strict=True)):
        layers.append((f"down{i}", (f"down{i}",), cin, c, 3))
        for j in range(n):
            block = f"stage{i}_block{j}"
            layers.append((block + "/conv1", (block, "conv1"), c, c // 2, 1))
            layers.append((block + "/conv2", (block, "conv2"), c // 2, c, 3))
        cin = c
    return layers


def write_weights(path: str, data: np.ndarray, major: int = 0, minor: int = 2) -> None:
    with open(path, "wb") as f:
        np.array([major, minor, 0], "<i4").tofile(f)
        seen = np.array([32013312], "<i8" if major * 10 + minor >= 2 else "<i4")
        seen.tofile(f)
        data.astype("<f4").tofile(f)


@pytest.fixture(scope="module")
def backbone(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A darknet53.conv.74-shaped file of random values; offsets kept for checking."""
    layers = reference_layers()
    total = sum(4 * o + i * o * k * k for _, _, i, o, k in layers)
    assert total == DARKNET53_FLOATS
    data = np.random.default_rng(0).standard_normal(total, dtype=np.float32) * 0.1
    offsets = {}
    pos = 0
    for label, path, cin, cout, k in layers:
        beta, gamma, mean, var = (slice(pos + n * cout, pos + (n + 1) * cout) for n in range(4))
        data[gamma] += 1.0
        data[var] = np.abs(data[var]) + 0.5  # variances must be positive
        weight = slice(pos + 4 * cout, pos + 4 * cout + cout * cin * k * k)
        offsets[label] = dict(path=path, shape=(cout, cin, k, k), beta=beta, gamma=gamma,
                              mean=mean, var=var, weight=weight)
        pos = weight.stop
    file = str(tmp_path_factory.mktemp("darknet") / "darknet53.conv.74")
    write_weights(file, data)
    return {"file": file, "data": data, "offsets": offsets,
            "variables": read_darknet_weights(file)}


def _layer(variables: dict, path: tuple[str, ...]) -> tuple[dict, dict]:
    p, s = variables["params"], variables["batch_stats"]
    for key in path:
        p, s = p[key], s[key]
    return p, s


@pytest.mark.parametrize("label", ["stem", "down0", "stage0_block0/conv2", "stage3_block5/conv1",
                                   "stage4_block3/conv2"])
def test_each_value_lands_in_its_place(backbone: dict, label: str) -> None:
    o, data = backbone["offsets"][label], backbone["data"]
    params, stats = _layer(backbone["variables"], o["path"])
    oihw = data[o["weight"]].reshape(o["shape"])
    np.testing.assert_array_equal(params["conv"]["kernel"], oihw.transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(params["bn"]["scale"], data[o["gamma"]])
    np.testing.assert_array_equal(params["bn"]["bias"], data[o["beta"]])
    np.testing.assert_array_equal(stats["bn"]["mean"], data[o["mean"]])
    np.testing.assert_array_equal(stats["bn"]["var"], data[o["var"]])


def test_whole_tree_fits_darknet53(backbone: dict) -> None:
    model = DarkNet()
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)),
                                               train=False))
    loaded = jax.tree_util.tree_map(lambda x: x.shape, backbone["variables"])
    assert loaded == jax.tree_util.tree_map(lambda x: x.shape, dict(shapes))
    cfg = model_config("full")
    cfg.vocab_size = 10
    lts = create_model(cfg)
    full_vars = jax.eval_shape(lambda: init_variables(lts, jax.random.key(0), 64, 4))
    merged = merge_visual_variables(full_vars, backbone["variables"])
    assert merged["params"]["visual"]["stem"]["conv"]["kernel"].shape == (3, 3, 3, 32)
    assert merged["params"]["text"] is full_vars["params"]["text"]
    tiny = model_config("tiny")
    tiny.vocab_size = 10
    tiny_vars = jax.eval_shape(lambda: init_variables(create_model(tiny), jax.random.key(0), 64, 4))
    with pytest.raises(ValueError, match="do not fit"):
        merge_visual_variables(tiny_vars, backbone["variables"])
    with pytest.raises(ValueError, match="width_mult=1.0"):
        require_full_darknet53(tiny)
    with pytest.raises(ValueError, match="width_mult=1.0"):
        read_darknet_weights(backbone["file"], model_cfg=tiny)


def _numpy_conv_bn_leaky(x: np.ndarray, kernel_oihw: np.ndarray, gamma: np.ndarray,
                         beta: np.ndarray, mean: np.ndarray, var: np.ndarray,
                         stride: int) -> np.ndarray:
    """Reference: zero-pad k//2, cross-correlate, BN inference, LeakyReLU(0.1)."""
    cout, cin, k, _ = kernel_oihw.shape
    pad = k // 2
    xp = np.pad(x.astype(np.float64), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    h_out = (x.shape[1] + 2 * pad - k) // stride + 1
    w_out = (x.shape[2] + 2 * pad - k) // stride + 1
    y = np.zeros((x.shape[0], h_out, w_out, cout))
    for dy in range(k):
        for dx in range(k):
            patch = xp[:, dy:dy + stride * h_out:stride, dx:dx + stride * w_out:stride, :]
            y += np.einsum("bhwi,oi->bhwo", patch, kernel_oihw[:, :, dy, dx])
    y = (y - mean) / np.sqrt(var.astype(np.float64) + 1e-5) * gamma + beta
    return np.where(y > 0, y, 0.1 * y)


@pytest.mark.parametrize("label,stride", [("stem", 1), ("down0", 2), ("stage1_block1/conv2", 1)])
def test_converted_layer_matches_numpy_reference(backbone: dict, label: str, stride: int) -> None:
    o, data = backbone["offsets"][label], backbone["data"]
    cout, cin, k, _ = o["shape"]
    params, stats = _layer(backbone["variables"], o["path"])
    x = np.random.default_rng(1).uniform(size=(1, 8, 8, cin)).astype(np.float32)
    layer = ConvBN(cout, k, strides=stride)
    got = layer.apply({"params": params, "batch_stats": stats}, x, use_running_average=True)
    want = _numpy_conv_bn_leaky(x, data[o["weight"]].reshape(o["shape"]), data[o["gamma"]],
                                data[o["beta"]], data[o["mean"]], data[o["var"]], stride)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


def test_wrong_size_and_header_versions(backbone: dict, tmp_path: os.PathLike) -> None:
    short = str(tmp_path / "short.weights")
    write_weights(short, backbone["data"][:1000])
    with pytest.raises(ValueError, match=r"short\.weights.*expected 40620640.*found 1000"):
        read_darknet_weights(short)
    old = str(tmp_path / "old.weights")  # version 0.1: 'seen' is int32
    write_weights(old, backbone["data"], major=0, minor=1)
    assert read_header(old) == ((0, 1, 0, 32013312), 16)
    assert read_header(backbone["file"]) == ((0, 2, 0, 32013312), 20)
    got = read_darknet_weights(old)["params"]["stage4_block3"]["conv2"]["bn"]["scale"]
    np.testing.assert_array_equal(
        got, backbone["variables"]["params"]["stage4_block3"]["conv2"]["bn"]["scale"])


def test_yolov3_file_uses_first_52_convs(backbone: dict, tmp_path: os.PathLike) -> None:
    assert DARKNET53_FLOATS + yolov3_head_floats(80) == (248_007_048 - 20) // 4  # yolov3.weights
    yolo = str(tmp_path / "yolov3.weights")
    shutil.copyfile(backbone["file"], yolo)
    with open(yolo, "r+b") as f:  # head values are never read: a sparse zero tail will do
        f.truncate(os.path.getsize(yolo) + 4 * yolov3_head_floats(80))
    loaded = read_darknet_weights(yolo)
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, backbone["variables"])
    with open(yolo, "r+b") as f:  # a tail that is no YOLOv3 head
        f.truncate(os.path.getsize(yolo) + 4 * 7)
    with pytest.raises(ValueError, match="allow_trailing"):
        read_darknet_weights(yolo)
    assert read_darknet_weights(yolo, allow_trailing=True)["params"].keys() == loaded[
        "params"].keys()


def test_cli_writes_msgpack_for_training(backbone: dict, tmp_path: os.PathLike,
                                         capsys: pytest.CaptureFixture) -> None:
    out = str(tmp_path / "darknet53.msgpack")
    main(["--weights", backbone["file"], "--out", out])
    assert "52 conv layers" in capsys.readouterr().out
    restored = load_visual_variables(out)
    jax.tree_util.tree_map(np.testing.assert_array_equal, restored, backbone["variables"])


def test_state_dict_round_trip_npz_and_safetensors(backbone: dict, tmp_path: os.PathLike) -> None:
    # Full DarkNet-53 through .safetensors with a 'backbone.' prefix, auto-detected.
    sd = variables_to_state_dict(backbone["variables"], prefix="backbone.")
    assert sd["backbone.layers.0.conv.weight"].shape == (32, 3, 3, 3)  # OIHW
    assert sd["backbone.layers.51.bn.running_var"].shape == (1024,)
    st = str(tmp_path / "darknet53.safetensors")
    save_state_dict(st, sd)
    jax.tree_util.tree_map(np.testing.assert_array_equal, load_visual_variables(st),
                           backbone["variables"])

    # A small DarkNet through .npz, with extra unrelated keys ignored.
    blocks = stage_blocks_for_depth(0.125)
    model = DarkNet(width_mult=0.0625, stage_blocks=blocks)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                                               train=False))
    rng = np.random.default_rng(2)  # arbitrary values: only the mapping is under test
    small = jax.tree_util.tree_map(lambda x: rng.standard_normal(x.shape, np.float32),
                                   dict(shapes))
    sd = variables_to_state_dict(small, width_mult=0.0625, stage_blocks=blocks)
    sd["head.weight"] = np.zeros(3, np.float32)
    sd["layers.0.bn.num_batches_tracked"] = np.array(5)
    npz = str(tmp_path / "small.npz")
    save_state_dict(npz, sd)
    loaded = state_dict_to_variables(load_state_dict(npz), width_mult=0.0625, stage_blocks=blocks)
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, small)
    del sd["layers.3.bn.running_mean"]
    with pytest.raises(KeyError, match="layers.3.bn.running_mean"):
        state_dict_to_variables(sd, width_mult=0.0625, stage_blocks=blocks)
    with pytest.raises(ValueError, match="has 52 conv layers"):  # small state dict, full model
        state_dict_to_variables(load_state_dict(npz))
    with pytest.raises(ValueError, match="conv weight"):  # same depth, other width
        state_dict_to_variables(load_state_dict(npz), width_mult=0.125, stage_blocks=blocks)
