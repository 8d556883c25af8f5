"""API keys for the gRPC API: `authorization: Bearer <key>` metadata, per-key stream quotas.

Keys come from a file (or the `QWEN3_STREAM_API_KEYS` environment variable, which a Kubernetes Secret can fill),
one per line: `name:key` or `name:key:max_streams`; blank lines and `#` comments are skipped. Only the keys' SHA-256
digests are kept in memory, and a presented key is compared with every digest in constant time, so neither the
timing nor the answer tells a near miss from a stranger. Quotas count the streams a key holds open on one ingress
replica (with several replicas, a key may hold up to quota × replicas in all).
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

#: The environment variable that may hold the keys (same format as the file, lines or commas).
KEYS_ENV = "QWEN3_STREAM_API_KEYS"


class Unauthenticated(PermissionError):
    """No key, or one this server does not know (one answer for both)."""


class QuotaExceeded(RuntimeError):
    """The key already holds as many streams as its quota allows."""


@dataclass(frozen=True)
class ApiKey:
    name: str
    digest: bytes  # sha256 of the key
    max_streams: int | None  # None: no quota


def parse_keys(text: str) -> list[ApiKey]:
    """`name:key[:max_streams]` per line (or comma); raises ValueError naming the bad entry (never the key)."""
    keys = []
    for number, raw in enumerate(text.replace(",", "\n").splitlines(), start=1):
        entry = raw.split("#", 1)[0].strip()
        if not entry:
            continue
        parts = entry.split(":")
        if len(parts) not in (2, 3) or not parts[0] or len(parts[1]) < 16:
            raise ValueError(f"API key entry {number}: expected name:key[:max_streams] with a key of >= 16 characters")
        quota = None
        if len(parts) == 3:
            if not parts[2].isdigit() or int(parts[2]) < 1:
                raise ValueError(f"API key entry {number} ({parts[0]}): max_streams is {parts[2]!r}; expected >= 1")
            quota = int(parts[2])
        keys.append(ApiKey(parts[0], hashlib.sha256(parts[1].encode()).digest(), quota))
    if len({key.name for key in keys}) != len(keys):
        raise ValueError("API key names repeat; expected one entry per name")
    return keys


def load_keys(path: str | None) -> list[ApiKey] | None:
    """The keys from `path`, else from `QWEN3_STREAM_API_KEYS`; None when neither is set (no authentication)."""
    if path:
        return parse_keys(Path(path).read_text())
    if os.environ.get(KEYS_ENV):
        return parse_keys(os.environ[KEYS_ENV])
    return None


class KeyRing:
    """Who may open streams, and how many each."""

    def __init__(self, keys: list[ApiKey]) -> None:
        self.keys = keys
        self.open: Counter[str] = Counter()

    def authenticate(self, metadata: list[tuple[str, str]]) -> ApiKey:
        """The key named by `authorization: Bearer <key>`; Unauthenticated otherwise."""
        presented = next((value for name, value in metadata if name.lower() == "authorization"), "")
        scheme, _, token = presented.partition(" ")
        digest = hashlib.sha256(token.strip().encode()).digest()
        found = None
        for key in self.keys:  # every digest is compared: the time does not depend on which one matches
            if hmac.compare_digest(key.digest, digest) and scheme.lower() == "bearer":
                found = key
        if found is None:
            raise Unauthenticated("missing or unknown API key (send metadata `authorization: Bearer <key>`)")
        return found

    def admit(self, key: ApiKey) -> None:
        """Count a stream of `key`; QuotaExceeded when it holds its quota already. Pair with `leave`."""
        if key.max_streams is not None and self.open[key.name] >= key.max_streams:
            raise QuotaExceeded(f"API key {key.name!r} holds {self.open[key.name]} streams; its quota is {key.max_streams}")
        self.open[key.name] += 1

    def leave(self, key: ApiKey) -> None:
        self.open[key.name] -= 1
