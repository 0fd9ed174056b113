"""Lily through the serving path: never the low-rank factor engine (its router is input-dependent), but a whole peft
model in per-sample router mode with a batching engine of its own, where concurrent requests (classification, and
generation step by step) run in one batch and each gets exactly what it gets alone; its artifact downloads (no
LoRA form)."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
import threading
import time

import pytest
import torch

from control.ids import new_id
from control.jobs import fine_tuned_model_name
from control.migrate import upgrade
from control.orm import ApiKey, Job, Organization
from control.settings import Settings
from control.storage import Storage, job_key
from inference.host import ModelHost, ModelRef, load_whole
from neat_core.artifacts import save_artifact
from neat_core.inference import generate
from neat_core.methods import attach
from neat_core.methods.lily.layer import install_routing
from neat_core.models import load_base
from neat_core.serving import BatchEngine, SamplingParams
from tests.inference.conftest import KEY_A, ORG_A, make_client

LABELS = ["negative", "positive"]
TEXTS = [  # different lengths: each is padded differently inside a batch of all four
    "love it",
    "a much longer request about the service, which was excellent in nearly every way we could think of",
    "awful support, never again",
    "ok",
]


def lily_artifact(kind: str, base_dir, out_dir):
    """A Lily artifact with random weights (a fresh adapter is a no-op), saved the way training saves one."""
    task = "classification" if kind == "bert" else "causal_lm"
    model, _ = load_base(str(base_dir), task=task, labels=LABELS if task == "classification" else None)
    torch.manual_seed(0)
    model = attach(model, "lily", r=4)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lily_" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    manifest = {"task": task, "labels": LABELS if task == "classification" else None, "hyperparameters": {}}
    return save_artifact(model, out_dir, base_model=str(base_dir), manifest=manifest)


@pytest.fixture(scope="module")
def artifacts(tiny_models, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("lily-serving")
    return {kind: lily_artifact(kind, tiny_models[kind], root / kind) for kind in ("bert", "llama")}


def no_factor_engine(base_model: str, task: str, base_dir=None):
    raise AssertionError("a Lily adapter was sent to the low-rank factor engine")


def own_batches(ref: ModelRef) -> BatchEngine:
    """The solo model loaded whole under a batching engine with a long gathering window (threads started together
    share a batch) and no length buckets (texts of different lengths share one padded pass: what per-sample mode
    must survive)."""
    model, tokenizer, max_length = load_whole(ref, cache_dir=None, device="cpu")
    return BatchEngine(model, tokenizer, ref.task, cache_bytes=0, window_s=0.5, max_length=max_length,
                       pass_overhead=10**6)  # fmt: skip


def engine() -> ModelHost:
    return ModelHost(2, own_batches, no_factor_engine)


def classification_ref(tiny_models, artifacts) -> ModelRef:
    return ModelRef("ft:lily-cls", "classification", str(tiny_models["bert"]), artifacts["bert"], "org", "lily")


def classify_concurrently(serving: ModelHost, ref: ModelRef) -> tuple[list[dict], list[int]]:
    """Each text as its own request, from its own thread, all queued while the model is busy; returns the
    answers and the batch sizes of the forward passes that served them.

    The model is held busy on purpose: a first request's forward pass waits until the engine holds all four
    requests, so they share the next pass however slowly a loaded machine starts the threads (a gathering
    window alone once let one thread arrive late: batches [1, 3])."""
    solo = serving.solo(ref)
    peft_model = solo.model.model  # the engine's MultiAdapterModel wraps the whole model
    release, busy = threading.Event(), threading.Event()

    def hold(module, args, kwargs):
        if not busy.is_set():  # only the blocking request's pass waits
            busy.set()
            assert release.wait(timeout=120), "the queued requests never arrived"

    sizes: list[int] = []
    gate = peft_model.register_forward_pre_hook(hold, with_kwargs=True)
    blocker = threading.Thread(target=serving.classify, args=(ref, ["hold the engine"]))
    blocker.start()
    assert busy.wait(timeout=60)
    hook = peft_model.register_forward_hook(lambda m, args, kwargs, out: sizes.append(out.logits.shape[0]),
                                              with_kwargs=True)  # fmt: skip
    answers: list = [None] * len(TEXTS)

    def ask(i: int) -> None:
        answers[i] = serving.classify(ref, [TEXTS[i]])[0][0]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(TEXTS))]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while solo.queue_depth() < len(TEXTS) and time.monotonic() < deadline:
        time.sleep(0.01)
    release.set()
    for t in [blocker, *threads]:
        t.join(timeout=60)
    gate.remove()
    hook.remove()
    assert sizes[0] == 1  # the blocking request's own pass, which ends once released: not one of ours
    return answers, sizes[1:]


def max_difference(a: list[dict], b: list[dict]) -> float:
    return max(abs(x["probabilities"][k] - y["probabilities"][k]) for x, y in zip(a, b, strict=True) for k in LABELS)


def test_concurrent_lily_requests_share_a_batch_and_each_gets_its_answer_alone(tiny_models, artifacts):
    serving = engine()
    ref = classification_ref(tiny_models, artifacts)
    assert not serving.batched(ref)
    alone = [serving.classify(ref, [text])[0][0] for text in TEXTS]

    together, sizes = classify_concurrently(serving, ref)
    assert sizes == [len(TEXTS)]  # one forward pass, all four requests in it, padded to the longest
    assert max_difference(alone, together) <= 1e-5

    # The faithful batch-mean router in the same batch gives different answers: what per-sample mode prevents.
    install_routing(serving.solo(ref).model.model, "batch")
    faithful, sizes = classify_concurrently(serving, ref)
    assert sizes == [len(TEXTS)]
    assert max_difference(alone, faithful) > 1e-3


def test_concurrent_lily_generations_share_batches_and_each_gets_its_answer_alone(tiny_models, artifacts):
    serving = engine()
    ref = ModelRef("ft:lily-chat", "causal_lm", str(tiny_models["llama"]), artifacts["llama"], "org", "lily")
    chats = [[{"role": "user", "content": text}] for text in TEXTS]  # prompts of different lengths: left padding
    generations: list = [None] * len(chats)

    def ask(i: int) -> None:
        gen = serving.generate(ref, chats[i], SamplingParams(max_tokens=8, temperature=0.0))
        generations[i] = (gen.text(), gen.completion_tokens)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(chats))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    solo = serving.solo(ref)
    assert max(solo.batch_sizes) == len(chats), "the generations should have run as one batch"
    peft_model, tokenizer = solo.model.model, solo.tokenizer
    for chat, (text, completion_tokens) in zip(chats, generations, strict=True):
        expected, _, tokens = generate(peft_model, tokenizer, chat, max_new_tokens=8)  # alone
        assert (text, completion_tokens) == (expected, tokens) and tokens > 0
    with peft_model.disable_adapter():  # the adapter is really applied
        bare, _, _ = generate(peft_model, tokenizer, chats[0], max_new_tokens=8)
    assert bare != generations[0][0]


def test_an_evicted_solo_model_finishes_its_requests_and_its_engine_stops(tiny_models, artifacts):
    serving = ModelHost(1, own_batches, no_factor_engine)
    chat = ModelRef("ft:lily-chat", "causal_lm", str(tiny_models["llama"]), artifacts["llama"], "org", "lily")
    gen = serving.generate(chat, [{"role": "user", "content": "hi"}], SamplingParams(max_tokens=6, temperature=0.0))
    first = serving.solo(chat)
    serving.classify(classification_ref(tiny_models, artifacts), ["ok"])  # capacity 1: evicts the chat model
    assert gen.text() is not None and gen.completion_tokens > 0  # the request in flight still finished
    first._thread.join(timeout=10)
    assert not first._thread.is_alive(), "the evicted model's engine should stop once idle"
    again = serving.generate(chat, [{"role": "user", "content": "hi"}], SamplingParams(max_tokens=6, temperature=0.0))
    assert again.text() and serving.solo(chat) is not first  # a fresh load serves the next request


def test_lily_job_classifies_and_downloads_over_http(tiny_models, artifacts, tmp_path):
    from api.deps import hash_key
    from control.db import session_scope

    settings = Settings(
        data_dir=tmp_path, database_url=f"sqlite:///{tmp_path / 'x.sqlite'}", artifact_root=tmp_path / "a", device="cpu"
    )
    upgrade(settings.resolved_database_url)
    job_id = new_id("ftjob")
    key = job_key(ORG_A, job_id)
    shutil.copytree(artifacts["bert"], Storage(settings.resolved_artifact_root).path(key) / "adapter")
    job = Job(id=job_id, organization_id=ORG_A, model=str(tiny_models["bert"]), task="classification",
              training_file="file-test", suffix="t", seed=0, hyperparameters={}, adapter={"type": "lily"},
              status="succeeded", artifact_key=f"{key}/adapter")  # fmt: skip
    job.fine_tuned_model = fine_tuned_model_name(job)
    with session_scope(settings.resolved_database_url) as session:
        session.add(Organization(id=ORG_A, name=ORG_A))
        session.flush()
        session.add(ApiKey(id=new_id("key"), organization_id=ORG_A, key_hash=hash_key(KEY_A), prefix=KEY_A[:12]))
        session.add(job)

    client = make_client(settings)
    answer = client.post("/v1/classifications", json={"model": job.fine_tuned_model, "input": TEXTS})
    assert answer.status_code == 200, answer.text
    serving = engine()
    alone = [serving.classify(classification_ref(tiny_models, artifacts), [t])[0][0] for t in TEXTS]
    assert max_difference(alone, answer.json()["data"]) <= 1e-5  # the request's own texts, padded together

    native = client.get(f"/v1/fine_tuning/jobs/{job_id}/adapter")
    assert native.status_code == 200
    with tarfile.open(fileobj=io.BytesIO(native.content)) as tar:
        files = {m.name.split("/", 1)[1]: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    assert json.loads(files["adapter_config.json"])["peft_type"] == "LILY"
    assert json.loads(files["manifest.json"])["method"] == "lily" and "adapter_model.safetensors" in files
    assert client.get(f"/v1/fine_tuning/jobs/{job_id}/adapter", params={"format": "lora"}).status_code == 400
