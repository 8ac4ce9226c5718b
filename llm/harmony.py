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

from mlx_harmony.llm.config import PromptConfig
from mlx_harmony.llm.messages import (
    AnswerNow,
    BuiltinTool,
    CallFunction,
    ChatMessage,
    FunctionTool,
    MessageDone,
    ReplyStart,
    TextDelta,
    Tool,
)
from mlx_harmony.llm.vocab import harmony_encoding

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
        self.newline_tokens = tuple(self.encoding.encode("\n"))

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

    def reply_start(self, start: ReplyStart) -> list[int]:
        """The tokens that make the reply start as asked: the final channel's header, or a
        commentary header addressed to the function (and its JSON constraint)."""
        match start:
            case AnswerNow(begin=begin):
                header = f"<|channel|>final<|message|>{begin}"
            case CallFunction(name=None):
                header = "<|channel|>commentary to=functions."  # the model picks which
            case CallFunction(name=name):
                header = f"<|channel|>commentary to=functions.{name} <|constrain|>json<|message|>"
        return self.encoding.encode(header, allowed_special="all")


class HarmonyDecoder:
    """Feeds tokens to openai-harmony's StreamableParser and reports deltas and messages.

    A model that breaks the format (a small or damaged one) gets what can be recovered,
    and special-token text is never shown, spoken or stored: the parser takes a special
    token it did not expect inside a message as text (`Hi<|message|>more`), so such a
    token is dropped here; `<|channel|>` or `<|start|>` there begins a new message (the
    model forgot to end the last one), so the answer after it is still the answer. Where
    the parser raises, the rest of the turn is plain text on the channel it was in.
    (The debug log keeps the raw tokens.)
    """

    def __init__(self, encoding: HarmonyEncoding) -> None:
        self._enc = encoding
        self._parser = StreamableParser(encoding, role=Role.ASSISTANT)
        self._done = 0
        self._text = ""  # the open message's text, special tokens left out
        self._raw: list[int] | None = None
        self._raw_text = ""
        self._raw_channel = "final"

    def feed(self, token: int) -> list[TextDelta | MessageDone]:
        special = self._enc.is_special_token(token)
        if self._raw is not None:
            if special and self._enc.decode([token]) in RESTARTS:
                return self._restart(token)
            return [] if special else self._feed_raw(token)
        try:
            self._parser.process(token)
        except HarmonyError:
            self._raw_channel = self._parser.current_channel or "final"
            self._raw = []
            return [] if special else self._feed_raw(token)
        delta = self._parser.last_content_delta
        if delta and special:  # taken as text: the model broke the format here
            return self._restart(token) if self._enc.decode([token]) in RESTARTS else []
        events: list[TextDelta | MessageDone] = []
        if delta:
            self._text += delta
            channel = self._parser.current_channel or "final"
            events.append(TextDelta(channel, delta, self._parser.current_recipient))
        if special:  # a message ends only at a special token (<|end|>, <|return|>, <|call|>)
            events += self._completed()
        return events

    @property
    def reasoning(self) -> bool:
        """The last token fed belongs to the reasoning (the analysis channel)."""
        return self._raw is None and self._parser.current_channel == "analysis"

    def finish(self) -> list[TextDelta | MessageDone]:
        """End of generation (stop token, length limit or cancel): flush what is open."""
        return self._close_open()

    def _close_open(self) -> list[TextDelta | MessageDone]:
        """The message being written, ended as it stands."""
        if self._raw is not None:
            text, channel, recipient = self._raw_text, self._raw_channel, None
        else:
            text = self._text
            channel = self._parser.current_channel or "final"
            recipient = self._parser.current_recipient
        self._text, self._raw, self._raw_text = "", None, ""
        if not text or self._parser.current_role not in (None, Role.ASSISTANT):
            return []
        return [MessageDone(ChatMessage("assistant", text, channel, recipient))]

    def _restart(self, token: int) -> list[TextDelta | MessageDone]:
        """A new message begun inside the open one: end that one, parse afresh from here."""
        events = self._close_open()
        name = self._enc.decode([token])
        self._parser = StreamableParser(
            self._enc, role=Role.ASSISTANT if name == "<|channel|>" else None
        )
        self._done = 0
        try:
            self._parser.process(token)
        except HarmonyError:
            self._raw = []
        return events

    def _completed(self) -> list[MessageDone]:
        msgs = self._parser.messages
        new, self._done = msgs[self._done :], len(msgs)
        done = [MessageDone(_from_harmony(m, self._text)) for m in new]
        if done:
            self._text = ""
        return done

    def _feed_raw(self, token: int) -> list[TextDelta | MessageDone]:
        assert self._raw is not None
        self._raw.append(token)
        text = self._enc.decode(self._raw)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the rest
            return []
        delta, self._raw_text = text[len(self._raw_text) :], text
        return [TextDelta(self._raw_channel, delta)] if delta else []


# Special tokens that, inside a message's text, mean the model began a new message.
RESTARTS = frozenset({"<|channel|>", "<|start|>"})


def _from_harmony(msg: Message, text: str) -> ChatMessage:
    """`text`: the message's text as the decoder kept it (special tokens left out)."""
    role = msg.author.role.value
    return ChatMessage(role, text, msg.channel or "final", msg.recipient, msg.author.name)
