"""What a model costs: parameters, MACs/FLOPs, activations, memory and time (`megfb params`).

The NTIRE 2022 efficient-SR report's columns for one 256x256 patch, and the contest's
100,000-parameter limit. What is counted: MACs are the multiply-accumulates of convolutions
and matrix products, read off the traced MegEngine graph (so F.matmul attention and the fast
paths' matmuls are seen); bias adds, norms, activations and softmax are not counted;
FLOPs = 2 * MACs. Activations are the elements output by those convolutions and matrix
products (the NTIRE count). Peak memory is the largest total size of the graph's tensors alive
at once when its operators run in order (views share their source's storage, weights
excluded) - a deterministic estimate, since MegEngine 1.13 reports no allocator peak on CPU.
Time is the median of several runs after a warm-up (`measure`, also used by `megfb bench`).
"""
import io
import json
import os
import statistics
import time

import numpy as np

from . import PARAM_LIMIT
from .graph import DumpedGraph, export_graph_bytes
from .io import PATCH
from .layers import fast_paths_restored, set_fast
from .model import check_param_limit, count_parameters


def sync():
    """Wait for MegEngine's asynchronous dispatch to finish every queued kernel."""
    import megengine as mge

    mge._full_sync()


def _read_hwm_kib():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmHWM:", "VmRSS:")):
                    yield int(line.split()[1])
    except OSError:
        return


def _reset_hwm():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure(fn, repeats, warmup=1):
    """Median seconds of `fn()` and the resident-memory growth (MiB) while it ran."""
    for _ in range(warmup):
        fn()
    sync()
    resettable = _reset_hwm()
    rss_before = dict(zip(("hwm", "rss"), _read_hwm_kib())).get("rss", 0)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    hwm = dict(zip(("hwm", "rss"), _read_hwm_kib())).get("hwm", 0)
    peak_mib = (hwm - rss_before) / 1024 if resettable else None
    return statistics.median(times), peak_mib


# ---------------------------------------------------------------------------------------------
# Graph costs

_CONV_OPS = ("ConvolutionForward", "ConvBiasForward")
_MATMUL_OPS = ("MatrixMul", "BatchedMatrixMul")
# Ops whose output is a view of (or reuses) their input in MegEngine's executor.
_VIEW_OPS = ("Reshape", "AxisAddRemove", "Dimshuffle", "Subtensor", "Broadcast", "Identity")
_CONST_OPS = ("ImmutableTensor", "SharedDeviceTensor", "VolatileSharedDeviceTensor", "MultipleDeviceTensorHolder")


def graph_costs(graph):
    """MACs, activations and a peak-memory estimate of a dumped graph (bytes or path).

    Returns {"conv_macs", "matmul_macs", "macs", "flops", "activations", "peak_bytes",
    "weight_bytes"}; see the module docstring for what each counts.
    """
    import megengine.core.tensor.megbrain_graph as G
    from megengine.utils import comp_graph_tools as cgtools

    if isinstance(graph, (str, os.PathLike)):
        with open(graph, "rb") as f:
            graph = f.read()
    loaded = G.load_graph(io.BytesIO(graph))
    oprs = cgtools.get_oprs_seq(loaded.output_vars_list, False, False)
    conv = matmul = acts = weights = 0
    storage, size, last_use, first_def = {}, {}, {}, {}
    for step, op in enumerate(oprs):
        kind = cgtools.get_opr_type(op)
        out = op.outputs[0]
        n_out = int(np.prod(out.shape)) if out.shape else 1
        if kind in _CONV_OPS:
            w = op.inputs[1].shape  # dense (O, I, kh, kw) or grouped (G, O/G, I/G, kh, kw)
            conv += n_out * int(np.prod(w[-3:]))
            acts += n_out
        elif kind in _MATMUL_OPS:
            a = op.inputs[0].shape  # the contracted axis is A's last unless transposed
            k = a[-2] if json.loads(op.params).get("transposeA") else a[-1]
            matmul += n_out * int(k)
            acts += n_out
        for var in op.inputs:
            if var.id in storage:
                last_use[storage[var.id]] = step
        for var in op.outputs:
            nbytes = (int(np.prod(var.shape)) if var.shape else 1) * np.dtype(var.dtype).itemsize
            if kind in _CONST_OPS:
                weights += nbytes
                continue
            if kind in _VIEW_OPS and op.inputs and op.inputs[0].id in storage:
                storage[var.id] = storage[op.inputs[0].id]
                continue
            storage[var.id] = var.id
            size[var.id], first_def[var.id], last_use[var.id] = nbytes, step, step
    for var in loaded.output_vars_list:  # the outputs live to the end
        if var.id in storage:
            last_use[storage[var.id]] = len(oprs)
    live = np.zeros(len(oprs) + 1, dtype=np.int64)
    for sid, nbytes in size.items():
        live[first_def[sid]:last_use[sid] + 1] += nbytes
    macs = conv + matmul
    return {"conv_macs": conv, "matmul_macs": matmul, "macs": macs, "flops": 2 * macs,
            "activations": acts, "peak_bytes": int(live.max()), "weight_bytes": weights}


def module_stats_conv_macs(model, shape):
    """MegEngine's module_stats count for the Conv2d modules, bias adds taken out (so MACs).

    module_stats hooks modules, so it sees no F.matmul: on the plain path (every 1x1 conv a
    Conv2d) it must equal graph_costs(...)["conv_macs"] - the cross-check of our counter.
    """
    import logging

    import megengine.module as M
    from megengine.utils import module_stats as ms

    # It looks up every module that reads a `weight`/`bias` attribute among its hooked types
    # (KeyError for our own LayerNorm otherwise): hook those types too, for this call only.
    extra = sorted({type(m) for m in model.modules() if hasattr(m, "weight") or hasattr(m, "bias")}
                   - set(ms.hook_modules), key=str)
    extra = [t for t in extra if not issubclass(t, tuple(ms.hook_modules))]
    level = ms.logger.level
    ms.logger.setLevel(logging.ERROR)  # it logs its summary table unconditionally
    ms.hook_modules.extend(extra)
    try:
        _, details = ms.module_stats(model, input_shapes=[tuple(shape)], cal_params=False,
                                     cal_activations=False, logging_to_stdout=False)
    finally:
        ms.logger.setLevel(level)
        del ms.hook_modules[len(ms.hook_modules) - len(extra):]
    modules = dict(model.named_modules())
    macs = 0
    for row in details.flops:
        m = modules.get(row.get("name"))
        if isinstance(m, M.Conv2d):
            bias = int(np.prod(row["output_shapes"][0])) if m.bias is not None else 0
            macs += int(round(row["flops_num"])) - bias
    return macs


# ---------------------------------------------------------------------------------------------
# The report


def _parts(obj):
    """(attribute, Module or list of Modules) holding parameters, in assignment order."""
    import megengine.module as M

    if isinstance(obj, M.Sequential):
        return []
    out = []
    for key, value in vars(obj).items():
        if isinstance(value, M.Module) or (isinstance(value, (list, tuple)) and value
                                           and all(isinstance(v, M.Module) for v in value)):
            if _count(value):
                out.append((key, value))
    return out


def _count(obj):
    mods = obj if isinstance(obj, (list, tuple)) else [obj]
    return sum(int(np.prod(p.shape)) for m in mods for p in m.parameters())


def parameter_table(model):
    """Rows (name, count, note): the top-level parts, and the parts of any part holding a
    quarter of the model or more (the FeedbackBlock); a list of k blocks is one row "k x"."""
    total = _count(model) or 1
    rows = []
    for name, part in _parts(model):
        rows.append((name, _count(part), ""))
        if isinstance(part, (list, tuple)) or _count(part) < total / 4:
            continue
        for sub, value in _parts(part):
            n = _count(value)
            if isinstance(value, (list, tuple)):
                k = len(value)
                rows.append((f"{name}.{sub}", n, f"{k} x {n // k:,}"))
                for leaf, _ in _parts(value[0]):
                    m = sum(_count(getattr(v, leaf)) for v in value)
                    rows.append((f"  .{leaf}", m, f"{k} x {m // k:,}"))
            else:
                rows.append((f"{name}.{sub}", n, ""))
    return rows


def constant_buffers(model):
    """State-dict entries that are not Parameters (the mean/std standardisation constants)."""
    params = {name for name, _ in model.named_parameters()}
    return [(k, np.asarray(v.numpy() if hasattr(v, "numpy") else v))
            for k, v in model.state_dict().items() if k not in params]


def model_report(model, timing=True, side=PATCH // 2):
    """Everything `megfb params` prints, as a dict (the model is left in eval mode, paths as they were)."""
    import megengine as mge

    model.eval()
    shape = (1, 4, side, side)
    report = {"params": count_parameters(model), "shape": shape}
    with fast_paths_restored(model):
        set_fast(model, False)
        report["plain"] = graph_costs(export_graph_bytes(model, shape))
        report["plain_all_steps"] = graph_costs(export_graph_bytes(model, shape, all_steps=True))
        # module_stats hooks Conv2d modules; a conv run as F.conv2d (the 1st place's
        # multi-dilation convs, `functional_convs`) is invisible to it: no cross-check then
        blind = any(getattr(m, "functional_convs", False) for m in model.modules())
        report["module_stats_conv_macs"] = None if blind else module_stats_conv_macs(model, shape)
        set_fast(model, True)
        fast_graph = export_graph_bytes(model, shape)
        report["fast"] = graph_costs(fast_graph)
        if timing:
            x = np.random.default_rng(0).random(shape, dtype=np.float32)
            # median of 5 after a warm-up (kernel selection, allocator), as `megfb bench` times
            report["eager_s"] = measure(lambda: model(mge.tensor(x)).numpy(), repeats=5)[0]
            graph = DumpedGraph(fast_graph)
            report["graph_s"] = measure(lambda: graph(x), repeats=5)[0]
    return report


def _g(n):
    return f"{n / 1e9:.3f} G"


def print_parameters(model):
    total = count_parameters(model)
    print(f"{'module':<28}{'params':>10}{'share':>8}  note")
    for name, n, note in parameter_table(model):
        print(f"{name:<28}{n:>10,}{100 * n / max(total, 1):>7.1f}%  {note}")
    print(f"{'total trainable':<28}{total:>10,}  (contest limit {PARAM_LIMIT:,})")
    for name, value in constant_buffers(model):
        vals = ", ".join(f"{v:.6g}" for v in value.ravel()[:8])
        print(f"constant {name} {tuple(value.shape)}: [{vals}] (not trained, not counted)")


def print_costs(report):
    plain, fast = report["plain"], report["fast"]
    side = report["shape"][-1]
    print(f"\nper {2 * side}x{2 * side} raw patch (packed {'x'.join(map(str, report['shape']))}), "
          "eval graph, plain path:")
    print(f"  MACs        {_g(plain['macs'])} ({plain['macs']:,}: convolutions {_g(plain['conv_macs'])}, "
          f"matrix products {_g(plain['matmul_macs'])}); fast path {_g(fast['macs'])}")
    print(f"  FLOPs       {_g(plain['flops'])} (2 x MACs)")
    every = report["plain_all_steps"]["conv_macs"]
    if report["module_stats_conv_macs"] is None:
        print("  check       MegEngine module_stats: not applicable (this model runs convs as F.conv2d, "
              "which module_stats does not see)")
    else:
        agree = "agrees" if report["module_stats_conv_macs"] == every else "DISAGREES"
        print(f"  check       MegEngine module_stats: {_g(report['module_stats_conv_macs'])} conv MACs; ours with "
              f"every step's output {_g(every)} ({agree})")
        print(f"              (module_stats sees no F.matmul; the eval graph drops the unused earlier steps' "
              f"output heads: {_g(every - plain['conv_macs'])})")
    print(f"  activations {plain['activations'] / 1e6:.2f} M elements out of convolutions and matrix products")
    print(f"  memory      {plain['peak_bytes'] / 2**20:.1f} MiB peak activations (plain graph), "
          f"{fast['peak_bytes'] / 2**20:.1f} MiB (fast graph); weights {fast['weight_bytes'] / 2**10:.0f} KiB")
    if "eager_s" in report:
        print(f"  time        {report['eager_s'] * 1e3:.0f} ms eager (eval, fast path), "
              f"{report['graph_s'] * 1e3:.0f} ms dumped graph (median of 5 runs, this machine)")


def cmd_params(args):
    if args.ckpt:
        from .checkpoint import describe, model_from_checkpoint

        model, info = model_from_checkpoint(args.ckpt, args.config)
        print(f"checkpoint {describe(args.ckpt, info)}")
    else:
        from .config import load_config
        from .model import build_model

        model = build_model(load_config(args.config)["model"])
    print_parameters(model)
    check_param_limit(model)  # over the limit: the table says where, no need to cost it
    print_costs(model_report(model, timing=not args.no_timing))
    return 0
