"""The photo classifier's car gate, old rule vs new rule, measured in one run on the same images.

    python bench/gate.py [--upscale-every 4] [--out bench/results/gate-cpu.txt]

Real photos: the 1,600 100 px traffic-camera crops of ../shared/data/vehicles (car/ and pickup/),
as they are, and every `--upscale-every`-th one upscaled to 1000 px (bicubic) like a phone photo.
The odd-numbered photos get their own row: the car-lookalike classes of the new rule were chosen
on the even-numbered ones. Non-car pictures: skimage sample images that ship with the package
(no download), the bundled panda, each also as a 100 px JPEG (q40), and drawn ones (noise, flat
colours, gradients, stripes, a checkerboard, a tree, a house, a face, a flower, text, circles,
blobs, a ball). Each image is classified once; both rules read the same probabilities.

Old rule: car score (vehicle classes, "radiator" included) at least 0.2, else refused.
New rule: VisionTagger.gate: vehicle / unsure / not_vehicle (refused).
"""

import argparse
import io
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from core.qa.vision import (  # noqa: E402
    CAR_LOOKALIKE_CLASSES,
    NOT_VEHICLE,
    UNSURE,
    VEHICLE,
    VEHICLE_CLASSES,
    VisionTagger,
)

VEHICLES = ROOT.parent / "shared" / "data" / "vehicles"
OLD_VEHICLE_CLASSES = (*VEHICLE_CLASSES, "radiator")
OLD_THRESHOLD = 0.2
SKIMAGE_IMAGES = (
    "astronaut", "camera", "coffee", "chelsea", "rocket", "horse", "hubble_deep_field",
    "immunohistochemistry", "moon", "page", "text", "clock", "coins", "checkerboard", "grass",
    "gravel", "brick", "logo", "colorwheel", "retina", "cell", "shepp_logan_phantom",
    "binary_blobs",
)  # fmt: skip
DRAWINGS = ("tree", "house", "face", "flower", "text", "circles", "blobs", "ball")


def as_rgb(array: np.ndarray) -> Image.Image:
    array = np.asarray(array)
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    if array.dtype != np.uint8:
        span = max(float(array.max() - array.min()), 1e-9)
        array = (255 * (array - array.min()) / span).astype(np.uint8)
    if array.ndim == 2:
        array = np.stack([array] * 3, -1)
    return Image.fromarray(array[..., :3])


def small_jpeg(image: Image.Image, px: int = 100, quality: int = 40) -> Image.Image:
    """The picture as a low-quality 100 px JPEG, like the traffic-camera crops."""
    scale = px / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    out = io.BytesIO()
    image.resize(size, Image.Resampling.BICUBIC).save(out, "JPEG", quality=quality)
    return Image.open(io.BytesIO(out.getvalue())).convert("RGB")


def drawing(kind: str, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (224, 224), (135, 200, 235))
    draw = ImageDraw.Draw(image)

    def colour() -> tuple[int, int, int]:
        return tuple(int(c) for c in rng.integers(0, 255, 3))

    if kind == "tree":
        draw.rectangle([0, 170, 224, 224], fill=(60, 140, 50))
        draw.rectangle([100, 110, 124, 175], fill=(100, 60, 20))
        for _ in range(30):
            x, y = rng.integers(50, 170), rng.integers(30, 130)
            leaf = (20, int(rng.integers(100, 160)), 30)
            draw.ellipse([x - 20, y - 20, x + 20, y + 20], fill=leaf)
    elif kind == "house":
        draw.rectangle([0, 180, 224, 224], fill=(70, 150, 60))
        draw.rectangle([50, 100, 174, 185], fill=(200, 170, 120))
        draw.polygon([(40, 100), (112, 40), (184, 100)], fill=(150, 40, 30))
        draw.rectangle([95, 135, 125, 185], fill=(90, 50, 20))
        draw.rectangle([60, 115, 85, 140], fill="white")
        draw.rectangle([140, 115, 165, 140], fill="white")
    elif kind == "face":
        draw.rectangle([0, 0, 224, 224], fill=(250, 240, 220))
        draw.ellipse([30, 20, 194, 204], fill=(240, 200, 160), outline="black")
        draw.ellipse([70, 80, 90, 100], fill="black")
        draw.ellipse([134, 80, 154, 100], fill="black")
        draw.arc([70, 110, 154, 170], 20, 160, fill="black", width=4)
    elif kind == "flower":
        draw.rectangle([0, 0, 224, 224], fill=(60, 140, 50))
        draw.rectangle([108, 110, 116, 224], fill=(30, 90, 20))
        for angle in np.radians(np.arange(0, 360, 45)):
            x, y = 112 + 45 * np.cos(angle), 90 + 45 * np.sin(angle)
            draw.ellipse([x - 25, y - 25, x + 25, y + 25], fill=(230, 60, 120))
        draw.ellipse([92, 70, 132, 110], fill=(250, 210, 40))
    elif kind == "text":
        draw.rectangle([0, 0, 224, 224], fill="white")
        for row in range(12):
            draw.text((10, 10 + 17 * row), "the quick brown fox jumps", fill="black")
    elif kind == "circles":
        draw.rectangle([0, 0, 224, 224], fill="white")
        for r in range(110, 0, -12):
            draw.ellipse([112 - r, 112 - r, 112 + r, 112 + r], outline=colour(), width=5)
    elif kind == "blobs":
        for _ in range(25):
            (x, y), r = rng.integers(0, 224, 2), rng.integers(10, 50)
            draw.ellipse([x - r, y - r, x + r, y + r], fill=colour())
    elif kind == "ball":
        draw.rectangle([0, 0, 224, 224], fill=(200, 200, 200))
        draw.ellipse([50, 50, 174, 174], fill=(220, 120, 20), outline="black", width=3)
    return image


def patterns() -> list[tuple[str, Image.Image]]:
    out = []
    for seed in range(3):
        pixels = np.random.default_rng(seed).integers(0, 256, (160, 160, 3), dtype=np.uint8)
        out.append((f"noise{seed}", Image.fromarray(pixels)))
    out.append(("noise-blurred", out[0][1].filter(ImageFilter.GaussianBlur(3))))
    for name in ("red", "green", "blue", "white", "black", "grey", "yellow", "orange"):
        out.append((f"flat-{name}", Image.new("RGB", (64, 64), name)))
    ramp = np.tile(np.linspace(0, 255, 224), (224, 1))
    out.append(("gradient", as_rgb(np.stack([ramp] * 3, -1).astype(np.uint8))))
    coloured = np.stack([ramp, ramp.T, 255 - ramp], -1).astype(np.uint8)
    out.append(("gradient-colour", Image.fromarray(coloured)))
    for name, step, width in (("stripes", 16, 3), ("stripes-wide", 40, 15)):
        image = Image.new("RGB", (224, 224), "white")
        draw = ImageDraw.Draw(image)
        for x in range(0, 224, step):
            draw.line([x, 0, x, 224], fill="black", width=width)
        out += [(name, image), (f"{name}-horizontal", image.rotate(90))]
    squares = (np.arange(224)[:, None] // 28 + np.arange(224)[None, :] // 28) % 2
    out.append(("checker", as_rgb((squares * 255).astype(np.uint8))))
    out += [(f"drawn-{kind}", drawing(kind)) for kind in DRAWINGS]
    return out


def non_car_images() -> list[tuple[str, Image.Image]]:
    """Pictures that are clearly not vehicles, all made or loaded offline."""
    from skimage import data

    photos = []
    for name in SKIMAGE_IMAGES:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                photos.append((name, as_rgb(getattr(data, name)())))
        except Exception as error:  # a sample that needs a download (pooch) or is missing
            print(f"skipped skimage {name}: {type(error).__name__}", file=sys.stderr)
    panda = Image.open(ROOT / "core" / "assets" / "panda.png").convert("RGB")
    photos.append(("panda", panda))
    small = [(f"{name}-100px", small_jpeg(image)) for name, image in photos]
    return photos + small + patterns()


def photo_number(path: Path) -> int:
    return int("".join(c for c in path.stem if c.isdigit()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upscale-every", type=int, default=4, help="0: no upscaled row")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (shared cores)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gate-cpu.txt")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    tagger = VisionTagger()
    old_ids = tagger.class_ids(OLD_VEHICLE_CLASSES)
    new_ids = tagger.class_ids(VEHICLE_CLASSES + CAR_LOOKALIKE_CLASSES)
    photos = sorted(VEHICLES.glob("*/*.jpg"))
    if not photos:
        sys.exit(f"no photos under {VEHICLES}")

    def classify(images) -> tuple[list[str], list[str], np.ndarray]:
        old, new, kept = [], [], []
        for image in images:
            probs = tagger.probabilities(image)
            old.append(VEHICLE if probs[old_ids].sum() >= OLD_THRESHOLD else NOT_VEHICLE)
            new.append(tagger.gate(probs)[1])
            kept.append(probs[new_ids].sum())  # vehicle + lookalike classes
        return old, new, np.array(kept)

    real_old, real_new, real_kept = classify(Image.open(path) for path in photos)
    print(f"real photos classified in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    rows = []
    for name, keep in (
        ("real car", [p.parent.name == "car" for p in photos]),
        ("real pickup", [p.parent.name == "pickup" for p in photos]),
        ("real, all", [True] * len(photos)),
        ("real, odd-numbered (held out)", [photo_number(p) % 2 == 1 for p in photos]),
    ):
        idx = [i for i, k in enumerate(keep) if k]
        rows.append((name, [real_old[i] for i in idx], [real_new[i] for i in idx]))
    upscaled_kept = np.array([])
    if args.upscale_every:
        chosen = photos[:: args.upscale_every]
        big = (
            Image.open(p).convert("RGB").resize((1000, 1000), Image.Resampling.BICUBIC)
            for p in chosen
        )
        up_old, up_new, upscaled_kept = classify(big)
        rows.append((f"real upscaled to 1000 px (1 in {args.upscale_every})", up_old, up_new))
    pictures = non_car_images()
    non_old, non_new, non_kept = classify(image for _, image in pictures)
    rows.append(("non-car pictures", non_old, non_new))

    def share(verdicts: list[str], verdict: str) -> str:
        return f"{sum(v == verdict for v in verdicts) / len(verdicts):6.1%}"

    lines = [
        "Car gate on this CPU (EfficientNet-Lite0, "
        f"{args.threads} torch thread(s), load average {os.getloadavg()[0]:.1f} at the end)",
        "old: car score >= 0.2 else refused; new: vehicle (car score >= 0.2) / unsure / refused "
        "(vehicle + car-lookalike classes < 0.1)",
        "",
        f"{'images':40s} {'rule':4s} {'photos':>6s} {'refused':>8s} {'unsure':>7s} {'vehicle':>8s}",
    ]
    for name, old, new in rows:
        for rule, verdicts in (("old", old), ("new", new)):
            lines.append(
                f"{name:40s} {rule:4s} {len(verdicts):6d} {share(verdicts, NOT_VEHICLE):>8s} "
                f"{share(verdicts, UNSURE):>7s} {share(verdicts, VEHICLE):>8s}"
            )
    refused = [str(p.relative_to(VEHICLES)) for p, v in zip(photos, real_new, strict=True)
               if v == NOT_VEHICLE]  # fmt: skip
    answered = [f"{name} ({kept:.3f})"
                for (name, _), v, kept in zip(pictures, non_new, non_kept, strict=True)
                if v != NOT_VEHICLE]  # fmt: skip
    lowest = [float(real_kept.min())] + ([float(upscaled_kept.min())] if upscaled_kept.size else [])
    lines += [
        "",
        "vehicle + lookalike probability (refused under 0.1): lowest real photo "
        + " / ".join(f"{x:.3f}" for x in lowest)
        + f" (100 px / upscaled), highest non-car picture {non_kept.max():.3f}",
        f"real photos refused by the new rule: {', '.join(refused) or 'none'}",
        f"non-car pictures not refused by the new rule: {', '.join(answered) or 'none'}",
        f"Bench wall time {time.perf_counter() - started:.0f} s.",
    ]
    table = "\n".join(lines)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
