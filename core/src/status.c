/* status.c: thread-local error messages, status names, version. */
#include "internal.h"

#include <stdio.h>
#include <string.h>

static _Thread_local char last_error[1024];

msh_status msh_fail_at(msh_status s, const char *file, int line, const char *func,
                       const char *fmt, ...) {
  char msg[768];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  const char *base = strrchr(file, '/');
  snprintf(last_error, sizeof last_error, "%s: %s (%s:%d)", func, msg, base ? base + 1 : file,
           line);
  return s;
}

const char *msh_last_error(void) { return last_error; }

void msh_clear_error(void) { last_error[0] = '\0'; }

const char *msh_status_name(msh_status s) {
  switch (s) {
  case MSH_OK: return "OK";
  case MSH_EINVAL: return "EINVAL";
  case MSH_ENOMEM: return "ENOMEM";
  case MSH_EIO: return "EIO";
  case MSH_EFORMAT: return "EFORMAT";
  case MSH_ERANGE: return "ERANGE";
  case MSH_EUNSUPPORTED: return "EUNSUPPORTED";
  case MSH_EDEVICE: return "EDEVICE";
  case MSH_ENOENT: return "ENOENT";
  default: return "EUNKNOWN";
  }
}

const char *msh_version(void) { return MSH_VERSION; }
