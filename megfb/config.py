"""Experiment configs: YAML files over the defaults below, dotted overrides, unknown keys refused.

A config file may name a `base:` config (path relative to itself) whose values it overrides;
the ablation configs use this to differ from their recipe in one or two keys. The `model`
section is passed to `megfb.model.build_model`, which checks its keys against the chosen
architecture's constructor.
"""
import copy
import math
import os
import re

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
        # loader worker processes; 0 = batches made in the training process. MegEngine's workers
        # pass batches through a plasma-store-server process that a killed trainer orphans,
        # and on a 2-core machine they only compete with the training step for the cores.
        "workers": 0,
        "augment": True,  # true: the 8 CFA-preserving dihedral transforms; mosaic: the 8 of the mosaic itself
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
        "type": "constant",  # constant | step | cosine | linear (to 0 at train.iterations)
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
        # CPU only: the batch split over this many MegEngine CPU devices (megfb/split.py);
        # null = one per core, 1 = MegEngine's inline CPU device alone (megfb/native.py).
        # EXPERIMENTAL, off by default: a resumed split run was once not bit-identical to an
        # uninterrupted one (a MegEngine cross-device race suspected), so 1 until explained.
        "cpu_devices": 1,
    },
}


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-4` (no dot) as a string; accept every float spelling as a number."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                 |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                 |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                 |[-+]?\.(?:inf|Inf|INF)
                 |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def load_yaml(text_or_file):
    """yaml.safe_load with numbers such as 1e-4 read as floats."""
    return yaml.load(text_or_file, Loader=_Loader)


# ---------------------------------------------------------------------------- value rules
# Every key's type and range, checked up front (before any file or folder is created).

def _what(value):
    return f"{value!r} ({type(value).__name__})" if isinstance(value, str) else repr(value)


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def integer(lo=None, hi=None, none=False):
    def check(v):
        if v is None and none:
            return None
        if not _is_int(v):
            return "a whole number" + (" or null" if none else "")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            return ("a whole number " + (f"in [{lo}, {hi}]" if hi is not None else f">= {lo}")
                    + (" or null" if none else ""))
        return None
    return check


def number(lo=None, hi=None, lo_open=False, hi_open=False, none=False):
    def check(v):
        if v is None and none:
            return None
        bounds = ("(" if lo_open else "[") + f"{lo if lo is not None else '-inf'}, " \
            f"{hi if hi is not None else 'inf'}" + (")" if hi_open or hi is None else "]")
        want = f"a number in {bounds}" + (" or null" if none else "")
        if not _is_num(v):
            return want
        if lo is not None and (v < lo or (lo_open and v == lo)):
            return want
        if hi is not None and (v > hi or (hi_open and v == hi)):
            return want
        return None
    return check


def boolean(v):
    return None if isinstance(v, bool) else "true or false"


def text(none=False):
    def check(v):
        if v is None and none:
            return None
        return None if isinstance(v, str) and v.strip() else "a non-empty string" + (" or null" if none else "")
    return check


def choice(*allowed):
    return lambda v: None if v in allowed else f"one of {', '.join(allowed)}"


def _crop(v):
    return None if _is_int(v) and v % 2 == 0 and 8 <= v <= 256 else "an even number of pixels in [8, 256]"


def _run_name(v):
    if not (isinstance(v, str) and v.strip()) or "/" in v or os.sep in v or v in (".", ".."):
        return "a non-empty run name without '/'"
    return None


def _sha256(v):
    return None if v is None or (isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v)) else \
        "null or a 64-digit lower-case hex SHA-256"


def _betas(v):
    ok = isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_num(b) and 0 <= b < 1 for b in v)
    return None if ok else "a list of two numbers in [0, 1)"


def _step_weights(v):
    ok = v is None or (isinstance(v, list) and v and all(_is_num(w) and w >= 0 for w in v))
    return None if ok else "null or a list of numbers >= 0"


def _progressive(v):
    if v is None:
        return None
    want = "null or a list of {until: iteration, crop: px, batch_size: n} mappings"
    if not isinstance(v, list):
        return want
    for entry in v:
        if not isinstance(entry, dict) or "until" not in entry or set(entry) - {"until", "crop", "batch_size"}:
            return want
        if integer(1)(entry["until"]) or ("crop" in entry and _crop(entry["crop"])) \
                or ("batch_size" in entry and integer(1)(entry["batch_size"])):
            return want + " (until >= 1, crop even in [8, 256], batch_size >= 1)"
    return None


RULES = {
    "name": _run_name,
    "seed": integer(0),
    "out_dir": text(),
    "data.dir": text(),
    "data.train_input": text(),
    "data.train_gt": text(),
    "data.stats": text(),
    "data.val_fraction": number(0, 1, lo_open=True, hi_open=True),
    "data.split_seed": integer(0),
    "data.train_on_all": boolean,
    "data.crop": _crop,
    "data.batch_size": integer(1),
    "data.workers": integer(0, 64),
    "data.augment": lambda v: None if v in (True, False, "mosaic") else "true, false or mosaic",
    "data.val_patches": integer(1, none=True),
    "loss.type": choice("weighted_l1", "l1", "l2", "charbonnier", "focal"),
    "loss.steps": choice("all", "last"),
    "loss.step_weights": _step_weights,
    "loss.charbonnier_eps": number(0, lo_open=True),
    "optim.type": choice("adam", "adamw"),
    "optim.lr": number(0, lo_open=True),
    "optim.betas": _betas,
    "optim.weight_decay": number(0),
    "optim.grad_clip": number(0, lo_open=True, none=True),
    "schedule.type": choice("constant", "step", "cosine", "linear"),
    "schedule.step_size": integer(1),
    "schedule.gamma": number(0, lo_open=True),
    "schedule.min_lr": number(0),
    "schedule.warmup": integer(0),
    "train.iterations": integer(1),
    "train.val_every": integer(1),
    "train.log_every": integer(1),
    "train.ckpt_every": integer(1),
    "train.ema_decay": number(0, 1, lo_open=True, hi_open=True, none=True),
    "train.init_from": text(none=True),
    "train.init_from_sha256": _sha256,
    "train.init_strict": boolean,
    "train.progressive": _progressive,
    "train.preview_crops": integer(0, 64),
    "train.cpu_devices": integer(1, 64, none=True),
}


# Keys whose value is always text (names, paths, a hash): an override keeps what was typed,
# where YAML would read `name=2024` as a number or a SHA-256 of digits as an integer.
TEXT_KEYS = ("name", "out_dir", "data.dir", "data.train_input", "data.train_gt", "data.stats",
             "train.init_from", "train.init_from_sha256")


def _check_rules(cfg):
    for dotted, rule in RULES.items():
        value = cfg
        for part in dotted.split("."):
            value = value[part]
        problem = rule(value)
        if problem:
            raise MegfbError(f"config key '{dotted}' must be {problem}, got {_what(value)}")


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
    if os.path.isdir(path):
        raise MegfbError(f"config {path} is a folder, not a YAML file")
    if not os.path.isfile(path):
        raise MegfbError(f"config file not found: {path}")
    if os.path.abspath(path) in chain:
        raise MegfbError(f"config {path}: `base:` chain loops back to itself")
    try:
        with open(path, encoding="utf-8") as f:
            raw = load_yaml(f) or {}
    except yaml.YAMLError as exc:
        raise MegfbError(f"config {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    except (UnicodeDecodeError, ValueError):
        raise MegfbError(f"config {path} is not a text file (binary content); expected YAML") from None
    if not isinstance(raw, dict):
        raise MegfbError(f"config {path} must be a mapping at the top level")
    base = raw.pop("base", None)
    if base is None:
        return DEFAULTS, raw
    if not isinstance(base, str) or not base.strip():
        raise MegfbError(f"config {path}: 'base' must be the path of another config file, got {_what(base)}")
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
    try:
        parsed = load_yaml(value) if value != "" else None
    except yaml.YAMLError:
        raise MegfbError(f"override '{text}': the value is not valid YAML") from None
    return key.split("."), parsed


def load_config(path=None, overrides=()):
    """Resolve a config: defaults <- base chain <- file <- overrides. Returns a plain dict."""
    defaults, raw = (DEFAULTS, {}) if path is None else _read_yaml(path)
    try:
        cfg = _merge(defaults, raw)
    except MegfbError as exc:
        raise MegfbError(f"config {path}: {exc}") from None
    for text in overrides:
        keys, value = parse_override(text)
        if ".".join(keys) in TEXT_KEYS and isinstance(value, (bool, int, float)):
            value = text.split("=", 1)[1]  # name=2024, a SHA-256 of digits: the text as written
        nested = value
        for k in reversed(keys):
            nested = {k: nested}
        cfg = _merge(cfg, nested)
    if cfg["name"] is None:
        cfg["name"] = os.path.splitext(os.path.basename(path))[0] if path else "default"
    _check_values(cfg)
    return cfg


def _check_values(cfg):
    _check_rules(cfg)
    if not isinstance(cfg["model"].get("name", ""), str):
        raise MegfbError(f"config key 'model.name' must be an architecture name, got {_what(cfg['model']['name'])}")


def dump_config(cfg):
    return yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None)
