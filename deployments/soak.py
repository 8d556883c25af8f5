"""`qwen3-stream soak`: long streams through the served pipeline, faster than real time, while the memory of every
process, the session store's memory and keys, and the K/V slots in use are sampled over time. Flat is the goal:
per-chunk compute is constant and every per-stream structure is bounded by a segment, so nothing may grow with
the length of a stream.

It starts its own local server (the tiny checkpoint by default: the serving machinery is what leaks, if anything
does), sends `streams` streams of `minutes` of audio each at once (one shared PCM16 buffer), and samples every
`interval_s`. Writes `soak.json`, `soak.md` (a table) and `soak.png` under `out`.

With `churn`, that many more streams are opened and dropped while the long ones run (at most `CHURN_CONCURRENCY`
at a time): every tenth after its first Result (holding K/V slots), the rest right after Started. Nothing may
stay behind: slots, leases, threads; the store keeps only what a resume needs, each key with a TTL.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from deployments import server
from deployments.client import RecognizerClient, StreamOptions, encode_pcm, wait_until_serving
from pipeline.features import SAMPLE_RATE
from pipeline.stages import IDLE_STATE_S
from pipeline.tiny_checkpoint import TOWER_OVERLAY_DIR, make_tiny_checkpoint

log = logging.getLogger(__name__)

#: Dropped streams in flight at once during a churn.
CHURN_CONCURRENCY = 32
#: The longest wait after the last stream for its cleanup (slots and leases free): past the stages' idle expiry,
#: which frees the slot of a stream whose release overtook its last request.
SETTLE_S = IDLE_STATE_S + 30.0

#: Processes sampled, by the title Ray gives them (`ray::ServeReplica:<app>:<Deployment>`, `ray::ProxyActor`).
PROCESS_TITLES = {
    "ingress": "ServeReplica:qwen3-stream:Ingress",
    "features": "ServeReplica:qwen3-stream:FeatureExtractor",
    "encoder": "ServeReplica:qwen3-stream:CausalEncoder",
    "decoder": "ServeReplica:qwen3-stream:Decoder",
    "proxy": "ProxyActor",
}


@dataclass
class Sample:
    elapsed_s: float
    audio_min: float  # audio processed per stream so far (minutes, the slowest stream)
    rss_mib: dict[str, float]
    store_used_mib: float
    store_keys: int
    slots_in_use: dict[str, int]
    threads: dict[str, int] = field(default_factory=dict)  # per process
    dropped: int = 0  # churned streams dropped so far


@dataclass
class SoakResult:
    streams: int
    minutes: float
    samples: list[Sample] = field(default_factory=list)
    finals: int = 0
    errors: list[str] = field(default_factory=list)
    churn: int = 0
    leases_left: int = -1  # after the churn: leases still held by dropped streams (-1: no churn)
    settle_s: float = 0.0  # how long after the last stream the slots and leases were all free (-1: never)
    keys_without_ttl: int = -1


def rss_mib(pid: int) -> float:
    """Resident memory of a process (Linux /proc), MiB."""
    return _status_field(pid, "VmRSS") / 1024


def thread_count(pid: int) -> int:
    return int(_status_field(pid, "Threads"))


def _status_field(pid: int, name: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{name}:"):
            return float(line.split()[1])
    return 0.0


def find_processes() -> dict[str, int]:
    """The pid of each sampled process, by its title (the first match)."""
    found: dict[str, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        for name, title in PROCESS_TITLES.items():
            if name not in found and re.search(rf"ray::{re.escape(title)}\b", command):
                found[name] = int(entry.name)
    return found


async def _sample(started: float, heard: dict[int, int], pids: dict[str, int], dropped: int = 0) -> Sample:
    import redis.asyncio as aioredis
    from ray import serve

    store = server._embedded
    alive = {name: pid for name, pid in pids.items() if Path(f"/proc/{pid}").exists()}
    rss = {name: rss_mib(pid) for name, pid in alive.items()}
    threads = {name: thread_count(pid) for name, pid in alive.items()}
    if store is not None and store.pid is not None:
        rss["store"] = rss_mib(store.pid)
    client = aioredis.from_url(store.url) if store is not None else None
    used, keys = 0.0, 0
    if client is not None:
        info = await client.info("memory")
        used, keys = info["used_memory"] / 2**20, await client.dbsize()
        await client.aclose()
    slots = {}
    for stage, deployment in (("encoder", "CausalEncoder"), ("decoder", "Decoder")):
        _, slots[stage] = await serve.get_deployment_handle(deployment, server.APP_NAME).slots_in_use.remote()
    slowest = min(heard.values(), default=0)
    return Sample(time.perf_counter() - started, slowest / SAMPLE_RATE / 60, rss, used, keys, slots, threads, dropped)


def run_soak(streams: int, minutes: float, interval_s: float, max_new_tokens: int = 16, churn: int = 0) -> SoakResult:
    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = make_tiny_checkpoint(Path(scratch) / "tiny", with_tower=True)
        settings = server.ServerSettings(
            args={"model": str(checkpoint), "tower": str(checkpoint / TOWER_OVERLAY_DIR), "slots": streams + (CHURN_CONCURRENCY if churn else 0),
                  "session": {"decode": {"max_new_tokens": max_new_tokens}}},
            deployment_options={
                name: {"num_replicas": 1, "ray_actor_options": {"num_cpus": 1}}
                for name in ("Ingress", "FeatureExtractor", "CausalEncoder", "Decoder")
            },
        )  # fmt: skip
        address = server.start(settings)
        try:
            return asyncio.run(_soak(address, streams, minutes, interval_s, churn))
        finally:
            server.stop()


async def _soak(address: str, streams: int, minutes: float, interval_s: float, churn: int) -> SoakResult:
    rng = np.random.default_rng(0)
    samples = int(minutes * 60 * SAMPLE_RATE)
    t = np.arange(samples, dtype=np.float32) / SAMPLE_RATE
    audio = ((0.05 + 0.1 * (1 + np.sin(2 * np.pi * 0.3 * t))) * rng.standard_normal(samples)).astype(np.float32)
    pcm = encode_pcm(audio, "pcm_s16le")
    del audio, t
    result = SoakResult(streams, minutes, churn=churn)
    churned: list[str] = []
    heard = dict.fromkeys(range(streams), 0)
    async with RecognizerClient(address) as client:
        await wait_until_serving(client.channel, 120)
        pids = find_processes()

        def on_result(index: int):  # noqa: ANN202
            def note(response) -> None:  # noqa: ANN001
                heard[index] = max(heard[index], response.audio_processed_ms * SAMPLE_RATE // 1000)

            return note

        started = time.perf_counter()
        tasks = [
            asyncio.create_task(client.recognize(pcm, StreamOptions(chunk_ms=1000), on_result=on_result(i)))
            for i in range(streams)
        ]
        churning = asyncio.create_task(_churn(client.channel, churn, pcm[: 2 * SAMPLE_RATE * 2], churned))
        while not all(task.done() for task in [*tasks, churning]):
            result.samples.append(await _sample(started, heard, pids, len(churned)))
            log.info("soak: %.1f min of audio per stream, %d dropped, %s", result.samples[-1].audio_min,
                     len(churned), result.samples[-1].rss_mib)  # fmt: skip
            await asyncio.wait([*tasks, churning], timeout=interval_s)
        # The last drops' cleanup runs on the ingress once their cancel reaches it: wait for it, a bounded time.
        ended = time.perf_counter()
        while True:
            result.samples.append(await _sample(started, heard, pids, len(churned)))
            if churn:
                result.leases_left, result.keys_without_ttl = await _leftovers(set(churned))
            idle = not any(result.samples[-1].slots_in_use.values()) and result.leases_left <= 0
            if idle or time.perf_counter() > ended + SETTLE_S:
                break
            await asyncio.sleep(1.0)
        result.settle_s = time.perf_counter() - ended if idle else -1.0
        if churning.exception() is not None:
            result.errors.append(f"churn: {type(churning.exception()).__name__}: {churning.exception()}")
        for task in tasks:
            if task.exception() is not None:
                result.errors.append(f"{type(task.exception()).__name__}: {task.exception()}")
            elif task.result().final is not None:
                result.finals += 1
    return result


async def _churn(channel, count: int, pcm: bytes, dropped: list[str]) -> None:  # noqa: ANN001 (a grpc.aio channel)
    """Open `count` streams and drop them (cancel the call): every tenth after its first Result, the others right
    after Started. Appends each dropped session's id."""
    from protos.qwen3stream.v1 import asr_pb2, asr_pb2_grpc

    stub = asr_pb2_grpc.RecognizerStub(channel)
    config = StreamOptions().to_proto()
    gate = asyncio.Semaphore(CHURN_CONCURRENCY)

    async def one(index: int) -> None:
        async with gate:
            call = stub.Recognize()
            await call.write(asr_pb2.RecognizeRequest(config=config))
            started = await call.read()
            if index % 10 == 0:
                await call.write(asr_pb2.RecognizeRequest(audio=asr_pb2.AudioChunk(data=pcm)))
                while (await call.read()).WhichOneof("response") != "result":
                    pass
            call.cancel()
            dropped.append(started.started.session_id)

    await asyncio.gather(*(one(index) for index in range(count)))


async def _leftovers(session_ids: set[str]) -> tuple[int, int]:
    """Leases the dropped sessions still hold, and keys of the store without a TTL."""
    import redis.asyncio as aioredis

    client = aioredis.from_url(server._embedded.url)
    leases, without_ttl = 0, 0
    async for key in client.scan_iter(count=1000):
        name = key.decode()
        if name.endswith(":lease") and name.split("{", 1)[-1].split("}", 1)[0] in session_ids:
            leases += 1
        if await client.pttl(key) < 0:
            without_ttl += 1
    await client.aclose()
    return leases, without_ttl


def write_report(result: SoakResult, out: Path) -> str:
    """soak.json, soak.md and soak.png under `out`; returns the table."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(asdict(result), indent=2))
    names = sorted({name for sample in result.samples for name in sample.rss_mib})
    header = "| time (s) | audio / stream (min) | dropped | " + " | ".join(f"{n} RSS MiB / threads" for n in names)
    lines = [
        f"Soak: {result.streams} streams x {result.minutes:g} min of audio, served as fast as possible "
        f"({result.finals} finals, {len(result.errors)} errors)"
        + (f"; {result.churn} more streams opened and dropped meanwhile: {result.leases_left} leases left, "
           f"{result.keys_without_ttl} store keys without a TTL" if result.churn else "")
        + f"; slots and leases free {result.settle_s:.0f} s after the last stream" * (result.settle_s >= 0),
        "",
        header + " | store memory (MiB) | store keys | encoder slots | decoder slots |",
        "|" + "---:|" * (len(names) + 7),
    ]
    step = max(1, len(result.samples) // 12)
    for index in sorted(set(range(0, len(result.samples), step)) | {len(result.samples) - 1}):
        sample = result.samples[index]
        rss = " | ".join(f"{sample.rss_mib.get(n, float('nan')):.0f} / {sample.threads.get(n, 0)}" for n in names)
        lines.append(
            f"| {sample.elapsed_s:.0f} | {sample.audio_min:.1f} | {sample.dropped} | {rss} | {sample.store_used_mib:.2f} | "
            f"{sample.store_keys} | {sample.slots_in_use['encoder']} | {sample.slots_in_use['decoder']} |"
        )
    table = "\n".join(lines)
    (out / "soak.md").write_text(table + "\n")
    _plot(result, names, out / "soak.png")
    return table


def _plot(result: SoakResult, names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    minutes = [s.audio_min for s in result.samples]
    figure, (memory, store) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in names:
        memory.plot(minutes, [s.rss_mib.get(name, np.nan) for s in result.samples], label=name)
    memory.set(xlabel="audio per stream (min)", ylabel="RSS (MiB)", title="process memory")
    memory.legend(fontsize=8)
    store.plot(minutes, [s.store_keys for s in result.samples], label="store keys")
    store.plot(minutes, [s.slots_in_use["decoder"] for s in result.samples], label="decoder slots in use")
    store.plot(minutes, [s.store_used_mib for s in result.samples], label="store memory (MiB)")
    store.set(xlabel="audio per stream (min)", title="session store and K/V slots")
    store.legend(fontsize=8)
    figure.suptitle(f"soak: {result.streams} streams x {result.minutes:g} min")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
