// Z-Image VRAM Monitor: live memory in the node, and its last report.
//
// Polls GET /api/zimage/vram only while the page is visible AND the graph holds a Z-Image VRAM Monitor:
// twice a second while a prompt runs, every 3 s otherwise; no timer runs at all when either condition
// is false. The server measures only when asked (and samples in a thread only while a prompt with a
// monitor runs).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const NODE_TYPE = "ZImageVRAMMonitor";
const RUNNING_MS = 500;
const IDLE_MS = 3000;
const KEEP = 240; // samples kept for the sparkline

const state = { timer: null, running: false, promptId: null, since: -1, samples: [], last: null };

function gib(b) {
  return b == null ? "n/a" : (b / 1073741824).toFixed(2);
}

function monitorNodes() {
  const g = app.graph;
  if (!g) return [];
  if (typeof g.findNodesByType === "function") return g.findNodesByType(NODE_TYPE) || [];
  return (g.nodes || g._nodes || []).filter((n) => n.type === NODE_TYPE || n.comfyClass === NODE_TYPE);
}

function shouldPoll() {
  return document.visibilityState === "visible" && monitorNodes().length > 0;
}

function schedule() {
  if (state.timer !== null) return;
  if (!shouldPoll()) return;
  state.timer = setTimeout(tick, state.running ? RUNNING_MS : IDLE_MS);
}

function stop() {
  if (state.timer !== null) clearTimeout(state.timer);
  state.timer = null;
}

async function tick() {
  state.timer = null;
  if (!shouldPoll()) return;
  try {
    const res = await api.fetchApi(`/zimage/vram?since=${encodeURIComponent(state.since)}`);
    if (res.ok) update(await res.json());
  } catch (e) {
    // server restarting: try again on the next tick
  }
  schedule();
}

function update(data) {
  state.last = data;
  const p = data.prompt;
  if (p) {
    if (p.id !== state.promptId) {
      state.promptId = p.id;
      state.since = -1;
      state.samples = [];
    }
    for (const s of p.samples || []) state.samples.push(s);
    if (state.samples.length > KEEP) state.samples.splice(0, state.samples.length - KEEP);
    if (p.samples && p.samples.length) state.since = p.samples[p.samples.length - 1].t;
  }
  for (const node of monitorNodes()) render(node);
}

function liveText(data) {
  const s = data.snapshot;
  if (!data.cuda) return `no CUDA · host RSS ${gib(s.host_rss)} GiB · RAM ${gib(s.host_used)}/${gib(s.host_total)} GiB`;
  const util = s.gpu_util == null ? "" : ` · util ${s.gpu_util}%`;
  return `VRAM ${gib(s.device_used)}/${gib(s.device_total)} GiB · alloc ${gib(s.allocated)} · ` +
    `reserved ${gib(s.reserved)} · RSS ${gib(s.host_rss)}${util}`;
}

function drawSpark(canvas, cuda) {
  const ctx = canvas.getContext("2d");
  const w = (canvas.width = canvas.clientWidth || 200);
  const h = (canvas.height = 36);
  ctx.clearRect(0, 0, w, h);
  const key = cuda ? "device_used" : "host_rss";
  const pts = state.samples.filter((s) => s[key] != null);
  if (pts.length < 2) return;
  const total = cuda ? pts[pts.length - 1].device_total : pts[pts.length - 1].host_total;
  const max = Math.max(total || 0, ...pts.map((s) => s[key])) || 1;
  const t0 = pts[0].t, t1 = pts[pts.length - 1].t || 1;
  ctx.strokeStyle = "#4a9eff";
  ctx.lineWidth = 1.5;
  ctx.beginPath();
  pts.forEach((s, i) => {
    const x = ((s.t - t0) / Math.max(t1 - t0, 1e-3)) * (w - 2) + 1;
    const y = h - 1 - (s[key] / max) * (h - 2);
    if (i === 0) ctx.moveTo(x, y);
    else ctx.lineTo(x, y);
  });
  ctx.stroke();
}

function render(node) {
  const ui = node.zimageVram;
  if (!ui || !state.last) return;
  ui.live.textContent = liveText(state.last);
  drawSpark(ui.spark, state.last.cuda);
}

app.registerExtension({
  name: "ZImage.VRAMMonitor",

  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== NODE_TYPE) return;

    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const r = onNodeCreated?.apply(this, arguments);
      const root = document.createElement("div");
      root.style.cssText = "display:flex;flex-direction:column;gap:2px;font:11px monospace;color:var(--input-text,#ddd);overflow:hidden";
      const live = document.createElement("div");
      live.textContent = "VRAM: waiting for the server";
      const spark = document.createElement("canvas");
      spark.style.cssText = "width:100%;height:36px";
      const report = document.createElement("pre");
      report.style.cssText = "margin:0;white-space:pre;overflow:auto;flex:1;max-height:240px";
      root.append(live, spark, report);
      this.zimageVram = { live, spark, report };
      if (typeof this.addDOMWidget === "function") {
        const w = this.addDOMWidget("vram_live", "zimage_vram", root, { serialize: false, hideOnZoom: true,
                                                                        getMinHeight: () => 80 });
        if (w) w.serialize = false; // never stored in widgets_values (widget values are positional)
      }
      schedule();
      return r;
    };

    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      if (this.zimageVram && message?.text) this.zimageVram.report.textContent = message.text.join("\n");
    };

    const onRemoved = nodeType.prototype.onRemoved;
    nodeType.prototype.onRemoved = function () {
      onRemoved?.apply(this, arguments);
      setTimeout(() => { if (!shouldPoll()) stop(); }, 0);
    };
  },

  setup() {
    document.addEventListener("visibilitychange", () => (shouldPoll() ? schedule() : stop()));
    api.addEventListener("execution_start", () => {
      state.running = true;
      stop();
      schedule();
    });
    for (const ev of ["execution_success", "execution_error", "execution_interrupted"]) {
      api.addEventListener(ev, () => {
        state.running = false;
      });
    }
    api.addEventListener("executing", ({ detail }) => {
      if (detail == null) state.running = false;
    });
  },

  async afterConfigureGraph() {
    schedule();
  },
});
