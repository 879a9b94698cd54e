"""Assertions on decoded deliveries. Each says what the hub actually sent when it fails."""

import json

from proton import Data

from wire import DATA, TRANSFER, Typed

TAG_LEN = 16


def one_data_section(received):
    """The body is exactly one `data` section: not absent, not `amqp-value` (null or other),
    not several sections. Returns its bytes."""
    body = received.message.body_sections()
    assert len(body) == 1 and body[0].code == DATA, (
        f"body must be exactly one data section (0x75); the hub sent "
        f"{received.message.describe_body() or 'no body section'}")
    assert body[0].value.type == Data.BINARY, f"data section holds {body[0].value!r}"
    return bytes(body[0].value.value)


def json_body(received):
    raw = one_data_section(received)
    try:
        return json.loads(raw)
    except ValueError as e:
        raise AssertionError(f"data section is not JSON: {raw!r}") from e


def annotations(received):
    ann = received.message.annotations()
    assert ann is not None, f"no message-annotations section in {received.message.sections}"
    for key, (k, _) in ann.items():
        assert k.type == Data.SYMBOL, f"annotation key {key!r} is a {k.type_name}, not a symbol"
    return {key: v for key, (_, v) in ann.items()}


def typed(value, type_code, what):
    assert isinstance(value, Typed), f"{what}: {value!r}"
    assert value.type == type_code, (
        f"{what} must be an AMQP {Typed(type_code, None).type_name}; the hub sent {value!r}")
    return value.value


def application_properties(received):
    props = received.message.application_properties()
    assert props is not None, f"no application-properties section in {received.message.sections}"
    for key, (k, _) in props.items():
        assert k.type == Data.STRING, f"application property key {key!r} is a {k.type_name}"
    return {key: v for key, (_, v) in props.items()}


def correlation_id(received):
    props = received.message.properties()
    assert props is not None and "correlation-id" in props, (
        f"no correlation-id; properties: {props!r}")
    return props["correlation-id"]


def tags_are_16_bytes(client, link, count):
    """The first transfer frame of each of the first `count` deliveries on `link` carries a
    16-byte tag (read from the raw frames)."""
    tags = client.transfer_tags(link)
    assert len(tags) >= count, f"expected {count} tagged transfers on the link, saw {len(tags)}"
    for t in tags[:count]:
        assert len(t) == TAG_LEN, f"delivery tag {t.hex()} is {len(t)} bytes, not {TAG_LEN}"
    return tags


def every_transfer_tagged(client):
    """Every delivery the hub started on this connection (a transfer frame that does not
    continue a multi-frame delivery) carries a 16-byte delivery tag. Returns how many."""
    continuing = set()
    seen = 0
    for f in client.inbound.performatives(TRANSFER):
        fields = f.performative[1]
        handle = int(fields[0].value)
        more = len(fields) > 5 and fields[5].type == Data.BOOL and fields[5].value
        if handle not in continuing:
            assert len(fields) > 2 and fields[2].type == Data.BINARY, (
                f"a delivery's first transfer on handle {handle} has no delivery tag: {fields!r}")
            tag = bytes(fields[2].value)
            assert len(tag) == TAG_LEN, (
                f"delivery tag {tag.hex()} on handle {handle} is {len(tag)} bytes, not {TAG_LEN}")
            seen += 1
        if more:
            continuing.add(handle)
        else:
            continuing.discard(handle)
    return seen
