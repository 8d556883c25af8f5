"""The ```python examples of README.md run as written, in order, in one namespace (as a reader would paste them).

The examples are fragments of a program, so they use a few names the reader supplies. `PRELUDE` defines those,
and nothing else, before the first block that uses them:

- `pcm_chunk`: "float32 16 kHz mono, any chunk size": four seconds of seeded noise (two causal blocks);
- `roll_event`: a segment-roll event carrying a checkpoint, as a client would have kept from another engine: made
  by streaming 20 s of noise through a session on the README's own model (the tiny model rolls at 15.4 s).

One substitution: the tiny checkpoint goes to a temporary directory instead of /tmp/qwen3-tiny, so that parallel
runs (and the README's shell demo) never write the same files at once. Blocks with top-level `await` run as the
asyncio REPL (`python -m asyncio`) runs them: compiled with top-level await allowed, awaited in an event loop.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
README_CHECKPOINT_DIR = "/tmp/qwen3-tiny"
# A block that never returns is a broken example: fail instead of hanging the suite.
BLOCK_TIMEOUT_SEC = 120


def _pcm_chunk(namespace: dict[str, Any]) -> np.ndarray:
    return (0.1 * np.random.default_rng(0).standard_normal(4 * 16_000)).astype(np.float32)


def _roll_event(namespace: dict[str, Any]) -> Any:
    from pipeline.options import SessionOptions
    from pipeline.session import StreamingSession

    session = StreamingSession(namespace["model"], SessionOptions(language="en"))
    noise = (0.1 * np.random.default_rng(1).standard_normal(20 * 16_000)).astype(np.float32)
    for start in range(0, noise.size, 16_000):
        for event in session.push_audio(noise[start : start + 16_000]):
            if event.checkpoint is not None:
                return event
    raise AssertionError("20 s of noise made no segment roll on the tiny model")


PRELUDE: dict[str, Callable[[dict[str, Any]], Any]] = {"pcm_chunk": _pcm_chunk, "roll_event": _roll_event}


def python_blocks(markdown: str) -> list[str]:
    """The bodies of the ```python fences, in order."""
    return [match.group(1) for match in re.finditer(r"^```python\n(.*?)^```", markdown, flags=re.S | re.M)]


def _free_names(code: str) -> set[str]:
    return {node.id for node in ast.walk(ast.parse(code)) if isinstance(node, ast.Name)}


def run_block(source: str, namespace: dict[str, Any], name: str) -> None:
    """Execute one block in `namespace`, top-level `await` allowed (as in `python -m asyncio`)."""
    for free in sorted(_free_names(source) & PRELUDE.keys() - namespace.keys()):
        namespace[free] = PRELUDE[free](namespace)
    code = compile(source, name, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    if code.co_flags & inspect.CO_COROUTINE:

        async def main() -> None:
            await asyncio.wait_for(eval(code, namespace), BLOCK_TIMEOUT_SEC)

        asyncio.run(main())
    else:
        exec(code, namespace)


BLOCKS = python_blocks(README.read_text())


def block_with(marker: str) -> str:
    """The one README block that uses `marker` (blocks are found by what they show, not by position)."""
    found = [block for block in BLOCKS if marker in block]
    assert len(found) == 1, f"expected one README python block using {marker!r}, found {len(found)}"
    return found[0]


@pytest.fixture(scope="module")
def readme_namespace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The namespace after the first block (the Python API on the tiny checkpoint), shared by the later ones."""
    checkpoint_dir = tmp_path_factory.mktemp("readme") / "qwen3-tiny"
    api = block_with("load_model")
    assert README_CHECKPOINT_DIR in api, "the README's Python API example no longer writes /tmp/qwen3-tiny"
    namespace: dict[str, Any] = {"__name__": "readme"}
    run_block(api.replace(README_CHECKPOINT_DIR, str(checkpoint_dir)), namespace, "README.md Python API block")
    return namespace


def test_readme_has_the_python_api_engine_and_client_examples() -> None:
    assert len(BLOCKS) == 4  # the client example runs against a real server in tests/test_served.py
    block_with("load_model"), block_with("AsyncStreamingEngine"), block_with("RecognizerClient")
    block_with("finalize_now")


def test_live_semantics_example_runs(readme_namespace: dict[str, Any]) -> None:
    run_block(block_with("finalize_now"), readme_namespace, "README.md live semantics block")
    events, live = readme_namespace["events"], readme_namespace["live"]
    assert events[-1].kind == "final" and live.options.context == "Kubernetes"
    assert live.blocks_skipped + live.blocks_encoded > 0


def test_python_api_example_runs_on_the_tiny_checkpoint(readme_namespace: dict[str, Any]) -> None:
    from pipeline.session import StreamingSession

    session = readme_namespace["session"]
    assert isinstance(session, StreamingSession)
    assert readme_namespace["final_events"][-1].kind == "final"
    assert isinstance(session.transcript, str) and session.token_ids


def test_engine_example_runs_after_the_python_api_example(readme_namespace: dict[str, Any]) -> None:
    namespace = dict(readme_namespace)
    run_block(block_with("AsyncStreamingEngine"), namespace, "README.md engine block")
    engine = namespace["engine"]
    assert isinstance(namespace["offset"], int) and namespace["offset"] > 0  # where call-7 resumes, in samples
    assert "call-7" in engine.active_streams
