"""What one voice turn took, in milliseconds from the end of the user's speech: kept in
the chat log with the answer (`voice_timings`), shown per turn, and read by the voice
benchmark."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class TurnTimings:
    """Milliseconds from the end of the user's speech (the last speech block's arrival)."""

    endpoint_ms: float = 0.0  # endpointing noticed the end (includes the silence wait)
    head_start_ms: float | None = None  # the transcript was taken early (speculative start)
    transcript_ms: float = 0.0  # STT flushed: transcript complete
    first_token_ms: float | None = None
    first_final_ms: float | None = None
    # The answer's first audio frame was synthesized (held, buffered or played at once),
    # and went to the speaker (after the end was confirmed, and the playout buffer).
    first_frame_ms: float | None = None
    first_chunk_ms: float | None = None
    # Words of the answer written when its first frame was synthesized: the TTS reads
    # ahead of what it says (TTS 1.6B's audio trails its text by 16 steps, about 5 words).
    first_frame_words: int = 0
    generation_ms: float | None = None  # the engine finished the answer
    first_audio_ms: float | None = None  # first audible sample played by the device
    stt_frames_while_speaking: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0  # of prompt_tokens: reused or prefilled while the user spoke
    interrupted: bool = False
    typed: bool = False  # the question came as text: times count from its arrival
    # Started before the end was confirmed (endpointing.speculate_ms): the transcript and
    # the first tokens and frames may come before `endpoint_ms`.
    speculative: bool = False
    ended_by: str = ""  # what decided the user was done (`voice.turns.EndedBy`)
    underruns: int = 0  # the speaker ran dry mid-answer: gaps in the speech
    # Of those: gaps while the TTS had spoken every word written so far, waiting for the
    # language model's next one (not the synthesis's slowness).
    text_gaps: int = 0
    # The playout buffer: frames held back before the answer's first one played (1: none),
    # the answer's length in frames as predicted then, and the synthesis speed (times
    # real time) the decision used (`voice.playout`).
    buffered_frames: int = 0
    predicted_frames: int = 0
    tts_rate: float | None = None
    # Of buffered_frames: those held for the stalls the last answers met; and the most
    # any frame of this answer came after its place in the playback (a gap, if over 0).
    jitter_frames: int = 0
    late_ms: float = 0.0
    # The longest single step of each side of the loop in this answer: where a gap came
    # from a stall (a kernel compiled at its first use, another process), not the pace.
    slowest_tts_step_ms: float = 0.0
    slowest_engine_step_ms: float = 0.0

    def as_log(self) -> dict[str, object]:
        def rounded(k: str, v: object) -> object:
            if not isinstance(v, float):
                return v
            return round(v, 3 if k == "tts_rate" else 1)

        return {k: rounded(k, v) for k, v in asdict(self).items()}
