/*
** json.c: Lua values to JSON text and back, with cJSON.
**
** The event store keeps payloads and headers as JSON, so this file refuses
** anything JSON cannot hold exactly rather than guess:
**   - tables are arrays when their keys are exactly 1..n, objects when all
**     keys are strings; {} is an object. Mixed tables, arrays with holes,
**     other keys, cycles and nesting deeper than 1000 are refused;
**   - integers are written exactly and refused beyond 2^53 - 1 (readers
**     hold JSON numbers as doubles, and 2^53 + 1 reads as 2^53: the range
**     is JavaScript's safe integers); other numbers are written in the
**     shortest form that reads back as the same double; NaN and inf are
**     refused. Decoding gives integers for integral numbers in that range
**     (on LuaJIT, numbers anyway) and floats for the rest, -0 included;
**   - strings pass through byte for byte, but a NUL byte is refused (cJSON
**     strings end at NUL), and so is \u0000 when decoding;
**   - the light userdata NULL (core.null) is JSON null. Decoding gives it
**     back in arrays, so [1,null,3] keeps its length; in objects a null
**     member is simply absent, and a null text decodes to nil.
** Error messages name the path of the bad value from the root name the
** caller gives: 'payload.items[3].cb: functions cannot be encoded as JSON'.
**
** Files: json.c (this: the box, the integer printer, the Lua API),
** jsonenc.c (Lua to JSON), jsondec.c (JSON to Lua), jsonint.h between
** them.
**
** Both directions build a cJSON tree. cJSON's own number printer is not
** exact (it accepts %1.15g when it is within an epsilon, so 0.1 + 0.2
** prints as 0.3), so numbers go into the tree as raw text written here.
** Measured on a small payload, the tree costs about 1.6x a writer straight
** into a Lua buffer; the issue asks for cJSON and that is under the 2x we
** allowed, so the tree stays. While it grows, the encoder counts the
** bytes it will print as, exactly (cJSON's escapes), and stops at the
** caller's limit: a value far above it (a table holding the same table
** twice at each of 30 levels is gigabytes of text) is refused after at
** most the limit's worth of tree, and the count sizes the print buffer.
** Nesting deeper than 1000 levels is refused as it is reached.
**
** Memory: a cJSON tree and a printed text are malloc'd. While a call holds
** them they are owned by a "box" userdata on the Lua stack whose __gc frees
** them, so a Lua memory error raised meanwhile leaks nothing. The box is
** reused through the registry; a call that finds it busy (a __gc
** metamethod run by the collector may call json_encode from inside
** another call) or left busy by a raise makes a fresh one and registers
** that instead. The tree is freed before an error message is built.
**
** Not done: key order of objects follows next(), so equal tables may
** print their keys in different orders; metatables are ignored (no
** __tojson); an empty table cannot be told from an empty array. cJSON's
** parser is lax in a few places (it reads 01, 1. and raw control bytes
** inside strings); duplicate keys: the last one wins.
*/
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "jsonint.h"

#define BOX_MT  "buzz.json_box"


/* ---------------------------------------------------------------- box */


/* The registry key of the shared box: its address is unique. */
static const char box_key = 0;

/* Frees what the box owns. Never raises. */
void buzz__json_box_drop(json_box *b) {
  if (b->tree != NULL) {
    cJSON_Delete(b->tree);
    b->tree = NULL;
  }
  if (b->text != NULL) {
    if (b->text != b->small) cJSON_free(b->text);
    b->text = NULL;
  }
}

static int box_gc(lua_State *L) {
  buzz__json_box_drop((json_box *)lua_touserdata(L, 1));
  return 0;
}

/*
** Pushes a box for one call and marks it busy. Reuses the shared box when
** it is idle; otherwise makes a fresh one and registers it in its place
** (a busy box is either in use further down the C stack, where its caller
** keeps it on the Lua stack, or was left busy by a raise and will be
** collected). Raises only on memory errors.
*/
json_box *buzz__json_box_acquire(lua_State *L) {
  json_box *b;
  lua_pushlightuserdata(L, (void *)&box_key);
  lua_rawget(L, LUA_REGISTRYINDEX);
  b = (json_box *)lua_touserdata(L, -1);
  if (b == NULL || b->busy) {
    lua_pop(L, 1);
    b = (json_box *)buzz_newud(L, sizeof *b);
    b->tree = NULL;
    b->text = NULL;
    b->busy = 0;
    if (luaL_newmetatable(L, BOX_MT)) {
      lua_pushcfunction(L, box_gc);
      lua_setfield(L, -2, "__gc");
    }
    lua_setmetatable(L, -2);
    lua_pushlightuserdata(L, (void *)&box_key);
    lua_pushvalue(L, -2);
    lua_rawset(L, LUA_REGISTRYINDEX);
  }
  b->busy = 1;
  return b;
}

/* Frees what the box owns and lets the next call have it. */
void buzz__json_box_release(json_box *b) {
  buzz__json_box_drop(b);
  b->busy = 0;
}

/*
** Leaves only the value on top of the stack above top: the result or the
** message of a call that pushed a box and maybe scratch values at top + 1.
*/
void buzz__json_settle(lua_State *L, int top) {
  lua_replace(L, top + 1);
  lua_settop(L, top + 1);
}


/* ----------------------------------------------------------- numbers */

/* Writes the decimal digits of v into buf; returns the length. */
int buzz__json_int_text(char *buf, long long v) {
  char tmp[24];
  unsigned long long u = v < 0 ? 0ULL - (unsigned long long)v
                               : (unsigned long long)v;
  int i = 0, n = 0;
  do {
    tmp[i++] = (char)('0' + (int)(u % 10));
    u /= 10;
  } while (u != 0);
  if (v < 0) buf[n++] = '-';
  while (i > 0) buf[n++] = tmp[--i];
  buf[n] = '\0';
  return n;
}

/* ---------------------------------------------------------- Lua API */

/* Returns nil, "CODE: message", "CODE" for the message on top. */
static int push_fail(lua_State *L, int rc) {
  lua_pushnil(L);
  lua_pushfstring(L, "%s: %s", buzz__err_name(rc), lua_tostring(L, -2));
  lua_pushstring(L, buzz__err_name(rc));
  return 3;
}

/* core.json_encode(value [, max]) -> text | nil, message, code */
static int ljson_encode(lua_State *L) {
  lua_Integer max;
  int rc;
  luaL_checkany(L, 1);
  max = luaL_optinteger(L, 2, 0);
  luaL_argcheck(L, max >= 0, 2, "max must be >= 0 bytes (0 = no limit)");
  rc = buzz__json_encode(L, 1, "value", (size_t)max);
  return rc == 0 ? 1 : push_fail(L, rc);
}

/* core.json_canonical(value) -> text with sorted keys | nil, message,
** code */
static int ljson_canonical(lua_State *L) {
  int rc;
  luaL_checkany(L, 1);
  rc = buzz__json_canonical(L, 1, "value");
  return rc == 0 ? 1 : push_fail(L, rc);
}

/*
** Bytes of the UTF-8 character at s (n > 0 bytes left, s[0] >= 0x80), or
** 0 when they are not one (RFC 3629: no overlong forms, no surrogates,
** nothing above U+10FFFF).
*/
static size_t utf8_char(const unsigned char *s, size_t n) {
  unsigned char c = s[0], lo = 0x80, hi = 0xBF;
  size_t len, i;
  if (c >= 0xC2 && c <= 0xDF) len = 2;
  else if (c >= 0xE0 && c <= 0xEF) len = 3;
  else if (c >= 0xF0 && c <= 0xF4) len = 4;
  else return 0;
  if (c == 0xE0) lo = 0xA0;
  else if (c == 0xED) hi = 0x9F;
  else if (c == 0xF0) lo = 0x90;
  else if (c == 0xF4) hi = 0x8F;
  if (n < len || s[1] < lo || s[1] > hi) return 0;
  for (i = 2; i < len; i++)
    if (s[i] < 0x80 || s[i] > 0xBF) return 0;
  return len;
}

/*
** core.json_text(s [, limit]) -> s as text JSON (and every reader of it)
** can hold: a NUL byte as \0, each byte that is not part of a UTF-8
** character as \xHH, and, past limit bytes (default 65536; 0: none),
** cut there with "... [truncated N bytes]" (N: the bytes of s left out;
** never inside a character or an escape). Text that needs none of it is
** returned as it is. For error text a store must always be able to keep
** (lua/buzz/storable.lua); a C loop, as a Lua pattern costs ~200
** instructions a byte.
*/
static int ljson_text(lua_State *L) {
  size_t n, i = 0, out = 0, limit;
  const unsigned char *s = (const unsigned char *)luaL_checklstring(L, 1, &n);
  lua_Integer lim = luaL_optinteger(L, 2, 65536);
  luaL_Buffer b;
  luaL_argcheck(L, lim >= 0, 2, "limit must be >= 0 bytes (0 = no limit)");
  limit = lim == 0 ? (size_t)-1 : (size_t)lim;
  while (i < n && s[i] != 0) {                 /* the clean prefix */
    size_t w = s[i] < 0x80 ? 1 : utf8_char(s + i, n - i);
    if (w == 0) break;
    i += w;
  }
  if (i == n && n <= limit) {
    lua_settop(L, 1);
    return 1;
  }
  luaL_buffinit(L, &b);
  i = 0;
  while (i < n) {
    char esc[8];
    size_t w = s[i] < 0x80 ? 1 : utf8_char(s + i, n - i);
    const char *piece = (const char *)s + i;
    size_t len = w;
    if (s[i] == 0) {
      piece = "\\0";
      w = 1;
      len = 2;
    } else if (w == 0) {
      snprintf(esc, sizeof esc, "\\x%02X", s[i]);
      piece = esc;
      w = 1;
      len = 4;
    }
    if (out + len > limit) break;
    luaL_addlstring(&b, piece, len);
    out += len;
    i += w;
  }
  if (i < n) {
    char mark[64];
    snprintf(mark, sizeof mark, "... [truncated %lu bytes]",
             (unsigned long)(n - i));
    luaL_addstring(&b, mark);
  }
  luaL_pushresult(&b);
  return 1;
}

/* core.json_decode(text) -> value | nil, message, "EINVAL" */
static int ljson_decode(lua_State *L) {
  size_t len;
  const char *s = luaL_checklstring(L, 1, &len);
  int rc = buzz__json_decode(L, s, len);
  return rc == 0 ? 1 : push_fail(L, rc);
}

void buzz__json_register(lua_State *L) {
  lua_pushcfunction(L, ljson_encode);
  lua_setfield(L, -2, "json_encode");
  lua_pushcfunction(L, ljson_canonical);
  lua_setfield(L, -2, "json_canonical");
  lua_pushcfunction(L, ljson_decode);
  lua_setfield(L, -2, "json_decode");
  lua_pushcfunction(L, ljson_text);
  lua_setfield(L, -2, "json_text");
  lua_pushlightuserdata(L, NULL);
  lua_setfield(L, -2, "null");
}
