"""Function calling in every chat format that has it (v3, tekken, v7): the ids equal mistral-common's
`encode_chat_completion` for the same conversation and tools, the exported template gives the same ids
through plain transformers (`AutoTokenizer` + `apply_chat_template(..., tools=...)`), and the loss mask
covers exactly the assistant turns (text, tool calls, EOS) that do not have `"weight": 0`."""

from __future__ import annotations

import copy
import functools
import json

import pytest
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.tool_calls import Tool
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer as MCTokenizer

from mistral_tune.models.tokenizer import MistralTokenizer, tokenizer_file
from tests.helpers import tiny_tekken_file
from tests.models.test_tokenizer_exact import masked_spans

V7_SPECIALS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]"]
V7_SPECIALS += ["[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]"]
V7_SPECIALS += ["[PREFIX]", "[MIDDLE]", "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CONTENT]"]

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIMER = {"type": "function", "function": {"name": "set_timer", "parameters": {"type": "object", "properties": {}}}}
# no description, no parameters: "" and {} as in mistral-common
BARE = {"type": "function", "function": {"name": "ping"}}


def call(id_: str, name: str, arguments) -> dict:
    return {"id": id_, "type": "function", "function": {"name": name, "arguments": arguments}}


def tool(id_: str, content: str) -> dict:
    return {"role": "tool", "tool_call_id": id_, "content": content}


U = lambda text: {"role": "user", "content": text}  # noqa: E731
A = lambda text, **kw: {"role": "assistant", "content": text, **kw}  # noqa: E731

# (tools, messages): one call; parallel calls; string arguments (OpenAI); plain-text, number and JSON
# results; a system prompt; tools listed but not called; two user turns; ending on a call (training);
# ending on a tool result (generation); weight 0 on a turn; non-ASCII text.
CONVERSATIONS = [
    ([WEATHER], [U("Weather in Paris?"), A("", tool_calls=[call("abc123XYZ", "get_weather", {"city": "Paris"})]),
                 tool("abc123XYZ", '{"temp": 21, "sky": "clear"}'), A("21 degrees and clear.")]),
    ([WEATHER, TIMER], [{"role": "system", "content": "Be brief."}, U("Paris and Oslo?"),
                        A("", tool_calls=[call("aaaaaaaa1", "get_weather", '{"city": "Paris"}'),
                                          call("bbbbbbbb2", "get_weather", '{"city": "Oslo"}')]),
                        tool("aaaaaaaa1", "sunny"), tool("bbbbbbbb2", "12"), A("Sunny; 12 degrees.  ")]),
    ([WEATHER, BARE], [U("Hi"), A("Hello! Ask me about the weather.")]),
    ([WEATHER], [U("Weather in Lima?"), A("", tool_calls=[call("Z9y8X7w6V", "get_weather", {"city": "Lima"})],
                                          weight=0),
                 tool("Z9y8X7w6V", "[1, 2, 3]"), A("Warm.", weight=1), U("And in Köln? 🌧"),
                 A("", tool_calls=[call("k0LnK0lnK", "get_weather", {"city": "Köln"})])]),
    ([TIMER], [U("Set a timer"), A("", tool_calls=[call("timer0001", "set_timer", {})]),
               tool("timer0001", "Timer started: 5 min.")]),
    ([], [U("q"), A("", tool_calls=[call("noTools01", "ping", {"x": [1, {"y": None}]})]), tool("noTools01", "true"),
          A("done", weight=0), U("again"), A("ok")]),
]  # fmt: skip


def _mc_request(tools, messages):
    cleaned = []
    for m in copy.deepcopy(messages):
        m.pop("weight", None)
        cleaned.append(m)
    # Tool.from_openai fills a missing description/parameters as mistral-common's API does
    return ChatCompletionRequest(messages=cleaned, tools=[Tool.from_openai(t) for t in tools] or None)


def mc_ids(path, tools, messages) -> list[int]:
    """mistral-common's ids: finetuning mode for a conversation ending on an answer, else its default."""
    mode = ValidationMode.finetuning if messages[-1]["role"] == "assistant" else ValidationMode.test
    return _mc(str(path), mode).encode_chat_completion(_mc_request(tools, messages)).tokens


@functools.cache
def _mc(path: str, mode: ValidationMode) -> MCTokenizer:
    return MCTokenizer.from_file(path, mode=mode)


FILES = ["v3", "v7", "tekken_240718", "tekken_240911", "tekken_v7"]


@pytest.fixture(scope="module", params=FILES)
def loaded(request, tmp_path_factory):
    """(our tokenizer, its file, the HF export saved and reloaded with plain AutoTokenizer)."""
    from transformers import AutoTokenizer

    if request.param == "tekken_v7":
        path = tiny_tekken_file(tmp_path_factory.mktemp("v7") / "tekken.json", V7_SPECIALS, version="v7")
    else:
        path = tokenizer_file(request.param)
    ours = MistralTokenizer(path)
    directory = tmp_path_factory.mktemp(request.param)
    ours.save_pretrained(directory)
    return ours, path, AutoTokenizer.from_pretrained(str(directory))


def test_ids_equal_mistral_common_and_the_exported_template(loaded):
    ours, path, hf = loaded
    assert ours.supports_tools
    for tools, messages in CONVERSATIONS:
        ids, mask = ours.encode_chat(messages, tools=tools)
        assert ids == mc_ids(path, tools, messages), (ours.chat_format, messages)
        assert hf.apply_chat_template(messages, tools=tools or None, tokenize=True, return_dict=False) == ids, (
            ours.chat_format,
            messages,
        )
        assert len(mask) == len(ids)


def test_mask_covers_trained_assistant_turns_and_their_calls(loaded):
    ours, _, _ = loaded
    tools, messages = CONVERSATIONS[3]
    ids, mask = ours.encode_chat(messages, tools=tools)
    tool_calls, eos = ours.control_id("[TOOL_CALLS]"), ours.eos_id
    # weight 0 on the first call, weight 1 on "Warm.", no weight (trained) on the last call
    expected = [
        [*ours.encode("Warm.", add_bos=False), eos],
        [tool_calls, *ours.encode(json.dumps([{"name": "get_weather", "arguments": {"city": "Köln"},
                                              "id": "k0LnK0lnK"}], ensure_ascii=False), add_bos=False), eos],
    ]  # fmt: skip
    assert masked_spans(ids, mask) == expected
    # nothing of the tool list, the user turns or the tool results is trained
    for piece in ("[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[INST]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"):
        at = [i for i, t in enumerate(ids) if t == ours.control_id(piece)]
        assert at and not any(mask[i] for i in at), piece
    # the same conversation without weights trains the first call too
    unweighted = [{k: v for k, v in m.items() if k != "weight"} for m in messages]
    assert len(masked_spans(*ours.encode_chat(unweighted, tools=tools))) == 3


def test_tool_list_sits_before_the_last_user_turn(loaded):
    ours, _, _ = loaded
    tools, messages = CONVERSATIONS[3]
    text = ours.decode(ours.encode_chat(messages, tools=tools)[0], skip_special_tokens=False)
    assert text.count("[AVAILABLE_TOOLS]") == 1
    assert text.index("[AVAILABLE_TOOLS]") > text.index("Warm.") and text.index("[/AVAILABLE_TOOLS][INST]") > 0


def test_v7_writes_text_and_calls_in_one_turn_v3_refuses():
    messages = [U("Paris?"), A("Let me check.", tool_calls=[call("abc123XYZ", "get_weather", {"city": "Paris"})]),
                tool("abc123XYZ", "sunny"), A("Sunny.")]  # fmt: skip
    v7 = MistralTokenizer.from_version("v7")
    ids, mask = v7.encode_chat(messages, tools=[WEATHER])
    assert ids == mc_ids(tokenizer_file("v7"), [WEATHER], messages)
    assert v7.to_hf().apply_chat_template(messages, tools=[WEATHER], return_dict=False) == ids
    with pytest.raises(ValueError, match="both content and tool_calls"):
        MistralTokenizer.from_version("v3").encode_chat(messages, tools=[WEATHER])


def test_v1_rejects_tool_data_with_one_message():
    from jinja2.exceptions import TemplateError

    v1 = MistralTokenizer.from_version("v1")
    assert not v1.supports_tools
    tools, messages = CONVERSATIONS[0]
    for kwargs, msgs in (({"tools": tools}, [U("hi"), A("yo")]), ({}, messages)):
        with pytest.raises(ValueError, match="chat format 'v1' has no tool calls"):
            v1.encode_chat(msgs, **kwargs)
        with pytest.raises(TemplateError, match="chat format v1 has no tool calls"):
            v1.to_hf().apply_chat_template(msgs, return_dict=False, **kwargs)
    with pytest.raises(ValueError, match="v2 tokenizer"):
        MistralTokenizer.from_version("v2").encode_chat(messages, tools=tools)
    assert not MistralTokenizer.from_version("v2").supports_tools


@pytest.mark.parametrize(
    "messages, match",
    [
        ([U("q"), A("", tool_calls=[call("abc123XYZ", "f", {})]), A("x")], "1 tool call\\(s\\) before it have no"),
        ([U("q"), tool("abc123XYZ", "r")], "message 1 has role 'tool', expected 'assistant'"),
        ([U("q"), A("x", weight=0.5)], "weight 0.5"),
        ([U("q"), A("", tool_calls=[call("abc123XYZ", "f", {})]), {"role": "tool", "content": "r"}], "tool_call_id"),
    ],
)
def test_malformed_tool_conversations_are_refused(messages, match):
    with pytest.raises(ValueError, match=match):
        MistralTokenizer.from_version("v3").encode_chat(messages)


def test_json_strings_in_any_spacing_equal_mistral_common():
    """mistral-common parses JSON arguments and results and writes them again; so does encode_chat (the
    exported template writes strings as given: give it objects, see docs/data-formats.md)."""
    messages = [U("Oslo?"), A("", tool_calls=[call("bbbbbbbb2", "get_weather", '{"city":"Oslo" }')]),
                tool("bbbbbbbb2", '{"t":4,"sky":"snow"}'), A("4 degrees, snow.")]  # fmt: skip
    for version in ("v3", "v7"):
        ids = MistralTokenizer.from_version(version).encode_chat(messages, tools=[WEATHER])[0]
        assert ids == mc_ids(tokenizer_file(version), [WEATHER], messages), version
