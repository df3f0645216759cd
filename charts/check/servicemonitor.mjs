// Validates the ServiceMonitors that check.sh split out of a render (a JSON array) against
// the Prometheus Operator's monitoring.coreos.com/v1 schema, as packaged in
// @kubernetes-models/prometheus-operator (found through NODE_PATH). The CRD's schema checks
// types, required fields and formats; like the CRD it does not refuse unknown fields, so
// check/manifests.py checks the fields the gateway's scrape depends on.
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";

const require = createRequire(process.env.NODE_PATH + "/");
const { ServiceMonitor } = require(
  "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor",
);

let failed = false;
for (const doc of JSON.parse(readFileSync(process.argv[2], "utf8"))) {
  const { apiVersion, kind, ...rest } = doc;
  try {
    new ServiceMonitor(rest).validate();
    if (apiVersion !== ServiceMonitor.apiVersion || kind !== ServiceMonitor.kind) {
      throw new Error(`apiVersion/kind ${apiVersion}/${kind}`);
    }
    console.log(`servicemonitor.mjs: ServiceMonitor ${doc.metadata.name} valid (monitoring.coreos.com/v1 schema)`);
  } catch (e) {
    failed = true;
    console.error(`servicemonitor.mjs: ServiceMonitor ${doc.metadata?.name}: ${e.message}`);
  }
}
process.exit(failed ? 1 : 0);
