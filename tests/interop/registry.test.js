'use strict';
// The identity registry through the service SDK (azure-iothub Registry) against a standalone
// hub: a device made with Registry.create connects at once with the key it was given, over AMQP
// and over MQTT (the Node device SDK, through the hub as its gateway); Registry.update to
// disabled and Registry.delete cut it off and keep it out; a module made with addModule connects
// as a ModuleClient and gets the messages a route sends it; list and getModulesOnDevice show the
// config file's identities beside the registry's; a registry device's twin and direct methods
// work as a config leaf device's; config identities refuse delete with 409; the
// registry is the same after a restart.
const test = require('node:test');
const assert = require('node:assert/strict');
const crypto = require('node:crypto');
const { Client: DeviceClient, ModuleClient, Message } = require('azure-iot-device');
const { Amqp } = require('azure-iot-device-amqp');
const { Mqtt } = require('azure-iot-device-mqtt');
const { Client: ServiceClient, Registry } = require('azure-iothub');
const { openClient, startHub, trustHub, withTimeout } = require('./hub');

const IOTHUB = 'test-hub.azure-devices.net';
const POLICY = 'service';
const SERVICE_KEY = crypto.randomBytes(32).toString('base64');
const LEAF = 'leaf1';

function statusOf(err) {
  return err && err.response && err.response.statusCode;
}

function deviceConnectionString(hub, device) {
  return `HostName=${IOTHUB};DeviceId=${device.deviceId};SharedAccessKey=${device.authentication.symmetricKey.primaryKey};GatewayHostName=${hub.host}`;
}

/// A device client over `transport`, trusting the hub, not yet open.
async function deviceClient(hub, device, transport) {
  const c = DeviceClient.fromConnectionString(deviceConnectionString(hub, device), transport);
  await withTimeout(c.setOptions({ ca: hub.caPem().toString() }), 5000, 'setOptions');
  return c;
}

/// Resolves with the error the client's transport reports when the hub drops its connection.
/// (The client itself reconnects only for features it had enabled, and only then reports.)
function disconnected(client, what) {
  return withTimeout(new Promise((resolve) => client._transport.once('disconnect', resolve)), 20000, what);
}

/// Resolves once the registry shows `id` in `state`.
async function connectionState(registry, id, state) {
  const deadline = Date.now() + 20000;
  for (;;) {
    const { responseBody } = await withTimeout(registry.get(id), 10000, `get ${id}`);
    if (responseBody.connectionState === state) return;
    if (Date.now() > deadline) assert.fail(`${id} is ${responseBody.connectionState}, not ${state}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

test('the registry through azure-iothub: devices and modules live on a standalone hub', async (t) => {
  const hub = await startHub({
    modules: { A: {} },
    routes: { toM3: 'FROM /messages/modules/A/outputs/out1 INTO BrokeredEndpoint("/modules/M3/inputs/in1")' },
    extra: {
      devices: { [LEAF]: {} },
      servicePolicies: { [POLICY]: { primaryKey: SERVICE_KEY } },
    },
  });
  const clients = [];
  // Each client closes under its own deadline, so a hang names the client. The Node SDK's close()
  // waits for a reconnect in progress to end, so clients are closed while the hub is up, before
  // the restart, not left retrying across it.
  const closeClients = async () => {
    const closing = clients.splice(0);
    await Promise.all(closing.map(({ name, client }) =>
      withTimeout(client.close().catch(() => {}), 30000, `closing ${name}`)));
  };
  t.after(async () => {
    try {
      await closeClients();
    } finally {
      await hub.stop();
    }
  });
  const serviceCs = `HostName=${hub.host};SharedAccessKeyName=${POLICY};SharedAccessKey=${SERVICE_KEY}`;
  let registry = Registry.fromConnectionString(serviceCs);
  trustHub(registry, hub.caPem());

  for (const [name, transport] of [['Amqp', Amqp], ['Mqtt', Mqtt]]) {
    await t.test(`a device from Registry.create connects at once over ${name}; update to disabled cuts it off`, async () => {
      const id = `dev-${name.toLowerCase()}`;
      const { responseBody: created } = await withTimeout(registry.create({ deviceId: id }), 10000, 'create');
      assert.equal(created.deviceId, id);
      assert.equal(created.status, 'enabled');
      assert.equal(Buffer.from(created.authentication.symmetricKey.primaryKey, 'base64').length, 32);
      assert.ok(created.etag);

      const client = await deviceClient(hub, created, transport);
      clients.push({ name: id, client });
      await withTimeout(client.open(), 15000, `${id} open`);
      await withTimeout(client.sendEvent(new Message('hello')), 10000, `${id} sendEvent`);
      await connectionState(registry, id, 'Connected');

      const gone = disconnected(client, `${id} cut off after update`);
      const { responseBody: updated } = await withTimeout(
        registry.update({ deviceId: id, status: 'disabled' }), 10000, 'update');
      assert.equal(updated.status, 'disabled');
      assert.equal(updated.authentication.symmetricKey.primaryKey, created.authentication.symmetricKey.primaryKey,
        'keys are kept when the update leaves them empty');
      const why = await gone;
      if (transport === Amqp) {
        // AMQP says why: the links and the connection end with amqp:unauthorized-access.
        assert.equal(why && why.name, 'UnauthorizedError', `${why}`);
      }
      await connectionState(registry, id, 'Disconnected');
      // The client tries again to send, and is refused.
      await assert.rejects(withTimeout(client.sendEvent(new Message('after')), 20000, `${id} sendEvent while disabled`),
        (e) => e.name === 'UnauthorizedError' || /not authorized|unauthorized/i.test(e.message));
      const again = await deviceClient(hub, created, transport);
      await assert.rejects(withTimeout(again.open(), 20000, `${id} open while disabled`));
      await again.close().catch(() => {});
    });
  }

  await t.test('Registry.delete cuts a connected device off and keeps it out', async () => {
    const { responseBody: created } = await withTimeout(registry.create({ deviceId: 'dev-del' }), 10000, 'create');
    const client = await deviceClient(hub, created, Amqp);
    clients.push({ name: 'dev-del', client });
    await withTimeout(client.open(), 15000, 'open');
    const gone = disconnected(client, 'cut off after delete');
    await withTimeout(registry.delete('dev-del'), 10000, 'delete');
    const why = await gone;
    assert.equal(why && why.name, 'UnauthorizedError', `${why}`);
    await assert.rejects(withTimeout(registry.get('dev-del'), 10000, 'get deleted'),
      (e) => statusOf(e) === 404 && e.name === 'DeviceNotFoundError');
    const again = await deviceClient(hub, created, Amqp);
    await assert.rejects(withTimeout(again.open(), 20000, 'open after delete'));
    await again.close().catch(() => {});
  });

  let m3;
  await t.test('a module from addModule connects as a ModuleClient and gets routed messages', async () => {
    await withTimeout(registry.addModule({ deviceId: 'edge1', moduleId: 'M3' }), 10000, 'addModule');
    ({ responseBody: m3 } = await withTimeout(registry.getModule('edge1', 'M3'), 10000, 'getModule'));
    assert.equal(m3.moduleId, 'M3');
    const cs = `HostName=${IOTHUB};DeviceId=edge1;ModuleId=M3;SharedAccessKey=${m3.authentication.symmetricKey.primaryKey};GatewayHostName=${hub.host}`;
    const m = ModuleClient.fromConnectionString(cs, Amqp);
    clients.push({ name: 'M3', client: m });
    await withTimeout(m.setOptions({ ca: hub.caPem().toString() }), 5000, 'setOptions');
    await withTimeout(m.open(), 15000, 'M3 open');
    const received = withTimeout(new Promise((resolve) => {
      m.on('inputMessage', (inputName, msg) => {
        m.complete(msg, () => {});
        resolve({ inputName, msg });
      });
    }), 20000, 'the routed message at M3');
    const a = await openClient(hub, 'A');
    clients.push({ name: 'A', client: a });
    const out = new Message(JSON.stringify({ t: 21 }));
    out.messageId = 'to-m3';
    await withTimeout(a.sendOutputEvent('out1', out), 10000, 'A sendOutputEvent');
    const { inputName, msg } = await received;
    assert.equal(inputName, 'in1');
    assert.equal(msg.messageId, 'to-m3');
    assert.deepEqual(JSON.parse(msg.data.toString()), { t: 21 });
  });

  await t.test('a registry device has a twin and direct methods like a config leaf device', async () => {
    const { responseBody: created } = await withTimeout(registry.create({ deviceId: 'dev-twin' }), 10000, 'create');
    const client = await deviceClient(hub, created, Amqp);
    clients.push({ name: 'dev-twin', client });
    await withTimeout(client.open(), 15000, 'open');
    client.onDeviceMethod('ping', (request, response) => {
      response.send(200, { pong: request.payload }, () => {});
    });
    const twin = await withTimeout(client.getTwin(), 10000, 'getTwin');
    const pushed = withTimeout(new Promise((resolve) => {
      twin.on('properties.desired', (delta) => { if (delta.rate === 5) resolve(delta); });
    }), 10000, 'the desired patch at the device');
    const { responseBody: patched } = await withTimeout(
      registry.updateTwin('dev-twin', { properties: { desired: { rate: 5 } } }, '*'), 10000, 'updateTwin');
    assert.equal((await pushed).$version, patched.properties.desired.$version);
    await withTimeout(new Promise((resolve, reject) => {
      twin.properties.reported.update({ fw: '2.0' }, (err) => (err ? reject(err) : resolve()));
    }), 10000, 'reported update');
    const { responseBody: read } = await withTimeout(registry.getTwin('dev-twin'), 10000, 'getTwin (service)');
    assert.equal(read.properties.reported.fw, '2.0');
    assert.equal(read.status, 'enabled');
    const service = ServiceClient.fromConnectionString(serviceCs);
    trustHub(service, hub.caPem());
    const params = { methodName: 'ping', payload: { n: 1 }, responseTimeoutInSeconds: 10, connectTimeoutInSeconds: 10 };
    const { result } = await withTimeout(service.invokeDeviceMethod('dev-twin', params), 30000, 'invokeDeviceMethod');
    assert.equal(result.status, 200);
    assert.deepEqual(result.payload, { pong: { n: 1 } });
  });

  await t.test('list and getModulesOnDevice show config and registry identities', async () => {
    const { responseBody: devices } = await withTimeout(registry.list(), 10000, 'list');
    const ids = devices.map((d) => d.deviceId);
    for (const id of ['edge1', LEAF, 'dev-amqp', 'dev-mqtt', 'dev-twin']) assert.ok(ids.includes(id), `${id} in ${ids}`);
    assert.ok(!ids.includes('dev-del'));
    const { responseBody: modules } = await withTimeout(registry.getModulesOnDevice('edge1'), 10000, 'getModulesOnDevice');
    assert.deepEqual(modules.map((m) => m.moduleId), ['$edgeHub', 'A', 'M3']);
  });

  await t.test('config identities refuse delete with 409 and a clear message', async () => {
    await assert.rejects(withTimeout(registry.delete(LEAF), 10000, 'delete config device'), (e) => {
      assert.equal(statusOf(e), 409);
      assert.match(e.message, /config file/);
      return true;
    });
    await assert.rejects(withTimeout(registry.removeModule('edge1', 'A'), 10000, 'remove config module'),
      (e) => statusOf(e) === 409);
    await assert.rejects(withTimeout(registry.create({ deviceId: LEAF }), 10000, 'create config device'),
      (e) => statusOf(e) === 409 && e.name === 'DeviceAlreadyExistsError');
  });

  await t.test('the registry is the same after a restart, and its identities connect', async () => {
    const { responseBody: before } = await withTimeout(registry.get('dev-amqp'), 10000, 'get');
    await withTimeout(registry.update({ deviceId: 'dev-amqp', status: 'enabled' }), 10000, 're-enable');
    await closeClients();
    await hub.restart();
    registry = Registry.fromConnectionString(serviceCs);
    trustHub(registry, hub.caPem());
    const { responseBody: after } = await withTimeout(registry.get('dev-amqp'), 10000, 'get after restart');
    assert.equal(after.generationId, before.generationId);
    assert.equal(after.status, 'enabled');
    assert.deepEqual(after.authentication, before.authentication);
    const client = await deviceClient(hub, after, Amqp);
    clients.push({ name: 'dev-amqp after restart', client });
    await withTimeout(client.open(), 15000, 'open after restart');
    const { responseBody: module } = await withTimeout(registry.getModule('edge1', 'M3'), 10000, 'getModule after restart');
    assert.deepEqual(module.authentication, m3.authentication);
    await withTimeout(registry.removeModule('edge1', 'M3'), 10000, 'removeModule');
    await assert.rejects(withTimeout(registry.getModule('edge1', 'M3'), 10000, 'getModule removed'),
      (e) => statusOf(e) === 404);
  });
});
