"""The official conformance suite's client auth scenarios, with Bastion as the OAuth client of each mock upstream.

``scripts/conformance-client`` enrolls a member through Bastion's own enrollment code path and calls a tool
through the gateway with the member's token (see ``tests.conformance.auth_client``). Every required auth scenario
of both requirement sets (and the 2025-03-26 back-compat scenarios) must pass; only the extensions listed below
may fail.
"""

from __future__ import annotations

from typing import Final

import pytest

from tests.conformance.client_harness import CLIENT_SETS, auth_scenarios, run_client_suite

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]

# Optional extensions (not scored by either requirement set): other grants or token types than an authorization
# code with Bearer tokens, which is what enrollment is.
ALLOWED_TO_FAIL: Final = {
    "auth/client-credentials-basic": "extension: client_credentials grant (no person to enroll)",
    "auth/client-credentials-jwt": "extension: client_credentials grant with private_key_jwt",
    "auth/enterprise-managed-authorization": "extension: enterprise-managed authorization (ID-JAG)",
    "auth/dpop": "extension: DPoP-bound tokens (SEP-1932)",
    "auth/dpop-nonce": "extension: DPoP-bound tokens with server nonces (SEP-1932)",
    "auth/wif-jwt-bearer": "extension: workload identity federation (jwt-bearer grant)",
}


@pytest.mark.parametrize("client_set", CLIENT_SETS)
def test_bastion_passes_every_required_client_auth_scenario(client_set: str) -> None:
    expected = auth_scenarios(client_set)
    summary = run_client_suite(client_set)
    assert summary.scenarios.keys() == expected.keys()
    failing = {name: result.failed_checks for name, result in summary.scenarios.items() if result.status != "passed"}
    unexpected = {name: checks for name, checks in failing.items() if name not in ALLOWED_TO_FAIL}
    assert not unexpected, f"{client_set}: failing auth scenarios {unexpected}; see {summary.artifacts}"
    assert not summary.required_failures(), f"{client_set}: required failures; see {summary.artifacts}"
    assert all(not expected[name] for name in failing), "an allowed failure is a required scenario"
    # A scenario passes only with checks that passed: a client that never reached the mock passes nothing.
    assert all(summary.scenarios[name].passed > 0 for name, required in expected.items() if required)
