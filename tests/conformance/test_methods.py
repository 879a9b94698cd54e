"""A direct method request as the hub sends it to a module (protocol reference §6.1), and the
module's answer making its way back to the caller of the HTTPS method API."""

import concurrent.futures
import json
import uuid

from proton import Data, int32

import checks
from conftest import DEVICE, service_token
from wire import encode_message


def test_method_request_encoding(hub, module_client):
    c = module_client("B")
    address = f"/devices/{DEVICE}/modules/B/methods/devicebound"
    channel = {"com.microsoft:channel-correlation-id": f"methods:{uuid.uuid4()}",
               "com.microsoft:api-version": "2021-04-12"}
    rx = c.receiver(address, properties=channel)
    tx = c.sender(address, properties=channel)
    assert c.link_open(rx) and c.link_open(tx), "method links were not attached"

    call = {"methodName": "echo", "payload": {"n": 7, "s": "x"},
            "responseTimeoutInSeconds": 10, "connectTimeoutInSeconds": 10}
    headers = {"authorization": service_token()}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(hub.https, "POST", f"/twins/{DEVICE}/modules/B/methods", headers, call)
        req = c.next_delivery(rx, 0, 15, "the method request")

        props = checks.application_properties(req)
        assert "IoThub-methodname" in props, f"no IoThub-methodname: {props!r}"
        assert checks.typed(props["IoThub-methodname"], Data.STRING, "IoThub-methodname") == "echo"
        cid = checks.correlation_id(req)
        # The C SDK accepts only a uuid; C# makes a Guid of it.
        checks.typed(cid, Data.UUID, "the method request's correlation-id")
        assert json.loads(checks.one_data_section(req)) == call["payload"]
        checks.tags_are_16_bytes(c, rx, 1)

        answer = encode_message(properties={"correlation-id": ("put_uuid", cid.value)},
                                app_properties={"IoThub-status": int32(201)},
                                data=json.dumps({"got": 7}).encode())
        c.send(tx, answer)
        status, body = pending.result(timeout=30)
    assert status == 200, (status, body)
    assert body == {"status": 201, "payload": {"got": 7}}, body

