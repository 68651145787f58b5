"""`megfb bench`: plain vs fast paths, side by side in one process, on the same weights and inputs.

Every figure is the median of several timed repeats after a warm-up. Peak memory is the
growth of the process's resident high-water mark during one measurement (Linux: the mark is
reset through /proc/self/clear_refs before each one). Achieved GFLOP/s = the model's FLOPs per
patch / measured seconds per patch, next to this CPU's float32 matmul rate measured in the
same run, which is the practical ceiling for these layers.
"""
import collections
import glob
import json
import os
import platform
import sys
import tempfile
import time

import megengine as mge
import megengine.functional as F
import numpy as np
from megengine.autodiff import GradManager
from megengine.jit import trace

from . import __version__
from .atomic import atomic_output
from .errors import MegfbError
from .costs import graph_costs, measure, sync
from .graph import export_graph_bytes
from .layers import fast_paths_restored, set_fast
from .model import build_model, count_parameters
from .ops import conv


def use_path(model, fast):
    """Switch fast paths and forget every kernel choice made so far.

    MegEngine caches a conv's kernel per shape whatever strategy chose it, and the first use
    wins: run after the plain path (heuristic choices), the fast path's timed choices never
    happen (the dense 5x5 conv_out conv: 30 ms instead of 2 ms); run before, the plain path
    inherits the fast path's. Clearing the cache gives each path its own choices.
    """
    from megengine.core._imperative_rt.core2 import _clear_algorithm_cache

    sync()
    _clear_algorithm_cache()
    return set_fast(model, fast)


_START = time.perf_counter()


def _progress(what):
    """One line per case on stderr: the whole run takes minutes, most of it the plain path."""
    print(f"[{time.perf_counter() - _START:6.0f} s] {what}", file=sys.stderr, flush=True)


def _inference_fn(model, x):
    """The model as written: one forward over the whole batch."""
    def run():
        return model(x).numpy()

    return run


def _predict_fn(model, x):
    """The prediction path predict/submit use (megfb.infer: on CPU one patch per forward)."""
    from .infer import predict_packed

    x = x.numpy()

    def run():
        return predict_packed(model, x, progress=False)

    return run


def _traced_fn(model, x):
    """The prediction path with a traced model: one single-patch graph called per patch.
    (Traced whole, a batch-8 graph held every patch's intermediates at once, 12.7 GB, because
    MegEngine does not reuse memory between the unrolled patches.)"""
    @trace(symbolic=True, capture_as_const=True)
    def graph(inp):
        return model(inp)

    patches = [x[i:i + 1] for i in range(x.shape[0])]

    def run():
        return np.concatenate([graph(p).numpy() for p in patches])

    return run


def _train_fn(model, noisy, clean):
    opt = mge.optimizer.Adam(model.parameters(), lr=1e-4)
    gm = GradManager().attach(model.parameters())

    def run():
        with gm:
            outs = model(noisy)
            loss = sum(F.abs(o - clean).mean() for o in outs)
            gm.backward(loss)
        opt.step().clear_grad()
        return loss.numpy()

    return run


def matmul_peak_gflops(n=1536, repeats=5):
    """Two float32 GEMM rates of this CPU: F.matmul on (n x n)(n x n), and the same-sized product
    as a 1x1 conv with its kernel chosen by timing (MegEngine's conv GEMM is ~2.5x faster than
    its MatrixMul here). The higher is the ceiling the report measures against."""
    rng = np.random.default_rng(0)
    a = mge.tensor(rng.standard_normal((n, n), dtype=np.float32))
    b = mge.tensor(rng.standard_normal((n, n), dtype=np.float32))
    sec, _ = measure(lambda: F.matmul(a, b).numpy(), repeats)
    x = mge.tensor(rng.standard_normal((1, n, 1, n), dtype=np.float32))
    w = mge.tensor(rng.standard_normal((n, n, 1, 1), dtype=np.float32))
    sec_conv, _ = measure(lambda: conv(x, w, 0, 1, tune=True).numpy(), repeats)
    return {"matmul": 2 * n ** 3 / sec / 1e9, "conv1x1": 2 * n ** 3 / sec_conv / 1e9}


def profile_ops(model, x, top=12):
    """Per-operator time of one forward pass, from MegEngine's own profiler."""
    from megengine.utils.profiler import Profiler

    model(x).numpy()
    with tempfile.TemporaryDirectory() as folder:
        with Profiler(path=folder):
            model(x).numpy()
        events = []
        for path in glob.glob(os.path.join(folder, "*.json")):
            with open(path) as f:
                data = json.load(f)
            events += data["traceEvents"] if isinstance(data, dict) else data
    totals, counts, open_at = collections.Counter(), collections.Counter(), {}
    for ev in events:
        if ev.get("cat") != "Kernel":
            continue
        key = (ev.get("tid"), ev["name"])
        if ev["ph"] == "B":
            open_at[key] = ev["ts"]
        elif ev["ph"] == "E" and key in open_at:
            totals[ev["name"]] += ev["ts"] - open_at.pop(key)
            counts[ev["name"]] += 1
    whole = sum(totals.values()) or 1.0
    return [
        {"op": name, "ms": round(us / 1e3, 3), "share": round(us / whole, 3), "calls": counts[name]}
        for name, us in totals.most_common(top)
    ]


def run_bench(repeats=5, quick=False, profile=True, model_cfg=None):
    rng = np.random.default_rng(0)
    side = 32 if quick else 128  # packed side: 128 = one 256x256 raw patch
    crop = 16 if quick else 64  # packed side of a 128x128 raw training crop
    # the plain path is the slow reference (~25 s per training step): fewer repeats for it
    plain_repeats = max(1, min(repeats, 2))
    results = {"version": __version__, "megengine": mge.__version__, "machine": platform.processor() or platform.machine(),
               "cores": os.cpu_count(), "quick": quick, "rows": []}

    _progress("building the model, counting FLOPs, measuring the matmul peak")
    model_cfg = dict(model_cfg or {"name": "fbrestormer"})
    results["model"] = model_cfg.get("name", "fbrestormer")
    model = build_model(dict(model_cfg, fast=False))
    model.eval()
    flops = model_flops(model, (1, 4, 128, 128))
    results["params"] = count_parameters(model)
    results["flops_per_patch"] = flops
    peaks = matmul_peak_gflops()
    results["matmul_peak_gflops"] = round(peaks["matmul"], 1)
    results["conv1x1_peak_gflops"] = round(peaks["conv1x1"], 1)
    results["peak_gflops"] = round(max(peaks.values()), 1)
    patch_flops = flops * (side / 128) ** 2

    def row(name, batch, sec_per_call, peak, per=None):
        per_patch = sec_per_call / batch
        entry = {"case": name, "batch": batch, "sec_per_patch": round(per_patch, 5),
                 "peak_mib": None if peak is None else round(peak, 1)}
        if per != "train":
            entry["gflops"] = round(patch_flops / per_patch / 1e9, 2)
        results["rows"].append(entry)
        return entry

    x = {b: mge.tensor(rng.random((b, 4, side, side), dtype=np.float32)) for b in (1, 8)}
    outputs = {}
    for batch in (1, 8):
        # each path's first call gives the output compared below and doubles as its warm-up
        _progress(f"inference, batch {batch}: plain")
        use_path(model, False)
        plain = _inference_fn(model, x[batch])
        outputs["plain", batch] = plain()
        row("infer plain", batch, *measure(plain, plain_repeats, warmup=0))
        _progress(f"inference, batch {batch}: fast")
        use_path(model, True)
        fast = _predict_fn(model, x[batch])
        outputs["fast", batch] = fast()
        row("infer fast", batch, *measure(fast, repeats, warmup=0))
        _progress(f"inference, batch {batch}: fast, traced")
        traced = _traced_fn(model, x[batch])
        outputs["traced", batch] = traced()
        row("infer fast+trace", batch, *measure(traced, repeats))

    ref = np.abs(outputs["plain", 8]).max()
    results["max_rel_diff"] = {
        f"{path}_b{b}": float(np.abs(outputs[path, b] - outputs["plain", b]).max() / ref)
        for path in ("fast", "traced") for b in (1, 8)
    }

    model.train()
    noisy = mge.tensor(rng.random((8, 4, crop, crop), dtype=np.float32))
    clean = mge.tensor(rng.random((8, 4, crop, crop), dtype=np.float32))
    for fast in (False, True):
        _progress(f"training step, batch 8: {'fast' if fast else 'plain'}")
        use_path(model, fast)
        sec, peak = measure(_train_fn(model, noisy, clean), plain_repeats if not fast else repeats)
        results["rows"].append({"case": f"train step {'fast' if fast else 'plain'}", "batch": 8,
                                "sec_per_step": round(sec, 4), "peak_mib": None if peak is None else round(peak, 1)})
    model.eval()

    _progress("PMRID-style baseline")
    pmrid = build_model({"name": "pmrid"})
    pmrid.eval()
    pmrid_flops = model_flops(pmrid, (1, 4, 128, 128)) * (side / 128) ** 2
    for batch in (1, 8):
        sec, peak = measure(_inference_fn(pmrid, x[batch]), repeats)
        e = row("pmrid infer", batch, sec, peak)
        e["gflops"] = round(pmrid_flops / (sec / batch) / 1e9, 2)

    if profile:
        _progress("operator profiles")
        use_path(model, True)
        results["profile_fast"] = profile_ops(model, x[1])
        use_path(model, False)
        results["profile_plain"] = profile_ops(model, x[1])
    results["ratios"] = _ratios(results["rows"])
    return results


def model_flops(model, shape):
    """FLOPs (2 x MACs of convs and matmuls) of the plain eval graph, as `megfb params` counts them."""
    with fast_paths_restored(model):
        set_fast(model, False)
        return graph_costs(export_graph_bytes(model, shape))["flops"]


def _ratios(rows):
    by = {(r["case"], r["batch"]): r for r in rows}
    out = {}
    for b in (1, 8):
        plain = by[("infer plain", b)]["sec_per_patch"]
        best = min(by[("infer fast", b)]["sec_per_patch"], by[("infer fast+trace", b)]["sec_per_patch"])
        out[f"infer_speedup_b{b}"] = round(plain / best, 2)
    out["train_speedup"] = round(by[("train step plain", 8)]["sec_per_step"] / by[("train step fast", 8)]["sec_per_step"], 2)
    return out


def format_table(res):
    lines = [f"megfb bench {res.get('model', 'fbrestormer')}  (MegEngine {res['megengine']}, {res['cores']} cores"
             f"{', quick sizes' if res['quick'] else ''}; {res['params']:,} params, "
             f"{res['flops_per_patch'] / 1e9:.2f} GFLOPs per 256x256 patch)",
             f"{'case':<20}{'batch':>6}{'s/patch':>10}{'s/step':>9}{'GFLOP/s':>9}{'peak MiB':>10}"]
    for r in res["rows"]:
        lines.append(f"{r['case']:<20}{r['batch']:>6}"
                     f"{r.get('sec_per_patch', ''):>10}{r.get('sec_per_step', ''):>9}"
                     f"{r.get('gflops', ''):>9}{'' if r['peak_mib'] is None else r['peak_mib']:>10}")
    lines.append(f"float32 GEMM peak (1536^3): {res['peak_gflops']} GFLOP/s "
                 f"(F.matmul {res['matmul_peak_gflops']}, as a 1x1 conv {res['conv1x1_peak_gflops']})")
    rat = res["ratios"]
    best_gflops = max(r.get("gflops", 0) for r in res["rows"] if r["case"].startswith("infer fast"))
    lines.append(f"speed-up fast vs plain: inference x{rat['infer_speedup_b1']} (batch 1), "
                 f"x{rat['infer_speedup_b8']} (batch 8); training step x{rat['train_speedup']}")
    lines.append(f"best inference rate: {best_gflops} GFLOP/s = {best_gflops / res['peak_gflops']:.0%} of the GEMM peak")
    lines.append("max relative difference to plain: "
                 + ", ".join(f"{k} {v:.1e}" for k, v in res["max_rel_diff"].items()))
    for key in ("profile_fast", "profile_plain"):
        if key in res:
            raw = 64 if res["quick"] else 256
            lines.append(f"top operators, {key.split('_')[1]} path (one {raw}x{raw} patch):")
            lines += [f"  {p['op']:<28}{p['ms']:>9.2f} ms {p['share']:>6.1%}  x{p['calls']}" for p in res[key][:8]]
    return "\n".join(lines)


def cmd_bench(args):
    from .atomic import check_output

    check_output(args.out, force=True, what="--out")  # bench.json is the project's rolling output
    model_cfg = None
    if getattr(args, "config", None):
        from .config import load_config

        model_cfg = load_config(args.config)["model"]
    res = run_bench(repeats=args.repeats, quick=args.quick, model_cfg=model_cfg)
    print(format_table(res))
    with atomic_output(args.out) as tmp:
        with open(tmp, "w") as f:
            json.dump(res, f, indent=2)
    print(f"wrote {args.out}")
    worst = max(res["max_rel_diff"].values())
    if worst > 1e-4:
        raise MegfbError(f"fast path output differs from plain by {worst:.2e} (relative); see {args.out}")
