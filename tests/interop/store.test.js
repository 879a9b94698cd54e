'use strict';
// Store-and-forward through the real Node SDK: `edgehub_queue_length` says exactly what the hub
// holds while the receiver is offline, across a restart, after messages expire, and once the
// receiver has taken everything.
const test = require('node:test');
const assert = require('node:assert/strict');
const { Message } = require('azure-iot-device');
const { NoRetry } = require('azure-iot-common');
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

const A_TO_B = 'FROM /messages/modules/A/outputs/out1 INTO BrokeredEndpoint("/modules/B/inputs/in1")';

/// A hub for test `t` with `routes`, and the list of SDK clients it closes (then the hub) when
/// the test ends.
async function hubFor(t, routes = { aToB: A_TO_B }) {
  const hub = await startHub({ routes });
  const clients = [];
  t.after(async () => {
    try {
      await withTimeout(Promise.allSettled(clients.map((c) => c.close())), 10000, 'closing clients');
    } finally {
      await hub.stop();
    }
  });
  return { hub, clients };
}

test('the queue-length metric matches the store: offline, after a restart, after expiry, drained', async (t) => {
  const { hub, clients } = await hubFor(t, {
    kept: A_TO_B,
    shortLived: {
      route: 'FROM /messages/modules/A/outputs/out2 INTO BrokeredEndpoint("/modules/B/inputs/in2")',
      priority: 0,
      timeToLiveSecs: 1,
    },
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

test('a full store refuses the SDK\'s message with resource-limit-exceeded and loses nothing accepted', async (t) => {
  const { hub, clients } = await hubFor(t);
  // The cap comes with a config reload, which applies it to the running store.
  await hub.rewrite((c) => { c.$edgeHub.storeAndForwardConfiguration.storeLimits = { maxSizeBytes: 20000 }; });
  const a = await fromEnv(hub.env('A'));
  clients.push(a);
  await withTimeout(a.open(), 15000, 'A open');
  const accepted = [];
  let refusal;
  for (let i = 0; i < 100 && !refusal; i += 1) {
    const m = new Message('x'.repeat(1000));
    m.messageId = `m-${i}`;
    try {
      await withTimeout(a.sendOutputEvent('out1', m), 10000, 'sendOutputEvent');
      accepted.push(m.messageId);
    } catch (e) {
      refusal = e;
    }
  }
  assert.ok(refusal, 'the store filled up');
  assert.equal(refusal.name, 'IotHubQuotaExceededError', String(refusal));
  assert.equal(refusal.amqpError.condition, 'amqp:resource-limit-exceeded');
  assert.match(refusal.amqpError.description, /maxSizeBytes/);
  assert.ok(accepted.length > 5, `${accepted.length} accepted`);

  const b = await fromEnv(hub.env('B'));
  clients.push(b);
  // Resolved once every message is completed, so closing does not race a completion.
  const received = [];
  let completed = 0;
  const all = new Promise((resolve) => {
    b.on('inputMessage', (_input, msg) => {
      received.push(msg.messageId);
      b.complete(msg, () => {
        completed += 1;
        if (completed === accepted.length) resolve();
      });
    });
  });
  await withTimeout(b.open(), 15000, 'B open');
  await withTimeout(all, 15000, 'B receives every accepted message');
  assert.deepEqual(received, accepted);
});

test('SIGKILL under load from the SDK: every acknowledged message is delivered after the restart', async (t) => {
  const { hub, clients } = await hubFor(t);
  const a = await fromEnv(hub.env('A'));
  clients.push(a);
  // A does not reconnect after the kill (it would keep retrying for minutes otherwise).
  a.setRetryPolicy(new NoRetry());
  await withTimeout(a.open(), 15000, 'A open');
  // A keeps 20 sends in flight; the hub is killed once 300 are acknowledged.
  const acked = new Set();
  const sent = new Set();
  let next = 0;
  let killed;
  const window = 20;
  await withTimeout(new Promise((resolve) => {
    const sendOne = () => {
      if (killed) return;
      const id = `m-${next}`;
      next += 1;
      sent.add(id);
      const m = new Message(`body ${id}`);
      m.messageId = id;
      a.sendOutputEvent('out1', m).then(() => {
        if (killed) return;
        acked.add(id);
        if (acked.size >= 300) {
          killed = hub.kill();
          resolve();
        } else {
          sendOne();
        }
      }, () => {});
    };
    for (let i = 0; i < window; i += 1) sendOne();
  }), 60000, '300 acknowledged sends');
  const exit = await killed;
  assert.equal(exit.signal, 'SIGKILL');
  const ackedAtKill = new Set(acked);
  // A goes away with the hub; what it had in flight was not acknowledged.
  await withTimeout(a.close().catch(() => {}), 10000, 'A close').catch(() => {});
  clients.length = 0;

  await hub.resume();
  const b = await fromEnv(hub.env('B'));
  clients.push(b);
  const received = [];
  let completed = 0;
  const missing = () => [...ackedAtKill].filter((id) => !received.includes(id));
  const all = new Promise((resolve) => {
    b.on('inputMessage', (_input, msg) => {
      received.push(msg.messageId);
      b.complete(msg, () => {
        completed += 1;
        if (missing().length === 0) resolve();
      });
    });
  });
  await withTimeout(b.open(), 15000, 'B open');
  await withTimeout(all, 20000, 'every acknowledged message after the restart');
  // Let the extras (messages that were in flight at the kill) arrive and be completed too, so
  // the counts below are final and closing does not race a delivery.
  const queue = (m) => sample(m, 'edgehub_queue_length', { endpoint: 'edge1/B/in1' });
  await until(hub, (m) => queue(m) === 0 && completed === received.length, 15000, 'the queue drained');
  // Nothing invented; nothing acknowledged lost; extras only from A's window in flight at the kill;
  // order kept.
  assert.ok(received.every((id) => sent.has(id)));
  const extras = new Set(received.filter((id) => !ackedAtKill.has(id)));
  assert.ok(extras.size <= window, `${extras.size} unacknowledged messages delivered`);
  const order = received.map((id) => Number(id.slice(2)));
  const firsts = order.filter((n, i) => order.indexOf(n) === i);
  assert.deepEqual(firsts, [...firsts].sort((x, y) => x - y));
});
