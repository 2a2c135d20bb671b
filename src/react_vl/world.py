"""The mini world: a seeded, procedural generator of 64x64 image-caption pairs.

Why it exists: REACT needs a web-scale corpus, a CLIP model that knows the concepts, and a task
whose domain is a small share of that corpus. Here one big coloured shape per image plays the
role of an object, and *rendering styles* play the role of domains: "photo" dominates, while
"sketch", "night" and "pixel" are rare. Target tasks ask for a rare style (shape in sketches,
colour at night); control tasks ask for the dominant one, to measure forgetting.

Two variants (`WorldConfig.variant`). "web", the default, draws the rare styles as their web
counterparts look: a pencil sketch is a monochrome graphite outline, often shaded with hatching
(SKETCH_SHADING_RATE), whose caption rarely names a colour; a night photo is dark, grainy and
washed out (NIGHT_CHROMA); and most objects are plain (WEB_TEXTURE_SHARES).
"colour-cue" keeps the first world's look: sketches are outlines in the object's colour and every
caption names it, so a base can match a sketch to its caption by colour alone without learning
the shapes in sketches (the study's "base lacks the concept" row).

Layout written (docs/DESIGN.md): WORLD/world.json, WORLD/{pretrain,kb}/*.tar,
WORLD/eval/<task>/*.tar (the test sets), WORLD/val/<task>/*.tar (validation sets, drawn like the
test sets from streams of their own, for choosing settings without looking at the test sets) and
WORLD/tasks/<task>.json. Every shard has its own seed, derived
from (world seed, stream, shard number), so the bytes do not depend on the worker count, and a
shard that exists is complete (written atomically), which makes generation resume-safe.
"""

import functools
import hashlib
import io
import json
import multiprocessing
import os
import tarfile
import time
import zlib
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageDraw
from tqdm import tqdm

from .concepts import (ATTRIBUTE_CLASSES, BACKGROUNDS, COLORS, MINI_TASKS, POSITIONS, SHAPES, SIZES, STYLES,
                       TEXTURES)
from .tasks import get_task
from .utils import atomic_path, read_json, write_json

# --- the caption grammar -----------------------------------------------------------------------
SIZE_WORDS = {"small": ["small", "little", "tiny"], "medium": ["medium-sized", "mid-sized"],
              "large": ["large", "big", "huge"]}
TEXTURE_WORDS = {"solid": ["solid", "plain"], "striped": ["striped", "stripy"],
                 "dotted": ["dotted", "spotted", "polka-dot"], "checkered": ["checkered", "checked"]}
POSITION_WORDS = {"center": ["in the center", "in the middle"], "left": ["on the left", "at the left"],
                  "right": ["on the right", "at the right"], "top": ["at the top", "near the top"],
                  "bottom": ["at the bottom", "near the bottom"]}
BACKGROUND_WORDS = {"white": ["on a white background", "on white"], "gray": ["on a gray background", "on grey"],
                    "beige": ["on a beige background", "on a tan backdrop"],
                    "black": ["on a black background", "on black"]}
# Noun phrases: {c} colour, {s} shape, {z} size, {t} texture, {p} position, {b} background.
OBJECT_PHRASES = ["{c} {s}", "{z} {c} {s}", "{t} {c} {s}", "{z} {t} {c} {s}", "{s} in {c}",
                  "{c} {s} {p}", "{c} {s} {b}", "{z} {c} {s} {b}", "{t} {s} in {c}"]
STYLE_PHRASES = {
    "photo": ["a photo of {o}", "{o}", "a picture of {o}", "an image of {o}", "close-up of {o}",
              "{o}, photographed", "stock photo of {o}"],
    "sketch": ["a sketch of {o}", "{o}, drawn in outline", "an outline drawing of {o}",
               "a pencil sketch of {o}", "line drawing of {o}", "a hand-drawn sketch of {o}"],
    "night": ["{o} at night", "a night photo of {o}", "a photo of {o} at night", "{o} in the dark",
              "a dark night-time shot of {o}"],
    "pixel": ["pixel art of {o}", "{o} in pixel art style", "a pixelated image of {o}",
              "8-bit pixel art of {o}", "a low-res pixel picture of {o}"],
}
# A web sketch's alt-text rarely names a colour ("web" variant): these phrases leave it out.
SKETCH_PHRASES = ["{s}", "{z} {s}", "{s} {p}", "{z} {s} {p}"]
SKETCH_COLOUR_RATE = 0.1  # share of "web" sketch captions that still name the colour
# A drawing's alt-text often names only its subject, as clip-art's does ("a star", "small arrow on the left")
SKETCH_SUBJECT_ONLY_RATE = 0.5  # share of the colourless "web" sketch captions without a style phrase
SKETCH_SHADING_RATE = 0.6  # share of "web" sketches shaded inside the outline with pencil hatching
NIGHT_CHROMA = 0.5  # share of its colour saturation a "web" night photo keeps: low light washes colour out
# Texture shares ("web" variant): most objects are plain, patterned ones a minority ("colour-cue": uniform)
WEB_TEXTURE_SHARES = {"solid": 0.7, "striped": 0.1, "dotted": 0.1, "checkered": 0.1}
VARIANTS = ("web", "colour-cue")
JUNK_CAPTIONS = ["IMG_{n}.jpg", "DSC{n}", "click to enlarge", "image may contain: text", "untitled",
                 "stock photo {n}", "view larger", "thumbnail", "free shipping on orders over $50",
                 "screenshot_{n}.png", "photo by user{n}", "no description available"]

@dataclass
class WorldConfig:
    """Sizes, style shares and seeds of a world. The pretraining corpus is dominated by photo, and
    in the knowledge base each rare style is a small share, so a random subset of retrieval's size
    holds few pairs of a target's style (as a task's domain is a small share of LAION)."""
    seed: int = 0
    pretrain_size: int = 100_000
    kb_size: int = 100_000
    eval_size: int = 1_000  # per task, classes balanced
    val_size: int = 1_000  # per task, like eval_size, from other seeds: for choosing settings
    # drawings and night shots are each about one web image in twenty, still rare next to photos
    pretrain_styles: dict = field(default_factory=lambda: {"photo": 0.88, "sketch": 0.05, "night": 0.05, "pixel": 0.02})
    kb_styles: dict = field(default_factory=lambda: {"photo": 0.91, "sketch": 0.03, "night": 0.03, "pixel": 0.03})
    noise_rate: float = 0.10  # share of captions that are mismatched or irrelevant alt-text junk
    shard_size: int = 5_000
    image_size: int = 64
    variant: str = "web"  # how the rare styles look and are captioned: one of VARIANTS
    workers: int | None = None  # None: one per CPU core

    def __post_init__(self):
        for name in ("pretrain_styles", "kb_styles"):
            shares = getattr(self, name)
            unknown = set(shares) - set(STYLES)
            if unknown:
                raise ValueError(f"WorldConfig.{name}: unknown style(s) {sorted(unknown)}; known: {STYLES}")
            if any(v < 0 for v in shares.values()) or abs(sum(shares.values()) - 1) > 1e-6:
                raise ValueError(f"WorldConfig.{name}: shares must be >= 0 and sum to 1, got {shares}")
        if self.variant not in VARIANTS:
            raise ValueError(f"WorldConfig.variant: unknown variant {self.variant!r}; known: {', '.join(VARIANTS)}")
        if not 0 <= self.noise_rate <= 1:
            raise ValueError(f"WorldConfig.noise_rate must be in [0, 1], got {self.noise_rate}")
        for name in ("pretrain_size", "kb_size", "eval_size", "val_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"WorldConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.shard_size < 1 or self.image_size < 16:
            raise ValueError(f"WorldConfig: shard_size must be >= 1 and image_size >= 16 "
                             f"(got {self.shard_size}, {self.image_size})")

    def settings(self) -> dict:
        """Every field, and the `look` of this code's drawing (look_fingerprint), which no field
        tells: what world.json records."""
        return {**asdict(self), "look": look_fingerprint(self.variant)}

    def corpus_settings(self) -> dict:
        """What decides the bytes of the corpora and the test sets, as JSON types: the settings but
        `workers` (which process draws a shard changes none of it) and `val_size` (the validation
        sets come from streams of their own and are regenerated to match; nothing else reads them)."""
        return {key: value for key, value in json.loads(json.dumps(self.settings())).items()
                if key not in ("workers", "val_size")}


# --- one sample ---------------------------------------------------------------------------------
@functools.cache
def look_fingerprint(variant: str) -> str:
    """A hash of a fixed handful of pairs of every style drawn and captioned by this code: it
    changes whenever the drawing or the caption grammar does, so a world (or a base model trained
    on one) made by other code is not mistaken for this code's."""
    rng = np.random.default_rng(0)
    digest = hashlib.sha256()
    for style in STYLES:
        for _ in range(4):
            attrs = sample_attributes(rng, style, variant)
            digest.update(render(attrs, rng, 64, variant).tobytes())
            digest.update(make_caption(attrs, rng, variant).encode())
    return digest.hexdigest()[:16]


def sample_attributes(rng: np.random.Generator, style: str, variant: str = "web") -> dict:
    texture = rng.choice(TEXTURES, p=[WEB_TEXTURE_SHARES[t] for t in TEXTURES]) if variant == "web" else \
        TEXTURES[rng.integers(len(TEXTURES))]
    return {
        "shape": SHAPES[rng.integers(len(SHAPES))],
        "color": list(COLORS)[rng.integers(len(COLORS))],
        "texture": str(texture),
        "size": list(SIZES)[rng.integers(len(SIZES))],
        "position": list(POSITIONS)[rng.integers(len(POSITIONS))],
        "background": list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))],
        "style": style,
    }


def make_caption(attrs: dict, rng: np.random.Generator, variant: str = "web") -> str:
    """A clean caption: the object phrase (naming the shape, and the colour but in most "web"
    sketches) inside a style phrase; half the "web" sketches name only their subject."""
    def pick(options):
        return options[rng.integers(len(options))]

    plain_sketch = variant == "web" and attrs["style"] == "sketch" and rng.random() >= SKETCH_COLOUR_RATE
    phrase = pick(SKETCH_PHRASES if plain_sketch else OBJECT_PHRASES).format(
        c=attrs["color"], s=attrs["shape"], z=pick(SIZE_WORDS[attrs["size"]]),
        t=pick(TEXTURE_WORDS[attrs["texture"]]), p=pick(POSITION_WORDS[attrs["position"]]),
        b=pick(BACKGROUND_WORDS[attrs["background"]]))
    subject = f"{'an' if phrase[0] in 'aeiou' else 'a'} {phrase}"
    if plain_sketch and rng.random() < SKETCH_SUBJECT_ONLY_RATE:
        caption = subject
    else:
        caption = pick(STYLE_PHRASES[attrs["style"]]).format(o=subject)
    return caption + "." if rng.random() < 0.5 else caption


def noisy_caption(rng: np.random.Generator, other: dict, variant: str = "web") -> tuple[str, str]:
    """Web alt-text noise: half the caption of `other`, another pair of the same corpus
    (mismatched), half junk (irrelevant)."""
    if rng.random() < 0.5:
        return make_caption(other, rng, variant), "mismatched"
    return JUNK_CAPTIONS[rng.integers(len(JUNK_CAPTIONS))].format(n=rng.integers(1000, 99999)), "irrelevant"


def _shape_mask(attrs: dict, rng: np.random.Generator, size: int) -> Image.Image:
    """The object's silhouette as an anti-aliased 'L' mask (drawn at 2x, then downsampled)."""
    scale = 2 * size
    radius = SIZES[attrs["size"]] * scale * rng.uniform(0.92, 1.08)
    dx, dy = POSITIONS[attrs["position"]]
    offset = max(0.0, 0.5 * scale - radius - 0.03 * scale)
    cx = scale / 2 + dx * offset + rng.uniform(-0.03, 0.03) * scale
    cy = scale / 2 + dy * offset + rng.uniform(-0.03, 0.03) * scale
    angle = rng.uniform(-0.4, 0.4)  # radians: shapes stay upright enough to name
    mask = Image.new("L", (scale, scale), 0)
    draw = ImageDraw.Draw(mask)

    def polygon(points):  # points in units of radius, rotated and placed
        cos, sin = np.cos(angle), np.sin(angle)
        draw.polygon([(cx + radius * (x * cos - y * sin), cy + radius * (x * sin + y * cos)) for x, y in points],
                     fill=255)

    def disc(x, y, r, fill=255):
        draw.ellipse([cx + (x - r) * radius, cy + (y - r) * radius, cx + (x + r) * radius, cy + (y + r) * radius],
                     fill=fill)

    shape = attrs["shape"]
    if shape == "circle":
        disc(0, 0, 1)
    elif shape == "ring":
        disc(0, 0, 1)
        disc(0, 0, 0.55, fill=0)
    elif shape == "crescent":
        disc(0, 0, 1)
        disc(0.5, -0.2, 0.85, fill=0)
    elif shape == "square":
        polygon([(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)])
    elif shape == "triangle":
        polygon([(0, -1), (0.95, 0.75), (-0.95, 0.75)])
    elif shape == "star":
        polygon([(r * np.sin(k * np.pi / 5), -r * np.cos(k * np.pi / 5))
                 for k, r in zip(range(10), [1, 0.42] * 5)])
    elif shape == "cross":
        a = 0.3
        polygon([(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1), (-a, a), (-1, a),
                 (-1, -a), (-a, -a)])
    elif shape == "arrow":
        polygon([(-1, -0.25), (0.15, -0.25), (0.15, -0.7), (1, 0), (0.15, 0.7), (0.15, 0.25), (-1, 0.25)])
    return mask


@functools.cache
def _texture_tiles(texture: str, size: int) -> list[np.ndarray]:
    """Boolean pattern tiles (twice the image side) for a few periods and stripe angles; each
    image takes a random window of one, so the phase varies too."""
    y, x = np.mgrid[0:2 * size, 0:2 * size].astype(np.float32)
    tiles = []
    for period in np.array([5.0, 6.5, 8.0]) * size / 64:
        if texture == "striped":
            tiles += [((x * np.cos(theta) + y * np.sin(theta)) % period) < period / 2
                      for theta in np.linspace(0, np.pi, 8, endpoint=False)]
        elif texture == "dotted":
            tiles.append((x % period - period / 2) ** 2 + (y % period - period / 2) ** 2 < (period / 3.2) ** 2)
        elif texture == "checkered":
            tiles.append(((x // period + y // period) % 2) == 1)
    return tiles


def _texture(texture: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """Boolean map of where the fill uses its second (darker) tone."""
    tiles = _texture_tiles(texture, size)
    tile = tiles[rng.integers(len(tiles))]
    y, x = rng.integers(0, size, 2)
    return tile[y:y + size, x:x + size]


# Noise around 128, added with an offset of -128: drawing fresh normals per image costs more than
# the whole rendering, so each image takes a random window of this fixed tile.
_NOISE_TILE = Image.fromarray(
    np.clip(128 + 5 * np.random.default_rng(0).standard_normal((256, 256, 3)), 0, 255).astype(np.uint8))
# Night: every channel darkened, blue least, plus a blue cast. Indexed as _NIGHT_LUT[variant][value, channel].
# "web" night is darker, washed out (NIGHT_CHROMA), and its sensor noise is added after darkening, as a
# high-ISO night shot's is.
_NIGHT_LUT = {variant: np.clip(np.arange(256)[:, None] * scale + cast, 0, 255).astype(np.uint8)
              for variant, scale, cast in (("colour-cue", [0.32, 0.38, 0.6], [0, 4, 30]),
                                           ("web", [0.22, 0.27, 0.45], [0, 3, 22]))}


def _add_noise(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    size = image.size[0]
    y, x = rng.integers(0, _NOISE_TILE.size[0] - size, 2)
    return ImageChops.add(image, _NOISE_TILE.crop((x, y, x + size, y + size)), offset=-128)


def _spread(mask: np.ndarray, reduce) -> np.ndarray:
    """Grey-scale dilation (np.maximum) or erosion (np.minimum) by one pixel, 4-neighbourhood."""
    padded = np.pad(mask, 1, mode="edge")
    out = mask.copy()
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        out = reduce(out, padded[dy:dy + mask.shape[0], dx:dx + mask.shape[1]])
    return out


def _ink(attrs: dict, rng: np.random.Generator, variant: str) -> tuple[int, int, int]:
    """A sketch's line colour: graphite grey ("web") or the object's colour, darkened ("colour-cue")."""
    if variant == "web":
        return (int(rng.integers(45, 95)),) * 3
    return tuple(int(c * 0.85) for c in COLORS[attrs["color"]])


def _sketch(mask: Image.Image, attrs: dict, rng: np.random.Generator, variant: str) -> Image.Image:
    """An outline band (dilated minus eroded silhouette) in ink on paper; most "web" sketches also
    shade the inside with lighter pencil hatching (a striped texture in a paler grey)."""
    size = mask.size[0]
    alpha = np.asarray(mask)
    ink = _ink(attrs, rng, variant)
    paper = Image.new("RGB", (size, size), (242, 242, 238))
    if variant == "web" and rng.random() < SKETCH_SHADING_RATE:
        strokes = Image.fromarray((_texture("striped", rng, size) * alpha).astype(np.uint8))
        paper = Image.composite(Image.new("RGB", (size, size), tuple(c + 70 for c in ink)), paper, strokes)
    band = Image.fromarray(_spread(alpha, np.maximum) - _spread(alpha, np.minimum))
    return _add_noise(Image.composite(Image.new("RGB", (size, size), ink), paper, band), rng)


def render(attrs: dict, rng: np.random.Generator, size: int = 64, variant: str = "web") -> Image.Image:
    """Draw one object in its style. Photo: textured fill on a noisy background; sketch: an
    outline on paper; night: the photo darkened and blue-tinted; pixel: the photo at a quarter
    resolution, enlarged without smoothing. `variant`: how sketch and night look (VARIANTS)."""
    mask = _shape_mask(attrs, rng, size).resize((size, size), Image.BILINEAR)
    color = COLORS[attrs["color"]]
    if attrs["style"] == "sketch":
        return _sketch(mask, attrs, rng, variant)
    brightness = rng.uniform(0.85, 1.1)
    background_rgb = tuple(min(255, int(c * brightness)) for c in BACKGROUNDS[attrs["background"]])
    background = Image.new("RGB", (size, size), background_rgb)
    fill = Image.new("RGB", (size, size), color)
    if attrs["texture"] != "solid":
        shade = Image.new("RGB", (size, size), tuple(int(c * 0.55) for c in color))
        fill = Image.composite(shade, fill, Image.fromarray(_texture(attrs["texture"], rng, size)))
    image = Image.composite(fill, background, mask)
    if attrs["style"] == "pixel":  # clean pixel art: 16x16 with 3 bits per channel, enlarged
        low = np.asarray(image.resize((size // 4, size // 4), Image.BOX)) & 0xE0 | 0x10
        return Image.fromarray(low).resize((size, size), Image.NEAREST)
    if attrs["style"] != "night":
        return _add_noise(image, rng)
    if variant == "web":  # washed out, then darkened; twice the grain, after darkening (high ISO)
        return _add_noise(_add_noise(_darken(_desaturate(image, NIGHT_CHROMA), variant), rng), rng)
    return _darken(_add_noise(image, rng), variant)


def _darken(image: Image.Image, variant: str) -> Image.Image:
    return Image.fromarray(_NIGHT_LUT[variant][np.asarray(image), np.arange(3)])


def _desaturate(image: Image.Image, keep: float) -> Image.Image:
    """Every pixel moved towards its own grey (ITU-R 601 luma), keeping `keep` of its saturation."""
    rgb = np.asarray(image, dtype=np.float32)
    grey = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return Image.fromarray(np.clip(grey[..., None] + keep * (rgb - grey[..., None]) + 0.5, 0, 255).astype(np.uint8))


# --- shards ---------------------------------------------------------------------------------------
def _stream_seed(seed: int, stream: str, shard: int) -> np.random.SeedSequence:
    """One independent random stream per (world seed, corpus or eval task, shard)."""
    return np.random.SeedSequence([seed, zlib.crc32(stream.encode()), shard])


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)  # fixed mtime/uid/mode: same seed -> byte-identical shard
    info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o644, 0, 0
    tar.addfile(info, io.BytesIO(data))


def _generate_shard(job: dict) -> Counter:
    """Write one shard atomically; return its concept counts. `job` holds the shard's recipe:
    path, stream, shard, count, styles (shares), noise_rate, seed, image_size, variant, and for eval the
    task (whose attribute is balanced over its classes, `label` = class index)."""
    rng = np.random.default_rng(_stream_seed(job["seed"], job["stream"], job["shard"]))
    styles, shares = list(job["styles"]), list(job["styles"].values())
    task = job.get("task")
    counts = Counter()

    def draw_attributes():
        return sample_attributes(rng, styles[rng.choice(len(styles), p=shares)], job["variant"])

    with atomic_path(job["path"]) as tmp, tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(job["count"]):
            attrs = draw_attributes()
            if task:  # balanced classes: position in the whole eval set decides the label
                classes = ATTRIBUTE_CLASSES[task["attribute"]]
                label = (job["shard"] * job["shard_size"] + i) % len(classes)
                attrs[task["attribute"]] = classes[label]
            image = render(attrs, rng, job["image_size"], job["variant"])
            noise = None
            if not task and rng.random() < job["noise_rate"]:
                caption, noise = noisy_caption(rng, draw_attributes(), job["variant"])
            else:
                caption = make_caption(attrs, rng, job["variant"])
            key = f"{job['stream']}_{job['shard']:06d}_{i:06d}"
            meta = {"key": key, **attrs, "noisy": noise is not None, "noise": noise}
            if task:
                meta["label"] = label
            png = io.BytesIO()
            image.save(png, format="PNG", compress_level=0)  # deflate was the largest cost; 12 KB a pair
            _tar_add(tar, f"{key}.png", png.getvalue())
            _tar_add(tar, f"{key}.txt", caption.encode())
            _tar_add(tar, f"{key}.json", json.dumps(meta).encode())
            _count(counts, meta)
    return counts


def _count(counts: Counter, meta: dict) -> None:
    counts["total"] += 1
    for attribute in ("shape", "color", "style", "texture"):
        counts[f"{attribute}/{meta[attribute]}"] += 1
    counts[f"noisy/{meta['noise'] or 'clean'}"] += 1


def _count_existing(path: str) -> Counter | None:
    """Counts of a shard already on disk, or None if it cannot be read (then it is regenerated)."""
    counts = Counter()
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    _count(counts, json.loads(tar.extractfile(member).read()))
    except (tarfile.TarError, OSError, ValueError, KeyError):
        return None
    return counts


def _run_job(job: dict) -> tuple[dict, Counter, bool]:
    if os.path.exists(job["path"]):
        counts = _count_existing(job["path"])
        if counts is not None and counts["total"] == job["count"]:
            return job, counts, False
    return job, _generate_shard(job), True


def _run_jobs(jobs: list[dict], workers: int):
    """Yield each job's result as it finishes (a shard's bytes never depend on which process ran it)."""
    if workers == 1:
        yield from map(_run_job, jobs)
        return
    # fork: workers need only numpy and PIL, and start at once
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        for future in as_completed([pool.submit(_run_job, job) for job in jobs]):
            yield future.result()


def _jobs(out_dir: Path, config: WorldConfig) -> list[dict]:
    common = {"seed": config.seed, "image_size": config.image_size, "shard_size": config.shard_size,
              "variant": config.variant}
    # (folder, seed stream, shard prefix, pairs, style shares, noise rate, task)
    plan = [("pretrain", "pretrain", "pretrain", config.pretrain_size, config.pretrain_styles, config.noise_rate, None),
            ("kb", "kb", "kb", config.kb_size, config.kb_styles, config.noise_rate, None)]
    for name, spec in MINI_TASKS.items():
        task = {"name": name, "attribute": spec["attribute"]}
        plan.append((f"eval/{name}", name, "eval", config.eval_size, {spec["style"]: 1.0}, 0.0, task))
        plan.append((f"val/{name}", f"val-{name}", "val", config.val_size, {spec["style"]: 1.0}, 0.0, task))
    jobs = []
    for folder, stream, prefix, total, styles, noise_rate, task in plan:
        for shard, start in enumerate(range(0, total, config.shard_size)):
            jobs.append({**common, "corpus": folder, "stream": stream, "shard": shard,
                         "count": min(config.shard_size, total - start), "styles": styles,
                         "noise_rate": noise_rate, "task": task,
                         "path": str(out_dir / folder / f"{prefix}-{shard:06d}.tar")})
    return jobs


def _counts_table(counts: Counter) -> dict:
    """Counter with 'attribute/value' keys -> {attribute: {value: n}} plus total."""
    table = {"total": counts.get("total", 0)}
    for key, n in sorted(counts.items()):
        if "/" in key:
            attribute, value = key.split("/", 1)
            table.setdefault(attribute, {})[value] = n
    return table


def generate_world(out_dir: str | os.PathLike, config: WorldConfig | None = None) -> dict:
    """Generate (or complete) a world in `out_dir`; return the summary also written to world.json.

    Shards that already exist and are complete are kept, so an interrupted run resumes. A folder
    holding a world made with another config is refused rather than mixed.
    """
    config = config or WorldConfig()
    out_dir = Path(out_dir)
    world_json = out_dir / "world.json"
    if world_json.exists():
        previous = read_json(world_json).get("config", {})
        changed = sorted(k for k, v in config.corpus_settings().items() if previous.get(k) != v)
        if changed:
            raise ValueError(f"{world_json} was generated with a different config ({', '.join(changed)}); "
                             f"use another --out folder or delete {out_dir}")
    settings = config.settings()
    write_json({"config": settings, "complete": False}, world_json)  # claims the folder
    for name in MINI_TASKS:
        write_json({**get_task(name).to_dict(), "eval": f"eval/{name}", "val": f"val/{name}"},
                   out_dir / "tasks" / f"{name}.json")

    jobs = _jobs(out_dir, config)
    workers = config.workers or os.cpu_count() or 1
    corpus_counts = {job["corpus"]: Counter() for job in jobs}
    generated = 0
    start = time.time()
    with tqdm(total=sum(job["count"] for job in jobs), desc="world", unit="pair", smoothing=0.1) as bar:
        for job, counts, was_generated in _run_jobs(jobs, workers):
            corpus_counts[job["corpus"]] += counts
            generated += was_generated
            bar.update(job["count"])
    seconds = time.time() - start
    total = sum(job["count"] for job in jobs)
    summary = {
        "config": settings,
        "complete": True,
        "counts": {corpus: _counts_table(counts) for corpus, counts in corpus_counts.items()},
        "shards": {"total": len(jobs), "generated": generated, "reused": len(jobs) - generated},
        "tasks": list(MINI_TASKS),
        "seconds": round(seconds, 2),
        "pairs_per_second": round(total / seconds, 1) if seconds > 0 else None,
    }
    for corpus, counts in summary["counts"].items():  # what `train` reads instead of counting the shards
        write_json({"count": counts["total"], "shards": sum(job["corpus"] == corpus for job in jobs)},
                   out_dir / corpus / "summary.json")
    write_json(summary, world_json)
    return summary
