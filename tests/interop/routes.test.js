'use strict';
// Route conditions and priorities end to end with the Node SDK.
const test = require('node:test');
const assert = require('node:assert/strict');
const { Message } = require('azure-iot-device');
const { fromEnv, openClient, startHub, withTimeout } = require('./hub');

function json(id, body, props = {}) {
  const m = new Message(JSON.stringify(body));
  m.messageId = id;
  m.contentType = 'application/json';
  m.contentEncoding = 'utf-8';
  for (const [k, v] of Object.entries(props)) m.properties.add(k, v);
  return m;
}

test('conditions on an application property, $body and $connectionModuleId', async (t) => {
  const to = (input) => `BrokeredEndpoint("/modules/B/inputs/${input}")`;
  const hub = await startHub({
    modules: { A: {}, B: {}, C: {} },
    routes: {
      onProperty: `FROM /messages/* WHERE alert = 'high' INTO ${to('alerts')}`,
      onBody: `FROM /messages/* WHERE $body.temperature.value > 30 AND $body.tags[0] = 'hot' INTO ${to('hot')}`,
      onSender: `FROM /messages/* WHERE $connectionModuleId = 'C' INTO ${to('fromC')}`,
    },
  });
  const a = await openClient(hub, 'A');
  const b = await openClient(hub, 'B');
  const c = await openClient(hub, 'C');
  t.after(async () => {
    try {
      await withTimeout(Promise.all([a.close(), b.close(), c.close()]), 20000, 'close');
    } finally {
      await hub.stop();
    }
  });

  const expected = new Map([
    ['p1', ['alerts']],
    ['b1', ['hot']],
    ['c1', ['fromC']],
    ['both', ['alerts', 'hot']],
  ]);
  const want = [...expected.values()].reduce((n, v) => n + v.length, 0);
  const got = [];
  const done = new Promise((resolve) => {
    b.on('inputMessage', (input, msg) => {
      got.push([msg.messageId, input]);
      b.complete(msg, () => {});
      if (got.length === want) resolve();
    });
  });
  const sends = [
    a.sendOutputEvent('o', json('p1', { temperature: { value: 10 } }, { alert: 'high' })),
    a.sendOutputEvent('o', json('p0', { temperature: { value: 10 } }, { alert: 'low' })),
    a.sendOutputEvent('o', json('b1', { temperature: { value: 31 }, tags: ['hot', 'x'] })),
    a.sendOutputEvent('o', json('b0', { temperature: { value: 29 }, tags: ['hot'] })),
    c.sendOutputEvent('o', json('c1', { n: 1 })),
    a.sendOutputEvent('o', json('both', { temperature: { value: 40 }, tags: ['hot'] }, { alert: 'high' })),
  ];
  await withTimeout(Promise.all(sends), 10000, 'sends');
  // A marker sent last over a route that matches everything from C proves nothing else is on its
  // way: per-input order is kept, and the others were sent before it.
  await withTimeout(done, 15000, 'matching messages at B');
  const marker = new Promise((resolve) => {
    b.on('inputMessage', (input, msg) => {
      if (msg.messageId === 'marker') resolve(input);
    });
  });
  await withTimeout(c.sendOutputEvent('o', json('marker', {})), 10000, 'marker');
  assert.equal(await withTimeout(marker, 10000, 'marker at B'), 'fromC');
  const byId = {};
  for (const [id, input] of got) {
    if (id !== 'marker') (byId[id] = byId[id] || []).push(input);
  }
  for (const k of Object.keys(byId)) byId[k].sort();
  assert.deepEqual(byId, Object.fromEntries(expected));
});

test('a priority-0 route overtakes a backlog of priority-5 messages', async (t) => {
  const to = 'BrokeredEndpoint("/modules/B/inputs/in1")';
  const hub = await startHub({
    routes: {
      bulk: { route: `FROM /messages/modules/A/outputs/bulk INTO ${to}`, priority: 5 },
      urgent: { route: `FROM /messages/modules/A/outputs/urgent INTO ${to}`, priority: 0 },
    },
  });
  const a = await openClient(hub, 'A');
  let b;
  t.after(async () => {
    try {
      await withTimeout(Promise.all([a.close(), b && b.close()]), 20000, 'close');
    } finally {
      await hub.stop();
    }
  });
  // B is offline while the backlog builds up.
  const sends = [];
  for (let i = 0; i < 50; i++) {
    const m = new Message(`bulk ${i}`);
    m.messageId = `bulk-${i}`;
    sends.push(a.sendOutputEvent('bulk', m));
  }
  await withTimeout(Promise.all(sends), 20000, 'backlog');
  const u = new Message('urgent');
  u.messageId = 'urgent';
  await withTimeout(a.sendOutputEvent('urgent', u), 10000, 'urgent');
  b = await fromEnv(hub.env('B'));
  // Listen before opening: the backlog is delivered as soon as the input link attaches.
  const firstArrival = new Promise((resolve) => {
    b.once('inputMessage', (input, msg) => resolve(msg.messageId));
  });
  // Settle everything, and take the whole backlog before the test ends, so closing does not
  // race deliveries still arriving.
  let completed = 0;
  const allSettled = new Promise((resolve) => {
    b.on('inputMessage', (input, msg) => b.complete(msg, () => {
      completed += 1;
      if (completed === 51) resolve();
    }));
  });
  await withTimeout(b.open(), 15000, 'B open');
  const first = await withTimeout(firstArrival, 15000, 'first message at B');
  assert.equal(first, 'urgent');
  await withTimeout(allSettled, 15000, 'the whole backlog at B, completed');
});
