"""The hub's answer to a client outcome sent unsettled on a link where the hub sends (protocol
reference §4.2). The C# SDK sends complete/abandon/reject that way on module-input links and
waits for the sender's disposition, which must be settled and `accepted` (edgeHub answers
Accepted to every outcome). The outcome itself still takes effect: accepted and rejected
messages leave the queue, released ones come again."""

import uuid

import pytest
from proton import Delivery

from conftest import DEVICE
from wire import encode_message

ANSWER_WAIT = 5
CODES = {"accepted": 0x24, "rejected": 0x25, "released": 0x26}


def input_links(module_client, module):
    """Module C sending (its outputs toD and toE are routed to D and E), `module` receiving."""
    rcv = module_client(module)
    snd = module_client("C")
    inputs = rcv.receiver(f"/devices/{DEVICE}/modules/{module}/messages/events")
    events = snd.sender(f"/devices/{DEVICE}/modules/C/messages/events")
    assert rcv.link_open(inputs) and snd.link_open(events)
    return rcv, inputs, snd, events


def send_outputs(snd, events, output, bodies):
    for body in bodies:
        dlv = snd.send(events, encode_message(app_properties={"iothub-outputname": output},
                                              data=body))
        assert snd.outcome(dlv, 10, "the outcome of an output") == dlv.ACCEPTED


def body_of(received):
    return bytes(received.message.body_sections()[0].value.value)


class Inputs:
    """This test's input deliveries on a link, in order: deliveries whose body does not start
    with the test's `run` prefix (left in the queue by an earlier failed test) are accepted
    and skipped."""

    def __init__(self, client, link, run):
        self.client, self.link, self.run = client, link, run
        self.cursor = len(client.deliveries(link))

    def next(self, timeout, what):
        while True:
            r = self.client.next_delivery(self.link, self.cursor, timeout, what)
            self.cursor += 1
            if body_of(r).startswith(self.run):
                return r
            self.client.accept(r)


def answered(client, sent):
    """The hub's dispositions (role sender) for the ranges of our unsettled outcomes `sent`."""
    ranges = {(d["first"], d["last"] if d["last"] is not None else d["first"]) for d in sent}
    got = []
    for d in client.dispositions(client.inbound, role_receiver=False):
        key = (d["first"], d["last"] if d["last"] is not None else d["first"])
        if key in ranges:
            got.append(d)
    return got


@pytest.mark.parametrize("form", ["each", "range"])
@pytest.mark.parametrize("outcome", ["accepted", "released", "rejected"])
def test_unsettled_outcome_answered_settled_accepted(module_client, outcome, form):
    """`each`: one disposition per delivery (as Proton and the C# SDK send them); `range`: one
    disposition with first..last covering three deliveries."""
    state = {"accepted": Delivery.ACCEPTED, "released": Delivery.RELEASED,
             "rejected": Delivery.REJECTED}[outcome]
    rcv, inputs, snd, events = input_links(module_client, "D")
    run = uuid.uuid4().hex.encode()
    bodies = [run + b"-%d" % i for i in range(3)]
    send_outputs(snd, events, "toD", bodies)
    mine = Inputs(rcv, inputs, run)
    got = [mine.next(15, f"input delivery {i}") for i in range(3)]
    assert [body_of(r) for r in got] == bodies
    assert not any(r.settled for r in got), "inputs must arrive unsettled"
    ids = [rcv.delivery_id(inputs, r) for r in got]

    before = len(rcv.dispositions(rcv.outbound, role_receiver=True))
    if form == "each":
        for r in got:
            rcv.dispose(r, state)
    else:
        rcv.dispose_range(inputs, got, CODES[outcome])
    sent = rcv.dispositions(rcv.outbound, role_receiver=True)[before:]
    assert sent and all(not d["settled"] and d["state"] == outcome for d in sent), sent
    covered = set()
    for d in sent:
        covered.update(range(d["first"], (d["last"] if d["last"] is not None else d["first"]) + 1))
    assert covered == set(ids), f"this client's dispositions {sent} do not cover {ids}"

    try:
        rcv.wait(lambda: len(answered(rcv, sent)) >= len(sent), ANSWER_WAIT,
                 "the hub's disposition answering each unsettled outcome")
    except TimeoutError as e:
        raise AssertionError(
            f"{e}: sent {sent}, the hub sent dispositions "
            f"{rcv.dispositions(rcv.inbound, role_receiver=False)}") from None
    answers = answered(rcv, sent)
    hub_channel = rcv.hub_channel()
    for a in answers:
        assert a["settled"], f"the hub's answer must be settled: {a}"
        assert a["state"] == "accepted", f"the hub must answer accepted to {outcome}: {a}"
        assert a["channel"] == hub_channel, (
            f"the answer came on channel {a['channel']}, not the hub's channel {hub_channel} "
            f"of this session")
    assert len(answers) == len(sent), f"one answer per disposition: sent {sent}, got {answers}"

    # The outcome took effect. A marker sent after: the next delivery is the marker, unless
    # the outcome was released, when the three messages come again first.
    marker = run + b"-marker"
    send_outputs(snd, events, "toD", [marker])
    if outcome == "released":
        again = [mine.next(15, f"redelivery {i}") for i in range(3)]
        assert sorted(body_of(r) for r in again) == sorted(bodies), (
            f"released messages were not delivered again: {[body_of(r) for r in again]}")
        for r in again:
            rcv.accept(r)
    nxt = mine.next(15, "the marker")
    assert body_of(nxt) == marker, (
        f"after {outcome}, the next input was {body_of(nxt)!r}, not the marker")
    rcv.accept(nxt)
