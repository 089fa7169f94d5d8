"""Per-leaf comparison of pytrees at a relative tolerance, for the tests that say two computations
(meshes, process layouts, fast paths) give the same gradients, optimizer moments and weights.

Every leaf is compared at `rel` of its own largest |value|. A fixed absolute tolerance cannot do
this: attention query/key gradients are ~5e-5 while others are ~0.1, so an atol of 1e-6 checks
the small leaves only to a few percent. Two guards keep a comparison from passing vacuously:

- a leaf must be real signal, not float32 rounding: its largest |value| at least `GUARD` times
  the rounding level (2**-23) of the tree's largest value. Leaves that are zero in exact
  arithmetic (the key bias's gradient: it adds the same q.b to every logit of a row, which the
  softmax ignores) are named by the caller, compared at the tree's scale, and checked to be that
  small, so the exemption is itself tested;
- `assert_moved`: an update is compared only where it moved the weights by at least `GUARD`
  tolerances, so a step that does nothing (learning rate 0, warm-up) fails instead of passing.
"""

from __future__ import annotations

import jax
import numpy as np

REL = 1e-5
GUARD = 100
ROUNDING = 2.0**-23  # float32 unit roundoff


def leaves(tree) -> dict[str, np.ndarray]:
    """{key path: numpy array} of a pytree (device arrays fetched)."""
    flat = jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]
    return {jax.tree_util.keystr(path): np.asarray(x) for path, x in flat}


def _is_noise(path: str, noise) -> bool:
    return any(n in path for n in noise)


def _tree_max(tree: dict[str, np.ndarray]) -> float:
    return max(
        (float(np.abs(x).max()) for x in tree.values() if x.size and np.issubdtype(x.dtype, np.floating)), default=0.0
    )


def assert_close(actual, expected, rel: float = REL, noise=(), what: str = "") -> None:
    """Each float leaf: |actual - expected| <= rel * max|expected leaf|, elementwise; integer
    leaves (step counters) equal. Leaves whose path contains a string of `noise` are zero in
    exact arithmetic: compared at rel of the tree's largest value, and asserted to be that small."""
    a, e = leaves(actual), leaves(expected)
    assert a.keys() == e.keys(), sorted(a.keys() ^ e.keys())[:5]
    scale = _tree_max(e)
    has_floats = any(np.issubdtype(x.dtype, np.floating) for x in e.values())
    assert scale > 0 or not has_floats, f"{what}: every leaf is zero; nothing is compared"
    for path, want in e.items():
        got = a[path]
        assert got.shape == want.shape, (what, path, got.shape, want.shape)
        if not np.issubdtype(want.dtype, np.floating):
            np.testing.assert_array_equal(got, want, err_msg=f"{what} {path}")
            continue
        leaf_max = float(np.abs(want).max()) if want.size else 0.0
        if _is_noise(path, noise):
            assert leaf_max <= GUARD * ROUNDING * scale, f"{what} {path}: named as rounding noise but is {leaf_max:.3g}"
            tol = rel * scale
        else:
            assert leaf_max >= GUARD * ROUNDING * scale, (
                f"{what} {path}: largest |value| {leaf_max:.3g} is float rounding next to the tree's {scale:.3g}; "
                "the comparison would mean nothing"
            )
            tol = rel * leaf_max
        err = float(np.abs(got.astype(np.float64) - want.astype(np.float64)).max())
        assert err <= tol, f"{what} {path}: max |difference| {err:.3g} > {tol:.3g} ({rel:g} of {leaf_max:.3g})"


def assert_moved(before, after, rel: float = REL, frozen=(), what: str = "") -> None:
    """Each float leaf of `after` moved from `before` by at least GUARD tolerances of a
    comparison of `after` (GUARD * rel * max|after leaf|): the update is far above the tolerance.
    Leaves whose path contains a string of `frozen` are skipped (no gradient in exact arithmetic)."""
    b, a = leaves(before), leaves(after)
    assert a.keys() == b.keys()
    for path, new in a.items():
        if not np.issubdtype(new.dtype, np.floating) or _is_noise(path, frozen):
            continue
        moved = float(np.abs(new.astype(np.float64) - b[path]).max())
        need = GUARD * rel * float(np.abs(new).max())
        assert moved >= need, f"{what} {path}: moved {moved:.3g}, less than {GUARD} tolerances ({need:.3g})"


def state_parts(flat: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """A train state read as {key path: array} (runlib.read_state) split into the parts that are
    compared each at its own scale: 'params', AdamW's 'mu', 'sqrt_nu' (the second moments, ~g^2,
    by their square roots: the gradients' range) and the 'rest' (step counters)."""
    parts = {"params": {}, "mu": {}, "sqrt_nu": {}, "rest": {}}
    for path, x in flat.items():
        if path.startswith("['params']"):
            parts["params"][path] = x
        elif "['mu']" in path:
            parts["mu"][path] = x
        elif "['nu']" in path:
            parts["sqrt_nu"][path] = np.sqrt(x)
        else:
            parts["rest"][path] = x
    return parts
