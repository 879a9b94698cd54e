'use strict';
// The deployment files parse and agree with the hub: ports, paths, config, metric names.
const test = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const { execFileSync, spawnSync } = require('node:child_process');
const YAML = require('yaml');

const ROOT = path.resolve(__dirname, '..', '..');
const DEPLOY = path.join(ROOT, 'deploy');
const BIN = process.env.EDGEHUB_BIN || path.join(ROOT, 'target', 'debug', 'edgehub');
const PORTS = [5671, 8883, 443, 9600];
const DATA = '/var/lib/edgehub';

function checkConfigTextEnv(text, env) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'edgehub-deploy-'));
  const p = path.join(dir, 'edgehub.json');
  fs.writeFileSync(p, text);
  const r = spawnSync(BIN, ['check-config', '--config', p], { env: { PATH: process.env.PATH, ...env } });
  fs.rmSync(dir, { recursive: true, force: true });
  return r;
}

function checkConfigText(text) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'edgehub-deploy-'));
  const p = path.join(dir, 'edgehub.json');
  fs.writeFileSync(p, text);
  const r = spawnSync(BIN, ['check-config', '--config', p]);
  fs.rmSync(dir, { recursive: true, force: true });
  return r;
}

test('Dockerfile: ports, volume, user, health check', () => {
  const text = fs.readFileSync(path.join(DEPLOY, 'Dockerfile'), 'utf8');
  assert.match(text, /^FROM .* AS build$/m, 'multi-stage');
  for (const p of PORTS) assert.match(text, new RegExp(`EXPOSE[^\\n]*\\b${p}\\b`));
  assert.match(text, new RegExp(`VOLUME \\["${DATA}"\\]`));
  assert.match(text, /^USER 10001:10001$/m, 'a numeric non-root user');
  assert.match(text, /HEALTHCHECK[\s\S]*edgehub", "health"/);
  assert.match(text, new RegExp(`EDGEHUB_DATA_DIR=${DATA}`));
});

test('Kubernetes manifests: config, volume, ports, scrape annotations', () => {
  const docs = YAML.parseAllDocuments(fs.readFileSync(path.join(DEPLOY, 'kubernetes', 'edgehub.yaml'), 'utf8')).map((d) => {
    assert.equal(d.errors.length, 0, String(d.errors));
    return d.toJS();
  });
  const byKind = Object.fromEntries(docs.map((d) => [d.kind, d]));
  for (const k of ['ConfigMap', 'PersistentVolumeClaim', 'Deployment', 'Service']) assert.ok(byKind[k], k);
  const config = byKind.ConfigMap.data['edgehub.json'];
  const r = checkConfigText(config);
  assert.equal(r.status, 0, r.stderr.toString());
  assert.equal(JSON.parse(config).dataDir, DATA);
  const pod = byKind.Deployment.spec.template;
  assert.equal(pod.metadata.annotations['prometheus.io/scrape'], 'true');
  assert.equal(pod.metadata.annotations['prometheus.io/port'], '9600');
  assert.equal(pod.metadata.annotations['prometheus.io/path'], '/metrics');
  const c = pod.spec.containers[0];
  assert.deepEqual(c.ports.map((p) => p.containerPort).sort(), [...PORTS].sort());
  assert.ok(c.volumeMounts.some((m) => m.mountPath === DATA && m.name === 'data'));
  assert.ok(c.volumeMounts.some((m) => m.mountPath === '/etc/edgehub'));
  assert.equal(pod.spec.volumes.find((v) => v.name === 'data').persistentVolumeClaim.claimName, byKind.PersistentVolumeClaim.metadata.name);
  assert.deepEqual(byKind.Service.spec.ports.map((p) => p.port).sort(), [...PORTS].sort());
  assert.equal(c.livenessProbe.httpGet.port, 9600);
});

test('IoT Edge deployment manifest: edgehub as the hub module, routes valid', () => {
  const m = JSON.parse(fs.readFileSync(path.join(DEPLOY, 'iotedge', 'deployment.json'), 'utf8'));
  const hubModule = m.modulesContent.$edgeAgent['properties.desired'].systemModules.edgeHub;
  const create = JSON.parse(hubModule.settings.createOptions);
  for (const p of PORTS) assert.ok(create.HostConfig.PortBindings[`${p}/tcp`], `port ${p}`);
  assert.ok(create.HostConfig.Binds.some((b) => b.split(':')[1] === DATA));
  // The $edgeHub section is accepted verbatim by edgehub's config.
  const cfg = {
    deviceId: 'edge-device', iothubHostname: 'h.azure-devices.net', gatewayHostname: 'edgehub',
    listen: { amqps: '127.0.0.1:0', mqtts: null, https: null, metrics: null }, dataDir: DATA,
    modules: { sensor: {}, filter: { 'properties.desired': m.modulesContent.filter['properties.desired'] } },
    $edgeHub: m.modulesContent.$edgeHub['properties.desired'],
  };
  const r = checkConfigText(JSON.stringify(cfg));
  assert.equal(r.status, 0, r.stderr.toString());
});

test('IoT Edge deployment manifest: edgehub replaces $edgeHub in runtime mode', () => {
  const m = JSON.parse(fs.readFileSync(path.join(DEPLOY, 'iotedge', 'deployment.json'), 'utf8'));
  const hubModule = m.modulesContent.$edgeAgent['properties.desired'].systemModules.edgeHub;
  assert.equal(hubModule.restartPolicy, 'always');
  const create = JSON.parse(hubModule.settings.createOptions);
  const [bin, cmd, flag, configPath] = create.Entrypoint;
  assert.deepEqual([bin, cmd, flag], ['edgehub', 'run', '--config']);
  assert.ok(!create.HostConfig.Binds.some((b) => b.split(':')[1] === configPath), 'no config file is mounted');
  // What edgeAgent injects, and the manifest's own env: the hub starts from these alone, the
  // config file named by the entrypoint being absent.
  const env = {
    ...Object.fromEntries(Object.entries(hubModule.env).map(([k, v]) => [k, v.value])),
    IOTEDGE_WORKLOADURI: 'unix:///var/run/iotedge/workload.sock', IOTEDGE_DEVICEID: 'edge-device',
    IOTEDGE_MODULEID: '$edgeHub', IOTEDGE_MODULEGENERATIONID: '638412345678901234',
    IOTEDGE_IOTHUBHOSTNAME: 'h.azure-devices.net', IOTEDGE_AUTHSCHEME: 'sasToken', IOTEDGE_APIVERSION: '2022-08-03',
    EdgeDeviceHostName: 'edge-device.local', EDGEHUB_DATA_DIR: DATA,
  };
  const r = spawnSync(BIN, ['check-config', '--config', path.join(os.tmpdir(), `absent-${process.pid}.json`)], { env: { PATH: process.env.PATH, ...env } });
  assert.equal(r.status, 0, r.stderr.toString());
  // Without the runtime's variables, the same command has no config.
  const alone = spawnSync(BIN, ['check-config', '--config', path.join(os.tmpdir(), `absent-${process.pid}.json`)], { env: { PATH: process.env.PATH } });
  assert.notEqual(alone.status, 0);
  // The $edgeHub section, as the $edgeHub twin brings it, compiles with modules that the
  // config does not list (they come from the device scope).
  const withRoutes = checkConfigTextEnv(JSON.stringify({ $edgeHub: m.modulesContent.$edgeHub['properties.desired'] }), env);
  assert.equal(withRoutes.status, 0, withRoutes.stderr.toString());
});

test('Prometheus scrape config and Grafana dashboard use the hub\'s port and series', () => {
  const prom = YAML.parse(fs.readFileSync(path.join(DEPLOY, 'prometheus', 'prometheus.yml'), 'utf8'));
  const job = prom.scrape_configs.find((j) => j.job_name === 'edgehub');
  assert.equal(job.metrics_path, '/metrics');
  assert.ok(job.static_configs[0].targets.every((t) => t.endsWith(':9600')));
  const dash = JSON.parse(fs.readFileSync(path.join(DEPLOY, 'grafana', 'edgehub-dashboard.json'), 'utf8'));
  const metricsSource = fs.readFileSync(path.join(ROOT, 'src', 'metrics.rs'), 'utf8');
  const known = new Set([...metricsSource.matchAll(/"(edgehub_[a-z_]+)"/g)].map((x) => x[1]));
  assert.ok(dash.panels.length >= 6);
  for (const p of dash.panels) {
    for (const t of p.targets) {
      const used = [...t.expr.matchAll(/edgehub_[a-z_]+/g)].map((x) => x[0]);
      assert.ok(used.length > 0, p.title);
      for (const u of used) assert.ok(known.has(u), `${p.title}: ${u} is not a series the hub exports`);
    }
  }
  assert.ok(execFileSync('promtool', ['--version']).length > 0, 'promtool is installed');
  const r = spawnSync('promtool', ['check', 'config', path.join(DEPLOY, 'prometheus', 'prometheus.yml')]);
  assert.equal(r.status, 0, r.stdout.toString() + r.stderr.toString());
});
