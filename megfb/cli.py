"""`megfb` command line: parse, call the module that does the work, print.

Every subcommand's handler lives beside the code it drives (`cmd_*` functions); modules are
imported only when their command runs, so `--help` stays fast.
"""
import argparse
import importlib
import sys

from . import __version__
from .errors import MegfbError


class _Parser(argparse.ArgumentParser):
    """argparse prints the whole usage block on an error; one line is enough."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _handler(module, func):
    def run(args):
        return getattr(importlib.import_module(f"megfb.{module}"), func)(args)

    return run


def _add_ckpt(p, required=False, what="checkpoint"):
    p.add_argument("--ckpt", required=required, metavar="PATH",
                   help=f"{what}: a trainer checkpoint or a plain published-layout state dict"
                   + ("" if required else " (default: best checkpoint of the newest run)"))
    p.add_argument("--config", metavar="YAML",
                   help="model config for a plain state dict (default: the FBRestormer defaults)")
    # One patch per forward is fastest on this project's 2-core CPU (0.30 vs 0.36 s per patch
    # at batch 8) and the dumped graph is single-patch; raise it on a GPU.
    p.add_argument("--batch-size", type=int, default=1, metavar="B", help="patches per forward pass (default 1)")
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
    p.add_argument("--data-dir", default="data")
    p.add_argument("--train", type=int, default=2048, metavar="N", help="training pairs (default 2048)")
    p.add_argument("--test", type=int, default=256, metavar="N", help="test patches (default 256)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="regenerate an existing synthetic set (never real files)")
    p.set_defaults(func=_handler("synth", "cmd_synth"))
    p = dsub.add_parser("stats", help="black level, per-channel mean/std, identity score; writes data/stats.yaml")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--out", default=None, metavar="YAML", help="output file (default DATA_DIR/stats.yaml)")
    p.set_defaults(func=_handler("data", "cmd_stats"))

    p = sub.add_parser("train", help="train from a YAML config; rerunning resumes from `latest`")
    p.add_argument("--config", default="configs/quickstart.yaml", metavar="YAML")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.iterations=500")
    p.add_argument("--gpus", type=int, default=1, metavar="N", help="data-parallel GPUs (CPU when none)")
    p.add_argument("--restart", action="store_true", help="ignore an existing run directory's checkpoints")
    p.set_defaults(func=_handler("train", "cmd_train"))

    p = sub.add_parser("eval", help="score a checkpoint on its validation split (and synthetic test targets)")
    _add_ckpt(p)
    p.add_argument("--patches", type=int, default=None, metavar="N",
                   help="score only the first N patches of each set (the trainer's data.val_patches "
                   "cap takes the same validation patches; default: all)")
    p.set_defaults(func=_handler("submit", "cmd_eval"))

    p = sub.add_parser("predict", help="run a checkpoint over a contest-format input .bin")
    _add_ckpt(p, required=True)
    p.add_argument("--input", required=True, metavar="IN.bin")
    p.add_argument("--output", required=True, metavar="OUT.bin")
    p.set_defaults(func=_handler("infer", "cmd_predict"))

    p = sub.add_parser("score", help="contest score and PSNR of a prediction .bin against a ground-truth .bin")
    p.add_argument("pred", metavar="PRED.bin")
    p.add_argument("gt", metavar="GT.bin")
    p.set_defaults(func=_handler("metrics", "cmd_score"))

    p = sub.add_parser("params", help="parameters, FLOPs, activations, memory, time; fails over 100,000 parameters")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--config", metavar="YAML", help="model config (default: FBRestormer defaults)")
    g.add_argument("--ckpt", metavar="PATH", help="checkpoint to report on")
    p.add_argument("--no-timing", action="store_true", help="skip the per-patch timing")
    p.set_defaults(func=_handler("submit", "cmd_params"))

    p = sub.add_parser("submit", help="predict the test input and pack the contest zip")
    _add_ckpt(p)
    p.add_argument("--input", default="data/competition_test_input.0.2.bin", metavar="IN.bin")
    p.add_argument("--out", default="submit", metavar="DIR")
    p.set_defaults(func=_handler("submit", "cmd_submit"))

    p = sub.add_parser("bench", help="plain vs fast paths side by side; writes bench.json")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="small sizes and few repeats (smoke run)")
    p.add_argument("--out", default="bench.json", metavar="JSON")
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
