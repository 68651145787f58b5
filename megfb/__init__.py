"""megfb: the MegCup 2022 FBRestormer raw denoiser in MegEngine, with the contest workflow.

Pipeline: io (contest .bin, Bayer packing) -> synth (default data) -> data (statistics,
split, loaders) -> ops/layers -> model/baselines -> losses -> train -> infer (the one
prediction path) -> metrics/evaluate -> graph/costs -> submit; bench times it all.
"""
import ctypes
import os

__version__ = "0.1.0"

# The contest's hard rule: at most this many trainable parameters.
PARAM_LIMIT = 100_000

os.environ.setdefault("MEGENGINE_LOGGING_LEVEL", "ERROR")

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MALLOC_TUNED = {_M_TRIM_THRESHOLD: 2**31 - 1, _M_MMAP_THRESHOLD: 2**30}
MALLOC_DEFAULT = {_M_TRIM_THRESHOLD: 128 * 1024, _M_MMAP_THRESHOLD: 128 * 1024}


def set_malloc(settings):
    """Apply glibc malloc thresholds to this process; False where there is no glibc.

    MegEngine's CPU tensors come from malloc. With glibc's defaults every block over the
    (dynamic) mmap threshold is a fresh mmap and the heap top is trimmed back to the kernel
    on free, so a training step or a prediction after anything of another size first-touches
    its memory page by page again. MALLOC_TUNED keeps up to 1 GiB blocks on the heap and never
    trims it: freed memory is reused. Numbers are unchanged (tests/test_package.py); `megfb
    bench` times the fast cases under both settings (in one process: the thresholds apply to
    every allocation after the call).
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own symbols: glibc's where there is one
    except (OSError, AttributeError):
        return False
    return all(mallopt(key, value) == 1 for key, value in settings.items())


# Before MegEngine allocates anything; MEGFB_MALLOC=default keeps glibc's own behaviour.
MALLOC = "default" if os.environ.get("MEGFB_MALLOC", "tuned") == "default" else "tuned"
if MALLOC == "tuned":
    set_malloc(MALLOC_TUNED)


def _probe_cuda_quietly():
    """Run MegEngine's CUDA probe once, at import, with stderr closed.

    On a machine without a GPU driver the probe prints a five-line banner and debug lines
    from C++ at the first tensor and at `is_cuda_available()`, whatever the log level; the
    answer is cached afterwards, so doing it once here keeps every command's output clean.
    """
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        import megengine

        megengine.tensor([0.0]).numpy()
        return megengine.is_cuda_available()
    except ImportError:
        return False
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


_probe_cuda_quietly()
