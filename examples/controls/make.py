#!/usr/bin/env python3
"""Draw the sample control images used by `examples/prompts.jsonl` (and so by `pixfarm dev`).

* house_edges.png: an edge map already (white lines on black), used with kind `edge`.
* shapes.png: a small "photo" of filled shapes on a gradient, used with kind `canny` (the worker
  computes its edge map).

Deterministic (no randomness); run from anywhere: `python3 examples/controls/make.py`.
"""
import os

from PIL import Image, ImageDraw

HERE = os.path.dirname(os.path.abspath(__file__))


def house_edges(size=256):
    im = Image.new("RGB", (size, size), "black")
    d = ImageDraw.Draw(im)
    w = 3
    d.rectangle([64, 120, 192, 224], outline="white", width=w)  # walls
    d.line([56, 124, 128, 52, 200, 124], fill="white", width=w)  # roof
    d.rectangle([112, 168, 144, 224], outline="white", width=w)  # door
    d.rectangle([76, 140, 100, 164], outline="white", width=w)  # windows
    d.rectangle([156, 140, 180, 164], outline="white", width=w)
    d.ellipse([196, 20, 236, 60], outline="white", width=w)  # sun
    d.line([0, 224, 255, 224], fill="white", width=w)  # ground
    return im


def shapes(width=320, height=256):
    im = Image.new("RGB", (width, height))
    px = im.load()
    for y in range(height):
        for x in range(width):
            px[x, y] = (40 + x * 120 // width, 60 + y * 100 // height, 140)
    d = ImageDraw.Draw(im)
    d.ellipse([30, 40, 150, 160], fill=(230, 200, 40))
    d.rectangle([170, 90, 290, 220], fill=(200, 40, 50))
    d.polygon([(60, 230), (140, 170), (220, 240)], fill=(30, 160, 70))
    return im


if __name__ == "__main__":
    house_edges().save(os.path.join(HERE, "house_edges.png"), optimize=True)
    shapes().save(os.path.join(HERE, "shapes.png"), optimize=True)
