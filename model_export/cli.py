"""``lstm-export``: write the one-step ONNX model and prove it equals the reference."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

import onnx

from model_export.arch import ACTIVATIONS, OUTPUT_ACTIVATIONS, Architecture, ModelImportError
from model_export.assumed import keras_read, torch_assumptions, torch_hint
from model_export.lstm import Parameters
from model_export.onnx_export import DEFAULT_OP, OPS, build_model, check, max_difference
from model_export.params import ParameterFileError, fingerprint, load_parameters
from model_export.recorded import FORMAT, Recording, RecordingError, compare, load_recording

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

A state_dict records weights, not activations: with --from-torch, what was
found and what was assumed (recurrent module, head layers and the activations
between them, output activation) is printed on stderr. To prove an export equal
to the framework, record the framework's outputs and pass --check recorded.npz
(keys: inputs [T, B, E], outputs [T, B, O], optionally h_n and c_n [L, B, width]
as nn.LSTM/nn.GRU return them; T steps of B sequences from zero state). The
step model runs over the T steps in ONNX Runtime and must agree within
--tolerance, absolute plus relative: |exported - recorded| <= tol + tol*|recorded|.

Exit status: 0 written, 1 the check against the numpy reference failed (nothing
written), 2 refused, or --check differs (nothing written; the reason on stderr)."""

TORCH_RECIPE = (
    "x = torch.randn(50, 4, E)  # [T, B, E]: 50 steps of 4 sequences; E = the event size",
    "y = model.eval()(x).detach()  # [T, B, O]: every step's output",
    'numpy.savez("recorded.npz", inputs=x.numpy(), outputs=y.numpy())',
)
KERAS_RECIPE = (
    'x = numpy.random.randn(4, 50, E).astype("float32")  # [B, T, E]: Keras is batch first',
    "y = model.predict(x)  # [B, T, O]: the top recurrent layer has return_sequences=True",
    'numpy.savez("recorded.npz", inputs=x.transpose(1, 0, 2), outputs=y.transpose(1, 0, 2))',
)
"""How to record the file --check reads, three lines each; docs/EXPORT.md shows the same."""

RECIPES = "\n".join(
    [
        "Recording recorded.npz for --check, where the model was trained:",
        "  PyTorch (an nn.LSTM/nn.GRU with batch_first=False, as by default):",
        *(f"    {line}" for line in TORCH_RECIPE),
        "  Keras:",
        *(f"    {line}" for line in KERAS_RECIPE),
        "  A model that gives only the last step's output [B, O]: build y [T, B, O] by prefixes,",
        "    y = torch.stack([model(x[: t + 1]) for t in range(50)]).detach()",
        "    y = numpy.stack([model.predict(x[:, : t + 1], verbose=0) for t in range(50)])",
        "  and save outputs=y as it is. docs/EXPORT.md has more (batch_first, final states).",
    ]
)


@dataclass
class Export:
    """A model built in memory, how to check it, and what to say about it."""

    model: onnx.ModelProto
    difference: Callable[[onnx.ModelProto], float]
    summary: str
    layers: int = 1
    arch: Architecture | None = None
    """The imported architecture (None for the seed form), for what is said about it."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="lstm-export",
        description=DESCRIPTION,
        epilog=RECIPES,
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
        "--check",
        metavar="RECORDED",
        help=f"an .npz of the framework's own numbers: {FORMAT}; the export is written only "
        "if it agrees within --tolerance (see below for how to record one)",
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=1e-5,
        help="largest accepted |ONNX Runtime - reference|, and with --check "
        "|exported - recorded| <= tol + tol*|recorded| (default 1e-5; outputs recorded on a "
        "GPU, with TF32 or in reduced precision may need 1e-4 or more)",
    )
    args = parser.parse_args(argv)
    if not args.tolerance >= 0:
        parser.error("--tolerance must be a number >= 0")
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
    return Export(model, lambda m: max_step_difference(m, arch), summary, arch.num_layers, arch)


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
        # The recording is read first: a bad file is refused before any work is done.
        recording = load_recording(args.check) if args.check is not None else None
        export = _seed_export(args) if args.params or args.random else _framework_export(args)
    except (ParameterFileError, ModelImportError, RecordingError) as exc:
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
    if recording is not None:
        refusal = _check_recording(export, recording, args)
        if refusal:
            print(refusal, file=sys.stderr)
            return 2
    _say_what_was_assumed(export, args)
    try:
        write_atomically(export.model, args.out)
    except OSError as exc:
        print(f"lstm-export: cannot write {args.out}: {exc.strerror}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


def _check_recording(export: Export, recording: Recording, args: argparse.Namespace) -> str:
    """Compare with the framework's numbers; the one refusal line, or "" when they agree."""
    try:
        result = compare(export.model, recording, export.layers, args.tolerance)
    except RecordingError as exc:
        return f"lstm-export: {exc}; {args.out} not written"
    tolerance = f"{args.tolerance:g} + {args.tolerance:g}*|recorded|"
    if not result.passed:
        hint = torch_hint(export.arch) if args.from_torch is not None and export.arch else ""
        return (
            f"lstm-export: --check {recording.name}: the export differs from the framework by "
            f"{result.largest:.3g} in {result.where} (exported {result.exported:.6g}, recorded "
            f"{result.recorded:.6g}; tolerance {tolerance}){hint}; {args.out} not written"
        )
    print(
        f"--check {recording.name}: {recording.steps} steps of {recording.sequences} sequences "
        f"({', '.join(result.compared)}): max |exported - recorded| = {result.largest:.3g} "
        f"(tolerance {tolerance})"
    )
    return ""


def _say_what_was_assumed(export: Export, args: argparse.Namespace) -> None:
    """A state_dict's assumptions on stderr; what a .keras file said, on stdout."""
    if export.arch is None:
        return
    if args.from_torch is not None:
        checked = os.path.basename(args.check) if args.check is not None else None
        lines = torch_assumptions(export.arch, args.rnn, args.head, args.output_activation, checked)
        print("\n".join(lines), file=sys.stderr)
    else:
        print(keras_read(export.arch))
