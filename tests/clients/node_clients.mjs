// Drives segflowd with one of the real Node clients, unchanged but for host and key.
// Run by tests/acceptance/test_clients_node.py, which then checks what the store holds:
//
//   node node_clients.mjs CLIENT BASE_URL KEY_NAME SECRET PREFIX
//
// CLIENT is segment (@segment/analytics-node), rudder (@rudderstack/rudder-sdk-node, with
// its default gzip) or customerio (customerio-node's TrackClient over http). User ids
// start with PREFIX. Prints one JSON line {"errors": [...]}: what the client reported.
import { Analytics as SegmentAnalytics } from '@segment/analytics-node';
import RudderAnalytics from '@rudderstack/rudder-sdk-node';
import { TrackClient } from 'customerio-node';

const [client, base, keyName, secret, prefix] = process.argv.slice(2);
const ORDERED_AT = new Date('2026-01-02T03:04:05Z'); // the test expects this timestamp
const errors = [];
const uid = `${prefix}-u1`;
const anon = `${prefix}-anon-1`;

// The Segment protocol: the same calls through either SDK's batching uploader.
async function segmentCalls(sdk, flush) {
  sdk.track({ anonymousId: anon, event: 'Visited', properties: { path: '/' } });
  await flush(); // stored anonymously before the identify links it
  sdk.identify({ userId: uid, anonymousId: anon,
                 traits: { email: `${prefix}@example.com`, plan: 'pro' } });
  for (let i = 0; i < 2; i++) { // a retry of the same message, in its own request: stored once
    sdk.track({ userId: uid, event: 'Order Completed', messageId: `${prefix}-order-1`,
                properties: { total: 42.5, items: ['a', 'b'] }, timestamp: ORDERED_AT });
    await flush();
  }
  sdk.page({ userId: uid, name: 'Pricing', properties: { url: '/pricing' } });
  await flush();
}

async function segment() {
  const sdk = new SegmentAnalytics({ writeKey: secret, host: base, flushInterval: 50,
                                     maxRetries: 0 });
  sdk.on('error', (e) => errors.push(String(e && (e.reason || e.message || e))));
  await segmentCalls(sdk, () => sdk.flush());
  await sdk.closeAndFlush({ timeout: 10000 });
}

async function rudder() {
  // gzip is left at its default (true): gzipped JSON labelled x-www-form-urlencoded.
  const sdk = new RudderAnalytics(secret, { dataPlaneUrl: base, flushInterval: 50,
                                            retryCount: 0, logLevel: 'error',
                                            errorHandler: (e) => errors.push(String(e)) });
  await segmentCalls(sdk, () => new Promise((done) => sdk.flush((err) => {
    if (err) errors.push(String(err));
    done();
  })));
}

async function customerio() {
  const cio = new TrackClient(keyName, secret, { url: `${base}/api/v1`,
                                                  retry: { maxRetries: 0 } });
  const ordered = Math.floor(ORDERED_AT.getTime() / 1000);
  await cio.identify(uid, { email: `${prefix}@example.com`, plan: 'pro',
                            created_at: 1717243200 });
  for (let i = 0; i < 2; i++) {
    await cio.track(uid, { name: 'Order Completed', id: `${prefix}-order-1`,
                           data: { total: 42.5, items: ['a', 'b'] }, timestamp: ordered });
  }
  await cio.trackPageView(uid, '/pricing');
  await cio.trackAnonymous(anon, { name: 'Visited', data: { path: '/' } });
  await cio.batch([ // Track API v2
    { type: 'person', identifiers: { id: `${prefix}-u2` }, action: 'identify',
      attributes: { email: `${prefix}2@example.com`, plan: 'team' } },
    { type: 'person', identifiers: { id: `${prefix}-u2` }, action: 'event',
      name: 'Invited', id: `${prefix}-invite-1`, attributes: { by: uid } },
    { type: 'person', identifiers: { id: `${prefix}-u2` }, action: 'event',
      name: 'Invited', id: `${prefix}-invite-1`, attributes: { by: uid } },
  ]);
}

const run = { segment, rudder, customerio }[client];
if (!run) {
  console.error(`unknown client ${client}`);
  process.exit(2);
}
try {
  await run();
} catch (e) {
  const reply = e && e.statusCode ? ` [HTTP ${e.statusCode}: ${e.body}]` : '';
  errors.push(String(e && (e.stack || e)) + reply);
}
console.log(JSON.stringify({ errors }));
