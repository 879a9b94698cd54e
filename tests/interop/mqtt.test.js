'use strict';
// The Node SDK over MQTT (azure-iot-device-mqtt: `Mqtt` on 8883 and `MqttWs`, MQTT over
// WebSockets on 443) against edgehub, mixed with AMQP modules on the same hub: an MQTT module's
// output routed to an AMQP module's input and back, twin get / patch / desired pushes, a direct
// method from another module, and a leaf device sending telemetry.
const test = require('node:test');
const assert = require('node:assert/strict');
const crypto = require('node:crypto');
const { Message } = require('azure-iot-device');
const { fromEnv, scrape, startHub, withTimeout } = require('./hub');

const IOTHUB = 'test-hub.azure-devices.net';
const LEAF = 'leaf1';
const LEAF_KEY = crypto.randomBytes(32).toString('base64');

const { Mqtt, MqttWs } = require('azure-iot-device-mqtt');
/// Each MQTT transport of the SDK, with the `edgehub_open_connections` label it is counted under.
const TRANSPORTS = [['Mqtt', Mqtt, 'mqtt'], ['MqttWs', MqttWs, 'mqttws']];

/// A ModuleClient over MQTT made from the edge environment, as a module makes it.
function fromEnvMqtt(env, transport) {
  const { ModuleClient } = require('azure-iot-device');
  const saved = { ...process.env };
  Object.assign(process.env, env);
  return new Promise((resolve, reject) => {
    ModuleClient.fromEnvironment(transport, (err, client) => {
      process.env = saved;
      if (err) reject(err);
      else resolve(client);
    });
  });
}

for (const [name, transport, label] of TRANSPORTS) {
test(`an MQTT module (${name}) and an AMQP module exchange messages, twins and methods`, async (t) => {
  const hub = await startHub({
    modules: { A: {}, B: {} },
    routes: {
      mqttToAmqp: 'FROM /messages/modules/A/outputs/out1 INTO BrokeredEndpoint("/modules/B/inputs/in1")',
      amqpToMqtt: 'FROM /messages/modules/B/outputs/back INTO BrokeredEndpoint("/modules/A/inputs/in2")',
    },
  });
  const a = await fromEnvMqtt(hub.env('A'), transport);
  const b = await fromEnv(hub.env('B'));
  t.after(async () => {
    try {
      await withTimeout(Promise.all([a.close(), b.close()]), 10000, 'closing clients');
    } finally {
      await hub.stop();
    }
  });
  await withTimeout(a.open(), 15000, 'A (MQTT) open');
  await withTimeout(b.open(), 15000, 'B (AMQP) open');

  await t.test('A (MQTT) output → B (AMQP) input → B output → A (MQTT) input', async () => {
    const atB = new Promise((resolve) => {
      b.on('inputMessage', (inputName, msg) => {
        b.complete(msg, () => {});
        resolve({ inputName, msg });
      });
    });
    const atA = new Promise((resolve) => {
      a.on('inputMessage', (inputName, msg) => {
        a.complete(msg, () => {});
        resolve({ inputName, msg });
      });
    });
    // The SDK subscribes to its inputs in the background; a message routed before that waits
    // in A's queue and is delivered once the subscription is in.
    const msg = new Message(JSON.stringify({ temperature: 21.5 }));
    msg.messageId = 'mqtt-1';
    msg.contentType = 'application/json';
    msg.contentEncoding = 'utf-8';
    msg.properties.add('alert', 'high');
    await withTimeout(a.sendOutputEvent('out1', msg), 10000, 'A sendOutputEvent');
    const got = await withTimeout(atB, 15000, 'B receives');
    assert.equal(got.inputName, 'in1');
    assert.equal(got.msg.messageId, 'mqtt-1');
    assert.equal(got.msg.contentType, 'application/json');
    assert.equal(got.msg.contentEncoding, 'utf-8');
    assert.equal(got.msg.properties.getValue('alert'), 'high');
    assert.equal(got.msg.data.toString(), JSON.stringify({ temperature: 21.5 }));

    const reply = new Message('pong');
    reply.messageId = 'amqp-1';
    reply.properties.add('k', 'v w');
    await withTimeout(b.sendOutputEvent('back', reply), 10000, 'B sendOutputEvent');
    const back = await withTimeout(atA, 15000, 'A receives');
    assert.equal(back.inputName, 'in2');
    assert.equal(back.msg.messageId, 'amqp-1');
    assert.equal(back.msg.properties.getValue('k'), 'v w');
    assert.equal(back.msg.data.toString(), 'pong');
  });

  await t.test('twin: get, reported patch, desired push with $version', async () => {
    const twin = await withTimeout(a.getTwin(), 10000, 'A getTwin');
    assert.equal(typeof twin.properties.desired.$version, 'number');
    await withTimeout(new Promise((resolve, reject) => {
      twin.properties.reported.update({ mqtt: true }, (err) => (err ? reject(err) : resolve()));
    }), 10000, 'reported update');
    await withTimeout(twin.get(), 10000, 'A getTwin again');
    assert.equal(twin.properties.reported.mqtt, true);
    const desired = new Promise((resolve) => {
      twin.on('properties.desired', (delta) => {
        if (delta.speed === 5) resolve(delta);
      });
    });
    await hub.rewrite((c) => { c.modules.A = { 'properties.desired': { speed: 5 } }; });
    const delta = await withTimeout(desired, 10000, 'desired push');
    assert.equal(typeof delta.$version, 'number');
  });

  await t.test('a direct method from the AMQP module reaches the MQTT module', async () => {
    a.onMethod('reset', (request, response) => {
      response.send(200, { got: request.payload, method: request.methodName }, () => {});
    });
    const params = { methodName: 'reset', payload: { n: 7 }, responseTimeoutInSeconds: 10, connectTimeoutInSeconds: 10 };
    const result = await withTimeout(b.invokeMethod('edge1', 'A', params), 20000, 'invokeMethod');
    assert.equal(result.status, 200);
    assert.deepEqual(result.payload, { got: { n: 7 }, method: 'reset' });
  });

  const metrics = await scrape(hub.metricsUrl);
  assert.match(metrics, new RegExp(`edgehub_open_connections\\{[^}]*protocol="${label}"[^}]*\\} 1`));
  assert.match(metrics, /edgehub_open_connections\{[^}]*protocol="amqp"[^}]*\} 1/);
});

test(`a leaf device over MQTT (${name}) sends telemetry that is routed to a module`, async (t) => {
  const hub = await startHub({
    modules: { B: {} },
    extra: { devices: { [LEAF]: { primaryKey: LEAF_KEY } } },
    routes: {
      leaf: `FROM /messages/* WHERE $connectionDeviceId = '${LEAF}' INTO BrokeredEndpoint("/modules/B/inputs/leaf")`,
    },
  });
  const { Client } = require('azure-iot-device');
  const leaf = Client.fromConnectionString(
    `HostName=${IOTHUB};DeviceId=${LEAF};SharedAccessKey=${LEAF_KEY};GatewayHostName=${hub.host}`, transport);
  const b = await fromEnv(hub.env('B'));
  t.after(async () => {
    try {
      await withTimeout(Promise.all([leaf.close(), b.close()]), 10000, 'closing clients');
    } finally {
      await hub.stop();
    }
  });
  await withTimeout(leaf.setOptions({ ca: hub.caPem().toString() }), 5000, 'leaf setOptions');
  await withTimeout(leaf.open(), 15000, 'leaf open');
  await withTimeout(b.open(), 15000, 'B open');
  const atB = new Promise((resolve) => {
    b.on('inputMessage', (inputName, msg) => {
      b.complete(msg, () => {});
      resolve({ inputName, msg });
    });
  });
  const msg = new Message('from the leaf');
  msg.messageId = 'leaf-1';
  msg.properties.add('site', 'north');
  await withTimeout(leaf.sendEvent(msg), 10000, 'leaf sendEvent');
  const got = await withTimeout(atB, 15000, 'B receives');
  assert.equal(got.inputName, 'leaf');
  assert.equal(got.msg.messageId, 'leaf-1');
  assert.equal(got.msg.properties.getValue('site'), 'north');
  assert.equal(got.msg.data.toString(), 'from the leaf');
});
}
