// Validates KEDA ScaledObjects (JSON array on stdin) offline, three ways:
//  1. the JSON schema of @kubernetes-models/keda, generated from KEDA's Go API types (the same
//     types KEDA's CRD is generated from): types, required fields, integer formats;
//  2. unknown fields: that schema, like the CRD, lets unknown properties through (the API server
//     would silently prune them, so a typo such as `minReplicas` would be lost); the property
//     lists of the package's TypeScript declarations close that gap;
//  3. trigger metadata, which the CRD types as a free-form string map: the parameters that KEDA's
//     documentation lists for the `redis-streams` and `prometheus` scalers, and their rules.
// Usage: node check_keda.mjs <node_modules dir> < scaledobjects.json
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const modules = process.argv[2];
const pkg = join(modules, "@kubernetes-models/keda/keda.sh/v1alpha1");
const { ScaledObject } = await import(pathToFileURL(join(pkg, "ScaledObject.js")).href);

// interface name → { property: type text }, from `export interface IName { "prop"?: Type; }`.
function interfaceProps(file) {
  const text = readFileSync(join(pkg, file), "utf8");
  const m = text.match(/export interface I\w+ \{([\s\S]*?)\n\}/);
  if (!m) throw new Error(`no interface in ${file}`);
  const props = {};
  for (const line of m[1].split("\n")) {
    // Top-level members only (4 spaces); a map type opens a brace and continues on later lines.
    const p = line.match(/^ {4}"([^"]+)"\??: (.+?);?$/);
    if (p) props[p[1]] = p[2];
  }
  return props;
}

// The KEDA-declared type a property refers to (`IComGithub…V1alpha1X` → `X.d.ts`), if any.
function kedaType(typeText) {
  const m = typeText.match(/IComGithubKedacoreKedaV2ApisKedaV1alpha1(\w+)/);
  return m ? `${m[1]}.d.ts` : null;
}

function unknownFields(value, file, path, out) {
  if (value === null || typeof value !== "object") return;
  if (Array.isArray(value)) {
    value.forEach((v, i) => unknownFields(v, file, `${path}[${i}]`, out));
    return;
  }
  const props = interfaceProps(file);
  for (const [k, v] of Object.entries(value)) {
    if (!(k in props)) {
      out.push(`${path}.${k}: unknown field (known: ${Object.keys(props).join(", ")})`);
      continue;
    }
    const t = kedaType(props[k]);
    // Maps (`{ [key: string]: string }`) and types from other packages are not descended into.
    if (t && !props[k].startsWith("{")) unknownFields(v, t, `${path}.${k}`, out);
  }
}

// Scaler parameters from KEDA's scaler documentation (redis-streams, prometheus).
const SCALERS = {
  "redis-streams": {
    known: [
      "address", "addressFromEnv", "host", "hostFromEnv", "port", "portFromEnv",
      "usernameFromEnv", "passwordFromEnv", "stream", "consumerGroup",
      "pendingEntriesCount", "streamLength", "lagCount", "activationLagCount",
      "enableTLS", "unsafeSsl", "databaseIndex",
    ],
    check(md, err) {
      if (!md.stream) err("stream is required");
      if (!["address", "addressFromEnv", "host", "hostFromEnv"].some((k) => md[k]))
        err("one of address, addressFromEnv, host, hostFromEnv is required");
      if (md.lagCount !== undefined && !md.consumerGroup)
        err("lagCount needs consumerGroup (lag is a consumer-group property)");
      if (md.lagCount !== undefined && md.activationLagCount === undefined)
        err("lagCount without activationLagCount (KEDA's docs require it for lag scaling)");
      for (const k of ["pendingEntriesCount", "streamLength", "lagCount", "activationLagCount", "databaseIndex"])
        if (md[k] !== undefined && !/^\d+$/.test(md[k])) err(`${k} must be a whole number, got "${md[k]}"`);
    },
  },
  prometheus: {
    known: [
      "serverAddress", "query", "threshold", "activationThreshold", "namespace",
      "customHeaders", "ignoreNullValues", "unsafeSsl", "queryParameters", "timeout",
    ],
    check(md, err) {
      for (const k of ["serverAddress", "query", "threshold"]) if (!md[k]) err(`${k} is required`);
      for (const k of ["threshold", "activationThreshold"])
        if (md[k] !== undefined && !Number.isFinite(Number(md[k]))) err(`${k} must be a number, got "${md[k]}"`);
      if (md.serverAddress && !/^https?:\/\//.test(md.serverAddress)) err("serverAddress must be an http(s) URL");
    },
  },
};

const objects = JSON.parse(readFileSync(0, "utf8"));
let failures = 0;
for (const obj of objects) {
  const name = `${obj.metadata?.namespace ?? ""}/${obj.metadata?.name ?? "?"}`;
  const problems = [];
  try {
    new ScaledObject(obj).validate();
  } catch (e) {
    problems.push(`schema: ${e.message}`);
  }
  unknownFields(obj.spec ?? {}, "ScaledObjectSpec.d.ts", "spec", problems);
  for (const [i, t] of (obj.spec?.triggers ?? []).entries()) {
    const scaler = SCALERS[t.type];
    const err = (m) => problems.push(`spec.triggers[${i}] (${t.type}${t.name ? ` ${t.name}` : ""}): ${m}`);
    if (!scaler) {
      err("no metadata rules for this scaler type in check_keda.mjs; add them before using it");
      continue;
    }
    for (const k of Object.keys(t.metadata ?? {}))
      if (!scaler.known.includes(k)) err(`unknown metadata key ${k}`);
    scaler.check(t.metadata ?? {}, err);
  }
  if (problems.length) {
    failures++;
    console.error(`FAIL ScaledObject ${name}:\n  ${problems.join("\n  ")}`);
  } else {
    console.log(`ok   ScaledObject ${name} (${obj.spec.triggers.length} triggers)`);
  }
}
if (objects.length === 0) {
  console.error("no ScaledObject to check");
  process.exit(1);
}
process.exit(failures ? 1 : 0);
