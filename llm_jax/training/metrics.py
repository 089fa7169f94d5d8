"""The metrics writer: `metrics.jsonl` (one JSON object per line, the record that tools read) and
TensorBoard events, written by process 0 only."""

from __future__ import annotations

import json
import math
import os
import sys

import numpy as np

from llm_jax.runtime import files


class MetricsLog:
    """metrics.jsonl (one JSON object per line) and TensorBoard events, from process 0 only.

    `keep_until`: on resume, lines of steps after the restored checkpoint are dropped first (they
    are about to be recomputed, identically), so the file holds each step once.
    """

    def __init__(self, workdir: str, enabled: bool, keep_until: int | None = None):
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        path = os.path.join(workdir, "metrics.jsonl")
        if keep_until is not None:
            _truncate_jsonl(path, keep_until)
        self.file = open(path, "a", buffering=1)
        try:
            self.tb = _summary_writer_class()(os.path.join(workdir, "tensorboard"))
        except ImportError:  # TensorBoard events are optional; metrics.jsonl is always written
            self.tb = None

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": int(step), **{k: _scalar(v) for k, v in metrics.items()}}) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float, np.floating, np.integer)):
                    self.tb.add_scalar(k, float(v), int(step))

    def close(self):
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()


def _summary_writer_class():
    """tensorboardX's SummaryWriter, imported without torch: tensorboardX imports torch (seconds of
    start-up) only to recognise its tensors, and we log Python floats."""
    block = "torch" not in sys.modules
    if block:
        sys.modules["torch"] = None  # makes `import torch` raise ImportError, which tensorboardX handles
    try:
        from tensorboardX import SummaryWriter
    finally:
        if block and sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]
    return SummaryWriter


def _truncate_jsonl(path: str, keep_until: int) -> None:
    """Drops lines whose step is after `keep_until` (and a line cut short by a crash); atomic."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            if line.endswith("\n") and int(json.loads(line)["step"]) <= keep_until:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            pass
    if len(kept) != len(lines):
        files.write_text(path, "".join(kept))


def _scalar(v):
    v = np.asarray(v).item() if hasattr(v, "shape") else v
    if isinstance(v, (float, np.floating)):
        return float(v) if math.isfinite(v) else None  # JSON has no NaN
    return v
