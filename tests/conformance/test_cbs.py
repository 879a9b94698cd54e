"""`$cbs` put-token replies (protocol reference §2.3)."""

import time
import urllib.parse
import uuid

import pytest
from proton import Data

import checks
from conftest import DEVICE
from wire import IOTHUB_HOST, sas_token


def reply_fields(reply):
    props = checks.application_properties(reply)
    assert "status-code" in props and "status-description" in props, props
    code = checks.typed(props["status-code"], Data.INT, "status-code")
    checks.typed(props["status-description"], Data.STRING, "status-description")
    # edgeHub sends no body; the nearest an AMQP library without body-less messages can send
    # is one empty data section (not an amqp-value null).
    body = checks.one_data_section(reply)
    assert body == b"", f"the put-token reply's data section is not empty: {body!r}"
    return code


def module_token(module, key):
    resource = f"{IOTHUB_HOST}/devices/{DEVICE}/modules/{module}"
    return (sas_token(resource, key, int(time.time()) + 3600),
            urllib.parse.quote(resource, safe=""))


@pytest.mark.parametrize("message_id", [str(uuid.uuid4()), "request1", uuid.uuid4()],
                         ids=["uuid-text", "string", "uuid"])
def test_cbs_put_token_reply(hub, connect, message_id):
    c = connect()
    token, audience = module_token("A", hub.module_key("A"))
    sent, reply = c.put_token(token, audience, message_id=message_id)
    assert reply_fields(reply) == 200
    cid = checks.correlation_id(reply)
    want = Data.UUID if isinstance(sent, uuid.UUID) else Data.STRING
    assert cid.type == want, f"correlation-id type: sent {type(sent).__name__}, got {cid!r}"
    assert cid.value == sent, f"correlation-id {cid.value!r} is not the message-id {sent!r}"
    checks.tags_are_16_bytes(c, c.cbs()[1], 1)
    # The grant holds: a twin link for the identity attaches.
    rx = c.receiver(f"/devices/{DEVICE}/modules/A/twin")
    assert c.link_open(rx), "a link for the authenticated identity was refused"


def test_cbs_bad_token_refused(hub, connect):
    c = connect()
    wrong_key = "d3Jvbmcta2V5LXdyb25nLWtleS13cm9uZy1rZXktd3Jvbmc="
    token, audience = module_token("C", wrong_key)
    sent, reply = c.put_token(token, audience)
    assert reply_fields(reply) == 401
    cid = checks.correlation_id(reply)
    assert cid.type == Data.STRING and cid.value == sent
    # No grant: a link for the identity is refused (attached with no terminus, then detached
    # with an error, or detached straight away).
    rx = c.receiver(f"/devices/{DEVICE}/modules/C/twin")
    c.wait(lambda: c.link_open(rx) is False and rx.remote_condition is not None, 10,
           "the refusal of the unauthenticated link")
    assert rx.remote_condition.name in ("amqp:unauthorized-access", "amqp:not-allowed"), (
        rx.remote_condition)
    assert not c.deliveries(rx)
