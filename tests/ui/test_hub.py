"""Live updates: batched per flush, filtered by line, and a slow browser loses only its own queue."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Coroutine
from typing import Any

from lineguard.ui.drops import Drops
from lineguard.ui.hub import Event, Hub


def run(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """asyncio.run on a thread of its own: Playwright's session browser keeps a loop running on this one."""
    failures: list[BaseException] = []

    def target() -> None:
        try:
            asyncio.run(scenario())
        except BaseException as error:  # noqa: BLE001 - handed back to the test thread, re-raised there
            failures.append(error)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive(), "the scenario did not finish within 30 s"
    if failures:
        raise failures[0]


def parse(text: str) -> tuple[str, object]:
    lines = dict(line.split(": ", 1) for line in text.strip().splitlines())
    return lines["event"], json.loads(lines["data"])


async def follow(hub: Hub, line: str, count: int) -> list[tuple[str, object]]:
    stream = hub.stream(line)
    hello = await anext(stream)
    assert "event: hello" in hello
    got = []
    async for text in stream:
        got.append(parse(text))
        if len(got) == count:
            break
    await stream.aclose()
    return got


def test_verdicts_of_one_flush_go_out_as_one_message_and_other_lines_are_filtered():
    async def scenario() -> None:
        hub = Hub(max_clients=4, client_queue=16, drops=Drops())
        hub.bind(asyncio.get_running_loop())
        line1 = asyncio.create_task(follow(hub, "line-1", 2))
        everything = asyncio.create_task(follow(hub, "+", 3))
        while hub.clients < 2:
            await asyncio.sleep(0.01)
        for seq in range(5):
            hub.publish(Event("verdict", "line-1", {"seq": seq}))
        hub.publish(Event("verdict", "line-2", {"seq": 99}))
        hub.publish(Event("broker", "", {"connected": False}))
        first, every = await asyncio.wait_for(asyncio.gather(line1, everything), 5)
        assert first == [("verdicts", [{"seq": s} for s in range(5)]), ("broker", {"connected": False})]
        assert [kind for kind, _ in every] == ["verdicts", "verdicts", "broker"]
        assert hub.clients == 0

    run(scenario)


def test_a_browser_that_falls_behind_gets_resync_and_the_drop_is_counted():
    async def scenario() -> None:
        drops = Drops()
        hub = Hub(max_clients=4, client_queue=8, drops=drops)
        hub.bind(asyncio.get_running_loop())
        stream = hub.stream("line-1")
        await anext(stream)  # registered, but reads nothing for a while
        for seq in range(50):
            hub.publish(Event("frame", "line-1", {"seq": seq}))
            await asyncio.sleep(0)  # one flush per update
        kinds = []
        while True:
            kind, _ = parse(await asyncio.wait_for(anext(stream), 1))
            kinds.append(kind)
            if kind == "resync":
                break
        assert kinds[-1] == "resync" and len(kinds) <= 8
        assert drops.total("slow-browser") >= 1
        await stream.aclose()

    run(scenario)


def test_updates_before_any_page_opens_cost_nothing():
    hub = Hub(max_clients=1, client_queue=8, drops=Drops())
    hub.publish(Event("verdict", "line-1", {}))  # no loop bound, no client: dropped silently, never raises
    assert hub.clients == 0
