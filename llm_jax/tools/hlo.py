"""Collectives in optimized HLO text (`compiled.as_text()`): which ones, how often per step, how many bytes.

The text is read as XLA prints it: computations one after another, callees before their callers
(post-order), each `name (params) -> type {` ... `}` with one instruction per line,
`%name = TYPE opcode(operands), attributes`.

- Counts per step: the layers of a scanned model compile to one `while` loop whose body runs once
  per layer, so an op in that body counts trip-count times (see `trip_count`; a loop whose count
  cannot be read counts once and is reported in `unknown_loops`). The TPU compiler also turns
  FSDP's all-gathers and reduce-scatters around a matmul into loops of collective-permutes
  ("windowed" collective matmuls, overlapping the ring with the matmul): those show up as permutes.
- Bytes are per device and per execution: the full array each collective works on (the result of
  an all-gather, the input of a reduce-scatter, the array of an all-reduce, all-to-all or permute).
- The TPU compiler writes a reduce-scatter as a fusion calling a computation named
  `all-reduce-scatter*` that all-reduces the full array and keeps its own slice: the all-reduce in
  there is counted as one reduce-scatter.
- The TPU compiler also splits one collective into a chain of fusions to overlap it with other
  work ("async collective fusion"): `async-collective-start` before a loop, continuations
  (`async_collective_fusion.*`) that advance the transfer inside the loop's body, and
  `async-collective-done` after it. Every piece holds a copy of the same instruction (the same
  `channel_id`, a `chain_id` attribute) and the full result shape; the buffer and the progress
  flags travel through the loop. One chain is one collective, counted once, as often as its start
  runs (llama3-1b on v5e-8: the tied embedding's 501 MiB all-gather for the logits is a chain of 8
  pieces, 6 of them in the 16-layer loop; counted piece by piece it read 47.95 GiB a step).
"""

from __future__ import annotations

import dataclasses
import math
import re

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")

_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s+\(.*\{\s*$")
# `  [ROOT ]%name = TYPE opcode(`: the type may hold spaces (tuples), the opcode is lower-case.
_INSTRUCTION = re.compile(r"^\s+(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s([a-z][a-z0-9\-]*)\(")
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([\d,]*)\]")
_CALLEE = re.compile(r"\b(?:calls|body|condition|to_apply|true_computation|false_computation)=%?([\w.\-]+)")
_CALLEE_LIST = re.compile(r"\b(?:branch_computations|called_computations)=\{([^}]*)\}")
_REDUCE_SCATTER_BODY = "all-reduce-scatter"
_WINDOWED = "windowed_dot_general_body"  # the TPU compiler's collective-matmul loop bodies
_CHAIN = re.compile(r'\bchain_id="?(\w+)')  # a piece of an async collective fusion chain
_CHANNEL = re.compile(r"\bchannel_id=(\d+)")


@dataclasses.dataclass(frozen=True)
class CollectiveOp:
    kind: str  # one of KINDS
    computation: str  # the HLO computation holding it
    shapes: tuple[str, ...]  # its arrays, e.g. ('bf16[64,192]',)
    bytes: int  # per device, per execution (see the module docstring)
    per_step: int  # executions per run of the entry computation (one train step)
    gathered: int = 0  # all-reduce only: bytes of it that are an all-gather in disguise (see summarize)
    chain: str | None = None  # the channel_id of the async collective fusion chain it is a piece of


def array_bytes(type_text: str) -> int:
    """Bytes of every array in an HLO type (`f32[64,2]{1,0}`, or a tuple of them); `pred` is one byte."""
    total = 0
    for dtype, dims in _ARRAY.findall(type_text):
        bits = 8 if dtype == "pred" else int(re.match(r"[a-z]+(\d*)", dtype).group(1) or 0)
        total += math.prod(int(d) for d in dims.split(",") if d) * bits // 8
    return total


def parse_computations(text: str) -> tuple[dict[str, list[str]], str | None]:
    """({computation name: instruction lines} in text order, name of the ENTRY computation)."""
    comps, entry, current = {}, None, None
    for line in text.splitlines():
        if current is None:
            m = _HEADER.match(line)
            if m:
                current = m.group(2)
                comps[current] = []
                entry = current if m.group(1) else entry
        elif line.strip() == "}":
            current = None
        elif line.strip():
            comps[current].append(line)
    return comps, entry


def trip_count(while_line: str, comps: dict[str, list[str]]) -> int | None:
    """Iterations of a `while` instruction, or None when neither XLA nor the loop's code says.

    Without `known_trip_count`, the loop must read `i < N` (N a constant) in its condition and
    `i + step` (step a constant) in its body, i counting from 0: the TPU compiler's scans, and its
    windowed collective matmuls, which step by 2 (two ring steps per iteration).
    """
    known = re.search(r'known_trip_count"?\s*[:=]\s*\{\s*"?n"?\s*:\s*"?(\d+)', while_line)
    if known:
        return int(known.group(1))
    names = dict(re.findall(r"\b(condition|body)=%?([\w.\-]+)", while_line))
    cond, body = comps.get(names.get("condition"), []), comps.get(names.get("body"), [])
    compare = next((line for line in cond if " compare(" in line and "direction=LT" in line), None)
    if compare is None:
        return None
    defs = _definitions(cond)
    counter, bound = (defs.get(op, "") for op in _operands(compare, "compare")[:2])
    index, limit = re.search(r"get-tuple-element\(.*index=(\d+)", counter), _constant(bound)
    if index is None or limit is None:
        return None
    step = _loop_step(body, int(index.group(1)))
    return -(-limit // step)


def _definitions(lines: list[str]) -> dict[str, str]:
    """{instruction name: its line} of one computation."""
    out = {}
    for line in lines:
        m = re.match(r"^\s+(?:ROOT\s+)?%?([\w.\-]+)\s*=", line)
        if m:
            out[m.group(1)] = line
    return out


def _operands(line: str, opcode: str) -> list[str]:
    """Operand names of `opcode(...)` in an instruction line."""
    m = re.search(rf"\s{re.escape(opcode)}\(([^)]*)\)", re.sub(r"/\*.*?\*/", "", line))
    return [op.strip().lstrip("%") for op in m.group(1).split(",")] if m else []


def _constant(line: str) -> int | None:
    m = re.search(r"\sconstant\((-?\d+)\)", line)
    return int(m.group(1)) if m else None


def _loop_step(body: list[str], index: int) -> int:
    """What a loop body adds to its tuple element `index` each iteration (1 when not recognisable)."""
    root = next((line for line in body if line.lstrip().startswith("ROOT") and " tuple(" in line), "")
    outputs = _operands(root, "tuple")
    defs = _definitions(body)
    update = defs.get(outputs[index], "") if index < len(outputs) else ""
    steps = [_constant(defs.get(op, "")) for op in _operands(update, "add")]
    return next((s for s in steps if s and s > 0), 1)


def multipliers(comps: dict[str, list[str]], entry: str) -> tuple[dict[str, int], int]:
    """(executions of each computation per run of `entry`, number of loops whose trip count is unknown)."""
    mult, unknown = {entry: 1}, 0
    for name in reversed(list(comps)):  # post-order printed: callers come after their callees
        m = mult.get(name, 0)
        if not m:
            continue
        for line in comps[name]:
            callees = _CALLEE.findall(line)
            for group in _CALLEE_LIST.findall(line):
                callees += [c.strip().lstrip("%") for c in group.split(",") if c.strip()]
            if not callees:
                continue
            factor = 1
            if re.search(r"\swhile\(", line):
                trips = trip_count(line, comps)
                unknown += trips is None
                factor = trips or 1
            for callee in callees:
                mult[callee] = mult.get(callee, 0) + m * factor
    return mult, unknown


def _tuple_elements(type_text: str) -> list[str]:
    """Top-level elements of a tuple type '(a, (b, c), d)'; [type_text] for an array type."""
    if not type_text.startswith("("):
        return [type_text]
    depth, start, parts = 0, 1, []
    for i, ch in enumerate(type_text):
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 1:
            parts.append(type_text[start:i])
            start = i + 1
    parts.append(type_text[start:-1])
    return [p.strip() for p in parts]


def _result_type(opcode: str, type_text: str) -> str:
    """The result part of an instruction's type: async starts carry (operands, results, ...)."""
    parts = _tuple_elements(type_text)
    if opcode in ("all-gather-start", "collective-permute-start") and len(parts) > 1:
        return parts[1]
    return type_text


def _gathered_bytes(line: str, type_text: str, defs: dict[str, str], comps: dict[str, list[str]]) -> int:
    """Bytes of an all-reduce's operands that are shards written into zeros (dynamic-update-slice,
    directly, through a fusion or a copy): the TPU compiler's all-gather done as an all-reduce."""
    sizes = [array_bytes(t) for t in _tuple_elements(type_text)]
    total = 0
    for size, name in zip(sizes, _operands(line, "all-reduce") or _operands(line, "all-reduce-start")):
        for _ in range(3):  # copy-done -> copy-start -> the value copied
            d = defs.get(name, "")
            copied = _operands(d, "copy-done") or _operands(d, "copy-start")
            if not copied:
                break
            name = copied[0]
        d = defs.get(name, "")
        callee = re.search(r"\bcalls=%?([\w.\-]+)", d) if " fusion(" in d else None
        root = next((x for x in comps.get(callee.group(1), []) if x.lstrip().startswith("ROOT")), "") if callee else d
        total += size if " dynamic-update-slice(" in root else 0
    return total


def _group_size(line: str) -> int:
    """Devices in each replica group of a collective (1 when the form is not recognised)."""
    listed = re.search(r"replica_groups=\{\{([\d,]*)\}", line)
    if listed:
        return len(listed.group(1).split(","))
    iota = re.search(r"replica_groups=\[\d+,(\d+)\]", line)
    return int(iota.group(1)) if iota else 1


def collective_ops(text: str) -> tuple[list[CollectiveOp], int]:
    """(every collective instruction of an optimized HLO module, loops with an unknown trip count)."""
    comps, entry = parse_computations(text)
    if entry is None:
        raise ValueError("no ENTRY computation in this HLO text; pass compiled.as_text() of a compiled step")
    mult, unknown = multipliers(comps, entry)
    ops = []
    for name, lines in comps.items():
        defs = _definitions(lines)
        for line in lines:
            m = _INSTRUCTION.match(line)
            if not m or m.group(2).endswith("-done"):
                continue
            opcode = m.group(2)
            kind = opcode.removesuffix("-start")
            if kind not in KINDS:
                continue
            result = _result_type(opcode, m.group(1))
            size = array_bytes(result)
            if kind == "all-reduce" and name.startswith(_REDUCE_SCATTER_BODY):
                kind = "reduce-scatter"  # the full array is reduced, then sliced (see the docstring)
            elif kind == "reduce-scatter":
                size *= _group_size(line)  # the result is one shard of the reduced array
            shapes = tuple(f"{d}[{s}]" for d, s in _ARRAY.findall(result))
            gathered = _gathered_bytes(line, result, defs, comps) if kind == "all-reduce" else 0
            channel = _CHANNEL.search(line)
            chain = channel.group(1) if channel and _CHAIN.search(line) else None
            ops.append(CollectiveOp(kind, name, shapes, size, mult.get(name, 0), gathered, chain))
    return merge_chains(ops), unknown


def merge_chains(ops: list[CollectiveOp]) -> list[CollectiveOp]:
    """`ops` with each async collective fusion chain (pieces of one collective: the same kind and
    channel_id) as one op, run as often as its least frequent piece, the start (its continuations
    run inside loops the start is outside of, or in the same one)."""
    start: dict[tuple[str, str], CollectiveOp] = {}
    for op in ops:
        key = (op.kind, op.chain)
        if op.chain is not None and (key not in start or op.per_step < start[key].per_step):
            start[key] = op
    return [op for op in ops if op.chain is None or start[(op.kind, op.chain)] is op]


def summarize(ops: list[CollectiveOp]) -> dict[str, dict[str, int]]:
    """{kind: {'ops': instructions in the HLO, 'count': executions per step, 'bytes': per device per step}}.

    How the TPU compiler may hide FSDP's all-gathers and reduce-scatters, reported apart:
    - all-reduce 'gathered_bytes': operands that are a shard written into zeros, all-reduced (an
      all-gather done as an all-reduce, frequent on tori such as v5p:4x4x4);
    - collective-permute 'windowed_bytes': permutes inside windowed collective-matmul loops (rings
      overlapping a matmul).
    """
    out = {k: {"ops": 0, "count": 0, "bytes": 0} for k in KINDS}
    out["all-reduce"]["gathered_bytes"] = 0
    out["collective-permute"]["windowed_bytes"] = 0
    for op in ops:
        s = out[op.kind]
        s["ops"] += 1
        s["count"] += op.per_step
        s["bytes"] += op.per_step * op.bytes
        if op.kind == "all-reduce":
            s["gathered_bytes"] += op.per_step * op.gathered
        if op.kind == "collective-permute" and _WINDOWED in op.computation:
            s["windowed_bytes"] += op.per_step * op.bytes
    return out
