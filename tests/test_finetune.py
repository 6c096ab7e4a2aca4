"""Transfer learning: weight formats and URLs, head replacement, the phase plan and LR multipliers."""
import io
import uuid
from collections import OrderedDict

import fsspec
import pytest
import safetensors.torch
import torch
import torchvision
from torch import nn

from runner.store import CheckpointStore
from runner.errors import CheckpointError, ConfigError
from runner.finetune import (Phase, apply_lr_mults, apply_phase, param_groups, phase_at, phase_span, replace_head,
                             set_train_mode, validate_plan)
from runner.weights import load_pretrained


def net(classes: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(OrderedDict(
        features=nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()),
        block=nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.ReLU(),
                            nn.AdaptiveAvgPool2d(1), nn.Flatten()),
        fc=nn.Linear(4, classes)))


def saved(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def put(url: str, data: bytes) -> str:
    with fsspec.open(url, "wb") as f:
        f.write(data)
    return url


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sb = b.state_dict()
    return all(torch.equal(v, sb[k]) for k, v in a.state_dict().items())


@pytest.fixture(params=["file", "memory"])
def root(request, tmp_path):
    if request.param == "file":
        yield str(tmp_path)
        return
    base = f"memory://finetune-{uuid.uuid4().hex}"
    yield base
    fs = fsspec.filesystem("memory")
    if fs.exists(base):
        fs.rm(base, recursive=True)


# ---------------------------------------------------------------- load_pretrained

@pytest.mark.parametrize("fmt, named", [("safetensors", "safetensors"), ("state_dict", "state_dict"),
                                        ("checkpoint_file", "checkpoint dict 'model'"),
                                        ("checkpoint_dir", "runner checkpoint 'model'")])
def test_load_each_format(root, fmt, named):
    src = net(seed=1)
    sd = src.state_dict()
    if fmt == "safetensors":
        url = put(f"{root}/w.safetensors", safetensors.torch.save(sd))
    elif fmt == "state_dict":
        url = put(f"{root}/w.pth", saved(sd))
    elif fmt == "checkpoint_file":
        url = put(f"{root}/ckpt.pt", saved({"model": sd, "optimizer": {"state": {}}, "step": 3}))
    else:  # a committed runner checkpoint (step-N directory with its manifest)
        url = CheckpointStore(f"{root}/ckpt").commit(123, {"state.pt": saved({"model": sd})}, {})
    dst = net(seed=2)
    report = load_pretrained(dst, url)
    assert same_weights(dst, src)
    assert report == f"loaded {len(sd)}/{len(sd)} tensors from {url}; missing: none; unexpected: none; format: {named}"


def test_checkpoint_store_dir_loads_its_newest_valid_checkpoint(root):
    store = CheckpointStore(f"{root}/ckpts")
    store.commit(1, {"state.pt": saved({"model": net(seed=1).state_dict()})}, {})
    store.commit(2, {"state.pt": saved({"model": net(seed=3).state_dict()})}, {})
    dst = net(seed=2)
    load_pretrained(dst, f"{root}/ckpts")
    assert same_weights(dst, net(seed=3))


def test_checkpoint_dir_without_manifest_is_refused(root):
    put(f"{root}/step-000000001/state.pt", saved({"model": net().state_dict()}))
    with pytest.raises(CheckpointError, match="MANIFEST.json"):
        load_pretrained(net(), f"{root}/step-000000001")


def test_wrapper_prefixes_are_stripped(root):
    src = net(seed=1)
    for prefix in ("module.", "_orig_mod.", "module._orig_mod."):
        url = put(f"{root}/p.pt", saved({prefix + k: v for k, v in src.state_dict().items()}))
        dst = net(seed=2)
        assert load_pretrained(dst, url).endswith(f"; keys: stripped '{prefix}'")
        assert same_weights(dst, src), prefix


def test_strict_lists_missing_keys(root):
    sd = {k: v for k, v in net().state_dict().items() if not k.startswith("fc.")}
    url = put(f"{root}/nofc.pt", saved(sd))
    with pytest.raises(CheckpointError) as err:
        load_pretrained(net(), url)
    msg = str(err.value)
    assert "missing fc.weight, fc.bias" in msg and url in msg and "\n" not in msg
    assert "model.strict: false" in msg and "strict=False" not in msg


def test_non_strict_reports_and_skips_shape_mismatch(root):
    src = net(classes=5, seed=1)
    sd = src.state_dict()
    sd["extra.weight"] = torch.zeros(1)
    url = put(f"{root}/five.pt", saved(sd))
    with pytest.raises(CheckpointError, match="shape mismatch fc.weight"):
        load_pretrained(net(), url)
    dst = net(classes=3, seed=2)
    fc_before = dst.fc.weight.clone()
    report = load_pretrained(dst, url, strict=False)
    n = len(dst.state_dict())
    assert report == (f"loaded {n - 2}/{n} tensors from {url}; missing: none; unexpected: extra.weight; "
                      "skipped (shape): fc.weight (5, 4)→(3, 4), fc.bias (5,)→(3,); format: state_dict")
    assert torch.equal(dst.fc.weight, fc_before)
    assert torch.equal(dst.features[0].weight, src.features[0].weight)


def test_non_strict_missing_report(root):
    sd = {k: v for k, v in net().state_dict().items() if not k.startswith("fc.")}
    url = put(f"{root}/nofc.safetensors", safetensors.torch.save(sd))
    n = len(net().state_dict())
    assert load_pretrained(net(), url, strict=False) == (
        f"loaded {n - 2}/{n} tensors from {url}; missing: fc.weight, fc.bias; unexpected: none; format: safetensors")


def test_unreadable_url_and_garbage(root):
    with pytest.raises(CheckpointError, match="cannot read pretrained weights .*nothere.pt"):
        load_pretrained(net(), f"{root}/nothere.pt")
    url = put(f"{root}/junk.pt", b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="junk.pt"):
        load_pretrained(net(), url)
    url = put(f"{root}/junk.safetensors", b"\x00" * 32)
    with pytest.raises(CheckpointError, match="not a valid safetensors"):
        load_pretrained(net(), url)


def test_whole_model_pickle_refused_unless_trusted(root):
    src = net(seed=1)
    url = put(f"{root}/whole.pt", saved(src))
    with pytest.raises(CheckpointError) as err:
        load_pretrained(net(), url)
    msg = str(err.value)
    assert "pickled Python object" in msg and "arbitrary code" in msg
    assert "torch.save(model.state_dict(), path)" in msg and "\n" not in msg
    assert "model.trust_pickle: true" in msg and "trust_pickle=True" not in msg
    dst = net(seed=2)
    load_pretrained(dst, url, trust_pickle=True)
    assert same_weights(dst, src)


class _Gadget:
    """Unpickling this creates a file: stands in for code an attacker would run."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_refused_pickle_runs_no_code(tmp_path, root):
    proof = tmp_path / "proof"  # the gadget does work when unpickled unsafely...
    torch.load(io.BytesIO(saved({"model": _Gadget(proof)})), weights_only=False)["model"].close()
    assert proof.exists()
    marker = tmp_path / "marker"
    url = put(f"{root}/evil.pt", saved({"model": _Gadget(marker)}))
    with pytest.raises(CheckpointError, match=r"pickled Python object \(io.open\)"):
        load_pretrained(net(), url)
    assert not marker.exists()  # ...but the refusal never executed it


# ---------------------------------------------------------------- replace_head

def test_replace_head_resnet18():
    model = torchvision.models.resnet18(num_classes=1000)
    replace_head(model, "fc", 10)
    assert isinstance(model.fc, nn.Linear) and (model.fc.in_features, model.fc.out_features) == (512, 10)
    model.eval()
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
    with pytest.raises(ConfigError) as err:
        replace_head(model, "classifier", 10)
    assert str(err.value) == ("model has no module 'classifier'; top-level modules: conv1, bn1, relu, maxpool, "
                              "layer1, layer2, layer3, layer4, avgpool, fc")


def test_replace_head_sequential_path_and_conv():
    model = nn.Sequential(OrderedDict(
        features=nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()),
        classifier=nn.Sequential(nn.Dropout(), nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 100))))
    replace_head(model, "classifier.3", 7)
    assert model.classifier[3].out_features == 7 and model.classifier[3].in_features == 16
    with pytest.raises(ConfigError, match="did you mean 'classifier.3'"):
        replace_head(model, "classifier", 7)
    squeeze = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 1000, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    replace_head(squeeze, "1", 5)
    assert isinstance(squeeze[1], nn.Conv2d) and squeeze[1].in_channels == 8
    assert squeeze(torch.zeros(2, 3, 8, 8)).shape == (2, 5)


# ---------------------------------------------------------------- phases

PLAN = [Phase(2, ("head",)), Phase(3, ["block", "head"], {"backbone": 0.1}), Phase(None, "all")]


def test_phase_at_boundaries():
    assert [phase_at(PLAN, e) for e in range(8)] == [0, 0, 1, 1, 1, 2, 2, 2]
    assert phase_at(PLAN, 1000) == 2
    assert phase_at([Phase(2, ("head",)), Phase(1, ("all",))], 7) == 1  # a finite last phase goes on
    assert phase_at([], 0) == -1
    assert [phase_span(PLAN, i) for i in range(3)] == [(0, 2), (2, 5), (5, None)]
    assert PLAN[1].train == ("block", "head") and PLAN[2].train == ("all",)


def trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_apply_phase_freezes_and_is_pure():
    model = net()
    everything = {n for n, _ in model.named_parameters()}
    apply_phase(model, PLAN, 1, "fc")
    apply_phase(model, PLAN, 0, "fc")
    assert trainable(model) == {"fc.weight", "fc.bias"}
    apply_phase(model, PLAN, 0, "fc")  # twice = once
    assert trainable(model) == {"fc.weight", "fc.bias"}
    apply_phase(model, PLAN, 1, "fc")
    assert trainable(model) == {n for n in everything if n.startswith(("block.", "fc."))}
    apply_phase(model, PLAN, 2, "fc")
    assert trainable(model) == everything
    apply_phase(model, [Phase(None, ("backbone",))], 0, "fc")
    assert trainable(model) == {n for n in everything if not n.startswith("fc.")}
    apply_phase(model, PLAN, -1, "fc")
    assert trainable(model) == everything
    with pytest.raises(ConfigError, match="needs finetune.head"):
        apply_phase(model, PLAN, 0, None)


def test_frozen_batchnorm_keeps_running_stats():
    model = net()
    x = torch.randn(4, 3, 8, 8)
    apply_phase(model, PLAN, 1, "fc")
    set_train_mode(model, PLAN, 1, "fc", freeze_bn=True)
    frozen_bn, live_bn = model.features[1], model.block[1]
    assert model.training and not frozen_bn.training and live_bn.training
    before = frozen_bn.running_mean.clone(), live_bn.running_mean.clone()
    model(x)
    assert torch.equal(frozen_bn.running_mean, before[0])
    assert not torch.equal(live_bn.running_mean, before[1])
    model.train()  # what set_train_mode exists to undo
    assert frozen_bn.training
    set_train_mode(model, PLAN, 1, "fc", freeze_bn=False)
    assert frozen_bn.training
    set_train_mode(model, PLAN, 0, "fc")
    assert not frozen_bn.training and not live_bn.training
    model.eval()
    apply_phase(model, PLAN, 2, "fc")  # a model in eval mode stays in eval mode
    assert not frozen_bn.training


def test_validate_plan_errors():
    model = net()
    validate_plan(model, PLAN, "fc")
    cases = [
        ([Phase(1, ("blok",))], "fc", r"finetune.phases\[0\].train: model has no module 'blok'; "
                                      "top-level modules: features, block, fc"),
        ([Phase(1, ("all",), {"feats": 2.0})], "fc", r"phases\[0\].lr_mult: model has no module 'feats'"),
        ([Phase(1, ("head",))], None, "'head' needs finetune.head.module"),
        ([Phase(1, ("all",))], "head", "finetune.head.module: model has no module 'head'"),
        ([Phase(None, ("head",)), Phase(1, ("all",))], "fc",
         r"phases\[0\].epochs: None must be a positive integer; only the last phase may omit it"),
        ([Phase(0, ("head",))], "fc", "must be a positive integer"),
        ([Phase(1, ("all",), {"block": 0})], "fc", r"lr_mult.block: 0 must be a number > 0"),
        ([Phase(1, ())], "fc", "train: empty"),
    ]
    for phases, head, pattern in cases:
        with pytest.raises(ConfigError, match=pattern):
            validate_plan(model, phases, head)


# ---------------------------------------------------------------- optimizer groups and LR multipliers

MULTS = [Phase(1, ("head",), {"backbone": 0.1, "block.0": 0.5}),
         Phase(1, ("all",), {"block": 0.2, "head": 2.0}),
         Phase(None, ("all",))]


def test_param_groups_cover_every_parameter_once():
    model = net()
    groups = param_groups(model, MULTS, "fc")
    assert [g["name"] for g in groups] == ["block", "block.0", "head", "rest"]
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    by_name = {g["name"]: {id(p) for p in g["params"]} for g in groups}
    assert by_name["block.0"] == {id(p) for p in model.block[0].parameters()}
    assert by_name["block"] == {id(p) for p in model.block[1].parameters()}
    assert by_name["head"] == {id(p) for p in model.fc.parameters()}
    assert by_name["rest"] == {id(p) for p in model.features.parameters()}
    only = param_groups(model, [], None)
    assert [g["name"] for g in only] == ["all"] and len(only[0]["params"]) == len(list(model.parameters()))


# expected multiplier per group (block, block.0, head, rest) in each MULTS phase
EXPECTED = [[0.1, 0.5, 1.0, 0.1], [0.2, 0.2, 2.0, 1.0], [1.0, 1.0, 1.0, 1.0]]


def lrs(opt):
    return [g["lr"] for g in opt.param_groups]


@pytest.mark.parametrize("make_sched, schedule", [
    (lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5), lambda e: 0.5 ** (e // 2)),
    (lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=6),
     lambda e: (1 + torch.cos(torch.tensor(torch.pi * e / 6)).item()) / 2),
], ids=["step", "cosine"])
def test_lr_mults_follow_schedule(make_sched, schedule):
    opt = torch.optim.SGD(param_groups(net(), MULTS, "fc"), lr=1.0, momentum=0.9)
    sched = make_sched(opt)
    for epoch in range(6):
        index = phase_at(MULTS, epoch)
        apply_lr_mults(opt, sched, MULTS, index)
        apply_lr_mults(opt, sched, MULTS, index)  # idempotent
        want = [m * schedule(epoch) for m in EXPECTED[index]]
        assert lrs(opt) == pytest.approx(want), epoch
        assert [g["lr_mult"] for g in opt.param_groups] == EXPECTED[index]
        opt.step()
        sched.step()


def test_phase_change_back_and_forth_restores():
    opt = torch.optim.AdamW(param_groups(net(), MULTS, "fc"), lr=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    start, base = lrs(opt), list(sched.base_lrs)
    for index in (0, 1, 0, 2, 1, -1):
        apply_lr_mults(opt, sched, MULTS, index)
    assert lrs(opt) == pytest.approx(start) and sched.base_lrs == pytest.approx(base)
    assert [g["initial_lr"] for g in opt.param_groups] == pytest.approx(base)


def test_resume_keeps_lr_mult_and_matches_uninterrupted_run():
    plan = [MULTS[0], Phase(2, MULTS[1].train, MULTS[1].lr_mult), MULTS[2]]  # epoch 2 is mid-phase 1

    def build():
        opt = torch.optim.SGD(param_groups(net(), MULTS, "fc"), lr=1.0)
        return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)

    def run(opt, sched, epochs):
        seen = []
        for epoch in epochs:
            apply_lr_mults(opt, sched, plan, phase_at(plan, epoch))
            seen.append(lrs(opt))
            opt.step()
            sched.step()
        return seen

    straight = run(*build(), range(5))
    opt, sched = build()
    first = run(opt, sched, range(2))
    blob = saved({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()})
    state = torch.load(io.BytesIO(blob), weights_only=True)  # what state.pt must allow
    assert [g["lr_mult"] for g in state["optimizer"]["param_groups"]] == EXPECTED[1]
    opt, sched = build()
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    assert [g["lr_mult"] for g in opt.param_groups] == EXPECTED[1]
    before = lrs(opt)
    apply_lr_mults(opt, sched, plan, phase_at(plan, 2))  # the phase did not change: a no-op
    assert lrs(opt) == before
    resumed = first + run(opt, sched, range(2, 5))
    assert sum(resumed, []) == pytest.approx(sum(straight, []))
