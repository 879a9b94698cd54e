'use strict';
// The smallest faithful IoT Edge workload API: HTTP/1.1 on a Unix socket, as aziot-edged
// serves each module. It signs with the module's primary key (derived from the edge device's
// key by the module-key rule, the key the parent hub hands out for that module in its device
// scope), issues server certificates from a test Edge CA under a test root (openssl), serves the
// trust bundle (the root, plus the CAs a test adds, such as a parent hub's), and encrypts and
// decrypts with AES-256-GCM under a key it keeps in its directory, the caller's IV, and the
// module id and generation id as associated data.
const http = require('node:http');
const fs = require('node:fs');
const path = require('node:path');
const crypto = require('node:crypto');
const { execFileSync } = require('node:child_process');

const VERSIONS = ['2018-06-28', '2019-01-30', '2019-10-22', '2019-11-05', '2020-07-07', '2021-12-07', '2022-08-03'];
const EC = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes'];

function openssl(args, cwd) {
  return execFileSync('openssl', args, { cwd, stdio: ['ignore', 'pipe', 'pipe'] }).toString();
}

/// The module-key rule: base64(HMAC-SHA256(deviceKey, "{device}/{module}/primary")).
function moduleKey(deviceKeyBase64, device, module) {
  return crypto.createHmac('sha256', Buffer.from(deviceKeyBase64, 'base64')).update(`${device}/${module}/primary`).digest();
}

/// Starts the fake in `dir` (socket `dir/workload.sock`) for the edge device `deviceId` whose
/// key is `deviceKey`. `extraTrust`: PEM text appended to the trust bundle. The first
/// `shortCerts` server certificates are valid for `shortSecs` seconds only (the rest for 30
/// days), to make the hub renew its certificate while it runs.
async function startWorkload({ dir, deviceId, deviceKey, extraTrust = '', shortCerts = 0, shortSecs = 10 }) {
  const certs = path.join(dir, 'workload-certs');
  fs.mkdirSync(certs, { recursive: true });
  if (!fs.existsSync(path.join(certs, 'root.pem'))) {
    openssl(['req', '-x509', ...EC, '-keyout', 'root.key.pem', '-out', 'root.pem', '-subj', '/CN=test root CA', '-days', '30',
      '-addext', 'basicConstraints=critical,CA:TRUE', '-addext', 'keyUsage=critical,keyCertSign,cRLSign'], certs);
    openssl(['req', '-new', ...EC, '-keyout', 'edge-ca.key.pem', '-out', 'edge-ca.csr', '-subj', `/CN=${deviceId} edge CA`], certs);
    fs.writeFileSync(path.join(certs, 'edge-ca.ext'), 'basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\n');
    openssl(['x509', '-req', '-in', 'edge-ca.csr', '-CA', 'root.pem', '-CAkey', 'root.key.pem', '-CAcreateserial',
      '-out', 'edge-ca.pem', '-days', '30', '-extfile', 'edge-ca.ext'], certs);
    fs.writeFileSync(path.join(certs, 'master.key'), crypto.randomBytes(32));
  }
  const root = fs.readFileSync(path.join(certs, 'root.pem'), 'utf8');
  const edgeCa = fs.readFileSync(path.join(certs, 'edge-ca.pem'), 'utf8');
  const master = fs.readFileSync(path.join(certs, 'master.key'));
  const calls = [];
  let serial = 0;

  function serverCert(commonName, module) {
    serial += 1;
    const name = `server-${serial}`;
    openssl(['req', '-new', ...EC, '-keyout', `${name}.key.pem`, '-out', `${name}.csr`, '-subj', `/CN=${commonName}`], certs);
    const isIp = /^[0-9.]+$/.test(commonName) || commonName.includes(':');
    const san = `${isIp ? 'IP' : 'DNS'}:${commonName},DNS:${module.replace(/^\$/, '')}`;
    fs.writeFileSync(path.join(certs, `${name}.ext`), `basicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\nsubjectAltName=${san}\n`);
    if (serial <= shortCerts) {
      // `openssl ca` takes exact start and end times (`x509 -req` only whole days).
      const at = (ms) => new Date(ms).toISOString().replace(/[-:T]/g, '').slice(2, 14) + 'Z';
      fs.writeFileSync(path.join(certs, 'index.txt'), '');
      fs.writeFileSync(path.join(certs, 'ca.cnf'), '[ca]\ndefault_ca = edge\n[edge]\ndatabase = index.txt\nnew_certs_dir = .\n'
        + 'serial = ca.serial\ndefault_md = sha256\npolicy = any\nunique_subject = no\n[any]\ncommonName = supplied\n');
      fs.writeFileSync(path.join(certs, 'ca.serial'), crypto.randomBytes(8).toString('hex') + '\n');
      openssl(['ca', '-batch', '-notext', '-config', 'ca.cnf', '-cert', 'edge-ca.pem', '-keyfile', 'edge-ca.key.pem',
        '-in', `${name}.csr`, '-out', `${name}.pem`, '-startdate', at(Date.now() - 60000), '-enddate', at(Date.now() + shortSecs * 1000),
        '-extfile', `${name}.ext`], certs);
    } else {
      openssl(['x509', '-req', '-in', `${name}.csr`, '-CA', 'edge-ca.pem', '-CAkey', 'edge-ca.key.pem', '-CAcreateserial',
        '-out', `${name}.pem`, '-days', '30', '-extfile', `${name}.ext`], certs);
    }
    const leaf = fs.readFileSync(path.join(certs, `${name}.pem`), 'utf8');
    const key = fs.readFileSync(path.join(certs, `${name}.key.pem`), 'utf8');
    const expiration = new crypto.X509Certificate(leaf).validTo;
    return { privateKey: { type: 'key', bytes: key }, certificate: leaf + edgeCa, expiration: new Date(expiration).toISOString() };
  }

  function encrypt(module, genid, plaintext, iv) {
    const c = crypto.createCipheriv('aes-256-gcm', master, iv);
    c.setAAD(Buffer.from(`${module}${genid}`));
    const out = Buffer.concat([Buffer.from([2]), c.update(plaintext), c.final(), c.getAuthTag()]);
    return out;
  }

  function decrypt(module, genid, ciphertext, iv) {
    if (ciphertext.length < 17 || ciphertext[0] !== 2) throw new Error('not a ciphertext of this runtime');
    const d = crypto.createDecipheriv('aes-256-gcm', master, iv);
    d.setAAD(Buffer.from(`${module}${genid}`));
    d.setAuthTag(ciphertext.subarray(ciphertext.length - 16));
    return Buffer.concat([d.update(ciphertext.subarray(1, ciphertext.length - 16)), d.final()]);
  }

  function answer(res, status, body) {
    const text = JSON.stringify(body);
    res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) });
    res.end(text);
  }

  const server = http.createServer((req, res) => {
    let data = '';
    req.on('data', (d) => { data += d; });
    req.on('end', () => {
      const url = new URL(req.url, 'http://workload');
      const version = url.searchParams.get('api-version');
      calls.push({ method: req.method, path: url.pathname, version });
      if (!version) return answer(res, 400, { message: 'api-version not specified' });
      if (!VERSIONS.includes(version)) return answer(res, 400, { message: `invalid api-version "${version}"` });
      let body = {};
      if (req.method === 'POST') {
        try { body = JSON.parse(data || '{}'); } catch (e) { return answer(res, 400, { message: 'malformed body' }); }
      }
      if (req.method === 'GET' && url.pathname === '/trust-bundle') return answer(res, 200, { certificate: root + extraTrust });
      if (req.method === 'GET' && url.pathname === '/manifest-trust-bundle') return answer(res, 200, { certificate: '' });
      const m = /^\/modules\/([^/]+)\/genid\/([^/]+)\/(sign|certificate\/server|encrypt|decrypt)$/.exec(url.pathname);
      if (!m || req.method !== 'POST') return answer(res, 404, { message: 'not found' });
      const module = decodeURIComponent(m[1]);
      const genid = decodeURIComponent(m[2]);
      try {
        switch (m[3]) {
          case 'sign': {
            if (typeof body.data !== 'string') return answer(res, 400, { message: 'data is required' });
            const digest = crypto.createHmac('sha256', moduleKey(deviceKey, deviceId, module)).update(Buffer.from(body.data, 'base64')).digest('base64');
            return answer(res, 200, { digest });
          }
          case 'certificate/server':
            if (typeof body.commonName !== 'string') return answer(res, 400, { message: 'commonName is required' });
            return answer(res, 201, serverCert(body.commonName, module));
          case 'encrypt':
            return answer(res, 200, { ciphertext: encrypt(module, genid, Buffer.from(body.plaintext, 'base64'), Buffer.from(body.initializationVector, 'base64')).toString('base64') });
          case 'decrypt':
            return answer(res, 200, { plaintext: decrypt(module, genid, Buffer.from(body.ciphertext, 'base64'), Buffer.from(body.initializationVector, 'base64')).toString('base64') });
          default:
            return answer(res, 404, { message: 'not found' });
        }
      } catch (e) {
        return answer(res, 500, { message: String(e.message || e) });
      }
    });
  });
  const socket = path.join(dir, 'workload.sock');
  try { fs.unlinkSync(socket); } catch (e) { /* not there */ }
  await new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(socket, resolve);
  });
  return {
    uri: `unix://${socket}`,
    root,
    calls,
    /// The environment edgeAgent gives a module of this device.
    moduleEnv(module, gateway, extra = {}) {
      return {
        IOTEDGE_WORKLOADURI: `unix://${socket}`,
        IOTEDGE_DEVICEID: deviceId,
        IOTEDGE_MODULEID: module,
        IOTEDGE_MODULEGENERATIONID: `gen-${module.replace(/^\$/, '')}`,
        IOTEDGE_IOTHUBHOSTNAME: 'test-hub.azure-devices.net',
        IOTEDGE_AUTHSCHEME: 'sasToken',
        IOTEDGE_APIVERSION: '2022-08-03',
        IOTEDGE_GATEWAYHOSTNAME: gateway,
        ...extra,
      };
    },
    close() {
      const closed = new Promise((resolve) => server.close(() => resolve()));
      // Keep-alive connections of clients (the SDKs) would hold the close.
      server.closeAllConnections();
      return closed;
    },
  };
}

module.exports = { startWorkload, moduleKey };
