'use strict';
// Authentication and authorisation: every refusal with its exact AMQP condition.
const test = require('node:test');
const assert = require('node:assert/strict');
const { ModuleClient, Message } = require('azure-iot-device');
const { Amqp } = require('azure-iot-device-amqp');
const { startHub, withTimeout, sasToken, scrape } = require('./hub');
const { connect, putToken, attach, attachOpen } = require('./rhea-client');

const HUB = 'test-hub.azure-devices.net';
const hour = () => Math.floor(Date.now() / 1000) + 3600;

test('refusals', async (t) => {
  const hub = await startHub();
  t.after(() => hub.stop());
  const keyA = hub.moduleKey('A');
  const keyB = hub.moduleKey('B');

  await t.test('the SDK with a wrong key cannot open', async () => {
    const env = hub.env('A');
    const cs = env.EdgeHubConnectionString.replace(/SharedAccessKey=[^;]+/, `SharedAccessKey=${keyB}`);
    const client = ModuleClient.fromConnectionString(cs, Amqp);
    client.setOptions({ ca: hub.caPem().toString() });
    await assert.rejects(withTimeout(client.open(), 15000, 'open'), (e) => e.constructor.name === 'UnauthorizedError');
    await client.close();
  });

  await t.test('put-token statuses', async () => {
    const { conn, opened } = connect(hub);
    await opened;
    const resA = `${HUB}/devices/edge1/modules/A`;
    assert.equal((await putToken(conn, sasToken(resA, keyA, hour()))).status, 200);
    const expired = Math.floor(Date.now() / 1000) - 600;
    const r1 = await putToken(conn, sasToken(resA, keyA, expired));
    assert.equal(r1.status, 401);
    assert.match(r1.description, /expired/);
    // A token naming module B, signed with A's key.
    const r2 = await putToken(conn, sasToken(`${HUB}/devices/edge1/modules/B`, keyA, hour()));
    assert.equal(r2.status, 401);
    assert.match(r2.description, /signature/);
    const r3 = await putToken(conn, sasToken(`${HUB}/devices/edge1/modules/nobody`, keyA, hour()));
    assert.equal(r3.status, 401);
    const r4 = await putToken(conn, 'SharedAccessSignature garbage');
    assert.equal(r4.status, 400);
    const r5 = await putToken(conn, sasToken(`elsewhere.example/devices/edge1/modules/A`, keyA, hour()));
    assert.equal(r5.status, 401);
    conn.close();
  });

  await t.test("A cannot attach B's links; unknown nodes and module C2D are refused", async () => {
    const { conn, opened } = connect(hub);
    await opened;
    assert.equal((await putToken(conn, sasToken(`${HUB}/devices/edge1/modules/A`, keyA, hour()))).status, 200);
    const B = '/devices/edge1/modules/B';
    for (const [role, addr] of [
      ['receiver', `${B}/messages/events`],
      ['sender', `${B}/messages/events`],
      ['sender', `${B}/twin`],
      ['receiver', `${B}/twin`],
      ['sender', `${B}/methods/devicebound`],
      ['receiver', `${B}/methods/devicebound`],
      ['receiver', '/devices/edge1/messages/devicebound'],
    ]) {
      const r = await attach(conn, role, addr);
      assert.equal(r.condition, 'amqp:unauthorized-access', `${role} ${addr}: ${JSON.stringify(r)}`);
    }
    const nf = await attach(conn, 'receiver', '/devices/edge1/modules/A/nothing');
    assert.equal(nf.condition, 'amqp:not-found');
    const c2d = await attach(conn, 'receiver', '/devices/edge1/modules/A/messages/devicebound');
    assert.equal(c2d.condition, 'amqp:not-allowed');
    assert.match(c2d.description, /modules cannot receive cloud-to-device messages/);
    const own = await attachOpen(conn, 'receiver', '/devices/edge1/modules/A/messages/events');
    assert.equal(own.state, 'open');
    conn.close();
  });

  await t.test('without a token nothing attaches', async () => {
    const { conn, opened } = connect(hub);
    await opened;
    const r = await attach(conn, 'sender', '/devices/edge1/modules/A/messages/events');
    assert.equal(r.condition, 'amqp:unauthorized-access');
    conn.close();
  });

  await t.test('SASL PLAIN with the token as password', async () => {
    const good = connect(hub, {
      username: 'edge1/modules/A@sas.test-hub',
      password: sasToken(`${HUB}/devices/edge1/modules/A`, keyA, hour()),
    });
    await good.opened;
    const r = await attachOpen(good.conn, 'sender', '/devices/edge1/modules/A/messages/events');
    assert.equal(r.state, 'open');
    const refusedB = await attach(good.conn, 'sender', '/devices/edge1/modules/B/messages/events');
    assert.equal(refusedB.condition, 'amqp:unauthorized-access');
    good.conn.close();
    const bad = connect(hub, {
      username: 'edge1/modules/A@sas.test-hub',
      password: sasToken(`${HUB}/devices/edge1/modules/A`, keyB, hour()),
    });
    await assert.rejects(bad.opened);
  });

  const metrics = await scrape(hub.metricsUrl);
  assert.match(metrics, /edgehub_client_connect_failed_total\{[^}]*reason="not_authenticated"/);
});
