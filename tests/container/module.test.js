'use strict';
// Two modules on the host, made with the real Azure IoT Node SDK from the environment values
// `edgehub module-env` printed inside the container, talk through the hub in the container
// over its published AMQPS port. tests/container/run.sh sets the environment.
const test = require('node:test');
const assert = require('node:assert/strict');
const { Message } = require('azure-iot-device');
const { fromEnv, withTimeout } = require('../interop/hub');

function moduleEnv(name) {
  const cs = process.env[`CONTAINER_${name}_CONNECTION_STRING`];
  const ca = process.env.CONTAINER_CA_FILE;
  assert.ok(cs && ca, 'run by tests/container/run.sh');
  return { EdgeHubConnectionString: cs, EdgeModuleCACertificateFile: ca };
}

test('a module on the host reaches another through the hub in the container', async (t) => {
  const a = await fromEnv(moduleEnv('A'));
  const b = await fromEnv(moduleEnv('B'));
  t.after(() => withTimeout(Promise.all([a.close(), b.close()]), 10000, 'closing clients'));
  await withTimeout(a.open(), 15000, 'A open');
  await withTimeout(b.open(), 15000, 'B open');

  const received = new Promise((resolve) => {
    b.on('inputMessage', (inputName, msg) => {
      b.complete(msg, () => resolve({ inputName, msg }));
    });
  });
  const msg = new Message(JSON.stringify({ temperature: 21.5 }));
  msg.messageId = `container-${process.env.CONTAINER_RUN || 1}`;
  await withTimeout(a.sendOutputEvent('out1', msg), 10000, 'sendOutputEvent');
  const { inputName, msg: got } = await withTimeout(received, 15000, 'input message at B');
  assert.equal(inputName, 'in1');
  assert.equal(got.messageId, msg.messageId);
  assert.equal(got.data.toString(), JSON.stringify({ temperature: 21.5 }));
});
