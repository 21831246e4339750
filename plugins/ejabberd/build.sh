#!/bin/sh
# Build mod_xmpp_push.beam against the ejabberd installed on this machine.
#
#   plugins/ejabberd/build.sh [OUTDIR]      (default: plugins/ejabberd/ebin)
#
# Finds ejabberd's headers (logger.hrl) and ebin (gen_mod, for the behaviour
# check) and p1_xmpp's headers (xmpp.hrl) in the usual places of Debian/Ubuntu
# packages, the ejabberd installers (/opt/ejabberd-*) and source installs
# (/usr/local/lib). Override with EJABBERD_DIR (the directory holding
# include/ and ebin/) and XMPP_DIR (the p1_xmpp/xmpp directory holding
# include/). Needs erlc (Debian: erlang-base, installed with ejabberd).
set -eu

here=$(cd "$(dirname "$0")" && pwd)
out=${1:-"$here/ebin"}

first_dir() {
    # The first existing directory among the patterns, newest version first.
    for pattern in "$@"; do
        # shellcheck disable=SC2086
        for dir in $(ls -d $pattern 2>/dev/null | sort -rV); do
            if [ -d "$dir" ]; then
                echo "$dir"
                return 0
            fi
        done
    done
    return 1
}

ejabberd_dir=${EJABBERD_DIR:-$(first_dir \
    '/usr/lib/*/ejabberd-*' \
    '/usr/lib/ejabberd-*' \
    '/usr/lib/erlang/lib/ejabberd-*' \
    '/usr/local/lib/ejabberd-*' \
    '/usr/local/lib/erlang/lib/ejabberd-*' \
    '/opt/ejabberd-*/lib/ejabberd-*' \
    '/opt/ejabberd/lib/ejabberd-*' || true)}
xmpp_dir=${XMPP_DIR:-$(first_dir \
    '/usr/lib/erlang/lib/p1_xmpp-*' \
    '/usr/lib/*/p1_xmpp-*' \
    '/usr/lib/erlang/lib/xmpp-*' \
    '/usr/local/lib/xmpp-*' \
    '/usr/local/lib/erlang/lib/xmpp-*' \
    '/opt/ejabberd-*/lib/xmpp-*' \
    '/opt/ejabberd/lib/xmpp-*' || true)}

if [ -z "$ejabberd_dir" ] || [ ! -f "$ejabberd_dir/include/logger.hrl" ]; then
    echo "build.sh: ejabberd's include/logger.hrl not found; set EJABBERD_DIR" >&2
    exit 1
fi
if [ -z "$xmpp_dir" ] || [ ! -f "$xmpp_dir/include/xmpp.hrl" ]; then
    echo "build.sh: p1_xmpp's include/xmpp.hrl not found; set XMPP_DIR" >&2
    exit 1
fi
if ! command -v erlc >/dev/null 2>&1; then
    echo "build.sh: erlc not found (Debian: apt install erlang-base)" >&2
    exit 1
fi

# xmpp.hrl includes p1_xml's fxml.hrl with include_lib: its library root too.
lib_root=$(dirname "$xmpp_dir")

mkdir -p "$out"
erlc -W +warn_unused_import +warn_export_vars \
    -I "$ejabberd_dir/include" -I "$xmpp_dir/include" -I "$lib_root" \
    -pa "$ejabberd_dir/ebin" -pa "$xmpp_dir/ebin" \
    -o "$out" "$here/mod_xmpp_push.erl"
echo "$out/mod_xmpp_push.beam (ejabberd: $ejabberd_dir)"
