"""KV block pool bookkeeping: block tables, reference counts and prefix caching.

The pool tensor itself lives in the runner; this class only hands out block ids. Full blocks are registered
under a chained hash of (previous block's hash, this block's tokens); a later sequence whose prompt starts with
the same tokens reuses those blocks (the stored tokens are compared, so a hash collision can never alias two
prefixes). Freed blocks keep their contents and hash and go to the back of an LRU free list: they are reused
for new data only when nothing older is free, so recently used prefixes stay cached as long as possible.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from .sequence import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None
    token_ids: tuple[int, ...] = ()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.hash_to_block: dict[int, int] = {}
        self.prefix_hits = 0      # tokens served from the cache, over the engine's life
        self.prefix_queries = 0   # prompt tokens looked up

    # -------------------------------------------------------------------------------------------- queries
    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def num_used_blocks(self) -> int:
        return len(self.blocks) - len(self.free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @staticmethod
    def chain_hash(prev: int | None, tokens: tuple[int, ...]) -> int:
        return hash((prev if prev is not None else -1, tokens))

    # -------------------------------------------------------------------------------------------- updates
    def _take_free(self) -> int:
        block_id, _ = self.free.popitem(last=False)  # least recently freed
        block = self.blocks[block_id]
        if block.hash is not None and self.hash_to_block.get(block.hash) == block_id:
            del self.hash_to_block[block.hash]
        block.hash, block.token_ids, block.ref_count = None, (), 1
        return block_id

    def allocate_prefix(self, seq: Sequence) -> int:
        """Attach cached blocks matching the start of ``seq``'s tokens; returns the number of cached tokens.

        At least one token is always left to compute, so even a fully cached prompt yields logits for its first
        sampled token; the last block then counts as a miss rather than being written into while shared.
        """
        assert not seq.block_table, "allocate_prefix on a sequence that already holds blocks"
        if not self.enable_prefix_caching:
            return 0
        bs = self.block_size
        max_full = (seq.num_tokens - 1) // bs
        prev = None
        for i in range(max_full):
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            h = self.chain_hash(prev, tokens)
            block_id = self.hash_to_block.get(h)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free[block_id]
            block.ref_count += 1
            seq.block_table.append(block_id)
            seq.block_hashes.append(h)
            prev = h
        cached = len(seq.block_table) * bs
        self.prefix_queries += seq.num_tokens
        self.prefix_hits += cached
        seq.num_computed_tokens = cached
        seq.num_cached_tokens = cached
        return cached

    def ensure_capacity(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow ``seq``'s block table to hold ``num_tokens`` tokens; False (and no change) if blocks run out."""
        extra = self.blocks_needed(num_tokens) - len(seq.block_table)
        if extra <= 0:
            return True
        if extra > len(self.free):
            return False
        for _ in range(extra):
            seq.block_table.append(self._take_free())
        return True

    def register_full_blocks(self, seq: Sequence) -> None:
        """Publish the blocks ``seq`` has completely computed so later sequences can share them."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        full = min(seq.num_computed_tokens // bs, len(seq.block_table))
        for i in range(len(seq.block_hashes), full):
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            prev = seq.block_hashes[-1] if seq.block_hashes else None
            h = self.chain_hash(prev, tokens)
            block = self.blocks[seq.block_table[i]]
            if block.hash is None:
                block.hash, block.token_ids = h, tokens
                self.hash_to_block.setdefault(h, block.block_id)
            seq.block_hashes.append(h)

    def free_sequence(self, seq: Sequence) -> None:
        """Release ``seq``'s blocks (last block first, so a prompt's head stays cached longest)."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block_id] = None
        seq.block_table = []
        seq.block_hashes = []
