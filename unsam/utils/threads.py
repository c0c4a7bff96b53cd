"""Scoped torch thread count (:func:`torch_threads`), for code whose floating-point sums must
not depend on the caller's setting: a different intra-op thread count adds in another order."""

import contextlib
from typing import Iterator

import torch


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch threads, then restore the caller's setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
