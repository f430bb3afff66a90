#!/usr/bin/env bash
# Fetches Beam's Flink job server once and puts it in the Python SDK's jar
# cache (~/.apache_beam/cache/jars), so that
#   python -m beam_jobs.sensor_scoring --runner FlinkRunner --flink_master '[local]' --environment_type LOOPBACK ...
# needs no other flag (beam_jobs/flink_runner.py points the FlinkRunner at it).
#
# Which job server: the SDK looks for beam-runners-flink-<flink>-job-server-<sdk
# version>.jar. Maven Central, as this machine reaches it, serves no
# beam-runners-flink-*-job-server jar at all (not 2.77.0, nor any older
# version, for Flink 1.19 to 2.2), and no Beam 2.77.0 Java artifact. The
# newest Flink runner whose dependencies all resolve is
# beam-runners-flink-1.19 2.62.0 (2.70.0 is served but its
# beam-runners-java-job-service 2.70.0 is not). The job server jar is that
# runner's shadow jar, so this script resolves the runner with Maven into a
# lib folder and writes a small jar beside it whose manifest names the main
# class (FlinkJobServerDriver) and the lib jars: the same thing, unshaded.
# Override with FLINK_JOB_SERVER_BEAM / FLINK_JOB_SERVER_FLINK when a newer
# pair is served.
#   scripts/fetch_flink.sh          # prints the jar's path; quiet when cached
set -euo pipefail

BEAM="${FLINK_JOB_SERVER_BEAM:-2.62.0}"
FLINK="${FLINK_JOB_SERVER_FLINK:-1.19}"
CACHE="${BEAM_JAR_CACHE:-$HOME/.apache_beam/cache/jars}"
NAME="beam-runners-flink-$FLINK-job-server-$BEAM"
JAR="$CACHE/$NAME.jar"
LIB="$NAME-lib"   # relative to $CACHE: manifest Class-Path entries are relative

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cat > "$work/pom.xml" <<EOF
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>sensor-scoring</groupId><artifactId>flink-job-server</artifactId><version>1</version>
  <dependencies>
    <dependency>
      <groupId>org.apache.beam</groupId><artifactId>beam-runners-flink-$FLINK</artifactId><version>$BEAM</version>
    </dependency>
    <dependency><!-- the state_backend option rocksdb: without it the job server fails with ClassNotFoundException -->
      <groupId>org.apache.flink</groupId><artifactId>flink-statebackend-rocksdb</artifactId><version>$FLINK.0</version>
    </dependency>
    <dependency><!-- the shadow jar's logging binding -->
      <groupId>org.slf4j</groupId><artifactId>slf4j-simple</artifactId><version>1.7.36</version>
    </dependency>
  </dependencies>
</project>
EOF
# Cached when the jar is there and was built from this very pom.
if [ -f "$JAR" ] && cmp -s "$work/pom.xml" "$CACHE/$NAME.pom"; then
  echo "$JAR"
  exit 0
fi
command -v mvn >/dev/null || { echo "fetch_flink.sh: mvn not found (Maven 3.8+ is needed once)" >&2; exit 1; }
echo "fetching the Flink $FLINK job server (Beam $BEAM) into $CACHE (once, about 200 MB)" >&2
mkdir -p "$CACHE"
rm -rf "${CACHE:?}/$LIB.tmp"
mvn -B -q -f "$work/pom.xml" dependency:copy-dependencies -DincludeScope=runtime \
  -DoutputDirectory="$CACHE/$LIB.tmp" >"$work/mvn.log" 2>&1 \
  || { tail -20 "$work/mvn.log" >&2; echo "fetch_flink.sh: Maven could not resolve the job server" >&2; exit 1; }

rm -rf "${CACHE:?}/$LIB"
mv "$CACHE/$LIB.tmp" "$CACHE/$LIB"
# A jar with only a manifest, as Beam's own make_classpath_jar writes one:
# the main class and the lib jars, relative to the jar, one continuation line
# each ("  x" is the continuation space and the separating space).
python3 - "$JAR.tmp" "$CACHE" "$LIB" <<'PY'
import os, sys, zipfile
jar, cache, lib = sys.argv[1:]
entries = sorted(f"{lib}/{name}" for name in os.listdir(os.path.join(cache, lib)) if name.endswith(".jar"))
with zipfile.ZipFile(jar, "w") as z:
    z.writestr("META-INF/MANIFEST.MF",
               "Manifest-Version: 1.0\n"
               "Main-Class: org.apache.beam.runners.flink.FlinkJobServerDriver\n"
               "Class-Path: " + "\n  ".join(entries) + "\n")
PY
mv "$JAR.tmp" "$JAR"
cp "$work/pom.xml" "$CACHE/$NAME.pom"
echo "$JAR"
