"""``mlp``: a multilayer perceptron on flattened images, with 1d normalization layers.

Its norm layers see ``(N, C)`` features, so variants that need spatial
dimensions (instance norm) are refused with a clear error.
"""

from __future__ import annotations

import math

from torch import nn

from normbench.models.registry import register_model


@register_model("mlp")
def mlp(norm, in_channels, num_classes, image_size, hidden=(512, 256)) -> nn.Sequential:
    if norm.needs_spatial:
        raise ValueError(
            f"norm={norm.name} needs spatial dimensions, which model=mlp has not; "
            "use a convolutional model"
        )
    bias = not norm.centers
    width = in_channels * math.prod(image_size)
    layers: list[nn.Module] = [nn.Flatten()]
    for features in hidden:
        layers += [nn.Linear(width, features, bias=bias), *norm.with_activation(features)]
        width = features
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)
