#!/bin/sh
# Issue the identities the manifests mount into ./secrets (git ignores it), from a CA made once
# with `collafuse pki init --ca-dir CA_DIR` and kept off the cluster:
#   ./make-secrets.sh CA_DIR && kubectl apply -k .
# kustomization.yaml turns each directory into a Secret; a client dials the Service by its
# short name, which the server certificate therefore carries along with the longer ones.
set -eu
ca_dir=${1:?usage: make-secrets.sh CA_DIR}
cd "$(dirname "$0")"
mkdir -p secrets
collafuse pki issue-server collafuse-server collafuse-server.collafuse.svc collafuse-server.collafuse.svc.cluster.local --ca-dir "$ca_dir" --out secrets/server
collafuse pki issue probe --ca-dir "$ca_dir" --out secrets/probe --server collafuse-server:50051
collafuse pki issue edge-0 --ca-dir "$ca_dir" --out secrets/edge-0 --server collafuse-server:50051
collafuse pki issue edge-1 --ca-dir "$ca_dir" --out secrets/edge-1 --server collafuse-server:50051
collafuse pki issue edge-2 --ca-dir "$ca_dir" --out secrets/edge-2 --server collafuse-server:50051
# The server reads the denylist from a ConfigMap: after each `collafuse pki revoke`, copy the
# file here again and apply; the server picks it up without a restart.
cp "$ca_dir/revoked.txt" secrets/revoked.txt
