"""A fake parent (IoT Hub, or a parent edge hub) for a child hub's upstream connection.

It listens with TLS on its own loopback address (a CA and a server certificate for that IP are
made with the `openssl` CLI), speaks AMQP without SASL as the child opens it, and answers what
the child needs to stay connected: every session and link is accepted (source and target
echoed, credit granted), `$cbs` put-tokens get `status-code` 200, twin requests get a status
(GET a twin document), telemetry is accepted and settled. A background thread drives Qpid
Proton's engine; everything the child sends is also split into frames here (with arrival
times) and each delivery is rebuilt from its transfer frames, so the checks read what was on
the wire, not what Proton makes of it.
"""

import json
import os
import select
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import uuid

from proton import Collector, Connection, Data, Endpoint, Event, Transport, int32, symbol

from wire import ATTACH, OPEN, TRANSFER, Decoded, FrameLog, decode_one, encode_message

# How long the parent gives Proton as its idle time-out: Proton announces half of it.
ANNOUNCED_IDLE_MS = 10_000


def make_certs(directory, ip):
    """A CA and a server certificate for `ip` (IP SAN, as rustls checks an IP host name against
    IP SANs only). Returns (ca.pem, server.pem, server.key)."""
    def run(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=30)

    ca_key, ca = os.path.join(directory, "ca.key"), os.path.join(directory, "ca.pem")
    key, csr = os.path.join(directory, "server.key"), os.path.join(directory, "server.csr")
    cert, ext = os.path.join(directory, "server.pem"), os.path.join(directory, "server.ext")
    run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", ca_key, "-out", ca, "-days", "2", "-subj", "/CN=fake parent test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    run("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", key, "-out", csr, "-subj", f"/CN={ip}")
    with open(ext, "w") as f:
        f.write(f"basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
                f"extendedKeyUsage=serverAuth\nsubjectAltName=IP:{ip}\n")
    run("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
        "-out", cert, "-days", "2", "-extfile", ext)
    return ca, cert, key


class Delivery:
    """One delivery the child sent, rebuilt from its transfer frames."""

    def __init__(self, link, delivery_id, tag, settled, at):
        self.link = link  # ChildLink
        self.id = delivery_id
        self.tag = tag
        self.settled = settled  # the first transfer frame's settled flag
        self.at = at
        self.raw = b""
        self.complete = False
        self._message = None

    @property
    def message(self):
        if self._message is None:
            self._message = Decoded(self.raw)
        return self._message


class ChildLink:
    """A link as the child attached it (from its attach frame)."""

    def __init__(self, channel, handle, name, sender, source, target, fields):
        self.channel = channel
        self.handle = handle
        self.name = name
        self.sender = sender  # True: the child sends on it
        self.source = source
        self.target = target
        self.fields = fields
        self.deliveries = []

    @property
    def address(self):
        return self.target if self.sender else self.source


def _terminus_address(t):
    if t.type != Data.DESCRIBED:
        return None
    fields = t.value[1].value
    if not fields or fields[0].type == Data.NULL:
        return None
    return str(fields[0].value)


class Wire:
    """The child's frames on one connection: links by (channel, handle), deliveries rebuilt."""

    def __init__(self):
        self.inbound = FrameLog()  # child -> parent
        self.outbound = FrameLog()  # parent -> child
        self.links = []
        self._current = {}  # (channel, handle) -> ChildLink
        self._partial = {}  # (channel, handle) -> Delivery
        self._parsed = 0

    def parse(self):
        frames = self.inbound.frames
        while self._parsed < len(frames):
            f = frames[self._parsed]
            self._parsed += 1
            if f.empty:
                continue
            doff = f.raw[4] * 4
            value, n = decode_one(f.raw[doff:])
            code, fields = int(value.value[0].value), value.value[1].value
            if code == ATTACH:
                link = ChildLink(f.channel, int(fields[1].value), str(fields[0].value),
                                 not fields[2].value,
                                 _terminus_address(fields[5]) if len(fields) > 5 else None,
                                 _terminus_address(fields[6]) if len(fields) > 6 else None,
                                 fields)
                self.links.append(link)
                self._current[(f.channel, link.handle)] = link
            elif code == TRANSFER:
                key = (f.channel, int(fields[0].value))
                link = self._current.get(key)
                payload = f.raw[doff + n:]
                more = len(fields) > 5 and fields[5].type == Data.BOOL and fields[5].value
                d = self._partial.pop(key, None)
                if d is None:
                    settled = len(fields) > 4 and fields[4].type == Data.BOOL and fields[4].value
                    tag = bytes(fields[2].value) if len(fields) > 2 and fields[2].type == Data.BINARY else None
                    did = int(fields[1].value) if len(fields) > 1 and fields[1].type != Data.NULL else None
                    d = Delivery(link, did, tag, bool(settled), f.at)
                d.raw += payload
                if more:
                    self._partial[key] = d
                else:
                    d.complete = True
                    if link is not None:
                        link.deliveries.append(d)


class ParentConnection:
    """One accepted connection from the child."""

    def __init__(self, sock, container):
        self.sock = sock
        self.wire = Wire()
        self.eof = False
        self.conn = Connection()
        self.collector = Collector()
        self.conn.collect(self.collector)
        self.transport = Transport(Transport.SERVER)
        # Proton announces half of the idle time-out it is given.
        self.transport.idle_timeout = 2 * ANNOUNCED_IDLE_MS / 1000
        self.transport.bind(self.conn)
        self.conn.container = container
        self.conn.open()
        self.twin_docs = {}  # twin address -> twin document served on GET
        self.method_responses = []


class FakeParent:
    def __init__(self, host, twin=None):
        self.host = host
        self.port = 5671
        self.dir = tempfile.mkdtemp(prefix="edgehub-fake-parent-")
        self.ca_path, cert, key = make_certs(self.dir, host)
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(cert, key)
        self.twin = twin or {"desired": {"$version": 1}, "reported": {"$version": 1}}
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((host, self.port))
        self.listener.listen(8)
        self.listener.setblocking(False)
        self.connections = []
        self.errors = []
        self.lock = threading.Condition()
        self._stop = False
        self._calls = []  # functions to run on the engine thread
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    # -- the engine thread -----------------------------------------------------------------

    def _run(self):
        try:
            while True:
                with self.lock:
                    if self._stop:
                        return
                    live = [c for c in self.connections if not c.eof]
                socks = [self.listener] + [c.sock for c in live]
                pending = [c for c in live if c.sock.pending()]
                if not pending:
                    readable, _, _ = select.select(socks, [], [], 0.05)
                else:
                    readable = [c.sock for c in pending]
                with self.lock:
                    if self.listener in readable:
                        self._accept()
                    for c in live:
                        self._pump(c, c.sock in readable)
                    calls, self._calls = self._calls, []
                    for fn, done in calls:
                        try:
                            done.append(("ok", fn()))
                        except Exception as e:  # handed to the waiting test
                            done.append(("error", e))
                    for c in live:
                        self._events(c)
                        self._flush(c)
                    self.lock.notify_all()
        except Exception as e:  # pragma: no cover - reported by wait()
            with self.lock:
                self.errors.append(repr(e))
                self.lock.notify_all()

    def _accept(self):
        try:
            raw, _ = self.listener.accept()
        except BlockingIOError:
            return
        raw.setblocking(True)
        raw.settimeout(10)
        try:
            sock = self.ctx.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError) as e:
            self.errors.append(f"TLS accept: {e!r}")
            raw.close()
            return
        sock.setblocking(False)
        self.connections.append(ParentConnection(sock, f"fake-parent-{uuid.uuid4()}"))

    def _pump(self, c, readable):
        if readable:
            while True:
                try:
                    data = c.sock.recv(65536)
                except (ssl.SSLWantReadError, BlockingIOError):
                    break
                except (ConnectionError, OSError):
                    data = b""
                if not data:
                    c.eof = True
                    c.transport.close_tail()
                    break
                c.wire.inbound.feed(data, time.monotonic())
                pos = 0
                while pos < len(data):
                    cap = c.transport.capacity()
                    if cap <= 0:
                        self._events(c)
                        self._flush(c)
                        cap = c.transport.capacity()
                        if cap <= 0:
                            c.eof = True
                            break
                    c.transport.push(data[pos:pos + cap])
                    pos += cap
                if c.sock.pending() == 0:
                    break
            c.wire.parse()
        c.transport.tick(time.monotonic())
        self._events(c)
        self._flush(c)

    def _flush(self, c):
        if c.eof:
            return
        while True:
            n = c.transport.pending()
            if n <= 0:
                return
            data = c.transport.peek(n)
            c.wire.outbound.feed(data, time.monotonic())
            view = memoryview(data)
            while view:
                try:
                    sent = c.sock.send(view)
                except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
                    select.select([], [c.sock], [], 1.0)
                    continue
                except OSError:
                    c.eof = True
                    return
                view = view[sent:]
            c.transport.pop(n)

    def _events(self, c):
        while True:
            ev = c.collector.peek()
            if ev is None:
                return
            t = ev.type
            if t == Event.SESSION_REMOTE_OPEN and ev.session.state & Endpoint.LOCAL_UNINIT:
                ev.session.open()
            elif t == Event.LINK_REMOTE_OPEN and ev.link.state & Endpoint.LOCAL_UNINIT:
                link = ev.link
                link.source.copy(link.remote_source)
                link.target.copy(link.remote_target)
                link.open()
                if link.is_receiver:
                    link.flow(1000)
            elif t == Event.DELIVERY:
                dlv = ev.delivery
                link = dlv.link
                if link.is_receiver and dlv.readable and not dlv.partial:
                    raw = link.recv(dlv.pending) or b""
                    link.advance()
                    self._answer(c, link, raw)
                    if not dlv.settled:
                        dlv.update(dlv.ACCEPTED)
                    dlv.settle()
                elif link.is_sender and dlv.remote_state:
                    dlv.settle()
            c.collector.pop()

    # -- answers ---------------------------------------------------------------------------

    def _reply_link(self, c, receiver, address):
        """The parent's sender in `receiver`'s session whose (the child's) source is `address`."""
        link = c.conn.link_head(Endpoint.LOCAL_ACTIVE)
        while link:
            if (link.is_sender and link.session == receiver.session
                    and link.remote_source.address == address):
                return link
            link = link.next(Endpoint.LOCAL_ACTIVE)
        return None

    def _send(self, link, payload):
        dlv = link.delivery(uuid.uuid4().hex)
        link.send(payload)
        link.advance()
        dlv.settle()

    def _answer(self, c, link, raw):
        address = link.remote_target.address or ""
        try:
            msg = Decoded(raw)
        except Exception:  # not decodable: nothing to answer
            return
        props = msg.properties() or {}
        if address == "$cbs" or address.endswith("/$cbs"):
            mid = props.get("message-id")
            reply = self._reply_link(c, link, "$cbs")
            if mid is None or reply is None:
                return
            put = "put_uuid" if mid.type == Data.UUID else "put_string"
            self._send(reply, encode_message(
                properties={"correlation-id": (put, mid.value)},
                app_properties={"status-code": int32(200), "status-description": "OK"},
                data=b""))
        elif address.endswith("/twin"):
            cid = props.get("correlation-id")
            ann = msg.annotations() or {}
            op = str(ann["operation"][1].value) if "operation" in ann else ""
            reply = self._reply_link(c, link, address)
            if cid is None or reply is None:
                return
            status, body = {"GET": (200, json.dumps(self.twin).encode()),
                            "PATCH": (204, b""), "PUT": (200, b""),
                            "DELETE": (200, b"")}.get(op, (400, b'{"message":"bad"}'))
            puts = {Data.STRING: "put_string", Data.UUID: "put_uuid", Data.ULONG: "put_ulong",
                    Data.BINARY: "put_binary"}
            self._send(reply, _twin_response(puts.get(cid.type, "put_string"), cid.value, status,
                                             body))
        elif address.endswith("/methods/devicebound"):
            c.method_responses.append(raw)

    # -- for the tests ---------------------------------------------------------------------

    def call(self, fn, timeout=10):
        """Runs `fn()` on the engine thread (where Proton's objects live); returns its result."""
        done = []
        with self.lock:
            self._calls.append((fn, done))
            if not self.lock.wait_for(lambda: done or self.errors, timeout):
                raise TimeoutError("the fake parent's engine thread did not run the call")
        if self.errors and not done:
            raise AssertionError(f"fake parent failed: {self.errors}")
        kind, value = done[0]
        if kind == "error":
            raise value
        return value

    def wait(self, predicate, timeout, what):
        """Waits (under the engine lock) until `predicate()` is true; returns its value."""
        end = time.monotonic() + timeout
        with self.lock:
            while True:
                if self.errors:
                    raise AssertionError(f"fake parent failed: {self.errors}")
                result = predicate()
                if result:
                    return result
                left = end - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
                self.lock.wait(min(left, 0.5))

    def send_method(self, connection, address, name, cid, payload):
        """Sends a method request on the parent's sender to the child's receiver `address`."""
        def go():
            link = connection.conn.link_head(Endpoint.LOCAL_ACTIVE)
            while link:
                if link.is_sender and link.remote_source.address == address:
                    self._send(link, encode_message(
                        properties={"correlation-id": ("put_uuid", cid)},
                        app_properties={"IoThub-methodname": name},
                        data=payload))
                    return True
                link = link.next(Endpoint.LOCAL_ACTIVE)
            raise AssertionError(f"no link from the child with source {address}")
        return self.call(go)

    def announced_idle_timeout(self, connection):
        opens = connection.wire.outbound.performatives(OPEN)
        fields = opens[0].performative[1]
        return fields[4].value if len(fields) > 4 else None

    def stop(self):
        with self.lock:
            self._stop = True
        self._thread.join(5)
        for c in self.connections:
            try:
                c.sock.close()
            except OSError:
                pass
        self.listener.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def _twin_response(put_cid, cid, status, body):
    d = Data()
    d.put_described()
    d.enter()
    d.put_ulong(0x72)  # message-annotations
    d.put_dict({symbol("status"): int32(status)})
    d.exit()
    d.put_described()
    d.enter()
    d.put_ulong(0x73)  # properties: message-id null, user-id, to, subject, reply-to, cid
    d.put_list()
    d.enter()
    for _ in range(5):
        d.put_null()
    getattr(d, put_cid)(cid)
    d.exit()
    d.exit()
    d.put_described()
    d.enter()
    d.put_ulong(0x75)
    d.put_binary(body)
    d.exit()
    return d.encode()
