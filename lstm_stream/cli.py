"""``lstm-client``: stream events from a file or stdin to lstm-serve; sessions, model, health.

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
from typing import IO, Any

import numpy as np

from lstm_stream.client import Client, LstmError

EXIT_OK, EXIT_BAD_LINES, EXIT_USAGE, EXIT_SERVER = 0, 1, 2, 3


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


def parse_line(text: str, fmt: str, event_size: int) -> tuple[str, list[float], bool]:
    """One input line as (session_id, values, reset); ValueError with the reason."""
    if fmt == "jsonl":
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise ValueError("not a JSON object")
        session_id, values = record.get("session_id"), record.get("values")
        reset = record.get("reset", False)
        if not isinstance(session_id, str) or not session_id:
            raise ValueError("'session_id' must be a non-empty string")
        if not isinstance(values, list):
            raise ValueError("'values' must be a list of numbers")
        if not isinstance(reset, bool):
            raise ValueError("'reset' must be true or false")
    else:
        row = next(csv.reader([text]))
        if len(row) < 2:
            raise ValueError("expected session_id,v1,...,vE")
        session_id, values, reset = row[0], row[1:], False
    try:
        floats = [float(v) for v in values]
    except (TypeError, ValueError):
        raise ValueError("values must be numbers") from None
    if len(floats) != event_size:
        raise ValueError(f"{len(floats)} values; the model takes {event_size}")
    if not all(math.isfinite(v) for v in floats):
        raise ValueError("values contain NaN or Inf")
    return session_id, floats, reset


def read_lines(source: IO[str], fmt: str) -> Iterator[tuple[int, str]]:
    for number, line in enumerate(source, 1):
        text = line.strip()
        if not text:
            continue
        if fmt == "csv" and number == 1:
            first = text.split(",")
            try:
                float(first[1] if len(first) > 1 else "x")
            except ValueError:
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
    # The request iterator runs in gRPC's thread: each side counts its own problems.
    unparsable = [0]
    refused = [0]
    chunks: list[list[tuple[int, Any]]] = []

    def batches() -> Iterator[tuple[Sequence[str], np.ndarray, list[bool]]]:
        """Good lines as (ids, values, resets) batches; every chunk (bad lines too) kept."""
        chunk: list[tuple[int, Any]] = []
        for number, text in read_lines(source, fmt):
            try:
                chunk.append((number, parse_line(text, fmt, event_size)))
            except ValueError as exc:
                unparsable[0] += 1
                print(f"line {number}: {exc}", file=sys.stderr)
                chunk.append((number, str(exc)))
            if len(chunk) >= args.batch:
                yield from emit(chunk)
                chunk = []
        if chunk:
            yield from emit(chunk)

    def emit(
        chunk: list[tuple[int, Any]],
    ) -> Iterator[tuple[Sequence[str], np.ndarray, list[bool]]]:
        chunks.append(chunk)  # before the request goes: its results find it first in line
        good = [p for _, p in chunk if not isinstance(p, str)]
        if good:
            values = np.array([p[1] for p in good], np.float32)
            yield [p[0] for p in good], values, [p[2] for p in good]

    def write(chunk: list[tuple[int, Any]], results: Any) -> None:
        k = 0
        for number, parsed in chunk:
            if isinstance(parsed, str):
                out.write(json.dumps({"line": number, "error": parsed}) + "\n")
                continue
            code = int(results.codes[k])
            record: dict[str, Any] = {"line": number, "session_id": parsed[0]}
            if code:
                refused[0] += 1
                record["error"] = results.errors[k]
                print(f"line {number}: refused: {results.errors[k]}", file=sys.stderr)
            else:
                record["step"] = int(results.steps[k])
                record["duplicate"] = bool(results.duplicates[k])
                record["output"] = results.outputs[k].tolist()
            out.write(json.dumps(record) + "\n")
            k += 1
        progress.add(k)

    def flush_bad_chunks() -> None:
        """Chunks without a good line have no results: written when their turn comes."""
        while chunks and all(isinstance(p, str) for _, p in chunks[0]):
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
            "hidden": list(session.hidden),
            "cell": list(session.cell),
        }
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lstm-client", description=__doc__)
    parser.add_argument("--address", default="127.0.0.1:50051", help="the server's HOST:PORT")
    parser.add_argument("--token", help="bearer token (when the server has --auth-tokens)")
    parser.add_argument("--tls-ca", help="PEM CA to trust (TLS)")
    parser.add_argument("--tls-cert", help="PEM client certificate (mutual TLS)")
    parser.add_argument("--tls-key", help="PEM key of --tls-cert")
    parser.add_argument("--retry-for", type=float, default=30.0, help="seconds to retry a call")
    commands = parser.add_subparsers(dest="command", required=True)
    stream = commands.add_parser("stream", help="send events, write results as JSONL")
    stream.add_argument("input", nargs="?", default="-", help="JSONL or CSV file; - for stdin")
    stream.add_argument("--format", choices=("auto", "jsonl", "csv"), default="auto")
    stream.add_argument("--output", default="-", help="JSONL results file; - for stdout")
    stream.add_argument("--batch", type=int, default=256, help="events per request")
    stream.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="rate line on stderr (default: when stderr is a terminal)",
    )
    for name in ("get", "reset", "delete"):
        commands.add_parser(name, help=f"{name} a session").add_argument("session_id")
    commands.add_parser("info", help="the model the server serves")
    commands.add_parser("health", help="SERVING or not (exit 0 or 3)")
    args = parser.parse_args(argv)
    if args.command == "stream" and args.batch < 1:
        parser.error("--batch must be >= 1")
    client = Client(
        args.address,
        token=args.token,
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        retry_for=args.retry_for,
    )
    try:
        if args.command == "stream":
            return stream_command(client, args)
        if args.command == "health":
            status = client.health()
            print(status)
            return EXIT_OK if status == "SERVING" else EXIT_SERVER
        if args.command == "info":
            info = client.model_info()
            print(json.dumps({f.name: v for f, v in info.ListFields()}, default=list))
            return EXIT_OK
        if args.command == "get":
            session = client.get_session(args.session_id)
            if session is None:
                print(f"no session {args.session_id!r}", file=sys.stderr)
                return EXIT_SERVER
        elif args.command == "reset":
            session = client.reset_session(args.session_id)
        else:
            session = client.delete_session(args.session_id)
        print(session_json(session))
        return EXIT_OK
    except LstmError as exc:
        print(f"lstm-client: {exc}", file=sys.stderr)
        return EXIT_SERVER
    except OSError as exc:
        print(f"lstm-client: {exc}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main())
