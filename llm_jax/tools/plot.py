"""Training curves of one or several runs, from their `metrics.jsonl`:

    python -m llm_jax.plot --workdir runs/a [--workdir runs/b ...] [--output curves.png] [--label A --label B]

Seven panels, every run in its own colour and labelled: loss against steps and against tokens seen
(training solid, validation dashed with dots), learning rate, training tokens/s, MFU, BLEU
when a run logged it (translation), else the gradient norm, and loss against wall-clock time; when
a run has experts (mixture of experts), its router's losses (load-balancing solid, z-loss dashed)
and each expert's load over training; when a run is preference-tuned (DPO, SimPO), its reward
margin and preference accuracy (training solid, validation dashed) and the rewards of the chosen
and rejected responses; the lm-eval task scores, when a run evaluated tasks while
training (`config.train.eval_tasks`). Tokens seen = step x batch_size x
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
WALL_TIME = ("loss against wall time", ("train/loss", "eval/loss"), "nats per token")
ROUTER = ("router losses", ("train/aux_loss", "train/router_z_loss"), "loss")
PREFERENCE = (  # a preference objective's metrics (llm_jax/models/preference.py)
    ("reward margin (chosen - rejected)", ("train/rewards/margin", "eval/rewards/margin"), "reward"),
    ("preference accuracy", ("train/rewards/accuracy", "eval/rewards/accuracy"), "share of pairs"),
    ("rewards", ("train/rewards/chosen", "train/rewards/rejected"), "reward"),
)


def read_metrics(workdir: str) -> dict[str, list[tuple[int, float]]]:
    """{metric: [(step, value), ...]} of `workdir`'s metrics.jsonl, in file order (each step once:
    a resumed run rewrites what it recomputes); null values (NaN) and unreadable lines skipped. A
    value may be a list of numbers (`train/expert_load`: one fraction per expert)."""
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
                elif isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value):
                    out.setdefault(key, []).append((step, [float(v) for v in value]))
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


def _x_values(x: str, points, tps: int | None, metrics) -> list | None:
    """The x of each (step, value) point: the step, tokens seen (step x tokens per step) or the run's
    wall-clock seconds at that step (`time_s`; points of steps without one are dropped: None)."""
    if x == "tokens":
        return [s * tps for s, _ in points]
    if x == "time":
        seconds = dict(metrics.get("time_s", []))
        return [seconds.get(s) for s, _ in points]
    return [s for s, _ in points]


def _draw_panel(ax, title: str, keys, ylabel: str, runs, x: str = "step") -> None:
    """One panel: each run's series of `keys` (first solid, second dashed with dots) against `x`
    ('step', 'tokens' or 'time')."""
    drawn = False
    for color, (label, metrics, tps) in runs:
        for style, key in zip(("-", "--"), keys):
            points = metrics.get(key, [])
            if not points or (x == "tokens" and not tps):
                continue
            xs = _x_values(x, points, tps, metrics)
            points = [(s, v) for (s, v), xv in zip(points, xs) if xv is not None]
            xs = [xv for xv in xs if xv is not None]
            ys = [100 * v if key == "train/mfu" else v for _, v in points]
            kind = "train" if key.startswith("train/") else "validation"
            if all(k.startswith("train/") for k in keys):  # two training metrics: name each
                kind = key.removeprefix("train/")
            name = f"{label} ({kind})" if len(keys) > 1 else label
            marker = "o" if key.startswith("eval/") else None  # evaluations are sparse: show each one
            ax.plot(xs, ys, style, color=color, marker=marker, markersize=3, label=name)
            drawn = True
    if x == "tokens":
        from matplotlib.ticker import EngFormatter

        ax.xaxis.set_major_formatter(EngFormatter())  # 10k, 1M, 2G tokens
    ax.set_title(title, fontsize=10)
    ax.set_xlabel({"tokens": "tokens seen", "time": "wall-clock seconds"}.get(x, "step"))
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, f"no {', '.join(keys)} logged", ha="center", va="center", transform=ax.transAxes)


def _draw_load(ax, runs) -> None:
    """Each expert's share of the token copies (`train/expert_load`, averaged over the MoE layers)
    over training: a thin line per expert in the run's colour, and the balanced share 1 / E dotted."""
    for color, (label, metrics, _) in runs:
        points = metrics.get("train/expert_load", [])
        if not points:
            continue
        steps = [s for s, _ in points]
        experts = len(points[-1][1])
        for e in range(experts):
            share = [load[e] if len(load) == experts else math.nan for _, load in points]
            ax.plot(steps, share, "-", color=color, alpha=0.7, linewidth=1, label=label if e == 0 else None)
        ax.axhline(1 / experts, color=color, linestyle=":", linewidth=1)
    ax.set_title("expert load (one line per expert; dotted: balanced)", fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel("share of token copies")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


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
    """A matplotlib Figure of the runs' curves (rows of 4 panels), runs overlaid and labelled."""
    from matplotlib.figure import Figure

    names = labels_for(workdirs, labels)
    colors = [f"C{i % 10}" for i in range(len(workdirs))]
    runs = [(c, (n, read_metrics(w), tokens_per_step(w))) for c, n, w in zip(colors, names, workdirs)]
    tasks = sorted({k for _, (_, m, _) in runs for k in m if k.startswith("tasks/")})
    experts = any("train/expert_load" in m for _, (_, m, _) in runs)
    preference = any("train/rewards/margin" in m for _, (_, m, _) in runs)
    has_bleu = any("eval/bleu" in m for _, (_, m, _) in runs)
    last = ("validation BLEU", ("eval/bleu",), "BLEU") if has_bleu else ("gradient norm", ("train/grad_norm",), "norm")
    # Each panel: a function of its axes.
    panels = [lambda ax, p=p: _draw_panel(ax, *p, runs, x="tokens" if "tokens" in p[0] else "step") for p in PANELS]
    panels += [lambda ax: _draw_panel(ax, *last, runs), lambda ax: _draw_panel(ax, *WALL_TIME, runs, x="time")]
    if experts:
        panels += [lambda ax: _draw_panel(ax, *ROUTER, runs), lambda ax: _draw_load(ax, runs)]
    if preference:
        panels += [lambda ax, p=p: _draw_panel(ax, *p, runs) for p in PREFERENCE]
    if tasks:
        panels.append(lambda ax: _draw_tasks(ax, tasks, runs))
    rows = -(-len(panels) // 4)
    fig = Figure(figsize=(20, 4.25 * rows), layout="constrained")
    axes = fig.subplots(rows, 4).flatten()
    for ax, draw in zip(axes, panels):
        draw(ax)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle("training curves: " + ", ".join(names), fontsize=12)
    return fig
