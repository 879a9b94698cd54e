"""Every delivery the hub sends carries a 16-byte delivery tag (protocol reference §4.2: the
C# SDK makes a Guid of it), read from the raw transfer frames of one connection that gets
every kind: a put-token reply, twin responses, a desired push, a method request and module
input deliveries."""

import concurrent.futures
import json
import uuid

import pytest
from proton import Endpoint, int32

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


def test_tags_unique_across_links_and_connections(hub, module_client):
    """Tags differ within a link, across the links of a connection, and across two connections
    of the same module that each receive input messages (the C# SDK makes lock tokens of them;
    edgeHub's are fresh GUIDs)."""
    from test_dispositions import send_outputs

    snd = module_client("C")
    events = snd.sender(f"/devices/{DEVICE}/modules/C/messages/events")
    groups = {}  # (connection, link kind) -> tags, in order
    for conn in (1, 2):
        e = module_client("E")
        links = twin_links(e, "E")
        for _ in range(2):
            request(e, links, "GET")
        inputs = e.receiver(f"/devices/{DEVICE}/modules/E/messages/events")
        send_outputs(snd, events, "toE", [b"t%d-%d" % (conn, i) for i in range(3)])
        for i in range(3):
            e.accept(e.next_delivery(inputs, i, 15, f"input delivery {i} on connection {conn}"))
        for kind, link in (("$cbs", e.cbs()[1]), ("twin", links[1]), ("inputs", inputs)):
            tags = [t["tag"] for t in e.hub_transfers(link)]
            for t in tags:
                assert len(t) == checks.TAG_LEN, f"{kind} tag {t.hex()} is not 16 bytes"
            assert len(set(tags)) == len(tags), f"{kind} tags repeat on one link: {tags}"
            groups[(conn, kind)] = tags
    assert len(groups[(1, "inputs")]) >= 3 and len(groups[(2, "inputs")]) >= 3
    owner, shared = {}, []
    for group, tags in groups.items():
        for t in tags:
            if t in owner:
                shared.append(f"{t.hex()} on {owner[t]} and {group}")
            owner.setdefault(t, group)
    assert not shared, "tags shared across links or connections: " + "; ".join(shared)


def test_tags_differ_across_reattached_links(hub, module_client):
    """An input link detached and attached again on the same connection (the handle is reused)
    gets tags the first link did not have: a C# lock token kept from before the re-attach
    must not name a message of the new link."""
    from test_dispositions import send_outputs

    snd = module_client("C")
    events = snd.sender(f"/devices/{DEVICE}/modules/C/messages/events")
    e = module_client("E")
    seen = {}
    for attempt in (1, 2):
        inputs = e.receiver(f"/devices/{DEVICE}/modules/E/messages/events")
        send_outputs(snd, events, "toE", [b"r%d-%d" % (attempt, i) for i in range(2)])
        for i in range(2):
            e.accept(e.next_delivery(inputs, i, 15, f"input delivery {i} on link {attempt}"))
        handle = int(e.hub_attach(inputs)[1].value)
        for t in e.transfer_tags(inputs):
            assert t not in seen, (
                f"tag {t.hex()} of link {attempt} (handle {handle}) was already used by link "
                f"{seen[t]} on this connection")
            seen[t] = attempt
        inputs.close()
        e.wait(lambda: inputs.state & Endpoint.REMOTE_CLOSED, 10, "the input link's detach")
