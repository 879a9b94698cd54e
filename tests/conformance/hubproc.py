"""Starts a real edgehub process: its own fresh loopback address, AMQPS on 5671 and HTTPS on 443
of that address, metrics on port 0, data in a temporary directory."""

import http.client
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import tempfile
import threading
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BIN = os.environ.get("EDGEHUB_BIN", os.path.join(ROOT, "target", "debug", "edgehub"))
DEVICE = "edge1"

_counter = 0


def loopback():
    """A fresh 127.x.y.z per hub (x in 201..250, apart from the Node tests' 1..200)."""
    global _counter
    _counter += 1
    a = 201 + os.getpid() % 50
    b = (int(time.time()) + _counter * 7) % 250
    return f"127.{a}.{b}.{1 + _counter % 250}"


class Hub:
    def __init__(self, modules, routes=None, extra=None):
        self.host = loopback()
        self.dir = tempfile.mkdtemp(prefix="edgehub-conformance-")
        self.config = {
            "deviceId": DEVICE,
            "iothubHostname": "test-hub.azure-devices.net",
            "gatewayHostname": self.host,
            "listen": {"amqps": f"{self.host}:5671", "mqtts": None, "https": f"{self.host}:443",
                       "metrics": f"{self.host}:0"},
            "dataDir": os.path.join(self.dir, "data"),
            "modules": modules,
            "$edgeHub": {"schemaVersion": "1.1", "routes": routes or {},
                         "storeAndForwardConfiguration": {"timeToLiveSecs": 7200}},
            **(extra or {}),
        }
        self.config_path = os.path.join(self.dir, "edgehub.json")
        with open(self.config_path, "w") as f:
            json.dump(self.config, f, indent=2)
        self.log = ""
        self._lock = threading.Condition()
        self._ready = threading.Event()
        self.proc = subprocess.Popen(
            [BIN, "run", "--config", self.config_path],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "info")})
        self._reader = threading.Thread(target=self._read_log, daemon=True)
        self._reader.start()
        if not self._ready.wait(20) or self.proc.poll() is not None:
            self.stop()
            raise RuntimeError(f"edgehub was not ready within 20 s:\n{self.log}")

    def _read_log(self):
        ansi = re.compile(r"\x1b\[[0-9;]*m")
        for line in iter(self.proc.stderr.readline, b""):
            text = ansi.sub("", line.decode(errors="replace"))
            with self._lock:
                self.log += text
                self._lock.notify_all()
            if "edgehub ready" in text:
                self._ready.set()
        self._ready.set()  # exited: wake the waiter, which checks poll()

    def wait_log(self, text, timeout=10):
        """Whether `text` shows in the hub's log within `timeout` seconds: the log is read by
        a thread, so a line the hub wrote just before answering may not be in `log` yet."""
        with self._lock:
            return self._lock.wait_for(lambda: text in self.log, timeout)

    @property
    def ca_path(self):
        return os.path.join(self.config["dataDir"], "certs", "edge-ca.pem")

    def module_env(self, module):
        out = subprocess.run([BIN, "module-env", "--config", self.config_path, "--module", module],
                             check=True, capture_output=True, timeout=30).stdout.decode()
        return dict(line.split("=", 1) for line in out.strip().splitlines())

    def module_key(self, module):
        cs = self.module_env(module)["EdgeHubConnectionString"]
        return re.search(r"SharedAccessKey=([^;]+)", cs).group(1)

    def https(self, method, path, headers, body, timeout=60):
        """One request to the hub's HTTPS API; returns (status, parsed JSON body or None)."""
        ctx = ssl.create_default_context(cafile=self.ca_path)
        conn = http.client.HTTPSConnection(self.host, 443, context=ctx, timeout=timeout)
        try:
            data = json.dumps(body).encode()
            conn.request(method, path, body=data, headers={
                "content-type": "application/json", **headers})
            res = conn.getresponse()
            text = res.read()
            return res.status, (json.loads(text) if text else None)
        finally:
            conn.close()

    def stop(self):
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(15)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(5)
            self._reader.join(5)
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
