"""API keys against `agentrun dev --auth` (started by the script with its keys)."""

from __future__ import annotations

import os
import uuid

import grpc
import pytest

import agentrun


@pytest.fixture(scope="module")
def auth() -> dict:
    names = ("AGENTRUN_TEST_AUTH_URL", "AGENTRUN_TEST_API_KEY", "AGENTRUN_TEST_ADMIN_KEY")
    missing = [n for n in names if not os.environ.get(n)]
    if missing:
        pytest.fail(f"{', '.join(missing)} not set: run scripts/python-client-test.sh")
    return {n: os.environ[n] for n in names}


def test_a_client_key_works_and_the_tenant_header_is_ignored(auth: dict) -> None:
    url, key = auth["AGENTRUN_TEST_AUTH_URL"], auth["AGENTRUN_TEST_API_KEY"]
    with agentrun.Client(url, api_key=key) as client:
        run = client.create_run("scripted", {"prompt": "hello"}, queue=f"unserved-{uuid.uuid4().hex[:8]}")
        assert client.get_run(run.run_id).run_id == run.run_id
    # With keys checked the tenant is the key's: the header cannot switch tenants.
    with agentrun.Client(url, api_key=key, tenant="someone-else") as same_tenant:
        assert same_tenant.get_run(run.run_id).run_id == run.run_id
        same_tenant.cancel(run.run_id)


def test_missing_or_wrong_keys_are_unauthenticated(auth: dict) -> None:
    url = auth["AGENTRUN_TEST_AUTH_URL"]
    for key in (None, "ar_not_a_real_key"):
        with agentrun.Client(url, api_key=key) as client:
            with pytest.raises(agentrun.Unauthenticated) as err:
                client.get_run(str(uuid.uuid4()))
            assert err.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_an_admin_key_may_not_use_run_service(auth: dict) -> None:
    with agentrun.Client(auth["AGENTRUN_TEST_AUTH_URL"], api_key=auth["AGENTRUN_TEST_ADMIN_KEY"]) as admin:
        with pytest.raises(agentrun.PermissionDenied) as err:
            list(admin.list_runs())
    assert "key" in err.value.details
