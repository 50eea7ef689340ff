"""``mistral-tune generate`` and ``mistral-tune chat``: the Python API from the command line."""

from __future__ import annotations

import inspect
import sys
from typing import Any

from mistral_tune.cli.args import parse_args
from mistral_tune.core.errors import UserError

GENERATE_USAGE = """\
usage: mistral-tune generate preset=ID_OR_PATH prompt="..." [prompt="..." ...] [key=value ...]

  preset          built-in id, hf://org/name, kaggle://..., or a directory (e.g. a run's merged/)
  prompt          text to continue; repeat for a left-padded batch
  sampler         greedy | top_k (default) | top_p | random | beam | contrastive
  max_length      prompt + new tokens (default 1024)
  strip_prompt    true: print only the new text
  stop_token_ids  auto (EOS, default) | none | comma-separated ids
  k, p, temperature, seed, num_beams, alpha   sampler parameters
  dtype, attn_implementation, load_weights    how the model is loaded
"""

CHAT_USAGE = """\
usage: mistral-tune chat preset=ID_OR_PATH [system="..."] [max_new_tokens=256] [sampler=...] [key=value ...]

Type a message and press enter; /reset starts over, /exit or Ctrl-D (EOF) quits.
"""

LOAD_KEYS = {"preset": str, "dtype": str, "attn_implementation": str, "load_weights": bool}

SAMPLER_KEYS = {
    "sampler": str,
    "k": int,
    "p": float,
    "temperature": float,
    "seed": int,
    "num_beams": int,
    "alpha": float,
}


def build_sampler(opts: dict[str, Any]):
    """A Sampler from sampler=NAME plus the parameters that sampler takes (alpha/k for contrastive, ...)."""
    from mistral_tune.inference.samplers import SAMPLERS, get_sampler

    name = opts.pop("sampler", "top_k")
    params = {k: opts.pop(k) for k in list(opts) if k in SAMPLER_KEYS}
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

    kwargs = {k: opts.pop(k) for k in ("dtype", "attn_implementation") if k in opts}
    lm = MistralCausalLM.from_preset(opts.pop("preset"), opts.pop("load_weights", True), **kwargs)
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
    if not args or args[0] in ("-h", "--help"):
        print(GENERATE_USAGE)
        return 0
    known = {**LOAD_KEYS, **SAMPLER_KEYS, "prompt": str, "max_length": int, "strip_prompt": bool, "stop_token_ids": str}
    opts = parse_args(args, known, repeatable=("prompt",))
    prompts = opts.pop("prompt", None)
    if not prompts:
        raise UserError('No prompt given. Pass prompt="..." (repeat it for several prompts).')
    gen = {
        "max_length": opts.pop("max_length", None),
        "strip_prompt": opts.pop("strip_prompt", False),
        "stop_token_ids": parse_stop(opts.pop("stop_token_ids", "auto")),
    }
    lm = load(opts)
    outputs = lm.generate(prompts, **gen)
    for i, text in enumerate(outputs):
        if i:
            print("-" * 40)
        print(text)
    return 0


def cmd_chat(args: list[str]) -> int:
    if args and args[0] in ("-h", "--help"):
        print(CHAT_USAGE)
        return 0
    known = {**LOAD_KEYS, **SAMPLER_KEYS, "system": str, "max_new_tokens": int}
    opts = parse_args(args, known)
    system = opts.pop("system", None)
    max_new = opts.pop("max_new_tokens", 256)
    lm = load(opts)
    print("chat: /reset starts over, /exit or Ctrl-D quits.", file=sys.stderr)
    messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    while True:
        try:
            line = input("> ")
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
            print("(empty reply; this exchange is not kept in the history)")
