/*
** fuzz/json.c: libFuzzer harness for csrc/json.c (Lua values <-> JSON).
**
** Every input is used twice:
**   1. as JSON text: if buzz__json_decode accepts it, the value must
**      encode, the text must decode to an equal value (same types, integer
**      or float subtype, the sign of zero), and encoding that value again
**      must give the same text unless an object with two or more keys
**      makes the key order next()'s choice. A refusal must be EINVAL with
**      a message.
**   2. as a program that builds a Lua value (build() below): the builder
**      knows whether JSON can hold what it built, and buzz__json_encode
**      must agree (EINVAL with a message naming "value" otherwise). What
**      encodes must decode to the same value, up to what JSON cannot tell
**      apart (an integral float reads back as an integer; a null member
**      of an object reads back absent), and the max argument must refuse
**      exactly the texts longer than it (ETOOBIG).
** Any disagreement aborts. One lua_State (liblua5.4) serves every input.
*/
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../csrc/json.h"

#define BUILD_DEPTH 24           /* nesting of ordinary containers */
#define JSON_LEVELS 1000         /* json.c's and cJSON's limit */
#define SAFE_INT    9007199254740991LL

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const unsigned char *data, size_t size);

static lua_State *L;

static void fail(const char *what, const char *detail) {
  fprintf(stderr, "json fuzz: %s\n%.400s\n", what, detail ? detail : "");
  abort();
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  (void)argc;
  (void)argv;
  L = luaL_newstate();
  if (L == NULL) fail("no lua_State", NULL);
  return 0;
}


/* --------------------------------------------------------- equality */

static int is_null(int idx) {
  return lua_type(L, idx) == LUA_TLIGHTUSERDATA &&
         lua_touserdata(L, idx) == NULL;
}

/*
** Are the values at a and b (absolute) equal? strict: same number
** subtypes and the same sign of zero. Otherwise numbers compare by value
** and a null member of a's objects must be absent from b's.
*/
static int equal(int a, int b, int strict) {
  int t = lua_type(L, a);
  if (t != lua_type(L, b)) return 0;
  switch (t) {
    case LUA_TNIL:
      return 1;
    case LUA_TBOOLEAN:
      return lua_toboolean(L, a) == lua_toboolean(L, b);
    case LUA_TNUMBER:
      if (strict) {
        if (lua_isinteger(L, a) != lua_isinteger(L, b)) return 0;
        if (!lua_isinteger(L, a) &&
            signbit(lua_tonumber(L, a)) != signbit(lua_tonumber(L, b)))
          return 0;
      }
      return lua_compare(L, a, b, LUA_OPEQ);
    case LUA_TSTRING:
    case LUA_TLIGHTUSERDATA:
      return lua_rawequal(L, a, b);
    case LUA_TTABLE: {
      lua_Integer na = 0, nb = 0;
      int ok = 1;
      luaL_checkstack(L, 4, NULL);
      lua_pushnil(L);
      while (ok && lua_next(L, a)) {            /* key -2, value -1 */
        int top = lua_gettop(L);
        lua_pushvalue(L, -2);
        lua_rawget(L, b);
        if (!strict && is_null(top) && lua_type(L, top - 1) == LUA_TSTRING) {
          ok = lua_isnil(L, -1);                /* null member: absent */
        } else {
          ok = equal(top, lua_gettop(L), strict);
          na++;
        }
        lua_settop(L, top - 1);
      }
      if (!ok) {
        lua_pop(L, 2);
        return 0;
      }
      lua_pushnil(L);
      while (lua_next(L, b)) {
        nb++;
        lua_pop(L, 1);
      }
      return na == nb;
    }
    default:
      return 0;
  }
}

/* Does the value at idx hold an object with two or more keys? */
static int has_key_order(int idx) {
  int n = 0, found = 0, is_object = 0;
  if (lua_type(L, idx) != LUA_TTABLE) return 0;
  luaL_checkstack(L, 3, NULL);
  lua_pushnil(L);
  while (lua_next(L, idx)) {
    n++;
    if (lua_type(L, -2) == LUA_TSTRING) is_object = 1;
    if (!found) found = has_key_order(lua_gettop(L));
    lua_pop(L, 1);
  }
  return found || (is_object && n >= 2);
}


/* ------------------------------------------- 1: decode, encode, decode */

static void round_trip_text(const char *s, size_t len) {
  int top = lua_gettop(L), v1, v2;
  size_t n1, n2;
  const char *t1, *t2;
  int rc = buzz__json_decode(L, s, len);
  if (lua_gettop(L) != top + 1) fail("decode pushed other than one value", 0);
  if (rc != 0) {
    if (rc != BUZZ_EINVAL || lua_type(L, -1) != LUA_TSTRING)
      fail("decode failed without EINVAL and a message", NULL);
    lua_settop(L, top);
    return;
  }
  v1 = lua_gettop(L);
  if (buzz__json_encode(L, v1, "value", 0) != 0)
    fail("a decoded value does not encode", lua_tostring(L, -1));
  t1 = lua_tolstring(L, -1, &n1);
  if (buzz__json_decode(L, t1, n1) != 0)
    fail("an encoded text does not decode", t1);
  v2 = lua_gettop(L);
  if (!equal(v1, v2, 1)) fail("decode(encode(v)) differs from v", t1);
  if (buzz__json_encode(L, v2, "value", 0) != 0)
    fail("a value decoded twice does not encode", lua_tostring(L, -1));
  t2 = lua_tolstring(L, -1, &n2);
  if ((n1 != n2 || memcmp(t1, t2, n1) != 0) && !has_key_order(v1)) {
    fprintf(stderr, "first:  %s\nsecond: %s\n", t1, t2);
    fail("a second encoding differs from the first", NULL);
  }
  lua_settop(L, top);
}


/* ------------------------------------------- 2: build, encode, decode */

typedef struct reader {
  const unsigned char *p;
  size_t n, i;
  int is_deep_done;              /* one deep nest per input: they are slow */
} reader;

static unsigned byte(reader *r) {
  return r->i < r->n ? r->p[r->i++] : 0;
}

static uint64_t bytes8(reader *r) {
  uint64_t u = 0;
  int k;
  for (k = 0; k < 8; k++) u = (u << 8) | byte(r);
  return u;
}

/* Pushes a string of up to 31 bytes from r; 0 if it holds a NUL byte. */
static int build_string(reader *r) {
  size_t len = byte(r) % 32, k;
  char buf[32];
  for (k = 0; k < len; k++) buf[k] = (char)byte(r);
  lua_pushlstring(L, buf, len);
  return memchr(buf, '\0', len) == NULL;
}

static int dummy_function(lua_State *co) {
  (void)co;
  return 0;
}

/*
** Pushes a value read from r at nesting depth (0 = the root). Returns 1
** if JSON can hold it, else 0.
*/
static int build(reader *r, int depth, int in_container) {
  unsigned op = byte(r) % 13;
  luaL_checkstack(L, 4, NULL);
  if (depth >= BUILD_DEPTH && (op == 6 || op == 7 || op >= 10)) op = 2;
  if (op == 12) {          /* deep nests are slow (json.c's cycle check is
                              quadratic in depth): rare, one per input */
    if (r->is_deep_done || byte(r) != 0xDE) op = 6;
    r->is_deep_done = 1;
  }
  switch (op) {
    case 0:                                  /* null, nil at the root */
    case 8:
      if (in_container || op == 8) lua_pushlightuserdata(L, NULL);
      else lua_pushnil(L);
      return 1;
    case 1:
      lua_pushboolean(L, byte(r) & 1);
      return 1;
    case 2:
      lua_pushinteger(L, (signed char)byte(r));
      return 1;
    case 3: {
      int64_t i = (int64_t)bytes8(r);
      lua_pushinteger(L, (lua_Integer)i);
      return i >= -SAFE_INT && i <= SAFE_INT;
    }
    case 4: {
      uint64_t u = bytes8(r);
      double d;
      memcpy(&d, &u, sizeof d);
      lua_pushnumber(L, d);
      return isfinite(d);
    }
    case 5:
      return build_string(r);
    case 6: {                                /* an array */
      unsigned n = byte(r) % 8, k;
      int ok = 1;
      lua_createtable(L, (int)n, 0);
      for (k = 1; k <= n; k++) {
        ok &= build(r, depth + 1, 1);
        lua_rawseti(L, -2, k);
      }
      return ok;
    }
    case 7: {                                /* an object */
      unsigned n = byte(r) % 8, k;
      int ok = 1;
      lua_createtable(L, 0, (int)n);
      for (k = 0; k < n; k++) {
        int key_ok = build_string(r);
        int val_ok = build(r, depth + 1, 1);
        lua_pushvalue(L, -2);
        lua_rawget(L, -4);
        if (lua_isnil(L, -1)) {              /* a repeated key: skipped */
          lua_pop(L, 1);
          lua_rawset(L, -3);
          ok &= key_ok & val_ok;
        } else {
          lua_pop(L, 3);
        }
      }
      return ok;
    }
    case 9:
      lua_pushcfunction(L, dummy_function);
      return 0;
    case 10:                                 /* a cycle */
      lua_newtable(L);
      lua_pushvalue(L, -1);
      lua_setfield(L, -2, "self");
      return 0;
    case 11: {                               /* mixed keys, or a hole */
      int is_hole = byte(r) & 1;
      lua_newtable(L);
      lua_pushinteger(L, 1);
      lua_rawseti(L, -2, is_hole ? 2 : 1);
      if (byte(r) & 1) {
        lua_pushinteger(L, 2);
        lua_setfield(L, -2, "k");
        return 0;
      }
      return !is_hole;                       /* { [2] = 1 } has a hole */
    }
    default: {                               /* arrays nested n deep */
      unsigned levels = 1 + (byte(r) | (byte(r) << 8)) % 1100, k;
      lua_newtable(L);
      for (k = 1; k < levels; k++) {
        lua_createtable(L, 1, 0);
        lua_insert(L, -2);
        lua_rawseti(L, -2, 1);
      }
      /* the innermost table sits at depth + levels - 1 */
      return depth + levels - 1 < JSON_LEVELS;
    }
  }
}

static void encode_built(const unsigned char *data, size_t size) {
  reader r = { data, size, 0, 0 };
  int top = lua_gettop(L), v, ok, rc, d;
  size_t n;
  const char *text;
  ok = build(&r, 0, 0);
  v = lua_gettop(L);
  rc = buzz__json_encode(L, v, "value", 0);
  if (lua_gettop(L) != v + 1) fail("encode pushed other than one value", 0);
  if (!ok) {
    const char *msg = lua_tostring(L, -1);
    if (rc == 0) fail("encoded what JSON cannot hold", msg);
    if (rc != BUZZ_EINVAL || msg == NULL || strncmp(msg, "value", 5) != 0)
      fail("a refusal is not EINVAL with a message naming the value", msg);
    lua_settop(L, top);
    return;
  }
  if (rc != 0) fail("refused a value JSON can hold", lua_tostring(L, -1));
  text = lua_tolstring(L, -1, &n);
  if (buzz__json_decode(L, text, n) != 0) fail("its text does not decode", text);
  d = lua_gettop(L);
  if (!(is_null(v) ? lua_isnil(L, d) : equal(v, d, 0)))
    fail("decode(encode(v)) differs from v", text);
  lua_pop(L, 1);
  /* the limit: n bytes pass, n - 1 are refused */
  if (buzz__json_encode(L, v, "value", n) != 0)
    fail("refused at a limit of its own length", lua_tostring(L, -1));
  lua_pop(L, 1);
  if (n > 1) {
    rc = buzz__json_encode(L, v, "value", n - 1);
    if (rc != BUZZ_ETOOBIG) fail("not ETOOBIG above the limit", text);
    lua_pop(L, 1);
  }
  lua_settop(L, top);
}

int LLVMFuzzerTestOneInput(const unsigned char *data, size_t size) {
  round_trip_text((const char *)data, size);
  encode_built(data, size);
  lua_settop(L, 0);
  lua_gc(L, LUA_GCCOLLECT, 0);  /* else libFuzzer takes garbage for leaks */
  return 0;
}
