# shellcheck shell=bash
# Sourced by scripts/stack: Mosquitto and Prometheus.
# Uses the variables scripts/stack sets (STACK_DIR, ports, SECURE, CLUSTER, ...).

# ---------------------------------------------------------------- mosquitto

write_mosquitto_config() {
  mkdir -p "$STACK_DIR/mosquitto"
  if [ $SECURE = 1 ]; then
    # The shipped secure config with our paths and ports.
    sed -e "s|^listener 8883.*|listener $MQTT_PORT 127.0.0.1|" \
      -e "s|^listener 8884.*|listener $MQTT_MTLS_PORT 127.0.0.1|" \
      -e "s|/mosquitto/config/passwd|$SECRETS/mosquitto.passwd|" \
      -e "s|/mosquitto/config/mosquitto.acl|$STACK_DIR/mosquitto/mosquitto.acl|" \
      -e "s|/mosquitto/certs/|$PKI/|" \
      -e "s|^log_dest stdout|log_dest file $LOGS/mosquitto.log|" \
      -e "s|^persistence_location .*|persistence_location $STACK_DIR/mosquitto/|" \
      "$ROOT/configs/mosquitto-secure.conf" >"$STACK_DIR/mosquitto/mosquitto.conf"
    cp "$ROOT/configs/mosquitto.acl" "$STACK_DIR/mosquitto/mosquitto.acl"
    echo "user $(id -un)" >>"$STACK_DIR/mosquitto/mosquitto.conf"
    return 0
  fi
  # The project's config, with only the [local] lines rewritten.
  sed -e "s|^listener .*|listener $MQTT_PORT 127.0.0.1|" \
    -e "s|^persistence_location .*|persistence_location $STACK_DIR/mosquitto/|" \
    "$ROOT/configs/mosquitto.conf" >"$STACK_DIR/mosquitto/mosquitto.conf"
  # Keep our own user, so the persistence file stays writable.
  echo "user $(id -un)" >>"$STACK_DIR/mosquitto/mosquitto.conf"
}

mqtt_ready() {
  local token args=(-h 127.0.0.1 -p "$MQTT_PORT" -q 1)
  if [ $SECURE = 1 ]; then
    args+=(--cafile "$PKI/ca.crt" -u stack-probe -P "$(cat "$SECRETS/mqtt-stack-probe.password")")
  fi
  token="ping-$$-$RANDOM"
  mosquitto_pub "${args[@]}" -r -t "stack/ping" -m "$token" || return 1
  mosquitto_sub "${args[@]}" -t "stack/ping" -C 1 -W 3 | grep -qx "$token" || return 1
  mosquitto_pub "${args[@]}" -r -n -t "stack/ping"
}

up_mosquitto() {
  if ! service_pid mosquitto >/dev/null; then
    port_busy "$MQTT_PORT" && die "port $MQTT_PORT is taken by another process; set $(port_var MQTT_PORT)"
    [ $SECURE = 0 ] || ! port_busy "$MQTT_MTLS_PORT" ||
      die "port $MQTT_MTLS_PORT is taken by another process; set SECURE_MQTT_MTLS_PORT"
    write_mosquitto_config
    say "starting Mosquitto on 127.0.0.1:$MQTT_PORT$([ $SECURE = 0 ] || echo " (TLS) and :$MQTT_MTLS_PORT (mutual TLS)")"
    spawn mosquitto mosquitto -c "$STACK_DIR/mosquitto/mosquitto.conf"
  fi
  wait_for mosquitto mqtt_ready
}

# ---------------------------------------------------------------- prometheus

prometheus_ready() { curl -fsS --max-time 2 "http://127.0.0.1:$PROMETHEUS_PORT/-/ready"; }

up_prometheus() {
  if ! service_pid prometheus >/dev/null; then
    port_busy "$PROMETHEUS_PORT" && die "port $PROMETHEUS_PORT is taken by another process; set PROMETHEUS_PORT"
    mkdir -p "$STACK_DIR/prometheus"
    say "starting Prometheus on 127.0.0.1:$PROMETHEUS_PORT"
    spawn prometheus prometheus --config.file="$PROMETHEUS_CONFIG" \
      --storage.tsdb.path="$STACK_DIR/prometheus" \
      --web.listen-address="127.0.0.1:$PROMETHEUS_PORT" --web.enable-lifecycle
  fi
  wait_for prometheus prometheus_ready
}
