"""``small_cnn``: three 3x3 conv layers with normalization, global pooling, a linear head.

conv3x3(32)-norm-ReLU-maxpool, conv3x3(64)-norm-ReLU-maxpool, conv3x3(128)-norm-ReLU,
global average pool, linear: small enough to train on a CPU, deep enough for the
normalization layers to matter.
"""

from __future__ import annotations

from torch import nn

from normbench.models.registry import register_model


@register_model("small_cnn")
def small_cnn(norm, in_channels, num_classes, image_size, widths=(32, 64, 128)) -> nn.Sequential:
    if len(widths) != 3:
        raise ValueError(f"model.widths needs 3 channel counts, got {list(widths)}")
    c1, c2, c3 = widths
    # A bias before a centring norm is cancelled by its mean subtraction: leave it out.
    # norm.with_activation: the norm and its ReLU, fused into one layer where it can be;
    # with_activation_pool: and the max-pooling after them.
    bias = not norm.centers
    return nn.Sequential(
        nn.Conv2d(in_channels, c1, 3, padding=1, bias=bias),
        *norm.with_activation_pool(c1),
        nn.Conv2d(c1, c2, 3, padding=1, bias=bias),
        *norm.with_activation_pool(c2),
        nn.Conv2d(c2, c3, 3, padding=1, bias=bias),
        *norm.with_activation(c3),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(c3, num_classes),
    )
