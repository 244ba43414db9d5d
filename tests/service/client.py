"""Test-side helpers: build requests in either form and read responses back uniformly."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lstm_stream.v1 import lstm_stream_pb2 as pb


@dataclass
class Ev:
    session_id: str
    values: np.ndarray | Sequence[float]
    seq: int = 0
    reset: bool = False


@dataclass
class Answer:
    step: int
    output: np.ndarray
    code: int
    duplicate: bool
    error: str


def request(
    events: Sequence[Ev], columnar: bool = False, include_state: bool = False
) -> pb.StepRequest:
    if not columnar:
        return pb.StepRequest(
            events=[
                pb.Event(
                    session_id=e.session_id,
                    seq=e.seq,
                    values=list(map(float, e.values)),
                    reset=e.reset,
                )
                for e in events
            ],
            include_state=include_state,
        )
    values = np.array([np.asarray(e.values, np.float32) for e in events], np.float32)
    return pb.StepRequest(
        batch=pb.EventBatch(
            session_ids=[e.session_id for e in events],
            seqs=[e.seq for e in events],
            values=values.astype("<f4").tobytes(),
            resets=[e.reset for e in events],
        )
    )


def answers(response: pb.StepResponse, output_size: int = 64) -> list[Answer]:
    if response.HasField("batch"):
        b = response.batch
        outputs = np.frombuffer(b.outputs, "<f4").reshape(len(b.steps), output_size)
        return [
            Answer(b.steps[i], outputs[i], b.codes[i], b.duplicates[i], b.errors[i])
            for i in range(len(b.steps))
        ]
    return [
        Answer(r.step, np.array(r.output, np.float32), r.code, r.duplicate, r.error)
        for r in response.results
    ]
