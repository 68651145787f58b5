"""Inference on every core: the model's dumped graph run by MegEngine Lite, one network per core.

MegEngine's eager CPU device runs every kernel on one worker thread, and its multi-threaded
devices (`multithread2`, Lite's own thread pool) split few of FBRestormer's ops and spin
instead (measured: ~180% CPU, no faster). Patches, however, are independent. So the runner
loads the eval graph (megfb/graph.py, conv+bias+activation fused) into one Lite network per
core and feeds each from its own Python thread. Each network runs in Lite's CPU inplace mode:
its kernels run on the thread that calls forward(), a ctypes call that releases the GIL, so
the networks run truly in parallel, one patch each. (A plain single-threaded Lite network
hands its kernels to the worker thread of MegEngine's CPU device cpu0, the same one for every
network: two such networks kept 1.14 cores busy, no faster than one.)

Each network computes a patch exactly as one eager forward of the same graph would (kernels
chosen by timing, as the eager fast path chooses them); tests/test_infer.py proves the output
equal to the eager model within float rounding. megfb/infer.py decides when this runs
(`--engine lite`, the default on CPU).

The runner's graph is megfb's own: traced with megfb's inference operators where they can be
loaded (ops.native_in_graph: the FFN gate gelu(x1) * x2 in one pass instead of ~11 elementwise
passes, the polyphase split/merge as row copies, the LayerNorm's standardisation in one pass).
Lite loads the graph through the same libmegengine_shared that holds the operators, so it runs
them like any other node, on the caller's thread. Such a graph loads nowhere else; the
submission's model.mge is traced without them (megfb/graph.py).
"""
import concurrent.futures
import hashlib
import io
import os
import queue

import numpy as np

from .graph import GRAPH_INPUT, GRAPH_OUTPUT, export_graph


def available():
    """True when MegEngine Lite (shipped in the MegEngine wheel) can be imported."""
    try:
        import megenginelite  # noqa: F401
    except (ImportError, OSError):
        return False
    return True


def default_workers():
    """One network per core this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def model_fingerprint(model):
    """Weights (and mean/std constants) and fast-path switches: the runner is rebuilt when any
    changes, e.g. for each validation of a training run."""
    digest = hashlib.sha1()
    for key, value in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    digest.update(bytes(bool(getattr(m, "fast", False)) for m in model.modules()))
    return digest.hexdigest()


def _network(graph, timed=True):
    import megenginelite as lite

    config = lite.LiteConfig()
    # Recording the kernel sequence (level 1) makes two live networks abort at process exit.
    config.options.comp_node_seq_record_level = 0
    config.options.weight_preprocess = True
    # the first forward's check of every variable took ~10x a forward (3.6 s of CPU at 256x256)
    config.options.var_sanity_check_first_run = False
    net = lite.LiteNetwork(config)
    # kernels on the calling thread: every network its own core (see the module's docstring)
    net.enable_cpu_inplace_mode()
    strategy = lite.LiteAlgoSelectStrategy
    # The eager fast path's choice too (megfb/ops.py TIMED): time the optimised kernels only.
    net.set_network_algo_policy(strategy.LITE_ALGO_PROFILE | strategy.LITE_ALGO_OPTIMIZED if timed
                                else strategy.LITE_ALGO_HEURISTIC)
    net.load(io.BufferedReader(io.BytesIO(graph)))
    return net


class LiteRunner:
    """`workers` single-threaded Lite networks of one model, for inputs of one shape."""

    def __init__(self, model, shape, workers=None, native_ops=True):
        from .ops import native_graph_usable

        buf = io.BytesIO()
        self.native_ops = native_graph_usable(native_ops)  # False when they cannot be loaded
        export_graph(model, buf, tuple(shape), fuse_nonlinearity=True, native_ops=self.native_ops)
        self.graph, self.shape = buf.getvalue(), tuple(shape)
        self.workers = default_workers() if workers is None else int(workers)
        self._free = queue.Queue()
        try:
            nets = self._warm_networks(timed=True)
        except RuntimeError:
            # Some ops have only MegEngine's naive kernels (the plain path's dilated convs), which
            # the timed strategy refuses: such graphs take the kernels by heuristic
            nets = self._warm_networks(timed=False)
        for net in nets:
            self._free.put(net)

    def _warm_networks(self, timed):
        """The first forward of each network chooses its kernels: done here, one after the other
        (the second finds the first's timed choices in MegEngine's cache, so all agree)."""
        nets = [_network(self.graph, timed) for _ in range(self.workers)]
        for net in nets:
            self._forward(net, np.zeros(self.shape, dtype=np.float32))
        return nets

    @staticmethod
    def _forward(net, x):
        net.get_io_tensor(GRAPH_INPUT).set_data_by_copy(np.ascontiguousarray(x, dtype=np.float32))
        net.forward()
        net.wait()
        return net.get_io_tensor(GRAPH_OUTPUT).to_numpy().copy()

    def __call__(self, x):
        """One input of the runner's shape -> the graph's output; safe from several threads
        at once (each call takes a free network)."""
        if tuple(x.shape) != self.shape:
            raise ValueError(f"this runner takes {self.shape}, got {tuple(x.shape)}")
        net = self._free.get()
        try:
            return self._forward(net, x)
        finally:
            self._free.put(net)

    def pool(self):
        """A thread pool with one thread per network, for calling the runner concurrently."""
        return concurrent.futures.ThreadPoolExecutor(self.workers, thread_name_prefix="megfb-lite")


_RUNNERS = {}


def runner_for(model, shape, workers=None):
    """The runner of this model (its current weights) for this input shape, built on first use.
    Runners of other models or older weights are dropped: one model's at a time stays loaded."""
    key = (id(model), model_fingerprint(model), tuple(shape), workers)
    if key not in _RUNNERS:
        for old in [k for k in _RUNNERS if k[:2] != key[:2]]:
            del _RUNNERS[old]
        _RUNNERS[key] = LiteRunner(model, shape, workers)
    return _RUNNERS[key]
