"""megfb's own CPU operators (megfb/csrc), compiled on first use and loaded into MegEngine.

The operators: the stride-1 "same" depthwise conv, its input gradient (the same conv with
rotated kernels) and its weight gradient (csrc/depthwise.cpp; MegEngine's kernels for them were
the largest single cost of a training step on a CPU), the channel LayerNorm's forward and
backward for training (csrc/channel_norm.cpp), one pass over the map each instead of
MegEngine's ~10 elementwise and reduction passes, the gate of the feed-forward half,
gelu(x1) * x2 (and the GFM's x1 * gelu(x2)), forward and backward, and GELU alone
(csrc/gated_gelu.cpp), one pass each instead of ~11 and ~10 elementwise passes, a split and a
concat, and the polyphase split of a map and its inverse
(csrc/phases.cpp), row copies instead of MegEngine's relayout of a 6-d transpose. A
custom operator's CPU code runs when the eager interpreter reaches it, on the interpreter's own
thread, without waiting for the kernels still queued on a CPU device's worker thread (cpu0,
cpu1, ...), so a call on such a device first copies its inputs into fresh contiguous tensors
and waits for every device (_ready). On MegEngine's inline CPU
device "cpu:default" (INLINE_DEVICE) every kernel runs on that same interpreter thread, in
order, so nothing is pending and no wait is needed: the trainer trains there (megfb/train.py;
each wait stalls the interpreter, which otherwise runs ahead of Python: `make bench`'s row
"train fast, worker dev" times the step with them).

The library is built with the machine's C++ compiler against the headers shipped in the
MegEngine wheel, once per source, compiler flags and MegEngine version, into
~/.cache/megfb/native (MEGFB_CACHE moves it); later processes load it directly. When it cannot
be built (no compiler) or MEGFB_NATIVE=0 is set, megfb uses the MegEngine fallback, which
computes the same numbers (tests/test_native.py), only slower; `megfb bench` says which ran.
"""
import contextlib
import hashlib
import os
import subprocess
import sys
import tempfile
import threading

_SOURCES = ("depthwise.cpp", "channel_norm.cpp", "gated_gelu.cpp", "phases.cpp")
_HEADERS = ("dense.h", "simd.h")  # included by the sources: part of the library's key
# -fno-trapping-math: lets the compiler vectorise loops with min/max and rounding (it changes
# no result; without it only AVX-512 masking vectorised csrc/gated_gelu.cpp's loops)
_FLAGS = ["-O3", "-march=native", "-fno-trapping-math", "-fPIC", "-shared", "-std=c++14", "-pthread"]
_LOCK = threading.Lock()
_STATE = {"loaded": None, "error": None}
# MegEngine's CPU device whose kernels run on the eager interpreter's thread (not a worker's)
INLINE_DEVICE = "cpu:default"


def cache_dir():
    root = os.environ.get("MEGFB_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "megfb")
    return os.path.join(root, "native")


def _library_path():
    import megengine

    digest = hashlib.sha256()
    here = os.path.join(os.path.dirname(__file__), "csrc")
    for name in _SOURCES + _HEADERS:
        with open(os.path.join(here, name), "rb") as f:
            digest.update(f.read())
    digest.update(" ".join(_FLAGS).encode())
    digest.update(_cpu_features().encode())  # -march=native: a build for this CPU only
    digest.update(megengine.__version__.encode())
    digest.update(sys.version.encode())
    return os.path.join(cache_dir(), f"megfb_ops-{digest.hexdigest()[:16]}.so")


def _cpu_features():
    """The CPU's instruction-set flags (Linux), so a cache shared between machines never hands
    one CPU a library built with -march=native for another (AVX-512 code on an AVX2 CPU)."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return platform.machine() + " " + " ".join(sorted(flags.split(":", 1)[-1].split()))


def _build(target):
    import megengine
    from megengine.core.ops.custom import get_custom_op_abi_tag

    root = os.path.dirname(megengine.__file__)
    include, lib = os.path.join(root, "core", "include"), os.path.join(root, "core", "lib")
    sources = [os.path.join(os.path.dirname(__file__), "csrc", name) for name in _SOURCES]
    os.makedirs(os.path.dirname(target), exist_ok=True)
    # built beside the target under a temporary name, then renamed: a concurrent process or an
    # interrupted build never leaves a half-written library under the final name
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(target))
    os.close(fd)
    cmd = [os.environ.get("CXX", "c++"), *_FLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={get_custom_op_abi_tag()}",
           "-isystem", include, *sources, "-o", tmp, f"-L{lib}", "-lmegengine_shared", f"-Wl,-rpath,{lib}"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            lines = done.stderr.strip().splitlines()
            errors = [line for line in lines if "error" in line.lower()]
            raise RuntimeError((errors or lines or ["the compiler failed"])[0].strip())
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load():
    """True when megfb's operators are loaded (building them if needed); False (once, with the
    reason in `reason()`) when they cannot be, or MEGFB_NATIVE=0 turns them off."""
    with _LOCK:
        if _STATE["loaded"] is not None:
            return _STATE["loaded"]
        if os.environ.get("MEGFB_NATIVE", "1") == "0":
            _STATE.update(loaded=False, error="MEGFB_NATIVE=0")
            return False
        import megengine

        if megengine.is_cuda_available():  # CPU kernels only; on a GPU MegEngine's own run there
            _STATE.update(loaded=False, error="a GPU is present (megfb's operators are CPU-only)")
            return False
        try:
            from megengine.core.ops import custom

            path = _library_path()
            if not os.path.exists(path):
                _build(path)
            custom.load(path)
            _STATE["loaded"] = True
        except Exception as exc:  # no compiler, no headers, a MegEngine without custom ops
            _STATE.update(loaded=False, error=f"{type(exc).__name__}: {exc}")
        return _STATE["loaded"]


def reason():
    """Why the operators are not in use (None when they are, or before load())."""
    return _STATE["error"]


def _same_conv_check(name, k, pad):
    # checked here: the operator's own check aborts the process from MegEngine's worker
    if int(k) % 2 != 1 or 2 * int(pad) != int(k) - 1:
        raise ValueError(f"{name}: a same conv needs an odd k and pad (k - 1) / 2, got k={k}, pad={pad}")


def _apply(name, inputs, **params):
    """The outputs of megfb's operator `name` with `params` on `inputs`, made ready for it
    (_ready: MegEngine runs a custom operator's CPU code as soon as its turn comes in the eager
    interpreter, without waiting for the kernels already queued on a CPU device's worker
    thread, which may still be writing an input) and split over _threads(inputs) threads."""
    from megengine.core._imperative_rt.core2 import apply
    from megengine.core.ops import custom

    threads = _threads(*inputs)
    return apply(getattr(custom, name)(threads=threads, **params), *_ready(*inputs))


def depthwise_conv(x, w, k, pad, share=1, flip=False):
    """y (B, G, H, W) of a stride-1 same depthwise conv of x (B, G, H, W) with kernels w
    (G / share, k*k), map g using kernel g // share (share: the polyphase sub-images of one
    channel); flip: each kernel rotated by 180 degrees (the conv's input gradient)."""
    _same_conv_check("depthwise_conv", k, pad)
    return _apply("MegfbDepthwiseConv", (x, w.reshape(-1, int(k) * int(k))),
                  k=int(k), pad=int(pad), share=int(share), flip=int(bool(flip)))[0]


def depthwise_wgrad(x, dy, k, pad, share=1):
    """dw (G / share, k*k) of a stride-1 same depthwise conv with input x and output gradient
    dy, both (B, G, H, W): dw[c, i, j] = sum over b, the maps g with g // share = c, y and x of
    x[b, g, y + i - pad, x + j - pad] * dy[b, g, y, x]."""
    _same_conv_check("depthwise_wgrad", k, pad)
    return _apply("MegfbDepthwiseWGrad", (x, dy), k=int(k), pad=int(pad), share=int(share))[0]


def channel_norm_forward(x, weight, bias):
    """LayerNorm over the channels of x (B, C, H, W), eps 1e-5: (y, xhat, rstd), with rstd
    (B, 1, H, W); weight and bias have C elements."""
    c = x.shape[1]
    return _apply("MegfbChannelNormForward", (x, weight.reshape(c), bias.reshape(c)))


def channel_norm_backward(dy, xhat, rstd, weight):
    """(dx, dweight, dbias) of channel_norm_forward's y, dweight and dbias with C elements."""
    return _apply("MegfbChannelNormBackward", (dy, xhat, rstd, weight.reshape(dy.shape[1])))


def gated_gelu_forward(x, swap=False):
    """gelu(x1) * x2 (B, H, h, w) of x's channel halves x1, x2 (x: B, 2H, h, w); swap:
    x1 * gelu(x2)."""
    if x.ndim != 4 or x.shape[1] % 2:
        raise ValueError(f"gated_gelu: x needs 4 dimensions and an even channel count, got {tuple(x.shape)}")
    return _apply("MegfbGatedGeluForward", (x,), swap=int(bool(swap)))[0]


def gated_gelu_backward(dy, x, swap=False):
    """dx (B, 2H, h, w) of gated_gelu_forward(x, swap) given its output gradient dy (B, H, h, w)."""
    return _apply("MegfbGatedGeluBackward", (dy, x), swap=int(bool(swap)))[0]


def gelu_forward(x):
    """gelu(x) = x Phi(x) elementwise (the formula of gated_gelu_forward)."""
    if x.ndim > 4:
        raise ValueError(f"gelu: at most 4 dimensions, got {tuple(x.shape)}")
    return _apply("MegfbGeluForward", (x,))[0]


def gelu_backward(dy, x):
    """dx of gelu_forward(x) given its output gradient dy (x's shape)."""
    return _apply("MegfbGeluBackward", (dy, x))[0]


def space_to_phases(x, d):
    """x (B, C, H, W) -> (B, C, d H, W / d), the d x d polyphase sub-images stacked along the
    rows (megfb/ops.py space_to_phases); H and W divisible by d."""
    return _phases(x, d, split=True)


def phases_to_space(x, d):
    """The inverse of space_to_phases: (B, C, d H, W / d) -> (B, C, H, W)."""
    return _phases(x, d, split=False)


def _phases(x, d, split):
    d = int(d)
    if x.ndim != 4 or d < 1:
        divides = False
    else:
        divides = (x.shape[2] % d == 0 and x.shape[3] % d == 0) if split else x.shape[2] % (d * d) == 0
    if not divides:
        raise ValueError(f"polyphase {'split' if split else 'merge'} by {d}: shape {tuple(x.shape)} does not divide")
    return _apply("MegfbSpaceToPhases" if split else "MegfbPhasesToSpace", (x,), d=d)[0]


def wait_all():
    """Block until every device's queued kernels are done (the interpreter's own sync,
    mge._full_sync, does not wait for the other devices' workers; CompNode._sync_all does)."""
    import megengine as mge
    from megengine.core._imperative_rt.common import CompNode

    mge._full_sync()
    CompNode._sync_all()


def _inline(tensor):
    return str(tensor.device) == INLINE_DEVICE


def _ready(*inputs):
    """The inputs as an operator may read them at once: unchanged when every input is on
    INLINE_DEVICE (whose kernels ran in order on the thread that will run the operator); else
    copied by an elementwise op into fresh contiguous tensors and waited for (wait_all). The
    copy matters: MegEngine hands a custom operator contiguous inputs, and for a strided view
    (a slice, a transposed gradient) it queues that relayout on the device's worker and runs
    the operator without waiting for it, so the operator read memory not yet written (zeros or
    garbage, now and then)."""
    from megengine.jit.tracing import is_tracing

    if is_tracing() or (inputs and all(map(_inline, inputs))):
        # in a traced graph (ops.native_in_graph) the operator is a node like any other: the
        # graph's executor runs it after its inputs' kernels
        return inputs
    inputs = tuple(t * 1 for t in inputs)
    wait_all()
    return inputs


def threads_available():
    """The cores this process may run on (MEGFB_THREADS overrides): how many threads megfb's
    operators split their work over on INLINE_DEVICE."""
    value = os.environ.get("MEGFB_THREADS")
    if value:
        try:
            return max(1, int(value))
        except ValueError:
            raise ValueError(f"MEGFB_THREADS must be a whole number of threads, got {value!r}") from None
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _threads(*inputs):
    """Threads for an operator on `inputs`: every core on INLINE_DEVICE, where MegEngine runs
    nothing else meanwhile (the interpreter's thread waits for the operator, and MegEngine's
    own kernels use that one thread only: the second core is otherwise idle in training); one
    in a traced graph (megfb's Lite runner runs one network per core already) and on a worker
    device (megfb/split.py's step runs one per core)."""
    from megengine.jit.tracing import is_tracing

    if is_tracing() or not inputs or not all(map(_inline, inputs)):
        return 1
    return threads_available()


@contextlib.contextmanager
def default_device(name):
    """MegEngine's default device set to `name` inside the block (MegEngine's own setter
    refuses "cpu:default"), the previous one restored after."""
    from megengine.core._imperative_rt.common import CompNode

    previous = CompNode._get_default_device()
    CompNode._set_default_device(name)
    try:
        yield name
    finally:
        CompNode._set_default_device(previous)


def on_inline_device(module):
    """True when any of the module's tensors lives on INLINE_DEVICE."""
    return any(_inline(t) for _, t in module.named_tensors())
