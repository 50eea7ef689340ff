#!/usr/bin/env python3
"""Generate the small sample datasets shipped in ``data/``.

Everything is synthesised here from hand-written word lists and templates, so
the files are deterministic (fixed seed) and need nothing beyond the standard
library. The examples are deliberately short and regular: a tiny randomly
initialised model with LoRA should be able to pick up the patterns within a
few hundred optimiser steps.

Usage (from the repository root)::

    python scripts/make_sample_data.py            # writes data/*.jsonl
    python scripts/make_sample_data.py --seed 1 --out-dir /tmp/data

Files written:

* ``sft_sample.jsonl``        -- chat conversations ``{"messages": [...]}``
* ``preference_sample.jsonl`` -- ``{"prompt", "chosen", "rejected"}`` pairs
* ``alpaca_sample.jsonl``     -- ``{"instruction", "input", "output"}`` rows
* ``text_sample.jsonl``       -- ``{"text"}`` plain language-model lines
* ``tools_sample.jsonl``      -- function calling ``{"messages": [...], "tools": [...]}``
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

DEFAULT_SEED = 1234
N_SFT = 400
N_PREFERENCE = 200
N_ALPACA = 50
N_TEXT = 50
N_TOOLS = 32
SYSTEM_FRACTION = 0.10
TWO_TURN_FRACTION = 0.10
ALPACA_EMPTY_INPUT_FRACTION = 0.4
UNHELPFUL_FRACTION = 0.25
MAX_CONVERSATION_WORDS = 60

SYSTEM_PROMPTS = [
    "You are a concise assistant.",
    "You are a helpful assistant. Answer in one short sentence.",
    "Answer briefly and accurately.",
    "You are a friendly tutor who gives short answers.",
]

UNHELPFUL_ANSWERS = [
    "I don't know.",
    "I am not sure.",
    "I cannot help with that.",
    "Why do you want to know?",
    "Please ask someone else.",
]

# --------------------------------------------------------------------------
# Hand-written facts
# --------------------------------------------------------------------------

CAPITALS = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Portugal": "Lisbon",
    "Japan": "Tokyo",
    "China": "Beijing",
    "India": "New Delhi",
    "Egypt": "Cairo",
    "Kenya": "Nairobi",
    "Canada": "Ottawa",
    "Mexico": "Mexico City",
    "Brazil": "Brasilia",
    "Argentina": "Buenos Aires",
    "Peru": "Lima",
    "Russia": "Moscow",
    "Norway": "Oslo",
    "Sweden": "Stockholm",
    "Finland": "Helsinki",
    "Denmark": "Copenhagen",
    "Poland": "Warsaw",
    "Greece": "Athens",
    "Ireland": "Dublin",
    "Austria": "Vienna",
    "Hungary": "Budapest",
    "Thailand": "Bangkok",
    "Vietnam": "Hanoi",
    "South Korea": "Seoul",
    "Australia": "Canberra",
    "Chile": "Santiago",
    "Turkey": "Ankara",
    "Cuba": "Havana",
}

# Symmetric pairs; each word appears in exactly one pair.
OPPOSITE_PAIRS = [
    ("hot", "cold"),
    ("big", "small"),
    ("up", "down"),
    ("fast", "slow"),
    ("happy", "sad"),
    ("light", "dark"),
    ("open", "closed"),
    ("early", "late"),
    ("full", "empty"),
    ("wet", "dry"),
    ("hard", "soft"),
    ("long", "short"),
    ("day", "night"),
    ("left", "right"),
    ("win", "lose"),
    ("push", "pull"),
    ("rich", "poor"),
    ("strong", "weak"),
    ("loud", "quiet"),
    ("clean", "dirty"),
    ("thick", "thin"),
    ("high", "low"),
    ("inside", "outside"),
    ("first", "last"),
]
OPPOSITES = {a: b for a, b in OPPOSITE_PAIRS} | {b: a for a, b in OPPOSITE_PAIRS}

PLURALS = {
    "cat": "cats",
    "dog": "dogs",
    "book": "books",
    "tree": "trees",
    "car": "cars",
    "apple": "apples",
    "box": "boxes",
    "bus": "buses",
    "fox": "foxes",
    "dish": "dishes",
    "baby": "babies",
    "city": "cities",
    "party": "parties",
    "leaf": "leaves",
    "knife": "knives",
    "wolf": "wolves",
    "child": "children",
    "mouse": "mice",
    "man": "men",
    "woman": "women",
    "tooth": "teeth",
    "foot": "feet",
    "goose": "geese",
    "sheep": "sheep",
    "person": "people",
}

DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]

# thing -> colour
COLOURS = {
    "grass": "green",
    "the sky": "blue",
    "snow": "white",
    "a banana": "yellow",
    "coal": "black",
    "a tomato": "red",
    "milk": "white",
    "a lemon": "yellow",
    "a carrot": "orange",
    "chocolate": "brown",
    "a strawberry": "red",
    "a lime": "green",
    "an eggplant": "purple",
    "a frog": "green",
    "a crow": "black",
    "the sea": "blue",
    "a pumpkin": "orange",
    "a polar bear": "white",
}
ALL_COLOURS = sorted(set(COLOURS.values()) | {"pink", "grey"})

# animal (with article) -> sound
ANIMAL_SOUNDS = {
    "a cow": "moo",
    "a dog": "woof",
    "a cat": "meow",
    "a duck": "quack",
    "a sheep": "baa",
    "a pig": "oink",
    "a horse": "neigh",
    "an owl": "hoot",
    "a lion": "roar",
    "a snake": "hiss",
    "a bee": "buzz",
    "a frog": "ribbit",
    "a mouse": "squeak",
    "a donkey": "hee-haw",
    "a crow": "caw",
}

# Common words for the reverse / spell / uppercase / letter-count families.
# No palindromes, so a reversed word always differs from the original.
WORDS = [
    "cat", "dog", "sun", "moon", "tree", "book", "fish", "bird", "star",
    "rain", "apple", "house", "water", "green", "happy", "river", "music",
    "table", "chair", "light", "paper", "stone", "cloud", "smile", "bread",
    "plant", "horse", "train", "road", "lamp", "desk", "door", "ship",
    "milk", "song", "garden", "window", "orange", "yellow", "planet",
    "pencil", "flower", "summer", "winter", "candle",
]  # fmt: skip

# (from unit singular, from unit plural, to unit plural, factor)
UNIT_CONVERSIONS = [
    ("metre", "metres", "centimetres", 100),
    ("kilometre", "kilometres", "metres", 1000),
    ("kilogram", "kilograms", "grams", 1000),
    ("litre", "litres", "millilitres", 1000),
    ("hour", "hours", "minutes", 60),
    ("minute", "minutes", "seconds", 60),
    ("day", "days", "hours", 24),
    ("week", "weeks", "days", 7),
    ("year", "years", "months", 12),
    ("dozen", "dozen", "items", 12),
]


# --------------------------------------------------------------------------
# Example generators: one per task family
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    """One question with its correct answer, a wrong answer and Alpaca form."""

    family: str
    prompt: str
    answer: str
    wrong: str
    instruction: str
    input: str


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _other(rng: random.Random, options: list[str], exclude: str) -> str:
    choices = [o for o in options if o != exclude]
    return rng.choice(choices)


def gen_capital(rng: random.Random) -> Example:
    country = rng.choice(sorted(CAPITALS))
    city = CAPITALS[country]
    prompt = rng.choice(
        [
            "What is the capital of {c}?",
            "What is the capital city of {c}?",
            "Which city is the capital of {c}?",
            "Name the capital of {c}.",
            "Tell me the capital of {c}.",
        ]
    ).format(c=country)
    wrong_city = _other(rng, sorted(CAPITALS.values()), city)
    return Example(
        family="capitals",
        prompt=prompt,
        answer=f"The capital of {country} is {city}.",
        wrong=f"The capital of {country} is {wrong_city}.",
        instruction="Name the capital city of the given country.",
        input=country,
    )


def gen_arithmetic(rng: random.Random) -> Example:
    op = rng.choice(["plus", "minus", "times"])
    if op == "plus":
        a, b = rng.randint(1, 10), rng.randint(1, 10)
        result, symbol = a + b, "+"
    elif op == "minus":
        a = rng.randint(2, 20)
        b = rng.randint(1, min(a, 10))
        result, symbol = a - b, "-"
    else:
        a, b = rng.randint(1, 10), rng.randint(1, 10)
        result, symbol = a * b, "x"
    expr = f"{a} {op} {b}"
    prompt = rng.choice(
        [
            f"What is {expr}?",
            f"How much is {expr}?",
            f"Calculate {expr}.",
            f"What is {a} {symbol} {b}?",
            f"Please work out {expr}.",
        ]
    )
    wrong = result + rng.choice([-3, -2, -1, 1, 2, 3])
    if wrong < 0:
        wrong = result + rng.randint(1, 3)
    return Example(
        family="arithmetic",
        prompt=prompt,
        answer=f"{expr} is {result}.",
        wrong=f"{expr} is {wrong}.",
        instruction="Work out the result of the calculation.",
        input=expr,
    )


def gen_reverse(rng: random.Random) -> Example:
    word = rng.choice(WORDS)
    rev = word[::-1]
    prompt = rng.choice(
        [
            "Reverse the word {w}.",
            "What is {w} spelled backwards?",
            "Write the word {w} backwards.",
            "Reverse the letters of {w}.",
        ]
    ).format(w=word)
    letters = list(rev)
    i = rng.randrange(len(letters) - 1)
    letters[i], letters[i + 1] = letters[i + 1], letters[i]
    wrong_rev = "".join(letters)
    if wrong_rev == rev:
        wrong_rev = word
    return Example(
        family="reverse",
        prompt=prompt,
        answer=f"The word {word} reversed is {rev}.",
        wrong=f"The word {word} reversed is {wrong_rev}.",
        instruction="Reverse the letters of the given word.",
        input=word,
    )


def gen_spell(rng: random.Random) -> Example:
    word = rng.choice(WORDS)
    prompt = rng.choice(
        [
            "Spell the word {w}.",
            "How do you spell {w}?",
            "Spell {w} letter by letter.",
            "Can you spell {w} for me?",
        ]
    ).format(w=word)
    letters = list(word)
    i = rng.randrange(len(letters))
    del letters[i]
    return Example(
        family="spelling",
        prompt=prompt,
        answer=f"The word {word} is spelled {'-'.join(word)}.",
        wrong=f"The word {word} is spelled {'-'.join(letters)}.",
        instruction="Spell the given word letter by letter.",
        input=word,
    )


def gen_uppercase(rng: random.Random) -> Example:
    word = rng.choice(WORDS)
    prompt = rng.choice(
        [
            "Write {w} in uppercase.",
            "Convert {w} to uppercase.",
            "What is {w} in capital letters?",
            "Make the word {w} uppercase.",
        ]
    ).format(w=word)
    return Example(
        family="uppercase",
        prompt=prompt,
        answer=f"The word {word} in uppercase is {word.upper()}.",
        wrong=f"The word {word} in uppercase is {rng.choice([word, word.title()])}.",
        instruction="Convert the given word to uppercase.",
        input=word,
    )


def gen_opposite(rng: random.Random) -> Example:
    word = rng.choice(sorted(OPPOSITES))
    opp = OPPOSITES[word]
    prompt = rng.choice(
        [
            "What is the opposite of {w}?",
            "What is the antonym of {w}?",
            "Give me the opposite of {w}.",
            "Which word means the opposite of {w}?",
        ]
    ).format(w=word)
    wrong = rng.choice([w for w in sorted(OPPOSITES) if w not in (word, opp)])
    return Example(
        family="opposites",
        prompt=prompt,
        answer=f"The opposite of {word} is {opp}.",
        wrong=f"The opposite of {word} is {wrong}.",
        instruction="Give the opposite of the given word.",
        input=word,
    )


def gen_plural(rng: random.Random) -> Example:
    word = rng.choice(sorted(PLURALS))
    plural = PLURALS[word]
    prompt = rng.choice(
        [
            "What is the plural of {w}?",
            "What is the plural form of {w}?",
            "How do you say more than one {w}?",
            "Give the plural of {w}.",
        ]
    ).format(w=word)
    wrong = word + "s"
    if wrong == plural:
        wrong = word + "es"
    return Example(
        family="plurals",
        prompt=prompt,
        answer=f"The plural of {word} is {plural}.",
        wrong=f"The plural of {word} is {wrong}.",
        instruction="Give the plural form of the given noun.",
        input=word,
    )


def _gen_sequence(rng: random.Random, items: list[str], unit: str, family: str) -> Example:
    idx = rng.randrange(len(items))
    item = items[idx]
    if rng.random() < 0.7:
        rel, target = "after", items[(idx + 1) % len(items)]
        prompt = rng.choice(
            [
                f"What {unit} comes after {item}?",
                f"Which {unit} follows {item}?",
                f"What is the {unit} after {item}?",
                f"Name the {unit} that comes after {item}.",
            ]
        )
    else:
        rel, target = "before", items[(idx - 1) % len(items)]
        prompt = rng.choice(
            [
                f"What {unit} comes before {item}?",
                f"Which {unit} is just before {item}?",
                f"What is the {unit} before {item}?",
            ]
        )
    wrong = _other(rng, [x for x in items if x != item], target)
    return Example(
        family=family,
        prompt=prompt,
        answer=f"The {unit} {rel} {item} is {target}.",
        wrong=f"The {unit} {rel} {item} is {wrong}.",
        instruction=f"Name the {unit} that comes {rel} the given {unit}.",
        input=item,
    )


def gen_day(rng: random.Random) -> Example:
    return _gen_sequence(rng, DAYS, "day", "days_of_week")


def gen_month(rng: random.Random) -> Example:
    return _gen_sequence(rng, MONTHS, "month", "months")


def gen_colour(rng: random.Random) -> Example:
    thing = rng.choice(sorted(COLOURS))
    colour = COLOURS[thing]
    prompt = rng.choice(
        [
            "What colour is {t}?",
            "What is the colour of {t}?",
            "Which colour is {t}?",
            "Tell me the colour of {t}.",
        ]
    ).format(t=thing)
    wrong = _other(rng, ALL_COLOURS, colour)
    return Example(
        family="colours",
        prompt=prompt,
        answer=f"{_cap(thing)} is {colour}.",
        wrong=f"{_cap(thing)} is {wrong}.",
        instruction="State the usual colour of the given thing.",
        input=thing,
    )


def gen_letter_count(rng: random.Random) -> Example:
    word = rng.choice(WORDS)
    n = len(word)
    prompt = rng.choice(
        [
            "How many letters are in the word {w}?",
            "How many letters does {w} have?",
            "Count the letters in {w}.",
            "What is the number of letters in {w}?",
        ]
    ).format(w=word)
    wrong = n + rng.choice([-2, -1, 1, 2])
    return Example(
        family="letter_count",
        prompt=prompt,
        answer=f"The word {word} has {n} letters.",
        wrong=f"The word {word} has {wrong} letters.",
        instruction="Count the letters in the given word.",
        input=word,
    )


def gen_units(rng: random.Random) -> Example:
    single, plural, target, factor = rng.choice(UNIT_CONVERSIONS)
    n = rng.randint(1, 9)
    source = f"{n} {single if n == 1 else plural}"
    prompt = rng.choice(
        [
            f"How many {target} are in {source}?",
            f"Convert {source} to {target}.",
            f"What is {source} in {target}?",
            f"How many {target} make {source}?",
        ]
    )
    result = n * factor
    wrong_factor = rng.choice([f for f in (10, 12, 24, 60, 100, 1000) if f != factor])
    return Example(
        family="unit_conversion",
        prompt=prompt,
        answer=f"{source} is {result} {target}.",
        wrong=f"{source} is {n * wrong_factor} {target}.",
        instruction=f"Convert the quantity to {target}.",
        input=source,
    )


def gen_animal_sound(rng: random.Random) -> Example:
    animal = rng.choice(sorted(ANIMAL_SOUNDS))
    sound = ANIMAL_SOUNDS[animal]
    prompt = rng.choice(
        [
            "What sound does {a} make?",
            "What does {a} say?",
            "What noise does {a} make?",
            "Which sound does {a} make?",
        ]
    ).format(a=animal)
    wrong = _other(rng, sorted(set(ANIMAL_SOUNDS.values())), sound)
    bare = animal.split(" ", 1)[1]
    return Example(
        family="animal_sounds",
        prompt=prompt,
        answer=f"{_cap(animal)} says {sound}.",
        wrong=f"{_cap(animal)} says {wrong}.",
        instruction="Say what sound the given animal makes.",
        input=bare,
    )


FAMILIES: list[Callable[[random.Random], Example]] = [
    gen_capital,
    gen_arithmetic,
    gen_reverse,
    gen_spell,
    gen_uppercase,
    gen_opposite,
    gen_plural,
    gen_day,
    gen_month,
    gen_colour,
    gen_letter_count,
    gen_units,
    gen_animal_sound,
]


def example_stream(rng: random.Random) -> Iterator[Example]:
    """Yield examples cycling through the families in shuffled rounds.

    Round-robin keeps every family represented even in the small files.
    """
    while True:
        order = list(FAMILIES)
        rng.shuffle(order)
        for gen in order:
            yield gen(rng)


def unique_examples(rng: random.Random, n: int, key: Callable[[Example], str]) -> list[Example]:
    """Draw ``n`` examples whose ``key`` is unique (falls back after many tries)."""
    seen: set[str] = set()
    out: list[Example] = []
    stream = example_stream(rng)
    tries = 0
    while len(out) < n:
        ex = next(stream)
        tries += 1
        k = key(ex)
        if k in seen and tries < 50 * n:
            continue
        seen.add(k)
        out.append(ex)
    return out


# --------------------------------------------------------------------------
# Dataset builders
# --------------------------------------------------------------------------


def build_sft(rng: random.Random, n: int = N_SFT) -> list[dict]:
    n_two_turn = round(n * TWO_TURN_FRACTION)
    n_system = round(n * SYSTEM_FRACTION)
    two_turn = set(rng.sample(range(n), n_two_turn))
    with_system = set(rng.sample(range(n), n_system))
    examples = unique_examples(rng, n + n_two_turn, key=lambda e: e.prompt)
    firsts, seconds = examples[:n], examples[n:]
    rows = []
    for i, ex in enumerate(firsts):
        messages = []
        if i in with_system:
            messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        messages.append({"role": "user", "content": ex.prompt})
        messages.append({"role": "assistant", "content": ex.answer})
        if i in two_turn:
            follow = seconds.pop()
            messages.append({"role": "user", "content": follow.prompt})
            messages.append({"role": "assistant", "content": follow.answer})
        rows.append({"messages": messages})
    return rows


def build_preference(rng: random.Random, n: int = N_PREFERENCE) -> list[dict]:
    rows = []
    for ex in unique_examples(rng, n, key=lambda e: e.prompt):
        if rng.random() < UNHELPFUL_FRACTION:
            rejected = rng.choice(UNHELPFUL_ANSWERS)
        else:
            rejected = ex.wrong
        rows.append({"prompt": ex.prompt, "chosen": ex.answer, "rejected": rejected})
    return rows


def build_alpaca(rng: random.Random, n: int = N_ALPACA) -> list[dict]:
    rows = []
    for ex in unique_examples(rng, n, key=lambda e: e.answer):
        if rng.random() < ALPACA_EMPTY_INPUT_FRACTION:
            rows.append({"instruction": ex.prompt, "input": "", "output": ex.answer})
        else:
            rows.append({"instruction": ex.instruction, "input": ex.input, "output": ex.answer})
    return rows


def build_text(rng: random.Random, n: int = N_TEXT) -> list[dict]:
    facts = unique_examples(rng, 2 * n, key=lambda e: e.answer)
    rows = []
    it = iter(facts)
    for _ in range(n):
        first = next(it)
        second = next(it)
        # Mostly one fact per line, sometimes two.
        text = first.answer if rng.random() < 0.6 else f"{first.answer} {second.answer}"
        rows.append({"text": text})
    return rows


# --------------------------------------------------------------------------
# Function calling (tools_sample.jsonl)
# --------------------------------------------------------------------------

TOOL_SPECS = {
    "get_weather": {
        "description": "Current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
    "convert_currency": {
        "description": "Convert an amount of money from one currency to another",
        "parameters": {
            "type": "object",
            "properties": {
                "amount": {"type": "number"},
                "source": {"type": "string", "description": "ISO code, e.g. EUR"},
                "target": {"type": "string", "description": "ISO code, e.g. USD"},
            },
            "required": ["amount", "source", "target"],
        },
    },
    "set_timer": {
        "description": "Start a countdown timer",
        "parameters": {
            "type": "object",
            "properties": {"minutes": {"type": "integer"}, "label": {"type": "string"}},
            "required": ["minutes"],
        },
    },
}

WEATHER_CITIES = ["Paris", "Lima", "Oslo", "Cairo", "Tokyo", "Quito", "Perth", "Dakar", "Hanoi", "Bergen"]
SKIES = ["sunny", "cloudy", "rainy", "windy", "foggy", "snowy"]
CURRENCIES = {"EUR": 1.0, "USD": 1.1, "GBP": 0.85, "JPY": 160.0, "CHF": 0.95}
TIMER_LABELS = ["tea", "pasta", "laundry", "a break", "the oven"]
GENERAL_QA = [
    ("What is 4 plus 3?", "4 plus 3 is 7."),
    ("Spell the word cat.", "c-a-t."),
    ("What colour is the sky on a clear day?", "The sky is blue on a clear day."),
    ("Name the day after Monday.", "The day after Monday is Tuesday."),
]


def _call_id(rng: random.Random) -> str:
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789") for _ in range(9))


def _tools(*names: str) -> list[dict]:
    return [{"type": "function", "function": {"name": n, **TOOL_SPECS[n]}} for n in names]


def _call(rng: random.Random, name: str, arguments: dict) -> dict:
    return {"id": _call_id(rng), "type": "function", "function": {"name": name, "arguments": arguments}}


def _weather_turn(rng: random.Random, cities: list[str]) -> list[dict]:
    """user asks, assistant calls get_weather once per city, one tool result each, assistant answers."""
    ask = " and ".join(cities)
    calls = [_call(rng, "get_weather", {"city": c}) for c in cities]
    reports = [(c, rng.randint(-5, 32), rng.choice(SKIES)) for c in cities]
    out = [{"role": "user", "content": rng.choice(["What is the weather in {}?", "How warm is it in {} now?",
                                                   "Weather report for {}, please."]).format(ask)},
           {"role": "assistant", "content": "", "tool_calls": calls}]  # fmt: skip
    for call, (city, temp, sky) in zip(calls, reports):
        result = json.dumps({"city": city, "temperature": temp, "sky": sky})
        out.append({"role": "tool", "tool_call_id": call["id"], "content": result})
    answer = " ".join(f"{city}: {temp} degrees and {sky}." for city, temp, sky in reports)
    out.append({"role": "assistant", "content": answer})
    return out


def _currency_turn(rng: random.Random) -> list[dict]:
    source, target = rng.sample(sorted(CURRENCIES), 2)
    amount = rng.choice([5, 10, 20, 50, 100, 250])
    value = round(amount * CURRENCIES[target] / CURRENCIES[source], 2)
    # arguments as a JSON string, as the OpenAI API writes them
    call = _call(rng, "convert_currency", {"amount": amount, "source": source, "target": target})
    call["function"]["arguments"] = json.dumps(call["function"]["arguments"])
    return [
        {"role": "user", "content": f"How much is {amount} {source} in {target}?"},
        {"role": "assistant", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call["id"], "content": str(value)},
        {"role": "assistant", "content": f"{amount} {source} is about {value} {target}."},
    ]


def _timer_turn(rng: random.Random) -> list[dict]:
    minutes, label = rng.randint(2, 45), rng.choice(TIMER_LABELS)
    call = _call(rng, "set_timer", {"minutes": minutes, "label": label})
    return [
        {"role": "user", "content": f"Set a {minutes} minute timer for {label}."},
        {"role": "assistant", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call["id"], "content": f"Timer started: {minutes} min ({label})."},
        {"role": "assistant", "content": f"Your {minutes} minute timer for {label} is running."},
    ]


def build_tools(rng: random.Random, n: int = N_TOOLS) -> list[dict]:
    """Function-calling conversations: one call, parallel calls, no call needed (tools listed anyway),
    two user turns, a system prompt, and turns with "weight": 0 (kept as context, not trained)."""
    rows = []
    for i in range(n):
        kind = i % 8
        if kind in (0, 1):
            messages, tools = _weather_turn(rng, rng.sample(WEATHER_CITIES, 1)), _tools("get_weather")
        elif kind == 2:
            messages, tools = _weather_turn(rng, rng.sample(WEATHER_CITIES, 2)), _tools("get_weather")
        elif kind == 3:
            messages, tools = _currency_turn(rng), _tools("convert_currency", "get_weather")
        elif kind == 4:
            messages, tools = _timer_turn(rng), _tools("set_timer")
        elif kind == 5:  # no tool fits: a plain answer with the tools listed
            question, answer = GENERAL_QA[(i // 8) % len(GENERAL_QA)]
            messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            tools = _tools("get_weather", "set_timer")
        elif kind == 6:  # two user turns; the first turn's answers are context only (weight 0)
            messages = _weather_turn(rng, rng.sample(WEATHER_CITIES, 1)) + _currency_turn(rng)
            for m in messages[:4]:
                if m["role"] == "assistant":
                    m["weight"] = 0
            tools = _tools("get_weather", "convert_currency")
        else:
            messages = [{"role": "system", "content": "You can call tools. Answer in one sentence."}]
            messages += _timer_turn(rng)
            tools = _tools("set_timer", "get_weather")
        rows.append({"messages": messages, "tools": tools})
    return rows


def validate_tools(rows: list[dict]) -> None:
    for i, row in enumerate(rows):
        msgs = [m for m in row["messages"] if m["role"] != "system"]
        assert msgs[0]["role"] == "user" and msgs[-1]["role"] == "assistant", f"tools row {i}: ends"
        ids = [c["id"] for m in msgs for c in m.get("tool_calls", [])]
        results = [m["tool_call_id"] for m in msgs if m["role"] == "tool"]
        assert ids == results and all(len(x) == 9 and x.isalnum() for x in ids), f"tools row {i}: ids"


# --------------------------------------------------------------------------
# Validation and output
# --------------------------------------------------------------------------


def validate_sft(rows: list[dict]) -> None:
    for i, row in enumerate(rows):
        msgs = row["messages"]
        roles = [m["role"] for m in msgs]
        if roles and roles[0] == "system":
            roles = roles[1:]
        assert roles, f"sft row {i}: no turns"
        expected = ["user", "assistant"] * (len(roles) // 2)
        assert roles == expected, f"sft row {i}: bad roles {roles}"
        assert all(m["content"].strip() for m in msgs), f"sft row {i}: empty content"
        words = sum(len(m["content"].split()) for m in msgs)
        assert words < MAX_CONVERSATION_WORDS, f"sft row {i}: {words} words"


def validate_preference(rows: list[dict]) -> None:
    for i, row in enumerate(rows):
        assert set(row) == {"prompt", "chosen", "rejected"}, f"pref row {i}: keys"
        assert row["chosen"] != row["rejected"], f"pref row {i}: chosen == rejected"
        assert all(v.strip() for v in row.values()), f"pref row {i}: empty field"


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=Path(__file__).resolve().parent.parent / "data",
        help="output directory (default: <repo>/data)",
    )
    args = parser.parse_args(argv)

    # Separate streams per file so changing one file's size leaves the others intact.
    sft = build_sft(random.Random(f"{args.seed}-sft"))
    pref = build_preference(random.Random(f"{args.seed}-preference"))
    alpaca = build_alpaca(random.Random(f"{args.seed}-alpaca"))
    text = build_text(random.Random(f"{args.seed}-text"))
    tools = build_tools(random.Random(f"{args.seed}-tools"))

    validate_sft(sft)
    validate_preference(pref)
    validate_tools(tools)

    outputs = {
        "sft_sample.jsonl": sft,
        "preference_sample.jsonl": pref,
        "alpaca_sample.jsonl": alpaca,
        "text_sample.jsonl": text,
        "tools_sample.jsonl": tools,
    }
    for name, rows in outputs.items():
        path = args.out_dir / name
        write_jsonl(path, rows)
        print(f"wrote {len(rows):4d} rows to {path}")


if __name__ == "__main__":
    main()
