"""tiktoken as the second engine of a byte-level BPE: the same ids as tokenizers on real text, on every assigned
code point and on the cases it hands back; refused, with the reason, where it would differ."""

from __future__ import annotations

import copy
import logging
import sys
import unicodedata

import numpy as np
import pytest
import tiktoken
from conftest import REPO, SHARED_DATA, connect
from hydra import compose, initialize_config_dir
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers

from datamodules.pretrain import PretrainDataModule
from datamodules.shards import ShardWriter, _tokenizers_encode, make_encoder, plan_shards, token_dtype
from lmlab.core.tiktoken_twin import NoTwin, TiktokenTwin
from lmlab.core.tokenizer import byte_pieces_regex, train_bpe

EDGES = [
    "",
    "the <|endoftext|> inside a document, and <|user|> too",  # added tokens: split out by tokenizers
    "an unassigned code point \U000e0080 and a new emoji \U0001fae8",  # not in Python 3.11's Unicode 14 tables
    "   leading spaces,\n\n\ttabs \r\n and trailing   ",
    "1234567890 ١٢٣٤ ⅷ ²³ 3.14159 -42 +7",
    "!!!??? ... —— 《》「」 $$$ +=<>^`|~ @#%&*",
    "中华人民共和国成立于一九四九年十月一日北京是首都上海是最大的城市" * 3,  # a Han run far past 16 characters
    "mixed汉字and英文words混合123数字ABC",
    "emoji 😀😀😀👍🏽 and ZWJ 👨‍👩‍👧 and flags 🇨🇳",
    "Ελληνικά, русский, עברית, العربية, हिन्दी, 日本語のかな, 한국어",
    "a" * 300 + " " + "é" * 50 + "\u0301\u0301",
]


def corpus() -> list[str]:
    """About 600 KB of the shared Chinese and English text, a line a document, and the edge cases."""
    wiki, shakespeare = SHARED_DATA / "zh_wiki_sampled" / "zhwiki_sampled.txt", SHARED_DATA / "tinyshakespeare"
    if not wiki.exists() or not shakespeare.exists():
        pytest.skip("../shared/data is not beside this checkout")
    lines = wiki.read_text().splitlines()[:1500]
    lines += (shakespeare / "input.txt").read_text()[:100_000].split("\n\n")
    return [*lines, *EDGES]


@pytest.fixture(scope="module")
def trained() -> Tokenizer:
    """A byte-level BPE as lmlab trains it (conf/bpe/byte.yaml, 2,000 tokens) on the first lines of the corpus."""
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        settings = dict(compose("train").bpe)
    settings.update(vocab_size=2000, sentinel_tokens=0)
    return train_bpe(corpus()[:1000], **settings).backend_tokenizer


def hf_ids(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in tokenizer.encode_batch_fast(texts, add_special_tokens=False)]


def test_the_twin_gives_the_tokenizers_ids_on_real_text_and_takes_most_of_it(trained):
    texts = corpus()
    twin = TiktokenTwin(trained)
    assert [ids.tolist() for ids in twin.encode_batch(texts)] == hf_ids(trained, texts)
    handed_back = [text for text in texts if twin.for_tokenizer(text)]
    assert handed_back == EDGES[1:3], "only the added tokens' and the unassigned character's documents go back"
    split = ["half an added token <|endof", "text|> across two texts"]  # the batch goes the per-text way
    assert [ids.tolist() for ids in twin.encode_batch(split)] == hf_ids(trained, split)


@pytest.mark.slow  # ~10 s: 145k texts through both engines
def test_every_assigned_code_point_in_context_gets_the_same_ids():
    """The two regex engines' Unicode tables: every code point Python's tables assign (but private use), between
    letters, digits, punctuation and spaces, where a character class that differed would cut other pieces. The BPE
    joins every two bytes (65,536 merges), so other pieces give other ids (a real vocabulary often hides a cut)."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = byte_level_bpe([(x, y) for x in alphabet for y in alphabet])
    points = [chr(c) for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c)) not in ("Cn", "Cs", "Co")]
    texts = [f"a{c}b {c}1{c}.{c}{c}\n" for c in points]
    ours = TiktokenTwin(tokenizer).encode_batch(texts)
    theirs = hf_ids(tokenizer, texts)
    differing = [p for p, a, b in zip(points, ours, theirs, strict=True) if a.tolist() != b]
    assert len(points) > 100_000 and differing == []
    cut = tokenizer.encode("a\u4e2db", add_special_tokens=False).ids  # a Han character is a letter: one piece
    assert cut != hf_ids(tokenizer, ["a"])[0] + hf_ids(tokenizer, ["\u4e2d"])[0] + hf_ids(tokenizer, ["b"])[0]


def byte_level_bpe(merges: list[tuple[str, str]], pattern: str | None = None, **options) -> Tokenizer:
    """A byte-level BPE with the given merges over the 256 bytes, pre-tokenized as lmlab's are (or by ``pattern``);
    ``options`` go to the BPE model."""
    vocab = {char: i for i, char in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, **options))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern or byte_pieces_regex(True, True, 16)), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    return tokenizer


def test_a_token_its_merges_do_not_reach_is_refused_where_tiktoken_would_differ():
    """ "abc" is made from ("ab", "c"), but tokenizers joins "bc" first and then has no merge for ("a", "bc");
    tiktoken would join "a" + "bc" all the same, because their bytes make a token."""
    tokenizer = byte_level_bpe([("b", "c"), ("a", "b"), ("ab", "c")])
    with pytest.raises(NoTwin, match="1 merged tokens do not encode to themselves, e.g. 'abc'"):
        TiktokenTwin(tokenizer)
    vocab = tokenizer.get_vocab()
    ranks = {bytes([b]): b for b in range(256)} | {b"bc": 256, b"ab": 257, b"abc": 258}
    naive = tiktoken.Encoding(
        "naive", pat_str=byte_pieces_regex(True, True, 16), mergeable_ranks=ranks, special_tokens={}
    )
    assert tokenizer.encode("xabcx").ids == [vocab["x"], vocab["a"], vocab["bc"], vocab["x"]]
    assert naive.encode_ordinary("xabcx") == [ord("x"), 258, ord("x")]  # the difference the check guards against


@pytest.mark.parametrize(
    "tokenizer, reason",
    [
        (lambda: byte_level_bpe([("a", "b")]), None),  # twinnable as it is
        (lambda: with_(byte_level_bpe([("a", "b")]), normalizer=normalizers.NFKC()), "it has a normalizer"),
        (
            lambda: with_(byte_level_bpe([("a", "b")]), pre_tokenizer=pre_tokenizers.ByteLevel(add_prefix_space=False)),
            "not one regex",
        ),
        (lambda: byte_level_bpe([("a", "b")], pattern="[a-z]+"), "not one of lmlab's byte-level regexes"),
        (lambda: byte_level_bpe([("a", "b")], pattern=r"ab$|[\s\S]"), "not one of lmlab's byte-level regexes"),
        (
            lambda: with_(byte_level_bpe([("a", "b")]), model=models.WordPiece({"a": 0, "[UNK]": 1})),
            "model is WordPiece",
        ),
        (lambda: byte_level_bpe([("a", "b")], dropout=0.1), "sets dropout=0.1"),
        (lambda: byte_level_bpe([("a", "b")], ignore_merges=True), "sets ignore_merges=True"),
        (lambda: byte_level_bpe([("a", "b")], byte_fallback=True), "sets byte_fallback=True"),
        (lambda: byte_level_bpe([("b", "c"), ("a", "bc"), ("ab", "c"), ("a", "b")]), "do not each make a token"),
        (
            lambda: with_(byte_level_bpe([]), model=models.BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")])),
            "254 of the 256 bytes are not in its vocabulary",
        ),
    ],
)
def test_a_tokenizer_tiktoken_cannot_run_exactly_is_refused_with_the_reason(tokenizer, reason):
    if reason is None:
        TiktokenTwin(tokenizer())
        return
    with pytest.raises(NoTwin, match=reason):
        TiktokenTwin(tokenizer())


def with_(tokenizer: Tokenizer, **parts) -> Tokenizer:
    """``tokenizer`` with some of its parts replaced (normalizer, pre_tokenizer, model)."""
    for name, part in parts.items():
        setattr(tokenizer, name, part)
    return tokenizer


def test_the_tokenizers_truncation_and_padding_settings_change_neither_engine(trained):
    """transformers leaves truncation on in the backend after a truncating call: data preparation encodes whole
    documents all the same, with either engine."""
    text = corpus()[0]
    whole = hf_ids(trained, [text])[0]
    truncating = copy.deepcopy(trained)
    truncating.enable_truncation(3)
    truncating.enable_padding(length=len(whole) + 5)
    for engine in ("tiktoken", "tokenizers"):
        assert list(make_encoder(truncating, engine)([text])[0]) == whole


def test_auto_falls_back_to_tokenizers_and_says_why_while_an_explicit_tiktoken_fails(trained, caplog):
    other = with_(byte_level_bpe([("a", "b")]), normalizer=normalizers.NFKC())
    with caplog.at_level(logging.INFO, logger="datamodules.shards"):
        assert make_encoder(other, "auto").func is _tokenizers_encode  # functools.partial over the tokenizer
        assert "tiktoken would not give the same ids: it has a normalizer" in caplog.text
        assert isinstance(make_encoder(trained, "auto").__self__, TiktokenTwin)
    assert make_encoder(trained, "tokenizers").func is _tokenizers_encode
    with pytest.raises(ValueError, match="tokenize_engine=tiktoken: no exact tiktoken twin .*normalizer"):
        make_encoder(other, "tiktoken")
    with pytest.raises(ValueError, match="tokenize_engine='tiktok': one of auto, tiktoken, tokenizers"):
        make_encoder(trained, "tiktok")


@pytest.mark.parametrize("num_proc", [0, 1])
def test_both_engines_write_the_same_shard_bytes(trained, tmp_path, num_proc):
    """The same files from either engine, in this process and in a worker; documents longer than chunk_chars in
    pieces as well."""
    docs = [("train", "zh", text) for text in corpus()[:400]] + [("val", "zh", text) for text in EDGES]
    eos, dtype = trained.token_to_id("<|endoftext|>"), token_dtype(trained.get_vocab_size())
    files = {}
    for engine in ("tiktoken", "tokenizers"):
        writer = ShardWriter(tmp_path / engine, make_encoder(trained, engine), eos, dtype, num_proc, chunk_chars=500)
        rows = writer.write(plan_shards(docs, 20_000), total_bytes=1)
        files[engine] = {row["file"]: (tmp_path / engine / row["file"]).read_bytes() for row in rows}
    assert len(files["tiktoken"]) > 3 and files["tiktoken"] == files["tokenizers"]
    first = np.frombuffer(files["tiktoken"]["train-00000.bin"], dtype=dtype)
    assert (first == eos).sum() > 10


def test_the_datamodule_takes_the_engine_from_its_config(tmp_path, tiny_tokenizer, caplog, monkeypatch):
    """data.tokenize_engine reaches the shard writer: the same cache folder and token files either way, and an
    explicit tiktoken refuses a tokenizer it cannot twin before it reads any data."""
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(corpus()[:200]) + "\n")

    def prepared(engine: str, tokenizer=tiny_tokenizer) -> PretrainDataModule:
        dm = PretrainDataModule(train_files=[str(path)], cache_dir=str(tmp_path / engine), tokenize_engine=engine)
        connect(dm, tokenizer, max_length=8)
        dm.prepare_data()
        return dm

    with caplog.at_level(logging.INFO, logger="datamodules.shards"):
        fast, plain = prepared("tiktoken"), prepared("tokenizers")
    assert "tokenize engine: tiktoken" in caplog.text
    assert fast.token_dir.name == plain.token_dir.name
    files = [{p.name: p.read_bytes() for p in sorted(dm.token_dir.glob("*.bin"))} for dm in (fast, plain)]
    assert files[0] and files[0] == files[1]
    gpt2_style = copy.deepcopy(tiny_tokenizer)
    gpt2_style.backend_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    monkeypatch.setattr(PretrainDataModule, "_plan", lambda self: pytest.fail("read the data before refusing"))
    with pytest.raises(ValueError, match="tokenize_engine=tiktoken: no exact tiktoken twin"):
        prepared("tiktoken", gpt2_style)
