#!/usr/bin/env node
// The nodejs function runtime: one process serves one function on a loopback port.
//
// The gateway's local driver starts it as a child process, reads one JSON line from its
// stdout to learn the port, then speaks the Dispatch pod contract (DESIGN.md section 3):
// POST / with {"context": {...}, "payload": <input>} calls `fn(context, params)`, awaits it
// when it returns a promise, and answers
// {"context": {"logs": {"stdout": [..], "stderr": [..]}, "error": null | {..}}, "payload": <output>}.
// What the handler prints during a call is captured into that call's logs, even when calls
// run concurrently. Node's standard library only. See runtimes/README.md for the contract.
//
//   node server.js --dir DIR --handler hello.handle [--host 127.0.0.1] [--port 0]
//                  [--max-log-bytes 1048576] [--check]
'use strict';

const fs = require('node:fs');
const http = require('node:http');
const path = require('node:path');
const util = require('node:util');
const { AsyncLocalStorage } = require('node:async_hooks');

const EXIT_USAGE = 2;
const EXIT_NOT_LOADABLE = 3; // the handler cannot be loaded: the function is broken, not the runtime
const EXIT_CANNOT_LISTEN = 4; // the host/port cannot be bound: retrying elsewhere may help

// The real writers, saved before process.stdout/stderr.write are replaced. The real stdout
// carries only this runtime's JSON lines (the gateway reads the first one).
const protocolWrite = process.stdout.write.bind(process.stdout);
const realErrWrite = process.stderr.write.bind(process.stderr);

// The stdout/stderr lines of one call, capped at maxBytes in total. Writes arrive in
// arbitrary pieces, so each stream keeps its unfinished line until a newline or the end of
// the call. Once the cap is reached the rest is dropped: printing megabytes costs no memory.
class CallLogs {
  constructor(maxBytes) {
    this.maxBytes = maxBytes;
    this.used = 0;
    this.cutIn = null; // the stream that overflowed, once it has
    this.lines = { stdout: [], stderr: [] };
    this.partial = { stdout: [], stderr: [] }; // pieces of the unfinished line
  }

  write(stream, text) {
    if (this.cutIn) return;
    let size = Buffer.byteLength(text, 'utf8');
    if (this.used + size > this.maxBytes) {
      size = this.maxBytes - this.used;
      text = utf8Prefix(text, size);
      this.cutIn = stream;
    }
    this.used += size;
    const done = text.split('\n');
    const rest = done.pop();
    const pieces = this.partial[stream];
    if (done.length > 0) { // the pieces end their line; joined only then, so small writes are cheap
      done[0] = pieces.join('') + done[0];
      pieces.length = 0;
      for (const line of done) this.lines[stream].push(line.replace(/\r$/, ''));
    }
    if (rest) pieces.push(rest);
  }

  // The logs as the pod contract wants them: unfinished lines kept, the cut noted.
  finish() {
    for (const stream of ['stdout', 'stderr']) {
      const pieces = this.partial[stream];
      if (pieces.length > 0) this.lines[stream].push(pieces.join('').replace(/\r$/, ''));
      pieces.length = 0;
    }
    if (this.cutIn && this.cutIn !== 'reported') {
      this.lines[this.cutIn].push(`[dispatch: logs cut at ${this.maxBytes} bytes]`);
      this.cutIn = 'reported'; // keeps dropping late writes, reports the cut once
    }
    return this.lines;
  }
}

// The longest prefix of text that fits in `bytes` of UTF-8 without splitting a character.
function utf8Prefix(text, bytes) {
  const buf = Buffer.from(text, 'utf8');
  let end = bytes;
  while (end > 0 && (buf[end] & 0xc0) === 0x80) end--; // buf[end] continues a character
  return buf.subarray(0, end).toString('utf8');
}

// The call whose code is running, followed across awaits, timers and callbacks.
const calls = new AsyncLocalStorage();

// A replacement for stream.write that sends text to the current call's logs. console.log,
// info and debug write process.stdout; console.error and warn write process.stderr, so they
// follow. Outside a call (loading the handler, a timer firing after its call ended) text
// goes to the real stderr, never to stdout, which carries only the runtime's JSON lines.
function routedWrite(stream) {
  return function write(chunk, encoding, callback) {
    if (typeof encoding === 'function') [callback, encoding] = [encoding, undefined];
    const call = calls.getStore();
    if (!call || call.done) return realErrWrite(chunk, encoding, callback);
    call.logs.write(stream, toText(chunk, encoding));
    if (typeof callback === 'function') process.nextTick(callback);
    return true;
  };
}

function toText(chunk, encoding) {
  if (typeof chunk !== 'string') return Buffer.from(chunk).toString('utf8');
  return !encoding || /^utf-?8$/i.test(encoding) ? chunk : Buffer.from(chunk, encoding).toString('utf8');
}

function loadHandler(dir, handler) {
  const dot = handler.lastIndexOf('.');
  if (dot <= 0 || dot === handler.length - 1) {
    return { reason: `handler must be file.function, got ${JSON.stringify(handler)}` };
  }
  const fileName = `${handler.slice(0, dot)}.js`;
  const funcName = handler.slice(dot + 1);
  const file = path.resolve(dir, fileName);
  if (!isFile(file)) {
    return { reason: `handler file ${fileName} not found in ${dir}` };
  }
  let exported;
  try {
    exported = require(file); // sibling modules resolve from the file's directory as usual
  } catch (err) {
    return { reason: loadFailure(err, fileName) };
  }
  // Dispatch's convention is `module.exports = function (context, params) {...}`.
  if (typeof exported === 'function') return { fn: exported };
  if (exported && typeof exported[funcName] === 'function') {
    return { fn: exported[funcName].bind(exported) };
  }
  return {
    reason: `${fileName} has no function ${funcName} `
      + `(module.exports is neither a function nor has one named ${funcName})`,
  };
}

function isFile(file) {
  try {
    return fs.statSync(file).isFile();
  } catch {
    return false; // absent, or DIR is not a directory
  }
}

function loadFailure(err, fileName) {
  const message = String(err?.message ?? err).split('\n')[0]; // not the "Require stack" lines
  // A compile error's stack starts with "/path/file.js:LINE"; an error thrown while running
  // the module (even a SyntaxError from JSON.parse) does not.
  const where = /^(.*):(\d+)$/.exec(String(err?.stack).split('\n')[0]);
  if (err instanceof SyntaxError && where) {
    return `SyntaxError in ${path.basename(where[1])} line ${where[2]}: ${message}`;
  }
  const name = err instanceof Error ? `${err.name}: ` : '';
  return `${fileName} threw at load: ${name}${message}`;
}

// Runs one call with its prints captured; resolves to the pod contract's response as JSON.
async function invoke(fn, context, payload, maxLogBytes) {
  const call = { logs: new CallLogs(maxLogBytes), done: false, fail: null };
  // An exception the handler's code throws from a timer or callback, or a promise it drops
  // rejected, fails this call (see reportStray) instead of hanging it or killing the process.
  const stray = new Promise((_, reject) => { call.fail = reject; });
  let output = 'null';
  let error = null;
  try {
    const result = await Promise.race([calls.run(call, async () => fn(context, payload)), stray]);
    try { // encoded here, so a value that is not JSON fails this call and nothing else
      output = JSON.stringify(result) ?? 'null'; // undefined, a function: no value
    } catch (err) {
      error = functionError(`function returned a value that is not JSON: ${err.message}`, []);
    }
  } catch (err) {
    error = thrown(err);
  }
  call.done = true;
  return `{"context":${JSON.stringify({ logs: call.logs.finish(), error })},"payload":${output}}`;
}

function reportStray(err) {
  const call = calls.getStore();
  if (call && !call.done) return call.fail(err);
  realErrWrite(`dispatch: error outside any call: ${err?.stack ?? util.inspect(err)}\n`);
}

// The FunctionError for a thrown value, its stack trace cut where this runtime's frames start.
function thrown(err) {
  if (err instanceof Error || typeof err?.stack === 'string') {
    const stack = String(err.stack).split('\n');
    const ours = stack.findIndex((line) => line.includes(__filename) || line.includes('AsyncLocalStorage.run'));
    return functionError(String(err.message), ours < 0 ? stack : stack.slice(0, ours));
  }
  return functionError(`threw a value that is not an Error: ${util.inspect(err)}`, []);
}

function functionError(message, stacktrace) {
  return { type: 'FunctionError', message, stacktrace };
}

function inputError(message) {
  const error = { type: 'InputError', message };
  return JSON.stringify({ context: { logs: { stdout: [], stderr: [] }, error }, payload: null });
}

const ROUTES = new Map([['/', 'POST'], ['/healthz', 'GET']]);
const utf8 = new TextDecoder('utf-8', { fatal: true });

async function route(req, res, body, opts) {
  const pathname = req.url.split('?')[0];
  const allowed = ROUTES.get(pathname);
  if (!allowed) return reply(res, 404, 'text/plain', `no route ${pathname}: POST / or GET /healthz`);
  if (req.method !== allowed && !(req.method === 'HEAD' && allowed === 'GET')) {
    return reply(res, 405, 'text/plain', `${pathname} takes ${allowed}`, { Allow: allowed });
  }
  if (pathname === '/healthz') return reply(res, 200, 'text/plain', 'ok');
  let envelope;
  try {
    envelope = JSON.parse(utf8.decode(body));
  } catch (err) {
    return reply(res, 400, 'application/json', inputError(`request body is not JSON: ${err.message}`));
  }
  if (!isObject(envelope)) {
    const kind = Array.isArray(envelope) ? 'array' : String(envelope === null ? null : typeof envelope);
    return reply(res, 400, 'application/json', inputError(`request body must be a JSON object, not ${kind}`));
  }
  const context = envelope.context ?? {};
  if (!isObject(context)) return reply(res, 400, 'application/json', inputError('context must be a JSON object'));
  reply(res, 200, 'application/json', await invoke(opts.fn, context, envelope.payload, opts.maxLogBytes));
}

function isObject(value) {
  return value !== null && typeof value === 'object' && !Array.isArray(value);
}

function reply(res, status, contentType, text, headers = {}) {
  res.writeHead(status, { 'Content-Type': contentType, 'Content-Length': Buffer.byteLength(text), ...headers });
  res.end(text); // node sends no body for HEAD
}

function serve(opts) {
  const server = http.createServer({
    keepAliveTimeout: 0, // idle pooled connections stay open; the gateway closes them
    requestTimeout: 0, // a call may run as long as its function's timeout; the gateway enforces it
  }, (req, res) => {
    const chunks = [];
    req.on('data', (chunk) => chunks.push(chunk));
    req.on('end', () => {
      route(req, res, Buffer.concat(chunks), opts).catch((err) => {
        realErrWrite(`dispatch: ${err?.stack ?? err}\n`);
        if (!res.headersSent) reply(res, 500, 'text/plain', 'runtime error; see its stderr');
      });
    });
  });
  server.on('error', (err) => {
    say({ ok: false, reason: `cannot listen on ${opts.host}:${opts.port}: ${err.message}` }, EXIT_CANNOT_LISTEN);
  });
  server.listen(opts.port, opts.host, () => {
    const { address, family, port } = server.address();
    say({ listening: family === 'IPv6' ? `[${address}]:${port}` : `${address}:${port}` });
  });
  process.on('SIGTERM', () => { server.close(); process.exit(0); });
  process.on('SIGINT', () => { server.close(); process.exit(0); });
}

// Writes one JSON line to the real stdout; with an exit code, exits once it is written.
function say(value, exitCode) {
  const line = `${JSON.stringify(value)}\n`;
  if (exitCode === undefined) protocolWrite(line);
  else protocolWrite(line, () => process.exit(exitCode));
}

function parseArgs() {
  const { values } = util.parseArgs({
    options: {
      dir: { type: 'string' },
      handler: { type: 'string' },
      host: { type: 'string', default: '127.0.0.1' },
      port: { type: 'string', default: '0' },
      'max-log-bytes': { type: 'string', default: String(1 << 20) },
      check: { type: 'boolean', default: false },
      // Exit when stdin closes: the gateway holds its end, so a gateway that dies (even by
      // SIGKILL) takes its runtimes with it.
      'exit-with-stdin': { type: 'boolean', default: false },
    },
  });
  const opts = {
    dir: values.dir, handler: values.handler, host: values.host, check: values.check,
    exitWithStdin: values['exit-with-stdin'],
    port: Number(values.port), maxLogBytes: Number(values['max-log-bytes']),
  };
  if (!opts.dir || !opts.handler) throw new Error('--dir and --handler are required');
  if (!Number.isInteger(opts.port) || opts.port < 0) throw new Error(`--port: not a port: ${values.port}`);
  if (!Number.isInteger(opts.maxLogBytes) || opts.maxLogBytes < 0) {
    throw new Error(`--max-log-bytes: not a byte count: ${values['max-log-bytes']}`);
  }
  return opts;
}

function main() {
  let opts;
  try {
    opts = parseArgs();
  } catch (err) {
    realErrWrite(`server.js: ${err.message}\nusage: node server.js --dir DIR --handler file.function `
      + '[--host 127.0.0.1] [--port 0] [--max-log-bytes 1048576] [--check]\n');
    process.exit(EXIT_USAGE);
  }
  process.stdout.write = routedWrite('stdout');
  process.stderr.write = routedWrite('stderr');
  process.on('uncaughtException', reportStray);
  process.on('unhandledRejection', reportStray);
  const { fn, reason } = loadHandler(opts.dir, opts.handler);
  if (!fn) return say({ ok: false, reason }, EXIT_NOT_LOADABLE);
  if (opts.check) return say({ ok: true }, 0);
  if (opts.exitWithStdin) {
    process.stdin.on('end', () => process.exit(0));
    process.stdin.on('error', () => process.exit(0));
    process.stdin.resume();
  }
  serve({ ...opts, fn });
}

main();
