"""The model summary: layer table, totals, frozen counts and the fine-tune plan section."""
from collections import OrderedDict

import torch
from torch import nn

from helpers import table_row
from runner.finetune import Phase
from runner.summary import summarize


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(
        conv=nn.Conv2d(3, 8, 3, padding=1),
        bn=nn.BatchNorm2d(8),
        relu=nn.ReLU(),
        block=nn.Sequential(nn.Conv2d(8, 4, 3, stride=2), nn.ReLU()),
        pool=nn.AdaptiveAvgPool2d(1),
        flat=nn.Flatten(),
        fc=nn.Linear(4, 5)))


def test_table_lists_layers_with_output_shapes():
    model = cnn()
    text = summarize(model, torch.zeros(2, 3, 16, 16))
    expected = {
        "conv": ("Conv2d", "[-1, 8, 16, 16]", "224"),
        "bn": ("BatchNorm2d", "[-1, 8, 16, 16]", "16"),
        "relu": ("ReLU", "[-1, 8, 16, 16]", "0"),
        "block.0": ("Conv2d", "[-1, 4, 7, 7]", "292"),
        "block.1": ("ReLU", "[-1, 4, 7, 7]", "0"),
        "pool": ("AdaptiveAvgPool2d", "[-1, 4, 1, 1]", "0"),
        "flat": ("Flatten", "[-1, 4]", "0"),
        "fc": ("Linear", "[-1, 5]", "25"),
    }
    for layer, (kind, shape, params) in expected.items():
        assert table_row(text, layer)[:4] == [layer, kind, shape, params]
    assert table_row(text, "conv")[4] == "yes" and table_row(text, "relu")[4] == "-"
    total = sum(p.numel() for p in model.parameters())
    assert f"total params: {total:,}" in text and "frozen params: 0" in text
    assert f"parameter memory: {total * 4 / 2**20:.2f} MB" in text
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert f"buffer memory: {buffers / 2**20:.2f} MB" in text


def test_frozen_counts_and_modes_restored():
    model = cnn()
    for p in model.conv.parameters():
        p.requires_grad_(False)
    model.fc.bias.requires_grad_(False)
    model.train()
    model.bn.eval()  # a frozen BatchNorm inside a training model must stay that way
    text = summarize(model, torch.zeros(2, 3, 16, 16))
    total = sum(p.numel() for p in model.parameters())
    assert f"frozen params: {224 + 5:,}" in text and f"trainable params: {total - 229:,}" in text
    assert table_row(text, "conv")[4] == "no" and table_row(text, "fc")[4] == "partial"
    assert model.training and not model.bn.training and model.block.training


def test_phase_section_counts_without_touching_the_model():
    model = cnn()
    phases = [Phase(2, ("head",)), Phase(1, ("block", "head"), {"backbone": 0.1}), Phase(None, ("all",))]
    text = summarize(model, torch.zeros(2, 3, 16, 16), phases=phases, head="fc")
    total = sum(p.numel() for p in model.parameters())
    assert f"phase 1 (epochs 0-1): trains head — trainable 25 / frozen {total - 25:,}" in text
    assert f"phase 2 (epoch 2): trains block, head — trainable {25 + 292} / frozen {total - 317:,}; " \
           "lr backbone x0.1" in text
    assert f"phase 3 (epochs 3-end): trains all — trainable {total:,} / frozen 0" in text
    assert all(p.requires_grad for p in model.parameters()) and model.training and model.bn.training
