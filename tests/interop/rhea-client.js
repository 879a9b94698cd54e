'use strict';
// A raw AMQP client (rhea) for what the SDK will not do: put-token with chosen tokens, attach
// links for other identities, SASL PLAIN.
const rhea = require('rhea');
const crypto = require('node:crypto');
const { withTimeout } = require('./hub');

function connect(hub, extra = {}) {
  const container = rhea.create_container({ id: `test-${crypto.randomUUID()}` });
  const conn = container.connect({
    host: hub.host,
    port: 5671,
    transport: 'tls',
    ca: [hub.caPem()],
    reconnect: false,
    ...extra,
  });
  const opened = new Promise((resolve, reject) => {
    conn.once('connection_open', () => resolve());
    conn.once('connection_error', (ctx) => reject(ctx.connection.error || new Error('connection error')));
    conn.once('disconnected', (ctx) => reject(ctx.error || new Error('disconnected')));
  });
  return { conn, opened: withTimeout(opened, 10000, 'rhea connection open') };
}

/// Puts a token on $cbs (one link pair per connection, as the SDKs do) and resolves with the
/// status code and description.
async function putToken(conn, token, audience = 'audience') {
  if (!conn.cbsPair) {
    const receiver = conn.open_receiver({ source: { address: '$cbs' }, target: {} });
    const sender = conn.open_sender({ target: { address: '$cbs' } });
    await withTimeout(new Promise((r) => sender.once('sendable', r)), 10000, '$cbs sendable');
    conn.cbsPair = { receiver, sender };
  }
  const { receiver, sender } = conn.cbsPair;
  const id = crypto.randomUUID();
  const reply = new Promise((resolve) => {
    receiver.on('message', (ctx) => {
      if (ctx.message.correlation_id === id) resolve(ctx.message.application_properties);
    });
  });
  sender.send({
    message_id: id,
    to: '$cbs',
    reply_to: 'cbs',
    application_properties: { operation: 'put-token', type: 'servicebus.windows.net:sastoken', name: audience },
    body: token,
  });
  const props = await withTimeout(reply, 10000, 'put-token response');
  return { status: props['status-code'], description: props['status-description'] };
}

/// Attaches a link expected to be refused; resolves with the condition of its detach.
function attach(conn, role, address) {
  const link = role === 'receiver'
    ? conn.open_receiver({ source: { address }, autoaccept: false })
    : conn.open_sender({ target: { address } });
  const ev = role === 'receiver' ? 'receiver' : 'sender';
  return withTimeout(new Promise((resolve) => {
    let opened = false;
    link.once(`${ev}_open`, () => {
      opened = true;
    });
    link.once(`${ev}_error`, (ctx) => resolve({ state: 'error', condition: ctx[ev].error && ctx[ev].error.condition, description: ctx[ev].error && ctx[ev].error.description, opened }));
    link.once(`${ev}_close`, (ctx) => {
      const err = ctx[ev].error;
      resolve(err ? { state: 'error', condition: err.condition, description: err.description, opened } : { state: 'closed' });
    });
  }), 10000, `attach ${role} ${address}`);
}

/// Attaches a link expected to stay open. The hub handles a session's attaches in order, so once
/// a later probe attach has been refused, a refusal of this link would already have arrived.
async function attachOpen(conn, role, address) {
  const link = role === 'receiver'
    ? conn.open_receiver({ source: { address }, autoaccept: false })
    : conn.open_sender({ target: { address } });
  const ev = role === 'receiver' ? 'receiver' : 'sender';
  await withTimeout(new Promise((r) => link.once(`${ev}_open`, r)), 10000, `open ${address}`);
  const probe = await attach(conn, 'receiver', '/probe/not/a/node');
  if (probe.condition !== 'amqp:not-found') throw new Error(`probe: ${JSON.stringify(probe)}`);
  return { state: link.is_open() && !link.error ? 'open' : 'refused', error: link.error, link };
}

module.exports = { connect, putToken, attach, attachOpen };
