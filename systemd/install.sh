#!/usr/bin/env bash
# Installs ShopVerse on a systemd host: the binary, the configuration under /etc/shopverse and the
# unit files. Idempotent; existing configuration is never overwritten (the shipped version is
# written next to it as *.dist).
#
#   systemd/install.sh [--root DIR] [--binary PATH] [--uninstall [--purge]]
#
#   --root DIR     stage into DIR instead of / (no systemctl calls); this is how the tests run it
#   --binary PATH  the shopverse binary to install (default: target/release/shopverse, built if
#                  missing)
#   --uninstall    remove the binary and the units (configuration and data stay)
#   --purge        with --uninstall: remove /etc/shopverse too (data in /var/lib stays)
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(dirname "$here")"
root=""
binary=""
uninstall=0
purge=0
while [ $# -gt 0 ]; do
  case "$1" in
    --root) root="${2:?--root needs a directory}"; shift 2 ;;
    --binary) binary="${2:?--binary needs a path}"; shift 2 ;;
    --uninstall) uninstall=1; shift ;;
    --purge) purge=1; shift ;;
    -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
  esac
done

bin_dir="$root/usr/local/bin"
unit_dir="$root/etc/systemd/system"
conf_dir="$root/etc/shopverse"
doc_dir="$root/usr/local/share/doc/shopverse"
units=(shopverse.service shopverse-gateway.service shopverse@.service)

systemctl_live() {
  [ -z "$root" ] && command -v systemctl >/dev/null && [ -d /run/systemd/system ]
}

if [ "$uninstall" = 1 ]; then
  if systemctl_live; then
    systemctl disable --now shopverse.service shopverse-gateway.service 2>/dev/null || true
  fi
  for u in "${units[@]}"; do rm -f "$unit_dir/$u"; done
  rm -f "$bin_dir/shopverse"
  rm -rf "$doc_dir"
  [ "$purge" = 1 ] && rm -rf "$conf_dir"
  systemctl_live && systemctl daemon-reload
  echo "uninstalled from ${root:-/}"
  exit 0
fi

if [ -z "$binary" ]; then
  binary="${CARGO_TARGET_DIR:-$repo/target}/release/shopverse"
  [ -x "$binary" ] || (cd "$repo" && cargo build --release --locked)
fi
[ -x "$binary" ] || { echo "no executable at $binary" >&2; exit 1; }

# Units of earlier versions kept the gateway's and each service's state inside the
# appliance's directory (/var/lib/shopverse/<name>), which systemd hands to whichever unit
# starts; each now has its own (/var/lib/shopverse-<name>). Move what is there, once.
private="$root/var/lib/private"
for name in gateway users products orders payments notifications delivery; do
  old="$private/shopverse/$name" new="$private/shopverse-$name"
  [ -d "$old" ] && [ ! -e "$new" ] || continue
  if systemctl_live && systemctl is-active --quiet "shopverse-$name.service" "shopverse@$name.service" 2>/dev/null; then
    echo "not moving $old: its unit is running; stop it and run install.sh again" >&2
    continue
  fi
  mv "$old" "$new"
  echo "moved $old to $new (each unit has its own state directory now)"
done

install -d -m 0755 "$bin_dir" "$unit_dir" "$doc_dir"
install -d -m 0750 "$conf_dir" "$conf_dir/distributed" "$conf_dir/credentials"
install -m 0755 "$binary" "$bin_dir/shopverse"
for u in "${units[@]}"; do install -m 0644 "$here/$u" "$unit_dir/$u"; done
install -m 0644 "$repo/README.md" "$doc_dir/README.md"

# Configuration: ship, never clobber.
put_config() { # source, destination
  if [ -e "$2" ] && ! cmp -s "$1" "$2"; then
    install -m 0640 "$1" "$2.dist"
    echo "kept your $2 (the shipped one is $2.dist)"
  else
    install -m 0640 "$1" "$2"
  fi
}
put_config "$repo/configs/shopverse.toml" "$conf_dir/shopverse.toml"
put_config "$repo/configs/gateway.toml" "$conf_dir/gateway.toml"
for f in "$repo"/configs/distributed/*.toml; do
  put_config "$f" "$conf_dir/distributed/$(basename "$f")"
done

# Every installed configuration must load.
for f in "$conf_dir"/shopverse.toml "$conf_dir"/gateway.toml "$conf_dir"/distributed/*.toml; do
  "$bin_dir/shopverse" check-config "$f" >/dev/null || { echo "invalid configuration: $f" >&2; exit 1; }
done

if systemctl_live; then
  systemctl daemon-reload
  echo "installed; start with: systemctl enable --now shopverse.service"
else
  echo "installed into ${root:-/}"
fi
