"""Paged KV cache bookkeeping: a fixed pool of blocks, reference counts and a prefix cache.

A full block is keyed by a hash chained over (parent block hash, its token ids), so equal hashes
mean equal prefixes, not just equal blocks. A hit is verified exactly, whatever the hash: its
stored token ids must equal ours and its parent must be the very cache entry our previous block
hit (entries get unique ids), so a hash collision never shares wrong KV. Freed blocks keep their
cache entry and are evicted least-recently-freed first when a fresh block is needed.
"""
import hashlib
from array import array
from dataclasses import dataclass

from slimserve.engine.sequence import Sequence


def hash_block_tokens(parent_hash: int | None, token_ids: list[int]) -> int:
    """128-bit BLAKE2b over (parent hash, token ids): collisions are not constructible in practice."""
    h = hashlib.blake2b(digest_size=16)
    if parent_hash is not None:
        h.update(parent_hash.to_bytes(16, "little"))
    h.update(array("q", token_ids).tobytes())
    return int.from_bytes(h.digest(), "little")


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    # Set only while this block is the prefix-cache entry for hash (then it is full and computed).
    hash: int | None = None
    entry_id: int | None = None  # unique per cache entry, never reused
    parent_entry_id: int | None = None  # the entry_id of the block before it, None for a first block
    token_ids: tuple[int, ...] = ()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Blocks with ref_count 0, in eviction order (first = freed longest ago); a dict gives O(1)
        # removal from the middle when a cached block is hit.
        self.free_block_ids: dict[int, None] = dict.fromkeys(range(num_blocks))
        self.cached_block_ids: dict[int, int] = {}  # hash -> block id
        self.num_cache_entries_made = 0  # the next entry_id
        # In tokens, like vLLM's prefix_cache_queries / prefix_cache_hits.
        self.num_prefix_cache_queries = 0
        self.num_prefix_cache_hits = 0

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence holds, cached ones included: they are evictable."""
        return len(self.free_block_ids)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by sequences (kv_cache_usage_perc)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, seq: Sequence) -> bool:
        hits = self._cache_hits(seq)
        num_revived = sum(block.ref_count == 0 for block in hits)  # hits that leave the free list
        return self.num_blocks_for(len(seq)) - len(hits) + num_revived <= self.num_free_blocks

    def allocate(self, seq: Sequence) -> None:
        """Give seq blocks for all its tokens, reusing cached prefix blocks; skip their computation."""
        assert not seq.block_table and seq.num_computed_tokens == 0, seq
        hits = self._cache_hits(seq)
        for block in hits:
            if block.ref_count == 0:
                del self.free_block_ids[block.block_id]
            block.ref_count += 1
            seq.block_table.append(block.block_id)
        for _ in range(self.num_blocks_for(len(seq)) - len(hits)):
            seq.block_table.append(self._take_free_block())
        seq.num_computed_tokens = len(hits) * self.block_size
        self.num_prefix_cache_queries += len(seq)
        self.num_prefix_cache_hits += seq.num_computed_tokens

    def can_append(self, seq: Sequence, num_new_tokens: int = 1) -> bool:
        return self._num_missing_blocks(seq, num_new_tokens) <= self.num_free_blocks

    def may_append(self, seq: Sequence, num_new_tokens: int = 1) -> None:
        """Ensure slots for num_new_tokens past num_computed_tokens (1 to decode, 1 + k to verify k drafts)."""
        for _ in range(self._num_missing_blocks(seq, num_new_tokens)):
            seq.block_table.append(self._take_free_block())

    def can_fork(self, parent: Sequence, child: Sequence) -> bool:
        num_shared = self._num_shared_blocks(parent, child)
        return self.num_blocks_for(len(child)) - num_shared <= self.num_free_blocks

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Share parent's computed full blocks with child (n > 1: child starts with parent's tokens).

        The child recomputes the tokens of the parent's last partial block into a fresh block, so
        shared blocks are never written and no copy-on-write or KV copy is needed.
        """
        assert not child.block_table and child.num_computed_tokens == 0, child
        num_shared = self._num_shared_blocks(parent, child)
        num_shared_tokens = num_shared * self.block_size
        assert child.token_ids[:num_shared_tokens] == parent.token_ids[:num_shared_tokens]
        for block_id in parent.block_table[:num_shared]:
            self.blocks[block_id].ref_count += 1
            child.block_table.append(block_id)
        for _ in range(self.num_blocks_for(len(child)) - num_shared):
            child.block_table.append(self._take_free_block())
        child.num_computed_tokens = num_shared_tokens

    def free(self, seq: Sequence) -> None:
        """Release seq's blocks (finish, abort or preemption); its cached blocks stay reusable."""
        # Tail first: eviction then takes a sequence's suffix before its (more shareable) prefix.
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, block
            if block.ref_count == 0:
                assert block_id not in self.free_block_ids, block
                self.free_block_ids[block_id] = None
        seq.block_table.clear()
        seq.num_computed_tokens = 0

    def cache_full_blocks(self, seq: Sequence, num_computed_before: int) -> None:
        """Enter the blocks filled since num_computed_before into the prefix cache."""
        if not self.enable_prefix_caching:
            return
        start, end = num_computed_before // self.block_size, seq.num_computed_tokens // self.block_size
        hashes = self._block_hashes(seq, end)
        for i in range(start, end):
            block = self.blocks[seq.block_table[i]]
            parent = self.blocks[seq.block_table[i - 1]] if i > 0 else None
            # Skip a block already cached (a hit), one whose parent is not cached (it could never be
            # hit), and one whose key is taken (an equal block computed concurrently, or a collision).
            orphan = parent is not None and parent.hash is None
            if block.hash is not None or orphan or hashes[i] in self.cached_block_ids:
                continue
            block.hash = hashes[i]
            block.entry_id = self.num_cache_entries_made
            self.num_cache_entries_made += 1
            block.parent_entry_id = None if parent is None else parent.entry_id
            block.token_ids = tuple(self._block_tokens(seq, i))
            self.cached_block_ids[block.hash] = block.block_id

    def _block_tokens(self, seq: Sequence, i: int) -> list[int]:
        return seq.token_ids[i * self.block_size:(i + 1) * self.block_size]

    def _block_hashes(self, seq: Sequence, num_full_blocks: int) -> list[int]:
        assert num_full_blocks * self.block_size <= len(seq)
        hashes = seq.block_hashes
        while len(hashes) < num_full_blocks:
            parent_hash = hashes[-1] if hashes else None
            hashes.append(hash_block_tokens(parent_hash, self._block_tokens(seq, len(hashes))))
        return hashes

    def _cache_hits(self, seq: Sequence) -> list[Block]:
        """Cached blocks holding seq's leading full blocks, verified by parent entry and tokens."""
        if not self.enable_prefix_caching or seq.sampling_params.prompt_logprobs is not None:
            return []  # prompt logprobs need every prompt position's logits, so nothing may be skipped (as vLLM)
        # At least one token is left to compute: the model must produce logits for the next token.
        max_hits = (len(seq) - 1) // self.block_size
        hashes = self._block_hashes(seq, max_hits)
        hits = []
        for i in range(max_hits):
            block_id = self.cached_block_ids.get(hashes[i])
            if block_id is None:
                break
            block = self.blocks[block_id]
            parent_entry_id = hits[-1].entry_id if hits else None
            if block.parent_entry_id != parent_entry_id or block.token_ids != tuple(self._block_tokens(seq, i)):
                break  # hash collision
            hits.append(block)
        return hits

    def _num_shared_blocks(self, parent: Sequence, child: Sequence) -> int:
        return min(parent.num_computed_tokens, len(child) - 1) // self.block_size

    def _num_missing_blocks(self, seq: Sequence, num_new_tokens: int) -> int:
        return max(0, self.num_blocks_for(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table))

    def _take_free_block(self) -> int:
        assert self.free_block_ids, "no free KV block: check can_allocate / can_append first"
        block_id = next(iter(self.free_block_ids))
        del self.free_block_ids[block_id]
        block = self.blocks[block_id]
        assert block.ref_count == 0, block
        if block.hash is not None:  # evict the least recently freed cached block
            del self.cached_block_ids[block.hash]
            block.hash, block.entry_id, block.parent_entry_id, block.token_ids = None, None, None, ()
        block.ref_count = 1
        return block_id
