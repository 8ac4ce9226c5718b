"""The engine's tool loop with tiny GPT-OSS models that really call tools.

The main tiny model calls `functions.get_weather`; the python one reads a workspace note
through the real python sandbox and answers with the word it found, so a right answer
proves the tool ran and its result reached the model.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mlx_harmony.llm.chatlog import load_chat_log
from mlx_harmony.llm.config import PromptConfig
from mlx_harmony.llm.engine import Engine
from mlx_harmony.llm.messages import (
    ChatMessage,
    FunctionTool,
    TextDelta,
    Tool,
    ToolCall,
    ToolResult,
    ToolWaiting,
    TurnDone,
)
from mlx_harmony.llm.tool_loop import respond
from mlx_harmony.llm.tools.config import ToolsConfig
from mlx_harmony.llm.tools.toolbox import Toolbox
from tests.support.tiny_models import (
    PYTHON_CODE,
    PYTHON_FINALS,
    PYTHON_USER,
    TOOL_ARGS,
    TOOL_FINAL,
    TOOL_RESULT,
    TOOL_USER,
    WEATHER_TOOL,
)

GREEDY = PromptConfig(sampling={"temperature": 0.0})


class WeatherTool:
    """A tool runner for the function the main tiny model learned to call."""

    def __init__(self, max_steps: int = 8) -> None:
        self.max_steps = max_steps
        self.calls: list[ChatMessage] = []
        self.cancelled = False

    @property
    def declarations(self) -> list[Tool]:
        return [FunctionTool(**WEATHER_TOOL)]

    def handles(self, recipient: str | None) -> bool:
        return recipient == "functions.get_weather"

    def run(self, call: ChatMessage) -> ChatMessage:
        self.calls.append(call)
        return ChatMessage("tool", TOOL_RESULT, call.channel, name=call.recipient)

    def cancel(self) -> None:
        self.cancelled = True


def test_a_call_is_run_and_generation_continues_to_the_answer(engine: Engine) -> None:
    tool = WeatherTool()
    events = list(respond(engine, [ChatMessage("user", TOOL_USER)], GREEDY, tool))
    calls = [e for e in events if isinstance(e, ToolCall)]
    results = [e for e in events if isinstance(e, ToolResult)]
    assert [c.message.recipient for c in calls] == ["functions.get_weather"]
    assert json.loads(tool.calls[0].content) == json.loads(TOOL_ARGS)
    assert [r.message.content for r in results] == [TOOL_RESULT]
    final = "".join(e.text for e in events if isinstance(e, TextDelta) and e.channel == "final")
    assert final == TOOL_FINAL
    done = events[-1]
    assert isinstance(done, TurnDone) and done.finish_reason == "stop"
    # Every message of the turn, in order, for the chat log.
    assert [(m.role, m.channel, m.recipient) for m in done.messages] == [
        ("assistant", "analysis", None),
        ("assistant", "commentary", "functions.get_weather"),
        ("tool", "commentary", None),
        ("assistant", "final", None),
    ]
    assert sum(isinstance(e, TurnDone) for e in events) == 1


def test_a_function_the_caller_declared_still_ends_the_turn(engine: Engine) -> None:
    tools = [FunctionTool(**WEATHER_TOOL)]
    events = list(respond(engine, [ChatMessage("user", TOOL_USER)], GREEDY, None, tools=tools))
    done = events[-1]
    assert isinstance(done, TurnDone) and done.finish_reason == "tool_call"
    assert done.messages[-1].recipient == "functions.get_weather"
    assert not any(isinstance(e, ToolCall | ToolResult) for e in events)


def test_step_limit_refuses_further_calls(engine: Engine) -> None:
    tool = WeatherTool(max_steps=0)
    events = list(respond(engine, [ChatMessage("user", TOOL_USER)], GREEDY, tool))
    assert not tool.calls and not any(isinstance(e, ToolCall) for e in events)
    refusal = [e.message.content for e in events if isinstance(e, ToolResult)]
    assert refusal and refusal[0].startswith("Tool call limit reached (0 calls this turn)")
    done = events[-1]
    assert isinstance(done, TurnDone) and done.finish_reason in ("stop", "length")


def test_cancel_during_the_loop(engine: Engine) -> None:
    tool = WeatherTool()
    stop = {"now": False}

    class Stopping(WeatherTool):
        def run(self, call: ChatMessage) -> ChatMessage:
            stop["now"] = True  # the user interrupts while the tool runs
            return super().run(call)

    events = list(
        respond(
            engine,
            [ChatMessage("user", TOOL_USER)],
            GREEDY,
            Stopping(),
            should_stop=lambda: stop["now"],
        )
    )
    done = events[-1]
    assert isinstance(done, TurnDone) and done.finish_reason == "cancelled"
    assert done.messages[-1].role == "tool"
    assert not tool.calls


def test_a_slow_tool_keeps_the_consumer_responsive_and_can_be_stopped(engine: Engine) -> None:
    """While a tool runs the loop reports ToolWaiting (a voice keeps speaking and listening);
    a stop then cancels the tool and ends the turn at once."""
    release = threading.Event()

    class Slow(WeatherTool):
        def run(self, call: ChatMessage) -> ChatMessage:
            release.wait(120)  # until cancelled: a turn that waited it out fails on `cancelled`
            return super().run(call)

        def cancel(self) -> None:
            super().cancel()
            release.set()

    tool, waits = Slow(), []
    for event in respond(
        engine,
        [ChatMessage("user", TOOL_USER)],
        GREEDY,
        tool,
        should_stop=lambda: len(waits) >= 3,
    ):
        if isinstance(event, ToolWaiting):
            waits.append(event)
        last = event
    assert isinstance(last, TurnDone) and last.finish_reason == "cancelled"
    assert len(waits) == 3 and tool.cancelled
    assert [m.recipient for m in last.messages if m.recipient] == ["functions.get_weather"]


@pytest.mark.heavy
def test_a_python_call_is_killed_from_another_thread(tmp_path: Path) -> None:
    toolbox = Toolbox(ToolsConfig(python=True), tmp_path)
    code = "open('started', 'w').close()\nwhile True: pass"
    call = ChatMessage("assistant", code, "analysis", "python")
    out: list[ChatMessage] = []
    worker = threading.Thread(target=lambda: out.append(toolbox.run(call)))
    worker.start()
    deadline = time.monotonic() + 60
    while not (tmp_path / "started").exists():  # the code runs: now there is a call to kill
        assert time.monotonic() < deadline and worker.is_alive(), out
        time.sleep(0.01)
    toolbox.cancel()
    worker.join(5)
    toolbox.close()
    assert out and "killed by SIGKILL" in out[0].content


# ----------------------------------------------------------------- the python tool


@pytest.fixture(scope="module")
def python_engine(gpt_oss_python_path: Path) -> Engine:
    return Engine.load(str(gpt_oss_python_path))


def _python_prompt(workspace: Path) -> PromptConfig:
    tools = ToolsConfig(python={"timeout_s": 20}, workspace=str(workspace))
    return PromptConfig(sampling={"temperature": 0.0}, tools=tools)


def test_python_call_runs_in_the_sandbox_and_the_answer_uses_its_result(
    python_engine: Engine, tmp_path: Path
) -> None:
    for exists in (True, False):  # both ways: the answer follows the file, not memory
        python_engine.reset()
        note = tmp_path / "note.txt"
        if exists:
            note.write_text("hello")
        else:
            note.unlink(missing_ok=True)
        prompt = _python_prompt(tmp_path)
        toolbox = Toolbox(prompt.tools, tmp_path)
        try:
            history = [ChatMessage("user", PYTHON_USER)]
            events = list(respond(python_engine, history, prompt, toolbox))
        finally:
            toolbox.close()
        calls = [e.message for e in events if isinstance(e, ToolCall)]
        results = [e.message for e in events if isinstance(e, ToolResult)]
        assert [(c.recipient, c.content) for c in calls] == [("python", PYTHON_CODE)]
        assert [(r.name, r.content) for r in results] == [("python", f"{exists}\n")]
        done = events[-1]
        assert isinstance(done, TurnDone) and done.finish_reason == "stop"
        assert done.messages[-1].content == PYTHON_FINALS[exists]


def test_python_tool_in_the_chat_cli(gpt_oss_python_path: Path, tmp_path: Path) -> None:
    """`mlx-harmony-chat --tools python`: the call and result shown compactly, the answer
    from the result, and the whole exchange in the chat log."""
    workspace = tmp_path / "ws"
    workspace.mkdir()
    (workspace / "note.txt").write_text("hello")
    log = tmp_path / "chat.json"
    cmd = [
        sys.executable, "-m", "mlx_harmony.llm.cli.chat", "--model", str(gpt_oss_python_path),
        "--temperature", "0", "--tools", "python", "--workspace", str(workspace),
        "--chat", str(log), "--no-markdown",
    ]  # fmt: skip
    out = subprocess.run(cmd, input=f"{PYTHON_USER}\n", capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    first_line = PYTHON_CODE.splitlines()[0]
    assert f"→ python\n  {first_line}" in out.stdout
    assert "← python\n  True" in out.stdout
    assert PYTHON_FINALS[True] in out.stdout
    messages = load_chat_log(log)[0].active().messages
    assert [(m.role, m.recipient, m.name) for m in messages] == [
        ("user", None, None),
        ("assistant", None, None),
        ("assistant", "python", None),
        ("tool", None, "python"),
        ("assistant", None, None),
    ]
    assert messages[-1].content == PYTHON_FINALS[True]


def test_the_server_runs_built_in_tools_itself(python_engine: Engine, tmp_path: Path) -> None:
    """A server with python enabled answers from the tool's result; the client sees the
    answer and the reasoning, no tool_calls of its own to run."""
    import openai

    from mlx_harmony.llm.server import ServedModel, create_app
    from tests.test_server import LiveServer, free_port

    (tmp_path / "note.txt").write_text("hello")
    served = [ServedModel("py", "py-path", _python_prompt(tmp_path))]
    app = create_app(served, load=lambda _: python_engine, preloaded=python_engine)
    with LiveServer(app, free_port()) as live:
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="x", max_retries=0)
        r = client.chat.completions.create(
            model="py", messages=[{"role": "user", "content": PYTHON_USER}], temperature=0
        )
        choice = r.choices[0]
        assert choice.message.content == PYTHON_FINALS[True]
        assert not choice.message.tool_calls and choice.finish_reason == "stop"
        assert PYTHON_CODE in choice.message.model_extra["reasoning_content"]
        stream = client.chat.completions.create(
            model="py",
            messages=[{"role": "user", "content": PYTHON_USER}],
            temperature=0,
            stream=True,
        )
        chunks = [c for c in stream if c.choices]
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        assert text == PYTHON_FINALS[True]
        assert not any(c.choices[0].delta.tool_calls for c in chunks)
        # apply_patch is the server's own here: a client may not declare one too.
        served[0].prompt.tools.apply_patch = True
        fn = {"name": "apply_patch", "parameters": {"type": "object"}}
        with pytest.raises(openai.BadRequestError, match="server-side tool"):
            client.chat.completions.create(
                model="py",
                messages=[{"role": "user", "content": "hi"}],
                tools=[{"type": "function", "function": fn}],
            )


def test_toolbox_declares_and_dispatches_every_tool(engine: Engine, tmp_path: Path) -> None:
    """The Harmony prompt declares each enabled tool where GPT-OSS expects it, and each
    kind of call reaches its tool, errors coming back as text for the model."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "garden.md").write_text("# Garden\nTomatoes need sun.\n")
    config = ToolsConfig(
        python=True, browser={"backend": "folder", "folder": str(docs)}, apply_patch=True
    )
    toolbox = Toolbox(config, tmp_path / "ws")
    try:
        prompt = engine.format.encoding.decode(
            engine.render([ChatMessage("user", "hi")], GREEDY, tools=toolbox.declarations)
        )
        system, developer = prompt.split("<|start|>developer", 1)
        assert "## browser" in system and "type search = " in system
        assert "## python" in system and "sandboxed process" in system
        assert "type apply_patch = " in developer and "*** Begin Patch" in developer
        assert all(toolbox.handles(r) for r in ("python", "browser.find", "functions.apply_patch"))
        assert not toolbox.handles("functions.get_weather") and not toolbox.handles(None)

        def call(recipient: str, content: str) -> str:
            msg = ChatMessage("assistant", content, "analysis", recipient)
            result = toolbox.run(msg)
            assert result.role == "tool" and result.channel == "analysis"
            return result.content

        assert call("python", "print(2 + 2)") == "4\n"
        assert "【0†Garden†" in call("browser.search", '{"query": "tomatoes"}')
        assert "Tomatoes need sun." in call("browser.open", '{"id": 0}')
        assert call("browser.find", "{not json").startswith("Invalid JSON arguments")
        patch = "*** Begin Patch\n*** Add File: notes.txt\n+hi\n*** End Patch"
        assert call("functions.apply_patch", json.dumps({"patch": patch})).startswith("Done!")
        assert (tmp_path / "ws" / "notes.txt").read_text() == "hi\n"
        # The python tool and apply_patch share the workspace.
        assert call("python", "print(open('notes.txt').read())") == "hi\n\n"
        assert call("functions.apply_patch", patch).startswith("Error: Add File notes.txt")
    finally:
        toolbox.close()
