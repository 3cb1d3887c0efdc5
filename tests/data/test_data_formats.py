"""Row formats: what carries loss in text, prompt/completion and chat rows (assistant tokens only), and the errors
for rows of the wrong shape."""

import copy
import types

import pytest

from chronicals.data import detect_format, tokenize_rows
from tests.data.helpers import IGNORE, trained_text

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What does assert do?"},
    {"role": "assistant", "content": "It checks a condition."},
    {"role": "user", "content": "And pass?"},
    {"role": "assistant", "content": "Nothing at all."},
]


def test_chat_loss_on_assistant_tokens_only(tok):
    (example,) = tokenize_rows([{"messages": CHAT}], tok, "messages")
    assert tok.decode(example["input_ids"]) == tok.apply_chat_template(CHAT, tokenize=False)
    # Exactly the two replies, each with its end-of-turn marker (the model must learn to stop), nothing else.
    assert trained_text(tok, example) == "It checks a condition.<|im_end|>\nNothing at all.<|im_end|>\n"
    for text in ("Be brief.", "What does assert do?", "And pass?", "assistant"):
        assert text not in trained_text(tok, example)
    # Labels are aligned token ids (the trainer shifts), not next tokens.
    assert all(label == t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE)


def test_chat_default_system_prompt_is_not_trained(tok):
    # Like Qwen's templates: a default system prompt when the conversation has none, also before an opening reply.
    qwen_like = copy.copy(tok)
    qwen_like.chat_template = (
        "{% if messages | length == 0 or messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\nYou are helpful.<|im_end|>\n' }}{% endif %}" + tok.chat_template
    )
    opening = [{"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Hi."},
               {"role": "assistant", "content": "Bye."}]
    (example,) = tokenize_rows([{"messages": opening}], qwen_like, "messages")
    assert "You are helpful." in tok.decode(example["input_ids"])
    assert trained_text(tok, example) == "Hello.<|im_end|>\nBye.<|im_end|>\n"


def test_chat_without_assistant_turn_has_no_label(tok):
    (example,) = tokenize_rows([{"messages": CHAT[:2]}], tok, "messages")
    assert set(example["labels"]) == {IGNORE}


@pytest.mark.parametrize("role", ["Assistant", "ASSISTANT", " assistant"])
def test_chat_role_that_differs_from_assistant_only_in_case_is_refused(tok, role):
    # Templates compare roles exactly, so these turns would be rendered as context and train nothing, silently.
    messages = [*CHAT[:2], {"role": role, "content": "It checks a condition."}]
    with pytest.raises(ValueError, match=r"row 0: messages\[2\]\['role'\] is .*rename the role"):
        tokenize_rows([{"messages": messages}], tok, "messages")


def test_chat_template_that_rewrites_earlier_turns_is_refused(tok):
    odd = copy.copy(tok)
    odd.chat_template = "{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(ValueError, match="row 0: the chat template is not prefix-stable"):
        tokenize_rows([{"messages": CHAT}], odd, "messages")
    odd.chat_template = "{% for m in messages %}{{ m['role'] }}{{ m['content'] | upper }}{% endfor %}"
    with pytest.raises(ValueError, match="does not render an assistant message's content verbatim"):
        tokenize_rows([{"messages": CHAT[2:]}], odd, "messages")
    odd.chat_template = None
    with pytest.raises(ValueError, match="no chat_template"):
        tokenize_rows([{"messages": CHAT}], odd, "messages")


def test_prompt_completion_loss_on_completion_and_eos(tok):
    (example,) = tokenize_rows([{"prompt": "Q: what is pass?", "completion": " A: a null operation."}], tok,
                               "prompt_completion")
    assert trained_text(tok, example) == " A: a null operation.<|endoftext|>"
    assert example["input_ids"][-1] == tok.eos_token_id


def test_prompt_completion_trains_on_an_eos_the_tokenizer_appends_itself(tok):
    # Tokenizers set up with add_eos_token end every encoding with eos, at offsets (0, 0): outside the completion's
    # characters, but it is still the completion's end the model must learn.
    from tokenizers.processors import TemplateProcessing

    adds_eos = copy.deepcopy(tok)
    adds_eos.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"$A {tok.eos_token}", special_tokens=[(tok.eos_token, tok.eos_token_id)])
    (example,) = tokenize_rows([{"prompt": "Q: what is pass?", "completion": " A: a null operation."}], adds_eos,
                               "prompt_completion")
    assert example["input_ids"].count(tok.eos_token_id) == 1
    assert trained_text(tok, example) == " A: a null operation.<|endoftext|>"


def test_text_trains_on_every_token_and_ends_with_eos(tok):
    (example,) = tokenize_rows([{"text": "The pass statement does nothing."}], tok, "text")
    assert example["labels"] == example["input_ids"]
    assert example["input_ids"][-1] == tok.eos_token_id


def test_detect_format():
    assert detect_format(["messages", "id"]) == "messages"
    assert detect_format(["prompt", "completion", "text"]) == "prompt_completion"
    assert detect_format(["text"]) == "text"
    assert detect_format(["input_ids", "labels", "text"]) == "tokenized"
    with pytest.raises(KeyError, match="cannot tell the row format from the columns \\['body'\\]"):
        detect_format(["body"])
    with pytest.raises(KeyError, match="needs column\\(s\\) \\['completion'\\]"):
        detect_format(["prompt", "text"], "prompt_completion")
    with pytest.raises(ValueError, match="format must be"):
        detect_format(["text"], "chat")


@pytest.mark.parametrize(
    "rows, fmt, error, match",
    [
        ([{"text": "ok"}, {"text": 5}], "text", TypeError, "row 1: 'text' must be a str, got int"),
        ([{"text": ""}], "text", ValueError, "row 0: 'text' is empty"),
        ([{"text": "ok"}, {"body": "x"}], "text", KeyError, "row 1 has no 'text'"),
        ([{"prompt": "a", "completion": None}], "prompt_completion", KeyError, "row 0: 'completion' is null"),
        ([{"messages": "hello"}], "messages", TypeError, "row 0: 'messages' must be a non-empty list"),
        ([{"messages": []}], "messages", TypeError, "an empty list"),
        ([{"messages": [{"role": "user"}]}], "messages", TypeError, "messages\\[0\\]\\['content'\\] must be a str"),
        ([{"messages": [["user", "hi"]]}], "messages", TypeError, "messages\\[0\\] must be a dict"),
    ],
)
def test_bad_rows_name_the_row_and_field(tok, rows, fmt, error, match):
    with pytest.raises(error, match=match):
        tokenize_rows(rows, tok, fmt)


def test_slow_tokenizer_is_refused():
    with pytest.raises(TypeError, match="not a fast tokenizer"):
        tokenize_rows([{"text": "hi"}], types.SimpleNamespace(is_fast=False), "text")


def test_chat_template_refusing_a_conversation_names_the_row(tok):
    # Like Gemma's and Mistral's templates: a jinja2 TemplateError, which is no ValueError and named no row.
    strict = copy.copy(tok)
    strict.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not "
                            "supported') }}{% endif %}" + tok.chat_template)
    assert tokenize_rows([{"messages": CHAT[1:3]}], strict, "messages")
    with pytest.raises(ValueError, match=r"row 1: the tokenizer's chat template refused this conversation \(System "
                                         r"role not supported\); change the row \(merge a system turn"):
        tokenize_rows([{"messages": CHAT[1:3]}, {"messages": CHAT}], strict, "messages")
    # A template that does not parse is broken for every row: it is not reported as this row's refusal.
    broken = copy.copy(tok)
    broken.chat_template = "{% for m in messages %}{{ m['content'] }}"
    with pytest.raises(ValueError, match=r"row 0: the tokenizer's chat template does not parse \(.*\); fix "
                                         r"tokenizer.chat_template"):
        tokenize_rows([{"messages": CHAT}], broken, "messages")


@pytest.mark.parametrize("fmt, row", [("text", {"text": "The pass statement."}),
                                      ("prompt_completion", {"prompt": "Q: pass?", "completion": " Nothing."}),
                                      ("alpaca", {"instruction": "Say it.", "output": "It."})])
def test_a_tokenizer_without_eos_is_refused_where_eos_ends_the_row(tok, fmt, row):
    # These rows end with eos so that the model learns to stop; without one it would never learn to, silently.
    no_eos = copy.deepcopy(tok)
    no_eos.eos_token = None
    with pytest.raises(ValueError, match=f"has no eos token.*format {fmt!r}.*tokenizer.eos_token"):
        tokenize_rows([row], no_eos, fmt)
    # Chat rows end each turn as the template writes it, eos or not.
    assert tokenize_rows([{"messages": CHAT}], no_eos, "messages")[0]["labels"]


def test_an_unpaired_surrogate_names_its_row(tok, tmp_path):
    # JSON may escape half of a surrogate pair ("\ud800"), which json.loads turns into a str no tokenizer can encode.
    rows = [{"text": "fine"}, {"text": "half of a pair: \ud800."}]
    with pytest.raises(ValueError, match=r"row 1: an unpaired surrogate '\\ud800' \(character 16 of the row"):
        tokenize_rows(rows, tok, "text")
    chat = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "\udfff"}]}]
    with pytest.raises(ValueError, match="row 0: .*unpaired surrogate"):
        tokenize_rows(chat, tok, "messages")
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "fine"}\n\n{"text": "half \\ud800"}\n')
    from chronicals.data import prepare_dataset

    with pytest.raises(ValueError, match=r"row 1 \(line 3\): .*unpaired surrogate"):
        prepare_dataset(path, tok, use_cache=False)
