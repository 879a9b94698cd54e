'use strict';
// AMQP over WebSockets: the Node SDK's AmqpWs transport (wss://{gateway}:443/$iothub/websocket,
// subprotocol AMQPWSB10) against the hub's HTTPS listener. Modules do over WebSockets what they
// do over AMQPS: outputs, inputs, twin read and patch, desired pushes, direct methods; a leaf
// device sends telemetry.
const test = require('node:test');
const assert = require('node:assert/strict');
const crypto = require('node:crypto');
const { Client: DeviceClient, Message } = require('azure-iot-device');
const { AmqpWs } = require('azure-iot-device-amqp');
const { openClient, scrape, startHub, withTimeout } = require('./hub');

const LEAF = 'leafws';
const LEAF_KEY = crypto.randomBytes(32).toString('base64');

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

/// The next input message at `client` for which `predicate` holds, completed.
function nextInput(client, predicate, what) {
  return withTimeout(new Promise((resolve) => {
    const handler = (inputName, msg) => {
      client.complete(msg, () => {});
      if (predicate(inputName, msg)) {
        client.removeListener('inputMessage', handler);
        resolve({ inputName, msg });
      }
    };
    client.on('inputMessage', handler);
  }), 15000, what);
}

test('modules and a leaf device over AmqpWs', async (t) => {
  const hub = await startHub({
    modules: { A: { 'properties.desired': { threshold: 5 } }, B: {} },
    routes: {
      aToB: 'FROM /messages/modules/A/outputs/out1 INTO BrokeredEndpoint("/modules/B/inputs/in1")',
      bToA: 'FROM /messages/modules/B/outputs/back INTO BrokeredEndpoint("/modules/A/inputs/fromB")',
      leafToB: `FROM /messages/* WHERE $connectionDeviceId = '${LEAF}' INTO BrokeredEndpoint("/modules/B/inputs/leaf")`,
    },
    extra: { devices: { [LEAF]: { primaryKey: LEAF_KEY } } },
    // Nothing listens on 5671 of this hub's address: every client here can only be on 443.
    amqpsPort: 0,
  });
  const clients = [];
  t.after(async () => {
    try {
      await withTimeout(Promise.all(clients.map((c) => c.close())), 10000, 'closing clients');
    } finally {
      await hub.stop();
    }
  });
  const a = await openClient(hub, 'A', AmqpWs);
  clients.push(a);
  const b = await openClient(hub, 'B', AmqpWs);
  clients.push(b);

  await t.test('an output of A reaches an input of B, and back', async () => {
    const atB = nextInput(b, (input) => input === 'in1', 'input at B');
    const msg = new Message(JSON.stringify({ t: 21.5 }));
    msg.messageId = 'ws-1';
    msg.properties.add('alert', 'high');
    await withTimeout(a.sendOutputEvent('out1', msg), 10000, 'sendOutputEvent A');
    const got = await atB;
    assert.equal(got.msg.messageId, 'ws-1');
    assert.equal(got.msg.data.toString(), JSON.stringify({ t: 21.5 }));
    assert.equal(got.msg.properties.getValue('alert'), 'high');

    const atA = nextInput(a, (input) => input === 'fromB', 'input at A');
    const back = new Message('pong');
    back.messageId = 'ws-2';
    await withTimeout(b.sendOutputEvent('back', back), 10000, 'sendOutputEvent B');
    assert.equal((await atA).msg.data.toString(), 'pong');
  });

  await t.test('twin: read, patch reported, receive a desired patch', async () => {
    const twin = await withTimeout(a.getTwin(), 10000, 'getTwin');
    assert.equal(twin.properties.desired.threshold, 5);
    await withTimeout(new Promise((resolve, reject) => {
      twin.properties.reported.update({ over: 'websocket' }, (err) => (err ? reject(err) : resolve()));
    }), 10000, 'reported update');
    const again = await withTimeout(a.getTwin(), 10000, 'getTwin again');
    assert.equal(again.properties.reported.over, 'websocket');
    const pushed = nextDesired(again, (d) => d.threshold === 9, 'desired patch over the WebSocket');
    await hub.rewrite((c) => { c.modules.A['properties.desired'] = { threshold: 9 }; });
    const delta = await pushed;
    assert.equal(delta.threshold, 9);
  });

  await t.test('a direct method to B over the WebSocket is answered', async () => {
    b.onMethod('echo', (request, response) => {
      response.send(200, { echoed: request.payload }, () => {});
    });
    const params = { methodName: 'echo', payload: { n: 3 }, responseTimeoutInSeconds: 10, connectTimeoutInSeconds: 10 };
    // The caller A uses the HTTPS method API on the same port its AMQP WebSocket runs on.
    const result = await withTimeout(a.invokeMethod('edge1', 'B', params), 20000, 'invokeMethod');
    assert.equal(result.status, 200);
    assert.deepEqual(result.payload, { echoed: { n: 3 } });
  });

  await t.test('a leaf device Client over AmqpWs sends telemetry', async () => {
    const cs = `HostName=test-hub.azure-devices.net;DeviceId=${LEAF};SharedAccessKey=${LEAF_KEY};GatewayHostName=${hub.host}`;
    const leaf = DeviceClient.fromConnectionString(cs, AmqpWs);
    clients.push(leaf);
    await withTimeout(leaf.setOptions({ ca: hub.caPem().toString() }), 5000, 'leaf setOptions');
    await withTimeout(leaf.open(), 15000, 'leaf open');
    const atB = nextInput(b, (input) => input === 'leaf', 'leaf telemetry at B');
    const m = new Message('from the leaf');
    m.messageId = 'leaf-1';
    await withTimeout(leaf.sendEvent(m), 10000, 'leaf sendEvent');
    const got = await atB;
    assert.equal(got.msg.data.toString(), 'from the leaf');
    assert.equal(got.msg.messageId, 'leaf-1');
  });

  const metrics = await scrape(hub.metricsUrl);
  assert.match(metrics, /edgehub_client_connect_success_total\{[^}]*id="edge1\/A"/);
  assert.match(metrics, new RegExp(`edgehub_client_connect_success_total\\{[^}]*id="${LEAF}"`));
});
