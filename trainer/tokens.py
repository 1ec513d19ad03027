"""New tokens: placeholder ids, prompt substitution on token boundaries, and the embedding layer.

How a concept becomes input to the text encoder, without touching the vocabulary:

* Every concept gets ``n`` learned vectors. They live in ONE fp32 parameter ``new`` of shape
  ``[sum(n), width]`` inside :class:`TIEmbedding`, which wraps the encoder's frozen
  ``token_embedding``. The original vocabulary is never resized, never modified and never
  handed to the optimizer.
* Placeholder ids are ``vocab_size + row``: an id past the vocabulary selects a row of ``new``.
* Prompts are tokenised by :class:`ConceptVocab`: it finds concept tokens *on token boundaries*
  (longest first, case-insensitive like CLIP), tokenises the text between them with the real
  tokenizer and splices the placeholder ids in. So ``det-logo`` and ``det-logo-demo`` in one job
  never mix ("det-logo-demo" is matched whole, and "det-logo" does not match inside it), and no
  prompt is ever edited with a plain ``str.replace``.
* A concept token that is already a word of the vocabulary (``cat``, ``sks``), or that clashes
  with another concept's multi-vector names (``tok_1``... as diffusers registers them), is
  refused with a message that says why and what to pick instead.

SDXL: each text encoder gets its own TIEmbedding (``clip_l`` 768 wide, ``clip_g`` 1280 wide);
ConceptVocab is shared, because both SDXL tokenizers have the same vocabulary. The learned rows of
all encoders are ONE fp32 parameter ``[sum(n), 768 + 1280]``; each encoder's layer reads its block
of columns (:func:`install_all`), so one optimizer, one all-reduce and one checkpoint tensor serve
any number of encoders.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch
from torch import nn

from .errors import ConfigError

log = logging.getLogger("tinv.trainer")


@dataclass(frozen=True)
class ConceptTokens:
    token: str
    vectors: int
    init_ids: tuple[int, ...]  # one vocabulary id per vector (the initializer's tokens, cycled/cut)
    initializer: str


class ConceptVocab:
    """Placeholder ids and boundary-aware prompt tokenisation for the concepts of one job."""

    def __init__(self, tokenizer, concepts: list[tuple[str, str, int | None]], table_size: int = 0, *, training: bool = False):
        """concepts: (token, initializer phrase, explicit vector count or None). table_size: rows of
        the encoder's embedding table, which may exceed the tokenizer's vocabulary (padded tables):
        placeholder ids start past both. training: the tokens name new files, so they must load the
        same in diffusers (lower case) and the derived vector count must fit in a prompt."""
        self.training = training
        self.tokenizer = tokenizer
        self.vocab = tokenizer.get_vocab()
        self.base_size = max(len(self.vocab), int(table_size))
        self.max_length = int(getattr(tokenizer, "model_max_length", 77) or 77)
        if self.max_length > 1000:  # tokenizers without a limit report 1e30
            self.max_length = 77
        self.bos = tokenizer.bos_token_id
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos
        self.concepts: list[ConceptTokens] = []
        self.offsets: dict[str, int] = {}
        seen: dict[str, str] = {}
        row = 0
        for token, initializer, vectors in concepts:
            self._check_token(token, seen)
            init_ids = self.text_ids(initializer) if initializer and initializer.strip() else []
            n = vectors or max(1, len(init_ids))
            if training and not vectors and n > self.room:
                # The same limit as an explicit `vectors` (75): rows past a prompt's room are never
                # seen by the text encoder, so they would never be trained (diffusers drops them too).
                raise ConfigError(
                    f"concept {token!r}: its initializer {initializer[:60]!r}... is {n} tokens long, and one vector per token "
                    f"gives {n} vectors -- more than the {self.room} a prompt holds. Shorten the initializer, or set the "
                    f"concept's vectors (at most {self.room}; the initializer is then repeated or cut to fit)"
                )
            if training:
                log.info("concept %r: %d vector%s (%s)", token, n, "" if n == 1 else "s",
                         "set by vectors" if vectors else f"one per token of the initializer {initializer!r}")
            if init_ids:
                # AUTOMATIC1111's rule: vector i copies initializer token i*len//n (repeat or cut).
                ids = tuple(init_ids[i * len(init_ids) // n] for i in range(n))
            else:
                ids = ()
            c = ConceptTokens(token=token, vectors=n, init_ids=ids, initializer=initializer or "")
            self.concepts.append(c)
            self.offsets[token] = row
            row += n
            seen[token.lower()] = token
            for i in range(1, n):
                seen[f"{token}_{i}".lower()] = token
        self.num_new = row
        # Multi-vector names (tok_1...) of one concept must not equal another concept's token.
        for c in self.concepts:
            for i in range(1, c.vectors):
                alias = f"{c.token}_{i}".lower()
                for other in self.concepts:
                    if other is not c and other.token.lower() == alias:
                        raise ConfigError(
                            f"concept token {other.token!r} collides with the name diffusers gives vector {i} of "
                            f"{c.token!r} ({c.token}_{i}); rename one of them"
                        )
        toks = sorted((c.token for c in self.concepts), key=len, reverse=True)
        # A match must not be glued to word characters or '-' on either side: that is what makes
        # "det-logo" not match inside "det-logo-demo" or "mydet-logo".
        self._pattern = re.compile(
            r"(?<![\w-])(" + "|".join(re.escape(t) for t in toks) + r")(?![\w-])", re.IGNORECASE
        ) if toks else None
        self._by_lower = {c.token.lower(): c for c in self.concepts}
        self._cache: dict[str, list[int]] = {}

    # ------------------------------------------------------------------ checks
    def _check_token(self, token: str, seen: dict[str, str]) -> None:
        if not token or re.search(r"\s", token):
            raise ConfigError(f"concept token {token!r} must be one word without spaces")
        if "{}" in token:
            raise ConfigError(f"concept token {token!r} must not contain '{{}}' (that is the template slot)")
        if not re.search(r"\w", token):
            raise ConfigError(f"concept token {token!r} needs at least one letter or digit")
        if self.training and ("/" in token or "\\" in token):
            raise ConfigError(f"concept token {token!r} must not contain '/' or '\\' (it names the embedding files)")
        if self.training and token != token.lower():
            raise ConfigError(
                f"concept token {token!r} must be lower case: CLIP lower-cases prompts, and diffusers' load_textual_inversion "
                f"would use only the first vector of a capitalised multi-vector token. Write {token.lower()!r}"
            )
        low = token.lower()
        if low in seen:
            if seen[low] == token or seen[low].lower() == low:
                raise ConfigError(
                    f"concept token {token!r} is used twice (tokens are matched case-insensitively, as CLIP lower-cases prompts)"
                )
            raise ConfigError(f"concept token {token!r} collides with the multi-vector name of {seen[low]!r}")
        special = {str(t).lower() for t in getattr(self.tokenizer, "all_special_tokens", [])}
        if low in special:
            raise ConfigError(f"concept token {token!r} is a special token of the tokenizer")
        pieces = self.tokenizer.tokenize(low)
        if token in self.vocab or low in self.vocab or (len(pieces) == 1 and pieces[0] in self.vocab):
            shown = pieces[0] if len(pieces) == 1 else token
            raise ConfigError(
                f"concept token {token!r} is already a word of the model's vocabulary ({shown!r}, id "
                f"{self.vocab.get(shown, self.vocab.get(token))}): a learned embedding would shadow it, and "
                f"diffusers' load_textual_inversion refuses such tokens. Pick a new word, e.g. '<{low}>' or '{low}-tinv'."
            )

    @property
    def room(self) -> int:
        """Content tokens a prompt can hold (the encoder's length minus BOS and EOS)."""
        return self.max_length - 2

    def fit_table(self, table_size: int) -> None:
        """Place the placeholder ids past an embedding table of `table_size` rows (known once the
        text encoder is loaded; the vocabulary and its checks came from the tokenizer alone)."""
        if int(table_size) > self.base_size:
            self.base_size = int(table_size)
            self._cache.clear()

    def split_rows(self, weights: torch.Tensor) -> dict[str, torch.Tensor]:
        """{token: its rows} of a [num_new, width] matrix of new vectors (copies)."""
        return {c.token: weights[self.offsets[c.token] : self.offsets[c.token] + c.vectors].clone() for c in self.concepts}

    def missing_vectors(self, prompt: str) -> list[str]:
        """Concepts whose vectors the prompt does not hold in full once tokenised and cut to the
        encoder's length: [] when every vector of every concept it should teach is there."""
        row = set(self.batch([prompt])[0].tolist())
        out = []
        for c in self.concepts:
            start = self.base_size + self.offsets[c.token]
            if not set(range(start, start + c.vectors)) <= row:
                out.append(c.token)
        return out

    def initializer_text(self, c: ConceptTokens) -> str:
        """A phrase of exactly ``c.vectors`` tokens, for files whose readers recount the vectors
        from the initializer (the Determined pipeline asserts len(tokens(initializer_strs)) ==
        vectors): the initializer itself when it fits, else its tokens repeated or cut to fit."""
        n = c.vectors
        candidates = [c.initializer]
        if c.init_ids:
            candidates.append(self.tokenizer.decode(list(c.init_ids)).strip())
            candidates.append(" ".join([self.tokenizer.decode([c.init_ids[0]]).strip()] * n))
        candidates.append(" ".join(["*"] * n))
        for text in candidates:
            if text and len(self.text_ids(text)) == n:
                return text
        return candidates[-1]

    # ------------------------------------------------------------------ tokenisation
    def text_ids(self, text: str) -> list[int]:
        """Plain tokenizer ids for text, no special tokens, no concept handling."""
        if not text.strip():
            return []
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def split(self, prompt: str) -> list[str | ConceptTokens]:
        """The prompt as text pieces and concepts, found on token boundaries."""
        if self._pattern is None:
            return [prompt]
        out: list[str | ConceptTokens] = []
        pos = 0
        for m in self._pattern.finditer(prompt):
            if m.start() > pos:
                out.append(prompt[pos : m.start()])
            out.append(self._by_lower[m.group(1).lower()])
            pos = m.end()
        if pos < len(prompt):
            out.append(prompt[pos:])
        return out

    def ids(self, prompt: str, initializer: bool = False) -> list[int]:
        """Content ids of a prompt: concepts become placeholder ids (or, with initializer=True, the
        vocabulary ids their vectors were initialised from -- same length, for hidden-state reg)."""
        key = ("I" if initializer else "P") + prompt
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        out: list[int] = []
        for piece in self.split(prompt):
            if isinstance(piece, ConceptTokens):
                if initializer and piece.init_ids:
                    out.extend(piece.init_ids)
                else:
                    start = self.base_size + self.offsets[piece.token]
                    out.extend(range(start, start + piece.vectors))
            else:
                out.extend(self.text_ids(piece))
        if len(self._cache) < 100_000:
            self._cache[key] = out
        return out

    def batch(self, prompts: list[str], initializer: bool = False) -> torch.Tensor:
        """[B, max_length] ids: BOS, content (truncated), EOS, padding -- CLIP's layout."""
        rows = []
        for p in prompts:
            content = self.ids(p, initializer)[: self.max_length - 2]
            row = [self.bos, *content, self.eos]
            row += [self.pad] * (self.max_length - len(row))
            rows.append(row)
        return torch.tensor(rows, dtype=torch.long)

    def placeholder_prompt(self, prompt: str) -> str:
        """The prompt with each concept spelled as diffusers names its vectors after
        load_textual_inversion ('tok tok_1 tok_2'); for pipelines that tokenise text themselves."""
        parts = []
        for piece in self.split(prompt):
            if isinstance(piece, ConceptTokens):
                parts.append(" ".join([piece.token] + [f"{piece.token}_{i}" for i in range(1, piece.vectors)]))
            else:
                parts.append(piece)
        return "".join(parts)


class TIEmbedding(nn.Module):
    """A frozen token embedding plus learned rows for ids at or past its vocabulary size.

    ``weight`` is the frozen base table (so code that inspects ``token_embedding.weight`` still
    works); ``new`` is the only trainable tensor, always fp32 so Adam's updates are exact
    regardless of the compute dtype.
    """

    def __init__(self, base: nn.Embedding, new: torch.Tensor, offset: int | None = None, columns: tuple[int, int] | None = None):
        """`new`: the rows (copied into a new parameter), or an existing parameter shared with other
        encoders' layers, of which this one reads `columns` (start, stop) -- SDXL's two encoders."""
        super().__init__()
        self.base = base
        self.base.weight.requires_grad_(False)
        self.num_base = base.num_embeddings if offset is None else int(offset)  # first placeholder id
        assert self.num_base >= base.num_embeddings
        self.new = new if isinstance(new, nn.Parameter) else nn.Parameter(new.detach().to(torch.float32).clone())
        self.columns = columns

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def num_embeddings(self) -> int:
        return self.num_base

    @property
    def embedding_dim(self) -> int:
        return self.base.embedding_dim

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        is_new = ids >= self.num_base  # placeholder ids; everything below is the frozen table
        out = self.base(torch.where(is_new, torch.zeros_like(ids), ids))
        rows = self.new if self.columns is None else self.new[:, self.columns[0] : self.columns[1]]
        new_rows = nn.functional.embedding(torch.where(is_new, ids - self.num_base, torch.zeros_like(ids)), rows)
        return torch.where(is_new.unsqueeze(-1), new_rows.to(out.dtype), out)


def token_embedding_of(text_encoder) -> nn.Module:
    """The token-embedding module of a CLIP text encoder (CLIPTextModel / WithProjection)."""
    return text_encoder.get_input_embeddings()


def install(text_encoder, init: torch.Tensor, offset: int | None = None) -> TIEmbedding:
    """Wrap the encoder's token embedding in a TIEmbedding whose new rows start at `init`;
    ids from `offset` (ConceptVocab.base_size) on select them."""
    current = text_encoder.get_input_embeddings()
    base = current.base if isinstance(current, TIEmbedding) else current
    layer = TIEmbedding(base, init.to(base.weight.device), offset)
    text_encoder.set_input_embeddings(layer)
    return layer


def install_all(encoders: list, init: torch.Tensor, offset: int | None = None) -> nn.Parameter:
    """Install the learned rows in every text encoder; returns THE parameter. With one encoder this
    is :func:`install`; with several (SDXL), `init` is ``[rows, sum of widths]`` and encoder i's layer
    reads its block of columns of the one shared parameter."""
    if len(encoders) == 1:
        return install(encoders[0], init, offset).new
    first = encoders[0].get_input_embeddings()
    device = (first.base if isinstance(first, TIEmbedding) else first).weight.device
    shared = nn.Parameter(init.detach().to(device, torch.float32).clone())
    start = 0
    for enc in encoders:
        current = enc.get_input_embeddings()
        base = current.base if isinstance(current, TIEmbedding) else current
        stop = start + base.embedding_dim
        enc.set_input_embeddings(TIEmbedding(base, shared, offset, columns=(start, stop)))
        start = stop
    if start != shared.shape[1]:
        raise ValueError(f"learned rows are {shared.shape[1]} wide; the text encoders need {start}")
    return shared


def initial_vectors(vocab: ConceptVocab, base_weight: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """[num_new, width] fp32: each vector a copy of its initializer token's embedding; vectors of
    a concept with no initializer start at random directions with the vocabulary's mean norm."""
    w = base_weight.detach().float().cpu()
    mean_norm = w.norm(dim=1).mean()
    rows = []
    for c in vocab.concepts:
        if c.init_ids:
            rows.append(w[list(c.init_ids)].clone())
        else:
            r = torch.randn(c.vectors, w.shape[1], generator=generator)
            rows.append(r / r.norm(dim=1, keepdim=True) * mean_norm)
    return torch.cat(rows, 0) if rows else torch.zeros(0, w.shape[1])
