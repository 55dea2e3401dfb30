"""Preference data from a model's own samples (generate.py task=rejected, lmlab/infer/rejected.py)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import REPO, compose_cfg, greedy, run_script
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig

import lmlab.infer.rejected as rejected_mod
from datamodules.formats import DataError
from lmlab.core.models import build_model
from lmlab.infer.rejected import RejectedSettings, build_rejected, degenerate, too_similar
from train import train


def chat(question: str, answer: str, system: str | None = None) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": question},
        {"role": "assistant", "content": answer},
    ]


RECORDS = [
    ("a.jsonl", 1, chat("What is 3 plus 4?", "It is 7.")),
    ("a.jsonl", 2, chat("What is 5 plus 6?", "It is 11.", system="Be brief.")),
    (
        "a.jsonl",
        3,
        [
            *chat("What is 4 plus 2?", "6."),
            {"role": "user", "content": "And times 2?"},
            {"role": "assistant", "content": "12."},
        ],
    ),
    ("b.jsonl", 1, chat("三加四等于多少？", "等于七。")),
    ("b.jsonl", 2, chat("Add the two numbers.", "3 + 4 = 7")),
    ("b.jsonl", 3, chat("你好", "你好，世界。")),
]
NO_MODEL = torch.nn.Identity()  # for tests with a scripted generate_texts (build_rejected only calls .eval())
GREEDY = greedy(max_new_tokens=6)
BATCH_2 = RejectedSettings(batch_size=2)


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture
def tiny_model(tmp_path, tiny_tokenizer):
    torch.manual_seed(0)
    return build_model(compose_cfg(tmp_path, []).model, tiny_tokenizer), tiny_tokenizer


@pytest.fixture
def scripted(monkeypatch):
    """generate_texts replaced by a reply chosen by the prompt's last user turn; records the prompts it saw."""
    replies = {
        "What is 3 plus 4?": "It is  7.",  # the chosen answer: too_similar
        "What is 5 plus 6?": "好的好的好的好的好的好的",  # degenerate: repetition
        "And times 2?": "   ",  # degenerate: empty
        "三加四等于多少？": "等于八。我不太确定。",
        "Add the two numbers.": "I cannot add numbers.",
        "你好": "Hello there, how are you today?",
    }
    seen: list[str] = []

    def fake(model, tokenizer, prompts, settings, batch_size=8):
        seen.extend(prompts)
        out = []
        for p in prompts:
            # the prompt's last user turn (chatml: <|user|>\n<content>\n)
            last_user = p.rsplit("<|user|>\n", 1)[1].split("\n", 1)[0]
            out.append(replies[last_user])
        return out

    monkeypatch.setattr(rejected_mod, "generate_texts", fake)
    return seen


def test_degenerate_flags_empty_and_loops_only():
    for fine in (
        "The capital of France is Paris, a city on the Seine.",
        "北京是中国的首都，也是一座历史悠久的城市。",
        "12.",
        "6",
        "14 plus 15 is 29.",
        "ha ha",
        "1000000",
    ):
        assert degenerate(fine) is None, fine
    for loop in ("好的好的好的好的好的好的", "the the the the the the", "!!!!!!!!!!!!", "ok ok ok ok ok ok ok"):
        assert degenerate(loop) == "repetition", loop
    assert degenerate("") == "empty" and degenerate(" \n\t ") == "empty"
    # the parameters are the rule: a stricter share lets a loop through, longer n-grams catch longer loops
    assert degenerate("the the the the the the", max_ngram_share=0.95) is None
    loop = "I am a bot. " * 4
    assert degenerate(loop) is None and degenerate(loop, ngram_sizes=[12]) == "repetition"


def test_too_similar_compares_after_whitespace_normalisation():
    assert too_similar("It is  7.\n", "It is 7.", 0.9)
    assert too_similar("The answer is 29.", "The answer is 28.", 0.9)
    assert not too_similar("The answer is 29.", "The answer is 28.", 1.0)
    assert not too_similar("I cannot add numbers.", "3 + 4 = 7", 0.9)
    assert not too_similar("", "等于七。", 0.9)


def test_build_rejected_with_a_tiny_model_writes_pairs(tmp_path, tiny_model):
    model, tokenizer = tiny_model
    sample = {**GREEDY, "do_sample": True}  # an untrained model's greedy reply is a run of newlines
    out = tmp_path / "rej.jsonl"
    torch.manual_seed(0)
    meta = build_rejected(
        model, tokenizer, RECORDS, out, sample, RejectedSettings(batch_size=4), progress=False, info={"run": "tiny"}
    )
    rows = read_rows(out)
    assert meta["total"] == len(RECORDS) == meta["kept"] + sum(meta["dropped"].values())
    assert meta["kept"] == len(rows) > 0
    assert json.loads((tmp_path / "rej.jsonl.meta.json").read_text()) == meta and meta["run"] == "tiny"
    by_key = {(s, n): m for s, n, m in RECORDS}
    for row in rows:
        assert set(row) == {"messages", "chosen", "rejected", "source", "line"}
        messages = by_key[row["source"], row["line"]]
        assert row["messages"] == messages[:-1] and row["messages"][-1]["role"] == "user"
        assert row["chosen"] == messages[-1]["content"] and row["rejected"].strip()
    # the samples are what generate_texts makes of the rendered prompts, batch by batch
    prompts = [tokenizer.apply_chat_template(m[:-1], tokenize=False, add_generation_prompt=True) for *_, m in RECORDS]
    torch.manual_seed(0)
    samples = dict(
        zip(by_key, rejected_mod.generate_texts(model, tokenizer, prompts, sample, batch_size=4), strict=True)
    )
    assert all(row["rejected"] == samples[row["source"], row["line"]] for row in rows)
    # greedy: nothing but newlines, so every sample is dropped as empty
    meta = build_rejected(
        model, tokenizer, RECORDS, tmp_path / "greedy.jsonl", GREEDY, RejectedSettings(batch_size=4), progress=False
    )
    assert meta["kept"] == 0 and meta["dropped"] == {"degenerate: empty": len(RECORDS)}


def test_drops_are_counted_by_reason(tmp_path, scripted):
    records = [
        *RECORDS,
        ("c.jsonl", 1, [{"role": "user", "content": "no answer"}]),
        ("c.jsonl", 2, DataError("c.jsonl", 2, "missing or empty", field="output")),
    ]
    out = tmp_path / "rej.jsonl"
    meta = build_rejected(
        NO_MODEL, _Tok(), records, out, GREEDY, RejectedSettings(batch_size=3, on_error="skip"), progress=False
    )
    assert meta["dropped"] == {"too_similar": 1, "degenerate: repetition": 1, "degenerate: empty": 1, "bad record": 2}
    assert meta["kept"] == 3 and meta["total"] == 8
    assert [(r["source"], r["line"]) for r in read_rows(out)] == [("b.jsonl", 1), ("b.jsonl", 2), ("b.jsonl", 3)]
    assert "c.jsonl:2: field 'output': missing or empty" in meta["this_run"]["bad_record_examples"]
    done = [json.loads(line) for line in (tmp_path / "rej.jsonl.done").read_text().splitlines()]
    assert Counter(d["status"] for d in done) == Counter(
        {"kept": 3, "too_similar": 1, "degenerate: repetition": 1, "degenerate: empty": 1, "bad record": 2}
    )
    with pytest.raises(DataError, match="no assistant turn"):
        build_rejected(
            NO_MODEL,
            _Tok(),
            records,
            tmp_path / "strict.jsonl",
            GREEDY,
            RejectedSettings(on_error="raise"),
            progress=False,
        )


def test_resume_never_duplicates_rows(tmp_path, scripted):
    out = tmp_path / "rej.jsonl"
    keys = [(s, n) for s, n, _ in RECORDS]
    # an interrupted first run: the first 4 records only
    first = build_rejected(
        NO_MODEL, _Tok(), RECORDS, out, GREEDY, RejectedSettings(batch_size=2, limit=4), progress=False
    )
    assert first["total"] == 4
    # a crash after a batch's rows were written but before its done-keys were, with a torn row at the end
    done_path = tmp_path / "rej.jsonl.done"
    done_path.write_text("".join(done_path.read_text().splitlines(keepends=True)[:-1]))
    with open(out, "a", encoding="utf-8") as f:
        f.write('{"messages": [{"role": "us')
    n_prompts = len(scripted)
    full = build_rejected(NO_MODEL, _Tok(), RECORDS, out, GREEDY, BATCH_2, progress=False)
    rows = read_rows(out)
    assert Counter((r["source"], r["line"]) for r in rows) == Counter(
        {("b.jsonl", 1): 1, ("b.jsonl", 2): 1, ("b.jsonl", 3): 1}
    )
    assert len(scripted) == n_prompts + 2  # only b.jsonl:2 and b.jsonl:3 were new
    assert full["total"] == len(keys) and full["this_run"]["already_done"] == 4 and full["kept"] == 3
    done = [json.loads(line) for line in done_path.read_text().splitlines()]
    assert sorted((d["source"], d["line"]) for d in done) == sorted(keys)  # every key once
    # a second full rerun adds nothing and generates nothing
    again = build_rejected(NO_MODEL, _Tok(), RECORDS, out, GREEDY, BATCH_2, progress=False)
    assert read_rows(out) == rows and len(scripted) == n_prompts + 2
    assert again["this_run"]["total"] == 0 and again["total"] == full["total"] and again["kept"] == 3


def test_a_crash_mid_run_loses_only_the_unwritten_batch(tmp_path, monkeypatch):
    calls = []

    def flaky(model, tokenizer, prompts, settings, batch_size=8):
        calls.append(len(prompts))
        if len(calls) == 2:
            raise RuntimeError("CUDA out of memory")
        return [f"sample {len(calls)}.{i}, nothing like the answer" for i in range(len(prompts))]

    monkeypatch.setattr(rejected_mod, "generate_texts", flaky)
    out = tmp_path / "rej.jsonl"
    with pytest.raises(RuntimeError):
        build_rejected(NO_MODEL, _Tok(), RECORDS, out, GREEDY, BATCH_2, progress=False)
    assert len(read_rows(out)) == 2
    meta = build_rejected(NO_MODEL, _Tok(), RECORDS, out, GREEDY, BATCH_2, progress=False)
    assert meta["kept"] == len(read_rows(out)) == len(RECORDS) and meta["this_run"]["already_done"] == 2
    assert sorted((r["source"], r["line"]) for r in read_rows(out)) == sorted((s, n) for s, n, _ in RECORDS)


class _Tok:
    """The chatml template's rendering, enough for build_rejected when generate_texts is scripted."""

    chat_template = "chatml"

    @staticmethod
    def apply_chat_template(messages, chat_template=None, tokenize=False, add_generation_prompt=True):
        return "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages) + "<|assistant|>\n"


def test_config_composes_the_data_presets(tmp_path):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("generate", overrides=["run=/runs/sft", "prompt=hi"], return_hydra_config=True)
        assert cfg.task == "reply" and cfg.hydra.run.dir == "." and cfg.hydra.output_subdir is None
        cfg = compose(
            "generate", overrides=["task=rejected", "run=/runs/sft", "data=zh_alpaca"], return_hydra_config=True
        )
    HydraConfig.instance().set_config(cfg)  # as @hydra.main does: ${hydra:runtime.choices.data} is the preset
    try:
        assert cfg.out == "/runs/sft/rejected/zh_alpaca.jsonl"
    finally:
        HydraConfig.instance().cfg = None
    assert cfg.on_error == "skip"  # the preset's: 4 records of zh_alpaca have an empty output
    assert cfg.data.train_files[0].endswith("zh_alpaca_instruction/zh-data-part-00.first5000.json")
    assert cfg.similarity_threshold == 0.9 and cfg.limit is None and cfg.generation.max_new_tokens


def test_generate_reads_records_through_the_preset_format(tmp_path):
    import generate

    path = tmp_path / "d.jsonl"
    path.write_text(
        '{"instruction": "Say hi.", "output": "Hi."}\n{"instruction": "x", "output": ""}\nnot json\n'
        '{"prompt": "p", "response": "r"}\n',
        encoding="utf-8",
    )
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("generate", overrides=["task=rejected", "run=x", f"data.train_files=[{path}]"])
    from datamodules.formats import SkipCounter

    skips = SkipCounter()
    items = list(generate.conversations(cfg.data, "skip", skips))
    assert [(n, type(m).__name__) for _, n, m in items] == [(1, "list"), (2, "DataError"), (4, "list")]
    assert skips.total == 1  # the malformed line
    with pytest.raises(DataError, match="malformed JSON"):
        list(generate.conversations(cfg.data, "raise", SkipCounter()))


def test_settings_come_from_the_config_and_are_checked():
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("generate", overrides=["task=rejected", "run=x", "data=zh_alpaca", "limit=3"])
    settings = RejectedSettings.from_config(cfg)
    assert settings == RejectedSettings(
        batch_size=8,
        similarity_threshold=0.9,
        degenerate={"ngram_sizes": [3, 4, 5], "max_ngram_share": 0.5, "min_repeats": 3},
        limit=3,
        on_error="skip",  # the preset's data.on_error
    )
    with pytest.raises(TypeError):
        settings.degenerate["min_repeats"] = 2  # read-only, like the settings themselves
    with pytest.raises(ValueError, match="on_error='ignore': choose raise or skip"):
        RejectedSettings(on_error="ignore")
    with pytest.raises(ValueError, match="batch_size=0: must be at least 1"):
        RejectedSettings(batch_size=0)


@pytest.mark.slow
def test_generate_task_rejected_end_to_end(tmp_path):
    """generate.py task=rejected (the CLI) on an SFT run, and its pairs trained on by DPO as they are. The two runs
    train in this process (train.py's CLI is tests/test_cli.py's), in a run folder where train.py would put it."""
    common = [
        "max_steps=4",
        "trainer.val_check_interval=4",
        "trainer.limit_val_batches=1",
        "callbacks.samples.num_prompts=0",
    ]
    sft = tmp_path / "outputs" / "sft" / "llama-tiny" / "run"
    train(compose_cfg(sft, ["stage=sft", *common]))
    out = tmp_path / "rej.jsonl"
    args = [
        "generate.py",
        "task=rejected",
        f"run={sft}",
        "data=sample_sft",
        "limit=6",
        "generation=sample",
        "generation.max_new_tokens=8",
        "batch_size=4",
        f"out={out}",
    ]
    proc = run_script(*args)
    meta = json.loads(out.with_name("rej.jsonl.meta.json").read_text())
    rows = read_rows(out)
    assert meta["total"] == 6 and meta["kept"] == len(rows) and f"wrote {len(rows)} pairs" in proc.stdout
    for row in rows:
        assert row["messages"][-1]["role"] == "user" and row["chosen"] and row["rejected"].strip()
        assert row["source"].endswith("sft_alpaca.jsonl") and 1 <= row["line"] <= 6
    assert meta["generation"]["do_sample"] and meta["generation"]["max_new_tokens"] == 8
    assert not (sft / "rejected").exists() and not (tmp_path / "outputs" / "generate").exists()
    assert rows, "seeded sampling keeps some pairs"
    # the written pairs are DPO data as they are: the chain SFT -> rejected samples -> DPO
    dpo = tmp_path / "outputs" / "dpo" / "llama-tiny" / "run"
    train(
        compose_cfg(
            dpo, ["stage=dpo", f"init_from={sft}", f"data.train_files=[{out}]", f"data.val_files=[{out}]", *common]
        )
    )
    assert (dpo / "hf" / "model.safetensors").is_file()
