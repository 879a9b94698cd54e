"""What a child hub sends its parent (protocol reference §2, §4.1, §5.1, §6.2, §8).

The parent is a fake (`fakeparent.py`): Qpid Proton as a TLS server on its own loopback
address, answering put-tokens, twin requests and telemetry as IoT Hub does. The child is a
real hub (`hubproc.py`) whose `upstream` names that address and trusts the fake parent's CA;
its module A is a raw Proton client (`wire.py`) on the child. Everything checked is read from
the frames the child sent the parent.
"""

import base64
import hashlib
import hmac
import json
import time
import urllib.parse
import uuid

import pytest
from proton import Data, int32

import checks
from fakeparent import ANNOUNCED_IDLE_MS, FakeParent
from hubproc import DEVICE, Hub, loopback
from wire import AMQP_VALUE, IOTHUB_HOST, Client, encode_message

# The child's `$edgeHub` key, given in its config so that the tokens can be verified here.
EDGEHUB_KEY = base64.b64encode(b"edgehub-upstream-conformance-key").decode()
DESIRED = "/notifications/twin/properties/desired"
MAX_GAP_S = 6.0
QUIET_S = 20.0
WAIT = 20


class Pair:
    def __init__(self, parent, child):
        self.parent = parent
        self.child = child
        self.base = f"amqps://{parent.host}:{parent.port}"

    @property
    def up(self):
        """The child's (first) upstream connection."""
        return self.parent.connections[0]

    def link(self, sender, address):
        """The child's link with this address, as attached on the first connection."""
        if not self.parent.connections:
            return None
        for link in self.up.wire.links:
            if link.sender == sender and link.address == address:
                return link
        return None

    def path(self, module):
        return f"{self.base}/devices/{DEVICE}/modules/{urllib.parse.quote(module, safe='')}"

    def wait_link(self, sender, address):
        return self.parent.wait(lambda: self.link(sender, address), WAIT,
                                f"the child's link {address}")

    def wait_deliveries(self, link, predicate, what, count=1):
        def found():
            got = [d for d in link.deliveries if predicate(d)]
            return got if len(got) >= count else None
        return self.parent.wait(found, WAIT, what)


@pytest.fixture(scope="module")
def pair():
    parent = FakeParent(loopback())
    child = None
    try:
        child = Hub(modules={"A": {}},
                    routes={"up": "FROM /messages/modules/A/outputs/* INTO $upstream"},
                    extra={"upstream": {"hostname": parent.host, "port": parent.port,
                                        "caCert": parent.ca_path,
                                        "sharedAccessKey": EDGEHUB_KEY,
                                        "minBackoffMs": 100, "maxBackoffMs": 1000}})
        p = Pair(parent, child)
        # Connected: every identity's method sender attached (the last link the child opens).
        for m in ("$edgeHub", "A"):
            p.wait_link(True, f"{p.path(m)}/methods/devicebound")
        yield p
    finally:
        if child is not None:
            child.stop()
        parent.stop()


@pytest.fixture
def child_module(pair):
    """Raw Proton clients authenticated as module A on the child; closed after the test."""
    clients = []

    def make():
        c = Client(pair.child.host, pair.child.ca_path)
        clients.append(c)
        c.authenticate(DEVICE, "A", pair.child.module_key("A"))
        return c

    yield make
    for c in clients:
        c.close()


def string_value(value, what):
    return checks.typed(value, Data.STRING, what)


def parse_token(token):
    assert token.startswith("SharedAccessSignature "), f"not a SAS token: {token!r}"
    fields = dict(f.split("=", 1) for f in token[len("SharedAccessSignature "):].split("&"))
    assert {"sr", "sig", "se"} <= set(fields), f"token fields: {sorted(fields)}"
    return fields


def test_upstream_put_token(pair):
    """Each identity's put-token on the `$cbs` link: operation/type/name strings, a message-id,
    an amqp-value string token; name = the identity's audience, token = `$edgeHub`'s own,
    signed with its key (§2.2, §2.4, §8)."""
    cbs = pair.wait_link(True, "$cbs")
    got = pair.wait_deliveries(cbs, lambda d: True, "the child's put-tokens", count=2)
    names = set()
    now = time.time()
    edge_hub_resource = f"{IOTHUB_HOST}/devices/{DEVICE}/modules/$edgeHub"
    for d in got:
        app = checks.application_properties(d)
        assert string_value(app.get("operation"), "operation") == "put-token", app
        token_type = string_value(app.get("type"), "type")
        assert token_type in ("azure-devices.net:sastoken", "servicebus.windows.net:sastoken"), app
        names.add(string_value(app.get("name"), "name"))
        props = d.message.properties() or {}
        assert "message-id" in props, f"put-token without a message-id: {props!r}"
        body = d.message.body_sections()
        assert len(body) == 1 and body[0].code == AMQP_VALUE, (
            f"the token must be one amqp-value section; the child sent {d.message.describe_body()}")
        token = string_value(body[0].value, "the token")
        fields = parse_token(token)
        # On behalf of every module, the token is the child's own `$edgeHub` one (§8).
        assert urllib.parse.unquote(fields["sr"]) == edge_hub_resource, fields["sr"]
        sig = hmac.new(base64.b64decode(EDGEHUB_KEY), f"{fields['sr']}\n{fields['se']}".encode(),
                       hashlib.sha256).digest()
        assert urllib.parse.unquote(fields["sig"]) == base64.b64encode(sig).decode(), (
            "token not signed with the $edgeHub key")
        assert now < int(fields["se"]) <= now + 2 * 3600, f"expiry {fields['se']}"
    assert names == {edge_hub_resource, f"{IOTHUB_HOST}/devices/{DEVICE}/modules/A"}, names


def test_upstream_telemetry(pair, child_module):
    """A's output routed to `$upstream` arrives on A's events link: the body in one data
    section, only string application properties with `iothub-outputname`, message-id and
    correlation-id as sent, 16-byte tags, unsettled; the parent's accept ends it (§4.1, §8)."""
    c = child_module()
    tx = c.sender(f"/devices/{DEVICE}/modules/A/messages/events")
    assert c.link_open(tx), "events link not attached on the child"
    sent = []
    for i in range(2):
        mid, cid = f"mid-{uuid.uuid4()}", f"cid-{uuid.uuid4()}"
        body = json.dumps({"n": i, "mark": str(uuid.uuid4())}).encode()
        dlv = c.send(tx, encode_message(
            properties={"message-id": ("put_string", mid), "correlation-id": ("put_string", cid)},
            app_properties={"iothub-outputname": "out1", "color": "red", "count": int32(3)},
            data=body))
        assert c.outcome(dlv, 10, "the child's outcome") == dlv.ACCEPTED
        sent.append((mid, cid, body))

    events = pair.wait_link(True, f"{pair.path('A')}/messages/events")
    bodies = {b for _, _, b in sent}

    def ours(d):
        return d.complete and any(bytes(s.value.value) in bodies for s in d.message.of(0x75))
    got = pair.wait_deliveries(events, ours, "the forwarded messages", count=2)
    tags = []
    for mid, cid, body in sent:
        d = next(d for d in got if any(bytes(s.value.value) == body for s in d.message.of(0x75)))
        assert checks.one_data_section(d) == body
        app = checks.application_properties(d)
        for k, v in app.items():
            assert v.type == Data.STRING, f"application property {k!r} is {v!r}, not a string"
        assert app.get("iothub-outputname") and app["iothub-outputname"].value == "out1", app
        assert app.get("color") and app["color"].value == "red", app
        props = d.message.properties() or {}
        assert "message-id" in props and "correlation-id" in props, props
        assert checks.typed(props["message-id"], Data.STRING, "message-id") == mid
        assert checks.typed(props["correlation-id"], Data.STRING, "correlation-id") == cid
        assert not d.settled, "telemetry upstream must be sent unsettled (the parent settles)"
        assert d.tag is not None and len(d.tag) == checks.TAG_LEN, f"delivery tag {d.tag!r}"
        tags.append(d.tag)
    assert len(set(tags)) == len(tags), f"tags repeat: {[t.hex() for t in tags]}"


def twin_links(client):
    address = f"/devices/{DEVICE}/modules/A/twin"
    channel = {"com.microsoft:channel-correlation-id": f"twin:{uuid.uuid4()}",
               "com.microsoft:api-version": "2021-04-12"}
    tx = client.sender(address, snd_settled=True, properties=channel)
    rx = client.receiver(address, properties=channel)
    assert client.link_open(tx) and client.link_open(rx), "twin links were not attached"
    return tx, rx


def check_twin_request(d, operation, resource, body=None):
    """A twin request as the child sent it: `operation`/`resource` string annotations, a string
    correlation-id, one data section (`body` when given), pre-settled. Returns the body."""
    ann = checks.annotations(d)
    assert string_value(ann.get("operation"), "annotation operation") == operation, ann
    if resource is not None:
        assert string_value(ann.get("resource"), "annotation resource") == resource, ann
    elif "resource" in ann:
        string_value(ann["resource"], "annotation resource")
    checks.typed(checks.correlation_id(d), Data.STRING, f"the {operation}'s correlation-id")
    raw = checks.one_data_section(d)
    if body is not None:
        assert raw == body, f"{operation} body {raw!r}, expected {body!r}"
    assert d.settled, f"the twin {operation} must be sent pre-settled"
    return raw


def operation(d):
    ann = d.message.annotations() or {}
    return str(ann["operation"][1].value) if "operation" in ann else None


def test_upstream_twin_requests(pair, child_module):
    """On each identity's twin link: the desired subscription (PUT) and the GET sent at connect
    carry a data section of one space; a reported patch from module A goes up as PATCH with its
    JSON; all with string `operation`/`resource` and correlation-id, pre-settled (§5.1)."""
    for m in ("$edgeHub", "A"):
        twin = pair.wait_link(True, f"{pair.path(m)}/twin")
        pair.wait_deliveries(twin, lambda d: operation(d) == "GET", f"{m}'s twin GET")
        for d in twin.deliveries:
            if operation(d) == "PUT":
                check_twin_request(d, "PUT", DESIRED, b" ")
            elif operation(d) == "GET":
                check_twin_request(d, "GET", None, b" ")
        assert any(operation(d) == "PUT" for d in twin.deliveries), f"{m}: no desired subscription"

    c = child_module()
    tx, rx = twin_links(c)
    mark = str(uuid.uuid4())
    c.send(tx, encode_message(annotations={"operation": "PATCH", "resource": "/properties/reported"},
                              properties={"correlation-id": ("put_string", str(uuid.uuid4()))},
                              data=json.dumps({"upstreamMark": mark}).encode()), settled=True)
    c.next_delivery(rx, 0, 10, "the child's PATCH response")
    twin = pair.link(True, f"{pair.path('A')}/twin")
    got = pair.wait_deliveries(
        twin, lambda d: operation(d) == "PATCH" and mark.encode() in d.raw, "the PATCH upstream")
    body = check_twin_request(got[0], "PATCH", "/properties/reported")
    assert json.loads(body).get("upstreamMark") == mark, body


def test_upstream_method_response(pair, child_module):
    """A method call from the parent reaches module A on the child; the child's response
    upstream has the request's correlation-id with its type (uuid), `IoThub-status` an AMQP int
    and the module's payload in one data section (§6.2, §8)."""
    c = child_module()
    address = f"/devices/{DEVICE}/modules/A/methods/devicebound"
    channel = {"com.microsoft:channel-correlation-id": f"methods:{uuid.uuid4()}",
               "com.microsoft:api-version": "2021-04-12"}
    rx = c.receiver(address, properties=channel)
    tx = c.sender(address, properties=channel)
    assert c.link_open(rx) and c.link_open(tx), "method links were not attached on the child"

    up_address = f"{pair.path('A')}/methods/devicebound"
    responses = pair.wait_link(True, up_address)
    cid = uuid.uuid4()
    pair.parent.send_method(pair.up, up_address, "echo", cid, b'{"n":7}')
    req = c.next_delivery(rx, 0, 15, "the method request on the child")
    assert json.loads(checks.one_data_section(req)) == {"n": 7}
    answer = json.dumps({"got": 7}).encode()
    c.send(tx, encode_message(properties={"correlation-id": ("put_uuid", checks.correlation_id(req).value)},
                              app_properties={"IoThub-status": int32(201)}, data=answer))

    got = pair.wait_deliveries(responses, lambda d: d.complete, "the method response upstream")
    d = got[0]
    assert checks.typed(checks.correlation_id(d), Data.UUID, "the response's correlation-id") == cid
    app = checks.application_properties(d)
    assert "IoThub-status" in app, f"no IoThub-status: {app!r}"
    assert checks.typed(app["IoThub-status"], Data.INT, "IoThub-status") == 201
    assert checks.one_data_section(d) == answer


def test_upstream_keepalive_inside_parent_idle_timeout(pair):
    """The parent announces idle-time-out 10 s; over 20 s with nothing to send, frames from the
    child arrive at least every 6 s (AMQPNET closes past its announced value), and the
    connection stays up (§1.3; AMQP 1.0 §2.4.5)."""
    up = pair.up
    announced = pair.parent.announced_idle_timeout(up)
    assert announced == ANNOUNCED_IDLE_MS, f"the fake parent announced {announced!r}"
    start = time.monotonic()
    end = start + QUIET_S
    # Measuring, not synchronising: the parent's thread keeps reading meanwhile.
    pair.parent.wait(lambda: up.eof or time.monotonic() >= end, QUIET_S + 5, "the quiet period")
    frames = [f for f in up.wire.inbound.frames if start <= f.at <= end]
    arrivals = [start] + [f.at for f in frames] + [end]
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    print(f"upstream keep-alive gaps (s): {[round(g, 2) for g in gaps]}")
    assert not up.eof, "the upstream connection ended during the quiet period"
    assert max(gaps) <= MAX_GAP_S, (
        f"{max(gaps):.2f} s without a frame from the child (limit {MAX_GAP_S} s for an announced "
        f"{ANNOUNCED_IDLE_MS / 1000:.0f} s); gaps: {[round(g, 2) for g in gaps]}")
    assert len(pair.parent.connections) == 1, "the child reconnected"
