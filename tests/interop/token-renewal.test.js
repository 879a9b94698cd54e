'use strict';
// Token renewal on a live connection. Two Node SDK modules whose tokens are valid for 20 s
// renew them every 10 s (`tokenRenewal`): the SDK puts each new token on the `$cbs` link of the
// connection it already has. For 45 s module A sends numbered messages to B through a route
// without a pause. Every message must arrive at B exactly once and in order, no connection or
// link of either client may end or be replaced, and the hub must log each renewal as a
// put-token for the same identity on the same connection.
//
// The hub allows 300 s of clock skew, so a token it is given expires, for it, 300 s after its
// `se`: far beyond this test. The clients' tokens are therefore signed as by a device whose clock
// is 290 s behind the hub's, which leaves each token 30 s of life at the hub. A hub that did not
// honour the renewals would close the clients' links after 30 s, within the run; a control
// connection with one such token and no renewal shows the hub really does that.
const test = require('node:test');
const assert = require('node:assert/strict');
const { Message } = require('azure-iot-device');
const { fromEnv, sasToken, scrape, startHub, withTimeout } = require('./hub');
const { connect, putToken, attachOpen } = require('./rhea-client');

const IOTHUB = 'test-hub.azure-devices.net';
const TOKEN_VALID_S = 20;
const RENEWAL_MARGIN_S = 10; // a new token every TOKEN_VALID_S - RENEWAL_MARGIN_S = 10 s
const CLOCK_BEHIND_S = 290; // the hub's allowed skew is 300 s: 10 s of grace after a token's life
const RUN_MS = 45000;
const MIN_RENEWALS = 4; // at about 10, 20, 30 and 40 s

/// Signs every token the client's key provider makes as if the client's clock were behind.
function clockBehind(client, seconds) {
  const provider = client._transport._authenticationProvider;
  const sign = provider._sign.bind(provider);
  provider._sign = (resourceUri, expiry, callback) => sign(resourceUri, expiry - seconds, callback);
  return provider;
}

/// A module client with short-lived tokens, watched: every renewal, and every sign of a lost
/// connection or link, is recorded.
async function renewingClient(hub, module, failures) {
  const client = await fromEnv(hub.env(module));
  await withTimeout(client.setOptions({
    ca: hub.caPath(),
    tokenRenewal: { tokenValidTimeInSeconds: TOKEN_VALID_S, tokenRenewalMarginInSeconds: RENEWAL_MARGIN_S },
  }), 5000, `${module} setOptions`);
  const provider = clockBehind(client, CLOCK_BEHIND_S);
  const renewals = [];
  provider.on('newTokenAvailable', () => renewals.push(Date.now()));
  const fail = (what) => (err) => failures.push(`${module}: ${what}${err ? `: ${err.message || err}` : ''}`);
  client.on('error', fail('client error'));
  client.on('disconnect', fail('client disconnect'));
  // The SDK reconnects quietly after a retryable loss; its transport says so first.
  client._transport.on('disconnect', fail('transport disconnect'));
  client._transport.on('error', fail('transport error'));
  await withTimeout(client.open(), 15000, `${module} open`);
  return { client, renewals };
}

/// The connection and links a client holds now, to compare with later; detaches are recorded
/// as they happen (rhea's observers see a link's events without taking them from the SDK).
function snapshot(client, module, failures) {
  const amqp = client._transport._amqp;
  const links = [];
  for (const [kind, map, field] of [['receiver', amqp._receivers, '_rheaReceiver'], ['sender', amqp._senders, '_rheaSender']]) {
    for (const [endpoint, wrapper] of Object.entries(map)) {
      const rhea = wrapper[field];
      if (!rhea) continue;
      for (const ev of [`${kind}_close`, `${kind}_error`]) {
        rhea.observers.on(ev, () => failures.push(`${module}: ${kind} ${endpoint}: ${ev} ${JSON.stringify(rhea.error || rhea.remote.detach || null)}`));
      }
      links.push({ kind, endpoint, wrapper, rhea, map, field });
    }
  }
  return { connection: amqp._rheaConnection, links, amqp };
}

function assertUnchanged(module, before) {
  const { amqp, connection, links } = before;
  assert.equal(amqp._rheaConnection, connection, `${module}: the connection was replaced`);
  assert.ok(connection.is_open(), `${module}: the connection is not open`);
  for (const { kind, endpoint, wrapper, rhea, map, field } of links) {
    assert.equal(map[endpoint], wrapper, `${module}: the ${kind} link ${endpoint} was replaced`);
    assert.equal(wrapper[field], rhea, `${module}: the ${kind} link ${endpoint} was reattached`);
    assert.ok(rhea.is_open() && rhea.is_remote_open(), `${module}: the ${kind} link ${endpoint} is not open`);
  }
}

/// The peer (connection) of each put-token the hub accepted for `identity`, from its log.
function putTokenPeers(log, identity) {
  const peers = [];
  for (const line of log.split('\n')) {
    if (!line.includes('put-token accepted') || !line.includes(`identity=${identity}`)) continue;
    const m = /conn\{peer=([^}\s]+)\}/.exec(line);
    peers.push(m ? m[1] : '?');
  }
  return peers;
}

/// The hub's log lines that say a token of `identity` expired.
function expiries(log, identity) {
  return log.split('\n').filter((l) => l.includes('token expired') && new RegExp(`identity=${identity}(\\s|$)`).test(l));
}

test('SDK clients renew short-lived tokens on their live connections while messages flow', async (t) => {
  const savedLog = process.env.RUST_LOG;
  // put-token acceptances and token expiries are logged at debug.
  process.env.RUST_LOG = `${savedLog || 'info'},edgehub::servers::amqp=debug`;
  let hub;
  try {
    hub = await startHub({
      modules: { A: {}, B: {}, C: {} },
      routes: { AtoB: 'FROM /messages/modules/A/outputs/* INTO BrokeredEndpoint("/modules/B/inputs/fromA")' },
    });
  } finally {
    if (savedLog === undefined) delete process.env.RUST_LOG;
    else process.env.RUST_LOG = savedLog;
  }
  const failures = [];
  const opened = [];
  let control;
  t.after(async () => {
    try {
      if (control) control.close();
      await withTimeout(Promise.all(opened.map((c) => c.close())), 15000, 'closing clients');
    } finally {
      await hub.stop();
    }
  });

  // The control: one token, 30 s of life at the hub, never renewed; C's own input link.
  const controlStarted = Date.now();
  const c = connect(hub);
  control = c.conn;
  await c.opened;
  const skewedExpiry = Math.floor(Date.now() / 1000) + TOKEN_VALID_S - CLOCK_BEHIND_S;
  const put = await putToken(control, sasToken(`${IOTHUB}/devices/edge1/modules/C`, hub.moduleKey('C'), skewedExpiry));
  assert.equal(put.status, 200, 'a token within the allowed skew is accepted');
  const controlLink = await attachOpen(control, 'receiver', '/devices/edge1/modules/C/messages/events');
  assert.equal(controlLink.state, 'open');
  const controlClosed = new Promise((resolve) => {
    controlLink.link.once('receiver_close', (ctx) => resolve({ at: Date.now(), error: ctx.receiver.error }));
    controlLink.link.once('receiver_error', (ctx) => resolve({ at: Date.now(), error: ctx.receiver.error }));
  });

  const a = await renewingClient(hub, 'A', failures);
  opened.push(a.client);
  const b = await renewingClient(hub, 'B', failures);
  opened.push(b.client);

  const got = [];
  let target = Infinity;
  let allArrived;
  const arrived = new Promise((resolve) => { allArrived = resolve; });
  let firstArrived;
  const first = new Promise((resolve) => { firstArrived = resolve; });
  b.client.on('inputMessage', (input, msg) => {
    got.push({ input, id: msg.messageId });
    b.client.complete(msg, () => {});
    if (got.length === 1) firstArrived();
    if (got.length >= target) allArrived();
  });

  const started = Date.now();
  let sent = 0;
  const send = async () => {
    const m = new Message(JSON.stringify({ i: sent }));
    m.messageId = `m-${sent}`;
    await withTimeout(a.client.sendOutputEvent('out', m), 10000, `sending message ${sent}`);
    sent += 1;
  };
  // The first message proves the route and both clients' links; those links are the ones
  // that must last.
  await send();
  await withTimeout(first, 15000, 'the first message at B');
  const before = { A: snapshot(a.client, 'A', failures), B: snapshot(b.client, 'B', failures) };
  assert.ok(before.B.links.some((l) => l.kind === 'receiver'), "B's input link is attached");
  assert.ok(before.A.links.some((l) => l.kind === 'sender'), "A's output link is attached");

  while (Date.now() - started < RUN_MS && failures.length === 0) {
    try {
      await send();
    } catch (e) {
      failures.push(`A: sending message ${sent}: ${e.message}`);
    }
  }
  target = sent;
  if (got.length >= target) allArrived();
  assert.deepEqual(failures, [], 'no connection or link was lost');
  await withTimeout(arrived, 20000, `all ${sent} messages at B (${got.length} so far)`);

  t.diagnostic(`${sent} messages in ${Date.now() - started} ms`);
  await t.test('every message arrived once, in order, on the input of the route', () => {
    assert.ok(sent > 100, `only ${sent} messages were sent`);
    assert.equal(got.length, sent);
    const firstWrong = got.findIndex((g, i) => g.id !== `m-${i}` || g.input !== 'fromA');
    assert.equal(firstWrong, -1, firstWrong < 0 ? '' : `message ${firstWrong} was ${JSON.stringify(got[firstWrong])}`);
  });

  await t.test('each client renewed its token several times on the same connection and links', () => {
    for (const [name, client] of [['A', a], ['B', b]]) {
      assert.ok(client.renewals.length >= MIN_RENEWALS, `${name} renewed ${client.renewals.length} times`);
      assertUnchanged(name, before[name]);
    }
    assert.deepEqual(failures, []);
  });

  await t.test('the hub accepted every renewal as a put-token on the one connection of each client', async () => {
    const log = hub.log().replace(/\x1b\[[0-9;]*m/g, '');
    for (const [name, client] of [['A', a], ['B', b]]) {
      const peers = putTokenPeers(log, `edge1/${name}`);
      assert.ok(peers.length >= 1 + client.renewals.length, `${name}: ${peers.length} put-tokens for ${client.renewals.length} renewals`);
      assert.equal(new Set(peers).size, 1, `${name}: put-tokens on connections ${[...new Set(peers)]}`);
      t.diagnostic(`${name}: ${client.renewals.length} renewals, ${peers.length} put-tokens accepted, all from ${peers[0]}`);
      assert.deepEqual(expiries(log, `edge1/${name}`), [], `${name}: the hub let a token expire`);
    }
    const metrics = await scrape(hub.metricsUrl);
    for (const name of ['A', 'B']) {
      assert.match(metrics, new RegExp(`edgehub_client_connect_success_total\\{[^}]*id="edge1/${name}"[^}]*\\} 1\\n`), `${name} authenticated once`);
      assert.doesNotMatch(metrics, new RegExp(`edgehub_client_disconnect_total\\{[^}]*id="edge1/${name}"`), `${name} never disconnected`);
    }
  });

  await t.test('control: a token that is not renewed ends its links when it expires', async () => {
    const closed = await withTimeout(controlClosed, Math.max(1000, controlStarted + 45000 - Date.now()), 'the control link closed for its expired token');
    const after = (closed.at - controlStarted) / 1000;
    assert.equal(closed.error && closed.error.condition, 'amqp:unauthorized-access', JSON.stringify(closed.error));
    assert.match(closed.error.description, /expired/);
    // 30 s of life at the hub (TOKEN_VALID_S + 300 - CLOCK_BEHIND_S), checked once a second.
    t.diagnostic(`the control link closed ${after} s after its token was put`);
    assert.ok(after >= 25 && after <= 40, `the control link closed after ${after} s`);
    assert.ok(closed.at - started < RUN_MS, 'the unrenewed token expired while the clients ran');
    assert.equal(expiries(hub.log().replace(/\x1b\[[0-9;]*m/g, ''), 'edge1/C').length, 1);
  });
});
