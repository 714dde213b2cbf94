"""The official MCP conformance suite against the fixture upstream, in both eras (2025-11-25 and 2026-07-28).

The fixture is the reference a Bastion gateway is scored against: every required scenario passes on it
directly, so a gateway in front of it must score the same (see ``assert_same_outcomes``). So must a gateway in
front of the sloppy fixture (``--sloppy``: results without ``resultType``, listen streams acknowledged in a form no
client can read and never completed, requests to the client that name no call), whatever that scores directly.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any, Final

import pytest

from tests.conformance.harness import REQUIREMENT_SETS, Summary, compare, run_suite
from tests.conformance.upstream import serving_fixture

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

_NO_TASKS: Final = "tasks extension (SEP-2663, not scored): the SDK defines its types but serves no tasks/* method"
# Scenarios the fixture does not pass, with the reason. Listing one that passes fails the test too.
EXPECTED_FAILURES: Final[dict[str, dict[str, str]]] = {
    "2025-11-25": {},
    "2026-07-28": dict.fromkeys(
        (
            "tasks-capability-negotiation",
            "tasks-dispatch-and-envelope",
            "tasks-lifecycle",
            "tasks-mrtr-composition",
            "tasks-mrtr-input",
            "tasks-request-headers",
            "tasks-request-state-removal",
            "tasks-required-task-error",
            "tasks-wire-fields",
        ),
        _NO_TASKS,
    ),
}

# Through Bastion, one more (not scored): SEP-2243 asks a server to refuse `Mcp-Param-*` headers that do not match
# the arguments; Bastion derives the headers it sends upstream from the arguments and ignores the agent's instead.
BASTION_EXPECTED_FAILURES: Final[dict[str, dict[str, str]]] = {
    "2025-11-25": EXPECTED_FAILURES["2025-11-25"],
    "2026-07-28": {
        **EXPECTED_FAILURES["2026-07-28"],
        "http-custom-header-server-validation": "agent-sent Mcp-Param headers are replaced, not validated",
    },
}


def assert_meets_expectations(summary: Summary, expected_failures: dict[str, str]) -> None:
    """Exactly the listed scenarios fail, and none of them is required."""
    failing = {name for name, result in summary.scenarios.items() if result.status != "passed"}
    unexpected = {name: summary.scenarios[name].failed_checks for name in sorted(failing - expected_failures.keys())}
    now_passing = sorted(expected_failures.keys() - failing)
    assert not unexpected, f"{summary.requirements}: unexpected failures {unexpected}; see {summary.artifacts}"
    assert not now_passing, f"{summary.requirements}: listed as failing but passed {now_passing}; update the list"
    assert not summary.required_failures(), f"{summary.requirements}: required failures {summary.required_failures()}"


def assert_same_outcomes(
    reference: Summary, candidate: Summary, *, required_only: bool = True, at_least: bool = False
) -> None:
    """A second target (e.g. a Bastion gateway in front of the fixture) scores exactly like the reference (with
    ``at_least``: passes every scenario the reference passes, and may pass more).

    Usage, once the gateway runs: ``assert_same_outcomes(fixture_summaries[r], run_suite(gateway_url, r, "bastion"))``.
    """
    differences = compare(reference, candidate, required_only=required_only, at_least=at_least)
    assert not differences, "\n".join([f"{candidate.label} differs from {reference.label}:", *differences])


@pytest.fixture(scope="module")
def fixture_summaries() -> Generator[dict[str, Summary]]:
    """One suite run per requirement set against one fixture process (artifacts under ``fixture-<set>``)."""
    with serving_fixture() as url:
        yield {requirements: run_suite(url, requirements, "fixture") for requirements in REQUIREMENT_SETS}


@pytest.mark.parametrize("requirements", REQUIREMENT_SETS)
def test_the_fixture_upstream_passes_every_required_conformance_scenario(
    fixture_summaries: dict[str, Summary], requirements: str
) -> None:
    summary = fixture_summaries[requirements]
    assert summary.scenarios, f"the suite ran no scenario; see {summary.artifacts / 'console.txt'}"
    assert_meets_expectations(summary, EXPECTED_FAILURES[requirements])
    assert (summary.artifacts / "summary.json").is_file()


class _InjectToken:
    """Test-only ASGI wrapper: the suite sends no Authorization header, so add the member's token before Bastion."""

    def __init__(self, app: Any, token: str) -> None:
        self._app = app
        self._header = (b"authorization", f"Bearer {token}".encode())

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            scope = {**scope, "headers": [*(h for h in scope["headers"] if h[0] != b"authorization"), self._header]}
        await self._app(scope, receive, send)


@pytest.mark.anyio
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("kind", ["fixture", "sloppy"])
@pytest.mark.usefixtures("untraced")
async def test_bastion_in_front_of_the_fixture_scores_exactly_like_the_fixture(
    kind: str, request: pytest.FixtureRequest, settings: Any, store: Any, hasher: Any, operator: Any
) -> None:
    """At the default upstream era (``auto``), through Bastion scores what the fixture scores directly: exactly, in
    front of the well-behaved fixture. In front of the sloppy one it scores what it scores in front of the
    well-behaved one, which is at least what the sloppy fixture scores directly (30/30 and 8/37 required scenarios
    when measured: on 2026-07-28 the suite fails it for the `resultType` its results lack, which Bastion completes;
    ``test_the_sloppy_fixture_is_sloppy`` keeps it sloppy)."""
    import anyio

    from bastion.domain.models import Transport
    from bastion.domain.specs import GatewayServerSpec, GatewaySpec, HostSpec, MemberSpec, ServerSpec
    from bastion.services import connections, gateways, hosts, members, servers
    from bastion.web.app import create_app
    from tests.mcp_support import serving

    sloppy = kind == "sloppy"
    direct: dict[str, Summary] | None = None if sloppy else request.getfixturevalue("fixture_summaries")
    with serving_fixture(sloppy=sloppy) as upstream:
        await servers.create(store, operator, ServerSpec("conf", Transport.STREAMABLE_HTTP, url=upstream))
        await gateways.create(
            store, operator, GatewaySpec("conformance", servers=(GatewayServerSpec("conf", namespaced=False),))
        )
        await hosts.create(store, operator, HostSpec("suite"))
        await members.create(store, operator, MemberSpec("ada@example.com", "Ada"))
        _c, _t, token = await connections.create(
            store, hasher, operator, host="suite", gateway="conformance", member="ada@example.com"
        )
        async with serving(_InjectToken(create_app(settings, store), token)) as bastion:
            url = f"{bastion}/g/conformance/mcp"
            for requirements in REQUIREMENT_SETS:
                label = "bastion-sloppy" if sloppy else "bastion"
                summary = await anyio.to_thread.run_sync(lambda r=requirements, lb=label: run_suite(url, r, lb))
                assert summary.scenarios, f"the suite ran no scenario; see {summary.artifacts / 'console.txt'}"
                if direct is None:
                    assert_meets_expectations(summary, BASTION_EXPECTED_FAILURES[requirements])
                else:
                    assert_same_outcomes(direct[requirements], summary)


@pytest.mark.anyio
async def test_the_sloppy_fixture_is_sloppy() -> None:
    """What the sloppy fixture sends is refused by a strict client: results without `resultType`, a listen stream
    whose acknowledgement never arrives in a form the client can read."""
    import anyio
    from mcp.client import Client
    from mcp.client.streamable_http import streamable_http_client
    from pydantic import ValidationError

    from tests.fixtures import conformance_server
    from tests.mcp_support import serving

    try:
        async with (
            serving(conformance_server.create_app(sloppy=True)) as base,
            Client(streamable_http_client(f"{base}/mcp"), mode="2026-07-28") as client,
        ):
            with pytest.raises(ValidationError, match="resultType"):
                await client.call_tool("test_simple_text", {})
            with anyio.move_on_after(1) as waited:
                async with client.listen(resource_subscriptions=["test://watched-resource"]):
                    pass
            assert waited.cancelled_caught
    finally:
        conformance_server.SLOPPY["on"] = False
