"""Checkpoints: the trainer's resumable file and the plain published-layout state dict.

A trainer checkpoint is a dict saved with `mge.save`, marked by the key "megfb" (the project
version) and holding: config (resolved), model (state dict), ema (state dict or None),
optimizer, iteration, rng, split (val_fraction, seed, train_idx, val_idx), stats (mean, std, black_level, white_level)
and val (the last validation figures, best score). A plain state dict - such as the team's
published `feedback_restormer.mge` - is just {key: array}; it loads into a model built from a
config (when none is given: the architecture recognised from its keys, the FBRestormer
defaults otherwise) with strict key and shape checks. The 1st place's published
`model_best.pth` is a training dict: its leaderboard weights (`ema_model`) are used.
"""
import glob
import os
import pickle
import re

import megengine as mge
import numpy as np

from .atomic import atomic_output
from .errors import MegfbError


def save_checkpoint(payload, path):
    """Write atomically: a crash mid-write leaves the previous file intact."""
    with atomic_output(path) as tmp:
        mge.save(payload, tmp)


def _what_exists(path):
    """For a missing checkpoint: the .mge files that are in its folder, or that there is none."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        return f"the folder {os.path.dirname(path) or '.'} does not exist"
    found = sorted(os.path.basename(p) for p in glob.glob(os.path.join(folder, "*.mge")))
    where = os.path.dirname(path) or "."
    return f"{where} holds {', '.join(found)}" if found else f"{where} holds no .mge file"


def _not_a_checkpoint(path):
    """A description when the file is plainly something else than a MegEngine pickle, else None.
    mge.save writes a pickle, whose first byte is 0x80 (protocol 2 and later)."""
    with open(path, "rb") as f:
        head = f.read(4096)
    if head[:1] == b"\x80":
        return None
    if path.endswith(".bin"):
        kind = "a raw .bin file"
    elif b"\0" not in head:
        kind = "a text file" + (" (YAML?)" if re.search(rb"^[\w.-]+:", head, re.M) else "")
    else:
        kind = "binary data of another kind"
    return kind


def load_checkpoint(path, resume_hint=False):
    """A dict from `mge.load`; one line for a missing, empty, foreign or corrupt file.
    resume_hint: the file is a run's latest.mge, so --restart is the way out."""
    way_out = "; rerun with --restart to start the run over (the file is left as it is)" if resume_hint else ""
    if os.path.isdir(path):
        raise MegfbError(f"checkpoint {path} is a folder, not a checkpoint file")
    if not os.path.isfile(path):
        raise MegfbError(f"checkpoint not found: {path} ({_what_exists(path)})")
    if os.path.getsize(path) == 0:
        raise MegfbError(f"checkpoint {path} is empty (0 bytes): it was not written completely{way_out}")
    kind = _not_a_checkpoint(path)
    if kind is not None:
        raise MegfbError(f"{path} is not a MegEngine checkpoint: it is {kind}{way_out}")
    try:
        obj = mge.load(path, map_location="cpux")
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError,
            IndexError, KeyError, RuntimeError, OSError, MemoryError) as exc:
        raise MegfbError(
            f"checkpoint {path} is corrupt or truncated and cannot be read ({type(exc).__name__}){way_out}"
        ) from None
    if not isinstance(obj, dict):
        raise MegfbError(f"{path} is not a MegEngine checkpoint: it holds a {type(obj).__name__}, not a state dict")
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


def _key_pattern(key):
    return re.sub(r"\.\d+(?=\.|$)", ".#", key)  # block.trans_list.3.x -> block.trans_list.#.x


def looks_like(state):
    """The architecture whose parameter names best match a state dict's (None when none is
    close): a hint for a checkpoint loaded with the wrong model."""
    from .model import _architectures, build_model

    if detect_architecture(state) is not None:  # a published layout's own signature key
        return detect_architecture(state)
    names = {_key_pattern(k) for k in state}
    best, best_share = None, 0.0
    for arch in _architectures():
        want = {_key_pattern(k) for k in build_model({"name": arch}).state_dict()}
        share = len(names & want) / max(1, len(names | want))
        if share > best_share:
            best, best_share = arch, share
    return best if best_share >= 0.5 else None


def _hint(model, state):
    arch = looks_like(state)
    mine = getattr(model, "arch_name", None) or type(model).__name__
    from .model import _architectures

    mine = next((n for n, cls in _architectures().items() if isinstance(model, cls)), mine)
    if arch is None:
        return " (its keys match none of this project's architectures)"
    if arch != mine:
        return f" (it looks like a {arch} checkpoint, this model is {mine}: pass a config with model.name: {arch})"
    return f" (it looks like a {arch} of another size: pass the config it was trained with)"


def check_state_dict(model, state, source):
    """Raise one clear error naming the first missing, unexpected or mis-shaped key, and which
    architecture the checkpoint looks like."""
    expected = model.state_dict()
    for key in expected:
        if key not in state:
            raise MegfbError(f"checkpoint {source}: missing key '{key}'{_hint(model, state)}")
    for key in state:
        if key not in expected:
            raise MegfbError(f"checkpoint {source}: unexpected key '{key}' (not in this model){_hint(model, state)}")
    for key, value in expected.items():
        want, got = tuple(_as_array(value).shape), tuple(_as_array(state[key]).shape)
        if want != got:
            raise MegfbError(f"checkpoint {source}: key '{key}' has shape {got}, the model expects {want}"
                             f"{_hint(model, state)}")


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

    Returns (model, info) with info = {"kind", "config", "split", "val", "weights", "stats"}; the
    model is in eval mode. For a trainer checkpoint the EMA weights are used when present
    (and prefer_ema), for a plain state dict the config comes from `config_path` or defaults.
    """
    from .config import load_config
    from .model import build_model

    obj = load_checkpoint(path)
    if is_trainer_checkpoint(obj):
        cfg = obj["config"]
        if config_path is not None:
            raise MegfbError(f"--config {config_path} is for a plain state dict; {path} is a trainer checkpoint "
                             "that carries its own config: leave --config out")
        use_ema = prefer_ema and obj.get("ema") is not None
        state = obj["ema"] if use_ema else obj["model"]
        info = {
            "kind": "trainer",
            "config": cfg,
            "split": obj.get("split"),
            "val": obj.get("val"),
            "iteration": obj.get("iteration"),
            "weights": "ema" if use_ema else "model",
            "stats": obj.get("stats"),  # mean, std, black_level, white_level of its data
        }
    else:
        cfg = load_config(config_path)
        state, weights = published_state(obj)
        name = detect_architecture(state)
        if config_path is None and name is not None:
            cfg = dict(cfg, model={"name": name})
        info = {"kind": "state_dict", "config": cfg, "split": None, "val": None,
                "iteration": None, "weights": weights, "stats": None}
    model = build_model(cfg["model"])
    load_weights(model, state, path)
    model.eval()
    return model, info


# ---------------------------------------------------------------------------------------------
# Which checkpoint a command uses

PUBLISHED_STEM = "feedback_restormer"  # the team's published state dict


def newest_run_checkpoint(runs_dir="runs"):
    """best.mge of the newest run (by the file's modification time)."""
    found = [p for p in glob.glob(os.path.join(runs_dir, "*", "best.mge")) if os.path.isfile(p)]
    if not found:
        latest = glob.glob(os.path.join(runs_dir, "*", "latest.mge"))
        if latest:
            raise MegfbError(f"no best.mge under {runs_dir}/ (no run has a finite validation score yet), but "
                             f"{', '.join(sorted(latest))} exist: pass one with --ckpt")
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
