"""Hugging Face tokenizer files built here with `tokenizers` (no download), for test_hf_tokenizer.py and
test_hf_end_to_end.py: byte-level BPE trained on standard-library sources, with the split patterns of Llama 3 and
Qwen2 and a ChatML chat template written from the format's documented layout."""
import itertools
import json

from tokenizers import AddedToken, Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, processors, \
    trainers

from nanostack.data import stdlib_documents

LLAMA3_STYLE_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                      r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_STYLE_SPLIT = LLAMA3_STYLE_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")  # one digit per piece
# ChatML: <|im_start|>role, newline, content, <|im_end|>, newline.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def corpus(skip: int, count: int) -> list[str]:
    """`count` standard-library sources, every 7th from the `skip`-th on (training and test use other ones)."""
    return [doc.text for doc in itertools.islice(stdlib_documents(), skip, skip + 7 * count, 7)]


def train_hf(directory, pre_tokenizer, specials, text_tokens=(), normalizer=None, bos=None):
    """A byte-level BPE tokenizer.json trained with `tokenizers`, with added tokens after the vocabulary."""
    tokenizer = HFTokenizer(models.BPE())
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1200, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(corpus(0, 40), trainer)
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in specials])
    tokenizer.add_tokens([AddedToken(token, special=False, normalized=False) for token in text_tokens])
    if bos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.token_to_id(bos))])
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    return tokenizer


def split_then_bytes(pattern: str):
    """Llama 3's and Qwen2's pre-tokenizer: a regex Split, then ByteLevel without its own split."""
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), "isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def write_json(path, content):
    path.write_text(json.dumps(content))
