"""Small built-in models for tests, demos and benchmarks."""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


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


class CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not a multiple of heads {heads}")
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        batch, length, width = x.shape
        q, k, v = (t.view(batch, length, self.heads, -1).transpose(1, 2) for t in self.qkv(x).split(width, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(batch, length, width))


class Block(nn.Module):
    """Pre-norm transformer block: x + attention(norm(x)), then x + MLP(norm(x)). The unit FSDP shards."""

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads, dropout)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width),
                                 nn.Dropout(dropout))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    """A decoder-only transformer (nanoGPT's shape; its defaults are nanoGPT's Shakespeare-char model). Takes
    token ids (batch, length) and returns logits (batch, vocab, length): the class dimension second, as
    nn.CrossEntropyLoss takes a sequence, so the default loss trains it on (tokens, next tokens) samples."""

    def __init__(self, vocab_size: int = 256, context: int = 256, layers: int = 6, heads: int = 6,
                 width: int = 384, dropout: float = 0.0):
        super().__init__()
        self.context = context
        self.tokens = nn.Embedding(vocab_size, width)
        self.positions = nn.Embedding(context, width)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(width, heads, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size, bias=False)
        self.apply(init_gpt_weights)

    def forward(self, idx):
        length = idx.shape[1]
        if length > self.context:
            raise ValueError(f"a sequence of {length} tokens is longer than the model's context {self.context}")
        x = self.dropout(self.tokens(idx) + self.positions(torch.arange(length, device=idx.device)))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)).transpose(1, 2).contiguous()  # not a view: FSDP2 warns of in-place ops on one


def init_gpt_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


def builtin(name: str, args: dict, num_classes: int, input_shape: tuple[int, ...]) -> tuple[type, dict]:
    """The class of built-in model `name` and its arguments: the data's shape and classes, then model.args."""
    if name == "cnn":
        channels = input_shape[0] if len(input_shape) == 3 else 1
        return SmallCNN, {"num_classes": num_classes, "in_channels": channels, **args}
    if name == "gpt":  # the vocabulary is the dataset's class count; the context its sequence length
        return GPT, {"vocab_size": num_classes, "context": input_shape[0] if input_shape else 256, **args}
    return MLP, {"in_features": math.prod(input_shape), "num_classes": num_classes, **args}
