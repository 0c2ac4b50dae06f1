"""Demo data drawn by us, so `talkmosaic demo` works on a fresh machine and may be redistributed:
procedural car photos (six body shapes, a wide colour palette, four backgrounds, lighting) with
clearly made-up labels, and the bundled target, a giant panda (core/assets/panda.png, drawn by
`draw_panda`; regenerate it with `python -m core.democars`).
"""

import colorsys
import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

DEMO_PHOTOS = 600
DEMO_PX = 128
ASSETS = Path(__file__).resolve().parent / "assets"
DEMO_TARGET = ASSETS / "panda.png"
LABEL_COLUMNS = ("file", "make", "model", "year", "fuel", "co2_g_km", "emission_standard", "source")
DEMO_SOURCE = "TalkMosaic demo: procedurally drawn, not a real car"

# Side views facing right, in car lengths: x from the rear (0) to the nose (1), y up from the
# ground. Each shape: silhouette, window polygons, wheel centres x, wheel radius.
SHAPES: dict[str, dict] = {
    "sedan": {
        "body": [
            (0.02, 0.09),
            (0.0, 0.2),
            (0.03, 0.25),
            (0.22, 0.27),
            (0.33, 0.4),
            (0.6, 0.41),
            (0.73, 0.28),
            (0.95, 0.25),
            (1.0, 0.18),
            (0.99, 0.09),
        ],
        "windows": [
            [(0.3, 0.28), (0.35, 0.38), (0.47, 0.385), (0.47, 0.28)],
            [(0.49, 0.28), (0.49, 0.385), (0.59, 0.385), (0.69, 0.28)],
        ],
        "wheels": (0.2, 0.8),
        "radius": 0.085,
    },
    "hatchback": {
        "body": [
            (0.02, 0.09),
            (0.0, 0.22),
            (0.03, 0.4),
            (0.1, 0.45),
            (0.57, 0.45),
            (0.72, 0.29),
            (0.95, 0.26),
            (1.0, 0.18),
            (0.99, 0.09),
        ],
        "windows": [
            [(0.07, 0.3), (0.1, 0.41), (0.3, 0.42), (0.3, 0.3)],
            [(0.33, 0.3), (0.33, 0.42), (0.55, 0.42), (0.67, 0.3)],
        ],
        "wheels": (0.18, 0.8),
        "radius": 0.09,
    },
    "suv": {
        "body": [
            (0.01, 0.12),
            (0.0, 0.3),
            (0.02, 0.53),
            (0.08, 0.56),
            (0.66, 0.56),
            (0.79, 0.37),
            (0.97, 0.35),
            (1.0, 0.26),
            (0.99, 0.12),
        ],
        "windows": [
            [(0.05, 0.39), (0.08, 0.52), (0.32, 0.52), (0.32, 0.39)],
            [(0.35, 0.39), (0.35, 0.52), (0.64, 0.52), (0.74, 0.39)],
        ],
        "wheels": (0.18, 0.8),
        "radius": 0.11,
    },
    "pickup": {
        "body": [
            (0.0, 0.12),
            (0.0, 0.33),
            (0.43, 0.33),
            (0.45, 0.54),
            (0.67, 0.54),
            (0.77, 0.36),
            (0.97, 0.34),
            (1.0, 0.25),
            (0.99, 0.12),
        ],
        "windows": [[(0.48, 0.37), (0.49, 0.5), (0.65, 0.5), (0.73, 0.37)]],
        "wheels": (0.17, 0.8),
        "radius": 0.11,
    },
    "van": {
        "body": [
            (0.0, 0.1),
            (0.0, 0.63),
            (0.03, 0.67),
            (0.77, 0.67),
            (0.91, 0.43),
            (0.99, 0.37),
            (1.0, 0.22),
            (0.99, 0.1),
        ],
        "windows": [
            [(0.05, 0.45), (0.05, 0.6), (0.3, 0.6), (0.3, 0.45)],
            [(0.34, 0.45), (0.34, 0.6), (0.62, 0.6), (0.62, 0.45)],
            [(0.68, 0.43), (0.69, 0.62), (0.76, 0.62), (0.87, 0.43)],
        ],
        "wheels": (0.16, 0.82),
        "radius": 0.09,
    },
    "sports": {
        "body": [
            (0.01, 0.08),
            (0.0, 0.18),
            (0.05, 0.22),
            (0.3, 0.24),
            (0.42, 0.33),
            (0.6, 0.33),
            (0.75, 0.22),
            (0.97, 0.17),
            (1.0, 0.12),
            (0.98, 0.07),
        ],
        "windows": [[(0.4, 0.245), (0.45, 0.31), (0.59, 0.31), (0.69, 0.235)]],
        "wheels": (0.2, 0.8),
        "radius": 0.08,
    },
}
MODELS = {
    "sedan": ("Saloon", "Aria", "Cirrus"),
    "hatchback": ("Hatch", "Pico", "Zest"),
    "suv": ("Crossover", "Ridge", "Summit"),
    "pickup": ("Pickup", "Hauler", "Mesa"),
    "van": ("Van", "Cargo", "Shuttle"),
    "sports": ("Coupe", "Vento", "Strada"),
}
# Tailpipe CO2 of a petrol version in g/km; fuels scale it (electric cars emit none at the pipe).
BASE_CO2 = {"sedan": 140, "hatchback": 120, "suv": 185, "pickup": 230, "van": 200, "sports": 240}
FUELS = (
    ("petrol", 1.0),
    ("diesel", 0.88),
    ("hybrid", 0.7),
    ("plug-in hybrid", 0.28),
    ("electric", 0.0),
    ("lpg", 0.9),
)
NEUTRALS = ((240, 240, 238), (200, 202, 205), (150, 152, 156), (90, 92, 96), (28, 28, 32))


@dataclass
class DemoLibrary:
    photos: list[Path]
    labels_csv: Path


def generate_demo_library(directory: Path, n: int = DEMO_PHOTOS, seed: int = 0) -> DemoLibrary:
    """Write n demo car photos (JPEG) and their labels.csv into `directory`. Photo i depends
    only on (seed, i), so the same seed always gives the same files."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    photos, rows = [], []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        image, metadata = draw_demo_car(rng)
        path = directory / f"demo_{seed}_{i:05d}.jpg"
        image.save(path, "JPEG", quality=90)
        photos.append(path)
        rows.append({"file": path.name, **metadata})
    labels_csv = directory / "labels.csv"
    with open(labels_csv, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, LABEL_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return DemoLibrary(photos, labels_csv)


def draw_demo_car(rng: np.random.Generator, px: int = DEMO_PX) -> tuple[Image.Image, dict]:
    """One square demo photo of a car and its made-up metadata."""
    shape = str(rng.choice(list(SHAPES)))
    scale = 2  # draw twice as large, then downsample: cheap anti-aliasing
    size = px * scale
    canvas = Image.fromarray(_background(rng, size))
    body_colour = _body_colour(rng)
    length = size * rng.uniform(0.84, 0.94)
    x0 = (size - length) / 2 + rng.uniform(-0.03, 0.03) * size
    ground = size * rng.uniform(0.74, 0.82)
    _draw_car(canvas, SHAPES[shape], body_colour, x0, ground, length, rng)
    small = np.asarray(canvas.resize((px, px), Image.Resampling.LANCZOS), np.float32)
    image = _light(small[:, ::-1] if rng.random() < 0.5 else small, rng)
    return Image.fromarray(image), _metadata(rng, shape)


def _metadata(rng: np.random.Generator, shape: str) -> dict:
    fuel, factor = FUELS[int(rng.choice(len(FUELS), p=(0.38, 0.24, 0.14, 0.07, 0.12, 0.05)))]
    year = int(rng.integers(2006, 2025))
    co2 = round(BASE_CO2[shape] * factor * rng.uniform(0.88, 1.12) * (1 - (year - 2006) * 0.008))
    if fuel == "electric":
        standard = "zero tailpipe emissions"
    else:
        standard = (
            "Euro 4"
            if year < 2011
            else "Euro 5"
            if year < 2015
            else "Euro 6"
            if year < 2019
            else "Euro 6d-TEMP"
            if year < 2021
            else "Euro 6d"
        )
    return {
        "make": "Demo",
        "model": f"{rng.choice(MODELS[shape])} {shape}",
        "year": year,
        "fuel": fuel,
        "co2_g_km": co2,
        "emission_standard": standard,
        "source": DEMO_SOURCE,
    }


def _body_colour(rng: np.random.Generator) -> np.ndarray:
    """Mostly vivid hues so a demo mosaic can be colourful; a quarter are whites, greys, blacks."""
    if rng.random() < 0.25:
        base = np.array(NEUTRALS[int(rng.integers(len(NEUTRALS)))], np.float32)
        return np.clip(base + rng.normal(0, 6, 3), 0, 255)
    hue, saturation, value = rng.random(), rng.uniform(0.5, 1.0), rng.uniform(0.45, 1.0)
    return np.array(colorsys.hsv_to_rgb(hue, saturation, value), np.float32) * 255


def _gradient(top, bottom, height: int, width: int) -> np.ndarray:
    t = np.linspace(0, 1, height, dtype=np.float32)[:, None, None]
    column = np.asarray(top, np.float32) * (1 - t) + np.asarray(bottom, np.float32) * t
    return np.repeat(column, width, axis=1)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Sky over asphalt, grass or a city street, or a plain studio; uint8 (size, size, 3)."""
    kind = str(rng.choice(["road", "grass", "city", "studio"]))
    horizon = int(size * rng.uniform(0.5, 0.62))
    skies = (
        ((70, 130, 210), (185, 215, 240)),
        ((250, 150, 90), (255, 215, 150)),
        ((150, 160, 175), (210, 212, 215)),
        ((35, 50, 110), (120, 110, 170)),
    )
    sky_top, sky_bottom = skies[int(rng.integers(len(skies)))]
    if kind == "studio":
        wall = (
            np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0, 0.5), rng.uniform(0.5, 0.95)))
            * 255
        )
        picture = _gradient(wall * 1.1, wall * 0.8, size, size)
        picture[horizon:] = _gradient(wall * 0.7, wall * 0.5, size - horizon, size)
        return np.clip(picture, 0, 255).astype(np.uint8)
    picture = _gradient(sky_top, sky_bottom, size, size)
    grounds = {
        "road": ((95, 95, 100), (55, 55, 60)),
        "grass": ((120, 170, 70), (60, 110, 40)),
        "city": ((110, 108, 105), (60, 60, 62)),
    }
    near, far = grounds[kind]
    picture[horizon:] = _gradient(near, far, size - horizon, size)
    picture[horizon:] += rng.normal(0, 5, (size - horizon, size, 1)).astype(np.float32)
    image = Image.fromarray(np.clip(picture, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    if kind == "city":
        x = -int(rng.integers(0, size // 6))
        while x < size:
            width, height = (
                int(rng.integers(size // 8, size // 4)),
                int(rng.integers(size // 6, horizon)),
            )
            tone = tuple(int(c) for c in rng.integers(70, 190) + rng.integers(-20, 20, 3))
            draw.rectangle((x, horizon - height, x + width, horizon), fill=tone)
            for wy in range(horizon - height + 6, horizon - 8, 12):
                for wx in range(x + 5, x + width - 6, 10):
                    lit = (240, 220, 140) if rng.random() < 0.4 else tuple(c - 30 for c in tone)
                    draw.rectangle((wx, wy, wx + 4, wy + 5), fill=lit)
            x += width + int(rng.integers(0, 6))
    elif kind == "road":
        draw.rectangle((0, horizon, size, horizon + 3), fill=(170, 170, 160))
    else:
        for _ in range(int(rng.integers(2, 5))):  # trees on the horizon
            cx, r = int(rng.integers(0, size)), int(rng.integers(size // 14, size // 7))
            draw.ellipse((cx - r, horizon - 2 * r, cx + r, horizon), fill=(40, 100, 45))
    return np.asarray(image)


def _draw_car(
    canvas: Image.Image,
    shape: dict,
    colour: np.ndarray,
    x0: float,
    ground: float,
    length: float,
    rng: np.random.Generator,
) -> None:
    def at(x: float, y: float) -> tuple[float, float]:
        return x0 + x * length, ground - y * length

    size = canvas.width
    radius = shape["radius"] * length
    # Soft shadow under the car.
    shadow = Image.new("L", canvas.size, 0)
    left, right = at(-0.02, 0)[0], at(1.02, 0)[0]
    ImageDraw.Draw(shadow).ellipse(
        (left, ground - radius * 0.35, right, ground + radius * 0.35), fill=150
    )
    shadow = shadow.filter(ImageFilter.GaussianBlur(size / 60))
    canvas.paste((15, 15, 18), mask=shadow)

    # Body: shaded from a lit roof to a darker sill, with a highlight along the shoulder line.
    mask = Image.new("L", canvas.size, 0)
    ImageDraw.Draw(mask).polygon([at(x, y) for x, y in shape["body"]], fill=255)
    rows = np.linspace(0, 1, size, dtype=np.float32)[:, None, None]
    shade = 1.25 - 0.55 * rows
    shoulder = ground / size - 0.6 * radius / size * 2
    shade += 0.35 * np.exp(-(((rows - shoulder) * size / (radius * 0.5)) ** 2))
    paint = np.clip(colour * shade + rng.uniform(-4, 4), 0, 255).astype(np.uint8)
    paint = np.repeat(paint, size, axis=1)
    canvas.paste(Image.fromarray(paint), mask=mask)

    draw = ImageDraw.Draw(canvas)
    dark = tuple(int(c * 0.45) for c in colour)
    glass = (int(rng.integers(25, 60)), int(rng.integers(35, 70)), int(rng.integers(55, 95)))
    glass_mask, shine = Image.new("L", canvas.size, 0), Image.new("L", canvas.size, 0)
    for window in shape["windows"]:
        points = [at(x, y) for x, y in window]
        draw.polygon(points, fill=glass, outline=dark)
        ImageDraw.Draw(glass_mask).polygon(points, fill=255)
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        left, width = min(xs), max(xs) - min(xs)
        # A diagonal sky reflection across the glass.
        ImageDraw.Draw(shine).polygon(
            [
                (left + 0.25 * width, max(ys)),
                (left + 0.45 * width, min(ys)),
                (left + 0.6 * width, min(ys)),
                (left + 0.4 * width, max(ys)),
            ],
            fill=70,
        )
    shine = Image.fromarray(np.minimum(np.asarray(shine), np.asarray(glass_mask)))
    canvas.paste((220, 230, 240), mask=shine)

    # Door line, handle, lights.
    door_x = shape["windows"][-1][0][0]
    draw.line([at(door_x, 0.12), at(door_x, shape["windows"][-1][0][1])], fill=dark, width=2)
    handle = at(door_x + 0.06, shape["windows"][-1][0][1] - 0.04)
    draw.rectangle((handle[0], handle[1], handle[0] + length * 0.04, handle[1] + 3), fill=dark)
    nose_y = [y for x, y in shape["body"] if x >= 0.97]
    light_y = (min(nose_y) + max(nose_y)) / 2 + 0.02
    hx, hy = at(0.965, light_y)
    draw.ellipse(
        (hx - length * 0.03, hy - length * 0.018, hx + length * 0.025, hy + length * 0.018),
        fill=(255, 245, 200),
    )
    tx, ty = at(0.015, light_y + 0.01)
    draw.rectangle(
        (tx - 2, ty - length * 0.02, tx + length * 0.03, ty + length * 0.02), fill=(200, 25, 30)
    )

    # Wheels: dark arch, tyre, rim, hub.
    rim = tuple(int(c) for c in rng.choice([(185, 188, 192), (60, 60, 65), (210, 180, 90)]))
    for wheel_x in shape["wheels"]:
        cx, cy = at(wheel_x, shape["radius"])
        for r, fill in (
            (1.15, (20, 20, 22)),
            (1.0, (35, 35, 38)),
            (0.62, rim),
            (0.2, (90, 90, 95)),
        ):
            draw.ellipse(
                (cx - r * radius, cy - r * radius, cx + r * radius, cy + r * radius), fill=fill
            )
        for spoke in range(5):
            angle = spoke * 2 * np.pi / 5 + rng.uniform(0, 1)
            end = (cx + 0.55 * radius * np.cos(angle), cy + 0.55 * radius * np.sin(angle))
            draw.line([(cx, cy), end], fill=(110, 110, 115), width=max(1, int(radius / 8)))


def _light(picture: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Sunlight from one side, overall exposure, a little sensor noise; uint8."""
    size = picture.shape[1]
    side = np.linspace(-1, 1, size, dtype=np.float32)[None, :, None] * rng.uniform(-0.15, 0.15)
    exposure = rng.uniform(0.85, 1.12)
    noise = rng.standard_normal(picture.shape, dtype=np.float32) * 3
    return np.clip(picture * (exposure + side) + noise, 0, 255).astype(np.uint8)


# The bundled target ---------------------------------------------------------------------------


def _ellipse(cx: float, cy: float, rx: float, ry: float, degrees: float = 0.0) -> list[tuple]:
    """Polygon of an ellipse turned by `degrees` (ImageDraw only draws upright ones)."""
    t = np.linspace(0, 2 * np.pi, 96, endpoint=False)
    turn = np.radians(degrees)
    x, y = rx * np.cos(t), ry * np.sin(t)
    return list(
        zip(
            cx + x * np.cos(turn) - y * np.sin(turn),
            cy + x * np.sin(turn) + y * np.cos(turn),
            strict=True,
        )
    )


def _bamboo(
    draw: ImageDraw.ImageDraw,
    x: float,
    top: float,
    bottom: float,
    width: float,
    green: tuple,
    leaves: int,
    rng: np.random.Generator,
) -> None:
    node = tuple(int(c * 0.7) for c in green)
    draw.rounded_rectangle(
        (x - width / 2, top, x + width / 2, bottom), radius=width / 3, fill=green
    )
    draw.line(
        [(x - width * 0.2, top), (x - width * 0.2, bottom)],
        fill=tuple(min(255, int(c * 1.25)) for c in green),
        width=max(2, int(width / 6)),
    )
    for y in np.arange(top + rng.uniform(60, 140), bottom, rng.uniform(130, 180)):
        draw.rectangle((x - width / 2 - 2, y, x + width / 2 + 2, y + width / 7), fill=node)
    leaf = tuple(int(c * 0.85) for c in green)
    for _ in range(leaves):
        y = rng.uniform(top, bottom)
        side = rng.choice([-1, 1])
        length = rng.uniform(70, 120)
        angle = side * rng.uniform(15, 45) + (0 if side > 0 else 180)
        cx = x + np.cos(np.radians(angle)) * length / 2
        cy = y + np.sin(np.radians(angle)) * length / 2
        draw.polygon(_ellipse(cx, cy, length / 2, length / 9, angle), fill=leaf)


def draw_panda(size: int = 512) -> Image.Image:
    """A giant panda sitting in a bamboo forest, drawn by us: bold black and white on greens, so
    it stays readable as a mosaic of a few thousand tiles. Drawn at 1024 px, then downsampled."""
    rng = np.random.default_rng(2409)
    big = 1024
    sky = _gradient((214, 236, 160), (92, 160, 72), big, big)
    image = Image.fromarray(sky.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for x in (40, 150, 880, 990, 260, 770):
        green = tuple(
            int(c) for c in (rng.integers(60, 110), rng.integers(130, 170), rng.integers(40, 70))
        )
        _bamboo(draw, x + rng.uniform(-20, 20), -20, big + 20, rng.uniform(38, 56), green, 6, rng)
    draw.rectangle((0, 900, big, big), fill=(70, 120, 50))

    black, white, shade = (22, 22, 26), (248, 246, 238), (214, 212, 206)
    # Body, legs and arms first; the head sits over the shoulders.
    draw.ellipse((190, 560, 834, 1080), fill=white)
    draw.polygon(_ellipse(512, 650, 340, 110), fill=black)  # the black shoulder band
    draw.polygon(_ellipse(290, 960, 160, 110, -10), fill=black)
    draw.polygon(_ellipse(734, 960, 160, 110, 10), fill=black)
    draw.ellipse((250, 930, 330, 990), fill=(60, 58, 60))
    draw.ellipse((694, 930, 774, 990), fill=(60, 58, 60))
    draw.polygon(_ellipse(300, 790, 100, 190, 20), fill=black)
    draw.polygon(_ellipse(700, 780, 100, 170, -35), fill=black)
    # A bamboo stalk held in the right paw, leaves above the shoulder.
    _bamboo(draw, 760, 300, 1010, 42, (120, 180, 60), 0, rng)
    for angle, length in ((-150, 150), (-115, 130), (-35, 150), (-5, 120)):
        cx = 760 + np.cos(np.radians(angle)) * length / 2
        cy = 330 + np.sin(np.radians(angle)) * length / 2
        draw.polygon(_ellipse(cx, cy, length / 2, length / 8, angle), fill=(80, 160, 50))
    draw.polygon(_ellipse(740, 790, 75, 60, -20), fill=black)  # the paw around the stalk

    # Head: ears behind, white face with soft shading, eye patches, eyes, nose, mouth.
    draw.ellipse((185, 105, 385, 305), fill=black)
    draw.ellipse((639, 105, 839, 305), fill=black)
    draw.ellipse((222, 170, 802, 680), fill=shade)
    draw.ellipse((235, 175, 789, 660), fill=white)
    # Eye patches slant down and outward, as a panda's do.
    draw.polygon(_ellipse(400, 425, 72, 108, -35), fill=black)
    draw.polygon(_ellipse(624, 425, 72, 108, 35), fill=black)
    for cx in (412, 612):
        draw.ellipse((cx - 27, 380, cx + 27, 434), fill=(250, 250, 250))
        draw.ellipse((cx - 15, 392, cx + 15, 422), fill=black)
        draw.ellipse((cx - 9, 395, cx + 1, 405), fill=(255, 255, 255))
    draw.ellipse((422, 480, 602, 610), fill=(240, 236, 226))
    draw.ellipse((462, 492, 562, 548), fill=black)
    draw.line([(512, 545), (512, 580)], fill=black, width=7)
    draw.arc((452, 545, 512, 605), 20, 160, fill=black, width=7)
    draw.arc((512, 545, 572, 605), 20, 160, fill=black, width=7)
    return image.resize((size, size), Image.Resampling.LANCZOS)


if __name__ == "__main__":
    ASSETS.mkdir(exist_ok=True)
    draw_panda().save(DEMO_TARGET, optimize=True)
    print(f"wrote {DEMO_TARGET}")
