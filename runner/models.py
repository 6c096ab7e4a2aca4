"""Small built-in models for tests, demos and benchmarks."""
from __future__ import annotations

import math

from torch import nn


class SmallCNN(nn.Module):
    """Three conv blocks with BatchNorm, global pooling, dropout and a linear `head`; any image size."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32, dropout: float = 0.1):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        return self.head(self.dropout(self.features(x)))


class MLP(nn.Module):
    """Flatten → hidden layers with ReLU and dropout → linear `head`."""

    def __init__(self, in_features: int, num_classes: int = 10, hidden: tuple[int, ...] = (128,),
                 dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(dropout)]
            width = h
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.head(self.features(x))


def builtin(name: str, args: dict, num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    if name == "cnn":
        channels = input_shape[0] if len(input_shape) == 3 else 1
        return SmallCNN(**{"num_classes": num_classes, "in_channels": channels, **args})
    return MLP(**{"in_features": math.prod(input_shape), "num_classes": num_classes, **args})
