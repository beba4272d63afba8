"""Hugging Face tokenizer files in and out: tokenizer.json, tokenizer_config.json, generation_config.json.

In: a `tokenizers` BPE model over GPT-2's byte-level alphabet (Llama 3, Qwen2/2.5/3, SmolLM, GPT-2 and
Mistral's tiktoken-based tokenizers) becomes the arguments of a nanostack `Tokenizer`, which still encodes
with tiktoken:
- vocabulary strings map back to bytes through the byte-level alphabet (each byte is one printable char);
- tiktoken ranks come from the merges (`_ranks`), the split regex from the pre-tokenizer (Split, ByteLevel,
  Digits before ByteLevel);
- added tokens become special tokens; those marked "special": false (Qwen3's <think>) are matched in plain
  text too, as `tokenizers` matches them; "special": true ones only where the chat template writes them;
- tokenizer_config.json (or chat_template.jinja beside it) gives the chat template and its bos/eos text,
  generation_config.json the stop ids (eos_token_id, an int or a list), the post-processor the token that
  Hugging Face puts before a text (Llama 3's <|begin_of_text|>; none for Qwen, so bos_id is None).
What nanostack does not implement is refused, naming the file and the feature: SentencePiece-style models
(Unigram, WordPiece, BPE with byte_fallback, a Metaspace pre-tokenizer: Llama 2, Mistral v0.1), normalizers
other than NFC, added tokens that strip spaces, split patterns tiktoken cannot follow.

Out: any Tokenizer as the same three files, so that `tokenizers.Tokenizer.from_file` and transformers'
AutoTokenizer encode as nanostack does and apply_chat_template gives render_chat's ids. The merges list
every split of each token into two tokens, ordered by the token's rank, with "ignore_merges" (a chunk that
is one token stays one): Hugging Face's BPE (first merge in the list first) then does what tiktoken does
(lowest rank of the joined bytes first). transformers converts tiktoken files the same way.
"""
import json
from pathlib import Path

import regex

from nanostack.atomic import atomic_file
from nanostack.chat_template import compile_chat_template

# The split of GPT-2's ByteLevel pre-tokenizer with use_regex (its documented pattern).
GPT2_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Digits(individual_digits) then that split on each stretch between digits (SmolLM, StarCoder), as one regex:
# each digit alone, no space joins a digit, and a run of spaces ends before a digit as at the end of a stretch.
GPT2_DIGITS_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""
BYTE_LEVEL_ONLY = ("nanostack reads byte-level BPE tokenizers (Llama 3, Qwen2/2.5/3, SmolLM, GPT-2), not "
                   "SentencePiece-style ones (Llama 2, Mistral v0.1)")
# tiktoken drops text its split pattern does not match, where Hugging Face keeps it as a piece of its own; a
# pattern must match all of this (letters, digits, punctuation, every kind of space, CJK, emoji, controls).
COVERAGE_PROBE = "Héllo, wörld! 12345 x=1;\t\r\n  \u00a0\u3000中文 😀\u200d👩 \x00'll ǅ\u0301\n\n"
TOKENIZER_CLASS = "PreTrainedTokenizerFast"  # transformers' class that reads tokenizer.json as it is


def byte_level_alphabet() -> list[str]:
    """GPT-2's character for each byte: printable Latin-1 bytes stand for themselves, the other 68 (controls,
    space, ...) take U+0100 onwards in byte order, so that every token is a printable string."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    shifted = iter(range(0x100, 0x200))
    return [chr(byte) if byte in printable else chr(next(shifted)) for byte in range(256)]


# ----------------------------------------------------------------------------------------------------------
# In

def read_hf_tokenizer(path, state: dict) -> dict:
    """The `Tokenizer(...)` arguments of a Hugging Face tokenizer.json (`state`, read from `path`) and of the
    tokenizer_config.json, chat_template.jinja and generation_config.json beside it (each optional)."""
    path = Path(path)
    try:
        model = state["model"]
        if model.get("type") != "BPE":
            raise ValueError(f"{path}: tokenizer model type {model.get('type')!r} is not supported: {BYTE_LEVEL_ONLY}")
        if model.get("byte_fallback"):
            raise ValueError(f"{path}: BPE with byte_fallback is not supported: {BYTE_LEVEL_ONLY}")
        for option in ("dropout", "continuing_subword_prefix", "end_of_word_suffix"):
            if model.get(option):
                raise ValueError(f"{path}: BPE option {option}={model[option]!r} is not supported")
        normalizer = _normalizer(path, state.get("normalizer"))
        pattern = _split_pattern(path, state.get("pre_tokenizer"))
        kinds = {step["type"] for step in _steps(state.get("decoder"), "decoders")} - {"ByteLevel"}
        if kinds:
            raise ValueError(f"{path}: decoder {sorted(kinds)} is not supported: {BYTE_LEVEL_ONLY}")
        special_tokens, text_tokens = _added_tokens(path, state.get("added_tokens") or [], normalizer)
        vocab = model["vocab"]
        mergeable_ranks, token_ids = _ranks(path, vocab, model["merges"], set(special_tokens.values()))
        bos_id = _bos_id(path, state.get("post_processor"))
    except (KeyError, TypeError, AttributeError, IndexError, StopIteration) as error:
        raise ValueError(f"{path}: malformed Hugging Face tokenizer.json ({type(error).__name__}: {error})") from None

    config_path, generation_path = path.parent / "tokenizer_config.json", path.parent / "generation_config.json"
    tokenizer_config, generation_config = _read_json(config_path), _read_json(generation_path)
    names = {name: text for name in ("bos_token", "eos_token", "unk_token", "pad_token")
             if isinstance(text := _token_text(tokenizer_config.get(name)), str)}
    eos_ids = generation_config.get("eos_token_id")
    eos_ids = [eos_ids] if isinstance(eos_ids, int) else eos_ids or []
    if not isinstance(eos_ids, list) or not all(isinstance(i, int) for i in eos_ids):
        raise ValueError(f"{generation_path}: eos_token_id must be an int or a list of ints, got {eos_ids!r}")
    if "eos_token" in names:
        eos_id = special_tokens.get(names["eos_token"], vocab.get(names["eos_token"]))
        if eos_id is None:
            raise ValueError(f"{config_path}: eos_token {names['eos_token']!r} is not a token of {path}")
    elif eos_ids:
        eos_id = eos_ids[0]
    else:
        raise ValueError(f"{path.parent}: no eos_token in tokenizer_config.json and no eos_token_id in "
                         f"generation_config.json, so nothing would end a generation")
    return {"mergeable_ranks": mergeable_ranks, "pattern": pattern, "name": path.parent.name or "huggingface",
            "special_tokens": special_tokens, "text_tokens": text_tokens, "normalizer": normalizer,
            "token_ids": token_ids, "bos_id": bos_id, "eos_id": eos_id, "stop_ids": eos_ids or None,
            "chat_template": _chat_template(path.parent, tokenizer_config), "special_tokens_map": names,
            "hf_config": {"tokenizer_config": tokenizer_config, "generation_config": generation_config}}


def _steps(component: dict | None, key: str) -> list[dict]:
    """The steps of a normalizer / pre-tokenizer / decoder / post-processor: a Sequence's list, or itself."""
    if component is None:
        return []
    return component[key] if component.get("type") == "Sequence" else [component]


def _normalizer(path: Path, normalizer: dict | None) -> str | None:
    """"NFC" or None; any other normalizer is refused."""
    kinds = {step["type"] for step in _steps(normalizer, "normalizers")}
    if kinds - {"NFC"}:
        raise ValueError(f"{path}: normalizer {sorted(kinds - {'NFC'})} is not supported (nanostack applies NFC or "
                         f"nothing); {BYTE_LEVEL_ONLY}")
    return "NFC" if kinds else None


def _split_pattern(path: Path, pre_tokenizer: dict | None) -> str:
    """The one regex tiktoken splits text with, from Split steps, ByteLevel's own GPT-2 split and Digits."""
    patterns, byte_level, digits = [], False, False
    for step in _steps(pre_tokenizer, "pretokenizers"):
        kind = step["type"]
        if kind == "Split":
            if step["behavior"] != "Isolated" or step.get("invert"):
                raise ValueError(f"{path}: Split pre-tokenizer with behavior {step['behavior']!r}, invert "
                                 f"{step.get('invert')} is not supported (tiktoken keeps each match: Isolated)")
            pattern = step["pattern"]
            patterns.append(pattern["Regex"] if "Regex" in pattern else regex.escape(pattern["String"]))
        elif kind == "ByteLevel":
            if step.get("add_prefix_space"):
                raise ValueError(f"{path}: ByteLevel pre-tokenizer with add_prefix_space is not supported")
            byte_level = True
            if step.get("use_regex", True):
                patterns.append(GPT2_SPLIT_PATTERN)
        elif kind == "Digits" and step.get("individual_digits") and not patterns:
            digits = True
        else:
            raise ValueError(f"{path}: pre-tokenizer {kind!r} ({step}) is not supported"
                             + (f": {BYTE_LEVEL_ONLY}" if kind == "Metaspace" else ""))
    if not byte_level:
        raise ValueError(f"{path}: the pre-tokenizer has no ByteLevel step, so this is not byte-level BPE: "
                         f"{BYTE_LEVEL_ONLY}")
    if digits:
        if patterns != [GPT2_SPLIT_PATTERN]:
            raise ValueError(f"{path}: a Digits pre-tokenizer is supported only right before ByteLevel with its "
                             f"own split (use_regex), as SmolLM and StarCoder have it")
        patterns = [GPT2_DIGITS_SPLIT_PATTERN]
    if len(patterns) > 1:
        raise ValueError(f"{path}: the pre-tokenizer splits text {len(patterns)} times in a row, which one "
                         f"tiktoken pattern cannot express")
    pattern = patterns[0] if patterns else r"(?s:.+)"  # no split: the whole text is one piece
    try:
        matched = "".join(match[0] for match in regex.finditer(pattern, COVERAGE_PROBE))
    except regex.error as error:
        raise ValueError(f"{path}: the split pattern {pattern!r} does not compile: {error}") from None
    if matched != COVERAGE_PROBE:
        raise ValueError(f"{path}: the split pattern {pattern!r} leaves some text unmatched, which Hugging Face "
                         f"keeps but tiktoken would drop")
    return pattern


def _added_tokens(path: Path, added: list[dict], normalizer: str | None) -> tuple[dict[str, int], set[str]]:
    """{text: id} of the added tokens, and the texts of those that plain text may contain ("special": false)."""
    special_tokens, text_tokens = {}, set()
    for token in added:
        content = token["content"]
        stripping = [flag for flag in ("lstrip", "rstrip", "single_word") if token.get(flag)]
        if stripping:
            raise ValueError(f"{path}: added token {content!r} has {', '.join(stripping)}, which nanostack does "
                             f"not implement")
        if normalizer and token.get("normalized"):
            raise ValueError(f"{path}: added token {content!r} is matched after the {normalizer} normalizer "
                             f"(normalized: true); nanostack matches added tokens before normalizing")
        special_tokens[content] = token["id"]
        if not token.get("special"):
            text_tokens.add(content)
    return special_tokens, text_tokens


def _ranks(path: Path, vocab: dict[str, int], merges: list, added_ids: set[int]):
    """(mergeable_ranks {bytes: rank}, token_ids) for tiktoken from the vocabulary and merges.

    tiktoken merges the adjacent pair whose joined bytes have the lowest rank, and returns ranks as token
    ids; Hugging Face merges the pair listed first in `merges`. So each token's rank must follow the first
    merge that makes it (tokens no merge makes, reachable only as a whole piece, come after those). Single
    bytes are never made by a merge, so their ranks only need to be distinct. When the vocabulary's ids
    already increase in that order (GPT-2, Llama 3, Qwen2, anything `tokenizers` trained), the ids are the
    ranks and token_ids is None; otherwise the ranks are the merge order and token_ids[rank] is the id.
    """
    char_to_byte = {char: byte for byte, char in enumerate(byte_level_alphabet())}

    def to_bytes(token: str) -> bytes:
        try:
            return bytes(char_to_byte[char] for char in token)
        except KeyError as error:
            raise ValueError(f"{path}: vocabulary entry {token!r} has the character {error.args[0]!r}, outside "
                             f"GPT-2's byte-level alphabet: {BYTE_LEVEL_ONLY}") from None

    ordinary = {to_bytes(token): token_id for token, token_id in vocab.items() if token_id not in added_ids}
    missing = [byte for byte in range(256) if bytes([byte]) not in ordinary]
    if missing:
        raise ValueError(f"{path}: the vocabulary lacks the byte tokens {missing[:8]}... (byte-level BPE needs all "
                         f"256, or some text could not be encoded)")
    first_merge = {}
    for index, merge in enumerate(merges):
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        joined = to_bytes(left + right)
        if joined not in ordinary:
            raise ValueError(f"{path}: merge {index} ({left!r}, {right!r}) makes {left + right!r}, which is not "
                             f"in the vocabulary")
        first_merge.setdefault(joined, index)
    order = sorted(ordinary, key=lambda token: (len(token) > 1, first_merge.get(token, len(merges)), ordinary[token]))
    merged_ids = [ordinary[token] for token in order if len(token) > 1]
    if all(a < b for a, b in zip(merged_ids, merged_ids[1:])):
        return ordinary, None
    return {token: rank for rank, token in enumerate(order)}, [ordinary[token] for token in order]


def _bos_id(path: Path, post_processor: dict | None) -> int | None:
    """The token Hugging Face's post-processor puts before a text (Llama 3's <|begin_of_text|>), or None."""
    bos_id = None
    for step in _steps(post_processor, "processors"):
        if step["type"] == "ByteLevel":
            continue
        if step["type"] != "TemplateProcessing":
            raise ValueError(f"{path}: post-processor {step['type']!r} is not supported")
        pieces = step["single"]
        text_at = next(i for i, piece in enumerate(pieces) if "Sequence" in piece)
        if text_at > 1 or len(pieces) > text_at + 1:
            raise ValueError(f"{path}: post-processor template {pieces} adds tokens other than one before the text, "
                             f"which nanostack does not do")
        if text_at == 1:
            bos_id = step["special_tokens"][pieces[0]["SpecialToken"]["id"]]["ids"][0]
    return bos_id


def _read_json(path: Path) -> dict:
    """A JSON object file, or {} when there is none."""
    if not path.exists():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} holds a {type(value).__name__}, expected a JSON object")
    return value


def _token_text(value):
    """A special token as tokenizer_config.json writes it: a string, or {"content": ..., "__type": "AddedToken"}."""
    return value.get("content") if isinstance(value, dict) else value


def _chat_template(directory: Path, tokenizer_config: dict) -> str | None:
    """The default chat template: chat_template.jinja (which transformers prefers), else tokenizer_config.json's
    chat_template (a string, or a list of {"name", "template"}); None when there is none."""
    source = directory / "chat_template.jinja"
    if source.exists():
        template = source.read_text(encoding="utf-8")
    else:
        source, template = directory / "tokenizer_config.json", tokenizer_config.get("chat_template")
    if isinstance(template, list):
        named = {item.get("name"): item.get("template") for item in template if isinstance(item, dict)}
        if "default" not in named:
            raise ValueError(f"{source}: chat_template names {sorted(map(str, named))} but no 'default' template")
        template = named["default"]
    if template is not None:
        if not isinstance(template, str):
            raise ValueError(f"{source}: chat_template must be a string, got {type(template).__name__}")
        try:
            compile_chat_template(template)
        except ValueError as error:
            raise ValueError(f"{source}: {error}") from None
    return template


# ----------------------------------------------------------------------------------------------------------
# Out

def write_hf_files(tokenizer, tokenizer_json) -> None:
    """Write `tokenizer` as Hugging Face files, each atomically: `tokenizer_json`, and beside it
    tokenizer_config.json (chat template, bos/eos text) and generation_config.json (bos/eos ids). The other
    fields of the config files the tokenizer was read with are carried forward."""
    tokenizer_json = Path(tokenizer_json)
    read_with = tokenizer.hf_config or {}
    tokenizer_config = {**read_with.get("tokenizer_config", {}), "tokenizer_class": TOKENIZER_CLASS,
                        "clean_up_tokenization_spaces": False, **tokenizer.special_tokens_map}
    if tokenizer.chat_template is not None:
        tokenizer_config["chat_template"] = tokenizer.chat_template
    stops = [tokenizer.eos_id, *sorted(tokenizer.stop_ids - {tokenizer.eos_id})]
    generated = {"eos_token_id": stops if len(stops) > 1 else stops[0]}
    if tokenizer.bos_id is not None:
        generated["bos_token_id"] = tokenizer.bos_id
    # The ids read with a tokenizer mean the same as ours; keep them as written (list order, extra fields).
    generation_config = {**generated, **read_with.get("generation_config", {})}
    for file, content in ((tokenizer_json, hf_tokenizer_json(tokenizer)),
                          (tokenizer_json.parent / "tokenizer_config.json", tokenizer_config),
                          (tokenizer_json.parent / "generation_config.json", generation_config)):
        with atomic_file(file, "w") as f:
            json.dump(content, f, ensure_ascii=False)


def hf_tokenizer_json(tokenizer) -> dict:
    """The tokenizer.json content of a Tokenizer (see the module docstring for why the merges are these)."""
    alphabet = byte_level_alphabet()
    ranks = tokenizer.mergeable_ranks

    def text(token: bytes) -> str:
        return "".join(alphabet[byte] for byte in token)

    vocabulary = tokenizer.vocabulary()
    merges = []
    for token, _ in vocabulary:
        splits = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
        merges += [[text(left), text(right)] for left, right in
                   sorted(splits, key=lambda pair: (ranks[pair[0]], ranks[pair[1]]))]
    added_text = {token_id: content for content, token_id in tokenizer.special_tokens.items()}
    post_processor = None
    if tokenizer.bos_id is not None:
        bos = added_text.get(tokenizer.bos_id) or next(text(t) for t, i in vocabulary if i == tokenizer.bos_id)
        first, second = ([{"SpecialToken": {"id": bos, "type_id": i}}, {"Sequence": {"id": text_id, "type_id": i}}]
                         for i, text_id in enumerate("AB"))
        post_processor = {"type": "TemplateProcessing", "single": first, "pair": first + second,
                          "special_tokens": {bos: {"id": bos, "ids": [tokenizer.bos_id], "tokens": [bos]}}}
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": token_id, "content": content, "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": content not in tokenizer.text_tokens}
                         for token_id, content in sorted(added_text.items())],
        "normalizer": {"type": tokenizer.normalizer} if tokenizer.normalizer else None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": tokenizer.pattern}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "post_processor": post_processor,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": {text(token): token_id for token, token_id in vocabulary}, "merges": merges},
    }
