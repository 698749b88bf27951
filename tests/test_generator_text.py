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


def test_tagger_is_textblob_and_tags_the_same_without_nltk(monkeypatch):
    """One tagger everywhere: the tags do not depend on whether NLTK (or its data) is importable."""
    import sys

    assert tagging.tagger_backend() == "textblob"
    prompts = ["A man unscrewing a bottle with both hands.", "a person clasping hands in a cosy living room",
               "two hands making a heart gesture under dim light"]
    before = [tagging.hand_words(p) for p in prompts]
    tagging._pattern_tagger.cache_clear()
    monkeypatch.setitem(sys.modules, "nltk.tag", None)  # importing NLTK's tagger now fails
    monkeypatch.setitem(sys.modules, "nltk.tag.perceptron", None)
    try:
        assert [tagging.hand_words(p) for p in prompts] == before
    finally:
        tagging._pattern_tagger.cache_clear()


def test_living_room_is_not_a_hand_action_and_every_bank_word_is():
    """The VBG rule's false positive in our prompts ('living' of 'living room') is excluded; every other VBG word
    of the prompt banks and of synthlab's captions is a hand action."""
    from generator import prompts as bank
    from hands.datasets import synthlab

    tagged = {w.lower() for w, _, _, hand in tagging.hand_words("a person clasping hands in a cosy living room") if hand}
    assert tagged == {"clasping", "hands"}
    texts = list(bank.PEOPLE + bank.ACTIONS + bank.SCENES + bank.LIGHTS)
    texts += [a.format(side="left") for a in bank.ONE_HAND_ACTIONS]
    texts += [a for v in synthlab.ACTIONS.values() for a in v]
    texts += [g.format(side="left") for g in synthlab.GESTURE_PHRASES.values()]
    texts += [f"in {s[1]} under {l[1]}" for s in synthlab.SCENES.values() for l in synthlab.LIGHTS.values()]
    hand = {w.lower() for t in texts for w, _, _, h in tagging.hand_words(t) if h}
    actions = {"clapping", "clasping", "counting", "crossing", "folding", "gesturing", "grasping", "holding",
               "interlocking", "making", "moving", "pinching", "pointing", "pressing", "raising", "rubbing",
               "showing", "touching", "waving"}
    assert hand == actions | {"hand", "hands", "finger", "fingers", "gesture"}
