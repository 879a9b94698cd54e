'use strict';
// Nested edge over AMQP over WebSockets through an HTTP proxy: the child hub's upstream is
// `protocol: "amqpws"` with `upstream.proxy` pointing at Debian's tinyproxy (started here, with
// basic authentication), so every byte between the hubs goes through a CONNECT tunnel to the
// parent's 443. Node SDK modules on both sides: a child module's outputs routed to `$upstream`
// reach a parent module, and the parent's service SDK reaches the child module with a direct
// method and twin updates, as nested.test.js checks over AMQPS.
const test = require('node:test');
const assert = require('node:assert/strict');
const crypto = require('node:crypto');
const fs = require('node:fs');
const net = require('node:net');
const os = require('node:os');
const path = require('node:path');
const { spawn } = require('node:child_process');
const { Message } = require('azure-iot-device');
const { openClient, startHub, trustHub, withTimeout } = require('./hub');

const CHILD = 'child1';
const CHILD_KEY = crypto.randomBytes(32).toString('base64');
const SERVICE_KEY = crypto.randomBytes(32).toString('base64');
const PROXY_USER = 'edge';
const PROXY_PASSWORD = crypto.randomBytes(9).toString('hex');

function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

/// Resolves once something accepts TCP connections on 127.0.0.1:`port` (tried again on each
/// refusal, within `ms`).
function listening(port, ms) {
  const attempt = () => new Promise((resolve) => {
    const sock = net.connect(port, '127.0.0.1');
    sock.once('connect', () => { sock.destroy(); resolve(true); });
    sock.once('error', () => resolve(false));
  });
  return withTimeout((async () => {
    while (!(await attempt())) await new Promise((r) => setImmediate(r));
  })(), ms, `tinyproxy listening on ${port}`);
}

/// tinyproxy on a port of its own, requiring basic authentication; `stop()` kills it and
/// removes its directory.
async function startProxy() {
  const bin = ['/usr/bin/tinyproxy', '/usr/sbin/tinyproxy'].find((p) => fs.existsSync(p));
  assert.ok(bin, 'tinyproxy is installed (tests/run-all.sh installs it)');
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'edgehub-tinyproxy-'));
  const port = await freePort();
  const log = path.join(dir, 'tinyproxy.log');
  const conf = path.join(dir, 'tinyproxy.conf');
  fs.writeFileSync(conf, [
    `Port ${port}`, 'Listen 127.0.0.1', 'Timeout 60', `LogFile "${log}"`, 'LogLevel Connect',
    'MaxClients 50', 'Allow 127.0.0.1', `BasicAuth ${PROXY_USER} ${PROXY_PASSWORD}`, '',
  ].join('\n'));
  const child = spawn(bin, ['-d', '-c', conf], { stdio: 'ignore' });
  const exited = new Promise((resolve) => child.on('exit', resolve));
  await listening(port, 10000);
  return {
    port,
    log: () => (fs.existsSync(log) ? fs.readFileSync(log, 'utf8') : ''),
    async stop() {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGTERM');
      await withTimeout(exited, 10000, 'tinyproxy exit');
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}

/// A parent hub that knows `child1` as an edge device, and a child hub that reaches it over
/// `amqpws` through the proxy.
async function startPair({ parentRoutes, childRoutes }) {
  const proxy = await startProxy();
  let parent;
  let child;
  try {
    parent = await startHub({
      modules: { sink: {} },
      routes: parentRoutes,
      extra: {
        devices: { [CHILD]: { primaryKey: CHILD_KEY, edge: true } },
        servicePolicies: { service: { primaryKey: SERVICE_KEY } },
      },
    });
    child = await startHub({
      modules: { A: {} },
      routes: childRoutes,
      extra: {
        deviceId: CHILD,
        deviceKey: CHILD_KEY,
        upstream: {
          hostname: parent.host,
          protocol: 'amqpws',
          proxy: `http://${PROXY_USER}:${PROXY_PASSWORD}@127.0.0.1:${proxy.port}`,
          caCert: parent.caPath(),
          minBackoffMs: 50,
          maxBackoffMs: 400,
        },
      },
    });
    await child.waitLog(/upstream connected/);
  } catch (e) {
    if (child) await child.stop();
    if (parent) await parent.stop();
    await proxy.stop();
    throw e;
  }
  // Every connection between the hubs is a tunnel to the parent's 443.
  assert.match(proxy.log(), new RegExp(`CONNECT ${parent.host.replace(/\./g, '\\.')}:443`));
  return { parent, child, proxy };
}

async function stopAll(clients, { parent, child, proxy }) {
  try {
    await withTimeout(Promise.all(clients.map((c) => c.close())), 20000, 'close clients');
  } finally {
    await child.stop();
    await parent.stop();
    await proxy.stop();
  }
}

test('over amqpws through a proxy: a child module\'s messages reach a parent module', async (t) => {
  const pair = await startPair({
    childRoutes: { up: 'FROM /messages/modules/A/outputs/* INTO $upstream' },
    parentRoutes: {
      fromChild: `FROM /messages/modules/A/* WHERE $connectionDeviceId = '${CHILD}' AND $connectionModuleId = 'A' INTO BrokeredEndpoint("/modules/sink/inputs/fromChild")`,
    },
  });
  const a = await openClient(pair.child, 'A');
  const sink = await openClient(pair.parent, 'sink');
  t.after(() => stopAll([a, sink], pair));
  const n = 20;
  const got = [];
  const done = new Promise((resolve) => {
    sink.on('inputMessage', (input, msg) => {
      got.push({ input, id: msg.messageId });
      sink.complete(msg, () => {});
      if (got.length === n) resolve();
    });
  });
  for (let i = 0; i < n; i += 1) {
    const m = new Message(JSON.stringify({ i }));
    m.messageId = `A-${i}`;
    await a.sendOutputEvent('telemetry', m);
  }
  await withTimeout(done, 20000, 'messages at the parent');
  assert.deepEqual(got.map((g) => g.input), Array(n).fill('fromChild'));
  assert.deepEqual(got.map((g) => g.id), [...Array(n).keys()].map((i) => `A-${i}`));
});

test('over amqpws through a proxy: the parent reaches a child module with a direct method and twin updates', async (t) => {
  const { Client, Registry } = require('azure-iothub');
  const pair = await startPair({ childRoutes: {}, parentRoutes: {} });
  const a = await openClient(pair.child, 'A');
  t.after(() => stopAll([a], pair));

  a.onMethod('echo', (req, res) => {
    res.send(200, { echoed: req.payload }, () => {});
  });
  const twin = await withTimeout(a.getTwin(), 15000, 'child module twin');
  const cs = `HostName=${pair.parent.host};SharedAccessKeyName=service;SharedAccessKey=${SERVICE_KEY}`;
  const service = Client.fromConnectionString(cs);
  const registry = Registry.fromConnectionString(cs);
  trustHub(service, pair.parent.caPem());
  trustHub(registry, pair.parent.caPem());

  const result = await withTimeout(service.invokeDeviceMethod(CHILD, 'A', {
    methodName: 'echo', payload: { n: 7 }, responseTimeoutInSeconds: 10, connectTimeoutInSeconds: 5,
  }), 30000, 'invokeDeviceMethod');
  assert.equal(result.result.status, 200);
  assert.deepEqual(result.result.payload, { echoed: { n: 7 } });

  const desired = new Promise((resolve) => {
    twin.on('properties.desired', (patch) => {
      if (patch.setpoint === 21) resolve(patch);
    });
  });
  const before = await withTimeout(registry.getModuleTwin(CHILD, 'A'), 15000, 'getModuleTwin');
  await withTimeout(
    registry.updateModuleTwin(CHILD, 'A', { properties: { desired: { setpoint: 21 } } }, before.responseBody.etag),
    15000,
    'updateModuleTwin',
  );
  await withTimeout(desired, 15000, 'desired patch at the child module');

  await withTimeout(new Promise((resolve, reject) => {
    twin.properties.reported.update({ mode: 'heating' }, (err) => (err ? reject(err) : resolve()));
  }), 15000, 'reported patch');
  // The child sends reported patches upstream as they come; ask the parent until it has it.
  const seen = await withTimeout((async () => {
    for (;;) {
      const r = await registry.getModuleTwin(CHILD, 'A');
      if (r.responseBody.properties.reported.mode === 'heating') return r.responseBody;
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
  })(), 15000, 'reported patch at the parent');
  assert.equal(seen.properties.desired.setpoint, 21);
});
