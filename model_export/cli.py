"""``lstm-export``: write the one-step ONNX model and prove it equals the reference."""

from __future__ import annotations

import argparse
import sys

import onnx

from model_export.lstm import Parameters
from model_export.onnx_export import DEFAULT_OP, OPS, build_model, check, max_difference
from model_export.params import ParameterFileError, fingerprint, load_parameters


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="lstm-export",
        description="Export one LSTM step to ONNX and validate it against the numpy reference.",
    )
    parser.add_argument("--out", required=True, help="path of the .onnx file to write")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--params", help=".npz parameter file with the seed's attribute names")
    source.add_argument("--random", action="store_true", help="random parameters (needs sizes)")
    parser.add_argument("--event-size", type=int, help="E, with --random")
    parser.add_argument("--hidden-size", type=int, help="H, with --random")
    parser.add_argument(
        "--seed", type=int, default=0, help="random seed, with --random (default 0)"
    )
    parser.add_argument(
        "--op",
        choices=OPS,
        default=DEFAULT_OP,
        help=f"ONNX LSTM operator or an explicit MatMul graph (default {DEFAULT_OP})",
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=1e-5,
        help="largest accepted |ONNX Runtime - reference| (default 1e-5)",
    )
    args = parser.parse_args(argv)
    if args.random:
        if args.event_size is None or args.hidden_size is None:
            parser.error("--random needs --event-size and --hidden-size")
        if args.event_size < 1 or args.hidden_size < 1:
            parser.error("--event-size and --hidden-size must be >= 1")
    elif args.event_size is not None or args.hidden_size is not None:
        parser.error("--event-size/--hidden-size go with --random; --params carries its sizes")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.random:
        parameters = Parameters.random(args.event_size, args.hidden_size, seed=args.seed)
    else:
        try:
            parameters = load_parameters(args.params)
        except ParameterFileError as exc:
            print(f"lstm-export: {exc}", file=sys.stderr)
            return 2
    model = build_model(parameters, op=args.op)
    onnx.save_model(model, args.out)
    check(onnx.load_model(args.out))
    diff = max_difference(onnx.load_model(args.out), parameters)
    print(
        f"wrote {args.out}: event_size={parameters.event_size} "
        f"hidden_size={parameters.hidden_size} op={args.op} "
        f"fingerprint={fingerprint(parameters)[:16]}"
    )
    print(f"max |onnxruntime - reference| = {diff:.3g} (tolerance {args.tolerance:g})")
    if not diff <= args.tolerance:
        print(
            "lstm-export: validation FAILED: the model does not match the reference",
            file=sys.stderr,
        )
        return 1
    return 0
