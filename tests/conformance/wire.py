"""A small AMQP 1.0 client built on the Qpid Proton engine, driven by hand over a TLS socket.

Everything the hub sends is kept twice: as raw frames (split from the decrypted byte stream
here, independently of Proton, with their arrival times) and as raw delivery payloads, which
`sections` decodes section by section with Proton's codec. Nothing relies on
`proton.Message`, whose convenience decoding hides the difference between no body, an
`amqp-value` null and an empty `data` section.
"""

import base64
import hashlib
import hmac
import select
import socket
import ssl
import time
import urllib.parse
import uuid

from proton import Collector, Connection, Data, Endpoint, Event, Transport, symbol

IOTHUB_HOST = "test-hub.azure-devices.net"

# Message section descriptors (AMQP 1.0, part 3.2).
HEADER = 0x70
DELIVERY_ANNOTATIONS = 0x71
MESSAGE_ANNOTATIONS = 0x72
PROPERTIES = 0x73
APPLICATION_PROPERTIES = 0x74
DATA = 0x75
AMQP_SEQUENCE = 0x76
AMQP_VALUE = 0x77
FOOTER = 0x78

# Performative descriptors (AMQP 1.0, part 2.7).
OPEN = 0x10
BEGIN = 0x11
ATTACH = 0x12
TRANSFER = 0x14
DISPOSITION = 0x15
CLOSE = 0x18

# Outcome descriptors (AMQP 1.0, part 3.4).
OUTCOMES = {0x24: "accepted", 0x25: "rejected", 0x26: "released", 0x27: "modified"}

# Proton's type codes by name, for messages that say what was found.
TYPE_NAMES = {getattr(Data, n): n.lower() for n in (
    "NULL", "BOOL", "UBYTE", "BYTE", "USHORT", "SHORT", "UINT", "INT", "CHAR", "ULONG", "LONG",
    "TIMESTAMP", "FLOAT", "DOUBLE", "DECIMAL32", "DECIMAL64", "DECIMAL128", "UUID", "BINARY",
    "STRING", "SYMBOL", "DESCRIBED", "ARRAY", "LIST", "MAP")}

PROPERTY_FIELDS = ("message-id", "user-id", "to", "subject", "reply-to", "correlation-id",
                   "content-type", "content-encoding", "absolute-expiry-time", "creation-time",
                   "group-id", "group-sequence", "reply-to-group-id")


class Typed:
    """A decoded AMQP value with its AMQP type (one of Proton's `Data` type codes)."""

    def __init__(self, type_code, value):
        self.type = type_code
        self.value = value

    @property
    def type_name(self):
        return TYPE_NAMES.get(self.type, str(self.type))

    def __repr__(self):
        return f"{self.type_name}:{self.value!r}"


def _read(d):
    """Reads the current node of `d` as a Typed value; maps become dicts of Typed to Typed."""
    t = d.type()
    if t == Data.MAP:
        n = d.get_map()
        d.enter()
        out = {}
        for _ in range(n // 2):
            d.next()
            k = _read(d)
            d.next()
            v = _read(d)
            out[(k.type, k.value)] = (k, v)
        d.exit()
        return Typed(t, out)
    if t == Data.LIST:
        n = d.get_list()
        d.enter()
        items = []
        for _ in range(n):
            d.next()
            items.append(_read(d))
        d.exit()
        return Typed(t, items)
    if t == Data.DESCRIBED:
        d.enter()
        d.next()
        desc = _read(d)
        d.next()
        inner = _read(d)
        d.exit()
        return Typed(t, (desc, inner))
    return Typed(t, d.get_object())


def decode_one(raw):
    """Decodes the first AMQP value of `raw`; returns (Typed, bytes consumed)."""
    d = Data()
    n = d.decode(raw)
    d.rewind()
    d.next()
    return _read(d), n


class Section:
    def __init__(self, code, value, raw):
        self.code = code
        self.value = value  # Typed
        self.raw = raw  # the section's encoded bytes

    def __repr__(self):
        return f"Section(0x{self.code:02x}, {self.value!r})"


def sections(raw):
    """Splits an encoded message into its described sections, in order."""
    out = []
    pos = 0
    while pos < len(raw):
        value, n = decode_one(raw[pos:])
        assert value.type == Data.DESCRIBED, f"section at byte {pos} is not described: {value!r}"
        desc, inner = value.value
        assert desc.type == Data.ULONG, f"section descriptor is not a ulong code: {desc!r}"
        out.append(Section(int(desc.value), inner, raw[pos:pos + n]))
        pos += n
    return out


class Decoded:
    """An encoded message split into sections, with typed lookups."""

    def __init__(self, raw):
        self.raw = raw
        self.sections = sections(raw)

    def of(self, code):
        return [s for s in self.sections if s.code == code]

    def _map(self, code):
        found = self.of(code)
        assert len(found) <= 1, f"section 0x{code:02x} appears {len(found)} times"
        if not found:
            return None
        assert found[0].value.type == Data.MAP, f"section 0x{code:02x} is not a map"
        return found[0].value.value

    def annotations(self):
        """Message annotations: {key text: (key Typed, value Typed)}, or None when absent."""
        m = self._map(MESSAGE_ANNOTATIONS)
        return None if m is None else {str(k.value): (k, v) for k, v in m.values()}

    def application_properties(self):
        m = self._map(APPLICATION_PROPERTIES)
        return None if m is None else {str(k.value): (k, v) for k, v in m.values()}

    def properties(self):
        """The properties section as {field name: Typed} (null fields left out), or None."""
        found = self.of(PROPERTIES)
        assert len(found) <= 1, f"properties section appears {len(found)} times"
        if not found:
            return None
        assert found[0].value.type == Data.LIST, "properties is not a list"
        return {PROPERTY_FIELDS[i]: v for i, v in enumerate(found[0].value.value)
                if v.type != Data.NULL}

    def body_sections(self):
        return [s for s in self.sections if s.code in (DATA, AMQP_SEQUENCE, AMQP_VALUE)]

    def describe_body(self):
        return [(f"0x{s.code:02x}", s.value) for s in self.body_sections()]


def encode_message(*, properties=None, annotations=None, app_properties=None, data=None,
                   value=None):
    """Encodes a message section by section. `properties`: {field name: (put method, value)};
    `annotations`: {symbol key: str}; `app_properties`: {str: value}; body: `data` bytes (one
    data section) or `value` (an amqp-value string)."""
    d = Data()

    def described(code, fill):
        d.put_described()
        d.enter()
        d.put_ulong(code)
        fill()
        d.exit()

    if annotations is not None:
        described(MESSAGE_ANNOTATIONS, lambda: d.put_dict({symbol(k): v for k, v in annotations.items()}))
    if properties is not None:
        def fill_props():
            d.put_list()
            d.enter()
            last = max(PROPERTY_FIELDS.index(k) for k in properties)
            for name in PROPERTY_FIELDS[:last + 1]:
                if name in properties:
                    put, v = properties[name]
                    getattr(d, put)(v)
                else:
                    d.put_null()
            d.exit()
        described(PROPERTIES, fill_props)
    if app_properties is not None:
        described(APPLICATION_PROPERTIES, lambda: d.put_dict(app_properties))
    if data is not None:
        described(DATA, lambda: d.put_binary(data))
    if value is not None:
        described(AMQP_VALUE, lambda: d.put_string(value))
    return d.encode()


def sas_token(resource, key_b64, expiry, skn=None):
    sr = urllib.parse.quote(resource, safe="")
    mac = hmac.new(base64.b64decode(key_b64), f"{sr}\n{expiry}".encode(), hashlib.sha256)
    sig = urllib.parse.quote(base64.b64encode(mac.digest()).decode(), safe="")
    token = f"SharedAccessSignature sr={sr}&sig={sig}&se={expiry}"
    if skn:
        token += f"&skn={urllib.parse.quote(skn, safe='')}"
    return token


class Frame:
    def __init__(self, at, raw):
        self.at = at  # time.monotonic() when its last byte arrived
        self.raw = raw

    @property
    def channel(self):
        return int.from_bytes(self.raw[6:8], "big")

    @property
    def empty(self):
        """An empty frame (a keep-alive): the 8-byte header and nothing else."""
        doff = self.raw[4] * 4
        return len(self.raw) == doff

    @property
    def performative(self):
        """(descriptor code, fields as a list of Typed), or None for an empty frame."""
        if self.empty:
            return None
        value, _ = decode_one(self.raw[self.raw[4] * 4:])
        desc, fields = value.value
        return int(desc.value), fields.value


class FrameLog:
    """Splits one direction of the AMQP byte stream into frames, timestamped on arrival."""

    def __init__(self):
        self.buf = b""
        self.header = None
        self.frames = []

    def feed(self, data, at):
        self.buf += data
        while True:
            if self.header is None:
                if len(self.buf) < 8:
                    return
                self.header, self.buf = self.buf[:8], self.buf[8:]
                continue
            if len(self.buf) < 8:
                return
            size = int.from_bytes(self.buf[:4], "big")
            if len(self.buf) < size:
                return
            self.frames.append(Frame(at, self.buf[:size]))
            self.buf = self.buf[size:]

    def performatives(self, code):
        return [f for f in self.frames if not f.empty and f.performative[0] == code]


class Received:
    """One delivery the hub sent, as it arrived. `tag` is the tag as Proton reports it, used
    to settle; the exact tag bytes are read from the raw frames (`Client.transfer_tags`)."""

    def __init__(self, link_name, tag, settled, raw):
        self.link_name = link_name
        self.tag = tag
        self.settled = settled
        self.raw = raw
        self.message = Decoded(raw)


class HubError(AssertionError):
    pass


# SASL frames (AMQP 1.0, part 5.3): frame type 1, these descriptors.
SASL_MECHANISMS = 0x40
SASL_INIT = 0x41
SASL_OUTCOME = 0x44
SASL_HEADER = b"AMQP\x03\x01\x00\x00"


class SaslRefused(HubError):
    def __init__(self, code, offered):
        super().__init__(f"SASL outcome code {code} (offered {offered})")
        self.code = code
        self.offered = offered


def _read_frame(sock, buf, deadline):
    """Reads one whole frame from a blocking socket; returns (frame bytes, leftover)."""
    while len(buf) < 4 or len(buf) < int.from_bytes(buf[:4], "big"):
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        data = sock.recv(65536)
        if not data:
            raise HubError("the hub closed the connection during SASL")
        buf += data
    size = int.from_bytes(buf[:4], "big")
    return buf[:size], buf[size:]


def sasl_exchange(sock, mechanism, initial_response, timeout=10.0):
    """The SASL layer written and read frame by frame (Proton's SASL layer chooses mechanisms
    itself): the SASL header, the hub's sasl-mechanisms, our sasl-init naming `mechanism`
    (with `initial_response` bytes, or none), the hub's sasl-outcome. Returns (the offered
    mechanisms, the outcome code, the frames the hub sent)."""
    deadline = time.monotonic() + timeout
    sock.sendall(SASL_HEADER)
    buf = b""
    while len(buf) < 8:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        data = sock.recv(8 - len(buf))
        if not data:
            raise HubError("the hub closed the connection before its SASL header")
        buf += data
    assert buf == SASL_HEADER, f"the hub answered the SASL header with {buf!r}"
    frames = []
    frame, rest = _read_frame(sock, b"", deadline)
    frames.append(frame)
    assert frame[5] == 1, f"frame type {frame[5]}, not SASL (1)"
    value, _ = decode_one(frame[frame[4] * 4:])
    desc, fields = value.value
    assert int(desc.value) == SASL_MECHANISMS, f"expected sasl-mechanisms, got {desc!r}"
    mechs = fields.value[0]
    offered = ([str(m) for m in mechs.value.elements] if mechs.type == Data.ARRAY
               else [str(mechs.value)])
    d = Data()
    d.put_described()
    d.enter()
    d.put_ulong(SASL_INIT)
    d.put_list()
    d.enter()
    d.put_symbol(symbol(mechanism))
    if initial_response is None:
        d.put_null()
    else:
        d.put_binary(initial_response)
    d.exit()
    d.exit()
    body = d.encode()
    sock.sendall((8 + len(body)).to_bytes(4, "big") + bytes([2, 1, 0, 0]) + body)
    frame, rest = _read_frame(sock, rest, deadline)
    frames.append(frame)
    value, _ = decode_one(frame[frame[4] * 4:])
    desc, fields = value.value
    assert int(desc.value) == SASL_OUTCOME, f"expected sasl-outcome, got {desc!r}"
    assert rest == b"", f"the hub sent {rest!r} after its sasl-outcome, before our AMQP header"
    return offered, int(fields.value[0].value), frames


class Client:
    """One AMQP connection to the hub: no SASL layer (as the Node and C# SDKs connect), TLS
    verified against the hub's edge CA. `cert`: (certificate file, key file) presented as the
    TLS client certificate. `sasl`: (mechanism, initial response or None) negotiated by
    `sasl_exchange` before the AMQP header; `SaslRefused` when the outcome is not ok."""

    def __init__(self, host, ca_path, idle_timeout=None, connect_timeout=10.0, cert=None,
                 sasl=None):
        ctx = ssl.create_default_context(cafile=ca_path)
        if cert is not None:
            ctx.load_cert_chain(*cert)
        raw = socket.create_connection((host, 5671), timeout=connect_timeout)
        self.sock = ctx.wrap_socket(raw, server_hostname=host)
        self.sasl_offered = None
        if sasl is not None:
            try:
                self.sasl_offered, code, _ = sasl_exchange(self.sock, *sasl,
                                                           timeout=connect_timeout)
            except BaseException:
                self.sock.close()
                raise
            if code != 0:
                self.sock.close()
                raise SaslRefused(code, self.sasl_offered)
        self.sock.setblocking(False)
        self.inbound = FrameLog()
        self.outbound = FrameLog()
        self.eof = False
        self.received = {}  # link name -> [Received]
        self._unsettled = {}  # (link name, tag) -> proton Delivery still to settle
        self.conn = Connection()
        self.collector = Collector()
        self.conn.collect(self.collector)
        self.transport = Transport()
        if idle_timeout is not None:
            # Proton announces half of the idle time-out it is given.
            self.transport.idle_timeout = idle_timeout
        self.transport.bind(self.conn)
        self.conn.container = str(uuid.uuid4())
        self.conn.hostname = host
        self.conn.open()
        self.session = self.conn.session()
        self.session.open()
        self.wait(lambda: self.conn.state & Endpoint.REMOTE_ACTIVE, 10, "the hub's open")

    # -- driving the engine ----------------------------------------------------------------

    def _flush(self):
        while True:
            n = self.transport.pending()
            if n <= 0:
                return
            data = self.transport.peek(n)
            self.outbound.feed(data, time.monotonic())
            view = memoryview(data)
            while view:
                try:
                    sent = self.sock.send(view)
                except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
                    select.select([], [self.sock], [], 1.0)
                    continue
                view = view[sent:]
            self.transport.pop(n)

    def _events(self):
        while True:
            ev = self.collector.peek()
            if ev is None:
                return
            if ev.type == Event.DELIVERY:
                dlv = ev.delivery
                link = dlv.link
                if link.is_receiver and dlv.readable and not dlv.partial:
                    raw = link.recv(dlv.pending) or b""
                    tag = dlv.tag
                    self.received.setdefault(link.name, []).append(
                        Received(link.name, tag, dlv.settled, raw))
                    link.advance()
                    if dlv.settled:
                        dlv.settle()
                    else:
                        self._unsettled[(link.name, tag)] = dlv
            self.collector.pop()

    def pump(self, timeout):
        """Moves bytes both ways once, waiting at most `timeout` seconds for input."""
        self._events()
        deadline = self.transport.tick(time.monotonic())
        self._flush()
        wait = timeout
        if deadline:
            wait = max(0.0, min(wait, deadline - time.monotonic()))
        if self.eof:
            return
        if self.sock.pending() == 0:
            select.select([self.sock], [], [], wait)
        while True:
            try:
                data = self.sock.recv(65536)
            except (ssl.SSLWantReadError, BlockingIOError):
                break
            except (ConnectionError, OSError):
                data = b""
            if not data:
                self.eof = True
                self.transport.close_tail()
                break
            now = time.monotonic()
            self.inbound.feed(data, now)
            pos = 0
            while pos < len(data):
                cap = self.transport.capacity()
                if cap <= 0:
                    self._events()
                    self._flush()
                    cap = self.transport.capacity()
                    if cap <= 0:
                        raise HubError("the Proton transport stopped taking input")
                self.transport.push(data[pos:pos + cap])
                pos += cap
            if self.sock.pending() == 0:
                break
        self.transport.tick(time.monotonic())
        self._events()
        self._flush()

    def wait(self, predicate, timeout, what):
        end = time.monotonic() + timeout
        while True:
            self.pump(0)
            result = predicate()
            if result:
                return result
            left = end - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
            if self.eof:
                raise HubError(f"the hub closed the connection while waiting for {what}")
            self.pump(min(left, 0.5))

    def run_for(self, seconds):
        """Keeps the connection going for `seconds` (measuring, not synchronising)."""
        end = time.monotonic() + seconds
        while not self.eof:
            left = end - time.monotonic()
            if left <= 0:
                return
            self.pump(min(left, 0.5))

    def close(self):
        try:
            if not self.eof:
                self.conn.close()
                end = time.monotonic() + 5
                while not self.eof and time.monotonic() < end and not (
                        self.conn.state & Endpoint.REMOTE_CLOSED):
                    self.pump(0.2)
        finally:
            try:
                self.sock.close()
            except OSError:
                pass

    # -- links -----------------------------------------------------------------------------

    def sender(self, address, snd_settled=False, properties=None):
        s = self.session.sender(f"snd-{uuid.uuid4()}")
        s.target.address = address
        if snd_settled:
            s.snd_settle_mode = s.SND_SETTLED
        if properties:
            s.properties = {symbol(k): v for k, v in properties.items()}
        s.open()
        self.wait(lambda: s.state & (Endpoint.REMOTE_ACTIVE | Endpoint.REMOTE_CLOSED), 10,
                  f"attach of sender {address}")
        return s

    def receiver(self, address, credit=100, properties=None, snd_settle_mode=None):
        """A receiving link; `snd_settle_mode` (0 unsettled, 1 settled, 2 mixed) is what this
        client asks of the hub as sender (Proton's default asks mixed)."""
        r = self.session.receiver(f"rcv-{uuid.uuid4()}")
        r.source.address = address
        if snd_settle_mode is not None:
            r.snd_settle_mode = snd_settle_mode
        if properties:
            r.properties = {symbol(k): v for k, v in properties.items()}
        r.open()
        self.wait(lambda: r.state & (Endpoint.REMOTE_ACTIVE | Endpoint.REMOTE_CLOSED), 10,
                  f"attach of receiver {address}")
        r.flow(credit)
        self.pump(0)
        return r

    def send(self, sender, payload, settled=False):
        dlv = sender.delivery(uuid.uuid4().hex)
        sender.send(payload)
        sender.advance()
        if settled:
            dlv.settle()
        self.pump(0)
        return dlv

    def outcome(self, dlv, timeout, what):
        """Waits for the hub's outcome of a delivery we sent; returns it (e.g. ACCEPTED)."""
        self.wait(lambda: dlv.remote_state, timeout, what)
        return dlv.remote_state

    def deliveries(self, link):
        return self.received.get(link.name, [])

    def next_delivery(self, link, seen, timeout, what):
        """Waits for the delivery after the first `seen` ones on `link`."""
        self.wait(lambda: len(self.deliveries(link)) > seen, timeout, what)
        return self.deliveries(link)[seen]

    def accept(self, received):
        dlv = self._unsettled.pop((received.link_name, received.tag), None)
        if dlv is not None:
            dlv.update(dlv.ACCEPTED)
            dlv.settle()
            self.pump(0)

    def dispose(self, received, state, settle=False):
        """Gives the hub an outcome (e.g. `Delivery.RELEASED`) for a delivery it sent;
        unsettled unless `settle`, as the C# SDK's complete/abandon/reject. Returns the Proton
        delivery."""
        dlv = self._unsettled.pop((received.link_name, received.tag))
        dlv.update(state)
        if settle:
            dlv.settle()
        self.pump(0)
        return dlv

    def dispose_range(self, link, received, outcome_code):
        """Gives one outcome (descriptor code, e.g. 0x26 released) for several deliveries the hub
        sent, unsettled, in one disposition frame covering their delivery ids `first`..`last`
        (Proton sends one frame per delivery, so this frame is encoded here and written to
        the socket between Proton's frames). Returns (first, last)."""
        ids = sorted(self.delivery_id(link, r) for r in received)
        first, last = ids[0], ids[-1]
        assert ids == list(range(first, last + 1)), f"delivery ids not contiguous: {ids}"
        for r in received:
            self._unsettled.pop((r.link_name, r.tag))
        d = Data()
        d.put_described()
        d.enter()
        d.put_ulong(0x15)
        d.put_list()
        d.enter()
        d.put_bool(True)  # role receiver
        d.put_uint(first)
        d.put_uint(last)
        d.put_bool(False)  # unsettled
        d.put_described()
        d.enter()
        d.put_ulong(outcome_code)
        d.put_list()
        d.exit()
        d.exit()
        d.exit()
        body = d.encode()
        channel = self.outbound.performatives(BEGIN)[0].channel
        frame = (8 + len(body)).to_bytes(4, "big") + bytes([2, 0]) + channel.to_bytes(2, "big") + body
        self._flush()
        self.send_raw(frame)
        return first, last

    def send_raw(self, data):
        """Writes bytes to the socket as they are (logged as outbound)."""
        self.outbound.feed(data, time.monotonic())
        view = memoryview(data)
        while view:
            try:
                sent = self.sock.send(view)
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
                select.select([], [self.sock], [], 1.0)
                continue
            view = view[sent:]

    def delivery_id(self, link, r):
        """The delivery-id of `r` on `link`, from the hub's transfer frames (in the same order
        as Proton's deliveries)."""
        transfers, received = self.hub_transfers(link), self.deliveries(link)
        return transfers[received.index(r)]["id"]

    def hub_attach(self, link):
        """The fields of the hub's attach answering `link` (matched by link name)."""
        for f in self.inbound.performatives(ATTACH):
            fields = f.performative[1]
            if fields[0].value == link.name:
                return fields
        raise AssertionError(f"no attach from the hub for link {link.name}")

    def hub_channel(self):
        """The hub's channel for this client's session (its begin names ours as remote)."""
        ours = self.outbound.performatives(BEGIN)[0].channel
        for f in self.inbound.performatives(BEGIN):
            fields = f.performative[1]
            if fields and fields[0].type != Data.NULL and int(fields[0].value) == ours:
                return f.channel
        raise AssertionError(f"no begin from the hub answering channel {ours}")

    def _link_transfers(self, link):
        """The hub's transfer frames on `link`: those on its handle between the hub's attach
        for this link and the next attach reusing the handle (handles are reused after a
        detach). Returns their field lists in order."""
        current = {}  # handle -> link name
        out = []
        for f in self.inbound.frames:
            if f.empty:
                continue
            code, fields = f.performative
            if code == ATTACH:
                current[int(fields[1].value)] = fields[0].value
            elif code == TRANSFER and current.get(int(fields[0].value)) == link.name:
                out.append(fields)
        return out

    def hub_transfers(self, link):
        """The first transfer frame of each delivery the hub sent on `link`, as dicts with
        `id` (delivery-id), `tag` (bytes) and `settled` (the frame's settled flag), in order."""
        out = []
        for fields in self._link_transfers(link):
            if len(fields) > 1 and fields[1].type != Data.NULL:
                settled = len(fields) > 4 and fields[4].type == Data.BOOL and fields[4].value
                out.append({"id": int(fields[1].value), "tag": bytes(fields[2].value),
                            "settled": bool(settled)})
        return out

    def dispositions(self, log, role_receiver):
        """Disposition frames in `log` (self.inbound or self.outbound) with the given role, as
        dicts: channel, first, last (None when absent), settled, state (outcome name or None)."""
        out = []
        for f in log.performatives(DISPOSITION):
            fields = f.performative[1]
            if bool(fields[0].value) != role_receiver:
                continue

            def field(i):
                return fields[i] if len(fields) > i and fields[i].type != Data.NULL else None
            last, settled, state = field(2), field(3), field(4)
            name = None
            if state is not None:
                desc = state.value[0]
                name = OUTCOMES.get(desc.value, str(desc.value)) if desc.type == Data.ULONG else str(desc.value)
            out.append({"channel": f.channel, "first": int(fields[1].value),
                        "last": None if last is None else int(last.value),
                        "settled": bool(settled.value) if settled is not None else False,
                        "state": name, "at": f.at})
        return out

    def transfer_tags(self, link):
        """The delivery tags of the hub's transfer frames on `link`, read from the raw frames
        (the first frame of each delivery carries it; continuation frames may omit it)."""
        return [bytes(fields[2].value) for fields in self._link_transfers(link)
                if len(fields) > 2 and fields[2].type != Data.NULL]

    def link_open(self, link):
        return bool(link.state & Endpoint.REMOTE_ACTIVE) and not (
            link.state & Endpoint.REMOTE_CLOSED)

    # -- $cbs ------------------------------------------------------------------------------

    def cbs(self):
        if not hasattr(self, "_cbs"):
            tx = self.sender("$cbs")
            rx = self.receiver("$cbs")
            self._cbs = (tx, rx)
        return self._cbs

    def put_token(self, token, audience, message_id=None, timeout=10):
        """Sends one put-token; returns (request message-id, the reply as Received)."""
        tx, rx = self.cbs()
        message_id = message_id if message_id is not None else str(uuid.uuid4())
        put = "put_uuid" if isinstance(message_id, uuid.UUID) else "put_string"
        payload = encode_message(
            properties={"message-id": (put, message_id), "to": ("put_string", "$cbs"),
                        "reply-to": ("put_string", "cbs")},
            app_properties={"operation": "put-token", "type": "servicebus.windows.net:sastoken",
                            "name": audience},
            value=token)
        seen = len(self.deliveries(rx))
        self.send(tx, payload)
        reply = self.next_delivery(rx, seen, timeout, "the put-token reply")
        self.accept(reply)
        return message_id, reply

    def authenticate(self, device, module, key, expiry=None):
        resource = f"{IOTHUB_HOST}/devices/{device}/modules/{module}"
        expiry = expiry or int(time.time()) + 3600
        _, reply = self.put_token(sas_token(resource, key, expiry),
                                  urllib.parse.quote(resource, safe=""))
        status = reply.message.application_properties()["status-code"][1].value
        if status != 200:
            raise HubError(f"put-token for {device}/{module} answered {status}")
