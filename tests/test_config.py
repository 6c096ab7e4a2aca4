"""Job file → RunConfig: every error a user can make names the file and the dotted key; overrides; CLI errors."""
from concurrent.futures import ThreadPoolExecutor
import sys
from pathlib import Path

import pytest
import yaml

import json

from runner.config import RunConfig, dump_yaml, load_config, manifest_config, redact, to_dict
from runner.errors import ConfigError
from helpers import TINY_JOB, newest_state, run_cli, write_job  # noqa: F401 (fixture)


def write(folder: Path, text: str, name: str = "bad.yaml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def error(path, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    return str(info.value)


# --- bad job files: (file text, fragments the one-line message must contain) ---------------------------
BAD_FILES = {
    "unknown nested key": ("optim:\n  lrr: 0.1\n", ["'optim.lrr'", "did you mean 'optim.lr'"]),
    "unknown top-level key": ("modle:\n  name: cnn\n", ["'modle'", "did you mean 'model'"]),
    "unknown deep key": ("train:\n  early_stopping:\n    patiense: 2\n",
                         ["'train.early_stopping.patiense'", "did you mean 'train.early_stopping.patience'"]),
    "wrong type int": ("train:\n  max_epochs: ten\n", ["'train.max_epochs'", "must be int", "'ten'"]),
    "bool is not an int": ("train:\n  max_epochs: true\n", ["'train.max_epochs'", "must be int"]),
    "wrong type float": ("optim:\n  lr: fast\n", ["'optim.lr'", "must be float"]),
    "args not a mapping": ("model:\n  args: 3\n", ["'model.args'", "must be a mapping"]),
    "section not a mapping": ("optim: 3\n", ["optim", "expected a mapping"]),
    "empty required value": ("optim:\n  lr:\n", ["'optim.lr'", "must not be empty"]),
    "invalid choice": ("train:\n  precision: fp8\n", ["'train.precision'", "'fp8'", "32, bf16, fp16"]),
    "invalid choice nested": ("train:\n  early_stopping:\n    mode: biggest\n",
                              ["'train.early_stopping.mode'", "min, max"]),
    "invalid YAML": ("model:\n  name: [cnn\ndata: {}\n", ["invalid YAML", "line"]),
    "not a mapping": ("- model\n- data\n", ["must be a mapping"]),
    # checkpoints store the resolved config as JSON: values a JSON round trip would change are refused
    "YAML date": ("data:\n  args:\n    start: 2024-06-01\n",
                  ["'data.args.start' is a date (2024-06-01)", "quote it ('2024-06-01')", "as JSON"]),
    "YAML date and time": ("model:\n  args:\n    since: 2024-06-01 12:30:00\n",
                           ["'model.args.since' is a date and time", "quote it", "as JSON"]),
    "date inside a list": ("data:\n  args:\n    days: [2024-06-01]\n", ["'data.args.days[0]' is a date"]),
    "non-string key": ("data:\n  args:\n    weights: {1: a, b: c}\n",
                       ["'data.args.weights' has the key 1 (int)", "quote it ('1')", "as JSON"]),
    "set": ("data:\n  args:\n    tags: !!set {a, b}\n", ["'data.args.tags' is a set", "list", "as JSON"]),
    "binary": ("optim:\n  args:\n    blob: !!binary aGVsbG8=\n", ["'optim.args.blob' is binary data", "as JSON"]),
    "nan": ("scheduler:\n  args:\n    eta_min: .nan\n", ["'scheduler.args.eta_min' is nan", "finite", "as JSON"]),
    "infinite lr": ("optim:\n  lr: .inf\n", ["'optim.lr' is inf", "finite"]),
    "URL out_dir": ("out_dir: s3://bucket/run\n",
                    ["'out_dir'", "s3://bucket/run", "local folder", "checkpoint.dir can be any fsspec URL"]),
    "replaced resume key": ("resume:\n  allow_config_change: true\n",
                            ["resume.allow_config_change was replaced by resume.allow_changes", "e.g. [optim.lr]"]),
    "allow_changes typo": ("resume:\n  allow_changes: [optim.lrr]\n",
                           ["'resume.allow_changes' lists 'optim.lrr'", "did you mean 'optim.lr'"]),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_job_file_names_file_and_key(tmp_path, case):
    text, fragments = BAD_FILES[case]
    path = write(tmp_path, text)
    message = error(path)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, message
    assert "\n" not in message


def test_unknown_key_without_close_match_lists_valid_keys(tmp_path):
    message = error(write(tmp_path, "optim:\n  zzzzzz: 1\n"))
    assert "'optim.zzzzzz'" in message
    for key in ("name", "lr", "args"):
        assert key in message.split("valid keys:")[1]


def test_unreadable_job_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    message = error(missing)
    assert str(missing) in message and "cannot read" in message
    message = error(tmp_path)  # a folder is not a file
    assert str(tmp_path) in message and "cannot read" in message


def test_empty_file_is_all_defaults(tmp_path):
    cfg = load_config(write(tmp_path, "", "empty.yaml"))
    assert cfg.model == RunConfig().model and cfg.train == RunConfig().train
    assert cfg.out_dir == "runs/empty"  # default out_dir follows the job file's name


# --- overrides -------------------------------------------------------------------------------------------

def test_overrides_are_yaml_scalars(tmp_path):
    job = write_job(tmp_path)
    cfg = load_config(job, ["optim.lr=1e-3", "train.max_epochs=3", "data.shuffle=false", "train.max_steps=",
                            "data.args.classes=[1, 7]", "model.args.width=4", "train.early_stopping.metric=val_acc"])
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)
    assert cfg.train.max_epochs == 3 and isinstance(cfg.train.max_epochs, int)
    assert cfg.data.shuffle is False
    assert cfg.train.max_steps is None
    assert cfg.data.args == {"classes": [1, 7]}
    assert cfg.model.args == {"width": 4, "dropout": TINY_JOB["model"]["args"]["dropout"]}  # merged, not replaced
    assert cfg.train.early_stopping.metric == "val_acc"


def test_overrides_create_new_sections(tmp_path):
    job = write(tmp_path, "model:\n  name: cnn\n", "job.yaml")
    cfg = load_config(job, ["scheduler.name=StepLR", "scheduler.args.step_size=2", "finetune.head.module=head",
                            "finetune.head.num_classes=4"])
    assert cfg.scheduler.name == "StepLR" and cfg.scheduler.args == {"step_size": 2}
    assert cfg.finetune.head.module == "head" and cfg.finetune.head.num_classes == 4


def test_override_wins_over_file(tmp_path):
    job = write_job(tmp_path, optim={"lr": 0.5})
    assert load_config(job).optim.lr == 0.5
    assert load_config(job, ["optim.lr=0.25"]).optim.lr == 0.25


@pytest.mark.parametrize("item, fragments", [
    ("optim.lr", ["'optim.lr'", "key.sub=value"]),
    ("=3", ["'=3'", "key.sub=value"]),
    ("optim.lr.x=1", ["'lr' is not a section"]),
    ("optim.lrr=0.1", ["'optim.lrr'", "did you mean 'optim.lr'"]),
    ("train.max_epochs=abc", ["'train.max_epochs'", "must be int"]),
    ("train.precision=fp8", ["'train.precision'", "choose one of"]),
    ("data.args.start=2024-06-01", ["'data.args.start' is a date", "quote it"]),
    ("resume.allow_config_change=true", ["replaced by resume.allow_changes"]),
])
def test_bad_override(tmp_path, item, fragments):
    message = error(write_job(tmp_path), [item])
    for fragment in fragments:
        assert fragment in message, message


# --- the CLI: one line on stderr, exit 2, no traceback -------------------------------------------------------

def cli_cases(folder: Path) -> dict[str, list]:
    """`runner train` arguments for every kind of config error."""
    cases = {name: [write(folder, text, f"bad{i}.yaml")] for i, (name, (text, _)) in enumerate(BAD_FILES.items())}
    good = write_job(folder, "good")
    cases["missing file"] = [folder / "missing.yaml"]
    cases["override without ="] = [good, "optim.lr"]
    cases["override through a value"] = [good, "optim.lr.x=1"]
    cases["override with unknown key"] = [good, "optim.lrr=1"]
    cases["unknown model name"] = [good, "model.name=resnet"]
    return cases


def assert_one_line_error(name: str, code: int, out: str, err: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2, f"{name}: exit {code}\n{err}"
    assert "Traceback" not in err, f"{name}:\n{err}"
    assert len(lines) == 1 and lines[0].startswith("runner: error: "), f"{name}: {err!r}"
    assert "[runner]" not in out, f"{name}: nothing should start: {out!r}"


def test_cli_turns_every_config_error_into_one_line(tmp_path, capsys, monkeypatch):
    from runner.cli import main

    monkeypatch.setattr(sys, "path", list(sys.path))  # the CLI adds the job's folder
    for name, args in cli_cases(tmp_path).items():
        code = main(["train", *map(str, args)])
        out, err = capsys.readouterr()
        assert_one_line_error(name, code, out, err)
        if name == "unknown model name":
            assert "model.name" in err and "cnn, gpt, mlp" in err
        if name == "missing file":
            assert str(args[0]) in err


def test_cli_process_exits_2_without_traceback(tmp_path):
    """The real `python -m runner` process (each start imports torch, so two representative cases)."""
    cases = cli_cases(tmp_path)
    cases = {name: cases[name] for name in ("unknown nested key", "override without =")}
    with ThreadPoolExecutor(2) as pool:
        procs = pool.map(lambda args: run_cli("train", *args, env={"OMP_NUM_THREADS": 1}), cases.values())
        procs = dict(zip(cases, procs))
    for name, proc in procs.items():
        assert_one_line_error(name, proc.returncode, proc.stdout, proc.stderr)
        assert not proc.stdout
    assert "did you mean 'optim.lr'" in procs["unknown nested key"].stderr
    assert "key.sub=value" in procs["override without ="].stderr


# --- the resolved config ------------------------------------------------------------------------------

def test_resolved_config_is_printed_saved_and_loads_back_equal(tmp_path, capsys, one_thread):
    from runner.loop import train

    job = write_job(tmp_path, train={"max_steps": 1}, checkpoint={"every_epoch": False})
    cfg = load_config(job, ["optim.lr=0.02", "scheduler.name=StepLR", "scheduler.args.step_size=3"])
    assert train(cfg) == 0
    saved = Path(cfg.out_dir) / "config.yaml"
    assert load_config(saved) == cfg
    assert yaml.safe_load(saved.read_text())["optim"]["lr"] == 0.02
    out = capsys.readouterr().out
    assert "resolved config:" in out and "step_size: 3" in out
    _, manifest = newest_state(cfg.checkpoint_dir)
    assert manifest["config"]["optim"]["lr"] == 0.02  # and every checkpoint carries it



@pytest.mark.parametrize("override, key", [("data.batch_size=0", "data.batch_size"),
                                           ("train.accumulate=-1", "train.accumulate"),
                                           ("checkpoint.keep_best=1", "checkpoint.metric")])
def test_values_that_cannot_work_are_refused_naming_the_key(tmp_path, override, key):
    job = write_job(tmp_path)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(job, [override])


# --- JSON-safe values, out_dir, resume.allow_changes ------------------------------------------------------

def test_an_ordinary_config_survives_a_json_round_trip(tmp_path):
    job = write_job(tmp_path, data={"args": {"start": "2024-06-01", "classes": [1, 7], "aug": {"flip": 0.5}}},
                    optim={"args": {"betas": [0.9, 0.99], "weight_decay": 0}},
                    scheduler={"name": "StepLR", "args": {"step_size": 2}},
                    finetune={"head": {"module": "fc"}, "phases": [{"epochs": 1, "train": "head"}, {}]})
    stored = to_dict(load_config(job))
    assert json.loads(json.dumps(stored, sort_keys=True)) == stored


def test_allow_changes_takes_keys_and_section_prefixes(tmp_path):
    job = write_job(tmp_path)
    assert load_config(job).resume.allow_changes == []
    cfg = load_config(job, ["resume.allow_changes=[optim.lr, scheduler.args, data.args.augment]"])
    assert cfg.resume.allow_changes == ["optim.lr", "scheduler.args", "data.args.augment"]
    assert load_config(job, ["resume.allow_changes=optim"]).resume.allow_changes == ["optim"]


# --- secrets never reach the printed config, config.yaml or checkpoints -------------------------------------

SECRETS = {"AKIAEXAMPLE", "s3cr3t", "tok3n", "wJalrXUtnFEMI", "hunter2"}


def secret_job(folder: Path) -> Path:
    return write_job(folder, checkpoint={"dir": "s3://bucket/run", "storage_options": {
        "key": "AKIAEXAMPLE", "secret": "s3cr3t", "token": "tok3n", "anon": False, "use_ssl": True,
        "endpoint_url": "http://127.0.0.1:9000", "config_kwargs": {"signature_version": "s3v4"},
        "client_kwargs": {"aws_secret_access_key": "wJalrXUtnFEMI", "region_name": "us-east-1"}}},
        data={"args": {"password": "hunter2", "root": "/data/digits"}})


def test_dump_yaml_and_manifest_config_redact_secrets(tmp_path):
    cfg = load_config(secret_job(tmp_path))
    text = dump_yaml(cfg)
    for stored in (text, json.dumps(manifest_config(cfg))):
        assert not [s for s in SECRETS if s in stored], stored
    options = yaml.safe_load(text)["checkpoint"]["storage_options"]
    assert options == manifest_config(cfg)["checkpoint"]["storage_options"]
    assert options["key"] == options["secret"] == options["token"] == "<redacted>"
    assert options["client_kwargs"] == {"aws_secret_access_key": "<redacted>", "region_name": "us-east-1"}
    assert options["endpoint_url"] == "http://127.0.0.1:9000" and options["anon"] is False
    assert options["use_ssl"] is True and options["config_kwargs"] == {"signature_version": "s3v4"}
    assert yaml.safe_load(text)["data"]["args"] == {"password": "<redacted>", "root": "/data/digits"}
    assert cfg.checkpoint.storage_options["secret"] == "s3cr3t"  # the run itself still has them


@pytest.mark.parametrize("name", ["sas_token", "account_key", "connection_string", "AccountKey", "api_key",
                                  "aws_session_token", "client_secret", "private_key", "passwd", "credentials"])
def test_secret_key_names_are_redacted(name):
    assert redact({"opts": {name: "x", "other": "y"}}) == {"opts": {name: "<redacted>", "other": "y"}}


@pytest.mark.parametrize("name", ["tokenizer", "max_tokens", "author", "keyword", "key_prefix", "secret_name",
                                  "endpoint_url", "region_name", "signature_version"])
def test_ordinary_key_names_stay_visible(name):
    assert redact({name: "x"}) == {name: "x"}


def test_no_key_of_an_ordinary_config_is_redacted(tmp_path):
    """So config.yaml of a run without secrets loads back as the same config."""
    cfg = load_config(write_job(tmp_path, data={"args": {"tokenizer": "bpe", "max_tokens": 512}}))
    assert manifest_config(cfg) == to_dict(cfg)
    assert load_config(write(tmp_path, dump_yaml(cfg), "config.yaml")) == cfg

