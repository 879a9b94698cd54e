'use strict';
// X.509 client authentication with the Node SDK's device Client: `x509=true` in the connection
// string and setOptions({cert, key}); a thumbprint device and a CA-signed device, each over AMQPS,
// AMQP over WebSockets, MQTT and MQTT over WebSockets (no password in the CONNECT). Certificates
// are made with the openssl command line.
const test = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const { execFileSync } = require('node:child_process');
const { Client: DeviceClient, Message } = require('azure-iot-device');
const { Amqp, AmqpWs } = require('azure-iot-device-amqp');
const { Mqtt, MqttWs } = require('azure-iot-device-mqtt');
const { openClient, startHub, withTimeout } = require('./hub');

function openssl(args, cwd) {
  return execFileSync('openssl', args, { cwd, stdio: ['ignore', 'pipe', 'pipe'] }).toString();
}

const EC = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes'];

/// A self-signed certificate `{name}.pem` / `{name}.key.pem` with subject CN `cn`.
function selfSigned(dir, name, cn) {
  openssl(['req', '-x509', ...EC, '-keyout', `${name}.key.pem`, '-out', `${name}.pem`,
    '-subj', `/CN=${cn}`, '-days', '30', '-addext', 'extendedKeyUsage=clientAuth'], dir);
  return { cert: fs.readFileSync(path.join(dir, `${name}.pem`), 'utf8'), key: fs.readFileSync(path.join(dir, `${name}.key.pem`), 'utf8') };
}

/// A certificate for `cn` signed by the CA `ca.pem` / `ca.key.pem` in `dir`.
function caSigned(dir, name, cn) {
  openssl(['req', '-new', ...EC, '-keyout', `${name}.key.pem`, '-out', `${name}.csr`, '-subj', `/CN=${cn}`], dir);
  fs.writeFileSync(path.join(dir, `${name}.ext`), 'basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n');
  openssl(['x509', '-req', '-in', `${name}.csr`, '-CA', 'ca.pem', '-CAkey', 'ca.key.pem', '-CAcreateserial',
    '-out', `${name}.pem`, '-days', '30', '-extfile', `${name}.ext`], dir);
  return { cert: fs.readFileSync(path.join(dir, `${name}.pem`), 'utf8'), key: fs.readFileSync(path.join(dir, `${name}.key.pem`), 'utf8') };
}

function sha1Thumbprint(dir, name) {
  const out = openssl(['x509', '-in', `${name}.pem`, '-noout', '-fingerprint', '-sha1'], dir);
  return out.trim().split('=')[1].replace(/:/g, '');
}

test('devices authenticate with X.509 certificates over AMQPS, AmqpWs, MQTT and MqttWs', async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'edgehub-x509-'));
  openssl(['req', '-x509', ...EC, '-keyout', 'ca.key.pem', '-out', 'ca.pem', '-subj', '/CN=devices CA',
    '-days', '30', '-addext', 'basicConstraints=critical,CA:TRUE', '-addext', 'keyUsage=critical,keyCertSign'], dir);
  const thumb = selfSigned(dir, 'selfie', 'selfie');
  const signed = caSigned(dir, 'cadev', 'cadev');
  const stranger = selfSigned(dir, 'stranger', 'selfie');
  const hub = await startHub({
    routes: { devices: 'FROM /messages/* WHERE NOT IS_DEFINED($connectionModuleId) INTO BrokeredEndpoint("/modules/B/inputs/devices")' },
    extra: {
      devices: {
        selfie: { x509: { primaryThumbprint: sha1Thumbprint(dir, 'selfie') } },
        cadev: { x509: { ca: true } },
      },
      tls: { clientCaCerts: path.join(dir, 'ca.pem') },
    },
  });
  const clients = [];
  t.after(async () => {
    try {
      await withTimeout(Promise.all(clients.map((c) => c.close())), 10000, 'closing clients');
    } finally {
      await hub.stop();
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
  const b = await openClient(hub, 'B');
  clients.push(b);
  const received = [];
  let wake = () => {};
  b.on('inputMessage', (input, msg) => {
    received.push(msg.messageId);
    b.complete(msg, () => {});
    wake();
  });
  const arrived = (id) => withTimeout(new Promise((resolve) => {
    const check = () => { if (received.includes(id)) resolve(); };
    wake = check;
    check();
  }), 15000, `${id} at B`);

  async function device(id, creds, transport) {
    // The Node SDK drops GatewayHostName from an x509 connection string (its
    // X509AuthenticationProvider keeps only HostName and DeviceId): HostName names the hub.
    const cs = `HostName=${hub.host};DeviceId=${id};x509=true`;
    const c = DeviceClient.fromConnectionString(cs, transport);
    clients.push(c);
    await withTimeout(c.setOptions({ cert: creds.cert, key: creds.key, ca: hub.caPem().toString() }), 5000, 'setOptions');
    return c;
  }

  for (const [id, creds] of [['selfie', thumb], ['cadev', signed]]) {
    for (const [name, transport] of [['Amqp', Amqp], ['AmqpWs', AmqpWs], ['Mqtt', Mqtt], ['MqttWs', MqttWs]]) {
      await t.test(`${id} (${id === 'selfie' ? 'thumbprint' : 'CA-signed'}) over ${name}`, async () => {
        const c = await device(id, creds, transport);
        await withTimeout(c.open(), 15000, `${id} open`);
        const m = new Message(`hello from ${id}`);
        m.messageId = `${id}-${name}`;
        await withTimeout(c.sendEvent(m), 10000, `${id} sendEvent`);
        await arrived(`${id}-${name}`);
        await withTimeout(c.close(), 10000, `${id} close`);
      });
    }
  }

  await t.test('a certificate whose thumbprint matches no device is refused', async () => {
    const c = await device('selfie', stranger, Amqp);
    const m = new Message('never');
    m.messageId = 'stranger';
    await assert.rejects(withTimeout((async () => {
      await c.open();
      await c.sendEvent(m);
    })(), 15000, 'stranger open + sendEvent'), (e) => !/timed out/.test(e.message));
    assert.ok(!received.includes('stranger'));
    await hub.waitLog(/client certificate not accepted: .*thumbprint [0-9A-F]{40} is not one of its/);
  });

  await t.test('over MQTT, a certificate that matches no device gets CONNACK 5', async () => {
    const c = await device('selfie', stranger, Mqtt);
    await assert.rejects(withTimeout(c.open(), 15000, 'stranger MQTT open'), (e) => /not authorized/i.test(e.message));
    await hub.waitLog(/MQTT CONNECT refused[^\n]*NotAuthorized[^\n]*thumbprint/);
  });
});
