/*
** error.c: names and messages of the BUZZ_E* codes, generated from the one
** list in buzz.h (libuv's UV_ERRNO_MAP), and the engine files' message
** formatter. No state.
*/
#include <stdarg.h>
#include <stdio.h>

#include "buzz.h"

void buzz__set_err(char *err, size_t errlen, const char *fmt, ...) {
  va_list ap;
  if (err == NULL || errlen == 0) return;
  va_start(ap, fmt);
  vsnprintf(err, errlen, fmt, ap);
  va_end(ap);
}

const char *buzz__err_name(int code) {
  switch (code) {
#define BUZZ__GEN_NAME(name, num, msg) case BUZZ_E##name: return "E" #name;
    BUZZ_ERRNO_MAP(BUZZ__GEN_NAME)
#undef BUZZ__GEN_NAME
    default: return "EUNKNOWN";
  }
}

const char *buzz__err_message(int code) {
  switch (code) {
#define BUZZ__GEN_MSG(name, num, msg) case BUZZ_E##name: return msg;
    BUZZ_ERRNO_MAP(BUZZ__GEN_MSG)
#undef BUZZ__GEN_MSG
    default: return "unknown error";
  }
}

int buzz__err_code(size_t i) {
  static const int codes[] = {
#define BUZZ__GEN_CODE(name, num, msg) BUZZ_E##name,
    BUZZ_ERRNO_MAP(BUZZ__GEN_CODE)
#undef BUZZ__GEN_CODE
  };
  return i < sizeof codes / sizeof codes[0] ? codes[i] : 0;
}
