/*
** jsondec.c: JSON text to Lua values (buzz__json_decode), through cJSON's
** parser. The rules are in json.c's header.
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

int buzz__json_decode(lua_State *L, const char *s, size_t len) {
  int top = lua_gettop(L), rc = BUZZ_EINVAL;
  const char *end = NULL;
  size_t at, i;
  json_box *box;
  luaL_checkstack(L, 8, NULL);
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


