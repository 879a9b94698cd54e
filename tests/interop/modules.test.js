'use strict';
// Two modules built with the real Azure IoT Node SDK, talking through edgehub.
const test = require('node:test');
const assert = require('node:assert/strict');
const { Message } = require('azure-iot-device');
const { fromEnv, openClient, scrape, startHub, withTimeout } = require('./hub');


test('output of A reaches input of B with body, ids and properties intact', async (t) => {
  const hub = await startHub({
    routes: {
      aToB: 'FROM /messages/modules/A/outputs/out1 INTO BrokeredEndpoint("/modules/B/inputs/in1")',
      noOutput: { route: 'FROM /messages/modules/A/* INTO BrokeredEndpoint("/modules/B/inputs/in2")', priority: 1 },
    },
  });
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

  const received = [];
  const inputs = new Promise((resolve) => {
    b.on('inputMessage', (inputName, msg) => {
      received.push({ inputName, msg });
      b.complete(msg, () => {});
      if (received.length === 3) resolve();
    });
  });

  const msg = new Message(JSON.stringify({ temperature: 21.5 }));
  msg.messageId = 'msg-1';
  msg.contentType = 'application/json';
  msg.contentEncoding = 'utf-8';
  msg.properties.add('alert', 'high');
  await withTimeout(a.sendOutputEvent('out1', msg), 10000, 'sendOutputEvent');

  const plain = new Message('no output');
  plain.messageId = 'msg-2';
  await withTimeout(a.sendEvent(plain), 10000, 'sendEvent');
  await withTimeout(inputs, 15000, 'three input messages at B');

  // msg-1 matches both routes, which target different endpoints: B gets it on in1 and on in2.
  // The message without an output only matches /messages/modules/A/*: in2.
  const byId = (id) => received.filter((r) => r.msg.messageId === id);
  const first = byId('msg-1');
  assert.deepEqual(first.map((r) => r.inputName).sort(), ['in1', 'in2']);
  const viaIn1 = first.find((r) => r.inputName === 'in1');
  assert.ok(viaIn1, 'msg-1 arrives on in1');
  assert.equal(viaIn1.msg.data.toString(), JSON.stringify({ temperature: 21.5 }));
  assert.equal(viaIn1.msg.contentType, 'application/json');
  assert.equal(viaIn1.msg.contentEncoding, 'utf-8');
  assert.equal(viaIn1.msg.properties.getValue('alert'), 'high');
  const second = byId('msg-2');
  assert.equal(second.length, 1);
  assert.equal(second[0].inputName, 'in2');
  assert.equal(second[0].msg.data.toString(), 'no output');

  const metrics = await scrape(hub.metricsUrl);
  assert.match(metrics, /edgehub_messages_received_total\{[^}]*id="edge1\/A"/);
  assert.match(metrics, /edgehub_client_connect_success_total\{[^}]*id="edge1\/B"/);
});

test('routes reload on SIGHUP without dropping connections', async (t) => {
  const hub = await startHub({ routes: {} });
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
  const got = [];
  const arrived = new Promise((resolve) => {
    b.on('inputMessage', (inputName, msg) => {
      got.push({ inputName, id: msg.messageId });
      b.complete(msg, () => {});
      resolve();
    });
  });
  const before = new Message('before');
  before.messageId = 'before';
  await withTimeout(a.sendOutputEvent('out1', before), 10000, 'send before reload');
  await hub.reload({ aToB: 'FROM /messages/modules/A/outputs/out1 INTO BrokeredEndpoint("/modules/B/inputs/late")' });
  const after = new Message('after');
  after.messageId = 'after';
  await withTimeout(a.sendOutputEvent('out1', after), 10000, 'send after reload');
  await withTimeout(arrived, 15000, 'message over the reloaded route');
  assert.deepEqual(got, [{ inputName: 'late', id: 'after' }], 'only the message sent after the reload is routed');
  const metrics = await scrape(hub.metricsUrl);
  assert.match(metrics, /edgehub_messages_dropped_total\{[^}]*reason="no_route"/);
});

test('a scrape taken under load passes promtool check metrics', async (t) => {
  const { spawnSync } = require('node:child_process');
  const hub = await startHub({
    routes: { aToB: 'FROM /messages/modules/A/outputs/out1 INTO BrokeredEndpoint("/modules/B/inputs/in1")' },
  });
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
  const total = 300;
  let seen = 0;
  const all = new Promise((resolve) => {
    b.on('inputMessage', (input, msg) => {
      b.complete(msg, () => {});
      seen += 1;
      if (seen === total) resolve();
    });
  });
  const sends = [];
  let scrapeUnderLoad;
  for (let i = 0; i < total; i++) {
    sends.push(a.sendOutputEvent('out1', new Message(`m${i}`)));
    if (i === total / 2) scrapeUnderLoad = scrape(hub.metricsUrl);
  }
  await withTimeout(Promise.all(sends), 30000, 'sends');
  await withTimeout(all, 30000, 'all messages at B');
  const last = await scrape(hub.metricsUrl);
  for (const text of [await scrapeUnderLoad, last]) {
    const r = spawnSync('promtool', ['check', 'metrics'], { input: text });
    assert.equal(r.status, 0, `promtool: ${r.stdout}${r.stderr}`);
  }
  for (const name of ['edgehub_messages_received_total', 'edgehub_messages_sent_total', 'edgehub_queue_length', 'edgehub_connected_clients']) {
    assert.match(last, new RegExp(`^${name}\\{[^}]*instance_number="`, 'm'), name);
  }
});
