'use strict';
// The Python device SDK (azure-iot-device 2.x, MQTT only) as a module created from the edge
// environment, next to a Node module over AMQP: its output reaches the AMQP module, the AMQP
// module's output reaches its input, its twin (get, reported patch, desired push) and a direct
// method called by the AMQP module. tests/run-all.sh installs the SDK into target/py-sdk.
const test = require('node:test');
const assert = require('node:assert/strict');
const path = require('node:path');
const fs = require('node:fs');
const readline = require('node:readline');
const { spawn } = require('node:child_process');
const { Message } = require('azure-iot-device');
const { fromEnv, startHub, withTimeout } = require('./hub');

const PYTHON = process.env.EDGEHUB_PY_SDK_PYTHON
  || path.resolve(__dirname, '..', '..', 'target', 'py-sdk', 'bin', 'python');

/// Runs the Python module; `next()` resolves with its next JSON event line.
function runPythonModule(env) {
  assert.ok(fs.existsSync(PYTHON), `${PYTHON} missing: tests/run-all.sh installs azure-iot-device there`);
  const child = spawn(PYTHON, [path.join(__dirname, 'python', 'module.py')], {
    env: { PATH: process.env.PATH, HOME: process.env.HOME, PYTHONDONTWRITEBYTECODE: '1', ...env },
    stdio: ['pipe', 'pipe', 'pipe'],
  });
  let stderr = '';
  child.stderr.on('data', (d) => { stderr += d; });
  const lines = [];
  const waiters = [];
  readline.createInterface({ input: child.stdout }).on('line', (line) => {
    let event;
    try { event = JSON.parse(line); } catch { return; }
    const w = waiters.shift();
    if (w) w(event); else lines.push(event);
  });
  const exited = new Promise((resolve) => child.on('exit', (code) => resolve(code)));
  return {
    child,
    exited,
    stderr: () => stderr,
    next(what) {
      const ready = lines.length ? Promise.resolve(lines.shift()) : new Promise((r) => waiters.push(r));
      return withTimeout(ready, 40000, `python: ${what}\n${stderr}`);
    },
  };
}

test('a Python SDK module talks to an AMQP module through the hub', async (t) => {
  const hub = await startHub({
    modules: { P: {}, B: {} },
    routes: {
      pyToAmqp: 'FROM /messages/modules/P/outputs/out1 INTO BrokeredEndpoint("/modules/B/inputs/in1")',
      amqpToPy: 'FROM /messages/modules/B/outputs/back INTO BrokeredEndpoint("/modules/P/inputs/in2")',
    },
  });
  const b = await fromEnv(hub.env('B'));
  let py;
  t.after(async () => {
    if (py && py.child.exitCode === null) py.child.kill('SIGKILL');
    try {
      await withTimeout(b.close(), 10000, 'closing B');
    } finally {
      await hub.stop();
    }
  });
  await withTimeout(b.open(), 15000, 'B open');
  const atB = new Promise((resolve) => {
    b.on('inputMessage', (inputName, msg) => {
      b.complete(msg, () => {});
      resolve({ inputName, msg });
    });
  });

  // The module environment of P, as IoT Edge gives it: connection string and CA file.
  py = runPythonModule(hub.env('P'));
  const twin = await py.next('twin');
  assert.equal(twin.event, 'twin', JSON.stringify(twin));
  assert.equal(typeof twin.desired_version, 'number');
  assert.equal(twin.reported, true);

  assert.equal((await py.next('sent')).event, 'sent');
  const got = await withTimeout(atB, 15000, 'B receives from P');
  assert.equal(got.inputName, 'in1');
  assert.equal(got.msg.messageId, 'py-1');
  assert.equal(got.msg.contentType, 'application/json');
  assert.equal(got.msg.properties.getValue('alert'), 'high');
  assert.deepEqual(JSON.parse(got.msg.data.toString()), { t: 1 });

  const reply = new Message('pong');
  reply.messageId = 'amqp-1';
  reply.properties.add('k', 'v w');
  await withTimeout(b.sendOutputEvent('back', reply), 10000, 'B sendOutputEvent');
  const input = await py.next('input');
  assert.equal(input.event, 'input', JSON.stringify(input));
  assert.equal(input.input, 'in2');
  assert.equal(input.data, 'pong');
  assert.equal(input.mid, 'amqp-1');
  assert.equal(input.props.k, 'v w');

  await hub.rewrite((c) => { c.modules.P = { 'properties.desired': { speed: 5 } }; });
  const desired = await py.next('desired');
  assert.equal(desired.event, 'desired', JSON.stringify(desired));
  assert.equal(desired.patch.speed, 5);
  assert.equal(typeof desired.patch.$version, 'number');

  const params = { methodName: 'reset', payload: { n: 7 }, responseTimeoutInSeconds: 10, connectTimeoutInSeconds: 10 };
  const result = await withTimeout(b.invokeMethod('edge1', 'P', params), 20000, 'invokeMethod on P');
  assert.equal(result.status, 200);
  assert.deepEqual(result.payload, { got: { n: 7 }, method: 'reset' });

  py.child.stdin.end('bye\n');
  assert.equal((await py.next('done')).event, 'done');
  assert.equal(await withTimeout(py.exited, 20000, 'python exit'), 0, py.stderr());
});
