"""Exact Mistral tokenizers: SentencePiece and Tekken files, the chat formats, a Hugging Face export.

- `files`: the tokenizer files mistral-common ships (version, kind, default chat format);
- `chat_formats`: v1, v3, v7 and tekken, defined once (ids and the exported Jinja template);
- `sentencepiece`, `tekken`: the two kinds of file, exact by construction (sentencepiece, tiktoken);
- `mistral_tokenizer`: `MistralTokenizer`, the public class, and `load_tokenizer` (a preset's tokenizer).

Importing this package is cheap: sentencepiece, tiktoken and transformers load with a file.
"""

from mistral_tune.models.tokenizer.chat_formats import CHAT_FORMATS, CHAT_TEMPLATES, ChatFormat
from mistral_tune.models.tokenizer.files import (
    SENTENCEPIECE,
    TEKKEN,
    TOKENIZER_FILES,
    TokenizerFile,
    shipped_tokenizer_files,
    tokenizer_file,
)
from mistral_tune.models.tokenizer.mistral_tokenizer import (
    SIDECAR_FILE,
    MistralTokenizer,
    infer_chat_template,
    load_preset_tokenizer,
    load_tokenizer,
)

__all__ = [
    "CHAT_FORMATS",
    "CHAT_TEMPLATES",
    "SENTENCEPIECE",
    "SIDECAR_FILE",
    "TEKKEN",
    "TOKENIZER_FILES",
    "ChatFormat",
    "MistralTokenizer",
    "TokenizerFile",
    "infer_chat_template",
    "load_preset_tokenizer",
    "load_tokenizer",
    "shipped_tokenizer_files",
    "tokenizer_file",
]
