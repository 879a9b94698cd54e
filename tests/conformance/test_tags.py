"""Every delivery the hub sends carries a 16-byte delivery tag (protocol reference §4.2: the
C# SDK makes a Guid of it), read from the raw transfer frames of one connection that gets
every kind: a put-token reply, twin responses, a desired push, a method request and module
input deliveries."""

import concurrent.futures
import json
import uuid

from proton import int32

import checks
from conftest import DEVICE, service_token
from test_twin import DESIRED, request, twin_links
from wire import encode_message


def test_every_hub_delivery_has_16_byte_tag(hub, module_client):
    c = module_client("B")
    c.authenticate(DEVICE, "A", hub.module_key("A"))  # a second identity on the same connection

    links = twin_links(c, "B")
    for op, res, body in (("GET", None, b" "), ("PATCH", "/properties/reported", b'{"k":1}'),
                          ("PUT", DESIRED, b" ")):
        request(c, links, op, res, body)

    pushes = len(c.deliveries(links[1]))
    methods_address = f"/devices/{DEVICE}/modules/B/methods/devicebound"
    mrx = c.receiver(methods_address)
    mtx = c.sender(methods_address)
    inputs = c.receiver(f"/devices/{DEVICE}/modules/B/messages/events")
    events = c.sender(f"/devices/{DEVICE}/modules/A/messages/events")

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        patch = pool.submit(hub.https, "PATCH", f"/twins/{DEVICE}/modules/B",
                            {"authorization": service_token(), "if-match": "*"},
                            {"properties": {"desired": {"tagged": str(uuid.uuid4())}}})
        call = pool.submit(hub.https, "POST", f"/twins/{DEVICE}/modules/B/methods",
                           {"authorization": service_token()},
                           {"methodName": "m", "payload": 1, "responseTimeoutInSeconds": 10,
                            "connectTimeoutInSeconds": 10})
        c.next_delivery(links[1], pushes, 15, "the desired push")
        req = c.next_delivery(mrx, 0, 15, "the method request")
        c.send(mtx, encode_message(
            properties={"correlation-id": ("put_uuid", checks.correlation_id(req).value)},
            app_properties={"IoThub-status": int32(200)}, data=json.dumps(1).encode()))
        for i in range(3):
            dlv = c.send(events, encode_message(app_properties={"iothub-outputname": "out1"},
                                                data=b"%d" % i))
            assert c.outcome(dlv, 10, "the outcome of an output") == dlv.ACCEPTED
        for i in range(3):
            c.accept(c.next_delivery(inputs, i, 15, f"input delivery {i}"))
        assert patch.result(timeout=30)[0] == 200
        assert call.result(timeout=30)[0] == 200

    # 2 put-token replies + 3 twin responses + 1 push + 1 method request + 3 inputs.
    assert checks.every_transfer_tagged(c) >= 10
