"""`megfb bench`: plain vs fast paths, side by side in one process, on the same weights and inputs.

Every figure is the median of several timed repeats after a warm-up. Peak memory is the
growth of the process's resident high-water mark during one measurement, and the mark itself
(Linux: reset through /proc/self/clear_refs before each one). Cores busy = the process's CPU
time / wall time over the timed repeats (1.0 = one core kept busy). Achieved GFLOP/s = the
model's FLOPs per patch (per training step: 3x the forward's, forward + backward) / measured
seconds, next to this CPU's float32 GEMM rate measured in the same run on one core (MegEngine's
CPU device, one worker thread) and on all cores (one GEMM per MegEngine CPU device at once).

Cases: "infer plain" is the model as written, one patch per forward; "infer fast" the fast
layers eagerly through the prediction path (--engine mge); "infer lite" the configuration
predict/submit/eval use by default on CPU (--engine lite: the dumped graph in one Lite
network per core); "train step split" the batch split over the CPU devices (megfb/split.py),
experimental and off by default in the trainer. "train fast, no native" repeats the fast training
step with MegEngine's kernels where megfb's own operators (megfb/native.py: the depthwise convs
and their gradients, the LayerNorm, the FFN gate, the polyphase split; on the trainer's device
split over every core) run by default. Training steps run where the trainer
runs them, on MegEngine's inline CPU device "cpu:default" (kernels on the interpreter's thread);
"train fast, worker dev" repeats the fast step on the default device (cpu0's worker thread),
where each of megfb's operators must wait for the worker first; "malloc dflt" repeats Lite inference with glibc's thresholds put
back (megfb/__init__.py tunes them at import).
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

from . import MALLOC_DEFAULT, MALLOC_TUNED, __version__, set_malloc
from .atomic import atomic_output
from .errors import MegfbError
from .costs import graph_costs, measure, sync
from .graph import export_graph_bytes
from .layers import fast_paths_restored, set_fast
from .model import build_model, count_parameters
from . import native
from .ops import conv, use_native


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


def _predict_fn(model, x, engine):
    """The prediction path (megfb.infer: on CPU one patch per forward) with the given engine."""
    from .infer import predict_packed

    x = x.numpy()

    def run():
        return predict_packed(model, x, progress=False, engine=engine)

    return run


def _split_train_fn(model, noisy, clean, devices, model_cfg, **split_options):
    """The split step (megfb/split.py) on a fast copy of `model`, built from `model_cfg`
    (devices[0]: the default device), on numpy batches; split_options go to SplitStep."""
    from .losses import supervised_loss
    from .split import SplitStep

    copy = build_model(dict(model_cfg, fast=True))
    copy.load_state_dict(model.state_dict())
    copy.train()
    step = SplitStep(copy, devices, **split_options)
    opt = mge.optimizer.Adam(copy.parameters(), lr=1e-4)
    cfg = {"type": "l1", "steps": "all"}

    def run():
        loss, _ = step(noisy, clean, lambda out, gt: supervised_loss(out, gt, cfg))
        opt.step().clear_grad()
        step.sync_weights()
        return loss.numpy()

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
    """float32 GEMM rates of this CPU: F.matmul on (n x n)(n x n), and the same-sized product as
    a 1x1 conv with its kernel chosen by timing (MegEngine's conv GEMM is ~2.5x faster than its
    MatrixMul here), both on one core; and the conv GEMM on all cores: one product per MegEngine
    CPU device (cpu0, cpu1, ...: a worker thread each), all at once."""
    from .lite import default_workers

    rng = np.random.default_rng(0)
    a = mge.tensor(rng.standard_normal((n, n), dtype=np.float32))
    b = mge.tensor(rng.standard_normal((n, n), dtype=np.float32))
    sec, _ = measure(lambda: F.matmul(a, b).numpy(), repeats)
    xw = (rng.standard_normal((1, n, 1, n), dtype=np.float32), rng.standard_normal((n, n, 1, 1), dtype=np.float32))
    x, w = (mge.tensor(t) for t in xw)
    sec_conv, _ = measure(lambda: conv(x, w, 0, 1, tune=True).numpy(), repeats)
    devices = [f"cpu{i}" for i in range(default_workers())]
    pairs = [tuple(mge.tensor(t, device=d) for t in xw) for d in devices]

    def all_cores():
        outs = [conv(xd, wd, 0, 1, tune=True) for xd, wd in pairs]
        return [o.numpy() for o in outs]

    sec_all, _ = measure(all_cores, repeats)
    return {"matmul": 2 * n ** 3 / sec / 1e9, "conv1x1": 2 * n ** 3 / sec_conv / 1e9,
            "all_cores": len(devices) * 2 * n ** 3 / sec_all / 1e9, "all_cores_devices": len(devices)}


def measure_case(fn, repeats, warmup=1):
    """measure() plus cores busy (CPU time / wall time over the timed repeats) and the resident
    high-water mark (MiB) reached during them."""
    for _ in range(warmup):
        fn()
    sync()
    cpu, wall = time.process_time(), time.perf_counter()
    sec, peak = measure(fn, repeats, warmup=0)
    busy = (time.process_time() - cpu) / max(time.perf_counter() - wall, 1e-9)
    hwm = None
    try:
        with open("/proc/self/status") as f:
            hwm = next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        pass
    return sec, peak, busy, hwm


def kernel_totals(run):
    """(total microseconds, calls) per operator name of the kernels MegEngine's profiler records
    while run() runs (Counters)."""
    from megengine.utils.profiler import Profiler

    with tempfile.TemporaryDirectory() as folder:
        with Profiler(path=folder):
            run()
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
    return totals, counts


def profile_ops(model, x, top=12):
    """Per-operator time of one forward pass, from MegEngine's own profiler."""
    model(x).numpy()
    totals, counts = kernel_totals(lambda: model(x).numpy())
    whole = sum(totals.values()) or 1.0
    return [
        {"op": name, "ms": round(us / 1e3, 3), "share": round(us / whole, 3), "calls": counts[name]}
        for name, us in totals.most_common(top)
    ]


def run_bench(repeats=5, quick=False, profile=True, model_cfg=None):
    from .lite import default_workers

    rng = np.random.default_rng(0)
    side = 32 if quick else 128  # packed side: 128 = one 256x256 raw patch
    crop = 16 if quick else 64  # packed side of a 128x128 raw training crop
    # the plain path is the slow reference (~25-40 s per training step): fewer repeats for it
    plain_repeats = max(1, min(repeats, 2))
    workers = default_workers()
    results = {"version": __version__, "megengine": mge.__version__, "machine": platform.processor() or platform.machine(),
               "cores": os.cpu_count(), "workers": workers, "quick": quick, "rows": []}
    try:
        results["load_average"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        pass

    _progress("building the model, counting FLOPs, measuring the GEMM peaks")
    results["native"] = "on" if native.load() else f"off ({native.reason()})"
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
    results["peak_gflops"] = round(max(peaks["matmul"], peaks["conv1x1"]), 1)  # one core
    results["all_core_peak_gflops"] = round(peaks["all_cores"], 1)
    patch_flops = flops * (side / 128) ** 2
    step_flops = 3 * 8 * flops * (crop / 128) ** 2  # forward + backward (~2x forward), batch 8

    def row(name, batch, measured, per="patch"):
        sec, peak, busy, hwm = measured
        entry = {"case": name, "batch": batch, "peak_mib": None if peak is None else round(peak, 1),
                 "rss_mib": None if hwm is None else round(hwm, 1), "cores_busy": round(busy, 2)}
        if per == "patch":
            entry["sec_per_patch"] = round(sec / batch, 5)
            entry["gflops"] = round(patch_flops / (sec / batch) / 1e9, 2)
        else:
            entry["sec_per_step"] = round(sec, 4)
            entry["gflops"] = round(step_flops / sec / 1e9, 2)
        results["rows"].append(entry)
        return entry

    x = {b: mge.tensor(rng.random((b, 4, side, side), dtype=np.float32)) for b in (1, 8)}
    outputs = {}
    for batch in (1, 8):
        # each path's first call gives the output compared below and doubles as its warm-up
        _progress(f"inference, batch {batch}: plain")
        use_path(model, False)
        # one patch per forward, as the prediction path runs on CPU (a whole plain batch of 8
        # in one forward touched 15 GB)
        plain = _predict_fn(model, x[batch], "mge")
        outputs["plain", batch] = plain()
        row("infer plain", batch, measure_case(plain, plain_repeats if batch == 1 else 1, warmup=0))
        use_path(model, True)
        for name, fn in (("fast", _predict_fn(model, x[batch], "mge")),
                         ("lite", _predict_fn(model, x[batch], "lite")),
                         ("traced", _traced_fn(model, x[batch]))):
            _progress(f"inference, batch {batch}: {name}")
            outputs[name, batch] = fn()
            row({"fast": "infer fast", "lite": f"infer lite x{workers}", "traced": "infer fast+trace"}[name],
                batch, measure_case(fn, repeats, warmup=0))

    ref = np.abs(outputs["plain", 8]).max()
    results["max_rel_diff"] = {
        f"{path}_b{b}": float(np.abs(outputs[path, b] - outputs["plain", b]).max() / ref)
        for path in ("fast", "lite", "traced") for b in (1, 8)
    }

    model.train()
    batch_np = [rng.random((8, 4, crop, crop), dtype=np.float32) for _ in range(2)]
    noisy, clean = (mge.tensor(a) for a in batch_np)
    # the trainer's device (megfb/train.py): MegEngine's inline CPU device, a model of its own
    results["train_device"] = native.INLINE_DEVICE
    with native.default_device(native.INLINE_DEVICE):
        trained = build_model(dict(model_cfg, fast=False))
        trained.load_state_dict(model.state_dict())
        trained.train()
        inline_batch = [mge.tensor(a) for a in batch_np]
        for fast in (False, True):
            _progress(f"training step, batch 8: {'fast' if fast else 'plain'}")
            use_path(trained, fast)
            row(f"train step {'fast' if fast else 'plain'}", 8,
                measure_case(_train_fn(trained, *inline_batch), plain_repeats if not fast else repeats), per="step")
        if workers > 1:
            devices = [native.INLINE_DEVICE] + [f"cpu{i}" for i in range(1, workers)]
            _progress(f"training step, batch 8: fast, split over {', '.join(devices)}")
            row(f"train step split x{workers}", 8,
                measure_case(_split_train_fn(trained, *batch_np, devices, model_cfg), repeats), per="step")
        if results["native"] == "on":
            _progress("training step, batch 8: fast, MegEngine's kernels instead of megfb's operators")
            previous = use_native(False)
            try:
                row("train fast, no native", 8, measure_case(_train_fn(trained, *inline_batch), repeats), per="step")
            finally:
                use_native(previous)
    _progress(f"training step, batch 8: fast, on MegEngine's default device {mge.get_default_device()}")
    use_path(model, True)
    row("train fast, worker dev", 8, measure_case(_train_fn(model, noisy, clean), repeats), per="step")

    _progress("Lite inference again with glibc's malloc thresholds")
    set_malloc(MALLOC_DEFAULT)
    try:
        model.eval()
        row(f"lite x{workers}, malloc dflt", 8, measure_case(_predict_fn(model, x[8], "lite"), repeats))
    finally:
        set_malloc(MALLOC_TUNED)
    model.eval()

    _progress("PMRID-style baseline")
    pmrid = build_model({"name": "pmrid"})
    pmrid.eval()
    pmrid_flops = model_flops(pmrid, (1, 4, 128, 128)) * (side / 128) ** 2
    for batch in (1, 8):
        measured = measure_case(_inference_fn(pmrid, x[batch]), repeats)
        e = row("pmrid infer", batch, measured)
        e["gflops"] = round(pmrid_flops / (measured[0] / batch) / 1e9, 2)

    if profile:
        _progress("operator profiles")
        use_path(model, True)
        results["profile_fast"] = profile_ops(model, x[1])
        use_path(model, False)
        results["profile_plain"] = profile_ops(model, x[1])
    results["ratios"] = _ratios(results["rows"], workers)
    return results


def model_flops(model, shape):
    """FLOPs (2 x MACs of convs and matmuls) of the plain eval graph, as `megfb params` counts them."""
    with fast_paths_restored(model):
        set_fast(model, False)
        return graph_costs(export_graph_bytes(model, shape))["flops"]


def _ratios(rows, workers):
    """x faster than the plain path: inference in the predict/submit configuration (lite) and
    eager (fast), the training step (fast; split), and what the malloc tuning buys."""
    by = {(r["case"], r["batch"]): r for r in rows}
    out = {}
    for b in (1, 8):
        plain = by[("infer plain", b)]["sec_per_patch"]
        out[f"infer_speedup_b{b}"] = round(plain / by[(f"infer lite x{workers}", b)]["sec_per_patch"], 2)
        out[f"infer_fast_eager_speedup_b{b}"] = round(plain / by[("infer fast", b)]["sec_per_patch"], 2)
    plain = by[("train step plain", 8)]["sec_per_step"]
    out["train_speedup"] = round(plain / by[("train step fast", 8)]["sec_per_step"], 2)
    if (f"train step split x{workers}", 8) in by:
        out["train_split_speedup"] = round(plain / by[(f"train step split x{workers}", 8)]["sec_per_step"], 2)
    if ("train fast, worker dev", 8) in by:
        out["inline_train"] = round(by[("train fast, worker dev", 8)]["sec_per_step"]
                                    / by[("train step fast", 8)]["sec_per_step"], 2)
    if ("train fast, no native", 8) in by:
        out["native_train"] = round(by[("train fast, no native", 8)]["sec_per_step"]
                                    / by[("train step fast", 8)]["sec_per_step"], 2)
    out["malloc_infer"] = round(by[(f"lite x{workers}, malloc dflt", 8)]["sec_per_patch"]
                                / by[(f"infer lite x{workers}", 8)]["sec_per_patch"], 2)
    return out


def format_table(res):
    load = res.get("load_average")
    lines = [f"megfb bench {res.get('model', 'fbrestormer')}  (MegEngine {res['megengine']}, {res['cores']} cores"
             f"{', quick sizes' if res['quick'] else ''}; {res['params']:,} params, "
             f"{res['flops_per_patch'] / 1e9:.2f} GFLOPs per 256x256 patch"
             + (f"; load average at start {load[0]}" if load else "") + ")",
             f"{'case':<24}{'batch':>6}{'s/patch':>10}{'s/step':>9}{'GFLOP/s':>9}{'% 1core':>8}"
             f"{'% all':>7}{'cores':>7}{'peak MiB':>10}{'RSS MiB':>9}"]
    one, every = res["peak_gflops"], res["all_core_peak_gflops"]
    for r in res["rows"]:
        g = r.get("gflops")
        lines.append(f"{r['case']:<24}{r['batch']:>6}"
                     f"{r.get('sec_per_patch', ''):>10}{r.get('sec_per_step', ''):>9}"
                     f"{'' if g is None else g:>9}{'' if g is None else f'{g / one:.0%}':>8}"
                     f"{'' if g is None else f'{g / every:.0%}':>7}{r['cores_busy']:>7}"
                     f"{'' if r['peak_mib'] is None else r['peak_mib']:>10}"
                     f"{'' if r.get('rss_mib') is None else r['rss_mib']:>9}")
    lines.append(f"float32 GEMM peak (1536^3): one core {one} GFLOP/s (F.matmul {res['matmul_peak_gflops']}, "
                 f"as a 1x1 conv {res['conv1x1_peak_gflops']}); all cores {every} GFLOP/s "
                 f"({res['workers']} MegEngine CPU devices at once)")
    rat = res["ratios"]
    lines.append(f"speed-up vs plain: inference as predict/submit run it (lite) x{rat['infer_speedup_b1']} "
                 f"(batch 1), x{rat['infer_speedup_b8']} (batch 8); eager fast x{rat['infer_fast_eager_speedup_b1']}"
                 f" / x{rat['infer_fast_eager_speedup_b8']}; training step x{rat['train_speedup']}"
                 + (f" (split over the cores, experimental: x{rat['train_split_speedup']})"
                    if "train_split_speedup" in rat else ""))
    lines.append(f"megfb's native operators (depthwise convs and their gradients, LayerNorm, FFN gate, polyphase split): {res.get('native', 'on')}"
                 + (f"; training step without it x{rat['native_train']} the time" if "native_train" in rat else ""))
    if "inline_train" in rat:
        lines.append(f"training steps on MegEngine's inline CPU device {res.get('train_device')} (the trainer's); "
                     f"the fast step on the default device's worker thread x{rat['inline_train']} the time")
    lines.append(f"glibc malloc defaults instead of megfb's thresholds: lite inference x{rat['malloc_infer']} the time")
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
