"""Draw the bundled example images: simple captioned pictures in several aspect ratios.

    python examples/make_example_images.py [--out examples/images]

No download and no third-party image: every picture is drawn here with Pillow from fixed numbers, so the
output is the same on every run. Captions come both from file names (with the `_(1)` suffix rule) and
from `.txt` sidecar files, so the demo exercises both, and the sizes cover 1:1, 3:2, 2:3, 16:9, 4:1 and 1:4.
"""

from __future__ import annotations

import argparse
import os

from PIL import Image, ImageDraw

COLORS = {
    "red": (214, 40, 40), "blue": (40, 80, 200), "green": (50, 150, 70), "yellow": (240, 200, 40),
    "white": (245, 245, 245), "black": (20, 20, 20), "orange": (240, 130, 30), "purple": (130, 60, 170),
    "navy": (20, 30, 80), "gray": (128, 128, 128), "pink": (235, 120, 170), "teal": (30, 140, 140),
}


def _gradient(size: tuple[int, int], top: tuple, bottom: tuple) -> Image.Image:
    width, height = size
    image = Image.new("RGB", size)
    draw = ImageDraw.Draw(image)
    for y in range(height):
        t = y / max(1, height - 1)
        draw.line([(0, y), (width, y)], fill=tuple(round(a + (b - a) * t) for a, b in zip(top, bottom)))
    return image


def _centred_box(size, scale, at):
    """A square box `scale` x the short side wide, centred at `at` (fractions of width and height)."""
    w, h = size
    half = scale * min(w, h) / 2
    cx, cy = at[0] * w, at[1] * h
    return [cx - half, cy - half, cx + half, cy + half]


def circle(size, fg, bg, scale=0.6, at=(0.5, 0.5)):
    image = Image.new("RGB", size, COLORS[bg])
    ImageDraw.Draw(image).ellipse(_centred_box(size, scale, at), fill=COLORS[fg])
    return image


def square(size, fg, bg, scale=0.5, at=(0.5, 0.5)):
    image = Image.new("RGB", size, COLORS[bg])
    ImageDraw.Draw(image).rectangle(_centred_box(size, scale, at), fill=COLORS[fg])
    return image


def triangle(size, fg, bg):
    image = Image.new("RGB", size, COLORS[bg])
    w, h = size
    ImageDraw.Draw(image).polygon([(w * 0.5, h * 0.15), (w * 0.8, h * 0.85), (w * 0.2, h * 0.85)], fill=COLORS[fg])
    return image


def stripes(size, colors, vertical=True, count=8):
    image = Image.new("RGB", size)
    draw = ImageDraw.Draw(image)
    w, h = size
    for i in range(count):
        fill = COLORS[colors[i % len(colors)]]
        if vertical:
            draw.rectangle([i * w / count, 0, (i + 1) * w / count, h], fill=fill)
        else:
            draw.rectangle([0, i * h / count, w, (i + 1) * h / count], fill=fill)
    return image


def checker(size, a, b, cells=8):
    image = Image.new("RGB", size, COLORS[a])
    draw = ImageDraw.Draw(image)
    w, h = size
    cell = min(w, h) / cells
    for row in range(int(h / cell) + 1):
        for col in range(int(w / cell) + 1):
            if (row + col) % 2:
                draw.rectangle([col * cell, row * cell, (col + 1) * cell, (row + 1) * cell], fill=COLORS[b])
    return image


def sunset(size):
    image = _gradient(size, (250, 150, 60), (120, 40, 90))
    draw = ImageDraw.Draw(image)
    w, h = size
    draw.ellipse([w * 0.4, h * 0.35, w * 0.6, h * 0.35 + w * 0.2], fill=(255, 220, 120))
    draw.rectangle([0, h * 0.62, w, h], fill=(30, 50, 110))
    return image


def tower(size):
    image = _gradient(size, (10, 15, 50), (40, 60, 120))
    draw = ImageDraw.Draw(image)
    w, h = size
    draw.rectangle([w * 0.38, h * 0.2, w * 0.62, h], fill=COLORS["blue"])
    for i in range(12):  # stars, at fixed places
        x, y = (i * 37 % 97) / 97 * w, (i * 53 % 89) / 89 * h * 0.5
        draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=COLORS["white"])
    return image


def hill_and_tree(size):
    image = _gradient(size, (120, 180, 240), (200, 230, 250))
    draw = ImageDraw.Draw(image)
    w, h = size
    draw.ellipse([-w * 0.3, h * 0.65, w * 1.3, h * 1.6], fill=COLORS["green"])
    draw.rectangle([w * 0.47, h * 0.45, w * 0.53, h * 0.72], fill=(100, 60, 30))
    draw.ellipse([w * 0.3, h * 0.2, w * 0.7, h * 0.55], fill=(40, 120, 50))
    return image


def dots(size, colors, rows=2):
    image = Image.new("RGB", size, COLORS["white"])
    draw = ImageDraw.Draw(image)
    w, h = size
    r = h / (rows * 2.5)
    per_row = int(w / (3 * r))
    for row in range(rows):
        for i in range(per_row):
            cx, cy = (i + 0.5) * w / per_row, (row + 0.5) * h / rows
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=COLORS[colors[(i + row) % len(colors)]])
    return image


def ring(size, fg, bg):
    image = Image.new("RGB", size, COLORS[bg])
    w, h = size
    r = 0.35 * min(w, h)
    ImageDraw.Draw(image).ellipse([w / 2 - r, h / 2 - r, w / 2 + r, h / 2 + r], outline=COLORS[fg],
                                  width=max(2, round(r / 4)))
    return image


# (file name, caption for a .txt sidecar or None when the file name is the caption, size, picture)
EXAMPLES = [
    ("a red circle on a blue background.png", None, (320, 320), lambda s: circle(s, "red", "blue")),
    ("a yellow square on a green background_(1).jpg", None, (320, 320),
     lambda s: square(s, "yellow", "green", at=(0.4, 0.45))),
    ("a yellow square on a green background_(2).jpg", None, (320, 320),
     lambda s: square(s, "yellow", "green", scale=0.35, at=(0.6, 0.55))),
    ("checker.png", "a black and white checkered pattern, grid, tiles", (320, 320),
     lambda s: checker(s, "black", "white")),
    ("triangle.png", "a white triangle on a black background", (420, 280), lambda s: triangle(s, "white", "black")),
    ("orange stripes, striped pattern, abstract.jpg", None, (480, 320),
     lambda s: stripes(s, ["orange", "white"])),
    ("tower.jpg", "a tall blue tower at night, stars in the sky", (280, 420), tower),
    ("a green tree on a hill, blue sky.png", None, (320, 480), hill_and_tree),
    ("sunset.jpg", "a sunset over the sea, orange sky, horizon", (448, 252), sunset),
    ("a purple ring on a white background.png", None, (512, 288), lambda s: ring(s, "purple", "white")),
    ("banner.png", "a long banner with colorful dots", (640, 160),
     lambda s: dots(s, ["red", "teal", "yellow", "pink"])),
    ("a tall pole with red and white stripes.png", None, (160, 640),
     lambda s: stripes(s, ["red", "white"], vertical=False, count=10)),
]


def make_example_images(out_dir: str) -> list[str]:
    """Draw every example into `out_dir` (created if needed); the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for name, sidecar_caption, size, draw in EXAMPLES:
        path = os.path.join(out_dir, name)
        image = draw(size)
        if name.endswith(".jpg"):
            image.save(path, quality=92)
        else:
            image.save(path)
        written.append(path)
        if sidecar_caption:
            with open(os.path.splitext(path)[0] + ".txt", "w", encoding="utf-8") as handle:
                handle.write(sidecar_caption + "\n")
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "images"),
                        help="folder to write to (default: examples/images next to this script)")
    args = parser.parse_args()
    for path in make_example_images(args.out):
        print(path)


if __name__ == "__main__":
    main()
