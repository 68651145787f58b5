"""`megfb submit`: the contest zip.

Refuses a model over the 100,000-parameter limit before any inference, validates the test
input, predicts it through the project's one prediction path, exports the traced inference
graph (megfb/graph.py) and checks it against the eager model, then zips result.bin +
model.mge + manifest.json and re-checks every member before the zip gets its final name.
"""
import datetime
import json
import os
import zipfile

import numpy as np

from . import PARAM_LIMIT, __version__
from .atomic import atomic_new_file, check_folder, temporary_directory
from .checkpoint import describe, load_model, run_name
from .costs import graph_costs
from .errors import MegfbError
from .graph import (GRAPH_INPUT, GRAPH_TOLERANCE, PATCH_SHAPE, DumpedGraph, check_graph,
                    export_graph)
from .infer import ensemble_of, predict_mosaics
from .io import PATCH, load_bin, mosaic_to_packed, sha256_file, sha256_stream
from .model import check_param_limit

MEMBERS = ("result.bin", "model.mge", "manifest.json")


def validate_zip(path, n_patches, expected_graph_output=None, probe=None):
    """Re-open the written zip and check every member; returns {member: size}."""
    members = MEMBERS
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
            if bad is not None:
                raise MegfbError(f"zip {path}: member {bad} fails its CRC check")
            names = z.namelist()
            if sorted(names) != sorted(members):
                raise MegfbError(f"zip {path} holds {names}, expected {list(members)}")
            sizes = {m: z.getinfo(m).file_size for m in members}
            want = n_patches * PATCH * PATCH * 2
            if sizes["result.bin"] != want:
                raise MegfbError(f"zip {path}: result.bin is {sizes['result.bin']} bytes, expected {want}")
            try:
                manifest = json.loads(z.read("manifest.json"))
            except ValueError:
                raise MegfbError(f"zip {path}: manifest.json is not valid JSON") from None
            with z.open("result.bin") as f:
                result_sha256 = sha256_stream(f)
            if manifest.get("result_sha256") != result_sha256:
                raise MegfbError(f"zip {path}: manifest.json's result_sha256 does not match result.bin")
            graph = DumpedGraph(z.read("model.mge"))
    except zipfile.BadZipFile:
        raise MegfbError(f"zip {path} cannot be re-opened as a zip file") from None
    if probe is not None:
        diff = float(np.abs(graph(probe) - expected_graph_output).max())
        if diff > GRAPH_TOLERANCE:
            raise MegfbError(f"zip {path}: model.mge gives outputs {diff:.2e} away from the eager model")
    return sizes


def cmd_submit(args):
    import megengine as mge

    path, model, info = load_model(args.ckpt, args.config)
    n_params = check_param_limit(model)  # the contest rule, before any inference
    # read once, not memory-mapped: the graph check reads patches again minutes later, and a
    # memmap of a file truncated meanwhile would end the process with SIGBUS
    noisy = load_bin(args.input)
    if not os.path.exists(args.out):  # the destination folder is made, inside an existing one
        check_folder(os.path.dirname(os.path.abspath(args.out)), "--out parent folder")
        os.makedirs(args.out)
    check_folder(args.out, "--out folder")  # before minutes of prediction and graph export
    name = run_name(path, info)
    print(f"checkpoint {describe(path, info)}: {n_params:,} trainable parameters")
    tta = ensemble_of(model, args.tta)
    print(f"input {args.input}: {len(noisy)} patches; predicting{f' with TTA ({tta})' if tta else ''}")
    result = predict_mosaics(model, noisy, args.batch_size, args.tta, engine=getattr(args, "engine", None))

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    zip_path = os.path.join(args.out, f"{name}-{stamp}.zip")
    with temporary_directory("submit") as tmp:
        result_path = os.path.join(tmp, "result.bin")
        np.ascontiguousarray(result, dtype="<u2").tofile(result_path)
        graph_path = os.path.join(tmp, "model.mge")
        export_graph(model, graph_path)
        graph = DumpedGraph(graph_path)
        probe = mosaic_to_packed(noisy[:3])
        diff = check_graph(graph, model, probe)
        if diff > GRAPH_TOLERANCE:
            raise MegfbError(f"the dumped graph differs from the eager model by {diff:.2e} (> {GRAPH_TOLERANCE})")
        costs = graph_costs(graph_path)
        val = info.get("val") or {}
        score = val.get("best_score", val.get("score")) if isinstance(val, dict) else None
        score = float(score) if score is not None and np.isfinite(score) else None
        manifest = {
            "run": name,
            "checkpoint": os.path.abspath(path),
            "checkpoint_kind": info["kind"],
            "checkpoint_sha256": sha256_file(path),
            "weights": info["weights"],
            "iteration": info.get("iteration"),
            "trainable_parameters": n_params,
            "param_limit": PARAM_LIMIT,
            "macs_per_patch": costs["macs"],
            "flops_per_patch": costs["flops"],
            "graph_input": {"name": GRAPH_INPUT, "shape": list(PATCH_SHAPE),
                            "scale": "packed Bayer (0,0),(0,1),(1,0),(1,1), uint16 / 65535"},
            "graph_max_abs_diff": diff,
            "graph_note": "one forward pass of the network, no self-ensemble"
            + ({"cfa": "; result.bin averages it over the 8 CFA-safe flips/rotations (TTA)",
                "mosaic": "; result.bin averages it over the 8 flips/transposes of the mosaic (TTA)",
                None: ""}[tta])
            + ("; result.bin truncates (the team's astype(uint16)) instead of rounding"
               if getattr(model, "output_rounding", "round") == "floor" else ""),
            "fast_paths": any(getattr(m, "fast", False) for m in model.modules()),
            "validation_score": score if info["kind"] == "trainer" else None,
            "validation": _jsonable(val) if info["kind"] == "trainer" else None,
            "tta": tta is not None,
            "tta_ensemble": tta,
            "input": os.path.abspath(args.input),
            "input_sha256": sha256_file(args.input),
            "result_sha256": sha256_file(result_path),
            "result_shape": list(result.shape),
            "result_dtype": "uint16 little-endian",
            "config": _jsonable(info["config"]),
            "megfb_version": __version__,
            "megengine_version": mge.__version__,
            "time": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        }
        manifest_path = os.path.join(tmp, "manifest.json")
        with open(manifest_path, "w") as f:
            json.dump(manifest, f, indent=2)
        expected = graph(probe[:1])
        # a new name, never an existing zip: two submits in the same second both keep theirs
        with atomic_new_file(zip_path) as new:
            with zipfile.ZipFile(new.tmp, "w", compression=zipfile.ZIP_DEFLATED) as z:
                for member in MEMBERS:
                    z.write(os.path.join(tmp, member), member)
            sizes = validate_zip(new.tmp, len(noisy), expected, probe[:1])
        zip_path = new.path
    print(f"wrote {zip_path} ({os.path.getsize(zip_path):,} bytes)")
    for member, size in sizes.items():
        print(f"  {member:<14}{size:>14,} bytes")
    return 0


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist() if obj.size <= 16 else f"<array {obj.shape}>"
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None  # JSON has no inf/nan (an unvalidated run's best score is -inf)
    return obj
