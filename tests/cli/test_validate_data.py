"""``mistral-tune validate-data`` (alias ``check``), through real processes: file:line problems, exit codes,
counts and epochs for a known file, --write-corrected (re-validated and trained on), nothing written otherwise."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mistral_tune.data.fixes import correct_row
from mistral_tune.models.tokenizer import MistralTokenizer
from tests.helpers import chat, good_rows, hostile_file, read_summary, write_lines

REPO = Path(__file__).resolve().parents[2]


def check(args: list[str], cwd: Path, command: str = "validate-data") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mistral_tune", command, "recipe=sft_lora", *args],
        cwd=cwd, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def flat(text: str) -> str:
    """Text with the error's line wrapping undone."""
    return " ".join(text.split())


def tree(root: Path) -> dict[str, int]:
    """Every file under ``root`` with its modification time in ns."""
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}


def problem_lines(stdout: str) -> list[str]:
    block = stdout.split("problems (", 1)[1].split("\n\n", 1)[0]
    return [line.strip() for line in block.splitlines()[1:]]


def test_every_bad_line_is_reported_as_file_line_reason(tmp_path):
    data = hostile_file(tmp_path)  # 20 good rows, then trouble at lines 21..29
    proc = check([f"data.path={data}", "data.on_error=skip", "trainer.max_length=64"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    got = problem_lines(proc.stdout)
    expected = [
        (21, "malformed JSON"),
        (22, "not valid UTF-8"),
        (23, "expected a JSON object, got list"),
        (24, "missing_field: no 'messages'"),
        (25, "empty_field: messages[0].content is empty"),
        (29, "no_loss_tokens: "),  # 200 words of prompt: truncation at 64 leaves no answer token
    ]
    assert len(got) == len(expected), got
    for line, (n, reason) in zip(got, expected):
        assert line.startswith(f"{data}:{n}: {reason}"), (line, n, reason)
    assert "rows       29: 23 usable, 6 unusable" in proc.stdout


def test_exit_codes(tmp_path):
    good = write_lines(tmp_path / "good.jsonl", good_rows(10))
    assert check([f"data.path={good}"], tmp_path).returncode == 0

    # data.on_error=fail (the default): training would stop at the first unreadable line, so the check fails
    hostile = hostile_file(tmp_path)
    proc = check([f"data.path={hostile}"], tmp_path)
    assert proc.returncode == 2
    assert f"{hostile}:21: malformed JSON" in flat(proc.stderr) and "data.on_error=skip" in flat(proc.stderr)
    assert proc.stderr.count("error:") == 1 and "Traceback" not in flat(proc.stderr)

    # no usable row at all: one error naming the source and the reasons
    bad = write_lines(tmp_path / "bad.jsonl", [chat("", "x"), chat("q", ""), json.dumps({"messages": []})])
    proc = check([f"data.path={bad}", "data.on_error=skip"], tmp_path)
    assert proc.returncode == 2 and "none of its 3 rows can be trained on" in flat(proc.stderr), proc.stderr
    assert proc.stderr.count("error:") == 1

    missing = check([f"data.path={tmp_path / 'nope.jsonl'}"], tmp_path)
    assert missing.returncode == 2 and "no such file" in flat(missing.stderr)

    flag = check(["--write-corected", "x.jsonl"], tmp_path)
    assert flag.returncode == 2 and "did you mean '--write-corrected'" in flat(flag.stderr)


def test_counts_lengths_truncation_and_epochs_of_a_known_file(tmp_path):
    tok = MistralTokenizer.from_version("v1", chat_template="v1")  # mistral_tiny's tokenizer and format
    rows = [{"messages": [{"role": "user", "content": "word " * (3 * i + 1)},
                          {"role": "assistant", "content": f"answer {i} " * (i + 1)}]} for i in range(12)]  # fmt: skip
    data = tmp_path / "known.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    max_length = 60
    encoded = [tok.encode_chat(r["messages"]) for r in rows]
    lengths = sorted(len(ids) for ids, _ in encoded)
    total = sum(min(len(ids), max_length) for ids, _ in encoded)
    trained = sum(sum(mask[1:max_length]) for _, mask in encoded)
    over = sum(n > max_length for n in lengths)
    assert 0 < over < 12 and all(sum(mask[1:max_length]) for _, mask in encoded)  # some cut, none emptied

    args = [f"data.path={data}", f"trainer.max_length={max_length}", "data.holdout=2", "train.max_steps=10",
            "train.per_device_train_batch_size=2", "train.gradient_accumulation_steps=3"]  # fmt: skip
    proc = check(args, tmp_path, command="check")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "rows       12: 12 usable, 0 unusable" in out
    assert f"tokens     {total:,} total, {trained:,} trained" in out
    p = {"min": lengths[0], "p50": lengths[5], "p90": lengths[10], "p99": lengths[11], "max": lengths[11]}
    assert "length     " + ", ".join(f"{k} {v}" for k, v in p.items()) + " tokens" in out
    assert f"truncated  {over} at trainer.max_length={max_length}" in out
    assert len(re.findall(rf"{data}:\d+: too_long: ", out)) == over
    # 10 steps x (2 x 3 x 1 process) = 60 examples over 12 - 2 held out = 10 rows: 6 epochs
    assert "10 optimizer steps x 6 examples per step" in out
    assert "epochs     6.00 over its 10 training rows" in out
    assert re.search(r"ETA on H100 .*dry-run estimator.* for 10 steps", out)
    assert "measured ETA on this machine: not measured" in out


def test_write_corrected_revalidates_cleanly_and_trains(tmp_path):
    rows = good_rows(12)
    rows += [
        json.dumps({"messages": [{"role": "User", "content": "Hi"}, {"role": "ASSISTANT", "content": "Hello"}]}),
        json.dumps({"messages": [{"role": "human", "content": "Hi"}, {"role": "gpt", "content": "Yo"}]}),
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": "A"},
                    {"role": "assistant", "content": "B"},
                    {"role": "user", "content": "and then?"},
                ]
            }
        ),  # fmt: skip
        "{not json",
        chat("", "empty user turn: not fixable"),
    ]
    data = write_lines(tmp_path / "raw.jsonl", rows)
    out = tmp_path / "fixed" / "clean.jsonl"
    proc = check([f"data.path={data}", "--write-corrected", str(out)], tmp_path)
    # the unreadable line still fails the check as configured (on_error=fail); the file is written anyway
    assert proc.returncode == 2, proc.stdout
    assert f"wrote {out}: 15 rows" in proc.stdout
    assert "changes: 4 roles_normalised, 1 trailing_user_turns_dropped; 2 unusable line(s) left out" in proc.stdout
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert written[12]["messages"] == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert written[14]["messages"][-1] == {"role": "assistant", "content": "B"}

    again = check([f"data.path={out}"], tmp_path)
    assert again.returncode == 0 and "problems: none" in again.stdout, again.stdout
    assert "rows       15: 15 usable, 0 unusable" in again.stdout

    run = tmp_path / "run"
    train = subprocess.run(
        [sys.executable, "-m", "mistral_tune", "recipe=sft_lora", f"data.path={out}", "train.max_steps=2",
         "train.per_device_train_batch_size=2", "data.holdout=1", "export=none", "export.num_samples=0",
         f"output_dir={run}"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert train.returncode == 0, train.stderr[-3000:]
    data_report = read_summary(run)["data"]
    assert data_report["read"] == 15 and data_report["dropped_total"] == 0 and data_report["used"] == 14


def test_nothing_is_written_without_the_flag(tmp_path):
    hostile = hostile_file(tmp_path)
    before = tree(tmp_path)
    repo_before = tree(REPO / "data")
    for args in ([f"data.path={hostile}", "data.on_error=skip"], [f"data.path={hostile}"]):
        check(args, tmp_path)
    assert tree(tmp_path) == before
    assert tree(REPO / "data") == repo_before
    assert not (tmp_path / "runs").exists()


def test_write_corrected_refuses_to_overwrite_its_source(tmp_path):
    data = write_lines(tmp_path / "d.jsonl", good_rows(5))
    before = data.read_bytes()
    proc = check([f"data.path={data}", f"--write-corrected={data}"], tmp_path)
    assert proc.returncode == 2 and "that is a source" in flat(proc.stderr)
    assert data.read_bytes() == before


@pytest.mark.skipif(not Path("/work/shared/data/alpaca_5000.json").is_file(), reason="shared alpaca_5000 absent")
def test_alpaca_5000_positions_are_json_indices(tmp_path):
    proc = check(["data.path=/work/shared/data/alpaca_5000.json", "trainer.max_length=512"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "rows       5,000: 4,998 usable, 2 unusable (2 empty_field)" in proc.stdout
    assert "/work/shared/data/alpaca_5000.json[2335]: empty_field: 'output' is empty" in proc.stdout


def test_correct_row():
    row = {"conversations": [{"from": "Human", "value": "a"}, {"from": "GPT", "value": "b"},
                             {"from": "human", "value": "c"}], "id": 3}  # fmt: skip
    fixed, fixes = correct_row(row, "sharegpt")
    assert fixed == {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}], "id": 3}
    assert fixes == {"roles_normalised": 2, "trailing_user_turns_dropped": 1}
    assert row["conversations"][0]["from"] == "Human"  # the input row is left as it was

    msgs = {"messages": [{"role": " System ", "content": "s"}, {"role": "human", "content": "a"},
                         {"role": "gpt", "content": "b"}]}  # fmt: skip
    fixed, fixes = correct_row(msgs, "messages")
    assert [m["role"] for m in fixed["messages"]] == ["system", "user", "assistant"] and fixes["roles_normalised"] == 3

    only_user = {"messages": [{"role": "user", "content": "a"}]}  # nothing to keep: left to be reported
    assert correct_row(only_user, "messages") == (only_user, {})
    unknown = {"messages": [{"role": "narrator", "content": "a"}]}
    assert correct_row(unknown, "messages")[0] is unknown
    alpaca = {"instruction": "x", "output": "y"}
    assert correct_row(alpaca, "alpaca") == (alpaca, {})


def test_measured_eta_times_real_steps_and_leaves_nothing(tmp_path):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    data = write_lines(tmp_path / "d.jsonl", good_rows(24))
    before = tree(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "mistral_tune", "check", "recipe=sft_lora", f"data.path={data}", "trainer.max_length=64",
         "train.max_steps=50", "train.per_device_train_batch_size=2", "--measure-steps", "1"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(scratch)},
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = re.search(r"measured ETA on this machine \(cpu, \d+ threads\): (.+?) for 50 steps \(median of 1 real "
                      r"optimizer step\(s\) after 1 warm-up: ([\d.e-]+) s/step", proc.stdout)  # fmt: skip
    assert found, proc.stdout
    assert float(found.group(2)) > 0
    ours = [p.name for p in scratch.iterdir() if p.name.startswith("mistral-tune-validate-")]
    assert not ours  # the worker's run directory is removed (torch may leave its own inductor cache there)
    assert {k: v for k, v in tree(tmp_path).items() if not k.startswith("tmp/")} == before


def test_duplicates_count_and_dedup_takes_them_out_of_the_epochs(tmp_path):
    first, second = good_rows(2)
    data = write_lines(tmp_path / "dup.jsonl", [first, first, first, second])
    common = [f"data.path={data}", "data.holdout=0", "train.max_steps=4", "train.per_device_train_batch_size=2"]
    kept = check(common, tmp_path).stdout
    assert "duplicates 2 exact duplicate row(s) (kept; data.dedup=true drops them)" in kept
    assert "epochs     2.00 over its 4 training rows" in kept
    dropped = check([*common, "data.dedup=true"], tmp_path).stdout
    assert "epochs     4.00 over its 2 training rows" in dropped


def test_a_source_unusable_as_is_but_fixable(tmp_path):
    capital = json.dumps({"messages": [{"role": "User", "content": "Hi"}, {"role": "Assistant", "content": "Hey"}]})
    data = write_lines(tmp_path / "caps.jsonl", [capital, capital.replace("Hi", "Yo")])
    proc = check([f"data.path={data}"], tmp_path)
    assert proc.returncode == 2 and "--write-corrected OUT makes 2 of them usable" in flat(proc.stderr)
    out = tmp_path / "caps.fixed.json"  # a .json list this time
    proc = check([f"data.path={data}", f"--write-corrected={out}"], tmp_path)
    assert f"wrote {out}: 2 rows" in proc.stdout and "changes: 4 roles_normalised" in proc.stdout
    assert [m["role"] for m in json.loads(out.read_text())[1]["messages"]] == ["user", "assistant"]
    assert check([f"data.path={out}", "data.holdout=0"], tmp_path).returncode == 0

    hopeless = write_lines(tmp_path / "empty.jsonl", [chat("", "x")])
    proc = check([f"data.path={hopeless}", f"--write-corrected={tmp_path / 'none.jsonl'}"], tmp_path)
    assert proc.returncode == 2 and "wrote nothing to" in proc.stdout and not (tmp_path / "none.jsonl").exists()


TOOLS_SAMPLE = REPO / "data" / "tools_sample.jsonl"


def test_tool_call_ids_are_reported_fixed_and_weights_counted(tmp_path):
    rows = [json.loads(line) for line in TOOLS_SAMPLE.read_text().splitlines()[:8]]  # line 7 has a weight 0
    for m in rows[1]["messages"]:  # line 2 (one call): OpenAI-style ids a v3 format cannot use
        for call in m.get("tool_calls") or []:
            call["id"] = "call_1"
        if m["role"] == "tool":
            m["tool_call_id"] = "call_1"
    data = tmp_path / "tools.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    v3 = ["model=mistral_0.3_tiny", "trainer.max_length=512", "data.holdout=0"]
    out = tmp_path / "tools.fixed.jsonl"
    proc = check([f"data.path={data}", *v3, "--write-corrected", str(out)], tmp_path)
    # as the run's data check does, a bad id stops a data.on_error=fail run: the check fails, naming the line
    assert proc.returncode == 2 and f"first {data}:2: bad_tool_call_id" in flat(proc.stderr), proc.stderr
    assert problem_lines(proc.stdout) == [
        f"{data}:2: bad_tool_call_id: messages[1].tool_calls[0].id='call_1' must be exactly 9 letters or digits "
        "(set data.fix_tool_call_ids=true to generate ids) (fixable: --write-corrected applies tool_call_ids_generated)"
    ]
    assert "changes: 2 tool_call_ids_generated" in proc.stdout  # the call's id and the tool result's
    fixed = [json.loads(line) for line in out.read_text().splitlines()]
    call_id = fixed[1]["messages"][1]["tool_calls"][0]["id"]
    assert re.fullmatch(r"[A-Za-z0-9]{9}", call_id) and fixed[1]["messages"][2]["tool_call_id"] == call_id
    again = check([f"data.path={out}", *v3], tmp_path)
    assert again.returncode == 0 and "problems: none" in again.stdout

    weight0 = sum(1 for r in rows for m in r["messages"] if m["role"] == "assistant" and m.get("weight") == 0)
    answers = sum(1 for r in rows for m in r["messages"] if m["role"] == "assistant")
    assert weight0 > 0
    assert (
        f'turns      {answers} assistant turns, {weight0} with "weight": 0 (not trained); 8 rows with tool use'
        in again.stdout
    )

    # training's own repair, data.fix_tool_call_ids=true: nothing to report, the ids it generates counted
    repaired = check([f"data.path={data}", *v3, "data.fix_tool_call_ids=true"], tmp_path)
    assert "problems: none" in repaired.stdout and "2 tool-call ids generated" in repaired.stdout

    v1 = check([f"data.path={data}"], tmp_path)  # mistral_tiny: v1 has no tool calls; one error for the source
    assert v1.returncode == 2 and "has no tool calls" in flat(v1.stderr) and flat(v1.stderr).count("error:") == 1


def test_an_eval_file_is_checked_too_and_a_fraction_comes_out_of_the_epochs(tmp_path):
    train = write_lines(tmp_path / "train.jsonl", good_rows(22))
    evaluation = write_lines(tmp_path / "eval.jsonl", [*good_rows(3), "{oops"])
    proc = check([f"data.path={train}", f"data.eval_split={evaluation}", "data.on_error=skip"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"{evaluation}:4: malformed JSON" in proc.stdout
    assert f"eval source {evaluation} (messages, data.eval_split: evaluation only)" in proc.stdout
    assert "rows       4: 3 usable, 1 unusable (1 malformed_json)" in proc.stdout
    failing = check([f"data.path={train}", f"data.eval_split={evaluation}"], tmp_path)  # on_error=fail
    assert failing.returncode == 2 and f"first {evaluation}:4: malformed JSON" in flat(failing.stderr)

    # a fraction: 22 rows - 4 held out = 18; 0.1 of them (2) for evaluation leaves 16 training rows
    frac = check(
        [f"data.path={train}", "data.eval_split=0.1", "train.max_steps=4", "train.per_device_train_batch_size=4"],
        tmp_path,
    )
    assert "epochs     1.00 over its 16 training rows" in frac.stdout, frac.stdout
    assert "training rows exclude data.holdout=4 and data.eval_split=0.1" in frac.stdout


@pytest.mark.parametrize("recipe", ["sft_qlora", "sft_full"])
def test_gpu_eta_uses_the_dry_run_estimate_without_building_a_model(tmp_path, recipe):
    args = [
        f"recipe={recipe}",
        "model=mistral_7b_en",
        "trainer.max_length=2048",
        "dry_run_gpu=A100",
        "train.max_steps=40",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    dry = subprocess.run([sys.executable, "-m", "mistral_tune", *args, "dry_run=true"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    step = re.search(r"([\d.]+) s per optimizer step", dry.stdout).group(1)
    code = (
        "import sys\nfrom mistral_tune.cli import main\nrc = main(sys.argv[1:])\n"
        "print('torch imported:', 'torch' in sys.modules)\nsys.exit(rc)"
    )
    proc = subprocess.run([sys.executable, "-c", code, "validate-data", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    found = re.search(r"ETA on (A100\S*) .* for 40 steps \(([\d.]+) s/step with every row padded to max_length=2048",
                      proc.stdout)  # fmt: skip
    assert found and found.group(2) == step, (proc.stdout, step)
    assert "torch imported: False" in proc.stdout  # no model stack for the check and the estimate


def test_a_weighted_mixture_matches_what_training_uses(tmp_path):
    chat_rows = write_lines(tmp_path / "chat.jsonl", [*good_rows(40), '{"messages": "oops"}'])
    alpaca = tmp_path / "alpaca.jsonl"
    alpaca.write_text("".join(json.dumps({"instruction": f"Say {i}.", "output": f"{i}."}) + "\n" for i in range(20)))
    common = [f"data.path='{chat_rows}:3,{alpaca}:1'", "data.holdout=2", "data.eval_split=0.1", "data.on_error=skip",
              "train.max_steps=6", "train.per_device_train_batch_size=4", "trainer.max_length=64"]  # fmt: skip
    proc = check(common, tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"{chat_rows}:41: missing_field: 'messages' is a str, not a list of messages" in out
    assert f"source {chat_rows} (messages, data.path[0], weight 3 = 75.0% of the examples)" in out
    assert f"source {alpaca} (alpaca, data.path[1], weight 1 = 25.0% of the examples)" in out
    assert "rows       61: 60 usable, 1 unusable" in out  # the total
    # chat: 40 - 2 held out = 38, 4 of them (0.1) for evaluation -> 34; alpaca: 20, 2 for evaluation -> 18
    # 6 steps x 4 = 24 examples: 18 from chat (0.53 epochs), 6 from alpaca (0.33 epochs)
    assert "epochs     0.53 over its 34 training rows" in out and "epochs     0.33 over its 18 training rows" in out

    run = tmp_path / "run"
    train = subprocess.run(
        [sys.executable, "-m", "mistral_tune", "recipe=sft_lora", *common, "export=none", "export.num_samples=0",
         f"output_dir={run}"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert train.returncode == 0, train.stderr[-3000:]
    sources = read_summary(run)["data"]["sources"]
    assert [s["used"] for s in sources] == [34, 18]  # the training rows validate-data counted
    seen = [s["examples_seen"] for s in sources]
    assert sum(seen) == 24 and 18 - 3 * 2.2 <= seen[0] <= 18 + 3 * 2.2  # binomial(24, 0.75): sd 2.1


def test_write_corrected_for_a_mixture_writes_one_file_per_source_and_the_data_path(tmp_path):
    capital = json.dumps({"messages": [{"role": "User", "content": "Hi"}, {"role": "Assistant", "content": "Hey"}]})
    a = write_lines(tmp_path / "a.jsonl", [*good_rows(6), capital])
    b = write_lines(tmp_path / "b.jsonl", good_rows(3))
    out = tmp_path / "fixed"
    proc = check([f"data.path='{a}:2,{b}:1'", "data.holdout=0", f"--write-corrected={out}"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out / 'a.jsonl'}: 7 rows" in proc.stdout and f"wrote {out / 'b.jsonl'}: 3 rows" in proc.stdout
    mix = f"{out / 'a.jsonl'}:2,{out / 'b.jsonl'}:1"
    assert f"train on them with data.path='{mix}'" in proc.stdout
    again = check([f"data.path='{mix}'", "data.holdout=0"], tmp_path)
    assert again.returncode == 0 and "problems: none" in again.stdout


def test_a_directory_source_names_each_file_and_line_in_order(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    write_lines(shards / "b.jsonl", [good_rows(1)[0], "{bad"])
    write_lines(shards / "a.jsonl", ["{bad", good_rows(2)[1], json.dumps({"messages": []})])
    proc = check([f"data.path={shards}", "data.on_error=skip", "data.holdout=0"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    got = [line.split(": ")[0] for line in problem_lines(proc.stdout)]
    assert got == [f"{shards}/a.jsonl:1", f"{shards}/a.jsonl:3", f"{shards}/b.jsonl:2"]
    assert "rows       5: 2 usable, 3 unusable (2 malformed_json, 1 no_assistant_turn)" in proc.stdout
