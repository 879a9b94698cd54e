'use strict';
// The IoT Hub service SDK (azure-iothub) against the hub's service API: a direct method on a
// Node SDK module, reading its module twin, patching the desired properties with the etag (the
// module receives the patch), and reading back what the module reported.
const test = require('node:test');
const assert = require('node:assert/strict');
const crypto = require('node:crypto');
const { Client, Registry } = require('azure-iothub');
const { openClient, startHub, trustHub, withTimeout } = require('./hub');

// The service SDK always dials port 443 of the connection string's HostName, so this hub listens
// on 443 of its own loopback address.
const HOST = '127.0.0.31';
const POLICY = 'service';
const KEY = crypto.randomBytes(32).toString('base64');
const CONNECTION_STRING = `HostName=${HOST};SharedAccessKeyName=${POLICY};SharedAccessKey=${KEY}`;

function statusOf(err) {
  return err && err.response && err.response.statusCode;
}

function nextDesired(twin, predicate) {
  return new Promise((resolve) => {
    const handler = (delta) => {
      if (predicate(delta)) {
        twin.removeListener('properties.desired', handler);
        resolve(delta);
      }
    };
    twin.on('properties.desired', handler);
  });
}

function updateReported(twin, patch) {
  return withTimeout(new Promise((resolve, reject) => {
    twin.properties.reported.update(patch, (err) => (err ? reject(err) : resolve()));
  }), 10000, 'reported update');
}

test('the service SDK against the hub', async (t) => {
  const hub = await startHub({
    host: HOST,
    modules: { A: {}, B: { 'properties.desired': { mode: 'eco' } } },
    extra: { servicePolicies: { [POLICY]: { primaryKey: KEY } } },
  });
  let b;
  t.after(async () => {
    try {
      if (b) await withTimeout(b.close(), 10000, 'closing B');
    } finally {
      await hub.stop();
    }
  });
  b = await openClient(hub, 'B');
  b.onMethod('echo', (request, response) => {
    response.send(200, { got: request.payload, method: request.methodName }, () => {});
  });

  const client = Client.fromConnectionString(CONNECTION_STRING);
  const registry = Registry.fromConnectionString(CONNECTION_STRING);
  trustHub(client, hub.caPem());
  trustHub(registry, hub.caPem());

  await t.test('invokeDeviceMethod reaches the module and returns its answer', async () => {
    // onMethod attaches the method links in the background; the connect timeout covers that.
    const params = { methodName: 'echo', payload: { n: 7 }, responseTimeoutInSeconds: 10, connectTimeoutInSeconds: 10 };
    const { result } = await withTimeout(client.invokeDeviceMethod('edge1', 'B', params), 30000, 'invokeDeviceMethod');
    assert.equal(result.status, 200);
    assert.deepEqual(result.payload, { got: { n: 7 }, method: 'echo' });
  });

  await t.test('a module that is not connected is 404, an unknown one too', async () => {
    const params = { methodName: 'echo', payload: null, responseTimeoutInSeconds: 5 };
    await assert.rejects(withTimeout(client.invokeDeviceMethod('edge1', 'A', params), 20000, 'invoke A'), (e) => statusOf(e) === 404);
    await assert.rejects(withTimeout(client.invokeDeviceMethod('edge1', 'Nobody', params), 20000, 'invoke Nobody'), (e) => statusOf(e) === 404);
  });

  const twinB = await withTimeout(b.getTwin(), 10000, 'B getTwin');

  await t.test('getModuleTwin returns the twin with an etag', async () => {
    const { responseBody: twin } = await withTimeout(registry.getModuleTwin('edge1', 'B'), 10000, 'getModuleTwin');
    assert.equal(twin.deviceId, 'edge1');
    assert.equal(twin.moduleId, 'B');
    assert.equal(twin.properties.desired.mode, 'eco');
    assert.equal(typeof twin.properties.desired.$version, 'number');
    assert.equal(twin.connectionState, 'Connected');
    assert.ok(twin.etag && twin.etag !== '*');
  });

  await t.test('updateModuleTwin with the etag: merged, and pushed to the module', async () => {
    const { responseBody: before } = await withTimeout(registry.getModuleTwin('edge1', 'B'), 10000, 'getModuleTwin');
    const pushed = withTimeout(nextDesired(twinB, (d) => d.threshold === 9), 10000, 'desired patch at B');
    const patch = { tags: { site: 'north' }, properties: { desired: { threshold: 9, limits: { max: 3 } } } };
    const { responseBody: after } = await withTimeout(registry.updateModuleTwin('edge1', 'B', patch, before.etag), 10000, 'updateModuleTwin');
    assert.equal(after.properties.desired.threshold, 9);
    assert.equal(after.properties.desired.mode, 'eco', 'a merge, not a replacement');
    assert.equal(after.properties.desired.$version, before.properties.desired.$version + 1);
    assert.notEqual(after.etag, before.etag);
    const delta = await pushed;
    assert.deepEqual(delta.limits, { max: 3 });
    assert.equal(delta.$version, after.properties.desired.$version);

    // The etag read before the patch is stale now.
    await assert.rejects(
      withTimeout(registry.updateModuleTwin('edge1', 'B', patch, before.etag), 10000, 'stale updateModuleTwin'),
      (e) => statusOf(e) === 412,
    );
    // Null deletes; Twin.update sends the etag it read.
    const deleted = withTimeout(nextDesired(twinB, (d) => d.threshold === null), 10000, 'delete at B');
    const { responseBody: twin } = await withTimeout(registry.getModuleTwin('edge1', 'B'), 10000, 'getModuleTwin');
    await withTimeout(twin.update({ properties: { desired: { threshold: null } } }), 10000, 'Twin.update');
    await deleted;
    assert.equal(twin.properties.desired.threshold, undefined);
    assert.equal(twin.properties.desired.mode, 'eco');
  });

  await t.test('what the module reports is visible to the service', async () => {
    await updateReported(twinB, { temperature: 21.5, state: { ok: true } });
    const { responseBody: twin } = await withTimeout(registry.getModuleTwin('edge1', 'B'), 10000, 'getModuleTwin');
    assert.equal(twin.properties.reported.temperature, 21.5);
    assert.deepEqual(twin.properties.reported.state, { ok: true });
  });

  await t.test('a wrong key is 401', async () => {
    const wrong = `HostName=${HOST};SharedAccessKeyName=${POLICY};SharedAccessKey=${crypto.randomBytes(32).toString('base64')}`;
    const r = Registry.fromConnectionString(wrong);
    trustHub(r, hub.caPem());
    await assert.rejects(withTimeout(r.getModuleTwin('edge1', 'B'), 10000, 'getModuleTwin'), (e) => statusOf(e) === 401 && e.name === 'UnauthorizedError');
  });
});
