"""Write the bundled sample data in data/sample/ (deterministic: same seed, same bytes).

Small English and Chinese texts and instruction pairs built from templates, so the embedded
default run (`python train.py`) trains on something learnable in a few CPU minutes:
arithmetic facts, counting stories, word reversal, and multi-turn chats about them, plus
SMS-like ham/spam messages for stage=classify.

    python scripts/make_sample_data.py [--out data/sample]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

ZH_DIGITS = "零一二三四五六七八九十"
NAMES_EN = ["Alice", "Bob", "Carol", "Dave", "Erin", "Frank", "Grace", "Heidi"]
NAMES_ZH = ["小明", "小红", "小刚", "小丽", "老王", "阿强", "小芳", "大伟"]
THINGS_EN = ["apples", "books", "cats", "pens", "cups", "stones", "shells", "coins"]
THINGS_ZH = [("个", "苹果"), ("本", "书"), ("只", "猫"), ("支", "笔"), ("个", "杯子"), ("块", "石头"), ("枚", "硬币")]
WORDS = ["apple", "river", "stone", "light", "green", "table", "music", "water", "cloud", "house", "bread", "smile"]
PLACES_EN = ["the market", "the park", "school", "the river", "the library", "the garden"]
PLACES_ZH = ["市场", "公园", "学校", "河边", "图书馆", "花园"]


def zh_number(n: int) -> str:
    """Chinese numeral for 0..99."""
    if n <= 10:
        return ZH_DIGITS[n]
    tens, ones = divmod(n, 10)
    head = "十" if tens == 1 else ZH_DIGITS[tens] + "十"
    return head + (ZH_DIGITS[ones] if ones else "")


def english_doc(rng: random.Random) -> str:
    name, thing, place = rng.choice(NAMES_EN), rng.choice(THINGS_EN), rng.choice(PLACES_EN)
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    return rng.choice(
        [
            f"{name} has {a} {thing}. {name} finds {b} more {thing} at {place}, so now {name} has {a + b} {thing}.",
            f"The sum of {a} and {b} is {a + b}. The product of {a} and {b} is {a * b}.",
            f"{name} walked to {place} and counted {a} {thing} on the way there and {b} on the way back: "
            f"{a + b} in all.",
            f"In the morning {name} went to {place}. There were {a} {thing} on the table and {b} under it.",
            f"{a} plus {b} equals {a + b}, and {a + b} minus {b} equals {a}.",
        ]
    )


def chinese_doc(rng: random.Random) -> str:
    name, (unit, thing), place = rng.choice(NAMES_ZH), rng.choice(THINGS_ZH), rng.choice(PLACES_ZH)
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    za, zb, zs = zh_number(a), zh_number(b), zh_number(a + b)
    return rng.choice(
        [
            f"{name}有{za}{unit}{thing}，在{place}又找到{zb}{unit}，现在一共有{zs}{unit}{thing}。",
            f"{za}加{zb}等于{zs}。{za}乘{zb}等于{zh_number(a * b)}。",
            f"早上{name}去了{place}，路上看见{za}{unit}{thing}，回来时又看见{zb}{unit}，一共{zs}{unit}。",
            f"{zs}减{zb}等于{za}，{za}加{zb}等于{zs}。",
        ]
    )


def alpaca_record(rng: random.Random) -> dict:
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    word = rng.choice(WORDS)
    return rng.choice(
        [
            {"instruction": "Add the two numbers.", "input": f"{a} + {b}", "output": str(a + b)},
            {"instruction": "Reverse the letters of the word.", "input": word, "output": word[::-1]},
            {"instruction": f"What is {a} plus {b}?", "input": "", "output": f"{a} plus {b} is {a + b}."},
            {
                "instruction": "计算两个数的和。",
                "input": f"{zh_number(a % 10)}加{zh_number(b % 10)}",
                "output": zh_number(a % 10 + b % 10),
            },
            {
                "instruction": f"{zh_number(a % 10)}乘{zh_number(b % 10)}等于多少？",
                "input": "",
                "output": f"等于{zh_number((a % 10) * (b % 10))}。",
            },
        ]
    )


def chat_record(rng: random.Random) -> dict:
    a, b, c = rng.randint(1, 9), rng.randint(1, 9), rng.randint(2, 3)
    if rng.random() < 0.5:
        return {
            "messages": [
                {"role": "system", "content": "You are a careful calculator."},
                {"role": "user", "content": f"What is {a} plus {b}?"},
                {"role": "assistant", "content": f"{a + b}."},
                {"role": "user", "content": f"And that times {c}?"},
                {"role": "assistant", "content": f"{(a + b) * c}."},
            ]
        }
    return {
        "conversations": [
            {"from": "human", "value": f"{zh_number(a)}加{zh_number(b)}等于多少？"},
            {"from": "gpt", "value": f"等于{zh_number(a + b)}。"},
            {"from": "human", "value": f"再乘{zh_number(c)}呢？"},
            {"from": "gpt", "value": f"等于{zh_number((a + b) * c)}。"},
        ]
    }


def preference_record(rng: random.Random) -> dict:
    """A DPO pair: the right answer (or a polite one, as GPT2-SFT's data) chosen, a wrong or rude one rejected."""
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    wrong = a + b + rng.choice([-3, -2, -1, 1, 2, 3])
    return rng.choice(
        [
            {
                "instruction": f"What is {a} plus {b}?",
                "input": "",
                "chosen": f"{a} plus {b} is {a + b}.",
                "rejected": f"{a} plus {b} is {wrong}.",
            },
            {
                "instruction": "Add the two numbers.",
                "input": f"{a} + {b}",
                "chosen": str(a + b),
                "rejected": str(wrong),
            },
            {
                "prompt": f"{zh_number(a % 10)}加{zh_number(b % 10)}等于多少？",
                "chosen": f"等于{zh_number(a % 10 + b % 10)}。",
                "rejected": f"等于{zh_number((a % 10 + b % 10 + 1) % 19)}。",
            },
            {
                "instruction": f"Please tell me what {a} plus {b} is.",
                "input": "",
                "chosen": f"Of course! {a} plus {b} is {a + b}.",
                "rejected": f"Figure it out yourself. It is {a + b}.",
            },
        ]
    )


def message_record(rng: random.Random) -> tuple[str, str]:
    """An SMS-like (label, text) pair, three ham to one spam: spam offers prizes and asks for a call or a reply."""
    name, place, thing = rng.choice(NAMES_EN), rng.choice(PLACES_EN), rng.choice(THINGS_EN)
    hour, amount, code = rng.randint(1, 12), rng.choice([100, 250, 500, 1000, 2000]), rng.randint(10000, 99999)
    if rng.random() < 0.25:
        return "spam", rng.choice(
            [
                f"WINNER! You have won a {amount} pound prize. Call 0906{code} now to claim, T&C apply.",
                f"Free entry: text WIN to {code} for a chance of {amount} {thing}. Reply STOP to end.",
                f"URGENT! Your mobile number has been awarded {amount} pounds. Call 0871{code} before {hour}pm.",
                f"Congratulations, you are selected for a free holiday. Send YES to {code} to claim your prize.",
            ]
        )
    return "ham", rng.choice(
        [
            f"Are you coming to {place} later? {name} will be there at {hour}.",
            f"Hey, can you bring the {thing} tomorrow? Thanks!",
            f"Sorry I missed your call, I was at {place}. Call you back at {hour}.",
            f"{name} says hi. We are meeting at {place} around {hour}, text me when you are free.",
            f"Ok, I will pick up {amount % 9 + 1} {thing} on the way home.",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "data" / "sample"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    (out / "pretrain_en.txt").write_text("\n".join(english_doc(rng) for _ in range(3000)) + "\n", encoding="utf-8")
    (out / "pretrain_zh.txt").write_text("\n".join(chinese_doc(rng) for _ in range(3000)) + "\n", encoding="utf-8")
    for name, make, n in (("sft_alpaca.jsonl", alpaca_record, 2000), ("sft_chat.jsonl", chat_record, 600)):
        lines = (json.dumps(make(rng), ensure_ascii=False) for _ in range(n))
        (out / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    rng = random.Random(args.seed + 1)  # its own stream, so the files above stay as they were
    lines = (json.dumps(preference_record(rng), ensure_ascii=False) for _ in range(1200))
    (out / "preference.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    rng = random.Random(args.seed + 2)
    (out / "messages.tsv").write_text(
        "".join("\t".join(message_record(rng)) + "\n" for _ in range(800)), encoding="utf-8"
    )
    print(f"wrote sample data to {out}")


if __name__ == "__main__":
    main()
