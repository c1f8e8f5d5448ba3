// Builds the UI into dist/: dist/index.html (copied from index.html) and dist/assets/app.js
// + app.css, bundled and minified by esbuild. The output is deterministic (no hashes, no
// timestamps, no source maps) because it is committed and diffed by scripts/web-test.sh;
// the manager embeds exactly these three files.
import { build } from "esbuild";
import { copyFileSync, mkdirSync, rmSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const web = dirname(fileURLToPath(import.meta.url));
const dist = join(web, "dist");
rmSync(dist, { recursive: true, force: true });
mkdirSync(join(dist, "assets"), { recursive: true });

const common = {
  bundle: true,
  minify: true,
  legalComments: "none",
  charset: "utf8",
  logLevel: "warning",
};
await build({
  ...common,
  entryPoints: [join(web, "src", "main.tsx")],
  outfile: join(dist, "assets", "app.js"),
  format: "iife",
  target: ["es2022"],
  jsx: "automatic",
  jsxImportSource: "preact",
  define: { "process.env.NODE_ENV": '"production"' },
});
await build({
  ...common,
  entryPoints: [join(web, "src", "app.css")],
  outfile: join(dist, "assets", "app.css"),
});
copyFileSync(join(web, "index.html"), join(dist, "index.html"));
