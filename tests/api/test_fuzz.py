"""Fuzzing the API against its own OpenAPI document with schemathesis: every operation, generated valid and invalid
requests (bounded: a fixed number of examples per operation, in-process over ASGI, no network). No response may be
a 5xx, and every error must be in OpenAI's shape."""

from __future__ import annotations

import tempfile
from pathlib import Path

import schemathesis
from hypothesis import HealthCheck, settings

from api.main import create_app
from control.keys import add_key
from control.migrate import upgrade
from control.settings import Settings, get_settings
from inference.inprocess import InProcessBackend

KEY = "sk-fuzz"
EXAMPLES = 25  # per operation


def _app():
    """The app over a fresh SQLite database with one organisation (built at import: schemathesis generates the
    test cases from the app's OpenAPI document when the module is collected)."""
    from control.db import session_scope

    root = Path(tempfile.mkdtemp(prefix="neat-fuzz-"))
    app_settings = Settings(data_dir=root, database_url=f"sqlite:///{root / 'fuzz.sqlite'}",
                            broker_url=f"sqla+sqlite:///{root / 'broker.sqlite'}", min_examples=2,
                            max_upload_bytes=1024 * 1024, device="cpu")  # fmt: skip
    upgrade(app_settings.resolved_database_url)
    with session_scope(app_settings.resolved_database_url) as session:
        add_key(session, "org-fuzz", KEY)
    app = create_app(backend=InProcessBackend(app_settings))  # as the embedded launcher builds it
    app.dependency_overrides[get_settings] = lambda: app_settings
    return app


schema = schemathesis.openapi.from_asgi("/openapi.json", _app())


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors_and_errors_in_openai_shape(case):
    response = case.call(headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:500])
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) >= {"message", "type", "param", "code"}, response.text[:500]
        assert isinstance(error["message"], str) and error["message"]
