"""Checkpoints: the trainer's resumable file and the plain published-layout state dict.

A trainer checkpoint is a dict saved with `mge.save`, marked by the key "megfb" (the project
version) and holding: config (resolved), model (state dict), ema (state dict or None),
optimizer, iteration, rng, split (val_fraction, seed, train_idx, val_idx), stats (mean, std)
and val (the last validation figures, best score). A plain state dict - such as the team's
published `feedback_restormer.mge` - is just {key: array}; it loads into a model built from a
config (when none is given: the architecture recognised from its keys, the FBRestormer
defaults otherwise) with strict key and shape checks. The 1st place's published
`model_best.pth` is a training dict: its leaderboard weights (`ema_model`) are used.
"""
import glob
import os
import pickle

import megengine as mge
import numpy as np

from .atomic import atomic_output
from .errors import MegfbError


def save_checkpoint(payload, path):
    """Write atomically: a crash mid-write leaves the previous file intact."""
    with atomic_output(path) as tmp:
        mge.save(payload, tmp)


def load_checkpoint(path):
    if not os.path.isfile(path):
        raise MegfbError(f"checkpoint not found: {path}")
    if os.path.getsize(path) == 0:
        raise MegfbError(f"checkpoint {path} is empty (0 bytes): it was not written completely")
    try:
        obj = mge.load(path, map_location="cpux")
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError,
            IndexError, KeyError, RuntimeError, OSError) as exc:
        raise MegfbError(
            f"checkpoint {path} is corrupt or truncated and cannot be read ({type(exc).__name__})"
        ) from None
    if not isinstance(obj, dict):
        raise MegfbError(f"checkpoint {path} holds a {type(obj).__name__}, not a state dict")
    return obj


def is_trainer_checkpoint(obj):
    return isinstance(obj, dict) and "megfb" in obj


# A key only one published layout has -> the architecture (model.name) it belongs to.
SIGNATURE_KEYS = {
    "net.pre_conv.0.op_layer.weight": "feedback_model",  # 1st place, team Feedback
    "conv2.0.conv.0.weight": "recurrent_mobilenet",  # 2nd place, team IIL2
    "block.trans_list.0.norm1.weight": "fbrestormer",  # 3rd place
    "net.10.weight": "contest_baseline",  # the organisers' (our key names)
}


def published_state(obj):
    """(state dict, which weights) of a plain file: the 1st place's `model_best.pth` holds its
    training state, the leaderboard weights under "ema_model"; other files are the state dict."""
    if isinstance(obj.get("ema_model"), dict):
        return obj["ema_model"], "ema_model"
    return obj, "model"


def detect_architecture(state):
    """model.name of the published layout a state dict has, or None when no signature key matches."""
    for key, name in SIGNATURE_KEYS.items():
        if key in state:
            return name
    return None


def _as_array(value):
    return value.numpy() if isinstance(value, mge.Tensor) else np.asarray(value)


def check_state_dict(model, state, source):
    """Raise one clear error naming the first missing, unexpected or mis-shaped key."""
    expected = model.state_dict()
    for key in expected:
        if key not in state:
            raise MegfbError(f"checkpoint {source}: missing key '{key}'")
    for key in state:
        if key not in expected:
            raise MegfbError(f"checkpoint {source}: unexpected key '{key}' (not in this model)")
    for key, value in expected.items():
        want, got = tuple(_as_array(value).shape), tuple(_as_array(state[key]).shape)
        if want != got:
            raise MegfbError(f"checkpoint {source}: key '{key}' has shape {got}, the model expects {want}")


def load_weights(model, state, source):
    check_state_dict(model, state, source)
    model.load_state_dict({k: _as_array(v) for k, v in state.items()}, strict=True)
    return model


def initialise_from(model, path, strict=True, expected_sha256=None):
    """Load the weights of a published-layout state dict or a trainer checkpoint (its EMA
    weights when it has them) into `model`, for fine-tuning (train.init_from).

    strict: every key must be there with its shape (one sentence naming the first that does
    not fit); otherwise what fits is loaded and the rest is listed. The mean/std constants
    come along: the loaded network then computes exactly the function it was trained as.
    Returns {"path", "sha256", "weights", "skipped"}.
    """
    from .io import sha256_file

    obj = load_checkpoint(path)
    digest = sha256_file(path)
    if expected_sha256 and digest != expected_sha256:
        raise MegfbError(f"train.init_from {path} has SHA-256 {digest}, not the "
                         f"train.init_from_sha256 {expected_sha256} the config names")
    if is_trainer_checkpoint(obj):
        weights = "ema" if obj.get("ema") is not None else "model"
        state = obj[weights]
    else:
        state, weights = published_state(obj)
        weights = "state_dict" if weights == "model" else weights
    if strict:
        load_weights(model, state, path)
        return {"path": path, "sha256": digest, "weights": weights, "skipped": []}
    expected = model.state_dict()
    fits = {k: _as_array(v) for k, v in state.items()
            if k in expected and tuple(_as_array(v).shape) == tuple(_as_array(expected[k]).shape)}
    skipped = sorted(set(expected) - set(fits)) + sorted(set(state) - set(expected))
    model.load_state_dict({**{k: _as_array(v) for k, v in expected.items()}, **fits}, strict=True)
    return {"path": path, "sha256": digest, "weights": weights, "skipped": skipped}


def model_from_checkpoint(path, config_path=None, prefer_ema=True):
    """Build and load a model from either checkpoint kind.

    Returns (model, info) with info = {"kind", "config", "split", "val", "weights"}; the
    model is in eval mode. For a trainer checkpoint the EMA weights are used when present
    (and prefer_ema), for a plain state dict the config comes from `config_path` or defaults.
    """
    from .config import load_config
    from .model import build_model

    obj = load_checkpoint(path)
    if is_trainer_checkpoint(obj):
        cfg = obj["config"]
        if config_path is not None:
            cfg = dict(cfg, model=load_config(config_path)["model"])
        use_ema = prefer_ema and obj.get("ema") is not None
        state = obj["ema"] if use_ema else obj["model"]
        info = {
            "kind": "trainer",
            "config": cfg,
            "split": obj.get("split"),
            "val": obj.get("val"),
            "iteration": obj.get("iteration"),
            "weights": "ema" if use_ema else "model",
        }
    else:
        cfg = load_config(config_path)
        state, weights = published_state(obj)
        name = detect_architecture(state)
        if config_path is None and name is not None:
            cfg = dict(cfg, model={"name": name})
        info = {"kind": "state_dict", "config": cfg, "split": None, "val": None,
                "iteration": None, "weights": weights}
    model = build_model(cfg["model"])
    load_weights(model, state, path)
    model.eval()
    return model, info


# ---------------------------------------------------------------------------------------------
# Which checkpoint a command uses

PUBLISHED_STEM = "feedback_restormer"  # the team's published state dict


def newest_run_checkpoint(runs_dir="runs"):
    """best.mge of the newest run (by the file's modification time)."""
    found = glob.glob(os.path.join(runs_dir, "*", "best.mge"))
    if not found:
        raise MegfbError(f"no trained run under {runs_dir}/: run `make train` or pass --ckpt")
    return max(found, key=os.path.getmtime)


def load_model(ckpt=None, config=None):
    """(path, model, info) for --ckpt / --config; the newest run's best checkpoint by default."""
    path = ckpt or newest_run_checkpoint()
    model, info = model_from_checkpoint(path, config)
    return path, model, info


def run_name(path, info):
    """The name a submission is filed under: the run's name, or the state dict's file stem."""
    if info["kind"] == "trainer":
        return str(info["config"].get("name") or "run")
    stem = os.path.splitext(os.path.basename(path))[0]
    return "published" if stem == PUBLISHED_STEM else stem


def describe(path, info):
    if info["kind"] == "trainer":
        return f"{path} (trainer checkpoint, iteration {info.get('iteration')}, {info['weights']} weights)"
    return f"{path} (plain state dict)"
