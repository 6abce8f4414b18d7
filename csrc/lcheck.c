/*
** lcheck.c: range checks for the numbers that cross from Lua into C (see
** lcheck.h). A binding file: it includes the Lua headers and raises with
** luaL_error. No state.
**
** A number is accepted only when it is an exact integer within [lo, hi];
** the comparison is made on the double before any cast, because casting
** a double outside int64_t's range (2^63, 1e300, inf, NaN) is undefined.
** On Lua 5.3+ an integer subtype is read as it is.
*/
#include <math.h>
#include <stdio.h>

#include "lcheck.h"

int buzz__to_int(lua_State *L, int idx, int64_t lo, int64_t hi,
                 int64_t *out) {
  lua_Number d;
  if (lua_type(L, idx) != LUA_TNUMBER) return 0;
#if LUA_VERSION_NUM >= 503
  if (lua_isinteger(L, idx)) {
    lua_Integer i = lua_tointeger(L, idx);
    if (i < lo || i > hi) return 0;
    *out = (int64_t)i;
    return 1;
  }
#endif
  d = lua_tonumber(L, idx);
  /* -2^63 <= d < 2^63 holds for no NaN: the cast below is defined */
  if (!(d >= -9223372036854775808.0 && d < 9223372036854775808.0) ||
      d != floor(d))
    return 0;
  if ((int64_t)d < lo || (int64_t)d > hi) return 0;
  *out = (int64_t)d;
  return 1;
}

/* Pushes the value at idx as a message shows it: numbers with %.14g, NaN
** as NaN, strings quoted, anything else by its type name. */
static void push_shown(lua_State *L, int idx) {
  if (lua_type(L, idx) == LUA_TNUMBER) {
    lua_Number d = lua_tonumber(L, idx);
    if (d != d) {
      lua_pushliteral(L, "NaN");
    } else {
#if LUA_VERSION_NUM >= 503
      if (lua_isinteger(L, idx)) {
        lua_pushfstring(L, "%I", (LUAI_UACINT)lua_tointeger(L, idx));
        return;
      }
#endif
      lua_pushfstring(L, "%f", d);     /* "%.14g" in Lua's own format */
    }
  } else if (lua_type(L, idx) == LUA_TSTRING) {
    lua_pushfstring(L, "\"%s\"", lua_tostring(L, idx));
  } else {
    lua_pushstring(L, luaL_typename(L, idx));
  }
}

/* Pushes "name: expected an integer from lo to hi, got v". */
static const char *push_range_msg(lua_State *L, int idx, const char *name,
                                  int64_t lo, int64_t hi) {
  char range[64];
  int top = lua_gettop(L);
  idx = buzz_absindex(L, idx);
  snprintf(range, sizeof range, "%lld to %lld", (long long)lo,
           (long long)hi);
  lua_pushfstring(L, "%s: expected an integer from %s, got ", name, range);
  push_shown(L, idx);
  lua_concat(L, lua_gettop(L) - top);
  return lua_tostring(L, -1);
}

int64_t buzz__check_int(lua_State *L, int arg, const char *name, int64_t lo,
                        int64_t hi) {
  int64_t v = 0;
  if (!buzz__to_int(L, arg, lo, hi, &v))
    luaL_argerror(L, arg, push_range_msg(L, arg, name, lo, hi));
  return v;
}

int64_t buzz__opt_int(lua_State *L, int arg, const char *name, int64_t def,
                      int64_t lo, int64_t hi) {
  if (lua_isnoneornil(L, arg)) return def;
  return buzz__check_int(L, arg, name, lo, hi);
}

int64_t buzz__field_int(lua_State *L, int t, const char *k, int64_t def,
                        int64_t lo, int64_t hi) {
  int64_t v = def;
  t = buzz_absindex(L, t);
  lua_getfield(L, t, k);
  if (!lua_isnil(L, -1) && !buzz__to_int(L, -1, lo, hi, &v)) {
    lua_pushliteral(L, "bad option ");
    lua_pushfstring(L, "\"%s\"", k);
    lua_concat(L, 2);
    push_range_msg(L, -2, lua_tostring(L, -1), lo, hi);
    luaL_error(L, "%s", lua_tostring(L, -1));
  }
  lua_pop(L, 1);
  return v;
}
