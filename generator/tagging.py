"""Hand-related tagging H_tag (paper §3.3 and supplementary C): which CLIP token positions TAS attends to.

A word is hand-related when its part-of-speech tag is VBG (holding, taking, unscrewing, ...) or it is one of
hand / hands / finger / fingers / gesture. Every BPE token of such a word is returned, as positions in the
77-token CLIP sequence with the start token at position 0 (the reference code used word indices shifted by one
as token positions; that defect is not reproduced).

One tagger, the same on every machine: textblob's PatternTagger (pattern's Brill-style lexicon tagger), whose
lexicon ships inside the textblob wheel, so it needs no data download and gives the same tags wherever the
package installs. NLTK's perceptron tagger is not used even where its data happens to be installed (it tags some
words differently, so tags would depend on the machine). Words are split with a regex (no punkt data either).

False positives of the VBG rule: a gerund that is part of a noun compound ("living room", "dining table") is
tagged VBG but names no hand action; `NOUN_COMPOUNDS` lists such compounds, and their -ing word is not
hand-related when the compound's noun follows it. In the project's prompt banks (generator.prompts, synthlab's
captions) "living" in "living room" is the only one (all the other VBG words are hand actions: checked by
tests/test_generator_text.py).
"""
from __future__ import annotations

import re
from functools import lru_cache

from .text import CLIP_MAX_LENGTH, load_clip_tokenizer

HAND_WORDS = frozenset({"hand", "hands", "finger", "fingers", "gesture"})
HAND_TAGS = frozenset({"VBG"})
# Words for tagging: letters (with inner apostrophes/hyphens kept, as a tagger expects "don't", "two-handed").
_WORD = re.compile(r"[^\W\d_]+(?:['’-][^\W\d_]+)*|\d+|(?:[^\w\s]|_)+", re.UNICODE)


# gerund + noun compounds whose -ing word the VBG rule would take for a hand action
NOUN_COMPOUNDS = frozenset({
    ("living", "room"), ("dining", "room"), ("dining", "table"), ("waiting", "room"), ("sitting", "room"),
    ("washing", "machine"), ("sewing", "machine"), ("swimming", "pool"), ("parking", "lot"),
    ("shopping", "mall"), ("shopping", "bag"), ("cutting", "board"), ("ironing", "board"), ("frying", "pan"),
    ("rolling", "pin"), ("sleeping", "bag"), ("climbing", "wall"), ("boxing", "ring"), ("changing", "room"),
})


@lru_cache(maxsize=1)
def _pattern_tagger():
    from textblob.en.taggers import PatternTagger

    return PatternTagger()


def pos_tags(words: list[str]) -> list[str]:
    """Penn Treebank tags of `words` (one per word) from textblob's PatternTagger."""
    if not words:
        return []
    # pattern re-tokenises a string; our words contain no spaces, so tokenize=False keeps them one-to-one.
    tagged = _pattern_tagger().tag(" ".join(words), tokenize=False)
    if len(tagged) != len(words):
        raise RuntimeError(f"textblob's tagger split {words!r} into {len(tagged)} tokens")
    return [tag for _, tag in tagged]


def tagger_backend() -> str:
    """The POS tagger used: always 'textblob' (its PatternTagger)."""
    return "textblob"


def hand_words(prompt: str) -> list[tuple[str, int, int, bool]]:
    """The prompt's words (regex-split) as (word, start char, end char, is hand-related): a hand word, or a VBG
    that is not the first word of a `NOUN_COMPOUNDS` compound."""
    matches = list(_WORD.finditer(prompt))
    if not matches:
        return []
    words = [m.group() for m in matches]
    tags = pos_tags(words)
    lower = [w.lower() for w in words]
    out = []
    for i, (m, tag) in enumerate(zip(matches, tags)):
        compound = i + 1 < len(lower) and (lower[i], lower[i + 1]) in NOUN_COMPOUNDS
        is_hand = lower[i] in HAND_WORDS or (tag in HAND_TAGS and not compound)
        out.append((m.group(), m.start(), m.end(), is_hand))
    return out


def hand_token_indices(prompt: str, tokenizer=None) -> list[int]:
    """Positions in the 77-token CLIP sequence (start token = 0) of every BPE token of every hand-related word.

    prompt: the text prompt. tokenizer: a fast `transformers.CLIPTokenizer` (default: the offline SD 1.5 tokenizer).
    Words and BPE tokens are matched by character offsets in the prompt, so a word split into several BPE tokens
    ("unscrewing" -> un, scre, wing) gives all their positions. Returns sorted positions in [1, 75] (TAS drops
    position 76, as the reference; words cut off by the 77-token limit are not returned). [] when the prompt has no
    hand-related word: the caller then skips TAS for that prompt and says so.
    """
    tokenizer = tokenizer if tokenizer is not None else load_clip_tokenizer()
    hand_spans = [(start, end) for _, start, end, is_hand in hand_words(prompt) if is_hand]
    if not hand_spans:
        return []
    encoded = tokenizer(prompt, truncation=True, max_length=CLIP_MAX_LENGTH, return_offsets_mapping=True)
    positions = []
    for position, (start, end) in enumerate(encoded["offset_mapping"]):
        if end > start and 1 <= position <= CLIP_MAX_LENGTH - 2:
            if any(start < word_end and word_start < end for word_start, word_end in hand_spans):
                positions.append(position)
    return positions
