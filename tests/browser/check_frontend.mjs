// Loads each UI workflow into the real ComfyUI frontend served by the real server, in headless
// Chromium (Debian's), and reports what the page saw. Usage:
//   node check_frontend.mjs URL OUT_DIR workflow.json [workflow.json ...]
// Prints one JSON line: {workflows: {name: {missing: [...], errors: [...], nodes: n}}, templates: [...], console: [...]}
import { createRequire } from "module";
import fs from "fs";
import path from "path";

const require = createRequire(process.env.PLAYWRIGHT_CORE_DIR + "/");
const { chromium } = require("playwright-core");

const [url, outDir, ...files] = process.argv.slice(2);
const userDir = fs.mkdtempSync(path.join(outDir, "chromium-"));
const browser = await chromium.launchPersistentContext(userDir, {
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"],
  viewport: { width: 1600, height: 1000 },
});
const page = browser.pages()[0] || (await browser.newPage());
const consoleErrors = [];
page.on("console", (m) => { if (m.type() === "error") consoleErrors.push(m.text()); });
page.on("pageerror", (e) => consoleErrors.push(String(e)));
await page.goto(url, { waitUntil: "domcontentloaded", timeout: 120000 });
await page.waitForFunction(() => window.app && window.app.graph && window.app.canvas &&
  window.LiteGraph && window.LiteGraph.registered_node_types["ZImageLoader"], null, { timeout: 120000 });

const result = { workflows: {}, console: consoleErrors };
for (const file of files) {
  const data = JSON.parse(fs.readFileSync(file, "utf8"));
  const name = path.basename(file, ".json");
  const report = await page.evaluate(async (wf) => {
    await window.app.loadGraphData(wf);
    await new Promise((r) => setTimeout(r, 500));
    const nodes = window.app.graph._nodes;
    const registered = window.LiteGraph.registered_node_types;
    return {
      nodes: nodes.length,
      missing: nodes.filter((n) => !registered[n.type]).map((n) => n.type),
      errors: nodes.filter((n) => n.has_errors).map((n) => n.type),
      widgets: Object.fromEntries(nodes.map((n) => [n.id, (n.widgets || []).map((w) => w.value)])),
    };
  }, data);
  await page.screenshot({ path: path.join(outDir, name + ".png") });
  result.workflows[name] = report;
}
result.templates = await page.evaluate(async () => (await (await fetch("/api/workflow_templates")).json()));
console.log(JSON.stringify(result));
await browser.close();
