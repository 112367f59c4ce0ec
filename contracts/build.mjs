#!/usr/bin/env node
// Compiles contracts/src/**/*.sol with the solc-js version pinned in package.json and writes
// the ABI, bytecode and method identifiers of every contract to one JSON artifact.
//
//   node build.mjs                 writes artifacts/BuildAgentServiceManager.json
//   node build.mjs --out FILE      writes FILE instead (the Rust tests use this to check that
//                                  the committed artifact is what these sources compile to)
//
// Compiler warnings are errors. Run `bash .ci/setup.d/contracts.sh` first (node + npm ci).
import { createHash } from "node:crypto";
import { mkdirSync, readdirSync, readFileSync, writeFileSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";

let solc;
try {
  solc = (await import("solc")).default;
} catch (err) {
  console.error(
    `error: cannot load the solc npm package (${err.message}).\n` +
      "Run `bash .ci/setup.d/contracts.sh` from the repository root.",
  );
  process.exit(2);
}

const here = path.dirname(fileURLToPath(import.meta.url));

function parseArgs(argv) {
  const args = { out: path.join(here, "artifacts", "BuildAgentServiceManager.json") };
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === "--out" && i + 1 < argv.length) {
      args.out = path.resolve(argv[++i]);
    } else {
      console.error(`usage: node build.mjs [--out FILE]`);
      process.exit(2);
    }
  }
  return args;
}

/** Every .sol file under src/, as sorted POSIX paths relative to contracts/. */
function solidityFiles(dir, rel = "src") {
  const found = [];
  for (const entry of readdirSync(dir, { withFileTypes: true })) {
    const abs = path.join(dir, entry.name);
    const relPath = `${rel}/${entry.name}`;
    if (entry.isDirectory()) found.push(...solidityFiles(abs, relPath));
    else if (entry.name.endsWith(".sol")) found.push(relPath);
  }
  return found.sort();
}

const args = parseArgs(process.argv.slice(2));
const files = solidityFiles(path.join(here, "src"));

// sha256 over "<path>\0<content>\0" of each file in path order; the Rust tests recompute it
// to tell whether the committed artifact is stale.
const hash = createHash("sha256");
const sources = {};
for (const file of files) {
  const content = readFileSync(path.join(here, file), "utf8");
  sources[file] = { content };
  hash.update(`${file}\0${content}\0`);
}
const sourceHash = hash.digest("hex");

const settings = {
  optimizer: { enabled: true, runs: 200 },
  evmVersion: "cancun",
  metadata: { bytecodeHash: "none" },
  outputSelection: {
    "*": {
      "*": ["abi", "evm.bytecode.object", "evm.deployedBytecode.object", "evm.methodIdentifiers"],
    },
  },
};

function findImports(importPath) {
  // Only project-local imports are allowed; they resolve relative to contracts/.
  const file = path.join(here, importPath);
  if (!file.startsWith(here + path.sep)) return { error: `import outside contracts/: ${importPath}` };
  try {
    return { contents: readFileSync(file, "utf8") };
  } catch {
    return { error: `file not found: ${importPath}` };
  }
}

const input = { language: "Solidity", sources, settings };
const output = JSON.parse(solc.compile(JSON.stringify(input), { import: findImports }));

const diagnostics = output.errors ?? [];
for (const d of diagnostics) console.error(d.formattedMessage ?? d.message);
if (diagnostics.some((d) => d.severity === "error" || d.severity === "warning")) {
  console.error(`error: solc ${solc.version()} reported errors or warnings`);
  process.exit(1);
}

const contracts = {};
for (const [source, byName] of Object.entries(output.contracts ?? {}).sort()) {
  for (const [name, c] of Object.entries(byName).sort()) {
    contracts[name] = {
      source,
      abi: c.abi,
      bytecode: `0x${c.evm.bytecode.object}`,
      deployedBytecode: `0x${c.evm.deployedBytecode.object}`,
      methodIdentifiers: c.evm.methodIdentifiers,
    };
  }
}

const artifact = {
  generatedBy: "contracts/build.mjs (do not edit by hand)",
  compiler: { name: "solc-js", version: solc.version(), settings: { ...settings, outputSelection: undefined } },
  sourceHash,
  sources: files,
  contracts,
};

mkdirSync(path.dirname(args.out), { recursive: true });
writeFileSync(args.out, `${JSON.stringify(artifact, null, 2)}\n`);
console.log(`wrote ${path.relative(process.cwd(), args.out) || args.out} (solc ${solc.version()})`);
