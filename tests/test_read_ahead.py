"""The ingress reads a stream's requests ahead of the one it runs: audio goes to the driver as it arrives, in
order, never past a request still waiting its turn, and only so much of it (no Ray here: a fake client)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from deployments.grpc_api import InvalidRequest
from deployments.ingress import READ_AHEAD_SECONDS, ReadAhead
from pipeline.features import SAMPLE_RATE
from protos.qwen3stream.v1 import asr_pb2


class HeldAudio:
    """What `ReadAhead` needs of a driver: `hold_audio`; records each chunk's first sample (its label)."""

    def __init__(self) -> None:
        self.held: list[float] = []

    def hold_audio(self, pcm: np.ndarray) -> None:
        self.held.append(round(float(pcm[0]) * 32768))


def _audio(label: int, samples: int = 1600) -> asr_pb2.RecognizeRequest:
    return asr_pb2.RecognizeRequest(audio=asr_pb2.AudioChunk(data=np.full(samples, label, "<i2").tobytes()))


FINALIZE = asr_pb2.RecognizeRequest(control=asr_pb2.Control(finalize=asr_pb2.Finalize()))


def _client(requests: list[asr_pb2.RecognizeRequest | Exception], sent: list[int] | None = None):  # noqa: ANN202
    """`read` for `ReadAhead`: the requests in order, then None (the half-close); counts what was read."""
    pending = list(requests)

    async def read() -> asr_pb2.RecognizeRequest | None:
        await asyncio.sleep(0)
        if not pending:
            return None
        request = pending.pop(0)
        if sent is not None:
            sent.append(1)
        if isinstance(request, Exception):
            raise request
        return request

    return read


def test_audio_is_held_as_it_arrives_while_the_ingress_is_busy_and_taken_together() -> None:
    async def main() -> tuple[list[float], asr_pb2.RecognizeRequest, int]:
        driver = HeldAudio()
        reader = ReadAhead(_client([_audio(1), _audio(2), _audio(3)]), driver, asr_pb2.PCM_S16LE)
        first = await reader.next()
        await asyncio.sleep(0.01)  # the ingress is busy: the rest arrive meanwhile
        held_while_busy = list(driver.held)
        rest = await reader.next()
        assert await reader.next() is None
        return held_while_busy, first, rest.samples

    held_while_busy, first, rest_samples = asyncio.run(main())
    assert held_while_busy == [1, 2, 3]
    assert first.held and first.samples == 1600
    assert rest_samples == 3200  # the two held behind the first come as one


def test_audio_behind_a_finalize_waits_until_the_ingress_takes_the_finalize() -> None:
    async def main() -> list[tuple[str, list[float]]]:
        driver = HeldAudio()
        reader = ReadAhead(_client([_audio(1), FINALIZE, _audio(2), _audio(3)]), driver, asr_pb2.PCM_S16LE)
        seen = []
        while (arrival := await reader.next()) is not None:
            await asyncio.sleep(0.01)  # busy with it
            seen.append((arrival.request.WhichOneof("request"), list(driver.held)))
        return seen

    seen = asyncio.run(main())
    # While the Finalize ran, only the audio before it was held; the audio behind it is held as it is taken.
    assert seen == [("audio", [1]), ("control", [1]), ("audio", [1, 2]), ("audio", [1, 2, 3])]


def test_reading_pauses_while_enough_audio_waits_for_the_ingress() -> None:
    chunk = SAMPLE_RATE // 2
    count = 4 * int(READ_AHEAD_SECONDS * 2)

    async def main() -> tuple[int, int]:
        sent: list[int] = []
        reader = ReadAhead(_client([_audio(i, chunk) for i in range(count)], sent), HeldAudio(), asr_pb2.PCM_S16LE)
        await asyncio.sleep(0.05)  # the ingress is busy: the reader reads ahead, up to its bound
        read_while_busy = len(sent)
        await reader.next()  # taking what waits makes room
        await asyncio.sleep(0.05)
        return read_while_busy, len(sent)

    read_while_busy, read_after = asyncio.run(main())
    assert read_while_busy == READ_AHEAD_SECONDS * 2
    assert read_after == 2 * READ_AHEAD_SECONDS * 2


def test_a_bad_request_is_raised_in_its_turn() -> None:
    async def main() -> list[str]:
        reader = ReadAhead(
            _client([_audio(1), asr_pb2.RecognizeRequest(audio=asr_pb2.AudioChunk(data=b"\x00\x01\x02")), _audio(2)]),
            HeldAudio(),
            asr_pb2.PCM_S16LE,
        )
        kinds = [(await reader.next()).request.WhichOneof("request")]
        with pytest.raises(InvalidRequest, match="3 bytes"):
            await reader.next()
        return kinds

    assert asyncio.run(main()) == ["audio"]
