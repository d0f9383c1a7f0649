#!/usr/bin/env bash
# Installs IST Mesh the way a package would: the two programs, their systemd
# units, shell completions and man pages (generated from the programs
# themselves). Run from the repository after `cargo build --release`:
#
#   sudo packaging/install.sh                    # into /
#   packaging/install.sh "$PWD/pkgroot"          # into a staging root
#
# BIN_DIR (default target/release) says where the built binaries are;
# PREFIX (default /usr) where they go.
set -euo pipefail
cd "$(dirname "$0")/.."
DESTDIR="${1:-}"
PREFIX="${PREFIX:-/usr}"
BIN_DIR="${BIN_DIR:-target/release}"

for prog in sidecar keyserver; do
    [ -x "$BIN_DIR/$prog" ] || { echo "missing $BIN_DIR/$prog: cargo build --release first" >&2; exit 1; }
done
install -d "$DESTDIR$PREFIX/bin" "$DESTDIR/etc/systemd/system" "$DESTDIR/etc/ist-mesh/sidecar" \
    "$DESTDIR$PREFIX/share/man/man1" "$DESTDIR$PREFIX/share/bash-completion/completions" \
    "$DESTDIR$PREFIX/share/zsh/vendor-completions" "$DESTDIR$PREFIX/share/fish/vendor_completions.d"
# The keyserver runs as a dynamic user: it must read keyserver.toml (no
# secrets in it). Sidecar configs and env files (join tokens) stay root's.
chmod 0755 "$DESTDIR/etc/ist-mesh"
chmod 0750 "$DESTDIR/etc/ist-mesh/sidecar"
[ -e "$DESTDIR/etc/ist-mesh/keyserver.toml" ] ||
    install -m 0644 packaging/keyserver.toml "$DESTDIR/etc/ist-mesh/keyserver.toml"
for prog in sidecar keyserver; do
    install -m 0755 "$BIN_DIR/$prog" "$DESTDIR$PREFIX/bin/$prog"
    "$BIN_DIR/$prog" man --dir "$DESTDIR$PREFIX/share/man/man1"
    "$BIN_DIR/$prog" completions bash >"$DESTDIR$PREFIX/share/bash-completion/completions/$prog"
    "$BIN_DIR/$prog" completions zsh >"$DESTDIR$PREFIX/share/zsh/vendor-completions/_$prog"
    "$BIN_DIR/$prog" completions fish >"$DESTDIR$PREFIX/share/fish/vendor_completions.d/$prog.fish"
done
gzip -9nf "$DESTDIR$PREFIX"/share/man/man1/{sidecar,keyserver}*.1
sed "s|/usr/bin/|$PREFIX/bin/|" packaging/systemd/keyserver.service >"$DESTDIR/etc/systemd/system/keyserver.service"
sed "s|/usr/bin/|$PREFIX/bin/|" 'packaging/systemd/sidecar@.service' >"$DESTDIR/etc/systemd/system/sidecar@.service"
chmod 0644 "$DESTDIR"/etc/systemd/system/{keyserver.service,sidecar@.service}
echo "installed into ${DESTDIR:-/}; then: systemctl daemon-reload"
