"""The offline CLIP tokenizer (parity with open_clip) and hand-token tagging."""
from __future__ import annotations

import json

import pytest

from generator import tagging
from generator.tagging import hand_token_indices
from generator.text import clip_tokenizer_folder, load_clip_tokenizer


@pytest.fixture(autouse=True, scope="module")
def _cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ATTENTIONHAND_CACHE", str(tmp_path_factory.getbasetemp() / "ah_cache"))
        yield


PROMPTS = [
    "A man unscrewing a bottle with both hands.",
    "Two HANDS making a heart-shaped gesture; fingers crossed!!",
    "café naïve 123 don't_stop",
    "",
    "a " + "very " * 90 + "long prompt that gets truncated",
]


def test_tokenizer_files_written_once_in_cache():
    folder = clip_tokenizer_folder()
    vocab = json.loads((folder / "vocab.json").read_text())
    merges = (folder / "merges.txt").read_text().splitlines()
    assert len(vocab) == 49408
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    assert vocab["!"] == 0 and vocab["!</w>"] == 256  # bytes_to_unicode order, then the '</w>' variants
    assert merges[0].startswith("#version") and len(merges) == 1 + 49152 - 256 - 2
    mtime = (folder / "vocab.json").stat().st_mtime_ns
    assert clip_tokenizer_folder() == folder and (folder / "vocab.json").stat().st_mtime_ns == mtime


@pytest.fixture(scope="module")
def open_clip_tokenizer():
    import open_clip

    return open_clip.get_tokenizer("ViT-L-14")


@pytest.mark.parametrize("prompt", PROMPTS)
def test_token_ids_equal_open_clip(prompt, open_clip_tokenizer):
    ours = load_clip_tokenizer()(prompt, padding="max_length", max_length=77, truncation=True).input_ids
    theirs = open_clip_tokenizer([prompt])[0].tolist()
    n = sum(1 for t in theirs if t != 0)  # open_clip pads with 0, SD's tokenizer with <|endoftext|>
    assert len(ours) == 77
    assert ours[:n] == theirs[:n]
    assert all(t == 49407 for t in ours[n:])


def test_multi_token_word_gives_all_its_positions():
    tok = load_clip_tokenizer()
    prompt = "A man unscrewing a bottle with both hands."
    ids = tok(prompt).input_ids
    # "unscrewing" is 3 BPE tokens (un, scre, wing) at positions 3-5; "hands" at 10 (start token = 0).
    assert tok.convert_ids_to_tokens(ids[3:6]) == ["un", "scre", "wing</w>"]
    assert tok.convert_ids_to_tokens(ids[10]) == "hands</w>"
    assert hand_token_indices(prompt) == [3, 4, 5, 10]


def test_hand_words_and_gerunds_are_tagged():
    tok = load_clip_tokenizer()
    prompt = "Two hands making a heart gesture with fingers"
    positions = hand_token_indices(prompt, tok)
    ids = tok(prompt).input_ids
    assert [tok.convert_ids_to_tokens(ids[p]) for p in positions] == [
        "hands</w>", "making</w>", "gesture</w>", "fingers</w>"]


def test_prompt_without_hand_word_gives_empty_list():
    assert hand_token_indices("A cat sleeps on a red sofa.") == []
    assert hand_token_indices("") == []


def test_tagger_is_offline_and_known():
    assert tagging.tagger_backend() in ("nltk", "textblob")
