"""A pruned Pear adapter over HTTP: the job's method puts it on the batching engine (through its exact LoRA
export), and what the API answers equals what neat_core's own Pear model (shared parameters, residuals) computes.
A service of its own (own database, one organisation), so the shared serving fixture stays read-only."""

from __future__ import annotations

import json

import pytest

from api.deps import hash_key
from api.targets import of_job
from control.ids import new_id
from control.jobs import fine_tuned_model_name
from control.migrate import upgrade
from control.orm import ApiKey, Job, Organization
from control.settings import Settings
from control.storage import Storage, job_key
from inference.inprocess import model_ref
from tests.conftest import chat_rows, classification_rows, write_jsonl
from tests.inference.conftest import backend_for, make_client

ORG, KEY = "org-pear", "sk-test-org-pear"
TEXTS = ["love it", "awful support", "superb quality"]
HELLO = [{"role": "user", "content": "What colour is item 3?"}]


@pytest.fixture(scope="module")
def pear_service(tmp_path_factory, tiny_models):
    from control.db import session_scope
    from neat_core.train import TrainSpec, train

    root = tmp_path_factory.mktemp("pear-serving")
    settings = Settings(
        data_dir=root, database_url=f"sqlite:///{root / 'x.sqlite'}", artifact_root=root / "artifacts", device="cpu"
    )
    upgrade(settings.resolved_database_url)
    storage = Storage(settings.resolved_artifact_root)
    jobs = {}
    for kind, task, rows in (("bert", "classification", classification_rows()), ("llama", "causal_lm", chat_rows())):
        job_id = new_id("ftjob")
        work = storage.path(job_key(ORG, job_id))
        work.mkdir(parents=True)
        adapter = {"r": 4, "warmup_steps": 2, "lora_alpha": 64}  # a large scale, so the adapter shows in outputs
        spec = TrainSpec(
            base_model=str(tiny_models[kind]),
            training_file=write_jsonl(work / "train.jsonl", rows),
            output_dir=work,
            method="pear",
            adapter=adapter,
            batch_size=4,
            max_steps=4,  # past the prune step
            learning_rate_multiplier=20.0,
            seed=0,
            device="cpu",
        )
        result = train(spec)
        assert json.loads((result.adapter_dir / "manifest.json").read_text())["method_state"]["prune"]["shares"]
        job = Job(
            id=job_id,
            organization_id=ORG,
            model=str(tiny_models[kind]),
            task=task,
            training_file="file-test",
            suffix="p",
            seed=0,
            hyperparameters={},
            adapter={"type": "pear", **adapter},
            status="succeeded",
            artifact_key=f"{job_key(ORG, job_id)}/adapter",
        )
        job.fine_tuned_model = fine_tuned_model_name(job)
        jobs[task] = job
    with session_scope(settings.resolved_database_url) as session:
        session.add(Organization(id=ORG, name=ORG))
        session.flush()
        session.add(ApiKey(id=new_id("key"), organization_id=ORG, key_hash=hash_key(KEY), prefix=KEY[:12]))
        session.add_all(jobs.values())
    return settings, storage, jobs


def test_pear_classification_is_batched_and_equals_neat_core(pear_service):
    from neat_core.artifacts import load_artifact
    from neat_core.inference import classify

    settings, storage, jobs = pear_service
    job = jobs["classification"]
    ref = model_ref(of_job(job, storage))
    assert ref.method == "pear" and backend_for(settings).host.batched(ref)
    client = make_client(settings, KEY)
    r = client.post("/v1/classifications", json={"model": job.fine_tuned_model, "input": TEXTS})
    assert r.status_code == 200, r.text
    served = [row["probabilities"] for row in r.json()["data"]]

    loaded = load_artifact(ref.artifact_dir, device="cpu")
    expected = [row["probabilities"] for row in classify(loaded.model, loaded.tokenizer, TEXTS)]
    with loaded.model.disable_adapter():
        bare = [row["probabilities"] for row in classify(loaded.model, loaded.tokenizer, TEXTS)]
    assert max(abs(e["positive"] - b["positive"]) for e, b in zip(expected, bare, strict=True)) > 1e-3
    for got, want in zip(served, expected, strict=True):
        assert got == pytest.approx(want, abs=1e-4)
    engines = client.get("/v1/serving/stats").json()["engines"]
    assert any(job.fine_tuned_model in e["your_adapters"] for e in engines if e["task"] == "classification")


def test_pear_chat_is_batched_and_equals_neat_core_greedy(pear_service):
    from neat_core.artifacts import load_artifact
    from neat_core.inference import generate

    settings, storage, jobs = pear_service
    job = jobs["causal_lm"]
    client = make_client(settings, KEY)
    r = client.post(
        "/v1/chat/completions",
        json={"model": job.fine_tuned_model, "messages": HELLO, "max_tokens": 6, "temperature": 0},
    )
    assert r.status_code == 200, r.text
    loaded = load_artifact(storage.path(job.artifact_key), device="cpu")
    text, _, _ = generate(loaded.model, loaded.tokenizer, HELLO, max_new_tokens=6)
    assert r.json()["choices"][0]["message"]["content"] == text
    engines = client.get("/v1/serving/stats").json()["engines"]
    assert any(job.fine_tuned_model in e["your_adapters"] for e in engines if e["task"] == "causal_lm")


def test_pear_artifact_downloads_and_its_lora_form_loads_in_stock_peft(pear_service, tiny_models, tmp_path):
    """The native download carries the prune record (loadable through neat_core); the LoRA download is plain
    LoRA that stock peft loads and that answers what neat_core's Pear model answers."""
    import io
    import tarfile

    import torch
    from peft import PeftModel

    from neat_core.artifacts import load_artifact
    from neat_core.models import load_base

    settings, storage, jobs = pear_service
    job = jobs["classification"]
    client = make_client(settings, KEY)
    unpacked = {}
    for form in ("native", "lora"):
        r = client.get(f"/v1/fine_tuning/jobs/{job.id}/adapter", params={"format": form})
        assert r.status_code == 200, r.text
        with tarfile.open(fileobj=io.BytesIO(r.content)) as tar:
            tar.extractall(tmp_path / form, filter="data")
        (unpacked[form],) = (p.parent for p in (tmp_path / form).rglob("adapter_config.json"))
    native = json.loads((unpacked["native"] / "adapter_config.json").read_text())
    assert native["pear"]["shares"], "the native artifact records which positions share which adapter"

    labels = json.loads((unpacked["native"] / "manifest.json").read_text())["labels"]
    base, tokenizer = load_base(str(tiny_models["bert"]), task="classification", labels=labels)
    stock = PeftModel.from_pretrained(base, str(unpacked["lora"])).eval()
    ours = load_artifact(unpacked["native"], device="cpu").model.eval()
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(stock(**batch).logits, ours(**batch).logits, atol=1e-5)
