'use strict';
// Cloud-to-device messages with the real SDKs: `azure-iothub` `Client.send` on a standalone hub's
// AMQPS port (a service-policy token on $cbs), received by leaf devices connected through the hub
// as their gateway, over AMQP (`azure-iot-device-amqp`: complete, reject, abandon) and MQTT
// (`azure-iot-device-mqtt`: the PUBACK completes); the service reads the feedback with
// `getFeedbackReceiver`. Refusals as IoT Hub's: an unknown device (DeviceNotFoundError) and the
// 51st message queued for a device (DeviceMaximumQueueDepthExceededError).
const test = require('node:test');
const assert = require('node:assert/strict');
const crypto = require('node:crypto');
const { Client: DeviceClient } = require('azure-iot-device');
const { Amqp } = require('azure-iot-device-amqp');
const { Mqtt } = require('azure-iot-device-mqtt');
const { Message } = require('azure-iot-common');
const { Client } = require('azure-iothub');
const { startHub, withTimeout, scrape } = require('./hub');

const IOTHUB = 'test-hub.azure-devices.net';
const POLICY = 'service';
const SERVICE_KEY = crypto.randomBytes(32).toString('base64');
const KEYS = {
  amqpLeaf: crypto.randomBytes(32).toString('base64'),
  mqttLeaf: crypto.randomBytes(32).toString('base64'),
  offline: crypto.randomBytes(32).toString('base64'),
};

/// A service `Client` on `hub`'s AMQPS port that trusts the hub's edge CA. The SDK has no option
/// for a private CA on its AMQP transport, whose `connect` passes `config.sslOptions` to the TLS
/// socket: the same call with the CA added.
function serviceClient(hub) {
  const cs = `HostName=${hub.host};SharedAccessKeyName=${POLICY};SharedAccessKey=${SERVICE_KEY}`;
  const service = Client.fromConnectionString(cs);
  const amqp = service._transport._amqp;
  const connect = amqp.connect.bind(amqp);
  amqp.connect = (config, done) => connect({ ...config, sslOptions: { ca: hub.caPem() } }, done);
  return service;
}

async function leafClient(hub, id, transport) {
  const cs = `HostName=${IOTHUB};DeviceId=${id};SharedAccessKey=${KEYS[id]};GatewayHostName=${hub.host}`;
  const leaf = DeviceClient.fromConnectionString(cs, transport);
  await withTimeout(leaf.setOptions({ ca: hub.caPem().toString() }), 5000, `${id} setOptions`);
  await withTimeout(leaf.open(), 15000, `${id} open`);
  return leaf;
}

/// Messages as they arrive on `leaf`, in order; `next()` resolves with the next one.
function inbox(leaf) {
  const queue = [];
  const waiters = [];
  leaf.on('message', (msg) => {
    const w = waiters.shift();
    if (w) w(msg);
    else queue.push(msg);
  });
  return {
    next(what) {
      if (queue.length) return Promise.resolve(queue.shift());
      return withTimeout(new Promise((resolve) => waiters.push(resolve)), 15000, what);
    },
    pending: () => queue.length,
  };
}

/// Feedback records as they arrive, flattened; `until(n)` resolves once `n` have.
function feedbackRecords(receiver) {
  const records = [];
  const waiters = [];
  receiver.on('message', (msg) => {
    assert.equal(msg.contentType, 'application/vnd.microsoft.iothub.feedback.json');
    records.push(...JSON.parse(msg.getData().toString()));
    for (const w of waiters.splice(0)) w();
  });
  return {
    records,
    until(n, what) {
      return withTimeout(new Promise((resolve) => {
        const check = () => (records.length >= n ? resolve(records) : waiters.push(check));
        check();
      }), 20000, what);
    },
  };
}

function c2d(body, id, ack, props = {}) {
  const m = new Message(body);
  m.messageId = id;
  m.correlationId = `corr-${id}`;
  if (ack) m.ack = ack;
  for (const [k, v] of Object.entries(props)) m.properties.add(k, v);
  return m;
}

test('C2D from the service SDK to leaf devices over AMQP and MQTT, with feedback', async (t) => {
  const hub = await startHub({
    extra: {
      devices: Object.fromEntries(Object.entries(KEYS).map(([id, k]) => [id, { primaryKey: k }])),
      servicePolicies: { [POLICY]: { primaryKey: SERVICE_KEY } },
    },
  });
  const closing = [];
  t.after(async () => {
    try {
      await withTimeout(Promise.all(closing.map((c) => c.close())), 15000, 'closing clients');
    } finally {
      await hub.stop();
    }
  });

  const service = serviceClient(hub);
  closing.push(service);
  await withTimeout(service.open(), 15000, 'service open');
  const { result: receiver } = await withTimeout(service.getFeedbackReceiver(), 15000, 'getFeedbackReceiver');
  const feedback = feedbackRecords(receiver);

  const leaf = await leafClient(hub, 'amqpLeaf', Amqp);
  closing.push(leaf);
  const received = inbox(leaf);

  await t.test('complete: the message arrives with its properties; feedback Success', async () => {
    const { result } = await withTimeout(
      service.send('amqpLeaf', c2d('{"n":1}', 'm-complete', 'full', { color: 'red' })), 15000, 'send');
    assert.equal(result.constructor.name, 'MessageEnqueued');
    const msg = await received.next('the first C2D message');
    assert.equal(msg.getData().toString(), '{"n":1}');
    assert.equal(msg.messageId, 'm-complete');
    assert.equal(msg.correlationId, 'corr-m-complete');
    assert.equal(msg.to, '/devices/amqpLeaf/messages/devicebound');
    assert.equal(msg.properties.getValue('color'), 'red');
    assert.equal(msg.ack, 'full');
    await withTimeout(leaf.complete(msg), 10000, 'complete');
    const [record] = await feedback.until(1, 'feedback for the completed message');
    assert.equal(record.originalMessageId, 'm-complete');
    assert.equal(record.deviceId, 'amqpLeaf');
    assert.equal(record.statusCode, 'Success');
    assert.ok(!Number.isNaN(Date.parse(record.enqueuedTimeUtc)), record.enqueuedTimeUtc);
  });

  await t.test('reject: dead-lettered, feedback Rejected', async () => {
    await withTimeout(service.send('amqpLeaf', c2d('r', 'm-reject', 'negative')), 15000, 'send');
    const msg = await received.next('the message to reject');
    assert.equal(msg.messageId, 'm-reject');
    await withTimeout(leaf.reject(msg), 10000, 'reject');
    const records = await feedback.until(2, 'feedback for the rejected message');
    assert.deepEqual(
      { id: records[1].originalMessageId, status: records[1].statusCode },
      { id: 'm-reject', status: 'Rejected' });
  });

  await t.test('abandon: delivered again with a higher delivery count, then completed', async () => {
    await withTimeout(service.send('amqpLeaf', c2d('a', 'm-abandon', 'positive')), 15000, 'send');
    const first = await received.next('the message to abandon');
    assert.equal(first.messageId, 'm-abandon');
    await withTimeout(leaf.abandon(first), 10000, 'abandon');
    const again = await received.next('the abandoned message again');
    assert.equal(again.messageId, 'm-abandon');
    assert.equal(again.getData().toString(), 'a');
    await withTimeout(leaf.complete(again), 10000, 'complete');
    const records = await feedback.until(3, 'feedback for the abandoned-then-completed message');
    assert.deepEqual(
      records.slice(2).map((r) => [r.originalMessageId, r.statusCode]),
      [['m-abandon', 'Success']]);
  });

  await t.test('an unknown device: DeviceNotFoundError', async () => {
    await assert.rejects(
      withTimeout(service.send('nobody', c2d('x', 'm-nobody')), 15000, 'send to nobody'),
      (err) => err.constructor.name === 'DeviceNotFoundError');
  });

  await t.test('the 51st message for a device: DeviceMaximumQueueDepthExceededError', async () => {
    for (let i = 0; i < 50; i += 1) {
      await withTimeout(service.send('offline', c2d(`q${i}`, `q-${i}`)), 15000, `send ${i}`);
    }
    await assert.rejects(
      withTimeout(service.send('offline', c2d('q50', 'q-50')), 15000, 'send 51st'),
      (err) => err.constructor.name === 'DeviceMaximumQueueDepthExceededError');
    // The offline device gets them when it comes: the first of them, in order.
    const late = await leafClient(hub, 'offline', Amqp);
    closing.push(late);
    const box = inbox(late);
    const first = await box.next('the first queued message');
    assert.equal(first.messageId, 'q-0');
    await withTimeout(late.complete(first), 10000, 'complete');
    const second = await box.next('the second queued message');
    assert.equal(second.messageId, 'q-1');
  });

  await t.test('over MQTT: devices/{d}/messages/devicebound/{bag}, completed by the PUBACK', async () => {
    const mqtt = await leafClient(hub, 'mqttLeaf', Mqtt);
    closing.push(mqtt);
    const box = inbox(mqtt);
    await withTimeout(service.send('mqttLeaf', c2d('{"m":1}', 'm-mqtt', 'positive', { k: 'v w' })), 15000, 'send');
    const msg = await box.next('the MQTT C2D message');
    assert.equal(msg.getData().toString(), '{"m":1}');
    assert.equal(msg.messageId, 'm-mqtt');
    assert.equal(msg.properties.getValue('k'), 'v w');
    await withTimeout(mqtt.complete(msg), 10000, 'complete');
    const records = await feedback.until(4, 'feedback for the MQTT message');
    assert.deepEqual(
      records.slice(3).map((r) => [r.originalMessageId, r.deviceId, r.statusCode]),
      [['m-mqtt', 'mqttLeaf', 'Success']]);
  });

  await t.test('metrics', async () => {
    const text = await scrape(hub.metricsUrl);
    assert.match(text, /edgehub_c2d_messages_received_total\{[^}]*source="service"[^}]*\} 54/);
    assert.match(text, /edgehub_c2d_messages_settled_total\{[^}]*outcome="rejected"[^}]*\} 1/);
    assert.match(text, /edgehub_c2d_messages_settled_total\{[^}]*outcome="abandoned"[^}]*\} 1/);
    assert.match(text, /edgehub_c2d_messages_refused_total\{[^}]*reason="queue_full"[^}]*\} 1/);
    assert.match(text, /edgehub_c2d_messages_refused_total\{[^}]*reason="device_not_found"[^}]*\} 1/);
  });
});

test('nested: a C2D sent to the parent\'s service API reaches a leaf device connected to the child', async (t) => {
  const CHILD = 'child1';
  const CHILD_KEY = crypto.randomBytes(32).toString('base64');
  const LEAF_KEY = KEYS.amqpLeaf;
  const parent = await startHub({
    extra: {
      devices: { [CHILD]: { primaryKey: CHILD_KEY, edge: true }, amqpLeaf: { primaryKey: LEAF_KEY } },
      servicePolicies: { [POLICY]: { primaryKey: SERVICE_KEY } },
    },
  });
  const closing = [];
  let child;
  t.after(async () => {
    try {
      await withTimeout(Promise.all(closing.map((c) => c.close())), 15000, 'closing clients');
    } finally {
      if (child) await child.stop();
      await parent.stop();
    }
  });
  child = await startHub({
    extra: {
      deviceId: CHILD,
      deviceKey: CHILD_KEY,
      devices: { amqpLeaf: { primaryKey: LEAF_KEY } },
      upstream: { hostname: parent.host, port: 5671, caCert: parent.caPath(), minBackoffMs: 50, maxBackoffMs: 400 },
    },
  });
  await child.waitLog(/upstream connected/);

  const service = serviceClient(parent);
  closing.push(service);
  await withTimeout(service.open(), 15000, 'service open');
  const { result: receiver } = await withTimeout(service.getFeedbackReceiver(), 15000, 'getFeedbackReceiver');
  const feedback = feedbackRecords(receiver);

  let leaf = await leafClient(child, 'amqpLeaf', Amqp);
  let box = inbox(leaf);
  await withTimeout(service.send('amqpLeaf', c2d('{"via":"child"}', 'n-1', 'full', { hop: '2' })), 15000, 'send');
  const first = await box.next('the C2D message through the child');
  assert.equal(first.messageId, 'n-1');
  assert.equal(first.correlationId, 'corr-n-1');
  assert.equal(first.getData().toString(), '{"via":"child"}');
  assert.equal(first.properties.getValue('hop'), '2');
  await withTimeout(leaf.complete(first), 10000, 'complete');
  let records = await feedback.until(1, 'the parent\'s feedback for the completed message');
  assert.deepEqual([records[0].originalMessageId, records[0].statusCode], ['n-1', 'Success']);

  await withTimeout(service.send('amqpLeaf', c2d('r', 'n-2', 'full')), 15000, 'send');
  const second = await box.next('the message to abandon, then reject');
  assert.equal(second.messageId, 'n-2');
  await withTimeout(leaf.abandon(second), 10000, 'abandon');
  const again = await box.next('the abandoned message again, through the parent');
  assert.equal(again.messageId, 'n-2');
  await withTimeout(leaf.reject(again), 10000, 'reject');
  records = await feedback.until(2, 'the parent\'s feedback for the rejected message');
  assert.deepEqual([records[1].originalMessageId, records[1].statusCode], ['n-2', 'Rejected']);

  // Offline: the child keeps the message until the device comes back.
  await withTimeout(leaf.close(), 10000, 'leaf close');
  await withTimeout(service.send('amqpLeaf', c2d('later', 'n-3', 'positive')), 15000, 'send while offline');
  leaf = await leafClient(child, 'amqpLeaf', Amqp);
  closing.push(leaf);
  box = inbox(leaf);
  const late = await box.next('the message queued while the device was away');
  assert.equal(late.messageId, 'n-3');
  await withTimeout(leaf.complete(late), 10000, 'complete');
  records = await feedback.until(3, 'the parent\'s feedback for the late message');
  assert.deepEqual([records[2].originalMessageId, records[2].statusCode], ['n-3', 'Success']);
  const childMetrics = await scrape(child.metricsUrl);
  assert.match(childMetrics, /edgehub_c2d_messages_received_total\{[^}]*source="upstream"[^}]*\} [34]/);
});
