/* main.c: the moonshard host. Embeds LuaJIT, opens luv on this process's libuv loop, and hands
 * the command line to lua/moonshard/cli.lua, which runs a script, a command from scripts/, an
 * expression or the REPL. When the script returns 0, the loop runs until no handle is left; after
 * an error (a non-zero code) the loop is not run again: every handle still open is closed and the
 * process exits with that code, so a live timer, signal or socket cannot keep a failed run alive. */
#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>
#include <luv/luv.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <uv.h>

#include "moonshard.h"

static int traceback(lua_State *L) {
  const char *msg = lua_tostring(L, 1);
  if (!msg) msg = "(error object is not a string)";
  luaL_traceback(L, L, msg, 1);
  return 1;
}

/* package.path: $MOONSHARD_LUA_PATH first, then the source tree's lua/ and the build's binding. */
static void set_paths(lua_State *L) {
  const char *extra = getenv("MOONSHARD_LUA_PATH");
  lua_getglobal(L, "package");
  lua_pushfstring(L, "%s%s" MSH_SOURCE_LUA "/?.lua;" MSH_SOURCE_LUA "/?/init.lua;" MSH_GEN_LUA
                     "/?.lua;",
                  extra ? extra : "", extra ? ";" : "");
  lua_getfield(L, -2, "path");
  lua_concat(L, 2);
  lua_setfield(L, -2, "path");
  lua_pop(L, 1);
}

/* package.loaded["moonshard.host"] = { root, scripts, version, exe } */
static void set_host_info(lua_State *L) {
  lua_getglobal(L, "package");
  lua_getfield(L, -1, "loaded");
  lua_newtable(L);
  const char *scripts = getenv("MOONSHARD_SCRIPTS");
  lua_pushstring(L, MSH_ROOT);
  lua_setfield(L, -2, "root");
  lua_pushstring(L, scripts ? scripts : MSH_SCRIPTS);
  lua_setfield(L, -2, "scripts");
  lua_pushstring(L, MSH_VERSION);
  lua_setfield(L, -2, "version");
  char exe[4096];
  ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
  if (n > 0) {
    exe[n] = '\0';
    lua_pushstring(L, exe);
    lua_setfield(L, -2, "exe");
  }
  lua_setfield(L, -2, "moonshard.host");
  lua_pop(L, 2);
}

static void close_handle(uv_handle_t *h, void *arg) {
  (void)arg;
  if (!uv_is_closing(h)) uv_close(h, NULL);
}

/* Closes every handle left on the loop and runs it once so the close callbacks finish. */
static void close_all(uv_loop_t *loop) {
  uv_walk(loop, close_handle, NULL);
  uv_run(loop, UV_RUN_NOWAIT);
}

static void open_luv(lua_State *L, uv_loop_t *loop) {
  lua_getglobal(L, "package");
  lua_getfield(L, -1, "loaded");
  luv_set_loop(L, loop);
  luaopen_luv(L);
  lua_setfield(L, -2, "luv");
  lua_pop(L, 2);
}

/* OpenMP threads that spin while waiting lose whole time slices on a loaded machine (a worker
 * descheduled at a join stalls every op). The OpenMP runtime reads its wait policy when the
 * library loads, before main, so the host sets a passive policy and starts itself again once.
 * Passive alone puts workers to sleep at once, and waking them costs tens of microseconds per
 * op, which a decode step of a small model (hundreds of ops of 5-50 us) cannot afford: libgomp
 * spins GOMP_SPINCOUNT times (about 0.1 ms here) before sleeping, so workers stay awake between
 * the ops of a step and still sleep between steps and under load. */
static void ensure_passive_wait(char **argv) {
  if (getenv("OMP_WAIT_POLICY")) return;
  setenv("OMP_WAIT_POLICY", "passive", 1);
  if (!getenv("GOMP_SPINCOUNT")) setenv("GOMP_SPINCOUNT", "10000", 1);
  execv("/proc/self/exe", argv);
  /* exec failed: carry on with the default policy */
}

int main(int argc, char **argv) {
  ensure_passive_wait(argv);
  lua_State *L = luaL_newstate();
  if (!L) {
    fprintf(stderr, "moonshard: cannot create a Lua state (out of memory)\n");
    return 1;
  }
  luaL_openlibs(L);
  set_paths(L);
  set_host_info(L);
  uv_loop_t *loop = uv_default_loop();
  open_luv(L, loop);

  /* arg table as the standalone interpreter builds it: arg[0] is the program */
  lua_createtable(L, argc, 1);
  for (int i = 0; i < argc; i++) {
    lua_pushstring(L, argv[i]);
    lua_rawseti(L, -2, i);
  }
  lua_setglobal(L, "arg");

  int code = 0;
  lua_pushcfunction(L, traceback);
  lua_getglobal(L, "require");
  lua_pushstring(L, "moonshard.cli");
  if (lua_pcall(L, 1, 1, -3) != 0) {
    fprintf(stderr, "moonshard: %s\n", lua_tostring(L, -1));
    lua_close(L);
    return 1;
  }
  lua_getfield(L, -1, "main");
  lua_remove(L, -2);
  lua_getglobal(L, "arg");
  if (lua_pcall(L, 1, 1, -3) != 0) {
    fprintf(stderr, "moonshard: %s\n", lua_tostring(L, -1));
    code = 1;
  } else {
    code = (int)lua_tointeger(L, -1);
    /* run what the script left on the loop (servers, timers) until nothing is active; a script
     * that failed gets no more loop time (its handles would keep the process alive) */
    if (code == 0) uv_run(loop, UV_RUN_DEFAULT);
  }
  fflush(stdout);
  if (code == 0 && ferror(stdout)) {
    fprintf(stderr, "moonshard: error writing to stdout\n");
    code = 1;
  }
  /* luv's handles are closed while the Lua state that anchors their callbacks is alive: after a
   * failure every handle, after a success those left unreferenced (listeners that did not keep
   * the loop alive); through luv, whose close callbacks free what it keeps per handle */
  if (luaL_dostring(L, "local uv = require 'luv'\n"
                       "uv.walk(function(h) if not h:is_closing() then h:close() end end)\n"
                       "uv.run('nowait')") != 0) {
    lua_pop(L, 1);
    close_all(loop);
  } else if (code != 0) {
    close_all(loop);
  }
  lua_close(L);
  uv_loop_close(loop);
  return code;
}
