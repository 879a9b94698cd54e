'use strict';
// The built-in endpoint of a standalone hub read with the Event Hubs SDK (@azure/event-hubs),
// from the connection string `edgehub service-env` prints: every message a module and a leaf
// device sent, with its ids, properties, body and IoT Hub's device/module annotations, from the
// earliest event; two consumer groups each read everything; getPartitionIds,
// getPartitionProperties and getEventHubProperties answer; after a restart a reader resumes
// after a stored sequence number; an owner-level reader takes a partition over. The Python SDK
// (azure-eventhub, in target/py-eh, installed by tests/run-all.sh) reads the same events.
const test = require('node:test');
const assert = require('node:assert/strict');
const crypto = require('node:crypto');
const tls = require('node:tls');
const { execFileSync, spawn } = require('node:child_process');
const fs = require('node:fs');
const path = require('node:path');
const { Client: DeviceClient, Message } = require('azure-iot-device');
const { Amqp } = require('azure-iot-device-amqp');
const { EventHubConsumerClient, earliestEventPosition } = require('@azure/event-hubs');
const { openClient, startHub, withTimeout } = require('./hub');

const IOTHUB = 'test-hub.azure-devices.net';
const POLICY = 'service';
const SERVICE_KEY = crypto.randomBytes(32).toString('base64');
const LEAF = 'leaf1';
const LEAF_KEY = crypto.randomBytes(32).toString('base64');
const PYTHON = process.env.EDGEHUB_PY_EH_PYTHON
  || path.resolve(__dirname, '..', '..', 'target', 'py-eh', 'bin', 'python');
const BIN = process.env.EDGEHUB_BIN || path.resolve(__dirname, '..', '..', 'target', 'debug', 'edgehub');

/// The Event Hubs SDK has no option for a private CA and Node reads NODE_EXTRA_CA_CERTS only
/// when it starts: its AMQP layer (rhea) connects with `tls.connect`, which is given the hub's
/// CA here, for connections to the hub's address only.
function trustForEventHubs(hub) {
  const original = tls.connect;
  tls.connect = function connect(...args) {
    const opts = args.find((a) => a && typeof a === 'object');
    if (opts && opts.host === hub.host && !opts.ca) opts.ca = hub.caPem();
    return original.apply(this, args);
  };
  return () => { tls.connect = original; };
}

function serviceEnv(hub) {
  const out = execFileSync(BIN, ['service-env', '--config', hub.configPath, '--policy', POLICY]).toString();
  const env = {};
  for (const line of out.trim().split('\n')) {
    const i = line.indexOf('=');
    env[line.slice(0, i)] = line.slice(i + 1);
  }
  return env;
}

/// Subscribes with `options` and resolves with the events once `want` arrived (or rejects
/// after `ms`); the subscription is closed either way.
function readEvents(consumer, want, options, partitionId) {
  const events = [];
  let subscription;
  const done = new Promise((resolve, reject) => {
    const handlers = {
      processEvents: async (batch, context) => {
        events.push(...batch.map((e) => ({ ...e, partitionId: context.partitionId })));
        if (events.length >= want) resolve(events);
      },
      processError: async (err) => {
        if (err && err.name !== 'ReceiverDisconnectedError') reject(err);
      },
    };
    subscription = partitionId === undefined
      ? consumer.subscribe(handlers, options)
      : consumer.subscribe(partitionId, handlers, options);
  });
  return withTimeout(done, 60000, `${want} events`).finally(() => subscription.close());
}

function key(e) {
  return `${e.systemProperties['iothub-connection-device-id']}/${e.systemProperties['iothub-connection-module-id'] || ''}/${e.messageId}`;
}

test('Event Hubs consumers read the telemetry of a standalone hub', async (t) => {
  const hub = await startHub({
    modules: { A: {} },
    routes: { up: 'FROM /messages/* INTO $upstream' },
    extra: {
      iothubHostname: IOTHUB,
      devices: { [LEAF]: { primaryKey: LEAF_KEY } },
      servicePolicies: { [POLICY]: { primaryKey: SERVICE_KEY } },
      builtInEndpoint: { partitionCount: 4, consumerGroups: ['dashboards'] },
    },
  });
  const untrust = trustForEventHubs(hub);
  const clients = [];
  t.after(async () => {
    untrust();
    try {
      await withTimeout(Promise.all(clients.map((c) => c.close())), 20000, 'closing clients');
    } finally {
      await hub.stop();
    }
  });

  const env = serviceEnv(hub);
  assert.match(env.EventHubConnectionString,
    new RegExp(`^Endpoint=sb://${hub.host.replace(/\./g, '\\.')}/;SharedAccessKeyName=${POLICY};SharedAccessKey=[^;]+;EntityPath=test-hub$`));
  assert.equal(env.CACertificateFile, hub.caPath());
  const cs = env.EventHubConnectionString;

  const a = await openClient(hub, 'A');
  clients.push(a);
  const leaf = DeviceClient.fromConnectionString(
    `HostName=${IOTHUB};DeviceId=${LEAF};SharedAccessKey=${LEAF_KEY};GatewayHostName=${hub.host}`, Amqp);
  clients.push(leaf);
  await withTimeout(leaf.setOptions({ ca: hub.caPem().toString() }), 5000, 'leaf setOptions');
  await withTimeout(leaf.open(), 15000, 'leaf open');

  const sent = new Map();
  for (let i = 0; i < 6; i += 1) {
    const m = new Message(JSON.stringify({ from: 'A', i }));
    m.messageId = `a-${i}`;
    m.contentType = 'application/json';
    m.contentEncoding = 'utf-8';
    m.properties.add('index', String(i));
    await withTimeout(a.sendOutputEvent('telemetry', m), 10000, 'A sendOutputEvent');
    sent.set(`edge1/A/a-${i}`, { body: { from: 'A', i }, index: String(i) });
  }
  for (let i = 0; i < 4; i += 1) {
    const m = new Message(Buffer.from(`leaf reading ${i}`));
    m.messageId = `l-${i}`;
    m.properties.add('index', String(i));
    await withTimeout(leaf.sendEvent(m), 10000, 'leaf sendEvent');
    sent.set(`${LEAF}//l-${i}`, { body: `leaf reading ${i}`, index: String(i) });
  }

  const consumer = new EventHubConsumerClient('$Default', cs);
  clients.push(consumer);

  await t.test('getPartitionIds, getEventHubProperties, getPartitionProperties', async () => {
    assert.deepEqual(await consumer.getPartitionIds(), ['0', '1', '2', '3']);
    const props = await consumer.getEventHubProperties();
    assert.equal(props.name, 'test-hub');
    assert.deepEqual(props.partitionIds, ['0', '1', '2', '3']);
    assert.ok(props.createdOn instanceof Date && props.createdOn.getTime() <= Date.now());
    let total = 0;
    for (const id of props.partitionIds) {
      const p = await consumer.getPartitionProperties(id);
      assert.equal(p.partitionId, id);
      assert.equal(p.eventHubName, 'test-hub');
      if (!p.isEmpty) total += p.lastEnqueuedSequenceNumber - p.beginningSequenceNumber + 1;
      else assert.equal(p.lastEnqueuedSequenceNumber, -1);
    }
    assert.equal(total, sent.size);
  });

  let events;
  await t.test('subscribe from the earliest event reads every message with its annotations', async () => {
    events = await readEvents(consumer, sent.size, { startPosition: earliestEventPosition, maxWaitTimeInSeconds: 1 });
    assert.equal(events.length, sent.size);
    const seen = new Set();
    for (const e of events) {
      const k = key(e);
      assert.ok(sent.has(k), `unexpected event ${k}`);
      assert.ok(!seen.has(k), `twice: ${k}`);
      seen.add(k);
      const want = sent.get(k);
      if (Buffer.isBuffer(e.body)) assert.equal(e.body.toString(), want.body);
      else assert.deepEqual(e.body, want.body);
      assert.equal(e.properties.index, want.index);
      assert.equal(e.systemProperties['iothub-message-source'], 'Telemetry');
      assert.ok(e.systemProperties['iothub-enqueuedtime'] instanceof Date || typeof e.systemProperties['iothub-enqueuedtime'] === 'number');
      assert.equal(typeof e.sequenceNumber, 'number');
      assert.equal(typeof e.offset, 'string');
      assert.ok(e.enqueuedTimeUtc instanceof Date);
      if (k.startsWith('edge1/A/')) {
        assert.equal(e.contentType, 'application/json');
        assert.equal(e.systemProperties['iothub-connection-module-id'], 'A');
      } else {
        assert.equal(e.systemProperties['iothub-connection-module-id'], undefined);
      }
    }
    // One device's events are in one partition, in the order sent.
    const leafEvents = events.filter((e) => e.systemProperties['iothub-connection-device-id'] === LEAF);
    assert.deepEqual(leafEvents.map((e) => e.messageId), ['l-0', 'l-1', 'l-2', 'l-3']);
  });

  await t.test('a second consumer group reads everything too', async () => {
    const dashboards = new EventHubConsumerClient('dashboards', cs);
    clients.push(dashboards);
    const got = await readEvents(dashboards, sent.size, { startPosition: earliestEventPosition, maxWaitTimeInSeconds: 1 });
    assert.deepEqual(new Set(got.map(key)), new Set(sent.keys()));
  });

  await t.test('the Python Event Hubs SDK (azure-eventhub) reads the same events', async () => {
    assert.ok(fs.existsSync(PYTHON), `${PYTHON} missing: tests/run-all.sh installs azure-eventhub there`);
    const child = spawn(PYTHON, [path.join(__dirname, 'python', 'eventhubs_consume.py')], {
      env: {
        PATH: process.env.PATH,
        HOME: process.env.HOME,
        PYTHONDONTWRITEBYTECODE: '1',
        EH_CONNECTION_STRING: cs,
        EH_CA: env.CACertificateFile,
        EH_WANT: String(sent.size),
        EH_GROUP: 'dashboards',
      },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let out = '';
    let err = '';
    child.stdout.on('data', (d) => { out += d; });
    child.stderr.on('data', (d) => { err += d; });
    const code = await withTimeout(new Promise((resolve) => child.on('exit', resolve)), 120000, 'python consumer');
    assert.equal(code, 0, `python consumer failed:\n${err}\n${out}`);
    const lines = out.trim().split('\n').map((l) => JSON.parse(l));
    assert.deepEqual(lines[0].partition_ids, ['0', '1', '2', '3']);
    const got = lines.filter((l) => l.sequence_number !== undefined);
    assert.equal(got.length, sent.size);
    for (const e of got) {
      const k = `${e.device}/${e.module || ''}/${e.message_id}`;
      const want = sent.get(k);
      assert.ok(want, `unexpected event ${k}`);
      assert.equal(e.source, 'Telemetry');
      assert.equal(e.properties.index, want.index);
      assert.equal(e.body, typeof want.body === 'string' ? want.body : JSON.stringify(want.body));
      const node = events.find((n) => key(n) === k);
      assert.equal(e.sequence_number, node.sequenceNumber);
      assert.equal(e.offset, node.offset);
      assert.equal(String(e.partition), node.partitionId);
    }
    const props = lines.filter((l) => l.partition_properties).map((l) => l.partition_properties);
    assert.equal(props.length, 4);
    const total = props.filter((p) => !p.is_empty)
      .reduce((n, p) => n + p.last_enqueued_sequence_number - p.beginning_sequence_number + 1, 0);
    assert.equal(total, sent.size);
  });

  await t.test('an unknown consumer group is not found', async () => {
    const other = new EventHubConsumerClient('nobody', cs);
    clients.push(other);
    const leafPartition = events.find((e) => e.messageId === 'l-0');
    const err = await new Promise((resolve) => {
      const sub = other.subscribe('0', {
        processEvents: async () => {},
        processError: async (e) => { sub.close(); resolve(e); },
      }, { startPosition: earliestEventPosition, maxWaitTimeInSeconds: 1 });
    });
    assert.ok(leafPartition);
    assert.equal(err.code, 'MessagingEntityNotFoundError', `${err.code}: ${err.message}`);
  });

  await t.test('after a restart, a reader resumes after a stored sequence number', async () => {
    const l1 = events.find((e) => e.messageId === 'l-1');
    const { partitionId } = l1;
    await consumer.close();
    await hub.restart();
    for (let i = 4; i < 6; i += 1) {
      const m = new Message(Buffer.from(`leaf reading ${i}`));
      m.messageId = `l-${i}`;
      await withTimeout(leaf.sendEvent(m), 30000, 'leaf sendEvent after restart');
    }
    const again = new EventHubConsumerClient('$Default', cs);
    clients.push(again);
    const got = await readEvents(again, 4, { startPosition: { sequenceNumber: l1.sequenceNumber }, maxWaitTimeInSeconds: 1 }, partitionId);
    assert.deepEqual(got.map((e) => e.messageId), ['l-2', 'l-3', 'l-4', 'l-5']);
    assert.equal(got[0].sequenceNumber, l1.sequenceNumber + 1);
  });

  await t.test('a reader with an owner level takes the partition over', async () => {
    const plain = new EventHubConsumerClient('$Default', cs);
    const owner = new EventHubConsumerClient('$Default', cs);
    clients.push(plain, owner);
    const errors = [];
    let attached;
    const reading = new Promise((resolve) => { attached = resolve; });
    // A batch (possibly empty, after maxWaitTimeInSeconds) comes once the reader is attached.
    const first = plain.subscribe('0', {
      processEvents: async () => { attached(); },
      processError: async (e) => { errors.push(e); },
    }, { startPosition: earliestEventPosition, maxWaitTimeInSeconds: 1 });
    await withTimeout(reading, 20000, 'plain reader attached');
    const second = owner.subscribe('0', {
      processEvents: async () => {},
      processError: async () => {},
    }, { startPosition: earliestEventPosition, maxWaitTimeInSeconds: 1, ownerLevel: 1 });
    await withTimeout(new Promise((resolve) => {
      const check = setInterval(() => {
        if (errors.some((e) => e.name === 'ReceiverDisconnectedError' || e.code === 'ReceiverDisconnectedError')) {
          clearInterval(check);
          resolve();
        }
      }, 50);
    }), 20000, 'the plain reader is disconnected');
    await first.close();
    await second.close();
  });
});

/// Polls `check` (async, truthy when done) every 200 ms until it holds, for at most `ms`.
async function until(check, ms, what) {
  return withTimeout((async () => {
    for (;;) {
      const v = await check();
      if (v) return v;
      await new Promise((r) => { setTimeout(r, 200); });
    }
  })(), ms, what);
}

test('retention and the store cap remove the oldest events; the partition properties follow', async (t) => {
  const hub = await startHub({
    modules: { A: {} },
    routes: { up: 'FROM /messages/* INTO $upstream' },
    extra: {
      iothubHostname: IOTHUB,
      servicePolicies: { [POLICY]: { primaryKey: SERVICE_KEY } },
      // 7.2 seconds.
      builtInEndpoint: { partitionCount: 1, retentionHours: 0.002 },
    },
  });
  const untrust = trustForEventHubs(hub);
  const clients = [];
  t.after(async () => {
    untrust();
    try {
      await withTimeout(Promise.all(clients.map((c) => c.close())), 20000, 'closing clients');
    } finally {
      await hub.stop();
    }
  });
  const a = await openClient(hub, 'A');
  clients.push(a);
  const consumer = new EventHubConsumerClient('$Default', serviceEnv(hub).EventHubConnectionString);
  clients.push(consumer);
  const send = async (id, body) => {
    const m = new Message(body);
    m.messageId = id;
    await withTimeout(a.sendOutputEvent('telemetry', m), 10000, 'A sendOutputEvent');
  };

  for (let i = 0; i < 3; i += 1) await send(`old-${i}`, `old ${i}`);
  const before = await consumer.getPartitionProperties('0');
  assert.equal(before.lastEnqueuedSequenceNumber, 2);
  // Removed by age: the partition starts after them, and numbering goes on.
  const after = await until(async () => {
    const p = await consumer.getPartitionProperties('0');
    return p.beginningSequenceNumber === 3 && p.isEmpty ? p : undefined;
  }, 40000, 'retention removes the old events');
  assert.equal(after.lastEnqueuedSequenceNumber, 2);
  await send('new-0', 'new 0');
  const got = await readEvents(consumer, 1, { startPosition: earliestEventPosition, maxWaitTimeInSeconds: 1 }, '0');
  assert.deepEqual(got.map((e) => [e.messageId, e.sequenceNumber]), [['new-0', 3]]);
});

test('a full store makes room by removing the oldest events first', async (t) => {
  const hub = await startHub({
    modules: { A: {} },
    routes: { up: 'FROM /messages/* INTO $upstream' },
    extra: {
      iothubHostname: IOTHUB,
      servicePolicies: { [POLICY]: { primaryKey: SERVICE_KEY } },
      builtInEndpoint: { partitionCount: 1 },
      $edgeHub: {
        schemaVersion: '1.1',
        routes: { up: 'FROM /messages/* INTO $upstream' },
        storeAndForwardConfiguration: { timeToLiveSecs: 7200, storeLimits: { maxSizeBytes: 16384 } },
      },
    },
  });
  const untrust = trustForEventHubs(hub);
  const clients = [];
  t.after(async () => {
    untrust();
    try {
      await withTimeout(Promise.all(clients.map((c) => c.close())), 20000, 'closing clients');
    } finally {
      await hub.stop();
    }
  });
  const a = await openClient(hub, 'A');
  clients.push(a);
  const N = 40;
  for (let i = 0; i < N; i += 1) {
    const m = new Message(Buffer.alloc(1000, i));
    m.messageId = `m-${i}`;
    await withTimeout(a.sendOutputEvent('telemetry', m), 10000, 'A sendOutputEvent');
  }
  const consumer = new EventHubConsumerClient('$Default', serviceEnv(hub).EventHubConnectionString);
  clients.push(consumer);
  const p = await consumer.getPartitionProperties('0');
  assert.equal(p.lastEnqueuedSequenceNumber, N - 1);
  // 40 kB of events in a 16 kB store: the first ones made room for the last.
  assert.ok(p.beginningSequenceNumber > 0, `beginning ${p.beginningSequenceNumber}`);
  const kept = N - p.beginningSequenceNumber;
  const got = await readEvents(consumer, kept, { startPosition: earliestEventPosition, maxWaitTimeInSeconds: 1 }, '0');
  assert.deepEqual(got.map((e) => e.sequenceNumber),
    Array.from({ length: kept }, (_, i) => p.beginningSequenceNumber + i));
  assert.deepEqual(got.map((e) => e.messageId),
    Array.from({ length: kept }, (_, i) => `m-${p.beginningSequenceNumber + i}`));
});

test("the README's Node consumer prints every event", async (t) => {
  const readme = fs.readFileSync(path.resolve(__dirname, '..', '..', 'README.md'), 'utf8');
  const section = readme.slice(readme.indexOf('## Standalone: reading telemetry'));
  const code = section.slice(section.indexOf('```js\n') + 6, section.indexOf('```\n', section.indexOf('```js\n') + 6));
  assert.match(code, /EventHubConsumerClient/);
  const hub = await startHub({
    modules: { A: {} },
    routes: { up: 'FROM /messages/* INTO $upstream' },
    extra: { iothubHostname: IOTHUB, servicePolicies: { [POLICY]: { primaryKey: SERVICE_KEY } } },
  });
  const a = await openClient(hub, 'A');
  let child;
  t.after(async () => {
    if (child && child.exitCode === null) child.kill('SIGTERM');
    try {
      await withTimeout(a.close(), 20000, 'closing A');
    } finally {
      await hub.stop();
    }
  });
  for (let i = 0; i < 3; i += 1) {
    const m = new Message(JSON.stringify({ reading: i }));
    await withTimeout(a.sendOutputEvent('telemetry', m), 10000, 'A sendOutputEvent');
  }
  const env = serviceEnv(hub);
  child = spawn(process.execPath, ['-e', code], {
    cwd: path.resolve(__dirname, '..'),
    env: { ...process.env, NODE_EXTRA_CA_CERTS: env.CACertificateFile, EventHubConnectionString: env.EventHubConnectionString },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let out = '';
  let err = '';
  child.stderr.on('data', (d) => { err += d; });
  const lines = await withTimeout(new Promise((resolve, reject) => {
    child.stdout.on('data', (d) => {
      out += d;
      const l = out.split('\n').filter((x) => x.includes(' edge1 '));
      if (l.length >= 3) resolve(l);
    });
    child.on('exit', (c) => reject(new Error(`consumer exited ${c}: ${err}`)));
  }), 60000, 'the README consumer prints 3 events');
  for (let i = 0; i < 3; i += 1) assert.match(lines[i], new RegExp(`^\\d+ ${i} edge1 .*reading: ${i}`));
});
