"""``resnet20``: He et al. 2016's CIFAR ResNet-20 (Section 4.2 of "Deep Residual Learning").

A 3x3 stem, then three stages of three basic blocks with 16, 32 and 64 channels,
global average pooling and a linear head: 6n+2 layers with n=3, 0.27M parameters.
Shortcuts are the paper's option A for CIFAR: identity, subsampled and zero-padded
when the shape changes, so they add no parameters (and no normalization layers).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from normbench.models.registry import register_model


class BasicBlock(nn.Module):
    """conv3x3-norm-ReLU-conv3x3-norm, plus the shortcut, then ReLU (a norm that carries
    its own activation takes the first ReLU's place; the one after the sum stays)."""

    def __init__(self, norm, in_planes: int, planes: int, stride: int, bias: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=bias)
        self.norm1, self.act1 = norm.with_activation(planes)  # the ReLU fused where it can be
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=bias)
        self.norm2 = norm(planes)
        self.stride = stride
        self.pad = planes - in_planes

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1 and self.pad == 0:
            return x
        x = x[:, :, :: self.stride, :: self.stride]
        half = self.pad // 2
        return F.pad(x, (0, 0, 0, 0, half, self.pad - half))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    def __init__(self, norm, in_channels: int, num_classes: int, depth: int = 20, width: int = 16):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"a CIFAR ResNet has depth 6n+2, got {depth}")
        blocks = (depth - 2) // 6
        bias = not norm.centers
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1, bias=bias)
        self.norm, self.act = norm.with_activation(width)
        stages = []
        in_planes = width
        for stage, planes in enumerate((width, 2 * width, 4 * width)):
            for block in range(blocks):
                stride = 2 if stage > 0 and block == 0 else 1
                stages.append(BasicBlock(norm, in_planes, planes, stride, bias))
                in_planes = planes
        self.blocks = nn.Sequential(*stages)
        self.head = nn.Linear(in_planes, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                # He et al.'s initialisation, which the paper's results assume.
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.norm(self.stem(x)))
        x = self.blocks(x)
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.head(x)


@register_model("resnet20")
def resnet20(norm, in_channels, num_classes, image_size, width=16) -> ResNetCifar:
    return ResNetCifar(norm, in_channels, num_classes, depth=20, width=width)
