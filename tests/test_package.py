"""The package's shape: no import cycles between megfb's modules, every option's default in
`--help`."""
import argparse
import ast
import os

import megfb
from megfb.cli import build_parser

PKG = os.path.dirname(megfb.__file__)


def import_graph():
    """{module: modules of megfb it imports}, from the source, imports inside functions too."""
    modules = {f[:-3] for f in os.listdir(PKG) if f.endswith(".py")}
    graph = {}
    for mod in modules:
        deps = set()
        with open(os.path.join(PKG, mod + ".py")) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    deps.add(node.module.split(".")[0])
                else:  # from . import x: a module, or a name of the package's __init__
                    deps.update(a.name if a.name in modules else "__init__" for a in node.names)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("megfb."):
                deps.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                deps.update(a.name.split(".")[1] for a in node.names if a.name.startswith("megfb."))
        graph[mod] = deps - {mod}
    return graph


def find_cycle(graph):
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                return stack[stack.index(dep):] + [dep]
            if dep not in state:
                found = visit(dep)
                if found:
                    return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycles():
    graph = import_graph()
    assert {"model", "baselines", "layers", "ops", "costs", "submit", "bench"} <= set(graph)
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
    # the checker finds a cycle when there is one
    assert find_cycle({**graph, "layers": graph["layers"] | {"model"}}) is not None


def test_submit_holds_packaging_only():
    graph = import_graph()
    assert "submit" not in set().union(*(deps for mod, deps in graph.items() if mod != "cli"))
    with open(os.path.join(PKG, "submit.py")) as f:
        names = {n.name for n in ast.parse(f.read()).body if isinstance(n, ast.FunctionDef)}
    assert {"cmd_submit", "validate_zip"} <= names
    assert not names & {"cmd_eval", "cmd_params", "graph_costs", "export_graph", "newest_run_checkpoint"}


def _subparsers(parser, prefix="megfb"):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield f"{prefix} {name}", sub
                yield from _subparsers(sub, f"{prefix} {name}")


def test_every_option_shows_its_default_and_positionals_have_help():
    commands = dict(_subparsers(build_parser()))
    assert {"megfb train", "megfb eval", "megfb predict", "megfb submit", "megfb params",
            "megfb bench", "megfb score", "megfb data synth", "megfb data stats"} <= set(commands)
    for name, parser in commands.items():
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            assert action.help, f"{name} {action.dest}: no help"
            if action.option_strings and action.nargs != 0:
                # the option's own entry in `--help`, as argparse formats it
                entry = " ".join(parser._get_formatter()._format_action(action).split())
                shown = "(required)" in entry if action.required else "(default" in entry
                assert shown, f"{name} {action.option_strings[-1]}: default not shown"


def test_malloc_thresholds_are_set_and_do_not_change_numbers():
    """megfb tunes glibc's malloc at import; the same forward and gradients under both settings."""
    import ctypes

    import megengine as mge
    import numpy as np
    from megengine.autodiff import GradManager

    from megfb.model import build_model

    assert megfb.MALLOC == "tuned"
    libc = ctypes.CDLL(None)

    class MallInfo2(ctypes.Structure):  # glibc >= 2.33
        _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                           "usmblks", "fsmblks", "uordblks", "fordblks",
                                                           "keepcost")]

    libc.mallinfo2.restype = MallInfo2
    libc.malloc.restype = ctypes.c_void_p
    mapped = libc.mallinfo2().hblkhd
    block = libc.malloc(64 << 20)  # a 64 MiB block comes from the heap, not from its own mmap
    grown = libc.mallinfo2().hblkhd - mapped
    libc.free(ctypes.c_void_p(block))
    assert grown < (64 << 20)

    mge.random.seed(0)
    model = build_model({"name": "fbrestormer", "num_feats": 8, "num_blocks": 3})
    x = mge.tensor(np.random.default_rng(0).random((2, 4, 16, 16), dtype=np.float32))
    gm = GradManager().attach(model.parameters())

    def forward_and_grads():
        with gm:
            loss = sum(o.mean() for o in model(x))
            gm.backward(loss)
        grads = [p.grad.numpy().copy() for p in model.parameters()]
        for p in model.parameters():
            p.grad = None
        return loss.numpy(), grads

    tuned = forward_and_grads()
    try:
        assert megfb.set_malloc(megfb.MALLOC_DEFAULT)
        default = forward_and_grads()
    finally:
        megfb.set_malloc(megfb.MALLOC_TUNED)
    assert tuned[0] == default[0]
    assert all(np.array_equal(a, b) for a, b in zip(tuned[1], default[1]))
