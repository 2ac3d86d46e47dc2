# Shared steps of the project's scripts. Every step is idempotent and runs every time, so a warm
# machine cannot hide a missing one.

# What building needs: a C toolchain (bundled SQLite) and cmake (Pingora's zlib-ng).
SHOPVERSE_BUILD_PACKAGES="gcc g++ libc6-dev make cmake pkg-config"
# What the tests need besides: the PostgreSQL and Redis clients for the readiness checks; curl
# and openssl for the HTTPS tests; systemd for `systemd-analyze`, which the tests run on the
# unit files; docker-compose to check the Compose file (no Docker engine runs here).
SHOPVERSE_APT_PACKAGES="$SHOPVERSE_BUILD_PACKAGES postgresql-client redis-tools curl openssl systemd docker-compose prometheus chromium chromium-driver fonts-dejavu-core"

step() { printf '\n==> %s\n' "$*"; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    echo "need root for: $*" >&2; return 1; fi
}

apt_install() {
  export DEBIAN_FRONTEND=noninteractive
  as_root apt-get install -y -q --no-install-recommends "$@" >/dev/null \
    || { as_root apt-get update -q >/dev/null && as_root apt-get install -y -q --no-install-recommends "$@" >/dev/null; }
}

ensure_packages() { # [package list; default: everything the tests need]
  local pkgs="${1:-$SHOPVERSE_APT_PACKAGES}"
  if ! command -v apt-get >/dev/null; then
    echo "not a Debian-like system: install the equivalents of: $pkgs" >&2
    return 0
  fi
  # shellcheck disable=SC2086
  apt_install $pkgs
  echo "installed: $pkgs"
}

# A Python environment with the independent tools the tests use: aiosmtpd (the SMTP server the
# email tests send to), openapi-spec-validator (checks the gateway's OpenAPI document) and
# kubernetes-validate (checks the manifests offline).
ensure_test_python() {
  local venv="${SHOPVERSE_CACHE:-$HOME/.cache/shopverse}/venv"
  if ! "$venv/bin/python" -c 'import aiosmtpd, openapi_spec_validator, kubernetes_validate' 2>/dev/null; then
    python3 -m venv "$venv" 2>/dev/null || { apt_install python3 python3-venv && python3 -m venv "$venv"; }
    "$venv/bin/python" -m pip install -q --disable-pip-version-check 'aiosmtpd>=1.4' 'openapi-spec-validator>=0.7' 'kubernetes-validate>=1.30'
  fi
  "$venv/bin/python" -c 'import aiosmtpd, openapi_spec_validator, kubernetes_validate' || { echo "the test tools did not install" >&2; return 1; }
  export SHOPVERSE_TEST_PYTHON="$venv/bin/python"
  echo "test tools (aiosmtpd, openapi-spec-validator, kubernetes-validate) in $venv"
}

# The browser tests' tools: Debian's chromium and chromium-driver (system packages), and
# axe-core (the accessibility checker the tests run in the page), a pinned release from the npm
# registry, unpacked once into the cache.
AXE_VERSION=4.10.3
ensure_browser_tools() {
  command -v chromium >/dev/null && command -v chromedriver >/dev/null \
    || apt_install chromium chromium-driver fonts-dejavu-core
  local dir="${SHOPVERSE_CACHE:-$HOME/.cache/shopverse}/axe-core-$AXE_VERSION"
  if [ ! -s "$dir/axe.min.js" ]; then
    command -v npm >/dev/null || apt_install npm
    local tmp; tmp=$(mktemp -d)
    (cd "$tmp" && npm pack -q "axe-core@$AXE_VERSION" >/dev/null && tar xzf "axe-core-$AXE_VERSION.tgz")
    mkdir -p "$dir"
    cp "$tmp/package/axe.min.js" "$tmp/package/LICENSE" "$dir/"
    rm -rf "$tmp"
  fi
  export SHOPVERSE_AXE_JS="$dir/axe.min.js"
  export SHOPVERSE_CHROMEDRIVER="${SHOPVERSE_CHROMEDRIVER:-$(command -v chromedriver)}"
  echo "browser tests: $(chromium --version 2>/dev/null | head -1), axe-core $AXE_VERSION"
}

# cargo-nextest, the test runner: it runs each test in a process of its own, so every test
# that starts the appliance in-process gets the one gateway (Pingora server) a process can
# start. Installed with cargo when missing.
ensure_nextest() {
  if ! cargo nextest --version >/dev/null 2>&1; then
    echo "installing cargo-nextest"
    cargo install --locked cargo-nextest
  fi
  cargo nextest --version | head -1
}

# cargo-deny (licences, bans, sources), built once into the cache like the broker.
SHOPVERSE_CARGO_DENY_VERSION="0.20.2"
ensure_cargo_deny() {
  local root="${SHOPVERSE_CACHE:-$HOME/.cache/shopverse}/cargo-deny-$SHOPVERSE_CARGO_DENY_VERSION"
  if [ ! -x "$root/bin/cargo-deny" ]; then
    echo "building cargo-deny $SHOPVERSE_CARGO_DENY_VERSION into $root (once)"
    cargo install cargo-deny --version "$SHOPVERSE_CARGO_DENY_VERSION" --locked \
      --root "$root" --target-dir "$root/build" \
      || { echo "building cargo-deny failed" >&2; return 1; }
    rm -rf "$root/build"
  fi
  export SHOPVERSE_CARGO_DENY="$root/bin/cargo-deny"
  "$SHOPVERSE_CARGO_DENY" --version
}

pg_ready() { pg_isready -q -h 127.0.0.1 -p 5432 -U postgres -t 2 2>/dev/null; }

# PostgreSQL on 127.0.0.1:5432 that user postgres reaches without a password.
ensure_postgres() {
  if [ -n "${SHOPVERSE_TEST_POSTGRES:-}" ]; then
    echo "using SHOPVERSE_TEST_POSTGRES"; return 0
  fi
  if ! pg_ready; then
    if ! command -v pg_ctlcluster >/dev/null; then
      echo "installing PostgreSQL"
      apt_install postgresql
      # A server we installed ourselves: let the postgres user in over loopback for the tests.
      for hba in /etc/postgresql/*/main/pg_hba.conf; do
        grep -q '^host all postgres 127.0.0.1/32 trust' "$hba" \
          || as_root sed -i '1i host all postgres 127.0.0.1/32 trust' "$hba"
      done
    fi
    local v
    v=$(ls /etc/postgresql | sort -V | tail -n 1)
    echo "starting PostgreSQL $v"
    as_root pg_ctlcluster --skip-systemctl-redirect "$v" main start || true
    for _ in $(seq 1 30); do pg_ready && break; sleep 1; done
  fi
  if ! pg_ready; then
    echo "PostgreSQL is not answering on 127.0.0.1:5432; start it, or set SHOPVERSE_TEST_POSTGRES=postgres://user:pass@host:port/db" >&2
    return 1
  fi
  if ! psql -h 127.0.0.1 -U postgres -d postgres -Atqc 'select 1' >/dev/null 2>&1; then
    echo "PostgreSQL answers but user postgres cannot log in without a password; set SHOPVERSE_TEST_POSTGRES" >&2
    return 1
  fi
  echo "PostgreSQL ready on 127.0.0.1:5432"
}

# Redis on 127.0.0.1:6379 (the gateway's shared rate limits are tested against it).
ensure_redis() {
  if [ -n "${SHOPVERSE_TEST_REDIS:-}" ]; then
    echo "using SHOPVERSE_TEST_REDIS"; return 0
  fi
  if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
    command -v redis-server >/dev/null || apt_install redis-server
    echo "starting Redis"
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no >/dev/null
    for _ in $(seq 1 30); do redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && break; sleep 0.5; done
  fi
  redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 || { echo "Redis is not answering on 127.0.0.1:6379; set SHOPVERSE_TEST_REDIS" >&2; return 1; }
  echo "Redis ready on 127.0.0.1:6379"
}

# A Kafka-protocol broker on 127.0.0.1:9092 for the Kafka tests: tansu (crates.io, Apache-2.0),
# built once into the cache (about 20-30 minutes on 2 cores) and reused; its storage is a SQLite
# file under the cache, so a restarted broker keeps its topics and offsets. With
# SHOPVERSE_KAFKA_BROKERS set, that cluster is used instead and nothing is installed or started.
SHOPVERSE_TANSU_VERSION="0.6.0"
tansu_root() { echo "${SHOPVERSE_CACHE:-$HOME/.cache/shopverse}/tansu-$SHOPVERSE_TANSU_VERSION"; }

port_open() { # host port
  (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null
}

ensure_tansu() {
  local root bin
  root=$(tansu_root)
  bin="$root/bin/tansu"
  if [ ! -x "$bin" ]; then
    echo "building the tansu broker $SHOPVERSE_TANSU_VERSION into $root (once; about 20-30 minutes on 2 cores)"
    ensure_packages "$SHOPVERSE_BUILD_PACKAGES"
    cargo install tansu --version "$SHOPVERSE_TANSU_VERSION" --features dynostore,libsql --locked \
      --root "$root" --target-dir "$root/build" \
      || { echo "building the tansu broker failed" >&2; return 1; }
    rm -rf "$root/build"
  fi
  "$bin" --version >/dev/null 2>&1 || "$bin" --help >/dev/null 2>&1 \
    || { echo "the tansu binary at $bin does not run" >&2; return 1; }
  export SHOPVERSE_TANSU_BIN="$bin"
}

ensure_kafka() {
  ensure_tansu || return 1
  if [ -n "${SHOPVERSE_KAFKA_BROKERS:-}" ]; then
    local first="${SHOPVERSE_KAFKA_BROKERS%%,*}"
    port_open "${first%:*}" "${first##*:}" \
      || { echo "SHOPVERSE_KAFKA_BROKERS=$SHOPVERSE_KAFKA_BROKERS: nothing answers at $first" >&2; return 1; }
    echo "using the Kafka cluster at SHOPVERSE_KAFKA_BROKERS=$SHOPVERSE_KAFKA_BROKERS"
    return 0
  fi
  local dir
  dir="${SHOPVERSE_CACHE:-$HOME/.cache/shopverse}/kafka"
  mkdir -p "$dir"
  if ! port_open 127.0.0.1 9092; then
    echo "starting the tansu broker on 127.0.0.1:9092 (storage $dir/tansu.db, log $dir/broker.log)"
    # tansu opens a sqlite:// storage path relative to its working directory.
    (cd "$dir" && nohup "$SHOPVERSE_TANSU_BIN" broker \
      --listener-url tcp://127.0.0.1:9092 --advertised-listener-url tcp://127.0.0.1:9092 \
      --storage-engine "sqlite:///tansu.db" --silent >>"$dir/broker.log" 2>&1 </dev/null &)
    for _ in $(seq 1 60); do port_open 127.0.0.1 9092 && break; sleep 0.5; done
  fi
  if ! port_open 127.0.0.1 9092; then
    echo "the Kafka broker did not start on 127.0.0.1:9092; its log:" >&2
    tail -n 30 "$dir/broker.log" >&2 || true
    return 1
  fi
  export SHOPVERSE_KAFKA_BROKERS=127.0.0.1:9092
  echo "Kafka (tansu) ready on 127.0.0.1:9092"
}
