"""Megatron-style tensor-parallel layers; at tensor_parallel_size 1 they are the plain layers.

- ``ColumnParallelLinear``: output features split across ranks. A fused projection (q|k|v, gate|up) splits each
  named part on its own, so a rank holds its q heads, its k/v heads and its gate/up slices side by side and runs one
  GEMM. KV heads fewer than ranks are replicated (rank r holds KV head ``r // (size / num_kv_heads)``), as vLLM does.
- ``RowParallelLinear``: input features split; each rank's output is a partial sum, which the model all-reduces
  once per attention block and once per MLP block. Its bias lives on rank 0 only (other ranks hold zeros), so the
  all-reduce adds it once.
- ``VocabParallelEmbedding`` / ``ParallelLMHead``: the vocabulary split in ``ceil(V / size)`` rows per rank
  (padding rows are zero); the embedding all-reduces, the LM head all-gathers its logits.

Each layer records which slice of every checkpoint tensor it holds (``tp_dim``, ``tp_slices``), so the loader reads
just that slice from the safetensors file (``safe_open(...).get_slice``), for float and weight-only quantized
weights alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kiln.llm.distributed import SINGLE, TensorParallel, divide
from kiln.ops.wo_embedding import wo_embedding, wo_embedding_ref, wo_table_shape
from kiln.ops.wo_gemm import WeightOnly

from .linear import FusedLinear

TP_ATTRS = ("tp", "tp_dim", "tp_slices", "shard_offsets", "full_vocab")


@dataclass(frozen=True)
class ShardSlice:
    """The part of one checkpoint dimension a rank holds: ``size`` rows from ``start`` of ``full``; rows past the end
    of the checkpoint (vocabulary padding) are zero."""

    full: int
    start: int
    size: int

    @property
    def valid(self) -> int:
        return max(0, min(self.size, self.full - self.start))


def split(full: int, tp: TensorParallel, replicas: int = 1, pad: bool = False, what: str = "a dimension") -> ShardSlice:
    """Rank ``tp.rank``'s slice of ``full`` rows shared by ``tp.size / replicas`` distinct owners."""
    parts = tp.size // replicas
    size = -(-full // parts) if pad else divide(full, parts, what)
    return ShardSlice(full, (tp.rank // replicas) * size, size)


class ColumnParallelLinear(FusedLinear):
    """Output features split across ranks; ``out_features`` is an int or named parts ``{"q": ..., "k": ...}``
    (full sizes), each split separately. ``replicas[name]`` ranks share one slice of that part (replicated KV)."""

    tp_dim = 0

    def __init__(self, in_features: int, out_features: int | dict[str, int], bias: bool = False,
                 tp: TensorParallel = SINGLE, replicas: dict[str, int] | None = None, pad: bool = False, **kw):
        named = isinstance(out_features, dict)
        parts = out_features if named else {None: out_features}
        slices = {name: split(size, tp, (replicas or {}).get(name, 1), pad, f"output part {name or 'rows'}")
                  for name, size in parts.items()}
        nn.Linear.__init__(self, in_features, sum(s.size for s in slices.values()), bias=bias, **kw)
        self.shard_offsets: dict[str, tuple[int, int]] = {}
        if named:
            off = 0
            for name, s in slices.items():
                self.shard_offsets[name] = (off, s.size)
                off += s.size
        self.tp, self.tp_slices = tp, slices


class RowParallelLinear(nn.Linear):
    """Input features split across ranks; ``forward`` returns this rank's partial sum (the caller all-reduces)."""

    tp_dim = 1

    def __init__(self, in_features: int, out_features: int, bias: bool = False, tp: TensorParallel = SINGLE, **kw):
        s = split(in_features, tp, what="input features")
        super().__init__(s.size, out_features, bias=bias, **kw)
        self.tp, self.tp_slices = tp, {None: s}


class VocabParallelEmbedding(nn.Embedding):
    """The embedding table split by vocabulary rows; looked-up rows are summed across ranks."""

    tp_dim = 0

    def __init__(self, num_embeddings: int, embedding_dim: int, tp: TensorParallel = SINGLE, **kw):
        s = split(num_embeddings, tp, pad=True)
        super().__init__(s.size, embedding_dim, **kw)
        self.tp, self.tp_slices, self.full_vocab = tp, {None: s}, num_embeddings

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.tp_slices[None].start
        outside = (local < 0) | (local >= self.num_embeddings)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside.unsqueeze(-1), 0.0)
        return self.tp.all_reduce(out)


class ParallelLMHead(ColumnParallelLinear):
    """The LM head split by vocabulary rows (the embedding's split, so tied weights are one tensor)."""

    def __init__(self, hidden_size: int, vocab_size: int, bias: bool = False, tp: TensorParallel = SINGLE, **kw):
        super().__init__(hidden_size, vocab_size, bias=bias, tp=tp, pad=True, **kw)
        self.full_vocab = vocab_size

    def gather(self, local_logits: torch.Tensor) -> torch.Tensor:
        """This rank's ``[T, V / size]`` logits -> the full ``[T, V]`` on every rank."""
        return gather_logits(self, local_logits)


def gather_logits(head: nn.Module, local_logits: torch.Tensor) -> torch.Tensor:
    """A vocab-parallel head's (float ``ParallelLMHead`` or its weight-only quantized twin, which keeps ``tp`` and
    ``full_vocab``) local ``[T, V / size]`` logits -> the full ``[T, V]`` on every rank."""
    if head.tp.size == 1:
        return local_logits
    return head.tp.all_gather_last(local_logits)[..., : head.full_vocab]


def lm_head_logits(head: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary logits of a float or weight-only quantized LM head (no host syncs: graph-capturable)."""
    from kiln.ops.gemv import linear

    if isinstance(head, nn.Linear):
        return gather_logits(head, linear(hidden, head.weight, head.bias))
    return gather_logits(head, head(hidden))


class QuantizedVocabParallelEmbedding(nn.Module):
    """``VocabParallelEmbedding`` with a weight-only quantized table: a lookup gathers the rows and dequantizes them
    (``kiln.ops.wo_embedding``, one launch), exact to the stored codes. Same vocabulary split, masking and
    all-reduce as the float table.

    - Own table (untied, or tied to a float head is refused at build): int8 rows with one fp32 scale per row
      (``row ~ qweight[v] * scale[v]``, symmetric, ``scale = amax / 127``), buffers ``qweight`` / ``scale``.
    - ``shared_with=head`` (tied embeddings, the head weight-only quantized from the same table): the embedding
      reads the head's own tensors, int8 per row (an int8-wo head's per-channel weight) or int4 in groups (an
      int4-wo head's, packed or row-interleaved), and holds none, so the engine stores the table once, as
      ``lm_head.*``."""

    tp_dim = 0

    def __init__(self, num_embeddings: int, embedding_dim: int, tp: TensorParallel = SINGLE, full_vocab=None,
                 device=None, dtype=None, shared_with: nn.Module | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.dtype = dtype or torch.float32
        if shared_with is None:
            self.register_buffer("qweight", torch.empty(num_embeddings, embedding_dim, dtype=torch.int8,
                                                        device=device))
            self.register_buffer("scale", torch.empty(num_embeddings, dtype=torch.float32, device=device))
        else:  # not a submodule (the head is saved and loaded once, as itself)
            shape = tuple(wo_table_shape(shared_with.weight_only()))
            if shape != (num_embeddings, embedding_dim):
                raise ValueError(f"a shared table must be [{num_embeddings}, {embedding_dim}], the head's is "
                                 f"{list(shape)}")
            self.__dict__["_shared_with"] = shared_with
        self.tp, self.full_vocab = tp, full_vocab or num_embeddings
        self.tp_slices = {None: ShardSlice(self.full_vocab, 0, num_embeddings)}

    @property
    def shared(self) -> bool:
        return "_shared_with" in self.__dict__

    @classmethod
    def from_float(cls, emb: nn.Embedding, quantize_weights: bool = True,
                   shared_with: nn.Module | None = None) -> "QuantizedVocabParallelEmbedding":
        from kiln.quant.llm import quantize_int8_weight

        w = emb.weight
        mod = cls(emb.num_embeddings, emb.embedding_dim, getattr(emb, "tp", SINGLE),
                  getattr(emb, "full_vocab", emb.num_embeddings), device=w.device, dtype=w.dtype,
                  shared_with=shared_with)
        if hasattr(emb, "tp_slices"):
            mod.tp_slices = emb.tp_slices
        if quantize_weights and shared_with is None:
            q, s = quantize_int8_weight(w)
            with torch.no_grad():
                mod.qweight.copy_(q)
                mod.scale.copy_(s)
        return mod

    def table(self) -> WeightOnly:
        """The ``WeightOnly`` table the lookups read: this module's int8 buffers, or the tied head's tensors."""
        if self.shared:
            return self.__dict__["_shared_with"].weight_only()
        return WeightOnly(self.qweight, self.scale)

    @property
    def stored_as(self) -> str:
        """What the engine config records (``quant.embedding``), which is also what a loader rebuilds."""
        if not self.shared:
            return EMBEDDING_INT8
        return (EMBEDDING_INT8 if self.table().bits == 8 else EMBEDDING_INT4_GROUPS) + EMBEDDING_SHARED

    def dequantized_weight(self) -> torch.Tensor:
        table = self.table()
        return wo_embedding_ref(torch.arange(self.num_embeddings, device=table.qweight.device), table, self.dtype)

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        return wo_embedding(ids, self.table(), self.dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return self._lookup(ids)
        local = ids - self.tp_slices[None].start
        outside = (local < 0) | (local >= self.num_embeddings)
        out = self._lookup(local.masked_fill(outside, 0))
        out.masked_fill_(outside.unsqueeze(-1), 0.0)
        return self.tp.all_reduce(out)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.stored_as}"


# The engine config's quant.embedding for a quantized input embedding (False when it is float).
EMBEDDING_INT8 = "int8 per row"
EMBEDDING_INT4_GROUPS = "int4 groups"
EMBEDDING_SHARED = " (the lm_head table)"


def kv_replicas(num_kv_heads: int, tp: TensorParallel) -> int:
    """Ranks sharing one KV head (1 unless there are fewer KV heads than ranks)."""
    return max(1, tp.size // num_kv_heads)


def quantize_parallel_(model: nn.Module, mode: str, group_size: int | None, quantize_weights: bool = True,
                       lm_head: bool = False, embedding: bool | str = False) -> None:
    """``kiln.quant.llm.quantize_weight_only_`` for a (possibly) tensor-parallel model: the quantized twins keep
    their layer's shard description, so they load (and all-reduce) like the float layers they replace.

    ``lm_head``: the LM head too (same mode and group size; each rank quantizes / loads its vocabulary rows, and
    its logits are gathered as before). With tied embeddings the head is quantized from the shared table.
    ``embedding``: the input embedding becomes a ``QuantizedVocabParallelEmbedding``. ``True`` (a build) makes it
    read a tied quantized head's table (one table in the engine, int8 or int4 as the head) and otherwise gives it
    int8 rows of its own; a string is what an engine's config recorded (``QuantizedVocabParallelEmbedding.stored_as``),
    so an engine loads as it was built."""
    from kiln.quant.llm import WEIGHT_ONLY_MODULES, check_weight_only_args, quantize_weight_only_

    group_size = check_weight_only_args(mode, group_size)
    if embedding not in (True, False, EMBEDDING_INT8, EMBEDDING_INT8 + EMBEDDING_SHARED,
                         EMBEDDING_INT4_GROUPS + EMBEDDING_SHARED):
        raise ValueError(f"unknown quantized embedding format {embedding!r}")
    keep = {name: {a: getattr(m, a) for a in TP_ATTRS if hasattr(m, a)}
            for name, m in model.named_modules() if hasattr(m, "tp_slices") and isinstance(m, nn.Linear)}
    if group_size is not None:
        bad = [f"{n} ({m.in_features} input features per rank)" for n, m in model.named_modules()
               if isinstance(m, RowParallelLinear) and m.tp.size > 1 and m.in_features % group_size]
        if bad:
            raise ValueError(f"int4-wo group size {group_size} does not divide the per-rank input of row-parallel "
                             f"layers: {', '.join(bad[:4])}; "
                             "choose a smaller group size or tensor_parallel_size")
    quantize_weight_only_(model, mode, group_size, skip=() if lm_head else ("lm_head",),
                          quantize_weights=quantize_weights)
    if embedding:
        emb = model.input_embeddings()
        name = next(n for n, m in model.named_modules() if m is emb)
        parent, _, child = name.rpartition(".")
        head = model.get_submodule("lm_head")
        tied_head = model.config.tie_word_embeddings and isinstance(head, WEIGHT_ONLY_MODULES)
        share = tied_head if embedding is True else embedding.endswith(EMBEDDING_SHARED)
        if share and not tied_head:
            raise ValueError(f"the engine's embedding is {embedding!r}, but its LM head is not a tied quantized one")
        setattr(model.get_submodule(parent), child,
                QuantizedVocabParallelEmbedding.from_float(emb, quantize_weights, shared_with=head if share else None))
    for name, attrs in keep.items():
        module = model.get_submodule(name)
        for attr, value in attrs.items():
            setattr(module, attr, value)
