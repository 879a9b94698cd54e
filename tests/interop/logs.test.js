'use strict';
// What the hub logs about normal client behaviour: an IP address sent as SNI (the C SDK, Proton
// and others do it on every connection) is not a warning.
const test = require('node:test');
const assert = require('node:assert/strict');
const tls = require('node:tls');
const { startHub, withTimeout } = require('./hub');

/// A TLS handshake with the hub that names its IP address as SNI, then a close before any AMQP.
function handshakeWithIpSni(hub) {
  return withTimeout(new Promise((resolve, reject) => {
    // Node refuses to send an IP as SNI unless told so explicitly; the C SDK and Proton do.
    const s = tls.connect({ host: hub.host, port: 5671, servername: hub.host, ca: hub.caPem() }, () => {
      s.end();
      resolve();
    });
    s.on('error', reject);
  }), 15000, 'TLS handshake');
}

const clean = (log) => log.replace(/\x1b\[[0-9;]*m/g, '');

test('an IP address as SNI is logged at debug, not as a warning', async (t) => {
  const saved = process.env.RUST_LOG;
  t.after(() => {
    if (saved === undefined) delete process.env.RUST_LOG;
    else process.env.RUST_LOG = saved;
  });

  await t.test('at info: nothing about SNI', async () => {
    // The hub's own debug line "handshake failed" comes after rustls read the ClientHello, so
    // once it is in the log, any SNI line would be too.
    process.env.RUST_LOG = 'info,edgehub=debug';
    const hub = await startHub();
    try {
      await handshakeWithIpSni(hub);
      await hub.waitLog(/handshake failed/);
      assert.doesNotMatch(clean(hub.log()), /Illegal SNI/);
    } finally {
      await hub.stop();
    }
  });

  await t.test('at debug: still there, as debug', async () => {
    process.env.RUST_LOG = 'debug';
    const hub = await startHub();
    try {
      await handshakeWithIpSni(hub);
      const m = await hub.waitLog(/^.*Illegal SNI.*$/m);
      assert.match(m[0], /DEBUG/);
      assert.doesNotMatch(m[0], /WARN/);
    } finally {
      await hub.stop();
    }
  });
});
