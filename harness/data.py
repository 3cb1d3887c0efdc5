"""The same data for every backend: token sequences generated once per scenario from its seed (in the parent, saved
to a file every run's subprocess loads), and the two batch layouts they are trained in.

Kinds: "fixed" (batch_size sequences of exactly seq_len uniform random tokens per step), "varlen" (random tokens,
lengths uniform in [min_len, seq_len]) and "text" (real English prose from chronicals.data's embedded default text,
tokenized with its default tokenizer, cut at the same random lengths).

Layouts: "padded" ([B, longest] with right padding, attention_mask and ignored labels at the padding) and "packed"
(one row [1, T] in HF's flattening convention, docs/CONTRACTS.md). A token is counted when it is a loss term: a label
after the causal shift that is not ignore_index. Both layouts count sum(len - 1) for the same sequences.
"""

from __future__ import annotations

import torch

LAYOUTS = ("padded", "packed")
IGNORE_INDEX = -100
PAD_ID = 0  # generated tokens are drawn from [1, vocab), so padding never looks like data


def make_steps(kind: str, steps: int, batch_size: int, seq_len: int, min_len: int, vocab_size: int,
               seed: int) -> list[list[torch.Tensor]]:
    """`steps` lists of `batch_size` int64 token sequences, a pure function of the arguments."""
    g = torch.Generator().manual_seed(seed)
    if kind == "fixed":
        lengths = torch.full((steps, batch_size), seq_len)
    else:
        lengths = torch.randint(min_len, seq_len + 1, (steps, batch_size), generator=g)
    if kind == "text":
        stream = text_tokens()
        if int(stream.max()) >= vocab_size:
            raise ValueError(f"data.kind 'text' uses the default tokenizer's ids up to {int(stream.max())}, but the "
                             f"model's vocab_size is {vocab_size}; use data.kind 'varlen' or a larger model")
        offsets = torch.randint(0, stream.numel(), (steps, batch_size), generator=g)
        stream = torch.cat([stream, stream[:seq_len]])  # a slice may wrap around the end
        return [[stream[int(o): int(o) + int(n)].clone() for o, n in zip(offsets[s], lengths[s])]
                for s in range(steps)]
    return [[torch.randint(1, vocab_size, (int(n),), generator=g) for n in lengths[s]] for s in range(steps)]


def text_tokens() -> torch.Tensor:
    """The embedded default text as one token stream (documents separated by eos)."""
    from chronicals.data import default_texts, default_tokenizer

    tok = default_tokenizer()
    ids: list[int] = []
    for doc in tok(default_texts())["input_ids"]:
        ids += [*doc, tok.eos_token_id]
    return torch.tensor(ids, dtype=torch.long)


def collate(sequences: list[torch.Tensor], layout: str) -> dict:
    """One step's sequences as a batch in `layout`."""
    if layout == "packed":
        return _packed(sequences)
    if layout != "padded":
        raise ValueError(f"unknown layout {layout!r}; choose one of: {', '.join(LAYOUTS)}")
    lengths = [s.numel() for s in sequences]
    width = max(lengths)
    input_ids = torch.full((len(sequences), width), PAD_ID, dtype=torch.long)
    labels = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, s in enumerate(sequences):
        input_ids[row, : s.numel()] = s
        labels[row, : s.numel()] = s
        mask[row, : s.numel()] = 1
    batch = {"input_ids": input_ids, "labels": labels}
    if min(lengths) < width:  # without padding, no mask: HF's SDPA path then takes its plain causal kernel
        batch["attention_mask"] = mask
    return batch


def _packed(sequences: list[torch.Tensor]) -> dict:
    input_ids = torch.cat(sequences).unsqueeze(0)
    labels = input_ids.clone()
    lengths = torch.tensor([s.numel() for s in sequences], dtype=torch.int32)
    cu = torch.zeros(len(sequences) + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    labels[0, cu[:-1].long()] = IGNORE_INDEX  # a sequence's first token is never predicted from the one before
    position_ids = torch.cat([torch.arange(int(n)) for n in lengths]).unsqueeze(0)
    longest = int(lengths.max())
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "cu_seq_lens_q": cu,
            "cu_seq_lens_k": cu.clone(), "max_length_q": longest, "max_length_k": longest}


def label_tokens(batch: dict) -> int:
    """The loss terms of a batch: labels after the causal shift that are not ignore_index."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def real_tokens(sequences: list[torch.Tensor]) -> int:
    """What label_tokens must be for these sequences in any layout: every token but each sequence's first."""
    return sum(s.numel() - 1 for s in sequences)


def to_device(batch: dict, device: str) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
