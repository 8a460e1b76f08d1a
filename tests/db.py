"""Shared store fixtures: every test that takes `store` or `store_url` runs on SQLite and on PostgreSQL.

PostgreSQL runs against the server in ALIGN_TEST_POSTGRES_URL (scripts/start_postgres.sh starts one and prints
the URL); each test gets a fresh schema, dropped afterwards. Without the variable those tests are skipped, unless
ALIGN_REQUIRE_POSTGRES=1 (CI), which turns the missing server into a failure.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine

from align.store import Store, add_prompts, add_responses, connect, register_model_version
from align.store.db import parse_url

POSTGRES_ENV = "ALIGN_TEST_POSTGRES_URL"
POSTGRES_SKIP_REASON = "set ALIGN_TEST_POSTGRES_URL (scripts/start_postgres.sh prints one)"

BACKENDS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgresql", id="postgresql", marks=pytest.mark.postgres),
]


@pytest.fixture(scope="session")
def postgres_admin():
    """An autocommit engine on the test server, for creating and dropping per-test schemas."""
    base = os.environ.get(POSTGRES_ENV)
    if not base:
        if os.environ.get("ALIGN_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"ALIGN_REQUIRE_POSTGRES=1 but {POSTGRES_ENV} is not set; run scripts/start_postgres.sh")
        pytest.skip(POSTGRES_SKIP_REASON)
    engine = create_engine(parse_url(base), isolation_level="AUTOCOMMIT")
    yield engine
    engine.dispose()


@pytest.fixture(params=BACKENDS)
def store_url(request, tmp_path) -> Iterator[str]:
    """The URL of an empty database on each backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.db'}"
        return
    admin = request.getfixturevalue("postgres_admin")
    schema = f"test_{uuid.uuid4().hex[:12]}"
    with admin.connect() as connection:
        connection.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    # search_path in the URL, so subprocesses that open the URL land in the same fresh schema.
    url = admin.url.update_query_dict({"options": f"-csearch_path={schema}"})
    yield url.render_as_string(hide_password=False)
    with admin.connect() as connection:
        connection.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.fixture
def store(store_url) -> Iterator[Store]:
    with connect(store_url) as opened:
        yield opened


def fill_store(store: Store, n_prompts: int = 3, samples: int = 4, version: str = "v0", seed: int = 0) -> dict:
    """A registered version, `n_prompts` prompts and `samples` responses to each; returns their ids."""
    version_id = register_model_version(store, {"name": version, "base_model": "tiny", "adapter_hash": version})
    prompts = [{"prompt": f"question {i}", "family": "math", "gold": i} for i in range(n_prompts)]
    prompt_ids = add_prompts(store, prompts)
    rows = [
        {
            "prompt_id": prompt_id, "model_version_id": version_id, "seed": seed, "sample_index": k,
            "temperature": 0.7, "top_p": 0.9, "max_new_tokens": 8, "text": f"{version} answer {prompt_id}.{k}",
            "completion_token_ids": [prompt_id, k, 2], "token_logps": [-1.0, -0.5, -0.25],
            "sample_token_logps": [-0.5, -0.25, -0.125], "finish_reason": "stop",
        }
        for prompt_id in prompt_ids
        for k in range(samples)
    ]
    response_ids = add_responses(store, rows)
    return {"version_id": version_id, "prompt_ids": prompt_ids, "response_ids": response_ids, "rows": rows}
