"""The formats other fine-tuning tools' users bring: ShareGPT `conversations`, Alpaca, TRL's conversational
prompt/completion, OpenAI content parts; what carries loss in each, auto-detection, and the errors for bad rows."""

import copy
import json

import datasets
import pytest

from chronicals.data import FORMATS, detect_format, prepare_dataset, tokenize_rows
from chronicals.data.alpaca import alpaca_prompt
from tests.data.helpers import trained_text

SHAREGPT = [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "What does pass do?"},
            {"from": "gpt", "value": "Nothing."}, {"from": "human", "value": "And assert?"},
            {"from": "gpt", "value": "It checks a condition."}]
MESSAGES = [{"role": {"human": "user", "gpt": "assistant"}.get(t["from"], t["from"]), "content": t["value"]}
            for t in SHAREGPT]


def test_sharegpt_trains_like_the_same_messages(tok):
    (sharegpt,) = tokenize_rows([{"conversations": SHAREGPT}], tok, "sharegpt")
    (messages,) = tokenize_rows([{"messages": MESSAGES}], tok, "messages")
    assert sharegpt == messages
    assert trained_text(tok, sharegpt) == "Nothing.<|im_end|>\nIt checks a condition.<|im_end|>\n"


def test_alpaca_prompt_carries_no_loss(tok):
    rows = [{"instruction": "Add the numbers.", "input": "2 and 2", "output": "4"},
            {"instruction": "Say hello.", "input": "", "output": "Hello!"},
            {"instruction": "Say bye.", "output": "Bye."}]
    examples = tokenize_rows(rows, tok, "alpaca")
    assert [trained_text(tok, e) for e in examples] == ["4<|endoftext|>", "Hello!<|endoftext|>", "Bye.<|endoftext|>"]
    assert tok.decode(examples[0]["input_ids"]).startswith(alpaca_prompt("Add the numbers.", "2 and 2"))
    assert "### Input:" in alpaca_prompt("a", "b") and "### Input:" not in alpaca_prompt("a", "")
    # The same as the prompt/completion row it stands for.
    as_pc = tokenize_rows([{"prompt": alpaca_prompt("Say hello."), "completion": "Hello!"}], tok, "prompt_completion")
    assert examples[1] == as_pc[0]


def test_conversational_prompt_completion_trains_the_completion_only(tok):
    prompt = [{"role": "user", "content": "What does pass do?"}, {"role": "assistant", "content": "Nothing."},
              {"role": "user", "content": "And assert?"}]
    completion = [{"role": "assistant", "content": "It checks a condition."}]
    (example,) = tokenize_rows([{"prompt": prompt, "completion": completion}], tok, "prompt_completion")
    assert tok.decode(example["input_ids"]) == tok.apply_chat_template(prompt + completion, tokenize=False)
    assert trained_text(tok, example) == "It checks a condition.<|im_end|>\n"  # not the prompt's "Nothing."
    with pytest.raises(TypeError, match="row 1: 'prompt' must be a non-empty list"):
        tokenize_rows([{"prompt": prompt, "completion": completion}, {"prompt": "Q", "completion": "A"}], tok,
                      "prompt_completion")
    with pytest.raises(TypeError, match="row 1: 'prompt' is a list, but the first row's prompt is a str"):
        tokenize_rows([{"prompt": "Q", "completion": "A"}, {"prompt": prompt, "completion": completion}], tok,
                      "prompt_completion")


def test_content_parts_and_extra_keys_and_weight(tok):
    text_parts = [{"type": "text", "text": "What does "}, {"type": "text", "text": "pass do?"}]
    parts = [{"role": "user", "content": text_parts},
             {"role": "assistant", "content": [{"type": "text", "text": "Nothing."}], "name": "bot"}]
    plain = [{"role": "user", "content": "What does pass do?"}, {"role": "assistant", "content": "Nothing."}]
    assert tokenize_rows([{"messages": parts}], tok, "messages") == tokenize_rows([{"messages": plain}], tok,
                                                                                   "messages")
    # axolotl's ShareGPT mark for a turn not to train on.
    weighted = [*SHAREGPT[:3], *SHAREGPT[3:4], {**SHAREGPT[4], "weight": 0}]
    (example,) = tokenize_rows([{"conversations": weighted}], tok, "sharegpt")
    assert trained_text(tok, example) == "Nothing.<|im_end|>\n"
    unweighted = [*SHAREGPT[:2], {**SHAREGPT[2], "weight": 0}]
    with pytest.raises(ValueError, match="none of the 1 sequences has a label token .* all have weight 0"):
        prepare_dataset([{"conversations": unweighted}], tok, use_cache=False)


def test_a_tokenizer_without_a_chat_template_is_named_for_every_kind_of_chat_row(tok):
    # The advice was "give rows as 'text' or 'prompt'/'completion'", which a conversational row already is.
    bare = copy.deepcopy(tok)
    bare.chat_template = None
    for row, fmt in [({"conversations": SHAREGPT}, "sharegpt"),
                     ({"prompt": MESSAGES[:2], "completion": MESSAGES[2:3]}, "prompt_completion")]:
        with pytest.raises(ValueError, match=r"no chat_template, so chat rows .* lists of messages\) cannot be "
                                             r"rendered; .* or as 'prompt'/'completion' strings"):
            tokenize_rows([row], bare, fmt)


@pytest.mark.parametrize(
    "row, fmt, error, match",
    [
        ({"conversations": [{"from": "bing", "value": "hi"}]}, "sharegpt", ValueError,
         r"row 0: conversations\[0\]\['from'\] is 'bing'; ShareGPT turns must be from one of"),
        ({"messages": [{"role": "human", "content": "hi"}, {"role": "gpt", "content": "yo"}]}, "messages", ValueError,
         r"row 0: messages\[0\]\['role'\] is 'human', a ShareGPT name: use 'user' and 'assistant'"),
        # In any case: 'GPT' is rendered verbatim by a template too, and trained nothing.
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "GPT", "content": "yo"}]}, "messages", ValueError,
         r"row 0: messages\[1\]\['role'\] is 'GPT', a ShareGPT name"),
        ({"messages": [{"role": "user", "content": [{"type": "image", "image": "x.png"}]}]}, "messages", TypeError,
         r"messages\[0\]\['content'\]\[0\] is a 'image' part; only .* parts can be trained on"),
        ({"messages": [{"role": "assistant", "content": None, "tool_calls": [{"name": "f"}]}]}, "messages",
         TypeError, r"messages\[0\]\['content'\] must be a str, got NoneType; tool calls are not supported"),
        # A ShareGPT turn's text is its 'value' (it has no 'content', which the error named).
        ({"conversations": [{"from": "human", "value": None}]}, "sharegpt", TypeError,
         r"row 0: conversations\[0\]\['value'\] must be a str, got NoneType"),
        ({"conversations": [{"from": "human", "value": [{"type": "image"}]}]}, "sharegpt", TypeError,
         r"row 0: conversations\[0\]\['value'\]\[0\] is a 'image' part"),
        ({"instruction": "Say hi.", "input": 3, "output": "hi"}, "alpaca", TypeError, "row 0: 'input' must be a str"),
        ({"instruction": "Say hi.", "output": ""}, "alpaca", ValueError, "row 0: 'output' is empty"),
        ({"instruction": None, "output": "hi"}, "alpaca", KeyError, "row 0: 'instruction' is null"),
    ],
)
def test_bad_rows_name_the_row_and_field(tok, row, fmt, error, match):
    with pytest.raises(error, match=match):
        tokenize_rows([row], tok, fmt)


def test_auto_detection_and_every_source_kind(tok, tmp_path):
    assert detect_format(["conversations"]) == "sharegpt"
    assert detect_format(["instruction", "output"]) == "alpaca"
    # tatsu-lab/alpaca also has a `text` column (prompt and output in one): training on it would train the prompt.
    assert detect_format(["instruction", "input", "output", "text"]) == "alpaca"
    assert detect_format(["messages", "conversations"]) == "messages"
    assert {"sharegpt", "alpaca"} <= set(FORMATS)
    for rows, fmt in [([{"conversations": SHAREGPT}] * 2, "sharegpt"),
                      ([{"instruction": "Say hi.", "input": "", "output": "hi"}, {"instruction": "Say yo.",
                                                                                  "input": "now", "output": "yo"}],
                       "alpaca")]:
        path = tmp_path / f"{fmt}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        results = [prepare_dataset(s, tok, max_seq_length=256, use_cache=False)
                   for s in (rows, path, datasets.Dataset.from_list(rows))]
        assert all(r.format == fmt for r in results) and all(r.rows == results[0].rows for r in results)
        assert results[0].stats["label_tokens"] > 0
