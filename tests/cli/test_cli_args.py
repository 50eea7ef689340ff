"""The one typed argument parser of the subcommands (mistral_tune/cli/args.py) and the declarations
each subcommand parses and prints its --help from."""

from __future__ import annotations

import pytest

from mistral_tune import cli
from mistral_tune.cli.args import Command, Key
from mistral_tune.cli.bench import BENCH, VARIANT, parse_bench_args, split_overrides
from mistral_tune.cli.export import EXPORT
from mistral_tune.cli.generate import CHAT, GENERATE
from mistral_tune.cli.score import SCORE
from mistral_tune.core.errors import UserError

DEMO = Command(
    "demo",
    "usage: mistral-tune demo name=X [key=value ...]",
    description="A command for the tests.",
    keys=(
        Key("name", help="who", required="No name given."),
        Key("count", int, 2, help="how many (default 2)"),
        Key("scale", float, help="a factor"),
        Key("loud", bool, False, help="true: shout"),
        Key("tags", list, help="[a,b]", choices=("red", "green", "blue")),
        Key("mode", default="fast", choices=("fast", "slow"), help="fast | slow"),
        Key("item", repeatable=True, help="repeat for several"),
        Key("steps", int, 10, flag=True, help="a flag with a value"),
        Key("dry", bool, False, flag=True, help="a flag without one"),
    ),
    epilog="  mistral-tune demo name=x count=3",
)

COMMANDS = {"generate": GENERATE, "chat": CHAT, "score": SCORE, "export": EXPORT, "bench": BENCH}


def test_values_are_typed_and_every_key_has_a_value():
    values = DEMO.parse(["name=x", "count=3", "scale=0.5", "loud=yes", "mode=slow", "--steps", "4", "--dry"])
    assert values == {
        "name": "x", "count": 3, "scale": 0.5, "loud": True, "tags": None, "mode": "slow", "item": [],
        "steps": 4, "dry": True,
    }  # fmt: skip
    defaults = DEMO.parse(["name=x"])
    assert (defaults["count"], defaults["scale"], defaults["loud"], defaults["mode"]) == (2, None, False, "fast")
    assert DEMO.parse(["name=x", "--steps=7", "loud=FALSE", "count=-1"])["steps"] == 7
    assert DEMO.parse(["name=a=b"])["name"] == "a=b"  # only the first = splits


def test_lists_take_brackets_or_commas_and_check_each_item():
    assert DEMO.parse(["name=x", "tags=[red, blue]"])["tags"] == ["red", "blue"]
    assert DEMO.parse(["name=x", "tags=green"])["tags"] == ["green"]
    assert DEMO.parse(["name=x", "tags=[]"])["tags"] == []
    with pytest.raises(UserError, match=r"tags: purple, gren not one of red, green, blue"):
        DEMO.parse(["name=x", "tags=[red,purple,gren]"])


def test_repeatable_keys_collect_and_others_refuse_a_second_value():
    assert DEMO.parse(["name=x", "item=a", "item=b", "item=a"])["item"] == ["a", "b", "a"]
    with pytest.raises(UserError, match="'count' is given twice"):
        DEMO.parse(["name=x", "count=1", "count=2"])


def test_unknown_keys_get_a_close_match_suggestion():
    with pytest.raises(UserError) as err:
        DEMO.parse(["name=x", "cuont=3", "weight=red", "--stpes", "2"])
    message = str(err.value)
    assert "unknown argument(s) cuont=3, weight=red, --stpes 2." in message
    assert "Unknown argument 'cuont': did you mean 'count'?" in message
    assert "Unknown argument '--stpes': did you mean '--steps'?" in message
    assert "Unknown argument 'weight'." in message  # nothing close: no suggestion
    assert "Known: name, count, scale, loud, tags, mode, item, --steps, --dry." in message


def test_every_bad_argument_is_in_one_error_naming_the_expected_type():
    args = ["count=many", "scale=big", "loud=maybe", "mode=medium", "bogus=1", "plain", "--steps"]
    with pytest.raises(UserError) as err:
        DEMO.parse(args)
    message = str(err.value)
    for part in (
        "mistral-tune demo: ",
        "count='many' must be an integer (count= takes an integer; 'many' is not a valid int)",
        "scale='big' must be a number (scale= takes a number; 'big' is not a valid float)",
        "loud='maybe' must be true or false",
        "mode: medium not one of fast, slow",
        "Unknown argument 'bogus'",
        "Argument 'plain' is not key=value",
        "--steps needs a value",
        "No name given.",
        "See `mistral-tune demo --help`.",
    ):
        assert part in message, part
    assert message.count("mistral-tune demo: ") == 1


def test_generated_help_has_the_usage_every_key_and_the_examples():
    text = DEMO.help()
    assert text.startswith("usage: mistral-tune demo name=X [key=value ...]\n\nA command for the tests.\n\n")
    assert "\n  name            who\n" in text
    assert "\n  count           how many (default 2)\n" in text
    assert "\n  --steps N       a flag with a value\n" in text
    assert "\n  --dry           a flag without one\n" in text
    assert text.endswith("\n\n  mistral-tune demo name=x count=3\n")


def test_keys_with_the_same_help_share_one_help_line():
    shared = Command(
        "x", "usage: x", (Key("k", int, help="sampler parameters"), Key("p", float, help="sampler parameters"))
    )
    assert shared.table() == "  k, p            sampler parameters"


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_each_subcommand_prints_the_help_of_its_declaration(name, capsys):
    declaration = COMMANDS[name]
    assert cli.main([name, "--help"]) == 0
    printed = capsys.readouterr().out
    assert printed == declaration.help()
    table = declaration.table() + "".join(other.table() for _, other in declaration.sections)
    for key in (*declaration.keys, *(k for _, other in declaration.sections for k in other.keys)):
        assert key.label in table and key.help.splitlines()[0] in printed, key.name
    assert printed.startswith(f"usage: mistral-tune {name}")


def test_help_keeps_the_texts_the_readme_and_docs_quote(capsys):
    assert "  k, p, temperature, seed, num_beams, alpha   sampler parameters" in GENERATE.help()
    assert "  stop_token_ids  auto (EOS, default) | none | comma-separated ids" in GENERATE.help()
    assert "/reset starts over, /exit or Ctrl-D (EOF) quits." in CHAT.help()
    assert "dtype           auto (the base's dtype) | float32 | bfloat16 | float16" in EXPORT.help()
    assert "bench.synthetic_length=N (random rows of N tokens, no data file)" in BENCH.help()
    assert "mistral-tune bench recipe=sft_lora --steps 10 --warmup 3" in BENCH.help()


def test_the_subcommands_parse_with_their_declarations():
    opts = EXPORT.parse(["run_dir=r", "formats=[merged,preset]", "verify=false", "tolerance=0.01", "seed=3"])
    assert (opts["formats"], opts["verify"], opts["tolerance"], opts["seed"]) == (["merged", "preset"], False, 0.01, 3)
    assert (opts["dtype"], opts["max_shard_size"], opts["adapter"]) == ("auto", "2GB", None)
    gen = GENERATE.parse(["preset=p", "prompt=a", "prompt=b", "k=5", "strip_prompt=true"])
    assert (gen["prompt"], gen["k"], gen["strip_prompt"], gen["stop_token_ids"]) == (["a", "b"], 5, True, "auto")
    assert CHAT.parse(["preset=p"])["max_new_tokens"] == 256
    assert SCORE.parse(["preset=p", "text=t"])["batch_size"] == 8


def test_dispatch_table_names_a_function_of_each_subcommand_module():
    for name in cli.COMMANDS:
        assert callable(cli.command(name)), name
    assert cli.command("chat").__module__ == "mistral_tune.cli.generate"
    assert cli.command("recipe=sft_lora").__module__ == "mistral_tune.cli.train"


def test_bench_passes_hydra_overrides_through_and_types_its_own_options():
    hydra, options, problems = split_overrides(
        ["train.seed=1", "bench.bare=false", "bench.synthetic_length=64", "a=[1,2]"]
    )
    assert hydra == ["train.seed=1", "a=[1,2]"] and problems == []
    assert options == {"recipe": "", "trainer": "mistral", "bare": False, "synthetic_length": 64}
    assert split_overrides([])[1] == {"recipe": "", "trainer": "mistral", "bare": True, "synthetic_length": 0}
    assert (
        "bench.trainer: tlr not one of mistral, trl (did you mean trl?)" in split_overrides(["bench.trainer=tlr"])[2][0]
    )
    assert [k.name for k in VARIANT.keys] == ["bench.recipe", "bench.trainer", "bench.bare", "bench.synthetic_length"]


def test_bench_flags_stand_anywhere_and_variants_group_what_follows():
    recipe, common, variants, opts = parse_bench_args(
        ["--variant=a", "x=1", "recipe=sft_lora", "--repeat", "2", "--variant", "b", "--peak-tflops=9.5", "y=2"]
    )
    assert recipe == "sft_lora" and common == [] and variants == [("a", ["x=1"]), ("b", ["y=2"])]
    assert (opts.repeat, opts.peak_tflops, opts.steps, opts.summarize_only) == (2, 9.5, 10, False)


def test_bench_reports_every_bad_argument_at_once():
    with pytest.raises(UserError) as err:
        parse_bench_args(["--steps", "x", "--step", "3", "bench.trainr=trl", "--variant", "a", "--variant", "a"])
    message = str(err.value)
    for part in ("not a valid int", "unknown option(s) --step 3.", "Unknown option '--step': did you mean '--steps'?", "No recipe given",
                 "Unknown benchmark option 'bench.trainr': did you mean 'bench.trainer'?", "must differ"):  # fmt: skip
        assert part in message, part
