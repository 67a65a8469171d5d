#!/usr/bin/env bash
# What API-key billing on PostgreSQL adds to a request: a coordinator on a
# fresh PostgreSQL database with credits billing on, one echo node behind
# it, one API key of one wallet with credits, and `sgl bench` comparing the
# node's own local server (--url) with the coordinator (--compare-url) at
# concurrency 1 and 8, every coordinator request paid by that key.
#
#   scripts/bench_billing.sh                 # uses target/release/sgl
#   SGL=target/debug/sgl REQUESTS=500 scripts/bench_billing.sh
#
# Environment: SGL (the binary), SGL_BENCH_POSTGRES_URL (a PostgreSQL URL
# whose user may create databases; default the test database's server),
# SGL_BENCH_POSTGRES_OPTIONS (the coordinators' connection options; default
# sslmode=disable: the database is on the same host, reached as over a unix
# socket; empty keeps the driver's default, TLS whenever the server offers it),
# REQUESTS (per concurrency, default 2000), CONCURRENCY (default 1,8),
# CREDIT_BLOCK (quotes per reservation block, default 64; 0 = a hold per
# request), CREDIT_BLOCK_IDLE_MS (default 2000), CREDIT_SETTLE
# (before-answer, the coordinator's default, or after-answer), PORT_BASE (default 18180),
# JSON (a file for the bench's JSON report), BILLED=0 (send no key: the
# unbilled baseline on the same grid), REPLICA=1 (two coordinators with
# --replica on the database: the node holds its WebSocket to the first,
# the bench calls the second, so every job crosses PostgreSQL). Build with
# --release for figures worth quoting.
set -euo pipefail

SGL=${SGL:-target/release/sgl}
PG=${SGL_BENCH_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/test}
REQUESTS=${REQUESTS:-2000}
CONCURRENCY=${CONCURRENCY:-1,8}
CREDIT_BLOCK=${CREDIT_BLOCK:-64}
CREDIT_BLOCK_IDLE_MS=${CREDIT_BLOCK_IDLE_MS:-2000}
CREDIT_SETTLE=${CREDIT_SETTLE:-before-answer}
PORT_BASE=${PORT_BASE:-18180}
COORD=127.0.0.1:$PORT_BASE
LOCAL_PORT=$((PORT_BASE + 1))
SECOND=127.0.0.1:$((PORT_BASE + 2))
replica_args=()
[ "${REPLICA:-0}" = 1 ] && replica_args=(--replica)
PAYER=0x2222222222222222222222222222222222222222
OPERATOR=0x1111111111111111111111111111111111111111

[ -x "$SGL" ] || { echo "no sgl binary at $SGL (cargo build --release --features full)" >&2; exit 2; }
command -v psql >/dev/null || { echo "psql is needed to make the bench database" >&2; exit 2; }

work=$(mktemp -d)
db_name="sgl_bench_$$_$(date +%s)"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    psql "$PG" -qc "DROP DATABASE IF EXISTS $db_name WITH (FORCE)" >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

psql "$PG" -qc "CREATE DATABASE $db_name" >/dev/null
DB="${PG%/*}/$db_name"
PG_OPTIONS=${SGL_BENCH_POSTGRES_OPTIONS-sslmode=disable}
[ -n "$PG_OPTIONS" ] && DB="$DB?$PG_OPTIONS"

# Development mode keeps node registration open and needs no facilitator;
# with a database, requests that carry an API key are billed to its credits.
coordinator() { # listen address, log name
    "$SGL" coordinator serve --dev --database-url "$DB" --listen "$1" "${replica_args[@]}" \
        --credit-block "$CREDIT_BLOCK" --credit-block-idle-ms "$CREDIT_BLOCK_IDLE_MS" \
        --credit-settle "$CREDIT_SETTLE" \
        >"$work/$2.log" 2>&1 &
    pids+=($!)
    for _ in $(seq 1 100); do
        curl -sf "http://$1/health" >/dev/null && break
        sleep 0.2
    done
    curl -sf "http://$1/health" >/dev/null || { cat "$work/$2.log" >&2; exit 1; }
}
coordinator "$COORD" coordinator
# The bench's coordinator: the node's own, or with REPLICA=1 a second
# replica that reaches the node only through the database.
BENCH_COORD=$COORD
if [ "${REPLICA:-0}" = 1 ]; then
    coordinator "$SECOND" second
    BENCH_COORD=$SECOND
fi

"$SGL" node init --config-dir "$work/node" --coordinator "http://$COORD" --wallet "$OPERATOR" >/dev/null
"$SGL" node start --config-dir "$work/node" --engine echo --evidence none --max-batch 64 \
    >"$work/node.log" 2>&1 &
pids+=($!)
"$SGL" node serve --engine echo --port "$LOCAL_PORT" >"$work/local.log" 2>&1 &
pids+=($!)
# The status is read whole before it is searched: `grep -q` would close
# the pipe early, and pipefail would count that as a failure.
active() { "$SGL" node status --config-dir "$work/node" --json 2>/dev/null | grep -c '"active"' >/dev/null; }
for _ in $(seq 1 150); do
    active && break
    sleep 0.2
done
active || { cat "$work/node.log" >&2; exit 1; }
# A replica learns of another's node from the database's notifications.
[ "${REPLICA:-0}" = 1 ] && sleep 2

KEY=$("$SGL" coordinator keys create --wallet "$PAYER" --label bench --database-url "$DB" | tr -d '[:space:]')
"$SGL" coordinator credits grant --wallet "$PAYER" --amount 1000 --database-url "$DB" >/dev/null

json_args=()
[ -n "${JSON:-}" ] && json_args=(--json "$JSON")
key_args=(--api-key "$KEY")
# BILLED=0: the same grid and database, requests without the key (free in
# development mode): the baseline billing is measured against.
[ "${BILLED:-1}" = 0 ] && key_args=()
"$SGL" bench --url "http://127.0.0.1:$LOCAL_PORT" --compare-url "http://$BENCH_COORD" \
    "${key_args[@]}" --requests "$REQUESTS" --concurrency "$CONCURRENCY" "${json_args[@]}"

echo
echo "credits of the paying wallet after the run:"
"$SGL" coordinator credits balance --wallet "$PAYER" --database-url "$DB"
