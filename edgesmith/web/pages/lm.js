// A causal LM with its KV cache in onnxruntime-web: what edgesmith's pages run.
//
// The model folder is the transformers.js layout served under /model/ (config.json,
// onnx/model_*.onnx and its external data); /edgesmith.json says which file to load.
// Inputs: input_ids, attention_mask, position_ids (when the model has it),
// past_key_values.N.key|value; outputs: logits, present.N.key|value. Every step's logits are
// checked: onnxruntime-web returns all-zero logits WITHOUT throwing when a WebGPU shader fails
// to compile (an f16 model on an adapter without shader-f16), so a check here is the only
// thing that stops a silent wrong answer.

const ORT_DIR = "/npm/onnxruntime-web/dist/";
// The webgpu build (native WebGPU EP, the one transformers.js uses) also runs "wasm"; the plain
// wasm build is smaller and is what a wasm-only page would ship. "jsep" is the older
// JavaScript WebGPU backend (ort.all), the one that returns all-zero logits when a shader does
// not compile: kept to test that the output check catches it.
const ORT_BUILD = { webgpu: "ort.webgpu.min.mjs", wasm: "ort.wasm.min.mjs", jsep: "ort.all.min.mjs" };

export async function probeWebGPU() {
  if (!("gpu" in navigator)) return { available: false, reason: "navigator.gpu is missing" };
  let adapter = null;
  try {
    adapter = await navigator.gpu.requestAdapter();
  } catch (e) {
    return { available: false, reason: String(e) };
  }
  if (!adapter) return { available: false, reason: "requestAdapter() returned null" };
  const info = adapter.info || {};
  return {
    available: true,
    vendor: info.vendor || "", architecture: info.architecture || "",
    device: info.device || "", description: info.description || "",
    features: [...adapter.features].sort(),
    shaderF16: adapter.features.has("shader-f16"),
    maxBufferSize: adapter.limits.maxBufferSize,
    maxStorageBufferBindingSize: adapter.limits.maxStorageBufferBindingSize,
  };
}

export async function chooseBackend() {
  const gpu = await probeWebGPU();
  return { backend: gpu.available ? "webgpu" : "wasm", gpu };
}

export async function loadOrt(backend, threads, build = null) {
  const file = ORT_BUILD[build || backend];
  if (!file || !["webgpu", "wasm"].includes(backend)) {
    throw new Error(`unknown backend ${backend} (build ${build}): use webgpu or wasm`);
  }
  const ort = await import(ORT_DIR + file);
  ort.env.wasm.wasmPaths = ORT_DIR;
  ort.env.wasm.numThreads = threads > 0 ? threads : Math.min(4, navigator.hardwareConcurrency || 1);
  ort.env.wasm.proxy = false;
  ort.env.logLevel = "error";
  return ort;
}

function toFloat32(tensor) {
  const d = tensor.data;
  if (d instanceof Float32Array) return d;
  if (tensor.type !== "float16") throw new Error(`logits of type ${tensor.type}`);
  if (typeof Float16Array !== "undefined" && d instanceof Float16Array) return Float32Array.from(d);
  const out = new Float32Array(d.length);
  for (let i = 0; i < d.length; i++) {
    const h = d[i], s = h & 0x8000 ? -1 : 1, e = (h >> 10) & 0x1f, m = h & 0x3ff;
    out[i] = e === 0 ? s * m * 2 ** -24 : e === 31 ? (m ? NaN : s * Infinity)
      : s * (1 + m / 1024) * 2 ** (e - 15);
  }
  return out;
}

export function checkLogits(values, where) {
  let nonzero = 0;
  for (let i = 0; i < values.length; i++) {
    const v = values[i];
    if (!Number.isFinite(v)) throw new Error(`non-finite logit (${v}) at index ${i} ${where}`);
    if (v !== 0) nonzero++;
  }
  if (nonzero === 0) {
    throw new Error(`all ${values.length} logits are zero ${where}: the backend computed ` +
      "nothing (on WebGPU: a shader that failed to compile, e.g. an f16 model on an adapter " +
      "without shader-f16; use the q4 model)");
  }
}

export function argmax(values, offset, n) {
  let best = offset, bestV = values[offset];
  for (let i = offset + 1; i < offset + n; i++) if (values[i] > bestV) { bestV = values[i]; best = i; }
  return best - offset;
}

export class CausalLM {
  // unchecked: skip the shader-f16 check (tests use it to show that the output check still
  // catches what the backend does with an f16 model on such an adapter).
  static async load(info, backend, { threads = 0, gpu = null, unchecked = false, build = null } = {}) {
    const t0 = performance.now();
    const ort = await loadOrt(backend, threads, build);
    const base = "/model/" + info.model_file.split("/").slice(0, -1).join("/");
    const opts = {
      executionProviders: [backend],
      graphOptimizationLevel: "all",
      externalData: info.external_data.map((name) => ({ path: name, data: `${base}/${name}` })),
    };
    if (backend === "webgpu") {
      opts.preferredOutputLocation = Object.fromEntries(
        info.present_names.map((n) => [n, "gpu-buffer"]));
    }
    const session = await ort.InferenceSession.create("/model/" + info.model_file, opts);
    const types = [...(session.inputMetadata || []), ...(session.outputMetadata || [])]
      .map((m) => m.type);
    if (backend === "webgpu" && types.includes("float16") && gpu && !gpu.shaderF16 && !unchecked) {
      await session.release();
      throw new Error(`${info.model_file} computes in float16 and this WebGPU adapter ` +
        `(${gpu.vendor} ${gpu.architecture}) has no shader-f16: onnxruntime-web would return ` +
        "all-zero logits; load the q4 model (fp32 activations)");
    }
    const lm = new CausalLM(ort, session, backend, info);
    lm.loadMs = performance.now() - t0;
    return lm;
  }

  constructor(ort, session, backend, info) {
    this.ort = ort;
    this.session = session;
    this.backend = backend;
    this.info = info;
    const meta = Object.fromEntries((session.inputMetadata || []).map((m) => [m.name, m]));
    this.pastNames = session.inputNames.filter((n) => n.startsWith("past_key_values."));
    this.hasPositions = session.inputNames.includes("position_ids");
    const kv = meta[this.pastNames[0]];
    this.kvType = kv && kv.type ? kv.type : info.kv_type;
    this.kvHeads = kv && Number.isInteger(kv.shape[1]) ? kv.shape[1] : info.kv_heads;
    this.headDim = kv && Number.isInteger(kv.shape[3]) ? kv.shape[3] : info.head_dim;
  }

  emptyCache() {
    const data = this.kvType === "float16" ? new Uint16Array(0) : new Float32Array(0);
    return Object.fromEntries(this.pastNames.map(
      (n) => [n, new this.ort.Tensor(this.kvType, data, [1, this.kvHeads, 0, this.headDim])]));
  }

  // Run ids after pastLen cached positions: {logits: Float32Array [n*V], vocab, cache}.
  async step(ids, cache, pastLen) {
    const T = this.ort.Tensor, n = ids.length;
    const feeds = {
      input_ids: new T("int64", BigInt64Array.from(ids, BigInt), [1, n]),
      attention_mask: new T("int64", new BigInt64Array(pastLen + n).fill(1n), [1, pastLen + n]),
      ...cache,
    };
    if (this.hasPositions) {
      const pos = new BigInt64Array(n);
      for (let i = 0; i < n; i++) pos[i] = BigInt(pastLen + i);
      feeds.position_ids = new T("int64", pos, [1, n]);
    }
    const out = await this.session.run(feeds);
    for (const t of Object.values(cache)) if (t.location === "gpu-buffer") t.dispose();
    const next = {};
    for (const [name, t] of Object.entries(out)) {
      if (name.startsWith("present.")) next[name.replace("present.", "past_key_values.")] = t;
    }
    const logits = toFloat32(out.logits);
    const vocab = out.logits.dims[out.logits.dims.length - 1];
    checkLogits(logits.subarray(logits.length - vocab), `at position ${pastLen + n - 1} on ${this.backend}`);
    return { logits, vocab, cache: next };
  }

  release(cache) {
    for (const t of Object.values(cache)) if (t.location === "gpu-buffer") t.dispose();
  }

  // Logits of every position of ids, from an empty cache.
  async logitsOf(ids) {
    const r = await this.step(ids, this.emptyCache(), 0);
    this.release(r.cache);
    checkLogits(r.logits, `over the prompt on ${this.backend}`);
    return r;
  }

  // Greedy generation of exactly n tokens (EOS is no stop unless stopIds has it), timed.
  async generate(ids, n, { onToken = null, stopIds = [] } = {}) {
    const t0 = performance.now();
    let r = await this.step(ids, this.emptyCache(), 0);
    const prefillMs = performance.now() - t0;
    const tokens = [argmax(r.logits, r.logits.length - r.vocab, r.vocab)];
    const ttftMs = performance.now() - t0;
    if (onToken) await onToken(tokens[0], tokens);
    const t1 = performance.now();
    let pos = ids.length;
    while (tokens.length < n && !stopIds.includes(tokens[tokens.length - 1])) {
      r = await this.step([tokens[tokens.length - 1]], r.cache, pos);
      pos += 1;
      tokens.push(argmax(r.logits, 0, r.vocab));
      if (onToken) await onToken(tokens[tokens.length - 1], tokens);
    }
    const decodeMs = performance.now() - t1;
    this.release(r.cache);
    return { tokens, prefillMs, ttftMs, decodeMs, promptTokens: ids.length };
  }

  async close() {
    await this.session.release();
  }
}
