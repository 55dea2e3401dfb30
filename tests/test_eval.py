"""eval.py and lmlab/eval/tasks.py: perplexity and token accuracy equal independent manual computations, ROUGE of a
task equals hand-computed values, and eval.py writes eval.json / eval.md."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import REPO, connect, run_script
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from datamodules.pretrain import PretrainDataModule
from datamodules.sft import SFTDataModule
from lmlab.core.models import build_model, export_hf
from lmlab.core.tokenizer import train_bpe
from lmlab.eval import tasks as evaluate
from lmlab.infer.generation import load_for_inference

LINES = [
    "The cat sat on the mat.",
    "A dog ran in the park today.",
    "三加四等于七。",
    "Numbers: 3 + 4 = 7.",
    "What is 5 plus 6? It is 11.",
    "你好，世界。今天北京天气不错。",
]
RECORDS = [
    {"instruction": "What is 3 plus 4?", "output": "It is 7."},
    {"instruction": "Add the two numbers.", "input": "11 + 10", "output": "21"},
    {"instruction": "三加四等于多少？", "output": "等于七。"},
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello there, friend"},
        ]
    },
    {"instruction": "Say something long.", "output": "the cat sat on the mat and the dog ran in the park"},
]


def tiny_hf(folder: Path, model: str = "llama-tiny") -> Path:
    """A random tiny model and a byte-level BPE (chatml template) saved as an HF folder, as a run's hf/ is."""
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                f"model={model}",
                "bpe.vocab_size=400",
                *(["bpe.sentinel_tokens=100"] if model.startswith("t5") else []),
            ],
        )
    tok = train_bpe(LINES * 20, **cfg.bpe, chat_template=cfg.template.chat_template)
    torch.manual_seed(0)
    return export_hf(build_model(cfg.model, tok), tok, folder)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return tiny_hf(tmp_path_factory.mktemp("llama") / "hf")


def task_cfg(**overrides) -> OmegaConf:
    return OmegaConf.create(
        {
            "split": "val",
            "limit": None,
            "batch_size": 3,
            "progress": False,
            "seed": 0,
            "rouge_segmentation": "char",
            "generation": {"max_new_tokens": 4, "do_sample": False},
            **overrides,
        }
    )


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def sft_dm(path: Path, tokenizer, arch: str = "causal") -> SFTDataModule:
    dm = SFTDataModule(train_files=[str(path)], val_files=[str(path)], max_target_length=64)
    return connect(dm, tokenizer, arch=arch, max_length=64, batch_size=3)


def test_perplexity_is_exp_of_the_mean_token_nll_over_the_whole_set(llama_dir, tmp_path):
    model, tok = load_for_inference(llama_dir, "cpu")
    text = tmp_path / "text.txt"
    text.write_text("\n".join(LINES) + "\n", encoding="utf-8")
    seq_len = 8
    dm = PretrainDataModule(train_files=[str(text)], val_files=[str(text)], cache_dir=str(tmp_path / "cache"))
    connect(dm, tok, max_length=seq_len, batch_size=3)
    result = evaluate.task_ppl(task_cfg(batch_size=4), model, tok, dm)

    # Independently: the documents' tokens, each followed by EOS, cut into non-overlapping windows of seq_len + 1
    # (a short tail is left out); per window, -log p(next token) at every position, one window at a time.
    stream = [i for line in LINES for i in tok.encode(line, add_special_tokens=False) + [tok.eos_token_id]]
    windows = [stream[s : s + seq_len + 1] for s in range(0, len(stream) - seq_len, seq_len)]
    assert [w["input_ids"].tolist() for w in dm.val_set] == windows
    assert len(windows) % 4, "the last batch must be partial, so a mean of batch means would differ"
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in windows:
            logits = model(torch.tensor([w[:-1]])).logits[0]
            logp = torch.log_softmax(logits.double(), -1)
            for t, target in enumerate(w[1:]):
                nll -= logp[t, target].item()
                count += 1
    assert result.info["tokens"] == count == len(windows) * seq_len
    assert result.metrics["loss"] == pytest.approx(nll / count, rel=1e-5)
    assert result.metrics["ppl"] == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_sft_loss_and_token_accuracy_equal_a_manual_count(llama_dir, tmp_path):
    model, tok = load_for_inference(llama_dir, "cpu")
    dm = sft_dm(write_jsonl(tmp_path / "sft.jsonl", RECORDS), tok)
    result = evaluate.task_sft(task_cfg(), model, tok, dm)

    # Each sample alone (no padding): position t predicts token t+1, scored only where that token is a label.
    nll, correct, count = 0.0, 0, 0
    with torch.no_grad():
        for sample in dm.val_set:
            ids, labels = sample["input_ids"], sample["labels"]
            logits = model(ids[None, :-1]).logits[0].double()
            for t in range(len(ids) - 1):
                if labels[t + 1] != -100:
                    nll -= torch.log_softmax(logits[t], -1)[labels[t + 1]].item()
                    correct += int(logits[t].argmax() == labels[t + 1])
                    count += 1
    assert count == sum(int((s["labels"] != -100).sum()) - int(s["labels"][0] != -100) for s in dm.val_set)
    assert result.info == {"items": len(RECORDS), "tokens": count, "skipped": {}}
    assert result.metrics["loss"] == pytest.approx(nll / count, rel=1e-5)
    assert result.metrics["acc"] == correct / count


def test_t5_sft_loss_is_token_weighted_over_the_decoder_labels(tmp_path):
    model, tok = load_for_inference(tiny_hf(tmp_path / "t5", "t5-tiny"), "cpu")
    dm = sft_dm(write_jsonl(tmp_path / "sft.jsonl", RECORDS), tok, arch="seq2seq")
    result = evaluate.task_sft(task_cfg(), model, tok, dm)
    total, count = 0.0, 0
    with torch.no_grad():
        for sample in dm.val_set:  # the model's own mean loss per sample, weighted by its label count
            n = len(sample["labels"])
            total += model(input_ids=sample["input_ids"][None], labels=sample["labels"][None]).loss.item() * n
            count += n
    assert result.info["tokens"] == count
    assert result.metrics["loss"] == pytest.approx(total / count, rel=1e-4)


def script_replies(monkeypatch, replies: dict[str, str]) -> list[str]:
    """generate_texts replaced by a fixed reply per user turn (chatml prompts); returns the prompts it is given."""
    seen: list[str] = []

    def scripted(model, tokenizer, prompts, settings, batch_size=8):
        seen.extend(prompts)
        return [replies[p.split("<|user|>\n")[1].split("\n")[0]] for p in prompts]

    monkeypatch.setattr(evaluate, "generate_texts", scripted)
    return seen


def test_rouge_task_on_chinese_pairs_equals_hand_computed_values(llama_dir, tmp_path, monkeypatch):
    records = [{"instruction": "天气", "output": "今天北京天气不错"}, {"instruction": "问候", "output": "你好世界"}]
    seen = script_replies(monkeypatch, {"天气": "北京天气很好", "问候": "你好世界"})
    _, tok = load_for_inference(llama_dir, "cpu")
    result = evaluate.task_rouge(task_cfg(), None, tok, sft_dm(write_jsonl(tmp_path / "s.jsonl", records), tok))
    # 北京天气很好 vs 今天北京天气不错 (see tests/test_rouge.py): rouge1 4/7, rouge2 1/2, rougeL 4/7; 你好世界 exact: 1.
    assert result.metrics == {
        "rouge1": pytest.approx((4 / 7 + 1) / 2),
        "rouge2": pytest.approx((1 / 2 + 1) / 2),
        "rougeL": pytest.approx((4 / 7 + 1) / 2),
    }
    assert result.info["rouge_segmentation"] == "char" and result.info["items"] == 2
    assert seen[0] == "<|user|>\n天气\n<|assistant|>\n"  # the prompt is rendered with the tokenizer's template
    assert [r["output"] for r in result.rows] == ["北京天气很好", "你好世界"]


def test_wrong_kind_of_preset_is_a_clear_error(llama_dir, tmp_path):
    model, tok = load_for_inference(llama_dir, "cpu")
    with pytest.raises(ValueError, match="task=ppl reads text.*SFTDataModule"):
        evaluate.task_ppl(task_cfg(), model, tok, sft_dm(write_jsonl(tmp_path / "s.jsonl", RECORDS), tok))


@pytest.mark.slow
def test_eval_py_writes_eval_json_md_and_a_wandb_run(llama_dir, tmp_path):
    data = write_jsonl(tmp_path / "sft.jsonl", RECORDS)
    out = tmp_path / "out"
    proc = run_script(
        "eval.py",
        f"run={llama_dir}",
        "task=sft",
        "data=sample_sft",
        f"data.train_files=[{data}]",
        f"data.val_files=[{data}]",
        "seq_len=64",
        f"out_dir={out}",
        f"paths.cache_dir={tmp_path}/c",
    )
    record = json.loads((out / "eval.json").read_text())
    assert set(record) == {"task", "run", "data", "metrics", "items", "tokens", "skipped", "timestamp", "lmlab_commit"}
    assert record["task"] == "sft" and record["items"] == len(RECORDS)
    assert record["data"] == {
        "preset": "sample_sft",
        "split": "val",
        "files": [str(data)],
        "limit": None,
        "seq_len": 64,
    }
    assert set(record["metrics"]) == {"loss", "ppl", "acc"}
    assert record["metrics"]["ppl"] == pytest.approx(math.exp(record["metrics"]["loss"]))
    assert "| ppl |" in (out / "eval.md").read_text() and "| ppl |" in proc.stdout
    assert list((out / "wandb").glob("offline-run-*")), "the metrics go to an (offline) wandb run"


def test_chat_task_scores_distinct_2_and_loops_of_replies_to_fixed_prompts(llama_dir, tmp_path, monkeypatch):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("中国的首都是哪里？\n\n你是谁？\n", encoding="utf-8")
    seen = script_replies(monkeypatch, {"中国的首都是哪里？": "北京。", "你是谁？": "我是我是我是我是"})
    _, tok = load_for_inference(llama_dir, "cpu")
    result = evaluate.task_chat(task_cfg(prompts=str(prompts), template={"chat_template": None}), None, tok, None)
    assert seen == ["<|user|>\n中国的首都是哪里？\n<|assistant|>\n", "<|user|>\n你是谁？\n<|assistant|>\n"]
    # bigrams: 北京 京。 | 我是 是我 我是 是我 我是 是我 我是: 4 distinct of 9
    assert result.metrics == {"distinct2": pytest.approx(4 / 9), "loop_share": 0.5, "mean_chars": 5.5}
    assert [r["loop"] for r in result.rows] == [False, True] and result.rows_file == "replies.jsonl"
