#!/usr/bin/env bash
# tools/gpu_carry.sh: fill .carry/ (git-ignored) with what a lent GPU machine lacks, so that
# tools/gpu_check.sh runs there with no package registry: the .deb files of moonshard's build
# and test dependencies (downloaded, not installed) and a copy of ../shared/data.
#
#   bash tools/gpu_carry.sh        (on a Debian machine that reaches Debian's registry)
#
# Then carry .carry with the checkout and run `bash tools/gpu_check.sh` there.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
mkdir -p .carry/debs
# the packages of run.sh's DEPS that the GPU machines lack, with their library dependencies;
# the C library, compilers and cmake are the machine's own
pkgs=(luajit libluajit-5.1-2 libluajit-5.1-common libluajit-5.1-dev
      libuv1 libuv1-dev lua-luv lua-luv-dev lua-cjson libcjson1 libcjson-dev
      libedit2 libedit-dev libbsd0 libbsd-dev libmd0 libmd-dev libncurses-dev libncurses6
      libncursesw6 libtinfo6 libtinfo-dev
      libopenblas0 libopenblas0-pthread libopenblas-pthread-dev libopenblas-dev libgfortran5
      libquadmath0
      libpcre2-8-0 libpcre2-16-0 libpcre2-32-0 libpcre2-posix3 libpcre2-dev
      libhttp-parser2.9 libhttp-parser-dev
      liburing2 liburing-dev
      libhwloc15 libhwloc-dev libnuma1 libnuma-dev libltdl7 libltdl-dev libudev1
      pkgconf pkgconf-bin libpkgconf3
      lua-busted lua-cliargs lua-dkjson lua-filesystem lua-luassert lua-mediator lua-penlight
      lua-say lua-system lua-term)
(cd .carry/debs && apt-get download "${pkgs[@]}" > /dev/null)
echo "gpu_carry: $(ls .carry/debs/*.deb | wc -l) packages in .carry/debs"
if [ -d ../shared/data ]; then
  rm -rf .carry/data
  cp -r "$(realpath ../shared/data)" .carry/data
  echo "gpu_carry: ../shared/data copied to .carry/data ($(du -sh .carry/data | cut -f1))"
fi
