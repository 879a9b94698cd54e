"""A module input delivery (route A/out1 -> B/in1) as the hub sends it (protocol reference §4.2)."""

from proton import Data

import checks
from conftest import DEVICE
from wire import encode_message

BODIES = [b'{"temperature":21.5}', b"\x00\x01binary\xff"]


def test_module_input_delivery(module_client):
    a = module_client("A")
    b = module_client("B")
    inputs = b.receiver(f"/devices/{DEVICE}/modules/B/messages/events")
    events = a.sender(f"/devices/{DEVICE}/modules/A/messages/events")
    assert b.link_open(inputs) and a.link_open(events)

    for i, body in enumerate(BODIES):
        msg = encode_message(
            properties={"message-id": ("put_string", f"m{i}"),
                        "content-type": ("put_symbol", "application/json")},
            app_properties={"iothub-outputname": "out1", "alert": "high", "seq": str(i)},
            data=body)
        dlv = a.send(events, msg)
        assert a.outcome(dlv, 10, f"the outcome of output {i}") == dlv.ACCEPTED

    got = [b.next_delivery(inputs, i, 15, f"input delivery {i}") for i in range(len(BODIES))]
    for i, (r, body) in enumerate(zip(got, BODIES)):
        ann = checks.annotations(r)
        for key, want in (("x-opt-input-name", "in1"), ("iothub-connection-device-id", DEVICE),
                          ("iothub-connection-module-id", "A")):
            assert key in ann, f"no {key} annotation: {ann!r}"
            assert checks.typed(ann[key], Data.STRING, f"annotation {key}") == want
        # Where present, the types the C# SDK reads them as (others it silently ignores).
        for key, t in (("iothub-enqueuedtime", Data.TIMESTAMP), ("iothub-deliverycount", Data.UBYTE),
                       ("x-opt-sequence-number", Data.ULONG), ("x-opt-lock-token", Data.STRING)):
            if key in ann:
                checks.typed(ann[key], t, f"annotation {key}")
        assert checks.one_data_section(r) == body, "body changed on the way"
        props = checks.application_properties(r)
        for key, want in (("alert", "high"), ("seq", str(i))):
            assert key in props, f"application property {key} lost: {props!r}"
            assert checks.typed(props[key], Data.STRING, f"application property {key}") == want
        msg_props = r.message.properties() or {}
        assert "message-id" in msg_props and msg_props["message-id"].value == f"m{i}", msg_props
        # At-least-once: sent unsettled, settled by the module.
        assert not r.settled, "an input delivery must be sent unsettled"
        b.accept(r)

    tags = checks.tags_are_16_bytes(b, inputs, len(BODIES))
    assert len(set(tags[:len(BODIES)])) == len(BODIES), f"tags repeat: {[t.hex() for t in tags]}"
