"""`runner train|summary|export|ckpt|report|plot …` — parses arguments, turns RunnerErrors into one line and
their exit status (2: fix the job; 1: storage still unavailable after retries; 4: training diverged)."""
from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import yaml

from .console import error
from .errors import ConfigError, RunnerError

def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except RunnerError as e:
        error(str(e))
        return e.exit_status


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="runner", description="Fault-tolerant PyTorch training from one YAML file.")
    sub = p.add_subparsers(dest="command", required=True)
    for name, func, help_ in (("train", cmd_train, "train (resumes automatically from the newest checkpoint)"),
                              ("summary", cmd_summary, "print the model's layers, shapes and parameter counts")):
        c = sub.add_parser(name, help=help_)
        c.add_argument("job", help="job YAML file")
        c.add_argument("overrides", nargs="*", help="key.sub=value overrides (values parsed as YAML)")
        c.set_defaults(func=func)
    exp = sub.add_parser("export", help="write trained weights for inference: .pt state_dict, .safetensors, .onnx")
    exp.add_argument("job", help="job YAML file (builds the model)")
    exp.add_argument("out", help="output file; the suffix picks the format (.pt, .pth, .safetensors, .onnx)")
    exp.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    exp.add_argument("--checkpoint", metavar="best|step-N|URL",
                     help="which weights: 'best' by the job's checkpoint.metric/mode, step-N of the job's "
                          "checkpoint.dir, or a checkpoint or weights URL (default: the job's newest valid checkpoint)")
    exp.set_defaults(func=cmd_export)
    ckpt = sub.add_parser("ckpt", help="list, verify and inspect checkpoints").add_subparsers(dest="action",
                                                                                              required=True)
    for name, func, what in (("ls", cmd_ckpt_ls, "checkpoint directory (store)"),
                             ("verify", cmd_ckpt_verify, "store or one step-* checkpoint"),
                             ("inspect", cmd_ckpt_inspect, "one step-* checkpoint")):
        c = ckpt.add_parser(name)
        c.add_argument("url", help=f"fsspec URL or path of a {what}")
        c.add_argument("-o", "--storage-option", action="append", default=[], metavar="KEY=VALUE",
                       help="fsspec storage option, e.g. -o endpoint_url=http://127.0.0.1:9000")
        c.set_defaults(func=func)
        if name == "ls":
            c.add_argument("--metric", help="mark the best checkpoint by this metric (default: the checkpoint.metric "
                           "the newest checkpoint was written with)")
            c.add_argument("--mode", choices=("min", "max"), help="whether smaller or larger --metric is better "
                           "(default: that checkpoint's checkpoint.mode, else min)")
    rep = sub.add_parser("report", help="where a run's time went, per launch: productive, recomputed, stalls, gaps")
    rep.add_argument("run", metavar="RUN_DIR_OR_JOB", help="the run's out_dir, or its job YAML")
    rep.add_argument("--json", action="store_true", help="print JSON (launches and totals) instead of a table")
    rep.set_defaults(func=cmd_report)
    curves = sub.add_parser("plot", help="loss, accuracy and LR against step, restarts and preemptions marked (PNG)")
    curves.add_argument("run", metavar="RUN_DIR_OR_JOB", help="the run's out_dir, or its job YAML")
    curves.add_argument("-o", "--output", help="image file (default: <out_dir>/curves.png); its suffix picks the "
                        "format")
    curves.set_defaults(func=cmd_plot)
    return p


def load_job(args):
    from .config import load_config

    job_dir = str(Path(args.job).resolve().parent)
    if job_dir not in sys.path:
        sys.path.insert(0, job_dir)  # a user module next to the job file imports by its name
    return load_config(args.job, args.overrides)


def cmd_train(args) -> int:
    cfg = load_job(args)  # before importing the loop, so a typo in the job file is reported at once
    from .loop import train

    try:
        return train(cfg)
    finally:
        # Free the training state now: reference cycles (FSDP's and DDP's hooks) keep it, and with it a gloo process
        # group, alive past train(). Freed only as the interpreter exits, the group's worker thread, releasing its
        # last tensors, asks for a GIL that no longer exists and the process aborts (SIGABRT after "done").
        gc.collect()


def model_from_job(cfg):
    """The job's model as training builds it (new head included, no pretrained load) and a 2-sample batch."""
    import torch

    from .data import build_datasets
    from .job import build_model_for, example_batch

    torch.manual_seed(cfg.train.seed)
    data = build_datasets(cfg.data)
    model, phases, head = build_model_for(cfg, data)
    return model, example_batch(data), phases, head


def cmd_summary(args) -> int:
    from .summary import summarize

    model, example, phases, head = model_from_job(load_job(args))
    print(summarize(model, example, phases or None, head))
    return 0


def export_source(cfg, choice: str | None) -> str:
    """The URL `runner export --checkpoint` names: the newest valid checkpoint (None), 'best', 'step-N' of the
    job's checkpoint.dir, or a URL as given."""
    from .store import STEP_RE, CheckpointStore
    from .store_cli import best_checkpoint

    store = CheckpointStore(cfg.checkpoint_dir, cfg.checkpoint.storage_options)
    step = STEP_RE.fullmatch(choice or "")
    if step:
        return f"{store.url}/step-{int(step.group(1)):09d}"
    if choice == "best":
        metric = cfg.checkpoint.metric
        if not metric:
            raise ConfigError("export --checkpoint best: the job sets no checkpoint.metric to rank by; add it "
                              "(e.g. checkpoint.metric=val_loss) or pass --checkpoint step-N")
        info = best_checkpoint(store.list(), metric, cfg.checkpoint.mode)
        if info is None:
            raise ConfigError(f"export --checkpoint best: no valid checkpoint in {cfg.checkpoint_dir} has a "
                              f"finite {metric}; list them with `runner ckpt ls {cfg.checkpoint_dir}`")
        return info.url
    if choice is not None:
        return choice
    info = store.latest_valid()
    if info is None:
        raise ConfigError(f"export: no valid checkpoint in {cfg.checkpoint_dir}; train first or pass --checkpoint")
    return info.url


def cmd_export(args) -> int:
    from .export import export
    from .weights import load_pretrained

    cfg = load_job(args)
    model, example, _, _ = model_from_job(cfg)
    url = export_source(cfg, args.checkpoint)
    load_pretrained(model, url, storage_options=cfg.checkpoint.storage_options)
    files = export(model, example, args.out)
    extra = f" with its weights in {files[1]} (keep the two files together)" if len(files) > 1 else ""
    print(f"exported {url} to {args.out}{extra}")
    return 0


def storage_options(args) -> dict:
    options = {}
    for item in args.storage_option:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--storage-option '{item}': expected KEY=VALUE")
        options[key] = yaml.safe_load(value)
    return options


def cmd_ckpt_ls(args) -> int:
    from .store import CheckpointStore
    from .store_cli import describe_listing

    print(describe_listing(CheckpointStore(args.url, storage_options(args)), args.metric, args.mode))
    return 0


def cmd_ckpt_verify(args) -> int:
    from .store_cli import run_verify

    text, code = run_verify(args.url, storage_options(args))
    print(text)
    return code


def cmd_ckpt_inspect(args) -> int:
    import json

    import torch

    from .store import open_checkpoint
    from .state import load_bytes
    from .store_cli import epoch_of

    store, info = open_checkpoint(args.url, storage_options(args))
    m = info.manifest or {}
    if "sample_in_epoch" in m:
        epoch, sample = epoch_of(m), m["sample_in_epoch"]
        where = f"end of epoch {epoch}" if sample == 0 and m.get("epoch") else f"epoch {epoch}, global sample {sample} of the epoch"
        print(f"position: step {m.get('step')}, {where}, written by {m.get('world_size')} process(es)")
    print(json.dumps(info.manifest, indent=2, sort_keys=True))
    state = load_bytes(store.read(info), info.url)
    if "sharded" in m:  # the model and optimizer are in every rank's shards: their global shapes
        from .store import sharded

        shapes = sharded.tensor_shapes(store, info)
        for section in ("model", "optimizer"):
            state[section] = {name[len(section) + 1:]: torch.empty(shape, dtype=dtype, device="meta")
                              for name, (shape, dtype) in shapes.items() if name.startswith(section + ".")}
        print(f"sharded: {len([n for n in m['files'] if n.endswith('.distcp')])} shard file(s) written by "
              f"{m.get('world_size')} rank(s); global shapes below")
    for section in ("model", "optimizer", "scheduler", "scaler"):
        print(f"\n[{section}]")
        for name, value in flatten(state.get(section)):
            shape = f"{tuple(value.shape)} {str(value.dtype).removeprefix('torch.')}" if isinstance(value, torch.Tensor) else repr(value)
            print(f"  {name}: {shape}")
    return 0


def cmd_report(args) -> int:
    from .report import report_command

    print(report_command(args.run, args.json))
    return 0


def cmd_plot(args) -> int:
    from .plot import plot
    from .report import run_dir

    out_dir = run_dir(args.run)
    print(f"wrote {plot(out_dir, Path(args.output) if args.output else out_dir / 'curves.png')}")
    return 0


def flatten(obj, prefix: str = ""):
    """(dotted name, leaf) pairs of nested dicts/lists, for printing a state's tensors."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield from flatten(value, f"{prefix}{key}.")
    elif isinstance(obj, (list, tuple)) and len(obj) <= 64:
        for i, value in enumerate(obj):
            yield from flatten(value, f"{prefix}{i}.")
    elif obj is not None:
        yield prefix.rstrip("."), obj
