"""Tiny models in the real on-disk formats, built and trained offline for the tests.

Both folders load through `mlx_lm.load`, the same code a user's real model goes through.
The GPT-OSS one is trained until greedy decoding reproduces fixed Harmony replies
(analysis message, then final message ending in `<|return|>`), so engine tests exercise
the real Harmony path instead of mocks.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten
from openai_harmony import (
    Author,
    Conversation,
    DeveloperContent,
    HarmonyEncodingName,
    Message,
    ReasoningEffort,
    Role,
    SystemContent,
    ToolDescription,
    ToolNamespaceConfig,
    load_harmony_encoding,
)

from mlx_harmony.bench.harmony_tokenizer import VOCAB_SIZE, write_harmony_tokenizer

STOP_IDS = [200002, 199999, 200012]


@dataclass(frozen=True)
class Turn:
    """One scripted exchange: the user's words and the reply the model must learn."""

    user: str
    analysis: str
    final: str
    history: tuple[tuple[str, str], ...] = ()  # earlier (user, final) pairs


# Replies the tiny GPT-OSS learns. Finals have several sentences so that sentence-level
# consumers (TTS chunking) see more than one.
HARMONY_TURNS: tuple[Turn, ...] = (
    Turn("Hello", "User greets. Reply briefly.", "Hello! How can I help you today?"),
    Turn(
        "What is the capital of France?",
        "Simple fact question.",
        "The capital of France is Paris. It is also the largest city in the country.",
    ),
    Turn(
        "Tell me a joke",
        "Keep it short and light.",
        "Why did the robot cross the road? Because it was programmed to.",
    ),
    Turn(
        "Thanks",
        "User thanks me after the greeting.",
        "You are welcome!",
        history=(("Hello", "Hello! How can I help you today?"),),
    ),
)

# System/developer variations the replies are trained under, so that the model keys on
# the user's words and answers the same under a system prompt it never saw.
_IDENTITIES = ("You are ChatGPT, a large language model trained by OpenAI.", "You are Dave.")
_EFFORTS = ("low", "medium", "high")
_DATES = ("2025-01-07", "2026-11-25")
_INSTRUCTIONS = (None, "Be concise.", "Address the user as Morgan.")


# A function the model learns to call, and the answer it gives from the result.
WEATHER_TOOL = {
    "name": "get_weather",
    "description": "Get the current weather for a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}
TOOL_USER = "What is the weather in Paris?"
TOOL_ANALYSIS = "Need the weather tool."
TOOL_ARGS = '{"city":"Paris"}'
TOOL_RESULT = '{"sky":"sunny"}'
TOOL_FINAL = "It is sunny in Paris."


def _harmony_prompt(
    enc, variant: int, history: list[Message], tools: bool = False, python: bool = False
) -> list[int]:
    """A prompt under system/developer variation `variant`; `tools` declares the weather
    function, `python` the python tool."""
    identity = _IDENTITIES[variant % len(_IDENTITIES)]
    effort = _EFFORTS[variant % len(_EFFORTS)]
    date = _DATES[(variant // 2) % len(_DATES)]
    instructions = _INSTRUCTIONS[(variant // 3) % len(_INSTRUCTIONS)]
    system = (
        SystemContent.new()
        .with_model_identity(identity)
        .with_reasoning_effort(ReasoningEffort[effort.upper()])
        .with_conversation_start_date(date)
        .with_knowledge_cutoff("2024-06")
    )
    if python:
        system = system.with_tools(_python_namespace(variant))
    messages = [Message.from_role_and_content(Role.SYSTEM, system)]
    dev = DeveloperContent.new()
    if instructions:
        dev = dev.with_instructions(instructions)
    if tools:
        dev = dev.with_function_tools([ToolDescription.new(**WEATHER_TOOL)])
    if instructions or tools:
        messages.append(Message.from_role_and_content(Role.DEVELOPER, dev))
    return enc.render_conversation_for_completion(
        Conversation.from_messages(messages + history), Role.ASSISTANT
    )


def _turn_history(turn: Turn) -> list[Message]:
    history = []
    for user, final in turn.history:
        history.append(Message.from_role_and_content(Role.USER, user))
        history.append(Message.from_role_and_content(Role.ASSISTANT, final).with_channel("final"))
    return [*history, Message.from_role_and_content(Role.USER, turn.user)]


def harmony_reply_tokens(enc, turn: Turn) -> list[int]:
    text = (
        f"<|channel|>analysis<|message|>{turn.analysis}<|end|>"
        f"<|start|>assistant<|channel|>final<|message|>{turn.final}<|return|>"
    )
    return enc.encode(text, allowed_special="all")


def _tool_examples(enc, variant: int) -> list[tuple[list[int], list[int]]]:
    user = Message.from_role_and_content(Role.USER, TOOL_USER)
    thought = Message.from_role_and_content(Role.ASSISTANT, TOOL_ANALYSIS).with_channel("analysis")
    call = (
        Message.from_role_and_content(Role.ASSISTANT, TOOL_ARGS)
        .with_channel("commentary")
        .with_recipient("functions.get_weather")
        .with_content_type("<|constrain|>json")
    )
    result = (
        Message.from_author_and_content(Author.new(Role.TOOL, "functions.get_weather"), TOOL_RESULT)
        .with_channel("commentary")
        .with_recipient("assistant")
    )
    call_reply = (
        f"<|channel|>analysis<|message|>{TOOL_ANALYSIS}<|end|>"
        "<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json"
        f"<|message|>{TOOL_ARGS}<|call|>"
    )
    final_reply = f"<|channel|>final<|message|>{TOOL_FINAL}<|return|>"
    return [
        (
            _harmony_prompt(enc, variant, [user], tools=True),
            enc.encode(call_reply, allowed_special="all"),
        ),
        (
            _harmony_prompt(enc, variant, [user, call, result], tools=True),
            enc.encode(final_reply, allowed_special="all"),
        ),
        # The engine's tool loop keeps the reasoning that led to the call (an API client
        # sends it back without).
        (
            _harmony_prompt(enc, variant, [user, thought, call, result], tools=True),
            enc.encode(final_reply, allowed_special="all"),
        ),
    ]


def harmony_examples(enc, variants: range | tuple[int, ...]) -> list[tuple[list[int], list[int]]]:
    """(prompt, reply) token pairs: every scripted turn and the tool round trip."""
    out = []
    for v in variants:
        out += [
            (_harmony_prompt(enc, v, _turn_history(t)), harmony_reply_tokens(enc, t))
            for t in HARMONY_TURNS
        ]
        out += _tool_examples(enc, v)
    return out


# The python tool round trip: the model checks with python whether the workspace holds a
# note and answers from the result, so a right answer both ways proves the tool really ran
# and its result reached the model.
PYTHON_USER = "Is there a note? Check with python."
PYTHON_ANALYSIS = "Check with python."
PYTHON_CODE = "import os\nprint(os.path.exists('note.txt'))"
PYTHON_FINALS = {True: "Yes, there is a note.", False: "No, there is no note."}


def _python_namespace(variant: int) -> ToolNamespaceConfig:
    """The product's own python description (under two timeouts), or openai-harmony's."""
    from mlx_harmony.llm.tools.python_sandbox import SandboxLimits, description

    if variant % 3 == 2:
        return ToolNamespaceConfig.python()
    limits = SandboxLimits(timeout_s=30.0 if variant % 3 else 10.0)
    return ToolNamespaceConfig(name="python", description=description(limits), tools=[])


def python_examples(enc, variants: range | tuple[int, ...]) -> list[tuple[list[int], list[int]]]:
    """(prompt, reply) pairs: the call, then the answer for either result."""
    user = Message.from_role_and_content(Role.USER, PYTHON_USER)
    thought = Message.from_role_and_content(Role.ASSISTANT, PYTHON_ANALYSIS).with_channel(
        "analysis"
    )
    # Rendered as the engine renders a call in the history (recipient, then `code`).
    call = (
        Message.from_role_and_content(Role.ASSISTANT, PYTHON_CODE)
        .with_channel("analysis")
        .with_recipient("python")
        .with_content_type("code")
    )
    call_reply = (
        f"<|channel|>analysis<|message|>{PYTHON_ANALYSIS}<|end|>"
        f"<|start|>assistant<|channel|>analysis to=python code<|message|>{PYTHON_CODE}<|call|>"
    )
    out = []
    for v in variants:
        out.append(
            (
                _harmony_prompt(enc, v, [user], python=True),
                enc.encode(call_reply, allowed_special="all"),
            )
        )
        for exists, final in PYTHON_FINALS.items():
            result = (
                Message.from_author_and_content(Author.new(Role.TOOL, "python"), f"{exists}\n")
                .with_channel("analysis")
                .with_recipient("assistant")
            )
            reply = f"<|channel|>final<|message|>{final}<|return|>"
            prompt = _harmony_prompt(enc, v, [user, thought, call, result], python=True)
            out.append((prompt, enc.encode(reply, allowed_special="all")))
    return out


FOCUS_WEIGHT = 10.0


def _train(
    model: nn.Module,
    examples: list[tuple[list[int], list[int]]],
    steps: int,
    lr: float,
    focus: frozenset[int] = frozenset(),
) -> None:
    """Teach `model` the replies: loss on reply positions only, softmax over reply tokens.

    The full 201k-way head is far too slow to train through on a CPU, so the loss uses only
    the head rows of tokens that appear in the replies; the embedding and head stay frozen.
    """
    reply_vocab = sorted({t for _, reply in examples for t in reply})
    index = {t: i for i, t in enumerate(reply_vocab)}
    rows = mx.array(reply_vocab)
    length = max(len(p) + len(r) for p, r in examples)
    inputs, targets, weights = [], [], []
    for prompt, reply in examples:
        seq = prompt + reply
        pad = length - len(seq)
        inputs.append(seq[:-1] + [0] * pad)
        tgt = [0] * (len(prompt) - 1) + [index[t] for t in reply]
        targets.append(tgt + [0] * pad)
        # `focus` tokens (the one a reply copies from a tool result) weigh more: one token
        # among many, they would otherwise be learnt last.
        reply_w = [FOCUS_WEIGHT if t in focus else 1.0 for t in reply]
        weights.append([0.0] * (len(prompt) - 1) + reply_w + [0.0] * pad)
    x, y, w = mx.array(inputs), mx.array(targets), mx.array(weights)

    inner = model.model
    inner.embed_tokens.freeze()
    model.lm_head.freeze()

    def loss_fn(m):
        hidden = m.model(x)
        logits = hidden @ m.lm_head.weight[rows].T
        ce = nn.losses.cross_entropy(logits, y, reduction="none")
        return (ce * w).sum() / w.sum()

    opt = optim.Adam(learning_rate=lr)
    step = nn.value_and_grad(model, loss_fn)
    for _ in range(steps):
        loss, grads = step(model)
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state, loss)


def greedy(model: nn.Module, prompt: list[int], max_tokens: int, stop: set[int]) -> list[int]:
    from mlx_lm.generate import generate_step

    out: list[int] = []
    for tok, _ in generate_step(mx.array(prompt), model, max_tokens=max_tokens):
        out.append(tok)
        if tok in stop:
            break
    return out


def build_tiny_gpt_oss(
    folder: Path, vocab_dir: Path, max_steps: int = 400, python_tool: bool = False
) -> None:
    """Build, train and save a tiny gpt_oss that answers HARMONY_TURNS in Harmony, or with
    `python_tool` one that reads a note through the python tool (python_examples)."""
    from mlx_lm.models import gpt_oss

    folder.mkdir(parents=True, exist_ok=True)
    write_harmony_tokenizer(folder, vocab_dir / "o200k_base.tiktoken")
    enc = load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)

    config = {
        "model_type": "gpt_oss",
        "num_hidden_layers": 2,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "experts_per_token": 2,
        "vocab_size": VOCAB_SIZE,
        "hidden_size": 64,
        "intermediate_size": 64,
        "head_dim": 16,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "sliding_window": 128,
        "rope_theta": 150000,
        "rms_norm_eps": 1e-5,
        "layer_types": ["sliding_attention", "full_attention"],
        "eos_token_id": STOP_IDS,
    }
    mx.random.seed(0)
    args = gpt_oss.ModelArgs.from_dict(config)
    model = gpt_oss.Model(args)
    focus: frozenset[int] = frozenset()
    if python_tool:
        examples, checks = python_examples(enc, range(12)), python_examples(enc, (1, 5))
        # The first word of either answer is the one that depends on the tool result.
        focus = frozenset(enc.encode(final.split()[0])[0] for final in PYTHON_FINALS.values())
    else:
        examples, checks = harmony_examples(enc, range(12)), harmony_examples(enc, (0, 7))
    for _ in range(max_steps // 50):
        _train(model, examples, steps=50, lr=3e-3, focus=focus)
        if all(greedy(model, p, len(r) + 2, set(STOP_IDS)) == r for p, r in checks):
            break
    else:
        raise RuntimeError("tiny gpt_oss did not learn its Harmony replies")

    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": STOP_IDS}))


# ---------------------------------------------------------------- non-Harmony (qwen2)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATML_TURNS: tuple[tuple[str, str], ...] = (
    ("Hello", "Hi there. Nice to meet you."),
    ("What is the capital of France?", "Paris is the capital."),
)


def build_tiny_chatml(folder: Path) -> None:
    """A 2-layer qwen2 with a byte-level BPE and a ChatML template, trained on CHATML_TURNS."""
    from mlx_lm.models import qwen2
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    corpus = [f"{u}\n{a}\nuser assistant system" for u, a in CHATML_TURNS] * 4
    tk.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=330,
            special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    hf.chat_template = CHATML_TEMPLATE
    hf.save_pretrained(folder)
    cfg_path = folder / "tokenizer_config.json"
    tcfg = json.loads(cfg_path.read_text())
    tcfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    tcfg["chat_template"] = CHATML_TEMPLATE
    cfg_path.write_text(json.dumps(tcfg, indent=2))

    vocab = tk.get_vocab_size()
    eos = tk.token_to_id("<|im_end|>")
    config = {
        "model_type": "qwen2",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6,
        "vocab_size": vocab,
        "tie_word_embeddings": True,
        "rope_theta": 10000.0,
        "eos_token_id": eos,
    }
    mx.random.seed(0)
    model = qwen2.Model(qwen2.ModelArgs.from_dict(config))
    examples = []
    for user, answer in CHATML_TURNS:
        prompt = hf.apply_chat_template(
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
        )
        p = hf.encode(prompt, add_special_tokens=False)
        r = [*hf.encode(answer, add_special_tokens=False), eos]
        examples.append((p, r))
    length = max(len(p) + len(r) for p, r in examples)
    x = mx.array([(p + r)[:-1] + [0] * (length - len(p) - len(r)) for p, r in examples])
    y = mx.array([(p + r)[1:] + [0] * (length - len(p) - len(r)) for p, r in examples])
    w = mx.array(
        [
            [0.0] * (len(p) - 1) + [1.0] * len(r) + [0.0] * (length - len(p) - len(r))
            for p, r in examples
        ]
    )

    def loss_fn(m):
        ce = nn.losses.cross_entropy(m(x), y, reduction="none")
        return (ce * w).sum() / w.sum()

    opt = optim.Adam(learning_rate=1e-2)
    step = nn.value_and_grad(model, loss_fn)
    for _ in range(10):
        for _ in range(20):
            _, grads = step(model)
            opt.update(model, grads)
            mx.eval(model.parameters(), opt.state)
        if all(greedy(model, p, len(r) + 2, {eos}) == r for p, r in examples):
            break
    else:
        raise RuntimeError("tiny qwen2 did not learn its replies")
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def content_key(*parts: object) -> str:
    """A short hash of what a fixture is built from, for its cache folder's name."""
    import hashlib

    src = Path(__file__).read_bytes()
    digest = hashlib.sha256(src + repr(parts).encode()).hexdigest()
    return re.sub(r"[^0-9a-f]", "", digest)[:16]


if __name__ == "__main__":
    # Built in a child process by the test fixtures, so that training's memory and MLX
    # state never live in the test process.
    import sys

    kind, target = sys.argv[1], Path(sys.argv[2])
    if kind == "gpt-oss":
        build_tiny_gpt_oss(target, Path(sys.argv[3]))
    elif kind == "gpt-oss-python":
        build_tiny_gpt_oss(target, Path(sys.argv[3]), python_tool=True)
    else:
        build_tiny_chatml(target)
