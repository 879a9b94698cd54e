'use strict';
// The IoT Hub service SDK (azure-iothub) against the hub's service API, in every form it sends
// twin and method calls: module twins read and patched with `If-Match: "*"`, with the etag it
// read and with a stale etag; a leaf device's twin the same way; direct methods to a module (a
// Node ModuleClient) and to a leaf device (a Node device Client over AMQP, through the hub as
// its gateway). Each patch is followed to the twin link of the module or device, with its
// $version; each method result comes back with the status and payload the handler sent.
const test = require('node:test');
const assert = require('node:assert/strict');
const crypto = require('node:crypto');
const { Client: DeviceClient } = require('azure-iot-device');
const { Amqp } = require('azure-iot-device-amqp');
const { Client, Registry } = require('azure-iothub');
const { openClient, startHub, trustHub, withTimeout } = require('./hub');

const IOTHUB = 'test-hub.azure-devices.net';
const POLICY = 'service';
const SERVICE_KEY = crypto.randomBytes(32).toString('base64');
const LEAF = 'leaf1';
const LEAF_KEY = crypto.randomBytes(32).toString('base64');

function statusOf(err) {
  return err && err.response && err.response.statusCode;
}

/// Resolves with the first desired-properties patch on `twin` that `predicate` accepts.
function nextDesired(twin, predicate, what) {
  return withTimeout(new Promise((resolve) => {
    const handler = (delta) => {
      if (predicate(delta)) {
        twin.removeListener('properties.desired', handler);
        resolve(delta);
      }
    };
    twin.on('properties.desired', handler);
  }), 10000, what);
}

/// Records the headers of every request the service object sends, by path.
function recordHeaders(serviceObject) {
  const sent = [];
  const api = serviceObject._restApiClient;
  const original = api.executeApiCall.bind(api);
  api.executeApiCall = (method, path, headers, ...rest) => {
    sent.push({ method, path, headers: { ...(headers || {}) } });
    return original(method, path, headers, ...rest);
  };
  return sent;
}

/// A leaf device's connection string, as the portal prints it with the gateway added.
function leafConnectionString(hub) {
  return `HostName=${IOTHUB};DeviceId=${LEAF};SharedAccessKey=${LEAF_KEY};GatewayHostName=${hub.host}`;
}

test('the service SDK: twins and direct methods of modules and leaf devices', async (t) => {
  const hub = await startHub({
    modules: { A: {}, B: { 'properties.desired': { mode: 'eco' } } },
    extra: {
      devices: { [LEAF]: { primaryKey: LEAF_KEY } },
      servicePolicies: { [POLICY]: { primaryKey: SERVICE_KEY } },
    },
  });
  const clients = [];
  t.after(async () => {
    try {
      await withTimeout(Promise.all(clients.map((c) => c.close())), 15000, 'closing clients');
    } finally {
      await hub.stop();
    }
  });

  const b = await openClient(hub, 'B');
  clients.push(b);
  b.onMethod('echo', (request, response) => {
    response.send(201, { got: request.payload, method: request.methodName, by: 'B' }, () => {});
  });
  const twinB = await withTimeout(b.getTwin(), 10000, 'B getTwin');

  const leaf = DeviceClient.fromConnectionString(leafConnectionString(hub), Amqp);
  clients.push(leaf);
  await withTimeout(leaf.setOptions({ ca: hub.caPem().toString() }), 5000, 'leaf setOptions');
  await withTimeout(leaf.open(), 15000, 'leaf open');
  leaf.onDeviceMethod('reboot', (request, response) => {
    response.send(202, { accepted: request.payload, method: request.methodName, by: LEAF }, () => {});
  });
  const twinLeaf = await withTimeout(leaf.getTwin(), 10000, 'leaf getTwin');

  const serviceCs = `HostName=${hub.host};SharedAccessKeyName=${POLICY};SharedAccessKey=${SERVICE_KEY}`;
  const service = Client.fromConnectionString(serviceCs);
  const registry = Registry.fromConnectionString(serviceCs);
  trustHub(service, hub.caPem());
  trustHub(registry, hub.caPem());
  const sent = recordHeaders(registry);
  const lastIfMatch = () => {
    const patches = sent.filter((r) => r.method === 'PATCH');
    return patches.length ? patches[patches.length - 1].headers['If-Match'] : undefined;
  };

  await t.test('getModuleTwin: the twin in IoT Hub\'s shape, with an etag and versions', async () => {
    const { responseBody: twin } = await withTimeout(registry.getModuleTwin('edge1', 'B'), 10000, 'getModuleTwin');
    assert.equal(twin.deviceId, 'edge1');
    assert.equal(twin.moduleId, 'B');
    assert.equal(twin.connectionState, 'Connected');
    assert.equal(twin.properties.desired.mode, 'eco');
    assert.equal(typeof twin.properties.desired.$version, 'number');
    assert.equal(typeof twin.properties.reported.$version, 'number');
    assert.ok(twin.etag && twin.etag !== '*', `etag ${twin.etag}`);
  });

  await t.test('updateModuleTwin with \'*\' (sent as If-Match: "*") is applied and pushed', async () => {
    const { responseBody: before } = await withTimeout(registry.getModuleTwin('edge1', 'B'), 10000, 'getModuleTwin');
    const pushed = nextDesired(twinB, (d) => d.star === 1, 'the patch at B');
    const patch = { properties: { desired: { star: 1, nested: { a: 1 } } } };
    const { responseBody: after } = await withTimeout(registry.updateModuleTwin('edge1', 'B', patch, '*'), 10000, 'updateModuleTwin *');
    assert.equal(lastIfMatch(), '"*"', 'the SDK quotes *');
    assert.equal(after.properties.desired.star, 1);
    assert.equal(after.properties.desired.mode, 'eco', 'a merge, not a replacement');
    assert.equal(after.properties.desired.$version, before.properties.desired.$version + 1);
    assert.notEqual(after.etag, before.etag);
    const delta = await pushed;
    assert.deepEqual(delta.nested, { a: 1 });
    assert.equal(delta.$version, after.properties.desired.$version);
    assert.equal(twinB.properties.desired.$version, after.properties.desired.$version);
    assert.equal(twinB.properties.desired.mode, 'eco');
  });

  await t.test('updateModuleTwin with the etag read is applied; with a stale etag it is 412', async () => {
    const { responseBody: before } = await withTimeout(registry.getModuleTwin('edge1', 'B'), 10000, 'getModuleTwin');
    const pushed = nextDesired(twinB, (d) => d.threshold === 9, 'the patch at B');
    const patch = { properties: { desired: { threshold: 9, nested: { a: null, b: 2 } } } };
    const { responseBody: after } = await withTimeout(registry.updateModuleTwin('edge1', 'B', patch, before.etag), 10000, 'updateModuleTwin etag');
    assert.equal(lastIfMatch(), `"${before.etag}"`);
    assert.equal(after.properties.desired.$version, before.properties.desired.$version + 1);
    assert.deepEqual(after.properties.desired.nested, { b: 2 });
    const delta = await pushed;
    assert.equal(delta.$version, after.properties.desired.$version);
    assert.deepEqual(twinB.properties.desired.nested, { b: 2 });

    // `before.etag` no longer names the twin: refused, and nothing changes.
    await assert.rejects(
      withTimeout(registry.updateModuleTwin('edge1', 'B', { properties: { desired: { threshold: 10 } } }, before.etag), 10000, 'stale updateModuleTwin'),
      (e) => statusOf(e) === 412 && e.name === 'InvalidEtagError',
    );
    const { responseBody: now } = await withTimeout(registry.getModuleTwin('edge1', 'B'), 10000, 'getModuleTwin');
    assert.equal(now.properties.desired.threshold, 9);
    assert.equal(now.properties.desired.$version, after.properties.desired.$version);
    assert.equal(now.etag, after.etag);
  });

  await t.test('getTwin / updateTwin of a leaf device: \'*\', the etag, a stale etag', async () => {
    const { responseBody: before } = await withTimeout(registry.getTwin(LEAF), 10000, 'getTwin');
    assert.equal(before.deviceId, LEAF);
    assert.equal(before.moduleId, undefined);
    assert.equal(before.connectionState, 'Connected');
    assert.ok(before.etag);

    const first = nextDesired(twinLeaf, (d) => d.interval === 30, 'the first patch at the leaf');
    const { responseBody: mid } = await withTimeout(
      registry.updateTwin(LEAF, { properties: { desired: { interval: 30 } } }, '*'), 10000, 'updateTwin *');
    assert.equal(lastIfMatch(), '"*"');
    assert.equal(mid.properties.desired.$version, before.properties.desired.$version + 1);
    assert.equal((await first).$version, mid.properties.desired.$version);

    const second = nextDesired(twinLeaf, (d) => d.interval === 60, 'the second patch at the leaf');
    const { responseBody: after } = await withTimeout(
      registry.updateTwin(LEAF, { properties: { desired: { interval: 60, unit: 's' } } }, mid.etag), 10000, 'updateTwin etag');
    assert.equal(lastIfMatch(), `"${mid.etag}"`);
    assert.equal(after.properties.desired.$version, mid.properties.desired.$version + 1);
    const delta = await second;
    assert.equal(delta.$version, after.properties.desired.$version);
    assert.equal(delta.unit, 's');
    assert.equal(twinLeaf.properties.desired.interval, 60);

    await assert.rejects(
      withTimeout(registry.updateTwin(LEAF, { properties: { desired: { interval: 90 } } }, mid.etag), 10000, 'stale updateTwin'),
      (e) => statusOf(e) === 412,
    );
    const { responseBody: now } = await withTimeout(registry.getTwin(LEAF), 10000, 'getTwin');
    assert.equal(now.properties.desired.interval, 60);
    assert.equal(now.etag, after.etag);
  });

  await t.test('a leaf device\'s reported properties reach the service', async () => {
    await withTimeout(new Promise((resolve, reject) => {
      twinLeaf.properties.reported.update({ firmware: '1.2.3' }, (err) => (err ? reject(err) : resolve()));
    }), 10000, 'leaf reported update');
    const { responseBody: twin } = await withTimeout(registry.getTwin(LEAF), 10000, 'getTwin');
    assert.equal(twin.properties.reported.firmware, '1.2.3');
  });

  await t.test('invokeDeviceMethod(device, module, …) reaches the module and returns its answer', async () => {
    // onMethod attaches the method links in the background; the connect timeout covers that.
    const params = { methodName: 'echo', payload: { n: 7, s: 'x' }, responseTimeoutInSeconds: 10, connectTimeoutInSeconds: 10 };
    const { result } = await withTimeout(service.invokeDeviceMethod('edge1', 'B', params), 30000, 'invokeDeviceMethod B');
    assert.equal(result.status, 201);
    assert.deepEqual(result.payload, { got: { n: 7, s: 'x' }, method: 'echo', by: 'B' });
  });

  await t.test('invokeDeviceMethod(device, …) reaches the leaf device and returns its answer', async () => {
    const params = { methodName: 'reboot', payload: { delay: 5 }, responseTimeoutInSeconds: 10, connectTimeoutInSeconds: 10 };
    const { result } = await withTimeout(service.invokeDeviceMethod(LEAF, params), 30000, 'invokeDeviceMethod leaf');
    assert.equal(result.status, 202);
    assert.deepEqual(result.payload, { accepted: { delay: 5 }, method: 'reboot', by: LEAF });
  });

  await t.test('unknown identities are 404 for twins and methods', async () => {
    const params = { methodName: 'echo', payload: null, responseTimeoutInSeconds: 5 };
    await assert.rejects(withTimeout(service.invokeDeviceMethod('nobody', params), 10000, 'invoke nobody'), (e) => statusOf(e) === 404);
    await assert.rejects(withTimeout(registry.getTwin('nobody'), 10000, 'getTwin nobody'), (e) => statusOf(e) === 404);
    await assert.rejects(withTimeout(registry.getModuleTwin('edge1', 'Nobody'), 10000, 'getModuleTwin Nobody'), (e) => statusOf(e) === 404);
    await assert.rejects(
      withTimeout(registry.updateModuleTwin('edge1', 'Nobody', { properties: { desired: { a: 1 } } }, '*'), 10000, 'updateModuleTwin Nobody'),
      (e) => statusOf(e) === 404,
    );
  });
});
