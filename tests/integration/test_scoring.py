"""vLLM's scoring routes through the router with the official openai SDK (raw calls: the SDK
has no rerank or score method): `/v1/rerank`, `/rerank`, `/v2/rerank`, `/score`, `/v1/score`
on a simulated pooling model, by alias, with keys, a sleeping model woken, counted; and the
engine's own 404 for a generative model, which has no such route."""
import openai
import pytest

from tests.helpers import SimEngine, free_port, get_json, http, instance_yaml, router_over

KEY = "sk-score-test"
MODEL = "sc/bge-reranker"
DOCS = ["the cat sat on the mat", "stock prices fell today", "a cat and a mat"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    engine = SimEngine("vllm", MODEL, args=["--enable-sleep-mode", "--runner", "pooling"])
    chat = SimEngine("vllm", "sc/chat")
    head = (f"router: {{router_port: {free_port()}, api_keys: [{KEY}]}}\n"
            "sleep_manager: {min_sleep_duration: 0}\n")
    with router_over(tmp_path_factory.mktemp("scoring"), head, [
            instance_yaml("r", MODEL, engine.port, "vllm", "    served_model_names: [rerank]\n"),
            instance_yaml("c", "sc/chat", chat.port, "vllm")], [engine, chat]) as router:
        yield {"base": router.base}


def _client(stack, root=False):
    return openai.OpenAI(base_url=stack["base"] + ("" if root else "/v1"), api_key=KEY,
                         max_retries=0)


def test_rerank_through_the_sdk_ranks_the_documents(stack):
    out = _client(stack).post("/rerank", cast_to=object, body={
        "model": "rerank", "query": "where is the cat", "documents": DOCS, "top_n": 2})
    assert [r["index"] for r in out["results"]] == [0, 2]
    assert out["results"][0]["document"]["text"] == DOCS[0]
    for path in ("/rerank", "/v2/rerank"):   # vLLM's other spellings, at the root
        again = _client(stack, root=True).post(path, cast_to=object, body={
            "model": MODEL, "query": "where is the cat", "documents": DOCS})
        assert [r["index"] for r in again["results"]] == [0, 2, 1]


def test_score_and_the_sleeping_model_woken_and_counted(stack):
    base = stack["base"]
    assert http("POST", base + f"/model/sleep/{MODEL}")[0] == 200
    before = get_json(base + "/traffic/stats/rerank")[1]["model_stats"]["total_requests"]
    out = _client(stack).post("/score", cast_to=object, body={
        "model": "rerank", "text_1": "a cat", "text_2": ["a cat", "a dog", "stocks"]})
    assert [round(d["score"], 3) for d in out["data"]] == [1.0, 0.333, 0.0]
    out = _client(stack, root=True).post("/score", cast_to=object, body={
        "model": MODEL, "text_1": "x", "text_2": "x"})
    assert out["data"][0]["score"] == 1.0
    assert get_json(base + f"/health/{MODEL}")[1]["state"] == "ready"
    after = get_json(base + "/traffic/stats/rerank")[1]["model_stats"]["total_requests"]
    assert after == before + 2


def test_scoring_errors_are_clear(stack):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=stack["base"] + "/v1", api_key="wrong", max_retries=0).post(
            "/rerank", cast_to=object, body={"model": MODEL, "query": "q", "documents": DOCS})
    with pytest.raises(openai.BadRequestError) as err:   # the engine's own validation
        _client(stack).post("/rerank", cast_to=object, body={"model": MODEL, "query": "q"})
    assert "documents" in str(err.value)
    with pytest.raises(openai.NotFoundError):   # a generative model has no rerank route
        _client(stack).post("/rerank", cast_to=object, body={
            "model": "sc/chat", "query": "q", "documents": DOCS})
    with pytest.raises(openai.BadRequestError) as err:   # two models: which one?
        _client(stack, root=True).post("/score", cast_to=object, body={"text_1": "a",
                                                                       "text_2": "b"})
    assert "rerank" in str(err.value) and "sc/chat" in str(err.value)
