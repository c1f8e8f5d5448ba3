// What the browser tests share: starting and stopping `agentrun dev` (the binary and the
// databases come from scripts/web-test.sh through the environment), launching Debian's
// chromium through playwright-core, and waiting on conditions with deadlines.
import { spawn } from "node:child_process";
import { createWriteStream, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";

import { chromium } from "playwright-core";

export const env = {
  bin: process.env.AGENTRUN_BIN,
  databaseUrl: process.env.WEB_TEST_DATABASE_URL,
  authDatabaseUrl: process.env.WEB_TEST_DATABASE_URL_AUTH,
  logDir: process.env.WEB_TEST_LOG_DIR ?? tmpdir(),
  chromium: process.env.CHROMIUM ?? "/usr/bin/chromium",
  screenshots: process.env.WEB_TEST_SCREENSHOTS,
};

/** Why the end-to-end tests cannot run here (they need scripts/web-test.sh's setup), or null. */
export function missingSetup() {
  if (!env.bin || !env.databaseUrl || !env.authDatabaseUrl) {
    return "set AGENTRUN_BIN, WEB_TEST_DATABASE_URL and WEB_TEST_DATABASE_URL_AUTH (scripts/web-test.sh does)";
  }
  return null;
}

export async function freePort() {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.on("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

/** Polls `check` until it returns a truthy value; fails with `what` after `ms`. */
export async function until(what, check, ms = 30_000, every = 100) {
  const deadline = Date.now() + ms;
  let last;
  for (;;) {
    try {
      const value = await check();
      if (value) return value;
    } catch (error) {
      last = error;
    }
    if (Date.now() > deadline) {
      throw new Error(`timed out after ${ms} ms waiting for ${what}${last ? ` (last error: ${last.message})` : ""}`);
    }
    await new Promise((r) => setTimeout(r, every));
  }
}

let devCount = 0;

/**
 * Starts `agentrun dev` on the given ports against `databaseUrl` and waits for its banner.
 * Returns { ui, key, adminKey, stop, log }: `ui` is the banner's UI address, `key` and
 * `adminKey` the client and admin keys printed with --auth.
 */
export async function startDev({
  databaseUrl,
  grpcPort,
  uiPort,
  auth = false,
  basePath = "",
  runners = 2,
  tokenDelayMs = 0,
  startMs = 90_000,
}) {
  const n = ++devCount;
  const log = join(env.logDir, `agentrun-dev-${n}.log`);
  const out = createWriteStream(log, { flags: "a" });
  const args = ["dev", "--listen", `127.0.0.1:${grpcPort}`, "--ui-listen", `127.0.0.1:${uiPort}`, "--runners", String(runners)];
  if (auth) args.push("--auth");
  if (basePath) args.push("--ui-base-path", basePath);
  const child = spawn(env.bin, args, {
    env: {
      ...process.env,
      DATABASE_URL: databaseUrl,
      AGENTRUN_SCRIPTED_TOKEN_DELAY_MS: String(tokenDelayMs),
      RUST_LOG: process.env.RUST_LOG ?? "info",
    },
    stdio: ["ignore", "pipe", "pipe"],
  });
  // The script kills what is left of these on its way out (a crashed test).
  writeFileSync(join(env.logDir, `agentrun-dev-${n}.pid`), String(child.pid));
  let stdout = "";
  let exited = null;
  child.stdout.on("data", (d) => {
    stdout += d;
    out.write(d);
  });
  child.stderr.on("data", (d) => out.write(d));
  const exit = new Promise((resolve) => child.on("exit", (code, signal) => resolve((exited = { code, signal }))));

  const banner = await until(
    `agentrun dev #${n} to print its UI address (log: ${log})`,
    () => {
      if (exited) throw new Error(`agentrun dev exited (${JSON.stringify(exited)}) before serving; see ${log}`);
      const ui = /^\s*ui\s+(http\S+)/m.exec(stdout);
      const key = /^\s*api key\s+(\S+)/m.exec(stdout);
      const adminKey = /^\s*admin key\s+(\S+)/m.exec(stdout);
      return ui && (!auth || (key && adminKey)) ? { ui: ui[1], key: key?.[1], adminKey: adminKey?.[1] } : null;
    },
    startMs,
    100,
  ).catch((error) => {
    child.kill("SIGKILL");
    throw error;
  });

  /** SIGTERM, then SIGKILL after the deadline; resolves with how it ended. */
  const stop = async (ms = 45_000) => {
    if (!exited) {
      child.kill("SIGTERM");
      const timer = setTimeout(() => child.kill("SIGKILL"), ms);
      await exit;
      clearTimeout(timer);
    }
    out.end();
    return exited;
  };
  return { ...banner, stop, log, pid: child.pid, exited: () => exited };
}

/** Debian's chromium via playwright-core, with a fresh profile; nothing is downloaded. */
export async function launchBrowser() {
  const profile = mkdtempSync(join(tmpdir(), "agentrun-web-chromium-"));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: env.chromium,
    headless: true,
    viewport: { width: 1280, height: 800 },
    args: [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  });
  // What the pages report breaking the manager's Content-Security-Policy: the app must
  // run within it.
  const cspViolations = [];
  context.on("console", (message) => {
    if (/Content.Security.Policy/i.test(message.text())) cspViolations.push(message.text());
  });
  return {
    context,
    cspViolations,
    close: async () => {
      await context.close();
      rmSync(profile, { recursive: true, force: true });
    },
  };
}
