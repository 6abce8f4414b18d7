/*
** jsondec.c: JSON text to Lua values (buzz__json_decode), through cJSON's
** parser. The rules are in json.c's header.
**
** Most texts the store reads back are small and plain (an object of a few
** members, strings without escapes, integers), and for those cJSON's tree
** costs more than the rest of a read: a malloc per node and per string
** and strtod per number. So a text is first tried by a direct reader of
** that plain subset (fast_value), which builds the Lua value straight
** from the text. It gives up, leaving the stack as it found it, at the
** first thing outside the subset: an escape, a control byte, a fraction
** or exponent, more than 15 digits, -0, a leading zero, deep nesting or a
** syntax error. cJSON then reads the whole text, so every error message
** and every lax case stays cJSON's. Both give the same value for every
** text the reader accepts (spec/core/json_spec.lua compares them).
*/
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "jsonint.h"


/* ------------------------------------------------------------- decode */

/*
** Returns the offset of the first \u0000 escape in s, or len. Outside
** strings a backslash is a syntax error anyway, so every backslash starts
** an escape and the one after it is never the start of one.
*/
static size_t find_nul_escape(const char *s, size_t len) {
  const char *p = s, *end = s + len;
  while ((p = memchr(p, '\\', (size_t)(end - p))) != NULL) {
    if (end - p >= 6 && p[1] == 'u' && memcmp(p + 2, "0000", 4) == 0)
      return (size_t)(p - s);
    p += 2;
    if (p >= end) break;
  }
  return len;
}

/* Returns how deep arrays and objects nest at offset at of s. */
static int depth_at(const char *s, size_t at) {
  size_t i;
  int depth = 0, in_string = 0;
  for (i = 0; i < at; i++) {
    char c = s[i];
    if (in_string) {
      if (c == '\\') i++;
      else if (c == '"') in_string = 0;
    } else if (c == '"') {
      in_string = 1;
    } else if (c == '[' || c == '{') {
      depth++;
    } else if (c == ']' || c == '}') {
      depth--;
    }
  }
  return depth;
}

static int is_space(char c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

/* Pushes "invalid JSON at byte offset N near '...': why". */
static void push_syntax_error(lua_State *L, const char *s, size_t len,
                              size_t at, const char *why) {
  char near[64], num[32];
  size_t i, n = 0;
  for (i = at; i < len && i < at + 12; i++) {
    unsigned char c = (unsigned char)s[i];
    if (c >= 0x20 && c < 0x7F && c != '\'') {
      near[n++] = (char)c;
    } else {
      snprintf(near + n, sizeof near - n, "\\x%02X", c);
      n += 4;
    }
  }
  near[n] = '\0';
  buzz__json_int_text(num, (long long)at);
  if (at >= len)
    lua_pushfstring(L, "invalid JSON at byte offset %s (the end): %s", num,
                    why);
  else
    lua_pushfstring(L, "invalid JSON at byte offset %s near '%s%s': %s",
                    num, near, i < len ? "..." : "", why);
}

/*
** Pushes the Lua value of n: nil for a null at the root, core.null for
** one in an array. Uses 3 stack slots per level, checked per array or
** object (a scalar takes the slot its container checked, or at the root
** one of buzz__json_decode's); cJSON's parser allows JSON_MAX_DEPTH
** levels. Tables are made at their final size (cJSON counts the
** children), so none is ever rehashed. Returns 0, or BUZZ_EINVAL with the tree freed
** and a message on top.
*/
static int decode_node(lua_State *L, json_box *box, const cJSON *n) {
  const cJSON *c;
  int rc;
  switch (n->type & 0xFF) {
    case cJSON_NULL:
      if (n == box->tree) lua_pushnil(L);
      else lua_pushlightuserdata(L, NULL);
      return 0;
    case cJSON_False:
      lua_pushboolean(L, 0);
      return 0;
    case cJSON_True:
      lua_pushboolean(L, 1);
      return 0;
    case cJSON_Number: {
      double d = n->valuedouble;
      if (isinf(d)) {
        buzz__json_box_drop(box);
        lua_pushliteral(L, "invalid JSON: a number is out of range "
                        "(beyond +-1.8e308)");
        return BUZZ_EINVAL;
      }
      if (d == floor(d) && fabs(d) <= JSON_MAX_SAFE &&
          !(d == 0 && signbit(d)))
        lua_pushinteger(L, (lua_Integer)d);
      else
        lua_pushnumber(L, (lua_Number)d);
      return 0;
    }
    case cJSON_String:
      lua_pushstring(L, n->valuestring);
      return 0;
    case cJSON_Array: {
      int i = 0;
      luaL_checkstack(L, 3, "json: arrays and objects nest too deeply");
      lua_createtable(L, cJSON_GetArraySize(n), 0);
      for (c = n->child; c != NULL; c = c->next) {
        if ((rc = decode_node(L, box, c)) != 0) return rc;
        lua_rawseti(L, -2, ++i);
      }
      return 0;
    }
    case cJSON_Object:
      luaL_checkstack(L, 3, "json: arrays and objects nest too deeply");
      lua_createtable(L, 0, cJSON_GetArraySize(n));
      for (c = n->child; c != NULL; c = c->next) {
        lua_pushstring(L, c->string);
        if (cJSON_IsNull(c)) lua_pushnil(L);           /* a later dup wins */
        else if ((rc = decode_node(L, box, c)) != 0) return rc;
        lua_rawset(L, -3);
      }
      return 0;
    default:                              /* the parser makes no others */
      buzz__json_box_drop(box);
      lua_pushliteral(L, "invalid JSON: unexpected cJSON node");
      return BUZZ_EINVAL;
  }
}


/* ------------------------------------------------ the plain-text reader */

#define FAST_MAX_DEPTH  32     /* deeper texts go to cJSON */

typedef struct fast_reader {
  const char *p, *end;
} fast_reader;

static void skip_spaces(fast_reader *r) {
  while (r->p < r->end && is_space(*r->p)) r->p++;
}

/* Skips white space; most texts have none, and this test inlines. */
static void fast_skip_space(fast_reader *r) {
  if (r->p < r->end && is_space(*r->p)) skip_spaces(r);
}

/*
** Pushes the string at r->p (just after its opening quote) when it holds
** no escape and no control byte; returns 0, or -1 with nothing pushed.
*/
static int fast_string(lua_State *L, fast_reader *r) {
  const char *s = r->p;
  while (r->p < r->end) {
    unsigned char c = (unsigned char)*r->p;
    if (c == '"') {
      lua_pushlstring(L, s, (size_t)(r->p - s));
      r->p++;
      return 0;
    }
    if (c == '\\' || c < 0x20) return -1;
    r->p++;
  }
  return -1;
}

/*
** Pushes the integer at r->p: an optional '-', then "0" or 1 to 15 digits
** not starting with 0, not followed by '.', 'e' or 'E'. Fifteen digits
** stay below 2^53, so the value is exact as a double too (LuaJIT). "-0"
** is a float in the rules, so it is left to cJSON. Returns 0 or -1.
*/
static int fast_integer(lua_State *L, fast_reader *r) {
  const char *p = r->p, *digits;
  int neg = 0;
  lua_Integer v = 0;
  if (p < r->end && *p == '-') { neg = 1; p++; }
  digits = p;
  while (p < r->end && *p >= '0' && *p <= '9') {
    v = v * 10 + (*p - '0');
    p++;
    if (p - digits > 15) return -1;
  }
  if (p == digits || (*digits == '0' && (p - digits > 1 || neg))) return -1;
  if (p < r->end && (*p == '.' || *p == 'e' || *p == 'E')) return -1;
  lua_pushinteger(L, neg ? -v : v);
  r->p = p;
  return 0;
}

static int fast_word(fast_reader *r, const char *w, size_t n) {
  if ((size_t)(r->end - r->p) < n || memcmp(r->p, w, n) != 0) return -1;
  r->p += n;
  return 0;
}

static int fast_value(lua_State *L, fast_reader *r, int depth, int is_item);

/*
** After an item of a container that close ends: skips a ',' and the space
** after it (returns 1: an item follows), or close (returns 0); else -1.
*/
static int fast_after(fast_reader *r, char close) {
  fast_skip_space(r);
  if (r->p < r->end && *r->p == ',') {
    r->p++;
    fast_skip_space(r);
    return 1;
  }
  if (r->p < r->end && *r->p == close) {
    r->p++;
    return 0;
  }
  return -1;
}

/*
** The members of an object after its '{', pushed as key/value pairs
** above base, then copied into a table made at its final size in text
** order: a later duplicate wins, and a null member (nil) leaves its key
** out, or takes out an earlier one, as cJSON's tree does.
*/
static int fast_object(lua_State *L, fast_reader *r, int depth) {
  int base = lua_gettop(L), n = 0, i, more;
  fast_skip_space(r);
  if (r->p < r->end && *r->p == '}') {
    r->p++;
    lua_createtable(L, 0, 0);
    return 0;
  }
  for (;;) {
    if (!lua_checkstack(L, 4) || r->p >= r->end || *r->p != '"') break;
    r->p++;
    if (fast_string(L, r) != 0) break;
    fast_skip_space(r);
    if (r->p >= r->end || *r->p != ':') break;
    r->p++;
    fast_skip_space(r);
    if (fast_value(L, r, depth, 0) != 0) break;  /* a null is nil here */
    n++;
    if ((more = fast_after(r, '}')) > 0) continue;
    if (more == 0) {
      lua_createtable(L, 0, n);
      for (i = 0; i < n; i++) {
        lua_pushvalue(L, base + 2 * i + 1);
        lua_pushvalue(L, base + 2 * i + 2);
        lua_rawset(L, -3);
      }
      lua_replace(L, base + 1);
      lua_settop(L, base + 1);
      return 0;
    }
    break;
  }
  lua_settop(L, base);
  return -1;
}

/* The items of an array after its '[', pushed above base, then moved. */
static int fast_array(lua_State *L, fast_reader *r, int depth) {
  int base = lua_gettop(L), n = 0, more;
  fast_skip_space(r);
  if (r->p < r->end && *r->p == ']') {
    r->p++;
    lua_createtable(L, 0, 0);
    return 0;
  }
  for (;;) {
    if (!lua_checkstack(L, 3) || fast_value(L, r, depth, 1) != 0) break;
    n++;
    if ((more = fast_after(r, ']')) > 0) continue;
    if (more == 0) {
      lua_createtable(L, n, 0);
      lua_insert(L, base + 1);
      for (; n > 0; n--) lua_rawseti(L, base + 1, n);
      return 0;
    }
    break;
  }
  lua_settop(L, base);
  return -1;
}

/*
** Pushes the value at r->p (no space before it) and returns 0, or
** returns -1 with the stack as it was. A null is core.null in an array
** (is_item) and nil elsewhere.
*/
static int fast_value(lua_State *L, fast_reader *r, int depth, int is_item) {
  if (r->p >= r->end) return -1;
  switch (*r->p) {
    case '{':
      if (depth >= FAST_MAX_DEPTH) return -1;
      r->p++;
      return fast_object(L, r, depth + 1);
    case '[':
      if (depth >= FAST_MAX_DEPTH) return -1;
      r->p++;
      return fast_array(L, r, depth + 1);
    case '"':
      r->p++;
      return fast_string(L, r);
    case 't':
      if (fast_word(r, "true", 4) != 0) return -1;
      lua_pushboolean(L, 1);
      return 0;
    case 'f':
      if (fast_word(r, "false", 5) != 0) return -1;
      lua_pushboolean(L, 0);
      return 0;
    case 'n':
      if (fast_word(r, "null", 4) != 0) return -1;
      if (is_item) lua_pushlightuserdata(L, NULL);
      else lua_pushnil(L);
      return 0;
    default:
      return fast_integer(L, r);
  }
}

/* Pushes the value of a plain text and returns 0, or returns -1. */
static int fast_decode(lua_State *L, const char *s, size_t len) {
  fast_reader r;
  int top = lua_gettop(L);
  r.p = s;
  r.end = s + len;
  fast_skip_space(&r);
  if (fast_value(L, &r, 0, 0) != 0) return -1;
  fast_skip_space(&r);
  if (r.p != r.end) {
    lua_settop(L, top);
    return -1;
  }
  return 0;
}

int buzz__json_decode(lua_State *L, const char *s, size_t len) {
  int top = lua_gettop(L), rc = BUZZ_EINVAL;
  const char *end = NULL;
  size_t at, i;
  json_box *box;
  luaL_checkstack(L, 8, NULL);
  if (fast_decode(L, s, len) == 0) return 0;
  box = buzz__json_box_acquire(L);                                 /* at top + 1 */
  for (i = 0; i < len && is_space(s[i]); i++) {}
  if (i == len) {
    lua_pushliteral(L, "invalid JSON: the text is empty");
  } else if ((at = find_nul_escape(s, len)) < len) {
    push_syntax_error(L, s, len, at, "strings with \\u0000 (NUL) are not "
                      "supported");
  } else {
    /* The end pointer, not cJSON_GetErrorPtr(): that is a global. */
    box->tree = cJSON_ParseWithLengthOpts(s, len, &end, 0);
    if (box->tree == NULL) {
      at = end != NULL ? (size_t)(end - s) : 0;
      push_syntax_error(L, s, len, at,
                        depth_at(s, at) >= JSON_MAX_DEPTH ?
                        "arrays and objects nest deeper than 1000 levels" :
                        at > 0 && at + 1 >= len ?
                        "syntax error, or the text is cut short" :
                        "syntax error");
    } else {
      at = (size_t)(end - s);
      while (at < len && is_space(s[at])) at++;
      if (at < len) {
        buzz__json_box_drop(box);
        push_syntax_error(L, s, len, at, "unexpected text after the value");
      } else {
        rc = decode_node(L, box, box->tree);
      }
    }
  }
  buzz__json_box_release(box);
  buzz__json_settle(L, top);
  return rc;
}


