"""The package's shape, read from its source (no JAX): imports run one way, no cycles, small files.

Layers, lowest first (ARCHITECTURE.md): a module imports only from its own layer or lower ones,
counting every import in the file, the ones inside functions too (a deferred import is still a
dependency, only a later one). `LAYER` is the one table of ranks; a new subpackage must be added
to it before its modules pass.
"""

from __future__ import annotations

import ast
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "llm_jax"

# Rank of each subpackage (and of llm_jax/__init__.py, which may import nothing above runtime).
LAYER = {
    "llm_jax": 0,
    "llm_jax.runtime": 0,
    "llm_jax.models": 1,
    "llm_jax.data": 2,
    "llm_jax.inference": 3,
    "llm_jax.training": 4,
    "llm_jax.evaluation": 5,
    "llm_jax.interop": 6,
    "llm_jax.tools": 7,
}
TOP_LEVEL = 8  # llm_jax/<name>.py: cli.py and the thin `python -m llm_jax.<name>` command modules
LAYER_NAME = {
    0: "runtime", 1: "models", 2: "data", 3: "inference", 4: "training", 5: "evaluation", 6: "interop", 7: "tools",
    8: "top",
}  # fmt: skip

MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80
# Functions allowed past MAX_FUNCTION_LINES: flat lists of keys, one line per key, nothing to split.
LONG_FUNCTION_ALLOWED = {("llm_jax/training/config.py", "base_config")}
MAX_TOP_LEVEL_FILES = 14


class LayerTableError(Exception):
    """A module of a subpackage that LAYER does not rank."""


def modules(root: str = REPO) -> dict[str, str]:
    """{dotted module name: path} of every .py file of the package under `root`."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(os.path.join(root, PACKAGE)):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for name in sorted(filenames):
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                parts = os.path.relpath(path, root)[: -len(".py")].split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                out[".".join(parts)] = path
    return out


def _resolve(dotted: str, root: str) -> str:
    """`dotted` (llm_jax.a.b or llm_jax.a.b.some_name) cut to the longest prefix that is a module or package."""
    parts = dotted.split(".")
    while len(parts) > 1:
        base = os.path.join(root, *parts)
        if os.path.isfile(base + ".py") or os.path.isfile(os.path.join(base, "__init__.py")):
            break
        parts.pop()
    return ".".join(parts)


def _package_of(path: str, root: str) -> list[str]:
    """The dotted package holding the file at `path`, as parts (for relative imports)."""
    return os.path.relpath(os.path.dirname(path), root).split(os.sep)


def imports_of(path: str, root: str = REPO) -> list[tuple[int, str]]:
    """(line, module) of every import of the package in the file, at any depth (functions too).

    `from llm_jax.a import b` is an import of the module llm_jax.a.b when that module exists, else
    of llm_jax.a; relative imports are resolved against the file's package."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=path)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, _resolve(a.name, root)) for a in node.names if _ours(a.name)]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                pkg = _package_of(path, root)
                base = ".".join(pkg[: len(pkg) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if _ours(base):
                found += [(node.lineno, _resolve(f"{base}.{a.name}", root)) for a in node.names]
    return sorted(set(found))


def _ours(dotted: str) -> bool:
    return dotted == PACKAGE or dotted.startswith(PACKAGE + ".")


def layer_of(module: str, root: str = REPO) -> int:
    """The rank of a dotted module of the package; LayerTableError for a subpackage LAYER lacks."""
    parts = module.split(".")
    if len(parts) == 1:
        return LAYER[PACKAGE]
    if os.path.isfile(os.path.join(root, PACKAGE, parts[1] + ".py")):
        return TOP_LEVEL
    sub = ".".join(parts[:2])
    if sub not in LAYER:
        raise LayerTableError(
            f"{sub.replace('.', '/')}/ has no layer: add {sub!r} with its rank to LAYER in tests/test_layout.py "
            "and to the layer order in ARCHITECTURE.md"
        )
    return LAYER[sub]


def _where(path: str, root: str) -> str:
    return os.path.relpath(path, root).replace(os.sep, "/")


def upward_imports(root: str = REPO) -> list[str]:
    """One line per import from a higher layer into a lower one, and per module LAYER cannot rank."""
    bad = []
    for module, path in modules(root).items():
        try:
            own = layer_of(module, root)
        except LayerTableError as e:
            bad.append(f"{_where(path, root)}: {e}")
            continue
        for line, target in imports_of(path, root):
            try:
                theirs = layer_of(target, root)
            except LayerTableError as e:
                bad.append(f"{_where(path, root)}:{line} imports {target}: {e}")
                continue
            if theirs > own:
                bad.append(
                    f"{_where(path, root)}:{line} imports {target} "
                    f"(layer {theirs} {LAYER_NAME[theirs]} above layer {own} {LAYER_NAME[own]})"
                )
    return bad


def import_graph(root: str = REPO) -> dict[str, set[str]]:
    """{module: modules it imports}, every import counted (module level and inside functions)."""
    return {m: {t for _, t in imports_of(p, root) if t != m} for m, p in modules(root).items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle [a, b, ..., a] per strongly connected group of more than one module (shortest through
    its first module), sorted; empty when the graph is acyclic."""
    cycles = []
    for group in _strongly_connected(graph):
        if len(group) < 2:
            continue
        start = min(group)
        # Breadth-first inside the group from `start` back to itself: the shortest cycle through it.
        paths = {start: [start]}
        queue = [start]
        cycle = None
        while queue and cycle is None:
            node = queue.pop(0)
            for nxt in sorted(graph.get(node, ())):
                if nxt == start:
                    cycle = paths[node] + [start]
                    break
                if nxt in group and nxt not in paths:
                    paths[nxt] = paths[node] + [nxt]
                    queue.append(nxt)
        cycles.append(cycle)
    return sorted(cycles)


def _strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's strongly connected components of `graph`."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return groups


# --- the package ---


def test_imports_run_one_way():
    bad = upward_imports()
    assert not bad, "imports from a higher layer into a lower one:\n" + "\n".join(bad)


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_modules_and_functions_are_small():
    bad = []
    for path in modules().values():
        where = _where(path, REPO)
        with open(path, encoding="utf-8") as f:
            text = f.read()
        lines = len(text.splitlines())
        if lines > MAX_MODULE_LINES:
            bad.append(f"{where}: {lines} lines (at most {MAX_MODULE_LINES})")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES and (where, node.name) not in LONG_FUNCTION_ALLOWED:
                    bad.append(f"{where}:{node.lineno} {node.name}: {n} lines (at most {MAX_FUNCTION_LINES})")
    assert not bad, "\n".join(bad)


def test_top_level_holds_few_files():
    top = os.path.join(REPO, PACKAGE)
    entries = sorted(
        e for e in os.listdir(top) if e != "__pycache__" and not os.path.isfile(os.path.join(top, e, "__init__.py"))
    )
    assert len(entries) <= MAX_TOP_LEVEL_FILES, f"llm_jax/ holds {len(entries)} entries besides subpackages: {entries}"


def test_subpackages_say_what_they_hold():
    bad = []
    for module, path in modules().items():
        if path.endswith("__init__.py") and module != PACKAGE:
            with open(path, encoding="utf-8") as f:
                doc = ast.get_docstring(ast.parse(f.read())) or ""
            if len(doc) < 60 or "TODO" in doc:
                bad.append(f"{_where(path, REPO)}: docstring {doc!r}")
    assert not bad, "each subpackage's __init__.py says what it holds and what it may import:\n" + "\n".join(bad)


# --- the checker itself, on a synthetic package ---


def _write(root, files: dict[str, str]) -> str:
    for rel, text in files.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    return str(root)


CLEAN = {
    "llm_jax/__init__.py": "from llm_jax.runtime import errors\n",
    "llm_jax/runtime/__init__.py": '"""Runtime."""\n',
    "llm_jax/runtime/errors.py": "X = 1\n",
    "llm_jax/models/__init__.py": "",
    "llm_jax/models/model.py": "import llm_jax.runtime.errors\nfrom llm_jax.runtime.errors import X\n",
    "llm_jax/models/flops.py": "def f():\n    from . import model\n",
    "llm_jax/inference/__init__.py": "",
    "llm_jax/inference/decode.py": "from llm_jax.models import model, flops\n",
    "llm_jax/main.py": "from llm_jax.inference import decode\nimport llm_jax\n",
}


def test_checker_passes_a_clean_package(tmp_path):
    root = _write(tmp_path, CLEAN)
    assert upward_imports(root) == []
    assert find_cycles(import_graph(root)) == []
    assert imports_of(os.path.join(root, "llm_jax/inference/decode.py"), root) == [
        (1, "llm_jax.models.flops"),
        (1, "llm_jax.models.model"),
    ]
    assert imports_of(os.path.join(root, "llm_jax/models/flops.py"), root) == [(2, "llm_jax.models.model")]
    assert layer_of("llm_jax.main", root) == TOP_LEVEL and layer_of("llm_jax", root) == 0


def test_checker_catches_an_upward_import_inside_a_function(tmp_path):
    root = _write(
        tmp_path,
        {
            **CLEAN,
            "llm_jax/models/model.py": "def bleu():\n    if True:\n        from llm_jax.inference.decode import y\n",
            "llm_jax/__init__.py": "import llm_jax.models.model\n",
        },
    )
    assert upward_imports(root) == [
        "llm_jax/__init__.py:1 imports llm_jax.models.model (layer 1 models above layer 0 runtime)",
        "llm_jax/models/model.py:3 imports llm_jax.inference.decode (layer 3 inference above layer 1 models)",
    ]


def test_checker_catches_a_cycle(tmp_path):
    root = _write(
        tmp_path,
        {
            **CLEAN,
            "llm_jax/models/model.py": "import llm_jax.models.loss\n",
            "llm_jax/models/loss.py": "def f():\n    from llm_jax.models import flops\n",
        },
    )
    assert find_cycles(import_graph(root)) == [
        ["llm_jax.models.flops", "llm_jax.models.model", "llm_jax.models.loss", "llm_jax.models.flops"]
    ]
    assert find_cycles({"a": {"b"}, "b": {"a"}, "c": {"c", "a"}}) == [["a", "b", "a"]]


def test_checker_asks_for_a_new_subpackage_in_the_table(tmp_path):
    root = _write(tmp_path, {**CLEAN, "llm_jax/moe/__init__.py": "", "llm_jax/moe/router.py": "X = 1\n"})
    bad = upward_imports(root)
    assert len(bad) == 2 and all("llm_jax/moe/ has no layer: add 'llm_jax.moe'" in b for b in bad), bad
    with pytest.raises(LayerTableError, match="add 'llm_jax.moe' with its rank to LAYER"):
        layer_of("llm_jax.moe.router", root)


# --- documentation names files and commands that exist ---

DOCS = ["README.md", "ARCHITECTURE.md", "pyproject.toml", ".ci/run"]
DOC_GLOBS = [("configs", ".py"), ("experiments", ""), (PACKAGE, ".py")]
PATH_MENTION = re.compile(r"(?<![\w-])llm_jax/((?:\w+/)*\w+\.py)\b")
COMMAND_MENTION = re.compile(r"\bpython3?\s+-m\s+(llm_jax(?:\.\w+)*)(?!\.<)")  # `llm_jax.<name>`: a placeholder


def _doc_files() -> list[str]:
    out = [os.path.join(REPO, d) for d in DOCS if os.path.exists(os.path.join(REPO, d))]
    for folder, ext in DOC_GLOBS:
        for dirpath, dirnames, filenames in os.walk(os.path.join(REPO, folder)):
            dirnames[:] = [d for d in dirnames if d != "__pycache__" and not d.startswith(".")]
            out += [os.path.join(dirpath, n) for n in sorted(filenames) if n.endswith(ext)]
    return sorted(out)


def _mentions(pattern: re.Pattern) -> list[tuple[str, int, str]]:
    """(file, line, matched group) of every mention of `pattern` in the documentation files."""
    found = []
    for path in _doc_files():
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except UnicodeDecodeError:  # a picture or other binary file among the experiments
            continue
        for i, line in enumerate(lines, 1):
            found += [(_where(path, REPO), i, m.group(1)) for m in pattern.finditer(line)]
    return found


def test_docs_name_files_that_exist():
    found = _mentions(PATH_MENTION)
    assert found, "no llm_jax/<path>.py mention found: the pattern no longer matches the docs"
    stale = [f"{w}:{i}: llm_jax/{p}" for w, i, p in found if not os.path.isfile(os.path.join(REPO, PACKAGE, p))]
    assert not stale, "mentions of files that do not exist:\n" + "\n".join(stale)


def test_docs_name_commands_that_exist():
    found = _mentions(COMMAND_MENTION)
    assert found, "no `python -m llm_jax.<name>` mention found: the pattern no longer matches the docs"

    def runnable(module):
        base = os.path.join(REPO, *module.split("."))
        return os.path.isfile(base + ".py") or os.path.isfile(os.path.join(base, "__main__.py"))

    stale = [f"{w}:{i}: python -m {m}" for w, i, m in found if not runnable(m)]
    assert not stale, "commands whose module does not exist:\n" + "\n".join(stale)


# A bare file name in the prose (`seq2seq.py`, `run.py`) must name a file of the repository; names of
# other projects' files (nanoGPT's model.py is ours too) go here.
OTHER_PROJECTS_FILES: set[str] = set()
PROSE = ["README.md", "ARCHITECTURE.md", "experiments/README.md"]
BARE_MENTION = re.compile(r"(?<![\w/.-])(\w+\.py)\b")


def test_prose_names_files_that_exist():
    ours = set()
    for folder in (PACKAGE, "tests", "experiments", "configs"):
        for _, _, filenames in os.walk(os.path.join(REPO, folder)):
            ours.update(filenames)
    stale = []
    for rel in PROSE:
        with open(os.path.join(REPO, rel), encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                stale += [
                    f"{rel}:{i}: {m.group(1)}"
                    for m in BARE_MENTION.finditer(line)
                    if m.group(1) not in ours | OTHER_PROJECTS_FILES
                ]
    assert not stale, "file names that no file of the repository has (renamed? write the new path):\n" + "\n".join(
        stale
    )
