"""Engine conformance checks through the official openai SDK, parameterised by base URL.

Used against the simulated engine (tests/integration/test_sim_engine.py) and,
unchanged, against anything that speaks the OpenAI API (a real vLLM, or the
router). Each function takes an ``openai.OpenAI`` client and a model name.
"""
import base64
import struct

import openai


def check_models(client, model):
    models = client.models.list()
    ids = [m.id for m in models.data]
    assert model in ids
    card = [m for m in models.data if m.id == model][0]
    assert card.object == "model" and isinstance(card.created, int) and card.owned_by


def check_completion(client, model):
    r = client.completions.create(model=model, prompt="The capital of France is",
                                  max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and r.model == model
    assert len(r.choices) == 1 and r.choices[0].index == 0
    assert r.choices[0].finish_reason == "length"
    assert isinstance(r.choices[0].text, str)
    assert r.usage.completion_tokens == 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + 5


def check_chat(client, model):
    r = client.chat.completions.create(model=model, max_tokens=4, temperature=0,
                                       messages=[{"role": "user", "content": "Say hi"}],
                                       extra_body={"ignore_eos": True})
    assert r.object == "chat.completion"
    msg = r.choices[0].message
    assert msg.role == "assistant" and isinstance(msg.content, str)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 4


def check_stream_with_usage(client, model):
    chunks = list(client.chat.completions.create(
        model=model, max_tokens=6, temperature=0, stream=True,
        stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "Count"}], extra_body={"ignore_eos": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    # one chunk per token after the role chunk (a token that ends inside a UTF-8
    # character gives an empty string on real engines)
    content = [c for c in chunks if c.choices and c.choices[0].delta.content is not None
               and c.choices[0].delta.role is None]
    assert len(content) == 6
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert all(c.usage is None for c in chunks[:-1])


def check_completion_stream(client, model):
    chunks = list(client.completions.create(model=model, prompt="Once upon", max_tokens=3,
                                            stream=True, temperature=0,
                                            extra_body={"ignore_eos": True}))
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    assert chunks[-1].choices[0].finish_reason == "length"


def check_n_greater_than_one(client, model):
    r = client.completions.create(model=model, prompt="Pick", max_tokens=3, n=3,
                                  temperature=0.8, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert r.usage.completion_tokens == 9
    chunks = list(client.completions.create(model=model, prompt="Pick", max_tokens=2, n=2,
                                            stream=True, extra_body={"ignore_eos": True}))
    per_index = {}
    for c in chunks:
        for ch in c.choices:
            per_index.setdefault(ch.index, []).append(ch)
    assert sorted(per_index) == [0, 1]
    for idx, chs in per_index.items():
        assert [c.finish_reason for c in chs if c.finish_reason] == ["length"]


def check_embeddings(client, model):
    # the SDK asks for base64 by default and decodes it
    r = client.embeddings.create(model=model, input=["hello world", "bye"])
    assert [d.index for d in r.data] == [0, 1]
    assert isinstance(r.data[0].embedding, list) and len(r.data[0].embedding) > 8
    assert r.usage.prompt_tokens > 0
    raw = client.embeddings.with_raw_response.create(model=model, input="hello world",
                                                     encoding_format="float").parse()
    assert raw.data[0].embedding == r.data[0].embedding or \
        max(abs(a - b) for a, b in zip(raw.data[0].embedding, r.data[0].embedding)) < 1e-6
    b64 = client.embeddings.with_raw_response.create(model=model, input="x",
                                                     encoding_format="base64").http_response
    emb = b64.json()["data"][0]["embedding"]
    assert isinstance(emb, str) and len(base64.b64decode(emb)) % struct.calcsize("f") == 0


def check_greedy_n_is_refused(client, model):
    try:
        client.completions.create(model=model, prompt="x", max_tokens=1, n=2, temperature=0)
    except openai.BadRequestError as err:
        assert "greedy" in err.message
        return
    raise AssertionError("vLLM refuses n > 1 with greedy sampling")


def check_unknown_model(client, model):
    try:
        client.completions.create(model=model + "-nope", prompt="x", max_tokens=1)
    except openai.NotFoundError as err:
        assert err.status_code == 404
        return err
    raise AssertionError("expected 404 for an unknown model")


def check_bad_request(client, model):
    try:
        client.completions.create(model=model, prompt="x", max_tokens=-1)
    except openai.BadRequestError as err:
        assert err.status_code == 400
        return err
    raise AssertionError("expected 400 for max_tokens=-1")


ALL = [check_models, check_completion, check_chat, check_stream_with_usage,
       check_completion_stream, check_n_greater_than_one, check_embeddings,
       check_unknown_model, check_bad_request, check_greedy_n_is_refused]
NO_EMBEDDINGS = [c for c in ALL if c is not check_embeddings]
