# shellcheck shell=bash
# Sourced by scripts/stack: Prerequisites (Debian packages, the JDK) and the pid handling of the services.
# Uses the variables scripts/stack sets (STACK_DIR, ports, SECURE, CLUSTER, ...).

# ---------------------------------------------------------------- prerequisites

# Debian package that provides each command we run.
declare -A PKG_OF=(
  [mosquitto]=mosquitto [mosquitto_pub]=mosquitto-clients [mosquitto_sub]=mosquitto-clients
  [prometheus]=prometheus [promtool]=prometheus [kcat]=kcat [curl]=curl
  [java]=openjdk-17-jre-headless [mvn]=maven [openssl]=openssl [mosquitto_passwd]=mosquitto
)

java_major() {
  java -version 2>&1 | sed -n 's/.*version "\([0-9]*\)[."].*/\1/p' | head -1
}

ensure_prereqs() {
  local missing=() cmd pkg
  for cmd in "${!PKG_OF[@]}"; do
    command -v "$cmd" >/dev/null 2>&1 || missing+=("${PKG_OF[$cmd]}")
  done
  if command -v java >/dev/null 2>&1 && [ "$(java_major)" -lt 17 ] 2>/dev/null; then
    missing+=(openjdk-17-jre-headless)
  fi
  [ ${#missing[@]} -eq 0 ] && return 0
  mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || die "apt-get update failed"
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null ||
      die "apt-get install ${missing[*]} failed"
  else
    die "missing prerequisites; install them with:
    sudo apt-get install -y ${missing[*]}
(Kafka needs a JDK 17+ and Maven; Mosquitto, Prometheus and kcat come from Debian.)"
  fi
}

# ---------------------------------------------------------------- pid handling

pidfile() { echo "$RUN/$1.pid"; }

# Prints the pid of a running service; a stale pid file (dead process, or a pid
# reused by another program) is removed.
service_pid() {
  local f pid
  f=$(pidfile "$1")
  [ -f "$f" ] || return 1
  pid=$(cat "$f")
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null &&
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "$STACK_DIR"; then
    echo "$pid"
    return 0
  fi
  rm -f "$f"
  return 1
}

log_tail() {
  local log=$LOGS/$1.log
  if [ -f "$log" ]; then
    echo "---- last 40 lines of $log ----" >&2
    tail -n 40 "$log" >&2
  fi
}

# wait_for NAME CHECK_FUNCTION: polls until the check passes; fails with the log
# tail when the process died or the timeout passed.
wait_for() {
  local name=$1 check=$2 deadline=$((SECONDS + STACK_TIMEOUT))
  while ! "$check" >/dev/null 2>&1; do
    if ! service_pid "$name" >/dev/null; then
      log_tail "$name"
      die "$name exited during start-up (log: $LOGS/$name.log)"
    fi
    if [ $SECONDS -ge $deadline ]; then
      log_tail "$name"
      die "$name did not answer within ${STACK_TIMEOUT}s (log: $LOGS/$name.log)"
    fi
    sleep 0.5
  done
}

# spawn NAME COMMAND...: start detached, in its own session, logging to LOGS.
spawn() {
  local name=$1
  shift
  mkdir -p "$RUN" "$LOGS"
  echo "==== $(date -u +%FT%TZ) starting $name" >>"$LOGS/$name.log"
  setsid "$@" >>"$LOGS/$name.log" 2>&1 </dev/null &
  echo $! >"$(pidfile "$name")"
  [ -n "${STACK_STARTED_FILE:-}" ] && echo "$name" >>"$STACK_STARTED_FILE"
  return 0
}

port_busy() { ss -Hltn "sport = :$1" 2>/dev/null | grep -q .; }

# The variable that sets a port (the secure stack's have a SECURE_ prefix).
port_var() { if [ $SECURE = 1 ]; then echo "SECURE_$1"; else echo "$1"; fi; }
