"""The HTTP API of a deployment (`prism run --serve PORT --http PORT`), driven by the official `openai`
package and by plain HTTP, against runner processes on loopback.

At CR=1 every device's output is exact, so: embeddings equal the HF model's pooled embedding as
sentence-transformers pools it (cosine >= 0.9999); a greedy completion streamed by the `openai` package
carries the token ids of transformers' own greedy generation, in order. Bad requests get their OpenAI-
shaped error and status (400, 401, 404, 413), the runners keep serving after each, and /metrics (parsed
with prometheus_client's own parser) counts exactly the requests made.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np
import pytest

from prism_onnx.errors import (BundleError, Busy, DevicesUnavailable, FrameError, InputError, InternalError, PeerError,
                               PlanError, Timeout)
import torch

from conftest import minilm_path, sst2_sentences, tiny_model
from prism_onnx import models
from prism_onnx.exporters.bundle import ExportSettings, write_bundles, write_preprocessing
from prism_onnx.pooling import DEFAULT, pool, pooling_of_folder
from prism_onnx.runtime.cluster import LocalCluster, free_ports

openai = pytest.importorskip("openai")
KEY = "sk-test-0123456789"
CHAT = ("{% for m in messages %}{{ 't2' if m['role'] == 'user' else 't3' }} {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}t4{% endif %}")
SENTENCES = ["a gripping, funny film", "dull", "it 's a charming and often affecting journey .",
             "the acting is terrible and the plot makes no sense"]


# ---------------------------------------------------------------------------------------------- helpers
def http(base: str, key: str | None = KEY) -> httpx.Client:
    return httpx.Client(base_url=base, timeout=60, trust_env=False,
                        headers={"Authorization": f"Bearer {key}"} if key else {})


def openai_client(base: str, key: str = KEY):
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=60)


def bundle_with_source(graphs, source: Path, out: Path, **settings) -> Path:
    """Lay out bundles of already traced `graphs` with the preprocessing that the exporter writes for the
    model folder `source` (tokenizer, chat template, pooling): the graphs do not depend on it."""
    folder = out.parent / f"{out.name}-graphs"
    folder.mkdir()
    for f in graphs.graph_payload():  # graph files and their external data (the embedding table)
        shutil.copyfile(graphs.folder / f, folder / f)
    pre = write_preprocessing(models.load(source), graphs.spec, folder)
    return write_bundles(replace(graphs, folder=folder, preprocessing=pre, source=str(source)), out,
                         ExportSettings(**settings))


def deploy(bundle: Path, *args: str) -> tuple[LocalCluster, str]:
    port = free_ports(1)[0]
    cluster = LocalCluster(bundle, serve_args=["--http", str(port), *args]).__enter__()
    return cluster, f"http://127.0.0.1:{port}"


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


def st_pooled(model, tokenizer, texts: list[str], modes: list[str], normalize: bool) -> np.ndarray:
    """sentence-transformers' pooling, written out in torch over the HF model's last_hidden_state."""
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = model(**enc).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).float()
    parts = {"cls": h[:, 0], "mean": (h * m).sum(1) / m.sum(1).clamp(min=1e-9)}
    x = torch.cat([parts[k] for k in modes], -1)
    return (torch.nn.functional.normalize(x, p=2, dim=1) if normalize else x).numpy()


def cosines(a, b) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def scrape(base: str) -> dict:
    """/metrics parsed with prometheus_client's parser: {(sample name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    r = http(base, None).get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(r.text) for s in fam.samples}


def request_counts(metrics: dict) -> dict:
    return {(dict(lab)["endpoint"], dict(lab)["status"]): v for (name, lab), v in metrics.items()
            if name == "prism_http_requests_total"}


# ------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def gpt2(exported_graphs, tmp_path_factory):
    """A tiny GPT-2 (key/value exchange) with a word-level tokenizer ("t0".."t299", one word per id) and a
    chat template, P=2 at CR=1, served over HTTP with an API key and --min-devices 2 (a lost device makes
    requests 503; with the default of 1 the survivor would serve them). -> (cluster, base url, HF model)."""
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("gpt2-http")
    model = tiny_model("GPT2LMHeadModel")
    model.save_pretrained(root / "model")
    tok = Tokenizer(tok_models.WordLevel({f"t{i}": i for i in range(300)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=CHAT).save_pretrained(root / "model")
    bundle = bundle_with_source(exported_graphs["GPT2LMHeadModel/kv"], root / "model", root / "export", devices=2,
                                compression_ratio=1)
    cluster, base = deploy(bundle, "--api-key", KEY, "--min-devices", "2")
    try:
        yield cluster, base, model
    finally:
        cluster.close()


@pytest.fixture(scope="module")
def bert(exported_graphs, tiny_dirs, tmp_path_factory):
    """The tiny BERT (MiniLM's tokenizer) as a sentence-transformers folder that pools the [CLS] token and
    normalizes, P=2 at CR=1, served over HTTP without an API key. -> (cluster, base url, source folder)."""
    root = tmp_path_factory.mktemp("bert-http")
    src = root / "model"
    shutil.copytree(tiny_dirs["BertModel"], src)
    (src / "1_Pooling").mkdir()
    (src / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 32, "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}))
    (src / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    bundle = bundle_with_source(exported_graphs["BertModel"], src, root / "export", devices=2, compression_ratio=1,
                                max_seq_len=64)
    cluster, base = deploy(bundle)
    try:
        yield cluster, base, src
    finally:
        cluster.close()


# ----------------------------------------------------------------------------------------- embeddings
def test_pooling_is_read_from_the_model_folder_and_recorded_in_the_bundle(tiny_dirs, tmp_path):
    assert pooling_of_folder(tiny_dirs["BertModel"]) == DEFAULT  # no sentence-transformers modules: mean
    assert pooling_of_folder(minilm_path()) == {"modes": ["mean"], "normalize": True,
                                                "source": "sentence-transformers", "skipped_modules": []}
    h = np.random.default_rng(0).standard_normal((2, 4, 3)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert np.allclose(pool(h, mask), [h[0, :3].mean(0), h[1, :2].mean(0)], atol=1e-6)
    both = pool(h, mask, {"modes": ["cls", "max"], "normalize": True})
    assert np.allclose(np.linalg.norm(both, axis=1), 1) and both.shape == (2, 6)


def test_openai_embeddings_equal_sentence_transformers_pooling(bert):
    from transformers import AutoModel, AutoTokenizer

    cluster, base, src = bert
    manifest = json.loads((cluster.root / "device-1" / "manifest.json").read_text())
    assert (manifest["preprocessing"]["pooling"]["modes"] == ["cls"]
            and manifest["preprocessing"]["pooling"]["normalize"])
    expected = st_pooled(AutoModel.from_pretrained(src).eval(), AutoTokenizer.from_pretrained(src), SENTENCES,
                         ["cls"], normalize=True)
    client = openai_client(base, "unused")  # this deployment has no API key
    name = client.models.list().data[0].id
    for fmt in (openai.NOT_GIVEN, "float", "base64"):  # not given: the package asks for base64 and decodes it
        r = client.embeddings.create(model=name, input=SENTENCES, encoding_format=fmt)
        got = np.array([np.frombuffer(base64.b64decode(d.embedding), "<f4") if fmt == "base64" else d.embedding
                        for d in sorted(r.data, key=lambda d: d.index)])
        assert got.shape == (len(SENTENCES), 32) and cosines(got, expected).min() >= 0.9999, fmt
    assert r.usage.prompt_tokens == sum(len(AutoTokenizer.from_pretrained(src)(s)["input_ids"]) for s in SENTENCES)
    # text-embeddings-inference's /embed: normalized by default; normalize=false gives the raw [CLS] pooling
    with http(base, None) as c:
        tei = c.post("/embed", json={"inputs": SENTENCES}).json()
        raw = c.post("/embed", json={"inputs": SENTENCES[0], "normalize": False}).json()
    assert cosines(tei, expected).min() >= 0.9999
    assert len(raw) == 1 and abs(np.linalg.norm(raw[0]) - 1) > 1e-3 and cosines(raw, expected[:1])[0] >= 0.9999


def test_prism_infer_reports_the_sentence_embedding_that_v1_embeddings_returns(bert, tmp_path):
    """Issue 23: `prism infer` of a sentence-transformers export prints and saves `sentence_embedding` (pooled as
    the folder says) beside the raw outputs: the vector /v1/embeddings returns, and the one sentence-transformers
    pools from the HF model (CR=1)."""
    from click.testing import CliRunner
    from transformers import AutoModel, AutoTokenizer

    from prism_onnx.cli import main

    cluster, base, src = bert
    text = SENTENCES[2]
    r = CliRunner().invoke(main, ["infer", "--server", cluster.serve_address, "--keys", str(cluster.root / "client"),
                                  "--text", text, "--save", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    first = r.stdout.splitlines()[0]
    assert first.startswith("  sentence_embedding [1, 32]") and "what /v1/embeddings returns" in first, r.stdout
    assert f"saved {tmp_path / 'out.npz'}" in r.stdout
    saved = np.load(tmp_path / "out.npz")
    assert set(saved.files) == {"sentence_embedding", "last_hidden_state", "pooler_output"}
    client = openai_client(base, "unused")
    v1 = np.array(client.embeddings.create(model=client.models.list().data[0].id, input=[text],
                                           encoding_format="float").data[0].embedding, np.float32)
    expected = st_pooled(AutoModel.from_pretrained(src).eval(), AutoTokenizer.from_pretrained(src), [text], ["cls"],
                         normalize=True)[0]
    got = saved["sentence_embedding"][0]
    assert np.abs(got - v1).max() < 1e-6  # the same pooling of the same outputs
    assert np.abs(got - expected).max() < 1e-4 and abs(np.linalg.norm(got) - 1) < 1e-5


def test_chat_and_completions_on_an_encoder_say_it_cannot_generate(bert):
    """Issue 23: chat on an encoder said "use /v1/completions", which then said it cannot generate: both say
    why at once (no language-model head), naming the model."""
    _, base, _ = bert
    with http(base, None) as c:
        name = c.get("/v1/models").json()["data"][0]["id"]
        for path, body in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
                           ("/v1/completions", {"prompt": "hi"})):
            r = c.post(path, json={"model": name, **body})
            message = r.json()["error"]["message"]
            assert r.status_code == 400 and "/v1/completions" not in message, (path, message)
            assert "cannot generate: its model (BertModel) has no language-model head" in message, (path, message)


@pytest.mark.parametrize("cr,expected", [(1, [[0, 1, 2], [3]]), (4, [[0, 1], [2, 3]])])
def test_embedding_batches_hold_one_length_at_cr_above_1(cr, expected):
    """At CR > 1 the plan cuts a batch's padded length: /v1/embeddings sends rows of equal length together
    only, so that a text's embedding does not depend on the other texts of its request (at CR=1 padding is
    masked and costs nothing but rounding)."""
    from types import SimpleNamespace

    from prism_onnx.serve.gateway import Gateway

    g = SimpleNamespace(limits=SimpleNamespace(max_batch=3),
                        manifest=SimpleNamespace(settings=SimpleNamespace(compression_ratio=cr)))
    rows = [[1, 2], [3, 4], [5, 6, 7], [8, 9, 10]]
    assert Gateway._chunks(g, [0, 1, 2, 3], rows) == expected


def test_an_overlong_input_is_413_unless_embed_truncates_it(bert):
    cluster, base, _ = bert
    long_text = "a gripping, funny film " * 20  # about 100 tokens; this export takes 64
    with http(base, None) as c:
        r = c.post("/v1/embeddings", json={"input": ["dull", long_text]})
        assert r.status_code == 413 and r.json()["error"]["param"] == "input"
        assert "input[1] has" in r.json()["error"]["message"] and "at most 64" in r.json()["error"]["message"]
        assert c.post("/embed", json={"inputs": long_text}).status_code == 413
        cut = c.post("/embed", json={"inputs": [long_text], "truncate": True})
        assert cut.status_code == 200 and len(cut.json()[0]) == 32
        r = c.post("/v1/embeddings", json={"input": [[101, 2000, 102], [101, 2001, 102]], "encoding_format": "float"})
        assert r.status_code == 200 and [d["index"] for d in r.json()["data"]] == [0, 1]


@pytest.mark.long
def test_openai_embeddings_of_minilm_p2_equal_sentence_transformers(tmp_path):
    """The real MiniLM (sentence-transformers folder: mean pooling, Normalize), exported P=2 at CR=1: the
    `openai` package's embeddings of SST-2 sentences equal sentence-transformers' pooled embeddings."""
    from transformers import AutoModel, AutoTokenizer

    from prism_onnx.exporters.bundle import export

    bundle = export(minilm_path(), tmp_path / "minilm", ExportSettings(devices=2, compression_ratio=1, max_seq_len=128))
    sentences = sst2_sentences(16)
    expected = st_pooled(AutoModel.from_pretrained(minilm_path()).eval(), AutoTokenizer.from_pretrained(minilm_path()),
                         sentences, ["mean"], normalize=True)
    cluster, base = deploy(bundle, "--api-key", KEY, "--served-model-name", "all-MiniLM-L6-v2")
    try:
        r = openai_client(base).embeddings.create(model="all-MiniLM-L6-v2", input=sentences)
    finally:
        cluster.close()
    got = np.array([d.embedding for d in sorted(r.data, key=lambda d: d.index)])
    assert got.shape == (16, 384) and cosines(got, expected).min() >= 0.9999


# ----------------------------------------------------------------------------------------- generation
def test_openai_streams_a_completion_equal_to_transformers_greedy(gpt2):
    cluster, base, model = gpt2
    prompt = [5, 17, 42, 7, 99, 3, 250, 11, 64]
    expected = hf_greedy(model, prompt, 12)
    client = openai_client(base)
    stream = client.completions.create(model="model", prompt=prompt, max_tokens=12, temperature=0, stream=True,
                                       stream_options={"include_usage": True}, extra_body={"return_token_ids": True})
    chunks = list(stream)
    ids = [t for c in chunks for ch in c.choices for t in (ch.model_extra or {}).get("token_ids", [])]
    text = "".join(ch.text for c in chunks for ch in c.choices)
    assert ids == expected
    assert text == " ".join(f"t{t}" for t in expected)  # the bundle's tokenizer decodes them
    assert [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason] == ["length"]
    assert chunks[-1].usage.prompt_tokens == len(prompt) and chunks[-1].usage.completion_tokens == 12
    # the same prompt as text, through the bundle's tokenizer, not streamed
    r = client.completions.create(model="model", prompt=" ".join(f"t{t}" for t in prompt), max_tokens=12,
                                  temperature=0)
    assert r.choices[0].text == text and r.usage.total_tokens == len(prompt) + 12


def test_chat_stop_strings_and_seeded_sampling(gpt2):
    cluster, base, model = gpt2
    client = openai_client(base)
    messages = [{"role": "user", "content": "t8 t9 t10"}, {"role": "assistant", "content": "t11"},
                {"role": "user", "content": "t12 t13"}]
    rendered = [2, 8, 9, 10, 3, 11, 2, 12, 13, 4]  # the chat template: t2 user, t3 assistant, t4 to answer
    expected = hf_greedy(model, rendered, 8)
    r = client.chat.completions.create(model="model", messages=messages, max_tokens=8, temperature=0)
    assert r.choices[0].message.content == " ".join(f"t{t}" for t in expected)
    assert r.usage.prompt_tokens == len(rendered) and r.choices[0].finish_reason == "length"
    streamed = client.chat.completions.create(model="model", messages=messages, max_tokens=8, temperature=0,
                                              stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == r.choices[0].message.content
    # a stop string ends the text before it
    stop = f" t{expected[3]}"
    cut = " ".join(f"t{t}" for t in expected).split(stop)[0]
    s = client.chat.completions.create(model="model", messages=messages, max_tokens=8, temperature=0, stop=[stop])
    assert s.choices[0].message.content == cut and s.choices[0].finish_reason == "stop"
    # OpenAI's default temperature is 1.0: sampling, reproducible with a seed
    a, b = (client.completions.create(model="model", prompt=[5, 6, 7], max_tokens=10, seed=3).choices[0].text
            for _ in range(2))
    assert a == b


# -------------------------------------------------------------------------------------------- errors
def test_errors_have_the_openai_shape_and_the_runners_keep_serving(gpt2):
    cluster, base, _ = gpt2
    before = request_counts(scrape(base))
    made: dict = {("/metrics", "200"): 1}

    def call(method, path, status, key=KEY, count=True, **kw):
        with http(base, key) as c:
            r = c.request(method, path, **kw)
        assert r.status_code == status, (path, r.status_code, r.text)
        if count:
            endpoint = path if path in ("/v1/completions", "/health", "/v1/models", "/v1/embeddings") else "other"
            made[(endpoint, str(status))] = made.get((endpoint, str(status)), 0) + 1
        if status >= 400:
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["message"], err
            return err
        return r.json()

    good = {"model": "model", "prompt": [5, 6, 7], "max_tokens": 3, "temperature": 0}

    def still_serving():
        assert len(call("POST", "/v1/completions", 200, json=good)["choices"][0]["text"].split()) == 3
        assert call("GET", "/health", 200)["devices"] == 2
        assert all(p.poll() is None for p in cluster.procs)

    assert call("POST", "/v1/completions", 401, key=None, json=good)["code"] == "invalid_api_key"
    assert "incorrect" in call("POST", "/v1/completions", 401, key="sk-wrong", json=good)["message"]
    still_serving()
    assert "not valid JSON" in call("POST", "/v1/completions", 400, content=b'{"prompt": [5, 6',
                                    headers={"content-type": "application/json"})["message"]
    assert call("POST", "/v1/completions", 400, json={**good, "max_tokens": "3"})["param"] == "max_tokens"
    assert call("POST", "/v1/completions", 400, json={**good, "prompt": 5})["param"] == "prompt"
    assert call("POST", "/v1/completions", 400, json={**good, "temperature": True})["param"] == "temperature"
    assert call("POST", "/v1/completions", 400, json={**good, "prompt": [5, 300]})["param"] == "prompt"
    assert call("POST", "/v1/completions", 400, json=[1, 2])["message"].endswith("a JSON object")
    assert call("POST", "/v1/completions", 400, json={**good, "max_tokens": 62})["param"] == "max_tokens"
    still_serving()
    assert call("POST", "/v1/completions", 413, json={**good, "prompt": [5] * 65})["code"] == "context_length_exceeded"
    call("POST", "/v1/completions", 413, content=b" " * (17 << 20), headers={"content-type": "application/json"})
    still_serving()
    assert call("POST", "/v1/embeddings", 400, json={"input": ["t5 t6"]})["message"].startswith(
        "this deployment's model (GPT2LMHeadModel) returns no token embeddings")
    assert call("POST", "/v1/completions", 404, json={**good, "model": "gpt-4"})["code"] == "model_not_found"
    assert call("GET", "/v1/nothing", 404)["code"] == "unknown_url"
    assert call("GET", "/v1/models", 200)["data"][0]["prism"]["capabilities"] == ["completions", "chat"]
    still_serving()

    after = scrape(base)
    counts = request_counts(after)
    delta = {k: v - before.get(k, 0) for k, v in counts.items() if v != before.get(k, 0)}
    assert delta == made
    assert after[("prism_devices_in_plan", ())] == 2 and after[("prism_cluster_ready", ())] == 1
    def layer_bytes(direction):
        return {(dict(lab)["device"], dict(lab)["layer"]): v for (name, lab), v in after.items()
                if name == f"prism_layer_bytes_{direction}_total"}

    # a causal model: device 0 sends its means forward to device 1, at each of the 2 exchange points
    assert set(layer_bytes("sent")) == {("0", "0"), ("0", "1")} and min(layer_bytes("sent").values()) > 0
    assert layer_bytes("received") == {("1", "0"): layer_bytes("sent")[("0", "0")],
                                       ("1", "1"): layer_bytes("sent")[("0", "1")]}
    assert after[("prism_generated_tokens_total", ())] >= 3 * 4
    assert after[("prism_decode_tokens_per_second", ())] > 0


def test_health_is_503_while_a_device_is_down(gpt2):
    cluster, base, _ = gpt2
    cluster.stop_device(1)
    try:
        with http(base) as c:
            deadline = time.monotonic() + 60  # the runner notices the loss within about a second
            while (r := c.get("/health")).status_code != 503 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert r.status_code == 503 and "device 1" in r.json()["error"]["message"]
            r = c.post("/v1/completions", json={"model": "model", "prompt": [5, 6], "max_tokens": 2})
            assert r.status_code == 503 and r.json()["error"]["code"] == "devices_unavailable"
    finally:
        cluster.start_device(1)
        cluster.wait_ready(60)
    with http(base) as c:
        assert c.get("/health").status_code == 200


# ---------------------------------------------------------------------------------------------- CLI
def test_the_core_runner_imports_no_http_library_and_without_the_extra_says_what_to_install(gpt2):
    cluster, _, _ = gpt2
    code = ("import sys; import prism_onnx.cli, prism_onnx.runtime.host, prism_onnx.serve; "
            "print(sorted(m for m in ('starlette', 'uvicorn', 'prometheus_client', 'jinja2') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stderr
    # as on a board without the extra: uvicorn cannot be imported (None in sys.modules blocks an import)
    code = "import sys; sys.modules['uvicorn'] = None; from prism_onnx.cli import main; main()"
    out = subprocess.run([sys.executable, "-c", code, "run", str(cluster.root / "device-0"), "--peers", cluster.peers,
                          "--serve", "1", "--http", "2"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1] == ('Error: MissingExtra: --http needs uvicorn, which the core install '
                                                   'leaves out: pip install "prism-onnx[serve]"')


@pytest.mark.parametrize("error,status,code", [
    (InputError("bad ids"), 400, "invalid_input"), (InputError("702 tokens", code="too_long"), 413,
                                                     "context_length_exceeded"),
    (FrameError("malformed"), 400, "bad_message"), (PlanError("CR 0"), 400, "invalid_plan"),
    (Busy("busy"), 503, "busy"), (DevicesUnavailable("1 of 3 live"), 503, "devices_unavailable"),
    (PeerError("no means from device 2"), 503, "peer_failed"), (Timeout("no reply"), 504, "timeout"),
    (InternalError("a bug"), 500, "internal"), (BundleError("tampered"), 500, "bad_bundle"),
])
def test_an_http_status_comes_from_the_errors_code(error, status, code):
    """One table (serve/errors.STATUS_OF_CODE): the error the cluster raised travels as an ErrorInfo, is
    raised again as its own class on the gateway's side, and its code, never its text, gives the status."""
    from prism_onnx.errors import ERRORS, ErrorInfo
    from prism_onnx.serve.errors import STATUS_OF_CODE, from_cluster

    again = ErrorInfo.of(error).exception()
    assert type(again) is type(error) and again.code == error.code and str(again) == str(error)
    api = from_cluster(again)
    assert (api.status, api.code) == (status, code)
    assert all(cls.code in STATUS_OF_CODE for cls in ERRORS.values())


# ------------------------------------------------------------------------------------------- HTTP limits
LIMITS = ["--http-header-timeout", "1", "--http-body-timeout", "6", "--http-max-connections", "16",
          "--http-max-bodies", "2", "--http-max-body-mb", "1"]


@pytest.fixture(scope="module")
def limited(exported_graphs, tmp_path_factory):
    """The tiny BERT at P=2 served over HTTP with small limits: headers within 1 s, a body within 6 s, 16
    connections, 2 bodies of up to 1 MiB read at once."""
    bundle = write_bundles(exported_graphs["BertModel"], tmp_path_factory.mktemp("limits") / "export",
                           ExportSettings(devices=2, compression_ratio=1, max_seq_len=64))
    cluster, base = deploy(bundle, *LIMITS)
    try:
        yield cluster, base
    finally:
        cluster.close()


def tcp(base: str):
    import socket

    host, port = base.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=60)  # a hang guard: the server closes first


def until_closed(s) -> bytes:
    """Everything the server sends until it closes the connection (b"reset" when it resets it)."""
    out = b""
    try:
        while chunk := s.recv(65536):
            out += chunk
    except ConnectionResetError:
        out = out or b"reset"
    s.close()
    return out


def refused(base: str, reason: str) -> float:
    return scrape(base).get(("prism_http_refused_total", (("reason", reason),)), 0.0)


EMBED_HEAD = "POST /v1/embeddings HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"


def test_slow_headers_and_slow_bodies_are_closed_after_their_timeouts(limited):
    """Slowloris: 20 connections that never finish their headers, then 2 whose body stops half way: each gets
    408 and is closed by the server (the sockets' own timeout of 60 s is only a hang guard)."""
    from concurrent.futures import ThreadPoolExecutor

    cluster, base = limited
    slow_headers = [tcp(base) for _ in range(20)]
    for s in slow_headers:
        s.sendall(b"POST /v1/embeddings HTTP/1.1\r\nhost: x\r\n")  # no blank line: the headers never end
    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(until_closed, slow_headers))
    assert all(a.startswith(b"HTTP/1.1 408 ") and a.endswith(b"did not arrive in time\n") for a in answers), answers
    slow_bodies = [tcp(base) for _ in range(2)]
    for s in slow_bodies:
        s.sendall((EMBED_HEAD + "content-length: 100\r\n\r\n").encode() + b'{"input": [[1, 2')
    answers = [until_closed(s) for s in slow_bodies]
    assert all(a.startswith(b"HTTP/1.1 408 ") and b"did not arrive within 6 s" in a for a in answers), answers
    assert refused(base, "header_timeout") == 20 and refused(base, "body_timeout") == 2
    with http(base, None) as c:  # and it serves
        assert c.post("/v1/embeddings", json={"input": [[101, 2023, 102]]}).status_code == 200


@pytest.fixture(scope="module")
def crowded(exported_graphs, tmp_path_factory):
    """The tiny BERT at P=2 over HTTP with 16 connections at most and a body timeout of 10 minutes: held
    connections stay open until the test closes them, however slowly a loaded machine gets to its probes."""
    bundle = write_bundles(exported_graphs["BertModel"], tmp_path_factory.mktemp("crowded") / "export",
                           ExportSettings(devices=2, compression_ratio=1, max_seq_len=64))
    cluster, base = deploy(bundle, "--http-max-connections", "16", "--http-body-timeout", "600",
                           "--http-max-bodies", "2")
    try:
        yield cluster, base
    finally:
        cluster.close()


def test_connections_beyond_the_limit_are_refused_at_once_with_503(crowded):
    """16 connections held by bodies in flight (2 being read, 14 waiting for their turn); one more gets
    uvicorn's 503 at once; once the 16 close, a request is served again."""
    cluster, base = crowded
    held = [tcp(base) for _ in range(16)]
    for s in held:
        s.sendall((EMBED_HEAD + "content-length: 100\r\n\r\n").encode() + b'{"input"')

    def health() -> bytes:  # on a new connection each time: accepted after the 16, which the backlog holds first
        s = tcp(base)
        s.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        return until_closed(s)

    guard = time.monotonic() + 120  # a hang guard only: the 16 stay open until closed below
    while not (r := health()).startswith(b"HTTP/1.1 503 ") and time.monotonic() < guard:
        time.sleep(0.05)  # until the 16 connections are open on the server's side
    assert r.startswith(b"HTTP/1.1 503 ") and r.endswith(b"Service Unavailable"), r
    for s in held:
        s.close()
    guard = time.monotonic() + 120
    while not (r := health()).startswith(b"HTTP/1.1 200 ") and time.monotonic() < guard:
        time.sleep(0.05)  # until the server has seen the 16 close
    assert r.startswith(b"HTTP/1.1 200 "), r


def test_memory_stays_bounded_under_concurrent_oversized_bodies(limited):
    """12 clients send a 15 MB body each, at once (the issue's case: the runner's RSS went from 215 to 475 MB
    before each got its 413): 6 declare their length (refused before a byte of it is read), 6 send it
    chunked (read up to the limit of 1 MiB, 2 at a time). Every one is refused (counted), and the server's
    memory grows by little."""
    import select
    from concurrent.futures import ThreadPoolExecutor

    cluster, base = limited
    pid = cluster.procs[0].pid

    def kb(field):
        return next(int(ln.split()[1]) for ln in open(f"/proc/{pid}/status") if ln.startswith(field))

    with http(base, None) as c:  # warm: the first request's allocations are not the bodies'
        assert c.post("/v1/embeddings", json={"input": [[101, 102]]}).status_code == 200
    before, peak_before, count_before = kb("VmRSS"), kb("VmHWM"), refused(base, "body_too_large")
    body = b'{"input": "' + b"x" * (15 << 20) + b'"}'

    def send(chunked: bool) -> bytes:
        s = tcp(base)
        head = EMBED_HEAD + ("transfer-encoding: chunked\r\n\r\n" if chunked else
                             f"content-length: {len(body)}\r\n\r\n")
        try:
            s.sendall(head.encode())
            for i in range(0, len(body), 1 << 18):  # until the server answers (it need not read the rest)
                part = body[i:i + (1 << 18)]
                s.sendall(f"{len(part):x}\r\n".encode() + part + b"\r\n" if chunked else part)
                if select.select([s], [], [], 0)[0]:
                    break
        except OSError:
            pass  # the server answered and closed before the body was sent
        return until_closed(s)

    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(send, [k % 2 == 1 for k in range(12)]))
    assert all(a.startswith(b"HTTP/1.1 413 ") or a == b"reset" for a in answers), [a[:100] for a in answers]
    assert all(a.startswith(b"HTTP/1.1 413 ") for a in answers[0::2])  # declared: answered before the body
    assert refused(base, "body_too_large") - count_before == 12
    growth, peak = kb("VmRSS") - before, kb("VmHWM") - max(before, peak_before)
    print(f"RSS of the serving runner over 12 concurrent 15 MB bodies: {growth} kB growth, peak {peak} kB above "
          f"its earlier peak (12 x 15 MB = {12 * 15 * 1024:,} kB sent)")
    assert growth < 60_000 and peak < 60_000
