// The harness page: Python (playwright) calls window.edgesmith.* and reads the results.
import { CausalLM, probeWebGPU } from "/pages/lm.js";

let lm = null;

function b64(floats) {
  const bytes = new Uint8Array(floats.buffer, floats.byteOffset, floats.byteLength);
  let s = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    s += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  }
  return btoa(s);
}

window.edgesmith = {
  probe: async () => ({ gpu: await probeWebGPU(), isolated: self.crossOriginIsolated,
                        cores: navigator.hardwareConcurrency, agent: navigator.userAgent }),
  load: async (backend, threads, unchecked = false, build = null) => {
    if (lm) await lm.close();
    lm = null;
    const info = await (await fetch("/edgesmith.json")).json();
    const gpu = backend === "webgpu" ? await probeWebGPU() : null;
    lm = await CausalLM.load(info, backend, { threads, gpu, unchecked, build });
    return { loadMs: lm.loadMs, kvType: lm.kvType, kvHeads: lm.kvHeads, headDim: lm.headDim,
             inputs: lm.session.inputNames, outputs: lm.session.outputNames };
  },
  logits: async (ids) => {
    const r = await lm.logitsOf(ids);
    return { vocab: r.vocab, b64: b64(r.logits) };
  },
  generate: async (ids, n) => lm.generate(ids, n),
  close: async () => { if (lm) await lm.close(); lm = null; },
};
window.edgesmithReady = true;
