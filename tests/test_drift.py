"""Config drift on resume: which changes to a job are refused, which are free, and the one-line refusal."""
import json

import pytest

from runner.config import load_config, manifest_config, to_dict
from runner.drift import UNSET, Category, Change, category, changes, describe, flatten, refusal, trajectory_changes
from helpers import write_job

BASE = {"scheduler": {"name": "CosineAnnealingLR", "args": {"T_max": 10}},
        "optim": {"args": {"weight_decay": 0.01, "betas": [0.9, 0.999]}},
        "data": {"args": {"augment": False}}}
URL = "memory://runs/job/step-000000032"


@pytest.fixture
def config(tmp_path):
    """config(*overrides) → the resolved config of the base job with `a.b=value` overrides, as a dict."""
    job = write_job(tmp_path, **BASE)
    return lambda *overrides: to_dict(load_config(job, list(overrides)))


def stored(config_dict: dict) -> dict:
    """As a checkpoint manifest holds it (JSON)."""
    return json.loads(json.dumps(config_dict))


def test_a_checkpoint_matches_its_own_job(tmp_path):
    job = write_job(tmp_path, **BASE, checkpoint={"storage_options": {"key": "AKIA", "secret": "s3cr3t"}})
    cfg = load_config(job)
    assert changes(stored(manifest_config(cfg)), to_dict(cfg)) == []  # redacted secrets are not a change


def test_settings_that_do_not_change_training_never_block(config):
    new = config("data.num_workers=4", "data.eval_batch_size=256", "train.progress=bar", "train.device=cpu",
                 "dist.backend=gloo", "dist.timeout_s=60", "preemption.grace_s=10", "checkpoint.dir=memory://x",
                 "checkpoint.every_steps=5", "checkpoint.storage_options.endpoint_url=http://127.0.0.1:9000",
                 "resume.allow_world_size_change=true", "resume.allow_changes=[optim]", "out_dir=elsewhere",
                 "model.init_from=memory://w.pt", "model.strict=false", "train.max_epochs=20", "train.max_steps=500")
    saved = stored(config())
    assert trajectory_changes(saved, new) == []
    assert {c.key for c in changes(saved, new)} >= {"data.num_workers", "dist.backend", "checkpoint.every_steps",
                                                    "train.max_epochs", "train.max_steps"}


@pytest.mark.parametrize("override, key, old, new", [
    ("optim.lr=0.5", "optim.lr", 0.01, 0.5),
    ("optim.name=SGD", "optim.name", "AdamW", "SGD"),
    ("optim.args.weight_decay=0.1", "optim.args.weight_decay", 0.01, 0.1),
    ("optim.args.betas=[0.8, 0.999]", "optim.args.betas", [0.9, 0.999], [0.8, 0.999]),
    ("scheduler.args.T_max=20", "scheduler.args.T_max", 10, 20),
    ("scheduler.interval=step", "scheduler.interval", "epoch", "step"),
    ("train.loss=mse", "train.loss", "cross_entropy", "mse"),
    ("train.precision=bf16", "train.precision", "32", "bf16"),
    ("train.seed=1", "train.seed", 0, 1),
    ("train.early_stopping.metric=val_loss", "train.early_stopping.metric", None, "val_loss"),
    ("data.args.augment=true", "data.args.augment", False, True),
    ("data.batch_size=64", "data.batch_size", 32, 64),
    ("model.args.width=16", "model.args.width", 8, 16),
    ("model.args.depth=3", "model.args.depth", UNSET, 3),
    ("finetune.freeze_bn=false", "finetune.freeze_bn", True, False),
])
def test_changes_to_what_trains_name_the_exact_leaf(config, override, key, old, new):
    assert trajectory_changes(stored(config()), config(override)) == [Change(key, old, new)]


def test_a_removed_argument_is_a_change(config):
    saved = stored(config())
    del saved["model"]["args"]["dropout"]
    assert trajectory_changes(saved, config()) == [Change("model.args.dropout", UNSET, 0.2)]


def test_numbers_compare_by_value_but_booleans_are_not_numbers(config):
    saved = stored(config("optim.args.weight_decay=0", "scheduler.args.T_max=10.0", "data.args.augment=1"))
    assert trajectory_changes(saved, config("optim.args.weight_decay=0.0", "data.args.augment=true")) == [
        Change("data.args.augment", 1, True)]


def test_an_older_manifest_without_a_key_compares_against_its_default(config):
    saved = stored(config())
    del saved["train"]["grad_clip"]  # a field added after this checkpoint was written; default None
    del saved["finetune"]
    assert trajectory_changes(saved, config()) == []
    assert trajectory_changes(saved, config("train.grad_clip=1.0")) == [Change("train.grad_clip", None, 1.0)]


def test_keys_the_current_schema_no_longer_has_are_ignored(config):
    saved = stored(config())
    saved["resume"]["allow_config_change"] = True
    saved["train"]["retired_knob"] = 3
    saved["old_section"] = {"x": 1}
    assert changes(saved, config()) == []


def test_a_new_head_shows_as_its_fields(config):
    assert [c.key for c in trajectory_changes(stored(config()), config("finetune.head.module=fc"))] == [
        "finetune.head.module", "finetune.head.num_classes"]
    assert [c.key for c in trajectory_changes(stored(config("finetune.head.module=fc")), config())] == [
        "finetune.head.module", "finetune.head.num_classes"]


def test_flatten_goes_into_free_form_mappings_and_keeps_lists_whole():
    assert flatten({"data": {"args": {"aug": {"flip": 0.5}, "classes": [1, 7]}, "batch_size": 32}}) == {
        "data.args.aug.flip": 0.5, "data.args.classes": [1, 7], "data.batch_size": 32}


def test_categories():
    assert category("optim.lr") is Category.TRAJECTORY
    assert category("model.args.width") is Category.TRAJECTORY
    assert category("train.max_epochs") is Category.EXTEND
    assert category("train.accumulate") is category("data.global_batch_size") is Category.GLOBAL_BATCH
    assert category("train.device") is Category.FREE and category("model.weights") is Category.FREE
    assert category("metrics.every_steps") is Category.FREE  # a section added later
    assert category("newsection.knob") is Category.TRAJECTORY  # unknown: refused rather than ignored


# --- allowing changes, and the refusal ----------------------------------------------------------------------

def test_a_section_prefix_allows_every_key_under_it(config):
    found = trajectory_changes(stored(config()), config("optim.lr=0.5", "optim.args.weight_decay=0.1"))
    assert refusal(found, ["optim"], URL) is None
    assert refusal(found, ["optim.lr", "optim.args"], URL) is None


def test_a_key_allows_only_itself(config):
    found = trajectory_changes(stored(config()), config("optim.lr=0.5", "optim.args.momentum=0.9"))
    message = refusal(found, ["optim.lr"], URL)
    assert "optim.args.momentum" in message and "optim.lr 0.01" not in message
    assert refusal(found, ["optim.l", "optim.args.m"], URL) is not None  # prefixes end at a dot


def test_refusal_is_one_line_naming_each_change_and_the_ways_out(config):
    found = trajectory_changes(stored(config()), config("optim.lr=0.5", "scheduler.args.T_max=20"))
    message = refusal(found, [], URL)
    assert message == (f"{URL} was written with another config: optim.lr 0.01 → 0.5, scheduler.args.T_max 10 → 20; "
                       "resume with the original values, allow them with "
                       "resume.allow_changes=[optim.lr,scheduler.args.T_max], or start a new run in another "
                       "checkpoint.dir")


def test_refusal_suggests_the_allowed_keys_too_and_shortens_long_values(config):
    long = "x" * 100 + "\n" + "y"
    found = trajectory_changes(stored(config()), config("optim.lr=0.5", f"data.args.root={json.dumps(long)}"))
    message = refusal(found, ["optim.lr"], URL)
    assert "\n" not in message and "x" * 50 not in message
    assert "data.args.root (unset) → \"xxx" in message
    assert "resume.allow_changes=[optim.lr,data.args.root]" in message


def test_describe_lists_the_applied_changes(config):
    found = trajectory_changes(stored(config()), config("optim.lr=0.5", "train.loss=mse"))
    assert describe(found) == 'optim.lr 0.01 → 0.5; train.loss "cross_entropy" → "mse"'
