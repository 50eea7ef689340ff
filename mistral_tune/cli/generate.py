"""``mistral-tune generate`` and ``mistral-tune chat``: the Python API from the command line."""

from __future__ import annotations

import inspect
import sys
from typing import Any

from mistral_tune.cli.args import Command, Key, run_help
from mistral_tune.core.errors import UserError

# The keys generate and chat share: the model, how it is loaded, and the sampler.
PRESET = Key(
    "preset",
    help="built-in id, hf://org/name, kaggle://..., or a directory (e.g. a run's merged/)",
    required="No preset given. Pass preset=ID_OR_PATH (a built-in id, hf://org/name or a directory).",
)
MODEL_KEYS = (
    Key("dtype", help="how the model is loaded"),
    Key("attn_implementation", help="how the model is loaded"),
    Key("load_weights", bool, True, help="how the model is loaded"),
)
SAMPLER_KEYS = (
    Key("sampler", help="greedy | top_k (default) | top_p | random | beam | contrastive"),
    *(Key(name, kind, help="sampler parameters") for name, kind in
      [("k", int), ("p", float), ("temperature", float), ("seed", int), ("num_beams", int), ("alpha", float)]),
)  # fmt: skip
SAMPLER_PARAMS = tuple(k.name for k in SAMPLER_KEYS[1:])

GENERATE = Command(
    "generate",
    'usage: mistral-tune generate preset=ID_OR_PATH prompt="..." [prompt="..." ...] [key=value ...]',
    keys=(
        PRESET,
        Key(
            "prompt",
            repeatable=True,
            help="text to continue; repeat for a left-padded batch",
            required='No prompt given. Pass prompt="..." (repeat it for several prompts).',
        ),
        SAMPLER_KEYS[0],
        Key("max_length", int, help="prompt + new tokens (default 1024)"),
        Key("strip_prompt", bool, False, help="true: print only the new text"),
        Key(
            "chat",
            default="auto",
            help="auto (default: the chat template for a run's SFT/DPO model or an instruct "
            "preset) | true | false (raw completion)",
        ),
        Key("stop_token_ids", default="auto", help="auto (EOS, default) | none | comma-separated ids"),
        *SAMPLER_KEYS[1:],
        *MODEL_KEYS,
    ),
)

CHAT = Command(
    "chat",
    'usage: mistral-tune chat preset=ID_OR_PATH [system="..."] [max_new_tokens=256] [sampler=...] [key=value ...]',
    description="Type a message and press enter; /reset starts over, /exit or Ctrl-D (EOF) quits.",
    keys=(
        PRESET,
        Key("system", help="a system message the conversation starts with"),
        Key("max_new_tokens", int, 256, help="new tokens per reply (default 256)"),
        *SAMPLER_KEYS,
        *MODEL_KEYS,
    ),
)


def build_sampler(opts: dict[str, Any]):
    """A Sampler from sampler=NAME plus the parameters that sampler takes (alpha/k for contrastive, ...)."""
    from mistral_tune.inference.samplers import SAMPLERS, get_sampler

    name = opts.pop("sampler") or "top_k"
    params = {k: v for k in SAMPLER_PARAMS if (v := opts.pop(k)) is not None}
    if name not in SAMPLERS:
        get_sampler(name)  # raises the unknown-sampler error, with a suggestion
    cls = SAMPLERS[name]
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    extra = set(params) - accepted
    if extra:
        raise UserError(
            f"sampler={name} does not take {', '.join(sorted(extra))} (it takes: {', '.join(sorted(accepted)) or 'nothing'})."
        )
    return cls(**params)


def load(opts: dict[str, Any]):
    from mistral_tune.api.causal_lm import MistralCausalLM

    kwargs = {k: v for k in ("dtype", "attn_implementation") if (v := opts.pop(k)) is not None}
    lm = MistralCausalLM.from_preset(opts.pop("preset"), opts.pop("load_weights"), **kwargs)
    lm.compile(sampler=build_sampler(opts))
    return lm


def parse_stop(raw: str) -> Any:
    if raw == "auto":
        return "auto"
    if raw.lower() == "none":
        return None
    try:
        return tuple(int(x) for x in raw.split(","))
    except ValueError:
        raise UserError(f"stop_token_ids={raw!r} must be auto, none or comma-separated ids.") from None


def cmd_generate(args: list[str]) -> int:
    if run_help(GENERATE, args):
        return 0
    opts = GENERATE.parse(args)
    prompts = opts.pop("prompt")
    gen = {
        "max_length": opts.pop("max_length"),
        "strip_prompt": opts.pop("strip_prompt"),
        "stop_token_ids": parse_stop(opts.pop("stop_token_ids")),
    }
    chat = parse_chat(opts.pop("chat"))
    preset = opts["preset"]
    lm = load(opts)
    if chat is None:
        from pathlib import Path

        from mistral_tune.inference.generation import chat_model_reason

        reason = chat_model_reason(Path(preset) if Path(preset).is_dir() else None, lm.metadata, lm.base_preset)
        chat = reason is not None
        if chat:
            print(
                f"generate: prompts go through the chat template ({reason}); chat=false for raw text", file=sys.stderr
            )
    return print_generations(lm, prompts, chat=chat, **gen)


def parse_chat(raw: str) -> Any:
    """chat=auto -> None (decided from the model), true/false -> bool."""
    value = str(raw).lower()
    if value not in ("auto", "true", "false"):
        raise UserError(f"chat={raw!r} must be auto, true or false.")
    return None if value == "auto" else value == "true"


def print_generations(lm: Any, prompts: list[str], *, chat: bool, max_length, strip_prompt, stop_token_ids) -> int:
    """Generate for every prompt (one left-padded batch) and print each; an empty answer is reported on stderr
    with its reason instead of printed as a blank. Exit status 1 when every answer was empty."""
    from mistral_tune.api.causal_lm import DEFAULT_MAX_LENGTH
    from mistral_tune.inference.generation import empty_answer, encode_inputs, generate_ids, resolve_stop_ids

    tokenizer = lm.tokenizer
    inputs = [[{"role": "user", "content": p}] for p in prompts] if chat else list(prompts)
    prompt_ids = encode_inputs(tokenizer, inputs)
    if max_length is None:
        default = lm.preprocessor.sequence_length if lm.preprocessor is not None else DEFAULT_MAX_LENGTH
        max_length = min(default, lm.hf_model.config.max_position_embeddings)
    stop_ids = resolve_stop_ids(stop_token_ids, tokenizer)
    new_ids = generate_ids(
        lm.hf_model, tokenizer, prompt_ids, sampler=lm.sampler, max_length=int(max_length), stop_ids=stop_ids
    )
    per_prompt = len(new_ids) // len(prompt_ids)  # several with BeamSampler(return_all_beams=True)
    empty = 0
    for i, new in enumerate(new_ids):
        n = i // per_prompt
        if i:
            print("-" * 40)
        reason = empty_answer(new, tokenizer, stop_ids)
        if reason:
            empty += 1
            hint = "" if chat else "; for a chat model try chat=true"
            print(f"generate: empty answer to prompt {n + 1} ({prompts[n][:40]!r}): {reason}{hint}", file=sys.stderr)
            if strip_prompt:
                continue
        print(tokenizer.decode(new if strip_prompt else prompt_ids[n] + new))
    return 1 if empty == len(new_ids) else 0


def cmd_chat(args: list[str]) -> int:
    if run_help(CHAT, args, bare=False):
        return 0
    opts = CHAT.parse(args)
    system = opts.pop("system")
    max_new = opts.pop("max_new_tokens")
    lm = load(opts)
    print("chat: /reset starts over, /exit or Ctrl-D quits.", file=sys.stderr)
    messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    while True:
        try:
            if sys.stdin.isatty():  # the prompt goes to stderr, so stdout holds only the answers
                print("> ", end="", file=sys.stderr, flush=True)
            line = input()
        except EOFError:
            print(file=sys.stderr)
            return 0
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            return 0
        if text == "/reset":
            messages = messages[:1] if system else []
            continue
        turn = [*messages, {"role": "user", "content": text}]
        prompt_len = len(lm.tokenizer.apply_chat_template(turn))
        reply = lm.generate(turn, max_length=prompt_len + max_new, strip_prompt=True).strip()
        if reply:
            print(reply)
            messages = [*turn, {"role": "assistant", "content": reply}]
        else:
            # The Mistral formats have no empty assistant turn, so this exchange cannot stay in the history.
            print("(empty reply; this exchange is not kept in the history)", file=sys.stderr)
