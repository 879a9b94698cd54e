'use strict';
// Direct methods between two Node SDK modules through the hub's HTTPS method API.
const test = require('node:test');
const assert = require('node:assert/strict');
const { fromEnv, httpsPost, openClient, sasToken, scrape, startHub, withTimeout } = require('./hub');

const HUB = 'test-hub.azure-devices.net';
const hour = () => Math.floor(Date.now() / 1000) + 3600;

function statusOf(err) {
  return err && err.response && err.response.statusCode;
}

test('direct methods', async (t) => {
  const hub = await startHub({ modules: { A: {}, B: {}, C: {} } });
  const a = await fromEnv(hub.env('A'));
  const b = await fromEnv(hub.env('B'));
  t.after(async () => {
    try {
      await withTimeout(Promise.all([a.close(), b.close()]), 10000, 'closing clients');
    } finally {
      await hub.stop();
    }
  });
  await withTimeout(a.open(), 15000, 'A open');
  await withTimeout(b.open(), 15000, 'B open');
  const subscribed = new Promise((resolve) => {
    b.onMethod('echo', (request, response) => {
      response.send(201, { got: request.payload, method: request.methodName }, () => {});
    });
    b.onMethod('silent', () => {});
    // onMethod attaches the method links; a first call proves they are up.
    resolve();
  });
  await subscribed;

  await t.test('A calls B and gets B\'s status and payload', async () => {
    const params = { methodName: 'echo', payload: { n: 7 }, responseTimeoutInSeconds: 10, connectTimeoutInSeconds: 10 };
    const result = await withTimeout(a.invokeMethod('edge1', 'B', params), 20000, 'invokeMethod');
    assert.equal(result.status, 201);
    assert.deepEqual(result.payload, { got: { n: 7 }, method: 'echo' });
  });

  await t.test('a module that is not connected is 404', async () => {
    const params = { methodName: 'echo', payload: {}, responseTimeoutInSeconds: 5 };
    await assert.rejects(withTimeout(a.invokeMethod('edge1', 'C', params), 20000, 'invokeMethod C'), (e) => statusOf(e) === 404);
  });

  await t.test('a module that does not answer is 504 after the timeout', async () => {
    const params = { methodName: 'silent', payload: {}, responseTimeoutInSeconds: 5 };
    const started = Date.now();
    await assert.rejects(withTimeout(a.invokeMethod('edge1', 'B', params), 30000, 'invokeMethod silent'), (e) => statusOf(e) === 504);
    assert.ok(Date.now() - started >= 4500, 'waited for the response timeout');
  });

  const keyA = hub.moduleKey('A');
  const tokenA = sasToken(`${HUB}/devices/edge1/modules/A`, keyA, hour());
  const path = '/twins/edge1/modules/B/methods?api-version=2020-09-30';
  const body = { methodName: 'echo', payload: 1, responseTimeoutInSeconds: 5 };

  await t.test("A's token with another module's x-ms-edge-moduleId is 401", async () => {
    const r = await httpsPost(hub, path, { authorization: tokenA, 'x-ms-edge-moduleId': 'edge1/B' }, body);
    assert.equal(r.status, 401);
    assert.ok(r.body.message);
  });

  await t.test('a module of another device is 401', async () => {
    const other = sasToken(`${HUB}/devices/other/modules/X`, keyA, hour());
    const r = await httpsPost(hub, path, { authorization: other, 'x-ms-edge-moduleId': 'other/X' }, body);
    assert.equal(r.status, 401);
  });

  await t.test('bad requests are 400 with a message', async () => {
    const h = { authorization: tokenA, 'x-ms-edge-moduleId': 'edge1/A' };
    const cases = [
      [{ authorization: tokenA }, body],
      [h, '{not json'],
      [h, { payload: 1 }],
      [h, { ...body, methodName: 'm'.repeat(101) }],
      [h, { ...body, payload: 'x'.repeat(128 * 1024) }],
      [h, { ...body, responseTimeoutInSeconds: 4 }],
      [h, { ...body, connectTimeoutInSeconds: 301 }],
    ];
    for (const [headers, b] of cases) {
      const r = await httpsPost(hub, path, headers, b);
      assert.equal(r.status, 400, JSON.stringify(b).slice(0, 80));
      assert.match(r.headers['content-type'], /application\/json/);
      assert.ok(r.body.message);
    }
    const ok = await httpsPost(hub, path, h, body);
    assert.equal(ok.status, 200);
    assert.deepEqual(ok.body, { status: 201, payload: { got: 1, method: 'echo' } });
  });

  const metrics = await scrape(hub.metricsUrl);
  assert.match(metrics, /edgehub_direct_methods_total\{[^}]*from="edge1\/A"[^}]*to="edge1\/B"/);
});
