"""`megfb compare`: the MegCup 2022 podium and the organisers' baseline under one measurement.

One row per model, the NTIRE efficient-SR report's columns: trainable parameters; MACs and
FLOPs of one 256x256 patch (counted on the plain eval graph, as `megfb params` does: convs and
matrix products; the fast graph's count beside it, which differs where a fast path trades
MACs for speed); activations (elements output by those ops); peak memory (the graph estimate
of megfb.costs, plain and fast, and the measured growth of the process's resident memory on
the fast path); runtime per patch on this machine, plain and fast path, each with its own
kernel choices (megfb.bench.use_path), the median of several runs after a warm-up; and, given
a data set and checkpoints, the contest score on its first patches, predicted through the one
prediction path (each model's own input scaling and output rounding, no ensemble), and the
largest difference (DN) between the fast and the plain path's predictions of the first patch.

Timing the plain 2nd place takes about a minute per 256x256 patch: `--quick` (or `--size`)
times smaller patches, and the table says which size it timed.
"""
import json
import math
import os
import platform

import cv2
import numpy as np

from . import PARAM_LIMIT, __version__
from .atomic import atomic_output
from .errors import MegfbError
from .io import PATCH

# The podium in rank order: (model.name, label, team, published leaderboard score).
PODIUM = (
    ("feedback_model", "1st Feedback", "Feedback", 9.00798),
    ("recurrent_mobilenet", "2nd IIL2", "IIL2", 9.00761),
    ("fbrestormer", "3rd Feedforward (FBRestormer)", "Feedforward", 9.00656),
    ("contest_baseline", "organisers' baseline", "organisers", None),
)


def _costs(model, side):
    from .costs import graph_costs
    from .graph import export_graph_bytes
    from .layers import fast_paths_restored, set_fast

    shape = (1, 4, side, side)
    with fast_paths_restored(model):
        set_fast(model, False)
        plain = graph_costs(export_graph_bytes(model, shape))
        set_fast(model, True)
        fast = graph_costs(export_graph_bytes(model, shape))
    return plain, fast


def _time(model, side, repeats, plain_repeats):
    """(plain s, fast s, fast measured peak MiB) per forward of one (1, 4, side, side) input."""
    import megengine as mge

    from .bench import use_path
    from .costs import measure
    from .layers import fast_paths_restored

    x = mge.tensor(np.random.default_rng(0).random((1, 4, side, side), dtype=np.float32))
    model.eval()
    with fast_paths_restored(model):
        use_path(model, False)
        plain, _ = measure(lambda: model(x).numpy(), plain_repeats)
        use_path(model, True)
        fast, peak = measure(lambda: model(x).numpy(), repeats)
    return plain, fast, peak


def _score(model, data, patches):
    """(contest score of the fast path on the first patches, max |fast - plain| in DN on the
    first patch): the plain definition checks the fast one on the team's own weights."""
    from .infer import predict_mosaics
    from .layers import fast_paths_restored, set_fast
    from .metrics import contest_score

    noisy, clean = data
    pred = predict_mosaics(model, noisy[:patches], progress=False)
    with fast_paths_restored(model):
        set_fast(model, False)
        plain = predict_mosaics(model, noisy[:1], progress=False)
    diff = int(np.abs(plain.astype(np.int64) - pred[:1].astype(np.int64)).max())
    return contest_score(pred, clean[:patches]), diff


def _load_data(data_dir):
    from .io import contest_paths, read_pair

    paths = contest_paths(data_dir)
    for key in ("test_input", "test_gt"):
        if not os.path.isfile(paths[key]):
            raise MegfbError(f"--data {data_dir}: {paths[key]} not found (`megfb data synth` writes the "
                             "synthetic test input and targets)")
    return read_pair(paths["test_input"], paths["test_gt"])


def _checkpoint_models(paths):
    """{model.name: (path, model)} of the given checkpoints, architecture from each file."""
    from .checkpoint import model_from_checkpoint

    known = {name for name, *_ in PODIUM}
    out = {}
    for path in paths or ():
        model, info = model_from_checkpoint(path)
        name = info["config"]["model"].get("name", "fbrestormer")
        if name not in known:
            raise MegfbError(f"--ckpt {path} is a {name} model, not one of the podium's ({', '.join(sorted(known))})")
        if name in out:
            raise MegfbError(f"--ckpt {path}: a {name} checkpoint was already given ({out[name][0]})")
        out[name] = (path, model)
    return out


def run_compare(size=PATCH, repeats=3, plain_repeats=1, ckpts=(), data_dir=None, patches=8,
                progress=print):
    """The comparison as a dict: {"rows": [...], and how it was measured}."""
    import megengine as mge

    from .model import build_model, count_parameters

    if size % 2 or size < 8:
        raise MegfbError(f"--size must be an even number of raw pixels, at least 8; got {size}")
    side = size // 2
    loaded = _checkpoint_models(ckpts)
    data = _load_data(data_dir) if data_dir else None
    if data is not None and not loaded:
        raise MegfbError("--data scores checkpoints: give at least one --ckpt")
    result = {"version": __version__, "megengine": mge.__version__,
              "machine": platform.processor() or platform.machine(), "cores": os.cpu_count(),
              "timed_raw_size": size, "repeats": repeats, "plain_repeats": plain_repeats,
              "score_patches": None, "identity_score": None, "rows": []}
    if data is not None:
        from .metrics import contest_score

        n = min(patches, len(data[0]))
        result["score_patches"] = n
        result["identity_score"] = contest_score(data[0][:n], data[1][:n])
    for name, label, team, published in PODIUM:
        path, model = loaded.get(name, (None, None))
        if model is None:
            model = build_model({"name": name})
        model.eval()
        progress(f"{label}: graph costs")
        plain_costs, fast_costs = _costs(model, PATCH // 2)
        progress(f"{label}: timing plain and fast paths on {size}x{size} patches")
        t_plain, t_fast, peak = _time(model, side, repeats, plain_repeats)
        row = {
            "model": name, "label": label, "team": team, "published_score": published,
            "params": count_parameters(model), "within_limit": count_parameters(model) <= PARAM_LIMIT,
            "macs": plain_costs["macs"], "flops": plain_costs["flops"], "macs_fast_graph": fast_costs["macs"],
            "activations": plain_costs["activations"],
            "peak_mib_plain_graph": plain_costs["peak_bytes"] / 2 ** 20,
            "peak_mib_fast_graph": fast_costs["peak_bytes"] / 2 ** 20,
            "peak_mib_measured_fast": peak,
            "sec_plain": t_plain, "sec_fast": t_fast, "speedup": t_plain / t_fast,
            "output_rounding": getattr(model, "output_rounding", "round"),
            "ensemble": getattr(model, "ensemble", "cfa"),
            "checkpoint": path, "score": None, "max_dn_fast_vs_plain": None,
        }
        if data is not None and path is not None:
            progress(f"{label}: scoring {result['score_patches']} patches")
            row["score"], row["max_dn_fast_vs_plain"] = _score(model, data, result["score_patches"])
        result["rows"].append(row)
    return result


def format_table(res):
    size = res["timed_raw_size"]
    lines = [f"megfb compare (MegEngine {res['megengine']}, {res['cores']} cores; costs per 256x256 "
             f"patch; times per {size}x{size} patch{' (smaller than a contest patch)' if size < PATCH else ''}, "
             f"median of {res['repeats']} fast / {res['plain_repeats']} plain runs)"]
    head = (f"{'model':<31}{'params':>8}{'GMACs':>8}{'GFLOPs':>8}{'acts M':>8}{'peak MiB':>10}"
            f"{'s plain':>9}{'s fast':>8}{'x':>6}{'score':>8}{'leaderbd':>9}")
    lines += [head, "-" * len(head)]
    for r in res["rows"]:
        score = "" if r["score"] is None else f"{r['score']:.4f}"
        pub = "" if r["published_score"] is None else f"{r['published_score']:.5f}"
        lines.append(f"{r['label']:<31}{r['params']:>8,}{r['macs'] / 1e9:>8.2f}{r['flops'] / 1e9:>8.2f}"
                     f"{r['activations'] / 1e6:>8.1f}{r['peak_mib_plain_graph']:>10.1f}"
                     f"{r['sec_plain']:>9.3f}{r['sec_fast']:>8.3f}{r['speedup']:>6.1f}{score:>8}{pub:>9}")
    lines.append("GMACs/acts/peak: plain eval graph (peak: estimated live tensors); fast graph MACs: "
                 + ", ".join(f"{r['model']} {r['macs_fast_graph'] / 1e9:.2f}" for r in res["rows"]))
    if res["score_patches"]:
        lines.append(f"score: contest score on the first {res['score_patches']} patches of --data "
                     f"(identity {res['identity_score']:.4f}); leaderbd: the contest's final leaderboard")
        checked = [f"{r['model']} {r['max_dn_fast_vs_plain']} DN" for r in res["rows"]
                   if r["max_dn_fast_vs_plain"] is not None]
        lines.append("fast vs plain path on the checkpoints' weights, first patch, max difference: "
                     + ", ".join(checked))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- chart

_COLOURS = {"feedback_model": (40, 40, 220), "recurrent_mobilenet": (30, 140, 240),
            "fbrestormer": (200, 90, 30), "contest_baseline": (90, 90, 90)}


def _log_ticks(lo, hi):
    ticks = []
    for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1):
        for m in (1, 2, 5):
            if lo <= m * 10 ** e <= hi:
                ticks.append(m * 10 ** e)
    return ticks


def _panel(points, ylabel, log_y, title, size=(560, 400)):
    """points: (x_plain, x_fast, y, label, colour); x (seconds) on a log axis."""
    w, h = size
    left, right, top, bottom = 70, 20, 30, 45
    img = np.full((h, w, 3), 255, np.uint8)
    xs = [v for p in points for v in p[:2]]
    ys = [p[2] for p in points]
    x_lo, x_hi = math.log10(min(xs) / 1.5), math.log10(max(xs) * 1.5)
    if log_y:
        y_lo, y_hi = math.log10(min(ys) / 1.6), math.log10(max(ys) * 1.6)
    else:
        pad = max((max(ys) - min(ys)) * 0.4, 0.01)
        y_lo, y_hi = min(ys) - pad, max(ys) + pad

    def px(x, y):
        fx = (math.log10(x) - x_lo) / (x_hi - x_lo)
        fy = ((math.log10(y) if log_y else y) - y_lo) / (y_hi - y_lo)
        return int(left + fx * (w - left - right)), int(h - bottom - fy * (h - top - bottom))

    font = cv2.FONT_HERSHEY_SIMPLEX
    cv2.rectangle(img, (left, top), (w - right, h - bottom), (150, 150, 150), 1)
    for t in _log_ticks(10 ** x_lo, 10 ** x_hi):
        x, _ = px(t, 10 ** y_lo if log_y else y_lo)
        cv2.line(img, (x, top), (x, h - bottom), (230, 230, 230), 1)
        cv2.putText(img, f"{t:g}", (x - 10, h - bottom + 15), font, 0.38, (90, 90, 90), 1, cv2.LINE_AA)
    yticks = _log_ticks(10 ** y_lo, 10 ** y_hi) if log_y else list(np.linspace(y_lo, y_hi, 5))
    for t in yticks:
        _, y = px(10 ** x_lo, t)
        cv2.line(img, (left, y), (w - right, y), (230, 230, 230), 1)
        text = f"{t:,.0f}" if log_y else f"{t:.3f}"
        cv2.putText(img, text, (4, y + 4), font, 0.36, (90, 90, 90), 1, cv2.LINE_AA)
    cv2.putText(img, title, (left, 20), font, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(img, "seconds per patch (log)", (w // 2 - 70, h - 10), font, 0.42, (60, 60, 60), 1, cv2.LINE_AA)
    cv2.putText(img, ylabel, (left + 6, top + 16), font, 0.4, (60, 60, 60), 1, cv2.LINE_AA)
    # labels beside the left end of each pair, alternately above and below: the podium's
    # parameter counts are within 0.5% of each other
    for i, (x_plain, x_fast, y, label, colour) in enumerate(points):
        p_plain, p_fast = px(x_plain, y), px(x_fast, y)
        cv2.line(img, p_plain, p_fast, colour, 1, cv2.LINE_AA)
        cv2.circle(img, p_plain, 6, colour, 1, cv2.LINE_AA)
        cv2.circle(img, p_fast, 6, colour, -1, cv2.LINE_AA)
        lx = min(p_plain[0], p_fast[0])
        (tw, _), _ = cv2.getTextSize(label, font, 0.42, 1)
        lx = min(max(lx - tw // 2, left + 2), w - right - tw - 2)
        ly = p_fast[1] - 12 - 14 * (i // 2) if i % 2 == 0 else p_fast[1] + 22 + 14 * (i // 2)
        cv2.putText(img, label, (lx, ly), font, 0.42, colour, 1, cv2.LINE_AA)
    return img


def chart(res):
    """params vs runtime (and score vs runtime when scored), hollow = plain, filled = fast."""
    size = res["timed_raw_size"]
    pts = [(r["sec_plain"], r["sec_fast"], r["params"], r["label"], _COLOURS[r["model"]]) for r in res["rows"]]
    panels = [_panel(pts, "trainable parameters (log)", True,
                     f"parameters vs time per {size}x{size} patch (o plain -> * fast)")]
    scored = [(r["sec_plain"], r["sec_fast"], r["score"], r["label"], _COLOURS[r["model"]])
              for r in res["rows"] if r["score"] is not None]
    if scored:
        panels.append(_panel(scored, f"contest score, {res['score_patches']} patches", False,
                             f"score vs time per {size}x{size} patch"))
    return np.concatenate(panels, axis=1) if len(panels) > 1 else panels[0]


def write_png(path, img):
    ok, buf = cv2.imencode(".png", img)
    if not ok:
        raise MegfbError(f"could not encode {path}")
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        f.write(buf.tobytes())


def cmd_compare(args):
    import sys

    from .atomic import check_output

    for out in (args.out, args.chart):  # rolling project outputs; their place is checked first
        check_output(out, force=True, what="output")
    size = 64 if args.quick else args.size
    repeats = 1 if args.quick else args.repeats
    res = run_compare(size=size, repeats=repeats, plain_repeats=1, ckpts=args.ckpt,
                      data_dir=args.data, patches=args.patches,
                      progress=lambda s: print(s, file=sys.stderr, flush=True))
    res["quick"] = bool(args.quick)
    print(format_table(res))
    img = chart(res)  # everything computed before anything is written
    with atomic_output(args.out) as tmp, open(tmp, "w") as f:
        json.dump(res, f, indent=2)
    write_png(args.chart, img)
    print(f"wrote {args.out} and {args.chart}")
    return 0
