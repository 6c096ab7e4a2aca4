"""`runner plot`: loss, accuracy and learning rate against step from metrics.jsonl, with every restart and
preemption of the current lineage (events.jsonl) marked. matplotlib comes with the `plot` extra."""
from __future__ import annotations

from pathlib import Path

from .errors import ConfigError
from .events import EVENTS, json_lines, read_events
from .report import launches_of, lineage_launches

PANELS = (("loss", ("train_loss", "val_loss")), ("accuracy", ("train_acc", "val_acc")), ("learning rate", ("lr",)))


def read_history(path: Path) -> list[dict]:
    """metrics.jsonl's epoch records that have a step, in step order; unparsable lines are skipped."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file; metrics are written at the end of each epoch") from None
    history = [record for record in json_lines(text) if isinstance(record.get("step"), int)]
    if not history:
        raise ConfigError(f"{path}: no epoch records yet; metrics are written at the end of each epoch")
    return sorted(history, key=lambda m: m["step"])


def marks(events: list[dict]) -> tuple[list[int], list[int]]:
    """(restart steps, preemption steps): each launch after the first at the step it resumed from, and each
    stop request at the step it was agreed on."""
    _, launches = lineage_launches(launches_of(events)) if events else (None, [])
    restarts = [r["step"] for launch in launches[1:] for r in launch if r["event"] == "resume"]
    stops = [r["step"] for launch in launches for r in launch
             if r["event"] == "stop_request" and isinstance(r.get("step"), int)]
    return restarts, stops


def plot(out_dir: Path, output: Path) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("runner plot needs matplotlib: pip install 'runner-train[plot]'") from None
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    formats = FigureCanvasAgg.get_supported_filetypes()  # the canvas savefig uses: no figure needed to ask
    if output.suffix.lstrip(".").lower() not in formats:
        raise ConfigError(f"runner plot -o {output}: matplotlib cannot write '{output.suffix or 'no suffix'}'; "
                          f"end the name in one of .{', .'.join(sorted(formats))} (e.g. curves.png)")
    history = read_history(out_dir / "metrics.jsonl")
    restarts, stops = marks(read_events(out_dir / EVENTS))
    panels = [(title, [k for k in keys if series(history, k)]) for title, keys in PANELS]
    panels = [(title, keys) for title, keys in panels if keys]
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 8), dpi=100, sharex=True, squeeze=False)
    for ax, (title, keys) in zip(axes[:, 0], panels):
        for key in keys:
            ax.plot(*zip(*series(history, key)), marker="o", markersize=3, label=key.replace("_", " "))
        for i, step in enumerate(restarts):
            ax.axvline(step, color="tab:green", linestyle="--", linewidth=1.2,
                       label="restart (resumed here)" if i == 0 else None)
        for i, step in enumerate(stops):
            ax.axvline(step, color="tab:red", linestyle=":", linewidth=1.5, label="preemption" if i == 0 else None)
        if title == "learning rate" and lr_span(history) > 20:
            ax.set_yscale("log")
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=9)
    axes[-1, 0].set_xlabel("optimizer step")
    fig.suptitle(f"{out_dir.name}: {len(restarts)} restart(s), {len(stops)} preemption(s)")
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output)
    plt.close(fig)
    return output


def series(history: list[dict], key: str) -> list[tuple[int, float]]:
    return [(m["step"], m[key]) for m in history if isinstance(m.get(key), (int, float))]


def lr_span(history: list[dict]) -> float:
    """max/min of the learning rate: a schedule spanning decades reads better on a log axis."""
    lrs = [lr for _, lr in series(history, "lr") if lr > 0]
    return max(lrs) / min(lrs) if lrs else 1.0
