"""A synthetic visual question-answering world with coarse and fine-grained questions.

Every image is a 64 x 64 canvas with one large shape and 2-4 small shapes (colours: red, green, blue, yellow,
purple; kinds: circle, square, triangle), drawn here with PIL. Questions come in two kinds, named in each record:

    coarse (one property of the large shape, visible at low resolution)
        colour_large   what colour is the large shape?                      -> red | green | ...
        shape_large    what shape is the large shape?                       -> circle | square | triangle
        side_large     is the large shape on the left or on the right?      -> left | right
    fine (a relation between distant parts of the image)
        count_left     how many small shapes are left of the large shape?   -> 0 ... 4
        count_above    how many small shapes are above the large shape?     -> 0 ... 4

Why the fine ones need the visual tokens to be refined (VISOR's self-attention layers): a fine answer compares the
position of every small shape with the large one's. A visual token describes one 8 x 8 patch and its position inside
its own crop only (the toy LLaVA-OneVision reads its SigLIP's patch embeddings, see `model.py`); where a patch lies in
the image follows from its place in the token sequence, row after row, which visual tokens attending to each other
can read. Cross-attention reads visual tokens that never changed, and its positional encoding (a kernel-7
convolution along the token sequence) does not reach from one shape to another. The coarse questions need no
relation: the large shape dominates the low-resolution base view.

(Earlier worlds had a third fine family, `number_large`: a 3 x 5 or 6 x 8 pixel digit printed below each shape, and
"what is the number below the large shape?". The dense baseline never learned it next to the other questions; even
alone it stalled at about 70 % with one distractor digit: README / BENCHMARKS.md, "Toy world: can the dense baseline
learn every family?". `count_above` replaced it.)

Records are LLaVA conversation records, the format of `visor_hf.train`:

    {"id": "test-000012", "image": "test/000012.png", "kind": "fine", "family": "count_left",
     "question_families": ["count_left"],
     "conversations": [{"from": "human", "value": "<image>\\nhow many small shapes are left of the large shape?"},
                       {"from": "gpt", "value": "2"}]}

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
FINE = ("count_left", "count_above")
FAMILIES = COARSE + FINE
KIND = {**{f: "coarse" for f in COARSE}, **{f: "fine" for f in FINE}}

COUNTS = ("0", "1", "2", "3", "4")  # the fine questions' answers
SEPARATION = 6  # pixels between a small shape's centre and the large one's, across and down: no relation is a tie


@dataclass
class Shape:
    colour: str
    kind: str
    x: int  # top-left corner
    y: int
    size: int

    @property
    def centre_x(self) -> float:
        return self.x + self.size / 2

    @property
    def centre_y(self) -> float:
        return self.y + self.size / 2

    def box(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1), exclusive ends."""
        return self.x, self.y, self.x + self.size, self.y + self.size


@dataclass
class Scene:
    large: Shape
    small: list[Shape]
    background: tuple[int, int, int] = (245, 245, 245)
    tints: dict = field(default_factory=dict)  # per-shape colour jitter, index -> (dr, dg, db)


def _overlaps(a, b, margin: int) -> bool:
    return not (a[2] + margin <= b[0] or b[2] + margin <= a[0] or a[3] + margin <= b[1] or b[3] + margin <= a[1])


def sample_scene(rng: random.Random, canvas: int = CANVAS) -> Scene:
    """One large shape and 2-4 small shapes, no overlaps. Unambiguous by construction: the large shape's centre is
    not at the image's centre line (left/right), and every small shape's centre is at least `SEPARATION` pixels
    from the large one's, across and down (left of it or not, above it or not)."""
    while True:
        size = rng.randint(18, 24)
        large = Shape(rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.randint(2, canvas - size - 2),
                      rng.randint(1, canvas - size - 1), size)
        if abs(large.centre_x - canvas / 2) < 4:
            continue
        small, boxes = [], [large.box()]
        for _ in range(rng.randint(2, 4)):
            for _ in range(50):
                s = rng.randint(7, 9)
                shape = Shape(rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.randint(1, canvas - s - 1),
                              rng.randint(1, canvas - s - 1), s)
                if min(abs(shape.centre_x - large.centre_x), abs(shape.centre_y - large.centre_y)) < SEPARATION:
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


def render(scene: Scene, canvas: int = CANVAS) -> Image.Image:
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
    if family == "count_left":
        return "how many small shapes are left of the large shape?", str(sum(s.centre_x < large.centre_x for s in small))
    if family == "count_above":
        return "how many small shapes are above the large shape?", str(sum(s.centre_y < large.centre_y for s in small))
    raise ValueError(f"family={family!r}; allowed: {FAMILIES}")


def vocabulary() -> list[str]:
    """Every word a question, an answer or the chat template of this world uses."""
    words = {"what", "colour", "is", "the", "large", "shape", "?", "on", "or", "right", "how", "many", "small", "shapes",
             "are", "left", "of", "above"}
    words |= set(COLOURS) | set(SHAPES) | set(COUNTS)
    words |= {"system", "user", "assistant", "You", "are", "a", "helpful", "."}  # the chat template's roles and system prompt
    return sorted(words)


def make_record(split: str, index: int, seed: int, families, image_path: str) -> tuple[dict, Image.Image]:
    rng = random.Random(f"visor-toyworld/{seed}/{split}/{index}")
    scene = sample_scene(rng)
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
    return record, render(scene)


def split_records(split: str, num_records: int, seed: int = 0, questions_per_image: int = 1, families=FAMILIES):
    """Yield (record, image) pairs. One question per record cycles through `families` (balanced); several
    questions per record draw distinct families at random."""
    for index in range(num_records):
        if questions_per_image == 1:
            chosen = [families[index % len(families)]]
        else:
            chosen = random.Random(f"visor-toyworld/{seed}/{split}/{index}/families").sample(list(families), questions_per_image)
        yield make_record(split, index, seed, chosen, f"{split}/{index:06d}.png")


def write_world(out_dir: str, sizes: dict, seed: int = 0, questions_per_image: dict | None = None,
                families: dict | None = None) -> dict:
    """Write `{split}.jsonl` and `{split}/NNNNNN.png` for each split of `sizes` ({"train": 2000, ...}); `families`
    ({split: (family, ...)}) limits a split's questions (default: all families). Returns {split: path of its jsonl}."""
    questions_per_image, families = questions_per_image or {}, families or {}
    paths = {}
    for split, count in sizes.items():
        os.makedirs(os.path.join(out_dir, split), exist_ok=True)
        path = os.path.join(out_dir, f"{split}.jsonl")
        with open(path, "w") as f:
            for record, image in split_records(split, count, seed, questions_per_image.get(split, 1),
                                               families.get(split, FAMILIES)):
                image.save(os.path.join(out_dir, record["image"]))
                f.write(json.dumps(record) + "\n")
        paths[split] = path
    with open(os.path.join(out_dir, "world.json"), "w") as f:
        json.dump({"seed": seed, "sizes": sizes, "questions_per_image": questions_per_image, "canvas": CANVAS,
                   "split_families": {k: list(v) for k, v in families.items()},
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
