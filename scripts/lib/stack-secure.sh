# shellcheck shell=bash
# Sourced by scripts/stack: The secured stack: its CA and certificates, passwords, SCRAM users and ACLs.
# Uses the variables scripts/stack sets (STACK_DIR, ports, SECURE, CLUSTER, ...).

# ---------------------------------------------------------------- secure stack: CA, users, ACLs

new_key() {
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null
  chmod 600 "$1"
}

# issue PATH CN EXTFILE: PATH.key and PATH.crt, signed by the stack's CA.
issue() {
  new_key "$1.key"
  openssl req -new -key "$1.key" -subj "/CN=$2" -out "$1.csr" 2>/dev/null
  openssl x509 -req -in "$1.csr" -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" -CAcreateserial \
    -days 365 -sha256 -extfile "$3" -out "$1.crt" 2>/dev/null
  rm -f "$1.csr"
}

new_secret() { openssl rand -hex 16 >"$SECRETS/$1.password"; chmod 600 "$SECRETS/$1.password"; }
secret_of() { cat "$SECRETS/$1.password"; }

# First start: a throwaway CA, the broker's certificate (CN=broker: Kafka's own
# principal on its controller listener; SAN localhost and 127.0.0.1), client
# certificates for the gateway and each device (CN = MQTT user), passwords.
ensure_pki() {
  [ -f "$PKI/.complete" ] && return 0
  say "issuing a throwaway CA, certificates and passwords for $SECURE_DEVICES devices in $STACK_DIR/{pki,secrets}"
  rm -rf "$PKI" "$SECRETS"
  mkdir -p "$PKI/devices" "$SECRETS"
  chmod 700 "$PKI" "$SECRETS"
  new_key "$PKI/ca.key"
  openssl req -x509 -new -key "$PKI/ca.key" -sha256 -days 3650 -subj "/CN=IoT gateway stack CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out "$PKI/ca.crt" 2>/dev/null || die "openssl could not make the CA"
  printf '%s\n' 'basicConstraints=critical,CA:FALSE' 'keyUsage=critical,digitalSignature,keyEncipherment' \
    'extendedKeyUsage=serverAuth,clientAuth' 'subjectAltName=DNS:localhost,DNS:kafka,DNS:mosquitto,IP:127.0.0.1' >"$PKI/server.ext"
  printf '%s\n' 'basicConstraints=critical,CA:FALSE' 'keyUsage=critical,digitalSignature' \
    'extendedKeyUsage=clientAuth' >"$PKI/client.ext"
  issue "$PKI/server" broker "$PKI/server.ext"
  issue "$PKI/gateway" gateway "$PKI/client.ext"
  local u
  for u in kafka-admin kafka-gateway kafka-aggregator kafka-keystore mqtt-gateway mqtt-stack-probe; do
    new_secret "$u"
  done
  : >"$SECRETS/device-passwords"
  chmod 600 "$SECRETS/device-passwords"
  openssl pkcs12 -export -in "$PKI/server.crt" -inkey "$PKI/server.key" -certfile "$PKI/ca.crt" \
    -name broker -passout "file:$SECRETS/kafka-keystore.password" -out "$PKI/broker.p12"
  printf '%s\n' "security.protocol=SASL_SSL" "ssl.ca.location=$PKI/ca.crt" "sasl.mechanisms=PLAIN" \
    "sasl.username=admin" "sasl.password=$(secret_of kafka-admin)" >"$SECRETS/kcat-admin.properties"
  printf '%s\n' "security.protocol=SASL_SSL" "sasl.mechanism=SCRAM-SHA-512" \
    "sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username=\"admin\" password=\"$(secret_of kafka-admin)\";" \
    "ssl.truststore.type=PEM" "ssl.truststore.location=$PKI/ca.crt" >"$SECRETS/kafka-admin.properties"
  chmod 600 "$SECRETS"/*.properties
  touch "$PKI/.complete"
}

# Certificates (CN = device) and passwords for sensor-0001..SECURE_DEVICES; more
# are issued when SECURE_DEVICES grows (a running Mosquitto reloads its users).
ensure_devices() {
  local have i dev
  have=$(wc -l <"$SECRETS/device-passwords")
  [ "$have" -ge "$SECURE_DEVICES" ] && [ -f "$SECRETS/mosquitto.passwd" ] && return 0
  [ "$have" -ge "$SECURE_DEVICES" ] || say "issuing certificates and passwords for devices $((have + 1))..$SECURE_DEVICES"
  for i in $(seq $((have + 1)) "$SECURE_DEVICES"); do
    dev=$(printf 'sensor-%04d' "$i")
    issue "$PKI/devices/$dev" "$dev" "$PKI/client.ext"
    echo "$dev:$(openssl rand -hex 16)" >>"$SECRETS/device-passwords"
  done
  # Mosquitto's password file: written in clear, then hashed in place.
  (
    umask 077
    {
      echo "gateway:$(secret_of mqtt-gateway)"
      echo "stack-probe:$(secret_of mqtt-stack-probe)"
      cat "$SECRETS/device-passwords"
    } >"$SECRETS/mosquitto.passwd.tmp"
  )
  mosquitto_passwd -U "$SECRETS/mosquitto.passwd.tmp" || die "mosquitto_passwd failed"
  mv "$SECRETS/mosquitto.passwd.tmp" "$SECRETS/mosquitto.passwd"
  local pid
  if pid=$(service_pid mosquitto); then kill -HUP "$pid"; fi
}

scram_users() {
  [ $SECURE = 1 ] || return 0
  local u
  for u in admin gateway aggregator; do
    printf -- "--add-scram SCRAM-SHA-512=[name=%s,password=%s] " "$u" "$(secret_of "kafka-$u")"
    printf -- "--add-scram SCRAM-SHA-256=[name=%s,password=%s] " "$u" "$(secret_of "kafka-$u")"
  done
}

# write_secure_kafka_config [FILE]: (default: the stack's own server.properties)
write_secure_kafka_config() {
  local out=${1:-$STACK_DIR/kafka/server.properties}
  local scram=org.apache.kafka.common.security.scram.ScramLoginModule
  local plain=org.apache.kafka.common.security.plain.PlainLoginModule
  (
    umask 077
    cat >"$out" <<EOF
# Generated by scripts/stack --secure: one node, SASL_SSL for clients, mutual
# TLS between its broker and controller parts, ACLs enforced.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$KAFKA_CONTROLLER_PORT
listeners=SASL_SSL://127.0.0.1:$KAFKA_PORT,CONTROLLER://127.0.0.1:$KAFKA_CONTROLLER_PORT,SSL://127.0.0.1:$KAFKA_MTLS_PORT
advertised.listeners=SASL_SSL://127.0.0.1:$KAFKA_PORT,SSL://127.0.0.1:$KAFKA_MTLS_PORT
controller.listener.names=CONTROLLER
inter.broker.listener.name=SASL_SSL
listener.security.protocol.map=CONTROLLER:SSL,SASL_SSL:SASL_SSL,SSL:SSL
ssl.keystore.type=PKCS12
ssl.keystore.location=$PKI/broker.p12
ssl.keystore.password=$(secret_of kafka-keystore)
ssl.truststore.type=PEM
ssl.truststore.location=$PKI/ca.crt
# The controller listener needs the broker's certificate (CN=broker -> User:broker, a
# super user); a plaintext one would make anyone reaching it a super user.
listener.name.controller.ssl.client.auth=required
# Clients with a certificate instead of a password (mutual TLS): CN=gateway -> User:gateway.
listener.name.ssl.ssl.client.auth=required
ssl.principal.mapping.rules=RULE:^CN=([^,]+)\$/\$1/,DEFAULT
sasl.enabled.mechanisms=SCRAM-SHA-512,SCRAM-SHA-256,PLAIN
sasl.mechanism.inter.broker.protocol=SCRAM-SHA-512
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=$scram required username="admin" password="$(secret_of kafka-admin)";
listener.name.sasl_ssl.scram-sha-256.sasl.jaas.config=$scram required;
# PLAIN for kcat (Debian's predates librdkafka's SCRAM fix) and to test the clients' PLAIN.
listener.name.sasl_ssl.plain.sasl.jaas.config=$plain required username="admin" password="$(secret_of kafka-admin)" user_admin="$(secret_of kafka-admin)" user_gateway="$(secret_of kafka-gateway)" user_aggregator="$(secret_of kafka-aggregator)";
authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer
super.users=User:admin;User:broker
allow.everyone.if.no.acl.found=false
$(single_node_properties)
EOF
  )
}

# docker-compose.secure.yml's Kafka config: the same as ours with the paths the
# containers see (this folder is mounted at /etc/iot-secure) and a listener for
# the other containers (kafka:9094) beside the one for the host (127.0.0.1:9094).
write_compose_kafka_config() {
  mkdir -p "$STACK_DIR/compose"
  local KAFKA_PORT=9094 KAFKA_CONTROLLER_PORT=9093 c=$STACK_DIR/compose
  write_secure_kafka_config "$c/kafka.properties.in"
  sed -e "s|$STACK_DIR|/etc/iot-secure|g" \
    -e 's|^controller.quorum.voters=.*|controller.quorum.voters=1@kafka:9093|' \
    -e 's|^listeners=.*|listeners=SASL_SSL://:9094,CONTROLLER://:9093,HOST://:19094|' \
    -e 's|^advertised.listeners=.*|advertised.listeners=SASL_SSL://kafka:9094,HOST://127.0.0.1:9094|' \
    -e 's|^listener.security.protocol.map=.*|listener.security.protocol.map=CONTROLLER:SSL,SASL_SSL:SASL_SSL,HOST:SASL_SSL|' \
    -e '/^listener.name.ssl.ssl.client.auth/d' \
    -e 's|^log.dirs=.*|log.dirs=/var/lib/kafka/data|' \
    "$c/kafka.properties.in" >"$c/kafka.properties.tmp"
  rm -f "$c/kafka.properties.in"
  # The host listener logs in the same users.
  grep '^listener.name.sasl_ssl\.' "$c/kafka.properties.tmp" | sed 's/^listener.name.sasl_ssl\./listener.name.host./' >>"$c/kafka.properties.tmp"
  mv "$c/kafka.properties.tmp" "$c/kafka.properties"
  sed -e "s|$STACK_DIR|/etc/iot-secure|g" "$SECRETS/kafka-admin.properties" >"$c/kafka-admin.properties"
  chmod 600 "$c"/*.properties
}

# The services' ACLs (once; they live in the cluster's metadata).
ensure_acls() {
  [ -f "$STACK_DIR/kafka/.acls-2" ] && return 0
  say "granting ACLs: gateway writes weather, weather.dlq and reads weather (to resend after a crash only what Kafka lacks); aggregator reads weather (group weather-aggregator)"
  kafka_java org.apache.kafka.tools.AclCommand --bootstrap-server "$BOOTSTRAP" $(admin_config) --add \
    --allow-principal User:gateway --operation Write --operation Describe \
    --topic weather --topic weather.dlq >>"$LOGS/kafka-admin.log" 2>&1 &&
    kafka_java org.apache.kafka.tools.AclCommand --bootstrap-server "$BOOTSTRAP" $(admin_config) --add \
      --allow-principal User:gateway --operation Read --topic weather >>"$LOGS/kafka-admin.log" 2>&1 &&
    kafka_java org.apache.kafka.tools.AclCommand --bootstrap-server "$BOOTSTRAP" $(admin_config) --add \
      --allow-principal User:aggregator --consumer --topic weather --group weather-aggregator \
      >>"$LOGS/kafka-admin.log" 2>&1 ||
    { log_tail kafka-admin; die "could not set the Kafka ACLs"; }
  touch "$STACK_DIR/kafka/.acls-2"
}
