"""The operator's command line for organisations, API keys and base models (the admin API in api/routes/admin.py
does the same over HTTP). Uses the deployment's settings (DATABASE_URL, ...):

    python -m api.admin create-org acme --name "Acme Inc."
    python -m api.admin create-key acme              # prints the key once; only its hash is stored
    python -m api.admin list-keys acme
    python -m api.admin revoke-key key-...
    python -m api.admin set-limits acme --max-active-jobs 5 --inference-rpm 120
    python -m api.admin models add acme/qwen3-support /shared/models/qwen3-support --description "..."
    python -m api.admin models add acme/qwen3-support --archive qwen3-support.tar.gz  # unpacked onto the storage
    python -m api.admin models list
    python -m api.admin models remove acme/qwen3-support
    python -m api.admin set-allowed-models acme acme/qwen3-support HuggingFaceTB/SmolLM2-135M-Instruct
    python -m api.admin set-allowed-models acme --all  # every base model again
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sqlalchemy.orm import Session

from control import models
from control.db import session_scope
from control.keys import LIMITS, create_key, create_org, list_keys, revoke_key, set_limits
from control.settings import Settings, get_settings
from control.storage import Storage


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m api.admin", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    commands = parser.add_subparsers(dest="command", required=True)
    org = commands.add_parser("create-org", help="create an organisation")
    org.add_argument("org_id")
    org.add_argument("--name")
    commands.add_parser("create-key", help="create an API key (printed once)").add_argument("org_id")
    commands.add_parser("list-keys", help="an organisation's keys (ids and prefixes)").add_argument("org_id")
    commands.add_parser("revoke-key", help="revoke a key by its id").add_argument("key_id")
    limits = commands.add_parser("set-limits", help="an organisation's own limits (omit one to keep it)")
    limits.add_argument("org_id")
    for name in LIMITS:
        limits.add_argument(f"--{name.replace('_', '-')}", type=int, help="-1: back to the deployment default")
    allowed = commands.add_parser("set-allowed-models", help="limit an organisation to some base models")
    allowed.add_argument("org_id")
    allowed.add_argument("models", nargs="*", metavar="model")
    allowed.add_argument("--all", action="store_true", help="every base model again (no limit)")
    registry = commands.add_parser("models", help="base models registered from directories on shared storage")
    actions = registry.add_subparsers(dest="action", required=True)
    add = actions.add_parser("add", help="register a transformers directory (safetensors) as a base model")
    add.add_argument("model_id")
    add.add_argument("path", nargs="?", help="absolute path of the directory, on storage every machine mounts")
    add.add_argument("--archive", type=Path, help="instead: a tar or zip of the directory, unpacked onto the "
                     "artifact storage (safetensors only)")  # fmt: skip
    add.add_argument("--description")
    actions.add_parser("list", help="every base model: the catalog's and the registered ones")
    remove = actions.add_parser("remove", help="forget a registered model (an uploaded archive's files go too)")
    remove.add_argument("model_id")
    args = parser.parse_args(argv)
    if args.command == "set-allowed-models" and args.all == bool(args.models):
        parser.error("set-allowed-models: name the models, or give --all")
    if args.command == "models" and args.action == "add" and (args.path is None) == (args.archive is None):
        parser.error("models add: give the directory's path, or --archive")

    settings = get_settings()
    removed = None  # a removed model's directory: deleted, if the service unpacked it, once the removal committed
    try:
        with session_scope(settings.resolved_database_url) as session:
            if args.command == "create-org":
                row = create_org(session, args.org_id, args.name)
                out = {"id": row.id, "name": row.name}
            elif args.command == "create-key":
                row, key = create_key(session, args.org_id)
                out = {"id": row.id, "organization": row.organization_id, "key": key}
            elif args.command == "list-keys":
                out = [{"id": k.id, "prefix": k.prefix, "created_at": k.created_at, "revoked_at": k.revoked_at}
                       for k in list_keys(session, args.org_id)]  # fmt: skip
            elif args.command == "revoke-key":
                if not revoke_key(session, args.key_id):
                    raise LookupError(f"no active key {args.key_id!r}")
                out = {"id": args.key_id, "revoked": True}
            elif args.command == "set-allowed-models":
                row = models.set_allowed_models(session, args.org_id, None if args.all else args.models)
                out = {"id": row.id, "allowed_models": row.allowed_models}
            elif args.command == "models" and args.action == "remove":
                removed = models.remove(session, args.model_id)
                out = {"id": args.model_id, "removed": True}
            elif args.command == "models":
                out = _models(session, args, settings)
            else:
                given = {n: getattr(args, n) for n in LIMITS if getattr(args, n) is not None}
                row = set_limits(session, args.org_id, **{n: (None if v == -1 else v) for n, v in given.items()})
                out = {"id": row.id, **{n: getattr(row, n) for n in LIMITS}}
    except (LookupError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if removed is not None:
        models.delete_upload(Storage(settings.resolved_artifact_root), args.model_id, removed)
    print(json.dumps(out, indent=2))
    return 0


def _models(session: Session, args: argparse.Namespace, settings: Settings) -> dict | list:
    if args.action == "list":
        return [m.as_dict() for m in models.base_models(session)]
    if args.archive is not None:
        storage, limit = Storage(settings.resolved_artifact_root), settings.max_model_archive_bytes
        return models.register_archive(session, args.model_id, args.archive, storage, limit, args.description).as_dict()
    return models.register(session, args.model_id, args.path, args.description).as_dict()


if __name__ == "__main__":
    sys.exit(main())
