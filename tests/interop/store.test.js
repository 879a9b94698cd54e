'use strict';
// Store-and-forward through the real Node SDK: `edgehub_queue_length` says exactly what the hub
// holds while the receiver is offline, across a restart, after messages expire, and once the
// receiver has taken everything.
const test = require('node:test');
const assert = require('node:assert/strict');
const { Message } = require('azure-iot-device');
const { fromEnv, scrape, startHub, withTimeout } = require('./hub');

/// The sum of a series' samples whose labels include `labels` (0 when there is none).
function sample(text, name, labels) {
  let sum = 0;
  for (const line of text.split('\n')) {
    if (!line.startsWith(`${name}{`)) continue;
    const [series, value] = line.split(/\s+/);
    if (Object.entries(labels).every(([k, v]) => series.includes(`${k}="${v}"`))) sum += Number(value);
  }
  return sum;
}

/// Scrapes until `check(metrics text)` holds; fails after `ms`.
async function until(hub, check, ms, what) {
  const deadline = Date.now() + ms;
  for (;;) {
    const text = await scrape(hub.metricsUrl);
    if (check(text)) return text;
    if (Date.now() > deadline) throw new Error(`timed out: ${what}\n${text}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

test('the queue-length metric matches the store: offline, after a restart, after expiry, drained', async (t) => {
  const hub = await startHub({
    routes: {
      kept: 'FROM /messages/modules/A/outputs/out1 INTO BrokeredEndpoint("/modules/B/inputs/in1")',
      shortLived: {
        route: 'FROM /messages/modules/A/outputs/out2 INTO BrokeredEndpoint("/modules/B/inputs/in2")',
        priority: 0,
        timeToLiveSecs: 1,
      },
    },
  });
  const clients = [];
  t.after(async () => {
    try {
      await withTimeout(Promise.all(clients.map((c) => c.close())), 10000, 'closing clients');
    } finally {
      await hub.stop();
    }
  });
  const length = (text, input) => sample(text, 'edgehub_queue_length', { endpoint: `edge1/B/${input}` });

  // B is offline: A's messages wait in the store, and the metric counts each one.
  const a = await fromEnv(hub.env('A'));
  clients.push(a);
  await withTimeout(a.open(), 15000, 'A open');
  for (let i = 0; i < 20; i += 1) {
    const m = new Message(`kept ${i}`);
    m.messageId = `kept-${i}`;
    await withTimeout(a.sendOutputEvent('out1', m), 10000, 'sendOutputEvent out1');
  }
  let text = await scrape(hub.metricsUrl);
  assert.equal(length(text, 'in1'), 20);

  // Messages that expire leave the queue, and the metric, without a receiver.
  for (let i = 0; i < 5; i += 1) {
    await withTimeout(a.sendOutputEvent('out2', new Message(`short ${i}`)), 10000, 'sendOutputEvent out2');
  }
  text = await until(hub, (m) => length(m, 'in2') === 0 && sample(m, 'edgehub_messages_dropped_total', { reason: 'ttl_expiry' }) === 5,
    15000, 'the five short-lived messages expire');
  assert.equal(length(text, 'in1'), 20);

  // A restart (with A gone) loads the same queue: the metric says 20 before anyone connects.
  await withTimeout(a.close(), 10000, 'A close');
  clients.length = 0;
  await hub.restart();
  text = await scrape(hub.metricsUrl);
  assert.equal(length(text, 'in1'), 20);
  assert.equal(length(text, 'in2'), 0);

  // B takes everything, in order; the queue and the metric go to zero.
  const b = await fromEnv(hub.env('B'));
  clients.push(b);
  const received = [];
  const all = new Promise((resolve) => {
    b.on('inputMessage', (input, msg) => {
      received.push(`${input}:${msg.messageId}`);
      b.complete(msg, () => {});
      if (received.length === 20) resolve();
    });
  });
  await withTimeout(b.open(), 15000, 'B open');
  await withTimeout(all, 15000, 'B receives the 20 kept messages');
  assert.deepEqual(received, Array.from({ length: 20 }, (_, i) => `in1:kept-${i}`));
  await until(hub, (m) => length(m, 'in1') === 0, 10000, 'the queue drains to zero');
});
