// Benchmark 10: batch-1 latency of the web page's runtime (onnxruntime-web, wasm, one thread), in
// node, from the pinned install in pipeline/export/web/node_modules (made by `make`).
//
//   node bench/web_latency.mjs MODEL.onnx PIXELS.bin H,W,C CALLS
//
// PIXELS.bin holds one uint8 image, NHWC, C order. Two untimed runs, then CALLS timed ones; stdout
// gets one line of JSON: {"ms": [one figure per call]}.
import fs from 'node:fs';
import { createRequire } from 'node:module';

const require = createRequire(new URL('../pipeline/export/web/package.json', import.meta.url));
const ort = require('onnxruntime-web');

async function main(modelPath, pixelsPath, shape, calls) {
  ort.env.wasm.numThreads = 1; // as the page: threads need cross-origin isolation
  ort.env.logLevel = 'error';
  const session = await ort.InferenceSession.create(fs.readFileSync(modelPath), {
    executionProviders: ['wasm'],
  });
  const dims = [1, ...shape.split(',').map(Number)];
  const input = new ort.Tensor('uint8', new Uint8Array(fs.readFileSync(pixelsPath)), dims);
  const feeds = { [session.inputNames[0]]: input };
  const ms = [];
  for (let i = 0; i < Number(calls) + 2; i += 1) {
    const started = performance.now();
    await session.run(feeds);
    if (i >= 2) ms.push(performance.now() - started);
  }
  process.stdout.write(JSON.stringify({ ms }) + '\n');
}

await main(...process.argv.slice(2));
