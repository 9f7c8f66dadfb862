"""Property tests: record parsers and templates never crash on odd input; they either return a
well-formed result or raise one clear PipelineError line."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qlora_pipeline.data import sources, templates
from qlora_pipeline.data.formats import FORMATS, ROLES, to_conversation
from qlora_pipeline.data.prepare import IGNORE_INDEX, tokenize_batch
from qlora_pipeline.errors import PipelineError

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
field_names = st.sampled_from(
    ["instruction", "input", "output", "system", "prompt", "completion", "text", "messages", "x"]
)
messages = st.lists(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from([*ROLES, "human", 3]),
            "content": st.text(max_size=20) | st.integers(),
        }
    ),
    max_size=4,
)
rows = st.dictionaries(field_names, st.text(max_size=30) | json_values | messages, max_size=6)
FUZZ = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@FUZZ
@given(row=rows, fmt=st.sampled_from(FORMATS))
def test_record_parser_returns_a_conversation_or_one_clear_error(row, fmt):
    try:
        conversation = to_conversation(row, "f.jsonl:1", fmt)
    except PipelineError as e:
        assert str(e).startswith("f.jsonl:1: ") and "\n" not in str(e)
        return
    assert conversation and all(isinstance(c, str) for _, c in conversation)
    assert conversation[-1][0] == ("text" if fmt == "text" else "assistant")


@FUZZ
@given(data=st.binary(max_size=200))
def test_jsonl_reader_never_crashes(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("fuzz") / "f.jsonl"
    path.write_bytes(data)
    try:
        out = sources.read_file(path)
    except PipelineError as e:
        assert str(e).startswith(str(path)) and "\n" not in str(e)
        return
    assert out.rows and all(isinstance(r, dict) for r in out.rows)
    assert len(out.where) == len(out.rows)


@FUZZ
@given(text=st.text(max_size=200))
def test_csv_reader_never_crashes(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("fuzz") / "f.csv"
    path.write_text(text, encoding="utf-8")
    try:
        out = sources.read_file(path)
    except PipelineError as e:
        assert str(e).startswith(str(path)) and "\n" not in str(e)
        return
    assert all(isinstance(v, str) for r in out.rows for v in r.values())


turns = st.lists(
    st.tuples(st.text(max_size=30), st.text(min_size=1, max_size=30)), min_size=1, max_size=3
)


@FUZZ
@given(pairs=turns, template=st.sampled_from(list(templates.BUILTIN)), system=st.text(max_size=10))
def test_builtin_templates_frame_every_response(tiny_tokenizer, pairs, template, system):
    conversation = [("system", system)] if system else []
    for user, answer in pairs:
        conversation += [("user", user), ("assistant", answer)]
    segments = templates.render(conversation, template, tiny_tokenizer)
    full = "".join(text for text, _ in segments)
    assert full.startswith(tiny_tokenizer.bos_token)
    responses = [text for text, is_response in segments if is_response]
    assert len(responses) == len(pairs)
    for (_, answer), text in zip(pairs, responses, strict=True):
        assert answer in text and tiny_tokenizer.eos_token in text
    prompt = templates.eval_prompt(segments)
    assert full.startswith(prompt) and full[len(prompt) :] == responses[-1]


@FUZZ
@given(pairs=turns, loss_on=st.sampled_from(["response", "all"]), max_length=st.integers(1, 80))
def test_tokenized_labels_are_masked_ids(tiny_tokenizer, pairs, loss_on, max_length):
    conversation = [m for user, answer in pairs for m in (("user", user), ("assistant", answer))]
    segments = templates.render(conversation, "qa", tiny_tokenizer)
    out = tokenize_batch([segments], tiny_tokenizer, max_length, loss_on)
    ids, labels = out["input_ids"][0], out["labels"][0]
    assert (
        len(ids)
        == len(labels)
        == len(out["attention_mask"][0])
        == min(max_length, out["length"][0])
    )
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(ids, labels, strict=True))
    if loss_on == "all":
        assert labels == ids
    assert out["length"][0] == sum(
        len(tiny_tokenizer.encode(t, add_special_tokens=False)) for t, _ in segments
    )
