#!/usr/bin/env bash
# Builds the offline FiftyOne bundle (see README.txt).
#
#   bash tools/offline_fiftyone/build.sh [PYVER] [OUTDIR]
#
# PYVER   target python version of the cp wheels (default 3.12)
# OUTDIR  where to write the bundle (default: .fobundle/ at the repository root, git-ignored)
#
# Sources: the local venv (pure-Python packages + mongod binary, env FOB_VENV,
# default: the repository's .venv, made by `make test`) and the package registry
# (compiled wheels, via pip).
set -euo pipefail

PYVER="${1:-3.12}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
OUT="$(mkdir -p "${2:-$REPO/.fobundle}" && cd "${2:-$REPO/.fobundle}" && pwd)"
VENV="${FOB_VENV:-$REPO/.venv}"
VPY="$VENV/bin/python"
SP="$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
MONGOD="$SP/fiftyone/db/bin/mongod"
XZ="xz -T1 -9"
XZBIN="xz -T1 --x86 --lzma2=preset=9"   # BCJ filter for executables
TMP="$(mktemp -d /tmp/fobuild.XXXXXX)"
trap 'rm -rf "$TMP"' EXIT

# Pure-Python distributions copied from the venv into site.tar.xz.
# (everything compiled goes to wheels.tar.xz below instead.)
PURE=(
  fiftyone fiftyone-brain fiftyone-db voxel51-eta
  pydantic annotated-types typing-inspection
  mongoengine motor dnspython
  strawberry-graphql graphql-core cross-web starlette sse-starlette sseclient-py
  hypercorn h2 hpack hyperframe priority wsproto
  plotly narwhals
  py7zr multivolumefile texttable rarfile
  cachetools dacite dill exceptiongroup glob2 jsonlines pprintpp pydash pypcd4
  pytz retrying xmltodict tzlocal deprecated argcomplete async-lru
  beautifulsoup4 soupsieve ftfy jsonpatch jsonpointer universal-analytics-python3
  datasets
  pytest pluggy iniconfig pygments
)
# Compiled (or python-version specific) distributions -> cp$PYVER wheels.
# Versions are taken from the venv.
WHEELS=(
  pydantic-core pymongo rtree
  pyppmd pybcj inflate64 backports-zstd pycryptodomex python-neo-lzf wcwidth
  multiprocess
  stringzilla simsimd
)
# Paths (relative to site-packages) never carried.
EXCLUDE_RE='(^|/)__pycache__/|\.pyc$|^fiftyone/server/static/|^fiftyone/db/bin/|^plotly/labextension/|^plotly/package_data/(plotly\.min|widgetbundle)\.js$|^\.\./'

echo "== site.tar.xz (pure Python, from $VENV)"
mkdir -p "$TMP/site"
"$VPY" - "$EXCLUDE_RE" "${PURE[@]}" > "$TMP/filelist" <<'EOF'
import importlib.metadata as md, re, sys
excl = re.compile(sys.argv[1])
seen = set()
for name in sys.argv[2:]:
    d = md.distribution(name)
    for f in d.files or []:
        p = str(f)
        if excl.search(p) or p in seen:
            continue
        seen.add(p)
        print(p)
EOF
(cd "$SP" && while IFS= read -r p; do [ -e "$p" ] && printf '%s\n' "$p"; done < "$TMP/filelist") > "$TMP/filelist.ok"
tar -C "$SP" -cf - --no-recursion --owner=0 --group=0 -T "$TMP/filelist.ok" | tar -C "$TMP/site" -xf -
tar -C "$TMP/site" -cf - --owner=0 --group=0 --sort=name . | $XZ > "$OUT/site.tar.xz.part"
mv "$OUT/site.tar.xz.part" "$OUT/site.tar.xz"

echo "== wheels.tar.xz (cp${PYVER/./} wheels, re-zipped uncompressed so xz can squeeze them)"
mkdir -p "$TMP/dl" "$TMP/wheels"
SPECS=()
for n in "${WHEELS[@]}"; do
  SPECS+=("$n==$("$VPY" -c 'import importlib.metadata as m,sys; print(m.version(sys.argv[1]))' "$n")")
done
"$VPY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 \
  -d "$TMP/dl" "${SPECS[@]}"
# same files, same RECORD hashes: only the zip compression method changes
"$VPY" - "$TMP/dl" "$TMP/wheels" <<'EOF'
import os, sys, zipfile
src, dst = sys.argv[1:3]
for name in sorted(os.listdir(src)):
    with zipfile.ZipFile(os.path.join(src, name)) as zi, \
         zipfile.ZipFile(os.path.join(dst, name), "w", zipfile.ZIP_STORED) as zo:
        for info in zi.infolist():
            data = zi.read(info)
            info.compress_type = zipfile.ZIP_STORED
            zo.writestr(info, data)
EOF
rm -rf "$OUT/wheels"
tar -C "$TMP" -cf - --owner=0 --group=0 --sort=name wheels | $XZ > "$OUT/wheels.tar.xz"
ls -1 "$TMP/wheels"

echo "== mongod.xz + lib.tar.xz"
if [ ! -s "$OUT/mongod.xz" ] || [ "$MONGOD" -nt "$OUT/mongod.xz" ]; then
  # symbols are only used for mongod's own backtraces
  cp "$MONGOD" "$TMP/mongod" && strip --strip-all "$TMP/mongod"
  $XZBIN -c "$TMP/mongod" > "$OUT/mongod.xz.part" && mv "$OUT/mongod.xz.part" "$OUT/mongod.xz"
  rm -f "$TMP/mongod"
fi
mkdir -p "$TMP/lib"
# every resolved dependency except glibc itself and libgcc_s
ldd "$MONGOD" | awk '/=> \//{print $1, $3}' | while read -r soname path; do
  case "$soname" in
    libc.so*|libm.so*|libpthread.so*|libdl.so*|librt.so*|libresolv.so*|ld-linux*|libgcc_s.so*) continue ;;
  esac
  cp -L "$path" "$TMP/lib/$soname"
done
tar -C "$TMP/lib" -cf - --owner=0 --group=0 --sort=name . | $XZBIN > "$OUT/lib.tar.xz"

if [ "$OUT" != "$HERE" ]; then
  cp "$HERE/setup.sh" "$HERE/check.py" "$OUT/"
  [ -f "$HERE/README.txt" ] && cp "$HERE/README.txt" "$OUT/"
fi
echo "$PYVER" > "$OUT/PYVER"
du -sh "$OUT"
ls -la "$OUT"
