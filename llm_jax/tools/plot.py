"""Training curves of one or several runs, from their `metrics.jsonl`:

    python -m llm_jax.plot --workdir runs/a [--workdir runs/b ...] [--output curves.png] [--label A --label B]

Six panels, every run in its own colour and labelled: loss against steps and against tokens seen
(training solid, validation dashed with dots), learning rate, training tokens/s, MFU, and BLEU
when a run logged it (translation), else the gradient norm; a seventh, the lm-eval task scores,
when a run evaluated tasks while training (`config.train.eval_tasks`). Tokens seen = step x batch_size x
seq_len of the run's config.json (for the encoder-decoder, target slots). In a notebook,
`figure(["runs/a"])` returns the matplotlib Figure. matplotlib comes with the `notebook` extra.
"""

from __future__ import annotations

import json
import math
import os

from llm_jax.runtime.errors import BadValue, NotFound

PANELS = (  # (title, metric keys: solid line then dashed, y label)
    ("loss", ("train/loss", "eval/loss"), "nats per token"),
    ("loss against tokens seen", ("train/loss", "eval/loss"), "nats per token"),
    ("learning rate", ("train/lr",), "lr"),
    ("training throughput", ("train/tokens_per_sec",), "tokens / s"),
    ("model FLOPs utilization", ("train/mfu",), "MFU (%)"),
)


def read_metrics(workdir: str) -> dict[str, list[tuple[int, float]]]:
    """{metric: [(step, value), ...]} of `workdir`'s metrics.jsonl, in file order (each step once:
    a resumed run rewrites what it recomputes); null values (NaN) and unreadable lines skipped."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise NotFound(
            f"{path} does not exist: --workdir must be a run directory of llm_jax.main, which writes "
            "metrics.jsonl at its first log step (config.train.log_every)"
        )
    out: dict[str, list[tuple[int, float]]] = {}
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
                step = int(record.pop("step"))
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by a crash
            for key, value in record.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    out.setdefault(key, []).append((step, float(value)))
    return out


def tokens_per_step(workdir: str) -> int | None:
    """batch_size x seq_len from the run's config.json (None if it cannot be read)."""
    try:
        with open(os.path.join(workdir, "config.json")) as f:
            config = json.load(f)
        return int(config["train"]["batch_size"]) * int(config["data"]["seq_len"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def labels_for(workdirs: list[str], labels: list[str] | None) -> list[str]:
    """The given labels, else each workdir's last path component (the whole path if those repeat)."""
    if labels:
        if len(labels) != len(workdirs):
            raise BadValue(f"{len(labels)} --label for {len(workdirs)} --workdir: give one label per workdir")
        return list(labels)
    names = [os.path.basename(os.path.normpath(w)) for w in workdirs]
    return names if len(set(names)) == len(names) else [os.path.normpath(w) for w in workdirs]


def _draw_panel(ax, title: str, keys, ylabel: str, runs, x_tokens: bool = False) -> None:
    """One panel: each run's series of `keys` (first solid, second dashed with dots)."""
    drawn = False
    for color, (label, metrics, tps) in runs:
        for style, key in zip(("-", "--"), keys):
            points = metrics.get(key, [])
            if not points or (x_tokens and not tps):
                continue
            xs = [s * tps if x_tokens else s for s, _ in points]
            ys = [100 * v if key == "train/mfu" else v for _, v in points]
            kind = "train" if key.startswith("train/") else "validation"
            name = f"{label} ({kind})" if len(keys) > 1 else label
            marker = "o" if key.startswith("eval/") else None  # evaluations are sparse: show each one
            ax.plot(xs, ys, style, color=color, marker=marker, markersize=3, label=name)
            drawn = True
    if x_tokens:
        from matplotlib.ticker import EngFormatter

        ax.xaxis.set_major_formatter(EngFormatter())  # 10k, 1M, 2G tokens
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("tokens seen" if x_tokens else "step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, f"no {', '.join(keys)} logged", ha="center", va="center", transform=ax.transAxes)


def _draw_tasks(ax, keys: list[str], runs) -> None:
    """The lm-eval scores logged while training (`tasks/<task>/<metric>`): a line per run and score,
    the run's colour, one line style per score."""
    styles = ("-o", "--s", ":^", "-.v")
    for color, (label, metrics, _) in runs:
        for i, key in enumerate(keys):
            points = metrics.get(key, [])
            if points:
                xs, ys = zip(*points)
                name = key.removeprefix("tasks/")
                ax.plot(xs, ys, styles[i % len(styles)], color=color, markersize=3, label=f"{label} {name}")
    ax.set_title("lm-eval tasks", fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel("score")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def figure(workdirs: list[str], labels: list[str] | None = None):
    """A matplotlib Figure of the runs' curves (2 x 3 panels, 2 x 4 with task scores), runs overlaid and labelled."""
    from matplotlib.figure import Figure

    names = labels_for(workdirs, labels)
    colors = [f"C{i % 10}" for i in range(len(workdirs))]
    runs = [(c, (n, read_metrics(w), tokens_per_step(w))) for c, n, w in zip(colors, names, workdirs)]
    tasks = sorted({k for _, (_, m, _) in runs for k in m if k.startswith("tasks/")})
    fig = Figure(figsize=(20 if tasks else 15, 8.5), layout="constrained")
    axes = fig.subplots(2, 4 if tasks else 3).flatten()
    for ax, (title, keys, ylabel) in zip(axes, PANELS):
        _draw_panel(ax, title, keys, ylabel, runs, x_tokens="tokens" in title)
    has_bleu = any("eval/bleu" in m for _, (_, m, _) in runs)
    last = ("validation BLEU", ("eval/bleu",), "BLEU") if has_bleu else ("gradient norm", ("train/grad_norm",), "norm")
    _draw_panel(axes[5], *last, runs)
    if tasks:
        _draw_tasks(axes[6], tasks, runs)
        axes[7].set_visible(False)
    fig.suptitle("training curves: " + ", ".join(names), fontsize=12)
    return fig
