"""A frame larger than the hub's max-frame-size (256 KiB, announced in its open) closes the
connection as soon as its 8-byte header arrives: the hub must not wait for, nor buffer, the
bytes it announces (AMQP 1.0 part 2.7.1: a peer must not send frames larger than the agreed
max-frame-size)."""

import time

import pytest
from proton import Data

import checks
from wire import CLOSE, OPEN

LIMIT = 256 * 1024
PROMPT_S = 2.0
OBSERVE_S = 5.0


@pytest.mark.parametrize("size", [LIMIT + 1, 64 * 1024 * 1024], ids=["limit+1", "64MiB"])
def test_oversized_frame_header_closes_connection(hub, module_client, size):
    c = module_client("A")
    opens = c.inbound.performatives(OPEN)
    announced = checks.typed(opens[0].performative[1][2], Data.UINT, "the hub's max-frame-size")
    assert announced == LIMIT, f"the hub announces max-frame-size {announced}"
    c.pump(0)
    assert not c.eof, "the connection closed before the test"
    # An AMQP frame header (data offset 2, type 0, channel 0) and nothing after it.
    c.send_raw(size.to_bytes(4, "big") + bytes([2, 0, 0, 0]))
    sent = time.monotonic()
    end = sent + OBSERVE_S
    while not c.eof and time.monotonic() < end:
        c.pump(min(0.2, end - time.monotonic()))
    took = time.monotonic() - sent
    closes = c.inbound.performatives(CLOSE)
    assert c.eof, (
        f"the connection was still open {OBSERVE_S} s after a header declaring {size} bytes "
        f"(close frames: {len(closes)})")
    assert took <= PROMPT_S, f"the hub closed the connection only after {took:.2f} s"
    print(f"closed {took * 1000:.1f} ms after the header; close frame sent: {bool(closes)}")
