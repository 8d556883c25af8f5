"""The soak run on a short scale: it streams through a real served pipeline and reports flat, bounded state."""

from __future__ import annotations

from pathlib import Path

from deployments.soak import run_soak, write_report


def test_a_short_soak_samples_every_process_and_frees_its_slots(tmp_path: Path) -> None:
    result = run_soak(streams=2, minutes=0.75, interval_s=2.0, churn=30)
    assert result.errors == [] and result.finals == 2
    # 30 more streams opened and dropped meanwhile (3 of them after a Result, holding slots): nothing stays.
    assert result.samples[-1].dropped == 30 and result.leases_left == 0 and result.keys_without_ttl == 0
    assert result.settle_s >= 0  # slots and leases all free (at the latest by the stages' idle expiry)
    first, last = result.samples[0], result.samples[-1]
    # Thread pools may grow to their bounded size under the churn's concurrency; one thread per dropped stream
    # would be 30 more.
    assert last.threads["ingress"] <= first.threads["ingress"] + 8
    assert len(result.samples) >= 2
    last = result.samples[-1]
    assert {"ingress", "features", "encoder", "decoder", "proxy", "store"} <= set(last.rss_mib)
    assert last.slots_in_use == {"encoder": 0, "decoder": 0}  # every stream released its K/V slots
    assert last.store_keys <= 4 * 2 + 3 * 30  # finished and dropped sessions: keys kept for a resume, with TTLs
    assert abs(last.audio_min - 0.75) < 0.05
    table = write_report(result, tmp_path)
    assert "| store keys |" in table and (tmp_path / "soak.png").stat().st_size > 10_000
