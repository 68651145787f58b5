"""Experiment configs: YAML files over the defaults below, dotted overrides, unknown keys refused.

A config file may name a `base:` config (path relative to itself) whose values it overrides;
the ablation configs use this to differ from their recipe in one or two keys. The `model`
section is passed to `megfb.model.build_model`, which checks its keys against the chosen
architecture's constructor.
"""
import copy
import os

import yaml

from .errors import MegfbError

DEFAULTS = {
    "name": None,  # run name; defaults to the config file's stem
    "seed": 0,
    "out_dir": "runs",
    "data": {
        "dir": "data",
        "train_input": "competition_train_input.0.2.bin",
        "train_gt": "competition_train_gt.0.2.bin",
        "stats": "stats.yaml",  # relative to data.dir; standardisation constants come from it
        "val_fraction": 0.1,  # the team's 9:1 split
        "split_seed": 0,
        "train_on_all": False,  # the final recipe trains on 100% (validation is then optimistic)
        "crop": 256,  # raw mosaic crop side in pixels, even (Bayer-aligned)
        "batch_size": 8,
        "workers": 2,
        "augment": True,  # the 8 CFA-preserving dihedral transforms
        "val_patches": None,  # cap on validation patches scored (quick runs); None = all
    },
    "model": {"name": "fbrestormer"},
    "loss": {
        "type": "weighted_l1",  # weighted_l1 | l1 | l2 | charbonnier | focal
        "steps": "all",  # all (deep supervision) | last
        "step_weights": None,  # per-step weights for `all`; None = equal
        "charbonnier_eps": 1.0e-3,
    },
    "optim": {
        "type": "adam",  # adam | adamw
        "lr": 1.0e-3,
        "betas": [0.9, 0.999],
        "weight_decay": 0.0,
        "grad_clip": None,  # max global L2 norm, None = off
    },
    "schedule": {
        "type": "constant",  # constant | step | cosine
        "step_size": 250000,  # step: multiply by gamma every step_size iterations
        "gamma": 0.5,
        "min_lr": 1.0e-7,  # cosine floor
        "warmup": 0,  # linear warm-up iterations
    },
    "train": {
        "iterations": 1000,
        "val_every": 500,
        "log_every": 10,
        "ckpt_every": 100,  # `latest` checkpoint cadence (also written at every validation)
        "ema_decay": None,  # e.g. 0.999; None = no EMA
        # fine-tuning: weights loaded before iteration 0 (a published-layout state dict or a
        # trainer checkpoint); optimizer, schedule and EMA start fresh; the checkpoint's
        # mean/std constants are kept. A run records the file's SHA-256 (and checks it when set).
        "init_from": None,
        "init_from_sha256": None,
        "init_strict": True,  # false: load the keys that fit, list the others
        "progressive": None,  # list of {until: iteration, crop: px, batch_size: n}
        "preview_crops": 3,
        # CPU only: the batch split over this many MegEngine CPU devices (one worker thread
        # each, megfb/split.py); null = one per core, 1 = MegEngine's single CPU device
        "cpu_devices": None,
    },
}


def _merge(base, override, prefix=""):
    out = copy.deepcopy(base)
    for key, value in override.items():
        dotted = prefix + str(key)
        if key not in base:
            raise MegfbError(f"unknown config key '{dotted}'")
        if isinstance(base[key], dict) and key != "model":
            if not isinstance(value, dict):
                raise MegfbError(f"config key '{dotted}' must be a mapping, got {value!r}")
            out[key] = _merge(base[key], value, dotted + ".")
        elif key == "model":
            if not isinstance(value, dict):
                raise MegfbError(f"config key 'model' must be a mapping, got {value!r}")
            # model keys are checked by build_model against the architecture; a new
            # model name starts from that architecture's own defaults.
            merged = {} if value.get("name", base[key].get("name")) != base[key].get("name") else dict(base[key])
            merged.update(copy.deepcopy(value))
            out[key] = merged
        else:
            out[key] = copy.deepcopy(value)
    return out


def _read_yaml(path, chain=()):
    if not os.path.isfile(path):
        raise MegfbError(f"config file not found: {path}")
    if os.path.abspath(path) in chain:
        raise MegfbError(f"config {path}: `base:` chain loops back to itself")
    try:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    except yaml.YAMLError as exc:
        raise MegfbError(f"config {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise MegfbError(f"config {path} must be a mapping at the top level")
    base = raw.pop("base", None)
    if base is None:
        return DEFAULTS, raw
    base_path = os.path.normpath(os.path.join(os.path.dirname(path), base))
    parent_defaults, parent_raw = _read_yaml(base_path, chain + (os.path.abspath(path),))
    try:
        return parent_defaults, _merge_raw(parent_raw, raw)
    except MegfbError as exc:
        raise MegfbError(f"config {path}: {exc}") from None


def _merge_raw(parent, child):
    """Merge two raw (not yet defaulted) YAML dicts; child wins."""
    out = copy.deepcopy(parent)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            if key == "model" and value.get("name", out[key].get("name")) != out[key].get("name"):
                out[key] = copy.deepcopy(value)
            else:
                out[key] = _merge_raw(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_override(text):
    """'train.iterations=500' -> (['train', 'iterations'], 500), value parsed as YAML."""
    if "=" not in text:
        raise MegfbError(f"override '{text}' is not of the form dotted.key=value")
    key, value = text.split("=", 1)
    if not key:
        raise MegfbError(f"override '{text}' has no key")
    return key.split("."), yaml.safe_load(value) if value != "" else None


def load_config(path=None, overrides=()):
    """Resolve a config: defaults <- base chain <- file <- overrides. Returns a plain dict."""
    defaults, raw = (DEFAULTS, {}) if path is None else _read_yaml(path)
    try:
        cfg = _merge(defaults, raw)
    except MegfbError as exc:
        raise MegfbError(f"config {path}: {exc}") from None
    for text in overrides:
        keys, value = parse_override(text)
        nested = value
        for k in reversed(keys):
            nested = {k: nested}
        cfg = _merge(cfg, nested)
    if cfg["name"] is None:
        cfg["name"] = os.path.splitext(os.path.basename(path))[0] if path else "default"
    _check_values(cfg)
    return cfg


def _check_values(cfg):
    choices = {
        ("loss", "type"): ("weighted_l1", "l1", "l2", "charbonnier", "focal"),
        ("loss", "steps"): ("all", "last"),
        ("optim", "type"): ("adam", "adamw"),
        ("schedule", "type"): ("constant", "step", "cosine"),
    }
    for (section, key), allowed in choices.items():
        if cfg[section][key] not in allowed:
            raise MegfbError(
                f"config key '{section}.{key}' is {cfg[section][key]!r}; expected one of {', '.join(allowed)}"
            )
    crop = cfg["data"]["crop"]
    if not isinstance(crop, int) or crop % 2 or not 8 <= crop <= 256:
        raise MegfbError(f"config key 'data.crop' must be an even number of pixels in [8, 256], got {crop!r}")
    if not 0.0 < float(cfg["data"]["val_fraction"]) < 1.0:
        raise MegfbError("config key 'data.val_fraction' must be between 0 and 1")


def dump_config(cfg):
    return yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None)
