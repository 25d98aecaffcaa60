#!/usr/bin/env bash
# Runs ONE Apache Kafka node (KRaft, combined broker + controller, node.id 1) in the FOREGROUND,
# on 127.0.0.1 only:
#
#   deploy/local/kafka-node.sh <data_dir> <port> <controller_port>
#
# <data_dir> holds server.properties, server.log (log4j) and data/ (the partitions and
# meta.properties). It is formatted on the first run only, so a node killed and restarted on the
# same <data_dir> keeps its topics and records. The script ends by exec-ing the JVM: the pid of
# this script is the broker's pid, and SIGTERM/SIGKILL reach Kafka itself.
#
# Optional environment:
#   TALLY_KAFKA_LOG_FILE   log file instead of <data_dir>/server.log
#   TALLY_KAFKA_PID_FILE   file to write the broker's pid to
#   TALLY_KAFKA_HEAP_OPTS  JVM heap flags (default -Xms512m -Xmx512m)
#   TALLY_KAFKA_LIB        jar folder (see env.sh); fetched from Maven Central if incomplete
set -euo pipefail

# shellcheck source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

if [ $# -ne 3 ]; then
    echo "usage: $0 <data_dir> <port> <controller_port>" >&2
    exit 2
fi
mkdir -p "$1"
data_dir=$(cd "$1" && pwd)
port=$2
controller_port=$3
log_file="${TALLY_KAFKA_LOG_FILE:-$data_dir/server.log}"
props="$data_dir/server.properties"

ensure_java
ensure_kafka_jars

# Written on every start so changed ports apply; identity (node id, cluster id) lives in
# data/meta.properties and does not change.
cat >"$props" <<EOF
# Written by deploy/local/kafka-node.sh on each start; edits are lost.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$controller_port
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$controller_port
advertised.listeners=PLAINTEXT://127.0.0.1:$port
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$data_dir/data

# One node: every replication factor and ISR minimum is 1.
num.partitions=6
default.replication.factor=1
min.insync.replicas=1
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1

# Consumers join at once (tests); topics are created explicitly by the services.
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=false

# After a kill -9 the restarted controller keeps the dead broker's registration until its session
# expires, and the new broker cannot register before that (9 s by default): shorter for restarts.
broker.heartbeat.interval.ms=500
broker.session.timeout.ms=4000

# Keep records forever: the projector's replay reads the topic from the beginning.
log.retention.ms=-1
log.retention.bytes=-1
EOF

read -r -a heap_opts <<<"${TALLY_KAFKA_HEAP_OPTS:--Xms512m -Xmx512m}"
java_opts=(
    "${heap_opts[@]}"
    -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:+ExplicitGCInvokesConcurrent
    -Djava.awt.headless=true -Djava.net.preferIPv4Stack=true
    "-Dlog4j2.configurationFile=$TALLY_LOCAL_DIR/kafka/log4j2.properties"
    "-Dtally.kafka.log.file=$log_file"
    -cp "$TALLY_KAFKA_LIB/*"
)

if [ ! -f "$data_dir/data/meta.properties" ]; then
    cluster_id=$("$JAVA" "${java_opts[@]}" kafka.tools.StorageTool random-uuid)
    # Static controller.quorum.voters, so no --standalone flag.
    "$JAVA" "${java_opts[@]}" kafka.tools.StorageTool format -t "$cluster_id" -c "$props" \
        --ignore-formatted
fi

if [ -n "${TALLY_KAFKA_PID_FILE:-}" ]; then
    echo $$ >"$TALLY_KAFKA_PID_FILE"
fi
exec "$JAVA" "${java_opts[@]}" kafka.Kafka "$props"
