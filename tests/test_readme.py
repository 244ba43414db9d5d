"""The README's Python examples run as written against a real server."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from pathlib import Path

from service.server import Server
from tests.conftest import ServerFactory

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


async def test_readme_python_examples_run(
    server: Server, start_server: ServerFactory, tmp_path: Path
) -> None:
    second = await start_server()  # the second replica of the sharding example
    blocks = python_blocks()
    assert len(blocks) >= 2
    outputs = []
    for block in blocks:
        code = block.replace("127.0.0.1:50051", f"127.0.0.1:{server.port}")
        code = code.replace("127.0.0.1:50052", f"127.0.0.1:{second.port}")
        # In a thread: the server under test runs on this event loop.
        result = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-c", code],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        outputs.append(result.stdout)
    text = "".join(outputs)
    assert "library: [2, 1, 3] (3, 64) True" in text
    assert "library stream step 3 SERVING" in text
    assert "columnar: (1000, 64) all ok: True" in text
    assert "stream step 4" in text
    assert "sharded: True [1, 1, 1] True" in text
    assert (tmp_path / "params.npz").exists()


def test_every_flag_is_documented() -> None:
    import dataclasses

    from service.settings import Settings

    text = README.read_text()
    missing = [
        f.name
        for f in dataclasses.fields(Settings)
        if f"`--{f.name.replace('_', '-')}`" not in text
    ]
    assert not missing, f"flags missing from the README: {missing}"
