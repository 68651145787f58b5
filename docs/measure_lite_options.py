"""Lite options for the inference runner (megfb/lite.py), side by side in one process: two
networks in CPU inplace mode, each fed by its own thread, on 16 random 256x256 patches of the
untrained model; per case the best of 3 runs, seconds per patch and cores busy.

    python docs/measure_lite_options.py [case ...]   (cases: base b2 b4 const opt3 jit1 nchw88 nchw44 fuse base2)
"""
import io
import os
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import numpy as np
import megenginelite as lite
from megfb.model import build_model
from megfb.layers import set_fast
from megfb.graph import export_graph, GRAPH_INPUT, GRAPH_OUTPUT

model = build_model({"name": "fbrestormer"})
model.eval()
set_fast(model, True)

def graph_for(shape):
    buf = io.BytesIO()
    export_graph(model, buf, shape, fuse_nonlinearity=True)
    return buf.getvalue()

def network(graph, **opts):
    config = lite.LiteConfig()
    config.options.comp_node_seq_record_level = 0
    config.options.weight_preprocess = True
    config.options.var_sanity_check_first_run = False
    for k, v in opts.items():
        setattr(config.options, k, v)
    net = lite.LiteNetwork(config)
    net.enable_cpu_inplace_mode()
    s = lite.LiteAlgoSelectStrategy
    net.set_network_algo_policy(s.LITE_ALGO_PROFILE | s.LITE_ALGO_OPTIMIZED)
    net.load(io.BufferedReader(io.BytesIO(graph)))
    return net

def fwd(net, x):
    net.get_io_tensor(GRAPH_INPUT).set_data_by_copy(x)
    net.forward(); net.wait()
    return net.get_io_tensor(GRAPH_OUTPUT).to_numpy().copy()

def run(label, per_net=1, patches=16, reps=3, **opts):
    shape = (per_net, 4, 128, 128)
    try:
        g = graph_for(shape)
        nets = [network(g, **opts) for _ in range(2)]
        x = np.random.default_rng(0).random(shape, dtype=np.float32)
        outs = [fwd(n, x) for n in nets]
    except Exception as e:
        print(f"{label:40s} FAILED: {str(e).splitlines()[0][:150]}", flush=True)
        return None
    calls = patches // (2 * per_net)
    best = 1e9
    for _ in range(reps):
        t = time.perf_counter()
        c0 = time.process_time()
        th = [threading.Thread(target=lambda n=n: [fwd(n, x) for _ in range(calls)]) for n in nets]
        [a.start() for a in th]; [a.join() for a in th]
        dt = time.perf_counter() - t
        busy = (time.process_time() - c0) / dt
        best = min(best, dt)
    print(f"{label:40s} {best / patches:.4f} s/patch  cores {busy:.2f}", flush=True)
    return outs[0]

cases = sys.argv[1:] or ["base", "b2", "b4", "const", "opt3", "jit1", "nchw88", "nchw44", "fuse", "base2"]
for c in cases:
    if c == "base": run("base (b1/net)")
    elif c == "b2": run("2 patches per forward", per_net=2)
    elif c == "b4": run("4 patches per forward", per_net=4)
    elif c == "const": run("const_shape", const_shape=1)
    elif c == "opt3": run("graph_opt_level 3", graph_opt_level=3)
    elif c == "jit1": run("jit_level 1", jit_level=1)
    elif c == "nchw88": run("enable_nchw88", enable_nchw88=1)
    elif c == "nchw44": run("enable_nchw44", enable_nchw44=1)
    elif c == "fuse": run("fuse_preprocess", fuse_preprocess=1)
    elif c == "base2": run("base again (b1/net)")
