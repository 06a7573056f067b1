"""A ResNet-34-style image classifier (21.3M parameters) in plain torch, for 32x32 RGB images.

    tenfold package examples.resnet:build -o resnet.pt
"""

from __future__ import annotations

import torch
from torch import nn

CLASSES = 100
IMAGE = 32


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, blocks: tuple[int, ...] = (3, 4, 6, 3), width: int = 64, classes: int = CLASSES) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2)
        )
        stages, cin = [], width
        for i, count in enumerate(blocks):
            cout = width * 2**i
            for j in range(count):
                stages.append(BasicBlock(cin, cout, 2 if (j == 0 and i > 0) else 1))
                cin = cout
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(cin, classes)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):  # non-trivial statistics, as a trained network would have
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: float32 [batch, 3, 32, 32] -> class logits [batch, classes]"""
        x = self.stages(self.stem(images))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def build(seed: int = 0, width: int = 64) -> ResNet:
    """The classifier with weights drawn from `seed`; `width` scales every layer (64: 21.3M parameters)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ResNet(width=width).eval()


def example_inputs(batch: int = 1, seed: int = 1) -> tuple[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 3, IMAGE, IMAGE, generator=g),)
