"""Small builders shared by the command tests: a tiny FBRestormer config, config files, inputs."""
import numpy as np
import yaml

TINY = {"name": "fbrestormer", "num_feats": 8, "heads": 2, "num_blocks": 3, "num_steps": 2}


def write_config(path, model_cfg, **extra):
    path.write_text(yaml.safe_dump({"model": model_cfg, **extra}))
    return str(path)


def make_input(path, n=2, seed=0):
    """n random uint16 256x256 mosaics written as a contest .bin; returns them."""
    rng = np.random.default_rng(seed)
    x = rng.integers(2000, 60000, size=(n, 256, 256)).astype("<u2")
    x.tofile(path)
    return x
