"""The built-in endpoint (standalone, `builtInEndpoint`) at the frame level: the events a
partition reader gets carry Event Hubs' and IoT Hub's annotations with the types the Event Hubs
SDKs read, go pre-settled, and every performative the hub sends has all its fields (the Python
Event Hubs SDK indexes fixed positions; reference §C.4, §C.5, §C.9)."""

import time

import pytest
from proton import Data

import checks
from conftest import DEVICE, SERVICE_KEY, SERVICE_POLICY
from hubproc import Hub
from wire import IOTHUB_HOST, Client, encode_message, sas_token

ATTACH, TRANSFER = 0x12, 0x14
FULL = {0x10: 10, 0x11: 8, 0x12: 14, 0x13: 11, 0x14: 11, 0x15: 6, 0x16: 3, 0x17: 1, 0x18: 1}
HUB_NAME = IOTHUB_HOST.split(".")[0]


@pytest.fixture(scope="module")
def eh_hub():
    h = Hub(modules={"A": {}},
            routes={"up": "FROM /messages/modules/A/outputs/up INTO $upstream"},
            extra={"servicePolicies": {SERVICE_POLICY: {"primaryKey": SERVICE_KEY}},
                   "builtInEndpoint": {"partitionCount": 1}})
    try:
        yield h
    finally:
        h.stop()


def test_partition_reader_events_and_full_performatives(eh_hub):
    a = Client(eh_hub.host, eh_hub.ca_path)
    reader = Client(eh_hub.host, eh_hub.ca_path)
    try:
        a.authenticate(DEVICE, "A", eh_hub.module_key("A"))
        events = a.sender(f"/devices/{DEVICE}/modules/A/messages/events")
        bodies = [b'{"n":0}', b"\x00\x01raw"]
        for i, body in enumerate(bodies):
            msg = encode_message(
                properties={"message-id": ("put_string", f"m{i}")},
                app_properties={"iothub-outputname": "up", "seq": str(i)}, data=body)
            dlv = a.send(events, msg)
            assert a.outcome(dlv, 10, f"the outcome of message {i}") == dlv.ACCEPTED

        token = sas_token(IOTHUB_HOST, SERVICE_KEY, int(time.time()) + 3600, skn=SERVICE_POLICY)
        _, reply = reader.put_token(token, f"sb://{eh_hub.host}/{HUB_NAME}")
        assert reply.message.application_properties()["status-code"][1].value == 200
        link = reader.receiver(f"{HUB_NAME}/ConsumerGroups/$Default/Partitions/0", credit=10)
        assert reader.link_open(link), "the partition reader was refused"
        got = [reader.next_delivery(link, i, 15, f"event {i}") for i in range(len(bodies))]

        attach = reader.hub_attach(link)
        assert attach[3].value == 1, "the hub sends events pre-settled (snd-settle-mode settled)"
        assert attach[9].type != Data.NULL, "initial-delivery-count must be set"
        for i, (r, body) in enumerate(zip(got, bodies)):
            assert r.settled, "events go pre-settled"
            ann = checks.annotations(r)
            for key, t in (("x-opt-sequence-number", Data.LONG), ("x-opt-offset", Data.STRING),
                           ("x-opt-enqueued-time", Data.TIMESTAMP),
                           ("x-opt-partition-key", Data.STRING),
                           ("iothub-connection-device-id", Data.STRING),
                           ("iothub-connection-module-id", Data.STRING),
                           ("iothub-enqueuedtime", Data.TIMESTAMP),
                           ("iothub-message-source", Data.STRING)):
                assert key in ann, f"no {key} annotation: {ann!r}"
                checks.typed(ann[key], t, f"annotation {key}")
            assert ann["x-opt-sequence-number"].value == i
            assert ann["x-opt-offset"].value == str(i)
            assert ann["iothub-connection-device-id"].value == DEVICE
            assert ann["iothub-connection-module-id"].value == "A"
            assert ann["iothub-message-source"].value == "Telemetry"
            assert checks.one_data_section(r) == body
            assert checks.application_properties(r)["seq"].value == str(i)

        # Every performative the hub sent on both connections, at full length; an attach's
        # source and target too.
        for client in (a, reader):
            for f in client.inbound.frames:
                if f.empty or f.raw[5] != 0:
                    continue
                code, fields = f.performative
                assert len(fields) == FULL[code], (
                    f"performative 0x{code:02x} has {len(fields)} fields, not {FULL[code]}")
                if code == ATTACH:
                    for i, n in ((5, 11), (6, 7)):
                        if fields[i].type != Data.NULL:
                            _, inner = fields[i].value
                            assert len(inner.value) == n, f"attach field {i}: {len(inner.value)}"
    finally:
        a.close()
        reader.close()
