"""Keep-alives inside the idle-time-out a client announces.

uAMQP (the C SDK) closes a connection when no frame arrived for exactly the idle-time-out it
announced in its open; the AMQP spec only asks peers to announce half their real limit, so a
hub that sends its empty frames once per announced period loses such clients. This client
announces 10 s, stays silent for 25 s and measures, at the frame level, every gap between
frames from the hub."""

import time

from conftest import DEVICE
from wire import CLOSE, OPEN

ANNOUNCED_MS = 10_000
QUIET_S = 25.0
MAX_GAP_S = 6.0


def test_keepalive_inside_announced_idle_timeout(hub, module_client):
    # Proton announces half of what it is given.
    c = module_client("A", idle_timeout=2 * ANNOUNCED_MS / 1000)
    opens = c.outbound.performatives(OPEN)
    assert len(opens) == 1
    announced = opens[0].performative[1][4]
    assert announced.value == ANNOUNCED_MS, f"this client announced {announced!r}"

    start = c.inbound.frames[-1].at
    first = len(c.inbound.frames)
    c.run_for(QUIET_S)
    assert not c.eof, "the hub closed the connection"
    assert not c.inbound.performatives(CLOSE), "the hub sent close"

    arrivals = [start] + [f.at for f in c.inbound.frames[first:]]
    arrivals.append(time.monotonic())
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    empties = [f for f in c.inbound.frames[first:] if f.empty]
    assert empties, f"no keep-alive frame in {QUIET_S} s"
    worst = max(gaps)
    print(f"keep-alive gaps (s): {[round(g, 2) for g in gaps]}")
    assert worst <= MAX_GAP_S, (
        f"{worst:.2f} s without a frame from the hub (limit {MAX_GAP_S} s for an announced "
        f"{ANNOUNCED_MS / 1000:.0f} s; a uAMQP client closes at {ANNOUNCED_MS / 1000:.0f} s); "
        f"gaps: {[round(g, 2) for g in gaps]}")

    # Still usable: a put-token round trip on the same connection.
    c.authenticate(DEVICE, "A", hub.module_key("A"))
