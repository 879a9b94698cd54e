"""SASL EXTERNAL with a TLS client certificate (docs/CONFORMANCE.md row 24).

A client that presents a device certificate and offers only EXTERNAL is authenticated by the
certificate: its links for that device attach with no `$cbs` put-token. EXTERNAL without a
certificate that proves an identity (none sent, one that matches no device, a CA-signed one
whose CN is a device without `"ca": true`), or with an authorization identity other than the
certificate's device, ends in a SASL outcome `auth` (code 1). The certificates are made here
with the `openssl` command line; the hub runs with its own devices and client CA file.
"""

import os
import shutil
import subprocess
import tempfile
import uuid

import pytest
from proton import Endpoint

from hubproc import Hub
from test_twin import request, status_and_version
from wire import ATTACH, Client, SaslRefused, encode_message

THUMB_DEVICE = "thumbDevice"
CA_DEVICE = "caDevice"
SASL_OK, SASL_AUTH = 0, 1


def openssl(*args):
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=30)


def self_signed(d, name, cn):
    key, cert = os.path.join(d, f"{name}.key"), os.path.join(d, f"{name}.pem")
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", key, "-out", cert, "-days", "2", "-subj", f"/CN={cn}")
    return cert, key


def signed_by(d, ca, name, cn):
    ca_cert, ca_key = ca
    key, csr = os.path.join(d, f"{name}.key"), os.path.join(d, f"{name}.csr")
    cert, ext = os.path.join(d, f"{name}.pem"), os.path.join(d, f"{name}.ext")
    openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", key, "-out", csr, "-subj", f"/CN={cn}")
    with open(ext, "w") as f:
        f.write("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
                "extendedKeyUsage=clientAuth\n")
    openssl("x509", "-req", "-in", csr, "-CA", ca_cert, "-CAkey", ca_key, "-CAcreateserial",
            "-out", cert, "-days", "2", "-extfile", ext)
    return cert, key


def sha1_thumbprint(cert):
    out = subprocess.run(["openssl", "x509", "-in", cert, "-noout", "-fingerprint", "-sha1"],
                         check=True, capture_output=True, timeout=30).stdout.decode()
    return out.strip().split("=", 1)[1].replace(":", "")


@pytest.fixture(scope="module")
def certs():
    d = tempfile.mkdtemp(prefix="edgehub-sasl-external-")
    try:
        ca_key, ca_cert = os.path.join(d, "ca.key"), os.path.join(d, "ca.pem")
        openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                "-nodes", "-keyout", ca_key, "-out", ca_cert, "-days", "2",
                "-subj", "/CN=device test CA",
                "-addext", "basicConstraints=critical,CA:TRUE",
                "-addext", "keyUsage=critical,keyCertSign,cRLSign")
        ca = (ca_cert, ca_key)
        yield {
            "dir": d,
            "ca": ca_cert,
            "thumb": self_signed(d, "thumb", "any name"),
            "signed": signed_by(d, ca, "signed", CA_DEVICE),
            "stranger": self_signed(d, "stranger", THUMB_DEVICE),
            # CA-signed with the CN of a device that authenticates by thumbprint only.
            "wrong_cn": signed_by(d, ca, "wrong_cn", THUMB_DEVICE),
        }
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def x509_hub(certs):
    h = Hub(modules={"A": {}}, extra={
        "devices": {THUMB_DEVICE: {"x509": {"primaryThumbprint": sha1_thumbprint(certs["thumb"][0])}},
                    CA_DEVICE: {"x509": {"ca": True}}},
        "tls": {"clientCaCerts": certs["ca"]},
    })
    try:
        yield h
    finally:
        h.stop()


@pytest.fixture
def connect(x509_hub):
    clients = []

    def open_client(**kw):
        c = Client(x509_hub.host, x509_hub.ca_path, **kw)
        clients.append(c)
        return c

    yield open_client
    for c in clients:
        c.close()


def attached_addresses(client):
    """The addresses of every link this client attached (from its own attach frames)."""
    out = []
    for f in client.outbound.performatives(ATTACH):
        fields = f.performative[1]
        role_receiver = bool(fields[2].value)
        terminus = fields[5] if role_receiver else fields[6]
        out.append(str(terminus.value[1].value[0].value))
    return out


def refused(client, link):
    client.wait(lambda: not client.link_open(link) and link.remote_condition is not None, 10,
                "the refusal of the link")
    return link.remote_condition.name


@pytest.mark.parametrize("kind,device", [("thumb", THUMB_DEVICE), ("signed", CA_DEVICE)],
                         ids=["thumbprint", "ca"])
def test_external_authenticates_the_certificate_device(connect, certs, kind, device):
    c = connect(cert=certs[kind], sasl=("EXTERNAL", None))
    assert c.sasl_offered[0] == "EXTERNAL", f"EXTERNAL not offered first: {c.sasl_offered}"
    # Telemetry: the sender attaches and a message is accepted.
    tx = c.sender(f"/devices/{device}/messages/events")
    assert c.link_open(tx), f"telemetry link refused: {tx.remote_condition}"
    dlv = c.send(tx, encode_message(data=b'{"t": 1}',
                                    properties={"message-id": ("put_string", str(uuid.uuid4()))}))
    outcome = c.outcome(dlv, 10, "the telemetry outcome")
    assert outcome == dlv.ACCEPTED, f"telemetry outcome {outcome}"
    # Twin: both links attach and a GET is answered 200.
    address = f"/devices/{device}/twin"
    channel = {"com.microsoft:channel-correlation-id": f"twin:{uuid.uuid4()}"}
    ttx = c.sender(address, snd_settled=True, properties=channel)
    trx = c.receiver(address, properties=channel)
    assert c.link_open(ttx) and c.link_open(trx), "twin links refused"
    _, response = request(c, (ttx, trx), "GET")
    assert status_and_version(response)[0] == 200
    # Nothing went through $cbs, and the certificate proves this device only.
    assert "$cbs" not in attached_addresses(c), attached_addresses(c)
    other = THUMB_DEVICE if device == CA_DEVICE else CA_DEVICE
    stranger_link = c.sender(f"/devices/{other}/messages/events")
    assert refused(c, stranger_link) == "amqp:unauthorized-access"


@pytest.mark.parametrize("kind", ["stranger", "wrong_cn"], ids=["unknown-thumbprint", "ca-wrong-cn"])
def test_external_with_an_unaccepted_certificate_fails_sasl(connect, certs, x509_hub, kind):
    with pytest.raises(SaslRefused) as refusal:
        connect(cert=certs[kind], sasl=("EXTERNAL", None))
    assert refusal.value.code == SASL_AUTH
    # EXTERNAL is offered to a client that sent a certificate, accepted or not.
    assert "EXTERNAL" in refusal.value.offered
    assert x509_hub.wait_log("client certificate not accepted"), x509_hub.log


def test_external_without_a_certificate_fails_sasl(connect):
    with pytest.raises(SaslRefused) as refusal:
        connect(sasl=("EXTERNAL", None))
    assert refusal.value.code == SASL_AUTH
    assert "EXTERNAL" not in refusal.value.offered, refusal.value.offered


@pytest.mark.parametrize("authzid,code", [(CA_DEVICE.encode(), SASL_OK), (b"", SASL_OK),
                                          (THUMB_DEVICE.encode(), SASL_AUTH)],
                         ids=["own-device", "empty", "other-device"])
def test_external_authorization_identity_must_be_the_certificates(connect, certs, authzid, code):
    if code == SASL_OK:
        c = connect(cert=certs["signed"], sasl=("EXTERNAL", authzid))
        tx = c.sender(f"/devices/{CA_DEVICE}/messages/events")
        assert c.link_open(tx), tx.remote_condition
    else:
        with pytest.raises(SaslRefused) as refusal:
            connect(cert=certs["signed"], sasl=("EXTERNAL", authzid))
        assert refusal.value.code == code


def test_unaccepted_certificate_without_sasl_gets_links_refused(connect, certs):
    """The same certificate with no SASL layer (as the SDKs connect): the connection opens, its
    links for devices are refused with amqp:unauthorized-access."""
    c = connect(cert=certs["stranger"])
    assert c.conn.state & Endpoint.REMOTE_ACTIVE
    tx = c.sender(f"/devices/{THUMB_DEVICE}/messages/events")
    assert refused(c, tx) == "amqp:unauthorized-access"
