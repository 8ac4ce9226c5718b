"""GPT-OSS's Harmony format: render conversations, decode the token stream into events.

Rendering and parsing are openai-harmony's own (`render_conversation_for_completion`,
`StreamableParser`); this module only maps our messages and events onto them. Its
renderer also applies Harmony's rule of dropping past analysis once a final answer
followed it (`auto_drop_analysis`).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from openai_harmony import (
    Author,
    Conversation,
    DeveloperContent,
    HarmonyEncoding,
    HarmonyError,
    Message,
    ReasoningEffort,
    Role,
    StreamableParser,
    SystemContent,
    ToolDescription,
    ToolNamespaceConfig,
)

from llm.config import PromptConfig
from llm.messages import BuiltinTool, ChatMessage, FunctionTool, MessageDone, TextDelta, Tool
from llm.vocab import harmony_encoding

_ROLES = {r.value: r for r in Role}


def _namespace(tool: BuiltinTool) -> ToolNamespaceConfig:
    described = [ToolDescription.new(f.name, f.description, f.parameters) for f in tool.functions]
    return ToolNamespaceConfig(name=tool.name, description=tool.description, tools=described)


def _system_message(
    prompt: PromptConfig, now: datetime | None, builtins: Sequence[BuiltinTool]
) -> Message:
    content = SystemContent.new().with_reasoning_effort(
        ReasoningEffort[prompt.reasoning_effort.upper()]
    )
    for tool in builtins:
        content = content.with_tools(_namespace(tool))
    if prompt.system_model_identity:
        content = content.with_model_identity(prompt.expand(prompt.system_model_identity, now))
    if prompt.conversation_start_date:
        content = content.with_conversation_start_date(
            prompt.expand(prompt.conversation_start_date, now)
        )
    if prompt.knowledge_cutoff:
        content = content.with_knowledge_cutoff(prompt.expand(prompt.knowledge_cutoff, now))
    return Message.from_role_and_content(Role.SYSTEM, content)


def _to_harmony(msg: ChatMessage) -> Message:
    if msg.role == "tool":
        out = Message.from_author_and_content(
            Author.new(Role.TOOL, msg.name or "tool"), msg.content
        ).with_channel(msg.channel or "commentary")
        return out.with_recipient("assistant")
    out = Message.from_role_and_content(_ROLES[msg.role], msg.content)
    if msg.role == "assistant":
        out = out.with_channel(msg.channel or "final")
        if msg.recipient:
            out = out.with_recipient(msg.recipient)
            # What GPT-OSS writes after the recipient: JSON for functions, code for the
            # built-in tools.
            json_args = msg.recipient.startswith("functions.")
            out = out.with_content_type("<|constrain|>json" if json_args else "code")
    return out


def render_messages(
    prompt: PromptConfig,
    history: Sequence[ChatMessage],
    now: datetime | None = None,
    tools: Sequence[Tool] = (),
) -> list[Message]:
    """System and developer messages from the prompt config, examples, then the history.

    Built-in tools are declared in the system message, functions in the developer message.

    System/developer messages inside the history (an API client's, say) are appended to
    the developer instructions: GPT-OSS reads one system and one developer message.
    """
    instructions = [prompt.expand(prompt.developer_instructions, now)]
    instructions += [m.content for m in history if m.role in ("system", "developer")]
    instructions = [i for i in instructions if i]
    builtins = [t for t in tools if isinstance(t, BuiltinTool)]
    functions = [t for t in tools if isinstance(t, FunctionTool)]
    out = [_system_message(prompt, now, builtins)]
    if instructions or functions:
        dev = DeveloperContent.new()
        if instructions:
            dev = dev.with_instructions("\n\n".join(instructions))
        if functions:
            dev = dev.with_function_tools(
                [ToolDescription.new(t.name, t.description, t.parameters) for t in functions]
            )
        out.append(Message.from_role_and_content(Role.DEVELOPER, dev))
    for dialogue in prompt.example_dialogues:
        for ex in dialogue:
            msg = ChatMessage(ex.role, prompt.expand(ex.content, now) or "")
            out.append(_to_harmony(msg))
    out += [_to_harmony(m) for m in history if m.role not in ("system", "developer")]
    return out


class HarmonyFormat:
    """Renders prompts for GPT-OSS and decodes what it generates."""

    harmony = True

    def __init__(self, encoding: HarmonyEncoding | None = None) -> None:
        self.encoding = encoding or harmony_encoding()
        # <|return|> and <|call|>; <|end|> only separates messages within a turn.
        self.stop_tokens = frozenset(self.encoding.stop_tokens_for_assistant_actions())
        self.structure_tokens = frozenset(
            {*self.stop_tokens, *self.encoding.encode("<|end|>", allowed_special="all")}
        )
        # The stop token that hands the turn to a tool (the others end the answer).
        self.call_tokens = frozenset(self.encoding.encode("<|call|>", allowed_special="all"))

    def decode(self, ids: list[int]) -> str:
        """Text with the special tokens spelled out (for the debug log)."""
        return self.encoding.decode(ids)

    def render(
        self,
        prompt: PromptConfig,
        history: Sequence[ChatMessage],
        now: datetime | None = None,
        tools: Sequence[Tool] = (),
    ) -> list[int]:
        convo = Conversation.from_messages(render_messages(prompt, history, now, tools))
        return self.encoding.render_conversation_for_completion(convo, Role.ASSISTANT)

    def decoder(self) -> HarmonyDecoder:
        return HarmonyDecoder(self.encoding)


class HarmonyDecoder:
    """Feeds tokens to openai-harmony's StreamableParser and reports deltas and messages.

    A model that breaks the format (a small or damaged one) would make the parser raise
    mid-turn; the rest of the turn is then decoded as plain final text, so the user still
    sees what it said.
    """

    def __init__(self, encoding: HarmonyEncoding) -> None:
        self._enc = encoding
        self._parser = StreamableParser(encoding, role=Role.ASSISTANT)
        self._done = 0
        self._raw: list[int] | None = None
        self._raw_text = ""

    def feed(self, token: int) -> list[TextDelta | MessageDone]:
        if self._raw is not None:
            return self._feed_raw(token)
        try:
            self._parser.process(token)
        except HarmonyError:
            self._raw = []
            return self._feed_raw(token)
        events: list[TextDelta | MessageDone] = []
        delta = self._parser.last_content_delta
        if delta:
            channel = self._parser.current_channel or "final"
            events.append(TextDelta(channel, delta, self._parser.current_recipient))
        events += self._completed()
        return events

    @property
    def reasoning(self) -> bool:
        """The last token fed belongs to the reasoning (the analysis channel)."""
        return self._raw is None and self._parser.current_channel == "analysis"

    def finish(self) -> list[TextDelta | MessageDone]:
        """End of generation (stop token, length limit or cancel): flush what is open."""
        if self._raw is not None:
            text = self._raw_text
            return [MessageDone(ChatMessage("assistant", text, "final"))] if text else []
        content = self._parser.current_content
        if content and self._parser.current_role == Role.ASSISTANT:
            channel = self._parser.current_channel or "final"
            msg = ChatMessage("assistant", content, channel, self._parser.current_recipient)
            return [MessageDone(msg)]
        return []

    def _completed(self) -> list[MessageDone]:
        msgs = self._parser.messages
        new, self._done = msgs[self._done :], len(msgs)
        return [MessageDone(_from_harmony(m)) for m in new]

    def _feed_raw(self, token: int) -> list[TextDelta | MessageDone]:
        assert self._raw is not None
        self._raw.append(token)
        text = self._enc.decode(self._raw)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the rest
            return []
        delta, self._raw_text = text[len(self._raw_text) :], text
        return [TextDelta("final", delta)] if delta else []


def _from_harmony(msg: Message) -> ChatMessage:
    text = "".join(getattr(c, "text", "") for c in msg.content)
    role = msg.author.role.value
    return ChatMessage(role, text, msg.channel or "final", msg.recipient, msg.author.name)
