"""What the demo fixture learns from, and the suite it is judged on: generated pictures with a
question and a one-token answer in the vision suite's four families (colour of a circle, how many
squares or dots, which digit, which word), and a small text corpus of the project's own.

Every picture is drawn from a `random.Random(seed)`: a seed gives the same items on any machine
with the same Pillow. Training draws from seeds below 1000; the judging suite from its own seed
(`SUITE_SEED`), so it holds shades, positions, sizes and inks the training never drew.

The pictures are 96 px: 6x6 patches of 16 px, 3x3 = 9 image tokens after the 2x2 merge -- above
mtmd's minimum of 8 tokens for this projector, and a multiple of 32, so llama.cpp's preprocessing
takes the picture as it is (no resize) and the tower sees what it was trained on.
"""
from __future__ import annotations

import random

from PIL import Image, ImageDraw, ImageFont

PX = 96
SUITE_SEED = 12345
COLOURS = {"red": (220, 30, 30), "green": (30, 160, 60), "blue": (40, 70, 220), "yellow": (235, 200, 20),
           "orange": (245, 130, 20), "purple": (140, 40, 170)}
WORDS = ["CAT", "SUN", "DOG", "BOX", "CAR", "HAT", "PEN", "CUP"]
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}

# The questions are the vision suite's own (compiler/vision_suite.py), so a real checkpoint and the
# fixture are asked the same things.
Q_COLOUR = "What colour is the circle? One word."
Q_COUNT = "How many {shape} are in the picture? Answer with a number."
Q_DIGIT = "Which digit is shown? Answer with the digit."
Q_WORD = "What word is written? One word."

# Text the fixture learns token by token, so its logits on text come out peaked (the quality gate's
# KL divergence then measures something), and a few chat turns (the smoke's text prompt among them).
TEXT_CORPUS = [
    "The sky is blue and the grass is green.",
    "Red, orange, yellow, green, blue, indigo and violet are the colours of the rainbow.",
    "One, two, three, four, five, six, seven, eight, nine, ten.",
    "A cat sat on the mat in the sun.",
    "The quick brown fox jumps over the lazy dog.",
    "Water boils at one hundred degrees Celsius.",
]
TEXT_CHAT = [
    ("Name three colours of the rainbow.", "Red, orange and yellow."),
    ("What is two plus two?", "Four."),
    ("Say hello.", "Hello!"),
]


_FONTS: dict = {}


def _font(size: int):
    if size not in _FONTS:  # loading the TrueType face costs more than drawing with it
        _FONTS[size] = ImageFont.load_default(size=size)
    return _FONTS[size]


def _jitter(rgb, rng, amount=25):
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in rgb)


def _canvas(rng):
    v = rng.randint(235, 255)
    img = Image.new("RGB", (PX, PX), (v, v, v))
    return img, ImageDraw.Draw(img)


def _ink(rng):
    return tuple([rng.randint(0, 60)] * 3)


def colour_item(rng, name=None):
    name = name or rng.choice(list(COLOURS))
    img, d = _canvas(rng)
    r = rng.randint(14, 36)
    cx, cy = rng.randint(r + 2, PX - r - 2), rng.randint(r + 2, PX - r - 2)
    d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=_jitter(COLOURS[name], rng))
    return {"family": "colour", "image": img, "question": Q_COLOUR, "answer": name, "accepted": [name]}


def count_item(rng, n=None, shape=None):
    """n objects, each inside its own cell of the 3x3 grid of merged image tokens (32 px each) and
    jittered within it: no object straddles two tokens, which makes counting learnable in minutes."""
    n = n or rng.randint(1, 5)
    shape = shape or rng.choice(["squares", "dots"])
    img, d = _canvas(rng)
    size = rng.randint(12, 18)
    ink = _ink(rng)
    cell = PX // 3
    for k in rng.sample(range(9), n):
        x0, y0 = (k % 3) * cell, (k // 3) * cell
        x, y = x0 + rng.randint(3, cell - size - 3), y0 + rng.randint(3, cell - size - 3)
        (d.rectangle if shape == "squares" else d.ellipse)((x, y, x + size, y + size), fill=ink)
    return {"family": "count", "image": img, "question": Q_COUNT.format(shape=shape), "answer": str(n),
            "accepted": [str(n), NUMBER_WORDS[n]]}


def digit_item(rng, digit=None):
    # Large and bold: thin strokes at random sizes and places learn several times slower.
    digit = digit or str(rng.randint(0, 9))
    img, d = _canvas(rng)
    size = rng.randint(60, 70)
    cx, cy = PX // 2 + rng.randint(-5, 5), PX // 2 + rng.randint(-5, 5)
    ink = _ink(rng)
    d.text((cx, cy), digit, fill=ink, font=_font(size), anchor="mm", stroke_width=2, stroke_fill=ink)
    return {"family": "digit", "image": img, "question": Q_DIGIT, "answer": digit, "accepted": [digit]}


def word_item(rng, word=None):
    word = word or rng.choice(WORDS)
    img, d = _canvas(rng)
    size = rng.randint(28, 32)
    cx, cy = PX // 2 + rng.randint(-4, 4), PX // 2 + rng.randint(-6, 6)
    ink = _ink(rng)
    d.text((cx, cy), word, fill=ink, font=_font(size), anchor="mm", stroke_width=1, stroke_fill=ink)
    return {"family": "word", "image": img, "question": Q_WORD, "answer": word.lower(), "accepted": [word.lower()]}


FAMILIES = [colour_item, count_item, digit_item, word_item]
# Colour is learnt first and easily; counts and words need more examples.
FAMILY_WEIGHTS = [0.15, 0.35, 0.2, 0.3]


def training_item(rng) -> dict:
    return rng.choices(FAMILIES, FAMILY_WEIGHTS)[0](rng)


def suite(per_family: int = 25, seed: int = SUITE_SEED) -> list[dict]:
    """The judging suite: `per_family` items of each family, balanced over the answers, from a seed
    the training never uses. Items carry `id` and `accepted` like vision_suite.suite's."""
    rng = random.Random(seed)
    items = []
    for i in range(per_family):
        items.append(colour_item(rng, list(COLOURS)[i % len(COLOURS)]))
        items.append(count_item(rng, 1 + i % 5, ["squares", "dots"][(i // 5) % 2]))
        items.append(digit_item(rng, str(i % 10)))
        items.append(word_item(rng, WORDS[i % len(WORDS)]))
    for k, item in enumerate(items):
        item["id"] = f"{item['family']}-{k:03d}-{item['answer']}"
    return items


def all_texts(chat) -> list[str]:
    """Every text the fixture meets, given the chat formatter: its token ids are the vocabulary it
    trains (compiler/train.py)."""
    texts = [chat(q, True) for q in (Q_COLOUR, Q_DIGIT, Q_WORD, Q_COUNT.format(shape="squares"),
                                     Q_COUNT.format(shape="dots"))]
    texts += list(COLOURS) + [w.lower() for w in WORDS] + [str(i) for i in range(10)]
    texts += ["<|im_end|>", "<|endoftext|>"]
    texts += TEXT_CORPUS + [chat(q, False) + a + "<|im_end|>" for q, a in TEXT_CHAT]
    return texts
