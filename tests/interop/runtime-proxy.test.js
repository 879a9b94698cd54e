'use strict';
// Runtime mode behind an HTTP proxy, as the IoT Edge documentation sets it up: `UpstreamProtocol`
// = `AmqpWs` and `https_proxy` on `$edgeHub`. The upstream connection and the device-scope
// calls to the parent both go through the proxy (Debian's tinyproxy, started here): a lookup
// that the `RefreshDeviceScopeIdentityCache` method asks for opens one more CONNECT tunnel to
// the parent's 443 while the upstream connection stays as it is.
const test = require('node:test');
const assert = require('node:assert/strict');
const crypto = require('node:crypto');
const fs = require('node:fs');
const net = require('node:net');
const os = require('node:os');
const path = require('node:path');
const { spawn } = require('node:child_process');
const { httpsPost, loopback, sasToken, startHub, withTimeout } = require('./hub');
const { startWorkload } = require('./workload');

const CHILD = 'child1';
const CHILD_KEY = crypto.randomBytes(32).toString('base64');
const SERVICE_KEY = crypto.randomBytes(32).toString('base64');

function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

/// Resolves once `check()` holds (looked at every 100 ms), within `ms`.
function until(check, ms, what) {
  return withTimeout(new Promise((resolve) => {
    const tick = () => {
      if (check()) resolve();
      else setTimeout(tick, 100);
    };
    tick();
  }), ms, what);
}

async function startProxy() {
  const bin = ['/usr/bin/tinyproxy', '/usr/sbin/tinyproxy'].find((p) => fs.existsSync(p));
  assert.ok(bin, 'tinyproxy is installed (tests/run-all.sh installs it)');
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'edgehub-tinyproxy-'));
  const port = await freePort();
  const log = path.join(dir, 'tinyproxy.log');
  const conf = path.join(dir, 'tinyproxy.conf');
  fs.writeFileSync(conf, [
    `Port ${port}`, 'Listen 127.0.0.1', 'Timeout 60', `LogFile "${log}"`, 'LogLevel Connect',
    'MaxClients 50', 'Allow 127.0.0.1', '',
  ].join('\n'));
  const child = spawn(bin, ['-d', '-c', conf], { stdio: 'ignore' });
  const exited = new Promise((resolve) => child.on('exit', resolve));
  const read = () => (fs.existsSync(log) ? fs.readFileSync(log, 'utf8') : '');
  const accepting = () => new Promise((resolve) => {
    const sock = net.connect(port, '127.0.0.1');
    sock.once('connect', () => { sock.destroy(); resolve(true); });
    sock.once('error', () => resolve(false));
  });
  await withTimeout((async () => { while (!(await accepting())) await new Promise((r) => setImmediate(r)); })(),
    10000, 'tinyproxy listening');
  return {
    port,
    /// The CONNECT requests it has logged.
    connects: (target) => (read().match(new RegExp(`CONNECT ${target.replace(/\./g, '\\.')}`, 'g')) || []).length,
    async stop() {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGTERM');
      await withTimeout(exited, 10000, 'tinyproxy exit');
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}

test('runtime mode behind a proxy: the device-scope calls go through https_proxy with AmqpWs', async (t) => {
  const proxy = await startProxy();
  const parent = await startHub({
    extra: {
      devices: { [CHILD]: { primaryKey: CHILD_KEY, edge: true, modules: { sender: {} } } },
      servicePolicies: { service: { primaryKey: SERVICE_KEY } },
    },
  });
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'edgehub-runtime-proxy-'));
  const workload = await startWorkload({ dir, deviceId: CHILD, deviceKey: CHILD_KEY, extraTrust: parent.caPem().toString() });
  let child;
  t.after(async () => {
    if (child) await child.stop();
    await parent.stop();
    await workload.close();
    await proxy.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  });
  const childHost = loopback();
  child = await startHub({
    host: childHost,
    modules: {},
    routes: {},
    extra: { upstream: { minBackoffMs: 50, maxBackoffMs: 400 } },
    env: {
      ...workload.moduleEnv('$edgeHub', parent.host),
      EdgeDeviceHostName: childHost,
      UpstreamProtocol: 'AmqpWs',
      https_proxy: `http://127.0.0.1:${proxy.port}`,
    },
  });
  await child.waitLog(/device scope refreshed[^\n]*identities=4/);
  await child.waitLog(/upstream connected/);
  const target = `${parent.host}:443`;
  const upstreamConnects = () => (child.log().match(/upstream connected/g) || []).length;
  const before = { tunnels: proxy.connects(target), upstream: upstreamConnects() };
  assert.ok(before.tunnels >= 2, `the scope's first page and the upstream went through the proxy: ${before.tunnels}`);

  // One lookup, asked for by the refresh method: one more tunnel, the upstream unchanged.
  const token = `${sasToken(parent.host, SERVICE_KEY, Math.floor(Date.now() / 1000) + 3600)}&skn=service`;
  const r = await httpsPost(parent, `/twins/${CHILD}/modules/%24edgeHub/methods?api-version=2021-04-12`, { authorization: token },
    { methodName: 'RefreshDeviceScopeIdentityCache', payload: { deviceIds: [`${CHILD}/sender`] }, responseTimeoutInSeconds: 30 });
  assert.equal(r.status, 200, JSON.stringify(r.body));
  await until(() => proxy.connects(target) > before.tunnels, 20000, 'the lookup\'s tunnel');
  assert.equal(upstreamConnects(), before.upstream, 'the upstream connection stayed');
});
