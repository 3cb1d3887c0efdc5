"""Chat rows train only on assistant turns and text rows on the configured column (through the config's column
names); the LR schedule's shape."""

import pytest
import torch

from chronicals.config import ChronicalsConfig
from chronicals.data import default_tokenizer
from chronicals.training.dataset import DataError, prepare_training_data
from chronicals.training.schedule import build_scheduler, lr_factor


def test_chat_rows_carry_loss_only_on_assistant_turns():
    tok = default_tokenizer()
    chats = [{"dialog": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
                         {"role": "assistant", "content": "Blue is one."}]}]
    cfg = ChronicalsConfig(messages_column="dialog", max_seq_length=128, use_sequence_packing=False)
    data = prepare_training_data(chats, tok, cfg)
    (row,) = data.rows
    trained = [t for t, label in zip(row["input_ids"], row["labels"]) if label != -100]
    text = tok.decode(trained)
    assert "Blue is one." in text
    assert "Name a colour" not in text and "Be brief" not in text
    assert [label for label in row["labels"] if label != -100] == trained


@pytest.mark.parametrize("as_dataset", [False, True], ids=["list", "datasets.Dataset"])
def test_configured_text_column_wins_over_a_column_named_text(as_dataset):
    # text_column says which column to train on; another column that happens to be called "text" must not win
    # (here it comes after the configured one, so a plain rename would let it overwrite the renamed column).
    tok = default_tokenizer()
    rows = [{"body": "The body that the config names.", "text": "a summary line"}]
    if as_dataset:
        import datasets

        rows = datasets.Dataset.from_list(rows)
    cfg = ChronicalsConfig(text_column="body", max_seq_length=128, use_sequence_packing=False)
    (row,) = prepare_training_data(rows, tok, cfg).rows
    assert tok.decode(row["input_ids"]) == "The body that the config names.<|endoftext|>"


@pytest.mark.parametrize("as_dataset", [False, True], ids=["list", "datasets.Dataset"])
def test_a_configured_column_the_data_lacks_is_an_error_not_the_default_column(as_dataset):
    # docs/TRAINING.md: column names come from text_column etc., and missing columns are refused before training;
    # text_column "body" on data with only a "text" column trained on "text" without a word.
    tok = default_tokenizer()
    rows = [{"text": "a line the config did not name"}]
    if as_dataset:
        import datasets

        rows = datasets.Dataset.from_list(rows)
    cfg = ChronicalsConfig(text_column="body", max_seq_length=128, use_sequence_packing=False)
    with pytest.raises(DataError, match="config field 'text_column' is 'body', but the data has no column 'body'"):
        prepare_training_data(rows, tok, cfg)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_warmup_then_decay(schedule):
    f = [lr_factor(s, warmup_steps=4, total_steps=20, schedule=schedule, min_lr_ratio=0.1) for s in range(21)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]
    assert f[4] == pytest.approx(1.0)
    if schedule == "constant":
        assert all(x == 1.0 for x in f[4:])
    else:
        assert all(a >= b for a, b in zip(f[4:], f[5:]))  # never rises after warmup
        assert f[20] == pytest.approx(0.1)  # ends at min_lr_ratio
        mid = 4 + 8
        assert f[mid] == pytest.approx(0.55)  # halfway: cosine and linear both at the midpoint


def test_scheduler_drives_the_optimizer():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = build_scheduler(opt, warmup_steps=2, total_steps=4, schedule="linear", min_lr_ratio=0.0)
    seen = []
    for _ in range(4):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.5, 1.0, 1.0, 0.5])


def test_a_loaded_state_resumes_on_this_schedule_not_the_saved_one():
    # A resume with another max_steps (or warmup, schedule, min_lr_ratio) trains on this run's schedule (TRAINING.md).
    # LambdaLR.load_state_dict restores the step count but leaves the optimizer's lr as saved, computed by the OLD
    # schedule, so the first resumed step trained at the old schedule's lr (found by resuming max_steps 4 -> 8).
    def make(total):
        p = torch.nn.Parameter(torch.zeros(2))
        opt = torch.optim.SGD([{"params": [p], "lr": 1.0}, {"params": [torch.nn.Parameter(torch.zeros(1))],
                                                             "lr": 4.0}])
        return opt, build_scheduler(opt, warmup_steps=1, total_steps=total, schedule="linear", min_lr_ratio=0.0)

    opt, sched = make(4)
    for _ in range(2):
        opt.step()
        sched.step()
    saved_opt, saved_sched = opt.state_dict(), sched.state_dict()
    opt, sched = make(8)
    opt.load_state_dict(saved_opt)
    sched.load_state_dict(saved_sched)
    expected = lr_factor(2, warmup_steps=1, total_steps=8, schedule="linear", min_lr_ratio=0.0)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([expected, 4 * expected])
    assert sched.get_last_lr() == pytest.approx([expected, 4 * expected])
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(
        lr_factor(3, warmup_steps=1, total_steps=8, schedule="linear", min_lr_ratio=0.0))
