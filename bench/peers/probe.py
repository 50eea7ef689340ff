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


def thread_cpu() -> dict:
    """CPU seconds (user + system) used so far by each thread of this process, by thread name and id."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        out[f"{name}:{tid}"] = round((int(fields[11]) + int(fields[12])) / tick, 2)
    return out


def install_profiler(CallbackHandler):
    """PROBE_PROFILE=STEP: torch.profiler (CPU) around optimizer step STEP (global_step at its start; 1 is
    the second step, after one warm-up), from on_step_begin to on_step_end; writes the ops grouped by name,
    sorted by self CPU time, next to the events file (OUT.profile.txt), with the process's torch thread
    count and optimizer on its first line."""
    spec = os.environ.get("PROBE_PROFILE")
    if not spec:
        return
    target = int(spec)
    path = OUT.name.removesuffix(".jsonl") + ".profile.txt"
    state = {"prof": None}
    orig_begin, orig_end = CallbackHandler.on_step_begin, CallbackHandler.on_step_end

    def on_step_begin(self, args, st, control, *a, **k):
        if st.global_step == target and state["prof"] is None:
            import torch.profiler as tp

            state["prof"] = tp.profile(activities=[tp.ProfilerActivity.CPU])
            state["prof"].__enter__()
            state["t0"] = time.perf_counter()
        return orig_begin(self, args, st, control, *a, **k)

    def on_step_end(self, args, st, control, *a, **k):
        prof = state.get("prof")
        if prof is not None and not state.get("done"):
            prof.__exit__(None, None, None)
            state["done"] = True
            import torch

            wall = time.perf_counter() - state["t0"]
            opt = getattr(self, "optimizer", None)
            info = {
                "step_wall_s": wall, "torch_threads": torch.get_num_threads(),
                "interop_threads": torch.get_num_interop_threads(),
                "optimizer": type(opt).__name__ if opt is not None else None,
                "optimizer_defaults": {k2: str(v) for k2, v in (getattr(opt, "defaults", {}) or {}).items()},
                "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            }  # fmt: skip
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=45, max_name_column_width=60)
            with open(path, "w") as f:
                f.write(json.dumps(info) + "\n" + table)
            emit(event="profile", path=path, **info)
        return orig_end(self, args, st, control, *a, **k)

    CallbackHandler.on_step_begin, CallbackHandler.on_step_end = on_step_begin, on_step_end


def install():
    import transformers.trainer as tr
    from transformers.trainer_callback import CallbackHandler

    def wrap_event(name):
        orig = getattr(CallbackHandler, name)

        def hooked(self, args, state, control, *a, **k):
            extra = {"thread_cpu_s": thread_cpu()} if name in ("on_step_begin", "on_step_end") else {}
            emit(event=name, step=state.global_step, **extra)
            return orig(self, args, state, control, *a, **k)

        setattr(CallbackHandler, name, hooked)

    for name in ("on_train_begin", "on_step_begin", "on_step_end", "on_train_end"):
        wrap_event(name)

    install_profiler(CallbackHandler)

    orig_log = CallbackHandler.on_log

    def on_log(self, args, state, control, logs=None, *a, **k):
        emit(
            event="log",
            step=state.global_step,
            logs={k2: v for k2, v in (logs or {}).items() if isinstance(v, (int, float))},
        )
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
        t0 = time.perf_counter()
        out = orig_step(self, model, inputs, *a, **k)
        # forward + backward (Trainer.training_step); the rest of the step is clipping, optimizer, scheduler
        emit(event="fwd_bwd", step=self.state.global_step, seconds=time.perf_counter() - t0)
        return out

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
