"""Twin responses and desired-property pushes as the hub encodes them (protocol reference §5)."""

import concurrent.futures
import uuid

import pytest
from proton import Data

import checks
from conftest import DEVICE, service_token
from wire import PROPERTIES, encode_message

DESIRED = "/notifications/twin/properties/desired"


def twin_links(client, module):
    address = f"/devices/{DEVICE}/modules/{module}/twin"
    channel = {"com.microsoft:channel-correlation-id": f"twin:{uuid.uuid4()}",
               "com.microsoft:api-version": "2021-04-12"}
    tx = client.sender(address, snd_settled=True, properties=channel)
    rx = client.receiver(address, properties=channel)
    assert client.link_open(tx) and client.link_open(rx), "twin links were not attached"
    return tx, rx


def request(client, links, operation, resource=None, body=b" ", cid=("put_string", None)):
    """Sends one twin request (pre-settled, as the SDKs send them); returns the response."""
    tx, rx = links
    put, value = cid
    value = value if value is not None else str(uuid.uuid4())
    ann = {"operation": operation}
    if resource:
        ann["resource"] = resource
    seen = len(client.deliveries(rx))
    client.send(tx, encode_message(annotations=ann, properties={"correlation-id": (put, value)},
                                   data=body), settled=True)
    response = client.next_delivery(rx, seen, 10, f"the twin {operation} response")
    return value, response


def status_and_version(response):
    ann = checks.annotations(response)
    assert "status" in ann, f"no status annotation: {ann!r}"
    status = checks.typed(ann["status"], Data.INT, "annotation status")
    if "version" in ann:
        checks.typed(ann["version"], Data.LONG, "annotation version")
    return status, ann


def same_correlation_id(response, put, sent):
    got = checks.correlation_id(response)
    want_type = {"put_string": Data.STRING, "put_uuid": Data.UUID, "put_ulong": Data.ULONG,
                 "put_binary": Data.BINARY}[put]
    assert got.type == want_type, f"correlation-id type changed: sent {put[4:]}, got {got!r}"
    assert got.value == sent, f"correlation-id {got.value!r} is not the request's {sent!r}"


def test_twin_get_response(module_client):
    c = module_client("A")
    links = twin_links(c, "A")
    cid, r = request(c, links, "GET")
    status, _ = status_and_version(r)
    assert status == 200
    same_correlation_id(r, "put_string", cid)
    twin = checks.json_body(r)
    assert isinstance(twin.get("desired"), dict) and isinstance(twin.get("reported"), dict), twin
    assert "threshold" in twin["desired"], twin
    assert isinstance(twin["desired"]["$version"], int)
    checks.tags_are_16_bytes(c, links[1], 1)


def test_twin_reported_patch_response(module_client):
    c = module_client("A")
    links = twin_links(c, "A")
    cid, r = request(c, links, "PATCH", "/properties/reported", body=b'{"temp":21}')
    status, ann = status_and_version(r)
    assert status == 204
    same_correlation_id(r, "put_string", cid)
    # Exactly one data section, possibly empty: the C SDK drops anything else.
    checks.one_data_section(r)
    _, get = request(c, links, "GET")
    reported = checks.json_body(get)["reported"]
    assert reported["temp"] == 21
    if "version" in ann:
        assert ann["version"].value == reported["$version"], (ann, reported)
    checks.tags_are_16_bytes(c, links[1], 2)


@pytest.mark.parametrize("operation", ["PUT", "DELETE"])
def test_twin_desired_subscription_response(module_client, operation):
    c = module_client("A")
    links = twin_links(c, "A")
    cid, r = request(c, links, operation, DESIRED)
    status, _ = status_and_version(r)
    assert status == 200
    same_correlation_id(r, "put_string", cid)
    checks.one_data_section(r)
    checks.tags_are_16_bytes(c, links[1], 1)


@pytest.mark.parametrize("cid", [
    ("put_string", "Get" + str(uuid.uuid4())),
    ("put_uuid", uuid.uuid4()),
    ("put_ulong", 4242),
    ("put_binary", b"\x01\x02corr"),
], ids=["string", "uuid", "ulong", "binary"])
def test_twin_correlation_id_type_echoed(module_client, cid):
    c = module_client("A")
    links = twin_links(c, "A")
    sent, r = request(c, links, "GET", cid=cid)
    same_correlation_id(r, cid[0], sent)


def test_twin_desired_push(hub, module_client):
    c = module_client("A")
    links = twin_links(c, "A")
    _, sub = request(c, links, "PUT", DESIRED)
    assert status_and_version(sub)[0] == 200
    rx = links[1]
    seen = len(c.deliveries(rx))
    patch = {"properties": {"desired": {"threshold": 9, "mode": "eco"}}}
    headers = {"authorization": service_token(), "if-match": "*"}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        call = pool.submit(hub.https, "PATCH", f"/twins/{DEVICE}/modules/A", headers, patch)
        push = c.next_delivery(rx, seen, 15, "the desired-property push")
        status, body = call.result(timeout=30)
    assert status == 200, (status, body)
    props = push.message.properties()
    assert not props or "correlation-id" not in props, (
        f"a push must carry no correlation-id: {push.message.of(PROPERTIES)}")
    ann = checks.annotations(push)
    assert "status" not in ann, f"a push carries no status: {ann!r}"
    assert "version" in ann, f"a push carries the version annotation: {ann!r}"
    version = checks.typed(ann["version"], Data.LONG, "annotation version")
    desired = checks.json_body(push)
    assert desired["threshold"] == 9 and desired["mode"] == "eco", desired
    assert desired["$version"] == version, (desired, version)
    assert body["properties"]["desired"]["$version"] == version, body
    checks.tags_are_16_bytes(c, rx, len(c.deliveries(rx)))


def test_twin_error_response(module_client):
    """An unsupported request is answered with a 4xx status (int) and a body the Node SDK can
    parse: it JSON-parses the body of every error response."""
    c = module_client("A")
    links = twin_links(c, "A")
    cid, r = request(c, links, "PATCH", "/properties/desired", body=b'{"x":1}')
    status, _ = status_and_version(r)
    assert 400 <= status < 500, status
    same_correlation_id(r, "put_string", cid)
    body = r.message.body_sections()
    if body:
        assert isinstance(checks.json_body(r), dict)


def send_without_correlation_id(client, links, operation, resource=None, body=b" "):
    """A twin request with no properties section (so no correlation-id), pre-settled."""
    ann = {"operation": operation}
    if resource:
        ann["resource"] = resource
    client.send(links[0], encode_message(annotations=ann, data=body), settled=True)


def replies_up_to_marker(client, links, seen):
    """Sends a GET with a correlation-id as a marker and waits for its reply (twin requests
    on a link are answered in order); returns every delivery on the response link since
    `seen`, the marker's reply last."""
    tx, rx = links
    cid = str(uuid.uuid4())
    client.send(tx, encode_message(annotations={"operation": "GET"},
                                   properties={"correlation-id": ("put_string", cid)},
                                   data=b" "), settled=True)

    def marker_index():
        for i, r in enumerate(client.deliveries(rx)[seen:]):
            props = r.message.properties() or {}
            if "correlation-id" in props and props["correlation-id"].value == cid:
                return i + 1
        return None
    n = client.wait(marker_index, 10, "the reply to the marker GET")
    got = client.deliveries(rx)[seen:seen + n]
    return got, got[-1]


@pytest.mark.parametrize("operation,resource", [("GET", None), ("PUT", DESIRED),
                                                ("DELETE", DESIRED)],
                         ids=["GET", "PUT", "DELETE"])
def test_twin_request_without_correlation_id_unanswered(module_client, operation, resource):
    """No reply at all: one without a correlation-id reads as a desired push to every SDK."""
    c = module_client("A")
    links = twin_links(c, "A")
    seen = len(c.deliveries(links[1]))
    send_without_correlation_id(c, links, operation, resource)
    got, _ = replies_up_to_marker(c, links, seen)
    assert len(got) == 1, (
        f"the {operation} without a correlation-id was answered: "
        f"{[(r.message.annotations(), r.message.describe_body()) for r in got[:-1]]}")


def test_twin_reported_patch_without_correlation_id_applied(module_client):
    """Applied (seen in a later GET), not answered."""
    c = module_client("A")
    links = twin_links(c, "A")
    mark = str(uuid.uuid4())
    seen = len(c.deliveries(links[1]))
    send_without_correlation_id(c, links, "PATCH", "/properties/reported",
                                body=b'{"nocid":"%s"}' % mark.encode())
    got, marker = replies_up_to_marker(c, links, seen)
    assert len(got) == 1, (
        f"the PATCH without a correlation-id was answered: "
        f"{[(r.message.annotations(), r.message.describe_body()) for r in got[:-1]]}")
    reported = checks.json_body(marker)["reported"]
    assert reported.get("nocid") == mark, f"the PATCH was not applied: reported {reported}"
