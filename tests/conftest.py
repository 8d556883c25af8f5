"""Shared fixtures: one tiny checkpoint (with causal tower overlay) per test session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

# Tiny models run many small ops: one thread avoids OpenMP spin contention on the 2-core CI machine.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pipeline.tiny_checkpoint import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model", seed=0, with_tower=True)
