// Regenerates src/gen/ from ../../proto with buf and protoc-gen-es (both from this
// package's own node_modules), run from the repo root so buf.yaml's module layout applies.
import { execFileSync } from "node:child_process";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const pkg = join(dirname(fileURLToPath(import.meta.url)), "..");
const bin = join(pkg, "node_modules", ".bin");
execFileSync(join(bin, "buf"), ["generate", "--template", "clients/typescript/buf.gen.yaml"], {
  cwd: join(pkg, "..", ".."),
  stdio: "inherit",
  env: { ...process.env, PATH: `${bin}:${process.env.PATH}` },
});
