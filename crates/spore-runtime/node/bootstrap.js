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

function errorOf(err, type, message) {
  const e = err instanceof Error ? err : new Error(String(err));
  return {
    errorType: type || e.name || 'Error',
    errorMessage: message !== undefined ? message : e.message,
    stackTrace: (e.stack || '').split('\n').slice(1).map((l) => l.trim()).filter(Boolean),
  };
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
      throw { init: errorOf(err, 'Runtime.ImportModuleError', `Error: Cannot find module '${modulePath}': ${err.message}`) };
    }
    if (err instanceof SyntaxError) {
      throw { init: errorOf(err, 'Runtime.UserCodeSyntaxError') };
    }
    throw { init: errorOf(err) };
  }
  const handler = mod[fnName] || (mod.default && mod.default[fnName]);
  if (typeof handler !== 'function') {
    throw { init: { errorType: 'Runtime.HandlerNotFound', errorMessage: `${spec} is undefined or not exported`, stackTrace: [] } };
  }
  return handler;
}

function context(requestId, deadlineMs) {
  const name = process.env.AWS_LAMBDA_FUNCTION_NAME || '';
  return {
    functionName: name,
    functionVersion: process.env.AWS_LAMBDA_FUNCTION_VERSION || '$LATEST',
    memoryLimitInMB: process.env.AWS_LAMBDA_FUNCTION_MEMORY_SIZE || '0',
    awsRequestId: requestId,
    invokedFunctionArn: `arn:aws:lambda:local:000000000000:function:${name}`,
    logGroupName: `/aws/lambda/${name}`,
    logStreamName: 'spore',
    callbackWaitsForEmptyEventLoop: true,
    getRemainingTimeInMillis: () => Math.max(0, Math.floor(deadlineMs - Date.now())),
  };
}

function call(handler, event, ctx) {
  if (handler.length >= 3) {
    return new Promise((resolve, reject) => {
      const ret = handler(event, ctx, (err, value) => (err ? reject(err) : resolve(value)));
      if (ret && typeof ret.then === 'function') ret.then(resolve, reject);
    });
  }
  return Promise.resolve().then(() => handler(event, ctx));
}

async function main() {
  const t0 = process.hrtime.bigint();
  let handler;
  try {
    handler = await loadHandler(process.env._HANDLER || '');
  } catch (err) {
    send({ type: 'init_error', error: err.init || errorOf(err) });
    return 1;
  }
  send({ type: 'ready', import_ms: Number(process.hrtime.bigint() - t0) / 1e6 });
  const out = process.stdout.write.bind(process.stdout);
  const errw = process.stderr.write.bind(process.stderr);
  for (;;) {
    const frame = recv();
    if (frame === null) return 0;
    let logs = '';
    const capture = (chunk) => {
      logs += typeof chunk === 'string' ? chunk : Buffer.from(chunk).toString('utf8');
      if (logs.length > 4 * MAX_LOG) logs = logs.slice(-MAX_LOG);
      return true;
    };
    process.stdout.write = capture;
    process.stderr.write = capture;
    const start = process.hrtime.bigint();
    let error = null;
    let payload = Buffer.alloc(0);
    try {
      const event = frame.body.length ? JSON.parse(frame.body.toString('utf8')) : {};
      const result = await call(handler, event, context(frame.header.request_id, frame.header.deadline_ms));
      const text = JSON.stringify(result === undefined ? null : result);
      payload = Buffer.from(text, 'utf8');
    } catch (err) {
      error = errorOf(err);
    } finally {
      process.stdout.write = out;
      process.stderr.write = errw;
    }
    const ms = Number(process.hrtime.bigint() - start) / 1e6;
    send({ type: 'result', error, duration_ms: ms, logs: logs.slice(-MAX_LOG) }, payload);
  }
}

main().then((code) => process.exit(code), (err) => {
  process.stderr.write(`spore node runtime failed: ${err && err.stack ? err.stack : err}\n`);
  process.exit(1);
});
