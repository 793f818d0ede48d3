"""DarkNet-53 structure, output shapes and BatchNorm modes."""

from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lts_jax.models.darknet import (
    IM2COL_MAX_OUTPUT_POSITIONS,
    Conv,
    DarkNet,
    darknet_channels,
    darknet_conv_specs,
    is_full_darknet53,
    stage_blocks_for_depth,
)

# 'rbg' keys: threefry initialisers take seconds to compile on a CPU.
KEY = jax.random.key(0, impl="rbg")


def test_width_and_depth_multipliers() -> None:
    assert stage_blocks_for_depth(1.0) == (1, 2, 8, 8, 4)
    assert stage_blocks_for_depth(0.25) == (1, 1, 2, 2, 1)
    assert stage_blocks_for_depth(0.125) == (1, 1, 1, 1, 1)
    assert darknet_channels(1.0) == (32, (64, 128, 256, 512, 1024))
    assert darknet_channels(0.25) == (8, (16, 32, 64, 128, 256))
    specs = darknet_conv_specs()
    assert len(specs) == 52  # the 52 convs of darknet53.conv.74
    assert specs[0].path == ("stem",) and specs[-1].path == ("stage4_block3", "conv2")
    assert is_full_darknet53(1.0, (1, 2, 8, 8, 4)) and not is_full_darknet53(0.5, (1, 2, 8, 8, 4))


def test_full_darknet53_shapes_and_parameter_count() -> None:
    model = DarkNet()
    image = jax.ShapeDtypeStruct((2, 416, 416, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(KEY, x, train=False), image)
    c3, c4, c5 = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, image)
    assert (c3.shape, c4.shape, c5.shape) == ((2, 52, 52, 256), (2, 26, 26, 512), (2, 13, 13, 1024))
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(variables["params"]))
    # conv kernels + BN scale/bias of the 52 layers
    expect = sum(s.kernel_size**2 * s.in_channels * s.out_channels + 2 * s.out_channels
                 for s in darknet_conv_specs())
    assert n_params == expect == 40_584_928


def test_tiny_shapes_and_batchnorm_modes() -> None:
    blocks = stage_blocks_for_depth(0.125)
    image = np.random.default_rng(1).uniform(size=(2, 64, 64, 3)).astype(np.float32)
    model = DarkNet(width_mult=1 / 16, stage_blocks=blocks)
    variables = jax.jit(lambda k: model.init(k, image, train=False))(KEY)

    @partial(jax.jit, static_argnums=1)
    def run(v: dict, frozen: bool) -> tuple:
        m = DarkNet(width_mult=1 / 16, stage_blocks=blocks, bn_frozen=frozen)
        train_out, new = m.apply(v, image, train=True, mutable=["batch_stats"])
        return m.apply(v, image, train=False), train_out, new["batch_stats"]

    eval_out, train_out, stats = run(variables, False)
    _, stem_channels = darknet_channels(1 / 16)
    assert [o.shape for o in eval_out] == [
        (2, 8, 8, stem_channels[2]), (2, 4, 4, stem_channels[3]), (2, 2, 2, stem_channels[4])
    ]
    # Train mode normalises with batch statistics and updates the running ones.
    assert not np.allclose(eval_out[2], train_out[2], atol=1e-3)
    old_mean = variables["batch_stats"]["stem"]["bn"]["mean"]
    assert not np.allclose(stats["stem"]["bn"]["mean"], old_mean)

    # Frozen: train=True behaves like inference and leaves the statistics alone.
    eval_f, train_f, stats_f = run(variables, True)
    for a, b in zip(eval_f, train_f, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    jax.tree_util.tree_map(np.testing.assert_array_equal, stats_f, variables["batch_stats"])


def test_levels_give_every_stage_and_call_gives_the_last_three() -> None:
    blocks = stage_blocks_for_depth(0.125)
    image = np.random.default_rng(2).uniform(size=(1, 64, 64, 3)).astype(np.float32)
    model = DarkNet(width_mult=1 / 16, stage_blocks=blocks)
    variables = model.init(KEY, image, train=False)
    levels = model.apply(variables, image, train=False, method=DarkNet.levels)
    _, channels = darknet_channels(1 / 16)
    assert [x.shape for x in levels] == [
        (1, 64 // s, 64 // s, c) for s, c in zip((2, 4, 8, 16, 32), channels, strict=True)
    ]
    # Same parameters either way: __call__ is levels()[2:].
    for a, b in zip(model.apply(variables, image, train=False), levels[2:], strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "size, kernel_size, strides",
    [(2, 3, 1), (4, 3, 2), (3, 3, 1), (5, 3, 2), (2, 1, 1), (1, 3, 1),  # im2col + matmul
     (8, 3, 2), (4, 3, 1), (6, 1, 1)],  # 16+ output positions: XLA's convolution
)
def test_conv_matches_flax_conv(size: int, kernel_size: int, strides: int) -> None:
    """Same parameter, same random draw and the same outputs and gradients as nn.Conv with
    symmetric padding, on both of its paths (tiny outputs run as im2col + matmul)."""
    x = jax.random.normal(jax.random.key(1), (2, size, size, 5))
    pad = kernel_size // 2
    ours = Conv(7, kernel_size, strides)
    flax_conv = nn.Conv(7, (kernel_size, kernel_size), strides=(strides, strides),
                        padding=((pad, pad), (pad, pad)), use_bias=False)
    variables = ours.init(KEY, x)
    assert jax.tree.structure(variables) == jax.tree.structure(flax_conv.init(KEY, x))
    np.testing.assert_array_equal(variables["params"]["kernel"],
                                  flax_conv.init(KEY, x)["params"]["kernel"])

    def loss(module: nn.Module, v: dict, x: jax.Array) -> jax.Array:
        return jnp.sum(jnp.sin(module.apply(v, x)))

    ours_out = ours.apply(variables, x)
    assert ours_out.shape == flax_conv.apply(variables, x).shape
    np.testing.assert_allclose(ours_out, flax_conv.apply(variables, x), rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.grad(loss, argnums=(1, 2))(ours, variables, x),
                    jax.grad(loss, argnums=(1, 2))(flax_conv, variables, x), strict=True):
        for leaf_a, leaf_b in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            np.testing.assert_allclose(leaf_a, leaf_b, rtol=1e-4, atol=1e-4)
    # The path: XLA's convolution only above IM2COL_MAX_OUTPUT_POSITIONS output positions.
    uses_xla_conv = "conv_general_dilated" in str(jax.make_jaxpr(ours.apply)(variables, x))
    tiny = ours_out.shape[1] * ours_out.shape[2] <= IM2COL_MAX_OUTPUT_POSITIONS
    assert uses_xla_conv != tiny
