import os
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from hubproc import DEVICE, Hub  # noqa: E402
from wire import IOTHUB_HOST, Client, sas_token  # noqa: E402

SERVICE_POLICY = "service"
SERVICE_KEY = "c2VydmljZS1wb2xpY3kta2V5LWZvci1jb25mb3JtYW5jZS10ZXN0cw=="

ROUTES = {
    "aToB": 'FROM /messages/modules/A/outputs/out1 INTO BrokeredEndpoint("/modules/B/inputs/in1")',
    # Each test that leaves inputs in flight has its own destination module.
    "cToD": 'FROM /messages/modules/C/outputs/toD INTO BrokeredEndpoint("/modules/D/inputs/fromC")',
    "cToE": 'FROM /messages/modules/C/outputs/toE INTO BrokeredEndpoint("/modules/E/inputs/fromC")',
}


@pytest.fixture(scope="session")
def hub():
    h = Hub(modules={"A": {"properties.desired": {"threshold": 5}}, "B": {}, "C": {}, "D": {},
                     "E": {}},
            routes=ROUTES,
            extra={"servicePolicies": {SERVICE_POLICY: {"primaryKey": SERVICE_KEY}}})
    try:
        yield h
    finally:
        h.stop()
        # CONFORMANCE_HUB_LOG=<file> keeps the hub's log (set RUST_LOG for more detail).
        if os.environ.get("CONFORMANCE_HUB_LOG"):
            with open(os.environ["CONFORMANCE_HUB_LOG"], "w") as f:
                f.write(h.log)


@pytest.fixture
def connect(hub):
    """Opens clients to the hub; closes every one of them after the test."""
    clients = []

    def open_client(idle_timeout=None):
        c = Client(hub.host, hub.ca_path, idle_timeout=idle_timeout)
        clients.append(c)
        return c

    yield open_client
    for c in clients:
        c.close()


@pytest.fixture
def module_client(hub, connect):
    """A client authenticated as a module of the edge device."""
    def make(module, idle_timeout=None):
        c = connect(idle_timeout)
        c.authenticate(DEVICE, module, hub.module_key(module))
        return c
    return make


def service_token():
    return sas_token(IOTHUB_HOST, SERVICE_KEY, int(time.time()) + 3600, skn=SERVICE_POLICY)
