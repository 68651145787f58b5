"""`megfb train`: the training loop, checkpoints and resume, EMA, validation, curves.

One run = one directory runs/<name>/ holding the resolved config.yaml, log.jsonl, latest.mge,
best.mge and curves.png. Rerunning the same command resumes from latest.mge and - because
batch t is a pure function of (seed, t) and the optimizer/EMA state is saved - ends with the
same weights as an uninterrupted run. Validation scores the held-out split exactly as a
submission would be scored: predictions x 65535, clipped, rounded to uint16, contest formula.
"""
import fcntl
import json
import math
import os
import signal
import time

import megengine as mge
import megengine.distributed as dist
import numpy as np
from megengine.autodiff import GradManager
from megengine.optimizer import Adam, AdamW, clip_grad_norm
from tqdm import tqdm

from . import __version__, native
from .atomic import atomic_output
from .checkpoint import (initialise_from, is_trainer_checkpoint, load_checkpoint, load_weights,
                         save_checkpoint)
from .config import dump_config, load_config
from .errors import MegfbError
from .evaluate import validation_patches
from .infer import predict_mosaics
from .losses import supervised_loss
from .model import build_model, count_parameters, resolve_model_config

PREVIEW_SIZE = 64  # packed pixels per side of a preview crop (a 128x128 mosaic region)

# Keys a resumed run may change: they do not change what the weights learn from (extending
# the run, logging/validation/checkpoint cadence, loader processes, preview count). Any other
# difference makes it another experiment: refused, naming --restart and name=.
SAFE_ON_RESUME = ("out_dir", "train.iterations", "train.val_every", "train.log_every", "train.ckpt_every",
                  "train.preview_crops", "train.cpu_devices", "data.workers")


# ---------------------------------------------------------------------------- schedules


def learning_rate(sched, base_lr, it, iterations):
    """Learning rate for 0-based iteration `it`: optional linear warm-up, then the schedule.

    A pure function of the iteration (not a stateful scheduler), so a resumed run needs
    nothing but the iteration number to continue on the same curve.
    """
    warmup = int(sched.get("warmup") or 0)
    if it < warmup:
        return base_lr * (it + 1) / warmup
    kind = sched["type"]
    if kind == "constant":
        return base_lr
    if kind == "step":
        return base_lr * sched["gamma"] ** (it // int(sched["step_size"]))
    if kind == "linear":  # the 2nd place's and the organisers' recipes: down to 0 at the end
        return base_lr * max(0.0, 1.0 - (it - warmup) / max(1, iterations - warmup))
    t = (it - warmup) / max(1, iterations - warmup)  # cosine annealing to min_lr
    return sched["min_lr"] + (base_lr - sched["min_lr"]) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def data_phase(cfg, it):
    """(crop, batch_size) at iteration `it`: Restormer's progressive schedule when given,
    entries {until, crop, batch_size} in order, the data section's values after the last."""
    for entry in cfg["train"]["progressive"] or []:
        if it < int(entry["until"]):
            return int(entry.get("crop", cfg["data"]["crop"])), int(entry.get("batch_size", cfg["data"]["batch_size"]))
    return int(cfg["data"]["crop"]), int(cfg["data"]["batch_size"])


def make_optimizer(optim, params):
    kind = {"adam": Adam, "adamw": AdamW}[optim["type"]]
    return kind(params, lr=optim["lr"], betas=tuple(optim["betas"]), weight_decay=optim["weight_decay"])


def ema_decay_at(decay, updates):
    """EMA decay with the usual warm-up (1 + t) / (10 + t): early on the average follows the
    weights closely instead of remembering the random initialisation for ~1/(1-decay) steps."""
    return min(decay, (1.0 + updates) / (10.0 + updates))


def update_ema(ema, state, decay):
    for key, value in state.items():
        if np.issubdtype(value.dtype, np.floating) and key in ema:
            ema[key] = (decay * ema[key] + (1.0 - decay) * value).astype(value.dtype)
        else:
            ema[key] = value.copy()


# ---------------------------------------------------------------------------- data


def training_paths(data_cfg):
    """(input, gt) paths of the training pair; a clear error when they are not there."""
    d = data_cfg["dir"]
    paths = os.path.join(d, data_cfg["train_input"]), os.path.join(d, data_cfg["train_gt"])
    for path in paths:
        if not os.path.exists(path):
            raise MegfbError(
                f"training data not found: {path}; put the contest files in {d}/ "
                "or run `megfb data synth` to generate the synthetic default set"
            )
    return paths


def standardisation_stats(data_cfg, paths):
    """mean/std ([0,1] scale) from data/stats.yaml (computed and written first if missing).

    They go into the model's mean/std buffers, so every checkpoint carries its own constants.
    """
    from . import data

    path = os.path.join(data_cfg["dir"], data_cfg["stats"])
    if not os.path.isfile(path):
        print(f"{path} not found: computing it first (as `megfb data stats` does)")
        data.write_stats(path, data.compute_stats(*paths, data_cfg["val_fraction"], data_cfg["split_seed"]))
    stats = data.load_stats(path)
    data.check_stats_source(stats, path, paths)
    black = stats.get("black_level")
    black = float(np.mean(black["unit"])) if isinstance(black, dict) and "unit" in black else None
    # white level: the stats file's when it has one, else the contest convention (1023 DN at 10
    # bits x64); `megfb denoise` maps a photo's black..white onto this black..white
    white = stats.get("white_level")
    white = float(np.mean(white["unit"])) if isinstance(white, dict) and "unit" in white else 65472 / 65535
    return {"mean": [float(v) for v in stats["mean"]], "std": [float(v) for v in stats["std"]],
            "black_level": black, "white_level": white}


def train_batches(paths, indices, cfg, crop, batch_size, start, rank=0, world=1):
    """Batch t is a pure function of (seed, t): the resumed run sees the same batches. With
    several GPUs each rank draws its own share of the global batch from its own stream."""
    from .data import TrainBatches

    d = cfg["data"]
    return TrainBatches(*paths, indices, crop=crop, batch_size=batch_size // world, augment=d["augment"],
                        seed=cfg["seed"], workers=d["workers"], start=start, rank=rank)


# ---------------------------------------------------------------------------- validation


def score(pred_u16, clean_u16):
    from .metrics import contest_score, psnr

    return float(contest_score(pred_u16, clean_u16)), float(psnr(pred_u16, clean_u16))


def preview_crops(noisy_u16, pred_u16, clean_u16, n):
    from .io import mosaic_to_packed

    h = noisy_u16.shape[-1] // 2
    lo, hi = (h - PREVIEW_SIZE) // 2, (h + PREVIEW_SIZE) // 2
    crops = []
    for i in range(min(n, len(noisy_u16))):
        crops.append(tuple(mosaic_to_packed(a[i])[:, lo:hi, lo:hi] for a in (noisy_u16, pred_u16, clean_u16)))
    return crops


# ---------------------------------------------------------------------------- run directory


def _flat(cfg, prefix=""):
    out = {}
    for key, value in cfg.items():
        if isinstance(value, dict) and key != "model" or (key == "model" and not prefix):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def _same(a, b):
    if isinstance(a, float) or isinstance(b, float):
        try:
            return float(a) == float(b)
        except (TypeError, ValueError):
            return False
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def check_resume(new, old, run_dir, new_data=None, old_data=None):
    """Compare the config (and data) of a resumed run with what it ran with. Returns the
    allowed changes {key: (old, new)}; any other difference is refused in one line listing
    the keys and the ways out. `train.init_from_sha256` is derived (filled by the trainer):
    when the new config leaves it empty, the run's recorded value stands."""
    new = dict(new, train=dict(new["train"]))
    if new["train"].get("init_from_sha256") is None:
        new["train"]["init_from_sha256"] = old.get("train", {}).get("init_from_sha256")
    a, b = _flat(old), _flat(new)
    differ = [k for k in sorted(set(a) | set(b)) if not _same(a.get(k), b.get(k))]
    changed = [k for k in differ if k not in SAFE_ON_RESUME]
    if old_data is not None and new_data is not None and old_data != new_data:
        changed.append("the data (" + ", ".join(f"{n}: {old_data.get(n)} -> {new_data.get(n)} bytes"
                                                 for n in sorted(set(old_data) | set(new_data))
                                                 if old_data.get(n) != new_data.get(n)) + ")")
    if changed:
        shown = [f"{k} {a.get(k)!r} -> {b.get(k)!r}" if k in a or k in b else k for k in changed]
        raise MegfbError(f"{run_dir} is another experiment: its config changed since it ran ({'; '.join(shown)}); "
                         "rerun with --restart to start this run over, or pass another name=NAME for a new run")
    return {k: (a.get(k), b.get(k)) for k in differ}


class RunLock:
    """One trainer per run folder: an flock on runs/<name>/.lock, released by the kernel when
    the process ends however it ends, so a crashed or killed run never leaves it stuck."""

    def __init__(self, run_dir):
        self.run_dir, self.path, self.fd = run_dir, os.path.join(run_dir, ".lock"), None

    def acquire(self):
        if self.fd is not None:
            return self
        os.makedirs(self.run_dir, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise MegfbError(f"{self.run_dir} is in use by another `megfb train` ({holder}); wait for it "
                             "to finish or stop it, or pass another name=NAME") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)
        self.fd = fd
        return self

    def release(self):
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the lock; the file stays (harmless)
            self.fd = None


def _json_line(rec):
    """Strict JSON (no NaN/Infinity tokens): a non-finite figure is written as null."""
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else
                 [None if isinstance(x, float) and not math.isfinite(x) else x for x in v] if isinstance(v, list) else v)
             for k, v in rec.items()}
    return json.dumps(clean, allow_nan=False) + "\n"


def read_log(path, upto):
    """The run's log entries up to iteration `upto`: a resumed run drops what the killed run
    logged after its last checkpoint (and a half-written last line) so the log stays one story."""
    records = []
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if rec.get("iteration", 0) <= upto:
                    records.append(rec)
    with atomic_output(path) as tmp, open(tmp, "w") as f:
        f.writelines(_json_line(r) for r in records)
    return records


def weights_finite(state):
    return all(np.isfinite(v).all() for v in state.values() if np.issubdtype(v.dtype, np.floating))


class Interrupts:
    """SIGINT/SIGTERM: during a training step, finish it and stop at the next iteration
    boundary (the caller then saves `latest`); anywhere else - or on a second signal -
    raise KeyboardInterrupt at once."""

    def __init__(self):
        self.requested = False
        self.in_step = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def __call__(self, signum, frame):
        if self.in_step and not self.requested:
            self.requested = True
            tqdm.write("interrupt: finishing this iteration, then saving the latest checkpoint")
        else:
            self.requested = True
            raise KeyboardInterrupt


# ---------------------------------------------------------------------------- entry points


def cmd_train(args):
    cfg = load_config(args.config, args.overrides)
    resolve_model_config(cfg["model"])  # the architecture's own keys, before anything is created
    if getattr(args, "check_config", False):
        print(f"config {args.config}: every key valid; the run would be {os.path.join(cfg['out_dir'], cfg['name'])}/")
        return 0
    train(cfg, gpus=args.gpus, restart=args.restart)


# Architectures whose every constant is made per device (megfb/ops.py constant(..., device)),
# so that a replica on another CPU device can run them; the others train on one device.
SPLIT_READY = ("fbrestormer",)


def training_cpu_devices(cfg):
    """The CPU devices a training step is split over (megfb/split.py): train.cpu_devices of
    them, by default (null) one per core this process may use (one for architectures not in
    SPLIT_READY). The first is MegEngine's inline CPU device "cpu:default" (megfb/native.py
    INLINE_DEVICE: kernels on the interpreter's thread, so megfb's operators run without
    waiting for a worker), where the model, optimizer and every other tensor of the run stay;
    the others are cpu1, cpu2, ... (megfb/split.py)."""
    from .lite import default_workers

    count = cfg["train"].get("cpu_devices")
    name = cfg["model"].get("name", "fbrestormer")
    if count is None:
        count = default_workers() if name in SPLIT_READY else 1
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise MegfbError(f"config key 'train.cpu_devices' is {count!r}; expected a whole number >= 1 or null")
    if count > 1 and name not in SPLIT_READY:
        raise MegfbError(f"config key 'train.cpu_devices' is {count}, but model '{name}' trains on one "
                         f"device only (split over devices: {', '.join(SPLIT_READY)}); set it to 1 or null")
    return [native.INLINE_DEVICE] + [f"cpu{i}" for i in range(1, count)]


def train(cfg, gpus=1, restart=False):
    """Train from a resolved config; returns a summary dict (best/identity score, paths)."""
    if not mge.is_cuda_available():
        devices = training_cpu_devices(cfg)
        where = (f"MegEngine device {devices[0]}" if len(devices) == 1 else
                 f"each batch split over the MegEngine CPU devices {', '.join(devices)}")
        print(f"device: CPU, {where} (no GPU available: training on CPU in a single process"
              + (f"; --gpus {gpus} ignored)" if gpus > 1 else ")"))
        with native.default_device(devices[0]):  # every tensor of the run made there
            return run_training(cfg, restart, devices)
    if gpus == 1:
        print(f"device: GPU, MegEngine device {mge.get_default_device()}")
        return run_training(cfg, restart)
    available = mge.device.get_device_count("gpu")
    if gpus > available:
        raise MegfbError(f"--gpus {gpus} asks for more GPUs than this machine has ({available})")
    if cfg["data"]["batch_size"] % gpus:
        raise MegfbError(f"config key 'data.batch_size' ({cfg['data']['batch_size']}) "
                         f"must be divisible by --gpus {gpus}")
    # One process per GPU; gradients are averaged by the GradManager's all-reduce callback.
    print(f"device: gpu0..gpu{gpus - 1} ({gpus} GPUs, one process each, data-parallel)")
    return dist.launcher(run_training, n_gpus=gpus)(cfg, restart)[0]


def run_training(cfg, restart=False, cpu_devices=None):
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_distributed() else (0, 1)
    main = rank == 0
    lock = RunLock(os.path.join(cfg["out_dir"], cfg["name"]))
    try:
        return _run_training(cfg, restart, rank, world, main, lock, cpu_devices)
    finally:
        lock.release()


def _run_training(cfg, restart, rank, world, main, lock, cpu_devices=None):
    t_start = time.time()
    run_dir = os.path.join(cfg["out_dir"], cfg["name"])
    latest_path, best_path = os.path.join(run_dir, "latest.mge"), os.path.join(run_dir, "best.mge")
    log_path, curves_path = os.path.join(run_dir, "log.jsonl"), os.path.join(run_dir, "curves.png")
    tcfg, iterations = cfg["train"], int(cfg["train"]["iterations"])

    paths = training_paths(cfg["data"])
    from .data import check_split, data_fingerprint, split_indices
    from .io import read_pair

    noisy, clean = read_pair(*paths)
    check_split(len(noisy), cfg["data"]["val_fraction"], paths[0], "data.val_fraction")
    fingerprint = data_fingerprint(*paths)
    resolved = dict(cfg, model=resolve_model_config(cfg["model"]))
    if main and os.path.isdir(run_dir):
        lock.acquire()  # before reading the run's state: a second trainer stops here

    resume, changes = None, {}
    if os.path.exists(latest_path) and not restart:
        resume = load_checkpoint(latest_path, resume_hint=True)
        if not is_trainer_checkpoint(resume):
            raise MegfbError(f"{latest_path} is not a trainer checkpoint; rerun with --restart to start over")
        split = resume.get("split") or {}
        top = max([int(np.max(split[k])) for k in ("train_idx", "val_idx") if len(split.get(k, ())) > 0] or [-1])
        old_data = resume.get("data")
        if old_data is None and top >= len(noisy):  # a checkpoint from before fingerprints
            old_data = {os.path.basename(paths[0]): f"at least {top + 1} patches"}
        changes = check_resume(resolved, resume["config"], run_dir, fingerprint, old_data)
    if resume is not None:
        stats, split = resume["stats"], resume["split"]
        train_idx, val_idx = np.asarray(split["train_idx"]), np.asarray(split["val_idx"])
    else:
        stats = standardisation_stats(cfg["data"], paths)
        d = cfg["data"]
        train_idx, val_idx = split_indices(len(noisy), d["val_fraction"], d["split_seed"])
        if d["train_on_all"]:
            train_idx = np.arange(len(noisy))  # the final recipe; validation is then optimistic
        split = {"val_fraction": d["val_fraction"], "seed": d["split_seed"], "train_on_all": d["train_on_all"],
                 "train_idx": np.asarray(train_idx), "val_idx": np.asarray(val_idx)}
    val_sel = validation_patches(val_idx, cfg["data"]["val_patches"])
    from .io import read_patches

    val_noisy, val_clean = read_patches(paths[0], val_sel), read_patches(paths[1], val_sel)

    mge.random.seed(cfg["seed"])
    np.random.seed(cfg["seed"])
    model = build_model(cfg["model"], stats["mean"], stats["std"])
    if resume is None and tcfg["init_from"]:
        init = initialise_from(model, tcfg["init_from"], tcfg["init_strict"], tcfg["init_from_sha256"])
        # the network keeps the constants it was trained with (first forward = loaded model's)
        stats = dict(stats, mean=model.mean.numpy().ravel().tolist(), std=model.std.numpy().ravel().tolist())
        resolved = dict(resolved, train=dict(tcfg, init_from_sha256=init["sha256"]))
        print(f"initialised from {init['path']} ({init['weights']} weights, sha256 {init['sha256'][:12]})"
              + (f"; not loaded: {', '.join(init['skipped'])}" if init["skipped"] else ""))
    elif resume is not None and tcfg["init_from"]:  # a resumed fine-tune keeps its record
        recorded = resume["config"]["train"].get("init_from_sha256")
        resolved = dict(resolved, train=dict(tcfg, init_from_sha256=recorded))
    opt = make_optimizer(cfg["optim"], model.parameters())
    gm = GradManager().attach(model.parameters(),
                              callbacks=[dist.make_allreduce_cb("mean")] if world > 1 else None)
    ema_on = tcfg["ema_decay"] is not None
    ema = {k: v.copy() for k, v in model.state_dict().items()} if ema_on else None
    it = 0
    val = {"identity_score": None, "identity_psnr": None, "best_score": -math.inf, "best_iteration": None}

    if resume is not None:
        ema, it = restore(resume, model, opt, ema_on, latest_path)
        val.update(resume.get("val") or {})
        if main:
            print(f"resuming from {latest_path} at iteration {it}")
    elif world > 1:
        dist.bcast_list_(list(model.parameters()))
    if resume is not None and it > iterations:
        raise MegfbError(f"{latest_path} is at iteration {it}, past train.iterations={iterations}; "
                         "raise train.iterations or rerun with --restart")

    split_step = None
    if cpu_devices is not None and len(cpu_devices) > 1:
        from .split import SplitStep

        split_step = SplitStep(model, cpu_devices)  # after the weights are loaded: replicas copy them
        gm = split_step.gm

    records = []
    if main:
        lock.acquire()  # creates the run folder: every check above has passed
        if restart:
            for path in (latest_path, best_path, log_path, curves_path):
                if os.path.lexists(path) and not os.path.isdir(path):
                    os.remove(path)
        # config.yaml always describes what runs now (a resumed run differs only in SAFE_ON_RESUME keys)
        with atomic_output(os.path.join(run_dir, "config.yaml")) as tmp, open(tmp, "w") as f:
            f.write(dump_config(resolved))
        records = read_log(log_path, it)
        if changes:
            text = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changes.items())
            print(f"resumed with changed settings that do not change what is learned: {text}")
            rec = {"iteration": it, "resumed_with": {k: [old, new] for k, (old, new) in changes.items()}}
            records.append(rec)
            with open(log_path, "a") as f:
                f.write(_json_line(rec))
        n_params = count_parameters(model)
        print(f"run {run_dir}: {resolved['model']['name']} with {n_params:,} parameters, "
              f"{len(train_idx)} training / {len(val_sel)} validation patches, {iterations} iterations")
        # the floor to beat, on exactly the patches scored below (cheap: numpy on uint16)
        val["identity_score"], val["identity_psnr"] = score(val_noisy, val_clean)
        if not math.isfinite(val["identity_score"]):
            print(f"note: the identity score of the {len(val_sel)} validation patches is {val['identity_score']}: "
                  "their noisy input equals the clean target (noise-free or constant data), so "
                  "validation scores cannot rank checkpoints")

    def payload():
        return {
            "megfb": __version__, "config": resolved, "model": model.state_dict(), "ema": ema,
            "optimizer": opt.state_dict(), "iteration": it, "rng": _rng_state(cfg["seed"]),
            "split": split, "stats": stats, "val": dict(val), "data": fingerprint,
        }

    def save(path):
        ckpt = payload()
        for key in ("model", "ema"):
            if ckpt[key] is not None and not weights_finite(ckpt[key]):
                raise MegfbError(f"the {key} weights hold NaN/inf at iteration {it}; not saving {path} "
                                 f"({_last_good(latest_path)})")
        save_checkpoint(ckpt, path)

    def validate():
        """Score EMA (when on) and raw weights (KeyboardInterrupt at once on a stop request)."""
        results = {}
        eval_sets = [("raw", model)]
        if ema_on:
            ema_model = build_model(resolved["model"], stats["mean"], stats["std"])
            ema_model.load_state_dict(ema, strict=True)
            eval_sets.insert(0, ("ema", ema_model))
        preds = None
        for label, m in eval_sets:
            pred = predict_mosaics(m, val_noisy, progress=False, stop=lambda: stop.requested)
            results[label] = score(pred, val_clean)
            preds = pred if preds is None else preds
        main_label = "ema" if ema_on else "raw"
        val.update(score=results[main_label][0], psnr=results[main_label][1], iteration=it, weights=main_label)
        rec = {"iteration": it, "wall_s": round(time.time() - t_start, 1), "val_score": val["score"], "val_psnr": val["psnr"],
               "identity_score": val["identity_score"], "weights": main_label}
        if ema_on:
            rec.update(val_score_raw=results["raw"][0], val_psnr_raw=results["raw"][1])
        best = math.isfinite(val["score"]) and val["score"] > val["best_score"]
        if best:
            val.update(best_score=val["score"], best_iteration=it)
        records.append(rec)
        log_file.write(_json_line(rec))
        log_file.flush()
        if best:
            save(best_path)
        save(latest_path)
        from .preview import curves_image, write_png

        crops = preview_crops(val_noisy, preds, val_clean, tcfg["preview_crops"])
        black = stats.get("black_level") or 4096 / 65535
        write_png(curves_path, curves_image(records, val["identity_score"], crops, black_level=black))
        tqdm.write(f"iteration {it}: val score {val['score']:.4f} ({main_label} weights"
                   + (f"; raw {results['raw'][0]:.4f}" if ema_on else "")
                   + f"), PSNR {val['psnr']:.2f} dB; identity {val['identity_score']:.4f}; "
                   + (f"best {val['best_score']:.4f} at {val['best_iteration']}" if val["best_iteration"] is not None
                      else "no finite score yet, so no best.mge"))

    loss_cfg, grad_clip = cfg["loss"], cfg["optim"]["grad_clip"]
    log_every, val_every, ckpt_every = (int(tcfg[k]) for k in ("log_every", "val_every", "ckpt_every"))
    phase, batches, acc = None, None, {"loss": 0.0, "steps": None, "n": 0, "t": time.time()}
    log_file = open(log_path, "a") if main else open(os.devnull, "w")
    pbar = tqdm(total=iterations, initial=it, disable=not main, dynamic_ncols=True, desc=cfg["name"], unit="it")
    with Interrupts() as stop:
        try:
            while it < iterations:
                if data_phase(cfg, it) != phase:
                    phase = data_phase(cfg, it)
                    batches = iter(train_batches(paths, train_idx, cfg, phase[0], phase[1], it, rank, world))
                noisy_b, clean_b = next(batches)
                lr = learning_rate(cfg["schedule"], cfg["optim"]["lr"], it, iterations)
                for group in opt.param_groups:
                    group["lr"] = lr

                stop.in_step = True
                if split_step is not None:
                    loss, per_step = split_step(noisy_b, clean_b, lambda out, gt: supervised_loss(out, gt, loss_cfg))
                else:
                    with gm:
                        outputs = model(mge.tensor(noisy_b))
                        loss, per_step = supervised_loss(outputs, mge.tensor(clean_b), loss_cfg)
                        gm.backward(loss)
                loss_value = float(loss.item())
                if not math.isfinite(loss_value):
                    opt.clear_grad()
                    raise MegfbError(
                        f"the loss is {loss_value} at iteration {it + 1}; training stopped, "
                        f"{_last_good(latest_path)} (lower optim.lr or set optim.grad_clip)"
                    )
                if grad_clip:
                    clip_grad_norm(model.parameters(), float(grad_clip))
                opt.step()
                opt.clear_grad()
                if split_step is not None:
                    split_step.sync_weights()
                it += 1
                if ema_on:
                    update_ema(ema, model.state_dict(), ema_decay_at(float(tcfg["ema_decay"]), it - 1))

                steps = [float(s.item()) for s in per_step]
                acc["loss"] += loss_value
                acc["steps"] = steps if acc["steps"] is None else [a + s for a, s in zip(acc["steps"], steps)]
                acc["n"] += 1
                pbar.update(1)
                if it % log_every == 0 or it == iterations:
                    now = time.time()
                    rec = {"iteration": it, "loss": acc["loss"] / acc["n"],
                           "loss_steps": [s / acc["n"] for s in acc["steps"]], "lr": lr,
                           "it_s": acc["n"] / max(now - acc["t"], 1e-9), "crop": phase[0], "batch_size": phase[1]}
                    records.append(rec)
                    log_file.write(_json_line(rec))
                    log_file.flush()
                    pbar.set_postfix(loss=f"{rec['loss']:.3e}", lr=f"{lr:.2e}")
                    acc = {"loss": 0.0, "steps": None, "n": 0, "t": now}
                stop.in_step = False  # the iteration and its log line are complete: a safe place to stop
                if main and (it % val_every == 0 or it == iterations):
                    validate()
                elif main and it % ckpt_every == 0:
                    save(latest_path)
                if stop.requested:
                    raise KeyboardInterrupt
        except KeyboardInterrupt:
            pbar.close()
            if main and not stop.in_step:
                save(latest_path)
                print(f"interrupted: saved {latest_path} at iteration {it}; rerun the same command to resume")
            elif main and os.path.isfile(latest_path):
                print(f"interrupted mid-step: kept the previous {latest_path}; rerun the same command to resume")
            elif main:
                print(f"interrupted mid-step before the first checkpoint: nothing saved in {run_dir}; "
                      "rerun the same command to start again")
            raise
        finally:
            pbar.close()
            log_file.close()
            del batches
    if not main:
        return None  # only rank 0 validates and keeps the figures
    summary = {
        "run_dir": run_dir, "iterations": it, "best_score": val["best_score"], "best_iteration": val["best_iteration"],
        "identity_score": val["identity_score"], "last_score": val.get("score"), "last_psnr": val.get("psnr"),
        "gain": val["best_score"] - val["identity_score"], "wall_s": time.time() - t_start,
    }
    if summary["best_iteration"] is None or not os.path.isfile(best_path):
        print(f"no finite validation score (last {summary['last_score']}, identity {summary['identity_score']}): "
              f"no best.mge was written; latest.mge in {run_dir}/, curves in {curves_path}")
        return summary
    print(f"best validation score {summary['best_score']:.4f} (iteration {summary['best_iteration']}) vs "
          f"identity {summary['identity_score']:.4f}: gain {summary['gain']:+.4f}; "
          f"checkpoints in {run_dir}/ (best.mge, latest.mge), curves in {curves_path}")
    return summary


def _last_good(latest_path):
    """What is left to resume from, said as it is."""
    if os.path.isfile(latest_path):
        return f"the last good checkpoint {latest_path} is intact"
    return f"no checkpoint was written yet ({latest_path} does not exist)"


def restore(ckpt, model, opt, ema_on, source):
    """Load a trainer checkpoint's weights, optimizer state and RNG state; returns (ema, iteration)."""
    load_weights(model, ckpt["model"], source)
    try:
        opt.load_state_dict(ckpt["optimizer"])
    except (ValueError, KeyError) as exc:
        raise MegfbError(f"checkpoint {source}: optimizer state does not fit this model/optimizer ({exc}); "
                         "rerun with --restart") from None
    ema = None
    if ema_on:  # a run that turns EMA on mid-way starts the average from the current weights
        ema = {k: np.array(v) for k, v in (ckpt.get("ema") or model.state_dict()).items()}
    _restore_rng(ckpt.get("rng"))
    return ema, int(ckpt["iteration"])


def _rng_state(seed):
    from megengine.random import rng as mge_rng

    state = {"seed": seed, "numpy": np.random.get_state()}
    if getattr(mge_rng, "_rng", None) is not None:
        state["megengine"] = mge_rng._rng.state  # the MT19937 that seeds data-loader workers
    return state


def _restore_rng(state):
    if not state:
        return
    from megengine.random import rng as mge_rng

    if state.get("numpy") is not None:
        np.random.set_state(state["numpy"])
    if state.get("megengine") is not None and getattr(mge_rng, "_rng", None) is not None:
        mge_rng._rng.state = state["megengine"]
