#!/usr/bin/env bash
# Fetches Apache Kafka's broker jars once, with Maven, into a cache outside the
# git tree, for beam_jobs/kafka_cluster.py (the Apache Kafka the tests run on).
#   scripts/fetch_kafka.sh            # prints the classpath folder
# Needs Java 17 or newer (java on PATH or JAVA_HOME) and Maven 3.6 or newer.
# The cache is $SENSOR_SCORING_CACHE (default ~/.cache/sensor-scoring)/kafka-$KAFKA_VERSION;
# a complete fetch leaves a .complete stamp there, so later calls return at once.
set -euo pipefail
KAFKA_VERSION=${KAFKA_VERSION:-4.4.0}
LOG4J_VERSION=2.25.5  # the log4j-core that kafka_2.13 4.4.0 depends on
cache=${SENSOR_SCORING_CACHE:-$HOME/.cache/sensor-scoring}/kafka-$KAFKA_VERSION
if [ -f "$cache/.complete" ]; then
  echo "$cache/libs"
  exit 0
fi

need() { echo "fetch_kafka: $*" >&2; exit 1; }
java_bin=${JAVA_HOME:+$JAVA_HOME/bin/}java
command -v "$java_bin" >/dev/null ||
  need "Apache Kafka $KAFKA_VERSION needs Java 17 or newer; install it (Debian: apt-get install openjdk-17-jre-headless) or set JAVA_HOME"
java_major=$("$java_bin" -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -1)
[ "${java_major:-0}" -ge 17 ] ||
  need "Apache Kafka $KAFKA_VERSION needs Java 17 or newer; $java_bin is Java ${java_major:-unknown}"
command -v mvn >/dev/null ||
  need "fetching Apache Kafka's jars needs Maven 3.6 or newer (Debian: apt-get install maven)"
mvn_version=$(mvn -version 2>/dev/null | sed -n 's/.*Apache Maven \([0-9.]*\).*/\1/p' | head -1)
case "$mvn_version" in
  3.[6-9]*|3.[1-9][0-9]*|[4-9].*) ;;
  *) need "fetching Apache Kafka's jars needs Maven 3.6 or newer; found ${mvn_version:-none}" ;;
esac

mkdir -p "$cache"
cat > "$cache/pom.xml" <<POM
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>sensor-scoring</groupId>
  <artifactId>kafka-runtime</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_2.13</artifactId>
      <version>$KAFKA_VERSION</version>
    </dependency>
    <!-- Kafka logs through SLF4J 1.7; without this binding its log would go nowhere. -->
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-slf4j-impl</artifactId>
      <version>$LOG4J_VERSION</version>
    </dependency>
  </dependencies>
</project>
POM
echo "fetching Apache Kafka $KAFKA_VERSION and its dependencies with Maven into $cache (once)" >&2
rm -rf "$cache/libs.partial"
mvn -B -q -f "$cache/pom.xml" dependency:copy-dependencies -DincludeScope=runtime \
  -DoutputDirectory="$cache/libs.partial" > "$cache/fetch.log" 2>&1 ||
  { tail -30 "$cache/fetch.log" >&2; need "Maven could not fetch org.apache.kafka:kafka_2.13:$KAFKA_VERSION; see $cache/fetch.log"; }
rm -rf "$cache/libs"
mv "$cache/libs.partial" "$cache/libs"
touch "$cache/.complete"
echo "$cache/libs"
