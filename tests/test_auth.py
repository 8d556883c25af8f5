"""API keys: parsing, constant-shape authentication, per-key stream quotas; no key is ever echoed."""

from __future__ import annotations

import pytest

from deployments.auth import KeyRing, QuotaExceeded, Unauthenticated, load_keys, parse_keys

SECRET = "s3cr3t-key-0123456789"
KEYS = f"# team keys\nteam-a:{SECRET}:2\nteam-b:another-key-0123456789\n"


def test_keys_parse_with_names_and_quotas_and_keep_only_digests() -> None:
    keys = parse_keys(KEYS)
    assert [(k.name, k.max_streams) for k in keys] == [("team-a", 2), ("team-b", None)]
    assert all(SECRET.encode() not in k.digest for k in keys) and len(keys[0].digest) == 32


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("team-a:short", "entry 1: expected name:key"),
        (f"team-a:{SECRET}:0", "max_streams is '0'"),
        (f"team-a:{SECRET}\nteam-a:{SECRET}x", "names repeat"),
        (f":{SECRET}", "entry 1"),
    ],
)
def test_bad_entries_are_refused_without_echoing_the_key(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as caught:
        parse_keys(text)
    assert SECRET not in str(caught.value)


def test_only_a_known_bearer_key_authenticates() -> None:
    ring = KeyRing(parse_keys(KEYS))
    assert ring.authenticate([("authorization", f"Bearer {SECRET}")]).name == "team-a"
    assert ring.authenticate([("Authorization", f"bearer {SECRET}")]).name == "team-a"
    for metadata in ([], [("authorization", SECRET)], [("authorization", f"Bearer {SECRET}x")], [("authorization", "Basic abc")]):
        with pytest.raises(Unauthenticated, match="missing or unknown API key") as caught:
            ring.authenticate(metadata)
        assert SECRET not in str(caught.value)


def test_a_key_holds_at_most_its_quota_of_streams() -> None:
    ring = KeyRing(parse_keys(KEYS))
    team_a = ring.authenticate([("authorization", f"Bearer {SECRET}")])
    ring.admit(team_a)
    ring.admit(team_a)
    with pytest.raises(QuotaExceeded, match="holds 2 streams; its quota is 2"):
        ring.admit(team_a)
    ring.leave(team_a)
    ring.admit(team_a)


def test_keys_come_from_a_file_or_the_environment(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("QWEN3_STREAM_API_KEYS", raising=False)
    assert load_keys(None) is None
    path = tmp_path / "keys"
    path.write_text(KEYS)
    assert [k.name for k in load_keys(str(path))] == ["team-a", "team-b"]
    monkeypatch.setenv("QWEN3_STREAM_API_KEYS", f"env:{SECRET}")
    assert [k.name for k in load_keys(None)] == ["env"]
