// Tests for the nodejs runtime: the real server as a child process, spoken to over HTTP.
//
//   node --test runtimes/nodejs/test/
'use strict';

const assert = require('node:assert/strict');
const { spawn, spawnSync } = require('node:child_process');
const fs = require('node:fs');
const net = require('node:net');
const http = require('node:http');
const os = require('node:os');
const path = require('node:path');
const { after, before, describe, test } = require('node:test');

const SERVER = path.join(__dirname, '..', 'server.js');

const FIXTURES = {
  // Dispatch's hello function, as its docs give it.
  'hello.js': `
module.exports = function (context, params) {
    let name = "Noone";
    if (params.name) {
        name = params.name;
    }
    let place = "Nowhere";
    if (params.place) {
        place = params.place;
    }
    return {myField: 'Hello, ' + name + ' from ' + place}
};
`,
  'secret.js': `
const helper = require('./helper'); // a sibling module
module.exports = (context, params) => ({ password: context.secrets.password, shout: helper.shout('hi') });
`,
  'helper.js': `
exports.shout = (text) => text.toUpperCase();
`,
  'boom.js': `
module.exports = function () {
  console.log('about to fail');
  console.error('really');
  throw new Error('boom');
};
`,
  'notjson.js': `
module.exports = (context, params) => {
  if (params.kind === 'bigint') return { n: 10n };
  const loop = {};
  loop.self = loop;
  return loop;
};
`,
  // Two calls that must overlap: each waits for the other before going on.
  'pair.js': `
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
let arrived = 0;
let bothHere;
const both = new Promise((resolve) => { bothHere = resolve; });
module.exports = async (context, params) => {
  const me = params.id;
  for (let i = 0; i < 5; i++) {
    console.log(me, i);
    console.error(me, 'err', i);
    if (i === 0) {
      if (++arrived === 2) bothHere();
      await Promise.race([both, sleep(5000).then(() => { throw new Error('the calls did not overlap'); })]);
    }
    await sleep(20);
  }
  console.info(me, 'info');
  console.warn(me, 'warn');
  await new Promise((resolve) => setTimeout(() => { process.stdout.write(me + ' no newline'); resolve(); }, 5));
  return me;
};
`,
  'flood.js': `
module.exports = (context, params) => {
  const print = params.stream === 'stderr' ? console.error : console.log;
  const line = 'x'.repeat(params.width - 1);
  for (let i = 0; i < params.lines; i++) print(line);
  return 'done';
};
`,
  'slow.js': `
module.exports = () => new Promise((resolve) => setTimeout(resolve, 30000));
`,
  'promise.js': `
module.exports = async (context, params) => {
  await new Promise((resolve) => setTimeout(resolve, 10));
  console.log('after await');
  if (params.reject) throw new TypeError('rejected on purpose');
  return { doubled: params.n * 2 };
};
`,
  'object.js': `
module.exports = {
  prefix: 'object:',
  handle(context, params) { return this.prefix + params; },
};
`,
  'stray.js': `
module.exports = () => new Promise(() => {
  setTimeout(() => { throw new Error('thrown from a timer'); }, 10);
});
`,
  'syntax.js': `const x = 1;

function (a b) {}
module.exports = () => x;
`,
  'importboom.js': `
console.log('loading, but not on stdout');
throw new Error('no config file');
`,
};

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nodejs-runtime-'));
for (const [name, source] of Object.entries(FIXTURES)) fs.writeFileSync(path.join(dir, name), source);
after(() => fs.rmSync(dir, { recursive: true, force: true }));

// The server as a child process, as the gateway starts it; resolves once it is listening.
function start(t, handler, ...extra) {
  const child = spawn(process.execPath, [SERVER, '--dir', dir, '--handler', handler, ...extra],
    { stdio: ['ignore', 'pipe', 'pipe'] });
  t.after(() => child.kill('SIGKILL'));
  child.stderr.resume();
  return new Promise((resolve, reject) => {
    let out = '';
    const timer = setTimeout(() => reject(new Error(`no line within 10 s: ${out}`)), 10000);
    child.stdout.on('data', (chunk) => {
      out += chunk;
      if (!out.includes('\n')) return;
      clearTimeout(timer);
      const firstLine = out.slice(0, out.indexOf('\n') + 1);
      const [host, port] = JSON.parse(firstLine).listening.split(':');
      resolve({ child, firstLine, host, port: Number(port) });
    });
    child.on('exit', (code) => reject(new Error(`exited ${code} before listening: ${out}`)));
  });
}

function request(rt, method, urlPath, body, agent = false) {
  return new Promise((resolve, reject) => {
    const data = body === undefined ? undefined : (typeof body === 'string' ? body : JSON.stringify(body));
    const req = http.request({ host: rt.host, port: rt.port, method, path: urlPath, agent,
      headers: data === undefined ? {} : { 'Content-Length': Buffer.byteLength(data) } }, (res) => {
      const chunks = [];
      res.on('data', (chunk) => chunks.push(chunk));
      res.on('end', () => resolve({ res, text: Buffer.concat(chunks).toString(), reused: req.reusedSocket }));
    });
    req.on('error', reject);
    req.end(data);
  });
}

async function invoke(rt, payload, context = { secrets: {}, deadline: null }, agent = false) {
  const { res, text } = await request(rt, 'POST', '/', { context, payload }, agent);
  return { status: res.statusCode, body: JSON.parse(text) };
}

function check(handler) {
  const r = spawnSync(process.execPath, [SERVER, '--dir', dir, '--handler', handler, '--check'],
    { encoding: 'utf8', timeout: 10000 });
  return { code: r.status, out: r.stdout };
}

describe('serving', () => {
  test('the listening line is the only stdout', async (t) => {
    const rt = await start(t, 'hello.handle');
    assert.match(rt.firstLine, /^\{"listening":"127\.0\.0\.1:\d+"\}\n$/);
  });

  test('hello', async (t) => {
    const rt = await start(t, 'hello.handle');
    const { status, body } = await invoke(rt, { name: 'Jon', place: 'Winterfell' });
    assert.equal(status, 200);
    assert.deepEqual(body, { context: { logs: { stdout: [], stderr: [] }, error: null },
      payload: { myField: 'Hello, Jon from Winterfell' } });
    assert.equal((await invoke(rt, {})).body.payload.myField, 'Hello, Noone from Nowhere');
  });

  test('secrets reach the handler through the context', async (t) => {
    const rt = await start(t, 'secret.handle');
    const { status, body } = await invoke(rt, {}, { secrets: { password: 's3cret' }, deadline: null });
    assert.equal(status, 200);
    assert.equal(body.context.error, null);
    assert.deepEqual(body.payload, { password: 's3cret', shout: 'HI' });
  });

  test('a throwing handler is a FunctionError', async (t) => {
    const rt = await start(t, 'boom.handle');
    const { status, body } = await invoke(rt, {});
    assert.equal(status, 200);
    assert.equal(body.payload, null);
    const { error, logs } = body.context;
    assert.equal(error.type, 'FunctionError');
    assert.equal(error.message, 'boom');
    assert.equal(error.stacktrace[0], 'Error: boom');
    assert.ok(error.stacktrace.some((line) => line.includes('boom.js')), error.stacktrace);
    assert.ok(!error.stacktrace.some((line) => line.includes('server.js')), error.stacktrace);
    assert.deepEqual(logs, { stdout: ['about to fail'], stderr: ['really'] });
  });

  test('a value that is not JSON is a FunctionError', async (t) => {
    const rt = await start(t, 'notjson.handle');
    for (const kind of ['bigint', 'circular']) {
      const { status, body } = await invoke(rt, { kind });
      assert.equal(status, 200);
      assert.equal(body.payload, null);
      assert.equal(body.context.error.type, 'FunctionError');
      assert.match(body.context.error.message, /^function returned a value that is not JSON: /);
    }
  });

  test('a promise is awaited, and prints after an await are captured', async (t) => {
    const rt = await start(t, 'promise.handle');
    let { body } = await invoke(rt, { n: 21 });
    assert.deepEqual(body, { context: { logs: { stdout: ['after await'], stderr: [] }, error: null },
      payload: { doubled: 42 } });
    ({ body } = await invoke(rt, { reject: true }));
    assert.equal(body.context.error.message, 'rejected on purpose');
    assert.equal(body.context.error.stacktrace[0], 'TypeError: rejected on purpose');
    assert.deepEqual(body.context.logs.stdout, ['after await']);
  });

  test('module.exports may be an object holding the function', async (t) => {
    const rt = await start(t, 'object.handle');
    const { body } = await invoke(rt, 'x');
    assert.equal(body.context.error, null);
    assert.equal(body.payload, 'object:x');
  });

  test('an exception thrown from a timer fails its call, and the runtime lives on', async (t) => {
    const rt = await start(t, 'stray.handle');
    const { body } = await invoke(rt, {});
    assert.equal(body.context.error.message, 'thrown from a timer');
    const { res } = await request(rt, 'GET', '/healthz');
    assert.equal(res.statusCode, 200);
  });

  test('concurrent calls keep their own prints', async (t) => {
    const rt = await start(t, 'pair.handle');
    const results = await Promise.all(['A', 'B'].map((id) => invoke(rt, { id })));
    for (const [i, id] of ['A', 'B'].entries()) {
      const { status, body } = results[i];
      assert.equal(status, 200);
      assert.equal(body.context.error, null); // the calls overlapped
      assert.equal(body.payload, id);
      assert.deepEqual(body.context.logs, {
        stdout: [0, 1, 2, 3, 4].map((n) => `${id} ${n}`).concat([`${id} info`, `${id} no newline`]),
        stderr: [0, 1, 2, 3, 4].map((n) => `${id} err ${n}`).concat([`${id} warn`]),
      });
    }
  });

  test('logs are cut at the cap', async (t) => {
    const rt = await start(t, 'flood.handle', '--max-log-bytes', '1000');
    let { body } = await invoke(rt, { lines: 100, width: 50 });
    assert.equal(body.payload, 'done');
    assert.deepEqual(body.context.logs.stdout,
      Array(20).fill('x'.repeat(49)).concat(['[dispatch: logs cut at 1000 bytes]']));
    ({ body } = await invoke(rt, { lines: 100, width: 30, stream: 'stderr' }));
    const { stdout, stderr } = body.context.logs;
    assert.deepEqual(stdout, []);
    assert.equal(stderr.length, 35); // 33 lines of 30 bytes, 10 bytes of the 34th, the note
    assert.equal(stderr[33], 'x'.repeat(10));
    assert.equal(stderr[34], '[dispatch: logs cut at 1000 bytes]');
  });

  test('megabytes of prints stay under the default cap', async (t) => {
    const rt = await start(t, 'flood.handle');
    const { res, text } = await request(rt, 'POST', '/', { context: {}, payload: { lines: 20000, width: 1000 } });
    assert.equal(res.statusCode, 200);
    assert.ok(text.length < 1.2 * (1 << 20), `response of ${text.length} bytes`);
    assert.equal(JSON.parse(text).context.logs.stdout.at(-1), '[dispatch: logs cut at 1048576 bytes]');
  });

  test('a body that is not a JSON object is an InputError', async (t) => {
    const rt = await start(t, 'hello.handle');
    for (const body of ['{not json', '[1, 2]', '', 'null']) {
      const { res, text } = await request(rt, 'POST', '/', body);
      assert.equal(res.statusCode, 400, body);
      assert.equal(res.headers['content-type'], 'application/json');
      const answer = JSON.parse(text);
      assert.deepEqual(answer.context.logs, { stdout: [], stderr: [] });
      assert.equal(answer.context.error.type, 'InputError');
      assert.ok(answer.context.error.message);
      assert.equal(answer.payload, null);
    }
  });

  test('healthz and other routes', async (t) => {
    const rt = await start(t, 'hello.handle');
    const health = await request(rt, 'GET', '/healthz');
    assert.equal(health.res.statusCode, 200);
    assert.equal(health.text, 'ok');
    assert.equal((await request(rt, 'GET', '/nope')).res.statusCode, 404);
    const get = await request(rt, 'GET', '/');
    assert.equal(get.res.statusCode, 405);
    assert.equal(get.res.headers.allow, 'POST');
    assert.equal((await request(rt, 'DELETE', '/')).res.statusCode, 405);
  });

  test('keep-alive: requests share one connection', async (t) => {
    const rt = await start(t, 'hello.handle');
    const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
    t.after(() => agent.destroy());
    const first = await request(rt, 'POST', '/', { context: {}, payload: { name: 'Arya' } }, agent);
    assert.equal(JSON.parse(first.text).payload.myField, 'Hello, Arya from Nowhere');
    assert.equal(first.reused, false);
    const bad = await request(rt, 'POST', '/', 'nope', agent);
    assert.equal(bad.res.statusCode, 400);
    assert.equal(bad.reused, true);
    const second = await request(rt, 'POST', '/', { context: {}, payload: { name: 'Sansa' } }, agent);
    assert.equal(JSON.parse(second.text).payload.myField, 'Hello, Sansa from Nowhere');
    assert.equal(second.reused, true);
  });

  test('SIGTERM exits promptly with a call in flight', async (t) => {
    const rt = await start(t, 'slow.handle');
    request(rt, 'POST', '/', { context: {}, payload: null }).catch(() => {}); // dropped on exit
    await new Promise((resolve) => setTimeout(resolve, 200));
    const exited = new Promise((resolve) => rt.child.on('exit', (code, signal) => resolve({ code, signal })));
    const started = Date.now();
    rt.child.kill('SIGTERM');
    const { code, signal } = await exited;
    assert.ok(Date.now() - started < 1000, `took ${Date.now() - started} ms`);
    assert.deepEqual({ code, signal }, { code: 0, signal: null });
  });
});

describe('--check', () => {
  const notOk = (handler, reason) => {
    const { code, out } = check(handler);
    assert.equal(code, 3);
    assert.equal(out.split('\n').length, 2, out); // one line
    assert.deepEqual(JSON.parse(out), { ok: false, reason });
  };

  test('ok', () => assert.deepEqual(check('hello.handle'), { code: 0, out: '{"ok":true}\n' }));
  test('ok with an object export', () => assert.equal(check('object.handle').code, 0));
  test('missing file', () => notOk('nope.handle', `handler file nope.js not found in ${dir}`));
  test('missing function', () => notOk('object.nope',
    'object.js has no function nope (module.exports is neither a function nor has one named nope)'));
  test('syntax error names the line', () => {
    const { code, out } = check('syntax.handle');
    assert.equal(code, 3);
    assert.match(JSON.parse(out).reason, /^SyntaxError in syntax\.js line 3: /);
  });
  test('exception at load', () => notOk('importboom.handle', 'importboom.js threw at load: Error: no config file'));
  test('a port in use exits 4', async (t) => {
    const taken = net.createServer();
    await new Promise((resolve) => taken.listen(0, '127.0.0.1', resolve));
    t.after(() => taken.close());
    const { port } = taken.address();
    const child = spawn(process.execPath, [SERVER, '--dir', dir, '--handler', 'hello.handle', '--port', String(port)],
      { stdio: ['ignore', 'pipe', 'ignore'] });
    let out = '';
    child.stdout.on('data', (chunk) => { out += chunk; });
    const code = await new Promise((resolve) => child.on('close', resolve));
    assert.equal(code, 4);
    assert.ok(JSON.parse(out).reason.startsWith(`cannot listen on 127.0.0.1:${port}: `), out);
  });

  test('serving a broken handler says why and exits 3', () => {
    const r = spawnSync(process.execPath, [SERVER, '--dir', dir, '--handler', 'object.nope'],
      { encoding: 'utf8', timeout: 10000 });
    assert.equal(r.status, 3);
    assert.equal(JSON.parse(r.stdout).ok, false);
  });
});
