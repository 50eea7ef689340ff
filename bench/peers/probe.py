"""Run one tool's training command in this process with a measuring probe (stdlib + transformers only,
so it runs in every peer's venv unchanged).

    python probe.py OUT.jsonl -m module [args...]      # like `python -m module args`
    python probe.py OUT.jsonl path/to/script [args...]  # like `python script args` (console scripts too)

Every tool measured here trains through ``transformers.Trainer``. The probe wraps, on the base classes
(so every subclass that calls ``super()`` is covered):
- ``CallbackHandler.on_step_begin`` / ``on_step_end``: wall-clock stamps of each optimizer step;
- ``Trainer.training_step``: the batch's real (non-padding) tokens, label tokens and padded shape;
- ``CallbackHandler.on_log``: the logged loss, to check that the tools train alike.
Each event is one JSON line, flushed at once (``time.time()`` stamps, comparable with the driver's).
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import time

OUT = None  # the events file, opened by main()


def emit(**record):
    record["t"] = time.time()
    OUT.write(json.dumps(record) + "\n")


def count_tokens(inputs, pad_id):
    """(real tokens, label tokens, padded positions) of one micro-batch.

    Real tokens: ones of a 2-D attention mask; without a mask (padding-free packing, which keeps examples
    apart by restarting position_ids), every position except tail padding, i.e. positions whose
    position id is 0 while the token is the pad token and carries no label. (A packed example's first
    token also has position 0, but it is BOS, not the pad token.)
    """
    ids = inputs["input_ids"]
    labels = inputs.get("labels")
    mask = inputs.get("attention_mask")
    if mask is not None and getattr(mask, "dim", lambda: 0)() == 2:
        real = int((mask != 0).sum())
    elif "position_ids" in inputs and pad_id is not None:
        pads = (inputs["position_ids"] == 0) & (ids == pad_id)
        if labels is not None:
            pads &= labels == -100
        real = int(ids.numel() - pads.sum())
    else:
        real = int(ids.numel())
    n_labels = int((labels[..., 1:] != -100).sum()) if labels is not None else None
    return real, n_labels, list(ids.shape)


def install():
    import transformers.trainer as tr
    from transformers.trainer_callback import CallbackHandler

    def wrap_event(name):
        orig = getattr(CallbackHandler, name)

        def hooked(self, args, state, control, *a, **k):
            emit(event=name, step=state.global_step)
            return orig(self, args, state, control, *a, **k)

        setattr(CallbackHandler, name, hooked)

    for name in ("on_train_begin", "on_step_begin", "on_step_end", "on_train_end"):
        wrap_event(name)

    orig_log = CallbackHandler.on_log

    def on_log(self, args, state, control, logs=None, *a, **k):
        emit(event="log", step=state.global_step, logs={k2: v for k2, v in (logs or {}).items() if isinstance(v, (int, float))})
        return orig_log(self, args, state, control, logs, *a, **k)

    CallbackHandler.on_log = on_log

    orig_step = tr.Trainer.training_step
    seen = {"first": True}

    def training_step(self, model, inputs, *a, **k):
        pc = getattr(self, "processing_class", None) or getattr(self, "tokenizer", None)
        pad_id = getattr(pc, "pad_token_id", None)
        real, n_labels, shape = count_tokens(inputs, pad_id)
        record = {"event": "batch", "real_tokens": real, "label_tokens": n_labels, "shape": shape}
        if seen["first"]:
            seen["first"] = False
            record["keys"] = sorted(inputs.keys())
            record["gradient_checkpointing"] = bool(getattr(self.args, "gradient_checkpointing", None))
            # LLaMA-Factory turns it on itself (not through TrainingArguments): ask the model too.
            record["model_gradient_checkpointing"] = any(
                getattr(m, "gradient_checkpointing", False) is True for m in model.modules()
            )
            record["dtype"] = str(next(model.parameters()).dtype)
            record["attn_implementation"] = getattr(getattr(model, "config", None), "_attn_implementation", None)
            record["trainable_parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
            record["torch_threads"] = __import__("torch").get_num_threads()
        emit(**record)
        return orig_step(self, model, inputs, *a, **k)

    tr.Trainer.training_step = training_step


def main():
    global OUT
    OUT = open(sys.argv[1], "a", buffering=1)
    emit(event="probe_start", pid=os.getpid())
    install()
    args = sys.argv[2:]
    if args[0] == "-m":
        sys.argv = [args[1], *args[2:]]
        runpy.run_module(args[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(args)
        sys.path.insert(0, os.path.dirname(os.path.abspath(args[0])))
        runpy.run_path(args[0], run_name="__main__")


if __name__ == "__main__":
    try:
        main()
    finally:
        if OUT is not None:
            emit(event="probe_end")
            OUT.close()
