"""`python -m sandbox.load`: the bounded load compose-test drives through the containers.

Here the sandboxes, the ingress and every worker run in this process on loopback (against the
real RabbitMQ, in the test's own namespace), and the load talks to them over HTTP through the
sandboxes' control routes, as it does inside the sandbox container.
"""

from __future__ import annotations

import socket
from collections.abc import Callable

import pytest

from sandbox import load
from shared.keys import KeyRing
from shared.settings import Settings
from shared.topology import Names
from tests.support.pipeline import running_pipeline

VOUCHERS = 12


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def _args(ingress: str, settings: Settings, doshii: str, *extra: str) -> list[str]:
    return [
        "--vouchers",
        str(VOUCHERS),
        "--rate",
        "50",
        "--ingress",
        ingress,
        "--jackpot",
        settings.jackpot_api_url,
        "--doshii",
        doshii,
        *extra,
    ]


@pytest.mark.timeout(90)
async def test_every_voucher_is_activated_once_and_counted(
    make_settings: Callable[..., Settings], broker: Names
) -> None:
    async with running_pipeline(make_settings) as pipeline:
        doshii = pipeline.sandboxes.doshii.public_base_url
        assert doshii is not None
        args = load.parser().parse_args(_args(pipeline.ingress_url, pipeline.settings, doshii))
        keys = KeyRing(pipeline.settings.key_secrets)
        summary = await load.run_load(args, keys, pipeline.settings.value_to_cents)

        assert summary["ok"], summary["problems"]
        assert summary["vouchers"] == summary["activated_once"] == VOUCHERS
        assert summary["lost"] == summary["activated_twice"] == 0
        requests = pipeline.sandboxes.doshii.requests
        activated = [r for r in requests.values() if r["status"] == "activated"]
        assert len(activated) == VOUCHERS
        # Every voucher is named once, as Jackpot knows it (its coupon is the card's reference).
        assert len(set(summary["voucher_ids"])) == VOUCHERS
        vouchers = pipeline.sandboxes.jackpot.vouchers
        assert {vouchers[v]["couponId"] for v in summary["voucher_ids"]} == {
            r["reference"] for r in activated
        }


@pytest.mark.timeout(60)
async def test_vouchers_nobody_took_are_reported_lost(
    make_settings: Callable[..., Settings], broker: Names
) -> None:
    # No ingress answers: Jackpot gives up after its (short) retry window, nothing activates.
    async with running_pipeline(make_settings, workers=False) as pipeline:
        doshii = pipeline.sandboxes.doshii.public_base_url
        assert doshii is not None
        nowhere = f"http://127.0.0.1:{_closed_port()}"
        extra = ("--retry-window-s", "0.5", "--final-timeout-s", "1")
        args = load.parser().parse_args(_args(nowhere, pipeline.settings, doshii, *extra))
        keys = KeyRing(pipeline.settings.key_secrets)
        summary = await load.run_load(args, keys, pipeline.settings.value_to_cents)

    assert not summary["ok"]
    assert summary["lost"] == VOUCHERS
    assert summary["activated_once"] == 0
    assert summary["deliveries_failed"] == VOUCHERS
    assert any("not activated" in problem for problem in summary["problems"])


def test_the_command_refuses_an_empty_load(capsys: pytest.CaptureFixture[str]) -> None:
    assert load.main(["--vouchers", "0"]) == 2
    assert "--vouchers" in capsys.readouterr().err
