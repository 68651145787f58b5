"""`megfb eval`: score a checkpoint on its own validation split and the synthetic test targets.

Predictions go through the project's one prediction path (megfb.infer.predict_mosaics), so
they are rounded to uint16 exactly as a submission would be and scored with the contest
formula, next to the identity (noisy input) score. The trainer's validation uses the same
path on the same patches, so its logged score is what `megfb eval --patches N` prints.
"""
import os

import numpy as np

from .checkpoint import describe, load_model
from .errors import MegfbError
from .infer import predict_mosaics
from .io import contest_paths, read_pair, read_patches
from .metrics import contest_score, psnr


def validation_split(info, cfg, n):
    """(val_idx, where it came from) - the checkpoint's own split when it has one."""
    from .data import load_stats, split_indices

    split = info.get("split")
    if split is not None and split.get("val_idx") is not None:
        return np.asarray(split["val_idx"], dtype=np.int64), "the checkpoint's own split"
    fraction, seed, source = 0.1, 0, "the default 9:1 split, seed 0"
    stats_path = os.path.join(cfg["data"]["dir"], cfg["data"]["stats"])
    if os.path.isfile(stats_path):
        recorded = load_stats(stats_path)["split"]
        fraction, seed = float(recorded["val_fraction"]), int(recorded["seed"])
        source = f"the split recorded in {stats_path} (val_fraction {fraction}, seed {seed})"
    return np.asarray(split_indices(n, fraction, seed)[1], dtype=np.int64), source


def validation_patches(val_idx, limit=None):
    """The validation patches scored: the first `limit` of the split, in file order (the
    trainer's data.val_patches cap takes these same patches)."""
    return np.sort(np.asarray(val_idx, dtype=np.int64)[:limit])


def score_rows(model, noisy, clean, batch_size=None, tta=False, engine=None):
    pred = predict_mosaics(model, noisy, batch_size, tta, engine=engine)
    clean = np.asarray(clean)
    return {"model": (contest_score(pred, clean), psnr(pred, clean)),
            "identity": (contest_score(np.asarray(noisy), clean), psnr(np.asarray(noisy), clean))}


def cmd_eval(args):
    limit = args.patches
    path, model, info = load_model(args.ckpt, args.config)
    cfg = info["config"]
    print(f"checkpoint {describe(path, info)}")
    data = cfg["data"]
    train_in = os.path.join(data["dir"], data["train_input"])
    train_gt = os.path.join(data["dir"], data["train_gt"])
    results = []
    if os.path.isfile(train_in) and os.path.isfile(train_gt):
        noisy, clean = read_pair(train_in, train_gt)
        val_idx, source = validation_split(info, cfg, len(noisy))
        note = " (trained on all data: optimistic)" if data.get("train_on_all") else ""
        idx = validation_patches(val_idx, limit)
        part = f"the first {len(idx)} of " if len(idx) < len(val_idx) else ""
        print(f"validation: {part}{len(val_idx)} patches of {train_in}, {source}{note}")
        results.append(("validation", score_rows(model, read_patches(train_in, idx), read_patches(train_gt, idx),
                                                 args.batch_size, args.tta, getattr(args, "engine", None))))
    else:
        print(f"validation: skipped, {train_in} / {train_gt} not found")
    test = contest_paths(data["dir"])
    if os.path.isfile(test["test_input"]) and os.path.isfile(test["test_gt"]):
        noisy, clean = read_pair(test["test_input"], test["test_gt"])
        part = f"the first {min(limit, len(noisy))} of " if limit is not None and limit < len(noisy) else ""
        print(f"synthetic test: {part}{len(noisy)} patches of {test['test_input']}")
        # copies, read now: a memmap read after minutes of prediction would end the process
        # with SIGBUS if the file had been truncated meanwhile
        noisy, clean = np.array(noisy[:limit]), np.array(clean[:limit])
        results.append(("synthetic test", score_rows(model, noisy, clean, args.batch_size, args.tta,
                                                     getattr(args, "engine", None))))
    if not results:
        raise MegfbError(f"nothing to score: no training pair or synthetic test targets in {data['dir']}/")
    print(f"\n{'set':<16}{'what':<12}{'score':>9}{'PSNR dB':>10}")
    tag = "model+TTA" if args.tta else "model"
    for name, rows in results:
        for key, label in (("model", tag), ("identity", "identity")):
            score, db = rows[key]
            print(f"{name:<16}{label:<12}{score:>9.4f}{db:>10.2f}")
            name = ""
    return 0
