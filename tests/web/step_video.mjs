// Steps an exported TAEHV decoder-step graph (taesd.export.onnx_video) over a clip with onnxruntime-web
// (wasm backend, in Node), feeding each step's next_state_k back as state_k: what a browser caller
// does. tests/test_onnx_web.py runs it and compares the frames with TAEHV.decode.
//
//   node tests/web/step_video.mjs SPEC.json
//
// SPEC.json: {"model": "decoder_step.onnx",
//             "latent": {"file": "latents.bin", "shape": [N, T, C, h, w]},
//             "states": [{"file": "state_0.bin", "shape": [N, C, H, W]}, ...],   (zeros start a clip)
//             "chunk": 1,                                  (latents per step; default 1)
//             "out": "frames.bin"}
// Files are raw little-endian float32, paths relative to SPEC.json's folder. Writes the steps' frames
// concatenated along time (N x sum(t) x 3 x H x W, the first drop_first_frames not dropped) to "out",
// and prints one JSON line: {"shape": [...], "steps": k, "ms_per_step": [...], "ort": version}.
// onnxruntime-web is found in $TAESD_NODE_MODULES, else .node/node_modules at the repository root
// (scripts/setup_web.sh installs it there).
import { readFileSync, writeFileSync, existsSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const modules = process.env.TAESD_NODE_MODULES || join(here, "..", "..", ".node", "node_modules");
const entry = join(modules, "onnxruntime-web", "dist", "ort.node.min.mjs");
if (!existsSync(entry)) {
  console.error(`onnxruntime-web not found: no ${entry} (run scripts/setup_web.sh or set TAESD_NODE_MODULES)`);
  process.exit(2);
}
const ort = await import(pathToFileURL(entry).href);
const pkg = JSON.parse(readFileSync(join(modules, "onnxruntime-web", "package.json"), "utf8"));

const specPath = resolve(process.argv[2] ?? "");
const spec = JSON.parse(readFileSync(specPath, "utf8"));
const base = dirname(specPath);
const size = (shape) => shape.reduce((a, b) => a * b, 1);

function readF32(file, shape) {
  const buf = readFileSync(join(base, file));
  if (buf.byteLength !== 4 * size(shape)) {
    throw new Error(`${file}: ${buf.byteLength} bytes, expected ${4 * size(shape)} for shape [${shape}]`);
  }
  // copy: a Buffer's offset into its pool need not be 4-aligned
  return new Float32Array(buf.buffer.slice(buf.byteOffset, buf.byteOffset + buf.byteLength));
}

ort.env.wasm.numThreads = 1;
const session = await ort.InferenceSession.create(readFileSync(join(base, spec.model)), {
  executionProviders: ["wasm"], graphOptimizationLevel: "all",
});
const [inName, ...stateNames] = session.inputNames;
const [outName, ...nextNames] = session.outputNames;
if (stateNames.length !== spec.states.length) {
  throw new Error(`the graph has ${stateNames.length} state inputs, the spec ${spec.states.length}`);
}

const [N, T, C, h, w] = spec.latent.shape;
const latents = readF32(spec.latent.file, spec.latent.shape);
let state = spec.states.map((s, k) => new ort.Tensor("float32", readF32(s.file, s.shape), s.shape));
const chunk = spec.chunk ?? 1;
const per = C * h * w;                        // one latent of one batch item
const outs = [];                              // [data, shape] per step
const ms = [];
for (let t0 = 0; t0 < T; t0 += chunk) {
  const t = Math.min(chunk, T - t0);
  const x = new Float32Array(N * t * per);
  for (let n = 0; n < N; n++) {
    x.set(latents.subarray((n * T + t0) * per, (n * T + t0 + t) * per), n * t * per);
  }
  const feeds = { [inName]: new ort.Tensor("float32", x, [N, t, C, h, w]) };
  stateNames.forEach((name, k) => { feeds[name] = state[k]; });
  const start = performance.now();
  const result = await session.run(feeds);
  ms.push(performance.now() - start);
  const y = result[outName];
  outs.push([y.data, y.dims]);
  state = stateNames.map((_, k) => result[nextNames[k]]);    // fed back next call
}

// concatenate along time (axis 1)
const [, , ...rest] = outs[0][1];
const frame = size(rest);
const total = outs.reduce((a, [, d]) => a + d[1], 0);
const frames = new Float32Array(N * total * frame);
let offset = 0;
for (const [data, dims] of outs) {
  for (let n = 0; n < N; n++) {
    frames.set(data.subarray(n * dims[1] * frame, (n + 1) * dims[1] * frame), (n * total + offset) * frame);
  }
  offset += dims[1];
}
writeFileSync(join(base, spec.out), Buffer.from(frames.buffer, frames.byteOffset, frames.byteLength));
console.log(JSON.stringify({ shape: [N, total, ...rest], steps: outs.length, ms_per_step: ms, ort: pkg.version }));
