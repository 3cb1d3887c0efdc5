"""What ran, read off the autograd graph: the tests check which fused ops a forward went through."""

from __future__ import annotations

import torch


def node_names(t: torch.Tensor) -> list[str]:
    """Class names of the autograd nodes behind `t`, each node once (a name repeats once per node of its kind)."""
    seen, stack, names = set(), [t.grad_fn], []
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.append(type(fn).__name__)
        stack += [f for f, _ in fn.next_functions]
    return names
