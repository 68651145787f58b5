"""`megfb` command line: parse, call the module that does the work, print.

Every subcommand's handler lives beside the code it drives (`cmd_*` functions); modules are
imported only when their command runs, so `--help` stays fast. Value checks that need no
files (positive counts, fractions) happen here, while parsing, with argparse's one-line error.
"""
import argparse
import errno
import importlib
import signal
import sys

from . import __version__
from .errors import MegfbError


class _Formatter(argparse.HelpFormatter):
    """Appends "(default: X)" - or "(required)" - to every option that takes a value and does not
    say it already."""

    def _get_help_string(self, action):
        text = action.help or ""
        if not action.option_strings or action.nargs == 0 or "default" in text:
            return text
        return text + (" (required)" if action.required else " (default: %(default)s)")


class _Parser(argparse.ArgumentParser):
    """argparse prints the whole usage block on an error; one line is enough."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _checked(cast, ok, rule):
    """An argparse type: `cast` the text, then one line unless ok(value)."""
    kind = "a whole number" if cast is int else "a number"

    def parse(text):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {value}")
        return value

    return parse


positive_int = _checked(int, lambda v: v >= 1, "at least 1")
non_negative_int = _checked(int, lambda v: v >= 0, "at least 0")
fraction = _checked(float, lambda v: 0.0 < v < 1.0, "between 0 and 1 (exclusive)")
share = _checked(float, lambda v: 0.0 <= v <= 1.0, "between 0 and 1")


def black_levels(text):
    from .raw import parse_black

    try:
        return parse_black(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _handler(module, func):
    def run(args):
        return getattr(importlib.import_module(f"megfb.{module}"), func)(args)

    return run


def _add_model_source(p, required=False):
    p.add_argument("--ckpt", required=required, metavar="PATH",
                   help="a trainer checkpoint or a plain published-layout state dict"
                   + ("" if required else " (default: best.mge of the newest run under runs/)"))
    p.add_argument("--config", metavar="YAML",
                   help="model config for a plain state dict (default: the architecture "
                   "recognised from its keys, FBRestormer otherwise); refused with a trainer "
                   "checkpoint, which carries its own")


def _add_prediction(p):
    p.add_argument("--batch-size", type=positive_int, default=None, metavar="B",
                   help="patches per forward pass (default: 1 on CPU, where one patch at a time "
                   "is fastest, 8 on a GPU)")
    p.add_argument("--tta", nargs="?", const=True, default=False, choices=("cfa", "mosaic"),
                   metavar="KIND",
                   help="self-ensemble over 8 flips: alone, the model's own (the 2nd place's "
                   "8 flips/transposes of the mosaic, the CFA-preserving flips/rotations for the "
                   "others); or name it: cfa | mosaic (default: off)")
    p.add_argument("--engine", choices=("mge", "lite"), default=None,
                   help="mge: the model's eager MegEngine forward; lite: its dumped graph in one "
                   "MegEngine Lite network per core, patches in parallel (same outputs) (default: "
                   "lite on CPU, mge on a GPU)")


def build_parser():
    parser = _Parser(prog="megfb", description="FBRestormer raw denoising: data, training, scoring, submission.")
    parser.add_argument("--version", action="version", version=f"megfb {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    data = sub.add_parser("data", help="contest data: synthetic default set, statistics")
    dsub = data.add_subparsers(dest="data_command", metavar="ACTION", parser_class=_Parser)
    dsub.required = True
    p = dsub.add_parser("synth", help="generate contest-format synthetic pairs when data/ has no contest files")
    p.add_argument("--data-dir", default="data", metavar="DIR", help="where the files go")
    p.add_argument("--train", type=positive_int, default=2048, metavar="N", help="training pairs")
    p.add_argument("--test", type=positive_int, default=256, metavar="N", help="test patches")
    p.add_argument("--seed", type=non_negative_int, default=0, help="the data are a pure function of it")
    p.add_argument("--force", action="store_true", help="regenerate an existing synthetic set (never real files)")
    p.add_argument("--photos", action="append", metavar="DIR",
                   help="a folder of your own 8/16-bit sRGB PNG/JPEG/TIFF/BMP photographs as the clean "
                   "content, split by file between the training and test files; repeatable "
                   "(default: the photographs shipped inside scikit-image)")
    p.add_argument("--procedural", type=share, default=None, metavar="F",
                   help="share of procedural scenes among the patches (default: 0.4)")
    p.add_argument("--noise-profile", action="append", metavar="A,B|FILE.dng|iso:N",
                   help="a given camera's noise instead of the built-in phone calibration: per-channel "
                   "variance = A*x + B on the [0,1] scale, or a DNG's NoiseProfile tag, or the phone "
                   "calibration at one ISO; repeatable, one drawn per patch (default: phone, ISO 800-6400)")
    p.set_defaults(func=_handler("synth", "cmd_synth"))
    p = dsub.add_parser("stats", help="black level, per-channel mean/std, identity score; writes data/stats.yaml")
    p.add_argument("--data-dir", default="data", metavar="DIR", help="folder holding the training pair")
    p.add_argument("--val-fraction", type=float, default=0.1, metavar="F",
                   help="held-out share of the pairs, in (0, 1); statistics use the rest (the rule "
                   "`train` applies to data.val_fraction)")
    p.add_argument("--split-seed", type=non_negative_int, default=0, metavar="S", help="seed of the split")
    p.add_argument("--out", default=None, metavar="YAML", help="output file (default: DATA_DIR/stats.yaml)")
    p.add_argument("--force", action="store_true",
                   help="replace an existing --out file that is not a statistics file megfb wrote")
    p.set_defaults(func=_handler("data", "cmd_stats"))

    p = sub.add_parser("train", help="train from a YAML config; rerunning resumes from `latest`")
    p.add_argument("--config", default="configs/quickstart.yaml", metavar="YAML", help="experiment config")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted config overrides, e.g. train.iterations=500")
    p.add_argument("--gpus", type=positive_int, default=1, metavar="N",
                   help="data-parallel GPUs (ignored on a machine without a GPU)")
    p.add_argument("--restart", action="store_true",
                   help="start the run over: remove its checkpoints, log and curves (nothing else)")
    p.add_argument("--check-config", action="store_true",
                   help="only resolve and validate the config (every key's type and range), then exit")
    p.set_defaults(func=_handler("train", "cmd_train"))

    p = sub.add_parser("eval", help="score a checkpoint on its validation split (and synthetic test targets)")
    _add_model_source(p)
    _add_prediction(p)
    p.add_argument("--patches", type=positive_int, default=None, metavar="N",
                   help="score only the first N patches of each set; the trainer's data.val_patches "
                   "cap takes the same validation patches (default: all)")
    p.set_defaults(func=_handler("evaluate", "cmd_eval"))

    p = sub.add_parser("predict", help="run a checkpoint over a contest-format input .bin")
    _add_model_source(p, required=True)
    _add_prediction(p)
    p.add_argument("--input", required=True, metavar="IN.bin", help="contest-format noisy patches")
    p.add_argument("--output", required=True, metavar="OUT.bin", help="where the predictions go")
    p.add_argument("--force", action="store_true", help="replace an existing --output file (never an input)")
    p.set_defaults(func=_handler("infer", "cmd_predict"))

    p = sub.add_parser("denoise", help="denoise raw photographs of any size: camera raw (DNG, CR2, NEF, ARW, ...), "
                       "16-bit TIFF/PNG or .npy mosaics, contest .bin files")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="files to denoise (all are checked before any is written)")
    p.add_argument("-o", "--out-dir", default="denoised", metavar="DIR",
                   help="where <name>.denoised.tif (+ .dng for a DNG, .npy with --npy) and <name>.preview.png go")
    _add_model_source(p, required=True)
    _add_prediction(p)
    from .denoise import DENOISE_OVERLAP, DENOISE_TILE
    p.add_argument("--tile", type=positive_int, default=DENOISE_TILE, metavar="PX",
                   help="tile side in mosaic pixels (even; memory grows with its square)")
    p.add_argument("--overlap", type=non_negative_int, default=DENOISE_OVERLAP, metavar="PX",
                   help="mosaic pixels shared by neighbouring tiles, blended with a raised cosine (even)")
    p.add_argument("--pattern", choices=("RGGB", "BGGR", "GRBG", "GBRG"), default=None,
                   help="Bayer pattern of a plain TIFF/PNG/.npy mosaic's top-left 2x2 cell (default: none, required for those)")
    p.add_argument("--black", type=black_levels, default=None, metavar="N[,N,N,N]",
                   help="black level of a plain mosaic: one value or four, the 2x2 cell in raster order "
                   "(default: 0; overrides a camera raw file's own)")
    p.add_argument("--white", type=positive_int, default=None, metavar="N",
                   help="white (saturation) level of a plain mosaic (default: 65535; overrides a camera raw file's own)")
    p.add_argument("--npy", action="store_true", help="also write the denoised mosaic as .npy")
    p.add_argument("--no-preview", action="store_true", help="skip the before/after preview PNG")
    p.add_argument("--force", action="store_true", help="replace outputs that already exist")
    p.set_defaults(func=_handler("denoise", "cmd_denoise"))

    p = sub.add_parser("score", help="contest score and PSNR of a prediction .bin against a ground-truth .bin")
    p.add_argument("pred", metavar="PRED.bin", help="predictions, contest format")
    p.add_argument("gt", metavar="GT.bin", help="ground truth, contest format, same patch count")
    p.set_defaults(func=_handler("metrics", "cmd_score"))

    p = sub.add_parser("params", help="parameters, FLOPs, activations, memory, time; fails over 100,000 parameters")
    p.add_argument("--ckpt", metavar="PATH", help="checkpoint to report on (default: a freshly built model)")
    p.add_argument("--config", metavar="YAML",
                   help="model config (default: the FBRestormer defaults; with --ckpt: the architecture "
                   "of a plain state dict)")
    p.add_argument("--no-timing", action="store_true", help="skip the per-patch timing")
    p.set_defaults(func=_handler("costs", "cmd_params"))

    p = sub.add_parser("submit", help="predict the test input and pack the contest zip")
    _add_model_source(p)
    _add_prediction(p)
    p.add_argument("--input", default="data/competition_test_input.0.2.bin", metavar="IN.bin",
                   help="contest test input")
    p.add_argument("--out", default="submit", metavar="DIR", help="folder the zip is written to")
    p.set_defaults(func=_handler("submit", "cmd_submit"))

    p = sub.add_parser("bench", help="plain vs fast paths side by side; writes bench.json")
    p.add_argument("--repeats", type=positive_int, default=5, metavar="N", help="timed runs per fast case")
    p.add_argument("--quick", action="store_true", help="small sizes and few repeats (smoke run)")
    p.add_argument("--config", metavar="YAML",
                   help="the model to bench, from a config's model section, e.g. "
                   "configs/podium/recurrent_mobilenet.yaml (default: FBRestormer; the plain 2nd "
                   "place takes minutes per batch: use --quick)")
    p.add_argument("--out", default="bench.json", metavar="JSON", help="where the figures are written")
    p.set_defaults(func=_handler("bench", "cmd_bench"))

    p = sub.add_parser("clean", help="remove what the project generated (never contest files, "
                       "submissions or files it does not know)")
    p.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    p.add_argument("--root", default=".", metavar="DIR", help="the project folder")
    p.set_defaults(func=_handler("clean", "cmd_clean"))

    p = sub.add_parser("compare", help="the MegCup 2022 podium and baseline side by side: params, MACs, "
                       "memory, time plain/fast, score; writes JSON and a PNG chart")
    p.add_argument("--ckpt", action="append", metavar="PATH",
                   help="a podium model's checkpoint (architecture recognised from the file); "
                   "repeatable; rows without one are timed with untrained weights")
    p.add_argument("--data", metavar="DIR", help="score the checkpoints on DIR's test input and "
                   "synthetic test targets (default: no scores)")
    p.add_argument("--patches", type=positive_int, default=8, metavar="N", help="patches scored")
    p.add_argument("--size", type=positive_int, default=256, metavar="PX",
                   help="raw side of the patches timed (costs are always per 256x256 patch)")
    p.add_argument("--repeats", type=positive_int, default=3, metavar="N",
                   help="timed runs of the fast path (the plain path: 1, after a warm-up)")
    p.add_argument("--quick", action="store_true",
                   help="time 64x64 patches once each (the plain 2nd place takes ~1 min per 256x256 patch)")
    p.add_argument("--out", default="compare.json", metavar="JSON", help="where the figures are written")
    p.add_argument("--chart", default="compare.png", metavar="PNG", help="where the chart is drawn")
    p.set_defaults(func=_handler("compare", "cmd_compare"))
    return parser


def _terminate(signum, frame):
    raise KeyboardInterrupt


def _os_error_line(exc):
    """One line for an OSError that reached the top: what failed, on which file."""
    name = exc.filename if exc.filename is not None else ""
    reason = exc.strerror or str(exc)
    if exc.errno == errno.ENOSPC:
        reason += " (free some space and rerun; nothing half-written was kept)"
    return f"{name}: {reason}" if name else reason


def main(argv=None):
    args = build_parser().parse_args(argv)
    # SIGTERM (kill, a batch system's time limit) is handled like Ctrl-C: every command's
    # clean-up runs (temporaries removed, the trainer saves latest.mge) and the exit code is
    # 130 for both, the code the trainer has always documented.
    previous = None
    if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        try:
            previous = signal.signal(signal.SIGTERM, _terminate)
        except ValueError:  # not the main thread (an embedding program)
            previous = None
    try:
        code = args.func(args)
    except MegfbError as exc:
        print(f"megfb: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("megfb: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # disk full, read-only folder, unreadable file, a folder for a file
        print(f"megfb: error: {_os_error_line(exc)}", file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
