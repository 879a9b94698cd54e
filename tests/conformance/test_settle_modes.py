"""The sender settle mode the hub sets in its attach on the links where it sends, whatever the
client asks (protocol reference §4.2; edgeHub sets it per link kind): twin responses, method
requests and `$cbs` replies pre-settled (snd-settle-mode `settled`, 1); module inputs
unsettled (`unsettled`, 0), so that the client's outcome completes the stored message. The
transfers follow the mode."""

import concurrent.futures
import json
import uuid

import pytest
from proton import Data, int32

import checks
from conftest import DEVICE, service_token
from test_dispositions import send_outputs
from wire import ATTACH, encode_message

UNSETTLED, SETTLED, MIXED = 0, 1, 2
NAMES = {UNSETTLED: "unsettled", SETTLED: "settled", MIXED: "mixed"}


def hub_snd_settle_mode(client, link):
    """The snd-settle-mode of the hub's attach for `link` (absent means mixed)."""
    fields = client.hub_attach(link)
    if len(fields) <= 3 or fields[3].type == Data.NULL:
        return MIXED
    return int(checks.typed(fields[3], Data.UBYTE, "the hub's snd-settle-mode"))


def asked(client, link):
    """The snd-settle-mode this client's own attach asked for (read from its frames)."""
    for f in client.outbound.performatives(ATTACH):
        fields = f.performative[1]
        if fields[0].value == link.name:
            return MIXED if fields[3].type == Data.NULL else int(fields[3].value)
    raise AssertionError("no attach sent")


def check_mode(client, link, ask, want):
    assert asked(client, link) == ask, "this client did not ask what the test meant"
    got = hub_snd_settle_mode(client, link)
    assert got == want, (
        f"asked {NAMES[ask]}, the hub's attach says snd-settle-mode {NAMES.get(got, got)}; "
        f"it must set {NAMES[want]} on this link whatever the client asks")


def check_transfers(client, link, count, settled):
    transfers = client.hub_transfers(link)
    assert len(transfers) >= count, transfers
    for t in transfers[:count]:
        assert t["settled"] == settled, (
            f"a transfer arrived {'settled' if t['settled'] else 'unsettled'} on this link: {t}")


@pytest.mark.parametrize("ask", [MIXED, UNSETTLED], ids=["ask-mixed", "ask-unsettled"])
def test_twin_response_link_settled(module_client, ask):
    c = module_client("A")
    address = f"/devices/{DEVICE}/modules/A/twin"
    channel = {"com.microsoft:channel-correlation-id": f"twin:{uuid.uuid4()}"}
    tx = c.sender(address, snd_settled=True, properties=channel)
    rx = c.receiver(address, properties=channel, snd_settle_mode=ask)
    assert c.link_open(tx) and c.link_open(rx)
    check_mode(c, rx, ask, SETTLED)
    c.send(tx, encode_message(annotations={"operation": "GET"},
                              properties={"correlation-id": ("put_string", str(uuid.uuid4()))},
                              data=b" "), settled=True)
    r = c.next_delivery(rx, 0, 10, "the twin GET response")
    assert r.settled
    check_transfers(c, rx, 1, True)


@pytest.mark.parametrize("ask", [MIXED, UNSETTLED], ids=["ask-mixed", "ask-unsettled"])
def test_method_request_link_settled(hub, module_client, ask):
    c = module_client("D")
    address = f"/devices/{DEVICE}/modules/D/methods/devicebound"
    channel = {"com.microsoft:channel-correlation-id": f"methods:{uuid.uuid4()}"}
    rx = c.receiver(address, properties=channel, snd_settle_mode=ask)
    tx = c.sender(address, properties=channel)
    assert c.link_open(rx) and c.link_open(tx)
    check_mode(c, rx, ask, SETTLED)
    call = {"methodName": "m", "payload": 1, "responseTimeoutInSeconds": 10,
            "connectTimeoutInSeconds": 10}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(hub.https, "POST", f"/twins/{DEVICE}/modules/D/methods",
                              {"authorization": service_token()}, call)
        req = c.next_delivery(rx, 0, 15, "the method request")
        c.send(tx, encode_message(
            properties={"correlation-id": ("put_uuid", checks.correlation_id(req).value)},
            app_properties={"IoThub-status": int32(200)}, data=json.dumps(1).encode()))
        assert pending.result(timeout=30)[0] == 200
    check_transfers(c, rx, 1, True)


@pytest.mark.parametrize("ask", [SETTLED, MIXED], ids=["ask-settled", "ask-mixed"])
def test_module_input_link_unsettled(module_client, ask):
    e = module_client("E")
    inputs = e.receiver(f"/devices/{DEVICE}/modules/E/messages/events", snd_settle_mode=ask)
    snd = module_client("C")
    events = snd.sender(f"/devices/{DEVICE}/modules/C/messages/events")
    assert e.link_open(inputs) and snd.link_open(events)
    check_mode(e, inputs, ask, UNSETTLED)
    send_outputs(snd, events, "toE", [b"s1", b"s2"])
    got = [e.next_delivery(inputs, i, 15, f"input delivery {i}") for i in range(2)]
    check_transfers(e, inputs, 2, False)
    for r in got:
        e.accept(r)


@pytest.mark.parametrize("ask", [UNSETTLED, MIXED], ids=["ask-unsettled", "ask-mixed"])
def test_cbs_reply_link_settled(hub, connect, ask):
    c = connect()
    tx = c.sender("$cbs")
    rx = c.receiver("$cbs", snd_settle_mode=ask)
    c._cbs = (tx, rx)
    check_mode(c, rx, ask, SETTLED)
    c.authenticate(DEVICE, "A", hub.module_key("A"))
    check_transfers(c, rx, 1, True)
