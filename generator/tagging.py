"""Hand-related tagging H_tag (paper §3.3 and supplementary C): which CLIP token positions TAS attends to.

A word is hand-related when its part-of-speech tag is VBG (holding, taking, unscrewing, ...) or it is one of
hand / hands / finger / fingers / gesture. Every BPE token of such a word is returned, as positions in the
77-token CLIP sequence with the start token at position 0 (the reference code used word indices shifted by one
as token positions; that defect is not reproduced).

Offline by construction: POS tags come from NLTK's averaged-perceptron tagger only when its data is already
installed (`nltk.data.find`, never `nltk.download`), otherwise from textblob's PatternTagger, which ships its
own lexicon. Words are split with a regex, so no punkt data is needed either.
"""
from __future__ import annotations

import re
from functools import lru_cache

from .text import CLIP_MAX_LENGTH, load_clip_tokenizer

HAND_WORDS = frozenset({"hand", "hands", "finger", "fingers", "gesture"})
HAND_TAGS = frozenset({"VBG"})
# Words for tagging: letters (with inner apostrophes/hyphens kept, as a tagger expects "don't", "two-handed").
_WORD = re.compile(r"[^\W\d_]+(?:['’-][^\W\d_]+)*|\d+|(?:[^\w\s]|_)+", re.UNICODE)


@lru_cache(maxsize=1)
def _tagger():
    """A function words -> tags; NLTK's perceptron tagger when its data is installed, else textblob's."""
    import nltk

    for resource, lang in (("taggers/averaged_perceptron_tagger_eng", "eng"),
                           ("taggers/averaged_perceptron_tagger", None)):
        try:
            nltk.data.find(resource)
        except LookupError:
            continue
        from nltk.tag import PerceptronTagger

        tagger = PerceptronTagger(lang=lang) if lang else PerceptronTagger()
        return "nltk", lambda words: [tag for _, tag in tagger.tag(words)]

    from textblob.en.taggers import PatternTagger

    pattern = PatternTagger()

    def tag_with_pattern(words: list[str]) -> list[str]:
        # pattern re-tokenises a string; our words contain no spaces, so tokenize=False keeps them one-to-one.
        tagged = pattern.tag(" ".join(words), tokenize=False)
        if len(tagged) != len(words):
            raise RuntimeError(f"textblob's tagger split {words!r} into {len(tagged)} tokens")
        return [tag for _, tag in tagged]

    return "textblob", tag_with_pattern


def tagger_backend() -> str:
    """'nltk' when NLTK's perceptron tagger data is installed, else 'textblob'."""
    return _tagger()[0]


def hand_words(prompt: str) -> list[tuple[str, int, int, bool]]:
    """The prompt's words (regex-split) as (word, start char, end char, is hand-related)."""
    matches = list(_WORD.finditer(prompt))
    if not matches:
        return []
    tags = _tagger()[1]([m.group() for m in matches])
    return [(m.group(), m.start(), m.end(), m.group().lower() in HAND_WORDS or tag in HAND_TAGS)
            for m, tag in zip(matches, tags)]


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
