"""The generation engine's key/value state (neat_core.serving.generation): buffers that grow in place instead of
transformers' concatenation at every step, with rows joining (stack) and leaving (select)."""

from __future__ import annotations

import torch

from neat_core.serving.generation import _DecodeState, _GrowingLayer


def test_a_growing_layer_holds_what_concatenation_would():
    g = torch.Generator().manual_seed(0)
    first = torch.randn(2, 3, 5, 4, generator=g)  # (B, kv_heads, T, head_dim)
    layer, reference = _GrowingLayer(first, first * 2), first
    early_view = None
    for step in range(70):  # several growths: room is a quarter of the length, at least 16
        k = torch.randn(2, 3, 1, 4, generator=g)
        keys, values = layer.update(k, 2 * k)
        reference = torch.cat([reference, k], dim=2)
        assert torch.equal(keys, reference) and torch.equal(values, 2 * reference)
        assert layer.get_seq_length() == reference.shape[2]
        if step == 3:
            early_view, early_copy = keys, keys.clone()
    # a view handed out earlier (the model's previous step) never changes under later writes or growths
    assert torch.equal(early_view, early_copy)
    assert layer._k.shape[2] >= reference.shape[2] and layer._k.shape[2] - reference.shape[2] <= max(16, 75 // 4)


def test_rows_join_and_leave_a_grown_state():
    g = torch.Generator().manual_seed(1)

    def state(rows: int, t: int, masked_front: int) -> _DecodeState:
        k = torch.randn(rows, 2, t, 3, generator=g)
        mask = torch.ones(rows, t, dtype=torch.long)
        mask[:, :masked_front] = 0
        layer = _GrowingLayer(k, -k)
        for _ in range(20):  # grown past its first buffer
            layer.update(torch.randn(rows, 2, 1, 3, generator=g), torch.zeros(rows, 2, 1, 3))
        mask = torch.cat([mask, torch.ones(rows, 20, dtype=torch.long)], dim=1)
        return _DecodeState([layer], mask)

    a, b = state(2, 6, 0), state(3, 2, 1)
    a_keys, b_keys = a.layers[0].keys.clone(), b.layers[0].keys.clone()
    both = _DecodeState.stack([a, b], max_rows=8)  # b is left-padded with masked zeros to a's width
    keys = both.layers[0].keys
    assert keys.shape == (5, 2, 26, 3) and both.mask.shape == (5, 26)
    # stacked straight into a buffer with room for the next steps and for as many rows again (up to max_rows)
    assert both.layers[0]._k.shape[2] > 26 and both.layers[0]._k.shape[0] == 8
    assert torch.equal(keys[:2], a_keys)
    assert torch.equal(keys[2:, :, 4:], b_keys) and not keys[2:, :, :4].any()
    assert torch.equal(both.mask[2:, :4], torch.zeros(3, 4, dtype=torch.long))

    # A narrower group joins in place: the running rows are not copied, the new ones go into the spare rows.
    buffer = both.layers[0]._k
    c = state(2, 1, 0)  # 21 positions
    c_keys = c.layers[0].keys.clone()
    joined = both.join([c], max_rows=8)
    assert joined.layers[0]._k is buffer and joined.layers[0].keys.shape == (7, 2, 26, 3)
    assert torch.equal(joined.layers[0].keys[:5], keys) and torch.equal(joined.layers[0].keys[5:, :, 5:], c_keys)
    assert not joined.layers[0].keys[5:, :, :5].any() and torch.equal(joined.mask[5:, :5], torch.zeros(2, 5).long())
    wider = state(1, 10, 0)  # 30 positions: wider than the running rows, so they are stacked anew
    restacked = joined.join([wider], max_rows=8)
    assert restacked.layers[0]._k is not buffer and restacked.layers[0].keys.shape == (8, 2, 30, 3)
    assert torch.equal(restacked.layers[0].keys[:7, :, 4:], joined.layers[0].keys)

    # Rows leave: the last kept rows move into the places of those leaving; the returned order says which is which.
    before = joined.layers[0].keys.clone()
    kept, order = joined.select([1, 3, 5, 6])
    assert order == [5, 1, 6, 3] and kept.layers[0]._k is buffer  # rows 0 and 2 left; 5 and 6 moved in
    assert torch.equal(kept.layers[0].keys, before[order]) and torch.equal(kept.mask, joined.mask[order])
    step = torch.randn(4, 2, 1, 3, generator=g)
    keys, _ = kept.cache().update(step, step, 0)  # the selected state takes the next step
    assert torch.equal(keys[:, :, -1:], step) and keys.shape[2] == kept.mask.shape[1] + 1

    # Leading positions no row uses are dropped once they are worth a copy (an eighth of the width, 16 at least).
    long = state(2, 40, 0)
    short = state(1, 1, 0)
    mixed = _DecodeState.stack([long, short], max_rows=4)  # 60 positions; the short row uses the last 21
    trimmed, order = mixed.select([2])
    assert order == [2] and trimmed.mask.shape == (1, 21) and torch.equal(trimmed.layers[0].keys, short.layers[0].keys)
    few, _ = _DecodeState.stack([state(2, 6, 0), state(1, 1, 0)], max_rows=4).select([2])  # 5 unused of 26: kept
    assert few.mask.shape == (1, 26) and not few.mask[0, :5].any()
