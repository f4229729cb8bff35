#!/bin/sh
# Two real nodes, one agent each (file mode): a client pod on one calls a protected pod on the
# other, and the request is decided at the destination by that node's agent, with the client
# known by its address. Run as root from the synced tree, on each VM of `AUTHZ_NODES=2`:
#
#   two-nodes.sh server SELF_IP PEER_IP    # the node with the protected pod; leaves it running
#   two-nodes.sh client SELF_IP PEER_IP    # the node with the client pod; runs the checks
#
# Each node's pods are in 10.210.N.0/24 (N = 1 client, 2 server) behind a veth, routed over the
# nodes' private network; nothing leaves the two VMs.
set -eu

role=$1
self=$2
peer=$3
bin="$PWD/target/vm-lane"
work=/var/lib/authz-two-nodes
cgroups=/sys/fs/cgroup/authz-pods

case "$role" in
server) n=2 other=1 pod=httpbin ;;
client) n=1 other=2 pod=sleep ;;
*) echo "role: server or client" >&2; exit 2 ;;
esac
server_pod=10.210.2.2
client_pod=10.210.1.2

echo "node $role ($self), kernel $(uname -r)"
mkdir -p "$work" "$cgroups/$pod"

# The pod: a network namespace with a veth to the node, and a cgroup for its processes.
ip netns add "$pod"
ip link add "$pod-node" type veth peer name eth0 netns "$pod"
ip addr add "10.210.$n.1/24" dev "$pod-node"
ip link set "$pod-node" up
ip -n "$pod" link set lo up
ip -n "$pod" addr add "10.210.$n.2/24" dev eth0
ip -n "$pod" link set eth0 up
ip -n "$pod" route add default via "10.210.$n.1"
sysctl -qw net.ipv4.ip_forward=1
ip route add "10.210.$other.0/24" via "$peer"

# Runs a command in the pod: its cgroup (joined first: `ip netns exec` mounts a sysfs of the
# pod's namespace over /sys, hiding the cgroup tree), then its namespace.
in_pod() {
    sh -c "echo \$\$ > $cgroups/$pod/cgroup.procs && exec ip netns exec $pod \"\$@\"" in_pod "$@"
}

# The server's agent answers its admin port on the private network, so the client's side can
# read what it decided.
cat > "$work/agent.yaml" <<EOF
agent: {admin: "$self:15020"}
pods:
  - name: $pod
    namespace: foo
    labels: {app: $pod}
    serviceAccount: $pod
    netns: /var/run/netns/$pod
    cgroup: $cgroups/$pod
    ips: [10.210.$n.2]
EOF
if [ "$role" = server ]; then
    # The client pod of the other node is an identity by address, and no more: decided here.
    cat >> "$work/agent.yaml" <<EOF
workloads:
  - {name: sleep, namespace: foo, labels: {app: sleep}, serviceAccount: sleep, ips: [$client_pod]}
policies: [policies.yaml]
EOF
    cat > "$work/policies.yaml" <<EOF
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: httpbin, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin}}
  action: ALLOW
  rules:
    - from: [{source: {principals: ["cluster.local/ns/foo/sa/sleep"]}}]
      to: [{operation: {methods: ["GET"], paths: ["/headers"]}}]
EOF
    in_pod setsid nohup "$bin/authz-testsrv" http "$server_pod:8000" \
        > "$work/testsrv.log" 2>&1 < /dev/null &
fi

setsid nohup env AUTHZ_LOG=info "$bin/authz-agent" run --config "$work/agent.yaml" \
    > "$work/agent.log" 2>&1 < /dev/null &
i=0
until curl -fs -o /dev/null "http://$self:15020/ready"; do
    i=$((i + 1))
    if [ $i -gt 180 ]; then
        echo "agent not ready:"; cat "$work/agent.log"; exit 1
    fi
    sleep 1
done
echo "agent ready on $role"
[ "$role" = server ] && exit 0

fail=0
# expect WHAT WHERE STATUS BODY_PART PATH: one request from the pod or the node, its status and
# a part of its body.
expect() {
    what=$1 where=$2 want=$3 part=$4 path=$5
    if [ "$where" = pod ]; then run=in_pod; else run=""; fi
    got=$($run curl -sS -m 20 -o "$work/body" -w '%{http_code}' "http://$server_pod:8000$path" || true)
    if [ "$got" = "$want" ] && grep -q -- "$part" "$work/body"; then
        echo "ok: $what: $got"
    else
        echo "FAILED: $what: got $got, want $want with '$part': $(head -c 300 "$work/body")"
        fail=1
    fi
}
inbound() {
    curl -fsS "http://$peer:15020/metrics" | awk '$1 == "authz_connections_inbound_total" {print $2}'
}

before=$(inbound)
expect "the client pod (sleep) to an allowed path" pod 200 '"path":"/headers"' /headers
expect "the client pod to a path no rule allows" pod 403 'RBAC: access denied' /private
expect "the client node itself (no identity) to the allowed path" node 403 'RBAC: access denied' /headers
after=$(inbound)
# The three were decided by the server's agent (this node's agent has no policy at all).
if [ "$((after - before))" -ge 3 ]; then
    echo "ok: decided at the destination: the server's agent accepted $((after - before)) connections"
else
    echo "FAILED: the server's agent accepted $before -> $after connections"
    fail=1
fi
if [ $fail -ne 0 ]; then
    echo "---- this node's agent"; tail -n 50 "$work/agent.log"
fi
exit $fail
