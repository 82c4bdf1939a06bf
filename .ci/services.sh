#!/usr/bin/env bash
# Make sure Redis and RabbitMQ (with its management API) are up, starting them
# if they are not, and wait until each answers. Safe to run twice.
set -euo pipefail

wait_for() {  # wait_for <what> <seconds> <command...>
  local what=$1 limit=$2; shift 2
  local deadline=$((SECONDS + limit))
  until "$@" >/dev/null 2>&1; do
    if (( SECONDS >= deadline )); then echo "services: $what not ready after ${limit}s" >&2; return 1; fi
    sleep 0.5
  done
  echo "services: $what ready"
}

need() { command -v "$1" >/dev/null 2>&1; }

if ! need redis-server || ! need rabbitmq-server; then
  apt-get update -qq
  apt-get install -y -qq redis-server rabbitmq-server >/dev/null
fi

if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
fi
wait_for redis 30 redis-cli -h 127.0.0.1 -p 6379 ping

if ! rabbitmqctl -q status >/dev/null 2>&1; then
  rabbitmq-server -detached
fi
wait_for rabbitmq 120 rabbitmqctl -q await_startup
if ! rabbitmq-plugins -q list -e -m | grep -qx rabbitmq_management; then
  rabbitmq-plugins -q enable rabbitmq_management
fi
wait_for rabbitmq-management 120 curl -fsS -u guest:guest http://127.0.0.1:15672/api/overview
