"""Qwen-VL's tokenizer on ``tiktoken``: the ``qwen.tiktoken`` BPE ranks, then the special tokens.

Special-token layout (ids continue after the last BPE rank; 151,643 ranks in the official file):
``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``, ``<|extra_0|>`` .. ``<|extra_204|>``, then ``<ref>``,
``</ref>``, ``<box>``, ``</box>``, ``<quad>``, ``</quad>``, ``<img>``, ``</img>``, ``<imgpad>``. With the official
file: ``<|endoftext|>`` 151643, ``<ref>`` 151851, ``<box>`` 151853, ``<img>`` 151857, ``<imgpad>`` 151859.

Encoding follows the official tokenizer id for id: NFC normalisation, every special token's text is
allowed in the input, and each ``<img>PATH</img>`` becomes ``<img>``, the UTF-8 bytes of PATH as ids
(byte value = id), ``<imgpad>`` up to ``image_token_span`` positions (256 in the official model; a tiny
model's ``n_queries``), ``</img>``. The model replaces those positions with image features, so PATH may be
empty. No font, no network: drawing boxes is left to the caller.
"""

from __future__ import annotations

import base64
import os
import unicodedata

import tiktoken
from transformers import AddedToken, PreTrainedTokenizer

# Qwen's pre-tokenisation regex (digits split one per token). Its one home: Qwen-VL's tiktoken ranks use it
# here, and the tiny chat tokenizers of sc_tune.tiny.chat use it for their `tokenizer.json`.
PAT_STR = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
EXTRA_TOKENS = tuple(f"<|extra_{i}|>" for i in range(205))
IMAGE_TAGS = ("<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>", "<img>", "</img>", "<imgpad>")
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END, *EXTRA_TOKENS, *IMAGE_TAGS)
VOCAB_FILE = "qwen.tiktoken"
OFFICIAL_IMAGE_SPAN = 256


def load_tiktoken_ranks(path: str) -> dict[bytes, int]:
    ranks = {}
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token_b64, rank = line.split()
                ranks[base64.b64decode(token_b64)] = int(rank)
            except ValueError as err:
                raise ValueError(f"{path}, line {line_no}: expected '<base64 token> <rank>', got {line[:80]!r}") from err
    return ranks


def save_tiktoken_ranks(ranks: dict[bytes, int], path: str) -> None:
    with open(path, "w", encoding="utf8") as f:
        for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(f"{base64.b64encode(token).decode('utf8')} {rank}\n")


class QWenTokenizer(PreTrainedTokenizer):
    """Slow (Python) tokenizer compatible with the official ``QWenTokenizer``'s files and ids."""

    vocab_files_names = {"vocab_file": VOCAB_FILE}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file: str, errors: str = "replace", image_token_span: int = OFFICIAL_IMAGE_SPAN,
                 **kwargs):
        self.vocab_file = vocab_file
        self.errors = errors
        self.image_token_span = int(image_token_span)
        self.mergeable_ranks = load_tiktoken_ranks(vocab_file)
        self.special_tokens = {tok: len(self.mergeable_ranks) + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self.encoding = tiktoken.Encoding(
            "Qwen", pat_str=PAT_STR, mergeable_ranks=self.mergeable_ranks, special_tokens=self.special_tokens
        )
        self.decoder: dict[int, bytes | str] = {v: k for k, v in self.mergeable_ranks.items()}
        self.decoder.update({v: k for k, v in self.special_tokens.items()})
        self.eod_id = self.special_tokens[ENDOFTEXT]
        self.img_start_id = self.special_tokens["<img>"]
        self.img_end_id = self.special_tokens["</img>"]
        self.img_pad_id = self.special_tokens["<imgpad>"]
        self.image_special_ids = {self.special_tokens[t] for t in IMAGE_TAGS[:6]}
        kwargs.setdefault("eos_token", ENDOFTEXT)
        kwargs.setdefault("pad_token", ENDOFTEXT)
        kwargs.setdefault("padding_side", "left")
        super().__init__(errors=errors, image_token_span=self.image_token_span, **kwargs)

    # ------------------------------------------------------------------ vocabulary
    def __len__(self) -> int:
        return self.encoding.n_vocab

    @property
    def vocab_size(self) -> int:
        return self.encoding.n_vocab

    def get_vocab(self) -> dict[bytes | str, int]:
        return {**self.mergeable_ranks, **self.special_tokens}

    def _add_tokens(self, new_tokens, special_tokens: bool = False) -> int:
        # The vocabulary is fixed; only the built-in special tokens may be "added" (transformers re-adds
        # eos/pad at init).
        for token in new_tokens:
            text = token.content if isinstance(token, AddedToken) else token
            if text not in self.special_tokens:
                raise ValueError(f"QWenTokenizer cannot add token {text!r}: its vocabulary is fixed")
        return 0

    def convert_tokens_to_ids(self, tokens):
        # As the official tokenizer: an unknown token gives None (there is no unknown token). The one home of
        # token -> id: transformers calls its `_convert_token_to_id` hook only from the `convert_tokens_to_ids` this
        # replaces, so the class defines no such hook.
        if isinstance(tokens, (str, bytes)):
            return self.special_tokens.get(tokens, self.mergeable_ranks.get(tokens))
        return [self.special_tokens.get(t, self.mergeable_ranks.get(t)) for t in tokens]

    def _convert_id_to_token(self, index: int) -> bytes | str:
        if index not in self.decoder:
            raise ValueError(f"QWenTokenizer: unknown id {index}")
        return self.decoder[index]

    # ------------------------------------------------------------------ encoding
    def encode_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` (special-token texts allowed, image spans expanded)."""
        ids = self.encoding.encode(unicodedata.normalize("NFC", text), allowed_special="all")
        out, i = [], 0
        while i < len(ids):
            if ids[i] != self.img_start_id:
                out.append(ids[i])
                i += 1
                continue
            try:
                end = ids.index(self.img_end_id, i + 1)
            except ValueError:
                raise ValueError(f"QWenTokenizer: <img> without </img> in {text[:200]!r}") from None
            path_bytes = b"".join(self.decoder[t] if isinstance(self.decoder[t], bytes)
                                  else self.decoder[t].encode("utf8") for t in ids[i + 1 : end])
            if len(path_bytes) > self.image_token_span:
                raise ValueError(
                    f"QWenTokenizer: the text between <img> and </img> is {len(path_bytes)} bytes; at most "
                    f"{self.image_token_span} fit in an image span"
                )
            out += [self.img_start_id, *path_bytes, *[self.img_pad_id] * (self.image_token_span - len(path_bytes)),
                    self.img_end_id]
            i = end + 1
        return out

    def tokenize(self, text: str, **kwargs) -> list[bytes | str]:
        return [self.decoder[i] for i in self.encode_ids(text)]

    def _tokenize(self, text, **kwargs):
        return self.tokenize(text)

    # ------------------------------------------------------------------ decoding
    def _collapse_image_spans(self, ids: list[int]) -> list[int]:
        """``<img>`` + path bytes + padding + ``</img>`` -> ``<img>`` + the path's BPE tokens + ``</img>``."""
        out, i = [], 0
        while i < len(ids):
            if ids[i] != self.img_start_id or self.img_end_id not in ids[i + 1 :]:
                out.append(ids[i])
                i += 1
                continue
            end = ids.index(self.img_end_id, i + 1)
            inner = ids[i + 1 : end]
            if self.img_pad_id in inner:
                inner = inner[: inner.index(self.img_pad_id)]
            path = bytes(b for b in inner if 0 <= b < 256).decode("utf8", errors=self.errors)
            out += [self.img_start_id, *self.encoding.encode_ordinary(path), self.img_end_id]
            i = end + 1
        return out

    def _decode(self, token_ids, skip_special_tokens: bool = False, errors: str | None = None, **kwargs) -> str:
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        ids = self._collapse_image_spans([int(t) for t in token_ids])
        if skip_special_tokens:
            keep_image_tags = kwargs.get("keep_image_special", False)
            ids = [i for i in ids if i < self.eod_id or (keep_image_tags and i in self.image_special_ids)]
        return self.encoding.decode(ids, errors=errors or self.errors)

    def convert_tokens_to_string(self, tokens) -> str:
        pieces, pending = [], b""
        for token in tokens:
            if isinstance(token, bytes):
                pending += token
                continue
            if pending:
                pieces.append(pending.decode("utf8", errors=self.errors))
                pending = b""
            pieces.append(token)
        if pending:
            pieces.append(pending.decode("utf8", errors=self.errors))
        return "".join(pieces)

    # ------------------------------------------------------------------ files
    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        path = os.path.join(save_directory, (filename_prefix + "-" if filename_prefix else "") + VOCAB_FILE)
        save_tiktoken_ranks(self.mergeable_ranks, path)
        return (path,)
