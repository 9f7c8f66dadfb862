"""Sequence packing with exact boundaries.

Examples are concatenated into rows of at most `length` tokens. `position_ids` restart at 0 for each
example; with no `attention_mask`, transformers derives a block-diagonal causal mask from them
(`masking_utils.find_packed_sequence_indices`), so no token attends across an example boundary.
The first label of every example is -100, so no token is trained to predict the next example.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

IGNORE_INDEX = -100


def groups(lengths: Sequence[int], length: int) -> list[list[int]]:
    """Greedy, order-preserving packing: indices of the examples that share each row."""
    rows: list[list[int]] = []
    used = 0
    for i, n in enumerate(lengths):
        if rows and used + n <= length:
            rows[-1].append(i)
            used += n
        else:
            rows.append([i])
            used = n
    return rows


def flat_list(column: Any) -> tuple[Any, Any]:
    """A `pyarrow` list column as numpy (offsets from 0, flat values), chunks and slices resolved."""
    import pyarrow as pa

    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    offsets = column.offsets.to_numpy()
    return offsets - offsets[0], column.flatten().to_numpy()


def pack(input_ids: Any, labels: Any, length: int) -> dict[str, Any]:
    """Tokenized examples packed into rows of at most `length` tokens, as arrow list arrays.

    Packing preserves order, so it only moves row boundaries: the token buffer is reused, the first
    label of every example becomes -100 and positions restart at each example (vectorized).

    Args:
        input_ids, labels: `pyarrow` list arrays (one list per example), same shapes.
        length: the packed row length.

    Returns:
        {"input_ids", "labels", "position_ids"}: `pyarrow` list arrays, one list per packed row.
    """
    import numpy as np
    import pyarrow as pa

    offsets, ids = flat_list(input_ids)
    _, flat_labels = flat_list(labels)
    sizes = np.diff(offsets)
    starts = offsets[:-1]
    flat_labels = flat_labels.copy()
    flat_labels[starts[sizes > 0]] = IGNORE_INDEX
    positions = np.arange(len(ids), dtype=ids.dtype) - np.repeat(starts, sizes).astype(ids.dtype)
    row_offsets = pa.array(
        [*(int(offsets[g[0]]) for g in groups(sizes.tolist(), length)), len(ids)], pa.int32()
    )
    return {
        name: pa.ListArray.from_arrays(row_offsets, pa.array(values))
        for name, values in (
            ("input_ids", ids),
            ("labels", flat_labels),
            ("position_ids", positions),
        )
    }


def padding_waste(lengths: Sequence[int], length: int, packed: bool = False) -> float:
    """The fraction of padding when every row is padded to `length` tokens, packed or not."""
    if not lengths:
        return 0.0
    rows = len(groups(lengths, length)) if packed else len(lengths)
    return 1.0 - sum(lengths) / (rows * length)


def batch_padding(lengths: Sequence[int], batch: int) -> float:
    """The expected fraction of padding in a batch of `batch` rows drawn at random (with
    replacement) from `lengths` and padded to its longest row, as the plain collator pads:
    1 - E[sum] / (batch * E[max]), with E[max] from the order statistics of `lengths`."""
    import numpy as np

    if not lengths:
        return 0.0
    x = np.sort(np.asarray(lengths, dtype=float))
    k = np.arange(1, len(x) + 1) / len(x)
    longest = float((x * (k**batch - (k - 1 / len(x)) ** batch)).sum())
    return max(0.0, 1.0 - float(x.mean()) / longest)  # rows of one length: 0, not -1e-16


def packing_gain(lengths: Sequence[int], batch: int, length: int) -> float:
    """Tokens computed per real token in padded batches of `batch` over that of rows packed to
    `length` and padded to it: above 1, packed rows compute fewer."""
    return (1.0 - padding_waste(lengths, length, packed=True)) / (
        1.0 - batch_padding(lengths, batch)
    )


class PackedCollator:
    """Pads packed rows to the longest in the batch. The padding is one more "example" (positions
    from 0, labels -100), and no attention_mask is passed, so the packed mask stays exact."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        width = max(len(r["input_ids"]) for r in rows)
        batch: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "position_ids": []}
        for r in rows:
            pad = width - len(r["input_ids"])
            batch["input_ids"].append(list(r["input_ids"]) + [self.pad_token_id] * pad)
            batch["labels"].append(list(r["labels"]) + [IGNORE_INDEX] * pad)
            batch["position_ids"].append(list(r["position_ids"]) + list(range(pad)))
        return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}
