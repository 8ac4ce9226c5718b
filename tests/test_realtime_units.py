"""The Realtime API's pure parts: client events refused by name, PCM16 in base64, and the
turn rules applied to appended audio (`voice.realtime.listening`)."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from mlx_harmony.voice.config import EndpointingSection, apply_override
from mlx_harmony.voice.realtime.listening import Dropped, Ended, Listener, Speech, Started
from mlx_harmony.voice.realtime.protocol import (
    RATE,
    EventError,
    TurnDetection,
    decode_pcm16,
    encode_pcm16,
    parse_event,
)
from mlx_harmony.voice.vad import energy_detector

BLOCK_MS = 80
BLOCK = RATE * BLOCK_MS // 1000


@pytest.mark.parametrize(
    ("raw", "param", "code"),
    [
        ("{", None, "invalid_json"),
        ("[1, 2]", None, "invalid_event"),
        ('{"type": "session.explode"}', "type", "invalid_event"),
        ('{"type": "input_audio_buffer.append"}', "audio", "invalid_value"),
        ('{"type": "input_audio_buffer.commit", "extra": 1}', "extra", "invalid_value"),
        ('{"type": "session.update", "session": {"audio": {"input": {"turn_detection":'
         ' {"type": "server_vad", "silence_duration_ms": 5}}}}}',
         "session.audio.input.turn_detection.silence_duration_ms", "invalid_value"),
        ('{"type": "conversation.item.create", "item": {"type": "message", "role": "user",'
         ' "content": []}}', "item.content", "invalid_value"),
    ],
)  # fmt: skip
def test_a_bad_event_is_refused_in_one_line_naming_its_field(raw, param, code) -> None:
    with pytest.raises(EventError) as e:
        parse_event(raw)
    assert e.value.param == param and e.value.code == code
    assert "\n" not in e.value.message


def test_fields_sent_by_clients_written_for_openai_are_taken_and_ignored() -> None:
    event = parse_event(
        '{"type": "session.update", "event_id": "e1", "session": {"type": "realtime",'
        ' "tracing": "auto", "audio": {"input": {"noise_reduction": {"type": "near_field"},'
        ' "turn_detection": null}}}}'
    )
    assert event.event_id == "e1"
    assert event.session.audio.input.turn_detection is None
    assert "turn_detection" in event.session.audio.input.model_fields_set


def test_pcm16_round_trips_and_a_torn_sample_is_refused() -> None:
    pcm = np.array([0.0, 0.5, -0.5, -1.0, 0.999], dtype=np.float32)
    back = decode_pcm16(encode_pcm16(pcm))
    assert np.allclose(back, pcm, atol=1 / 32768)
    with pytest.raises(EventError, match="odd"):
        decode_pcm16(base64.b64encode(b"\x00\x01\x02").decode())
    with pytest.raises(EventError, match="base64"):
        decode_pcm16("***")


def blocks(*spec: tuple[str, int]) -> np.ndarray:
    """('speech'|'quiet', blocks) pieces as audio the energy detector judges."""
    level = {"speech": 0.3, "quiet": 0.0}
    return np.concatenate([np.full(n * BLOCK, level[kind], np.float32) for kind, n in spec])


def listener(detection: TurnDetection, **endpointing) -> Listener:
    params = EndpointingSection(**({"silence_ms": 400, "min_speech_ms": 240} | endpointing))
    return Listener(params, BLOCK_MS, detection, energy_detector(params.energy_threshold))


def test_server_vad_starts_with_the_padding_and_ends_after_the_silence() -> None:
    ear = listener(TurnDetection(silence_duration_ms=320, prefix_padding_ms=160))
    events = ear.feed(blocks(("quiet", 5), ("speech", 6), ("quiet", 6)), lambda: "")
    started = next(e for e in events if isinstance(e, Started))
    # Two hits decide the start, two blocks of padding come before them.
    assert len(started.preroll) == 4 * BLOCK
    assert started.at_ms == 3 * BLOCK_MS
    ended = next(e for e in events if isinstance(e, Ended))
    assert ended.at_ms == (5 + 6 + 4) * BLOCK_MS and ended.silence_s == pytest.approx(0.32)
    assert sum(isinstance(e, Speech) for e in events) == 4 + 4  # speech and silence heard


def test_audio_arrives_in_any_pieces() -> None:
    audio = blocks(("quiet", 2), ("speech", 6), ("quiet", 8))
    whole = listener(TurnDetection()).feed(audio, lambda: "")
    ear = listener(TurnDetection())
    pieces = [e for at in range(0, len(audio), 777) for e in ear.feed(audio[at : at + 777], str)]
    assert [type(e) for e in pieces] == [type(e) for e in whole]


def test_a_click_is_dropped_not_committed() -> None:
    events = listener(TurnDetection()).feed(blocks(("speech", 2), ("quiet", 8)), lambda: "")
    assert [type(e) for e in events if not isinstance(e, Speech)] == [Started, Dropped]


def test_semantic_vad_waits_on_a_word_that_cannot_end_a_sentence() -> None:
    audio = blocks(("speech", 6), ("quiet", 30))
    semantic = TurnDetection(type="semantic_vad", eagerness="high")
    plain = next(e for e in listener(semantic).feed(audio, lambda: "is it") if isinstance(e, Ended))
    held = next(
        e for e in listener(semantic).feed(audio, lambda: "and the") if isinstance(e, Ended)
    )
    assert plain.silence_s == pytest.approx(0.4)  # the silence rule
    assert held.silence_s == pytest.approx(2.0)  # eagerness high: at most two seconds


class SureScorer:
    """A turn model that finds every pause final, once asked (as Smart Turn's worker
    answers: a result for each request, collected later)."""

    def __init__(self, probability: float) -> None:
        self.p, self.asked, self.blocks = probability, [], 0

    def start(self, blocks) -> None:
        self.blocks = len(blocks)

    def add(self, pcm) -> None:
        self.blocks += 1

    def request(self, heard_until: float) -> None:
        self.asked.append(heard_until)

    def results(self):
        done, self.asked = [(at, self.p) for at in self.asked], []
        return done


@pytest.mark.parametrize(("probability", "ends_after_s"), [(0.9, 0.4), (0.01, 1.52)])
def test_semantic_vad_ends_when_the_turn_model_says_so(probability, ends_after_s) -> None:
    """With a turn model: past `min_wait_ms` (400 here) a likely end ends the turn at once,
    an unlikely one waits for the longest pause (`max_wait_ms` with eagerness auto)."""
    scorer = SureScorer(probability)
    params = EndpointingSection(silence_ms=400, min_speech_ms=240, min_wait_ms=400,
                                max_wait_ms=1500, end_threshold=0.5)  # fmt: skip
    detection = TurnDetection(type="semantic_vad")
    ear = Listener(params, BLOCK_MS, detection, energy_detector(0.01), scorer)  # type: ignore[arg-type]
    events = ear.feed(blocks(("speech", 6), ("quiet", 30)), lambda: "is it")
    (ended,) = [e for e in events if isinstance(e, Ended)]
    assert ended.silence_s == pytest.approx(ends_after_s)
    assert scorer.blocks > 6  # it heard the utterance


def test_a_session_update_it_cannot_serve_changes_nothing() -> None:
    """A server without speech models: an update asking for audio is refused by field, and
    the instructions sent with it are not half-applied."""
    import asyncio

    from mlx_harmony.voice.config import VoiceConfig
    from mlx_harmony.voice.realtime.session import RealtimeSession, VoiceKit

    sent: list[dict] = []

    async def send(event: dict) -> None:
        sent.append(event)

    async def talk() -> None:
        session = RealtimeSession(VoiceKit(VoiceConfig(), None, None), None, send)  # type: ignore[arg-type]
        await session.handle('{"type": "session.update", "session": {"instructions": "Hi.",'
                             ' "output_modalities": ["audio"]}}')  # fmt: skip
        await session.handle('{"type": "session.update", "session": {"audio": {"input":'
                             ' {"turn_detection": {"type": "server_vad"}}}}}')  # fmt: skip
        assert session.settings["instructions"] is None
        assert session.settings["output_modalities"] == ["text"]
        assert session.settings["turn_detection"] is None

    asyncio.run(talk())
    assert [e["error"]["param"] for e in sent] == [
        "session.output_modalities", "session.audio.input.turn_detection",
    ]  # fmt: skip


def test_a_transcription_that_fails_is_said_and_the_next_utterance_is_heard() -> None:
    """The speech-to-text raising mid-utterance: the client gets
    `conversation.item.input_audio_transcription.failed` for that item, and the session
    hears the next utterance (the hearing task does not die with the first error)."""
    import asyncio
    from types import SimpleNamespace

    from mlx_harmony.llm.worker import ModelWorker
    from mlx_harmony.voice.config import VoiceConfig
    from mlx_harmony.voice.realtime.listening import Ended, Started
    from mlx_harmony.voice.realtime.session import RealtimeSession, VoiceKit

    class Flaky:
        """Fails on the first utterance's audio, hears "hello" in the second."""

        active, utterances = False, 0

        def start(self) -> None:
            self.active, self.utterances = True, self.utterances + 1

        def feed(self, pcm) -> str:
            if self.utterances == 1:
                raise RuntimeError("the model broke")
            return "hello"

        def finish(self, silence_s: float = 0.0) -> str:
            self.active = False
            return "hello"

        def stop(self) -> None:
            self.active = False

    sent: list[dict] = []

    async def send(event: dict) -> None:
        sent.append(event)

    worker = ModelWorker()
    config = apply_override(VoiceConfig(), "llm.prefill_while_listening", False)
    kit = VoiceKit(config, Flaky(), None)  # type: ignore[arg-type]
    slot = SimpleNamespace(worker=worker)

    async def talk() -> None:
        session = RealtimeSession(kit, slot, send)  # type: ignore[arg-type]
        session.settings["turn_detection"] = TurnDetection(create_response=False)
        hearing = asyncio.create_task(session._hear())
        audio = np.zeros(BLOCK, np.float32)
        for item in ("item_1", "item_2"):
            session._hearing.put_nowait((Started(0, audio), item))
            session._hearing.put_nowait((Ended(80, 0.4), item))
        while not any(e["type"].endswith("transcription.completed") for e in sent):
            await asyncio.sleep(0.01)
        hearing.cancel()

    try:
        asyncio.run(asyncio.wait_for(talk(), timeout=30))
    finally:
        worker.close()
    failed = [e for e in sent if e["type"].endswith("input_audio_transcription.failed")]
    assert [(e["item_id"], e["error"]["message"]) for e in failed] == [
        ("item_1", "the model broke")
    ]
    (done,) = [e for e in sent if e["type"].endswith("input_audio_transcription.completed")]
    assert (done["item_id"], done["transcript"]) == ("item_2", "hello")
