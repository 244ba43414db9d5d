"""``lstm-export``: write the one-step ONNX model and prove it equals the reference."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

import onnx

from model_export.arch import ACTIVATIONS, OUTPUT_ACTIVATIONS, ModelImportError
from model_export.lstm import Parameters
from model_export.onnx_export import DEFAULT_OP, OPS, build_model, check, max_difference
from model_export.params import ParameterFileError, fingerprint, load_parameters

DESCRIPTION = """\
Export one step of a recurrent model to ONNX, check it against the numpy
reference with ONNX Runtime, and only then write it.

Sources:
  --from-torch  a PyTorch state_dict (.safetensors, or .pt with torch installed)
                of an nn.LSTM or nn.GRU, optionally followed by Linear layers
  --from-keras  a Keras 3 .keras file: LSTM or GRU layers, then Dense layers
  --params      the seed form: the original single-layer LSTM notation, an .npz
                whose 16 keys are event_forget_weights, event_forget_bias,
                hidden_forget_weights, hidden_forget_bias and the same for the
                input, candidate and output gates
  --random      a seed-form LSTM with random weights (--event-size, --hidden-size)

Exit status: 0 written, 1 the check failed (nothing written), 2 refused (nothing
written; the reason on stderr)."""


@dataclass
class Export:
    """A model built in memory, how to check it, and what to say about it."""

    model: onnx.ModelProto
    difference: Callable[[onnx.ModelProto], float]
    summary: str


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="lstm-export",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--out", required=True, help="path of the .onnx file to write")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--from-torch",
        metavar="FILE",
        help="PyTorch state_dict: .safetensors (no torch needed) or .pt (needs torch)",
    )
    source.add_argument("--from-keras", metavar="FILE", help="Keras 3 model saved as .keras")
    source.add_argument("--params", help="seed-form .npz parameter file (see above)")
    source.add_argument("--random", action="store_true", help="random parameters (needs sizes)")
    parser.add_argument("--event-size", type=int, help="E, with --random")
    parser.add_argument("--hidden-size", type=int, help="H, with --random")
    parser.add_argument(
        "--seed", type=int, default=0, help="random seed, with --random (default 0)"
    )
    torch_group = parser.add_argument_group("with --from-torch")
    torch_group.add_argument(
        "--rnn",
        metavar="PREFIX",
        help="state_dict prefix of the nn.LSTM/nn.GRU, e.g. encoder "
        "(default: the only module with a weight_ih_l0 key)",
    )
    torch_group.add_argument(
        "--head",
        metavar="SPEC",
        help="the head after the recurrent layers: Linear prefixes and activations in "
        "order, comma-separated, e.g. fc or head.0,relu,head.2; activations: "
        f"{', '.join(ACTIVATIONS)} (default: the one Linear whose input size is the top "
        "layer's width, if exactly one; else none)",
    )
    torch_group.add_argument(
        "--output-activation",
        choices=OUTPUT_ACTIVATIONS,
        help="applied to the head's output (default none); a .keras file carries its own",
    )
    parser.add_argument(
        "--op",
        choices=OPS,
        default=None,
        help=f"seed form only: the ONNX LSTM operator or an explicit graph (default {DEFAULT_OP})",
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
        parser.error("--event-size/--hidden-size go with --random; other sources carry sizes")
    if args.from_torch is None:
        given = [
            flag
            for flag, value in (
                ("--rnn", args.rnn),
                ("--head", args.head),
                ("--output-activation", args.output_activation),
            )
            if value is not None
        ]
        if given:
            parser.error(f"{', '.join(given)} go(es) with --from-torch only")
    seed_form = args.params is not None or args.random
    if args.op is not None and args.op != DEFAULT_OP and not seed_form:
        parser.error(f"--op {args.op} applies to --params/--random only")
    return args


def _seed_export(args: argparse.Namespace) -> Export:
    if args.random:
        parameters = Parameters.random(args.event_size, args.hidden_size, seed=args.seed)
        framework, source_file = "random", ""
    else:
        parameters = load_parameters(args.params)
        framework, source_file = "seed", os.path.basename(args.params)
    op = args.op or DEFAULT_OP
    model = build_model(parameters, op=op, source_framework=framework, source_file=source_file)
    summary = (
        f"event_size={parameters.event_size} hidden_size={parameters.hidden_size} op={op} "
        f"fingerprint={fingerprint(parameters)[:16]}"
    )
    return Export(model, lambda m: max_difference(m, parameters), summary)


def _framework_export(args: argparse.Namespace) -> Export:
    # Imported here: the seed path needs neither h5py nor safetensors.
    from model_export.graph import build_step_model, max_step_difference

    if args.from_torch is not None:
        from model_export.torch_import import import_state_dict, load_state_dict

        arch = import_state_dict(
            load_state_dict(args.from_torch),
            rnn=args.rnn,
            head=args.head,
            output_activation=args.output_activation or "none",
            source_file=os.path.basename(args.from_torch),
        )
    else:
        from model_export.keras_import import load_keras

        arch = load_keras(args.from_keras)
    model = build_step_model(arch)
    summary = (
        f"cell={arch.cell} layers={arch.num_layers} event_size={arch.event_size} "
        f"hidden_size={arch.hidden_size} proj_size={arch.proj_size} "
        f"head={arch.head_description or '(none)'} output_activation={arch.output_activation} "
        f"output_size={arch.output_size} states="
        + ",".join(f"{name}[{size}]" for name, size in arch.state_sizes.items())
        + f" fingerprint={arch.fingerprint()[:16]}"
    )
    return Export(model, lambda m: max_step_difference(m, arch), summary)


def write_atomically(model: onnx.ModelProto, path: str) -> None:
    """Write to a temporary file beside ``path``, then rename: never a partial model."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".lstm-export-", suffix=".onnx.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(model.SerializeToString())
        # mkstemp makes the file 0600; give it the mode a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        print(f"lstm-export: cannot write {args.out}: no directory {out_dir}", file=sys.stderr)
        return 2
    try:
        export = _seed_export(args) if args.params or args.random else _framework_export(args)
    except (ParameterFileError, ModelImportError) as exc:
        print(f"lstm-export: {exc}", file=sys.stderr)
        return 2
    check(export.model)
    diff = export.difference(export.model)
    print(f"{args.out}: {export.summary}")
    print(f"max |onnxruntime - reference| = {diff:.3g} (tolerance {args.tolerance:g})")
    if not diff <= args.tolerance:
        print(
            "lstm-export: validation FAILED: the model does not match the reference; "
            f"{args.out} not written",
            file=sys.stderr,
        )
        return 1
    try:
        write_atomically(export.model, args.out)
    except OSError as exc:
        print(f"lstm-export: cannot write {args.out}: {exc.strerror}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0
