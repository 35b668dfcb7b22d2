from collections import Counter, defaultdict

import pytest
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from slimserve.engine import block_manager
from slimserve.engine.block_manager import BlockManager
from slimserve.engine.sequence import Sequence

BLOCK_SIZE = 4
NUM_BLOCKS = 12
# Prompts are built from a few block contents, so equal blocks after different prefixes (the case a
# weak hash gets wrong), prefix-cache hits and LRU eviction of cached blocks are all frequent.
BLOCKS = [[1, 1, 1, 1], [2, 2, 2, 2], [1, 2, 1, 2]]


def compute(manager: BlockManager, seq: Sequence, num_tokens: int, kv: dict[int, dict[int, tuple]]) -> None:
    """What the model runner does: write KV for the next num_tokens positions, then cache full blocks.

    A slot's KV depends on the whole prefix up to its position, so kv records that prefix.
    """
    start = seq.num_computed_tokens
    for pos in range(start, start + num_tokens):
        block_id = seq.block_table[pos // manager.block_size]
        assert manager.blocks[block_id].ref_count == 1, f"position {pos} of {seq} is written into a shared block"
        kv[block_id][pos % manager.block_size] = tuple(seq.token_ids[:pos + 1])
    seq.num_computed_tokens += num_tokens
    manager.cache_full_blocks(seq, start)


class BlockManagerMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.manager = BlockManager(NUM_BLOCKS, BLOCK_SIZE)
        self.seqs: list[Sequence] = []  # hold blocks
        self.preempted: list[Sequence] = []  # freed, to be allocated again
        self.kv: dict[int, dict[int, tuple]] = defaultdict(dict)
        self.num_seqs_made = 0

    def _new_seq(self, token_ids: list[int]) -> Sequence:
        self.num_seqs_made += 1
        return Sequence(self.num_seqs_made, token_ids)

    def _admit(self, seq: Sequence) -> None:
        if not self.manager.can_allocate(seq):
            return
        self.manager.allocate(seq)
        assert seq.num_computed_tokens % BLOCK_SIZE == 0 and seq.num_computed_tokens < len(seq)
        assert len(seq.block_table) == self.manager.num_blocks_for(len(seq))
        self.seqs.append(seq)

    @rule(blocks=st.lists(st.sampled_from(BLOCKS), max_size=3), tail=st.lists(st.integers(1, 2), max_size=3))
    def allocate(self, blocks, tail):
        token_ids = sum(blocks, []) + tail
        if token_ids:
            self._admit(self._new_seq(token_ids))

    @precondition(lambda self: self.preempted)
    @rule(data=st.data())
    def allocate_preempted(self, data):
        seq = data.draw(st.sampled_from(self.preempted))
        self.preempted.remove(seq)
        self._admit(seq)
        if not seq.block_table:
            self.preempted.append(seq)

    @precondition(lambda self: any(s.num_computed_tokens < len(s) for s in self.seqs))
    @rule(data=st.data())
    def compute_chunk(self, data):
        seq = data.draw(st.sampled_from([s for s in self.seqs if s.num_computed_tokens < len(s)]))
        compute(self.manager, seq, data.draw(st.integers(1, len(seq) - seq.num_computed_tokens)), self.kv)

    @precondition(lambda self: any(s.num_computed_tokens == len(s) for s in self.seqs))
    @rule(data=st.data(), new_tokens=st.lists(st.integers(1, 2), min_size=1, max_size=3),
          num_lookahead=st.integers(0, 2))
    def append_tokens(self, data, new_tokens, num_lookahead):
        """Sampled (or accepted draft) tokens, plus slots for num_lookahead draft tokens."""
        seq = data.draw(st.sampled_from([s for s in self.seqs if s.num_computed_tokens == len(s)]))
        for token_id in new_tokens:
            seq.append_token(token_id)
        num_new_tokens = len(seq) - seq.num_computed_tokens + num_lookahead
        num_needed = self.manager.num_blocks_for(seq.num_computed_tokens + num_new_tokens)
        if self.manager.can_append(seq, num_new_tokens):
            num_held = len(seq.block_table)  # more than needed if earlier lookahead slots went unused
            self.manager.may_append(seq, num_new_tokens)
            assert len(seq.block_table) == max(num_held, num_needed)
        else:
            self.preempt_seq(seq)

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def fork(self, data):
        parent = data.draw(st.sampled_from(self.seqs))
        child = self._new_seq(parent.token_ids)
        if self.manager.can_fork(parent, child):
            self.manager.fork(parent, child)
            assert child.num_computed_tokens % BLOCK_SIZE == 0 and child.num_computed_tokens < len(child)
            self.seqs.append(child)

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def free(self, data):
        """Finish or abort, at any point of prefill or decode."""
        seq = data.draw(st.sampled_from(self.seqs))
        self.seqs.remove(seq)
        self.manager.free(seq)
        assert not seq.block_table and seq.num_computed_tokens == 0

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def preempt(self, data):
        self.preempt_seq(data.draw(st.sampled_from(self.seqs)))

    def preempt_seq(self, seq: Sequence) -> None:
        self.seqs.remove(seq)
        self.manager.free(seq)
        self.preempted.append(seq)

    @rule()
    def free_all(self):
        for seq in self.seqs:
            self.manager.free(seq)
        self.seqs.clear()
        assert self.manager.usage == 0.0
        assert self.manager.num_free_blocks == NUM_BLOCKS

    @invariant()
    def every_block_is_free_xor_held_by_its_ref_count(self):
        holders = Counter(block_id for seq in self.seqs for block_id in seq.block_table)
        for seq in self.seqs:
            assert len(set(seq.block_table)) == len(seq.block_table), seq
        for block in self.manager.blocks:
            assert block.ref_count == holders[block.block_id], block
        free = set(self.manager.free_block_ids)
        used = {block.block_id for block in self.manager.blocks if block.ref_count > 0}
        assert free.isdisjoint(used)
        assert len(free) + len(used) == NUM_BLOCKS
        assert self.manager.usage == pytest.approx(len(used) / NUM_BLOCKS)

    @invariant()
    def only_full_computed_blocks_carry_a_hash(self):
        hashed = [block for block in self.manager.blocks if block.hash is not None]
        assert len(hashed) == len(self.manager.cached_block_ids)
        for block in hashed:
            assert self.manager.cached_block_ids[block.hash] == block.block_id
            assert len(block.token_ids) == BLOCK_SIZE
            slots = self.kv[block.block_id]
            assert [slots.get(i, (None,))[-1] for i in range(BLOCK_SIZE)] == list(block.token_ids)
        for seq in self.seqs:
            for i, block_id in enumerate(seq.block_table):
                if self.manager.blocks[block_id].hash is not None:
                    assert (i + 1) * BLOCK_SIZE <= seq.num_computed_tokens, seq

    @invariant()
    def computed_kv_encodes_each_sequences_own_prefix(self):
        """Catches any wrong sharing: a slot's KV must come from exactly this sequence's prefix."""
        for seq in self.seqs:
            assert len(seq.block_table) * BLOCK_SIZE >= len(seq), seq
            for pos in range(seq.num_computed_tokens):
                slots = self.kv[seq.block_table[pos // BLOCK_SIZE]]
                assert slots.get(pos % BLOCK_SIZE) == tuple(seq.token_ids[:pos + 1]), (seq, pos)


@pytest.mark.parametrize("hash_fn", [
    None,
    lambda parent_hash, token_ids: 0,  # every block collides
    lambda parent_hash, token_ids: hash(tuple(token_ids)) % 3,  # ignores the parent; tiny hash space
    lambda parent_hash, token_ids: ((parent_hash or 0) + sum(token_ids)) % 5,
], ids=["blake2b", "constant", "parentless", "weak_chained"])
def test_block_manager_state_machine(monkeypatch, hash_fn):
    if hash_fn is not None:
        monkeypatch.setattr(block_manager, "hash_block_tokens", hash_fn)
    run_state_machine_as_test(BlockManagerMachine,
                              settings=settings(max_examples=150, stateful_step_count=40, deadline=None))


def make_computed(manager, seq_id, token_ids, kv=None):
    seq = Sequence(seq_id, token_ids)
    manager.allocate(seq)
    compute(manager, seq, len(seq) - seq.num_computed_tokens, defaultdict(dict) if kv is None else kv)
    return seq


def test_prefix_cache_hit_reuses_blocks_and_counts_tokens():
    manager = BlockManager(num_blocks=10, block_size=4)
    first = make_computed(manager, 1, list(range(11)))
    shared = first.block_table[:2]
    manager.free(first)

    second = Sequence(2, list(range(8)) + [42, 43])
    assert manager.can_allocate(second)
    manager.allocate(second)
    assert second.block_table[:2] == shared
    assert second.num_computed_tokens == 8
    assert manager.num_prefix_cache_queries == 11 + 10
    assert manager.num_prefix_cache_hits == 8

    # Shared while both run: ref counts count both holders.
    third = Sequence(3, list(range(8)) + [7])
    manager.allocate(third)
    assert third.block_table[:2] == shared
    assert [manager.blocks[b].ref_count for b in shared] == [2, 2]


def test_prefix_caching_off_never_hits():
    manager = BlockManager(num_blocks=10, block_size=4, enable_prefix_caching=False)
    first = make_computed(manager, 1, list(range(11)))
    manager.free(first)
    again = Sequence(2, list(range(11)))
    manager.allocate(again)
    assert again.num_computed_tokens == 0
    assert manager.num_prefix_cache_hits == 0 and not manager.cached_block_ids


def test_full_prompt_hit_still_leaves_one_token_to_compute():
    manager = BlockManager(num_blocks=10, block_size=4)
    first = make_computed(manager, 1, list(range(8)))
    manager.free(first)
    again = Sequence(2, list(range(8)))
    manager.allocate(again)
    assert again.num_computed_tokens == 4  # the last block is recomputed to get logits for token 8


def test_forced_hash_collision_never_shares(monkeypatch):
    monkeypatch.setattr(block_manager, "hash_block_tokens", lambda parent_hash, token_ids: 1234)
    manager = BlockManager(num_blocks=10, block_size=4)
    first = make_computed(manager, 1, [1, 1, 1, 1, 2, 2, 2, 2, 3])
    other = Sequence(2, [9, 9, 9, 9, 2, 2, 2, 2, 3])
    manager.allocate(other)
    assert other.num_computed_tokens == 0
    assert set(other.block_table).isdisjoint(first.block_table)
    assert manager.num_prefix_cache_hits == 0


def test_collision_of_the_parent_never_shares_the_child(monkeypatch):
    """The hash here ignores the parent, so equal blocks after different prefixes share a key: the parent
    entry must tell them apart, and a block whose parent is not cached must never become a first-block hit."""
    monkeypatch.setattr(block_manager, "hash_block_tokens", lambda parent_hash, token_ids: hash(tuple(token_ids)))
    manager = BlockManager(num_blocks=24, block_size=2)
    kv = defaultdict(dict)
    make_computed(manager, 1, [9, 9, 0], kv)  # caches [9, 9]
    other = make_computed(manager, 2, [7, 7, 9, 9, 5, 5, 6], kv)
    assert manager.blocks[other.block_table[1]].hash is None  # [9, 9]: key taken
    assert manager.blocks[other.block_table[2]].hash is None  # [5, 5]: its parent is not cached

    probe = Sequence(3, [5, 5, 1])
    manager.allocate(probe)
    assert probe.num_computed_tokens == 0
    probe2 = Sequence(4, [9, 9, 5, 5, 1])
    manager.allocate(probe2)
    assert probe2.num_computed_tokens == 2
    assert probe2.block_table[1] != other.block_table[2]

    # [1, 1][5, 5] and [2, 2][5, 5]: both first blocks are cached, the [5, 5] entry follows [1, 1] only.
    make_computed(manager, 5, [1, 1, 5, 5, 0], kv)
    make_computed(manager, 6, [2, 2, 0], kv)
    probe3 = Sequence(7, [2, 2, 5, 5, 0])
    manager.allocate(probe3)
    assert probe3.num_computed_tokens == 2


def test_lru_eviction_takes_the_least_recently_freed_cached_block():
    manager = BlockManager(num_blocks=4, block_size=2)
    old = make_computed(manager, 1, [1, 1, 2, 2])
    old_blocks = list(old.block_table)
    manager.free(old)
    recent = make_computed(manager, 2, [3, 3, 4, 4])
    recent_blocks = list(recent.block_table)
    manager.free(recent)
    assert manager.num_free_blocks == 4 and len(manager.cached_block_ids) == 4

    filler = Sequence(3, [8, 8, 8])
    manager.allocate(filler)
    assert filler.block_table == old_blocks[::-1]  # the oldest cached blocks go first, a suffix before its prefix
    manager.free(filler)

    probe_recent = Sequence(4, [3, 3, 4, 4, 0])
    manager.allocate(probe_recent)
    assert probe_recent.block_table[:2] == recent_blocks and probe_recent.num_computed_tokens == 4
    manager.free(probe_recent)
    probe_old = Sequence(5, [1, 1, 2, 2, 0])
    manager.allocate(probe_old)
    assert probe_old.num_computed_tokens == 0


def test_fork_shares_full_blocks_and_recomputes_the_partial_one():
    manager = BlockManager(num_blocks=10, block_size=4)
    parent = make_computed(manager, 1, list(range(10)))
    child = Sequence(2, parent.token_ids)
    assert manager.can_fork(parent, child)
    manager.fork(parent, child)
    assert child.block_table[:2] == parent.block_table[:2]
    assert child.block_table[2] != parent.block_table[2]
    assert child.num_computed_tokens == 8
    assert [manager.blocks[b].ref_count for b in parent.block_table] == [2, 2, 1]
    manager.free(parent)
    manager.free(child)
    assert manager.usage == 0.0


def test_can_allocate_and_can_append_respect_the_free_pool():
    manager = BlockManager(num_blocks=3, block_size=4)
    big = Sequence(1, list(range(9)))
    assert manager.can_allocate(big)
    manager.allocate(big)
    assert manager.usage == 1.0
    assert not manager.can_allocate(Sequence(2, [1]))
    big.num_computed_tokens = 9
    assert manager.can_append(big, 3)  # positions 9..11 fit the third block
    assert not manager.can_append(big, 4)
    manager.free(big)
    assert manager.usage == 0.0 and manager.num_free_blocks == 3
