"""BPE training (conf/bpe): normalization, pre-tokenization, special tokens, saving, long lines, byte budget, report."""

from __future__ import annotations

import copy
import json
import random
import re
import unicodedata

import pytest
from conftest import REPO, run_script, template
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from tokenizers import Regex, decoders, pre_tokenizers
from transformers import AutoTokenizer

from lmlab.core.tokenizer import CorpusStream, build_pre_tokenizer, train_bpe, train_bpe_with_report

SAMPLE = [REPO / "data" / "sample" / "pretrain_en.txt", REPO / "data" / "sample" / "pretrain_zh.txt"]
NUMBERS = ["2024年12月31日，价格是12345元。", "Call 0123 456 789 at 10:30, room 2048."] * 50


def settings(level: str, **overrides) -> dict:
    """conf/bpe/<level>.yaml as train_bpe's keyword arguments."""
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"bpe={level}"])
    return {**OmegaConf.to_container(cfg.bpe, resolve=True), **overrides}


def sample_texts() -> list[str]:
    return [line for path in SAMPLE for line in path.read_text(encoding="utf-8").splitlines()] + NUMBERS


@pytest.fixture(scope="module")
def char_tokenizer():
    return train_bpe(sample_texts(), **settings("char", vocab_size=600))


@pytest.fixture(scope="module")
def byte_tokenizer():
    return train_bpe(sample_texts(), **settings("byte", vocab_size=600))


@pytest.fixture(scope="module", params=["char", "byte"])
def tokenizer(request):
    """The char or byte tokenizer above (trained once), as a copy of its own: a test may change it."""
    return copy.deepcopy(request.getfixturevalue(f"{request.param}_tokenizer"))


def ids(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("level", ["char", "byte"])
def test_nfkc_maps_full_width_to_half_width(level):
    tok = train_bpe(sample_texts(), **settings(level, vocab_size=600, nfkc=True))
    assert ids(tok, "ＡＢＣ１２３，ｈｅｌｌｏ") == ids(tok, "ABC123,hello")


def test_no_token_holds_two_digits(tokenizer):
    digits_per_token = [len(re.findall(r"\d", tokenizer.decode([i]))) for i in range(len(tokenizer))]
    assert max(digits_per_token) == 1
    pieces = [tokenizer.decode([i]) for i in ids(tokenizer, "price 12345")]
    assert [p for p in pieces if re.search(r"\d", p)] == ["1", "2", "3", "4", "5"]


def test_char_level_pieces_carry_metaspace(char_tokenizer):
    text = "the cat 早上 小红去了图书馆"
    tokens = char_tokenizer.tokenize(text)
    assert tokens[0].startswith("▁") and any(t.startswith("▁") and len(t) > 1 for t in tokens[1:])
    assert not any(" " in t for t in tokens)  # spaces live in "▁"
    assert char_tokenizer.decode(ids(char_tokenizer, text)) == text
    assert ids(char_tokenizer, "早上龘")[-1] == char_tokenizer.unk_token_id  # outside the alphabet: unknown


def test_byte_level_round_trips_any_unicode(byte_tokenizer):
    texts = [
        "emoji 🧪👩‍👩‍👧 ok",
        "ＡＢＣ１２３ full width",
        "e\u0301 combining, Ελληνικά, العربية",
        "𠀀𪚥 rare CJK",
        "tabs\tand  two spaces\n\nnew lines",
        "混合 text 123 和 ！？…",
    ]
    for text in texts:
        encoded = ids(byte_tokenizer, text)
        assert byte_tokenizer.unk_token_id not in encoded
        assert byte_tokenizer.decode(encoded) == text


def test_special_tokens_stay_whole(tokenizer):
    for special in ["<|bos|>", "<|endoftext|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>"]:
        special_id = tokenizer.convert_tokens_to_ids(special)
        assert ids(tokenizer, special) == [special_id]
        assert ids(tokenizer, f"你好{special}hello 123").count(special_id) == 1


def test_saved_folder_loads_and_encodes_identically(tokenizer, tmp_path):
    tokenizer.chat_template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    texts = ["Hello world, 2024!", "这是一个测试。<|user|>你好<|endoftext|>", "ＡＢＣ１２３ 🧪"]
    assert loaded(texts)["input_ids"] == tokenizer(texts)["input_ids"]
    assert [loaded.decode(ids(loaded, t)) for t in texts] == [tokenizer.decode(ids(tokenizer, t)) for t in texts]
    messages = [{"role": "user", "content": "三加四？"}, {"role": "assistant", "content": "七。"}]
    assert loaded.apply_chat_template(messages) == tokenizer.apply_chat_template(messages)
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token) == ("<|bos|>", "<|endoftext|>", "<|pad|>")


@pytest.mark.parametrize("level", ["char", "byte"])
def test_one_megabyte_line_is_cut_into_short_pieces(level):
    rng = random.Random(0)
    phrases = ["今天天气很好", "我们一起去公园散步", "他说这本书非常有意思", "山上有一座古老的寺庙", "春天来了"]
    line = "".join(rng.choice(phrases) for _ in range(120_000))[: 1_000_000 // 3]  # ~1 MB, no space or punctuation
    cap = settings(level)["max_piece_chars"]
    tok = train_bpe([line], **settings(level, vocab_size=400, min_frequency=2, heldout_every=10**9))
    pieces = [p for p, _ in tok.backend_tokenizer.pre_tokenizer.pre_tokenize_str(line[:10_000])]
    longest_token = max(len(tok.decode([i])) for i in range(len(tok)) if i not in tok.all_special_ids)
    assert max(len(p) for p in pieces) <= cap * (3 if level == "byte" else 1) + 1  # byte level: 3 bytes a character
    assert longest_token <= cap  # merges never cross a cut, so no token grows past it
    assert len(pieces) >= 10_000 / cap  # (uncut, the line is one piece: training on it takes minutes, not seconds)


def pieces(pre_tokenizer, text: str) -> list[str]:
    """The pieces, as text (byte level's printable stand-ins decoded one piece at a time)."""
    as_text = decoders.ByteLevel()
    return [as_text.decode([p]) for p, _ in pre_tokenizer.pre_tokenize_str(text)]


def sequence_before(split_punctuation: bool, split_digits: bool, max_piece_chars: int | None):
    """The byte level's pre-tokenizer before the one regex: a sequence of four."""
    steps = [pre_tokenizers.Punctuation(behavior="isolated")] if split_punctuation else []
    steps += [pre_tokenizers.Digits(individual_digits=True)] if split_digits else []
    if max_piece_chars:
        steps.append(pre_tokenizers.Split(Regex(rf"\s*\S{{1,{max_piece_chars}}}"), behavior="isolated"))
    return pre_tokenizers.Sequence([*steps, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])


PIECE_TEXTS = [
    "Hello world, it's 2024!  Done.\n\n  next\tline  ",
    "这是一个测试。三加四等于七！他说：“好的”",
    "价格：$12.50 (约￥90) a+b=c; x<y>z ^_^ `code` a|b ~",
    "ＡＢＣ１２３ 🧪 e=mc² naïve café ½",
    "a" * 40 + " " + "汉" * 40 + "\n" + "12345678901234567890",
    "line one\r\nline two   \nwe'll they've I'm",
    "x\u3000y  z\u00a0w --- ... !!!",
    "a $$ ++ << == >> || ~~ ^^ `` @@ ## %% && ** __ -- ;; !?",  # runs of ASCII punctuation, a space before each
]


@pytest.mark.parametrize(
    "split_punctuation, split_digits, max_piece_chars",
    [(True, True, 16), (True, False, 8), (True, True, None), (False, False, None)],  # the last: GPT-2's regex
)
def test_byte_level_cuts_as_the_sequence_it_replaced_in_one_regex(split_punctuation, split_digits, max_piece_chars):
    """Byte level's pieces are one regex now (tokenizers cuts text faster, and an engine that takes one regex, like
    tiktoken, can give the same tokens: benchmarks/tokenizer_engines.py), and cut text as the sequence of
    pre-tokenizers it replaced did: English, Chinese, ASCII and Unicode punctuation, digits, long runs, whitespace."""
    one = build_pre_tokenizer("byte", split_punctuation, split_digits, True, max_piece_chars)
    assert [step["type"] for step in json.loads(one.__getstate__())["pretokenizers"]] == ["Split", "ByteLevel"]
    before = sequence_before(split_punctuation, split_digits, max_piece_chars)
    for text in PIECE_TEXTS:
        assert pieces(one, text) == pieces(before, text), text


def test_byte_level_cuts_runs_of_letters_at_the_cap_of_letters():
    """Where the two differ: a run of non-space characters mixing categories (letters and symbols; punctuation too
    without split_punctuation) longer than the cap. The sequence cut the run at 16 characters, one regex cuts each
    category's run at 16 (14 of 19,355 Chinese documents tokenize otherwise)."""
    text = "★★★" + "汉" * 20
    assert pieces(build_pre_tokenizer("byte", True, True, True, 16), text) == ["★★★", "汉" * 16, "汉" * 4]
    assert pieces(sequence_before(True, True, 16), text) == ["★★★", "汉" * 13, "汉" * 7]
    one = build_pre_tokenizer("byte", False, True, True, 4)
    assert pieces(one, "测试。三加四等于七！he's") == ["测试", "。", "三加四等", "于七", "！", "he", "'s"]


def test_byte_budget_reads_about_that_many_bytes_spread_evenly():
    docs = [f"文档{i:05d}：" + "内容" * (i % 50 + 10) for i in range(5000)]
    total = sum(len(d.encode()) for d in docs)
    budget = total // 4
    kept = list(CorpusStream(docs, max_bytes=budget, total_bytes=total, heldout_every=10**9, heldout_bytes=0))
    kept_bytes = sum(len(d.encode()) for d in kept)
    assert budget - 400 <= kept_bytes <= budget + 400  # within about one document of the budget
    positions = [int(d[2:7]) for d in kept]
    assert positions[0] < 50 and positions[-1] > 4900  # from the whole corpus, not its first quarter
    assert 0.2 < len(kept) / len(docs) < 0.3

    _, report = train_bpe_with_report(
        iter(docs), total_bytes=total, **settings("char", vocab_size=300, max_bytes=budget, heldout_every=10**9)
    )
    assert budget - 400 <= report["train_bytes"] <= budget + 400


@pytest.mark.slow
def test_prepare_cli_saves_folder_and_report(tmp_path):
    out = tmp_path / "tok"
    proc = run_script(
        "prepare.py",
        "task=tokenizer",
        "data=sample_text",
        "bpe=char",
        "bpe.vocab_size=600",
        f"out={out}",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    report = json.loads((out / "report.json").read_text())
    assert '"chars_per_token"' in proc.stdout  # the report is printed too
    assert report["vocab_size"] == 600 and report["level"] == "char"
    assert 1.0 < report["chars_per_token"] < 10 and 0.0 <= report["unk_share"] < 0.05
    assert report["heldout_docs"] > 0 and report["train_bytes"] > 100_000
    assert report["train_seconds"] > 0 and report["peak_rss_mb"] > 50
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == 600 and tok.chat_template == template("chatml")
    assert "chat_template" in json.loads((out / "tokenizer_config.json").read_text())
    assert tok.tokenize("这是 一个")[0].startswith("▁")


def test_char_level_keeps_line_breaks_it_never_saw_in_training():
    """Pretraining corpora hold one document per line, so "\\n" is never in the training text; chat layouts and
    answers need it anyway (it used to become unk and decode to nothing)."""
    one_line_docs = ["人类：请列出三种水果。助手：1. 苹果 2. 香蕉 3. 橙子", "Tabs, spaces and lines: a b c."] * 30
    tok = train_bpe(one_line_docs, **settings("char", vocab_size=300))
    assert not any("\n" in doc or "\t" in doc for doc in one_line_docs)
    for layout in ("\n", "\t", "\r"):
        assert ids(tok, "a" + layout) == [*ids(tok, "a"), tok.convert_tokens_to_ids(layout)]
        assert tok.convert_tokens_to_ids(layout) != tok.unk_token_id
    text = "人类：请列出三种水果\n助手：1. 苹果\n2. 香蕉\n\n3.\t橙子\r\na\nb"
    encoded = ids(tok, text)
    assert tok.unk_token_id not in encoded
    assert tok.decode(encoded) == unicodedata.normalize("NFKC", text)  # the decoder keeps every line break
    assert tok.decode(ids(tok, "a\nb")) == "a\nb"
    assert "\n" in tok.tokenize("水果\n助手") and not any(len(t) > 1 and "\n" in t for t in tok.tokenize(text))


def test_char_level_reads_other_whitespace_as_a_space():
    tok = train_bpe(["a b c 苹果 香蕉"] * 30, **settings("char", vocab_size=200, nfkc=False))
    for space in ("\u3000", "\xa0", "\u2003", "\u2028", "\v", "\f"):
        assert ids(tok, f"a{space}b") == ids(tok, "a b"), repr(space)
