// Drives Debian's chromium (headless, through playwright-core) against the
// dashboard examples/live.lua serves, for spec/browser_spec.lua:
//
//   node tools/browser/dashboard.mjs LUA PORT STORE OUTDIR
//
// 1. starts `LUA examples/live.lua` on PORT with its store at STORE, opens
//    /?token=... and waits for the page to go live;
// 2. publishes through POST /events and times how long the page takes to
//    show that event (the bound: 1 s);
// 3. kills the server (SIGKILL) once the page has shown a few events,
//    starts it again on the same store and port, and waits until the page
//    has reconnected and shown events published after the restart;
// 4. writes OUTDIR/dashboard.png and prints one JSON line: the ids the page
//    showed, in order, the latency, the page's opens and resets.
// The spec compares those ids with the store's. Exits non-zero on failure.
import { spawn } from "node:child_process";
import { chromium } from "playwright-core";

const [lua, port, store, outdir] = process.argv.slice(2);
const TOKEN = "browser-test-token";
const base = `http://127.0.0.1:${port}`;
const sleep = ms => new Promise(r => setTimeout(r, ms));

function start() {
  const child = spawn(lua, ["examples/live.lua"], {
    env: { ...process.env, PORT: port, LIVE_STORE: store, BUZZ_TOKEN: TOKEN },
    stdio: ["ignore", "pipe", "inherit"],
  });
  return new Promise((resolve, reject) => {
    child.stdout.on("data", d => {
      if (String(d).includes("open http")) resolve(child);
    });
    child.on("exit", code => reject(new Error(`server exited: ${code}`)));
  });
}

async function publish(type, payload) {
  const r = await fetch(`${base}/events`, {
    method: "POST",
    headers: { Authorization: `Bearer ${TOKEN}` },
    body: JSON.stringify({ type, payload }),
  });
  if (r.status !== 202) throw new Error(`POST /events: ${r.status}`);
  return (await r.json()).id;
}

const ids = page => page.evaluate(() => window.buzz.ids.slice());

let server = await start();
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu"],
});
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 800 } });
  await page.goto(`${base}/?token=${TOKEN}`);
  await page.waitForFunction(() => window.buzz.opens >= 1, null,
                             { timeout: 5000 });
  // 2. publish -> shown
  const t0 = Date.now();
  const id = await publish("browser.check", { note: "hello from node" });
  await page.waitForFunction(want => window.buzz.ids.includes(want), id,
                             { timeout: 5000, polling: 5 });
  const latency = Date.now() - t0;
  // 3. a few more events, then the server dies and comes back
  await page.waitForFunction(() => window.buzz.ids.length >= 3, null,
                             { timeout: 10000 });
  server.kill("SIGKILL");
  await new Promise(r => server.once("exit", r));
  await sleep(500);
  server = await start();
  const after = await publish("browser.after_restart", { n: 1 });
  await page.waitForFunction(want => window.buzz.ids.includes(want), after,
                             { timeout: 15000 });
  await page.waitForFunction(() => window.buzz.opens >= 2, null,
                             { timeout: 5000 });
  await page.click("#events tbody tr:first-child");
  await sleep(300);
  await page.screenshot({ path: `${outdir}/dashboard.png` });
  const state = await page.evaluate(() => ({
    opens: window.buzz.opens, resets: window.buzz.resets,
    status: document.getElementById("status").textContent,
  }));
  console.log(JSON.stringify({ ids: await ids(page), latency, ...state }));
} finally {
  await browser.close();
  server.kill("SIGKILL");
}
