'use strict';
// Runtime mode, as on an IoT Edge device: a child hub started as `$edgeHub` with the runtime's
// environment and a workload API (tests/interop/workload.js), which issues its server
// certificate and signs its tokens; its identities come from a parent hub's device-scope API;
// its modules are Node SDK ModuleClients made by `fromEnvironment` from the same environment
// edgeAgent gives a module (no connection string: they sign through the workload API and trust
// its trust bundle). Also: the server certificate renewed under open connections; identities
// added at the parent usable at once over MQTT and SASL PLAIN; a leaf device created in the
// parent's registry under the child's scope (paged device scope) connecting to the child and
// carried upstream on its behalf with its auth chain; a module removed at the parent cut off
// by `$edgeHub`'s RefreshDeviceScopeIdentityCache method; a child hub of the child (an edge
// device created at the parent under the child's scope) served its device scope by the child
// from the child's own cache (a leaf of the grandchild created since looked up at the parent
// when the grandchild asks for it); a leaf device of the child's scope with a certificate thumbprint
// connecting to the child.
const test = require('node:test');
const assert = require('node:assert/strict');
const crypto = require('node:crypto');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const { execFileSync } = require('node:child_process');
const { Client: DeviceClient, Message } = require('azure-iot-device');
const { Amqp } = require('azure-iot-device-amqp');
const { Mqtt } = require('azure-iot-device-mqtt');
const { Registry } = require('azure-iothub');
const { NoRetry } = require('azure-iot-common');
const { fromEnv, httpsPost, loopback, openClient, sasToken, startHub, trustHub, withTimeout } = require('./hub');
const { startWorkload, moduleKey } = require('./workload');
const rhea = require('./rhea-client');

const CHILD = 'child1';
const CHILD_KEY = crypto.randomBytes(32).toString('base64');
const SERVICE_KEY = crypto.randomBytes(32).toString('base64');

/// PATCHes a twin at `hub` through its service API.
function patchTwin(hub, twinPath, body) {
  const https = require('node:https');
  const token = `${sasToken(hub.host, SERVICE_KEY, Math.floor(Date.now() / 1000) + 3600)}&skn=service`;
  const data = JSON.stringify(body);
  return withTimeout(new Promise((resolve, reject) => {
    const req = https.request({
      host: hub.host, port: 443, path: `${twinPath}?api-version=2021-04-12`, method: 'PATCH', ca: hub.caPem(),
      headers: { authorization: token, 'if-match': '*', 'content-type': 'application/json', 'content-length': Buffer.byteLength(data) },
    }, (res) => {
      let text = '';
      res.on('data', (d) => { text += d; });
      res.on('end', () => resolve({ status: res.statusCode, body: text }));
    });
    req.on('error', reject);
    req.end(data);
  }), 20000, `PATCH ${twinPath}`);
}

async function openModule(workload, module, gateway) {
  const c = await fromEnv(workload.moduleEnv(module, gateway));
  await withTimeout(c.open(), 20000, `${module} open`);
  return c;
}

/// The next message on `input`. One listener per client stays for the client's life: removing
/// the last one makes the SDK detach its input link, and a close soon after that can hang.
function nextInput(client, input) {
  if (!client.waiting) {
    client.waiting = [];
    client.on('inputMessage', (name, msg) => {
      client.complete(msg, () => {});
      const i = client.waiting.findIndex((w) => w.input === name);
      if (i >= 0) client.waiting.splice(i, 1)[0].resolve(msg);
    });
  }
  return new Promise((resolve) => client.waiting.push({ input, resolve }));
}

async function sendOutput(client, output, body) {
  const m = new Message(JSON.stringify(body));
  m.messageId = crypto.randomUUID();
  await withTimeout(client.sendOutputEvent(output, m), 15000, `send ${output}`);
  return m.messageId;
}

async function roundTrip(sender, receiver) {
  const got = nextInput(receiver, 'in');
  const id = await sendOutput(sender, 'out', { at: Date.now() });
  const msg = await withTimeout(got, 15000, 'message at receiver');
  assert.equal(msg.messageId, id);
}

test('runtime mode: workload API, device scope from the parent, modules from the environment', async (t) => {
  const parent = await startHub({
    modules: { sink: {} },
    routes: {
      fromChild: 'FROM /messages/* WHERE $connectionDeviceId = \'child1\' INTO BrokeredEndpoint("/modules/sink/inputs/child")',
      fromLeaf: 'FROM /messages/* WHERE $connectionDeviceId = \'leaf1\' INTO BrokeredEndpoint("/modules/sink/inputs/leaf")',
    },
    extra: {
      devices: { [CHILD]: { primaryKey: CHILD_KEY, edge: true, modules: { sender: {}, receiver: {} } } },
      servicePolicies: { service: { primaryKey: SERVICE_KEY } },
    },
    // The auth chains of the child's upstream links are logged at debug.
    env: { RUST_LOG: 'info,edgehub::servers::amqp=debug' },
  });
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'edgehub-runtime-'));
  const childHost = loopback();
  // The child trusts what the runtime's trust bundle holds: here the parent's CA as well.
  // Its first server certificate lives 15 s, so the child renews it while the modules run.
  const workload = await startWorkload({ dir, deviceId: CHILD, deviceKey: CHILD_KEY, extraTrust: parent.caPem().toString(), shortCerts: 1, shortSecs: 15 });
  const clients = [];
  let child;
  let late;
  let x509Dir;
  t.after(async () => {
    try {
      await withTimeout(Promise.all(clients.map((c, i) => withTimeout(c.close(), 15000, `close client ${i}`))), 20000, 'close clients');
    } finally {
      if (child) await child.stop();
      await parent.stop();
      await workload.close();
      fs.rmSync(dir, { recursive: true, force: true });
      if (x509Dir) fs.rmSync(x509Dir, { recursive: true, force: true });
    }
  });
  child = await startHub({
    host: childHost,
    modules: {},
    routes: {
      toReceiver: 'FROM /messages/modules/sender/outputs/out INTO BrokeredEndpoint("/modules/receiver/inputs/in")',
      up: 'FROM /messages/modules/sender/outputs/up INTO $upstream',
      leafUp: 'FROM /messages/* WHERE $connectionDeviceId = \'leaf1\' INTO $upstream',
    },
    extra: { upstream: { minBackoffMs: 50, maxBackoffMs: 400 } },
    env: { ...workload.moduleEnv('$edgeHub', parent.host), EdgeDeviceHostName: childHost },
  });
  await child.waitLog(/device scope refreshed[^\n]*identities=5/);
  await child.waitLog(/upstream connected/);

  const sender = await openModule(workload, 'sender', childHost);
  clients.push(sender);
  const receiver = await openModule(workload, 'receiver', childHost);
  clients.push(receiver);

  await t.test('the hub serves the workload certificate and signs through the workload API', () => {
    const paths = workload.calls.map((c) => `${c.method} ${c.path} ${c.version}`);
    assert.ok(paths.includes('POST /modules/%24edgeHub/genid/gen-edgeHub/certificate/server 2020-07-07'), paths.join('\n'));
    assert.ok(paths.includes('GET /trust-bundle 2020-07-07'));
    assert.ok(paths.includes('POST /modules/%24edgeHub/genid/gen-edgeHub/sign 2020-07-07'));
    assert.ok(paths.includes('POST /modules/%24edgeHub/genid/gen-edgeHub/encrypt 2020-07-07'), 'identities kept encrypted');
    assert.ok(paths.includes('POST /modules/sender/genid/gen-sender/sign 2018-06-28'), 'the Node SDK signs too');
  });

  await t.test('module to module through the child', async () => {
    await roundTrip(sender, receiver);
  });

  await t.test('the server certificate is renewed live: open connections stay, new ones see the new certificate', async () => {
    const tls = require('node:tls');
    const served = () => withTimeout(new Promise((resolve, reject) => {
      const s = tls.connect({ host: childHost, port: 5671, ca: workload.root, servername: childHost, ALPNProtocols: [] }, () => {
        const c = s.getPeerCertificate();
        s.destroy();
        resolve(c);
      });
      s.on('error', reject);
    }), 10000, 'TLS handshake');
    const first = await served();
    assert.ok(new Date(first.valid_to).getTime() - Date.now() < 60000, `the first certificate is short-lived: ${first.valid_to}`);
    let drops = 0;
    sender._transport.on('disconnect', () => { drops += 1; });
    receiver._transport.on('disconnect', () => { drops += 1; });
    await child.waitLog(/server certificate renewed/, 30000);
    const second = await served();
    assert.notEqual(second.fingerprint256, first.fingerprint256);
    assert.ok(new Date(second.valid_to).getTime() - Date.now() > 86400000, `the new certificate: ${second.valid_to}`);
    await roundTrip(sender, receiver);
    assert.equal(drops, 0, 'the open connections stayed up');
  });

  await t.test('twins: reported properties and the twin read back', async () => {
    const twin = await withTimeout(receiver.getTwin(), 15000, 'getTwin');
    await withTimeout(new Promise((resolve, reject) => twin.properties.reported.update({ mode: 'runtime' }, (e) => (e ? reject(e) : resolve()))), 15000, 'reported');
    const again = await withTimeout(receiver.getTwin(), 15000, 'getTwin again');
    assert.equal(again.properties.reported.mode, 'runtime');
  });

  await t.test('direct methods between modules through the child\'s HTTPS API', async () => {
    receiver.onMethod('echo', (request, response) => response.send(200, { got: request.payload }, () => {}));
    const params = { methodName: 'echo', payload: { n: 3 }, responseTimeoutInSeconds: 10, connectTimeoutInSeconds: 10 };
    const result = await withTimeout(sender.invokeMethod(CHILD, 'receiver', params), 20000, 'invokeMethod');
    assert.equal(result.status, 200);
    assert.deepEqual(result.payload, { got: { n: 3 } });
  });

  await t.test('messages go upstream on behalf of the child\'s modules', async () => {
    const sink = await openClient(parent, 'sink');
    clients.push(sink);
    const got = nextInput(sink, 'child');
    const id = await sendOutput(sender, 'up', { to: 'parent' });
    const msg = await withTimeout(got, 20000, 'message at the parent');
    assert.equal(msg.messageId, id);
  });

  await t.test('a module the parent does not know is refused', async () => {
    const stranger = await fromEnv(workload.moduleEnv('stranger', childHost));
    await assert.rejects(withTimeout(stranger.open(), 20000, 'stranger open'));
    await stranger.close().catch(() => {});
  });

  await t.test('a module added at the parent is fetched when it first connects', async () => {
    await parent.rewrite((c) => { c.devices[CHILD].modules.late = {}; });
    late = await openModule(workload, 'late', childHost);
    clients.push(late);
    await child.waitLog(/identity fetched from the device scope/);
  });

  await t.test('identities added at the parent connect at once over MQTT and over SASL PLAIN', async () => {
    await parent.rewrite((c) => { c.devices[CHILD].modules.lateMqtt = {}; c.devices[CHILD].modules.latePlain = {}; });
    const mqtt = await fromEnv(workload.moduleEnv('lateMqtt', childHost), Mqtt);
    await withTimeout(mqtt.open(), 20000, 'lateMqtt open');
    clients.push(mqtt);
    const key = moduleKey(CHILD_KEY, CHILD, 'latePlain').toString('base64');
    const plain = rhea.connect({ host: childHost, caPem: () => workload.root }, {
      username: `${CHILD}/modules/latePlain@sas.test-hub`,
      password: sasToken(`test-hub.azure-devices.net/devices/${CHILD}/modules/latePlain`, key, Math.floor(Date.now() / 1000) + 3600),
    });
    await plain.opened;
    const r = await rhea.attachOpen(plain.conn, 'sender', `/devices/${CHILD}/modules/latePlain/messages/events`);
    assert.equal(r.state, 'open');
    plain.conn.close();
  });

  await t.test('a leaf device created at the parent through the registry connects to the child and reaches the parent', async () => {
    const registry = Registry.fromConnectionString(`HostName=${parent.host};SharedAccessKeyName=service;SharedAccessKey=${SERVICE_KEY}`);
    trustHub(registry, parent.caPem());
    const { responseBody: edge } = await withTimeout(registry.get(CHILD), 10000, 'get child1');
    assert.match(edge.deviceScope, /^ms-azure-iot-edge:\/\/child1-\d+$/);
    const { responseBody: leaf } = await withTimeout(
      registry.create({ deviceId: 'leaf1', deviceScope: edge.deviceScope, parentScopes: [edge.deviceScope] }), 10000, 'create leaf1');
    assert.deepEqual(leaf.parentScopes, [edge.deviceScope]);
    // The parent serves it in the child's scope, in pages of the size asked for.
    const token = sasToken(`test-hub.azure-devices.net/devices/${CHILD}/modules/%24edgeHub`,
      moduleKey(CHILD_KEY, CHILD, '$edgeHub').toString('base64'), Math.floor(Date.now() / 1000) + 3600);
    const scopePath = `/devices/${CHILD}/modules/%24edgeHub/devicesAndModulesInTargetDeviceScope?api-version=2020-06-30-preview`;
    const seen = [];
    let link = null;
    let pages = 0;
    do {
      const r = await httpsPost(parent, scopePath, { authorization: token }, { authChain: CHILD, pageSize: 3, ...(link ? { continuationLink: link } : {}) });
      assert.equal(r.status, 200, JSON.stringify(r.body));
      assert.ok(r.body.devices.length + r.body.modules.length <= 3);
      seen.push(...r.body.devices.map((d) => d.deviceId), ...r.body.modules.map((m) => `${m.deviceId}/${m.moduleId}`));
      link = r.body.continuationLink;
      pages += 1;
    } while (link && pages < 20);
    assert.ok(pages >= 3, `${pages} pages`);
    assert.ok(seen.includes('leaf1'), seen.join(','));
    assert.equal(new Set(seen).size, seen.length, 'no identity twice');

    const cs = `HostName=test-hub.azure-devices.net;DeviceId=leaf1;SharedAccessKey=${leaf.authentication.symmetricKey.primaryKey};GatewayHostName=${childHost}`;
    const device = DeviceClient.fromConnectionString(cs, Amqp);
    await withTimeout(device.setOptions({ ca: workload.root }), 5000, 'setOptions');
    await withTimeout(device.open(), 20000, 'leaf1 open');
    clients.push(device);
    // The child carries it upstream on its $edgeHub token, with its auth chain.
    await child.waitLog(/upstream connected[^\n]*identities=7/, 30000);
    await parent.waitLog(/auth_chain=leaf1;child1/);
    const sink = await openClient(parent, 'sink');
    clients.push(sink);
    const got = nextInput(sink, 'leaf');
    const m = new Message(JSON.stringify({ from: 'leaf1' }));
    m.messageId = crypto.randomUUID();
    await withTimeout(device.sendEvent(m), 15000, 'leaf1 send');
    assert.equal((await withTimeout(got, 20000, 'leaf1\'s message at the parent')).messageId, m.messageId);
  });

  await t.test('a module removed at the parent is cut off at the child when $edgeHub\'s refresh method names it', async () => {
    await parent.rewrite((c) => { delete c.devices[CHILD].modules.late; });
    // Without retries the SDK reports the end of its connection instead of trying again.
    late.setRetryPolicy(new NoRetry());
    const cutOff = new Promise((resolve) => late.once('disconnect', resolve));
    const token = `${sasToken(parent.host, SERVICE_KEY, Math.floor(Date.now() / 1000) + 3600)}&skn=service`;
    const r = await httpsPost(parent, `/twins/${CHILD}/modules/%24edgeHub/methods?api-version=2021-04-12`, { authorization: token },
      { methodName: 'RefreshDeviceScopeIdentityCache', payload: { deviceIds: [`${CHILD}/late`] }, responseTimeoutInSeconds: 30 });
    assert.equal(r.status, 200, JSON.stringify(r.body));
    await child.waitLog(/identity revoked[^\n]*identity=child1\/late/);
    await withTimeout(cutOff, 20000, 'late\'s disconnect');
  });

  await t.test('the $edgeHub twin\'s desired properties from the parent are the child\'s routes', async () => {
    const routes = {
      toReceiver: 'FROM /messages/modules/sender/outputs/out INTO BrokeredEndpoint("/modules/receiver/inputs/in")',
      viaTwin: 'FROM /messages/modules/sender/outputs/twin INTO BrokeredEndpoint("/modules/receiver/inputs/twin")',
    };
    const desired = { schemaVersion: '1.1', routes, storeAndForwardConfiguration: { timeToLiveSecs: 7200 } };
    const r = await patchTwin(parent, `/twins/${CHILD}/modules/%24edgeHub`, { properties: { desired } });
    assert.equal(r.status, 200, r.body);
    await child.waitLog(/routes from the \$edgeHub twin[^\n]*routes=2/);
    const got = nextInput(receiver, 'twin');
    const id = await sendOutput(sender, 'twin', { via: 'twin' });
    assert.equal((await withTimeout(got, 15000, 'message by the twin\'s route')).messageId, id);
  });

  await t.test('after a restart with the parent offline, modules authenticate from the encrypted cache', async () => {
    await parent.halt();
    await Promise.all(clients.splice(0).map((c) => withTimeout(c.close(), 15000, 'close').catch(() => {})));
    await child.restart();
    await child.waitLog(/device-scope identities loaded[^\n]*identities=8/);
    const decrypts = workload.calls.filter((c) => c.path.endsWith('/decrypt')).length;
    assert.ok(decrypts >= 8, `the kept identities were decrypted (${decrypts} calls)`);
    const sender2 = await openModule(workload, 'sender', childHost);
    clients.push(sender2);
    const receiver2 = await openModule(workload, 'receiver', childHost);
    clients.push(receiver2);
    await roundTrip(sender2, receiver2);
    // The twin's routes were kept.
    const got = nextInput(receiver2, 'twin');
    const id = await sendOutput(sender2, 'twin', { after: 'restart' });
    const msg = await withTimeout(got, 15000, 'the twin\'s route after the restart').catch((e) => { console.log(child.log()); throw e; });
    assert.equal(msg.messageId, id);
    const stranger = await fromEnv(workload.moduleEnv('stranger', childHost));
    await assert.rejects(withTimeout(stranger.open(), 20000, 'stranger open'));
    await stranger.close().catch(() => {});
  });

  await t.test('the child serves the device scope of its own child hub (a grandchild of the parent) from its cache', async () => {
    await parent.resume();
    const registry = Registry.fromConnectionString(`HostName=${parent.host};SharedAccessKeyName=service;SharedAccessKey=${SERVICE_KEY}`);
    trustHub(registry, parent.caPem());
    const { responseBody: edge } = await withTimeout(registry.get(CHILD), 10000, 'get child1');
    const { responseBody: grand } = await withTimeout(
      registry.create({ deviceId: 'grand1', capabilities: { iotEdge: true }, parentScopes: [edge.deviceScope] }), 10000, 'create grand1');
    assert.match(grand.deviceScope, /^ms-azure-iot-edge:\/\/grand1-\d+$/);
    await withTimeout(registry.create({ deviceId: 'gleaf', parentScopes: [grand.deviceScope] }), 10000, 'create gleaf');
    // A leaf device of the child that authenticates with a self-signed certificate.
    x509Dir = fs.mkdtempSync(path.join(os.tmpdir(), 'edgehub-runtime-x509-'));
    execFileSync('openssl', ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes',
      '-keyout', 'xleaf.key.pem', '-out', 'xleaf.pem', '-subj', '/CN=xleaf', '-days', '30',
      '-addext', 'extendedKeyUsage=clientAuth'], { cwd: x509Dir, stdio: 'ignore' });
    const thumbprint = execFileSync('openssl', ['x509', '-in', 'xleaf.pem', '-noout', '-fingerprint', '-sha1'], { cwd: x509Dir })
      .toString().trim().split('=')[1].replace(/:/g, '');
    await withTimeout(registry.create({
      deviceId: 'xleaf', parentScopes: [edge.deviceScope],
      authentication: { type: 'selfSigned', x509Thumbprint: { primaryThumbprint: thumbprint } },
    }), 10000, 'create xleaf');
    // The child walks its scope at start, the grandchild's with the auth chain grand1;child1.
    await Promise.all(clients.splice(0).map((c) => withTimeout(c.close(), 15000, 'close').catch(() => {})));
    await child.restart();
    await child.waitLog(/device scope refreshed/, 30000);
    const grandKey = grand.authentication.symmetricKey.primaryKey;
    const token = sasToken(`test-hub.azure-devices.net/devices/grand1/modules/%24edgeHub`,
      moduleKey(grandKey, 'grand1', '$edgeHub').toString('base64'), Math.floor(Date.now() / 1000) + 3600);
    const childApi = { host: childHost, caPem: () => workload.root };
    const scopePath = '/devices/grand1/modules/%24edgeHub/devicesAndModulesInTargetDeviceScope?api-version=2020-06-30-preview';
    const r = await httpsPost(childApi, scopePath, { authorization: token }, { authChain: 'grand1' });
    assert.equal(r.status, 200, JSON.stringify(r.body));
    const ids = [...r.body.devices.map((d) => d.deviceId), ...r.body.modules.map((m) => `${m.deviceId}/${m.moduleId}`)].sort();
    assert.deepEqual(ids, ['gleaf', 'grand1', 'grand1/$edgeAgent', 'grand1/$edgeHub']);
    const gleaf = r.body.devices.find((d) => d.deviceId === 'gleaf');
    assert.ok(gleaf.authentication.symmetricKey.primaryKey, 'keys are served');
    // Nothing of the child's own scope.
    const r2 = await httpsPost(childApi, scopePath, { authorization: token }, { authChain: CHILD });
    assert.equal(r2.status, 401, JSON.stringify(r2.body));
    // A leaf created at the parent under the grandchild since: the child looks it up at the
    // parent (under grand1's auth chain) when the grandchild asks for it.
    await withTimeout(registry.create({ deviceId: 'gleaf2', parentScopes: [grand.deviceScope] }), 10000, 'create gleaf2');
    const onBehalf = '/devices/grand1/modules/%24edgeHub/getDeviceAndModuleOnBehalfOf?api-version=2020-06-30-preview';
    const r3 = await httpsPost(childApi, onBehalf, { authorization: token }, { authChain: 'grand1', targetDeviceId: 'gleaf2' });
    assert.equal(r3.status, 200, JSON.stringify(r3.body));
    assert.deepEqual(r3.body.devices.map((d) => d.deviceId), ['gleaf2']);
  });

  await t.test('a leaf device of the child\'s scope with a certificate thumbprint connects to the child', async () => {
    // The Node SDK keeps only HostName and DeviceId of an x509 connection string.
    const cs = `HostName=${childHost};DeviceId=xleaf;x509=true`;
    const device = DeviceClient.fromConnectionString(cs, Amqp);
    await withTimeout(device.setOptions({
      cert: fs.readFileSync(path.join(x509Dir, 'xleaf.pem'), 'utf8'),
      key: fs.readFileSync(path.join(x509Dir, 'xleaf.key.pem'), 'utf8'),
      ca: workload.root,
    }), 5000, 'setOptions');
    await withTimeout(device.open(), 20000, 'xleaf open').catch((e) => { console.log(child.log()); throw e; });
    clients.push(device);
    const m = new Message(JSON.stringify({ from: 'xleaf' }));
    await withTimeout(device.sendEvent(m), 15000, 'xleaf send');
  });
});
