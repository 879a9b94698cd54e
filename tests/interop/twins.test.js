'use strict';
// Module twins through the real Node SDK: get, reported patches, desired pushes after a config
// reload, isolation, persistence across a restart, and no missed desired updates.
const test = require('node:test');
const assert = require('node:assert/strict');
const { fromEnv, openClient, scrape, startHub, withTimeout } = require('./hub');

function updateReported(twin, patch) {
  return withTimeout(new Promise((resolve, reject) => {
    twin.properties.reported.update(patch, (err) => (err ? reject(err) : resolve()));
  }), 10000, 'reported update');
}

function nextDesired(twin, predicate) {
  return new Promise((resolve) => {
    const handler = (delta) => {
      if (predicate(delta)) {
        twin.removeListener('properties.desired', handler);
        resolve(delta);
      }
    };
    twin.on('properties.desired', handler);
  });
}

test('module twins', async (t) => {
  const hub = await startHub({
    modules: { A: { 'properties.desired': { threshold: 5, mode: 'eco' } }, B: {} },
    routes: { twinsToB: 'FROM /twinChangeNotifications INTO BrokeredEndpoint("/modules/B/inputs/twins")' },
  });
  t.after(() => hub.stop());

  let a = await openClient(hub, 'A');
  const b = await openClient(hub, 'B');
  const notes = [];
  const noted = new Promise((resolve) => {
    b.on('inputMessage', (input, msg) => {
      notes.push({ input, body: JSON.parse(msg.data.toString()) });
      b.complete(msg, () => {});
      resolve();
    });
  });

  await t.test('getTwin returns the desired properties of the config, with versions', async () => {
    const twin = await withTimeout(a.getTwin(), 10000, 'getTwin');
    assert.equal(twin.properties.desired.threshold, 5);
    assert.equal(twin.properties.desired.mode, 'eco');
    assert.equal(typeof twin.properties.desired.$version, 'number');
    assert.equal(typeof twin.properties.reported.$version, 'number');
  });

  await t.test('reported patches are stored, merged and isolated', async () => {
    const twin = await withTimeout(a.getTwin(), 10000, 'getTwin');
    await updateReported(twin, { temp: 21, nested: { x: 1, y: 2 } });
    await updateReported(twin, { nested: { y: null } });
    const again = await withTimeout(a.getTwin(), 10000, 'getTwin again');
    assert.equal(again.properties.reported.temp, 21);
    assert.deepEqual(again.properties.reported.nested, { x: 1 });
    const twinB = await withTimeout(b.getTwin(), 10000, 'B getTwin');
    assert.equal(twinB.properties.reported.temp, undefined, "A's patch never appears in B's twin");
    // Invalid patches are refused with a clear error and change nothing.
    await assert.rejects(updateReported(again, { bad: [1, null] }));
  });

  await t.test('each reported patch is routed from /twinChangeNotifications', async () => {
    await withTimeout(noted, 10000, 'twin change notification at B');
    assert.equal(notes[0].input, 'twins');
    assert.equal(notes[0].body.properties.reported.temp, 21);
  });

  await t.test('a desired change from a config reload is pushed to the subscribed module', async () => {
    const twin = await withTimeout(a.getTwin(), 10000, 'getTwin');
    const pushed = nextDesired(twin, (d) => d.threshold === 7);
    await hub.rewrite((c) => { c.modules.A['properties.desired'] = { threshold: 7, mode: 'eco' }; });
    const delta = await withTimeout(pushed, 10000, 'desired patch');
    assert.equal(delta.threshold, 7);
    assert.equal(twin.properties.desired.threshold, 7);
  });

  await t.test('a module offline during a desired change gets it on reconnect', async () => {
    await withTimeout(a.close(), 10000, 'A close');
    await hub.rewrite((c) => { c.modules.A['properties.desired'] = { threshold: 9 }; });
    a = await openClient(hub, 'A');
    const twin = await withTimeout(a.getTwin(), 10000, 'getTwin after reconnect');
    assert.equal(twin.properties.desired.threshold, 9);
    assert.equal(twin.properties.desired.mode, undefined, 'removed keys are gone');
  });

  await t.test('twins survive a restart', async () => {
    await withTimeout(Promise.all([a.close(), b.close()]), 10000, 'close before restart');
    const r = await hub.restart();
    assert.equal(r.code, 0);
    a = await openClient(hub, 'A');
    const twin = await withTimeout(a.getTwin(), 10000, 'getTwin after restart');
    assert.equal(twin.properties.reported.temp, 21);
    assert.equal(twin.properties.desired.threshold, 9);
    const metrics = await scrape(hub.metricsUrl);
    assert.match(metrics, /edgehub_gettwin_total\{[^}]*id="edge1\/A"/);
    await withTimeout(a.close(), 10000, 'A close');
  });
});
