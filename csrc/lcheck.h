/*
** lcheck.h: range checks for the numbers that cross from Lua into C.
**
** Every number the binding turns into a C integer goes through one of
** these first: a Lua number may be a float (2^63, 1e300, 0.5, NaN, inf),
** and casting one that is out of range is undefined behaviour in C (and
** what lua_tointeger does on LuaJIT). The checks accept a number only when
** it is an exact integer within [lo, hi]; then the cast is defined.
** Only the binding files (l*.c) include this header.
*/
#ifndef BUZZ_LCHECK_H
#define BUZZ_LCHECK_H

#include <stdint.h>

#include "compat.h"

#if defined(__GNUC__) && !defined(_WIN32)
#pragma GCC visibility push(hidden)
#endif

/* The largest integer a double holds exactly, and JSON carries: 2^53. */
#define BUZZ_INT_EXACT INT64_C(9007199254740992)

/*
** Is the value at idx a number that is an exact integer within [lo, hi]?
** If so, sets *out and returns 1; else returns 0 and leaves *out alone.
** A string is not a number here, even "3". Never raises.
*/
int buzz__to_int(lua_State *L, int idx, int64_t lo, int64_t hi,
                 int64_t *out);

/*
** The integer at argument arg, within [lo, hi]; raises 'bad argument #arg
** to 'f' (name: expected an integer from lo to hi, got v)' otherwise.
** buzz__opt_int gives def for none or nil.
*/
int64_t buzz__check_int(lua_State *L, int arg, const char *name, int64_t lo,
                        int64_t hi);
int64_t buzz__opt_int(lua_State *L, int arg, const char *name, int64_t def,
                      int64_t lo, int64_t hi);

/*
** Field k of the table at t as an integer within [lo, hi], or def when it
** is nil; raises 'bad option "k": expected an integer from lo to hi, got
** v' otherwise. Leaves the stack as it found it.
*/
int64_t buzz__field_int(lua_State *L, int t, const char *k, int64_t def,
                        int64_t lo, int64_t hi);

#if defined(__GNUC__) && !defined(_WIN32)
#pragma GCC visibility pop
#endif

#endif
