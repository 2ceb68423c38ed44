# Offline FiftyOne bundle: install + start mongod.  Source it (bash):
#
#   source .fobundle/setup.sh          # install into /tmp/fosite, start mongod, export env
#   source .fobundle/setup.sh stop     # stop the mongod started here
#
# Env knobs: FOBUNDLE_PYTHON (python3), FOBUNDLE_SITE (/tmp/fosite),
# FOBUNDLE_DBDIR (/tmp/fodb), FOBUNDLE_MONGO_PORT (27017),
# FOBUNDLE_MONGO_TIMEOUT (30 s).
# Never sets "set -e" or touches LD_LIBRARY_PATH of the calling shell.

_fob_fail() {
  echo "FOBUNDLE SETUP FAILED: $*" >&2
  return 1
}

_fob_stop() {
  local db="${FOBUNDLE_DBDIR:-/tmp/fodb}" pid
  pid="$(cat "$db/mongod.pid" 2>/dev/null)" || { echo "fobundle: no $db/mongod.pid"; return 0; }
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    local i; for i in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    echo "fobundle: mongod (pid $pid) stopped"
  fi
  rm -f "$db/mongod.pid"
}

_fob_main() {
  local B PY SITE DB PORT TMO URI want have stamp pid i
  B="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
  PY="${FOBUNDLE_PYTHON:-python3}"
  SITE="${FOBUNDLE_SITE:-/tmp/fosite}"
  DB="${FOBUNDLE_DBDIR:-/tmp/fodb}"
  PORT="${FOBUNDLE_MONGO_PORT:-27017}"
  TMO="${FOBUNDLE_MONGO_TIMEOUT:-30}"
  URI="mongodb://127.0.0.1:$PORT"
  case "$SITE" in /?*/?*) ;; *) _fob_fail "FOBUNDLE_SITE='$SITE' must be an absolute path two levels deep"; return 1 ;; esac
  case "$DB" in /?*/?*) ;; *) _fob_fail "FOBUNDLE_DBDIR='$DB' must be an absolute path two levels deep"; return 1 ;; esac

  # --- python version must match the wheels -------------------------------
  have="$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)" \
    || { _fob_fail "cannot run '$PY'"; return 1; }
  want="$(cat "$B/PYVER" 2>/dev/null)"
  [ -z "$want" ] || [ "$want" = "$have" ] \
    || { _fob_fail "bundle built for python $want but '$PY' is $have"; return 1; }

  # --- python packages -> $SITE ------------------------------------------
  stamp="$(cd "$B" && ls -l --time-style=+%s site.tar.xz wheels.tar.xz mongod.xz lib.tar.xz 2>/dev/null | md5sum | cut -c1-16)"
  if [ "$(cat "$SITE/.fobundle-stamp" 2>/dev/null)" != "$stamp" ]; then
    rm -rf "$SITE" && mkdir -p "$SITE" || { _fob_fail "cannot create $SITE"; return 1; }
    "$PY" - "$B/site.tar.xz" "$SITE" <<'EOF' || { _fob_fail "unpacking site.tar.xz into $SITE"; return 1; }
import sys, tarfile
with tarfile.open(sys.argv[1], "r:xz") as t:
    kw = {"filter": "tar"} if hasattr(tarfile, "tar_filter") else {}
    t.extractall(sys.argv[2], **kw)
EOF
    rm -rf "$SITE.whl" && mkdir -p "$SITE.whl"
    "$PY" - "$B/wheels.tar.xz" "$SITE.whl" <<'EOF' || { _fob_fail "unpacking wheels.tar.xz"; return 1; }
import sys, tarfile
with tarfile.open(sys.argv[1], "r:xz") as t:
    kw = {"filter": "tar"} if hasattr(tarfile, "tar_filter") else {}
    t.extractall(sys.argv[2], **kw)
EOF
    if ! PIP_CONFIG_FILE=/dev/null "$PY" -m pip install -q --isolated --disable-pip-version-check \
         --no-index --no-deps --no-compile --no-cache-dir --no-warn-script-location \
         --target "$SITE" "$SITE.whl"/wheels/*.whl >"$SITE/.pip.log" 2>&1; then
      # fallback: a wheel is a zip; unpack it the way "pip --target" would
      echo "fobundle: pip install failed ($(tail -n1 "$SITE/.pip.log")), unpacking wheels directly" >&2
      "$PY" - "$SITE" "$SITE.whl"/wheels/*.whl <<'EOF' || { _fob_fail "installing wheels into $SITE"; return 1; }
import os, shutil, sys, zipfile
site = sys.argv[1]
for whl in sys.argv[2:]:
    with zipfile.ZipFile(whl) as z:
        z.extractall(site)
        datas = {n.split("/")[0] for n in z.namelist() if n.split("/")[0].endswith(".data")}
    for d in datas:
        for sub in ("purelib", "platlib"):
            src = os.path.join(site, d, sub)
            if os.path.isdir(src):
                shutil.copytree(src, site, dirs_exist_ok=True)
        shutil.rmtree(os.path.join(site, d))
for root, _, files in os.walk(site):
    for f in files:
        if ".so" in f:
            os.chmod(os.path.join(root, f), 0o755)
EOF
    fi
    # eta imports distutils.version; Python >= 3.12 has no distutils and relies on
    # setuptools' distutils-precedence.pth.  If that is not active, add a shim.
    if ! PYTHONPATH="$SITE" "$PY" -c 'import distutils.version' >/dev/null 2>&1; then
      mkdir -p "$SITE/distutils"
      cat > "$SITE/distutils/__init__.py" <<'EOF'
# shim added by fobundle setup.sh: serve "distutils" from setuptools/_distutils
# (what setuptools' own distutils-precedence.pth does), without importing setuptools.
import importlib.util as _u, os as _os
__path__ = [_os.path.join(_os.path.dirname(_u.find_spec("setuptools").origin), "_distutils")]
exec(compile(open(_os.path.join(__path__[0], "__init__.py")).read(), __path__[0] + "/__init__.py", "exec"))
EOF
    fi
    rm -rf "$SITE.whl"
    echo "$stamp" > "$SITE/.fobundle-stamp"
  fi
  case ":${PYTHONPATH:-}:" in
    *":$SITE:"*) ;;
    *) export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" ;;
  esac

  # --- mongod binary + its shared libs -> $DB ----------------------------
  mkdir -p "$DB/data" || { _fob_fail "cannot create $DB"; return 1; }
  if [ "$(cat "$DB/.fobundle-stamp" 2>/dev/null)" != "$stamp" ] || [ ! -x "$DB/mongod" ]; then
    "$PY" - "$B" "$DB" <<'EOF' || { _fob_fail "unpacking mongod.xz / lib.tar.xz into $DB"; return 1; }
import lzma, os, shutil, sys, tarfile
b, db = sys.argv[1:3]
with lzma.open(os.path.join(b, "mongod.xz")) as src, open(os.path.join(db, "mongod.part"), "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
os.chmod(os.path.join(db, "mongod.part"), 0o755)
os.replace(os.path.join(db, "mongod.part"), os.path.join(db, "mongod"))
shutil.rmtree(os.path.join(db, "lib"), ignore_errors=True)
with tarfile.open(os.path.join(b, "lib.tar.xz"), "r:xz") as t:
    kw = {"filter": "tar"} if hasattr(tarfile, "tar_filter") else {}
    t.extractall(os.path.join(db, "lib"), **kw)
EOF
    echo "$stamp" > "$DB/.fobundle-stamp"
  fi

  # --- start mongod (unless one already answers on $PORT) ----------------
  _fob_ping() {
    "$PY" -c 'import sys, pymongo
pymongo.MongoClient(sys.argv[1], serverSelectionTimeoutMS=700, connectTimeoutMS=700).admin.command("ping")' "$URI" >/dev/null 2>&1
  }
  if _fob_ping; then
    echo "fobundle: a mongod already answers on $URI, reusing it"
  else
    pid="$(cat "$DB/mongod.pid" 2>/dev/null)"
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
      kill "$pid" 2>/dev/null; sleep 1
    fi
    rm -f "$DB/data/mongod.lock"
    # subshell: mongod is not a job of the calling shell; nohup and env exec,
    # so $! is mongod's own pid.  LD_LIBRARY_PATH is set for mongod only.
    (
      cd "$DB" || exit 1
      nohup env LD_LIBRARY_PATH="$DB/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
        "$DB/mongod" --dbpath "$DB/data" --bind_ip 127.0.0.1 --port "$PORT" \
        --logpath "$DB/mongod.log" --logappend --unixSocketPrefix "$DB" \
        --wiredTigerCacheSizeGB 1 --setParameter diagnosticDataCollectionEnabled=false \
        </dev/null >"$DB/mongod.out" 2>&1 &
      echo $! > "$DB/mongod.pid"
    ) </dev/null >/dev/null 2>&1
    pid="$(cat "$DB/mongod.pid")"
    i=0
    until _fob_ping; do
      i=$((i + 1))
      if ! kill -0 "$pid" 2>/dev/null || [ "$i" -ge "$TMO" ]; then
        if kill -0 "$pid" 2>/dev/null; then
          _fob_fail "mongod (pid $pid) did not answer on $URI within ${TMO}s"
        else
          _fob_fail "mongod exited during startup (see $DB/mongod.out, $DB/mongod.log)"
        fi
        echo "--- $DB/mongod.out (tail)" >&2; tail -n 10 "$DB/mongod.out" >&2 2>/dev/null
        echo "--- $DB/mongod.log (errors)" >&2; grep -E '"s":"(E|F)"' "$DB/mongod.log" 2>/dev/null | tail -n 5 >&2
        echo "--- $DB/mongod.log (tail)" >&2; tail -n 8 "$DB/mongod.log" >&2 2>/dev/null
        "$PY" -c 'import pymongo' 2>/dev/null || echo "(note: 'import pymongo' fails with PYTHONPATH=$PYTHONPATH)" >&2
        return 1
      fi
      sleep 1
    done
    echo "fobundle: mongod pid $pid on $URI (log $DB/mongod.log)"
  fi

  export FIFTYONE_DATABASE_URI="$URI"
  export FIFTYONE_DATABASE_VALIDATION=false
  export FIFTYONE_DO_NOT_TRACK=true
  return 0
}

if [ "${1:-}" = "stop" ]; then
  _fob_stop
else
  _fob_main
fi
_fob_rc=$?
unset -f _fob_main _fob_ping
[ "${BASH_SOURCE[0]}" = "$0" ] && { echo "fobundle: note: run with 'source', otherwise the exports are lost" >&2; exit $_fob_rc; }
return $_fob_rc
