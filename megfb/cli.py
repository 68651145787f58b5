"""`megfb` command line: parse, call the module that does the work, print.

Every subcommand's handler lives beside the code it drives (`cmd_*` functions); modules are
imported only when their command runs, so `--help` stays fast. Value checks that need no
files (positive counts, fractions) happen here, while parsing, with argparse's one-line error.
"""
import argparse
import importlib
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


def positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def fraction(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (exclusive), got {value}")
    return value


def share(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value}")
    return value


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
                   help="model config for a plain state dict (default: the FBRestormer defaults)")


def _add_prediction(p):
    p.add_argument("--batch-size", type=positive_int, default=None, metavar="B",
                   help="patches per forward pass (default: 1 on CPU, where one patch at a time "
                   "is fastest, 8 on a GPU)")
    p.add_argument("--tta", action="store_true",
                   help="self-ensemble over the 8 CFA-preserving flips/rotations")


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
    p.add_argument("--val-fraction", type=fraction, default=0.1, metavar="F",
                   help="held-out share of the pairs (statistics use the rest)")
    p.add_argument("--split-seed", type=non_negative_int, default=0, metavar="S", help="seed of the split")
    p.add_argument("--out", default=None, metavar="YAML", help="output file (default: DATA_DIR/stats.yaml)")
    p.set_defaults(func=_handler("data", "cmd_stats"))

    p = sub.add_parser("train", help="train from a YAML config; rerunning resumes from `latest`")
    p.add_argument("--config", default="configs/quickstart.yaml", metavar="YAML", help="experiment config")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted config overrides, e.g. train.iterations=500")
    p.add_argument("--gpus", type=positive_int, default=1, metavar="N",
                   help="data-parallel GPUs (ignored on a machine without a GPU)")
    p.add_argument("--restart", action="store_true", help="ignore an existing run directory's checkpoints")
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
    p.add_argument("--out", default="bench.json", metavar="JSON", help="where the figures are written")
    p.set_defaults(func=_handler("bench", "cmd_bench"))
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except MegfbError as exc:
        print(f"megfb: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("megfb: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
