"""Names in the config → objects: model, loss, training step, optimizer, scheduler.

Built-ins have short names; anything else is an import path `pkg.module:Name`.
"""
from __future__ import annotations

import difflib
import importlib
import inspect
from typing import Callable

import torch
from torch import nn

from . import models
from .config import ModelConfig, OptimConfig, SchedulerConfig
from .errors import ConfigError, one_line

BUILTIN_MODELS = ("cnn", "mlp", "gpt")
LOSSES = {
    "cross_entropy": nn.CrossEntropyLoss,
    "mse": nn.MSELoss,
    "l1": nn.L1Loss,
    "smooth_l1": nn.SmoothL1Loss,
    "huber": nn.HuberLoss,
    "bce_with_logits": nn.BCEWithLogitsLoss,
    "nll": nn.NLLLoss,
}


def import_object(path: str, key: str):
    """`pkg.module:Name` → the object; errors name the config key."""
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"{key}: cannot import module '{module_name}' ({e}); put it next to the job "
                          "file or on PYTHONPATH") from None
    obj = module
    for part in attr.split(".") if attr else []:
        if not hasattr(obj, part):
            raise ConfigError(f"{key}: module '{module_name}' has no attribute '{attr}'")
        obj = getattr(obj, part)
    return obj


def unknown(key: str, name: str, choices) -> ConfigError:
    choices = sorted(choices)
    close = difflib.get_close_matches(name, choices, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    listed = ", ".join(choices[:40]) + (", …" if len(choices) > 40 else "")
    return ConfigError(f"{key}: unknown name '{name}'; {hint}available: {listed} (or an import path pkg.module:Name)")


def call(factory, args: dict, key: str):
    """Call a user/library factory; a bad argument is a config error naming the key, not a traceback."""
    try:
        inspect.signature(factory).bind(**args)
    except TypeError as e:
        raise ConfigError(f"{key}: {e}; check the arguments under '{key}'") from None
    except ValueError:
        pass  # no introspectable signature (C builtins): let the call itself complain
    try:
        return factory(**args)
    except ValueError as e:  # torch validates values this way, e.g. "Invalid learning rate: -1"
        raise ConfigError(f"{key}: {e}") from None


def build_model(cfg: ModelConfig, num_classes: int | None, input_shape: tuple[int, ...]) -> nn.Module:
    classes = cfg.num_classes or num_classes
    if cfg.name in BUILTIN_MODELS:
        if classes is None:
            raise ConfigError("model.num_classes: required for this dataset (it has no class count)")
        return call(*models.builtin(cfg.name, cfg.args, classes, input_shape), "model.args")
    if cfg.name.startswith("torchvision."):
        return torchvision_model(cfg, classes)
    if ":" in cfg.name:
        factory, args = import_object(cfg.name, "model.name"), dict(cfg.args)
        if classes is not None and takes(factory, "num_classes"):
            args.setdefault("num_classes", classes)  # like torchvision models; explicit args win
        return call(factory, args, "model.args")
    raise unknown("model.name", cfg.name, [*BUILTIN_MODELS, "torchvision.<model>"])


def takes(factory, name: str) -> bool:
    try:
        return name in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False


def torchvision_model(cfg: ModelConfig, num_classes: int | None) -> nn.Module:
    import torchvision

    name = cfg.name.removeprefix("torchvision.")
    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        raise unknown("model.name", cfg.name, [f"torchvision.{m}" for m in available])
    args = dict(cfg.args)
    if cfg.weights:
        # Pretrained heads have the original class count; finetune.head swaps in a new one.
        args["weights"] = cfg.weights
    elif num_classes is not None:
        args.setdefault("num_classes", num_classes)
    try:
        return torchvision.models.get_model(name, **args)
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"model: torchvision.{name} rejected its arguments ({e})") from None
    except OSError as e:  # urllib's URLError (no network, proxy, DNS) or a disk error while downloading
        if not cfg.weights:
            raise
        raise ConfigError(f"model.weights: downloading {cfg.weights} weights for torchvision.{name} failed "
                          f"({one_line(e)}); check the network, or fetch the file where there is "
                          "one and set model.init_from to it (state_dict .pth) instead of model.weights") from None


def build_loss(name: str) -> nn.Module:
    if name in LOSSES:
        return LOSSES[name]()
    if ":" in name:
        return import_object(name, "train.loss")()
    raise unknown("train.loss", name, LOSSES)


def build_step(path: str | None) -> Callable | None:
    """train.step → the user's fn(model, batch); None keeps runner's own step."""
    if path is None:
        return None
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"train.step: '{path}' is not an import path pkg.module:function")
    fn = import_object(path, "train.step")
    if not callable(fn):
        raise ConfigError(f"train.step: '{path}' is a {type(fn).__name__}, not a function fn(model, batch)")
    try:
        inspect.signature(fn).bind(None, None)
    except TypeError:
        raise ConfigError(f"train.step: '{path}' takes {inspect.signature(fn)}; runner calls it as "
                          "fn(model, batch)") from None
    except ValueError:
        pass  # no introspectable signature: the call itself will tell
    return fn


def build_optimizer(cfg: OptimConfig, groups: list[dict]) -> torch.optim.Optimizer:
    cls = resolve_class(cfg.name, torch.optim, torch.optim.Optimizer, "optim.name")
    return call(cls, {"params": groups, "lr": cfg.lr, **cfg.args}, "optim.args")


def build_scheduler(cfg: SchedulerConfig, optimizer):
    if cfg.name is None:
        return None
    base = torch.optim.lr_scheduler.LRScheduler
    cls = resolve_class(cfg.name, torch.optim.lr_scheduler, base, "scheduler.name")
    return call(cls, {"optimizer": optimizer, **cfg.args}, "scheduler.args")


def resolve_class(name: str, module, base: type, key: str):
    if ":" in name:
        return import_object(name, key)
    choices = [n for n, obj in vars(module).items()
               if inspect.isclass(obj) and issubclass(obj, base) and obj is not base and not n.startswith("_")]
    if name not in choices:
        raise unknown(key, name, choices)
    return getattr(module, name)
