#!/usr/bin/env bash
# Serve one X-LoRA model from two machines: one replica on each, behind Ray Serve's HTTP proxy.
#
#   machine A (head):   examples/ray_two_machines.sh head
#   machine B:          examples/ray_two_machines.sh worker HEAD_IP
#   machine A:          examples/ray_two_machines.sh serve        # until Ctrl-C or SIGTERM
#   both, at the end:   ray stop
#
# Both machines need the same Python environment (pip install 'xlora[serve,cluster]', the same Ray
# and Python versions) and the model at the same path (MODEL_DIR, and the base model it records:
# a shared or copied folder), and must reach each other on Ray's ports (6379 and the ranges of
# https://docs.ray.io/en/latest/ray-core/configure.html#ports-configurations). Clients can use port
# 8000 of either machine: Ray Serve runs an HTTP proxy on every node that holds a replica.
# Ray (2.5x and later) authenticates nodes with a token: `head` creates ~/.ray/auth_token; copy that
# file to machine B before `worker` (or export RAY_AUTH_TOKEN there).
# Tested with Ray 2.60 on one machine (two nodes on 127.0.0.1: one replica on each), and
# tests/serve/test_cluster.py checks these commands against the real `ray start` and `xlora` parsers.
set -euo pipefail

MODEL_DIR=${MODEL_DIR:-/models/my-xlora}
CPUS=${CPUS:-2}  # CPUs each machine gives Ray; one replica takes them all
export RAY_AUTH_MODE=token

case "${1:-}" in
  head)
    ray get-auth-token --generate > /dev/null
    ray start --head --port 6379 --num-cpus "$CPUS" --disable-usage-stats
    ;;
  worker)
    HEAD_IP=${2:?usage: $0 worker HEAD_IP}
    ray start --address "$HEAD_IP:6379" --num-cpus "$CPUS" --disable-usage-stats
    ;;
  serve)
    # --ray-address auto joins the cluster started above; the API key comes from $XLORA_API_KEY
    xlora serve "$MODEL_DIR" --ray-address auto --replicas 2 --cpus-per-replica "$CPUS" --host 0.0.0.0 --port 8000
    ;;
  *)
    echo "usage: $0 head | worker HEAD_IP | serve" >&2
    exit 2
    ;;
esac
