"""What an import took from the file and what it had to assume, in words for the user."""

from __future__ import annotations

from model_export.arch import Architecture, Linear


def head_words(arch: Architecture) -> str:
    """E.g. ``head.0 linear(16->8), relu, head.2 linear(8->3)``; ``none`` without a head."""
    parts = []
    for item in arch.head:
        if isinstance(item, Linear):
            size = f"linear({item.in_features}->{item.out_features})"
            parts.append(f"{item.name} {size}" if item.name else size)
        else:
            parts.append(item)
    return ", ".join(parts) or "none"


def _recurrent_words(arch: Architecture) -> str:
    proj = f", proj_size {arch.proj_size}" if arch.proj_size else ""
    layers = f"{arch.num_layers} layer{'s' if arch.num_layers > 1 else ''}"
    return f"{arch.cell.upper()}, {layers}, hidden {arch.hidden_size}{proj}"


def torch_assumptions(
    arch: Architecture,
    rnn: str | None,
    head: str | None,
    output_activation: str | None,
    checked: str | None,
) -> list[str]:
    """The stderr block for a state_dict: what was found, what was given, what was assumed.

    ``rnn``/``head``/``output_activation`` are the flags as given (None: not given);
    ``checked`` names the recording the export was confirmed against, if any.
    """
    prefix = ""
    first = arch.layers[0].names.get("weight_ih", "")
    if first.endswith(".weight_ih_l0"):
        prefix = first[: -len(".weight_ih_l0")]
    module = prefix or "(top level)"
    rnn_from = "--rnn" if rnn is not None else "found: the only module with weight_ih_l0"
    if head is not None:
        head_from = "--head"
    elif arch.head:
        head_from = f"found: the only Linear that takes {arch.width} inputs"
    else:
        head_from = "found no Linear layer: the top layer's h is the output"
    act_from = "--output-activation" if output_activation is not None else "the default"
    lines = [
        f"lstm-export: from the state_dict {arch.source_file or 'given'}, this export assumes:",
        f"  recurrent          {module}: {_recurrent_words(arch)} ({rnn_from})",
        f"  head               {head_words(arch)} ({head_from})",
        f"  output activation  {arch.output_activation} ({act_from})",
    ]
    if checked is not None:
        lines.append(f"  a state_dict records no activations; these match the outputs in {checked}")
    else:
        lines += [
            "  A state_dict records weights only, never activations (a sigmoid, relu ... in",
            "  forward()): if the model applies any, name them with --head and",
            "  --output-activation, and compare the export with outputs recorded from the",
            "  framework: --check recorded.npz (lstm-export --help shows how to record one).",
        ]
    return lines


def keras_read(arch: Architecture) -> str:
    """One line: what the .keras file says, activations included (it records them)."""
    return (
        f"read from {arch.source_file}: {_recurrent_words(arch)}; head: {head_words(arch)}; "
        f"output activation: {arch.output_activation} (activations as the file records them)"
    )


def torch_hint(arch: Architecture) -> str:
    """The end of a failed --check's line for a state_dict: the likely cause, named."""
    return (
        f"; a state_dict records no activations and this export assumed head "
        f"{head_words(arch)} with output activation {arch.output_activation}: name the "
        "model's own with --head and --output-activation"
    )
