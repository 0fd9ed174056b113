"""Operator-registered base models (control.models): what registration refuses (400 naming the problem, nothing
stored; the CLI's `error: ...` and exit 1), how they are listed, an organisation limited to some base models, and
removal. The directories here are hand-made (a config, a one-tensor safetensors file, tokenizer and chat-template
files): nothing is loaded, so these stay fast; but one, a real tiny Qwen3 served in process (the embedded topology's
inference). tests/e2e/test_registered_models.py trains one and serves it from an inference server."""

from __future__ import annotations

import io
import json
import stat
import struct
import tarfile
import zipfile
from pathlib import Path

import pytest
from sqlalchemy import func, select

from api import admin as admin_cli
from control.orm import RegisteredModel
from tests.api import MINILM, SMOLLM2, assert_error, chat_rows, classification_rows, sqlite_only
from tests.conftest import _build_tiny

ADMIN = "sk-admin-test"
MODEL = "acme/qwen3-support"


@pytest.fixture
def admin(make_api):
    return make_api(admin_api_key=ADMIN)


def as_admin() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN}"}


def model_dir(root: Path, *, model_type: str = "qwen3", architecture: str = "Qwen3ForCausalLM",
              weights: tuple[str, ...] = ("model.safetensors",), config: bool = True, tokenizer: bool = True,
              chat_template: bool = True) -> Path:  # fmt: skip
    """A directory that passes registration unless told to lack something."""
    root.mkdir(parents=True)
    if config:
        (root / "config.json").write_text(json.dumps({"model_type": model_type, "architectures": [architecture]}))
    for name in weights:
        if name.endswith(".safetensors"):
            header = json.dumps({"w": {"dtype": "BF16", "shape": [4, 3], "data_offsets": [0, 24]}}).encode()
            (root / name).write_bytes(struct.pack("<Q", len(header)) + header + bytes(24))
        else:
            (root / name).write_bytes(b"\x80\x04pickled")
    if tokenizer:
        (root / "tokenizer.json").write_text("{}")
    if chat_template:
        (root / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    return root


def register(api, model_id: str, path: Path):
    return api.client.post("/v1/admin/models", headers=as_admin(), json={"id": model_id, "path": str(path)})


def registered(api) -> int:
    with api.session() as session:
        return session.scalar(select(func.count()).select_from(RegisteredModel))


BROKEN = {
    "no config": ({"config": False}, "has no config.json"),
    "unsupported architecture": (
        {"model_type": "mamba", "architecture": "MambaForCausalLM"},
        "unsupported architecture 'mamba'",
    ),  # fmt: skip
    "pickle-only weights": ({"weights": ("pytorch_model.bin",)}, "pickle weights (pytorch_model.bin)"),
    "pickle beside safetensors": ({"weights": ("model.safetensors", "training_args.bin")}, "pickle weights"),
    "no weights": ({"weights": ()}, "no *.safetensors weights"),
    "no tokenizer": ({"tokenizer": False}, "has no tokenizer"),
    "causal LM without a chat template": ({"chat_template": False}, "without a chat template"),
}


@sqlite_only
@pytest.mark.parametrize("case", BROKEN)
def test_registration_refuses_a_directory_naming_what_is_wrong(admin, tmp_path, case):
    options, expected = BROKEN[case]
    error = assert_error(register(admin, MODEL, model_dir(tmp_path / "m", **options)), 400, code="invalid_model",
                         param="path")  # fmt: skip
    assert expected in error["message"], error
    assert registered(admin) == 0


@sqlite_only
def test_registration_refuses_bad_ids_relative_paths_and_non_admins(admin, tmp_path):
    good = model_dir(tmp_path / "m")
    assert_error(register(admin, SMOLLM2, good), 400, code="invalid_model", param="id")  # a catalog id
    assert_error(register(admin, "ft:x:y", good), 400, code="invalid_model", param="id")
    error = assert_error(register(admin, MODEL, Path("relative/dir")), 400, param="path")
    assert "absolute path" in error["message"]
    refused = admin.client.post("/v1/admin/models", headers=admin.a.headers, json={"id": MODEL, "path": str(good)})
    assert_error(refused, 401, code="invalid_api_key")
    assert registered(admin) == 0
    assert register(admin, MODEL, good).status_code == 200
    assert_error(register(admin, MODEL, good), 400, param="id")  # taken


@sqlite_only
def test_the_command_line_says_error_and_exits_1(admin, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(admin_cli, "get_settings", lambda: admin.settings)
    pickled = model_dir(tmp_path / "pickled", weights=("pytorch_model.bin",))
    assert admin_cli.main(["models", "add", MODEL, str(pickled)]) == 1
    assert capsys.readouterr().err.startswith(f"error: {pickled} holds pickle weights")
    assert registered(admin) == 0

    assert admin_cli.main(["models", "add", MODEL, str(model_dir(tmp_path / "good")), "--description", "d"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["id"], shown["model_type"], shown["tasks"], shown["parameters"], shown["dtype"]) == (
        MODEL, "qwen3", ["causal_lm", "classification"], 12, "BF16")  # fmt: skip
    assert admin_cli.main(["models", "list"]) == 0
    assert [m["id"] for m in json.loads(capsys.readouterr().out)] == [MINILM, SMOLLM2, MODEL]
    assert admin_cli.main(["set-allowed-models", "org-alpha", MODEL]) == 0
    assert json.loads(capsys.readouterr().out)["allowed_models"] == [MODEL]
    assert admin_cli.main(["set-allowed-models", "org-alpha", "no/such-model"]) == 1
    assert "not base models: no/such-model" in capsys.readouterr().err
    assert admin_cli.main(["models", "remove", MODEL]) == 0
    assert admin_cli.main(["models", "remove", MODEL]) == 1
    assert "no registered model" in capsys.readouterr().err


@sqlite_only
def test_a_registered_model_is_listed_and_takes_jobs(admin, tmp_path):
    assert register(admin, MODEL, model_dir(tmp_path / "m")).status_code == 200
    listed = {m["id"]: m for m in admin.get("/v1/models").json()["data"]}
    assert listed[MODEL]["object"] == "model" and listed[MODEL]["owned_by"] == "system" and listed[MODEL]["created"]
    assert {MINILM, SMOLLM2} <= set(listed)
    assert admin.get(f"/v1/models/{MODEL}").json()["id"] == MODEL
    file_id = admin.upload_ok(chat_rows())["id"]
    job = admin.create_job_ok(file_id, model=MODEL)
    assert job["model"] == MODEL and job["status"] == "queued"
    # An encoder registers for classification only: chat on it is refused before anything loads.
    assert register(admin, "acme/encoder", model_dir(tmp_path / "e", model_type="bert", architecture="BertModel",
                                                     chat_template=False)).status_code == 200  # fmt: skip
    refused = admin.post("/v1/chat/completions", json={"model": "acme/encoder", "messages": [
        {"role": "user", "content": "hi"}]})  # fmt: skip
    assert_error(refused, 400, code="invalid_model_for_endpoint")
    assert_error(admin.create_job(file_id, model="acme/encoder"), 400, code="incompatible_model")
    admin.create_job_ok(admin.upload_ok(classification_rows())["id"], model="acme/encoder")


def test_an_organisation_limited_to_some_models_sees_and_uses_only_those(admin, tmp_path):
    assert register(admin, MODEL, model_dir(tmp_path / "m")).status_code == 200
    limit = admin.client.post("/v1/admin/organizations/org-alpha/allowed_models", headers=as_admin(),
                              json={"models": [SMOLLM2]})  # fmt: skip
    assert limit.status_code == 200 and limit.json()["allowed_models"] == [SMOLLM2]

    assert [m["id"] for m in admin.get("/v1/models").json()["data"]] == [SMOLLM2]
    assert_error(admin.get(f"/v1/models/{MODEL}"), 404, code="model_not_found")
    file_id = admin.upload_ok(chat_rows())["id"]
    error = assert_error(admin.create_job(file_id, model=MODEL), 403, code="model_not_allowed", param="model")
    assert MODEL in error["message"]
    chat = {"model": MINILM, "messages": [{"role": "user", "content": "hi"}]}
    error = assert_error(admin.post("/v1/chat/completions", json=chat), 403, code="model_not_allowed")
    assert MINILM in error["message"]
    admin.create_job_ok(file_id, model=SMOLLM2)

    other = {m["id"] for m in admin.get("/v1/models", org=admin.b).json()["data"]}  # B is not limited
    assert {MINILM, SMOLLM2, MODEL} <= other
    admin.create_job_ok(admin.upload_ok(chat_rows(), org=admin.b)["id"], model=MODEL, org=admin.b)

    typo = admin.client.post("/v1/admin/organizations/org-alpha/allowed_models", headers=as_admin(),
                             json={"models": ["no/such-model"]})  # fmt: skip
    assert_error(typo, 400, code="model_not_found")
    lifted = admin.client.post("/v1/admin/organizations/org-alpha/allowed_models", headers=as_admin(),
                               json={"models": None})  # fmt: skip
    assert lifted.json()["allowed_models"] is None
    admin.create_job_ok(file_id, model=MODEL)


@sqlite_only
def test_removal_waits_for_unfinished_jobs_then_forgets_the_model(admin, tmp_path):
    directory = model_dir(tmp_path / "m")
    assert register(admin, MODEL, directory).status_code == 200
    job = admin.create_job_ok(admin.upload_ok(chat_rows())["id"], model=MODEL)
    error = assert_error(admin.client.delete(f"/v1/admin/models/{MODEL}", headers=as_admin()), 409,
                         code="model_in_use")  # fmt: skip
    assert job["id"] in error["message"]
    admin.set_job(job["id"], status="cancelled")
    removed = admin.client.delete(f"/v1/admin/models/{MODEL}", headers=as_admin())
    assert removed.status_code == 200 and removed.json()["deleted"] is True
    assert directory.is_dir()  # the operator's files are left alone
    assert MODEL not in {m["id"] for m in admin.get("/v1/models").json()["data"]}
    assert_error(admin.create_job(admin.upload_ok(chat_rows())["id"], model=MODEL), 400, code="model_not_found")
    assert_error(admin.client.delete(f"/v1/admin/models/{MODEL}", headers=as_admin()), 404, code="model_not_found")
    assert_error(admin.client.delete(f"/v1/admin/models/{SMOLLM2}", headers=as_admin()), 404)  # the catalog's


@sqlite_only
def test_a_registered_base_model_is_served_in_process(admin, tmp_path, model_cache):
    from transformers import AutoModelForCausalLM

    directory = _build_tiny(tmp_path / "models", ("qwen3",), model_cache)["qwen3"]
    shown = register(admin, MODEL, directory).json()
    assert (shown["model_type"], shown["dtype"]) == ("qwen3", "F32")
    assert shown["parameters"] == AutoModelForCausalLM.from_pretrained(directory).num_parameters()  # the headers'
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0}
    reply = admin.post("/v1/chat/completions", json=chat)
    assert reply.status_code == 200, reply.text
    assert reply.json()["model"] == MODEL and reply.json()["usage"]["completion_tokens"] >= 1


def packed(tmp_path: Path, kind: str, members: dict[str, bytes | Path]) -> Path:
    """An archive of `members` (name -> bytes, or a Path: a symbolic link to it), a tar.gz or a zip."""
    out = tmp_path / f"model.{kind}"
    if kind == "zip":
        with zipfile.ZipFile(out, "w") as zipped:
            for name, data in members.items():
                if isinstance(data, Path):
                    info = zipfile.ZipInfo(name)
                    info.external_attr = (stat.S_IFLNK | 0o777) << 16
                    zipped.writestr(info, str(data))
                else:
                    zipped.writestr(name, data)
        return out
    with tarfile.open(out, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            if isinstance(data, Path):
                info.type, info.linkname = tarfile.SYMTYPE, str(data)
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return out


def good_members(tmp_path: Path, prefix: str = "") -> dict[str, bytes]:
    directory = model_dir(tmp_path / "source")
    return {f"{prefix}{p.name}": p.read_bytes() for p in sorted(directory.iterdir())}


def upload_archive(api, model_id: str, archive: Path):
    body = {"file": (archive.name, archive.read_bytes(), "application/octet-stream")}
    return api.client.post("/v1/admin/models/archive", headers=as_admin(), data={"id": model_id}, files=body)


@sqlite_only
def test_an_uploaded_archive_is_unpacked_onto_storage_and_deleted_with_its_registration(admin, tmp_path, monkeypatch,
                                                                                         capsys):  # fmt: skip
    # a tar.gz of a folder (`tar czf model.tgz qwen3/`), over HTTP
    response = upload_archive(admin, MODEL, packed(tmp_path, "tar.gz", good_members(tmp_path, "qwen3/")))
    assert response.status_code == 200, response.text
    unpacked = Path(response.json()["path"])
    assert unpacked == admin.artifact_root / "_models" / "acme--qwen3-support" and (unpacked / "config.json").is_file()
    assert MODEL in {m["id"] for m in admin.get("/v1/models").json()["data"]}
    assert admin.client.delete(f"/v1/admin/models/{MODEL}", headers=as_admin()).status_code == 200
    assert not unpacked.exists()  # the service's copy goes with its registration

    # a flat zip, with the command line
    monkeypatch.setattr(admin_cli, "get_settings", lambda: admin.settings)
    archive = packed(tmp_path, "zip", good_members(tmp_path / "again"))
    assert admin_cli.main(["models", "add", "acme/zipped", "--archive", str(archive)]) == 0
    unpacked = admin.artifact_root / "_models" / "acme--zipped"
    assert json.loads(capsys.readouterr().out)["path"] == str(unpacked) and (unpacked / "tokenizer.json").is_file()
    assert admin_cli.main(["models", "remove", "acme/zipped"]) == 0 and not unpacked.exists()


ESCAPES = {
    "a parent-directory member": ("tar.gz", {"../escaped.txt": b"x"}, "points outside"),
    "an absolute member": ("zip", {"/tmp/escaped.txt": b"x"}, "points outside"),
    "a symbolic link": ("tar.gz", {"link": Path("/etc/passwd")}, "link"),
    "a zipped symbolic link": ("zip", {"link": Path("/etc/passwd")}, "link"),
    "pickle weights": ("zip", {"pytorch_model.bin": b"\x80\x04"}, "pickle weights"),
}


@sqlite_only
@pytest.mark.parametrize("case", ESCAPES)
def test_an_unsafe_archive_is_refused_and_leaves_nothing(admin, tmp_path, case):
    kind, extra, expected = ESCAPES[case]
    archive = packed(tmp_path, kind, {**good_members(tmp_path), **extra})
    error = assert_error(upload_archive(admin, MODEL, archive), 400, code="invalid_model", param="file")
    assert expected in error["message"], error
    assert registered(admin) == 0
    assert not (admin.artifact_root / "_models").exists() or not any((admin.artifact_root / "_models").iterdir())
    assert not any((admin.artifact_root / ".tmp").iterdir())  # the upload and the half-unpacked folder are gone
    assert not (admin.artifact_root.parent / "escaped.txt").exists()


@sqlite_only
def test_an_archive_of_a_directory_that_does_not_qualify_is_refused(admin, tmp_path):
    members = {k: v for k, v in good_members(tmp_path).items() if k != "chat_template.jinja"}
    error = assert_error(upload_archive(admin, MODEL, packed(tmp_path, "tar.gz", members)), 400, param="file")
    assert "without a chat template" in error["message"]
    not_an_archive = tmp_path / "model.tar.gz"
    not_an_archive.write_bytes(b"just bytes")
    error = assert_error(upload_archive(admin, MODEL, not_an_archive), 400, param="file")
    assert "neither a tar" in error["message"]
    assert registered(admin) == 0 and not any((admin.artifact_root / ".tmp").iterdir())
