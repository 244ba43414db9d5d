"""The product's docs stand alone: no reference outside the repository, and the protocol
document covers every RPC and field of the wire API."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from lstm_stream.oip.v2 import inference_pb2 as oip_pb
from lstm_stream.v1 import lstm_stream_pb2 as pb
from tests.conftest import ServerFactory

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PROTOCOL = DOCS / "PROTOCOL.md"

OUTSIDE = "../" + "shared"  # spelled in two parts so that this file does not match itself


def tracked_files() -> list[str]:
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: no list of tracked files")
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=60
    )
    return [name.decode() for name in listed.stdout.split(b"\0") if name]


def test_no_tracked_file_points_outside_the_repository() -> None:
    offenders = []
    for name in tracked_files():
        path = ROOT / name
        if not path.is_file():
            continue  # deleted in the working tree, not yet committed
        if OUTSIDE.encode() in path.read_bytes():
            offenders.append(name)
    assert offenders == [], f"{OUTSIDE} is referenced by {offenders}"


def test_the_readme_points_to_the_protocol_document() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "(docs/PROTOCOL.md)" in readme


def test_the_readme_maps_every_page_of_docs() -> None:
    """The README is the front door: every page in docs/ is reachable from its map."""
    readme = (ROOT / "README.md").read_text()
    unmapped = [p.name for p in sorted(DOCS.glob("*.md")) if f"(docs/{p.name})" not in readme]
    assert unmapped == []


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # no headings in code
    return {slug(h) for h in re.findall(r"^#+ (.+)$", text, re.M)}


def test_every_link_in_the_docs_leads_somewhere() -> None:
    """Relative links in the README and docs/ name files that exist and headings they have."""
    broken = []
    for page in [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # https:, mailto:: not ours to check offline
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in anchors(file):
                broken.append(f"{page.name}: {target} (no such heading)")
    assert broken == []


def test_the_protocol_document_covers_every_rpc_and_columnar_field() -> None:
    text = PROTOCOL.read_text()
    services = (
        pb.DESCRIPTOR.services_by_name["LstmStream"],
        oip_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"],
    )
    missing = [m.name for s in services for m in s.methods if f"`{m.name}" not in text]
    for message in (pb.EventBatch, pb.ResultBatch, pb.Result, pb.ModelInfo):
        missing += [
            f"{message.DESCRIPTOR.name}.{f.name}"
            for f in message.DESCRIPTOR.fields
            if not re.search(rf"`{f.name}`", text)
        ]
    assert missing == []


BIN = Path(sys.executable).parent
TROUBLESHOOTING = DOCS / "TROUBLESHOOTING.md"
PRINTED = [
    (["lstm-serve", "--model", "nope.onnx"], 1, "cannot read model nope.onnx: No such file"),
    (["lstm-serve", "--model-repository", "nowhere"], 1, "--model-repository nowhere: no such"),
    (["lstm-serve", "--state-store", "foo://x"], 2, "--state-store 'foo://x': expected memory"),
    (["lstm-serve", "--state-store", "sqlite:///nonexistent/dir/state.db"], 1, "no directory"),
    (["lstm-serve", "--max-sesions", "3"], 2, "unrecognized arguments: --max-sesions 3"),
    (["lstm-serve", "--tls-cert", "x.pem"], 2, "--tls-cert and --tls-key go together"),
    (["lstm-client", "--address", "127.0.0.1", "health"], 2, "has no port"),
    (["lstm-client", "--address", "127.0.0.1:50051", "health"], 3, "(connection refused)"),
]
"""Commands whose error the troubleshooting page quotes: (argv, exit code, part of it)."""


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def printed(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    port = str(closed_port())  # lstm-client's address: nothing listens there
    args = [str(BIN / argv[0]), *(a.replace("50051", port) for a in argv[1:])]
    if argv[0] == "lstm-serve":
        args += ["--port", "0", "--metrics-port", "0"]
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=60)
    done.stderr = done.stderr.replace(port, "50051")
    return done


def test_the_troubleshooting_page_quotes_the_errors_as_printed(tmp_path: Path) -> None:
    """Each quoted error is what the command prints today, in one line, with its exit code;
    a message that changes fails here until the page says the new one."""
    page = TROUBLESHOOTING.read_text()
    with ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(lambda case: printed(case[0], tmp_path), PRINTED))
    wrong = []
    for (argv, code, part), done in zip(PRINTED, runs):
        line = (done.stderr.strip().splitlines() or ["(nothing)"])[-1]
        quoted = f"`{line}`" in page or f"\n{line}\n" in page  # in a table, or a block
        if done.returncode != code or part not in line or not quoted:
            wrong.append(f"{' '.join(argv)}: exit {done.returncode}, {line}")
    assert wrong == []


REFUSED_LINES = [
    {"session_id": "a", "values": [0.5] * 31},
    '{"session_id": "a", "values": [NaN' + ", 0.5" * 31 + "]}",
    '{"session_id": "a", "values": [1e39' + ", 0.5" * 31 + "]}",
    {"session_id": "a", "value": [0.5] * 32},
    "not json",
    {"session_id": "b", "values": [0.5] * 32},
    {"session_id": "c", "values": [0.5] * 32},
    {"session_id": "d", "values": [0.5] * 32},
]
"""The lines whose refusals the troubleshooting page quotes (a server holding 2 sessions)."""


async def test_the_troubleshooting_page_quotes_refused_lines_as_printed(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    server = await start_server(max_sessions=2)
    events = tmp_path / "events.jsonl"
    events.write_text(
        "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in REFUSED_LINES)
    )
    address = f"127.0.0.1:{server.port}"
    done = await asyncio.to_thread(
        subprocess.run,
        [str(BIN / "lstm-client"), "--address", address, "stream", str(events)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, done.stderr
    printed = done.stderr.strip().splitlines()
    assert len(printed) == 6  # lines 1-5 and 8 refused; 6 and 7 answered
    page = TROUBLESHOOTING.read_text()
    assert [line for line in printed if f"`{line}`" not in page] == []
