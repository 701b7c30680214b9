// The web target's gate: the same onnxruntime-web WebAssembly build as the page, run by node.
//
//   node run_ort_web.mjs MODEL.onnx INPUTS.txt OUT.bin [OUTPUT]
//
// INPUTS.txt lists one .npy file per line (uint8 or float32, C order, with a batch dimension);
// each is one run, so images of different sizes each go in at their own size. OUT.bin receives,
// for every input in order, the probabilities as little-endian float32: the `probs` output when
// the model has one (zoo files), else its first output; or the output named OUTPUT (ood_score).
// stdout gets one line of JSON:
//   {"ort_web_version": "1.31.1", "output": "probs", "dims": [[1, 5], ...], "ms": 812.3}
import fs from 'node:fs';
import { createRequire } from 'node:module';

const require = createRequire(import.meta.url);
const ort = require('onnxruntime-web'); // dist/ort.node.min.js: the page's wasm kernels

const DTYPES = { '|u1': ['uint8', Uint8Array], '<f4': ['float32', Float32Array] };

function readNpy(path) {
  const buf = fs.readFileSync(path);
  if (buf.toString('latin1', 1, 6) !== 'NUMPY') throw new Error(`${path}: not an .npy file`);
  const major = buf[6];
  const headerLength = major === 1 ? buf.readUInt16LE(8) : buf.readUInt32LE(8);
  const start = major === 1 ? 10 : 12;
  const header = buf.toString('latin1', start, start + headerLength);
  const descr = /'descr':\s*'([^']+)'/.exec(header)[1];
  if (!(descr in DTYPES)) throw new Error(`${path}: dtype ${descr}; write uint8 or float32`);
  if (/'fortran_order':\s*True/.test(header)) throw new Error(`${path}: Fortran order`);
  const shape = /'shape':\s*\(([^)]*)\)/.exec(header)[1].split(',')
    .map((s) => s.trim()).filter(Boolean).map(Number);
  const [type, View] = DTYPES[descr];
  const offset = start + headerLength;
  // A copy, so that a float32 view starts on an aligned offset.
  const bytes = buf.buffer.slice(buf.byteOffset + offset, buf.byteOffset + buf.length);
  return new ort.Tensor(type, new View(bytes), shape);
}

async function main(modelPath, listPath, outPath, wanted = 'probs') {
  ort.env.wasm.numThreads = 1; // as the page: threads need cross-origin isolation
  ort.env.logLevel = 'error';
  const started = performance.now();
  const session = await ort.InferenceSession.create(fs.readFileSync(modelPath), {
    executionProviders: ['wasm'],
  });
  if (!session.outputNames.includes(wanted) && wanted !== 'probs') {
    throw new Error(`the model has no ${wanted} output`);
  }
  const output = session.outputNames.includes(wanted) ? wanted : session.outputNames[0];
  const out = fs.openSync(outPath, 'w');
  const dims = [];
  for (const path of fs.readFileSync(listPath, 'utf8').split('\n').filter(Boolean)) {
    const result = await session.run({ [session.inputNames[0]]: readNpy(path) }, [output]);
    const values = Float32Array.from(result[output].data);
    fs.writeSync(out, Buffer.from(values.buffer));
    dims.push(result[output].dims);
  }
  fs.closeSync(out);
  const ms = performance.now() - started;
  const summary = { ort_web_version: ort.env.versions.web, output, dims, ms };
  process.stdout.write(JSON.stringify(summary) + '\n');
}

const args = process.argv.slice(2);
if (args.length !== 3 && args.length !== 4) {
  process.stderr.write('usage: node run_ort_web.mjs MODEL.onnx INPUTS.txt OUT.bin [OUTPUT]\n');
  process.exit(2);
}
try {
  await main(...args);
} catch (error) { // one line for the gate's message, not a stack
  process.stderr.write(String((error && error.message) || error).split('\n')[0] + '\n');
  process.exit(1);
}
