#!/usr/bin/env bash
# Validates what operators deploy with, using tools that share no code with ours:
# the alert rules (promtool), the compose file (compose-spec JSON Schema), the Kubernetes
# manifests (Kubernetes' own OpenAPI schemas), the Grafana dashboard (JSON), the RabbitMQ
# definitions (JSON), the message schemas and the admin API document.
set -euo pipefail
cd "$(dirname "$0")/.."

need_pip=()
command -v check-jsonschema >/dev/null || need_pip+=(check-jsonschema)
command -v kubernetes-validate >/dev/null || need_pip+=(kubernetes-validate)
command -v openapi-spec-validator >/dev/null || need_pip+=(openapi-spec-validator)
if [ ${#need_pip[@]} -gt 0 ]; then
  python3 -m pip install --quiet --disable-pip-version-check "${need_pip[@]}"
fi

promtool check rules ops/prometheus/alerts.yml
promtool check config ops/prometheus/prometheus.yml --syntax-only 2>/dev/null \
  || promtool check config ops/prometheus/prometheus.yml
check-jsonschema --builtin-schema vendor.compose-spec ops/docker-compose.yml
kubernetes-validate --strict --quiet ops/k8s/deployment.yaml ops/k8s/service.yaml ops/k8s/pdb.yaml \
  ops/k8s/migrate-job.yaml ops/k8s/secret.example.yaml
# KEDA's custom resources have no schema in Kubernetes' own set: check that they parse and
# name the queues the service declares.
python3 - <<'PY'
import json, yaml
docs = list(yaml.safe_load_all(open("ops/k8s/keda-scaledobject.yaml")))
kinds = sorted(d["kind"] for d in docs)
assert kinds == ["ScaledObject", "TriggerAuthentication"], kinds
queues = {t["metadata"]["queueName"] for d in docs if d["kind"] == "ScaledObject" for t in d["spec"]["triggers"]}
import glob, tomllib
workers = {tomllib.load(open(p, "rb"))["name"] for p in glob.glob("workers/*.toml")}
assert queues == {f"copilot.worker.{w}" for w in workers}, (queues, workers)
dashboard = json.load(open("ops/grafana/dashboards/copilot-workers.json"))
assert dashboard["panels"] and all(p["targets"] for p in dashboard["panels"])
definitions = json.load(open("ops/rabbitmq/definitions.json"))
assert {q["name"] for q in definitions["queues"]} >= {f"copilot.worker.{w}" for w in workers}
# Each worker queue is bound to the event types its worker reacts to, and to no other.
specs = {s["name"]: s for s in (tomllib.load(open(p, "rb")) for p in glob.glob("workers/*.toml"))}
bound = {}
for b in definitions["bindings"]:
    if b["source"] == "tickets.events":
        bound.setdefault(b["destination"], set()).add(b["routing_key"])
assert bound == {f"copilot.worker.{w}": set(s["events"]) for w, s in specs.items()}, bound
exchanges = {e["name"] for e in definitions["exchanges"]}
for policy in definitions.get("policies", []):
    alternate = policy["definition"].get("alternate-exchange")
    assert alternate is None or alternate in exchanges, (policy["name"], alternate)
print("ops: KEDA, dashboard and RabbitMQ definitions ok")
PY
check-jsonschema --check-metaschema schemas/*.schema.json schemas/workers/*.json
check-jsonschema --schemafile schemas/ticket-event.schema.json schemas/examples/*.json
openapi-spec-validator schemas/admin-api.openapi.yaml
echo "ops/check.sh: all checks passed"
