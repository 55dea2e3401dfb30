"""Write the generated image question set of stage=vlm (data=shapes): coloured shapes, Chinese and English questions.

Each scene is a small picture (32x32 by default) on a 2x2 grid: one to three shapes of one kind (circle, square,
triangle) and one colour (red, green, blue, yellow) in distinct cells, jittered in place and size. Each record asks
one question about it, in Chinese or English, of one of four types:

    color     图中的形状是什么颜色？ / What color are the shapes?       红色 / red          (chance 1/4)
    shape     图中是什么形状？ / What shape is shown?                   圆形 / circle       (chance 1/3)
    count     图中有几个形状？ / How many shapes are there?              两个 / two          (chance 1/3)
    position  形状在左边还是右边？ / Is the shape on the left or right?  左边 / left         (chance 1/2; one shape)

A record is ``{"image": <PNG bytes>, "messages": [user, assistant], "type": <question type>}`` in parquet, the
user turn starting with the ``<image>`` placeholder (LLaVA's layout). Train and val scenes are drawn from separate
seeds, so validation pictures are new scenes (a few coincide with a training picture by chance: 14 of the default
400, asked other questions there). Deterministic: same arguments, same records.

    python scripts/make_shapes.py [--out data/shapes] [--train 4000] [--val 400] [--size 32] [--seed 0] [--types ...]
"""

from __future__ import annotations

import argparse
import io
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

COLORS = {  # name -> (RGB, Chinese)
    "red": ((220, 40, 40), "红色"),
    "green": ((40, 170, 60), "绿色"),
    "blue": ((40, 80, 220), "蓝色"),
    "yellow": ((230, 200, 30), "黄色"),
}
SHAPES = {"circle": "圆形", "square": "正方形", "triangle": "三角形"}
COUNTS = {1: ("one", "一个"), 2: ("two", "两个"), 3: ("three", "三个")}
SIDES = {"left": "左边", "right": "右边"}
QUESTIONS = {  # type -> (English phrasings, Chinese phrasings)
    "color": (
        ["What color are the shapes?", "What color is the shape in the picture?"],
        ["图中的形状是什么颜色？", "图里的图形是什么颜色的？"],
    ),
    "shape": (["What shape is shown?", "Which shape do you see?"], ["图中是什么形状？", "图里画的是什么图形？"]),
    "count": (
        ["How many shapes are there?", "Count the shapes in the picture."],
        ["图中有几个形状？", "图里有几个图形？"],
    ),
    "position": (
        ["Is the shape on the left or the right?", "Which side is the shape on, left or right?"],
        ["形状在左边还是右边？", "图形在图的哪一边，左边还是右边？"],
    ),
}
IMAGE_TOKEN = "<image>"
BACKGROUND = (245, 245, 240)


def draw(kind: str, color: tuple[int, int, int], cells: list[int], size: int, rng: random.Random) -> bytes:
    """A PNG of shapes of one ``kind`` and ``color`` in grid ``cells`` (0..3: top-left, top-right, bottom-left,
    bottom-right), each jittered within its cell."""
    image = Image.new("RGB", (size, size), BACKGROUND)
    pen = ImageDraw.Draw(image)
    half = size // 2
    for cell in cells:
        extent = rng.randint(int(half * 0.55), int(half * 0.85))
        x0 = (cell % 2) * half + rng.randint(0, half - extent)
        y0 = (cell // 2) * half + rng.randint(0, half - extent)
        box = [x0, y0, x0 + extent - 1, y0 + extent - 1]
        if kind == "circle":
            pen.ellipse(box, fill=color)
        elif kind == "square":
            pen.rectangle(box, fill=color)
        else:
            pen.polygon([(x0 + extent // 2, y0), (box[2], box[3]), (x0, box[3])], fill=color)
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=False)
    return out.getvalue()


def scene_record(size: int, rng: random.Random, types: tuple[str, ...] = tuple(QUESTIONS)) -> dict:
    """One scene and one question about it, of one of ``types`` that fits the scene, in Chinese or English."""
    kind, color = rng.choice(list(SHAPES)), rng.choice(list(COLORS))
    count = 1 if set(types) == {"position"} else rng.randint(1, 3)  # a side is asked of one shape
    cells = rng.sample(range(4), count)
    qtype = rng.choice([t for t in types if t != "position" or count == 1])
    zh = rng.random() < 0.5
    question = rng.choice(QUESTIONS[qtype][1 if zh else 0])
    side = "left" if cells[0] % 2 == 0 else "right"
    answer = {
        "color": COLORS[color][1] if zh else color,
        "shape": SHAPES[kind] if zh else kind,
        "count": COUNTS[count][1 if zh else 0],
        "position": SIDES[side] if zh else side,
    }[qtype]
    return {
        "image": draw(kind, COLORS[color][0], cells, size, rng),
        "messages": [
            {"role": "user", "content": f"{IMAGE_TOKEN}\n{question}"},
            {"role": "assistant", "content": answer},
        ],
        "type": qtype,
    }


def make(n: int, size: int, seed: int, types: tuple[str, ...] = tuple(QUESTIONS)) -> list[dict]:
    """``n`` records of questions of ``types``."""
    unknown = set(types) - set(QUESTIONS)
    if unknown:
        raise ValueError(f"unknown question types {sorted(unknown)}; choose from {list(QUESTIONS)}")
    rng = random.Random(seed)
    return [scene_record(size, rng, types) for _ in range(n)]


def write(records: list[dict], path: Path) -> None:
    pq.write_table(pa.Table.from_pylist(records), path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "data" / "shapes")
    parser.add_argument("--train", type=int, default=4000)
    parser.add_argument("--val", type=int, default=400)
    parser.add_argument("--size", type=int, default=32, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0, help="train scenes; val scenes use seed + 1")
    parser.add_argument("--types", nargs="+", default=list(QUESTIONS), help="question types to ask")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name, n, seed in (("train", args.train, args.seed), ("val", args.val, args.seed + 1)):
        write(make(n, args.size, seed, tuple(args.types)), args.out / f"{name}.parquet")
        print(f"wrote {n} records to {args.out / f'{name}.parquet'}")


if __name__ == "__main__":
    main()
