"""PagedAttention: the KV cache in fixed-size blocks of a preallocated pool, a block table per sequence.

    physical slot of token t of sequence s  =  (block_table[s][t // block_size], t % block_size)
    attention of the new token              =  softmax(q k^T / sqrt(d_head)) v over the first n_s slots
    waste of a sequence of n tokens         =  ceil(n / block_size) * block_size - n  <  block_size

Blocks carry reference counts: forking a sequence (parallel samples of one prompt) copies its block
table, not its blocks; the first write into a shared, partly filled block copies that block
(copy-on-write). A finished sequence returns its blocks to the free list.

Builds on: modules.transformer (its layers and weights run here unchanged; only where K and V live
and how attention reads them differ). Deviations from vLLM: one decode token per sequence per step
(prefill runs the model's own contiguous path and copies K/V into blocks); no swapping to CPU.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from modules.transformer import KVCache, Transformer

__all__ = ["paged_attention", "NoFreeBlocks", "BlockAllocator", "PagedKVCache", "paged_prefill",
           "paged_decode_step", "blocks_needed"]


def paged_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                    block_tables: torch.Tensor, context_lens: torch.Tensor) -> torch.Tensor:
    """Attention of one new query per sequence over its keys and values stored in blocks.

    query (B, H, d): the new token's query heads (after RoPE); key_cache, value_cache (N, K, S_b, d):
    the pool of N physical blocks of S_b token slots for K KV heads (H a multiple of K; query head h
    reads KV head h // (H / K)); block_tables (B, M) int64: physical block of each sequence's logical
    block 0..M-1 (entries past a sequence's last block may hold any valid id); context_lens (B,) int64:
    how many tokens sequence b attends to (the new one included), its token t sitting in slot
    (block_tables[b, t // S_b], t % S_b). Returns (B, H, d):

        out[b, h] = sum_t softmax_t(q[b, h] . k[b, t] / sqrt(d)) v[b, t],   t < context_lens[b]
    """
    B, H, d = query.shape
    _, K, S_b, _ = key_cache.shape
    M = block_tables.shape[1]
    keys = key_cache[block_tables].permute(0, 2, 1, 3, 4).reshape(B, K, M * S_b, d)  # (B, K, M S_b, d)
    values = value_cache[block_tables].permute(0, 2, 1, 3, 4).reshape(B, K, M * S_b, d)
    q = query.view(B, K, H // K, d)  # query heads grouped by the KV head they share
    scores = torch.einsum("bkrd,bksd->bkrs", q, keys) / math.sqrt(d)  # (B, K, H/K, M S_b)
    valid = torch.arange(M * S_b) < context_lens[:, None]  # (B, M S_b): slots holding this sequence's tokens
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = scores.softmax(dim=-1)
    return torch.einsum("bkrs,bksd->bkrd", probs, values).reshape(B, H, d)


class NoFreeBlocks(RuntimeError):
    """The pool has no free block left (the scheduler preempts a sequence when it sees this coming)."""


def blocks_needed(n_tokens: int, block_size: int) -> int:
    """Blocks that hold n_tokens: ceil(n / block_size), allocated on demand (never ahead)."""
    return -(-n_tokens // block_size)


class BlockAllocator:
    """A free list of physical block ids with a reference count per block."""

    def __init__(self, n_blocks: int):
        self.free_ids = list(range(n_blocks - 1, -1, -1))  # pop() hands out 0, 1, 2, ...
        self.ref_count = [0] * n_blocks

    @property
    def n_free(self) -> int:
        return len(self.free_ids)

    def allocate(self) -> int:
        if not self.free_ids:
            raise NoFreeBlocks("no free KV block")
        block = self.free_ids.pop()
        self.ref_count[block] = 1
        return block

    def share(self, block: int) -> None:
        self.ref_count[block] += 1

    def release(self, block: int) -> None:
        self.ref_count[block] -= 1
        if self.ref_count[block] == 0:
            self.free_ids.append(block)


class PagedKVCache:
    """A preallocated pool of K/V blocks for every layer, and a block table per sequence id."""

    def __init__(self, model: Transformer, n_blocks: int, block_size: int = 16):
        cfg = model.cfg
        shape = (cfg.n_layers, n_blocks, cfg.n_kv_heads, block_size, cfg.head_dim)  # (L, N, K, S_b, d)
        dtype = model.lm_head.weight.dtype
        self.k, self.v = torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)
        self.block_size, self.n_blocks = block_size, n_blocks
        self.allocator = BlockAllocator(n_blocks)
        self.tables: dict[int, list[int]] = {}
        self.lengths: dict[int, int] = {}

    @property
    def n_free(self) -> int:
        return self.allocator.n_free

    def add(self, seq: int) -> None:
        self.tables[seq], self.lengths[seq] = [], 0

    def fork(self, parent: int, child: int) -> None:
        """child starts as a copy of parent: the same blocks, shared (reference counts + 1), none copied."""
        self.tables[child], self.lengths[child] = list(self.tables[parent]), self.lengths[parent]
        for block in self.tables[child]:
            self.allocator.share(block)

    def free(self, seq: int) -> None:
        for block in self.tables.pop(seq):
            self.allocator.release(block)
        del self.lengths[seq]

    def blocks_to_append(self, seq: int, n: int = 1) -> int:
        """New blocks that appending n tokens to seq will take (a copy-on-write counts as one)."""
        length, table = self.lengths[seq], self.tables[seq]
        new = blocks_needed(length + n, self.block_size) - len(table)
        shared_tail = length % self.block_size and self.allocator.ref_count[table[-1]] > 1
        return new + int(bool(shared_tail))

    def copy_on_write(self, seq: int) -> None:
        """Before writing into the last block of seq: if another sequence shares it, copy it first."""
        table = self.tables[seq]
        old = table[-1]
        if self.allocator.ref_count[old] > 1:
            new = self.allocator.allocate()
            self.k[:, new], self.v[:, new] = self.k[:, old], self.v[:, old]
            self.allocator.release(old)
            table[-1] = new

    def append_slots(self, seq: int, n: int) -> tuple[list[int], list[int]]:
        """Make room for n more tokens of seq: (block, offset) of each, allocating blocks on demand."""
        start = self.lengths[seq]
        if start % self.block_size:
            self.copy_on_write(seq)
        while len(self.tables[seq]) < blocks_needed(start + n, self.block_size):
            self.tables[seq].append(self.allocator.allocate())
        self.lengths[seq] = start + n
        table = self.tables[seq]
        return ([table[t // self.block_size] for t in range(start, start + n)],
                [t % self.block_size for t in range(start, start + n)])

    def block_tables(self, seqs: list[int]) -> torch.Tensor:
        """(B, M) int64, padded with block 0 (never read: context_lens masks it)."""
        M = max(len(self.tables[s]) for s in seqs)
        return torch.tensor([self.tables[s] + [0] * (M - len(self.tables[s])) for s in seqs], dtype=torch.long)

    def used_slots(self) -> int:
        """Token slots of the blocks in use (each physical block counted once)."""
        return (self.n_blocks - self.n_free) * self.block_size


@torch.inference_mode()
def paged_prefill(model: Transformer, cache: PagedKVCache, seq: int, prompt: torch.Tensor) -> torch.Tensor:
    """Run prompt (P,) through the model's own contiguous path and copy its K/V into seq's blocks.
    Returns the logits of the last prompt position (V,): the first generated token's distribution."""
    P = prompt.shape[0]
    dense = KVCache(model.cfg, 1, P, dtype=cache.k.dtype)
    logits = model(prompt[None], dense)[0, -1]
    blocks, offsets = cache.append_slots(seq, P)
    blocks, offsets = torch.tensor(blocks), torch.tensor(offsets)
    # indexing with two separated index tensors puts their axis first: the target is (P, L, K, d)
    cache.k[:, blocks, :, offsets] = dense.k[:, 0].permute(2, 0, 1, 3)
    cache.v[:, blocks, :, offsets] = dense.v[:, 0].permute(2, 0, 1, 3)
    return logits


@torch.inference_mode()
def paged_decode_step(model: Transformer, cache: PagedKVCache, seqs: list[int], tokens: torch.Tensor,
                      attention_fn: Callable = paged_attention) -> torch.Tensor:
    """One decode step of the sequences ``seqs`` (their newest tokens, (B,)) with K/V in blocks,
    through the model's own layers and weights. Returns next-token logits (B, V)."""
    cfg = model.cfg
    B, H, K, hd = len(seqs), cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    positions = torch.tensor([cache.lengths[s] for s in seqs])  # each new token's own position
    slots = [cache.append_slots(s, 1) for s in seqs]
    blocks = torch.tensor([b[0] for b, _ in slots])
    offsets = torch.tensor([o[0] for _, o in slots])
    tables, context = cache.block_tables(seqs), positions + 1
    x = model.embed_tokens(tokens)  # (B, d)
    for i, layer in enumerate(model.layers):
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        q, k, v = attn.q_proj(h).view(B, H, hd), attn.k_proj(h).view(B, K, hd), attn.v_proj(h).view(B, K, hd)
        # RoPE takes (batch, heads, T, d) with one position per T: put the B sequences on the T axis
        qk = attn.rope_fn(torch.cat((q, k), dim=1).transpose(0, 1)[None], positions, attn.rope_theta)
        qk = qk[0].transpose(0, 1)  # (B, H + K, hd)
        cache.k[i, blocks, :, offsets] = qk[:, H:]
        cache.v[i, blocks, :, offsets] = v
        out = attention_fn(qk[:, :H], cache.k[i], cache.v[i], tables, context)  # (B, H, hd)
        x = x + attn.o_proj(out.reshape(B, H * hd))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return model.lm_head(model.norm(x))
