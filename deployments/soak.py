"""`qwen3-stream soak`: long streams through the served pipeline, faster than real time, while the memory of every
process, the session store's memory and keys, and the K/V slots in use are sampled over time. Flat is the goal:
per-chunk compute is constant and every per-stream structure is bounded by a segment, so nothing may grow with
the length of a stream.

It starts its own local server (the tiny checkpoint by default: the serving machinery is what leaks, if anything
does), sends `streams` streams of `minutes` of audio each at once (one shared PCM16 buffer), and samples every
`interval_s`. Writes `soak.json`, `soak.md` (a table) and `soak.png` under `out`.
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
from pipeline.tiny_checkpoint import TOWER_OVERLAY_DIR, make_tiny_checkpoint

log = logging.getLogger(__name__)

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


@dataclass
class SoakResult:
    streams: int
    minutes: float
    samples: list[Sample] = field(default_factory=list)
    finals: int = 0
    errors: list[str] = field(default_factory=list)


def rss_mib(pid: int) -> float:
    """Resident memory of a process (Linux /proc), MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
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


async def _sample(started: float, heard: dict[int, int], pids: dict[str, int]) -> Sample:
    import redis.asyncio as aioredis
    from ray import serve

    store = server._embedded
    rss = {name: rss_mib(pid) for name, pid in pids.items() if Path(f"/proc/{pid}").exists()}
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
    return Sample(time.perf_counter() - started, slowest / SAMPLE_RATE / 60, rss, used, keys, slots)


def run_soak(streams: int, minutes: float, interval_s: float, max_new_tokens: int = 16) -> SoakResult:
    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = make_tiny_checkpoint(Path(scratch) / "tiny", with_tower=True)
        settings = server.ServerSettings(
            args={"model": str(checkpoint), "tower": str(checkpoint / TOWER_OVERLAY_DIR), "slots": streams,
                  "session": {"decode": {"max_new_tokens": max_new_tokens}}},
            deployment_options={
                name: {"num_replicas": 1, "ray_actor_options": {"num_cpus": 1}}
                for name in ("Ingress", "FeatureExtractor", "CausalEncoder", "Decoder")
            },
        )  # fmt: skip
        address = server.start(settings)
        try:
            return asyncio.run(_soak(address, streams, minutes, interval_s))
        finally:
            server.stop()


async def _soak(address: str, streams: int, minutes: float, interval_s: float) -> SoakResult:
    rng = np.random.default_rng(0)
    samples = int(minutes * 60 * SAMPLE_RATE)
    t = np.arange(samples, dtype=np.float32) / SAMPLE_RATE
    audio = ((0.05 + 0.1 * (1 + np.sin(2 * np.pi * 0.3 * t))) * rng.standard_normal(samples)).astype(np.float32)
    pcm = encode_pcm(audio, "pcm_s16le")
    del audio, t
    result = SoakResult(streams, minutes)
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
        while not all(task.done() for task in tasks):
            result.samples.append(await _sample(started, heard, pids))
            log.info("soak: %.1f min of audio per stream, %s", result.samples[-1].audio_min, result.samples[-1].rss_mib)
            await asyncio.wait(tasks, timeout=interval_s)
        result.samples.append(await _sample(started, heard, pids))
        for task in tasks:
            if task.exception() is not None:
                result.errors.append(f"{type(task.exception()).__name__}: {task.exception()}")
            elif task.result().final is not None:
                result.finals += 1
    return result


def write_report(result: SoakResult, out: Path) -> str:
    """soak.json, soak.md and soak.png under `out`; returns the table."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(asdict(result), indent=2))
    names = sorted({name for sample in result.samples for name in sample.rss_mib})
    header = "| time (s) | audio / stream (min) | " + " | ".join(f"{n} RSS (MiB)" for n in names)
    lines = [
        f"Soak: {result.streams} streams x {result.minutes:g} min of audio, served as fast as possible "
        f"({result.finals} finals, {len(result.errors)} errors)",
        "",
        header + " | store memory (MiB) | store keys | encoder slots | decoder slots |",
        "|" + "---:|" * (len(names) + 6),
    ]
    step = max(1, len(result.samples) // 12)
    for index in sorted(set(range(0, len(result.samples), step)) | {len(result.samples) - 1}):
        sample = result.samples[index]
        rss = " | ".join(f"{sample.rss_mib.get(n, float('nan')):.0f}" for n in names)
        lines.append(
            f"| {sample.elapsed_s:.0f} | {sample.audio_min:.1f} | {rss} | {sample.store_used_mib:.2f} | "
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
