"""One transcript of record: the concatenation of every committed word is what the last event's `transcript`,
`session.transcript` and (through the API) the final object's text say, for any stream."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.causal_encoder import CausalEncoderOptions
from pipeline.checkpoint import ASRModel
from pipeline.options import SessionOptions
from pipeline.session import StreamingSession
from tests.test_session import _audio, model  # noqa: F401  (model is a fixture)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    seconds=st.floats(min_value=0.5, max_value=9.0),
    seed=st.integers(min_value=0, max_value=10_000),
    chunk=st.sampled_from([160, 1280, 6400, 32000]),
    block_frames=st.sampled_from([96, 192]),
    hold_back=st.integers(min_value=0, max_value=6),
)
def test_committed_words_are_the_transcript_everywhere(
    model: ASRModel, seconds: float, seed: int, chunk: int, block_frames: int, hold_back: int
) -> None:
    options = SessionOptions.from_dict({
        "decode": {"max_new_tokens": 10},
        "segment": {"segment_max_steps": 40, "segment_punct_min_steps": 30},
        "encoder": {"block_frames": block_frames},
        "commit": {"hold_back_words": hold_back},
    })
    session = StreamingSession(model, options)
    audio = _audio(seconds, seed=seed)
    events = []
    for start in range(0, audio.size, chunk):
        events += session.push_audio(audio[start : start + chunk])
    events += session.finish()
    committed = [word.text for event in events for word in event.new_words]
    record = " ".join(committed)
    assert events[-1].kind == "final"
    assert events[-1].transcript == session.transcript == record
    for index, event in enumerate(events):  # every event's transcript is the record so far
        assert event.transcript == " ".join(w.text for e in events[: index + 1] for w in e.new_words)
    # The model's own final text is kept beside it; where the two disagree, the disagreement is counted.
    assert events[-1].hypothesis.split() == session.final_hypothesis_text.split()
    if session.revised_words == 0:
        assert record.split() == session.final_hypothesis_text.split()


def test_word_times_follow_the_real_update_interval() -> None:
    """The commit-lag estimate uses the audio between updates: 1.92 s at 192 frames, 0.96 s at 96, doubled by
    two blocks per update (the reference's 2.0 s is its windowed update)."""
    assert SessionOptions().update_interval_sec == 1.92
    assert SessionOptions(encoder=CausalEncoderOptions(96)).update_interval_sec == 0.96
    assert SessionOptions(encoder=CausalEncoderOptions(96), blocks_per_update=2).update_interval_sec == 1.92
    assert SessionOptions(blocks_per_update=2).update_interval_sec == 3.84
    assert SessionOptions.windowed().update_interval_sec == 2.0


def test_sessions_time_words_with_their_interval(model: ASRModel) -> None:  # noqa: F811
    lags = {}
    for options in (SessionOptions(encoder=CausalEncoderOptions(96)), SessionOptions(), SessionOptions(blocks_per_update=2)):
        session = StreamingSession(model, options)
        assert session.committer.update_interval_sec == options.update_interval_sec
        lags[options.update_interval_sec] = session.committer.options.commit_lag_sec(options.update_interval_sec)
    # Each extra second between updates adds half a second to the expected lag.
    assert abs(lags[1.92] - lags[0.96] - 0.48) < 1e-9
    assert abs(lags[3.84] - lags[1.92] - 0.96) < 1e-9
