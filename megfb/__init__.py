"""megfb: the MegCup 2022 FBRestormer raw denoiser in MegEngine, with the contest workflow.

Pipeline: io (contest .bin, Bayer packing) -> synth (default data) -> data (statistics,
split, loaders) -> layers/model/baselines -> losses -> train -> metrics -> infer/submit.
"""
import os

# MegEngine prints a CUDA-probe banner at import on machines without a GPU driver; its own
# logging level variable is read once at import, so set it before anything imports megengine.
os.environ.setdefault("MEGENGINE_LOGGING_LEVEL", "ERROR")

__version__ = "0.1.0"

# The contest's hard rule: at most this many trainable parameters.
PARAM_LIMIT = 100_000
