"""The voice loop in a test: a Reporter that records, and the loop run beside a scenario."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from mlx_harmony.voice.daemon import TurnTimings, VoiceAssistant


class Recorder:
    """A Reporter that keeps everything, with the time, and lets a thread wait for it."""

    def __init__(self) -> None:
        self.events: list[tuple[float, str, str]] = []
        self.timings: list[TurnTimings] = []
        self._changed = threading.Condition()

    def _add(self, kind: str, text: str) -> None:
        with self._changed:
            self.events.append((time.perf_counter(), kind, text))
            self._changed.notify_all()

    def status(self, state: str) -> None:
        self._add("status", state)

    def heard(self, text: str) -> None:
        self._add("heard", text)

    def partial(self, text: str) -> None:
        self._add("partial", text)

    def reasoning(self, text: str) -> None:
        self._add("reasoning", text)

    def answer(self, text: str) -> None:
        self._add("answer", text)

    def answer_done(self) -> None:
        self._add("answer_done", "")

    def notice(self, text: str) -> None:
        self._add("notice", text)

    def turn_done(self, timings: TurnTimings) -> None:
        self.timings.append(timings)
        self._add("turn_done", "")

    def texts(self, kind: str) -> list[str]:
        return [t for _, k, t in self.events if k == kind]

    def story(self) -> list[str]:
        """What happened, in order, for a failing test's message (partial transcripts and
        answer deltas left out)."""
        start = self.events[0][0] if self.events else 0.0
        return [f"{(at - start) * 1000:.0f} ms {kind}: {text}"
                for at, kind, text in self.events if kind not in ("partial", "answer")]  # fmt: skip

    def wait(
        self, kind: str, text: str | None = None, count: int = 1, timeout: float = 60
    ) -> float:
        """Block until `count` events of `kind` (matching `text`) happened; return the last time."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                hits = [e for e in self.events if e[1] == kind and (text is None or e[2] == text)]
                if len(hits) >= count:
                    return hits[count - 1][0]
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no {kind} {text or ''} after {timeout}s: {self.events}")
                self._changed.wait(left)


def serve(assistant: VoiceAssistant, scenario: Callable[[threading.Event], None]) -> None:
    """Run the daemon here (it owns the models) while `scenario` plays in a thread."""
    stop = threading.Event()
    errors: list[BaseException] = []

    def play() -> None:
        try:
            scenario(stop)
        except BaseException as e:
            errors.append(e)
        finally:
            stop.set()

    assistant.open()
    helper = threading.Thread(target=play)
    helper.start()
    assistant.serve(stop)
    helper.join()
    if errors:
        raise errors[0]


class SpokenTexts:
    """The synthesizer, noting the words each of its sessions is given (one per answer)."""

    def __init__(self, tts) -> None:
        self.tts, self.texts = tts, []
        self.frame_samples, self.sample_rate = tts.frame_samples, tts.sample_rate
        self.frame_seconds, self.speed = tts.frame_seconds, tts.speed
        self.at_first_step: list[str] = []  # each session's words when it was first stepped

    def session(self):
        session = self.tts.session()
        index = len(self.texts)
        self.texts.append("")
        push = session.push

        def noted(words: str) -> None:
            self.texts[index] += words
            push(words)

        step = session.step

        def first_step():
            if len(self.at_first_step) <= index:
                self.at_first_step.append(self.texts[index])
            return step()

        session.push = noted
        session.step = first_step
        return session

    def adapt(self, observed_rate: float):
        return self.tts.adapt(observed_rate)

    def spoken(self) -> list[str]:
        """Each session's words, white space folded."""
        return [" ".join(text.split()) for text in self.texts]
