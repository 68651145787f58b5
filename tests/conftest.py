"""Test-session set-up, run before any test module imports MegEngine."""
import os

# MegEngine keeps the kernels it chose by timing in a persistent cache (~/.cache/megengine)
# shared by every process of the user. Tests keep theirs in memory, so they never depend on
# what earlier runs on this machine left there, and leave nothing behind.
os.environ["MGE_FASTRUN_CACHE_TYPE"] = "MEMORY"
