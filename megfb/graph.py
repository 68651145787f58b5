"""The deployable inference graph: trace and dump a model, load it back, check it.

`submit` packs the dumped graph as model.mge; `params` and `bench` count its costs
(megfb/costs.py). The graph takes one packed patch (1, 4, 128, 128) on [0, 1] by default.
"""
import io
import os

import numpy as np

from .errors import MegfbError
from .io import PATCH

GRAPH_INPUT, GRAPH_OUTPUT = "raw_packed", "denoised"
GRAPH_TOLERANCE = 1e-4  # max |graph - eager| on the [0,1] scale
PATCH_SHAPE = (1, 4, PATCH // 2, PATCH // 2)


def export_graph(model, file, shape=PATCH_SHAPE, seed=0, all_steps=False, fuse_nonlinearity=False,
                 native_ops=False):
    """Trace the eval-mode model and dump it as a deployable MegEngine graph (weights as consts).

    The graph is for the traced shape only (one patch by default, the shape prediction runs on
    a CPU), since tracing bakes the reshapes in.

    all_steps traces the train-mode forward (every step's output, same arithmetic), only for
    comparing with module_stats, which runs the eager forward and so counts step outputs
    that the eval graph prunes.

    fuse_nonlinearity: also fuse conv + bias + activation into one operator (the graph the Lite
    runtime of megfb/lite.py runs; same arithmetic).

    native_ops: the graph calls megfb's own inference operators (the FFN gate, the polyphase
    split and merge; ops.native_in_graph) where they can be loaded. Such a graph loads only in
    a process that has loaded megfb's library: megfb's Lite runner, never a submission.
    """
    from . import native

    if native.on_inline_device(model):
        # a model trained on MegEngine's inline CPU device (megfb/train.py): the graph is traced
        # from a copy on the default device, so the dumped graph names no "cpu:default"
        from .ops import replicate_constants
        from .split import copy_module

        with native.default_device("xpux"):
            replicate_constants("xpux")
            twin = copy_module(model, "xpux")
            export_graph(twin, file, shape, seed, all_steps, fuse_nonlinearity, native_ops)
        model.eval()
        return

    import megengine as mge
    from megengine import jit

    from .ops import native_in_graph

    model.train(all_steps)

    # record_only: build the graph without running it (5x faster than a traced run at 128x128;
    # the dumped graph is the same, and every caller checks it against the eager model anyway).
    @jit.trace(symbolic=True, capture_as_const=True, record_only=True)
    def infer(raw_packed):
        return model(raw_packed)

    with native_in_graph(native_ops):
        infer(mge.tensor(np.random.default_rng(seed).random(shape, dtype=np.float32)))
    try:
        infer.dump(file, arg_names=[GRAPH_INPUT], output_names=None if all_steps else [GRAPH_OUTPUT],
                   optimize_for_inference=True, enable_fuse_conv_bias_nonlinearity=fuse_nonlinearity)
    finally:
        model.eval()


def export_graph_bytes(model, shape=PATCH_SHAPE, all_steps=False):
    buf = io.BytesIO()
    export_graph(model, buf, shape, all_steps=all_steps)
    return buf.getvalue()


class DumpedGraph:
    """A dumped graph loaded back with MegEngine's own loader; callable on packed [0,1] arrays."""

    def __init__(self, graph):
        from megengine.utils.comp_graph_tools import GraphInference

        if isinstance(graph, (bytes, bytearray)):
            graph = io.BytesIO(graph)
        try:
            if isinstance(graph, (str, os.PathLike)):
                with open(graph, "rb") as f:
                    self._graph = GraphInference(f)
            else:
                self._graph = GraphInference(graph)
        except Exception as exc:  # MegEngine raises bare RuntimeErrors from C++
            raise MegfbError(f"the dumped graph cannot be loaded back ({type(exc).__name__}: {exc})") from None

    def __call__(self, x):
        return self._graph.run(inp_dict={GRAPH_INPUT: np.ascontiguousarray(x, dtype=np.float32)})[GRAPH_OUTPUT]


def check_graph(graph, model, x):
    """Max |graph - eager| over the packed patches x, one patch per run (the dumped batch size)."""
    import megengine as mge

    model.eval()
    worst = 0.0
    for i in range(len(x)):
        eager = model(mge.tensor(x[i:i + 1])).numpy()
        worst = max(worst, float(np.abs(graph(x[i:i + 1]) - eager).max()))
    return worst
