"""A synthetic visual question-answering world with coarse and fine-grained questions.

Every image is a 64 x 64 canvas with one large shape and 2-4 small shapes (colours: red, green, blue, yellow,
purple; kinds: circle, square, triangle). Under every shape a tiny digit (3 x 5 pixels, a bitmap font drawn
here, no system font) is printed, all digits of an image different. Each digit sits alone inside one 8 x 8
patch of the vision tower (the patch below the shape's centre, in the first patch row clear of the shape), so
a digit is always the same pixels within its token: reading it is easy, finding *which* one is asked is not.
Questions come in two kinds, named in each record:

    coarse (one property of the large shape, visible at low resolution)
        colour_large   what colour is the large shape?                      -> red | green | ...
        shape_large    what shape is the large shape?                       -> circle | square | triangle
        side_large     is the large shape on the left or on the right?      -> left | right
    fine (a 3 x 5 pixel detail, or a relation between distant parts of the image)
        number_large   what is the number below the large shape?            -> 0 ... 9
        count_left     how many small shapes are left of the large shape?   -> 0 ... 4

Why the fine ones need the visual tokens to be refined (VISOR's self-attention layers): the digit is only
legible in the full-resolution crops, where nothing tells a token where in the image it is, so finding *the*
digit under the large shape (the small shapes carry digits too) takes a token that looks at its neighbour one
patch row up: visual tokens attending to each other. Cross-attention reads visual tokens that never changed,
and its positional encoding (a kernel-7 convolution along the token sequence) does not reach one row down.
`count_left` compares the position of every small shape with the large one's. The coarse questions need no
relation: the large shape dominates the low-resolution base view.

Records are LLaVA conversation records, the format of `visor_hf.train`:

    {"id": "test-000012", "image": "test/000012.png", "kind": "fine", "family": "number_large",
     "question_families": ["number_large"],
     "conversations": [{"from": "human", "value": "<image>\\nwhat is the number below the large shape?"},
                       {"from": "gpt", "value": "7"}]}

Training records ask `questions_per_image` questions of distinct families about one image (kind and family
"mixed"); the other splits ask one. Everything is a function of (seed, split, index): `random.Random` seeded
with a string is the same on every machine and Python version.

Usage:
    write_world("toy/data", {"train": 2000, "test": 300}, seed=0)          # PNGs + train.jsonl, test.jsonl
    dataset = load_split("toy/data", "test")                               # a datasets.Dataset
    scene = sample_scene(random.Random("demo")); image = render(scene)
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import asdict, dataclass, field

from PIL import Image, ImageDraw

CANVAS = 64
COLOURS = {
    "red": (215, 40, 40), "green": (40, 165, 60), "blue": (45, 85, 215), "yellow": (225, 195, 30),
    "purple": (145, 60, 185),
}
SHAPES = ("circle", "square", "triangle")
COARSE = ("colour_large", "shape_large", "side_large")
FINE = ("number_large", "count_left")
FAMILIES = COARSE + FINE
KIND = {**{f: "coarse" for f in COARSE}, **{f: "fine" for f in FINE}}

# 3 x 5 bitmap digits, rows top to bottom.
DIGITS = {
    "0": ("111", "101", "101", "101", "111"), "1": ("010", "110", "010", "010", "111"),
    "2": ("111", "001", "111", "100", "111"), "3": ("111", "001", "111", "001", "111"),
    "4": ("101", "101", "111", "001", "001"), "5": ("111", "100", "111", "001", "111"),
    "6": ("111", "100", "111", "101", "111"), "7": ("111", "001", "001", "010", "010"),
    "8": ("111", "101", "111", "101", "111"), "9": ("111", "101", "111", "001", "111"),
}
PATCH = 8  # the vision tower's patch size: each digit is drawn inside one patch of the full-resolution crops
DIGIT_OFFSET = (2, 1)  # the digit's top-left pixel inside its patch
# The font stretched to 6 x 8 (columns doubled, rows 0 0 1 1 2 3 3 4), filling the patch's height, at (1, 0).
BIG_DIGITS = {d: tuple("".join(2 * bit for bit in glyph[row * 5 // PATCH]) for row in range(PATCH)) for d, glyph in DIGITS.items()}
BIG_DIGIT_OFFSET = (1, 0)


@dataclass(frozen=True)
class Style:
    """How a world is drawn. The default is the world the kept checkpoint was trained on; issue 16's probes
    (dense LLaVA-OV on `number_large`, README "Toy world") found its 3 x 5 digits never read, even alone in an image:

        glyph         "3x5": the font as is; "6x8": stretched to fill the patch's height (read within 200 steps alone)
        small_digits  "all": a digit under every small shape (4 distractors at most); "one": under one of them
    """

    glyph: str = "3x5"
    small_digits: str = "all"

    def __post_init__(self):
        if self.glyph not in ("3x5", "6x8") or self.small_digits not in ("all", "one"):
            raise ValueError(f"Style(glyph={self.glyph!r}, small_digits={self.small_digits!r}); allowed: glyph '3x5' or "
                             "'6x8', small_digits 'all' or 'one'")

    @property
    def digits(self) -> dict:
        return BIG_DIGITS if self.glyph == "6x8" else DIGITS

    @property
    def offset(self) -> tuple[int, int]:
        return BIG_DIGIT_OFFSET if self.glyph == "6x8" else DIGIT_OFFSET


@dataclass
class Shape:
    colour: str
    kind: str
    x: int  # top-left corner
    y: int
    size: int
    label: str | None = None  # the digit printed below

    @property
    def centre_x(self) -> float:
        return self.x + self.size / 2

    def label_patch(self) -> tuple[int, int]:
        """(column, row) of the patch holding the digit: the patch column of the shape's centre, the first patch
        row entirely below the shape."""
        return int(self.centre_x) // PATCH, -(-(self.y + self.size) // PATCH)

    def box(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) covering the shape and its label's whole patch, exclusive ends."""
        if self.label is None:
            return self.x, self.y, self.x + self.size, self.y + self.size
        column, row = self.label_patch()
        return (min(self.x, column * PATCH), self.y, max(self.x + self.size, (column + 1) * PATCH), (row + 1) * PATCH)


@dataclass
class Scene:
    large: Shape
    small: list[Shape]
    background: tuple[int, int, int] = (245, 245, 245)
    tints: dict = field(default_factory=dict)  # per-shape colour jitter, index -> (dr, dg, db)


def _overlaps(a, b, margin: int) -> bool:
    return not (a[2] + margin <= b[0] or b[2] + margin <= a[0] or a[3] + margin <= b[1] or b[3] + margin <= a[1])


def sample_scene(rng: random.Random, canvas: int = CANVAS, style: Style = Style()) -> Scene:
    """One large shape and 2-4 small shapes, each with a digit below it (all digits different; with
    `style.small_digits == "one"` only the first small shape placed has one), no overlaps.
    Unambiguous by construction: the large shape's centre is not at the image's centre line (left/right), and no
    small shape is horizontally level with the large shape's centre (left of it or not)."""
    while True:
        size = rng.randint(18, 24)
        digits = rng.sample(sorted(DIGITS), 5)
        large = Shape(rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.randint(2, canvas - size - 2),
                      rng.randint(1, canvas - PATCH - size), size, digits[0])
        if abs(large.centre_x - canvas / 2) < 4:
            continue
        small, boxes = [], [large.box()]
        for digit in digits[1 : 1 + rng.randint(2, 4)]:
            if style.small_digits == "one" and small:
                digit = None
            for _ in range(50):
                s = rng.randint(7, 9)
                shape = Shape(rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.randint(1, canvas - s - 1),
                              rng.randint(1, canvas - PATCH - s), s, digit)
                if abs(shape.centre_x - large.centre_x) < 6:
                    continue
                if all(not _overlaps(shape.box(), other, 2) for other in boxes):
                    small.append(shape)
                    boxes.append(shape.box())
                    break
        if len(small) >= 2:
            background = tuple(rng.randint(232, 252) for _ in range(3))
            tints = {i: tuple(rng.randint(-20, 20) for _ in range(3)) for i in range(1 + len(small))}
            return Scene(large, small, background, tints)


def _fill(colour: str, tint) -> tuple[int, int, int]:
    return tuple(max(0, min(255, c + d)) for c, d in zip(COLOURS[colour], tint))


def render(scene: Scene, canvas: int = CANVAS, style: Style = Style()) -> Image.Image:
    image = Image.new("RGB", (canvas, canvas), scene.background)
    draw = ImageDraw.Draw(image)
    for i, shape in enumerate([scene.large, *scene.small]):
        fill = _fill(shape.colour, scene.tints.get(i, (0, 0, 0)))
        x0, y0, x1, y1 = shape.x, shape.y, shape.x + shape.size - 1, shape.y + shape.size - 1
        if shape.kind == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif shape.kind == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)
        if shape.label is not None:
            column, row = shape.label_patch()
            left, top = column * PATCH + style.offset[0], row * PATCH + style.offset[1]
            for dy, row in enumerate(style.digits[shape.label]):
                for dx, bit in enumerate(row):
                    if bit == "1":
                        image.putpixel((left + dx, top + dy), (20, 20, 20))
    return image


# --------------------------------------------------------------------------------------------------
# Questions
# --------------------------------------------------------------------------------------------------


def ask(scene: Scene, family: str, rng: random.Random) -> tuple[str, str]:
    """(question, answer) of `family` about `scene`; every answer is one word."""
    large, small = scene.large, scene.small
    if family == "colour_large":
        return "what colour is the large shape?", large.colour
    if family == "shape_large":
        return "what shape is the large shape?", large.kind
    if family == "side_large":
        return "is the large shape on the left or on the right?", "left" if large.centre_x < CANVAS / 2 else "right"
    if family == "number_large":
        return "what is the number below the large shape?", large.label
    if family == "count_left":
        return "how many small shapes are left of the large shape?", str(sum(s.centre_x < large.centre_x for s in small))
    raise ValueError(f"family={family!r}; allowed: {FAMILIES}")


def vocabulary() -> list[str]:
    """Every word a question, an answer or the chat template of this world uses."""
    words = {"what", "colour", "is", "the", "large", "shape", "?", "on", "or", "right", "number", "below", "how",
             "many", "small", "shapes", "are", "left", "of"}
    words |= set(COLOURS) | set(SHAPES) | set(DIGITS)
    words |= {"system", "user", "assistant", "You", "are", "a", "helpful", "."}  # the chat template's roles and system prompt
    return sorted(words)


def make_record(split: str, index: int, seed: int, families, image_path: str, style: Style = Style()) -> tuple[dict, Image.Image]:
    rng = random.Random(f"visor-toyworld/{seed}/{split}/{index}")
    scene = sample_scene(rng, style=style)
    turns = []
    for i, family in enumerate(families):
        question, answer = ask(scene, family, rng)
        turns += [{"from": "human", "value": ("<image>\n" if i == 0 else "") + question}, {"from": "gpt", "value": answer}]
    single = len(families) == 1
    record = {
        "id": f"{split}-{index:06d}", "image": image_path, "conversations": turns,
        "kind": KIND[families[0]] if single else "mixed", "family": families[0] if single else "mixed",
        "question_families": list(families),
    }
    return record, render(scene, style=style)


def split_records(split: str, num_records: int, seed: int = 0, questions_per_image: int = 1, families=FAMILIES,
                  style: Style = Style()):
    """Yield (record, image) pairs. One question per record cycles through `families` (balanced); several
    questions per record draw distinct families at random."""
    for index in range(num_records):
        if questions_per_image == 1:
            chosen = [families[index % len(families)]]
        else:
            chosen = random.Random(f"visor-toyworld/{seed}/{split}/{index}/families").sample(list(families), questions_per_image)
        yield make_record(split, index, seed, chosen, f"{split}/{index:06d}.png", style)


def write_world(out_dir: str, sizes: dict, seed: int = 0, questions_per_image: dict | None = None,
                style: Style = Style(), families: dict | None = None) -> dict:
    """Write `{split}.jsonl` and `{split}/NNNNNN.png` for each split of `sizes` ({"train": 2000, ...}); `families`
    ({split: (family, ...)}) limits a split's questions (default: all families). Returns {split: path of its jsonl}."""
    questions_per_image, families = questions_per_image or {}, families or {}
    paths = {}
    for split, count in sizes.items():
        os.makedirs(os.path.join(out_dir, split), exist_ok=True)
        path = os.path.join(out_dir, f"{split}.jsonl")
        with open(path, "w") as f:
            for record, image in split_records(split, count, seed, questions_per_image.get(split, 1),
                                               families.get(split, FAMILIES), style):
                image.save(os.path.join(out_dir, record["image"]))
                f.write(json.dumps(record) + "\n")
        paths[split] = path
    with open(os.path.join(out_dir, "world.json"), "w") as f:
        json.dump({"seed": seed, "sizes": sizes, "questions_per_image": questions_per_image, "canvas": CANVAS,
                   "style": asdict(style), "split_families": {k: list(v) for k, v in families.items()},
                   "families": {f: KIND[f] for f in FAMILIES}}, f, indent=1)
    return paths


def load_split(out_dir: str, split: str):
    """A `datasets.Dataset` of one written split (image paths relative to `out_dir`)."""
    from ..training.data import load_records

    return load_records(os.path.join(out_dir, f"{split}.jsonl"))


def in_memory_dataset(split: str, num_records: int, seed: int = 0, questions_per_image: int = 1):
    """A `datasets.Dataset` with the images inside (an `Image` column), for use without files."""
    import datasets

    rows = []
    for record, image in split_records(split, num_records, seed, questions_per_image):
        rows.append({**record, "image": image})
    features = datasets.Features({
        "id": datasets.Value("string"), "image": datasets.Image(),
        "conversations": [{"from": datasets.Value("string"), "value": datasets.Value("string")}],
        "kind": datasets.Value("string"), "family": datasets.Value("string"),
        "question_families": [datasets.Value("string")],
    })
    return datasets.Dataset.from_list(rows, features=features)


def demo_scene() -> Scene:
    """The scene of the demo's default image (fixed seed)."""
    return sample_scene(random.Random("visor-toyworld/demo"))


def describe(scene: Scene) -> dict:
    return asdict(scene)
