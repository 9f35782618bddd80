"""The native paged attention kernel (csrc/kernels.c, ops.paged_attention): each row over its own
sequence's keys through its block table, no padding; against a plain reference, the padded gathering
path and transformers, with mixed lengths (1 to 4096), sliding windows, sinks and MLA's latent rows;
and bit-identical per row alone, in any batch and beside sequences of any length."""

from __future__ import annotations

import random

import pytest
import torch

import test_parity_families as families
import test_parity_hf as parity
from conftest import save_hf_model
from kernel_references import attention_reference, close
from resilient_moe import _kernels
from resilient_moe.engine.config import EngineConfig, SamplingParams
from resilient_moe.engine.engine import LLMEngine
from resilient_moe.model import ops

BLOCK = 16
LENGTHS = (1, 2, 17, 300, 4096)


class PagedCase:
    """A paged cache [G, slots, d] with `lengths` sequences scattered over random blocks, and query rows:
    the last `rows_per_seq` positions of each sequence (1: decode rows; more: a prefill span)."""

    def __init__(self, g, lengths, groups=2, per_group=3, dim=24, value_dim=None, rows_per_seq=1, latent=None):
        self.lengths = list(lengths)
        blocks_needed = [-(-n // BLOCK) for n in self.lengths]
        total = sum(blocks_needed) + 3
        order = torch.randperm(total, generator=g).tolist()  # blocks handed out in no particular order
        self.tables = []
        for n in blocks_needed:
            self.tables.append(order[:n])
            order = order[n:]
        slots = total * BLOCK
        if latent is not None:  # MLA: one row [c | k_r] per slot, the values a view of its first C columns
            C, r = latent
            self.k = torch.randn(1, slots, C + r, generator=g)
            self.v = self.k[..., :C]
        else:
            self.k = torch.randn(groups, slots, dim, generator=g)
            self.v = torch.randn(groups, slots, value_dim or dim, generator=g)
        G = self.k.shape[0]
        H = G * per_group
        self.rows = []  # (sequence, position)
        for s, n in enumerate(self.lengths):
            for p in range(max(0, n - rows_per_seq), n):
                self.rows.append((s, p))
        self.q = torch.randn(len(self.rows), H, self.k.shape[2], generator=g)
        self.sinks = torch.randn(H, generator=g)

    def slot(self, s, j):
        return self.tables[s][j // BLOCK] * BLOCK + j % BLOCK

    def run(self, rows=None, window=None, sinks=False, scale=0.3):
        """The kernel on the chosen rows (indices into self.rows), each sequence's table passed once."""
        rows = list(range(len(self.rows))) if rows is None else rows
        seqs = sorted({self.rows[i][0] for i in rows})
        index = {s: i for i, s in enumerate(seqs)}
        blocks, start = [], []
        for s in seqs:
            start.append(len(blocks))
            blocks.extend(self.tables[s])
        t = lambda v: torch.tensor(v, dtype=torch.long)  # noqa: E731
        return ops.paged_attention(
            self.q[rows], self.k, self.v, t(blocks), t(start), t([index[self.rows[i][0]] for i in rows]),
            t([self.rows[i][1] for i in rows]), BLOCK, scale, window, self.sinks if sinks else None)

    def reference(self, window=None, sinks=False, scale=0.3):
        longest = max(self.lengths)
        table = torch.tensor([[self.slot(s, min(j, n - 1)) for j in range(longest)] for s, n in enumerate(self.lengths)])
        row_seq = torch.tensor([s for s, _ in self.rows])
        positions = torch.tensor([p for _, p in self.rows])
        return attention_reference(self.q, self.k, self.v, table, row_seq, positions, scale, window,
                                   self.sinks if sinks else None)


@pytest.mark.parametrize("window", [None, 6, 100])
@pytest.mark.parametrize("sinks", [False, True])
def test_matches_reference_with_mixed_lengths(window, sinks):
    g = torch.Generator().manual_seed(0)
    case = PagedCase(g, LENGTHS, rows_per_seq=3)
    got, want = case.run(window=window, sinks=sinks), case.reference(window=window, sinks=sinks)
    assert close(got, want, torch.float32), (got - want).abs().max()


def test_latent_rows_match_reference():
    """MLA: one shared key/value head (G = 1) of latent rows [C + r], the values their first C columns."""
    g = torch.Generator().manual_seed(1)
    case = PagedCase(g, (1, 40, 513, 1200), per_group=4, latent=(32, 8), rows_per_seq=2)
    got, want = case.run(scale=0.2), case.reference(scale=0.2)
    assert got.shape[-1] == 32
    assert close(got, want, torch.float32)


def test_matches_padded_gathering_path():
    """Decode rows against the padded path (keys gathered to a multiple of KEY_PAD, the padding masked)."""
    g = torch.Generator().manual_seed(2)
    case = PagedCase(g, (3, 64, 250, 33), groups=2, per_group=2, dim=16)
    G, R, d = 2, 2, 16
    B = len(case.lengths)
    L = ops.padded_key_length(max(case.lengths))
    slots = torch.tensor([[case.slot(s, j) if j < n else 0 for j in range(L)] for s, n in enumerate(case.lengths)])
    keys = case.k.index_select(1, slots.reshape(-1)).view(G, B, L, d)
    values = case.v.index_select(1, slots.reshape(-1)).view(G, B, L, d)
    masked = (torch.arange(L).unsqueeze(0) >= torch.tensor(case.lengths).unsqueeze(1)).unsqueeze(1).expand(B, R, L)
    padded = ops.attention(case.q.view(B, G, R, d).transpose(0, 1), keys, values, masked, 0.3)
    padded = padded.transpose(0, 1).reshape(B, G * R, d)
    assert close(case.run(), padded, torch.float32)


@pytest.mark.parametrize("window,sinks", [(None, False), (50, True)])
def test_row_bit_identical_alone_and_in_any_batch(window, sinks):
    """Each row (decode rows and the rows of prefill spans) alone, in the whole batch, in random sub-batches
    beside sequences of other lengths, on one thread or several: the same bits."""
    _kernels.set_threads(2)  # big batches now split over threads; rows alone stay on one
    g = torch.Generator().manual_seed(3)
    case = PagedCase(g, (1, 5, 16, 17, 129, 2048, 700), rows_per_seq=4)
    full = case.run(window=window, sinks=sinks)
    rng = random.Random(4)
    for i in range(len(case.rows)):
        assert torch.equal(case.run([i], window=window, sinks=sinks)[0], full[i]), case.rows[i]
    for _ in range(6):
        rows = rng.sample(range(len(case.rows)), rng.randint(2, len(case.rows)))
        assert torch.equal(case.run(rows, window=window, sinks=sinks), full[rows])


def test_vector_and_portable_paths_agree_bitwise():
    g = torch.Generator().manual_seed(5)
    case = PagedCase(g, (1, 7, 90, 301), dim=20, value_dim=13, rows_per_seq=3)  # odd dims: tails too
    fast = case.run(window=40, sinks=True)
    _kernels.set_portable(True)
    try:
        portable = case.run(window=40, sinks=True)
    finally:
        _kernels.set_portable(False)
    assert torch.equal(fast, portable)


def test_bad_shapes_are_refused_with_a_message():
    g = torch.Generator().manual_seed(6)
    case = PagedCase(g, (4,), groups=2, per_group=2)
    t = torch.zeros(1, dtype=torch.long)
    with pytest.raises(ValueError, match="does not fit"):
        ops.paged_attention(torch.randn(1, 3, 24), case.k, case.v, t, t, t, t, BLOCK, 1.0)


def test_a_step_builds_no_padded_slot_table(tiny_model):
    """With one long sequence beside short ones, the native float32 step reads the block tables only:
    no [B, longest] slot table or mask is built (what made every sequence pay for the longest)."""
    from resilient_moe.engine.model_runner import ModelRunner

    built = []
    original = ModelRunner.build

    def spy(self, seqs):
        token_ids, batch = original(self, seqs)
        built.append(batch)
        return token_ids, batch

    engine = LLMEngine(tiny_model, EngineConfig(max_prefill_tokens_per_step=512))
    ModelRunner.build = spy
    try:
        params = SamplingParams(max_tokens=3, ignore_eos=True)
        engine.add_request("long", list(range(3, 403)), params)
        for i in range(3):
            engine.add_request(str(i), [5 + i, 9, 11], params)
        while engine.has_unfinished():
            engine.step()
    finally:
        ModelRunner.build = original
    assert built and all(not batch._masks for batch in built)


def _compare_with_hf(model_dir, prompts, new_tokens, **engine_kwargs):
    reference = parity.hf_reference(model_dir, prompts, new_tokens)
    tokens, logits = parity.run_continuous(model_dir, prompts, new_tokens, [0] * len(prompts), **engine_kwargs)
    for (want_tokens, want_logits), got_tokens, got_logits in zip(reference, tokens, logits):
        assert got_tokens == want_tokens
        assert (got_logits - want_logits).abs().max() < parity.TOLERANCE * 10


def test_mixed_lengths_match_transformers_up_to_4096(tmp_path):
    """One batch with prompts of 1, 9, 700 and 4096 tokens decodes as transformers does each alone."""
    model_dir = save_hf_model(tmp_path / "qwen3", "qwen3_moe", seed=11, max_position_embeddings=4200)
    rng = random.Random(12)
    prompts = [[rng.randrange(3, 320) for _ in range(n)] for n in (1, 9, 700, 4096)]
    _compare_with_hf(model_dir, prompts, 4, max_model_len=4200, max_prefill_tokens_per_step=1024)


@pytest.mark.parametrize("family", families.NEW_FAMILIES)
def test_windows_sinks_and_latent_rows_match_transformers(tmp_path, family):
    """GPT-OSS (sliding windows of 6 on half the layers, sinks) and DeepSeek-V3 (MLA), mixed lengths."""
    model_dir = families.save_family_model(tmp_path / family, family, seed=13)
    rng = random.Random(14)
    prompts = [[rng.randrange(3, 320) for _ in range(n)] for n in (1, 4, 130, 480)]
    _compare_with_hf(model_dir, prompts, 4)
