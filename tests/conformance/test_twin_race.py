"""The twin links attached back to back and a GET sent as soon as the request link's attach
is answered, without waiting for the response link's attach answer (clients pipeline these):
the hub must have the response link registered by then, or the reply is lost."""

import uuid

from proton import Endpoint, symbol

from conftest import DEVICE
from wire import Client, encode_message

ROUNDS = 50
REPLY_WAIT = 5


def test_twin_get_pipelined_with_attach(hub):
    key = hub.module_key("A")
    address = f"/devices/{DEVICE}/modules/A/twin"
    lost, pipelined = [], 0
    for i in range(ROUNDS):
        c = Client(hub.host, hub.ca_path)
        try:
            c.authenticate(DEVICE, "A", key)
            props = {symbol("com.microsoft:channel-correlation-id"): f"twin:{uuid.uuid4()}"}
            tx = c.session.sender(f"snd-{uuid.uuid4()}")
            tx.target.address = address
            tx.snd_settle_mode = tx.SND_SETTLED
            tx.properties = props
            rx = c.session.receiver(f"rcv-{uuid.uuid4()}")
            rx.source.address = address
            rx.properties = props
            tx.open()
            rx.open()
            rx.flow(10)
            c.wait(lambda: tx.state & (Endpoint.REMOTE_ACTIVE | Endpoint.REMOTE_CLOSED), 10,
                   "the request link's attach")
            assert c.link_open(tx), f"round {i}: the twin request link was refused"
            if not rx.state & Endpoint.REMOTE_ACTIVE:
                pipelined += 1
            cid = str(uuid.uuid4())
            c.send(tx, encode_message(annotations={"operation": "GET"},
                                      properties={"correlation-id": ("put_string", cid)},
                                      data=b" "), settled=True)
            try:
                c.wait(lambda: c.deliveries(rx), REPLY_WAIT, "the GET's reply")
            except TimeoutError:
                lost.append(i)
                break
        finally:
            c.close()
    print(f"{pipelined} of {i + 1} GETs sent before the response link's attach answer")
    assert not lost, (
        f"round {lost[0] + 1} of {ROUNDS}: a GET sent right after the request link's attach "
        f"answer got no reply within {REPLY_WAIT} s")
