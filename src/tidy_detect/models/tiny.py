"""Tiny random-weight stand-ins for every model family tidy-detect loads, built offline.

``make_tiny_bundle`` writes one folder per family (model + processor, each via
``save_pretrained``) and a ``tiny.toml`` preset that points at them, so the real loading code
(``XxxModel.from_pretrained(folder)``, ``AutoProcessor.from_pretrained(folder)``) can be exercised
in tests and demos without a model hub. Scores from these models are meaningless, and every
tiny model says so: its saved config carries ``tidy_detect_random_weights: true``
(``RANDOM_WEIGHTS_KEY``, kept by transformers in ``config.json``), which the adapters'
``describe()`` report as ``random_weights`` (see :func:`has_random_weights`), so detection records,
the server and reports can say that a verdict comes from random weights.

Tokenizers are trained here on seeded random sentences of the bundled word list
(``tiny_words.txt``) so that every listed word is one token; the captioners' output layers only
keep the rows of those whole-word tokens, so a random captioner still writes word-like text
("dog table red the on man") in which spaCy finds noun chunks.

torch, transformers and tokenizers are imported inside the functions: importing this module is
cheap.
"""

from __future__ import annotations

import random
import shutil
import string
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Callable, Iterable

from tidy_detect.errors import InputError, ModelLoadError

__all__ = ["FOLDERS", "RANDOM_SOURCE_PREFIX", "RANDOM_WEIGHTS_KEY", "TOML_NAME", "has_random_weights", "load_words",
           "make_tiny_bundle"]

TOML_NAME = "tiny.toml"
# Subfolder of each tiny model, in build order.
FOLDERS = ("clip", "clip-b", "blip", "blip2", "llava", "grounding-dino", "owlv2")

TOML_TEXT = """\
# Tiny random-weight models built offline by `tidy-detect models make-tiny` (scores are meaningless)
[models]
clip = "./clip"
captioner = "blip2"
captioner_model = "./blip2"
grounder = "grounding-dino"
grounder_model = "./grounding-dino"

[features]
caption_max_tokens = 12
box_threshold = 0.0
text_threshold = 0.0
# The tiny grounders' random boxes are a few pixels wide; keep them, so local features exist.
min_box_size = 0
"""

# Characters that must be tokens of their own in every vocabulary, so that any English text
# tokenizes without falling back to the unknown token.
_BASE_CHARS = string.ascii_lowercase + string.digits + string.punctuation
# bert-base-uncased ids that Grounding DINO hard-codes (modeling_grounding_dino.SPECIAL_TOKENS
# and the [PAD]=0 delimiter) to split the prompt into phrases; the tiny BERT vocab keeps them.
_BERT_FIXED_IDS = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103, ".": 1012, "?": 1029}

# The config attribute that marks a model built here (random weights). transformers keeps unknown
# config attributes in config.json and sets them again on loading, so the mark travels with the folder.
RANDOM_WEIGHTS_KEY = "tidy_detect_random_weights"
# Sources of in-memory random-weight models (the benchmark's real-size architectures, bench/run.py).
RANDOM_SOURCE_PREFIX = "random:"


def has_random_weights(model: Any, source: str | None = None) -> bool:
    """Whether ``model`` (a transformers model, or ``None``) is known to have random weights.

    True when its config carries the make-tiny mark (``RANDOM_WEIGHTS_KEY``) or when ``source``
    names an in-memory random model (``random:<arch>``). Nothing else is guessed here: a model
    without either sign is taken for a trained one.
    """
    if isinstance(source, str) and source.startswith(RANDOM_SOURCE_PREFIX):
        return True
    config = getattr(model, "config", None)
    return getattr(config, RANDOM_WEIGHTS_KEY, False) is True


# --------------------------------------------------------------------------------------------
# Vocabularies
# --------------------------------------------------------------------------------------------


def load_words() -> list[str]:
    """Return the bundled caption word list (``tiny_words.txt``), in file order, without repeats."""
    text = Path(__file__).with_name("tiny_words.txt").read_text(encoding="utf-8")
    return list(dict.fromkeys(line.strip() for line in text.splitlines() if line.strip()))


def _corpus(words: list[str], seed: int, n_sentences: int = 300) -> list[str]:
    """Return seeded training sentences: every word alone, every word after a space, random sentences.

    The first two guarantee each word is seen both at the start of a text and after a space, so
    byte-level BPEs learn the word with and without its leading-space marker.
    """
    rng = random.Random(seed)
    shuffled = list(words)
    rng.shuffle(shuffled)
    sentences = list(words) + [" ".join(shuffled)]
    for _ in range(n_sentences):
        sentence = " ".join(rng.choice(words) for _ in range(rng.randint(3, 9)))
        sentences.append(sentence + rng.choice(("", ".", " .", ",")))
    return sentences


def _pre_tokenized_counts(corpus: list[str], pre_tokenizer: Any, normalizer: Any = None) -> Counter[str]:
    """Count the pieces a ``tokenizers`` normalizer + pre-tokenizer cut ``corpus`` into (what BPE trains on)."""
    counts: Counter[str] = Counter()
    for text in corpus:
        if normalizer is not None:
            text = normalizer.normalize_str(text)
        counts.update(piece for piece, _ in pre_tokenizer.pre_tokenize_str(text))
    return counts


def _train_bpe_merges(corpus: list[str], *, pre_tokenizer: Any, normalizer: Any = None,
                      prefix: str = "", suffix: str = "") -> list[tuple[str, str]]:
    """Train byte-pair merges on ``corpus`` until every piece is one symbol; return them in rank order.

    ``pre_tokenizer``/``normalizer`` are the target tokenizer's own ``tokenizers`` components, so
    the pieces are exactly what it will see. ``prefix`` marks non-initial symbols (WordPiece's
    "##"), ``suffix`` the final one (CLIP's "</w>"). Merging runs to completion, so every piece
    of the corpus, hence every word, becomes a single token.

    The merge loop is ours rather than ``tokenizers.trainers``: theirs breaks ties between
    equally frequent pairs in hash order, which changes between processes (and so would the
    tokenizer files); here ties go to the lexicographically smallest pair.
    """
    words: list[list[str]] = []
    freqs: list[int] = []
    for piece, count in sorted(_pre_tokenized_counts(corpus, pre_tokenizer, normalizer).items()):
        symbols = [piece[0]] + [prefix + c for c in piece[1:]]
        symbols[-1] += suffix
        words.append(symbols)
        freqs.append(count)
    pair_counts: Counter[tuple[str, str]] = Counter()
    holders: dict[tuple[str, str], set[int]] = defaultdict(set)
    for i, symbols in enumerate(words):
        for pair in zip(symbols, symbols[1:]):
            pair_counts[pair] += freqs[i]
            holders[pair].add(i)
    merges: list[tuple[str, str]] = []
    while pair_counts:
        best = min(pair_counts, key=lambda pair: (-pair_counts[pair], pair))
        left, right = best
        merged = left + right[len(prefix):]
        merges.append(best)
        for i in sorted(holders.pop(best)):
            old = words[i]
            new: list[str] = []
            k = 0
            while k < len(old):
                if k + 1 < len(old) and old[k] == left and old[k + 1] == right:
                    new.append(merged)
                    k += 2
                else:
                    new.append(old[k])
                    k += 1
            for pair in zip(old, old[1:]):
                pair_counts[pair] -= freqs[i]
                if pair_counts[pair] <= 0:
                    del pair_counts[pair]
            for pair in zip(new, new[1:]):
                pair_counts[pair] += freqs[i]
                holders[pair].add(i)
            words[i] = new
    return merges


def _bpe_vocab(head: Iterable[str], merges: list[tuple[str, str]], tail: Iterable[str] = ()) -> dict[str, int]:
    """Lay out a BPE vocabulary: ``head`` symbols, then each merge's result in rank order, then ``tail``."""
    tokens = list(dict.fromkeys(head))
    seen = set(tokens)
    for left, right in merges:
        merged = left + right
        if merged not in seen:
            seen.add(merged)
            tokens.append(merged)
    for token in tail:
        if token not in seen:
            seen.add(token)
            tokens.append(token)
    return {token: i for i, token in enumerate(tokens)}


def _byte_alphabet() -> list[str]:
    """The 256 stand-in characters byte-level BPEs use for bytes, in GPT-2's vocabulary order.

    Printable bytes come first and map to themselves, so "!" gets id 0 as in CLIP/OWLv2 (where
    "!" is the query pad token); the other bytes map to chr(256 + n).
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(rest))]


def _clip_tokenizer(words: list[str], seed: int, *, pad_token: str = "<|endoftext|>", model_max_length: int = 77):
    """Return a ``CLIPTokenizer`` whose BPE knows every word; its eos token has the highest id.

    OWL-ViT/OWLv2 pool the text at ``input_ids.argmax()``, which only finds the eos token when it
    is the last id, as in the real CLIP vocabulary.
    """
    from transformers import CLIPTokenizer

    template = CLIPTokenizer()  # borrow the exact normalizer/pre-tokenizer the class rebuilds
    alphabet = _byte_alphabet()
    merges = _train_bpe_merges(
        _corpus(words, seed), pre_tokenizer=template.backend_tokenizer.pre_tokenizer,
        normalizer=template.backend_tokenizer.normalizer, suffix="</w>",
    )
    # Every byte, also as the last symbol of a word: single-character words never hit <unk>.
    head = alphabet + [c + "</w>" for c in alphabet]
    vocab = _bpe_vocab(head, merges, tail=["<|startoftext|>", "<|endoftext|>"])
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token, model_max_length=model_max_length)


def _bert_vocab(words: list[str], seed: int) -> dict[str, int]:
    """Return an uncased WordPiece vocabulary with bert-base-uncased's ids for [PAD]/[UNK]/[CLS]/[SEP]/[MASK]/./?.

    Every base character (also as a "##" continuation) and every word is a token; WordPiece
    matches greedily longest-first, so each listed word encodes as one token. The pieces a
    "##"-style BPE learns on the corpus are added so unlisted words split into few pieces. Free
    slots below the highest fixed id are "[unusedN]" tokens, as in BERT.
    """
    from tokenizers import normalizers, pre_tokenizers

    merges = _train_bpe_merges(_corpus(words, seed), pre_tokenizer=pre_tokenizers.BertPreTokenizer(),
                               normalizer=normalizers.BertNormalizer(lowercase=True), prefix="##")
    pieces = [left + right[2:] for left, right in merges]
    wanted = list(dict.fromkeys([*_BASE_CHARS, *("##" + c for c in _BASE_CHARS), *words, *pieces]))
    wanted = [t for t in wanted if t not in _BERT_FIXED_IDS]
    size = max(len(wanted) + len(_BERT_FIXED_IDS), max(_BERT_FIXED_IDS.values()) + 1)
    slots: list[str | None] = [None] * size
    for token, i in _BERT_FIXED_IDS.items():
        slots[i] = token
    free = iter(i for i, t in enumerate(slots) if t is None)
    for token in wanted:
        slots[next(free)] = token
    unused = 0
    for i, token in enumerate(slots):
        if token is None:
            slots[i] = f"[unused{unused}]"
            unused += 1
    return {token: i for i, token in enumerate(slots)}


def _bert_tokenizer(words: list[str], seed: int, *, model_max_length: int, **special: str):
    """Return an uncased ``BertTokenizer`` over ``_bert_vocab``; ``special`` adds e.g. ``bos_token``."""
    from transformers import BertTokenizer

    vocab = _bert_vocab(words, seed)
    for token in special.values():
        vocab.setdefault(token, len(vocab))
    return BertTokenizer(vocab=vocab, do_lower_case=True, model_max_length=model_max_length, **special)


def _opt_tokenizer(words: list[str], seed: int):
    """Return an OPT-style ``GPT2Tokenizer``: byte-level BPE, ``</s>`` as bos and eos, ``<pad>``, ``<unk>``.

    Like OPT's it prepends ``</s>`` to every text, and pads on the left so a batch of prompts
    can be continued by a decoder-only model.
    """
    from tokenizers import pre_tokenizers
    from transformers import GPT2Tokenizer

    alphabet = _byte_alphabet()
    merges = _train_bpe_merges(_corpus(words, seed), pre_tokenizer=pre_tokenizers.ByteLevel(add_prefix_space=False))
    vocab = _bpe_vocab(["<pad>", "</s>", "<unk>"] + alphabet, merges)
    return GPT2Tokenizer(vocab=vocab, merges=merges, bos_token="</s>", eos_token="</s>", unk_token="<unk>",
                         pad_token="<pad>", add_bos_token=True, padding_side="left", model_max_length=128)


def _llama_tokenizer(words: list[str], seed: int):
    """Return a ``LlamaTokenizer``: metaspace BPE with byte fallback; ``<unk>``=0, ``<s>``=1, ``</s>``=2.

    The 256 ``<0xNN>`` byte tokens make any text (newlines, upper case, accents) encodable.
    ``<image>`` and ``<pad>`` are added as special tokens after the base vocabulary, as in
    llava-1.5.
    """
    from tokenizers import AddedToken, pre_tokenizers
    from transformers import LlamaTokenizer

    # Split at the marker while training so no merge spans two words. The tokenizer itself does
    # not split, which is equivalent: "▁" only starts pieces, so no merge's right symbol has it.
    pre = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    chars = ["▁"] + list(_BASE_CHARS) + list(string.ascii_uppercase)
    merges = _train_bpe_merges(_corpus(words, seed), pre_tokenizer=pre)
    head = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + chars
    # padding_side is passed although it is the class default: transformers 5 reloads llava
    # tokenizers as a plain TokenizersBackend, which only knows what tokenizer_config.json says.
    tokenizer = LlamaTokenizer(vocab=_bpe_vocab(head, merges), merges=merges, add_bos_token=True,
                               add_eos_token=False, pad_token="<pad>", padding_side="left", model_max_length=256)
    tokenizer.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
    return tokenizer


def _word_token_ids(tokenizer: Any, words: list[str], prefix: str) -> list[int]:
    """Return the ids of the whole-word tokens ``prefix + word`` (the form a word takes mid-sentence).

    Raises ``ModelLoadError`` if a word is not a single token, which would be a training bug.
    """
    vocab = tokenizer.get_vocab()
    missing = [w for w in words if prefix + w not in vocab]
    if missing:
        raise ModelLoadError(f"tiny {type(tokenizer).__name__} has no single token for {missing[:5]}")
    return sorted({vocab[prefix + w] for w in words})


def _keep_only_words(model: Any, word_ids: list[int]) -> None:
    """Zero every output-embedding row except the whole-word tokens', and any output bias.

    A random model's logits are ``h @ W.T``: zeroed rows score 0, while the maximum over ~300
    random word rows is positive, so greedy decoding only ever emits whole words, never eos,
    punctuation, sub-word pieces or special tokens. The output layer must not be tied to the
    input embeddings (callers build with ``tie_word_embeddings=False``).
    """
    import torch

    lm = getattr(model, "text_decoder", model)  # BLIP keeps its language model head there
    head = lm.get_output_embeddings()
    if head.weight is lm.get_input_embeddings().weight:
        raise ModelLoadError(f"{type(model).__name__}: output embeddings are tied to the input ones")
    keep = torch.zeros(head.weight.shape[0], dtype=torch.bool)
    keep[word_ids] = True
    with torch.no_grad():
        head.weight[~keep] = 0.0
        if getattr(head, "bias", None) is not None:
            head.bias.zero_()


# --------------------------------------------------------------------------------------------
# Model families
# --------------------------------------------------------------------------------------------


def _seeded_init(model_class: Any, config: Any, seed: int) -> Any:
    """Return ``model_class(config)`` in eval mode, its random weights drawn after ``torch.manual_seed(seed)``.

    The config is marked as random-weight (``RANDOM_WEIGHTS_KEY``) first. The caller's global torch
    RNG state is restored afterwards.
    """
    import torch

    setattr(config, RANDOM_WEIGHTS_KEY, True)  # saved into config.json by save_pretrained
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model_class(config).eval()


def _clip_image_processor(size: int):
    """Return a CLIP image processor that resizes the short side to ``size`` and center-crops a square."""
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def _build_clip(folder: Path, tokenizer: Any, *, seed: int, projection_dim: int, hidden: int) -> None:
    """Save a tiny ``CLIPModel`` (32 px images, patch 8) with a ``CLIPProcessor`` into ``folder``."""
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor

    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=2,
            image_size=32, patch_size=8,
        ),
        projection_dim=projection_dim,
    )
    model = _seeded_init(CLIPModel, config, seed)
    model.save_pretrained(folder)
    CLIPProcessor(image_processor=_clip_image_processor(32), tokenizer=tokenizer).save_pretrained(folder)


def _build_blip(folder: Path, words: list[str], *, seed: int) -> None:
    """Save a tiny ``BlipForConditionalGeneration`` with a ``BlipProcessor`` into ``folder``.

    The text decoder starts from ``[DEC]`` (``text_config.bos_token_id``) and stops at ``[SEP]``
    (``sep_token_id``, also ``eos_token_id``), as BLIP's ``generate`` expects.
    """
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipImageProcessorPil, BlipProcessor

    tokenizer = _bert_tokenizer(words, seed, model_max_length=128, bos_token="[DEC]")
    config = BlipConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, encoder_hidden_size=32, max_position_embeddings=128,
            bos_token_id=tokenizer.bos_token_id, sep_token_id=tokenizer.sep_token_id,
            eos_token_id=tokenizer.sep_token_id, pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=False,
        ),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=32, image_text_hidden_size=32, tie_word_embeddings=False,
    )
    model = _seeded_init(BlipForConditionalGeneration, config, seed)
    _keep_only_words(model, _word_token_ids(tokenizer, words, ""))
    model.save_pretrained(folder)
    image_processor = BlipImageProcessorPil(size={"height": 32, "width": 32})
    BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)


def _build_blip2(folder: Path, words: list[str], *, seed: int, num_query_tokens: int = 8) -> None:
    """Save a tiny ``Blip2ForConditionalGeneration`` (OPT language model) with a ``Blip2Processor``.

    The processor prepends ``num_query_tokens`` ``<image>`` tokens to every text; the model swaps
    them for the Q-Former outputs, finding them by ``config.image_token_index``.
    """
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessorPil

    tokenizer = _opt_tokenizer(words, seed)
    image_processor = BlipImageProcessorPil(size={"height": 32, "width": 32})
    processor = Blip2Processor(image_processor=image_processor, tokenizer=tokenizer,
                               num_query_tokens=num_query_tokens)  # adds "<image>" to the tokenizer
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    config = Blip2Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        qformer_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            cross_attention_frequency=1, max_position_embeddings=64, vocab_size=len(tokenizer)),
        text_config=dict(
            model_type="opt", vocab_size=len(tokenizer), hidden_size=32, word_embed_proj_dim=32, ffn_dim=64,
            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=256,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
        ),
        num_query_tokens=num_query_tokens, image_text_hidden_size=32, image_token_index=image_token_id,
        tie_word_embeddings=False,
    )
    model = _seeded_init(Blip2ForConditionalGeneration, config, seed)
    _keep_only_words(model, _word_token_ids(tokenizer, words, "Ġ"))
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


# llava-1.5's conversation format: "USER: <image>\n{text} ASSISTANT:".
_LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() + ': ' }}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}{% else %}"
    "{% for part in message['content'] if part['type'] == 'image' %}{{ '<image>\n' }}{% endfor %}"
    "{% for part in message['content'] if part['type'] == 'text' %}{{ part['text'] + ' ' }}{% endfor %}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def _build_llava(folder: Path, words: list[str], *, seed: int) -> None:
    """Save a tiny ``LlavaForConditionalGeneration`` (CLIP vision tower, Llama text) with a ``LlavaProcessor``.

    32 px images in 8 px patches give 16 patch features plus CLS; with the "default" strategy the
    CLS is dropped, so ``patch_size=8`` and ``num_additional_image_tokens=1`` make the processor
    expand ``<image>`` into exactly 16 tokens.
    """
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tokenizer = _llama_tokenizer(words, seed)
    config = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8,
                           projection_dim=32),
        text_config=dict(
            model_type="llama", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default", vision_feature_layer=-2, projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )
    model = _seeded_init(LlavaForConditionalGeneration, config, seed)
    _keep_only_words(model, _word_token_ids(tokenizer, words, "▁"))
    model.save_pretrained(folder)
    processor = LlavaProcessor(image_processor=_clip_image_processor(32), tokenizer=tokenizer, patch_size=8,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=_LLAVA_CHAT_TEMPLATE)
    processor.save_pretrained(folder)


def _build_grounding_dino(folder: Path, words: list[str], *, seed: int) -> None:
    """Save a tiny ``GroundingDinoForObjectDetection`` (Swin from config, BERT text) with its processor.

    The BERT vocabulary keeps bert-base-uncased's ids for [CLS]/[SEP]/./? because the model finds
    phrase boundaries by those hard-coded ids.
    """
    from transformers import (GroundingDinoConfig, GroundingDinoForObjectDetection,
                              GroundingDinoImageProcessorPil, GroundingDinoProcessor)

    tokenizer = _bert_tokenizer(words, seed, model_max_length=128)
    config = GroundingDinoConfig(
        # Built from config, so no timm and no pretrained download; stages of 8/16/32/64 channels.
        backbone_config=dict(model_type="swin", image_size=128, patch_size=4, embed_dim=8, depths=[1, 1, 1, 1],
                             num_heads=[1, 1, 2, 2], mlp_ratio=2.0, window_size=4, out_indices=[2, 3, 4]),
        text_config=dict(model_type="bert", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=128,
                         pad_token_id=tokenizer.pad_token_id),
        d_model=32, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_n_points=2, decoder_n_points=2,
        # Logits are padded to max_text_len along the text axis; longer prompts are cut there.
        num_feature_levels=4, num_queries=20, max_text_len=64, disable_custom_kernels=True,
    )
    model = _seeded_init(GroundingDinoForObjectDetection, config, seed)
    model.save_pretrained(folder)
    # 128 px is the least that keeps the smallest feature map (stride 64) at 2x2 or more: GroupNorm
    # fails on 1x1 maps. The grounder pads extreme aspect ratios for the same reason.
    image_processor = GroundingDinoImageProcessorPil(size={"shortest_edge": 128, "longest_edge": 192})
    GroundingDinoProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)


def _build_owlv2(folder: Path, words: list[str], *, seed: int) -> None:
    """Save a tiny ``Owlv2ForObjectDetection`` (64 px images, patch 16: 16 boxes) with an ``Owlv2Processor``.

    Queries are padded to 16 tokens with "!" (OWLv2's text length and pad token).
    """
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessorPil, Owlv2Processor

    tokenizer = _clip_tokenizer(words, seed, pad_token="!", model_max_length=16)
    config = Owlv2Config(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=64, patch_size=16),
        projection_dim=32,
    )
    model = _seeded_init(Owlv2ForObjectDetection, config, seed)
    model.save_pretrained(folder)
    image_processor = Owlv2ImageProcessorPil(size={"height": 64, "width": 64})
    Owlv2Processor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)


# --------------------------------------------------------------------------------------------
# Smoke checks and the bundle
# --------------------------------------------------------------------------------------------


def _random_images(seed: int) -> list[Any]:
    """Two seeded random RGB PIL images of different sizes (50x40 and 37x61)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB") for w, h in ((50, 40), (37, 61))]


def _owlv2_needs_missing_scipy(processor: Any) -> bool:
    """True when OWLv2's image processor is the PIL one (no torchvision), which resizes with scipy, and scipy is absent."""
    import importlib.util

    pil_backend = type(processor.image_processor).__name__.endswith("Pil")
    return pil_backend and importlib.util.find_spec("scipy") is None


def _smoke_check(name: str, folder: Path, seed: int) -> None:
    """Reload ``folder`` offline and run one batched pass on two images; raise ``ModelLoadError`` if it fails."""
    import torch
    import transformers

    try:
        processor = transformers.AutoProcessor.from_pretrained(folder, local_files_only=True)
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
        model_class = getattr(transformers, config.architectures[0])
        model = model_class.from_pretrained(folder, local_files_only=True).eval()
        images = _random_images(seed)
        with torch.inference_mode():
            if name.startswith("clip"):
                out = model.get_image_features(**processor(images=images, return_tensors="pt")).pooler_output
                ok = tuple(out.shape) == (2, config.projection_dim)
            elif name == "owlv2" and _owlv2_needs_missing_scipy(processor):
                ok = True  # reloading is all that can be checked here
            elif name in ("grounding-dino", "owlv2"):
                text = ["dog. table."] * 2 if name == "grounding-dino" else [["a dog", "a table"]] * 2
                out = model(**processor(images=images, text=text, return_tensors="pt"))
                ok = out.logits.shape[0] == 2 and tuple(out.pred_boxes.shape[::2]) == (2, 4)
            else:
                prompt = "USER: <image>\nDescribe the image. ASSISTANT:" if name == "llava" else "a picture of"
                inputs = processor(images=images, text=[prompt] * 2, return_tensors="pt")
                ids = model.generate(**inputs, max_new_tokens=2, do_sample=False)
                ok = ids.shape[0] == 2
    except Exception as exc:  # whatever broke, the folder is unusable
        raise ModelLoadError(f"tiny model {name!r} in {folder} does not reload and run: {exc}") from exc
    if not ok:
        raise ModelLoadError(f"tiny model {name!r} in {folder} gave outputs of an unexpected shape")


def _builders(words: list[str], seed: int) -> dict[str, Callable[[Path], None]]:
    """Map each subfolder name to a function that builds that family into a given folder."""
    cache: dict[str, Any] = {}

    def clip_tokenizer() -> Any:
        if "clip" not in cache:  # shared by both CLIP models
            cache["clip"] = _clip_tokenizer(words, seed)
        return cache["clip"]

    return {
        "clip": lambda d: _build_clip(d, clip_tokenizer(), seed=seed, projection_dim=32, hidden=32),
        "clip-b": lambda d: _build_clip(d, clip_tokenizer(), seed=seed + 1, projection_dim=24, hidden=48),
        "blip": lambda d: _build_blip(d, words, seed=seed),
        "blip2": lambda d: _build_blip2(d, words, seed=seed),
        "llava": lambda d: _build_llava(d, words, seed=seed),
        "grounding-dino": lambda d: _build_grounding_dino(d, words, seed=seed),
        "owlv2": lambda d: _build_owlv2(d, words, seed=seed),
    }


def make_tiny_bundle(out_dir: str | Path, *, seed: int = 0, overwrite: bool = False) -> Path:
    """Build every tiny model under out_dir and write out_dir/tiny.toml; return the toml path.

    Each family goes to its own subfolder (``FOLDERS``), is reloaded from there offline and run
    once on two random images before the next is built. The same ``seed`` gives byte-identical
    weight files. Raises ``InputError`` when a subfolder or the toml already exists and
    ``overwrite`` is false (with ``overwrite``, only those are replaced), and ``ModelLoadError``
    when a built model does not reload and run.
    """
    out = Path(out_dir)
    targets = [out / name for name in FOLDERS] + [out / TOML_NAME]
    existing = [p for p in targets if p.exists()]
    if existing and not overwrite:
        raise InputError(f"{existing[0]} already exists; choose an empty folder or pass overwrite=True "
                         f"(--overwrite) to replace the tiny models in {out}")
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} is not a folder")
    for path in existing:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    out.mkdir(parents=True, exist_ok=True)

    from transformers.utils import logging as hf_logging

    # Random-init notices and per-file progress bars are noise for a build of known models.
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        words = load_words()
        for name, build in _builders(words, seed).items():
            build(out / name)
            _smoke_check(name, out / name, seed)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    toml_path = out / TOML_NAME
    toml_path.write_text(TOML_TEXT, encoding="utf-8")
    return toml_path
