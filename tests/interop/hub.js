'use strict';
// Starts a real edgehub process for a test: its own loopback address, its own data directory,
// the default AMQPS port 5671 (the SDK always dials 5671), metrics on port 0.
const { spawn, execFileSync } = require('node:child_process');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const crypto = require('node:crypto');

const ROOT = path.resolve(__dirname, '..', '..');
const BIN = process.env.EDGEHUB_BIN || path.join(ROOT, 'target', 'debug', 'edgehub');

let counter = 0;
function loopback() {
  // A fresh 127.x.y.z per hub, so hubs never share a port even when one lingers.
  counter += 1;
  const a = 1 + (process.pid % 200);
  const b = (Math.floor(Date.now() / 1000) + counter * 7) % 250;
  return `127.${a}.${b}.${1 + (counter % 250)}`;
}

function withTimeout(promise, ms, what) {
  let t;
  const timer = new Promise((_, reject) => {
    t = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what}`)), ms);
  });
  return Promise.race([promise, timer]).finally(() => clearTimeout(t));
}

/// Spawns `edgehub run` and resolves once it logged that every listener is ready.
async function launch(configPath, env = {}) {
  const child = spawn(BIN, ['run', '--config', configPath], {
    stdio: ['ignore', 'ignore', 'pipe'],
    env: { ...process.env, RUST_LOG: process.env.RUST_LOG || 'info', ...env },
  });
  const proc = { child, log: '' };
  const ready = new Promise((resolve, reject) => {
    child.stderr.on('data', (d) => {
      proc.log += d.toString();
      const line = /edgehub ready [^\n]*\n/.exec(proc.log.replace(/\x1b\[[0-9;]*m/g, ''));
      if (line) {
        const metrics = /metrics=Some\(([^)]+)\)/.exec(line[0]);
        resolve(metrics && metrics[1]);
      }
    });
    child.on('exit', (code) => reject(new Error(`edgehub exited with ${code} before it was ready:\n${proc.log}`)));
  });
  proc.exited = new Promise((resolve) => child.on('exit', (code, signal) => resolve({ code, signal })));
  proc.metrics = await withTimeout(ready, 20000, 'edgehub ready');
  return proc;
}

/// `host` pins the hub's loopback address (for clients that cannot be told a port, such as the
/// service SDK, which always dials 443); by default each hub gets a fresh one.
/// `amqpsPort` 0 keeps the SDKs' port 5671 free, for tests of clients that must use another way in.
/// `env`: environment variables of the hub process (runtime mode's `IOTEDGE_*`).
async function startHub({ modules = { A: {}, B: {} }, routes = {}, limits, extra = {}, host = loopback(), amqpsPort = 5671, env = {} } = {}) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'edgehub-test-'));
  const config = {
    deviceId: 'edge1',
    iothubHostname: 'test-hub.azure-devices.net',
    gatewayHostname: host,
    listen: { amqps: `${host}:${amqpsPort}`, mqtts: `${host}:8883`, https: `${host}:443`, metrics: `${host}:0` },
    dataDir: path.join(dir, 'data'),
    modules,
    $edgeHub: { schemaVersion: '1.1', routes, storeAndForwardConfiguration: { timeToLiveSecs: 7200 } },
    ...extra,
  };
  if (limits) config.limits = limits;
  const configPath = path.join(dir, 'edgehub.json');
  fs.writeFileSync(configPath, JSON.stringify(config, null, 2));
  let proc = await launch(configPath, env);
  async function terminate() {
    if (proc.child.exitCode === null && proc.child.signalCode === null) proc.child.kill('SIGTERM');
    return withTimeout(proc.exited, 15000, 'edgehub exit');
  }
  return {
    host,
    dir,
    configPath,
    config,
    get metricsUrl() {
      return `http://${proc.metrics}/metrics`;
    },
    log: () => proc.log,
    env(module) {
      // stdout: the two values; the guide on stderr is for people.
      const out = execFileSync(BIN, ['module-env', '--config', configPath, '--module', module], { stdio: ['ignore', 'pipe', 'pipe'] }).toString();
      const env = {};
      for (const line of out.trim().split('\n')) {
        const i = line.indexOf('=');
        env[line.slice(0, i)] = line.slice(i + 1);
      }
      return env;
    },
    /// Changes the config with `mutate(config)` and sends SIGHUP; resolves once the hub logged
    /// the reload.
    async rewrite(mutate) {
      mutate(config);
      fs.writeFileSync(configPath, JSON.stringify(config, null, 2));
      const count = () => (proc.log.match(/config reloaded/g) || []).length;
      const before = count();
      const reloaded = new Promise((resolve) => {
        const check = () => {
          if (count() > before) {
            proc.child.stderr.off('data', check);
            resolve();
          }
        };
        proc.child.stderr.on('data', check);
      });
      proc.child.kill('SIGHUP');
      await withTimeout(reloaded, 10000, 'config reloaded');
    },
    async reload(newRoutes) {
      await this.rewrite((c) => { c.$edgeHub.routes = newRoutes; });
    },
    /// Stops the hub (SIGTERM) and starts it again on the same config and data.
    async restart() {
      const r = await terminate();
      proc = await launch(configPath, env);
      return r;
    },
    /// Stops the hub (SIGTERM) and keeps its config and data for `resume`.
    async halt() {
      return terminate();
    },
    /// Kills the hub (SIGKILL: no shutdown, nothing flushed) and keeps its data for `resume`.
    async kill() {
      proc.child.kill('SIGKILL');
      return withTimeout(proc.exited, 15000, 'edgehub killed');
    },
    /// Starts a halted hub again on the same config and data.
    async resume() {
      proc = await launch(configPath, env);
    },
    /// Resolves with the match once the hub's log (since it last started) matches `re`.
    waitLog(re, ms = 20000) {
      const current = proc;
      const clean = () => current.log.replace(/\x1b\[[0-9;]*m/g, '');
      return withTimeout(new Promise((resolve) => {
        const check = () => {
          const m = re.exec(clean());
          if (m) {
            current.child.stderr.off('data', check);
            resolve(m);
          }
        };
        current.child.stderr.on('data', check);
        check();
      }), ms, `log ${re}`);
    },
    caPath() {
      return path.join(config.dataDir, 'certs', 'edge-ca.pem');
    },
    caPem() {
      return fs.readFileSync(path.join(config.dataDir, 'certs', 'edge-ca.pem'));
    },
    moduleKey(module) {
      const cs = this.env(module).EdgeHubConnectionString;
      return /SharedAccessKey=([^;]+)/.exec(cs)[1];
    },
    async stop() {
      const r = await terminate();
      fs.rmSync(dir, { recursive: true, force: true });
      return r;
    },
  };
}

/// A SAS token as the SDKs make it.
function sasToken(resource, keyBase64, expiry) {
  const sr = encodeURIComponent(resource);
  const sig = crypto.createHmac('sha256', Buffer.from(keyBase64, 'base64')).update(`${sr}\n${expiry}`).digest('base64');
  return `SharedAccessSignature sr=${sr}&sig=${encodeURIComponent(sig)}&se=${expiry}`;
}

async function scrape(url) {
  const res = await withTimeout(fetch(url), 10000, `GET ${url}`);
  return res.text();
}

/// POST to the hub's HTTPS API, trusting its CA; resolves with {status, body}.
function httpsPost(hub, path, headers, body) {
  const https = require('node:https');
  const data = typeof body === 'string' ? body : JSON.stringify(body);
  return withTimeout(new Promise((resolve, reject) => {
    const req = https.request({
      host: hub.host, port: 443, path, method: 'POST', ca: hub.caPem(), servername: undefined,
      headers: { 'content-type': 'application/json', 'content-length': Buffer.byteLength(data), ...headers },
    }, (res) => {
      let text = '';
      res.on('data', (d) => { text += d; });
      res.on('end', () => resolve({ status: res.statusCode, body: text ? JSON.parse(text) : null, headers: res.headers }));
    });
    req.on('error', reject);
    req.end(data);
  }), 60000, `POST ${path}`);
}

/// A ModuleClient made the way an IoT Edge module makes it: from the two environment values
/// `edgehub module-env` prints, via `ModuleClient.fromEnvironment`; `transport` is `Amqp` (the
/// default) or `AmqpWs`.
function fromEnv(env, transport) {
  const { ModuleClient } = require('azure-iot-device');
  const { Amqp } = require('azure-iot-device-amqp');
  const saved = { ...process.env };
  Object.assign(process.env, env);
  return new Promise((resolve, reject) => {
    ModuleClient.fromEnvironment(transport || Amqp, (err, client) => {
      process.env = saved;
      if (err) reject(err);
      else resolve(client);
    });
  });
}

/// `fromEnv` for a module of `hub`, opened.
async function openClient(hub, module, transport) {
  const c = await fromEnv(hub.env(module), transport);
  await withTimeout(c.open(), 15000, `${module} open`);
  return c;
}

/// Makes an `azure-iothub` `Client` or `Registry` trust a hub's edge CA. The service SDK has no
/// public option for a private CA; its HTTP layer passes `options.ca` of its `setOptions` to
/// every request, and `Client`/`Registry` call that `setOptions` themselves, with a keep-alive
/// agent, when they are made. So: the same call again, with the same kind of agent plus the CA.
function trustHub(serviceObject, ca) {
  const https = require('node:https');
  serviceObject._restApiClient.setOptions({ ca, http: { agent: new https.Agent({ keepAlive: true }) } });
}

module.exports = { loopback, trustHub, startHub, withTimeout, sasToken, scrape, httpsPost, fromEnv, openClient };
