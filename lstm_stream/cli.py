"""lstm-client: stream events from a file or stdin to lstm-serve; sessions, model, health.

Input of stream: JSONL or CSV (see `lstm-client stream --help`). A CSV file's first
line is skipped as a header when its second field is not a number (or it has one
field). Output: one JSON object per input line (line, session_id, and step, seq,
duplicate, output and the model_version that answered, or error).

--address is HOST:PORT; one without a port is refused (exit 2). A server that has
not answered yet gets 2 s to take the connection: a refused connection, a name
that does not resolve or a listener that never answers ends in one line such as
"cannot reach HOST:PORT (connection refused)", exit 3 (given --retry-for, it gets
that long instead, announced). A server that answered
and then went away (a restart, a drain) is retried for --retry-for seconds (30 for
stream, 5 for the other commands), with a line on stderr when retrying starts.
Global options may come before or after the command.

Exit codes: 0 everything answered; 1 some lines were bad or refused (each is
reported on stderr with its line number and in the output); 2 usage; 3 the
server could not be reached or refused the call.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Any

import grpc
import numpy as np

from lstm_stream.client import MAX_SEQ, Client, LstmError, unreachable_reason

EXIT_OK, EXIT_BAD_LINES, EXIT_USAGE, EXIT_SERVER = 0, 1, 2, 3
PROG = "lstm-client"
RETRY_FOR = {"stream": 30.0}
"""--retry-for when not given: streams ride out a restart; one-shot commands fail fast."""
RETRY_FOR_ONE_SHOT = 5.0
CONNECT_TIMEOUT = 2.0
"""How long a server that never answered gets, unless --retry-for is given: a wrong
address fails fast, a restart mid-stream is still waited for."""
KEYS = ("session_id", "values", "seq", "reset")
"""The keys of a JSONL line; any other refuses the line (a typo must not pass silently)."""
FLOAT32_MAX = float(np.finfo(np.float32).max)

INPUT_FORMAT = """\
input, JSONL: one object per line, e.g.
  {"session_id": "dev-1", "values": [0.5, -1.25, ...], "seq": 7, "reset": false}
  session_id (a non-empty string) and values (the model's event_size numbers, each
  within float32's range) are required; seq and reset are optional; any other key
  refuses the line.
  seq (1 to 2^64-1): the event is applied only if seq exceeds the session's last
  applied seq; otherwise it comes back "duplicate": true and changes nothing.
  Without seq the client numbers the event: one more than the highest seq of its
  session so far (the server's last_seq, read once, then every seq sent), so lines
  with and without seq may mix in a session and no event is applied twice. Give
  every line a seq to make a file safe to run again after a failure: what was
  applied comes back duplicate, the rest is applied.
  reset (true/false): start the session from zero state before this event.
input, CSV: session_id,v1,...,vE per line. A first line whose second field is not
  a number is a header; a header may name a "seq" and a "reset" column (after the
  first), read as in JSONL (reset: true, false, 1 or 0; an empty cell: no seq, no
  reset); every other column is a value, in order.
output: one JSON object per input line: line, session_id, and step, seq, duplicate,
  output, model_version (the version that answered), or error.
On a terminal, stdin is read until Ctrl-D.
"""


def complain(message: str) -> None:
    """One error line on stderr, prefixed like every line this tool writes there."""
    print(f"{PROG}: {message}", file=sys.stderr)


class LineError(ValueError):
    """An input line refused before sending; ``session_id`` when the line names one."""

    def __init__(self, message: str, session_id: str | None = None):
        super().__init__(message)
        self.session_id = session_id


class Progress:
    """A one-line rate display on stderr (when it is a terminal, or asked for)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.start = time.monotonic()
        self.shown = 0.0
        self.events = 0

    def add(self, n: int) -> None:
        self.events += n
        now = time.monotonic()
        if self.enabled and now - self.shown >= 0.2:
            self.shown = now
            rate = self.events / max(now - self.start, 1e-9)
            print(f"\r{self.events:,} events, {rate:,.0f} events/s", end="", file=sys.stderr)

    def done(self) -> None:
        if self.enabled:
            self.shown = 0.0
            self.add(0)
            print(file=sys.stderr)


@dataclass
class Line:
    """One good input line: an event to send."""

    session_id: str
    values: list[float]
    reset: bool = False
    seq: int = 0
    """0: the client numbers it."""


@dataclass
class CsvColumns:
    """Where a CSV row keeps its seq and reset (named by the header) and its values."""

    seq: int | None = None
    reset: int | None = None
    width: int | None = None
    """The header's number of columns, when it names seq or reset (rows must match)."""

    @classmethod
    def of(cls, header: list[str]) -> CsvColumns:
        names = [name.strip() for name in header]
        seq = names.index("seq", 1) if "seq" in names[1:] else None
        reset = names.index("reset", 1) if "reset" in names[1:] else None
        named = seq is not None or reset is not None
        return cls(seq, reset, len(names) if named else None)


def parse_line(text: str, fmt: str, event_size: int, columns: CsvColumns | None = None) -> Line:
    """One input line as an event; LineError with the reason."""
    line = parse_jsonl(text) if fmt == "jsonl" else parse_csv(text, columns or CsvColumns())
    if len(line.values) != event_size:
        raise LineError(f"{len(line.values)} values; the model takes {event_size}", line.session_id)
    return line


def parse_jsonl(text: str) -> Line:
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise LineError(f"not JSON ({exc.msg})") from None
    if not isinstance(record, dict):
        raise LineError("not a JSON object")
    session_id = record.get("session_id")
    if not isinstance(session_id, str) or not session_id:
        sid = session_id if isinstance(session_id, str) else None
        raise LineError("'session_id' must be a non-empty string", sid)
    unknown = [key for key in record if key not in KEYS]
    if unknown:
        raise LineError(
            f"unknown key {unknown[0]!r} (a line has session_id, values, and optionally "
            "seq and reset)",
            session_id,
        )
    values, reset, seq = record.get("values"), record.get("reset", False), record.get("seq")
    if not isinstance(values, list):
        raise LineError("'values' must be a list of numbers", session_id)
    if not isinstance(reset, bool):
        raise LineError("'reset' must be true or false", session_id)
    return Line(session_id, floats(values, session_id), reset, parse_seq(seq, session_id))


def parse_csv(text: str, columns: CsvColumns) -> Line:
    row = next(csv.reader([text]))
    if len(row) < 2:
        raise LineError("expected session_id,v1,...,vE", row[0] if row else None)
    session_id = row[0]
    if columns.width is not None and len(row) != columns.width:
        raise LineError(f"{len(row)} columns; the header has {columns.width}", session_id)
    named = {columns.seq, columns.reset}
    values = [v for i, v in enumerate(row) if i and i not in named]
    seq = reset = ""
    if columns.seq is not None:
        seq = row[columns.seq].strip()
    if columns.reset is not None:
        reset = row[columns.reset].strip().lower()
    if reset not in ("", "true", "false", "1", "0"):
        raise LineError("'reset' must be true, false, 1, 0 or empty", session_id)
    if seq and not seq.isdigit():
        raise LineError(f"'seq' must be a whole number from 1 to 2^64-1; got {seq!r}", session_id)
    return Line(
        session_id,
        floats(values, session_id),
        reset in ("true", "1"),
        parse_seq(int(seq) if seq else None, session_id),
    )


def parse_seq(seq: Any, session_id: str) -> int:
    """A line's seq: None (absent) is 0, the client's to number; else 1..2^64-1."""
    if seq is None:
        return 0
    if isinstance(seq, bool) or not isinstance(seq, int) or not 0 < seq <= MAX_SEQ:
        raise LineError(
            f"'seq' must be a whole number from 1 to 2^64-1 (or left out); got {seq!r}",
            session_id,
        )
    return seq


def floats(values: list[Any], session_id: str) -> list[float]:
    """The line's values as floats that fit float32 (checked here: numpy would only warn)."""
    try:
        out = [float(v) for v in values]
    except OverflowError:  # an integer beyond any float
        raise LineError("values out of float32 range", session_id) from None
    except (TypeError, ValueError):
        raise LineError("values must be numbers", session_id) from None
    if any(math.isnan(v) for v in out):
        raise LineError("values contain NaN", session_id)
    big = next((v for v in out if abs(v) > FLOAT32_MAX), None)
    if big is not None:
        raise LineError(f"values out of float32 range ({big:g})", session_id)
    return out


def where(number: int, session_id: str | None) -> str:
    """How an error line names its input line: the number, and the session when known."""
    return f"line {number}" if session_id is None else f"line {number}: session {session_id!r}"


def read_lines(source: IO[str], fmt: str, columns: CsvColumns) -> Iterator[tuple[int, str]]:
    """Non-blank lines with their numbers; a CSV header (see the module's doc) is skipped
    and what it names is set in ``columns``."""
    for number, line in enumerate(source, 1):
        text = line.strip()
        if not text:
            continue
        if fmt == "csv" and number == 1:
            first = next(csv.reader([text]))
            try:
                float(first[1] if len(first) > 1 else "x")
            except ValueError:
                named = CsvColumns.of(first)
                columns.seq, columns.reset, columns.width = named.seq, named.reset, named.width
                continue  # a header row
        yield number, text


def stream_command(client: Client, args: argparse.Namespace) -> int:
    event_size = client.model_info().event_size
    source = sys.stdin if args.input == "-" else open(args.input, encoding="utf-8")  # noqa: SIM115
    out = sys.stdout if args.output == "-" else open(args.output, "w", encoding="utf-8")  # noqa: SIM115
    fmt = args.format
    if fmt == "auto":
        fmt = "csv" if args.input.endswith(".csv") else "jsonl"
    progress = Progress(args.progress if args.progress is not None else sys.stderr.isatty())
    if source is sys.stdin and source.isatty():
        # Otherwise a terminal just sits there, and looks like a hang.
        complain(f"reading events from stdin ({fmt.upper()}, one per line); Ctrl-D ends")
    # The request iterator runs in gRPC's thread: each side counts its own problems.
    unparsable = [0]
    refused = [0]
    chunks: list[list[tuple[int, Any]]] = []
    columns = CsvColumns()

    def batches() -> Iterator[tuple[Sequence[str], np.ndarray, list[bool], list[int]]]:
        """Good lines as (ids, values, resets, seqs) batches; every chunk (bad lines too) kept."""
        chunk: list[tuple[int, Any]] = []
        for number, text in read_lines(source, fmt, columns):
            try:
                chunk.append((number, parse_line(text, fmt, event_size, columns)))
            except LineError as exc:
                unparsable[0] += 1
                complain(f"{where(number, exc.session_id)}: {exc}")
                chunk.append((number, exc))
            if len(chunk) >= args.batch:
                yield from emit(chunk)
                chunk = []
        if chunk:
            yield from emit(chunk)

    def emit(
        chunk: list[tuple[int, Any]],
    ) -> Iterator[tuple[Sequence[str], np.ndarray, list[bool], list[int]]]:
        chunks.append(chunk)  # before the request goes: its results find it first in line
        good: list[Line] = [p for _, p in chunk if not isinstance(p, LineError)]
        if good:
            values = np.array([p.values for p in good], np.float32)
            yield (
                [p.session_id for p in good],
                values,
                [p.reset for p in good],
                [p.seq for p in good],
            )

    def write(chunk: list[tuple[int, Any]], results: Any) -> None:
        k = 0
        for number, parsed in chunk:
            if isinstance(parsed, LineError):
                bad: dict[str, Any] = {"line": number}
                if parsed.session_id is not None:
                    bad["session_id"] = parsed.session_id
                bad["error"] = str(parsed)
                out.write(json.dumps(bad) + "\n")
                continue
            code = int(results.codes[k])
            record: dict[str, Any] = {"line": number, "session_id": parsed.session_id}
            if code:
                refused[0] += 1
                record["error"] = results.errors[k]
                complain(f"{where(number, parsed.session_id)}: refused: {results.errors[k]}")
            else:
                record["step"] = int(results.steps[k])
                record["seq"] = int(results.seqs[k])
                record["duplicate"] = bool(results.duplicates[k])
                record["output"] = results.outputs[k].tolist()
                record["model_version"] = int(results.versions[k])
            out.write(json.dumps(record) + "\n")
            k += 1
        progress.add(k)

    def flush_bad_chunks() -> None:
        """Chunks without a good line have no results: written when their turn comes."""
        while chunks and all(isinstance(p, LineError) for _, p in chunks[0]):
            write(chunks.pop(0), None)

    try:
        for results in client.stream(batches()):
            flush_bad_chunks()
            write(chunks.pop(0), results)
        flush_bad_chunks()
    finally:
        progress.done()
        if out is not sys.stdout:
            out.close()
        if source is not sys.stdin:
            source.close()
    return EXIT_BAD_LINES if unparsable[0] or refused[0] else EXIT_OK


def session_json(session: Any) -> str:
    return json.dumps(
        {
            "session_id": session.session_id,
            "step": session.step,
            "last_seq": session.last_seq,
            "model": session.model,
            "model_version": session.model_version,
            "hidden": list(session.hidden),
            "cell": list(session.cell),
            # A model's other states (e.g. from an imported graph), by name.
            **{state.name: list(state.values) for state in session.states},
        }
    )


def info_json(info: Any) -> str:
    """Every field of ModelInfo, zeros and empty strings included (protobuf omits those)."""
    return json.dumps(_fields(info))


def _fields(message: Any) -> dict[str, Any]:
    record: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        kind = field.message_type
        if kind is not None and kind.GetOptions().map_entry:
            record[field.name] = dict(value)
        elif field.is_repeated:
            record[field.name] = list(value)
        elif kind is not None:
            record[field.name] = _fields(value)
        else:
            record[field.name] = value
    return record


def health_command(client: Client, retry_for: float, on_retry: Any) -> int:
    """The server's health; retried like the other calls while the server cannot be reached."""
    deadline = time.monotonic() + retry_for
    retried = False
    while True:
        status = client.health()
        # A serving status is one word; "CODE: details" is a failed call.
        code, _, details = status.partition(": ")
        if not details:
            print(status)
            return EXIT_OK if status == "SERVING" else EXIT_SERVER
        if details.startswith("cannot reach "):  # the connect timeout passed: in words already
            complain(details)
            return EXIT_SERVER
        reason = unreachable_reason(details) if code == "UNAVAILABLE" else None
        if code != "UNAVAILABLE" or time.monotonic() + 0.2 > deadline:
            complain(f"cannot reach {client.core.address} ({reason})" if reason else status)
            return EXIT_SERVER
        if not retried:
            retried = True
            on_retry(grpc.StatusCode.UNAVAILABLE, details)
        time.sleep(0.2)


def add_option(
    parser: argparse.ArgumentParser, *names: str, shown: str | None = None, **kwargs: Any
) -> None:
    """``add_argument`` with the default in the help text (``shown``: how to say it)."""
    default = kwargs.get("default")
    if shown is None and default not in (None, False, "", argparse.SUPPRESS):
        shown = str(default)
    if shown is not None:
        kwargs["help"] = f"{kwargs['help']} (default: {shown})"
    parser.add_argument(*names, **kwargs)


def add_global_options(parser: argparse.ArgumentParser, top: bool) -> None:
    """Options every command takes, before the command (``top``) or after it.

    After the command they default to SUPPRESS, so that they override the value
    given before it only when given.
    """

    def option(*names: str, default: Any = None, **kwargs: Any) -> None:
        shown = None if default in (None, "") else str(default)
        value = default if top else argparse.SUPPRESS
        add_option(parser, *names, default=value, shown=shown, **kwargs)

    option("--address", default="127.0.0.1:50051", help="the server's HOST:PORT")
    option("--model", default="", help="the model (default: the server's default model)")
    option("--token", help="bearer token (when the server has --auth-tokens)")
    option("--tls-ca", help="PEM CA to trust (TLS)")
    option("--tls-cert", help="PEM client certificate (mutual TLS)")
    option("--tls-key", help="PEM key of --tls-cert")
    add_option(
        parser,
        "--retry-for",
        type=float,
        default=None if top else argparse.SUPPRESS,
        shown=f"{RETRY_FOR['stream']:g} for stream, {RETRY_FOR_ONE_SHOT:g} for the others",
        help="seconds to keep retrying while a server that answered cannot be reached; "
        f"a server that never answered fails after {CONNECT_TIMEOUT:g}s unless this is given",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    add_global_options(parser, top=True)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, epilog: str | None = None) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name,
            help=help,
            description=help,
            epilog=epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            allow_abbrev=False,
        )
        add_global_options(sub, top=False)
        return sub

    stream = command("stream", "send events, write results as JSONL", INPUT_FORMAT)
    add_option(stream, "input", nargs="?", default="-", help="JSONL or CSV file; - for stdin")
    add_option(
        stream,
        "--format",
        choices=("auto", "jsonl", "csv"),
        default="auto",
        help="input format; auto: csv for a file named *.csv, else jsonl. A CSV file's first "
        "line is skipped as a header when its second field is not a number",
    )
    add_option(stream, "--output", default="-", help="JSONL results file; - for stdout")
    add_option(stream, "--batch", type=int, default=256, help="events per request")
    add_option(
        stream,
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        shown="when stderr is a terminal",
        help="rate line on stderr",
    )
    for name in ("get", "reset", "delete"):
        add_option(command(name, f"{name} a session"), "session_id", help="the session's id")
    command("info", "the model: sizes, states, architecture, versions")
    command("models", "every model version the server knows, one JSON line each")
    command("health", "SERVING or not (exit 0 or 3)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "stream" and args.batch < 1:
        parser.error("--batch must be >= 1")
    retry_for = args.retry_for
    # Given --retry-for, a server not up yet is waited for as long; else a wrong
    # address fails in CONNECT_TIMEOUT.
    connect_timeout = None if retry_for is not None else CONNECT_TIMEOUT
    if retry_for is None:
        retry_for = RETRY_FOR.get(args.command, RETRY_FOR_ONE_SHOT)

    def on_retry(code: grpc.StatusCode, details: str) -> None:
        reason = unreachable_reason(details) or f"{code.name}: {details}"
        complain(
            f"cannot reach {args.address} ({reason}); retrying for up to {retry_for:g}s "
            "(--retry-for)"
        )

    try:
        client = Client(
            args.address,
            token=args.token,
            tls_ca=args.tls_ca,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            retry_for=retry_for,
            on_retry=on_retry,
            model=args.model,
            connect_timeout=connect_timeout,
        )
    except (ValueError, OSError) as exc:  # the address, a TLS file
        complain(str(exc))
        return EXIT_USAGE
    try:
        if args.command == "stream":
            return stream_command(client, args)
        if args.command == "health":
            return health_command(client, retry_for, on_retry)
        if args.command == "info":
            print(info_json(client.model_info()))
            return EXIT_OK
        if args.command == "models":
            for status in client.list_models().versions:
                print(info_json(status))
            return EXIT_OK
        if args.command == "get":
            session = client.get_session(args.session_id)
            if session is None:
                complain(f"no session {args.session_id!r}")
                return EXIT_SERVER
        elif args.command == "reset":
            session = client.reset_session(args.session_id)
        else:
            session = client.delete_session(args.session_id)
        print(session_json(session))
        return EXIT_OK
    except LstmError as exc:
        complain(str(exc))
        return EXIT_SERVER
    except OSError as exc:
        complain(str(exc))
        return EXIT_USAGE
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main())
