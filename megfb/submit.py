"""Contest deliverables: the validation score, the parameter/FLOPs report and the submission zip.

eval    score a checkpoint on its own validation split (and the synthetic test targets), next
        to the identity (noisy input) score; predictions are rounded to uint16 first, exactly
        as a submission would be.
params  trainable parameters (the contest's 100,000 limit), MACs/FLOPs, activations, peak
        memory and time for one 256x256 patch - the NTIRE 2022 efficient-SR report's columns.
submit  refuse a model over the limit before any inference, validate the test input, predict,
        export the traced inference graph, zip result.bin + model.mge + manifest.json and
        re-check every member before the zip gets its final name.

What is counted: MACs are the multiply-accumulates of convolutions and matrix products, read
off the traced MegEngine graph (so F.matmul attention and the fast paths' matmuls are seen);
bias adds, norms, activations and softmax are not counted; FLOPs = 2 * MACs. Activations are
the elements output by those convolutions and matrix products (the NTIRE count). Peak memory is
the largest total size of the graph's tensors alive at once when its operators run in order
(views share their source's storage, weights excluded) - a deterministic estimate, since
MegEngine 1.13 reports no allocator peak on CPU.
"""
import datetime
import glob
import hashlib
import io
import json
import os
import tempfile
import zipfile

import numpy as np

from . import PARAM_LIMIT, __version__
from .atomic import atomic_output
from .errors import MegfbError

PATCH = 256
GRAPH_INPUT, GRAPH_OUTPUT = "raw_packed", "denoised"
GRAPH_TOLERANCE = 1e-4  # max |graph - eager| on the [0,1] scale
PUBLISHED_STEM = "feedback_restormer"  # the team's published state dict


# ---------------------------------------------------------------------------------------------
# Which checkpoint, which model


def newest_run_checkpoint(runs_dir="runs"):
    """best.mge of the newest run (by the file's modification time)."""
    found = glob.glob(os.path.join(runs_dir, "*", "best.mge"))
    if not found:
        raise MegfbError(f"no trained run under {runs_dir}/: run `make train` or pass --ckpt")
    return max(found, key=os.path.getmtime)


def load_for_contest(args):
    """(path, model, info) for --ckpt / --config, the newest run's best checkpoint by default."""
    from .checkpoint import model_from_checkpoint

    path = args.ckpt or newest_run_checkpoint()
    model, info = model_from_checkpoint(path, getattr(args, "config", None))
    return path, model, info


def run_name(path, info):
    if info["kind"] == "trainer":
        return str(info["config"].get("name") or "run")
    stem = os.path.splitext(os.path.basename(path))[0]
    return "published" if stem == PUBLISHED_STEM else stem


def check_param_limit(model):
    """The contest rule, checked before anything else is spent on the model."""
    from .model import count_parameters

    n = count_parameters(model)
    if n > PARAM_LIMIT:
        raise MegfbError(f"model has {n:,} trainable parameters, over the contest limit of {PARAM_LIMIT:,}")
    return n


def describe(path, info):
    if info["kind"] == "trainer":
        return f"{path} (trainer checkpoint, iteration {info.get('iteration')}, {info['weights']} weights)"
    return f"{path} (plain state dict)"


# ---------------------------------------------------------------------------------------------
# Prediction in contest units


def predict_mosaics(model, noisy, batch_size=1, tta=False, progress=True):
    """uint16 mosaics (N,256,256) -> uint16 predictions, exactly as result.bin stores them."""
    from .infer import predict_packed
    from .io import mosaic_to_packed, packed_to_mosaic

    pred = predict_packed(model, mosaic_to_packed(noisy), batch_size=batch_size, tta=tta,
                          progress=progress)
    return packed_to_mosaic(pred)


# ---------------------------------------------------------------------------------------------
# eval


def validation_split(info, cfg, n):
    """(val_idx, where it came from) - the checkpoint's own split when it has one."""
    from .data import split_indices

    split = info.get("split")
    if split is not None and split.get("val_idx") is not None:
        return np.asarray(split["val_idx"], dtype=np.int64), "the checkpoint's own split"
    fraction, seed, source = 0.1, 0, "the default 9:1 split, seed 0"
    stats_path = os.path.join(cfg["data"]["dir"], cfg["data"]["stats"])
    if os.path.isfile(stats_path):
        import yaml

        with open(stats_path) as f:
            stats = yaml.safe_load(f) or {}
        rec = stats.get("split") if isinstance(stats.get("split"), dict) else stats
        if "val_fraction" in rec:
            fraction = float(rec["val_fraction"])
            seed = int(rec.get("split_seed", rec.get("seed", 0)))
            source = f"the split recorded in {stats_path} (val_fraction {fraction}, seed {seed})"
    return np.asarray(split_indices(n, fraction, seed)[1], dtype=np.int64), source


def score_rows(model, noisy, clean, batch_size, tta):
    from .metrics import contest_score, psnr

    pred = predict_mosaics(model, noisy, batch_size, tta)
    clean = np.asarray(clean)
    return {"model": (contest_score(pred, clean), psnr(pred, clean)),
            "identity": (contest_score(np.asarray(noisy), clean), psnr(np.asarray(noisy), clean))}


def cmd_eval(args):
    from .io import contest_paths, read_pair

    limit = getattr(args, "patches", None)
    if limit is not None and limit < 1:
        raise MegfbError(f"--patches must be at least 1, got {limit}")
    path, model, info = load_for_contest(args)
    cfg = info["config"]
    print(f"checkpoint {describe(path, info)}")
    data = cfg["data"]
    train_in = os.path.join(data["dir"], data["train_input"])
    train_gt = os.path.join(data["dir"], data["train_gt"])
    results = []
    if os.path.isfile(train_in) and os.path.isfile(train_gt):
        noisy, clean = read_pair(train_in, train_gt)
        val_idx, source = validation_split(info, cfg, len(noisy))
        note = " (trained on all data: optimistic)" if data.get("train_on_all") else ""
        idx = np.sort(val_idx[:limit])  # the trainer's val_patches cap takes these same patches
        part = f"the first {len(idx)} of " if len(idx) < len(val_idx) else ""
        print(f"validation: {part}{len(val_idx)} patches of {train_in}, {source}{note}")
        results.append(("validation", score_rows(model, noisy[idx], clean[idx], args.batch_size, args.tta)))
    else:
        print(f"validation: skipped, {train_in} / {train_gt} not found")
    test = contest_paths(data["dir"])
    if os.path.isfile(test["test_input"]) and os.path.isfile(test["test_gt"]):
        noisy, clean = read_pair(test["test_input"], test["test_gt"])
        part = f"the first {min(limit, len(noisy))} of " if limit is not None and limit < len(noisy) else ""
        print(f"synthetic test: {part}{len(noisy)} patches of {test['test_input']}")
        noisy, clean = noisy[:limit], clean[:limit]
        results.append(("synthetic test", score_rows(model, noisy, clean, args.batch_size, args.tta)))
    if not results:
        raise MegfbError(f"nothing to score: no training pair or synthetic test targets in {data['dir']}/")
    print(f"\n{'set':<16}{'what':<12}{'score':>9}{'PSNR dB':>10}")
    tag = "model+TTA" if args.tta else "model"
    for name, rows in results:
        for key, label in (("model", tag), ("identity", "identity")):
            score, db = rows[key]
            print(f"{name:<16}{label:<12}{score:>9.4f}{db:>10.2f}")
            name = ""
    return 0


# ---------------------------------------------------------------------------------------------
# The traced inference graph: export, reload, cost


def export_graph(model, file, shape=(1, 4, PATCH // 2, PATCH // 2), seed=0, all_steps=False):
    """Trace the eval-mode model and dump it as a deployable MegEngine graph (weights as consts).

    The graph is for the traced batch size only (one patch by default): the fast paths choose
    their kernels by batch size (a plain GEMM for single patches), so reshapes are baked in.

    all_steps traces the train-mode forward (every step's output, same arithmetic), only for
    comparing with module_stats, which runs the eager forward and so counts step outputs
    that the eval graph prunes.
    """
    import megengine as mge
    from megengine import jit

    model.train(all_steps)

    # record_only: build the graph without running it (5x faster than a traced run at 128x128;
    # the dumped graph is the same, and every caller checks it against the eager model anyway).
    @jit.trace(symbolic=True, capture_as_const=True, record_only=True)
    def infer(raw_packed):
        return model(raw_packed)

    infer(mge.tensor(np.random.default_rng(seed).random(shape, dtype=np.float32)))
    try:
        infer.dump(file, arg_names=[GRAPH_INPUT], output_names=None if all_steps else [GRAPH_OUTPUT],
                   optimize_for_inference=True)
    finally:
        model.eval()


def export_graph_bytes(model, shape=(1, 4, PATCH // 2, PATCH // 2), all_steps=False):
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
# params


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

    from .bench import measure
    from .layers import fast_paths_restored, set_fast
    from .model import count_parameters

    model.eval()
    shape = (1, 4, side, side)
    report = {"params": count_parameters(model), "shape": shape}
    with fast_paths_restored(model):
        set_fast(model, False)
        report["plain"] = graph_costs(export_graph_bytes(model, shape))
        report["plain_all_steps"] = graph_costs(export_graph_bytes(model, shape, all_steps=True))
        report["module_stats_conv_macs"] = module_stats_conv_macs(model, shape)
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
    from .model import count_parameters

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
        from .checkpoint import model_from_checkpoint

        model, info = model_from_checkpoint(args.ckpt)
        print(f"checkpoint {describe(args.ckpt, info)}")
    else:
        from .config import load_config
        from .model import build_model

        model = build_model(load_config(args.config)["model"])
    print_parameters(model)
    check_param_limit(model)  # over the limit: the table says where, no need to cost it
    print_costs(model_report(model, timing=not args.no_timing))
    return 0


# ---------------------------------------------------------------------------------------------
# submit


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def validate_zip(path, n_patches, expected_graph_output=None, probe=None):
    """Re-open the written zip and check every member; returns {member: size}."""
    members = ("result.bin", "model.mge", "manifest.json")
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
            if bad is not None:
                raise MegfbError(f"zip {path}: member {bad} fails its CRC check")
            names = z.namelist()
            if sorted(names) != sorted(members):
                raise MegfbError(f"zip {path} holds {names}, expected {list(members)}")
            sizes = {m: z.getinfo(m).file_size for m in members}
            want = n_patches * PATCH * PATCH * 2
            if sizes["result.bin"] != want:
                raise MegfbError(f"zip {path}: result.bin is {sizes['result.bin']} bytes, expected {want}")
            try:
                manifest = json.loads(z.read("manifest.json"))
            except ValueError:
                raise MegfbError(f"zip {path}: manifest.json is not valid JSON") from None
            h = hashlib.sha256()
            with z.open("result.bin") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            if manifest.get("result_sha256") != h.hexdigest():
                raise MegfbError(f"zip {path}: manifest.json's result_sha256 does not match result.bin")
            graph = DumpedGraph(z.read("model.mge"))
    except zipfile.BadZipFile:
        raise MegfbError(f"zip {path} cannot be re-opened as a zip file") from None
    if probe is not None:
        diff = float(np.abs(graph(probe) - expected_graph_output).max())
        if diff > GRAPH_TOLERANCE:
            raise MegfbError(f"zip {path}: model.mge gives outputs {diff:.2e} away from the eager model")
    return sizes


def cmd_submit(args):
    import megengine as mge

    from .io import mosaic_to_packed, read_bin

    path, model, info = load_for_contest(args)
    n_params = check_param_limit(model)  # the contest rule, before any inference
    noisy = read_bin(args.input)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise MegfbError(f"--out {args.out} exists and is not a folder")
    name = run_name(path, info)
    print(f"checkpoint {describe(path, info)}: {n_params:,} trainable parameters")
    print(f"input {args.input}: {len(noisy)} patches; predicting{' with TTA' if args.tta else ''}")
    result = predict_mosaics(model, noisy, args.batch_size, args.tta)

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    zip_path = os.path.join(args.out, f"{name}-{stamp}.zip")
    with tempfile.TemporaryDirectory(prefix="megfb-submit-") as tmp:
        result_path = os.path.join(tmp, "result.bin")
        np.ascontiguousarray(result, dtype="<u2").tofile(result_path)
        graph_path = os.path.join(tmp, "model.mge")
        export_graph(model, graph_path)
        graph = DumpedGraph(graph_path)
        probe = mosaic_to_packed(noisy[:3])
        diff = check_graph(graph, model, probe)
        if diff > GRAPH_TOLERANCE:
            raise MegfbError(f"the dumped graph differs from the eager model by {diff:.2e} (> {GRAPH_TOLERANCE})")
        costs = graph_costs(graph_path)
        val = info.get("val") or {}
        score = val.get("best_score", val.get("score")) if isinstance(val, dict) else None
        score = float(score) if score is not None and np.isfinite(score) else None
        manifest = {
            "run": name,
            "checkpoint": os.path.abspath(path),
            "checkpoint_kind": info["kind"],
            "checkpoint_sha256": sha256_file(path),
            "weights": info["weights"],
            "iteration": info.get("iteration"),
            "trainable_parameters": n_params,
            "param_limit": PARAM_LIMIT,
            "macs_per_patch": costs["macs"],
            "flops_per_patch": costs["flops"],
            "graph_input": {"name": GRAPH_INPUT, "shape": [1, 4, PATCH // 2, PATCH // 2],
                            "scale": "packed Bayer (0,0),(0,1),(1,0),(1,1), uint16 / 65535"},
            "graph_max_abs_diff": diff,
            "graph_note": "one forward pass of the network, no self-ensemble"
            + ("; result.bin averages it over the 8 CFA-safe flips/rotations (TTA)" if args.tta else ""),
            "fast_paths": any(getattr(m, "fast", False) for m in model.modules()),
            "validation_score": score if info["kind"] == "trainer" else None,
            "validation": _jsonable(val) if info["kind"] == "trainer" else None,
            "tta": bool(args.tta),
            "input": os.path.abspath(args.input),
            "input_sha256": sha256_file(args.input),
            "result_sha256": sha256_file(result_path),
            "result_shape": list(result.shape),
            "result_dtype": "uint16 little-endian",
            "config": _jsonable(info["config"]),
            "megfb_version": __version__,
            "megengine_version": mge.__version__,
            "time": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        }
        manifest_path = os.path.join(tmp, "manifest.json")
        with open(manifest_path, "w") as f:
            json.dump(manifest, f, indent=2)
        expected = graph(probe[:1])
        with atomic_output(zip_path) as tmp_zip:
            with zipfile.ZipFile(tmp_zip, "w", compression=zipfile.ZIP_DEFLATED) as z:
                for member in ("result.bin", "model.mge", "manifest.json"):
                    z.write(os.path.join(tmp, member), member)
            sizes = validate_zip(tmp_zip, len(noisy), expected, probe[:1])
    print(f"wrote {zip_path} ({os.path.getsize(zip_path):,} bytes)")
    for member, size in sizes.items():
        print(f"  {member:<14}{size:>14,} bytes")
    return 0


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist() if obj.size <= 16 else f"<array {obj.shape}>"
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None  # JSON has no inf/nan (an unvalidated run's best score is -inf)
    return obj
