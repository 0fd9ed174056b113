"""The generation engine's key/value state (neat_core.serving.generation): buffers that grow in place instead of
transformers' concatenation at every step, with rows joining (concat) and leaving (select)."""

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
    both = a.concat(b)  # b is left-padded with masked zeros to a's width
    keys = both.layers[0].keys
    assert keys.shape == (5, 2, 26, 3) and both.mask.shape == (5, 26)
    assert both.layers[0]._k.shape[2] > 26  # stacked straight into a buffer with room: the next step copies nothing
    assert torch.equal(keys[:2], a.layers[0].keys)
    assert torch.equal(keys[2:, :, 4:], b.layers[0].keys) and not keys[2:, :, :4].any()
    assert torch.equal(both.mask[2:, :4], torch.zeros(3, 4, dtype=torch.long))

    kept = both.select([3, 4])  # only b's rows: the leading positions none of them uses are dropped
    assert torch.equal(kept.layers[0].keys, b.layers[0].keys[1:, :, 1:])
    assert torch.equal(kept.mask, b.mask[1:, 1:])
    step = torch.randn(2, 2, 1, 3, generator=g)
    keys, _ = kept.cache().update(step, step, 0)  # the selected state takes the next step
    assert torch.equal(keys[:, :, -1:], step) and keys.shape[2] == kept.mask.shape[1] + 1
