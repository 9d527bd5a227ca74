// Spore's in-sandbox Node.js runtime.
//
// Loads the handler named by $_HANDLER ("module.function", CommonJS or ES module), tells the
// daemon it is ready, then serves invocations over the control socket on fd
// $SPORE_CONTROL_FD, one at a time. Frame: u32 LE header length, u32 LE body length, JSON
// header, body bytes. Handlers are `async (event, context)` or `(event, context, callback)`.
'use strict';

const fs = require('fs');
const path = require('path');
const { pathToFileURL } = require('url');

const FD = Number(process.env.SPORE_CONTROL_FD || '3');
const TASK_ROOT = process.env.LAMBDA_TASK_ROOT || '/var/task';
const MAX_LOG = 64 * 1024;

function readExact(n) {
  const buf = Buffer.allocUnsafe(n);
  let got = 0;
  while (got < n) {
    let k;
    try {
      k = fs.readSync(FD, buf, got, n - got, null);
    } catch (err) {
      if (err.code === 'EAGAIN' || err.code === 'EINTR') continue;
      throw err;
    }
    if (k === 0) {
      if (got === 0) return null;
      throw new Error('control socket closed mid-frame');
    }
    got += k;
  }
  return buf;
}

function recv() {
  const prefix = readExact(8);
  if (prefix === null) return null;
  const hlen = prefix.readUInt32LE(0);
  const blen = prefix.readUInt32LE(4);
  const header = JSON.parse(readExact(hlen).toString('utf8'));
  const body = blen ? readExact(blen) : Buffer.alloc(0);
  return { header, body };
}

function send(header, body = Buffer.alloc(0)) {
  const h = Buffer.from(JSON.stringify(header), 'utf8');
  const prefix = Buffer.alloc(8);
  prefix.writeUInt32LE(h.length, 0);
  prefix.writeUInt32LE(body.length, 4);
  const frame = Buffer.concat([prefix, h, body]);
  let off = 0;
  while (off < frame.length) {
    try {
      off += fs.writeSync(FD, frame, off, frame.length - off);
    } catch (err) {
      if (err.code !== 'EAGAIN' && err.code !== 'EINTR') throw err;
    }
  }
}

// Lambda's error JSON for Node.js: `trace` holds the stack, without the runtime's frames.
function errorOf(err, type, message) {
  if (!(err instanceof Error)) {
    // A thrown string or object: Lambda names its type after `typeof`.
    return {
      errorType: type || typeof err,
      errorMessage: message !== undefined ? message : String(err),
      trace: [],
    };
  }
  const trace = (err.stack || '').split('\n').filter((l) => !/^\s+at /.test(l) || (!l.includes(__filename) && !l.includes('node:internal') && !l.includes('at new Promise (<anonymous>)')));
  return {
    errorType: type || err.name || 'Error',
    errorMessage: message !== undefined ? message : err.message,
    trace,
  };
}

// The invocation being served (its request id prefixes console lines, as Lambda's).
let requestId = 'undefined';
const util = require('util');

// console.* as Lambda's Node.js runtime writes them: `<ISO time>\t<request id>\t<LEVEL>\t<text>`.
function patchConsole() {
  const levels = { log: 'INFO', info: 'INFO', warn: 'WARN', error: 'ERROR', debug: 'DEBUG', trace: 'TRACE' };
  for (const [name, level] of Object.entries(levels)) {
    console[name] = (...args) => {
      let text = util.format(...args);
      if (name === 'trace') text += '\n' + new Error().stack.split('\n').slice(2).join('\n');
      const out = level === 'ERROR' || level === 'WARN' || level === 'TRACE' ? process.stderr : process.stdout;
      out.write(`${new Date().toISOString()}\t${requestId}\t${level}\t${text}\n`);
    };
  }
}

async function loadHandler(spec) {
  const dot = spec.lastIndexOf('.');
  const modulePath = spec.slice(0, dot);
  const fnName = spec.slice(dot + 1);
  const base = path.resolve(TASK_ROOT, modulePath);
  let mod;
  try {
    const candidates = ['.js', '.cjs', '.mjs'].map((ext) => base + ext).filter((f) => fs.existsSync(f));
    if (candidates.length === 0) {
      const err = new Error(`Cannot find module '${modulePath}'`);
      throw Object.assign(err, { code: 'MODULE_NOT_FOUND' });
    }
    const file = candidates[0];
    if (file.endsWith('.mjs')) {
      mod = await import(pathToFileURL(file).href);
    } else {
      try {
        mod = require(file);
      } catch (err) {
        if (err.code !== 'ERR_REQUIRE_ESM') throw err;
        mod = await import(pathToFileURL(file).href);
      }
    }
  } catch (err) {
    if (err.code === 'MODULE_NOT_FOUND' || err.code === 'ERR_MODULE_NOT_FOUND') {
      throw { init: errorOf(err, 'Runtime.ImportModuleError', `Error: Cannot find module '${modulePath}'`) };
    }
    if (err instanceof SyntaxError) {
      throw { init: errorOf(err, 'Runtime.UserCodeSyntaxError') };
    }
    throw { init: errorOf(err) };
  }
  const handler = mod[fnName] || (mod.default && mod.default[fnName]);
  if (typeof handler !== 'function') {
    throw { init: { errorType: 'Runtime.HandlerNotFound', errorMessage: `${spec} is undefined or not exported`, trace: [] } };
  }
  return handler;
}

function context(id, deadlineMs, clientContext, settle) {
  const env = process.env;
  const name = env.AWS_LAMBDA_FUNCTION_NAME || '';
  return {
    functionName: name,
    functionVersion: env.AWS_LAMBDA_FUNCTION_VERSION || '$LATEST',
    memoryLimitInMB: env.AWS_LAMBDA_FUNCTION_MEMORY_SIZE || '0',
    awsRequestId: id,
    invokedFunctionArn: `arn:aws:lambda:${env.AWS_REGION || 'us-east-1'}:000000000000:function:${name}`,
    logGroupName: env.AWS_LAMBDA_LOG_GROUP_NAME || `/aws/lambda/${name}`,
    logStreamName: env.AWS_LAMBDA_LOG_STREAM_NAME || '',
    identity: undefined,
    clientContext: clientContext || undefined,
    callbackWaitsForEmptyEventLoop: true,
    getRemainingTimeInMillis: () => Math.max(0, Math.floor(deadlineMs - Date.now())),
    // The legacy completion methods (Lambda keeps them): the first settlement wins.
    succeed: (result) => settle(null, result),
    fail: (err) => settle(err === undefined || err === null ? new Error('handled') : err),
    done: (err, result) => settle(err, result),
  };
}

let whenIdle = null;
process.on('beforeExit', () => {
  const f = whenIdle;
  whenIdle = null;
  if (f) f();
});

// Runs the handler: async, callback style, or finishing through context.succeed/fail/done.
function call(handler, event, header) {
  return new Promise((resolve, reject) => {
    let settled = false;
    const settle = (err, value) => {
      if (settled) return;
      settled = true;
      if (err !== null && err !== undefined) reject(err);
      else resolve(value);
    };
    const ctx = context(header.request_id, header.deadline_ms, header.client_context, settle);
    try {
      const ret = handler.length >= 3 ? handler(event, ctx, settle) : handler(event, ctx);
      if (ret && typeof ret.then === 'function') ret.then((v) => settle(null, v), (e) => settle(e === undefined || e === null ? new Error(String(e)) : e));
      else if (handler.length < 3 && ret !== undefined) settle(null, ret);
      // A plain handler that returned nothing may still finish through context.succeed()
      // later; with nothing left to run, it returned null (Lambda waits for the empty loop).
      else if (handler.length < 3) whenIdle = () => settle(null, null);
    } catch (err) {
      settle(err);
    }
  });
}

async function main() {
  const t0 = process.hrtime.bigint();
  const out = process.stdout.write.bind(process.stdout);
  const errw = process.stderr.write.bind(process.stderr);
  patchConsole();
  // What init prints goes to the function's log before the first START line (with `ready`).
  let initLogs = '';
  const initCapture = (chunk) => {
    initLogs += typeof chunk === 'string' ? chunk : Buffer.from(chunk).toString('utf8');
    if (initLogs.length > 4 * MAX_LOG) initLogs = initLogs.slice(-MAX_LOG);
    return true;
  };
  process.stdout.write = initCapture;
  process.stderr.write = initCapture;
  let handler;
  try {
    handler = await loadHandler(process.env._HANDLER || '');
  } catch (err) {
    process.stdout.write = out;
    process.stderr.write = errw;
    if (initLogs) errw(initLogs);
    send({ type: 'init_error', error: err.init || errorOf(err) });
    return 1;
  }
  process.stdout.write = out;
  process.stderr.write = errw;
  send({ type: 'ready', import_ms: Number(process.hrtime.bigint() - t0) / 1e6, logs: initLogs.slice(-MAX_LOG) });
  // Each write goes to the daemon as it happens, so that output before a timeout is kept.
  const stream = (chunk) => {
    const text = typeof chunk === 'string' ? chunk : Buffer.from(chunk).toString('utf8');
    // Frames of at most MAX_LOG characters: a frame's header must stay under the protocol's
    // 1 MiB, however much one write holds.
    for (let i = 0; i < text.length; i += MAX_LOG) {
      send({ type: 'logs', logs: text.slice(i, i + MAX_LOG) });
    }
    return true;
  };
  for (;;) {
    const frame = recv();
    if (frame === null) return 0;
    requestId = frame.header.request_id;
    process.stdout.write = stream;
    process.stderr.write = stream;
    const start = process.hrtime.bigint();
    let error = null;
    let payload = Buffer.alloc(0);
    try {
      const event = frame.body.length ? JSON.parse(frame.body.toString('utf8')) : {};
      const result = await call(handler, event, frame.header);
      whenIdle = null;
      let text;
      try {
        text = JSON.stringify(result === undefined ? null : result);
      } catch (err) {
        // A circular structure or a BigInt: Lambda's marshal error, not the raw TypeError.
        error = { errorType: 'Runtime.MarshalError', errorMessage: 'Unable to stringify response body', trace: [] };
      }
      if (!error) payload = Buffer.from(text === undefined ? 'null' : text, 'utf8');
    } catch (err) {
      error = errorOf(err);
    }
    if (error) {
      // Lambda's Node.js runtime logs the error it returns as one entry.
      const logged = { errorType: error.errorType, errorMessage: error.errorMessage, stack: error.trace };
      stream(`${new Date().toISOString()}\t${requestId}\tERROR\tInvoke Error \t${JSON.stringify(logged)}\n`);
    }
    process.stdout.write = out;
    process.stderr.write = errw;
    const ms = Number(process.hrtime.bigint() - start) / 1e6;
    send({ type: 'result', error, duration_ms: ms, logs: '', error_logged: error !== null }, payload);
    requestId = 'undefined';
  }
}

main().then((code) => process.exit(code), (err) => {
  process.stderr.write(`spore node runtime failed: ${err && err.stack ? err.stack : err}\n`);
  process.exit(1);
});
