'use strict';
// Nested edge: a child hub forwards its `$upstream` queue to a parent hub over the upstream
// AMQP connection, and the parent, driven by the `azure-iothub` service SDK, reaches the child's
// modules with direct methods and twin updates.
const test = require('node:test');
const assert = require('node:assert/strict');
const crypto = require('node:crypto');
const { spawnSync } = require('node:child_process');
const { Message } = require('azure-iot-device');
const { openClient, startHub, trustHub, withTimeout, scrape } = require('./hub');

const CHILD = 'child1';
const CHILD_KEY = crypto.randomBytes(32).toString('base64');
const SERVICE_KEY = crypto.randomBytes(32).toString('base64');

/// A parent hub that knows `child1` as an edge device, with a service policy; and a child hub
/// whose upstream is that parent.
async function startPair({ parentRoutes, childRoutes, childModules = { A: {} } }) {
  const parent = await startHub({
    modules: { sink: {} },
    routes: parentRoutes,
    extra: {
      devices: { [CHILD]: { primaryKey: CHILD_KEY, edge: true } },
      servicePolicies: { service: { primaryKey: SERVICE_KEY } },
    },
  });
  let child;
  try {
    child = await startHub({
      modules: childModules,
      routes: childRoutes,
      extra: {
        deviceId: CHILD,
        deviceKey: CHILD_KEY,
        upstream: {
          hostname: parent.host,
          port: 5671,
          caCert: parent.caPath(),
          minBackoffMs: 50,
          maxBackoffMs: 400,
        },
      },
    });
    await child.waitLog(/upstream connected/);
  } catch (e) {
    if (child) await child.stop();
    await parent.stop();
    throw e;
  }
  return { parent, child };
}

function serviceConnectionString(parent) {
  return `HostName=${parent.host};SharedAccessKeyName=service;SharedAccessKey=${SERVICE_KEY}`;
}

function closeAll(clients) {
  return withTimeout(Promise.all(clients.map((c) => c.close())), 20000, 'close clients');
}

function numbered(i, origin) {
  const m = new Message(JSON.stringify({ i }));
  m.messageId = `${origin}-${i}`;
  m.properties.add('origin', origin);
  return m;
}

/// Collects input messages on `client` until `n` arrived.
function collect(client, n) {
  const got = [];
  const done = new Promise((resolve) => {
    client.on('inputMessage', (input, msg) => {
      got.push({ input, id: msg.messageId, at: Date.now(), origin: msg.properties.getValue('origin') });
      client.complete(msg, () => {});
      if (got.length === n) resolve(got);
    });
  });
  return { got, done };
}

test('a child module\'s message reaches a parent module with its device and module ids', async (t) => {
  const { parent, child } = await startPair({
    childRoutes: { up: 'FROM /messages/modules/A/outputs/* INTO $upstream' },
    parentRoutes: {
      fromChild: `FROM /messages/modules/A/* WHERE $connectionDeviceId = '${CHILD}' AND $connectionModuleId = 'A' AND origin = 'A' INTO BrokeredEndpoint("/modules/sink/inputs/fromChild")`,
      wrongIds: `FROM /messages/* WHERE $connectionDeviceId = 'edge1' INTO BrokeredEndpoint("/modules/sink/inputs/wrong")`,
    },
  });
  const a = await openClient(child, 'A');
  const sink = await openClient(parent, 'sink');
  t.after(async () => {
    try {
      await closeAll([a, sink]);
    } finally {
      await child.stop();
      await parent.stop();
    }
  });
  const n = 20;
  const { got, done } = collect(sink, n);
  for (let i = 0; i < n; i += 1) await a.sendOutputEvent('telemetry', numbered(i, 'A'));
  await withTimeout(done, 20000, 'messages at the parent');
  assert.deepEqual(got.map((g) => g.input), Array(n).fill('fromChild'));
  assert.deepEqual(got.map((g) => g.id), [...Array(n).keys()].map((i) => `A-${i}`));
  const metrics = await scrape(parent.metricsUrl);
  assert.match(metrics, new RegExp(`edgehub_messages_received_total\\{[^}]*id="${CHILD}/A"[^}]*\\} ${n}`));
});

test('the service SDK on the parent reaches a child module: direct method and twin', async (t) => {
  const { Client, Registry } = require('azure-iothub');
  const { parent, child } = await startPair({ childRoutes: {}, parentRoutes: {} });
  const a = await openClient(child, 'A');
  t.after(async () => {
    try {
      await closeAll([a]);
    } finally {
      await child.stop();
      await parent.stop();
    }
  });

  a.onMethod('echo', (req, res) => {
    res.send(200, { echoed: req.payload }, () => {});
  });
  const twin = await withTimeout(a.getTwin(), 15000, 'child module twin');
  const service = Client.fromConnectionString(serviceConnectionString(parent));
  const registry = Registry.fromConnectionString(serviceConnectionString(parent));
  trustHub(service, parent.caPem());
  trustHub(registry, parent.caPem());

  // The method links upstream are held for the module; the call may race their attach.
  const call = () => service.invokeDeviceMethod(CHILD, 'A', {
    methodName: 'echo', payload: { n: 7 }, responseTimeoutInSeconds: 10, connectTimeoutInSeconds: 5,
  });
  const result = await withTimeout(call(), 30000, 'invokeDeviceMethod');
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

  // `update` takes a callback (it returns no promise in this SDK version).
  await withTimeout(new Promise((resolve, reject) => {
    twin.properties.reported.update({ mode: 'heating' }, (err) => (err ? reject(err) : resolve()));
  }), 15000, 'reported patch');
  // The child sends reported patches upstream as they come; poll the parent until it has it.
  const seen = await withTimeout((async () => {
    for (;;) {
      const r = await registry.getModuleTwin(CHILD, 'A');
      if (r.responseBody.properties.reported.mode === 'heating') return r.responseBody;
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
  })(), 15000, 'reported patch at the parent');
  assert.equal(seen.properties.desired.setpoint, 21);

  // The child reports its connected clients in its own $edgeHub twin, as edgeHub does.
  const hubTwin = await withTimeout((async () => {
    for (;;) {
      const r = await registry.getModuleTwin(CHILD, '$edgeHub');
      const clients = r.responseBody.properties.reported.clients || {};
      if (clients[`${CHILD}/A`]) return r.responseBody;
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
  })(), 15000, '$edgeHub reported clients at the parent');
  assert.equal(hubTwin.properties.reported.clients[`${CHILD}/A`].status, 'Connected');
});

test('the parent goes away and comes back: every message arrives, in order, promptly', async (t) => {
  const { parent, child } = await startPair({
    childModules: { A: {}, B: {} },
    childRoutes: { up: 'FROM /messages/modules/* INTO $upstream' },
    parentRoutes: { fromChild: 'FROM /messages/modules/* INTO BrokeredEndpoint("/modules/sink/inputs/fromChild")' },
  });
  const a = await openClient(child, 'A');
  const b = await openClient(child, 'B');
  let sink;
  t.after(async () => {
    try {
      await closeAll(sink ? [a, b, sink] : [a, b]);
    } finally {
      await child.stop();
      await parent.stop();
    }
  });

  await parent.halt();
  await child.waitLog(/upstream connection lost/);
  const n = 50;
  for (let i = 0; i < n; i += 1) {
    await a.sendOutputEvent('o', numbered(i, 'A'));
    await b.sendOutputEvent('o', numbered(i, 'B'));
  }
  await parent.resume();
  const reconnected = child.waitLog(/first message forwarded after connecting after_ms=(\d+)/, 30000);
  sink = await openClient(parent, 'sink');
  const { got, done } = collect(sink, 2 * n);
  await withTimeout(done, 30000, 'backlog at the parent');
  for (const origin of ['A', 'B']) {
    const ids = got.filter((g) => g.origin === origin).map((g) => g.id);
    assert.deepEqual(ids, [...Array(n).keys()].map((i) => `${origin}-${i}`), `order of ${origin}`);
  }
  const afterMs = Number((await reconnected)[1]);
  assert.ok(afterMs < 1000, `first message forwarded ${afterMs} ms after the parent accepted the child`);
  const metrics = await scrape(child.metricsUrl);
  assert.match(metrics, /edgehub_offline_count_total\{[^}]*\} [1-9]/);
  assert.match(metrics, /edgehub_offline_duration_seconds_count\{[^}]*\} [1-9]/);
  assert.match(metrics, /edgehub_operation_retry_total\{[^}]*operation="connect"[^}]*\} [1-9]/);
  assert.match(metrics, /edgehub_messages_sent_total\{[^}]*to="upstream"[^}]*\} /);
  const r = spawnSync('promtool', ['check', 'metrics'], { input: metrics });
  assert.equal(r.status, 0, `promtool: ${r.stdout}${r.stderr}`);
});
