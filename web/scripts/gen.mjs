// Regenerates web/src/gen/ from ../proto with buf and protoc-gen-es (both from web's own
// node_modules), run from the repo root so buf.yaml's module layout applies.
import { execFileSync } from "node:child_process";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const web = join(dirname(fileURLToPath(import.meta.url)), "..");
const bin = join(web, "node_modules", ".bin");
execFileSync(join(bin, "buf"), ["generate", "--template", "web/buf.gen.yaml"], {
  cwd: join(web, ".."),
  stdio: "inherit",
  env: { ...process.env, PATH: `${bin}:${process.env.PATH}` },
});
