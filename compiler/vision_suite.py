"""A vision suite drawn by code, not downloaded: coloured shapes, counts of objects, large digits
and words, each with a question and the answers accepted. Deterministic (fixed layouts), so a
score is comparable between builds."""
from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont

COLOURS = {"red": (220, 30, 30), "green": (30, 160, 60), "blue": (40, 70, 220), "yellow": (235, 200, 20)}


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # older Pillow: fixed-size bitmap font
        return ImageFont.load_default()


def _canvas(px: int):
    img = Image.new("RGB", (px, px), "white")
    return img, ImageDraw.Draw(img)


def suite(px: int = 448) -> list[dict]:
    items = []
    for name, rgb in COLOURS.items():
        img, d = _canvas(px)
        m = px // 5
        d.ellipse((m, m, px - m, px - m), fill=rgb)
        items.append({"id": f"colour-{name}", "image": img, "question": "What colour is the circle? One word.",
                      "accepted": [name]})
    for n, shape in ((3, "squares"), (5, "dots")):
        img, d = _canvas(px)
        step = px // (n + 1)
        for i in range(n):
            x = step * (i + 1)
            r = step // 4
            box = (x - r, px // 2 - r, x + r, px // 2 + r)
            (d.rectangle if shape == "squares" else d.ellipse)(box, fill=(20, 20, 20))
        words = {3: "three", 5: "five"}
        items.append({"id": f"count-{n}-{shape}", "image": img,
                      "question": f"How many {shape} are in the picture? Answer with a number.",
                      "accepted": [str(n), words[n]]})
    for digit in ("7", "4"):
        img, d = _canvas(px)
        d.text((px // 2, px // 2), digit, fill=(0, 0, 0), font=_font(px * 3 // 4), anchor="mm")
        items.append({"id": f"digit-{digit}", "image": img, "question": "Which digit is shown? Answer with the digit.",
                      "accepted": [digit]})
    for word in ("CAT", "SUN"):
        img, d = _canvas(px)
        d.text((px // 2, px // 2), word, fill=(0, 0, 0), font=_font(px // 3), anchor="mm")
        items.append({"id": f"word-{word.lower()}", "image": img, "question": "What word is written? One word.",
                      "accepted": [word.lower()]})
    return items
