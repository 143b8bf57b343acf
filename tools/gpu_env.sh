# tools/gpu_env.sh: make moonshard's Debian build dependencies usable on a machine that lacks them
# (the lent GPU machines have nvcc, cmake and PyTorch, but not LuaJIT, libuv, cJSON, libedit,
# PCRE2, OpenBLAS or luv).
#
#   source tools/gpu_env.sh [DEBS_DIR]
#
# Unpacks every .deb of DEBS_DIR (default: .carry/debs beside this checkout, filled on a Debian
# machine with `apt-get download ...`) into $MSH_DEPS (default /opt/msh-deps) without installing
# anything, points pkg-config files and absolute symlinks at the unpacked tree, and exports
# PKG_CONFIG_PATH, CMAKE_PREFIX_PATH, CMAKE_LIBRARY_PATH, CMAKE_INCLUDE_PATH, LD_LIBRARY_PATH,
# LIBRARY_PATH, CPATH and PATH so that `cmake -S . -B build-gpu` finds them. Safe to source twice.

msh_env_main() {
  local here debs d f l target arch=x86_64-linux-gnu
  here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  debs=${1:-$here/.carry/debs}
  d=${MSH_DEPS:-/opt/msh-deps}
  if [ ! -f "$d/.unpacked" ]; then
    if ! ls "$debs"/*.deb > /dev/null 2>&1; then
      echo "gpu_env: no .deb files in $debs" >&2
      return 1
    fi
    mkdir -p "$d" || return 1
    for f in "$debs"/*.deb; do
      dpkg-deb -x "$f" "$d" || { echo "gpu_env: cannot unpack $f" >&2; return 1; }
    done
    # pkg-config files name /usr: point every variable that starts there at the unpacked tree
    find "$d" -name '*.pc' -exec sed -i -E "s#^([A-Za-z_][A-Za-z0-9_]*)=/usr#\\1=$d/usr#" {} +
    # absolute symlinks (libtinfo.so -> /lib/...) into the tree
    find "$d" -type l -lname '/*' | while read -r l; do
      target=$(readlink "$l")
      [ -e "$d$target" ] && ln -sfn "$d$target" "$l"
    done
    touch "$d/.unpacked"
  fi
  local libs="$d/usr/lib/$arch:$d/lib/$arch:$d/usr/lib/$arch/openblas-pthread:$d/usr/lib"
  export MSH_DEPS="$d"
  export PKG_CONFIG_PATH="$d/usr/lib/$arch/pkgconfig:$d/usr/share/pkgconfig:$d/usr/lib/$arch/openblas-pthread/pkgconfig${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}"
  export CMAKE_PREFIX_PATH="$d/usr${CMAKE_PREFIX_PATH:+:$CMAKE_PREFIX_PATH}"
  export CMAKE_LIBRARY_PATH="$libs${CMAKE_LIBRARY_PATH:+:$CMAKE_LIBRARY_PATH}"
  export CMAKE_INCLUDE_PATH="$d/usr/include/$arch/openblas-pthread:$d/usr/include/lua5.1:$d/usr/include/$arch:$d/usr/include${CMAKE_INCLUDE_PATH:+:$CMAKE_INCLUDE_PATH}"
  export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export LIBRARY_PATH="$libs${LIBRARY_PATH:+:$LIBRARY_PATH}"
  export CPATH="$d/usr/include/luajit-2.1${CPATH:+:$CPATH}"
  # the machine's own tools first; ours (luajit, pkg-config) fill the gaps
  export PATH="$PATH:$d/usr/bin"
  # Lua modules of the carried packages (busted and its helpers, cjson) for the moonshard host
  export LUA_PATH="$d/usr/share/lua/5.1/?.lua;$d/usr/share/lua/5.1/?/init.lua;;"
  export LUA_CPATH="$d/usr/lib/$arch/lua/5.1/?.so;;"
  if ! command -v pkg-config > /dev/null 2>&1; then
    echo "gpu_env: no pkg-config found" >&2
    return 1
  fi
  return 0
}

msh_env_main "$@"
