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
#
# Two fixes are compiled into it (scripts/flink-job-server.patch, from the
# runners' source jars; docs/flink.md has the measurements):
#  - Beam up to 2.7x keeps every self-checkpoint residual of a splittable DoFn
#    under a state id of its own and never removes it (apache/beam #27648): an
#    idle streaming job's checkpoints grew by about 10 KB/s with two partitions;
#  - fused stages were named in hash-set order, and the Flink runner uses the
#    name as the operator uid savepoints map state by: a job restarted from a
#    savepoint could find its device states empty (3 restarts of 5).
# A version the patch does not apply to is left as it is.
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
PATCH="$(cd "$(dirname "$0")" && pwd)/flink-job-server.patch"
cat "$work/pom.xml" "$PATCH" > "$work/stamp"
# Cached when the jar is there and was built from this very pom and patch.
if [ -f "$JAR" ] && cmp -s "$work/stamp" "$CACHE/$NAME.stamp"; then
  echo "$JAR"
  exit 0
fi
# The classes of scripts/flink-job-server.patch, compiled against the
# resolved jars and written into the jars they come from (same names, so every
# classpath built from the lib folder, the cluster's job jars included, gets them).
patch_job_server() {
  local lib="$1" src="$work/src" classes="$work/classes" artifact
  mkdir -p "$src" "$classes"
  for artifact in "beam-runners-flink-$FLINK" beam-runners-java-fn-execution beam-sdks-java-core; do
    mvn -B -q dependency:copy -Dartifact="org.apache.beam:$artifact:$BEAM:jar:sources" \
        -DoutputDirectory="$work/sources" >>"$work/mvn.log" 2>&1 \
      || { tail -20 "$work/mvn.log" >&2; echo "fetch_flink.sh: Maven could not fetch $artifact's sources" >&2; exit 1; }
  done
  mvn -B -q dependency:copy -Dartifact=com.github.spotbugs:spotbugs-annotations:4.8.6 \
      -DoutputDirectory="$work/compile-only" >>"$work/mvn.log" 2>&1 \
    || { tail -20 "$work/mvn.log" >&2; echo "fetch_flink.sh: Maven could not fetch spotbugs-annotations" >&2; exit 1; }
  local files
  files=$(grep '^+++ ' "$PATCH" | cut -c5-)
  for jar in "$work"/sources/*.jar; do (cd "$src" && unzip -q -o "$jar" $files 2>/dev/null || true); done
  if ! (cd "$src" && patch -s -p0 --dry-run < "$PATCH" >/dev/null); then
    echo "fetch_flink.sh: $(basename "$PATCH") does not apply to Beam $BEAM; the job server is left unpatched" >&2
    return 0
  fi
  (cd "$src" && patch -s -p0 < "$PATCH")
  (cd "$src" && javac -nowarn --release 8 -proc:none -cp "$lib/*:$work/compile-only/*" -d "$classes" $files) \
    2> >(grep -v '^Note:\|warning: \[options\]\|^1 warning' >&2)
  replace_classes "$lib/beam-runners-flink-$FLINK-$BEAM.jar" "$classes" org/apache/beam/runners/flink
  replace_classes "$lib/beam-runners-java-fn-execution-$BEAM.jar" "$classes" org/apache/beam/runners/fnexecution
  replace_classes "$lib/beam-sdks-java-core-$BEAM.jar" "$classes" org/apache/beam/sdk/util/construction
}

# replace_classes JAR CLASSES PACKAGE: the jar again, with the .class files of CLASSES under PACKAGE in
# place of its own (`jar uf` refuses jars with duplicate entries, as beam-sdks-java-core's).
replace_classes() {
  python3 -W ignore - "$@" <<'PY'
import os, sys, zipfile
jar, classes, package = sys.argv[1:]
new = {os.path.relpath(os.path.join(d, f), classes): os.path.join(d, f)
       for d, _, files in os.walk(os.path.join(classes, package)) for f in files}
with zipfile.ZipFile(jar) as old, zipfile.ZipFile(jar + ".new", "w", zipfile.ZIP_DEFLATED) as out:
    for item in old.infolist():
        if item.filename not in new:
            out.writestr(item, old.read(item))
    for name, path in sorted(new.items()):
        out.write(path, name)
os.replace(jar + ".new", jar)
PY
}

command -v mvn >/dev/null || { echo "fetch_flink.sh: mvn not found (Maven 3.8+ is needed once)" >&2; exit 1; }
command -v javac >/dev/null && command -v jar >/dev/null || { echo "fetch_flink.sh: javac and jar not found (a JDK 17 is needed)" >&2; exit 1; }
echo "fetching the Flink $FLINK job server (Beam $BEAM) into $CACHE (once, about 200 MB)" >&2
mkdir -p "$CACHE"
rm -rf "${CACHE:?}/$LIB.tmp"
mvn -B -q -f "$work/pom.xml" dependency:copy-dependencies -DincludeScope=runtime \
  -DoutputDirectory="$CACHE/$LIB.tmp" >"$work/mvn.log" 2>&1 \
  || { tail -20 "$work/mvn.log" >&2; echo "fetch_flink.sh: Maven could not resolve the job server" >&2; exit 1; }

patch_job_server "$CACHE/$LIB.tmp"
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
cp "$work/stamp" "$CACHE/$NAME.stamp"
rm -f "$CACHE/$NAME.pom"  # the stamp of earlier versions of this script
echo "$JAR"
