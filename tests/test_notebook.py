"""experiments/colab_quickstart.ipynb executed top to bottom as CI runs it: LLM_JAX_QUICK=1 on CPU,
through nbclient with a time limit per cell. It must be committed without outputs, run without an
error, and draw real pictures inline (image/png outputs that decode). Needs the `notebook` extra."""

import base64
import json
import os
import sys
import time

import pytest
import runlib as R

nbformat = pytest.importorskip("nbformat", reason="needs the notebook extra: pip install -e '.[notebook]'")
nbclient = pytest.importorskip("nbclient", reason="needs the notebook extra: pip install -e '.[notebook]'")
pytest.importorskip("ipykernel", reason="needs the notebook extra: pip install -e '.[notebook]'")
pytest.importorskip("matplotlib", reason="needs the notebook extra: pip install -e '.[notebook]'")

NOTEBOOK = os.path.join(R.REPO, "experiments", "colab_quickstart.ipynb")
CELL_TIMEOUT_S = 420  # the time limit of any one cell; the whole notebook takes a few minutes


def test_the_notebook_is_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


@pytest.mark.slow
def test_quickstart_runs_top_to_bottom_and_draws_inline(tmp_path, monkeypatch):
    # A kernel spec of this very interpreter, so the kernel runs where llm_jax is installed.
    spec_dir = tmp_path / "jupyter" / "kernels" / "llm_jax_test"
    spec_dir.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec_dir / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "llm_jax", "language": "python"}))
    for key, value in R.env(8).items():  # CPU, 8 emulated devices, the shared compilation cache
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("LLM_JAX_QUICK", "1")
    monkeypatch.setenv("LLM_JAX_NOTEBOOK_WORKDIR", str(tmp_path / "run"))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")

    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=CELL_TIMEOUT_S, kernel_name="llm_jax_test", resources={"metadata": {"path": str(tmp_path)}}
    )
    t0 = time.time()
    try:
        client.execute()
    finally:
        nbformat.write(nb, str(tmp_path / "executed.ipynb"))  # kept for a look when it fails
    elapsed = time.time() - t0

    texts = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "parameters per module:" in texts and "mesh: {'data': 8, 'fsdp': 1, 'tensor': 1}" in texts
    assert "parameters identical: True" in texts and "now at step 50" in texts
    assert "| keep freed memory: True" in texts, "its first cell sets host memory (llm_jax/runtime/hostmem.py)"
    pngs = [
        base64.b64decode(o["data"]["image/png"])
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
        if "image/png" in o.get("data", {})
    ]
    assert len(pngs) >= 3, f"{len(pngs)} inline pictures: expected the loss curve, all curves, attention"
    for png in pngs:
        R.assert_real_image(png, min_px=200)
    print(f"notebook executed in {elapsed:.0f}s")
