"""The Tekken side of `MistralTokenizer`: mistral-common's tiktoken-based tokenizer files.

A Tekken file (`tekken_240718.json`, a hub repo's `tekken.json`) holds byte-level BPE ranks, the
tiktoken split pattern and the special tokens, which take the first ids (1000 of them; regular
tokens follow).  Encoding runs `tiktoken` on exactly these ranks and pattern, as mistral-common's
`Tekkenizer` does, so plain-text ids are tiktoken's by construction.  The Hugging Face export is
transformers' own Tekken converter (through `mistral_tune.compat.transformers`), with BOS added
as our SentencePiece export adds it.

tiktoken, tokenizers and mistral-common are imported when a file is loaded, not with this module.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Sequence
from itertools import groupby
from pathlib import Path
from typing import Any, Optional

from mistral_tune.models.tokenizer.files import TEKKEN

# Converted Hugging Face tokenizers by content digest: converting 130k ranks takes seconds, and
# every Tekken file mistral-common ships so far has the same vocabulary.
_HF_JSON: dict[str, str] = {}


def _special_tokens(raw: dict[str, Any]) -> list[str]:
    """The special tokens' strings by id, as mistral-common's `Tekkenizer.from_file` lays them out."""
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

    listed = raw.get("special_tokens")
    if listed is None:  # files older than tokenizer v7 leave them to mistral-common's defaults
        listed = list(Tekkenizer.DEPRECATED_SPECIAL_TOKENS)
    if [t["rank"] for t in listed] != list(range(len(listed))):
        raise ValueError("Tekken special tokens must have the ranks 0, 1, 2, ... in order")
    strings = [str(getattr(t["token_str"], "value", t["token_str"])) for t in listed]
    count = raw["config"]["default_num_special_tokens"]
    return strings + [Tekkenizer.SPECIAL_TOKEN_TEMPLATE.format(id=i) for i in range(len(strings), count)]


class TekkenBackend:
    """A Tekken tokenizer file, encoded with tiktoken."""

    kind = TEKKEN
    # Not "tekken.json": transformers swaps AutoTokenizer for its mistral-common backend when a
    # directory has a file of that exact name, and the exported tokenizer.json would go unused.
    # mistral-common's own loader accepts any "*tekken*.json".
    saved_name = "mistral_tune_tekken.json"

    def __init__(self, path: str | Path) -> None:
        import tiktoken

        self.model_file = Path(path)
        raw = json.loads(self.model_file.read_text(encoding="utf-8"))
        config = raw["config"]
        self.version: str = config.get("version", "")
        self.special_pieces = _special_tokens(raw)
        self.num_special = len(self.special_pieces)
        self.vocabulary_size: int = config["default_vocab_size"]
        inner = raw["vocab"][: self.vocabulary_size - self.num_special]
        ranks = {base64.b64decode(t["token_bytes"]): i for i, t in enumerate(inner)}
        if len(ranks) != len(inner) or any(t["rank"] != i for i, t in enumerate(inner)):
            raise ValueError(f"{self.model_file}: Tekken ranks must be unique and in order")
        self._tiktoken = tiktoken.Encoding(
            name=self.model_file.stem, pat_str=config["pattern"], mergeable_ranks=ranks, special_tokens={}
        )
        self._ids = {piece: i for i, piece in enumerate(self.special_pieces)}
        self.special_ids = frozenset(range(self.num_special))
        self.bos_id: int = self._ids["<s>"]
        self.eos_id: int = self._ids["</s>"]
        self.unk_id: int = self._ids["<unk>"]
        # Tekken has its own <pad>; never EOS (see SentencePieceBackend.pad_id for why).
        self.pad_id: int = self._ids.get("<pad>", self.unk_id)
        digest = hashlib.sha256(config["pattern"].encode())
        digest.update("\n".join(self.special_pieces).encode())
        digest.update("\n".join(t["token_bytes"] for t in inner).encode())
        self._digest = digest.hexdigest()

    def control_id(self, piece: str) -> Optional[int]:
        return self._ids.get(piece)

    def id_to_piece(self, i: int) -> str:
        return self.decode([i], skip_special_tokens=False)

    def encode(self, text: str) -> list[int]:
        # Special-token strings in text are text, as in mistral-common (its tiktoken has none).
        return [t + self.num_special for t in self._tiktoken.encode_ordinary(text)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        # As mistral-common: each run of regular tokens is decoded on its own (invalid UTF-8 becomes
        # U+FFFD), special tokens are dropped or written as their strings.
        out = []
        for special, run in groupby((int(i) for i in ids), lambda i: i < self.num_special):
            if not special:
                out.append(self._tiktoken.decode([i - self.num_special for i in run]))
            elif not skip_special_tokens:
                out.extend(self.special_pieces[i] for i in run)
        return "".join(out)

    def hf_backend(self) -> Any:
        """The equivalent `tokenizers.Tokenizer` (BOS added by its post-processor), built once."""
        from tokenizers import Tokenizer, processors

        if self._digest not in _HF_JSON:
            from mistral_tune.compat.transformers import tekken_to_tokenizers

            tok = tekken_to_tokenizers(self.model_file)
            bos = self.special_pieces[self.bos_id]
            tok.post_processor = processors.Sequence(
                [
                    tok.post_processor,
                    processors.TemplateProcessing(
                        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, self.bos_id)]
                    ),
                ]
            )
            _HF_JSON[self._digest] = tok.to_str()
        return Tokenizer.from_str(_HF_JSON[self._digest])
