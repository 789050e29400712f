"""Reading a captured graph: where a node came from, what its inputs are, what depends on what.

Graphs come from Dynamo. Parameters and buffers arrive as placeholders whose ``grapharg`` source
names their module path; ``nn_module_stack`` on each op gives the module it ran in. These helpers
turn both into plain dotted paths (``transformer.h.3.attn``) and sort placeholders into user inputs,
parameters and buffers.
"""

from __future__ import annotations

import copy
import operator
import re
from typing import Iterable

import torch
from torch.fx import Graph, Node

__all__ = [
    "module_path",
    "source_location",
    "placeholder_kind",
    "placeholder_path",
    "ancestors",
    "IN_PLACE_OPERATORS",
    "with_mutations",
    "mutated_input",
    "written_roots",
    "descendants",
    "dotted_path",
    "clone_graph",
    "remember_sources",
]

_INDEX = re.compile(r"\[['\"]?([^'\"\]]+)['\"]?\]")


def dotted_path(raw: str) -> str:
    """``L['self'].transformer.h[0].attn`` or ``L['self']._modules['h']._modules['0']`` -> ``transformer.h.0.attn``."""
    raw = re.sub(r"^[LG]\[['\"][^'\"]*['\"]\]", "", raw)
    raw = _INDEX.sub(r".\1", raw)
    parts = [p for p in raw.split(".") if p and p not in ("_modules", "_parameters", "_buffers")]
    return ".".join(parts)


def module_path(node: Node) -> str:
    """Dotted path of the innermost module ``node`` ran in, or "" at the top level."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    raw = list(stack.values())[-1][0]
    return dotted_path(str(raw))


def source_location(node: Node) -> str:
    """``file.py:LINE`` of the user code that produced ``node``, when recorded."""
    trace = node.meta.get("stack_trace") or ""
    matches = re.findall(r'File "([^"]+)", line (\d+)', trace)
    if not matches:
        return node.name
    path, line = matches[-1]
    return f"{path.rsplit('/', 1)[-1]}:{line}"


def _source_name(node: Node) -> str:
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    if source is None:
        return ""
    name = getattr(source, "name", "")
    return str(name() if callable(name) else name)  # a method in older torch, a property in newer


# Dynamo drops ``grapharg`` from node meta once compilation is over; :func:`remember_sources`
# copies what we need under this key while it is still there.
_SOURCE_KEY = "rewriter_source"


def remember_sources(graph: Graph, values: list) -> None:
    """Record each placeholder's kind and state-dict name in its meta, to outlive ``grapharg``."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for n, v in zip(placeholders, values):
        n.meta[_SOURCE_KEY] = (placeholder_kind(n, v), placeholder_path(n))


def placeholder_kind(node: Node, value: object = None) -> str:
    """"parameter", "buffer" or "input" for a placeholder."""
    if _SOURCE_KEY in node.meta:
        return node.meta[_SOURCE_KEY][0]
    if isinstance(value, torch.nn.Parameter):
        return "parameter"
    name = _source_name(node)
    if "_parameters" in name:
        return "parameter"
    if "_buffers" in name:
        return "buffer"
    example = node.meta.get("example_value")
    if isinstance(example, torch.nn.Parameter):
        return "parameter"
    return "input"


def placeholder_path(node: Node) -> str:
    """Dotted state-dict name of a parameter or buffer placeholder (``h.0.attn.c_attn.weight``)."""
    if _SOURCE_KEY in node.meta:
        return node.meta[_SOURCE_KEY][1]
    name = _source_name(node)
    return dotted_path(name) if name else node.name


def ancestors(nodes: Iterable[Node], stop: set[Node] | None = None) -> set[Node]:
    """All nodes that ``nodes`` depend on (inclusive), not walking past ``stop``."""
    stop = stop or set()
    seen: set[Node] = set()
    todo = list(nodes)
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n in stop:
            continue
        todo.extend(n.all_input_nodes)
    return seen


# Ops that change their first argument in place (``x[i] = v`` is ``operator.setitem``, ``x += y``
# ``operator.iadd`` in a Dynamo graph).
IN_PLACE_OPERATORS = {operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv,
                      operator.ifloordiv, operator.imod, operator.ipow, operator.iand, operator.ior,
                      operator.ixor, operator.ilshift, operator.irshift, operator.imatmul}
# Ops whose result may share memory with their first argument (views, and a few that may or may
# not copy: a superset is safe, it only makes more nodes count as aliases).
_VIEW_NAMES = {"view", "view_as", "reshape", "reshape_as", "transpose", "swapaxes", "swapdims", "permute",
               "movedim", "moveaxis", "expand", "expand_as", "unsqueeze", "squeeze", "narrow", "select",
               "t", "flatten", "unflatten", "as_strided", "split", "split_with_sizes", "tensor_split",
               "chunk", "unbind", "diagonal", "detach", "contiguous", "getitem", "__getitem__", "unfold",
               "real", "imag", "view_as_real", "view_as_complex", "alias"}


def _op_name(n: Node) -> str:
    if n.op == "call_method":
        return str(n.target)
    target = n.target
    name = getattr(target, "__name__", "") or ""
    overload = getattr(target, "_overloadpacket", None)  # aten ops: "add_" of aten.add_.Tensor
    if overload is not None:
        name = getattr(overload, "__name__", name)
    return name


def mutated_input(n: Node) -> Node | None:
    """The node whose value ``n`` changes in place (``x[i] = v``, ``x.add_(y)``, ``x += y``,
    ``out=`` arguments, ops called with ``inplace=True``, aten ops whose schema writes an argument),
    or None."""
    if n.op not in ("call_function", "call_method"):
        return None
    out = n.kwargs.get("out")
    if isinstance(out, Node):
        return out
    first = n.args[0] if n.args else None
    if n.op == "call_function":
        schema = getattr(n.target, "_schema", None)
        if schema is not None:
            for i, a in enumerate(schema.arguments):
                if a.alias_info is not None and a.alias_info.is_write:
                    v = n.args[i] if i < len(n.args) else n.kwargs.get(a.name)
                    return v if isinstance(v, Node) else None
            return None
        if n.target in IN_PLACE_OPERATORS or n.kwargs.get("inplace") is True:
            return first if isinstance(first, Node) else None
        if getattr(n.target, "__module__", None) in ("_operator", "operator"):
            return None  # operator.and_, or_, not_, ...: the trailing underscore is not in-place
    name = _op_name(n)
    if name == "__setitem__" or name.startswith("__i") or (name.endswith("_") and not name.endswith("__")):
        return first if isinstance(first, Node) else None
    return None


def _alias_root(n: Node) -> Node:
    """The node whose memory ``n`` may share, following views and in-place ops to their input."""
    while (isinstance(n, Node) and n.op in ("call_function", "call_method") and n.args
           and isinstance(n.args[0], Node) and (_op_name(n) in _VIEW_NAMES or mutated_input(n) is n.args[0])):
        n = n.args[0]
    return n


def with_mutations(order: list[Node], needed: Iterable[Node], stop: set[Node] | None = None,
                   until: Iterable[Node] = ()) -> set[Node]:
    """``needed`` (a set closed under :func:`ancestors`) plus every in-place op that changes one of
    them, or a view of one, before the last of them (or of ``until``: where the values are used)
    in ``order`` (the graph's nodes), with what those ops depend on, until nothing more is added.
    Evaluating only the ancestors of a value misses the ops that write into it
    (``inv = torch.empty_like(p); inv[p] = arange`` leaves ``inv`` uninitialized), since an
    in-place op is a user of what it changes, not an input."""
    needed = set(needed)
    stop = stop or set()
    # (With ``stop``, the stop nodes are values given from outside, as they are where they are
    # used: writes into them are not replayed.)
    writes = [(m, root) for m, root in _writes(order) if root not in stop]
    if not writes or not needed:
        return needed
    pos = {n: i for i, n in enumerate(order)}
    last_use = max((pos.get(n, -1) for n in until), default=-1)
    while True:
        roots = {_alias_root(n) for n in needed}
        bound = max(last_use, max(pos.get(n, -1) for n in needed))
        new = [m for m, root in writes if m not in needed and pos[m] < bound and root in roots]
        if not new:
            return needed
        needed |= ancestors(new, stop=stop)


def _writes(nodes: Iterable[Node]) -> list[tuple[Node, Node]]:
    """(in-place op, the node whose memory it writes, through views) for the in-place ops among
    ``nodes``."""
    return [(n, _alias_root(t)) for n in nodes if (t := mutated_input(n)) is not None]


def written_roots(nodes: Iterable[Node]) -> set[Node]:
    """The nodes whose memory the in-place ops among ``nodes`` write (through views too)."""
    return {root for _, root in _writes(nodes)}


def descendants(nodes: Iterable[Node]) -> set[Node]:
    seen: set[Node] = set()
    todo = list(nodes)
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        todo.extend(n.users)
    return seen


def clone_graph(graph: Graph) -> Graph:
    """A copy of ``graph`` (node meta shallow-copied), used to restore a graph after a failed pass."""
    new = Graph(owning_module=graph.owning_module, tracer_cls=graph._tracer_cls)
    copied = new.graph_copy(graph, {}, return_output_node=True)
    new._codegen = copy.deepcopy(graph._codegen)
    if copied is not None:
        value, old_output = copied
        new.output(value, type_expr=getattr(old_output, "type", None))
    return new
